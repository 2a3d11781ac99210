"""The state API: optimizer configuration per rank, parameters, and parameter history."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from service.deps import Authenticated, ClockDep, SettingsDep, SingleValuedQuery, StoreDep
from service.problems import ProblemError, problem_responses
from service.records import ParamRecord, RankRecord
from service.schema import (
    MAX_RANK,
    MAX_STEP,
    PARAM_NAME_MAX_LENGTH,
    RUN_ID_MAX_LENGTH,
    RUN_ID_PATTERN,
    HistoryPoint,
    OptimizerConfig,
    OptimizerView,
    ParamDetail,
    ParamHistory,
    ParamName,
    ParamPage,
    ParamState,
    ParamSummary,
    RankState,
)

router = APIRouter(
    prefix="/v1", tags=["state"], dependencies=[Authenticated, SingleValuedQuery],
    responses=problem_responses(401),
)
MAX_PAGE = 1000
MAX_HISTORY = 10_000
_CURSOR_DOC = "next_cursor of the previous page"
_PARAM_NAME = TypeAdapter(ParamName)  # the schema's own rule for a parameter's name
#: The longest cursor this API hands out: base64url (no padding) of the longest name in UTF-8,
#: up to 4 bytes a character.
CURSOR_MAX_LENGTH = -(-4 * 4 * PARAM_NAME_MAX_LENGTH // 3)
_RUN_DOC = "run to read; default: the run of the parameter's latest snapshot"


def _decimal(value: Any) -> Any:
    """A query's integer as decimal digits only: read as pydantic reads integers, ``1_0``,
    ``+5``, `` 5`` and ``5.0`` passed as 10, 5, 5 and 5."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written in decimal digits only")
    return value


#: An integer query parameter (then bounded by its Field).
QueryInt = Annotated[int, BeforeValidator(_decimal)]


class _Query(BaseModel):
    """An endpoint's query parameters. One it does not take is refused (422, naming it) rather
    than ignored: ``?fromStep=100`` or ``?metric=x`` would otherwise answer as if not asked."""

    model_config = ConfigDict(extra="forbid")


class NoQuery(_Query):
    """The query of an endpoint that takes no parameters."""


class _PageQuery(_Query):
    limit: QueryInt = Field(100, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(None, description=_CURSOR_DOC)
    # bounded as a snapshot's rank is: a larger one named no rank and answered an empty page
    rank: QueryInt | None = Field(None, ge=0, le=MAX_RANK, description="only this owner rank")


class _HistoryQuery(_Query):
    from_step: QueryInt = Field(0, ge=0, le=MAX_STEP)
    to_step: QueryInt = Field(MAX_STEP, ge=0, le=MAX_STEP)
    run_id: str | None = Field(None, min_length=1, max_length=RUN_ID_MAX_LENGTH,
                               pattern=RUN_ID_PATTERN, description=_RUN_DOC)
    limit: QueryInt = Field(1000, ge=1, le=MAX_HISTORY)


def encode_cursor(name: str) -> str:
    """Opaque cursor: the last name of a page, base64url without padding."""
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, known: Callable[[str], bool] = lambda name: False) -> str:
    """Inverse of ``encode_cursor``; a cursor this API did not produce is a 400.

    Strict, so that a mangled cursor is an error rather than a silent restart at page 1:
    characters outside the base64url alphabet are refused (``urlsafe_b64decode`` would skip
    them), the name must encode back to exactly ``cursor`` (which refuses "+", "/",
    padding and non-zero trailing bits, all of which decode but are never produced), and it
    must be a name a snapshot can hold (a cursor of a NUL character, or of "a/b", restarted at
    page 1), or one the store holds (``known``: a name an earlier version's rules let in, which
    a page ended on, so its cursor pages on).
    """
    bad = ProblemError(
        400, "The cursor is not valid; pass next_cursor back unchanged.", slug="bad-cursor"
    )
    if not cursor or len(cursor) > CURSOR_MAX_LENGTH:  # no name's (names are never empty)
        raise bad
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        name = raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise bad from exc
    if encode_cursor(name) != cursor:
        raise bad
    try:
        _PARAM_NAME.validate_python(name)
    except ValidationError as exc:
        if not known(name):
            raise bad from exc
    return name


def _summary(rec: ParamRecord, now: float, ttl: float) -> ParamSummary:
    return ParamSummary(
        name=rec.name,
        rank=rec.rank,
        run_id=rec.run_id,
        step=rec.step,
        received_at=rec.received_at,
        stale=now - rec.received_at > ttl,
    )


def rank_state(r: RankRecord, *, stale: bool) -> RankState:
    """The API's view of one rank's record."""
    return RankState(
        rank=r.rank,
        run_id=r.run_id,
        step=r.step,
        wall_time=r.wall_time,
        received_at=r.received_at,
        snapshots_received=r.snapshots_received,
        stale=stale,
        finished_at=r.finished_at,
        optimizer=_stored_optimizer(r.optimizer) if r.optimizer else None,
    )


# Control characters (C0, DEL, C1): parameter names have refused them since schema v1's names
# rule was tightened; a summary stored before then may still hold some.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))}


def _written_out(name: str) -> str:
    """A stored name with its control characters written out (``\\x1b``, the same text any
    terminal shows safely); cut, between characters, to the names' length limit with a
    closing ellipsis if that made it longer."""
    text = name.translate(_CONTROLS)
    if len(text) <= PARAM_NAME_MAX_LENGTH:
        return text
    pieces, room = [], PARAM_NAME_MAX_LENGTH - 1
    for char in name:
        piece = _CONTROLS.get(ord(char), char)
        if len(piece) > room:
            break
        pieces.append(piece)
        room -= len(piece)
    return "".join(pieces) + "\u2026"


def _stored_optimizer(stored: dict[str, Any]) -> OptimizerConfig:
    """A stored configuration as the API model (its class and groups; a rank's state
    summaries are stored per parameter). It was validated when it came in; one stored before
    names refused control characters has them written out (:func:`_written_out`) instead of
    failing the whole answer."""
    config = {k: stored[k] for k in ("class_name", "groups") if k in stored}
    try:
        return OptimizerConfig.model_validate(config)
    except ValidationError:
        legacy = {**config,
                  "groups": [{**g, "params": [_written_out(n) for n in g.get("params", [])]}
                             for g in config.get("groups", [])]}
        return OptimizerConfig.model_validate(legacy)


@router.get("/optimizer", summary="Optimizer configuration and step per rank",
            responses=problem_responses(422))
def get_optimizer(store: StoreDep, settings: SettingsDep, clock: ClockDep,
                  _: Annotated[NoQuery, Query()]) -> OptimizerView:
    """Every rank ever seen, its run, step, receive time and the configuration it last sent."""
    now = clock()
    return OptimizerView(ranks=[rank_state(r, stale=now - r.received_at > settings.series_ttl_s)
                                for r in store.ranks()])


@router.get(
    "/params",
    summary="Parameters (cursor pagination, name order)",
    responses=problem_responses(400, 422),
)
def list_params(
    store: StoreDep,
    settings: SettingsDep,
    clock: ClockDep,
    query: Annotated[_PageQuery, Query()],
) -> ParamPage:
    """A page of parameters; ``next_cursor`` is null on the last page."""
    limit, cursor = query.limit, query.cursor
    # "": a bad cursor too
    after = (decode_cursor(cursor, lambda name: store.param(name) is not None)
             if cursor is not None else None)
    records = store.page(after=after, limit=limit + 1, rank=query.rank)
    more = len(records) > limit
    records = records[:limit]
    now = clock()
    return ParamPage(
        items=[_summary(r, now, settings.series_ttl_s) for r in records],
        next_cursor=encode_cursor(records[-1].name) if more else None,
    )


def _path_segment(name: str) -> str:
    """``name`` as one percent-encoded path segment; ``.`` and ``..`` as ``%2E``s, which
    clients would otherwise resolve as dot segments (``/v1/params/../history``)."""
    if name in (".", ".."):
        return "%2E" * len(name)
    return urllib.parse.quote(name, safe="")


def _require(store: StoreDep, name: str) -> ParamRecord:
    rec = store.param(name)
    if rec is None:
        raise ProblemError(
            404,
            f"No latest state for a parameter named {name!r}: no snapshot named it, or only "
            f"snapshots taken before their rank's latest, which history keeps (pass run_id).",
            slug="unknown-param",
        )
    return rec


@router.get(
    "/params/{name}",
    summary="Latest metrics and state summary of a parameter",
    responses=problem_responses(404, 422),
)
def get_param(name: str, store: StoreDep, settings: SettingsDep, clock: ClockDep,
              _: Annotated[NoQuery, Query()]) -> ParamDetail:
    """Latest metrics, owner rank, run, step and the last state summary received."""
    rec = _require(store, name)
    base = _summary(rec, clock(), settings.series_ttl_s)
    return ParamDetail(
        **base.model_dump(),
        wall_time=rec.wall_time,
        metrics=rec.metrics,
        state=ParamState.model_validate(rec.state) if rec.state else None,
    )


@router.get(
    "/params/{name}/history",
    summary="A parameter's metrics by step range",
    responses=problem_responses(400, 404, 422, 503),
)
def get_history(
    name: str,
    store: StoreDep,
    query: Annotated[_HistoryQuery, Query()],
) -> ParamHistory:
    """Points with ``from_step <= step <= to_step`` in step order (retention permitting).

    A run holds one point per step (a re-sent step replaced the earlier point), so continuing
    from ``next_from_step``, the first step not returned, in the same run, walks the range
    exactly: no point twice, none skipped, whatever the limit. ``next`` is that page's path and
    query, the run included (without ``run_id`` the default run is the latest one, which a
    new run changes between two pages).
    """
    from_step, to_step, run_id, limit = query.from_step, query.to_step, query.run_id, query.limit
    if from_step > to_step:
        raise ProblemError(400, "from_step must not exceed to_step.", slug="bad-range")
    run = run_id or _require(store, name).run_id
    rows = store.history(name, run_id=run, from_step=from_step, to_step=to_step, limit=limit + 1)
    if not rows:
        _require(store, name)  # 404 for a name never reported, an empty list otherwise
    more = len(rows) > limit
    points = [
        HistoryPoint(step=r.step, rank=r.rank, wall_time=r.wall_time, metrics=r.metrics)
        for r in rows[:limit]
    ]
    next_step = rows[limit].step if more else None
    return ParamHistory(
        name=name, run_id=run, points=points, next_from_step=next_step,
        next=None if next_step is None else (
            f"/v1/params/{_path_segment(name)}/history?"
            + urllib.parse.urlencode({"from_step": next_step, "to_step": to_step,
                                      "run_id": run, "limit": limit})),
    )

"""``POST /v1/snapshots``: accept one rank's snapshot."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status

from service.api.state import NoQuery, rank_state
from service.deps import (
    Authenticated,
    ClockDep,
    SettingsDep,
    SingleValuedQuery,
    StoreDep,
    WritesDep,
)
from service.problems import ProblemError, problem_responses
from service.records import OtherRun, UnknownRank
from service.schema import MAX_RANK, Accepted, Finish, RankState, Snapshot

router = APIRouter(prefix="/v1", tags=["ingest"],
                   dependencies=[Authenticated, SingleValuedQuery])


@router.post(
    "/snapshots",
    status_code=status.HTTP_201_CREATED,
    summary="Ingest a snapshot (schema v1)",
    responses=problem_responses(400, 401, 413, 415, 422, 503),
)
async def post_snapshot(
    snapshot: Snapshot, store: StoreDep, writes: WritesDep, request: Request,
    _: Annotated[NoQuery, Query()],
) -> Accepted:
    """Validate and store a snapshot; it is durable in SQLite before the 201 is sent.

    Refused with nothing stored: malformed JSON (400), a body over the size limit (413), a body
    not sent as ``application/json`` (415),
    unknown ``schema_version``, unknown fields, wrong types, NaN/Infinity tokens or collections
    over their bounds (422), a missing or wrong token (401); the database busy (locked by
    another process for ``store.WRITE_WAIT_S``, or ``max_writes`` writes already waiting for
    it): 503 ``storage-unavailable`` with ``Retry-After``.
    """
    stored = await writes.run(store.ingest, snapshot, request=request)
    return Accepted(
        run_id=snapshot.run_id, rank=snapshot.rank, step=snapshot.step, params_stored=stored
    )


@router.post(
    "/ranks/{rank}/finish",
    summary="Say a rank's run ended normally",
    responses=problem_responses(400, 401, 404, 409, 413, 415, 422, 503),
)
async def finish_rank(
    rank: Annotated[int, Path(ge=0, le=MAX_RANK)], body: Finish, store: StoreDep, writes: WritesDep,
    settings: SettingsDep, clock: ClockDep, _: Annotated[NoQuery, Query()],
) -> RankState:
    """Mark ``rank``'s run as ended (``Publisher.close(finished=True)`` sends it): the rank's
    ``orthoshard_last_snapshot_timestamp_seconds`` leaves ``/metrics``, so a run that finished
    does not page as a stale rank. Its next snapshot (a new or resumed run) clears the mark,
    unless it is of this run and taken by ``last_wall_time`` (it was in flight).
    404: no snapshot from this rank yet; 409: its latest snapshot is of another run; 503: the
    database is busy (as for a snapshot)."""
    try:
        r = await writes.run(store.finish, rank, body.run_id, body.last_wall_time)
    except UnknownRank as exc:
        raise ProblemError(404, f"No snapshot from rank {rank} yet.", slug="unknown-rank") from exc
    except OtherRun as exc:
        raise ProblemError(
            409,
            f"Rank {rank} last reported run {exc.args[0]!r}, not {body.run_id!r}: a finish of "
            f"another run (an earlier one, or one this rank never reported) does not end the "
            f"one it is running now.",
            slug="other-run",
        ) from exc
    return rank_state(r, stale=clock() - r.received_at > settings.series_ttl_s)

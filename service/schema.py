"""Wire models (pydantic v2): the snapshot a trainer rank posts, and the API's answers.

Snapshot schema v1
------------------
One rank's view at one optimizer step::

    {"schema_version": 1, "run_id": "r42", "rank": 0, "step": 100, "wall_time": 1.7e9,
     "params": {"layers.0.attn.q.weight": {"orthogonality_error": 0.003,
                                           "rotation_degrees_L_k1": 1.5, ...}},
     "optimizer": {"class_name": "SOAP",
                   "groups": [{"hyperparameters": {"lr": 0.003, "betas": [0.9, 0.95]},
                               "params": ["layers.0.attn.q.weight"]}],
                   "state": {"layers.0.attn.q.weight": {"shape": [512, 512], "owner_rank": 0,
                             "buffer_norms": {"exp_avg": 0.4},
                             "eigenvalues": {"L": [3.1, 0.2], "R": [2.2, 0.9]}}}}}

``params`` is exactly ``optimizer.health()``; ``optimizer`` is optional.

NaN / Inf policy
----------------
The body is strict JSON (RFC 8259): the non-standard tokens ``NaN``, ``Infinity`` and
``-Infinity`` are refused with 422 wherever they appear, and nothing is stored. A metric, buffer
norm or eigenvalue that was not finite at the source is sent as ``null`` (``Publisher`` does this
conversion); the sidecar stores the ``null`` and exports the sample as ``NaN`` on ``/metrics``,
so the series stays present and ``x != x`` finds it. Identity and bookkeeping fields (rank, step,
wall time, shapes) must be finite; a ``null`` there is a type error (422). A hyperparameter may
be ``null`` (a softening schedule that raised).

Every collection has a size bound; unknown fields are refused (``extra="forbid"``).

Types are strict (``strict=True``): an integer field takes only a JSON integer (not ``5.0``,
``"5"`` or ``true``), a float field a JSON number (an integer or a float, not a string or a
boolean), a string field only a string. A sender whose numbers arrive as strings or booleans has
a bug; coercing them would store values nobody sent. ``schema_version`` is exactly the integer 1.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1
MAX_PARAMS = 20_000
MAX_METRICS_PER_PARAM = 64
MAX_GROUPS = 256
MAX_EIGENVALUES = 256
MAX_STEP = 2**62  # steps are stored as SQLite integers (signed 64-bit)
MAX_RANK = 65535  # ranks and owner ranks: a job of at most 65,536 processes

# Parameter names are module paths ("layers.0.attn.q_proj.weight"); no "/" so that
# /v1/params/{name} is unambiguous, no whitespace or control characters (C0, DEL and C1: a
# name is printed in terminals, where U+009B starts an escape sequence).
PARAM_NAME_MAX_LENGTH = 256
ParamName = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=PARAM_NAME_MAX_LENGTH, pattern=r"^[^\s/\x00-\x1f\x7f-\x9f]+$"
    ),
]
MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
#: A run id: letters, digits, "_", ".", ":" and "-" (it labels history and appears in URLs).
RUN_ID_PATTERN = r"^[\w.:-]+$"
RUN_ID_MAX_LENGTH = 128
RunId = Annotated[
    str, StringConstraints(min_length=1, max_length=RUN_ID_MAX_LENGTH, pattern=RUN_ID_PATTERN)
]
ShortText = Annotated[str, StringConstraints(max_length=256)]
#: A measured value: a finite float, or null when it was NaN/Inf at the source.
Measure = float | None
ParamMetrics = Annotated[dict[MetricName, Measure], Field(max_length=MAX_METRICS_PER_PARAM)]
Eigenvalues = Annotated[list[Measure], Field(max_length=MAX_EIGENVALUES)]
HyperValue = bool | int | float | ShortText | list[float | int] | None


def _integer_only(value: object) -> object:
    """Refuse what is not an integer before ``Literal`` compares it: ``true == 1 == 1.0`` in
    Python, so ``Literal[1]`` alone takes ``true`` and ``1.0``, even in strict mode."""
    if type(value) is not int:
        raise PydanticCustomError("literal_error", "Input should be the integer 1")
    return value


SchemaVersion = Annotated[Literal[1], BeforeValidator(_integer_only)]


class _Strict(BaseModel):
    """Base: unknown fields refused, NaN/Inf refused in every float field, no type coercion
    (a JSON int for an int, a JSON number for a float; see the module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


class ParamGroup(_Strict):
    """One optimizer param group: its hyperparameters and (optionally) member names."""

    hyperparameters: dict[MetricName, HyperValue] = Field(default_factory=dict, max_length=64)
    params: list[ParamName] = Field(default_factory=list, max_length=MAX_PARAMS)


class ParamState(_Strict):
    """A summary of one parameter's optimizer state (no tensors, only shapes and norms)."""

    shape: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=8)
    owner_rank: int | None = Field(default=None, ge=0, le=MAX_RANK)
    buffer_norms: dict[MetricName, Measure] = Field(default_factory=dict, max_length=16)
    eigenvalues: dict[MetricName, Eigenvalues] = Field(
        default_factory=dict,
        max_length=4,
        description="top-k eigenvalue estimates per preconditioner factor ('L', 'R'), "
        "descending (SOAP: Rayleigh quotients of its eigenbasis' leading columns)",
    )


class OptimizerConfig(_Strict):
    """The optimizer's configuration: its class and param groups."""

    class_name: ShortText
    groups: list[ParamGroup] = Field(default_factory=list, max_length=MAX_GROUPS)


class OptimizerInfo(OptimizerConfig):
    """The optimizer's configuration and per-parameter state summaries (what a rank sends;
    the summaries are served per parameter, ``GET /v1/params/{name}``)."""

    state: dict[ParamName, ParamState] = Field(default_factory=dict, max_length=MAX_PARAMS)


class Snapshot(_Strict):
    """What one rank posts to ``POST /v1/snapshots`` (schema v1)."""

    schema_version: SchemaVersion = Field(description="must be 1; other versions are refused")
    run_id: RunId
    rank: int = Field(ge=0, le=MAX_RANK)
    step: int = Field(ge=0, le=MAX_STEP)
    wall_time: float = Field(gt=0, description="Unix seconds at the trainer when taken")
    params: dict[ParamName, ParamMetrics] = Field(max_length=MAX_PARAMS)
    optimizer: OptimizerInfo | None = None

    @field_validator("params")
    @classmethod
    def _counts_not_negative(cls, params: dict[str, dict[str, float | None]]
                             ) -> dict[str, dict[str, float | None]]:
        """``nonfinite_skips`` is a count, exported as a counter: a negative one is refused."""
        for name, metrics in params.items():
            count = metrics.get("nonfinite_skips")
            if count is not None and count < 0:
                raise ValueError(f"params[{name!r}].nonfinite_skips is a count of skipped "
                                 f"updates: it must be >= 0, got {count}")
        return params


class Finish(_Strict):
    """What a rank posts to ``POST /v1/ranks/{rank}/finish`` when its run ended normally."""

    run_id: RunId = Field(description="the run that ended; must be the rank's latest run")
    last_wall_time: float | None = Field(
        default=None, gt=0,
        description="wall_time of the last snapshot the rank published (Publisher sends it): a "
        "snapshot of this run taken no later, arriving after the finish (it was in flight), "
        "keeps the finish; without it, any later snapshot clears it")


class Accepted(BaseModel):
    """Answer to an accepted snapshot."""

    run_id: str
    rank: int
    step: int
    params_stored: int


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


class RankState(BaseModel):
    """Last-known state of one rank."""

    rank: int
    run_id: str
    step: int
    wall_time: float
    received_at: float
    snapshots_received: int
    stale: bool
    finished_at: float | None = Field(
        default=None,
        description="when the rank said its run ended (Publisher.close(finished=True)); "
        "cleared by its next snapshot",
    )
    # the configuration only: each parameter's state summary is GET /v1/params/{name}'s (an
    # empty "state" here read as a rank without optimizer state)
    optimizer: OptimizerConfig | None = None


class OptimizerView(BaseModel):
    """Answer of ``GET /v1/optimizer``: configuration and step per rank."""

    ranks: list[RankState]


class ParamSummary(BaseModel):
    """One row of ``GET /v1/params``."""

    name: str
    rank: int
    run_id: str
    step: int
    received_at: float
    stale: bool


class ParamPage(BaseModel):
    """A page of parameters; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[ParamSummary]
    next_cursor: str | None = None


class ParamDetail(ParamSummary):
    """Answer of ``GET /v1/params/{name}``: latest metrics and state summary."""

    wall_time: float
    metrics: dict[str, float | None]
    state: ParamState | None = None


class HistoryPoint(BaseModel):
    """One step of a parameter's history."""

    step: int
    rank: int
    wall_time: float
    metrics: dict[str, float | None]


class ParamHistory(BaseModel):
    """Answer of ``GET /v1/params/{name}/history``."""

    name: str
    run_id: str
    points: list[HistoryPoint]
    next_from_step: int | None = Field(
        default=None, description="set when the limit cut the range; continue from this step, "
        "in this run_id"
    )
    next: str | None = Field(
        default=None, description="set when the limit cut the range: the next page's path and "
        "query (this run_id, from next_from_step)"
    )

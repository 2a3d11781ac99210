"""What the store answers and raises: the last-known state of a rank and of a parameter, a
history point, and the store's errors.

Kept apart from :mod:`service.store` so that the routes and the exporter name these types
without the store's SQLite machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnknownRank(LookupError):
    """A rank this store has never received a snapshot from."""


class OtherRun(ValueError):
    """A rank whose latest snapshot belongs to another run than the one named."""


class StoreBusy(RuntimeError):
    """The database stayed locked for :data:`service.store.WRITE_WAIT_S` (by another process's
    transaction, or a write stalled on the disk), or the store is closing: nothing was written;
    try later."""


class DatabaseInUse(StoreBusy):
    """Another running sidecar holds the database file (its ``PATH.lock``): nothing was
    opened."""


class Abandoned(RuntimeError):
    """The client of a write had gone when its turn came: nothing was written."""


@dataclass(frozen=True, slots=True)
class RankRecord:
    """Last-known state of one rank."""

    rank: int
    run_id: str
    step: int
    wall_time: float
    received_at: float
    snapshots_received: int
    optimizer: dict[str, Any] | None
    finished_at: float | None = None  # receive time of the rank's "run ended", if it said so
    # the wall_time of the last snapshot the rank published before it said so (if it told):
    # a snapshot of the run taken no later, arriving after the finish, keeps the finish
    finished_wall_time: float | None = None


@dataclass(frozen=True, slots=True)
class ParamRecord:
    """Last-known metrics and state summary of one parameter."""

    name: str
    run_id: str
    rank: int
    step: int
    wall_time: float
    received_at: float
    metrics: dict[str, float | None]
    state: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One parameter at one step."""

    step: int
    rank: int
    wall_time: float
    metrics: dict[str, float | None]

"""What the store answers and raises: the last-known state of a rank and of a parameter, a
history point, the store's errors, and the waits those errors are defined by.

Kept apart from :mod:`service.store` so that the routes and the exporter name these types
without the store's SQLite machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Longest a write (an ingest, a finish, a merge) waits for the database: for the store's lock,
#: then for SQLite's write lock (another process's transaction). Half the Publisher's default
#: 2 s timeout, so that its client is answered 503 (and retries later) before it gives up on
#: the request; what normally holds the lock, a merge chunk or a RESTART checkpoint, takes
#: ~0.1-0.2 s at most (see _MERGE_CHUNK and _CATCH_UP_PASSES in service.checkpointer).
WRITE_WAIT_S = 1.0
#: Longest :meth:`Store.close` waits for the database before it leaves the pending rows to the
#: next start (the sidecar then stops anyway: SIGTERM must end it while a database is locked).
CLOSE_WAIT_S = 2.0


class UnknownRank(LookupError):
    """A rank this store has never received a snapshot from."""


class OtherRun(ValueError):
    """A rank whose latest snapshot belongs to another run than the one named."""


class StoreBusy(RuntimeError):
    """The database stayed locked for :data:`WRITE_WAIT_S` (by another process's transaction,
    or a write stalled on the disk), or the store is closing: nothing was written; try later."""


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

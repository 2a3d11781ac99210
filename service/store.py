"""SQLite-backed store: last-known state per rank and parameter, and bounded history.

Reads for ``/metrics`` and the state API are served from an in-memory mirror of the two
"latest" tables (loaded at start, updated on every ingest), so a scrape never touches the disk.
Every accepted snapshot is written in one transaction before the ingest answers, so a restarted
sidecar answers history queries and its last-known state: nothing accepted is lost.

Tables: ``ranks`` (one row per rank; ``finished_at`` is set when the rank says its run ended
and cleared by its next snapshot, unless that one was taken before the rank said so:
``finished_wall_time``), ``pending`` (the parameters' rows of accepted snapshots not
merged yet), ``params`` (one row per parameter name) and ``history`` (one row per parameter,
run and step; the oldest rows beyond ``history_max_rows`` are pruned at each merge, and a
history read merges first, so the bound is exact). WAL journal, ``synchronous=NORMAL``: a
power cut may lose the last transactions but never corrupts the file; a process crash loses
nothing committed.

An ingest's commit writes its rank's row and appends its parameters' rows to ``pending``, a
table without secondary indexes, so one snapshot dirties a few contiguous pages. Every
``merge_interval_s`` the store's thread (:class:`_Checkpointer`) moves ``pending`` into
``history`` and ``params`` in one transaction (:meth:`Store._merge`), where each leaf of the
history index is written once for all the steps since the last merge: written at each ingest, a
500-parameter snapshot dirtied ~670 pages, ~540 of them leaves of that index (one per
parameter). Reads of history merge first, and a restarted store replays ``pending`` into its
mirror before merging it, so nothing accepted is ever missing from what the store answers.

Copying the WAL into the database file (a checkpoint, with an fsync) runs on the same thread
with its own connection, so no ingest waits for it: SQLite's automatic checkpoint, which the
committing connection runs every 1000 pages, took ~30-50% of the store's time for a
500-parameter snapshot (``Store.ingest`` 14.4-21.0 ms with it, 9.9-11.0 ms without, before the
merge: bench/sidecar.py).

A step can arrive twice in one run: an elastic restart resumes from a checkpoint under the same
run id and re-sends the steps after it, and the publisher re-sends a snapshot whose answer timed
out although the sidecar had committed it. The re-sent point replaces the earlier one (an upsert
on ``(name, run_id, step)``), so history has one point per step and paging by step is exact. The
row keeps its id, so ids stay contiguous and pruning by id keeps exactly ``history_max_rows``.
A snapshot taken before its rank's latest (same run, lower step, earlier wall time: a request
that waited, or a retry, arriving after newer ones; or, with an earlier wall time, of a run the
rank reported before its latest, as ``rank_runs`` records them) only adds the points history
lacks or holds from an earlier wall time (the crashed attempt's, when a resumed run's request
arrives late; the row keeps its id as above); the latest state and the rank's count stay those
of the newer snapshot.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service.schema import Snapshot

_HISTORY_TABLE = """CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, run_id TEXT NOT NULL, rank INTEGER NOT NULL,
    step INTEGER NOT NULL, wall_time REAL NOT NULL, metrics TEXT NOT NULL)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ranks (
    rank INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL,
    wall_time REAL NOT NULL, received_at REAL NOT NULL, snapshots_received INTEGER NOT NULL,
    optimizer TEXT, finished_at REAL, finished_wall_time REAL);
CREATE TABLE IF NOT EXISTS params (
    name TEXT PRIMARY KEY, run_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL,
    wall_time REAL NOT NULL, received_at REAL NOT NULL, metrics TEXT NOT NULL, state TEXT);
{_HISTORY_TABLE};
CREATE TABLE IF NOT EXISTS rank_runs (
    rank INTEGER NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (rank, run_id));
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, run_id TEXT NOT NULL, rank INTEGER NOT NULL,
    step INTEGER NOT NULL, wall_time REAL NOT NULL, received_at REAL NOT NULL,
    metrics TEXT NOT NULL, state TEXT);
"""
_HISTORY_COLUMNS = "name, run_id, rank, step, wall_time, metrics"
_PARAM_COLUMNS = "name, run_id, rank, step, wall_time, received_at, metrics, state"
#: The unique index that makes a re-sent step an upsert; created by ``Store._migrate`` because a
#: database of an earlier version may first need its repeated steps merged.
_POINT_INDEX = "history_point"
#: Recorded in ``PRAGMA user_version`` at every start (databases of earlier versions hold 0).
#: 1: one history row per (name, run_id, step).
_FORMAT_VERSION = 1
_RANK_COLUMNS = ("rank, run_id, step, wall_time, received_at, snapshots_received, optimizer, "
                 "finished_at, finished_wall_time")
#: The WAL file is cut back to this size when it starts over (it keeps its largest size
#: otherwise).
_WAL_SIZE_LIMIT = 64 << 20
#: Pending rows the store's thread merges in one transaction: ~10 ms of merge per 1000 rows
#: here, so writers wait at most ~0.1-0.2 s for one chunk; the next cycle (0.2 s on) merges the
#: next chunk, up to ~50 000 rows a second.
_MERGE_CHUNK = 10_000
#: PASSIVE passes between the first one and a RESTART: 10 s of back-to-back 500-parameter
#: ingests held writers for 25-31 ms (median; at most 53) per RESTART with 2, 41-48 ms (at most
#: 97) with none; ingest p99 53 against 68-71 ms.
_CATCH_UP_PASSES = 2
#: Longest a write (an ingest, a finish, a merge) waits for the database: for the store's lock,
#: then for SQLite's write lock (another process's transaction). Half the Publisher's default
#: 2 s timeout, so that its client is answered 503 (and retries later) before it gives up on
#: the request; what normally holds the lock, a merge chunk or a RESTART checkpoint, takes
#: ~0.1-0.2 s at most (see _MERGE_CHUNK and _CATCH_UP_PASSES).
WRITE_WAIT_S = 1.0
#: Longest :meth:`Store.close` waits for the database before it leaves the pending rows to the
#: next start (the sidecar then stops anyway: SIGTERM must end it while a database is locked).
CLOSE_WAIT_S = 2.0
_log = logging.getLogger("orthoshard.sidecar.store")


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


# One encoder for every row: json.dumps with options builds a new encoder per call (2x slower).
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _dumps(value: Any) -> str | None:
    return None if value is None else _ENCODER.encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Store:
    """Thread-safe store; one instance per sidecar process.

    Args:
        path: SQLite file, or ``":memory:"``.
        history_max_rows: history rows kept (older rows pruned at each merge).
        clock: returns Unix seconds; injected so tests control "received at".
        merge_interval_s: how often accepted snapshots move from ``pending`` into ``history``
            and ``params`` (a file database; an in-memory one merges at each ingest).
    """

    def __init__(
        self, path: str, *, history_max_rows: int, clock: Callable[[], float] = time.time,
        merge_interval_s: float = 2.0,
    ) -> None:
        self._clock = clock
        self._max_rows = history_max_rows
        # _lock guards the in-memory mirror and is held only briefly, so that reads of the
        # latest state (a scrape) never wait for the disk; _db_lock guards the connection and
        # serializes the writers (and the checkpointer's RESTART): a writer holds it from
        # reading the mirror to updating it
        self._lock = threading.RLock()
        self._db_lock = threading.RLock()
        # uri=True: a "file:" path is a SQLite URI (e.g. "file:state.db?mode=ro"); any other
        # path is a plain file name as before
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, uri=True)
        self._checkpointer: _Checkpointer | None = None
        self._closing = False  # close() began: writes waiting for their turn give up
        self._prepared = False  # the tables exist (a store that failed to open merges nothing)
        self._ranks: dict[int, RankRecord] = {}
        self._params: dict[str, ParamRecord] = {}
        self._names: list[str] = []
        self._listeners: list[Callable[[list[ParamRecord]], None]] = []
        try:
            wal = self._prepare()
            # from here on a write waits for SQLite's lock in _transaction, which gives up at
            # its deadline (SQLite's own busy wait, 5 s, cannot be cut short by a close)
            self._db.execute("PRAGMA busy_timeout = 0")
            self._prepared = True
            if wal:  # a file database (an in-memory one has no WAL)
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = _Checkpointer(path, self._db_lock, merge=self._merge,
                                                   merge_interval_s=merge_interval_s)
            self._load()
            self._merge()  # what the last run accepted and did not merge
            self._bound()  # a --history-max-rows lowered since those rows were written
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> bool:
        """Create or migrate the tables and prove the database writable. Returns whether the
        database is in WAL mode (a file; an in-memory database keeps its journal in memory).

        Raises:
            sqlite3.Error: the file is not a SQLite database, or the sidecar cannot write it.
        """
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        # A damaged file opens and even takes writes, then fails every read of the damaged
        # pages (history answers 500, acknowledged snapshots stay unmerged) and the next start.
        # quick_check reads every page once (O(file), without the index cross-checks of
        # integrity_check): it is refused here instead, by name.
        problems = [" ".join(str(row[0]).split())
                    for row in self._db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(
                f"the database is damaged (sqlite quick_check: {' / '.join(problems)}); restore "
                "it from a backup, or move it aside and start with a new --db")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        self._db.executescript(_SCHEMA)
        with self._db_lock, self._transaction() as db:
            self._migrate(db)
            # A write at every start, even when nothing needs creating: the statements above
            # only read an existing database in WAL mode, so a file the sidecar cannot write
            # (read-only, immutable, on a read-only mount) would otherwise start and then fail
            # every ingest with a 500. It fails here instead, and the sidecar does not start.
            db.execute(f"PRAGMA user_version = {_FORMAT_VERSION}")
        return str(mode).lower() == "wal"

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring a database written by an earlier version up to this schema (in place, inside
        the caller's transaction)."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(ranks)")}
        for column in ("finished_at", "finished_wall_time"):
            if column not in columns:
                db.execute(f"ALTER TABLE ranks ADD COLUMN {column} REAL")
        if _POINT_INDEX not in {row[1] for row in db.execute("PRAGMA index_list(history)")}:
            self._merge_repeated_steps(db)
            db.execute(f"CREATE UNIQUE INDEX {_POINT_INDEX} ON history (name, run_id, step)")
            db.execute("DROP INDEX IF EXISTS history_by_name")  # the earlier, non-unique one
        # runs reported before rank_runs existed: each rank's latest (the runs they left are
        # known by their points in history, see _superseded)
        db.execute("INSERT OR IGNORE INTO rank_runs (rank, run_id) SELECT rank, run_id FROM ranks")

    @staticmethod
    def _merge_repeated_steps(db: sqlite3.Connection) -> None:
        """Earlier versions appended a re-sent step as another row: keep the latest row of each
        (name, run_id, step), as the upsert now does. The table is rebuilt in id order so that
        ids are contiguous again (the exact retention bound prunes by id)."""
        repeated = db.execute(
            "SELECT 1 FROM history GROUP BY name, run_id, step HAVING COUNT(*) > 1 LIMIT 1"
        ).fetchone()
        if repeated is None:
            return
        db.execute("ALTER TABLE history RENAME TO history_before_merge")
        db.execute("DROP INDEX IF EXISTS history_by_name")
        db.execute(_HISTORY_TABLE)
        db.execute(
            f"INSERT INTO history ({_HISTORY_COLUMNS}) SELECT {_HISTORY_COLUMNS} FROM "
            "history_before_merge WHERE id IN (SELECT MAX(id) FROM history_before_merge "
            "GROUP BY name, run_id, step) ORDER BY id"
        )
        db.execute("DROP TABLE history_before_merge")

    def _load(self) -> None:
        """Fill the in-memory mirror from the ``ranks`` and ``params`` tables, then the rows
        still in ``pending`` (accepted after the last merge), in the order they arrived."""
        for rank, run, step, wall, received, count, opt, finished, last in self._db.execute(
            f"SELECT {_RANK_COLUMNS} FROM ranks"
        ):
            self._ranks[rank] = RankRecord(
                rank, run, step, wall, received, count, _loads(opt), finished, last
            )
        # the merged rows, then those accepted after the last merge (newer), as they arrived
        for query in (f"SELECT {_PARAM_COLUMNS} FROM params",
                      f"SELECT {_PARAM_COLUMNS} FROM pending ORDER BY id"):
            for name, run, rank, step, wall, received, metrics, state in self._db.execute(query):
                self._params[name] = ParamRecord(
                    name, run, rank, step, wall, received, json.loads(metrics), _loads(state)
                )
        self._names = sorted(self._params)

    @contextmanager
    def _turn(self, abandoned: Callable[[], bool] | None = None) -> Iterator[float]:
        """Hold ``_db_lock`` for one use of the connection; yields the deadline of its
        :meth:`_transaction`.

        Raises:
            StoreBusy: the lock was not free within :data:`WRITE_WAIT_S`, or the store is
                closing (a write that waited for its turn does not start during a close).
            Abandoned: ``abandoned()`` said the client had gone once the lock was held.
        """
        deadline = time.monotonic() + WRITE_WAIT_S
        if self._closing or not self._db_lock.acquire(timeout=WRITE_WAIT_S):
            raise StoreBusy(f"the database stayed busy for {WRITE_WAIT_S} s"
                            if not self._closing else "the store is closing")
        try:
            if self._closing:
                raise StoreBusy("the store is closing")
            if abandoned is not None and abandoned():
                raise Abandoned()
            yield deadline
        finally:
            self._db_lock.release()

    def _begin(self, deadline: float | None) -> None:
        """``BEGIN IMMEDIATE``, tried again while another connection holds the write lock,
        until ``deadline`` (monotonic; default :data:`WRITE_WAIT_S` from now).

        Raises:
            StoreBusy: the write lock was still held at the deadline.
        """
        deadline = time.monotonic() + WRITE_WAIT_S if deadline is None else deadline
        pause = 0.001
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                if time.monotonic() + pause > deadline:
                    raise StoreBusy("another connection held the database's write lock for "
                                    f"{WRITE_WAIT_S} s") from exc
            time.sleep(pause)
            pause = min(2 * pause, 0.05)  # SQLite's own busy handler backs off likewise

    @contextmanager
    def _transaction(self, deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed when the block ends. The caller holds ``_db_lock``
        around it and changes the mirror only after it: a COMMIT that fails (a full disk: WAL
        pages are written at commit) raises here, and the mirror must not show what the
        database does not hold. ``deadline``: see :meth:`_begin`."""
        self._begin(deadline)
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # sqlite may have rolled back a failed COMMIT itself
                self._db.execute("ROLLBACK")
            raise
        if self._checkpointer is not None:
            self._checkpointer.notify()

    def ingest(self, snap: Snapshot, *, abandoned: Callable[[], bool] | None = None) -> int:
        """Store one accepted snapshot durably, then update the mirror. Returns params stored.

        Raises:
            StoreBusy: the database stayed locked for :data:`WRITE_WAIT_S` (nothing stored).
            Abandoned: ``abandoned()``, asked once the snapshot's turn came, was True (its
                client gave up waiting and will send it again; nothing stored).
        """
        now = self._clock()
        opt = snap.optimizer.model_dump(mode="json") if snap.optimizer else None
        states: dict[str, Any] = opt.pop("state", {}) if opt else {}
        # the writers, one at a time: the mirror changes only under the lock
        with self._turn(abandoned) as deadline:
            with self._lock:
                prev = self._ranks.get(snap.rank)
            if prev is not None and snap.wall_time < prev.wall_time and (
                    (prev.run_id == snap.run_id and snap.step < prev.step)
                    or (prev.run_id != snap.run_id and self._superseded(snap))):
                # taken before the rank's latest: a request that waited (a sidecar paused or
                # stalled) or a retry, arriving late, of this run or of one the rank already
                # left. A resumed run re-sends earlier steps taken later, and a run not seen
                # before (a new one, whatever its clock) takes over: both replace the latest
                # state as before.
                with self._transaction(deadline) as db:
                    self._write_late(db, snap)
                return len(snap.params)
            with self._lock:
                # a snapshot without a summary keeps its run's last one, never another run's
                if opt is None and prev is not None and prev.run_id == snap.run_id:
                    opt = prev.optimizer
                # the step this rank last sent, again: a retry whose answer was lost (the client
                # timed out while this sidecar stored it). It replaces the stored point and is
                # not counted twice.
                again = prev is not None and prev.run_id == snap.run_id and prev.step == snap.step
                # a snapshot the rank took before it said its run ended, arriving after that
                # (it was in flight): the run still ended
                ended = prev if prev is not None and prev.run_id == snap.run_id and \
                    prev.finished_wall_time is not None and \
                    snap.wall_time <= prev.finished_wall_time else None
                rank_rec = RankRecord(
                    snap.rank,
                    snap.run_id,
                    snap.step,
                    snap.wall_time,
                    now,
                    (prev.snapshots_received if prev else 0) + (0 if again else 1),
                    opt,
                    ended.finished_at if ended else None,
                    ended.finished_wall_time if ended else None,
                )
                records = [
                    self._param_record(snap, now, name, metrics, states.get(name))
                    for name, metrics in snap.params.items()
                ]
            with self._transaction(deadline) as db:
                self._write(db, rank_rec, records)
            with self._lock:
                self._apply(rank_rec, records)
        for listener in self._listeners:
            listener(records)
        return len(records)

    def finish(self, rank: int, run_id: str, last_wall_time: float | None = None) -> RankRecord:
        """Record that ``rank``'s run ``run_id`` ended (durably); its next snapshot clears it,
        unless it is of this run and taken at or before ``last_wall_time`` (the rank's last
        published snapshot, which was still on its way).

        Raises:
            UnknownRank: no snapshot from ``rank`` was ever received.
            OtherRun: ``rank``'s latest snapshot belongs to another run (a late finish of an
                earlier run must not hide a running one).
            StoreBusy: the database stayed locked for :data:`WRITE_WAIT_S`.
        """
        with self._turn() as deadline:
            with self._lock:
                prev = self._ranks.get(rank)
            if prev is None:
                raise UnknownRank(rank)
            if prev.run_id != run_id:
                raise OtherRun(prev.run_id)
            rec = dataclasses.replace(prev, finished_at=self._clock(),
                                      finished_wall_time=last_wall_time)
            with self._transaction(deadline) as db:
                db.execute("UPDATE ranks SET finished_at = ?, finished_wall_time = ? "
                           "WHERE rank = ?", (rec.finished_at, last_wall_time, rank))
            with self._lock:
                self._ranks[rank] = rec
        return rec

    def add_listener(self, listener: Callable[[list[ParamRecord]], None]) -> None:
        """Call ``listener(new_records)`` after each ingest commits (outside the store lock)."""
        self._listeners.append(listener)

    def _param_record(
        self,
        snap: Snapshot,
        now: float,
        name: str,
        metrics: dict[str, float | None],
        state: dict[str, Any] | None,
    ) -> ParamRecord:
        """A new latest record; a snapshot without a state summary keeps the previous one of
        the same run (another run's state describes another optimizer)."""
        prev = self._params.get(name)
        if state is None and prev is not None and prev.run_id == snap.run_id:
            state = prev.state
        return ParamRecord(
            name, snap.run_id, snap.rank, snap.step, snap.wall_time, now, dict(metrics), state
        )

    def _write(self, db: sqlite3.Connection, r: RankRecord, records: list[ParamRecord]) -> None:
        """The rank's row, and the parameters' rows appended to ``pending`` (merged into
        ``history`` and ``params`` by :meth:`_merge`: at once for an in-memory database)."""
        db.execute(
            f"INSERT OR REPLACE INTO ranks ({_RANK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.rank,
                r.run_id,
                r.step,
                r.wall_time,
                r.received_at,
                r.snapshots_received,
                _dumps(r.optimizer),
                r.finished_at,
                r.finished_wall_time,
            ),
        )
        # every run each rank reported (a run it left stays known: _superseded)
        db.execute("INSERT OR IGNORE INTO rank_runs (rank, run_id) VALUES (?, ?)",
                   (r.rank, r.run_id))
        db.executemany(
            f"INSERT INTO pending ({_PARAM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (p.name, p.run_id, p.rank, p.step, p.wall_time, p.received_at,
                 _dumps(p.metrics), _dumps(p.state))
                for p in records
            ],
        )
        if self._checkpointer is None:
            self._merge_into(db)

    def _superseded(self, snap: Snapshot) -> bool:
        """Whether ``snap``'s run is one its rank reported before (``rank_runs``; the caller
        holds ``_db_lock``): a run the rank left, since its latest is another. A database from
        before ``rank_runs`` knows those runs by their points in ``history`` (what was pruned
        from it is forgotten). Only asked of a snapshot of another run taken before the rank's
        latest, so rarely."""
        if self._db.execute("SELECT 1 FROM rank_runs WHERE rank = ? AND run_id = ?",
                            (snap.rank, snap.run_id)).fetchone() is not None:
            return True
        return any(self._db.execute(
            "SELECT 1 FROM history WHERE name = ? AND run_id = ? AND rank = ? LIMIT 1",
            (name, snap.run_id, snap.rank)).fetchone() is not None for name in snap.params)

    def _write_late(self, db: sqlite3.Connection, snap: Snapshot) -> None:
        """A snapshot taken before its rank's latest (see :meth:`ingest`): its points go into
        ``history`` where that step has none yet or one taken earlier (a point of an attempt
        that crashed, which the resumed run took again); the latest state, the rank's count
        and the exported series are left as they are.

        ``pending`` is merged first, in the same transaction: a point still waiting there would
        otherwise be merged after this one and replace it, whenever it was taken."""
        self._merge_into(db)
        db.executemany(
            f"INSERT INTO history ({_HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name, run_id, step) DO UPDATE SET rank = excluded.rank, "
            "wall_time = excluded.wall_time, metrics = excluded.metrics "
            "WHERE excluded.wall_time > history.wall_time",
            [(name, snap.run_id, snap.rank, snap.step, snap.wall_time, _dumps(metrics))
             for name, metrics in snap.params.items()],
        )
        self._prune(db)

    def _bound(self) -> None:
        """Prune history to ``history_max_rows`` now: merges prune, but with nothing pending
        none runs until a snapshot arrives, and reads served every row beyond the bound."""
        with self._db_lock, self._transaction() as db:
            self._prune(db)

    def _prune(self, db: sqlite3.Connection) -> None:
        """Keep the newest ``history_max_rows`` points (ids are contiguous: see the module)."""
        db.execute(
            "DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?", (self._max_rows,)
        )

    def _merge(self, limit: int | None = None, *, deadline: float | None = None) -> bool:
        """Move ``pending`` into ``history`` and ``params``, the ``limit`` oldest rows (all:
        None) in one transaction. Returns whether rows are left. The store's thread merges
        :data:`_MERGE_CHUNK` rows at a time every ``merge_interval_s`` (writers wait for one
        chunk, not for all that piled up); a history read or the store's close merges all.
        ``deadline``: see :meth:`_begin` (StoreBusy when the database stays locked)."""
        with self._db_lock:
            if not self._prepared or self._db is None:
                return False
            first, last = self._db.execute("SELECT MIN(id), MAX(id) FROM pending").fetchone()
            if first is None:
                return False
            upto = last if limit is None else min(last, first + limit - 1)
            with self._transaction(deadline) as db:
                self._merge_into(db, upto)
            return upto < last

    def _merge_into(self, db: sqlite3.Connection, upto: int | None = None) -> None:
        """:meth:`_merge` of the pending rows up to id ``upto`` (all: None) inside the caller's
        transaction. Rows go in the order they arrived, so history ids keep arrival order (the
        retention bound prunes by id), a re-sent step replaces its point (and keeps its id) and
        each parameter's row ends as its latest."""
        last = db.execute("SELECT MAX(id) FROM pending").fetchone()[0] if upto is None else upto
        if last is None:
            return
        # (the WHERE clause is also what lets SQLite read ON CONFLICT after INSERT ... SELECT)
        db.execute(
            f"INSERT INTO history ({_HISTORY_COLUMNS}) SELECT {_HISTORY_COLUMNS} FROM pending "
            "WHERE id <= ? ORDER BY id ON CONFLICT (name, run_id, step) DO UPDATE SET "
            "rank = excluded.rank, wall_time = excluded.wall_time, metrics = excluded.metrics",
            (last,),
        )
        db.execute(
            f"INSERT INTO params ({_PARAM_COLUMNS}) SELECT {_PARAM_COLUMNS} FROM pending "
            "WHERE id <= ? ORDER BY id ON CONFLICT (name) DO UPDATE SET "
            "run_id = excluded.run_id, rank = excluded.rank, step = excluded.step, "
            "wall_time = excluded.wall_time, received_at = excluded.received_at, "
            "metrics = excluded.metrics, state = excluded.state",
            (last,),
        )
        db.execute("DELETE FROM pending WHERE id <= ?", (last,))
        self._prune(db)

    def _apply(self, rank_rec: RankRecord, records: list[ParamRecord]) -> None:
        """Update the in-memory mirror (caller holds the lock)."""
        self._ranks[rank_rec.rank] = rank_rec
        for rec in records:
            if rec.name not in self._params:
                bisect.insort(self._names, rec.name)
            self._params[rec.name] = rec

    # ----------------------------------------------------------------- reads (from memory)

    @property
    def ready(self) -> bool:
        """True once any snapshot has been accepted (now or before a restart)."""
        return bool(self._ranks)

    def ranks(self) -> list[RankRecord]:
        """Every rank ever seen, by rank."""
        with self._lock:
            return sorted(self._ranks.values(), key=lambda r: r.rank)

    def params(self) -> list[ParamRecord]:
        """Every parameter's latest record (a consistent copy of the list)."""
        with self._lock:
            return list(self._params.values())

    def param(self, name: str) -> ParamRecord | None:
        """The latest record of ``name``, or None."""
        with self._lock:
            return self._params.get(name)

    def page(self, *, after: str | None, limit: int, rank: int | None = None) -> list[ParamRecord]:
        """Up to ``limit`` records with names > ``after``, in name order (cursor pagination)."""
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._names, after)
            out: list[ParamRecord] = []
            for name in self._names[start:]:
                rec = self._params[name]
                if rank is None or rec.rank == rank:
                    out.append(rec)
                    if len(out) == limit:
                        break
            return out

    def history(
        self, name: str, *, run_id: str, from_step: int, to_step: int, limit: int
    ) -> list[HistoryRow]:
        """History of ``name`` in ``run_id`` for steps in [from_step, to_step], by step. There
        is one point per step, so a page cut before step s is continued exactly by from_step=s.

        Raises:
            StoreBusy: the connection stayed busy for :data:`WRITE_WAIT_S`.
        """
        where = "name = ? AND run_id = ? AND step BETWEEN ? AND ?"
        args = (name, run_id, from_step, to_step)
        with self._turn() as deadline:
            try:
                self._merge(deadline=deadline)
                merged = True
            except (sqlite3.OperationalError, StoreBusy) as exc:  # a full disk: read anyway
                _log.debug("history read without merging: %s", exc)
                merged = False
            rows = self._db.execute(
                f"SELECT step, rank, wall_time, metrics FROM history WHERE {where} "
                "ORDER BY step LIMIT ?", (*args, limit)).fetchall()
            if not merged:  # what is stored plus what is pending (a pending point is newer)
                points = {row[0]: row for row in rows}
                points.update((row[0], row) for row in self._db.execute(
                    f"SELECT step, rank, wall_time, metrics FROM pending WHERE {where} "
                    "ORDER BY id", args))
                rows = [points[step] for step in sorted(points)[:limit]]
        return [HistoryRow(s, r, w, json.loads(m)) for s, r, w, m in rows]

    def history_rows(self) -> int:
        """Number of stored history rows (for tests and the retention check)."""
        with self._db_lock:
            self._merge()
            return int(self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0])

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Close the database (idempotent), within about ``timeout_s`` even when another
        process holds it locked. The checkpointer stops first: the last connection's close
        copies what is left of the WAL into the database file and removes the WAL.

        Writes waiting for their turn give up (:class:`StoreBusy`). When the database stays
        busy past ``timeout_s`` the connection is left open for the exiting process (what is
        committed is safe; what is pending merges at the next start) and a warning says so."""
        deadline = time.monotonic() + timeout_s
        self._closing = True
        if self._checkpointer is not None:
            self._checkpointer.close(timeout_s)
        if not self._db_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            _log.warning("the database stayed busy for %.1f s at close: stopping without "
                         "closing it (nothing committed is lost; the next start merges the "
                         "pending snapshots)", timeout_s)
            return
        try:
            if self._db is not None:
                try:
                    self._merge(deadline=deadline)
                except (sqlite3.Error, StoreBusy) as exc:  # kept in pending: merged next start
                    _log.warning("could not merge the last snapshots at close: %s", exc)
                self._db.close()
                self._db = None  # type: ignore[assignment]
        finally:
            self._db_lock.release()


class _Checkpointer:
    """Copies committed WAL pages into the database file, on its own thread and connection.

    The store's connection has automatic checkpoints off; after each commit it calls
    :meth:`notify`, and this thread runs a PASSIVE checkpoint (which never blocks the writer,
    and copies what was committed when it started), at most once per ``interval_s`` so that a
    burst of ingests shares one fsync. Between checkpoints the WAL holds what is not yet copied;
    readers see it either way.

    The WAL starts over from its beginning only when a write transaction BEGINS with all of it
    copied. Under a steady stream of ingests a commit lands between every copy and the next
    BEGIN, so that never happens and the WAL grows without bound (4 GB in 20 s of 500-parameter
    snapshots, measured). So once the WAL holds more than ``restart_frames`` pages, the PASSIVE
    copy is followed by a RESTART checkpoint under the store's connection lock: no commit or
    history read runs meanwhile (reads of the latest state do), so it copies only what was
    committed during the PASSIVE copy, and the next commit starts the WAL over. An ingest then
    waits for that tail, not for the whole copy. (Without the lock, the RESTART's busy-wait
    raced the commits: stalls of up to 1.4 s while the WAL reached 900 MB.)

    A checkpoint that fails (a full disk) is logged and retried at the next commit; the commits
    themselves go on.

    Args:
        path: the database (as the store opened it).
        lock: the store's connection lock (held around every other use of the database).
        merge: moves up to its argument's number of the store's ``pending`` rows into
            ``history`` and returns whether rows are left (:meth:`Store._merge`); run first in a
            cycle at least ``merge_interval_s`` after the last one, or in the next cycle when
            rows were left. The thread wakes for it by itself: rows appended by the last
            commits merge whether or not more commits follow.
        interval_s: least time between two checkpoints.
        restart_frames: WAL pages beyond which the PASSIVE copy is followed by a RESTART
            checkpoint (default 16384: 64 MB of 4 KiB pages).
    """

    def __init__(self, path: str, lock: threading.RLock, *, merge: Callable[[int], bool],
                 merge_interval_s: float, interval_s: float = 0.2,
                 restart_frames: int = 16384) -> None:
        self._lock = lock
        self._merge = merge
        self._merge_interval = merge_interval_s
        self._merged_at = time.monotonic()
        self._behind = False  # rows were left after the last chunk: merge again next cycle
        # a commit since the last merge may have left rows in pending: the thread wakes for
        # them by itself once merge_interval_s has passed, whether or not more commits come
        self._unmerged = False
        self._interval = interval_s
        self.restart_frames = restart_frames
        # its RESTART waits for SQLite's lock (while writers wait for _db_lock) no longer than a
        # write would
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, uri=True,
                                   timeout=WRITE_WAIT_S)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="orthoshard-checkpoint",
                                        daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A commit happened: checkpoint soon, and merge what it appended."""
        self._unmerged = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            due = None if not self._unmerged else \
                max(0.0, self._merged_at + self._merge_interval - time.monotonic())
            self._wake.wait(0.0 if self._behind else due)
            if self._stopping.is_set():
                return
            self._wake.clear()
            try:
                if self._behind or time.monotonic() - self._merged_at >= self._merge_interval:
                    self._merged_at = time.monotonic()
                    self._unmerged = False  # before the merge: a commit during it sets it again
                    self._behind = self._merge(_MERGE_CHUNK)
                frames = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][1]
                if frames > self.restart_frames:
                    # two more passes without the lock copy what was committed during the
                    # previous one, leaving less for the RESTART to copy while writers wait
                    for _ in range(_CATCH_UP_PASSES):
                        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    with self._lock:
                        self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            except (sqlite3.Error, StoreBusy) as exc:
                self._unmerged = True  # try the merge again at the next interval
                self._failures += 1
                if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                    _log.warning("merging pending rows or the WAL checkpoint failed (%d so far): "
                                 "%s", self._failures, exc)
            self._stopping.wait(self._interval)

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Stop the thread (after the merge or checkpoint it is running, if any, for at most
        ``timeout_s``) and close its connection (idempotent; left to the exiting process when
        the thread is still in SQLite at the deadline)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._db.close()

"""SQLite-backed store: last-known state per rank and parameter, and bounded history.

Reads for ``/metrics`` and the state API are served from an in-memory mirror of the two
"latest" tables (loaded at start, updated on every ingest), so a scrape never touches the disk.
Every accepted snapshot is written in one transaction before the ingest answers, so a restarted
sidecar answers history queries and its last-known state: nothing accepted is lost.

The tables, their migration and the statements on them (and how a step sent twice, or a
snapshot arriving after a newer one, is stored) are in :mod:`service.tables`; the records and
errors in :mod:`service.records`. WAL journal, ``synchronous=NORMAL``: a power cut may lose the
last transactions but never corrupts the file; a process crash loses nothing committed.

An ingest's commit writes its rank's row and appends its parameters' rows to ``pending``, a
table without secondary indexes, so one snapshot dirties a few contiguous pages. Every
``merge_interval_s`` the store's thread (:class:`service.checkpointer.Checkpointer`, which also
copies the WAL into the database file) moves ``pending`` into ``history`` and ``params`` in one
transaction (:meth:`Store._merge`), where each leaf of the history index is written once for all
the steps since the last merge: written at each ingest, a 500-parameter snapshot dirtied ~670
pages, ~540 of them leaves of that index (one per parameter). Reads of history merge first,
and a restarted store replays ``pending`` into its mirror before merging it, so nothing accepted
is ever missing from what the store answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from service import tables
from service.checkpointer import Checkpointer
from service.dbfile import (
    check_writable,
    create_private,
    creates_file,
    file_id,
    file_path,
    own,
    release,
)
from service.mirror import Mirror
from service.records import (
    Abandoned,
    HistoryRow,
    OtherRun,
    ParamRecord,
    RankRecord,
    StoreBusy,
    UnknownRank,
)
from service.schema import Snapshot

#: Longest a write (an ingest, a finish, a merge) waits for the database: for the store's lock,
#: then for SQLite's write lock (another process's transaction). Half the Publisher's default
#: 2 s timeout, so that its client is answered 503 (and retries later) before it gives up on
#: the request; what normally holds the lock, a merge chunk or a RESTART checkpoint, takes
#: ~0.1-0.2 s at most (see _MERGE_CHUNK and _CATCH_UP_PASSES in service.checkpointer).
WRITE_WAIT_S = 1.0
#: Longest :meth:`Store.close` waits for the database before it leaves the pending rows to the
#: next start (the sidecar then stops anyway: SIGTERM must end it while a database is locked).
CLOSE_WAIT_S = 2.0


#: The WAL file is cut back to this size when it starts over (it keeps its largest size
#: otherwise).
_WAL_SIZE_LIMIT = 64 << 20
_log = logging.getLogger("orthoshard.sidecar.store")


class Store(Mirror):
    """Thread-safe store; one instance per sidecar process. Its reads of the latest state
    are the in-memory :class:`service.mirror.Mirror`'s.

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
        super().__init__()
        # the mirror's _lock is held only briefly, so that reads of the latest state (a
        # scrape) never wait for the disk; _db_lock guards the connection and serializes the
        # writers (and the checkpointer's RESTART): a writer holds it from reading the mirror
        # to updating it
        self._db_lock = threading.RLock()
        # one sidecar per database file, for as long as it runs (released when it exits, even
        # killed); checked before SQLite opens the file, which must then be writable
        where = file_path(path)
        check_writable(where)
        self._owner = own(where)
        try:
            if creates_file(path):
                create_private(where)
            # uri=True: a "file:" path is a SQLite URI (e.g. "file:state.db?mode=ro"); any
            # other path is a plain file name as before
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       uri=True)
        except BaseException:
            release(self._owner)
            raise
        self._checkpointer: Checkpointer | None = None
        self._closing = False  # close() began: writes waiting for their turn give up
        self._prepared = False  # the tables exist (a store that failed to open merges nothing)
        self._listeners: list[Callable[[list[ParamRecord]], None]] = []
        # the file this store writes (None: an in-memory database): a file removed or replaced
        # under a running sidecar kept taking writes into the open one, all lost at the next
        # start
        self._path, self._file = where, None
        try:
            wal = self._prepare()
            self._file = file_id(where)  # the file exists now
            # from here on a write waits for SQLite's lock in _transaction, which gives up at
            # its deadline (SQLite's own busy wait, 5 s, cannot be cut short by a close)
            self._db.execute("PRAGMA busy_timeout = 0")
            self._prepared = True
            if wal:  # a file database (an in-memory one has no WAL)
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = Checkpointer(path, self._db_lock, merge=self._merge,
                                                  merge_interval_s=merge_interval_s,
                                                  busy_timeout_s=WRITE_WAIT_S)
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
        tables.check_ours(self._db)  # reads only: another program's file stays as it was
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        tables.check_intact(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        self._db.executescript(tables.SCHEMA)
        with self._db_lock, self._transaction() as db:
            tables.migrate(db)
            # A write at every start, even when nothing needs creating: the statements above
            # only read an existing database in WAL mode, so a file the sidecar cannot write
            # (read-only, immutable, on a read-only mount) would otherwise start and then fail
            # every ingest with a 500. It fails here instead, and the sidecar does not start.
            db.execute(f"PRAGMA user_version = {tables.FORMAT_VERSION}")
        return str(mode).lower() == "wal"

    def _load(self) -> None:
        """Fill the in-memory mirror from the tables (:func:`service.tables.load`)."""
        self._fill(*tables.load(self._db))

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
        if (gone := self.file_gone()) is not None:
            raise StoreBusy(gone)
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
        """Store one accepted snapshot durably, then update the mirror. Returns params stored
        (of a late snapshot, the points history took: none where it holds later ones).

        Raises:
            StoreBusy: the database stayed locked for :data:`WRITE_WAIT_S` (nothing stored).
            Abandoned: ``abandoned()``, asked once the snapshot's turn came, was True (its
                client gave up waiting and will send it again; nothing stored).
        """
        opt = snap.optimizer.model_dump(mode="json") if snap.optimizer else None
        states: dict[str, Any] = opt.pop("state", {}) if opt else {}
        # the writers, one at a time: the mirror changes only under the lock
        with self._turn(abandoned) as deadline:
            # received once its turn came: stamped before the wait (up to WRITE_WAIT_S, and
            # the lock is not first-come first-served), two writes could commit in the other
            # order than their stamps, and a rank's last-snapshot time stepped back
            now = self._clock()
            with self._lock:
                prev = self._ranks.get(snap.rank)
            if prev is not None and snap.wall_time < prev.wall_time and (
                    (prev.run_id == snap.run_id and snap.step < prev.step)
                    or (prev.run_id != snap.run_id and tables.superseded(self._db, snap))):
                # taken before the rank's latest: a request that waited (a sidecar paused or
                # stalled) or a retry, arriving late, of this run or of one the rank already
                # left. A resumed run re-sends earlier steps taken later, and a run not seen
                # before (a new one, whatever its clock) takes over: both replace the latest
                # state as before.
                with self._transaction(deadline) as db:
                    return tables.write_late(db, snap, self._max_rows)
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
        the same run and rank, taken at an earlier step (another run's state describes another
        optimizer; after a resume at fewer ranks the matrix's new owner showed the old owner's
        norms, and after a restart from a checkpoint the summary of steps the run discarded)."""
        prev = self._params.get(name)
        if state is None and prev is not None and prev.run_id == snap.run_id and \
                prev.rank == snap.rank and prev.step <= snap.step:
            state = prev.state
        return ParamRecord(
            name, snap.run_id, snap.rank, snap.step, snap.wall_time, now, dict(metrics), state
        )

    def _write(self, db: sqlite3.Connection, r: RankRecord, records: list[ParamRecord]) -> None:
        """The rank's row, and the parameters' rows appended to ``pending`` (merged into
        ``history`` and ``params`` by :meth:`_merge`: at once for an in-memory database)."""
        tables.write(db, r, records)
        if self._checkpointer is None:
            tables.merge_pending(db, self._max_rows)

    def _bound(self) -> None:
        """Prune history to ``history_max_rows`` now: merges prune, but with nothing pending
        none runs until a snapshot arrives, and reads served every row beyond the bound."""
        with self._db_lock, self._transaction() as db:
            tables.prune(db, self._max_rows)

    def _merge(self, limit: int | None = None, *, deadline: float | None = None) -> bool:
        """Move ``pending`` into ``history`` and ``params``, the ``limit`` oldest rows (all:
        None) in one transaction. Returns whether rows are left. The store's thread merges
        :data:`service.checkpointer._MERGE_CHUNK` rows at a time every ``merge_interval_s``
        (writers wait for one chunk, not for all that piled up); a history read or the store's close
        merges all. ``deadline``: see :meth:`_begin` (StoreBusy when the database stays locked)."""
        with self._db_lock:
            if not self._prepared or self._db is None:
                return False
            first, last = self._db.execute("SELECT MIN(id), MAX(id) FROM pending").fetchone()
            if first is None:
                return False
            upto = last if limit is None else min(last, first + limit - 1)
            with self._transaction(deadline) as db:
                tables.merge_pending(db, self._max_rows, upto)
            return upto < last

    # ------------------------------------ readiness and history (the latest state: Mirror)

    @property
    def ready(self) -> bool:
        """True once any snapshot has been accepted (now or before a restart), and while the
        database file is the one opened."""
        return bool(self._ranks) and self.file_gone() is None

    def file_gone(self) -> str | None:
        """Why the database file this store opened is no longer the one at its path (removed
        or replaced under the running sidecar, so writes would be lost); None while it is."""
        if self._file is not None and file_id(self._path) != self._file:
            return (f"the database file {self._path} was removed or replaced while the "
                    f"sidecar ran, and writes to the one it has open would be lost: restart "
                    f"the sidecar")
        return None

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
                release(self._owner)
                self._owner = None
        finally:
            self._db_lock.release()

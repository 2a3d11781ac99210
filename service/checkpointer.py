"""The store's background thread (:class:`Checkpointer`): it merges the accepted snapshots
waiting in ``pending`` (:meth:`service.store.Store._merge`) and copies the WAL into the database
file, on a connection of its own.

Copying the WAL into the database file (a checkpoint, with an fsync) runs on the same thread
with its own connection, so no ingest waits for it: SQLite's automatic checkpoint, which the
committing connection runs every 1000 pages, took ~30-50% of the store's time for a
500-parameter snapshot (``Store.ingest`` 14.4-21.0 ms with it, 9.9-11.0 ms without, before the
merge: bench/sidecar.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from service.records import StoreBusy

#: Pending rows the store's thread merges in one transaction: ~10 ms of merge per 1000 rows
#: here, so writers wait at most ~0.1-0.2 s for one chunk; the next cycle (0.2 s on) merges the
#: next chunk, up to ~50 000 rows a second.
_MERGE_CHUNK = 10_000
#: PASSIVE passes between the first one and a RESTART: 10 s of back-to-back 500-parameter
#: ingests held writers for 25-31 ms (median; at most 53) per RESTART with 2, 41-48 ms (at most
#: 97) with none; ingest p99 53 against 68-71 ms.
_CATCH_UP_PASSES = 2
#: How long a RESTART waits for readers while it holds the store's lock. No writer or history
#: read of this process runs then, so it waits only for another process's reader (a backup,
#: a shell left in a transaction), which may hold on for minutes: waiting out the store's whole
#: write wait (1 s) each cycle answered 15% of 500-parameter posts 503 while one did.
RESTART_WAIT_S = 0.05
#: After a RESTART another process's reader kept waiting, the next is tried this much later.
RESTART_BACKOFF_S = 2.0
_log = logging.getLogger("orthoshard.sidecar.store")


class Checkpointer:
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
            ``history`` and returns whether rows are left (:meth:`service.store.Store._merge`);
            run first in a cycle at least ``merge_interval_s`` after the last one, or in the next
            cycle when rows were left. The thread wakes for it by itself: rows appended by the last
            commits merge whether or not more commits follow.
        busy_timeout_s: the store's write wait (:data:`service.store.WRITE_WAIT_S`).
        interval_s: least time between two checkpoints.
        restart_frames: WAL pages beyond which the PASSIVE copy is followed by a RESTART
            checkpoint (default 16384: 64 MB of 4 KiB pages).
    """

    def __init__(self, path: str, lock: threading.RLock, *, merge: Callable[[int], bool],
                 merge_interval_s: float, busy_timeout_s: float, interval_s: float = 0.2,
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
        # its RESTART waits for another process's readers (while writers wait for _db_lock)
        # RESTART_WAIT_S at most, never longer than a write would
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, uri=True,
                                   timeout=min(busy_timeout_s, RESTART_WAIT_S))
        self._restart_after = 0.0  # monotonic time before which no RESTART is tried
        self.restarts_blocked = 0  # RESTARTs another process's reader kept from finishing
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
                if frames > self.restart_frames and time.monotonic() >= self._restart_after:
                    # two more passes without the lock copy what was committed during the
                    # previous one, leaving less for the RESTART to copy while writers wait
                    for _ in range(_CATCH_UP_PASSES):
                        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    with self._lock:
                        busy = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()[0][0]
                    if busy:
                        self._blocked()
            except (sqlite3.Error, StoreBusy) as exc:
                self._unmerged = True  # try the merge again at the next interval
                self._failures += 1
                if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                    _log.warning("merging pending rows or the WAL checkpoint failed (%d so far): "
                                 "%s", self._failures, exc)
            self._stopping.wait(self._interval)

    def _blocked(self) -> None:
        """A RESTART found another process's reader: try again after RESTART_BACKOFF_S, and
        say so now and then (the WAL grows meanwhile)."""
        self._restart_after = time.monotonic() + RESTART_BACKOFF_S
        self.restarts_blocked += 1
        if self.restarts_blocked in (1, 10, 100) or self.restarts_blocked % 1000 == 0:
            _log.warning("another process holds a read transaction on the database: the WAL "
                         "cannot start over and grows until it ends (%d restarts blocked)",
                         self.restarts_blocked)

    def close(self, timeout_s: float) -> None:
        """Stop the thread (after the merge or checkpoint it is running, if any, for at most
        ``timeout_s``) and close its connection (idempotent; left to the exiting process when
        the thread is still in SQLite at the deadline)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._db.close()

"""Trainer-side publisher: hands snapshots to a background thread that posts them.

One line in the training loop::

    pub = Publisher(uds="/run/orthoshard.sock", token=token)      # or url="http://127.0.0.1:9400"
    ...
    pub.publish(step=step, rank=rank, params=opt.health())        # returns in microseconds
    ...
    pub.close(finished=True)                                      # flushes, says the run ended

Contract: ``publish`` never blocks, never raises and never touches torch or torch.distributed.
It appends to a bounded queue (the oldest snapshot is dropped and counted when full) and returns;
a daemon thread (its code is in :mod:`service.sender`) encodes and posts. Connection errors and
5xx answers (and a proxy's 429 or 408) are retried with exponential backoff; another 4xx
answer (the sidecar refused the snapshot) drops it and counts it, as does a snapshot whose
values cannot be encoded (logged with the reason). No snapshot stops the thread: whatever one
raises, it is counted and logged and the next one is sent. A dead, slow or absent sidecar, or a
bad value, therefore costs the trainer nothing but lost snapshots.

``publish`` keeps references to ``params`` / ``optimizer`` and encodes them on the thread, so
pass fresh dicts (``health()`` returns a new one each call) and do not mutate them afterwards.
Values are plain Python numbers; anything with ``__float__`` (numpy or 0-d tensor scalars) is
converted, and non-finite floats become ``null`` (the sidecar's NaN policy, see service.schema).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import operator
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from service.sender import Sender
from service.settings import TOKEN_RULE, token_error
from service.targets import (
    MAX_WAIT_S,
    default_run_id,
    run_id_problem,
    seconds,
    uds_problem,
    url_problem,
)

_log = logging.getLogger("orthoshard.publisher")


@dataclass
class PublisherStats:
    """Counters of a publisher (read them any time; they only grow). Once :meth:`Publisher.close`
    has stopped the sender thread, ``published == sent + dropped + rejected``."""

    published: int = 0  # publish() calls accepted onto the queue
    sent: int = 0  # snapshots the sidecar accepted (2xx)
    dropped: int = 0  # pushed out of a full queue, or left unsent at close()
    rejected: int = 0  # refused by the sidecar (3xx, 4xx), not encodable, or its send raised
    failures: int = 0  # failed send attempts (connection errors, timeouts, 5xx)


def _warn_off_thread(message: str) -> None:
    """Log ``message`` from a daemon thread of its own, for a forked child's publish(): the
    stream under a log handler may stay locked in the child by a thread of the parent that was
    writing when the process forked (logging renews its handlers' locks at a fork, not their
    streams'), and the child's publish() then waited for ever in the handler's flush (3 to 7
    children in 300 forks while the parent's sender logged its queue's overflows)."""
    threading.Thread(target=_log.warning, args=(message,), name="orthoshard-fork-warning",
                     daemon=True).start()


# Every Publisher of this process, for the fork hook below.
_LIVE: weakref.WeakSet[Publisher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pub in list(_LIVE):
        pub._forked_child()


if hasattr(os, "register_at_fork"):  # (not on Windows, which cannot fork)
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: What the interpreter's exit gives the Publishers not closed to send what they hold: short,
#: since it delays the exit of a script that forgot ``close()`` (or crashed) by up to this much.
EXIT_FLUSH_S = 1.5

#: ``close(finished=True)`` keeps this much of its deadline (at most half of it) for the
#: finishes: snapshots still queued then are dropped. A finish not sent pages the rank as stale,
#: a snapshot not sent does not; 1.5 s holds a second attempt after a 1 s ``Retry-After``.
FINISH_RESERVE_S = 1.5


@atexit.register
def _flush_at_exit() -> None:
    """Send what the Publishers not closed still hold (their daemon sender threads would die
    with the interpreter), all within :data:`EXIT_FLUSH_S`, and log what was left unsent.
    ``_LIVE`` holds weak references: it keeps no Publisher alive."""
    deadline = time.monotonic() + EXIT_FLUSH_S
    for pub in list(_LIVE):
        if pub._closing:
            continue
        dropped_before = pub.stats.dropped  # pushed out of a full queue: counted already
        pub._exiting = True
        # one deadline for all, without close()'s second of grace per Publisher (five of them
        # took 6.6 s to let a stalled sidecar's interpreter exit)
        pub._close(max(0.0, deadline - time.monotonic()), finished=False, grace_s=0.0)
        stats = pub.stats
        # what neither reached the sidecar nor was refused, a send still in flight included
        lost = stats.published - stats.sent - stats.rejected - dropped_before
        if lost > 0:
            _log.warning("interpreter exit: %d snapshot(s) of run %s not sent within %.1f s "
                         "(call Publisher.close() at the end of training)", lost, pub.run_id,
                         EXIT_FLUSH_S)


class Publisher(Sender):
    """Posts snapshots to the sidecar from a background thread.

    Args:
        url: sidecar base URL (TCP); default ``http://127.0.0.1:9400`` when ``uds`` is not given.
        uds: Unix socket path of the sidecar (takes precedence over ``url``'s host).
        token: bearer token (the content of the sidecar's ``--token-file``).
        run_id: identifies the run; default ``default_run_id()``.
        queue_size: snapshots held while the sidecar is slow or down (oldest dropped beyond).
        timeout_s: per-request timeout (connect, read, write, pool); a snapshot's read
            timeout adds a second per 250 kB of its body (the sidecar answers once stored).
        backoff_s: (first, max) retry delay after a failed send; doubles, with jitter.
        transport: an httpx transport to use instead (tests).
    """

    def __init__(
        self,
        url: str | None = None,
        uds: str | None = None,
        token: str | None = None,
        *,
        run_id: str | None = None,
        queue_size: int = 64,
        timeout_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.05, 5.0),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if url is not None and (problem := url_problem(url)) is not None:
            raise ValueError(f"url {problem}")
        if uds is not None and (problem := uds_problem(uds)) is not None:
            raise ValueError(f"uds {problem}")
        if not seconds(timeout_s) or timeout_s == 0:
            # 0, a negative, NaN or past-a-day timeout failed every send later, in the background
            raise ValueError(f"timeout_s must be a number of seconds > 0 and <= {MAX_WAIT_S:g} "
                             f"(the default is 2.0), got {timeout_s!r}")
        if not (isinstance(backoff_s, tuple | list) and len(backoff_s) == 2
                and all(seconds(b) for b in backoff_s) and 0 < backoff_s[0] <= backoff_s[1]):
            raise ValueError(f"backoff_s must be (first, max) seconds with 0 < first <= max <= "
                             f"{MAX_WAIT_S:g} (the default is (0.05, 5.0)), got {backoff_s!r}")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"token must be a str (a bytes token: .decode() it), got "
                             f"{type(token).__name__}")
        if token is not None and (where := token_error(token)) is not None:
            # httpx would refuse the header on every send, which looks like a sidecar that
            # is down (e.g. a token read from its file without .strip())
            hint = " (strip the newline of a token read from a file)" \
                if where.startswith("a whitespace") else ""
            raise ValueError(f"token has {where}: a bearer token holds only {TOKEN_RULE}{hint}")
        self.run_id = run_id or default_run_id()
        if (problem := run_id_problem(self.run_id)) is not None:
            source = "run_id" if run_id else "the run id from the environment"
            raise ValueError(f"{source} {problem} (ORTHOSHARD_RUN_ID overrides torchrun's id)")
        self.stats = PublisherStats()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._size = queue_size
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = math.inf
        self._flush_until = math.inf  # the snapshots' part of the deadline
        self._backoff = (float(backoff_s[0]), float(backoff_s[1]))
        self._down = False
        self._outage_failures = 0  # failed sends since the sidecar last accepted one
        self._refusals: collections.Counter[int] = collections.Counter()  # by HTTP status
        self._retry_after: float | None = None  # of the last send's 5xx answer, if it said
        self._overflows = 0  # snapshots pushed out of the full queue (logged as failures are)
        self._overflows_logged = 0  # of which the sender thread has logged
        self._unsent = 0  # snapshots the sender thread dropped when close()'s deadline passed
        self._exiting = False  # closed by the interpreter's exit hook, which logs the loss
        self._unencodable = 0  # snapshots whose values could not be encoded (also rejected)
        self._crashes = 0  # sends that raised unexpectedly (also rejected)
        self._ranks: set[int] = set()  # ranks published for (a finish is sent for each)
        # per rank, the latest wall_time published: its finish says so, and a snapshot taken
        # no later that reaches the sidecar after the finish (it was in flight) keeps it
        self._last_wall: dict[int, float] = {}
        self._finish_claimed = False  # the sender thread or close() took the finishes on
        self._finish = False  # close(finished=True): say each rank's run ended, after the flush
        self._finish_failed = False
        self._finish_sent = False  # the finishes were posted (by the sender or a later close)
        self._timeout_s = timeout_s
        self._client_args = (url, uds, token, timeout_s, transport)
        self._client = self._make_client(*self._client_args)
        self._forked = self._fork_warned = False  # a forked child's copy (_forked_child)
        self._thread = threading.Thread(target=self._run, name="orthoshard-publisher", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _forked_child(self) -> None:
        """In a child forked from this Publisher's process: the sender thread did not survive
        the fork, and the lock may have been held by a thread of the parent at that instant
        (the child's publish() then waited for ever). The copy gets a lock of its own and
        stops: what the child publishes is dropped (with one warning), and it posts nothing,
        not even a finish, which would speak for the parent's ranks."""
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._closing = True
        self._forked = True
        # the child's own counts (what it publishes is dropped): the parent's snapshots are
        # the parent's to account for
        self.stats = PublisherStats()

    # ------------------------------------------------------------------ training thread

    def publish(
        self,
        *,
        step: int,
        rank: int,
        params: dict[str, dict[str, float]],
        optimizer: dict[str, Any] | None = None,
        wall_time: float | None = None,
    ) -> None:
        """Queue one snapshot and return at once; never raises, never blocks.

        Args:
            step: the optimizer step.
            rank: this process's rank.
            params: ``optimizer.health()``: ``{param_name: {metric_name: float}}``.
            optimizer: optional ``{"class_name", "groups", "state"}`` (see service.schema).
            wall_time: Unix seconds when taken; default now.
        """
        try:
            taken = time.time() if wall_time is None else wall_time
            item = {
                "step": step,
                "rank": rank,
                "params": params,
                "optimizer": optimizer,
                "wall_time": taken,
            }
            with self._cond:
                if self._closing:  # counted as published and dropped: the totals still add up
                    self.stats.published += 1
                    self.stats.dropped += 1
                    if self._forked and not self._fork_warned:
                        self._fork_warned = True
                        _warn_off_thread("a Publisher does not cross fork(): this child's "
                                         "snapshots are dropped; create a Publisher in the "
                                         "child instead")
                    return
                if len(self._queue) >= self._size:
                    self._queue.popleft()
                    self._overflowed()
                self._queue.append(item)
                self.stats.published += 1
                self._cond.notify()
                with contextlib.suppress(Exception):
                    # a rank that is no integer is not encodable (the snapshot is rejected when
                    # its turn comes); a wall_time that is no finite number stays out of the
                    # finish. Whatever their __index__ / __float__ raise.
                    r = operator.index(rank)
                    self._ranks.add(r)
                    wall = float(taken)
                    if math.isfinite(wall):
                        self._last_wall[r] = max(self._last_wall.get(r, wall), wall)
        except Exception:  # the contract: nothing escapes into the training loop
            _log.exception("publish failed; snapshot dropped")

    def close(self, timeout_s: float = 5.0, *, finished: bool = False,
              ranks: Iterable[int] = ()) -> bool:
        """Send what is queued until ``timeout_s`` passes, then stop. True if all was sent:
        every snapshot published was accepted by the sidecar (False when any was dropped,
        refused, e.g. for a wrong token, or could not be encoded).

        ``finished=True`` (the training loop ended normally) then tells the sidecar that each
        rank published for has finished its run (``POST /v1/ranks/{rank}/finish``), so the
        rank's silence from now on is not alerted as a stale rank; True then also needs those
        answers to be 2xx. The snapshots then have the deadline less :data:`FINISH_RESERVE_S`
        (at most half of ``timeout_s``), which is kept for the finishes. Leave it False on an
        error path: a crashed rank must still page.
        Called again after a ``close()`` (a ``with`` block's), ``finished=True`` still posts the
        finishes, from this thread.

        ``ranks``: with ``finished=True``, finish these ranks too, though this Publisher
        published nothing for them: a process that resumed a run at its last step (a rank had
        died after the final checkpoint) trains nothing, yet ends the run its rank reported
        under the same ``run_id`` (the sidecar refuses, 409, the finish of a rank whose latest
        snapshot is of another run).

        Raises:
            ValueError: ``timeout_s`` is no number of seconds in ``[0, MAX_WAIT_S]``, or a rank
                is no int >= 0 (checked before anything stops)."""
        if not seconds(timeout_s):
            raise ValueError(f"timeout_s must be a number of seconds >= 0 and <= "
                             f"{MAX_WAIT_S:g}, got {timeout_s!r}")
        extra = list(ranks)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in extra):
            raise ValueError(f"ranks must be ints >= 0, got {extra!r}")
        if finished and extra:
            with self._cond:
                self._ranks.update(extra)
        return self._close(timeout_s, finished=finished, grace_s=1.0)

    def _close(self, timeout_s: float, *, finished: bool, grace_s: float) -> bool:
        """:meth:`close`, joining the sender at most ``grace_s`` past the deadline (its last
        request may run up to its own timeout past it)."""
        if self._forked:
            return False  # nothing of the child's was sent (see _forked_child)
        with self._cond:
            again = self._closing
            if not again:
                self._closing = True
                self._finish = finished
                self._deadline = time.monotonic() + timeout_s
                reserve = min(FINISH_RESERVE_S, timeout_s / 2) if finished else 0.0
                self._flush_until = self._deadline - reserve
                self._cond.notify()
        if again:
            self._thread.join(timeout_s + grace_s)
            if finished and not self._thread.is_alive() and self._claim_finishes():
                self._deadline = time.monotonic() + timeout_s
                self._finish_on_own_client(alongside=False)
            return (self._all_sent() and not self._finish_failed and not self._thread.is_alive()
                    and (self._finish_sent or not finished))
        if finished:
            # The sender posts the finishes after its last snapshot. One still in flight where
            # the finishes' part of the deadline begins keeps its own timeout (httpx cannot
            # shorten a request under way) and would use that part up: this thread posts them
            # then, alongside it. Each finish carries the rank's last wall_time, so the
            # snapshot, should it land after its finish, does not clear it.
            self._thread.join(max(self._flush_until - time.monotonic(), 0.0))
            if self._thread.is_alive() and self._claim_finishes():
                self._finish_on_own_client(alongside=True)
        # the sender's last request may run up to its own timeout past the deadline (a second
        # of grace, as ever; from the deadline, not from now: the finishes took some of it)
        self._thread.join(max(self._deadline - time.monotonic(), 0.0) + grace_s)
        if self._client_args[4] is not None and not self._thread.is_alive():
            self._client.close()  # the given transport, left open by the sender (see _run)
        with self._cond:
            left = len(self._queue)
            self.stats.dropped += left
            self._queue.clear()
            return (left == 0 and self._all_sent() and not self._finish_failed
                    and not self._thread.is_alive())

    def _all_sent(self) -> bool:
        """Every snapshot published was accepted: none dropped, refused or unencodable."""
        return self.stats.sent == self.stats.published

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Trainer-side publisher: hands snapshots to a background thread that posts them.

One line in the training loop::

    pub = Publisher(uds="/run/orthoshard.sock", token=token)      # or url="http://127.0.0.1:9400"
    ...
    pub.publish(step=step, rank=rank, params=opt.health())        # returns in microseconds
    ...
    pub.close(finished=True)                                      # flushes, says the run ended

Contract: ``publish`` never blocks, never raises and never touches torch or torch.distributed.
It appends to a bounded queue (the oldest snapshot is dropped and counted when full) and returns;
a daemon thread encodes and posts. Connection errors and 5xx answers are retried with
exponential backoff; a 4xx answer (the sidecar refused the snapshot) drops it and counts it, as
does a snapshot whose values cannot be encoded (logged with the reason). No snapshot stops the
thread: whatever one raises, it is counted and logged and the next one is sent. A dead, slow or
absent sidecar, or a bad value, therefore costs the trainer nothing but lost snapshots.

``publish`` keeps references to ``params`` / ``optimizer`` and encodes them on the thread, so
pass fresh dicts (``health()`` returns a new one each call) and do not mutate them afterwards.
Values are plain Python numbers; anything with ``__float__`` (numpy or 0-d tensor scalars) is
converted, and non-finite floats become ``null`` (the sidecar's NaN policy, see service.schema).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import math
import operator
import os
import random
import re
import threading
import time
import urllib.parse
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from service.schema import RUN_ID_MAX_LENGTH, SCHEMA_VERSION, RunId
from service.settings import TOKEN_RULE, token_error

DEFAULT_URL = "http://127.0.0.1:9400"
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


def _plain(value: Any) -> Any:
    """JSON-ready copy: non-finite floats -> None, integer-likes (``__index__``: NumPy ints,
    integer tensors) -> int, other ``__float__`` objects -> float."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    with contextlib.suppress(TypeError):  # integer-likes (np.int64, 0-d int tensors) stay ints
        return operator.index(value)
    return _plain(float(value))


def _worth_logging(count: int) -> bool:
    """Log the 1st, 10th and 100th of a repeating problem, then every 1000th."""
    return count in (1, 10, 100) or count % 1000 == 0


#: torchrun's default ``--rdzv-id``, its ``TORCHELASTIC_RUN_ID`` for every run started with
#: ``--master-port`` or a static multi-node rendezvous: shared by all such runs, so no run's id
TORCHRUN_SHARED_RUN_ID = "none"


def environment_run_id() -> str | None:
    """``ORTHOSHARD_RUN_ID``, else torchrun's ``TORCHELASTIC_RUN_ID`` unless it is torchrun's
    shared default (:data:`TORCHRUN_SHARED_RUN_ID`); None when neither names this run."""
    if value := os.environ.get("ORTHOSHARD_RUN_ID"):
        return value
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return value if value and value != TORCHRUN_SHARED_RUN_ID else None


def default_run_id() -> str:
    """:func:`environment_run_id`, else a random id (one process: no other rank to agree with).

    All ranks of a run must agree; under torchrun the elastic run id already does, except for
    its shared default ``"none"``, which every run started with ``--master-port`` or a static
    rendezvous gets: publishing under it would write each run over the last one's history.

    Raises:
        ValueError: torchrun's id is ``"none"`` and ``ORTHOSHARD_RUN_ID`` is not set.
    """
    if (value := environment_run_id()) is not None:
        return value
    if os.environ.get("TORCHELASTIC_RUN_ID") == TORCHRUN_SHARED_RUN_ID:
        raise ValueError(
            "torchrun's run id is its default 'none' (given to every run started with "
            "--master-port or a static rendezvous), under which runs would overwrite each "
            "other's history: export ORTHOSHARD_RUN_ID (the same on every rank), pass "
            "run_id=, or start torchrun with --rdzv-id")
    return uuid.uuid4().hex[:16]


# The pace a sidecar is given to store a snapshot before its answer times out: a quarter of
# the slowest measured (a 4.7 MB, 20,000-parameter body stored in 4.1 s on 2 shared cores).
_STORE_BYTES_PER_S = 250_000


#: The problem type of the sidecar's 503 when its database cannot take a write (locked, or the
#: disk full); its ``Retry-After`` says when to try again.
_STORAGE_UNAVAILABLE = "urn:orthoshard:problem:storage-unavailable"


_RUN_ID = TypeAdapter(RunId)


def _sidecar_takes_run_id(run_id: str) -> bool:
    """Whether the sidecar's own validation (pydantic's, whose pattern engine differs from
    ``re`` on unicode: ``"x²"`` matches ``\\w`` here and not there) accepts ``run_id``."""
    try:
        _RUN_ID.validate_python(run_id)
    except ValidationError:
        return False
    return True


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds of a ``Retry-After: <seconds>`` header, or None (no header, or its
    HTTP-date form, which a sidecar never sends)."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if re.fullmatch(r"[0-9]{1,9}", value) else None


def _storage_unavailable(response: httpx.Response) -> bool:
    """Whether a 5xx answer is the sidecar's own storage-unavailable problem (not a proxy's)."""
    try:
        body = response.json()
    except ValueError:  # not JSON (a proxy's page), or not decodable
        return False
    return isinstance(body, dict) and body.get("type") == _STORAGE_UNAVAILABLE


def url_problem(url: str) -> str | None:
    """What makes ``url`` no sidecar URL (None: it is one), said after the argument's name:
    ``http(s)://host[:port]``, where a missing port is the scheme's (80, 443: a sidecar behind
    a TLS proxy). ``Publisher`` raises it and ``orthoshard.train`` refuses ``--sidecar-url``
    with it, before any rank sets up its model.

    Refused: another scheme or none (``localhost:9400`` parses as the scheme ``localhost``), no
    host, and a port that is no number in 1-65535 (each failed every send in the background).
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port != 0  # None (the scheme's) or 1-65535
    except ValueError:  # a port that is no number, or out of range
        port_ok = False
    if parts.scheme in ("http", "https") and parts.hostname and port_ok:
        return None
    return (f"must be the sidecar's http(s)://host[:port] (e.g. {DEFAULT_URL}; without a port, "
            f"the scheme's), got {url!r}")


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
        before = pub.stats.dropped
        pub.close(timeout_s=max(0.0, deadline - time.monotonic()))
        if (lost := pub.stats.dropped - before) > 0:
            _log.warning("interpreter exit: %d snapshot(s) of run %s not sent within %.1f s "
                         "(call Publisher.close() at the end of training)", lost, pub.run_id,
                         EXIT_FLUSH_S)


class Publisher:
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
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if url is not None and (problem := url_problem(url)) is not None:
            raise ValueError(f"url {problem}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or \
                not 0 < timeout_s < math.inf:
            # 0, a negative or NaN timeout failed every send later, in the background
            raise ValueError(f"timeout_s must be a finite number of seconds > 0 (the default is "
                             f"2.0), got {timeout_s!r}")
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise ValueError(f"backoff_s must be (first, max) with 0 < first <= max: {backoff_s}")
        if token is not None and (where := token_error(token)) is not None:
            # httpx would refuse the header on every send, which looks like a sidecar that
            # is down (e.g. a token read from its file without .strip())
            raise ValueError(f"token has {where}: a bearer token holds only {TOKEN_RULE} "
                             f"(strip the newline of a token read from a file)")
        self.run_id = run_id or default_run_id()
        if not _sidecar_takes_run_id(self.run_id):
            source = "run_id" if run_id else "the run id from the environment"
            raise ValueError(
                f"{source} {self.run_id!r} would be refused by the sidecar: use at most "
                f"{RUN_ID_MAX_LENGTH} letters, digits, '_', '.', ':' and '-' (ORTHOSHARD_RUN_ID "
                f"overrides torchrun's id)")
        self.stats = PublisherStats()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._size = queue_size
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = math.inf
        self._flush_until = math.inf  # the snapshots' part of the deadline
        self._backoff = backoff_s
        self._down = False
        self._retry_after: float | None = None  # of the last send's 5xx answer, if it said
        self._unsent = 0  # snapshots the sender thread dropped when close()'s deadline passed
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

    @staticmethod
    def _make_client(
        url: str | None,
        uds: str | None,
        token: str | None,
        timeout_s: float,
        transport: httpx.BaseTransport | None,
    ) -> httpx.Client:
        if transport is None and uds is not None:
            transport = httpx.HTTPTransport(uds=uds)
        base = url or (DEFAULT_URL if uds is None else "http://sidecar")
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(
            base_url=base, headers=headers, timeout=timeout_s, transport=transport, trust_env=False
        )

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
                        _log.warning("a Publisher does not cross fork(): this child's snapshots "
                                     "are dropped; create a Publisher in the child instead")
                    return
                if len(self._queue) >= self._size:
                    self._queue.popleft()
                    self.stats.dropped += 1
                self._queue.append(item)
                with contextlib.suppress(TypeError, ValueError, OverflowError):
                    # a rank that is no integer is not encodable (the snapshot is rejected when
                    # its turn comes); a wall_time that is no finite number stays out of the
                    # finish
                    r = operator.index(rank)
                    self._ranks.add(r)
                    wall = float(taken)
                    if math.isfinite(wall):
                        self._last_wall[r] = max(self._last_wall.get(r, wall), wall)
                self.stats.published += 1
                self._cond.notify()
        except Exception:  # the contract: nothing escapes into the training loop
            _log.exception("publish failed; snapshot dropped")

    def close(self, timeout_s: float = 5.0, *, finished: bool = False) -> bool:
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
        finishes, from this thread."""
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
            self._thread.join(timeout_s + 1.0)
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
        self._thread.join(max(self._deadline - time.monotonic(), 0.0) + 1.0)
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

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = pause = 0.0
        while (item := self._next(pause)) is not None:
            self._retry_after = None
            try:
                outcome = self._send(item)
            except Exception as exc:  # this thread must outlive any one snapshot
                outcome = self._unexpected(item, exc)
            if outcome == "retry":
                backoff = self._grow(backoff)
                pause = self._pause(backoff, self._retry_after)
                with self._cond:
                    # back to the head, unless newer snapshots filled the queue meanwhile:
                    # then it is the oldest, and the one dropped
                    if len(self._queue) < self._size:
                        self._queue.appendleft(item)
                    else:
                        self.stats.dropped += 1
            else:
                backoff = pause = 0.0
        with self._cond:  # what the deadline left unsent (also a retry put back after it)
            self._unsent += len(self._queue)
            self.stats.dropped += len(self._queue)
            self._queue.clear()
            ranks = sorted(self._ranks) if self._finish else []
        if self._finish and self._claim_finishes():
            self._send_finishes(ranks, self._client)
        # a transport given to the Publisher may carry close()'s finishes still: close() closes
        # it once it has waited for this thread
        if self._client_args[4] is None:
            self._client.close()

    def _claim_finishes(self) -> bool:
        """True for the first caller only: the finishes are posted once, by whichever of the
        sender thread and close() gets to them first."""
        with self._cond:
            claimed, self._finish_claimed = self._finish_claimed, True
        return not claimed

    def _finish_on_own_client(self, *, alongside: bool) -> None:
        """Post every rank's finish from the calling thread, on a client of its own (the
        sender's may have a request in flight, or be closed). ``alongside``: the sender still
        has a request under way."""
        with self._cond:
            ranks = sorted(self._ranks)
        client = self._make_client(*self._client_args)
        try:
            self._send_finishes(ranks, client, alongside=alongside)
        finally:
            # a transport given to the Publisher is shared: closing this client would close it
            # under the sender's request (close() closes it once the sender has ended)
            if not alongside or self._client_args[4] is None:
                client.close()

    def _send_finishes(self, ranks: list[int], client: httpx.Client, *,
                       alongside: bool = False) -> None:
        """Each rank's finish (:meth:`_send_finish`), once: a later ``close(finished=True)``
        does not post them again."""
        for rank in ranks:
            self._send_finish(rank, client, alongside=alongside)
        self._finish_sent = True

    def _send_finish(self, rank: int, client: httpx.Client, *, alongside: bool = False
                     ) -> None:
        """``POST /v1/ranks/{rank}/finish`` within close()'s deadline. Connection errors,
        timeouts and 5xx (a database busy for a moment) are tried again as snapshots are
        (backoff, ``Retry-After``) while the deadline allows; a refusal (3xx, 4xx), anything
        else a transport raises, or the deadline is logged and makes close() return False (the
        sidecar then alerts on the silence as usual). ``alongside`` (a snapshot still under way
        on the sender): 404 and 409 are tried again too while it is, since the sidecar may
        not have seen this run yet (that snapshot is its first)."""
        with self._cond:
            last = self._last_wall.get(rank)
        body = json.dumps({"run_id": self.run_id, "last_wall_time": last}).encode("utf-8")
        why, backoff = "close()'s deadline passed first", 0.0
        while (left := self._deadline - time.monotonic()) > 0:
            retry_after = None
            try:
                response = client.post(f"/v1/ranks/{rank}/finish", content=body,
                                       timeout=min(self._timeout_s, left))
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # anything else a transport raises: not tried again
                why = f"{type(exc).__name__}: {exc}"
                break
            else:
                if response.status_code < 300:
                    return
                why = f"HTTP {response.status_code} {response.text[:500]}"
                waiting = alongside and response.status_code in (404, 409) and \
                    self._thread.is_alive()
                if response.status_code < 500 and not waiting:
                    break
                retry_after = _retry_after(response)
            backoff = self._grow(backoff)
            pause = self._pause(backoff, retry_after)
            if time.monotonic() + pause >= self._deadline:
                why += "; close()'s deadline passed before the next attempt"
                break
            time.sleep(pause)
        self._finish_failed = True
        _log.warning("could not tell the sidecar that rank %d finished (%s)", rank, why)

    def _grow(self, backoff: float) -> float:
        """The backoff after one more failed attempt: ``backoff_s[0]``, then doubling up to
        ``backoff_s[1]``."""
        return min(max(2 * backoff, self._backoff[0]), self._backoff[1])

    def _pause(self, backoff: float, retry_after: float | None) -> float:
        """The wait before the next attempt: ``backoff`` jittered into [backoff / 2, backoff],
        lengthened to the answer's ``Retry-After`` when it gave a longer one; at most
        ``backoff_s[1]``. A Retry-After only lengthens the pause: a proxy's ``Retry-After: 0``
        would otherwise retry in a busy loop. (Retrying sooner than a Retry-After of 30 s, the
        sidecar's for a full disk, only adds failed sends; waiting longer than ``backoff_s[1]``
        would leave the queue overflowing.)"""
        pause = backoff * random.uniform(0.5, 1.0)
        if retry_after is not None:
            pause = max(pause, retry_after)
        return min(pause, self._backoff[1])

    def _next(self, pause: float) -> dict[str, Any] | None:
        """The oldest queued snapshot, taken off the queue (a send in flight holds no place
        in it, so a full queue never drops a snapshot that is being sent), after waiting
        ``pause`` seconds; None when it is time to stop (close()'s deadline, less the time kept
        for the finishes, ends a pause)."""
        wake = time.monotonic() + pause
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing and (not self._queue or now >= self._flush_until):
                    return None
                if self._queue and now >= wake:
                    return self._queue.popleft()
                limit = min(self._flush_until, wake if self._queue else math.inf) - now
                self._cond.wait(None if limit == math.inf else max(limit, 0.0))

    def _send(self, item: dict[str, Any]) -> str:
        """Encode and post one snapshot: "ok", "rejected" (do not retry) or "retry"."""
        try:
            body = self._encode(item)
        except Exception as exc:
            # whatever the values raise: TypeError (an object without __float__), ValueError,
            # OverflowError (int(inf)), RecursionError (a dict holding itself), or an error of
            # a value's own __float__ (a tensor on the meta device, one of many elements)
            self._not_encodable(item, exc)
            return "rejected"
        # the answer comes once the sidecar has stored the snapshot, which takes time in
        # proportion to its size: a fixed read timeout re-sent large snapshots it was storing
        connect, read = self._timeout_s, self._timeout_s + len(body) / _STORE_BYTES_PER_S
        # close(finished=True): the end of its deadline is the finishes' (a send already in
        # flight when close() was called keeps its timeout: httpx cannot shorten it)
        if self._finish:
            left = max(self._flush_until - time.monotonic(), 0.001)
            connect, read = min(connect, left), min(read, left)
        timeout = httpx.Timeout(connect, read=read)
        try:
            response = self._client.post("/v1/snapshots", content=body, timeout=timeout)
        except httpx.HTTPError as exc:
            self._failed("sidecar unreachable", f"{type(exc).__name__}: {exc}")
            return "retry"
        if response.status_code >= 500:
            self._retry_after = _retry_after(response)
            after = "" if self._retry_after is None else f", Retry-After {self._retry_after:g} s"
            if _storage_unavailable(response):
                self._failed("sidecar's storage unavailable", f"HTTP {response.status_code}{after}")
            else:
                self._failed("sidecar failed", f"HTTP {response.status_code}{after}")
            return "retry"
        if response.status_code >= 300:  # a 3xx too: a redirect stored nothing (not followed)
            self._rejected(f"sidecar refused step {item['step']}: HTTP {response.status_code} "
                           f"{response.text[:500]}")
            return "rejected"
        if self._down:
            self._down = False
            _log.info("sidecar accepting snapshots again after %d failed sends",
                      self.stats.failures)
        self.stats.sent += 1
        return "ok"

    def _failed(self, what: str, why: str) -> None:
        self._down = True
        self.stats.failures += 1
        if _worth_logging(self.stats.failures):
            _log.warning("%s (%s); %d failed sends so far", what, why, self.stats.failures)

    def _not_encodable(self, item: dict[str, Any], exc: BaseException) -> None:
        """Count a snapshot that cannot be encoded as rejected; log the first such one, with the
        reason, whatever was rejected before it (then as sparingly as other refusals)."""
        self._unencodable += 1
        self.stats.rejected += 1
        if _worth_logging(self._unencodable):
            _log.warning(
                "snapshot of step %r, rank %r not encodable, not sent (%s: %s); %d so far",
                item.get("step"), item.get("rank"), type(exc).__name__, exc, self._unencodable,
            )

    def _unexpected(self, item: dict[str, Any], exc: BaseException) -> str:
        """A send that raised what no branch of ``_send`` expects (a bug, or a transport raising
        something other than ``httpx.HTTPError``): count the snapshot as rejected (retrying it
        would likely raise again), log with the traceback, and go on with the next one."""
        self.stats.rejected += 1
        self._crashes += 1
        if _worth_logging(self._crashes):
            _log.error("sending the snapshot of step %r failed unexpectedly; %d so far",
                       item.get("step"), self._crashes, exc_info=exc)
        return "rejected"

    def _rejected(self, why: str) -> None:
        # a refusal usually repeats every step (a wrong token, a snapshot over the limits):
        # logged as failures are, not once per step and rank
        self.stats.rejected += 1
        if _worth_logging(self.stats.rejected):
            _log.warning("%s; %d snapshots refused so far", why, self.stats.rejected)

    def _encode(self, item: dict[str, Any]) -> bytes:
        snapshot = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            # integers only (NumPy and 0-d integer tensors included): int(2.5) would file the
            # snapshot under another step's history point
            "rank": operator.index(item["rank"]),
            "step": operator.index(item["step"]),
            "wall_time": float(item["wall_time"]),
            "params": _plain(item["params"]),
        }
        if item["optimizer"] is not None:
            snapshot["optimizer"] = _plain(item["optimizer"])
        return json.dumps(snapshot, allow_nan=False, separators=(",", ":")).encode("utf-8")

"""The sender thread's half of :class:`service.client.Publisher`: it takes snapshots off the
queue, encodes them, posts them with retries (backoff, ``Retry-After``) and, when the run
ended, posts each rank's finish; plus the reading of the sidecar's answers it relies on.

:class:`Sender` is the Publisher's base class and holds no state of its own: the attributes it
declares are set up by ``Publisher.__init__``, and the training thread's side (``publish``,
``close``) stays in :mod:`service.client`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import operator
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx

from service.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from service.client import PublisherStats

DEFAULT_URL = "http://127.0.0.1:9400"
_log = logging.getLogger("orthoshard.publisher")


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


# Entries of a snapshot's ``params`` and of its optimizer's ``state`` per json.dumps call. One
# call holds the GIL until it returns (the interpreter's switch interval cannot interrupt C):
# a 20,000-parameter snapshot encoded in one call kept the training thread waiting ~70 ms.
# Pieces of at most ~8,000 numbers take ~1.3 ms (128 parameters of 64 metrics, the schema's
# most; 8 ``state`` entries of 4 x 256 eigenvalues), a piece of 128 parameters of 6 metrics
# ~0.3 ms.
_PIECE_ENTRIES = {"params": 128, "state": 8}


def _encode_json(snapshot: dict[str, Any]) -> str:
    """``snapshot`` as compact JSON, its large dicts (``params``, the optimizer's ``state``)
    encoded a piece at a time: the training thread waits for the GIL at most one piece."""
    def dumps(value: Any) -> str:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))

    def encode(key: str, value: Any) -> str:
        if isinstance(value, dict) and key == "optimizer":
            return "{" + ",".join(dumps(k) + ":" + encode(k, v) for k, v in value.items()) + "}"
        size = _PIECE_ENTRIES.get(key)
        if size is None or not isinstance(value, dict) or len(value) <= size:
            return dumps(value)
        entries = list(value.items())
        # each piece's braces dropped: the pieces' entries, comma-joined, make one object
        return "{" + ",".join(dumps(dict(entries[at:at + size]))[1:-1]
                              for at in range(0, len(entries), size)) + "}"

    return "{" + ",".join(dumps(k) + ":" + encode(k, v) for k, v in snapshot.items()) + "}"


def _worth_logging(count: int) -> bool:
    """Log the 1st, 10th and 100th of a repeating problem, then every 1000th."""
    return count in (1, 10, 100) or count % 1000 == 0


# The pace a sidecar is given to store a snapshot before its answer times out: a quarter of
# the slowest measured (a 4.7 MB, 20,000-parameter body stored in 4.1 s on 2 shared cores).
_STORE_BYTES_PER_S = 250_000


#: The problem type of the sidecar's 503 when its database cannot take a write (locked, or the
#: disk full); its ``Retry-After`` says when to try again.
_STORAGE_UNAVAILABLE = "urn:orthoshard:problem:storage-unavailable"
#: 4xx answers that store nothing and ask to come back (a rate-limiting proxy's 429, a 408):
#: retried like a 5xx, Retry-After honoured; every other 4xx refuses the snapshot for good
_RETRIED_4XX = frozenset({408, 429})



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



class Sender:
    """The sender thread of a :class:`service.client.Publisher` (its base class): the loop
    that posts the queued snapshots, the finishes, and the retry pacing they share. Every
    attribute below is the Publisher's, set in its ``__init__``."""

    run_id: str
    stats: PublisherStats
    _queue: collections.deque[dict[str, Any]]
    _size: int
    _cond: threading.Condition
    _closing: bool
    _deadline: float
    _flush_until: float
    _backoff: tuple[float, float]
    _down: bool
    _outage_failures: int
    _refusals: collections.Counter[int]
    _overflows: int
    _overflows_logged: int
    _retry_after: float | None
    _unsent: int
    _exiting: bool
    _unencodable: int
    _crashes: int
    _ranks: set[int]
    _last_wall: dict[int, float]
    _finish_claimed: bool
    _finish: bool
    _finish_failed: bool
    _finish_sent: bool
    _timeout_s: float
    _client_args: tuple[str | None, str | None, str | None, float, httpx.BaseTransport | None]
    _client: httpx.Client
    _thread: threading.Thread

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
                        self._overflowed()
            else:
                backoff = pause = 0.0
            self._log_overflows()
        self._log_overflows()
        with self._cond:  # what the deadline left unsent (also a retry put back after it)
            left = len(self._queue)
            self._unsent += left
            self.stats.dropped += left
            self._queue.clear()
            ranks = sorted(self._ranks) if self._finish else []
            quiet = self._exiting
        if left and not quiet:  # (the interpreter's exit hook logs what it lost itself)
            _log.warning("close(): %d snapshot(s) still queued at its deadline, not sent; %d "
                         "dropped in all", left, self.stats.dropped)
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
                if response.status_code < 500 and not waiting and \
                        response.status_code not in _RETRIED_4XX:
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
        # 5xx, and a proxy's 429 (rate limit) or 408 (request timeout): nothing was stored, and
        # the same snapshot may be taken later
        if response.status_code >= 500 or response.status_code in _RETRIED_4XX:
            self._retry_after = _retry_after(response)
            after = "" if self._retry_after is None else f", Retry-After {self._retry_after:g} s"
            if _storage_unavailable(response):
                self._failed("sidecar's storage unavailable", f"HTTP {response.status_code}{after}")
            elif response.status_code < 500:
                self._failed("sidecar (or a proxy) asked to retry later",
                             f"HTTP {response.status_code}{after}")
            else:
                self._failed("sidecar failed", f"HTTP {response.status_code}{after}")
            return "retry"
        if response.status_code >= 300:  # a 3xx too: a redirect stored nothing (not followed)
            self._rejected(response.status_code,
                           f"sidecar refused step {item['step']}: HTTP {response.status_code} "
                           f"{response.text[:500]}")
            return "rejected"
        if self._down:
            self._down = False
            _log.info("sidecar accepting snapshots again after %d failed sends (%d in all)",
                      self._outage_failures, self.stats.failures)
            self._outage_failures = 0
        self.stats.sent += 1
        return "ok"

    def _failed(self, what: str, why: str) -> None:
        # counted per outage: the first failure of each outage is logged, however many
        # earlier outages there were
        self._down = True
        self.stats.failures += 1
        self._outage_failures += 1
        if _worth_logging(self._outage_failures):
            _log.warning("%s (%s); %d failed sends in a row, %d in all", what, why,
                         self._outage_failures, self.stats.failures)

    def _overflowed(self) -> None:
        """Count the oldest snapshot, just pushed out of the full queue, as dropped (under
        the lock). The sender thread logs it (:meth:`_log_overflows`): ``publish`` must not
        block on a log handler, nor hold one's lock when the process forks."""
        self.stats.dropped += 1
        self._overflows += 1

    def _log_overflows(self) -> None:
        """Log the queue's drops at the counts failures are logged at (the 1st, 10th, 100th,
        then every 1000th), once each, from the sender thread."""
        with self._cond:
            now, before = self._overflows, self._overflows_logged
            self._overflows_logged = now
        if now > before and (any(before < k <= now for k in (1, 10, 100))
                             or now // 1000 > before // 1000):
            _log.warning("%d snapshots queued (the sidecar takes them slower than they come, "
                         "or is down): the oldest dropped, %d so far", self._size, now)

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

    def _rejected(self, status: int, why: str) -> None:
        # a refusal usually repeats every step (a wrong token, a snapshot over the limits):
        # logged as failures are, not once per step and rank, but counted per status, so that
        # another cause (a token rotated after a 413) is logged the first time too
        self.stats.rejected += 1
        self._refusals[status] += 1
        if _worth_logging(self._refusals[status]):
            _log.warning("%s; %d snapshots refused so far (%d with HTTP %d)", why,
                         self.stats.rejected, self._refusals[status], status)

    def _encode(self, item: dict[str, Any]) -> bytes:
        """The snapshot's body, encoded once: a retry posts the same bytes again."""
        if (body := item.get("body")) is None:
            snapshot = {
                "schema_version": SCHEMA_VERSION,
                "run_id": self.run_id,
                # integers only (NumPy and 0-d integer tensors included): int(2.5) would file
                # the snapshot under another step's history point
                "rank": operator.index(item["rank"]),
                "step": operator.index(item["step"]),
                "wall_time": float(item["wall_time"]),
                "params": _plain(item["params"]),
            }
            if item["optimizer"] is not None:
                snapshot["optimizer"] = _plain(item["optimizer"])
            body = item["body"] = _encode_json(snapshot).encode("utf-8")
        return body

"""The write lane: at most ``limit`` writes in the store at once, each on a worker thread of its
own lane, so that a stalled database never takes the threads of other requests.

A database that stays locked (another process's transaction, a disk that stalls) makes every
write wait up to ``store.WRITE_WAIT_S``; publishers that give up and send again would otherwise
pile up requests until every worker thread of the shared pool waited, and ``/healthz`` and
``/metrics`` with them. Beyond ``limit`` writes in flight a write is answered 503 with
``Retry-After`` at once, without a thread. A write whose client has gone by the time the store's
lock is its turn is skipped (the client sends it again).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.requests import Request

from service.problems import storage_unavailable

T = TypeVar("T")


class WriteLane:
    """Runs store writes off the event loop, at most ``limit`` at a time (503 beyond).

    The counter is only touched on the event loop, so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._threads = anyio.CapacityLimiter(limit)  # its own threads, not the shared pool's

    async def run(
        self, write: Callable[..., T], *args: Any, request: Request | None = None
    ) -> T:
        """``write(*args)`` on a worker thread of this lane; with ``request``, also
        ``abandoned=`` a check that its client is still connected (asked by the store once the
        write's turn comes).

        Raises:
            ProblemError: 503 ``storage-unavailable`` when ``limit`` writes are in flight.
        """
        if self.active >= self.limit:
            raise storage_unavailable(f"{self.limit} writes are waiting for the database")
        self.active += 1
        try:
            call = functools.partial(write, *args)
            if request is not None:
                call = functools.partial(call, abandoned=functools.partial(_gone, request))
            return await anyio.to_thread.run_sync(call, limiter=self._threads)
        finally:
            self.active -= 1


def _gone(request: Request) -> bool:
    """From a worker thread: whether the request's client has disconnected."""
    return anyio.from_thread.run(request.is_disconnected)

"""Run the sidecar: one process, a TCP listener and optionally a Unix socket listener.

``uvicorn --uds`` ignores ``--host/--port``, so both listeners are two ``uvicorn.Server``
objects serving the same app in one event loop. The servers' own signal handling is turned
off (each would overwrite the other's handler); one handler stops both, then the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Generator

import uvicorn

from service.app import create_app
from service.settings import Settings

_log = logging.getLogger("orthoshard.sidecar")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``serve``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _configs(settings: Settings, app: object, log_level: str) -> list[uvicorn.Config]:
    """One config per listener. Lifespan is off: the store is opened and closed here."""
    common = {
        "log_level": log_level,
        "lifespan": "off",
        "access_log": False,
        "proxy_headers": False,
        "server_header": False,
    }
    configs = [uvicorn.Config(app, host=settings.host, port=settings.port, **common)]  # type: ignore[arg-type]
    if settings.uds:
        configs.append(uvicorn.Config(app, uds=settings.uds, **common))  # type: ignore[arg-type]
    return configs


async def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Serve until SIGINT or SIGTERM, then stop both listeners and close the store."""
    app = create_app(settings)
    servers = [_Server(config) for config in _configs(settings, app, log_level)]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        app.state.store.close()
        if settings.uds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(settings.uds)
        _log.info("sidecar stopped; store closed")


def run(settings: Settings, *, log_level: str = "info") -> int:
    """Blocking entry point used by ``orthoshard sidecar``. Returns the exit status."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(settings, log_level=log_level))
    return 0

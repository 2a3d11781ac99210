"""The application factory: ``create_app(settings)``.

Layout (FastAPI "Bigger Applications"): ``settings`` (frozen, validated), ``deps`` (what
routes receive; tests override), ``api/`` (routers), ``schema`` (wire models), ``store``
(SQLite + in-memory latest state), ``metrics`` (collector on a private registry), ``problems``
(RFC 9457 errors), ``auth`` (the bearer token, checked before a body is read). Nothing here
imports torch or ``optim``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from service.api import ingest, probes, state
from service.auth import BearerTokenMiddleware
from service.metrics import HealthCollector, build_registry
from service.problems import BodyLimitMiddleware, install_problem_handlers
from service.settings import Settings
from service.store import Store
from service.writes import WriteLane

API_VERSION = "1.0.0"


def create_app(
    settings: Settings, *, store: Store | None = None, clock: Callable[[], float] = time.time
) -> FastAPI:
    """Build the sidecar app.

    Args:
        settings: validated settings.
        store: an open store to use; by default one is opened on ``settings.db_path``. The app
            closes the store it opened when its lifespan ends (``close_store`` also does it).
        clock: Unix seconds, used for receive times and series expiry (tests inject a fake).

    Returns:
        The app, with ``app.state.settings``, ``.store``, ``.writes`` (the bounded lane of
        store writes), ``.collector`` and ``.registry`` (a fresh private ``CollectorRegistry``
        per app).
    """
    owned = store is None
    if store is None:
        store = Store(settings.db_path, history_max_rows=settings.history_max_rows, clock=clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            app.state.store.close()

    app = FastAPI(
        title="orthoshard sidecar",
        version=API_VERSION,
        summary="Optimizer health: ingest snapshots, serve state, history and Prometheus metrics.",
        lifespan=lifespan,
    )
    collector = HealthCollector(
        store,
        series_ttl_s=settings.series_ttl_s,
        rotation_hold_s=settings.rotation_hold_s,
        clock=clock,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.clock = clock
    app.state.collector = collector
    app.state.writes = WriteLane(settings.max_writes)
    # /metrics renders on threads of its own: never behind requests waiting for the database
    app.state.metrics_threads = anyio.CapacityLimiter(2)
    app.state.registry = build_registry(collector)
    install_problem_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # added last, so outermost: a request without the token is answered before anything,
    # the size limit included, looks at its body
    app.add_middleware(BearerTokenMiddleware, token=settings.token)
    for router in (probes.router, ingest.router, state.router):
        app.include_router(router)
    return app

"""FastAPI dependencies: settings, store, write lane, collector, clock and the token check.

Each reads what ``create_app`` put on ``app.state``; tests replace any of them with
``app.dependency_overrides[get_store] = ...`` instead of patching globals.

All are ``async def``: none blocks (an attribute read, a token compared in memory), and FastAPI
runs a plain ``def`` dependency on the shared thread pool, where requests waiting for the
database (history reads) hold the threads. ``/readyz`` and ``/metrics`` then waited behind them
for their store and collector (median 0.5 s, over 1 s at worst, with 60 history reads and a
locked database), and every write for its token check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import token_problem
from service.metrics import HealthCollector
from service.problems import ProblemError
from service.settings import Settings
from service.store import Store
from service.writes import WriteLane

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="The token from the sidecar's --token-file.",
)


async def get_settings(request: Request) -> Settings:
    """The sidecar's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> Store:
    """The sidecar's store."""
    store: Store = request.app.state.store
    return store


async def get_collector(request: Request) -> HealthCollector:
    """The collector behind ``/metrics`` (registered on the app's private registry)."""
    collector: HealthCollector = request.app.state.collector
    return collector


async def get_writes(request: Request) -> WriteLane:
    """The lane store writes run on (bounded; see service.writes)."""
    writes: WriteLane = request.app.state.writes
    return writes


async def get_clock(request: Request) -> Callable[[], float]:
    """Unix seconds; the app's clock (``time.time`` unless a test injects one)."""
    clock: Callable[[], float] = getattr(request.app.state, "clock", time.time)
    return clock


async def require_token(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Accept only ``Authorization: Bearer <token>`` with the configured token (401 otherwise,
    with ``WWW-Authenticate: Bearer``; see ``auth.token_problem``).

    ``auth.BearerTokenMiddleware`` has already made this check before the body was read; the
    dependency keeps a route safe wherever it is mounted, and ``_scheme`` (HTTPBearer) puts the
    scheme in OpenAPI.
    """
    problem = token_problem(request.headers.get("authorization"), settings.token)
    if problem is not None:
        raise problem


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CollectorDep = Annotated[HealthCollector, Depends(get_collector)]
WritesDep = Annotated[WriteLane, Depends(get_writes)]
ClockDep = Annotated[Callable[[], float], Depends(get_clock)]
Authenticated = Depends(require_token)


async def single_valued_query(request: Request) -> None:
    """Refuse a query parameter given more than once (422 ``repeated-query-parameter``):
    answered with its last value, ``?run_id=r1&run_id=r2`` read run r2 alone."""
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key in seen:
            raise ProblemError(422, f"The query parameter {key!r} is given more than once: "
                                    f"give it once.", slug="repeated-query-parameter")
        seen.add(key)


SingleValuedQuery = Depends(single_valued_query)

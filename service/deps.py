"""FastAPI dependencies: settings, store, write lane, collector, clock and the token check.

Each reads what ``create_app`` put on ``app.state``; tests replace any of them with
``app.dependency_overrides[get_store] = ...`` instead of patching globals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import token_problem
from service.metrics import HealthCollector
from service.settings import Settings
from service.store import Store
from service.writes import WriteLane

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="The token from the sidecar's --token-file.",
)


def get_settings(request: Request) -> Settings:
    """The sidecar's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> Store:
    """The sidecar's store."""
    store: Store = request.app.state.store
    return store


def get_collector(request: Request) -> HealthCollector:
    """The collector behind ``/metrics`` (registered on the app's private registry)."""
    collector: HealthCollector = request.app.state.collector
    return collector


def get_writes(request: Request) -> WriteLane:
    """The lane store writes run on (bounded; see service.writes)."""
    writes: WriteLane = request.app.state.writes
    return writes


def get_clock(request: Request) -> Callable[[], float]:
    """Unix seconds; the app's clock (``time.time`` unless a test injects one)."""
    clock: Callable[[], float] = getattr(request.app.state, "clock", time.time)
    return clock


def require_token(
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

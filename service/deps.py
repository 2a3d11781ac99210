"""FastAPI dependencies: settings, store, collector, clock and the bearer-token check.

Each reads what ``create_app`` put on ``app.state``; tests replace any of them with
``app.dependency_overrides[get_store] = ...`` instead of patching globals.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.metrics import HealthCollector
from service.problems import ProblemError
from service.settings import Settings
from service.store import Store

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


def get_clock(request: Request) -> Callable[[], float]:
    """Unix seconds; the app's clock (``time.time`` unless a test injects one)."""
    clock: Callable[[], float] = getattr(request.app.state, "clock", time.time)
    return clock


def require_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> None:
    """Accept only ``Authorization: Bearer <token>`` with the configured token.

    The comparison is constant-time (``hmac.compare_digest``) so response timing does not leak
    how much of a guess was right. Failures are 401 with ``WWW-Authenticate: Bearer``.
    """
    if credentials is None:
        raise ProblemError(
            401,
            "A bearer token is required.",
            slug="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="orthoshard"'},
        )
    given = credentials.credentials.encode("utf-8")
    if not hmac.compare_digest(given, settings.token.encode("utf-8")):
        raise ProblemError(
            401,
            "The bearer token is not valid.",
            slug="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="orthoshard", error="invalid_token"'},
        )


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CollectorDep = Annotated[HealthCollector, Depends(get_collector)]
ClockDep = Annotated[Callable[[], float], Depends(get_clock)]
Authenticated = Depends(require_token)

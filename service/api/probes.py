"""Open endpoints: liveness, readiness and the Prometheus exposition.

None of them waits for the database: the probes answer on the event loop, ``/metrics`` renders
the in-memory state on threads of its own (``app.state.metrics_threads``), so a database that
stalls writes (and the requests waiting for it) never makes Prometheus see the sidecar down.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request, Response

from service.deps import CollectorDep, StoreDep
from service.metrics import CONTENT_TYPE
from service.problems import ProblemError, problem_responses

router = APIRouter(tags=["probes"])


# Probes answer HEAD as GET (without the body): some load balancers and uptime checks send it.
# A route of its own, out of the OpenAPI document (one route for both gave duplicate operation
# ids there).
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    """Always 200 while the process serves requests."""
    return {"status": "ok"}


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz", summary="Readiness: a snapshot has been accepted", responses=problem_responses(503)
)
async def readyz(store: StoreDep) -> dict[str, str]:
    """200 once any snapshot was accepted (also one stored before a restart), else 503: none
    yet, or the database file was removed or replaced under the sidecar (the detail says which)."""
    if (gone := store.file_gone()) is not None:
        raise ProblemError(503, gone[0].upper() + gone[1:] + ".", slug="not-ready")
    if not store.ready:
        raise ProblemError(503, "No snapshot has been received yet.", slug="not-ready")
    return {"status": "ready"}


_OTHER_METHODS = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


# Starlette's 405 names the methods of the first route of the path only (GET), not the HEAD
# route's: the probes and /metrics answer every other method themselves, naming both.
@router.api_route("/healthz", methods=_OTHER_METHODS, include_in_schema=False)
@router.api_route("/readyz", methods=_OTHER_METHODS, include_in_schema=False)
@router.api_route("/metrics", methods=_OTHER_METHODS, include_in_schema=False)
async def probe_method_not_allowed() -> None:
    raise ProblemError(405, "Method Not Allowed", headers={"Allow": "GET, HEAD"})


# HEAD as GET (the body rendered, then left out by the server): an uptime check that sends HEAD
# got 405 and saw the sidecar down
@router.head("/metrics", include_in_schema=False)
@router.get(
    "/metrics",
    summary="Prometheus exposition of the orthoshard_* series",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def metrics(collector: CollectorDep, request: Request) -> Response:
    """Text format 0.0.4, read from the current state at request time (see service.metrics)."""
    body = await anyio.to_thread.run_sync(collector.render,
                                          limiter=request.app.state.metrics_threads)
    return Response(body, media_type=CONTENT_TYPE)

"""The bearer-token check, made before anything reads a request body.

FastAPI reads and parses a route's JSON body before it runs the route's dependencies, so a
token check done only as a dependency lets a client without the token make the sidecar read and
parse up to ``max_body_bytes`` per request, and tells it with a 400 or 422 what was wrong with
its body. ``BearerTokenMiddleware`` therefore answers every ``/v1`` request from its headers
alone: a missing or wrong token is a 401 before the body is received. ``deps.require_token``
runs the same check as the routes' dependency (it also puts the scheme in OpenAPI).
``/healthz``, ``/readyz`` and ``/metrics`` stay open.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.problems import ProblemError, problem_response

#: Routes under this prefix need the token.
AUTHENTICATED_PREFIX = "/v1"
_CHALLENGE = 'Bearer realm="orthoshard"'


def token_problem(authorization: str | None, token: str) -> ProblemError | None:
    """The 401 for an ``Authorization`` header value that does not carry ``Bearer <token>``,
    or None when it does.

    The comparison is constant-time (``hmac.compare_digest``) so response timing does not leak
    how much of a guess was right. A missing token gets a bare ``WWW-Authenticate: Bearer``
    challenge, a wrong one adds ``error="invalid_token"`` (RFC 6750 section 3).
    """
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return ProblemError(
            401,
            "A bearer token is required.",
            slug="unauthorized",
            headers={"WWW-Authenticate": _CHALLENGE},
        )
    # header values are latin-1 on the wire (ASGI, Starlette); the token is ASCII (Settings)
    if not hmac.compare_digest(given.encode("latin-1"), token.encode("ascii")):
        return ProblemError(
            401,
            "The bearer token is not valid.",
            slug="unauthorized",
            headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
        )
    return None


def is_authenticated_path(path: str) -> bool:
    """True for the routes that need the token (``/v1`` and everything under it)."""
    return path == AUTHENTICATED_PREFIX or path.startswith(AUTHENTICATED_PREFIX + "/")


class BearerTokenMiddleware:
    """Answer a ``/v1`` request without the right bearer token with the 401 problem, before
    the application (or anything in it) receives a byte of the body.

    A pure ASGI middleware rather than ``BaseHTTPMiddleware``, which would wrap the body in a
    stream of its own; this one only reads ``scope["headers"]``.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_authenticated_path(scope["path"]):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            value = None if header is None else header.decode("latin-1")
            problem = token_problem(value, self.token)
            if problem is not None:
                response = problem_response(
                    None,
                    problem.status_code,
                    problem.detail,
                    slug=problem.slug,
                    headers=problem.headers,
                    instance=scope["path"],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

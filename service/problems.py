"""RFC 9457 problem details for every error the sidecar returns.

Every error body is ``application/problem+json`` with ``type``, ``title``, ``status``,
``detail`` and ``instance`` (the request path). ``type`` is ``about:blank`` for plain HTTP
errors (404, 405, ...) and ``urn:orthoshard:problem:<slug>`` for the sidecar's own kinds, so a
client can branch on it. Validation problems add ``errors``: a list of ``{loc, msg, type}``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.records import Abandoned, StoreBusy
from service.schema import Problem

MEDIA_TYPE = "application/problem+json"
_log = logging.getLogger("orthoshard.sidecar")


class ProblemError(HTTPException):
    """An error the handlers render as problem details.

    Args:
        status: HTTP status code.
        detail: human-readable explanation of this occurrence.
        slug: short kind (``urn:orthoshard:problem:<slug>``); None gives ``about:blank``.
        headers: extra response headers (e.g. ``WWW-Authenticate``).
        extra: extension members added to the body.
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=dict(headers or {}))
        self.slug = slug
        self.extra = extra


#: ``Retry-After`` (seconds) of a 503 for a busy database: a lock another process holds, or
#: writes queued beyond the limit, clears in about a write's wait (``store.WRITE_WAIT_S``).
BUSY_RETRY_AFTER_S = 1


def storage_unavailable(detail: str, *, retry_after_s: int = BUSY_RETRY_AFTER_S,
                        write: bool = True) -> ProblemError:
    """503 ``storage-unavailable`` with ``Retry-After``: the database cannot take the request
    now; nothing was stored (``write``: the request would have stored something), and sending
    it again later is right."""
    stored = "nothing was stored: " if write else ""
    return ProblemError(503, f"The database cannot serve this now ({detail}); {stored}try "
                        f"again later.", slug="storage-unavailable",
                        headers={"Retry-After": str(retry_after_s)})


def _writes(request: Request) -> bool:
    """Whether ``request`` would have stored something (a read answered 503 stored nothing
    either way, and saying so would mislead)."""
    return request.method not in ("GET", "HEAD")


def problem_response(
    request: Request | None,
    status: int,
    detail: str | None,
    *,
    slug: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A ``application/problem+json`` response."""
    body: dict[str, Any] = {
        "type": f"urn:orthoshard:problem:{slug}" if slug else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = getattr(exc, "slug", None)
    extra = getattr(exc, "extra", {})
    if exc.status_code == 400 and slug is None:
        # FastAPI's own "error parsing the body": json.loads raised something other than a
        # JSON syntax error, which FastAPI chains as the cause. Every 400 of ours carries a
        # slug, so a client branches on one type.
        if (unknown := _unknown_query(request)) is not None:
            return unknown
        return problem_response(
            request, 400, f"The request body is not valid JSON: {_parse_failure(exc)}.",
            slug="malformed-json", headers=exc.headers
        )
    return problem_response(
        request, exc.status_code, str(exc.detail), slug=slug, headers=exc.headers, **extra
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 for a body or query that does not validate; 400 when the body is not JSON at all;
    415 when it was not sent as JSON."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    # first: the request line asks for something this path does not do, whatever the body
    # holds (a `?dry_run=true` snapshot with a body error was named a schema error; a body
    # that is not JSON stops FastAPI before it validates the query)
    if (unknown := _unknown_query(request)) is not None:
        return unknown
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and not _is_json(media) and \
            any(e["loc"] == ["body"] for e in errors):
        # e.g. curl -d, which sends application/x-www-form-urlencoded: the body was not read
        # as JSON at all, and "Input should be a valid dictionary" would not say why
        return problem_response(
            request,
            415,
            f"Send the body as JSON with 'Content-Type: application/json' (got "
            f"{media or 'no Content-Type'}), e.g. curl -H 'Content-Type: application/json' "
            f"--data @snapshot.json.",
            slug="unsupported-media-type",
            headers={"Accept-Post": "application/json"},
        )
    if any(e["type"] == "json_invalid" for e in errors) or \
            any(e["loc"] == ["body"] and e["type"] == "missing" for e in errors):
        # (an empty body reaches validation as a missing one, not as invalid JSON)
        return problem_response(
            request,
            400,
            "The request body is empty or not valid JSON.",
            slug="malformed-json",
            errors=errors,
        )
    # (a field of that name in a body that has none, the finish's, is an unknown field)
    if any(e["loc"] == ["body", "schema_version"] and e["type"] != "extra_forbidden"
           for e in errors):
        return problem_response(
            request,
            422,
            "Unsupported or missing schema_version; this sidecar accepts 1.",
            slug="unsupported-schema-version",
            errors=errors,
        )
    return problem_response(
        request,
        422,
        "The request did not validate; see errors.",
        slug="validation-error",
        errors=errors,
    )


def _taken_query(request: Request) -> list[str]:
    """The query parameters ``request``'s endpoint takes, as its OpenAPI operation lists them
    (the one place its signature is described)."""
    path = getattr(request.scope.get("route"), "path", None)
    operations = request.app.openapi()["paths"].get(path, {})
    operation = operations.get(request.method.lower()) or operations.get("get", {})
    return [p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"]


def _unknown_query(request: Request) -> JSONResponse | None:
    """422 ``unknown-query-parameter`` if the request line names a query parameter its path
    does not take, else None. Its ``errors`` name those parameters, whatever else was wrong
    (a body that is not JSON stops FastAPI before it validates the query)."""
    taken = _taken_query(request)
    unknown = list(dict.fromkeys(k for k in request.query_params if k not in taken))
    if not unknown:
        return None
    takes = f"this path takes {', '.join(taken)}" if taken else "this path takes none"
    errors = [{"loc": ["query", name], "msg": "Extra inputs are not permitted",
               "type": "extra_forbidden"} for name in unknown]
    return problem_response(request, 422, f"Unknown query parameter "
                            f"{', '.join(map(repr, unknown))}: {takes}.",
                            slug="unknown-query-parameter", errors=errors)


def _parse_failure(exc: Exception) -> str:
    """Why ``json.loads`` refused a body FastAPI could not parse, from the error it chained."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return "it is nested too deeply (Python's parser stops near 1000 levels)"
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "it holds an integer of more than 4300 digits"
    return "not UTF-8, nested too deeply, or a number it cannot hold"


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json"))


async def _store_busy(request: Request, exc: Exception) -> JSONResponse:
    """A store that stayed busy (:class:`StoreBusy`), or a write whose client had gone
    (:class:`Abandoned`; nobody reads this answer): 503 with ``Retry-After``."""
    detail = str(exc) if isinstance(exc, StoreBusy) else "the client had gone"
    return await _http_error(request, storage_unavailable(detail, write=_writes(request)))


#: SQLite's primary codes for a database that cannot take a request now (locked by another
#: connection, full disk, a write the OS refused): 503 storage-unavailable, not an internal
#: error. A write refused for any other reason than ENOSPC (a quota, a file-size limit, EIO) is
#: SQLITE_IOERR: it answered 500 with a traceback logged on every request.
_UNAVAILABLE = {sqlite3.SQLITE_BUSY: "database is locked", sqlite3.SQLITE_LOCKED:
                "database is locked", sqlite3.SQLITE_FULL: "database or disk is full",
                sqlite3.SQLITE_IOERR: "disk I/O error", sqlite3.SQLITE_READONLY:
                "the database file has become read-only"}
#: ``Retry-After`` of a full disk or a refused write: it needs an operator, not a moment.
FULL_RETRY_AFTER_S = 30
#: Seconds between two log lines about an unavailable database (the first is logged at once).
_LOG_EVERY_S = 60.0
_quiet_until = [0.0, 0]  # (monotonic time of the next line, occurrences not logged since)


async def _sqlite_error(request: Request, exc: Exception) -> JSONResponse:
    """A full disk or a locked database: 503 with ``Retry-After``, logged once then at most
    every ``_LOG_EVERY_S`` (without the traceback: it is the disk, not the code). Any other
    SQLite error is an internal error."""
    assert isinstance(exc, sqlite3.OperationalError)
    why = _UNAVAILABLE.get((exc.sqlite_errorcode or 0) & 0xFF)
    if why is None:
        return await _unexpected(request, exc)
    now = time.monotonic()
    if now >= _quiet_until[0]:
        _log.warning("storage unavailable on %s: %s (%d more since the last line)",
                     request.url.path, exc, _quiet_until[1])
        _quiet_until[:] = [now + _LOG_EVERY_S, 0]
    else:
        _quiet_until[1] += 1
    locked = why == _UNAVAILABLE[sqlite3.SQLITE_BUSY]
    retry = BUSY_RETRY_AFTER_S if locked else FULL_RETRY_AFTER_S
    name = getattr(exc, "sqlite_errorname", None)  # set by sqlite3 on the errors it raises
    if not locked and name:  # e.g. SQLITE_IOERR_WRITE: which write failed
        why = f"{why} ({name})"
    return await _http_error(request, storage_unavailable(why, retry_after_s=retry,
                                                          write=_writes(request)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    # Starlette raises the error again after this answer and uvicorn then drops the
    # connection: said here, so that a client does not send its next request down it
    return problem_response(request, 500, "Internal error; see the sidecar log.",
                            headers={"Connection": "close"})


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error through problem details."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StoreBusy, _store_busy)
    app.add_exception_handler(sqlite3.OperationalError, _sqlite_error)
    app.add_exception_handler(Abandoned, _store_busy)
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem bodies for ``codes``."""
    schema = Problem.model_json_schema()
    return {
        code: {"description": HTTPStatus(code).phrase, "content": {MEDIA_TYPE: {"schema": schema}}}
        for code in codes
    }


class BodyTooLarge(ProblemError):
    """Raised while reading a body that grew past the limit (chunked uploads)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body exceeds {limit} bytes.", slug="body-too-large")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before they are parsed.

    A declared ``Content-Length`` over the limit is refused before reading a byte; a body
    without one is counted while it streams and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        refusal = None if declared is None else self._refuse_declared(declared, scope["path"])
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)

    def _refuse_declared(self, declared: bytes, path: str) -> JSONResponse | None:
        """A 400/413 answer for a bad or too large ``Content-Length``, else None."""
        if not declared.isdigit():
            return problem_response(
                None, 400, "Content-Length is not a number.", slug="bad-request", instance=path
            )
        if int(declared) > self.max_bytes:
            return problem_response(
                None,
                413,
                f"Request body exceeds {self.max_bytes} bytes.",
                slug="body-too-large",
                instance=path,
            )
        return None

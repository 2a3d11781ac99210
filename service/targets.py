"""Where a Publisher sends and under which run id: the checks that it and ``orthoshard.train``
make before anything is sent (each of these mistakes failed every send in the background, which
looked like a sidecar that is down), and the run id every rank of a run agrees on."""

from __future__ import annotations

import os
import urllib.parse
import uuid

import httpx
from pydantic import TypeAdapter, ValidationError

from service.schema import RUN_ID_MAX_LENGTH, RunId
from service.sender import DEFAULT_URL

__all__ = ["MAX_WAIT_S", "TORCHRUN_SHARED_RUN_ID", "default_run_id", "environment_run_id",
           "run_id_problem", "seconds", "uds_problem", "url_problem"]


#: torchrun's default ``--rdzv-id``, its ``TORCHELASTIC_RUN_ID`` for every run started with
#: ``--master-port`` or a static multi-node rendezvous: shared by all such runs, so no run's id
TORCHRUN_SHARED_RUN_ID = "none"


def environment_run_id(*, torchrun: bool = True) -> str | None:
    """``ORTHOSHARD_RUN_ID``, else (with ``torchrun``) torchrun's ``TORCHELASTIC_RUN_ID``
    unless it is torchrun's shared default (:data:`TORCHRUN_SHARED_RUN_ID`); None when neither
    names this run."""
    if value := os.environ.get("ORTHOSHARD_RUN_ID"):
        return value
    if not torchrun:
        return None
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return value if value and value != TORCHRUN_SHARED_RUN_ID else None


def default_run_id() -> str:
    """:func:`environment_run_id`, else a random id (one process: no other rank to agree with).

    All ranks of a run must agree; under torchrun the elastic run id already does, except for
    its shared default ``"none"``, which every run started with ``--master-port`` or a static
    rendezvous gets: publishing under it would write each run over the last one's history.

    Raises:
        ValueError: torchrun's id is ``"none"`` and ``ORTHOSHARD_RUN_ID`` is not set.
    """
    if (value := environment_run_id()) is not None:
        return value
    if os.environ.get("TORCHELASTIC_RUN_ID") == TORCHRUN_SHARED_RUN_ID:
        raise ValueError(
            "torchrun's run id is its default 'none' (given to every run started with "
            "--master-port or a static rendezvous), under which runs would overwrite each "
            "other's history: export ORTHOSHARD_RUN_ID (the same on every rank), pass "
            "run_id=, or start torchrun with --rdzv-id")
    return uuid.uuid4().hex[:16]


_RUN_ID = TypeAdapter(RunId)


def run_id_problem(run_id: str) -> str | None:
    """Why the sidecar would refuse every snapshot published under ``run_id`` (None: it takes
    it), said after the id's name. Checked by the sidecar's own validation (pydantic's, whose
    pattern engine differs from ``re`` on unicode: ``"x²"`` matches ``\\w`` here and not there)."""
    try:
        _RUN_ID.validate_python(run_id)
    except ValidationError:
        return (f"{run_id!r} would be refused by the sidecar: use at most {RUN_ID_MAX_LENGTH} "
                f"letters, digits, '_', '.', ':' and '-'")
    return None


#: The longest wait a Publisher takes (a request's ``timeout_s``, ``backoff_s``' longest pause,
#: ``close()``'s deadline): a day. Longer ones overflowed the platform's timers (a thread's join,
#: a socket's timeout) and failed in the background.
MAX_WAIT_S = 86400.0


def seconds(value: object) -> bool:
    """Whether ``value`` is a number of seconds (no bool) in ``[0, MAX_WAIT_S]``."""
    return not isinstance(value, bool) and isinstance(value, int | float) and \
        0 <= value <= MAX_WAIT_S


def url_problem(url: str) -> str | None:
    """What makes ``url`` no sidecar URL (None: it is one), said after the argument's name:
    ``http(s)://host[:port]``, where a missing port is the scheme's (80, 443: a sidecar behind
    a TLS proxy), optionally with a trailing ``/``. ``Publisher`` raises it and
    ``orthoshard.train`` refuses ``--sidecar-url`` with it, before any rank sets up its model.

    Refused, as each failed every send in the background: another scheme or none
    (``localhost:9400`` parses as the scheme ``localhost``), no host, a port that is no number
    in 1-65535, a path (the API's own ``/v1`` pasted in: the Publisher adds its paths to the
    base), a query or fragment, credentials (``user:pass@``, which replace the bearer token),
    and whitespace or control characters (``urlsplit`` drops some, httpx refuses them).
    """
    form = (f"must be the sidecar's http(s)://host[:port] (e.g. {DEFAULT_URL}; without a port, "
            f"the scheme's), got {url!r}")
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"{form}: it holds whitespace or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        return f"{form}: {exc}"
    try:
        port_ok = parts.port != 0  # None (the scheme's) or 1-65535
    except ValueError:  # a port that is no number, or out of range
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        return form
    if parts.path not in ("", "/"):
        return (f"{form}: the path {parts.path!r} is not the sidecar's base (the publisher "
                f"adds /v1/... itself): drop it")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return f"{form}: drop the query or fragment"
    if parts.username is not None or parts.password is not None:
        return (f"{form}: drop the credentials before '@' (the sidecar takes the bearer token "
                f"of its --token-file, which they would replace)")
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"{form}: {exc}"
    return None


# Linux's sun_path holds 108 bytes, the terminating NUL among them
_UDS_MAX_BYTES = 107


def uds_problem(path: object) -> str | None:
    """Why ``path`` can never be a Unix socket to connect to (a non-empty str of at most
    107 bytes, Linux's limit), or None. Each failed every send in the background, which
    looked like a sidecar that is down."""
    if not isinstance(path, str) or not path:
        return f"must be the path of the sidecar's Unix socket, got {path!r}"
    size = len(os.fsencode(path))
    if size > _UDS_MAX_BYTES:
        return (f"is {size} bytes long; a Unix socket's path holds at most {_UDS_MAX_BYTES} "
                f"(start the sidecar's --uds in a shorter directory): {path!r}")
    return None

"""Sidecar configuration: one small frozen dataclass, validated when built.

Every limit the sidecar enforces lives here, so the CLI, the tests and the docs name the same
knobs. Mistakes raise ``ValueError`` saying what to change.
"""

from __future__ import annotations

import os
import stat
import string
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

#: Default age after which a series that stopped reporting leaves ``/metrics`` (seconds).
#: Longer than any sane snapshot interval and longer than the ``OptimizerSnapshotStale`` alert
#: window (a few minutes), so the alert fires on a silent rank before its series disappears.
DEFAULT_SERIES_TTL_S = 900.0
#: Default rotation hold: each ``orthoshard_basis_rotation_degrees`` series exports its largest
#: value over this many seconds, so a one-step spike outlives the next scrape. Twice the usual
#: 15 s scrape interval, so one missed scrape still sees it; keep it >= the scrape interval.
DEFAULT_ROTATION_HOLD_S = 30.0
#: Default bound on stored history rows (one row per parameter, run and step). 2e6 rows
#: is ~1000 steps of 8 ranks x 250 matrices, a few hundred MB of SQLite at most.
DEFAULT_HISTORY_MAX_ROWS = 2_000_000
#: Default bound on one request body. A rank owning 5000 matrices with full state summaries
#: encodes to about 4 MB; 16 MiB leaves room without letting one client exhaust memory.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Default bound on writes (snapshots, finishes) in flight at once; beyond it a write is answered
#: 503 at once. Twice the ranks of an 8-GPU node, so the snapshots all ranks post at the same
#: step never meet it while the database keeps up; far below the 40 worker threads other
#: requests share.
DEFAULT_MAX_WRITES = 16
#: RFC 6750 section 2.1 ``b64token``: what ``Authorization: Bearer <token>`` can carry, these
#: characters then optional trailing ``=``. A token outside it (non-ASCII, quotes, spaces) could
#: never be sent by a client, so every request would be refused: it is refused at start instead.
TOKEN_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~+/")
TOKEN_RULE = "ASCII letters, digits and - . _ ~ + / (then optional trailing =), per RFC 6750"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``create_app`` and the server need.

    Attributes:
        token: bearer token every ``/v1`` request must carry: at least 16 of the
            ``TOKEN_CHARACTERS`` (compared in constant time).
        db_path: SQLite file holding history and last-known state; ``":memory:"`` for tests.
        host, port: the TCP listener. ``port=0`` is allowed (tests pick a free port).
        uds: optional Unix socket path, served by the same process next to TCP.
        series_ttl_s: a parameter or rank that has not reported for this long leaves ``/metrics``.
        rotation_hold_s: each basis-rotation series exports its largest value over this window
            (at least the scrape interval; 0 exports the latest step only).
        history_max_rows: history rows kept; the oldest are pruned beyond it.
        max_body_bytes: larger request bodies are refused with 413 before parsing.
        max_writes: writes in flight at once (the rest are answered 503 with Retry-After).
    """

    token: str
    db_path: str = "orthoshard-sidecar.db"
    host: str = "127.0.0.1"
    port: int = 9400
    uds: str | None = None
    series_ttl_s: float = DEFAULT_SERIES_TTL_S
    rotation_hold_s: float = DEFAULT_ROTATION_HOLD_S
    history_max_rows: int = DEFAULT_HISTORY_MAX_ROWS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_writes: int = DEFAULT_MAX_WRITES

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token must be a non-empty string")
        if (where := token_error(self.token)) is not None:
            raise ValueError(f"token has {where}: a bearer token holds only {TOKEN_RULE}")
        if len(self.token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token is too short: use at least {MIN_TOKEN_LENGTH} characters "
                             f"(e.g. 32 random hex)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("host must not be empty (use 127.0.0.1 for loopback only)")
        if not self.series_ttl_s > 0:
            raise ValueError(f"series_ttl_s must be > 0 seconds, got {self.series_ttl_s}")
        if not 0 <= self.rotation_hold_s < self.series_ttl_s:
            raise ValueError(
                f"rotation_hold_s must be in [0, series_ttl_s={self.series_ttl_s}) seconds, "
                f"got {self.rotation_hold_s}; use at least the Prometheus scrape interval"
            )
        if not 1 <= self.history_max_rows <= SQLITE_MAX_INT:
            # past SQLite's integers the first prune raised OverflowError at start
            raise ValueError(f"history_max_rows must be in [1, {SQLITE_MAX_INT}], got "
                             f"{self.history_max_rows}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_writes < 1:
            raise ValueError(f"max_writes must be >= 1, got {self.max_writes}")
        if self.uds is not None and not self.uds:
            raise ValueError("uds must be a socket path, not empty (leave it out to listen on "
                             "TCP)")
        if sqlite_file_name(self.db_path) == "":
            # SQLite opens "" (and a "file:" URI with no path) as a private temporary database,
            # dropped on exit: no history, though every snapshot was answered 201
            raise ValueError("db_path must name the history file (\":memory:\" keeps none); an "
                             "empty path would keep it in a temporary database, lost on exit")


#: SQLite's largest integer (a signed 64-bit one)
SQLITE_MAX_INT = 2**63 - 1


def sqlite_file_name(path: str) -> str | None:
    """The file name a ``--db`` path gives SQLite: a ``file:`` URI's path part, percent-decoded
    (``file:state.db?cache=shared``, ``file:///abs/state.db``), any other path as it is; None for
    an in-memory database (``:memory:``, ``mode=memory``). ``""`` is a private temporary
    database, dropped on exit."""
    if path.startswith("file:"):
        parts = urllib.parse.urlsplit(path)
        if "memory" in urllib.parse.parse_qs(parts.query).get("mode", []):
            return None
        path = urllib.parse.unquote(parts.path)
    return None if path == ":memory:" else path


def token_error(token: str) -> str | None:
    """Where ``token`` leaves RFC 6750's token characters (without quoting the secret), or
    None when it is a valid bearer token."""
    body = token.rstrip("=")
    if not body:
        return "no character before its trailing '='"
    for i, ch in enumerate(body):
        if ch not in TOKEN_CHARACTERS:
            what = (
                repr(ch)
                if ch.isascii() and ch.isprintable() and not ch.isspace()
                else ("a whitespace" if ch.isspace() else "a non-ASCII or control")
            )
            return f"{what} character at position {i + 1}"
    return None


#: Shortest bearer token accepted (a guessable token would open the state API).
MIN_TOKEN_LENGTH = 16


def read_token_file(path: str | os.PathLike[str]) -> str:
    """Read a bearer token from ``path`` (surrounding whitespace stripped).

    Warns when the file is readable by group or others, since anyone who can read it can post
    snapshots. Raises ``ValueError`` naming the file when it is missing, empty, not UTF-8, or
    holds characters a bearer token cannot carry (see ``TOKEN_CHARACTERS``).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
        mode = p.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read token file {p}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"token file {p} is not text; write a random hex token into it") from exc
    if not text:
        raise ValueError(f"token file {p} is empty; write a random token into it")
    if (where := token_error(text)) is not None:
        raise ValueError(
            f"token file {p} has {where}: a bearer token holds only {TOKEN_RULE}; write e.g. "
            f"the output of: python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    if len(text) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"token file {p} holds {len(text)} characters, too short for a bearer token: use "
            f"at least {MIN_TOKEN_LENGTH}, e.g. the output of: python -c 'import secrets; "
            f"print(secrets.token_hex(32))'"
        )
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"token file {p} is readable by others; chmod 600 it", stacklevel=2)
    return text

"""Run the sidecar: one process, a TCP listener and optionally a Unix socket listener.

``uvicorn --uds`` ignores ``--host/--port``, so both listeners are two ``uvicorn.Server``
objects serving the same app in one event loop. The servers' own signal handling is turned
off (each would overwrite the other's handler); one handler stops both, then the store closes.

The sockets are bound here, before the store is opened and before uvicorn starts, so that a
second sidecar started by mistake on the same port or ``--uds`` stops with a ``ListenError``
naming the address, and touches neither the running sidecar's socket nor any database. A socket
file that accepts connections belongs to a live process and is never replaced (asyncio's
``create_unix_server`` would delete it); a stale one, left by a process that died, is. At exit
the socket file is removed only if it is still the one bound here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import create_app
from service.settings import Settings

_log = logging.getLogger("orthoshard.sidecar")
#: Listen backlog of both sockets: uvicorn's default.
_BACKLOG = 2048
#: How long to wait for a connection to an existing socket file before calling it live: a
#: listener that exists accepts or refuses at once (only a full backlog makes it wait).
_PROBE_TIMEOUT_S = 1.0
#: Mode of a new socket file, as uvicorn gives it: any local user may connect; the bearer
#: token, not the file mode, decides what a connection may do. A replaced stale file's mode
#: is kept.
_SOCKET_MODE = 0o666


#: Seconds a SIGINT/SIGTERM leaves in-flight requests to finish before their connections are
#: closed: a client that stalls mid-body (a trainer that died while posting) must not keep the
#: sidecar up. A second signal stops at once. The store's close then takes at most
#: ``store.CLOSE_WAIT_S`` more, also while another process holds the database locked (a write
#: waits at most ``store.WRITE_WAIT_S``, so none in flight outlasts the grace).
SHUTDOWN_GRACE_S = 5.0


#: Seconds a connection has to send a request's headers, from its opening or from the end of
#: its last response. A trainer's or Prometheus's request comes whole within milliseconds.
HEADER_TIMEOUT_S = 10.0


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers have not all
    come within :data:`HEADER_TIMEOUT_S`. uvicorn times a connection only from the end of a
    response to the first byte of the next request (its keep-alive): one that connected and
    sent nothing, or half a request line, was held for good. No token is needed to connect,
    so any local user (or any peer, with ``--host 0.0.0.0``) could hold enough of them to use
    up the sidecar's file descriptors, and ingest and ``/metrics`` timed out. A request whose
    headers came is the app's (a stalled body, of a client with the token)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # first: a pipelined request may start within the call
        super().on_response_complete()

    def handle_events(self) -> None:
        # (getattr, and the running loop below: attributes of uvicorn's class it need not
        # keep; the pinned version has them, deploy/sidecar-requirements.txt)
        cycle = getattr(self, "cycle", None)
        super().handle_events()
        if getattr(self, "cycle", None) is not cycle:  # a request's headers have all come
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT_S,
                                                                   self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        cycle = getattr(self, "cycle", None)
        idle = cycle is None or cycle.response_complete
        if idle and not self.transport.is_closing():
            self.transport.close()


def _raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit (systemd's soft default
    is 1024, where ~1000 connections held open stopped every new one); a limit it cannot
    raise is left as it is."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ListenError(RuntimeError):
    """A listener could not be opened; the message names the address and what to do."""


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``serve``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _configs(settings: Settings, app: object, log_level: str) -> list[uvicorn.Config]:
    """One config per listener (its address is used for the start-up log line; the socket is
    bound by ``serve``). Lifespan is off: the store is opened and closed here."""
    common = {
        "log_level": log_level,
        "lifespan": "off",
        "access_log": False,
        "proxy_headers": False,
        "server_header": False,
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_S,
        "http": _HeaderTimeoutProtocol,
    }
    configs = [uvicorn.Config(app, host=settings.host, port=settings.port, **common)]  # type: ignore[arg-type]
    if settings.uds:
        configs.append(uvicorn.Config(app, uds=settings.uds, **common))  # type: ignore[arg-type]
    return configs


def _bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, as uvicorn would bind it.

    Created with ``proto=IPPROTO_TCP``, not 0 (what ``socket.create_server`` gives): asyncio
    sets TCP_NODELAY on an accepted connection only when its socket says IPPROTO_TCP, and
    without it Nagle's algorithm against the client's delayed ACK added ~40 ms to every
    response (measured: a 1-parameter POST 1.8 -> 44 ms, sidecar ingest halved)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        return sock
    except OSError as exc:
        sock.close()
        hint = (
            "is another sidecar running? Stop it or choose another --port"
            if exc.errno == errno.EADDRINUSE
            else "check --host and --port"
        )
        # the OSError's own message repeats the address; getaddrinfo's errnos are negative
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {where} ({why}): {hint}") from exc


def _accepts_connections(path: str) -> bool:
    """True if a process listens on the Unix socket ``path``; False for a stale file (refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # e.g. a timeout: someone holds it; never take it away from them
            return True
        return True


def _bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at ``path`` and the (device, inode) of the file it created.

    Raises:
        ListenError: ``path`` is a live socket, is not a socket, or cannot be bound.
    """
    mode = _SOCKET_MODE
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(path)
        if not stat.S_ISSOCK(existing.st_mode):
            raise ListenError(
                f"--uds {path} exists and is not a socket: remove it or choose another path"
            )
        if _accepts_connections(path):
            raise ListenError(
                f"--uds {path} is in use: a process (another sidecar?) listens on "
                f"it; stop it or choose another path"
            )
        os.unlink(path)  # stale: left by a process that is gone
        mode = stat.S_IMODE(existing.st_mode)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(_BACKLOG)
        bound = os.stat(path)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on --uds {path} ({exc.strerror or exc}): its "
            f"directory must exist and be writable"
        ) from exc
    return sock, (bound.st_dev, bound.st_ino)


def _remove_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one this process bound (a file
    another process has bound there since is left alone)."""
    with contextlib.suppress(FileNotFoundError):
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == identity:
            os.unlink(path)


async def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Bind the listeners, open the store, serve until SIGINT or SIGTERM, then stop both
    listeners, close the store and remove the socket file this process bound.

    Raises:
        ListenError: a listener could not be opened (nothing was opened or served).
        sqlite3.Error: the store could not be opened (the listeners are closed again).
    """
    sockets: list[socket.socket] = []
    ours: tuple[int, int] | None = None
    app: FastAPI | None = None
    try:
        sockets.append(_bind_tcp(settings.host, settings.port))
        if settings.uds:
            unix, ours = _bind_unix(settings.uds)
            sockets.append(unix)
        app = create_app(settings)
        host, port = sockets[0].getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # --port 0: the one given
        # at the level the log shows at least: with --port 0 this line alone names the port
        # (--log-level warning hid it)
        _log.log(max(logging.INFO, _log.getEffectiveLevel()), "sidecar listening on http://%s%s",
                 where, f" and unix socket {settings.uds}" if settings.uds else "")
        await _serve_until_signal(sockets, _configs(settings, app, log_level))
    finally:
        for sock in sockets:
            sock.close()
        if app is not None:
            app.state.store.close()
        if ours is not None and settings.uds:
            _remove_if_ours(settings.uds, ours)
        if app is not None:
            _log.info("sidecar stopped; store closed")


async def _serve_until_signal(sockets: list[socket.socket], configs: list[uvicorn.Config]) -> None:
    """Serve each socket with a uvicorn server of its config until SIGINT or SIGTERM."""
    servers = [_Server(config) for config in configs]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            if server.should_exit:  # the second signal: no more waiting for requests
                server.force_exit = True
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(
            *(server.serve(sockets=[sock]) for server, sock in zip(servers, sockets, strict=True))
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(settings: Settings, *, log_level: str = "info") -> int:
    """Blocking entry point used by ``orthoshard sidecar``. Returns the exit status."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    _raise_open_files_limit()
    asyncio.run(serve(settings, log_level=log_level))
    return 0

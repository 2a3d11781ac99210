"""Shared fixtures.

External tools (prometheus, promtool, docker-compose) are installed by scripts/setup.sh --dev.
A test that needs one calls ``require_tool(name)``: on a developer machine without the tool it
skips with the install command; in CI (``CI`` set) it FAILS, so a missing install step can never
turn into a silently green run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """Path of an executable on PATH or in the running venv's bin/, or None."""
    return shutil.which(name) or shutil.which(name, path=str(VENV_BIN))


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is not None:
        return path
    message = f"{name} is not installed; run: bash scripts/setup.sh --dev"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def run_whole(cmd: list[str], *, timeout: float, **kwargs: object
              ) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` in a session of
    its own, killed whole when the timeout passes: killing torchrun alone left its ranks
    running, hung in a collective."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)  # type: ignore[call-overload]
    with killed_whole(proc):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_whole(proc)
            stdout, stderr = proc.communicate()
            raise TimedOut(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class TimedOut(subprocess.TimeoutExpired):
    """:class:`subprocess.TimeoutExpired` whose message ends with the command's last stderr:
    the failure report of a hung run says where it hung."""

    def __str__(self) -> str:
        tail = self.stderr if isinstance(self.stderr, str) else ""
        return f"{super().__str__()} Its stderr ends:\n{tail[-4000:]}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from the parent pids in /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_whole(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s session (started with ``start_new_session=True``) and every process
    below it. The session alone is not enough: torchrun starts each rank in a session of its
    own, so killing torchrun's session left the ranks running (a rank restarted by
    ``--max-restarts`` outlived a timed-out test that way). The descendants are listed before
    anything is killed: an orphan is adopted by init, out of reach."""
    below = descendants(proc.pid)
    for kill, target in [(os.killpg, proc.pid)] + [(os.kill, pid) for pid in below]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)


@contextlib.contextmanager
def killed_whole(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Kill ``proc`` and everything below it (:func:`kill_whole`) when the block is left by an
    exception: a failed assertion, or the test's own timeout (pytest-timeout raises in the
    test, past any ``communicate`` deadline), would otherwise leave them running."""
    try:
        yield proc
    except BaseException:
        kill_whole(proc)
        raise


def computed_once(factory: pytest.TempPathFactory, name: str,
                  make: Callable[[Path], None]) -> Path:
    """A directory that ``make(path)`` fills once per test session, shared by the pytest-xdist
    workers. A module-scoped fixture runs once per WORKER: with two workers stealing a module's
    tests from each other, each ran the expensive ones (a reference torchrun, the ranks of a
    parity run) again. The first worker to ask makes it under a file lock; a worker asking
    meanwhile waits for it and reads the same files. A ``make`` that raised leaves no
    directory behind, so the next asker tries again (and fails the same way, in its own test).
    """
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <session>/popen-gwN: share the session's dir
        root = root.parent
    path = root / f"once-{name}"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (path / ".done").exists():
            return path
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        try:
            make(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        (path / ".done").touch()
    return path

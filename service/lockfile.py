"""An exclusive lock file that says who holds it: one sidecar per database file, one training
job per checkpoint directory. ``flock`` on a file of its own, released by the kernel when its
holder exits, killed or not; the file stays (removing it would let a process that opened it
before the removal lock a file nobody else sees)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

__all__ = ["LockFileError", "LockHeld", "hold", "release"]


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote in the file."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class LockFileError(OSError):
    """The lock file cannot be created, locked or written; the message says what to do."""


def hold(path: str, holder: str) -> int:
    """Lock ``path`` (created with mode 0600 if missing) and write ``holder`` in it; returns
    the open descriptor, to :func:`release` (or keep until the process exits).

    Raises:
        LockHeld: another process holds it (the holder it wrote is named).
        LockFileError: ``path`` is a symbolic link (one planted in a shared directory had its
            target overwritten), a special file or a file with other hard links, or it cannot
            be created or written (a full disk creates the file but not its line).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        why = ("it is a symbolic link; remove it" if exc.errno == errno.ELOOP
               else exc.strerror or exc)
        raise LockFileError(f"cannot create its lock file {path}: {why}") from None
    held = os.fstat(fd)
    if not stat.S_ISREG(held.st_mode) or held.st_nlink != 1:
        os.close(fd)
        raise LockFileError(
            f"its lock file {path} is not a file of its own (a special file, or one with "
            f"{held.st_nlink} hard links); remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        current = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(path, current) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise LockFileError(f"cannot write its lock file {path}: {exc.strerror or exc}"
                            ) from None
    return fd


def release(fd: int | None) -> None:
    """Unlock and close what :func:`hold` returned (None: nothing)."""
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock

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
    """The lock file cannot be created, locked or written; the message says what to do.
    ``unsupported``: the filesystem has no flock at all."""

    unsupported = False


#: flock's answers on a filesystem that has no flock (Lustre without -o flock, some FUSE and
#: CIFS mounts)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def hold(path: str, holder: str, *, shared: bool = False) -> int:
    """Lock ``path`` (created if missing) and write ``holder`` in it; returns the open
    descriptor, to :func:`release` (or keep until the process exits).

    ``shared=False`` (the sidecar's database): the file is created readable by its owner alone
    and must be a file of its own. ``shared=True`` (a directory a team shares, whose files
    hard-link snapshots copy): created as the umask allows; one with other hard links, or one
    this user may only read, is locked without writing the holder in it.

    Raises:
        LockHeld: another process holds it (the holder it wrote is named).
        LockFileError: ``path`` is a symbolic link (one planted in a shared directory had its
            target overwritten), a special file or (not ``shared``) a file with other hard
            links, or it cannot be created, locked or written (a full disk creates the file but
            not its line). ``unsupported``: the filesystem has no flock.
    """
    fd, writable = _open(path, shared)
    held = os.fstat(fd)
    linked = held.st_nlink != 1
    if not stat.S_ISREG(held.st_mode) or (linked and not shared):
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
    except OSError as exc:  # leaked the descriptor, and escaped as a traceback
        os.close(fd)
        error = LockFileError(f"cannot lock its lock file {path}: {exc.strerror or exc}")
        error.unsupported = exc.errno in _NO_FLOCK
        raise error from None
    if linked or not writable:  # (shared) the holder is a courtesy: the other names keep theirs
        return fd
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise LockFileError(f"cannot write its lock file {path}: {exc.strerror or exc}"
                            ) from None
    return fd


def _open(path: str, shared: bool) -> tuple[int, bool]:
    """The lock file's descriptor, and whether it is open for writing."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666 if shared else 0o600), True
    except OSError as exc:
        if shared and exc.errno == errno.EACCES:
            try:  # another user's lock file, which this one may read: flock takes a read fd
                return os.open(path, os.O_RDONLY | flags), False
            except OSError:
                pass
        why = ("it is a symbolic link; remove it" if exc.errno == errno.ELOOP
               else exc.strerror or exc)
        raise LockFileError(f"cannot create its lock file {path}: {why}") from None


def release(fd: int | None) -> None:
    """Unlock and close what :func:`hold` returned (None: nothing)."""
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock

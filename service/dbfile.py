"""The database file of a store: its lock (one sidecar per file), its mode, and the checks
that come before SQLite opens it. The lock and the checks go by the file a ``--db`` path names
(:func:`file_path`), whatever the path's spelling."""

from __future__ import annotations

import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

from service import lockfile
from service.records import DatabaseInUse
from service.settings import sqlite_file_name

__all__ = ["check_writable", "create_private", "creates_file", "database_held", "file_id",
           "file_path", "own", "release"]

_log = logging.getLogger("orthoshard.sidecar.store")


def file_path(path: str) -> str | None:
    """The file a ``--db`` path names (:func:`service.settings.sqlite_file_name`), absolute with
    symlinks resolved (None: an in-memory or temporary database). The lock, the writability
    check and the removed-file check go by this file: taken by the path as written, a URI or a
    symlink to a database another sidecar held got a lock of its own (both sidecars ran on it,
    and the counts of one were lost), and a URI's removed file went unnoticed (201s for
    snapshots written into a deleted file)."""
    name = sqlite_file_name(path)
    return os.path.realpath(name) if name else None


def own(path: str | None) -> int | None:
    """Lock ``PATH.lock`` (``flock``, exclusive) for this store and write this process's id
    in it; returns the open descriptor (None: an in-memory database, ``path`` None). Two
    sidecars started on one ``--db`` (on other ports) each kept a mirror of their own and wrote
    it over the other's: the snapshot counts went back at the next start.

    Raises:
        DatabaseInUse: another store holds it, naming that process.
    """
    if path is None:
        return None
    try:
        return lockfile.hold(f"{path}.lock", str(os.getpid()))
    except lockfile.LockHeld as exc:
        raise DatabaseInUse(f"another sidecar (process {exc.holder}) is using this database "
                            f"(locked in {path}.lock)") from None
    except lockfile.LockFileError as exc:
        raise sqlite3.OperationalError(str(exc)) from None


def release(fd: int | None) -> None:
    """Unlock and close what :func:`own` returned (the lock file stays: removing it would let
    a process that opened it before the removal lock a file nobody else sees)."""
    lockfile.release(fd)


@contextmanager
def database_held(path: str) -> Iterator[None]:
    """Hold the lock a running sidecar holds on the database ``path`` names, for the ``with``
    block: what is done there (clearing a demo's outputs) cannot pull the database from under a
    sidecar that uses it, and no sidecar starts on it meanwhile.

    Raises:
        DatabaseInUse: another sidecar uses it, naming that process.
    """
    fd = own(file_path(path))
    try:
        yield
    finally:
        release(fd)


def creates_file(path: str) -> bool:
    """Whether SQLite would create the file of the ``--db`` path ``path`` when it is missing:
    not for a ``file:`` URI of ``mode=ro`` or ``mode=rw`` (which refuse a missing file: created
    first, a mistyped ``mode=rw`` path served a new empty database)."""
    if not path.startswith("file:"):
        return True
    modes = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("mode", [])
    return not set(modes) & {"ro", "rw"}


def create_private(path: str | None) -> None:
    """Create the database file ``path``, empty, readable by its owner alone, unless it exists
    (SQLite takes an empty file for a new database, and gives its ``-wal`` and ``-shm`` files
    the database's mode). Created by SQLite under the usual umask, it was world-readable: any
    local user read the runs, steps, configuration and history the state API guards with its
    token. An existing file keeps its mode; one readable by others is warned of."""
    if path is None:
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            _log.warning("database %s is readable or writable by others: it holds what the "
                         "state API guards with its token; chmod 600 it (and its -wal and "
                         "-shm files)", path)
    except OSError as exc:
        raise sqlite3.OperationalError(f"cannot create {path}: {exc.strerror or exc}") from None


def check_writable(path: str | None) -> None:
    """Refuse, before SQLite opens it, a database file (or its ``-wal`` / ``-shm`` files) or
    directory this process cannot write. SQLite's WAL switch on a read-only file created
    read-only ``-wal`` and ``-shm`` files, which made the next start fail with the same error
    after the file's mode was fixed.

    Raises:
        sqlite3.OperationalError: naming the file or directory.
    """
    if path is None:
        return
    directory = os.path.dirname(path) or "."
    if os.path.isdir(directory) and not os.access(directory, os.W_OK):
        raise sqlite3.OperationalError(
            f"this user cannot write the directory {directory}, where SQLite keeps the "
            f"database's -wal and -shm files")
    if os.path.isdir(path):  # (its link count, 2 or more, read as a hard-linked file)
        raise sqlite3.OperationalError(
            f"{path} is a directory: name the database file, e.g. "
            f"{os.path.join(path, 'orthoshard-sidecar.db')}")
    for name in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(name) and not os.access(name, os.W_OK):
            raise sqlite3.OperationalError(f"this user cannot write {name}")
    links = os.stat(path).st_nlink if os.path.exists(path) else 1
    if links > 1:
        # SQLite names a database's -wal and -shm files after the path, and the lock goes by
        # it too: a sidecar on another name of the file kept a WAL of its own over the same
        # file (the index corrupted, answered snapshots lost) while this one ran
        raise sqlite3.OperationalError(
            f"{path} has {links} hard links: another name of the file would be another "
            f"database over it (its own -wal file and lock); remove the other names "
            f"(find / -samefile {path}) or copy the database to a file of its own")


def file_id(path: str | None) -> tuple[int, int] | None:
    """``(device, inode)`` of a database file (:func:`file_path`; None: in-memory or absent)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino

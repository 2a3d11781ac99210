"""Unit tests of the sidecar's parts: store, metrics collector, publisher, layering."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, require_tool
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import service.store as store_module
from service import dbfile
from service.client import FINISH_RESERVE_S, Publisher
from service.metrics import HealthCollector, build_registry, classify
from service.records import DatabaseInUse
from service.schema import Snapshot
from service.sender import _STORE_BYTES_PER_S as STORE_BYTES_PER_S
from service.settings import Settings, read_token_file
from service.store import Store
from service.targets import default_run_id, environment_run_id


def make_snapshot(step: int, rank: int = 0, n: int = 3, run_id: str = "r") -> Snapshot:
    params = {
        f"blocks.{i}.w": {
            "orthogonality_error": 0.01 * step,
            "rotation_degrees_L_k1": 1.0,
            "rotation_degrees_R_k8": 2.0,
            "eigengap_ratio_L": None,
            "nonfinite_skips": 0.0,
            "update_rms": 0.5,
        }
        for i in range(n)
    }
    return Snapshot(
        schema_version=1, run_id=run_id, rank=rank, step=step, wall_time=1e9, params=params
    )


# ------------------------------------------------------------------------------ store


def test_a_step_sent_again_replaces_its_point_and_counts_once(tmp_path: Path) -> None:
    # a Publisher whose answer timed out sends the step again: it was counted again (and a
    # storm of such retries counted more snapshots than the ranks ever published)
    store = Store(str(tmp_path / "s.db"), history_max_rows=1000, clock=lambda: 5.0)
    store.ingest(make_snapshot(3, rank=0))
    store.ingest(make_snapshot(3, rank=0))
    assert store.ranks()[0].snapshots_received == 1
    store.ingest(make_snapshot(4, rank=0))
    store.ingest(make_snapshot(3, rank=0))  # an earlier step again (a resumed run): counted
    store.ingest(make_snapshot(3, rank=0, run_id="other"))  # another run's step 3: counted
    assert store.ranks()[0].snapshots_received == 4
    assert len(store.history("blocks.2.w", run_id="r", from_step=0, to_step=9, limit=10)) == 2
    store.close()


def test_a_damaged_database_is_refused_at_start(tmp_path: Path) -> None:
    # a page overwritten in the middle of the history opened, took snapshots (201), answered
    # every history read with a 500 and refused the next start
    db = tmp_path / "s.db"
    store = Store(str(db), history_max_rows=100_000)
    for step in range(300):
        store.ingest(make_snapshot(step, n=20))
    store.close()
    pages = db.stat().st_size // 4096
    with db.open("r+b") as f:
        f.seek(pages // 2 * 4096 + 100)
        f.write(b"\xff" * 2000)
    with pytest.raises(sqlite3.DatabaseError, match=r"damaged \(sqlite quick_check: .*tree page"):
        Store(str(db), history_max_rows=100_000)


def test_store_survives_reopen_with_history_and_last_state(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, clock=lambda: 5.0)
    for step in range(4):
        store.ingest(make_snapshot(step, rank=1))
    store.close()
    again = Store(db, history_max_rows=1000)
    assert again.ready
    rank = again.ranks()[0]
    assert (rank.rank, rank.step, rank.snapshots_received, rank.received_at) == (1, 3, 4, 5.0)
    assert again.param("blocks.2.w") is not None
    rows = again.history("blocks.2.w", run_id="r", from_step=1, to_step=2, limit=10)
    assert [r.step for r in rows] == [1, 2] and rows[0].metrics["eigengap_ratio_L"] is None
    again.close()


def test_a_lower_history_bound_applies_when_the_store_opens(tmp_path: Path) -> None:
    # a restart with a lower --history-max-rows served every old row until a snapshot came
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, clock=lambda: 5.0)
    for step in range(10):
        store.ingest(make_snapshot(step))  # 3 parameters: 30 points
    store.close()
    again = Store(db, history_max_rows=12)
    assert again.history_rows() == 12
    rows = again.history("blocks.0.w", run_id="r", from_step=0, to_step=9, limit=100)
    assert [r.step for r in rows] == [6, 7, 8, 9]  # the newest 12 points of 3 parameters
    again.close()


def test_a_finish_is_durable_and_a_database_of_the_earlier_schema_opens(tmp_path: Path) -> None:
    # the ranks table as the previous version wrote it (no finished_at column), with a row
    db = str(tmp_path / "old.db")
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE ranks (rank INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT "
        "NULL, wall_time REAL NOT NULL, received_at REAL NOT NULL, snapshots_received INTEGER "
        "NOT NULL, optimizer TEXT);"
        "INSERT INTO ranks VALUES (3, 'r', 9, 1e9, 4.0, 10, NULL);")
    con.close()
    store = Store(db, history_max_rows=1000, clock=lambda: 7.0)
    (rank,) = store.ranks()
    assert (rank.rank, rank.step, rank.snapshots_received, rank.finished_at) == (3, 9, 10, None)
    assert store.finish(3, "r").finished_at == 7.0
    store.close()
    again = Store(db, history_max_rows=1000, clock=lambda: 8.0)
    assert again.ranks()[0].finished_at == 7.0  # kept across a sidecar restart
    again.ingest(make_snapshot(10, rank=3))  # the run goes on (resumed): watched again
    assert again.ranks()[0].finished_at is None and again.ranks()[0].snapshots_received == 11
    again.close()


def test_a_finish_keeps_the_wall_time_it_covers_across_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, clock=lambda: 7.0)
    store.ingest(make_snapshot(4))  # wall_time 1e9
    store.finish(0, "r", last_wall_time=1e9 + 5)  # step 5, taken at 1e9 + 5, still on its way
    store.close()
    again = Store(db, history_max_rows=1000, clock=lambda: 8.0)
    again.ingest(make_snapshot(5).model_copy(update={"wall_time": 1e9 + 5}))
    (rank,) = again.ranks()
    assert (rank.step, rank.finished_at, rank.finished_wall_time) == (5, 7.0, 1e9 + 5)
    # another run of the rank, even taken earlier by its clock, is watched again
    again.ingest(make_snapshot(1, run_id="r2").model_copy(update={"wall_time": 1e9 + 1}))
    assert again.ranks()[0].finished_at is None
    again.close()


class _FailingCommit:
    """The store's connection, with COMMIT failing as it does on a full disk (WAL pages are
    written at commit); everything else goes to the real connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_commit_that_fails_changes_nothing_the_store_shows(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, clock=lambda: 5.0)
    store.ingest(make_snapshot(1))
    real = store._db
    store._db = _FailingCommit(real)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.ingest(make_snapshot(2))
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.finish(0, "r")
    rank, param = store.ranks()[0], store.param("blocks.0.w")
    assert (rank.step, rank.snapshots_received, rank.finished_at) == (1, 1, None)
    assert param is not None and param.step == 1
    assert not real.in_transaction  # rolled back: the next write starts clean
    store._db = real
    store.ingest(make_snapshot(2))  # the retry of the refused snapshot counts once
    assert (store.ranks()[0].step, store.ranks()[0].snapshots_received) == (2, 2)
    store.close()
    again = Store(db, history_max_rows=1000)
    assert (again.ranks()[0].step, again.ranks()[0].snapshots_received) == (2, 2)
    assert [r.step for r in again.history("blocks.0.w", run_id="r", from_step=0, to_step=9,
                                          limit=9)] == [1, 2]
    again.close()


def _pending(db: str) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT COUNT(*) FROM pending").fetchone()[0])
    finally:
        con.close()


def test_snapshots_not_merged_yet_are_read_and_survive_a_crash(tmp_path: Path) -> None:
    # An ingest appends to ``pending``; the merge into history and params runs every
    # merge_interval_s. Whatever is pending is answered all the same, and a store that stopped
    # without merging (killed) replays it at the next start.
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, merge_interval_s=3600, clock=lambda: 5.0)
    store.ingest(make_snapshot(1, rank=1))
    body = make_snapshot(2, rank=1).model_dump(mode="json")
    body["optimizer"] = {"class_name": "SOAP", "state": {
        "blocks.0.w": {"shape": [4, 4], "buffer_norms": {"exp_avg": 1.5}}}}
    store.ingest(Snapshot.model_validate_json(json.dumps(body)))
    assert _pending(db) == 6  # 3 parameters x 2 steps, none merged
    assert [r.step for r in store.history("blocks.0.w", run_id="r", from_step=0, to_step=9,
                                          limit=9)] == [1, 2]
    assert _pending(db) == 0  # the read merged them
    store.ingest(make_snapshot(3, rank=1))  # no state summary: keeps step 2's
    assert _pending(db) == 3
    # killed: the thread stops and the connection goes, with no merge, and the process's
    # exit releases its lock on the database
    assert store._checkpointer is not None
    store._checkpointer.close(timeout_s=2.0)
    store._db.close()
    dbfile.release(store._owner)
    again = Store(db, history_max_rows=1000)
    rank = again.ranks()[0]
    assert (rank.step, rank.snapshots_received) == (3, 3)
    param = again.param("blocks.0.w")
    assert param is not None and (param.step, param.received_at) == (3, 5.0)
    assert param.state == {"shape": [4, 4], "owner_rank": None,
                           "buffer_norms": {"exp_avg": 1.5}, "eigenvalues": {}}
    assert [r.step for r in again.history("blocks.2.w", run_id="r", from_step=0, to_step=9,
                                          limit=9)] == [1, 2, 3]
    assert _pending(db) == 0
    again.close()


@pytest.mark.parametrize("make", [
    "CREATE TABLE users (id INTEGER, name TEXT)",  # another program's table
    "CREATE TABLE ranks (id INTEGER, name TEXT)",  # one named as the sidecar's, other columns
    "PRAGMA user_version = 7",  # a newer format
], ids=["foreign-table", "same-name-other-columns", "newer-format"])
def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path,
                                                                 make: str) -> None:
    # a mistyped --db naming another SQLite database took it over: it gained these tables,
    # switched to WAL for good and lost its user_version (or failed half-way, changed)
    path = str(tmp_path / "other.db")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(make)
        db.commit()
        before = (db.execute("SELECT sql FROM sqlite_master").fetchall(),
                  db.execute("PRAGMA user_version").fetchone(),
                  db.execute("PRAGMA journal_mode").fetchone())
    message = "newer sidecar" if "user_version" in make else "not a sidecar's database"
    with pytest.raises(sqlite3.DatabaseError, match=message):
        Store(path, history_max_rows=10)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert (db.execute("SELECT sql FROM sqlite_master").fetchall(),
                db.execute("PRAGMA user_version").fetchone(),
                db.execute("PRAGMA journal_mode").fetchone()) == before
    Store(str(tmp_path / "own.db"), history_max_rows=10).close()  # a new file is its own


@pytest.mark.parametrize("second", ["same", "symlink", "uri", "uri-authority", "uri-query"])
def test_one_store_at_a_time_writes_a_database_file(tmp_path: Path, second: str) -> None:
    # two sidecars on one --db each kept a mirror of their own and wrote their counts over
    # the other's: the snapshot count went from 10 back to 6 at the next start. A symlink or
    # a "file:" URI to the same file took a lock of its own, and both ran.
    path = str(tmp_path / "s.db")
    first = Store(path, history_max_rows=10)
    if second == "symlink":
        (tmp_path / "link.db").symlink_to(tmp_path / "s.db")
    other = {"same": path, "symlink": str(tmp_path / "link.db"), "uri": f"file:{path}",
             "uri-authority": f"file://{path}", "uri-query": f"file:{path}?cache=private"}
    with pytest.raises(DatabaseInUse, match=rf"another sidecar \(process {os.getpid()}\) is using"):
        Store(other[second], history_max_rows=10)
    first.ingest(make_snapshot(1))
    first.close()
    again = Store(path, history_max_rows=10)
    assert again.ranks()[0].snapshots_received == 1
    again.close()


@pytest.mark.parametrize("path", [":memory:", "file::memory:", "file:mem?mode=memory"])
def test_in_memory_databases_take_no_lock_and_leave_no_file(tmp_path: Path, monkeypatch,
                                                            path: str) -> None:
    monkeypatch.chdir(tmp_path)
    first, second = Store(path, history_max_rows=10), Store(path, history_max_rows=10)
    first.ingest(make_snapshot(1))
    assert first.ready
    first.close()
    second.close()
    assert list(tmp_path.iterdir()) == []


def test_the_merge_goes_in_chunks_in_arrival_order(tmp_path: Path) -> None:
    # the store's thread merges a chunk at a time, so that writers wait for one chunk only
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, merge_interval_s=3600)
    for step in range(3):
        store.ingest(make_snapshot(step, n=3))  # rows 1-9: step 0's three, step 1's, step 2's
    assert store._merge(4) is True and _pending(db) == 5
    con = sqlite3.connect(db)
    merged = con.execute("SELECT name, step FROM history ORDER BY id").fetchall()
    con.close()
    assert merged == [("blocks.0.w", 0), ("blocks.1.w", 0), ("blocks.2.w", 0),
                      ("blocks.0.w", 1)]
    assert store._merge(100) is False and _pending(db) == 0
    assert store.history_rows() == 9
    store.close()


def test_the_last_snapshots_merge_without_further_ingests(tmp_path: Path, monkeypatch) -> None:
    # the thread merges what the last commits appended though no commit follows to wake it,
    # and goes on chunk by chunk: 5 rows, 2 a chunk, then nothing more is ingested
    monkeypatch.setattr("service.checkpointer._MERGE_CHUNK", 2)
    db = str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, merge_interval_s=0.3)
    store.ingest(make_snapshot(0, n=5))
    deadline = time.monotonic() + CHECKPOINT_DEADLINE_S
    while _pending(db) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pending(db) == 0
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 5
    con.close()
    store.close()


def test_store_uses_wal_and_bounds_history_exactly(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"), history_max_rows=10)
    for step in range(7):
        store.ingest(make_snapshot(step, n=3))  # 21 rows offered, 10 kept
    assert store.history_rows() == 10
    kept = store.history("blocks.2.w", run_id="r", from_step=0, to_step=99, limit=99)
    assert [r.step for r in kept] == [3, 4, 5, 6]  # ids 12..21 kept: step 3 only for blocks.2
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


# How long ingests stream in the WAL restart test: the checkpointer's cycles are 0.2 s apart
# (plus the copy), so 1.5 s hold several restarts, on a slow machine too.
WAL_STREAM_S = 1.5
# How long the checkpointer may take to copy a commit into the database file: it runs within
# its 0.2 s interval of a commit; 10 s leaves room for a loaded CI machine.
CHECKPOINT_DEADLINE_S = 10.0


def _rows_in_file_alone(db: Path, copy: Path) -> int | None:
    """Parameter rows accepted (merged into history or still pending) in a copy of the database
    file WITHOUT its WAL (what a backup of the .db file alone holds), or None while the copy is
    torn by a checkpoint writing it."""
    copy.write_bytes(db.read_bytes())
    con = sqlite3.connect(copy)
    try:
        return int(con.execute("SELECT (SELECT COUNT(*) FROM history) + "
                               "(SELECT COUNT(*) FROM pending)").fetchone()[0])
    except sqlite3.DatabaseError:
        return None
    finally:
        con.close()


def test_commits_reach_the_database_file_off_the_ingest_thread(tmp_path: Path) -> None:
    # An ingest's commit only appends to the WAL (its connection never checkpoints, which took
    # 30-50% of a large ingest's store time); the store's checkpointer thread copies it into the
    # file.
    db = tmp_path / "s.db"
    store = Store(str(db), history_max_rows=1000)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    statements: list[str] = []  # what the ingest's own connection runs
    store._db.set_trace_callback(statements.append)
    store.ingest(make_snapshot(1, n=3))
    store._db.set_trace_callback(None)
    assert any(s.startswith("COMMIT") for s in statements), statements
    assert not any("checkpoint" in s.lower() for s in statements), statements
    deadline = time.monotonic() + CHECKPOINT_DEADLINE_S
    while (rows := _rows_in_file_alone(db, tmp_path / "copy.db")) != 3 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows == 3
    store.ingest(make_snapshot(2, n=3))
    store.close()  # the checkpointer stops first; the last connection empties the WAL
    assert not (tmp_path / "s.db-wal").exists()
    assert _rows_in_file_alone(db, tmp_path / "copy.db") == 6


def test_the_wal_starts_over_under_a_steady_stream_of_ingests(tmp_path: Path,
                                                              monkeypatch) -> None:
    # Under steady ingests a commit lands during every background copy, so the WAL is never
    # wholly copied when the next transaction begins and never starts over: it grew ~4 GB in
    # 20 s of 500-parameter snapshots before the checkpointer finished its copies under the
    # store's lock. With the WAL cut back to nothing at each restart, every restart shows as a
    # drop of its file size; a WAL that never starts over only grows.

    monkeypatch.setattr(store_module, "_WAL_SIZE_LIMIT", 0)
    store = Store(str(tmp_path / "s.db"), history_max_rows=1_000_000)
    assert store._checkpointer is not None
    store._checkpointer.restart_frames = 256  # 1 MB of pages
    wal, sizes, step = tmp_path / "s.db-wal", [], 0
    deadline = time.monotonic() + WAL_STREAM_S
    while time.monotonic() < deadline:  # ~7 WAL pages a snapshot, ~1000 snapshots a second
        store.ingest(make_snapshot(step, n=2))
        sizes.append(wal.stat().st_size)
        step += 1
        time.sleep(0.001)
    store.close()
    # measured: 8 restarts (largest WAL 4.6 MB); without the copies under the lock 1 (32 MB)
    restarts = sum(1 for before, after in itertools.pairwise(sizes) if after < before)
    assert restarts >= 2, (restarts, max(sizes) / 1e6)


@pytest.mark.parametrize("uri", [False, True])
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_database_file_removed_under_the_store_refuses_writes_instead_of_losing_them(
        tmp_path: Path, how: str, uri: bool) -> None:
    # the store kept writing into the file it had open: every snapshot was acknowledged, and
    # all of them were gone at the next start (nothing logged, /readyz ready); opened by a
    # "file:" URI, it still did
    from service.records import StoreBusy

    db = tmp_path / "s.db"
    store = Store(f"file:{db}" if uri else str(db), history_max_rows=1000)
    store.ingest(make_snapshot(1))
    assert store.ready
    for f in tmp_path.glob("s.db*"):
        f.unlink()
    if how == "replaced":  # another database moved into its place
        Store(str(db), history_max_rows=1000).close()
    with pytest.raises(StoreBusy, match=r"s\.db was removed or replaced while the sidecar ran"):
        store.ingest(make_snapshot(2))
    assert not store.ready  # /readyz answers 503, saying why (it said "no snapshot yet")
    gone = store.file_gone()
    assert gone is not None and "s.db was removed or replaced" in gone
    store.close()


def test_readyz_says_the_database_file_was_replaced_rather_than_no_snapshot_yet(
        tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    db = tmp_path / "s.db"
    token = "t" * 32
    with TestClient(create_app(Settings(token=token, db_path=str(db)))) as client:
        auth = {"Authorization": f"Bearer {token}"}
        assert client.post("/v1/snapshots", json=make_snapshot(1).model_dump(mode="json"),
                           headers=auth).status_code == 201
        assert client.get("/readyz").status_code == 200
        db.rename(tmp_path / "moved.db")
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "s.db was removed or replaced while the sidecar ran" in r.json()["detail"]


def test_a_database_path_that_is_a_directory_is_refused_as_one(tmp_path: Path) -> None:
    # it was refused for "2 hard links" (a directory's link count)
    with pytest.raises(sqlite3.OperationalError,
                       match=rf"^{tmp_path} is a directory: name the database file, e\.g\. "
                             rf"{tmp_path}/orthoshard-sidecar\.db$"):
        Store(str(tmp_path), history_max_rows=1000)


def test_a_database_file_with_another_hard_link_is_refused_before_sqlite_opens_it(
        tmp_path: Path) -> None:
    # a second sidecar on another name of the file took a lock and a WAL of its own: both ran
    # on one file, the index corrupted and the second one's answered snapshots were lost
    db = tmp_path / "a.db"
    first = Store(str(db), history_max_rows=1000)
    first.ingest(make_snapshot(1))
    os.link(db, tmp_path / "b.db")
    for name in ("b.db", "a.db"):
        with pytest.raises(sqlite3.OperationalError, match=r"has 2 hard links"):
            Store(str(tmp_path / name), history_max_rows=1000)
    first.close()
    (tmp_path / "b.db").unlink()
    again = Store(str(db), history_max_rows=1000)  # one name again: it opens
    assert again.ready
    again.close()


def test_a_new_database_and_its_wal_are_readable_by_their_owner_alone(
        tmp_path: Path, caplog) -> None:
    # created by SQLite under the usual umask, they were world-readable: any local user read
    # what the state API guards with its token
    old = os.umask(0o022)  # put back however the test ends
    try:
        store = Store(str(tmp_path / "a.db"), history_max_rows=1000)
        store.ingest(make_snapshot(1))
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        store.close()
    finally:
        os.umask(old)
    assert modes.get("a.db-wal") == 0o600 and set(modes.values()) == {0o600}, modes
    (tmp_path / "a.db").chmod(0o644)  # an existing file keeps its mode, with a warning
    with caplog.at_level("WARNING", logger="orthoshard.sidecar.store"):
        Store(str(tmp_path / "a.db"), history_max_rows=1000).close()
    assert "readable or writable by others" in caplog.text
    assert (tmp_path / "a.db").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_a_uri_that_opens_only_an_existing_file_does_not_create_one(tmp_path: Path,
                                                                    mode: str) -> None:
    # the 0600 file created before SQLite opened the path made a mistyped mode=rw path serve
    # a new empty database
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        Store(f"file:{tmp_path}/typo.db?mode={mode}", history_max_rows=1000)
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_link_in_place_of_the_lock_file_is_refused_and_its_target_kept(tmp_path: Path,
                                                                         link: str) -> None:
    # planted in a shared directory, a symbolic link's target was truncated and overwritten
    # with the sidecar's process id
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (os.symlink if link == "symbolic" else os.link)(victim, tmp_path / "a.db.lock")
    with pytest.raises(sqlite3.OperationalError, match=r"lock file .*a\.db\.lock.*remove it"):
        Store(str(tmp_path / "a.db"), history_max_rows=1000)
    assert victim.read_text() == "keep"
    assert not (tmp_path / "a.db").exists()  # refused before anything was created


# Ingests under a reader of another process: long enough for several RESTART cycles (0.2 s
# apart) with the WAL past its RESTART size.
FOREIGN_READER_S = 2.5


def test_another_process_reading_the_database_does_not_stall_the_writes(tmp_path: Path
                                                                         ) -> None:
    # Its read transaction keeps the WAL from starting over; each RESTART waited out the
    # store's whole write wait for it (1 s) while holding the store's lock, and writes queued
    # behind it were refused (StoreBusy: 503 over HTTP). It now waits RESTART_WAIT_S, then
    # backs off.
    from service.records import StoreBusy

    db = tmp_path / "s.db"
    store = Store(str(db), history_max_rows=1_000_000)
    assert store._checkpointer is not None
    store._checkpointer.restart_frames = 16
    store.ingest(make_snapshot(0, n=50))
    reader = sqlite3.connect(db)  # a backup tool, or a shell left in a transaction
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM history").fetchone()
    refused, step = 0, 1
    deadline = time.monotonic() + FOREIGN_READER_S
    try:
        while time.monotonic() < deadline:
            try:
                store.ingest(make_snapshot(step, n=50))
            except StoreBusy:
                refused += 1
            step += 1
        blocked = store._checkpointer.restarts_blocked
    finally:
        reader.rollback()
        reader.close()
        store.close()
    assert blocked >= 1  # the RESTARTs did meet the reader
    assert refused == 0, (refused, step)


# How long a scrape may take while a commit is stalled: it reads memory only (milliseconds for
# three parameters); 5 s leaves room for a loaded machine, and a scrape that waited for the
# commit would wait until the stall is released, after this deadline.
READ_DEADLINE_S = 5.0


def test_a_scrape_does_not_wait_for_a_stalled_commit(tmp_path: Path) -> None:
    # a slow disk (or the checkpointer finishing a copy) holds up the writers, not the reads of
    # the latest state that /metrics and the state API serve
    store = Store(str(tmp_path / "s.db"), history_max_rows=1000)
    collector = HealthCollector(store, series_ttl_s=600)
    store.ingest(make_snapshot(1))
    entered, release = threading.Event(), threading.Event()
    real = store._write

    def stalled_write(*args: Any) -> None:
        entered.set()
        release.wait(30)
        real(*args)

    store._write = stalled_write  # type: ignore[method-assign]
    writer = threading.Thread(target=store.ingest, args=(make_snapshot(2),))
    writer.start()
    assert entered.wait(30)
    seen: dict[str, Any] = {}
    read = threading.Event()

    def scrape() -> None:
        seen["text"], seen["param"] = collector.render().decode(), store.param("blocks.0.w")
        read.set()

    threading.Thread(target=scrape, daemon=True).start()
    answered = read.wait(READ_DEADLINE_S)
    release.set()
    writer.join(30)
    assert answered
    assert seen["param"].step == 1 and 'param="blocks.0.w"' in seen["text"]  # not the commit
    assert store.param("blocks.0.w").step == 2  # in flight, then committed
    store.close()


def test_a_resent_step_replaces_its_point_and_the_bound_stays_exact(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"), history_max_rows=10)
    for step in (0, 1, 2, 1, 2, 3, 2, 4):  # a restart from step 1, then a retried step 2
        store.ingest(make_snapshot(step, n=2))
    rows = store.history("blocks.0.w", run_id="r", from_step=0, to_step=99, limit=99)
    assert [r.step for r in rows] == [0, 1, 2, 3, 4]
    assert store.history_rows() == 10  # 5 steps x 2 params, nothing repeated
    for step in range(5, 9):
        store.ingest(make_snapshot(step, n=2))
    assert store.history_rows() == 10  # ids stayed contiguous: pruning by id is still exact
    rows = store.history("blocks.0.w", run_id="r", from_step=0, to_step=99, limit=99)
    assert [r.step for r in rows] == [4, 5, 6, 7, 8]
    store.close()


def test_a_database_with_repeated_steps_is_merged_to_one_point_per_step(tmp_path: Path) -> None:
    # the history table and index as the previous version wrote them, a step sent twice
    db = str(tmp_path / "old.db")
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE history (id INTEGER PRIMARY KEY, name TEXT NOT NULL, run_id TEXT NOT NULL,"
        " rank INTEGER NOT NULL, step INTEGER NOT NULL, wall_time REAL NOT NULL, metrics TEXT "
        "NOT NULL);"
        "CREATE INDEX history_by_name ON history (name, run_id, step);"
        "INSERT INTO history VALUES (1, 'w', 'r', 0, 1, 1.0, '{\"e\":0.1}'),"
        " (2, 'w', 'r', 0, 2, 2.0, '{\"e\":0.2}'), (3, 'w', 'r', 1, 2, 3.0, '{\"e\":0.25}'),"
        " (4, 'w', 'r', 1, 3, 4.0, '{\"e\":0.3}'), (5, 'w', 'other', 0, 2, 5.0, '{\"e\":9}');")
    con.close()
    store = Store(db, history_max_rows=3)
    # one point per step, the latest kept; ids renumbered 1..4 in order, so the bound of 3 is
    # exact again, and applied at once: the oldest point goes
    rows = store.history("w", run_id="r", from_step=0, to_step=9, limit=9)
    assert [(r.step, r.rank, r.metrics["e"]) for r in rows] == [(2, 1, 0.25), (3, 1, 0.3)]
    assert store.history_rows() == 3
    store.ingest(make_snapshot(7, n=1))
    assert store.history_rows() == 3
    indexes = {row[1]: row[2] for row in store._db.execute("PRAGMA index_list(history)")}
    assert indexes == {"history_point": 1}  # unique; the earlier index is gone
    store.close()


def test_a_database_the_sidecar_cannot_write_refuses_to_open(tmp_path: Path) -> None:
    # Already in WAL mode with every table in place, such a file only needs reads to open:
    # the store must still find out at start, not answer 500 to every ingest. SQLite's
    # read-only mode is what it falls back to for a file it cannot open for writing (a
    # read-only file or mount, an immutable file), and it binds root as well.
    db = tmp_path / "s.db"
    Store(str(db), history_max_rows=10).close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        Store(f"file:{db}?mode=ro", history_max_rows=10)
    Store(f"file:{db}", history_max_rows=10).close()  # a file: URI names the same database


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("rotation_degrees_L_k1", (0, ("L", "1"))),
        ("rotation_degrees_R_k16", (0, ("R", "16"))),
        ("eigengap_ratio_R", (1, ("R",))),
        ("orthogonality_error", (2, ())),
        ("nonfinite_skips", (3, ())),
        ("update_rms", None),
        ("basis_staleness_L", None),
        ("rotation_degrees_L", None),
    ],
)
def test_health_names_map_generically_to_families(key: str, expected: object) -> None:
    assert classify(key) == expected


def _samples(text: str) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), repr(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )


def test_fast_render_equals_prometheus_client_exposition() -> None:
    store = Store(":memory:", history_max_rows=1000)
    for rank in range(3):
        store.ingest(make_snapshot(7, rank=rank, n=4, run_id=f"r{rank}"))
    weird = make_snapshot(8, rank=0, n=0).model_copy(
        update={"params": {'odd"name\\x': {"orthogonality_error": 1e300}}}
    )
    store.ingest(weird)
    collector = HealthCollector(store, series_ttl_s=60)
    registry = build_registry(collector)
    first, second = collector.render().decode(), collector.render().decode()  # cold, cached
    reference = generate_latest(registry).decode()
    assert _samples(first) == _samples(reference) == _samples(second)
    assert registry.get_sample_value("orthoshard_snapshots_received_total", {"rank": "0"}) == 2
    store.close()


class _ThenIngest:
    """A store's lock that, the first time this thread lets it go, has another thread ingest
    ``snapshot`` and waits until the store's latest state holds it: the moment a rank's new
    run can begin in the middle of a scrape (the ingest's listeners then wait for the scrape,
    as they would)."""

    def __init__(self, store: Store, snapshot: Snapshot) -> None:
        self._inner, self._store, self._snapshot = store._lock, store, snapshot
        self._reader = threading.get_ident()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> bool:
        return self._inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)
        if self.thread is None and threading.get_ident() == self._reader:
            self.thread = threading.Thread(target=self._store.ingest, args=(self._snapshot,))
            self.thread.start()
            deadline = time.monotonic() + 10
            while self._store._ranks[self._snapshot.rank].run_id != self._snapshot.run_id:
                assert time.monotonic() < deadline, "the ingest did not land"
                time.sleep(0.001)


@pytest.mark.parametrize("render", ["fast", "client"])
def test_a_scrape_during_a_ranks_run_switch_keeps_its_parameters(render: str) -> None:
    # the ranks and the parameters were read under two holds of the store's lock: a new run
    # beginning between them gave the old run's rank with the new run's parameters, and the
    # scrape dropped every series of that rank (and forgot their rotation-hold windows)
    store = Store(":memory:", history_max_rows=1000)
    store.ingest(make_snapshot(7, n=3, run_id="old"))
    collector = HealthCollector(store, series_ttl_s=60)
    store._lock = _ThenIngest(store, make_snapshot(0, n=3, run_id="new"))  # type: ignore
    if render == "fast":
        text = collector.render().decode()
    else:
        text = generate_latest(build_registry(collector)).decode()
    switch = store._lock.thread  # type: ignore[attr-defined]
    assert switch is not None
    switch.join(10)
    series = [line for line in text.splitlines()
              if line.startswith("orthoshard_orthogonality_error{")]
    assert len(series) == 3, text
    store.close()


@pytest.mark.tools
def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    store = Store(":memory:", history_max_rows=1000)
    store.ingest(make_snapshot(3, n=2))
    text = HealthCollector(store, series_ttl_s=60).render()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    store.close()


def _rotation_snapshot(step: int, k1: float | None, *, ortho: float = 0.3) -> Snapshot:
    metrics = {"rotation_degrees_L_k1": k1, "rotation_degrees_R_k1": 1.0,
               "orthogonality_error": ortho}  # fmt: skip
    return Snapshot(schema_version=1, run_id="r", rank=0, step=step, wall_time=1e9,
                    params={"w": metrics})  # fmt: skip


def test_rotation_series_hold_their_largest_value_for_the_hold_window() -> None:
    """A one-step spike stays on /metrics for ``rotation_hold_s``; other gauges show the latest."""
    now = [1000.0]
    store = Store(":memory:", history_max_rows=1000, clock=lambda: now[0])
    collector = HealthCollector(store, series_ttl_s=600, rotation_hold_s=30, clock=lambda: now[0])
    registry = build_registry(collector)

    def exported() -> tuple[float | None, float | None, float | None]:
        text = collector.render().decode()
        assert _samples(text) == _samples(generate_latest(registry).decode())  # both paths agree
        get = registry.get_sample_value
        return (get("orthoshard_basis_rotation_degrees", {"param": "w", "factor": "L", "k": "1"}),
                get("orthoshard_basis_rotation_degrees", {"param": "w", "factor": "R", "k": "1"}),
                get("orthoshard_orthogonality_error", {"param": "w"}))  # fmt: skip

    store.ingest(_rotation_snapshot(1, 2.0))
    assert exported() == (2.0, 1.0, 0.3)
    now[0] += 1
    store.ingest(_rotation_snapshot(2, 80.0, ortho=0.2))  # the spike
    for _ in range(29):  # 29 more one-second steps: the spike is still inside the window
        now[0] += 1
        store.ingest(_rotation_snapshot(3, 3.0, ortho=0.1))
        assert exported() == (80.0, 1.0, 0.1)
    now[0] += 1.5  # 30.5 s after the spike: it has left the window, the next largest shows
    assert exported() == (3.0, 1.0, 0.1)
    store.ingest(_rotation_snapshot(4, 2.5))
    assert exported()[0] == 3.0  # an older but larger value inside the window still wins
    now[0] += 31
    assert exported()[0] == 2.5  # a silent series keeps exporting its latest value
    store.ingest(_rotation_snapshot(5, 7.0))
    now[0] += 1
    store.ingest(_rotation_snapshot(6, None))  # non-finite at the source: not held ...
    assert exported()[0] == 7.0  # ... and does not hide the finite values of the window
    now[0] += 31
    store.ingest(_rotation_snapshot(7, None))
    exported_nan = exported()[0]
    assert exported_nan is not None and math.isnan(exported_nan)  # no finite value left
    store.close()


def test_keys_that_come_and_go_leave_no_state_behind_past_the_hold() -> None:
    # one parameter posting new rotation keys each time: the collector kept a label prefix
    # and a hold window for every key ever seen (19,200 after 300 posts; RSS 53 -> 294 MB over
    # 3,000 posts to a real sidecar) while /metrics showed 64 series
    now = [1000.0]
    store = Store(":memory:", history_max_rows=1000, clock=lambda: now[0])
    collector = HealthCollector(store, series_ttl_s=600, rotation_hold_s=30, clock=lambda: now[0])
    for step in range(1, 41):
        now[0] += 1
        keys = {f"rotation_degrees_L_k{step * 32 + j}": float(j) for j in range(32)}
        store.ingest(Snapshot(schema_version=1, run_id="r", rank=0, step=step, wall_time=1e9,
                              params={"w": {**keys, "rotation_degrees_R_k1": 2.0}}))
        text = collector.render().decode()
        assert text.count('param="w"') == 33  # the record's own series, no more
    assert len(collector._prefixes["w"]) == 33
    # windows of keys no longer sent stay for the hold (a key sent every other step keeps its
    # spike held), then go: 30 s of posts, one second apart, plus the latest record's
    assert len(collector._peaks["w"][1]) <= 31 * 32 + 1
    now[0] += 31
    collector.render()
    assert sorted(collector._peaks["w"][1]) == sorted(
        [f"rotation_degrees_L_k{40 * 32 + j}" for j in range(32)] + ["rotation_degrees_R_k1"])
    store.close()


@pytest.mark.parametrize("finish", [False, True], ids=["new-run-id", "finish-then-new-run"])
@pytest.mark.parametrize("scrape_between", [False, True])
def test_a_spike_of_an_earlier_run_is_not_held_in_the_next_runs_series(
        finish: bool, scrape_between: bool) -> None:
    # the windows were keyed by parameter name alone: run b exported run a's 50 degrees for
    # the hold, though it reported 3 (and after a finish only if no scrape came in between)
    now = [1000.0]
    store = Store(":memory:", history_max_rows=1000, clock=lambda: now[0])
    collector = HealthCollector(store, series_ttl_s=600, rotation_hold_s=30, clock=lambda: now[0])
    registry = build_registry(collector)

    def run(run_id: str, step: int, k1: float) -> None:
        store.ingest(Snapshot(schema_version=1, run_id=run_id, rank=0, step=step,
                              wall_time=1e9 + now[0], params={"w": {"rotation_degrees_L_k1": k1}}))

    run("a", 100, 50.0)
    now[0] += 1
    if finish:
        store.finish(0, "a")
    if scrape_between:
        collector.render()
    now[0] += 1
    run("b", 0, 3.0)
    labels = {"param": "w", "factor": "L", "k": "1"}
    assert 'k="1"} 3.0\n' in collector.render().decode()
    assert registry.get_sample_value("orthoshard_basis_rotation_degrees", labels) == 3.0
    now[0] += 1
    run("b", 1, 80.0)
    now[0] += 1
    run("b", 2, 1.0)
    assert 'k="1"} 80.0\n' in collector.render().decode()  # the new run's own spike is held
    store.close()


def test_a_scrape_racing_a_new_parameters_first_snapshot_keeps_its_spike() -> None:
    # render() took its live list before the lock, and forgot the windows of every name not in
    # it: a first snapshot ingested in between lost its spike to the next scrape
    now = [1000.0]
    store = Store(":memory:", history_max_rows=1000, clock=lambda: now[0])
    collector = HealthCollector(store, series_ttl_s=600, rotation_hold_s=30, clock=lambda: now[0])
    store.ingest(Snapshot(schema_version=1, run_id="r", rank=0, step=0, wall_time=1e9,
                          params={"old": {"rotation_degrees_L_k1": 1.0}}))
    live = collector._live
    spike = Snapshot(schema_version=1, run_id="r", rank=1, step=1, wall_time=1e9,
                     params={"new": {"rotation_degrees_L_k1": 80.0}})
    ingest = threading.Thread(target=store.ingest, args=(spike,))

    def live_then_ingest() -> Any:
        out = live()
        ingest.start()  # its listener runs while this scrape is still under way
        ingest.join(timeout=0.5)
        return out

    collector._live = live_then_ingest  # type: ignore[method-assign]
    collector.render()
    ingest.join(timeout=10)
    assert not ingest.is_alive()
    collector._live = live  # type: ignore[method-assign]
    now[0] += 1
    store.ingest(Snapshot(schema_version=1, run_id="r", rank=1, step=2, wall_time=1e9 + 1,
                          params={"new": {"rotation_degrees_L_k1": 1.0}}))
    assert 'param="new",factor="L",k="1"} 80.0\n' in collector.render().decode()
    store.close()


def test_the_collector_forgets_expired_parameters() -> None:
    # parameters come and go (a new run's names, a rank that died): what the collector keeps
    # per parameter (rendered text, label prefixes, rotation windows) must not grow with them
    now = [100.0]
    store = Store(":memory:", history_max_rows=10_000, clock=lambda: now[0])
    collector = HealthCollector(store, series_ttl_s=60, rotation_hold_s=30, clock=lambda: now[0])
    for run in range(5):
        params = {f"run{run}.w{i}": {"rotation_degrees_L_k1": 1.0, "orthogonality_error": 0.1}
                  for i in range(4)}
        store.ingest(Snapshot(schema_version=1, run_id=f"run{run}", rank=0, step=1,
                              wall_time=1e9, params=params))
        assert f'param="run{run}.w3"' in collector.render().decode()
        now[0] += 61  # this run's parameters expire before the next run reports
    assert 'param="run3.' not in collector.render().decode()
    tables = (collector._cache, collector._prefixes, collector._peaks)
    assert [len(table) for table in tables] == [0, 0, 0]
    store.close()


def test_rotation_hold_zero_exports_the_latest_step_only() -> None:
    now = [50.0]
    store = Store(":memory:", history_max_rows=100, clock=lambda: now[0])
    collector = HealthCollector(store, series_ttl_s=600, rotation_hold_s=0, clock=lambda: now[0])
    registry = build_registry(collector)
    store.ingest(_rotation_snapshot(1, 80.0))
    now[0] += 0.5
    store.ingest(_rotation_snapshot(2, 1.0))
    collector.render()
    labels = {"param": "w", "factor": "L", "k": "1"}
    assert registry.get_sample_value("orthoshard_basis_rotation_degrees", labels) == 1.0
    store.close()


@pytest.mark.parametrize("hold", [-1.0, 600.0, math.nan])
def test_settings_refuse_a_rotation_hold_outside_zero_to_the_ttl(hold: float) -> None:
    with pytest.raises(ValueError, match="rotation_hold_s"):
        Settings(token="t" * 32, series_ttl_s=600, rotation_hold_s=hold)


def test_settings_refuse_an_empty_socket_path_in_words_a_cli_user_can_act_on() -> None:
    # "uds must be a socket path or None": None is nothing `orthoshard sidecar --uds` takes
    with pytest.raises(ValueError, match=r"^uds must be a socket path, not empty \(leave it out"):
        Settings(token="t" * 32, uds="")


@pytest.mark.parametrize("path", ["", "file:", "file:?cache=shared", "file://"])
def test_settings_refuse_an_empty_history_path(path: str) -> None:
    # SQLite opens "" (and a file: URI without a path) as a private temporary database: the
    # history was silently not kept, though /readyz said ready and every snapshot got its 201
    with pytest.raises(ValueError, match="db_path must name the history file"):
        Settings(token="t" * 32, db_path=path)
    Settings(token="t" * 32, db_path="file::memory:")  # said in so many words: kept in memory
    Settings(token="t" * 32, db_path="file:x?mode=memory")


@pytest.mark.parametrize("rows", [0, 2**63])
def test_settings_refuse_a_history_cap_sqlite_cannot_hold(rows: int) -> None:
    # 2**63 passed, and the first prune raised OverflowError at start (a traceback, exit 1)
    with pytest.raises(ValueError, match=r"history_max_rows must be in \[1, 9223372036854775807\]"):
        Settings(token="t" * 32, history_max_rows=rows)


@pytest.mark.parametrize(
    "token",
    ["äöü-not-ascii-token-1234", "token with spaces in it", 'quoted"token"1234567890',
     "abc=def0123456789abcdef", "===================="],
)
def test_settings_and_the_token_file_refuse_a_token_no_client_can_send(
    tmp_path: Path, token: str
) -> None:
    with pytest.raises(ValueError, match="RFC 6750"):
        Settings(token=token)
    path = tmp_path / "token"
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    with pytest.raises(ValueError, match=rf"token file {path} has .*RFC 6750") as err:
        read_token_file(path)
    assert token not in str(err.value)  # the secret is not echoed


def test_a_too_short_token_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "short.tok"
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match=rf"token file {path} holds 5 characters, too short"):
        read_token_file(path)


def test_the_tcp_listener_is_a_tcp_socket_so_connections_get_nodelay() -> None:
    # socket.create_server gives proto 0, and asyncio sets TCP_NODELAY on accepted connections
    # only for IPPROTO_TCP: Nagle against the client's delayed ACK added ~40 ms per response
    import socket

    from service.server import _bind_tcp

    sock = _bind_tcp("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM
        with socket.create_connection(sock.getsockname(), timeout=5):
            conn, _ = sock.accept()
            with conn:
                assert conn.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_token_of_rfc_6750_characters_is_accepted(tmp_path: Path) -> None:
    token = "AZaz09-._~+/" + "x" * 8 + "=="
    path = tmp_path / "token"
    path.write_text(f"  {token}\n")
    path.chmod(0o600)
    assert read_token_file(path) == token and Settings(token=token).token == token


# ------------------------------------------------------------------------------ publisher


class Recorder:
    """An httpx transport that records posted bodies and answers with ``status``."""

    def __init__(self, status: int = 201, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        time.sleep(self.delay_s)
        with self.lock:
            self.bodies.append(json.loads(request.content))
        return httpx.Response(self.status, json={})


def publisher(handler: Recorder | None = None, **kw: object) -> Publisher:
    transport = httpx.MockTransport(handler or Recorder())
    return Publisher(token="t" * 32, run_id="run-x", transport=transport, **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_a_large_snapshot_gets_time_to_be_stored() -> None:
    # a fixed 2 s read timeout gave up on a 4.7 MB snapshot the sidecar took 4.1 s to store,
    # and sent it again while the sidecar was still storing the first
    timeouts: list[tuple[dict, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append((request.extensions["timeout"], len(request.content)))
        return httpx.Response(201, json={})

    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), timeout_s=2.0)
    pub.publish(step=0, rank=0, params={"w": {"update_rms": 1.0}})
    big = {f"blocks.{i}.w": {"update_rms": 1.0, "orthogonality_error": 0.5} for i in range(20000)}
    pub.publish(step=1, rank=0, params=big)
    assert pub.close(timeout_s=10)
    (small, small_size), (large, large_size) = timeouts
    assert small["connect"] == small["write"] == large["connect"] == 2.0
    for timeout, size in ((small, small_size), (large, large_size)):
        assert timeout["read"] == 2.0 + size / STORE_BYTES_PER_S
    assert large_size > 4 * STORE_BYTES_PER_S  # so the large one has >= 4 s more to be stored


@pytest.mark.timeout(60)
def test_a_large_snapshot_is_encoded_once_in_pieces(monkeypatch) -> None:
    # json.dumps holds the GIL until it returns: one call on a 20,000-parameter snapshot kept
    # the training thread waiting ~70 ms, and each retry of a sidecar that was down encoded it
    # again. Now every call encodes at most one piece of params (or of the optimizer's state),
    # a retry posts the first attempt's bytes, and the pieces join to the one-call JSON.
    import service.sender as sender

    calls: list[Any] = []
    real_dumps = json.dumps

    def dumps(value: Any, **kw: Any) -> str:
        calls.append(value)
        return real_dumps(value, **kw)

    monkeypatch.setattr(sender.json, "dumps", dumps)
    params = {f"blocks.{i}.w": {"update_rms": i / 7, "orthogonality_error": None}
              for i in range(1000)}
    state = {name: {"shape": [4, 3], "eigenvalues": {"L": [0.5, 0.25]}} for name in params}
    optimizer = {"class_name": "SOAP", "groups": [{"params": list(params)}], "state": state}
    posted: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posted.append(request.content)
        return httpx.Response(503 if len(posted) < 3 else 201, json={})

    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 0.002))
    pub.publish(step=1, rank=0, params=params, optimizer=optimizer, wall_time=5.0)
    assert pub.close(timeout_s=30)
    assert pub.stats.sent == 1 and pub.stats.failures == 2
    assert len(posted) == 3 and posted[0] == posted[1] == posted[2]  # one encoding, sent thrice
    snapshot = {"schema_version": 1, "run_id": "r", "rank": 0, "step": 1, "wall_time": 5.0,
                "params": params, "optimizer": optimizer}
    assert posted[0] == real_dumps(snapshot, separators=(",", ":")).encode()
    def pieces_of(key: str) -> list[dict]:  # the dicts encoded whose entries hold ``key``
        return [v for v in calls if isinstance(v, dict) and v
                and key in (next(iter(v.values())) or {})]

    for key, kind in (("update_rms", "params"), ("eigenvalues", "state")):
        sizes = [len(piece) for piece in pieces_of(key)]
        assert sum(sizes) == len(params)  # once, not once per attempt
        assert max(sizes) == sender._PIECE_ENTRIES[kind] < len(params)


def test_publisher_sends_schema_v1_with_nonfinite_as_null() -> None:
    rec = Recorder()
    pub = publisher(rec)
    opt = {"class_name": "Muon", "groups": [{"hyperparameters": {"lr": 0.02}}]}
    pub.publish(
        step=3,
        rank=1,
        params={
            "a.w": {
                "orthogonality_error": float("nan"),
                "rotation_degrees_L_k1": float("inf"),
                "update_rms": 0.5,
            }
        },
        optimizer=opt,
    )
    assert pub.close(timeout_s=5)
    (body,) = rec.bodies
    Snapshot.model_validate(body)  # what the sidecar accepts
    assert body["params"]["a.w"] == {
        "orthogonality_error": None,
        "rotation_degrees_L_k1": None,
        "update_rms": 0.5,
    }
    assert (body["run_id"], body["step"], body["rank"]) == ("run-x", 3, 1)
    assert pub.stats.sent == 1 and pub.stats.dropped == 0


def test_publisher_sends_integer_likes_as_integers_the_strict_schema_takes() -> None:
    # np.int64 went through float(): 0.0 in an integer field, and the whole snapshot got a 422
    import numpy as np  # matplotlib's dependency, installed with the project

    rec = Recorder()
    pub = publisher(rec)
    opt = {"class_name": "SOAP", "groups": [],
           "state": {"a.w": {"shape": [np.int64(4), np.int64(3)], "owner_rank": np.int64(1),
                             "buffer_norms": {"L": np.float32(2.5)}, "eigenvalues": {}}}}
    pub.publish(step=np.int64(3), rank=np.int64(1), params={"a.w": {"update_rms": np.float32(
        0.5)}}, optimizer=opt)
    assert pub.close(timeout_s=5)
    (body,) = rec.bodies
    Snapshot.model_validate(body)  # what the sidecar accepts
    state = body["optimizer"]["state"]["a.w"]
    assert state["shape"] == [4, 3] and type(state["owner_rank"]) is int
    assert body["params"]["a.w"]["update_rms"] == 0.5 and pub.stats.rejected == 0


class Gate:
    """An httpx handler whose first ``hold`` requests wait (on the sender thread) until
    :meth:`release`, answered with ``statuses`` in turn (an exception instance is raised),
    then 201. Records the successful bodies and the thread of every request."""

    def __init__(self, *, hold: int = 1, statuses: tuple[int | Exception, ...] = ()) -> None:
        self.hold, self.statuses = hold, list(statuses)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.bodies: list[dict] = []
        self.threads: set[int] = set()
        self.calls = 0

    def release(self) -> None:
        self.gate.set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.threads.add(threading.get_ident())
        self.calls += 1
        if self.calls <= self.hold:
            self.entered.set()
            assert self.gate.wait(20), "the test never released the gate"
        if self.statuses:
            answer = self.statuses.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return httpx.Response(answer, json={})
        self.bodies.append(json.loads(request.content))
        return httpx.Response(201, json={})


def gated(handler: Gate, **kw: object) -> Publisher:
    return Publisher(run_id="r", transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
                     backoff_s=(0.001, 0.01), **kw)


def accounted(pub: Publisher) -> bool:
    """Every published snapshot ended exactly one way (after a successful close)."""
    st = pub.stats
    return st.published == st.sent + st.dropped + st.rejected


@pytest.mark.timeout(30)
def test_publisher_drops_the_oldest_when_full_and_counts() -> None:
    handler = Gate()
    pub = gated(handler, queue_size=3)
    pub.publish(step=0, rank=0, params={})
    assert handler.entered.wait(10)  # step 0 is being sent: it holds no place in the queue
    for step in range(1, 10):
        pub.publish(step=step, rank=0, params={})
    handler.release()
    assert pub.close(timeout_s=5) is False  # six were dropped: not all was sent
    assert [b["step"] for b in handler.bodies] == [0, 7, 8, 9]
    assert (pub.stats.published, pub.stats.sent, pub.stats.dropped) == (10, 4, 6)
    assert accounted(pub)


@pytest.mark.timeout(30)
def test_publisher_retries_5xx_and_connection_errors_in_order() -> None:
    handler = Gate(hold=0, statuses=(503, httpx.ConnectError("refused"), 500))
    pub = gated(handler)
    for step in range(5):
        pub.publish(step=step, rank=0, params={})
    assert pub.close(timeout_s=10)
    assert [b["step"] for b in handler.bodies] == [0, 1, 2, 3, 4]
    assert (pub.stats.sent, pub.stats.failures, pub.stats.dropped) == (5, 3, 0)
    assert accounted(pub)


@pytest.mark.timeout(30)
def test_a_failed_send_is_dropped_as_the_oldest_when_newer_ones_filled_the_queue() -> None:
    handler = Gate(statuses=(503,))
    pub = gated(handler, queue_size=2)
    pub.publish(step=0, rank=0, params={})
    assert handler.entered.wait(10)
    pub.publish(step=1, rank=0, params={})
    pub.publish(step=2, rank=0, params={})  # the queue is full while step 0 is in flight
    handler.release()                       # step 0 fails: no room to retry it
    assert pub.close(timeout_s=10) is False  # a send was dropped
    assert [b["step"] for b in handler.bodies] == [1, 2]
    assert (pub.stats.sent, pub.stats.dropped, pub.stats.failures) == (2, 1, 1)
    assert accounted(pub)


@pytest.mark.parametrize("status", [422, 308, 301])
def test_publisher_counts_refusals_and_does_not_retry_4xx_or_redirects(status: int) -> None:
    # a redirect (not followed) stored nothing: it counted as sent
    rec = Recorder(status=status)
    pub = publisher(rec)
    pub.publish(step=1, rank=0, params={})
    pub.close(timeout_s=5)
    assert len(rec.bodies) == 1 and pub.stats.rejected == 1 and pub.stats.sent == 0


@pytest.mark.timeout(30)
def test_a_refusal_repeating_every_step_is_logged_sparingly(caplog) -> None:
    # a wrong token is refused at every step of every rank: the log says so at the 1st, 10th
    # and 100th refusal (with the answer), not 150 times
    pub = publisher(Recorder(status=401), queue_size=200)
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        for step in range(150):
            pub.publish(step=step, rank=0, params={})
        assert pub.close(timeout_s=10) is False  # every snapshot ended refused: none sent
    assert pub.stats.rejected == 150 and accounted(pub)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("HTTP 401" in line for line in lines)
    assert [line.rsplit("; ", 1)[1] for line in lines] == [
        f"{n} snapshots refused so far ({n} with HTTP 401)" for n in (1, 10, 100)]


@pytest.mark.timeout(30)
def test_a_new_kind_of_refusal_is_logged_the_first_time_too(caplog) -> None:
    # refusals were logged by their running total: after two 413s (a snapshot over the
    # limits) the 401s of a rotated token (totals 3 to 8) were never logged
    answers = [httpx.Response(413)] * 2 + [httpx.Response(401)] * 6
    pub = Publisher(run_id="r", transport=httpx.MockTransport(Scripted(snapshots=answers)))
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        for step in range(8):
            pub.publish(step=step, rank=0, params={})
        assert pub.close(timeout_s=10) is False
    lines = [r.getMessage() for r in caplog.records]
    assert [line.rsplit("; ", 1)[1] for line in lines] == [
        "1 snapshots refused so far (1 with HTTP 413)",
        "3 snapshots refused so far (1 with HTTP 401)"], lines
    assert pub.stats.rejected == 8 and accounted(pub)


@pytest.mark.timeout(30)
def test_every_outage_is_logged_with_its_own_count(caplog) -> None:
    # failures were logged by their running total: the second and third outage (totals 4-6,
    # 7-9) logged nothing, and each recovery line gave the running total as that outage's
    down = [httpx.ConnectError("refused")] * 3
    handler = Scripted(snapshots=[*down, httpx.Response(201, json={}), *down,
                                  httpx.Response(201, json={}), *down])
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 0.002))
    with caplog.at_level("INFO", logger="orthoshard.publisher"):
        for step in range(3):
            pub.publish(step=step, rank=0, params={})
            deadline = time.monotonic() + 10
            while pub.stats.sent <= step and time.monotonic() < deadline:
                time.sleep(0.005)
        assert pub.close(timeout_s=10) is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sidecar unreachable (ConnectError: refused); 1 failed sends in a row, 1 in all",
        "sidecar accepting snapshots again after 3 failed sends (3 in all)",
        "sidecar unreachable (ConnectError: refused); 1 failed sends in a row, 4 in all",
        "sidecar accepting snapshots again after 3 failed sends (6 in all)",
        "sidecar unreachable (ConnectError: refused); 1 failed sends in a row, 7 in all",
        "sidecar accepting snapshots again after 3 failed sends (9 in all)"], lines


@pytest.mark.timeout(30)
def test_a_snapshot_pushed_out_of_the_full_queue_is_logged(caplog) -> None:
    # counted as dropped, but nothing said so: a run that lost health to a slow sidecar
    # looked complete in its log
    handler = Gate()
    pub = gated(handler, queue_size=2)
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        pub.publish(step=0, rank=0, params={})
        assert handler.entered.wait(10)  # step 0 is in flight: the queue is empty
        for step in range(1, 5):
            pub.publish(step=step, rank=0, params={})
        handler.release()
        pub.close(timeout_s=10)
    assert pub.stats.dropped == 2 and accounted(pub)
    # logged once, by the sender thread (publish() must not block on a log handler)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["2 snapshots queued (the sidecar takes them slower than they come, "
                     "or is down): the oldest dropped, 2 so far"], lines


@pytest.mark.timeout(30)
def test_snapshots_left_queued_at_the_close_deadline_are_logged(caplog) -> None:
    # counted in stats.dropped, but only a caller who read the stats knew: the log's last
    # word was the sidecar being unreachable
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    pub = Publisher(run_id="r", transport=httpx.MockTransport(refuse), backoff_s=(0.05, 0.1))
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        for step in range(3):
            pub.publish(step=step, rank=0, params={})
        assert pub.close(timeout_s=0.3) is False
    assert pub.stats.dropped == 3 and accounted(pub)
    lines = [r.getMessage() for r in caplog.records if "deadline" in r.getMessage()]
    assert lines == ["close(): 3 snapshot(s) still queued at its deadline, not sent; 3 dropped "
                     "in all"], lines


class _Unreadable:
    """A rank whose ``__index__`` raises what no integer conversion is expected to."""

    def __index__(self) -> int:
        raise RuntimeError("not on this device")


@pytest.mark.timeout(30)
def test_a_rank_that_raises_on_reading_is_queued_counted_and_refused(caplog) -> None:
    # the snapshot was queued before its rank was read and the RuntimeError skipped the count:
    # "publish failed; snapshot dropped" was logged, the snapshot was sent all the same and
    # refused, published 0 against rejected 1, and close() answered True
    pub = publisher()
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        pub.publish(step=1, rank=_Unreadable(), params={})  # type: ignore[arg-type]
        assert pub.close(timeout_s=10) is False
    assert (pub.stats.published, pub.stats.rejected) == (1, 1) and accounted(pub)
    assert not any("publish failed" in r.getMessage() for r in caplog.records)


class Finishes(Gate):
    """A :class:`Gate` that also records the finish requests, answering them ``finish``."""

    def __init__(self, finish: int = 200) -> None:
        super().__init__(hold=0)
        self.finish, self.paths = finish, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if request.url.path.endswith("/finish"):
            self.bodies.append(json.loads(request.content))
            return httpx.Response(self.finish, json={})
        return super().__call__(request)


@pytest.mark.timeout(30)
def test_close_finished_says_each_rank_ended_after_its_last_snapshot() -> None:
    handler = Finishes()
    pub = gated(handler)
    for step, wall in enumerate((100.0, 102.0, 101.0)):  # the latest taken, not the last sent
        pub.publish(step=step, rank=5, params={}, wall_time=wall)
    pub.publish(step=3, rank=1, params={}, wall_time=50.0)
    assert pub.close(timeout_s=10, finished=True)
    assert handler.paths == ["/v1/snapshots"] * 4 + ["/v1/ranks/1/finish", "/v1/ranks/5/finish"]
    assert handler.bodies[-2:] == [{"run_id": "r", "last_wall_time": 50.0},
                                   {"run_id": "r", "last_wall_time": 102.0}]
    # without finished=True (an error path: a crashed rank must still page) nothing is said
    quiet = Finishes()
    other = gated(quiet)
    other.publish(step=0, rank=0, params={})
    assert other.close(timeout_s=10)
    assert quiet.paths == ["/v1/snapshots"]
    with gated(quiet) as third:  # nor by a with-block, which also closes on an exception
        third.publish(step=1, rank=0, params={})
    assert quiet.paths == ["/v1/snapshots"] * 2


@pytest.mark.timeout(30)
def test_close_finished_with_ranks_ends_a_rank_this_process_did_not_publish_for() -> None:
    # a restart that resumed at the last step trained nothing and published nothing, so its
    # close(finished=True) said nothing, and the finished run paged as stale
    handler = Finishes()
    pub = gated(handler)
    pub.publish(step=4, rank=1, params={}, wall_time=7.0)
    assert pub.close(timeout_s=10, finished=True, ranks=(0, 1))
    assert handler.paths == ["/v1/snapshots", "/v1/ranks/0/finish", "/v1/ranks/1/finish"]
    assert handler.bodies[-2:] == [{"run_id": "r", "last_wall_time": None},
                                   {"run_id": "r", "last_wall_time": 7.0}]
    # without finished=True the ranks say nothing (a crashed rank must still page)
    quiet = Finishes()
    assert gated(quiet).close(timeout_s=10, ranks=(0,))
    assert quiet.paths == []
    with pytest.raises(ValueError, match=r"ranks must be ints >= 0"):
        gated(Finishes()).close(timeout_s=1, finished=True, ranks=(-1,))


@pytest.mark.timeout(30)
def test_close_finished_after_a_with_block_still_says_the_run_ended() -> None:
    # the with-block's close() had stopped the sender: close(finished=True) then returned True
    # and posted nothing, so the run's ranks were paged as stale
    handler = Finishes()
    with gated(handler) as pub:
        pub.publish(step=0, rank=3, params={})
    assert handler.paths == ["/v1/snapshots"]
    assert pub.close(timeout_s=10, finished=True) is True
    assert handler.paths == ["/v1/snapshots", "/v1/ranks/3/finish"]
    assert pub.close(timeout_s=10, finished=True) is True  # said once
    assert handler.paths == ["/v1/snapshots", "/v1/ranks/3/finish"]
    refused = Finishes(finish=409)
    with gated(refused) as other:
        other.publish(step=0, rank=1, params={})
    assert other.close(timeout_s=10, finished=True) is False


def _in_child(action: Callable[[], int]) -> int:
    """The exit code of ``action`` run in a forked child: -14 when it hung (killed by an alarm
    after 5 s: pytest-timeout's SIGALRM handler, which the child inherits, never runs while it
    waits in a C-level lock), 4 when it raised."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(5)
        try:
            code = action()
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _publish_and_close(pub: Publisher, *, counts: bool) -> int:
    """A forked child's use of its parent's Publisher: 0 when publish and close returned (close
    False: nothing of the child's is sent), 3 when close said all was sent, 5 when ``counts``
    and the child's own counts are not its one snapshot, dropped (it inherited the parent's,
    which then never added up)."""
    pub.publish(step=10**6, rank=9, params={})
    if pub.close(timeout_s=1, finished=True) is not False:
        return 3
    if counts and (pub.stats.published, pub.stats.dropped, pub.stats.sent) != (1, 1, 0):
        return 5
    return 0


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_neither_hangs_nor_posts_for_the_parent() -> None:
    # a child forked while a parent thread held the publisher's lock waited for ever in
    # publish() (12 of 20 forks); the child now drops what it publishes and posts nothing
    handler = Finishes()
    pub = gated(handler)
    stop = threading.Event()

    def hammer() -> None:
        step = 0
        while not stop.is_set():
            pub.publish(step=step, rank=0, params={})
            step += 1

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for _ in range(10):
            assert _in_child(lambda: _publish_and_close(pub, counts=True)) == 0
    finally:
        stop.set()
        thread.join()
    pub.close(timeout_s=10)  # False when the hammer overflowed the queue
    assert all(body["rank"] == 0 for body in handler.bodies)
    assert not any(path.endswith("/finish") for path in handler.paths)


class _StuckStream:
    """A log stream whose lock a thread holds, as a parent's thread writing a log line holds
    its stream's buffer lock when the process forks (logging renews handler locks at a fork,
    not those of their streams)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            pass

    def flush(self) -> None:
        with self.lock:
            pass


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_childs_publish_returns_while_the_log_stream_is_locked() -> None:
    # the child's one warning went through the handler's flush, on a lock the parent's sender
    # thread held at the fork (logging its queue's overflows): 3-7 children in 300 forks
    # waited for ever in publish()
    pub = gated(Finishes())
    stream = _StuckStream()
    log_handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    logger = logging.getLogger("orthoshard.publisher")
    logger.addHandler(log_handler)
    held, release = threading.Event(), threading.Event()

    def writer() -> None:  # the parent's thread, in the middle of a log line
        with stream.lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(10)
        assert _in_child(lambda: _publish_and_close(pub, counts=False)) == 0
    finally:
        release.set()
        thread.join()
        logger.removeHandler(log_handler)
        pub.close(timeout_s=10)


@pytest.mark.timeout(30)
def test_a_refused_finish_makes_close_report_false(caplog) -> None:
    pub = gated(Finishes(finish=409))
    pub.publish(step=0, rank=2, params={})
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        assert pub.close(timeout_s=10, finished=True) is False
    assert pub.stats.sent == 1 and accounted(pub)
    assert any("rank 2 finished" in r.getMessage() and "409" in r.getMessage()
               for r in caplog.records)


def storage_unavailable(retry_after: int) -> httpx.Response:
    """The sidecar's 503 for a database that cannot take a write (see service.problems)."""
    return httpx.Response(
        503, headers={"Retry-After": str(retry_after)},
        json={"type": "urn:orthoshard:problem:storage-unavailable", "title": "Service "
              "Unavailable", "status": 503, "detail": "The database cannot serve this now."})


class Scripted:
    """An httpx handler answering each path's requests from its script in turn (an exception
    instance is raised), 201 once a script is used up; records every request's path and
    monotonic time."""

    def __init__(self, **scripts: list[httpx.Response | Exception]) -> None:
        self.scripts = {"/v1/" + k.replace("_", "/"): list(v) for k, v in scripts.items()}
        self.calls: list[tuple[str, float]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.url.path, time.monotonic()))
        script = self.scripts.get(request.url.path, [])
        answer = script.pop(0) if script else httpx.Response(201, json={})
        if isinstance(answer, Exception):
            raise answer
        return answer

    def times(self, path: str) -> list[float]:
        return [t for p, t in self.calls if p == path]


#: A hang guard for close()'s deadline, not a speed bound: a close that waited out the pause it
#: was in (30 s) or retried past its deadline takes far longer; one that keeps its deadline
#: returns in about the deadline, plus whatever stall a loaded machine adds.
_DEADLINE_GUARD_S = 10.0
#: Between a deadline check and a clock reading just after it (a scripted handler's): one
#: scheduler preemption on a loaded machine (0.2 ms measured under 4 busy loops on 2 cores);
#: 10 ms is 50x that, and a fifth of the 0.05 s pause an attempt made after a pause past the
#: deadline would come later.
_PREEMPTION_SLACK_S = 0.01


def _record_pauses(pub: Publisher) -> list[float]:
    """The pauses ``pub`` decides on before each retry, in order."""
    pauses: list[float] = []
    decide = pub._pause

    def recorded(backoff: float, retry_after: float | None) -> float:
        pauses.append(decide(backoff, retry_after))
        return pauses[-1]

    pub._pause = recorded  # type: ignore[method-assign]
    return pauses


@pytest.mark.timeout(30)
def test_a_503_retry_after_sets_the_pause_before_the_next_send_up_to_backoff_max(
    caplog: Any,
) -> None:
    # retries came after 0.04, 0.1, ... s whatever the sidecar's Retry-After (30 s for a full
    # disk), logged as an unreachable sidecar
    handler = Scripted(snapshots=[storage_unavailable(1), storage_unavailable(30)])
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 1.5))
    pauses = _record_pauses(pub)
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        pub.publish(step=0, rank=0, params={})
        assert pub.close(timeout_s=20) is True
    # Retry-After: 1, then 30 cut to backoff_s[1]; and each pause really passed before the send
    assert pauses == [1.0, 1.5]
    first, second, third = handler.times("/v1/snapshots")
    assert second - first >= 1.0 and third - second >= 1.5
    assert (pub.stats.sent, pub.stats.failures) == (1, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "sidecar's storage unavailable (HTTP 503, Retry-After 1 s); 1 failed sends in a row, "
        "1 in all"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [429, 408])
def test_a_proxys_rate_limit_is_retried_not_counted_as_a_refusal(status: int) -> None:
    # a rate-limiting proxy in front of the sidecar answered 429: the snapshot was dropped and
    # counted as refused, and so was the finish (close() False, the run paged as stale)
    limited = httpx.Response(status, headers={"Retry-After": "1"}, text="slow down")
    handler = Scripted(snapshots=[limited], ranks_0_finish=[limited])
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 1.5))
    pauses = _record_pauses(pub)
    pub.publish(step=0, rank=0, params={})
    assert pub.close(timeout_s=20, finished=True) is True
    assert pauses[0] == 1.0  # its Retry-After
    assert (pub.stats.sent, pub.stats.rejected, pub.stats.failures) == (1, 0, 1)
    assert [path for path, _ in handler.calls].count("/v1/ranks/0/finish") == 2
    # any other 4xx is a refusal: not sent again
    refused = Scripted(snapshots=[httpx.Response(413, text="too large")])
    pub = Publisher(run_id="r", transport=httpx.MockTransport(refused))
    pub.publish(step=0, rank=0, params={})
    assert pub.close(timeout_s=5) is False
    assert (pub.stats.sent, pub.stats.rejected) == (0, 1) and len(refused.calls) == 1


# What a busy loop would exceed many times over: with backoff from 20 ms doubling to 80 ms, one
# second holds at most ~15 attempts; answered at once, a loop without pauses made thousands.
_BACKOFF_ATTEMPTS_PER_S = 20


@pytest.mark.timeout(30)
def test_a_retry_after_of_zero_keeps_the_backoff() -> None:
    # a proxy's "Retry-After: 0" made the pause 0: the sender and the finish retried back to
    # back (2565 snapshot posts in 1 s)
    for script in ("snapshots", "ranks_0_finish"):
        answers: list[httpx.Response | Exception] = [storage_unavailable(0)] * 1000
        handler = Scripted(**{script: answers})
        pub = Publisher(run_id="r", transport=httpx.MockTransport(handler),
                        backoff_s=(0.02, 0.08))
        pub.publish(step=0, rank=0, params={})
        pub.close(timeout_s=1.0, finished=True)
        attempts = [t for path, t in handler.calls if path == "/v1/" + script.replace("_", "/")]
        assert 2 <= len(attempts) <= _BACKOFF_ATTEMPTS_PER_S, script
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert min(gaps) >= 0.01, script  # half the first backoff, the jitter's lowest


@pytest.mark.timeout(30)
def test_close_ends_a_retry_after_pause_at_its_deadline() -> None:
    handler = Scripted(snapshots=[storage_unavailable(30)])
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 60.0))
    pauses = _record_pauses(pub)
    pub.publish(step=0, rank=0, params={})
    start = time.monotonic()
    assert pub.close(timeout_s=0.5) is False
    assert pauses == [30.0]  # the pause it was in when the deadline came
    assert time.monotonic() - start < _DEADLINE_GUARD_S
    assert len(handler.calls) == 1 and (pub.stats.dropped, pub.stats.failures) == (1, 1)


@pytest.mark.timeout(30)
def test_a_finish_answered_503_or_not_connected_is_sent_again_until_accepted() -> None:
    # a finish answered 503 (the database busy for a moment) was not sent again: close()
    # returned False with most of its time left and the finished rank paged as stale
    handler = Scripted(ranks_0_finish=[storage_unavailable(1), httpx.ConnectError("refused"),
                                       httpx.Response(500, text="proxy error"),
                                       httpx.Response(200, json={})])
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 0.01))
    pub.publish(step=0, rank=0, params={})
    assert pub.close(timeout_s=10, finished=True) is True
    assert [p for p, _ in handler.calls] == ["/v1/snapshots"] + ["/v1/ranks/0/finish"] * 4
    # a refusal is final: the sidecar would refuse it again
    refused = Scripted(ranks_0_finish=[httpx.Response(409, json={})])
    other = Publisher(run_id="r", transport=httpx.MockTransport(refused), backoff_s=(0.001, 0.01))
    other.publish(step=0, rank=0, params={})
    assert other.close(timeout_s=10, finished=True) is False
    assert [p for p, _ in refused.calls] == ["/v1/snapshots", "/v1/ranks/0/finish"]


@pytest.mark.timeout(30)
def test_a_finish_is_sent_when_queued_snapshots_would_take_the_whole_deadline() -> None:
    # snapshots retried after a busy database's Retry-After took close()'s whole deadline, and
    # the finish was never tried: the normal end of a run paged as a stale rank
    handler = Scripted(snapshots=[storage_unavailable(1)] * 100)
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 1.0))
    for step in range(3):
        pub.publish(step=step, rank=0, params={})
    assert pub.close(timeout_s=3.0, finished=True) is False  # snapshots were dropped
    finishes = handler.times("/v1/ranks/0/finish")
    assert len(finishes) == 1 and pub._finish_sent and not pub._finish_failed
    # the snapshots stopped at the deadline less the reserve, then the finish was sent
    snapshots = handler.times("/v1/snapshots")
    assert len(snapshots) >= 2 and snapshots[-1] < finishes[0] < pub._deadline
    assert pub._flush_until == pub._deadline - min(FINISH_RESERVE_S, 3.0 / 2)
    assert (pub.stats.sent, pub.stats.dropped) == (0, 3)


@pytest.mark.timeout(30)
def test_a_snapshot_in_flight_when_close_finishes_leaves_the_finish_its_time() -> None:
    # a snapshot send begun before the finishes' part of the deadline kept its whole timeout
    # (2 s and more) and ran into that part: the finish came too late to be tried again
    slow_s = 2.0  # a snapshot the busy sidecar answers only after this long
    calls: list[tuple[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, time.monotonic()))
        if request.url.path == "/v1/ranks/0/finish":
            return httpx.Response(200, json={})
        if len(calls) == 1:
            return storage_unavailable(1)  # the retry comes after close() was called
        read = request.extensions["timeout"]["read"]
        if read < slow_s:  # as a real transport gives up at its read timeout
            time.sleep(read)
            raise httpx.ReadTimeout("timed out", request=request)
        time.sleep(slow_s)
        return httpx.Response(201, json={})

    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 1.0))
    pub.publish(step=0, rank=0, params={})
    assert pub.close(timeout_s=3.0, finished=True) is False  # the snapshot was dropped
    finish = [t for path, t in calls if path == "/v1/ranks/0/finish"]
    assert len(finish) == 1 and pub._finish_sent and not pub._finish_failed
    # the retry in flight was cut off (read timeout) where the finishes' part began: uncut, it
    # was answered at the deadline, and no finish was tried
    assert (pub.stats.sent, pub.stats.dropped) == (0, 1)


JOIN_SLACK_S = 0.5


@pytest.mark.timeout(30)
def test_a_send_in_flight_when_close_is_called_does_not_keep_the_finish_from_going_out() -> None:
    # a send begun before close(finished=True) keeps its own timeout (httpx cannot shorten it):
    # a large snapshot the sidecar was slow to store used up the finishes' part of the deadline,
    # no finish was posted, and a run that ended normally paged as a stale rank
    slow_s, timeout_s = 2.5, 2.0  # the snapshot's answer comes after close()'s deadline
    started, calls = threading.Event(), []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/finish"):
            calls.append(("finish", time.monotonic(), json.loads(request.content)))
            return httpx.Response(200, json={})
        started.set()
        time.sleep(slow_s)
        calls.append(("snapshot", time.monotonic(), None))
        return httpx.Response(201, json={})

    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler))
    joins: list[float] = []  # when close() would stop waiting for the sender, at each wait
    join = pub._thread.join
    pub._thread.join = lambda t=None: (joins.append(time.monotonic() + t), join(t))[1]
    pub.publish(step=9, rank=0, params={}, wall_time=1234.5)
    assert started.wait(5)
    assert pub.close(timeout_s=timeout_s, finished=True)
    # close() waits for the sender until a second past its deadline, the finishes included
    # (waiting a whole timeout after them would run it to about two seconds past, 3 s); the
    # recorder reads the clock a moment after close() did, a moment a loaded machine can
    # stretch: JOIN_SLACK_S is far below the second the defect added
    assert max(joins) <= pub._deadline + 1.0 + JOIN_SLACK_S
    (finish, snapshot) = sorted(calls, key=lambda c: c[0])
    # posted alongside the snapshot, before its answer, naming the snapshot's wall time so the
    # sidecar keeps the finish when the snapshot lands after it
    assert finish[1] < snapshot[1]
    assert finish[2] == {"run_id": "r", "last_wall_time": 1234.5}
    assert pub._finish_sent and not pub._finish_failed and pub.stats.sent == 1


class _ClosableTransport(httpx.BaseTransport):
    """A handler behind a transport that, as a real one, fails its requests once closed."""

    def __init__(self, handler: Any) -> None:
        self.handler, self.closed = handler, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.handler(request)
        if self.closed:  # a socket closed under the request
            raise httpx.ReadError("Bad file descriptor", request=request)
        return response

    def close(self) -> None:
        self.closed = True


@pytest.mark.timeout(30)
def test_a_finish_sent_alongside_waits_for_the_snapshot_the_sidecar_needs_first() -> None:
    # the snapshot in flight was the run's first the sidecar would store: the finish sent
    # alongside it got 404 (409 for a rank last seen in another run), was not tried again, and
    # the run that ended paged as stale; and closing close()'s own client closed the transport
    # given to the Publisher under the snapshot, which was then lost
    stored, answers = threading.Event(), []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/finish"):
            answers.append(200 if stored.is_set() else 404)
            return httpx.Response(answers[-1], json={})
        time.sleep(2.0)  # past the finishes' part of close()'s deadline (1.5 s into 3 s)
        stored.set()
        return httpx.Response(201, json={})

    transport = _ClosableTransport(handler)
    pub = Publisher(run_id="r", transport=transport, backoff_s=(0.05, 0.2))
    pub.publish(step=0, rank=0, params={})
    assert pub.close(timeout_s=3.0, finished=True)
    assert answers[0] == 404 and answers[-1] == 200 and set(answers[1:-1]) <= {404}
    assert (pub.stats.sent, pub._finish_failed) == (1, False)


@pytest.mark.timeout(30)
def test_a_finish_is_tried_again_only_until_close_deadline(caplog: Any) -> None:
    handler = Scripted(ranks_0_finish=[storage_unavailable(1)] * 100)
    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler), backoff_s=(0.001, 0.05))
    pub.publish(step=0, rank=0, params={})
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        assert pub.close(timeout_s=0.5, finished=True) is False
    assert time.monotonic() - start < _DEADLINE_GUARD_S
    finishes = handler.times("/v1/ranks/0/finish")
    # tried again, every attempt started before the deadline close() set, and the deadline (not
    # the 100 answers scripted) ended the attempts. The handler reads its clock after the sender
    # checked the deadline: a loaded machine put the last reading 0.2 ms past it.
    assert 2 <= len(finishes) < 100 and finishes[-1] < pub._deadline + _PREEMPTION_SLACK_S
    (record,) = caplog.records
    assert record.getMessage().startswith("could not tell the sidecar that rank 0 finished (HTTP "
                                          "503 ")
    assert record.getMessage().endswith("close()'s deadline passed before the next attempt)")

@pytest.mark.timeout(30)
def test_publisher_never_raises_and_close_respects_its_deadline() -> None:
    pub = Publisher(url="http://127.0.0.1:9", run_id="r", timeout_s=0.2, backoff_s=(0.01, 0.05))
    pub.publish(step=1, rank=0, params={"w": {"x": object()}})  # type: ignore[dict-item]
    pub.publish(step=2, rank=0, params={"w": {"x": 1.0}})  # port 9: connection refused
    assert pub.close(timeout_s=0.5) is False  # step 2 was never sent
    # the deadline, not close()'s join timeout, stopped the retrying sender
    assert not pub._thread.is_alive()
    assert pub.stats.rejected == 1 and pub.stats.failures >= 1 and pub.stats.dropped == 1
    assert accounted(pub)


@pytest.mark.timeout(30)
def test_only_integer_steps_and_ranks_are_sent() -> None:
    """2.5 is refused, not filed under step 2's history point; integer-likes (NumPy ints, 0-d
    integer tensors: anything with ``__index__``) are ints."""

    class IntLike:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    rec = Recorder()
    pub = publisher(rec)
    pub.publish(step=2, rank=0, params={"w": {"x": 1.0}})
    pub.publish(step=2.5, rank=0, params={"w": {"x": 9.0}})  # type: ignore[arg-type]
    pub.publish(step=3, rank=0.0, params={"w": {"x": 9.0}})  # type: ignore[arg-type]
    pub.publish(step=IntLike(4), rank=IntLike(1), params={})  # type: ignore[arg-type]
    assert pub.close(timeout_s=5, finished=True) is False  # the non-integers were refused
    assert [(b["step"], b["rank"]) for b in rec.bodies if "params" in b] == [(2, 0), (4, 1)]
    assert (pub.stats.rejected, pub.stats.sent) == (2, 2) and accounted(pub)


# "x\u00b2": Python's \\w takes a superscript digit, the sidecar's validation does not (every
# snapshot was refused); "e\u0301" the other way round (refused here, taken there)
@pytest.mark.parametrize("run_id", ["gpt2/lr=3e-4", "run 7", "sweep-12+warmup", "x" * 129,
                                    "x\u00b2"])
def test_a_run_id_the_sidecar_would_refuse_is_refused_at_construction(
    run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        Publisher(run_id=run_id)
    monkeypatch.setenv("ORTHOSHARD_RUN_ID", run_id)  # the same from the environment
    with pytest.raises(ValueError, match="from the environment"):
        Publisher()
    Publisher(run_id="gpt2_lr-3e-4:seed.1").close()  # the allowed characters
    Publisher(run_id="e\u0301").close()  # a combining mark, which the sidecar takes too
    assert Snapshot(schema_version=1, run_id="e\u0301", rank=0, step=0, wall_time=1.0,
                    params={}).run_id == "e\u0301"


def test_a_publish_after_close_is_counted_as_published_and_dropped() -> None:
    pub = publisher()
    pub.publish(step=1, rank=0, params={})
    assert pub.close(timeout_s=5)
    pub.publish(step=2, rank=0, params={})
    assert (pub.stats.published, pub.stats.sent, pub.stats.dropped) == (2, 1, 1)
    assert accounted(pub)


class _FloatRaises:
    """A value whose ``__float__`` raises, as a tensor of several elements or on the meta
    device does."""

    def __float__(self) -> float:
        raise RuntimeError("a Tensor with 2 elements cannot be converted to Scalar")


def _nested(depth: int) -> dict:
    d: dict = {}
    for _ in range(depth):
        d = {"x": d}
    return d


@pytest.mark.timeout(30)
def test_no_value_stops_the_sender_and_each_bad_one_is_counted_and_logged(caplog) -> None:
    rec = Recorder()
    pub = publisher(rec)
    self_ref: dict = {}
    self_ref["self"] = self_ref
    bad = [
        {"step": float("inf"), "params": {}},  # OverflowError from int()
        {"step": 1, "params": {"w": {"orthogonality_error": _FloatRaises()}}},  # RuntimeError
        {"step": 2, "params": {"w": self_ref}},  # RecursionError
        {"step": 3, "params": {"w": _nested(5000)}},  # RecursionError, deep not cyclic
        {"step": 4, "params": {"w": {"x": object()}}},  # TypeError
    ]
    with caplog.at_level("WARNING", logger="orthoshard.publisher"):
        for item in bad:
            pub.publish(rank=0, **item)  # type: ignore[arg-type]
        for step in range(10, 13):
            pub.publish(step=step, rank=0, params={"w": {"orthogonality_error": 0.1}})
        assert pub.close(timeout_s=5) is False  # the bad ones were refused
    assert [b["step"] for b in rec.bodies] == [10, 11, 12]
    assert (pub.stats.rejected, pub.stats.sent) == (5, 3) and accounted(pub)
    (first,) = [r.getMessage() for r in caplog.records if "step inf" in r.getMessage()]
    assert "not encodable" in first and "TypeError" in first


@pytest.mark.timeout(30)
def test_a_send_that_raises_unexpectedly_is_counted_and_the_sender_goes_on(caplog) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["step"])
        if len(calls) == 1:
            raise RuntimeError("not an httpx.HTTPError")
        return httpx.Response(201, json={})

    pub = Publisher(run_id="r", transport=httpx.MockTransport(handler))
    with caplog.at_level("ERROR", logger="orthoshard.publisher"):
        for step in range(3):
            pub.publish(step=step, rank=0, params={})
        assert pub.close(timeout_s=5) is False  # the one that raised was not sent
    assert calls == [0, 1, 2] and (pub.stats.rejected, pub.stats.sent) == (1, 2)
    assert accounted(pub)
    assert any("step 0 failed unexpectedly" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_publish_never_waits_for_the_sender_and_does_no_io() -> None:
    # The sender is stuck in its first request for the whole loop: if publish ever waited for
    # it (a blocking queue, a synchronous post), the loop would not finish and the timeout
    # fails the test. No clock is read; the cost itself is bench/sidecar.py's figure.
    handler = Gate()
    pub = gated(handler, queue_size=16)
    params = {f"layers.{i}.w": {"orthogonality_error": 0.1, "update_rms": 0.2} for i in range(500)}
    pub.publish(step=0, rank=0, params=params)
    assert handler.entered.wait(10)
    for step in range(1, 200):
        pub.publish(step=step, rank=0, params=params)
    assert (pub.stats.published, pub.stats.dropped, pub.stats.sent) == (200, 199 - 16, 0)
    handler.release()
    assert pub.close(timeout_s=10) is False  # 183 were dropped
    assert [b["step"] for b in handler.bodies] == [0, *range(184, 200)]
    assert threading.get_ident() not in handler.threads and len(handler.threads) == 1
    assert accounted(pub)


# ------------------------------------------------------------------------------ layering


def test_service_and_the_sidecar_cli_never_import_torch_or_optim() -> None:
    code = (
        "import sys, service, service.app, service.server, service.client, service.metrics\n"
        "from orthoshard.cli import build_parser; build_parser().parse_args(['sidecar', "
        "'--token-file', 'x', '--db', 'y'])\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "bad = sorted(top & {'torch', 'optim', 'sharding'})\n"
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_service_sources_do_not_mention_torch_imports() -> None:
    for path in (ROOT / "service").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(
                ("import torch", "from torch", "import optim", "from optim")
            ), f"{path}: {line}"


@pytest.mark.parametrize(("token", "newline_hint"), [
    ("t" * 32 + "\n", True), ("tok en-0123456789abcdef", True), ("ä" * 20, False),
    # outside RFC 6750's token syntax, which the sidecar's own token follows
    ("abcdefgh!ijklmnopq", False), ("abcdefgh=ijklmnopq", False),
])
def test_publisher_refuses_a_token_outside_the_bearer_syntax(token: str,
                                                             newline_hint: bool) -> None:
    # httpx refused the header on every send, logged as an unreachable sidecar, for ever
    with pytest.raises(ValueError, match="a bearer token holds only") as info:
        Publisher(token=token, run_id="r")
    assert token.strip() not in str(info.value)  # the secret is not echoed
    # the hint about a token file's newline only where whitespace is what was refused
    assert ("strip the newline" in str(info.value)) == newline_hint, str(info.value)


def test_torchruns_shared_default_run_id_is_not_taken_for_this_runs(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchrun --master-port (or a static rendezvous) sets TORCHELASTIC_RUN_ID=none for every
    # run: publishing under it wrote each run over the last one's history
    monkeypatch.delenv("ORTHOSHARD_RUN_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert environment_run_id() is None
    with pytest.raises(ValueError, match="ORTHOSHARD_RUN_ID"):
        Publisher()
    Publisher(run_id="r").close()  # an explicit id is used as given
    monkeypatch.setenv("ORTHOSHARD_RUN_ID", "sweep-3")
    assert environment_run_id() == default_run_id() == "sweep-3"
    monkeypatch.delenv("ORTHOSHARD_RUN_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a1b2c3")
    assert default_run_id() == "a1b2c3"


@pytest.mark.parametrize("url", [
    "localhost:9400", "ftp://sidecar:9400", "http://", "sidecar", "http://host:port",
    "http://host:0", "http://host:70000",
    # taken, then every send refused in the background: the API's path pasted in (404 at
    # /v1/v1/snapshots), a query (404), credentials (401: they replaced the bearer token), and
    # a newline that urlsplit drops (httpx.InvalidURL from the constructor, not ValueError)
    "http://127.0.0.1:9400/v1", "http://127.0.0.1:9400/prefix", "http://127.0.0.1:9400?x=1",
    "http://127.0.0.1:9400/#top", "http://user:pass@127.0.0.1:9400", "http://127.0.0.1:420\n77",
    " http://127.0.0.1:9400",
    "http://[::1",  # urlsplit raised its own ValueError ("Invalid IPv6 URL") instead of this
])
def test_publisher_refuses_a_url_it_could_never_post_to(url: str) -> None:
    # refused when built, not retried forever in the background with a log line per failure
    with pytest.raises(ValueError, match=r"^url must be the sidecar's http\(s\)://host\[:port\]"):
        Publisher(url=url)


@pytest.mark.parametrize(("uds", "message"), [
    ("", r"^uds must be the path of the sidecar's Unix socket, got ''"),
    ("/tmp/" + "s" * 103, r"^uds is 108 bytes long; a Unix socket's path holds at most 107"),
    (b"/run/sidecar.sock", r"^uds must be the path of the sidecar's Unix socket"),
])
def test_publisher_refuses_a_socket_path_it_could_never_connect_to(uds: object,
                                                                   message: str) -> None:
    # taken, then every send failed in the background ("Invalid argument", "AF_UNIX path too
    # long"), retried for ever as an unreachable sidecar
    with pytest.raises(ValueError, match=message):
        Publisher(uds=uds, run_id="r")  # type: ignore[arg-type]


def test_a_socket_path_of_107_bytes_is_taken() -> None:
    Publisher(uds="/tmp/" + "s" * 102, run_id="r").close(timeout_s=0.1)


@pytest.mark.parametrize("token", [b"t" * 32, 12345])
def test_publisher_refuses_a_token_that_is_no_str(token: object) -> None:
    # bytes (a token file read in binary mode) raised "a bytes-like object is required, not
    # 'str'", the opposite of the problem; an int raised AttributeError
    with pytest.raises(ValueError, match=r"^token must be a str \(a bytes token: \.decode\(\) "
                                         r"it\), got (bytes|int)$"):
        Publisher(token=token, run_id="r")  # type: ignore[arg-type]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("url", "posted_to"), [
    ("https://sidecar.example.com", "https://sidecar.example.com/v1/snapshots"),  # TLS proxy
    ("http://sidecar-3/", "http://sidecar-3/v1/snapshots"),
    ("http://[::1]:9400", "http://[::1]:9400/v1/snapshots"),
])
def test_a_url_without_a_port_posts_to_the_schemes_port(url: str, posted_to: str) -> None:
    # refused since the port became required, although https://host (443 behind a TLS proxy)
    # and http://host (80) are the sidecar's URL there
    posted: list[str] = []  # without a port in it, a URL's port is its scheme's

    def handler(request: httpx.Request) -> httpx.Response:
        posted.append(str(request.url))
        return httpx.Response(201, json={})

    pub = Publisher(url=url, run_id="r", transport=httpx.MockTransport(handler))
    pub.publish(step=0, rank=0, params={})
    assert pub.close(timeout_s=10) is True
    assert posted == [posted_to]


@pytest.mark.parametrize("timeout_s", [0, 0.0, -1.0, None, math.nan, math.inf, True, "2",
                                       1e10])
def test_publisher_refuses_a_timeout_no_send_could_meet(timeout_s: object) -> None:
    # 0, a negative, None or NaN timeout was taken and failed every send in the background;
    # so did one past the platform's timers (1e10 s: OverflowError in every send)
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds > 0 and <= "
                                         r"86400"):
        Publisher(run_id="r", timeout_s=timeout_s)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "message"), [
    ({"queue_size": "64"}, r"queue_size must be an int >= 1, got '64'"),  # was a TypeError
    ({"queue_size": 0}, r"queue_size must be an int >= 1"),
    ({"backoff_s": 5}, r"backoff_s must be \(first, max\) seconds"),  # was a TypeError
    ({"backoff_s": (0.05,)}, r"backoff_s must be"),  # was an IndexError
    # the pause doubled without a bound: after an outage the sender could wait for hours
    ({"backoff_s": (0.05, math.inf)}, r"backoff_s must be .* <= 86400"),
    ({"backoff_s": (0.0, 1.0)}, r"backoff_s must be .*0 < first <= max"),
])
def test_publisher_refuses_a_queue_or_backoff_it_cannot_use(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Publisher(run_id="r", **kw)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout_s", [math.inf, 1e10, math.nan, -1.0, "5"])
def test_close_refuses_a_deadline_it_cannot_keep_and_closes_after_a_good_one(
        timeout_s: object) -> None:
    # inf and 1e10 raised OverflowError from the thread's join, NaN a ValueError, all with the
    # Publisher half-closed (its sender told to stop, nothing flushed or counted)
    handler = Recorder()
    pub = publisher(handler)
    pub.publish(step=0, rank=0, params={"w": {"update_rms": 1.0}})
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds >= 0"):
        pub.close(timeout_s)  # type: ignore[arg-type]
    assert pub.close(timeout_s=10) is True
    assert len(handler.bodies) == 1 and accounted(pub)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [401, 422])
def test_close_reports_false_when_the_sidecar_refused_snapshots(status: int) -> None:
    # a wrong token refused every snapshot, and close() still said all was sent
    pub = publisher(Recorder(status=status))
    pub.publish(step=0, rank=0, params={"w": {"orthogonality_error": 0.1}})
    assert pub.close(timeout_s=10) is False
    assert pub.stats.rejected == 1 and pub.stats.sent == 0 and accounted(pub)


@pytest.mark.timeout(30)
def test_close_reports_false_when_a_full_queue_dropped_snapshots() -> None:
    gate = Gate()
    pub = gated(gate, queue_size=1)
    pub.publish(step=0, rank=0, params={})
    assert gate.entered.wait(10)  # step 0 is being sent
    pub.publish(step=1, rank=0, params={})
    pub.publish(step=2, rank=0, params={})  # pushes step 1 out of the full queue
    gate.release()
    assert pub.close(timeout_s=10) is False
    assert (pub.stats.sent, pub.stats.dropped) == (2, 1) and accounted(pub)
    ok = publisher()
    ok.publish(step=0, rank=0, params={})
    assert ok.close(timeout_s=10) is True


def timed_snapshot(step: int, wall: float, run_id: str = "r", orth: float = 0.0) -> Snapshot:
    """``make_snapshot`` taken at trainer time ``wall``, every orthogonality error ``orth``."""
    s = make_snapshot(step, run_id=run_id)
    params = {n: {**m, "orthogonality_error": orth} for n, m in s.params.items()}
    return s.model_copy(update={"wall_time": wall, "params": params})


def test_a_late_older_snapshot_neither_replaces_the_latest_state_nor_counts(
    tmp_path: Path,
) -> None:
    # a sidecar paused then resumed stored abandoned older requests after newer ones: the
    # latest step went 48 -> 21 and snapshots_received counted the retries again
    store = Store(str(tmp_path / "s.db"), history_max_rows=1000, clock=lambda: 5.0)
    snap = timed_snapshot
    store.ingest(snap(20, wall=100.0))
    store.ingest(snap(48, wall=128.0, orth=0.48))
    # taken before step 48, arriving after it; then a late retry of a stored step, of which
    # history keeps the point it has (the answer said every parameter was stored)
    assert store.ingest(snap(21, wall=101.0, orth=0.21)) == 3  # its 3 parameters
    assert store.ingest(snap(20, wall=100.0, orth=0.99)) == 0
    (rank,) = store.ranks()
    assert (rank.step, rank.wall_time, rank.snapshots_received) == (48, 128.0, 2)
    assert store.param("blocks.0.w").step == 48  # type: ignore[union-attr]
    points = store.history("blocks.0.w", run_id="r", from_step=0, to_step=99, limit=10)
    # step 21 was new in history; step 20 kept its point
    assert [(p.step, p.metrics["orthogonality_error"]) for p in points] == \
        [(20, 0.0), (21, 0.21), (48, 0.48)]
    # a resumed run re-sends step 30 taken later: it is the latest again, and counted
    store.ingest(snap(30, wall=200.0, orth=0.3))
    assert (store.ranks()[0].step, store.ranks()[0].snapshots_received) == (30, 3)
    # a new run id (an elastic restart under a new id) starts at a low step: the latest too
    store.ingest(snap(1, wall=50.0, run_id="r2"))
    assert (store.ranks()[0].run_id, store.ranks()[0].step) == ("r2", 1)
    store.close()


@pytest.mark.parametrize("merge_interval_s", [0.0, 3600.0], ids=["merged", "still-pending"])
def test_a_late_snapshot_of_a_run_the_rank_left_does_not_take_it_back(
    tmp_path: Path, merge_interval_s: float
) -> None:
    # a delayed retry of run A's step 8, arriving after run B began, made A the rank's latest
    # run again (its old values on /metrics) and refused B's finish with 409
    db = ":memory:" if merge_interval_s == 0.0 else str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, clock=lambda: 5.0, merge_interval_s=merge_interval_s)
    snap = timed_snapshot
    for step in range(10):
        store.ingest(snap(step, wall=100.0 + step, run_id="A", orth=step / 10))
    for step in range(3):
        store.ingest(snap(step, wall=150.0 + step, run_id="B"))
    store.ingest(snap(8, wall=108.0, run_id="A", orth=0.8))  # late: taken before B's steps
    (rank,) = store.ranks()
    assert (rank.run_id, rank.step, rank.snapshots_received) == ("B", 2, 13)
    assert store.param("blocks.0.w").run_id == "B"  # type: ignore[union-attr]
    assert store.finish(0, "B").finished_at == 5.0
    points = store.history("blocks.0.w", run_id="A", from_step=8, to_step=8, limit=5)
    assert [(p.step, p.wall_time) for p in points] == [(8, 108.0)]
    # known by the run, not by a parameter's points: a late snapshot without parameters (a
    # rank owning no matrix) or with one A never reported took the rank back to A
    store.ingest(snap(9, wall=109.0, run_id="A").model_copy(update={"params": {}}))
    other = snap(7, wall=107.0, run_id="A")
    store.ingest(other.model_copy(update={"params": {"never.seen": other.params["blocks.0.w"]}}))
    assert (store.ranks()[0].run_id, store.ranks()[0].step) == ("B", 2)
    # a run never seen before takes over whatever its clock says (another host's clock)
    store.ingest(snap(0, wall=1.0, run_id="C"))
    assert (store.ranks()[0].run_id, store.ranks()[0].step) == ("C", 0)
    store.close()


def test_a_run_left_is_known_after_its_points_are_pruned_and_after_a_restart(
        tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store = Store(path, history_max_rows=5, clock=lambda: 5.0, merge_interval_s=0.0)
    store.ingest(timed_snapshot(5, wall=100.0, run_id="A"))
    store.ingest(timed_snapshot(1, wall=110.0, run_id="B"))
    for step in range(2, 6):  # B's points prune every one of A's (5 rows kept)
        store.ingest(timed_snapshot(step, wall=110.0 + step, run_id="B"))
    assert not store.history("blocks.0.w", run_id="A", from_step=0, to_step=9, limit=9)
    store.close()
    store = Store(path, history_max_rows=5, clock=lambda: 5.0, merge_interval_s=0.0)
    store.ingest(timed_snapshot(4, wall=104.0, run_id="A"))  # late, after A's rows are gone
    assert (store.ranks()[0].run_id, store.ranks()[0].step) == ("B", 5)
    store.close()


@pytest.mark.parametrize("merge_interval_s", [0.0, 3600.0], ids=["merged", "still-pending"])
def test_a_late_point_of_a_resumed_run_replaces_the_crashed_attempts_point(
    tmp_path: Path, merge_interval_s: float
) -> None:
    # history kept the crashed attempt's point of a step the resumed run took again, when the
    # resumed run's request for it arrived after its next step's (ON CONFLICT DO NOTHING); with
    # that point still in ``pending`` a later merge would also have written it over the new one
    db = ":memory:" if merge_interval_s == 0.0 else str(tmp_path / "s.db")
    store = Store(db, history_max_rows=1000, merge_interval_s=merge_interval_s or 2.0)

    def snap(step: int, wall: float, orth: float) -> Snapshot:
        return Snapshot(schema_version=1, run_id="r", rank=0, step=step, wall_time=wall,
                        params={"w": {"orthogonality_error": orth}})

    def points() -> list[tuple[int, int, float, float | None]]:
        history = store.history("w", run_id="r", from_step=0, to_step=9, limit=10)  # merges
        ids = {step: row_id for row_id, step in store._db.execute("SELECT id, step FROM history")}
        return [(ids[p.step], p.step, p.wall_time, p.metrics["orthogonality_error"])
                for p in history]

    for step in (1, 2, 3):  # the first attempt, then a crash
        store.ingest(snap(step, float(step), 0.1 * step))
    store.ingest(snap(3, 11.0, 9.3))  # resumed from step 1: its step 3 arrives first
    store.ingest(snap(2, 10.0, 9.2))  # then its step 2, late (lower step, taken earlier)
    assert points() == [(1, 1, 1.0, 0.1), (2, 2, 10.0, 9.2), (3, 3, 11.0, 9.3)]
    store.ingest(snap(2, 2.0, 0.25))  # a point taken before the stored one changes nothing
    assert points() == [(1, 1, 1.0, 0.1), (2, 2, 10.0, 9.2), (3, 3, 11.0, 9.3)]
    (rank,) = store.ranks()
    assert (rank.step, rank.wall_time, rank.snapshots_received) == (3, 11.0, 3)
    assert store.param("w").step == 3  # type: ignore[union-attr]
    store.close()


def test_within_a_run_a_higher_step_taken_earlier_still_replaces_the_latest_state(
        tmp_path: Path) -> None:
    # the documented trade: a rank whose clock steps back keeps its latest state moving (read
    # as late, its steps would freeze it and page as stale), so a crashed attempt's step 9
    # arriving after its resumed run's step 8 shows until the resumed run's step 9 replaces it
    store = Store(str(tmp_path / "s.db"), history_max_rows=1000, clock=lambda: 5.0)
    snap = timed_snapshot
    for step in range(10):
        store.ingest(snap(step, wall=100.0 + step, orth=step / 100))
    store.ingest(snap(10, wall=50.0, orth=0.5))  # the clock stepped back 60 s
    assert (store.ranks()[0].step, store.ranks()[0].snapshots_received) == (10, 11)
    for step in (7, 8):  # resumed at step 7, later
        store.ingest(snap(step, wall=200.0 + step, orth=1.0 + step))
    store.ingest(snap(9, wall=109.0, orth=0.09))  # the crashed attempt's, held up till now
    (rank,) = store.ranks()
    assert (rank.step, rank.snapshots_received) == (9, 14)
    store.ingest(snap(9, wall=209.0, orth=10.0))
    points = store.history("blocks.0.w", run_id="r", from_step=9, to_step=9, limit=5)
    assert [(p.wall_time, p.metrics["orthogonality_error"]) for p in points] == [(209.0, 10.0)]
    assert store.param("blocks.0.w").metrics["orthogonality_error"] == 10.0  # type: ignore[union-attr]
    store.close()


def test_a_snapshot_is_stamped_received_when_its_write_turn_comes() -> None:
    now = [1.0]
    store = Store(":memory:", history_max_rows=1000, clock=lambda: now[0])
    store.ingest(make_snapshot(1))
    with store._db_lock:  # another write in progress
        waiting = threading.Thread(target=store.ingest, args=(make_snapshot(2),))
        waiting.start()
        time.sleep(0.1)  # it waits for its turn (up to WRITE_WAIT_S)
        now[0] = 2.0
    waiting.join(10)
    (rank,) = store.ranks()
    assert (rank.step, rank.received_at) == (2, 2.0)  # was 1.0: stamped before the wait
    store.close()


def _run_script(script: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter that imports this checkout (for what only
    happens at interpreter exit)."""
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})


# What the exit hook may take beyond EXIT_FLUSH_S: joins that return at its deadline, and
# the log lines; close()'s second of grace per Publisher was what it took before.
EXIT_HOOK_SLACK_S = 0.5


@pytest.mark.timeout(60)
def test_the_exit_flush_keeps_its_deadline_for_all_publishers_and_counts_sends_in_flight(
    tmp_path: Path,
) -> None:
    # each Publisher not closed got close()'s second of grace on top of the shared 1.5 s (5 of
    # them held a stalled sidecar's script 6.6 s at exit), and a snapshot in flight at the
    # deadline was not counted as lost (no warning)
    script = tmp_path / "stalled.py"
    script.write_text(
        "import atexit, json, time, httpx\n"
        "marks = {}\n"
        "atexit.register(lambda: print(json.dumps(time.monotonic() - marks['exit'])))\n"
        "from service.client import EXIT_FLUSH_S, Publisher\n"
        "atexit.register(lambda: marks.update(exit=time.monotonic()))  # runs first\n"
        "def stalled(request):\n"
        "    time.sleep(30)\n"
        "    return httpx.Response(201, json={})\n"
        "pubs = [Publisher(run_id=f'r{i}', transport=httpx.MockTransport(stalled))\n"
        "        for i in range(3)]\n"
        "for pub in pubs:\n"
        "    pub.publish(step=1, rank=0, params={})\n"
        "time.sleep(0.2)  # each send under way\n"
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    from service.client import EXIT_FLUSH_S

    assert json.loads(out.stdout.strip().splitlines()[-1]) < EXIT_FLUSH_S + EXIT_HOOK_SLACK_S
    for i in range(3):
        assert f"1 snapshot(s) of run r{i} not sent" in out.stderr, out.stderr


@pytest.mark.timeout(60)
def test_snapshots_queued_at_exit_are_sent_without_close_and_publishers_are_not_kept(
    tmp_path: Path,
) -> None:
    # the sender is a daemon thread: a script that forgot close() delivered 1 of 30 snapshots
    script = tmp_path / "forgets_close.py"
    script.write_text(
        "import atexit, gc, json, time, weakref, httpx\n"
        "got = []\n"
        # registered before the client's hook, so it runs after it (atexit runs in reverse)
        "atexit.register(lambda: print(json.dumps(sorted(got))))\n"
        "from service.client import Publisher\n"
        "def handler(request):\n"
        "    time.sleep(0.005)\n"
        "    got.append(json.loads(request.content)['step'])\n"
        "    return httpx.Response(201, json={})\n"
        "gone = Publisher(run_id='r', transport=httpx.MockTransport(handler))\n"
        "ref = weakref.ref(gone); gone.close(); del gone; gc.collect()\n"
        "assert ref() is None, 'the exit hook kept a Publisher alive'\n"
        "pub = Publisher(run_id='r', transport=httpx.MockTransport(handler))\n"
        "for step in range(30):\n"
        "    pub.publish(step=step, rank=0, params={})\n"
    )
    out = _run_script(script)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == list(range(30))


# --- the lock file (service.lockfile): the sidecar's database, a job's checkpoint directory ---


def test_a_filesystem_without_flock_is_named_and_leaks_no_descriptor(tmp_path, monkeypatch):
    # an OSError other than "held" (Lustre without -o flock: ENOLCK) escaped as a traceback
    # and left the lock file open
    import errno

    from service import lockfile

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lockfile.fcntl, "flock", no_flock)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(lockfile.LockFileError, match=r"cannot lock its lock file .*No locks") \
            as raised:
        lockfile.hold(str(tmp_path / "x.lock"), "me")
    assert raised.value.unsupported
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_shared_lock_file_follows_the_umask_and_takes_hard_links_without_writing(tmp_path):
    # a team directory: created 0600, the lock kept another member of the group from
    # resuming; a hard-link snapshot of the directory (cp -al) made it unusable
    from service import lockfile

    old = os.umask(0o002)
    try:
        fd = lockfile.hold(str(tmp_path / "JOB.lock"), "job one", shared=True)
    finally:
        os.umask(old)
    assert (tmp_path / "JOB.lock").stat().st_mode & 0o777 == 0o664
    lockfile.release(fd)
    os.link(tmp_path / "JOB.lock", tmp_path / "snapshot.lock")
    fd = lockfile.hold(str(tmp_path / "JOB.lock"), "job two", shared=True)
    try:
        assert (tmp_path / "snapshot.lock").read_text() == "job one\n"  # not written over
        with pytest.raises(lockfile.LockHeld):  # still a lock
            lockfile.hold(str(tmp_path / "JOB.lock"), "job three", shared=True)
    finally:
        lockfile.release(fd)
    # the sidecar's own lock stays strict
    with pytest.raises(lockfile.LockFileError, match="2 hard links"):
        lockfile.hold(str(tmp_path / "JOB.lock"), "sidecar")

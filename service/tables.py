"""The store's SQLite tables: their schema, the migration of a database written by an earlier
version, and the statements that load, write, merge and prune their rows. Every function runs
on the store's connection inside the caller's transaction (or, for the reads, under its
connection lock); :class:`service.store.Store` decides when.

Tables: ``ranks`` (one row per rank; ``finished_at`` is set when the rank says its run ended
and cleared by its next snapshot, unless that one was taken before the rank said so:
``finished_wall_time``), ``pending`` (the parameters' rows of accepted snapshots not
merged yet), ``params`` (one row per parameter name) and ``history`` (one row per parameter,
run and step; the oldest rows beyond ``history_max_rows`` are pruned at each merge, and a
history read merges first, so the bound is exact).

A step can arrive twice in one run: an elastic restart resumes from a checkpoint under the same
run id and re-sends the steps after it, and the publisher re-sends a snapshot whose answer timed
out although the sidecar had committed it. The re-sent point replaces the earlier one (an upsert
on ``(name, run_id, step)``), so history has one point per step and paging by step is exact. The
row keeps its id, so ids stay contiguous and pruning by id keeps exactly ``history_max_rows``.
A snapshot taken before its rank's latest (same run, lower step, earlier wall time: a request
that waited, or a retry, arriving after newer ones; or, with an earlier wall time, of a run the
rank reported before its latest, as ``rank_runs`` records them) only adds the points history
lacks or holds from an earlier wall time (the crashed attempt's, when a resumed run's request
arrives late; the row keeps its id as above); the latest state and the rank's count stay those
of the newer snapshot.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from typing import Any

from service.records import ParamRecord, RankRecord
from service.schema import Snapshot

_HISTORY_TABLE = """CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, run_id TEXT NOT NULL, rank INTEGER NOT NULL,
    step INTEGER NOT NULL, wall_time REAL NOT NULL, metrics TEXT NOT NULL)"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ranks (
    rank INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL,
    wall_time REAL NOT NULL, received_at REAL NOT NULL, snapshots_received INTEGER NOT NULL,
    optimizer TEXT, finished_at REAL, finished_wall_time REAL);
CREATE TABLE IF NOT EXISTS params (
    name TEXT PRIMARY KEY, run_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL,
    wall_time REAL NOT NULL, received_at REAL NOT NULL, metrics TEXT NOT NULL, state TEXT);
{_HISTORY_TABLE};
CREATE TABLE IF NOT EXISTS rank_runs (
    rank INTEGER NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (rank, run_id));
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, run_id TEXT NOT NULL, rank INTEGER NOT NULL,
    step INTEGER NOT NULL, wall_time REAL NOT NULL, received_at REAL NOT NULL,
    metrics TEXT NOT NULL, state TEXT);
"""
_HISTORY_COLUMNS = "name, run_id, rank, step, wall_time, metrics"
_PARAM_COLUMNS = "name, run_id, rank, step, wall_time, received_at, metrics, state"
#: The unique index that makes a re-sent step an upsert; created by :func:`migrate` because a
#: database of an earlier version may first need its repeated steps merged.
_POINT_INDEX = "history_point"
#: Recorded in ``PRAGMA user_version`` at every start (databases of earlier versions hold 0).
#: 1: one history row per (name, run_id, step).
FORMAT_VERSION = 1
_RANK_COLUMNS = ("rank, run_id, step, wall_time, received_at, snapshots_received, optimizer, "
                 "finished_at, finished_wall_time")

# One encoder for every row: json.dumps with options builds a new encoder per call (2x slower).
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _dumps(value: Any) -> str | None:
    return None if value is None else _ENCODER.encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


#: Columns added by :func:`migrate` to databases of earlier versions (absent there).
_MIGRATED_COLUMNS = {"ranks": {"finished_at", "finished_wall_time"}}


@functools.cache
def _schema_columns() -> dict[str, set[str]]:
    """Each table of :data:`SCHEMA` with its columns."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                              "'table'")]
        return {name: {row[1] for row in db.execute(f"PRAGMA table_info({name})")}
                for name in names}
    finally:
        db.close()


def check_ours(db: sqlite3.Connection) -> None:
    """Refuse, before anything is written to it, a database this sidecar did not write: a
    SQLite file of another program (tables of its own, or tables named as these without their
    columns) or one written by a newer format. An empty database is new. A mistyped ``--db``
    naming another program's database took it over: it gained these tables and WAL mode, and
    lost its ``user_version``.

    Raises:
        sqlite3.DatabaseError: naming what does not fit (not a SQLite file at all: SQLite's
            own error, on the first read).
    """
    version = db.execute("PRAGMA user_version").fetchone()[0]
    found = {row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if version > FORMAT_VERSION:
        raise sqlite3.DatabaseError(
            f"it was written by a newer sidecar (format {version}; this one reads up to "
            f"{FORMAT_VERSION}): run that version, or start this one with a new --db")
    ours = _schema_columns()
    foreign = sorted(found - set(ours))
    unlike = sorted(name for name in found & set(ours) if not (
        ours[name] - _MIGRATED_COLUMNS.get(name, set()) <= {
            row[1] for row in db.execute(f"PRAGMA table_info({name})")}))
    if foreign or unlike:
        raise sqlite3.DatabaseError(
            f"it is not a sidecar's database (tables {', '.join(foreign + unlike)} are not "
            f"this sidecar's): it was left as it was; give the sidecar a --db of its own")


def check_intact(db: sqlite3.Connection) -> None:
    """Refuse a damaged database by name.

    Raises:
        sqlite3.DatabaseError: ``PRAGMA quick_check`` found damage.
    """
    # A damaged file opens and even takes writes, then fails every read of the damaged
    # pages (history answers 500, acknowledged snapshots stay unmerged) and the next start.
    # quick_check reads every page once (O(file), without the index cross-checks of
    # integrity_check): it is refused here instead, by name.
    problems = [" ".join(str(row[0]).split()) for row in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(
            f"the database is damaged (sqlite quick_check: {' / '.join(problems)}); restore "
            "it from a backup, or move it aside and start with a new --db")


def migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to this schema (in place, inside
    the caller's transaction)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(ranks)")}
    for column in ("finished_at", "finished_wall_time"):
        if column not in columns:
            db.execute(f"ALTER TABLE ranks ADD COLUMN {column} REAL")
    if _POINT_INDEX not in {row[1] for row in db.execute("PRAGMA index_list(history)")}:
        _merge_repeated_steps(db)
        db.execute(f"CREATE UNIQUE INDEX {_POINT_INDEX} ON history (name, run_id, step)")
        db.execute("DROP INDEX IF EXISTS history_by_name")  # the earlier, non-unique one
    # runs reported before rank_runs existed: each rank's latest (the runs they left are
    # known by their points in history, see superseded)
    db.execute("INSERT OR IGNORE INTO rank_runs (rank, run_id) SELECT rank, run_id FROM ranks")


def _merge_repeated_steps(db: sqlite3.Connection) -> None:
    """Earlier versions appended a re-sent step as another row: keep the latest row of each
    (name, run_id, step), as the upsert now does. The table is rebuilt in id order so that
    ids are contiguous again (the exact retention bound prunes by id)."""
    repeated = db.execute(
        "SELECT 1 FROM history GROUP BY name, run_id, step HAVING COUNT(*) > 1 LIMIT 1"
    ).fetchone()
    if repeated is None:
        return
    db.execute("ALTER TABLE history RENAME TO history_before_merge")
    db.execute("DROP INDEX IF EXISTS history_by_name")
    db.execute(_HISTORY_TABLE)
    db.execute(
        f"INSERT INTO history ({_HISTORY_COLUMNS}) SELECT {_HISTORY_COLUMNS} FROM "
        "history_before_merge WHERE id IN (SELECT MAX(id) FROM history_before_merge "
        "GROUP BY name, run_id, step) ORDER BY id"
    )
    db.execute("DROP TABLE history_before_merge")


def load(db: sqlite3.Connection) -> tuple[dict[int, RankRecord], dict[str, ParamRecord]]:
    """The records of the ``ranks`` and ``params`` tables, then of the rows still in
    ``pending`` (accepted after the last merge), in the order they arrived."""
    ranks: dict[int, RankRecord] = {}
    params: dict[str, ParamRecord] = {}
    for rank, run, step, wall, received, count, opt, finished, last in db.execute(
        f"SELECT {_RANK_COLUMNS} FROM ranks"
    ):
        ranks[rank] = RankRecord(
            rank, run, step, wall, received, count, _loads(opt), finished, last
        )
    # the merged rows, then those accepted after the last merge (newer), as they arrived
    for query in (f"SELECT {_PARAM_COLUMNS} FROM params",
                  f"SELECT {_PARAM_COLUMNS} FROM pending ORDER BY id"):
        for name, run, rank, step, wall, received, metrics, state in db.execute(query):
            params[name] = ParamRecord(
                name, run, rank, step, wall, received, json.loads(metrics), _loads(state)
            )
    return ranks, params


def write(db: sqlite3.Connection, r: RankRecord, records: list[ParamRecord]) -> None:
    """The rank's row, and the parameters' rows appended to ``pending`` (merged into
    ``history`` and ``params`` by :func:`merge_pending`)."""
    db.execute(
        f"INSERT OR REPLACE INTO ranks ({_RANK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            r.rank,
            r.run_id,
            r.step,
            r.wall_time,
            r.received_at,
            r.snapshots_received,
            _dumps(r.optimizer),
            r.finished_at,
            r.finished_wall_time,
        ),
    )
    # every run each rank reported (a run it left stays known: superseded)
    db.execute("INSERT OR IGNORE INTO rank_runs (rank, run_id) VALUES (?, ?)",
               (r.rank, r.run_id))
    db.executemany(
        f"INSERT INTO pending ({_PARAM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (p.name, p.run_id, p.rank, p.step, p.wall_time, p.received_at,
             _dumps(p.metrics), _dumps(p.state))
            for p in records
        ],
    )


def superseded(db: sqlite3.Connection, snap: Snapshot) -> bool:
    """Whether ``snap``'s run is one its rank reported before (``rank_runs``; the caller
    holds the store's connection lock): a run the rank left, since its latest is another. A
    database from before ``rank_runs`` knows those runs by their points in ``history`` (what
    was pruned from it is forgotten). Only asked of a snapshot of another run taken before the
    rank's latest, so rarely."""
    if db.execute("SELECT 1 FROM rank_runs WHERE rank = ? AND run_id = ?",
                  (snap.rank, snap.run_id)).fetchone() is not None:
        return True
    return any(db.execute(
        "SELECT 1 FROM history WHERE name = ? AND run_id = ? AND rank = ? LIMIT 1",
        (name, snap.run_id, snap.rank)).fetchone() is not None for name in snap.params)


def write_late(db: sqlite3.Connection, snap: Snapshot, max_rows: int) -> int:
    """A snapshot taken before its rank's latest (see :meth:`service.store.Store.ingest`): its
    points go into ``history`` where that step has none yet or one taken earlier (a point of an
    attempt that crashed, which the resumed run took again); the latest state, the rank's count
    and the exported series are left as they are.

    ``pending`` is merged first, in the same transaction: a point still waiting there would
    otherwise be merged after this one and replace it, whenever it was taken. Returns the
    points stored."""
    merge_pending(db, max_rows)
    stored = db.executemany(
        f"INSERT INTO history ({_HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (name, run_id, step) DO UPDATE SET rank = excluded.rank, "
        "wall_time = excluded.wall_time, metrics = excluded.metrics "
        "WHERE excluded.wall_time > history.wall_time",
        [(name, snap.run_id, snap.rank, snap.step, snap.wall_time, _dumps(metrics))
         for name, metrics in snap.params.items()],
    ).rowcount
    prune(db, max_rows)
    return stored


def prune(db: sqlite3.Connection, max_rows: int) -> None:
    """Keep the newest ``max_rows`` points (ids are contiguous: see the module)."""
    db.execute(
        "DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?", (max_rows,)
    )


def merge_pending(db: sqlite3.Connection, max_rows: int, upto: int | None = None) -> None:
    """Move the pending rows up to id ``upto`` (all: None) into ``history`` and ``params``,
    then :func:`prune` to ``max_rows``. Rows go in the order they arrived, so history ids keep
    arrival order (the retention bound prunes by id), a re-sent step replaces its point (and
    keeps its id) and each parameter's row ends as its latest."""
    last = db.execute("SELECT MAX(id) FROM pending").fetchone()[0] if upto is None else upto
    if last is None:
        return
    # (the WHERE clause is also what lets SQLite read ON CONFLICT after INSERT ... SELECT)
    db.execute(
        f"INSERT INTO history ({_HISTORY_COLUMNS}) SELECT {_HISTORY_COLUMNS} FROM pending "
        "WHERE id <= ? ORDER BY id ON CONFLICT (name, run_id, step) DO UPDATE SET "
        "rank = excluded.rank, wall_time = excluded.wall_time, metrics = excluded.metrics",
        (last,),
    )
    db.execute(
        f"INSERT INTO params ({_PARAM_COLUMNS}) SELECT {_PARAM_COLUMNS} FROM pending "
        "WHERE id <= ? ORDER BY id ON CONFLICT (name) DO UPDATE SET "
        "run_id = excluded.run_id, rank = excluded.rank, step = excluded.step, "
        "wall_time = excluded.wall_time, received_at = excluded.received_at, "
        "metrics = excluded.metrics, state = excluded.state",
        (last,),
    )
    db.execute("DELETE FROM pending WHERE id <= ?", (last,))
    prune(db, max_rows)

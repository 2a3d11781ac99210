"""The latest state per rank and parameter, in memory: what ``/metrics`` and the state API read.

:class:`service.store.Store` keeps this mirror of its two "latest" tables, loaded at start and
updated after each write commits, so that a scrape never touches the disk. Its lock is held only
briefly: readers get consistent copies, never a view a write is changing.
"""

from __future__ import annotations

import bisect
import threading

from service.records import ParamRecord, RankRecord


class Mirror:
    """Last-known records by rank and by parameter name, with the names kept sorted for cursor
    pagination. Thread-safe readers; writers hold ``_lock`` around :meth:`_apply`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ranks: dict[int, RankRecord] = {}
        self._params: dict[str, ParamRecord] = {}
        self._names: list[str] = []

    def _fill(self, ranks: dict[int, RankRecord], params: dict[str, ParamRecord]) -> None:
        """Take what the tables hold (at start)."""
        with self._lock:
            self._ranks.update(ranks)
            self._params.update(params)
            self._names = sorted(self._params)

    def _apply(self, rank_rec: RankRecord, records: list[ParamRecord]) -> None:
        """Update the in-memory mirror (caller holds the lock)."""
        self._ranks[rank_rec.rank] = rank_rec
        for rec in records:
            if rec.name not in self._params:
                bisect.insort(self._names, rec.name)
            self._params[rec.name] = rec

    def ranks(self) -> list[RankRecord]:
        """Every rank ever seen, by rank."""
        with self._lock:
            return sorted(self._ranks.values(), key=lambda r: r.rank)

    def params(self) -> list[ParamRecord]:
        """Every parameter's latest record (a consistent copy of the list)."""
        with self._lock:
            return list(self._params.values())

    def latest(self) -> tuple[list[RankRecord], list[ParamRecord]]:
        """:meth:`ranks` and :meth:`params` as of one moment (one hold of the lock): read one
        after the other, an ingest that starts a rank's new run between them gave the old run's
        rank record with the new run's parameters, which match neither."""
        with self._lock:
            return sorted(self._ranks.values(), key=lambda r: r.rank), list(self._params.values())

    def param(self, name: str) -> ParamRecord | None:
        """The latest record of ``name``, or None."""
        with self._lock:
            return self._params.get(name)

    def page(self, *, after: str | None, limit: int, rank: int | None = None) -> list[ParamRecord]:
        """Up to ``limit`` records with names > ``after``, in name order (cursor pagination)."""
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._names, after)
            out: list[ParamRecord] = []
            for name in self._names[start:]:
                rec = self._params[name]
                if rank is None or rec.rank == rank:
                    out.append(rec)
                    if len(out) == limit:
                        break
            return out


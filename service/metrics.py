"""Prometheus exposition: a custom collector on a private ``CollectorRegistry``.

The collector reads the store's in-memory latest state at scrape time; nothing is mirrored
into prometheus_client gauge objects, so there is no second copy to keep in sync and removing a
series is just not emitting it.

Names (a contract with the alert rules and dashboards; base units, ``_total`` on counters):

=============================================  =======  ======================
``orthoshard_basis_rotation_degrees``          gauge    ``param, factor, k``
``orthoshard_eigengap_ratio``                  gauge    ``param, factor``
``orthoshard_orthogonality_error``             gauge    ``param``
``orthoshard_optimizer_step``                  gauge    ``rank``
``orthoshard_last_snapshot_timestamp_seconds`` gauge    ``rank``
``orthoshard_snapshots_received_total``        counter  ``rank``
``orthoshard_nonfinite_skips_total``           counter  ``param``
=============================================  =======  ======================

Health metric names map generically: ``rotation_degrees_{factor}_k{k}``,
``eigengap_ratio_{factor}``, ``orthogonality_error``, ``nonfinite_skips``; other health metrics
(``update_rms``, ``basis_staleness_L``, ...) are kept in the state API but not exported.

Rotation hold: a basis rotation is an event of one step, and the gauge of the latest step
would show a spike only until the next snapshot, often shorter than the scrape interval. Each
``orthoshard_basis_rotation_degrees`` series therefore exports the largest value among the
snapshots received in the last ``rotation_hold_s`` seconds (30 s by default, twice the usual
15 s scrape), and never less than the latest value. Every spike is seen by at least one scrape;
the state API keeps the exact per-step values. Non-finite rotations are not held: the export is
``NaN`` only when neither the latest value nor any value in the window is finite. The hold lives
in memory (a restarted sidecar exports the latest values until new snapshots arrive).

Finished runs: a rank that said its run ended (``POST /v1/ranks/{rank}/finish``, sent by
``Publisher.close(finished=True)``) exports no ``orthoshard_last_snapshot_timestamp_seconds``
until its next snapshot, so ``OptimizerSnapshotStale`` pages for ranks that stopped, not for
runs that finished.

Expiry: a parameter or rank whose last snapshot was received more than ``series_ttl_s`` ago
(900 s by default) is not emitted, so a parameter that stopped reporting, a dead rank or a
previous run leaves no ghost series. A ``null`` metric (non-finite at the source) is emitted as
``NaN``.

Speed: ``generate_latest`` formats ~5 us per sample; 8 ranks x 500 matrices x 8 samples took
~230 ms here, over the 100 ms budget. ``HealthCollector.render`` writes the same text format
(0.0.4) from the same classification with ``repr`` floats. Each parameter's lines are rendered
when its record is ingested (a store listener) and cached until the record changes, so a scrape
only filters by age and joins strings; a test checks that both parse to identical samples.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.records import ParamRecord, RankRecord
from service.settings import DEFAULT_ROTATION_HOLD_S
from service.store import Store

#: What ``render`` writes: the classic text format (Prometheus 2.x negotiates it by default).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ROTATION = re.compile(r"^rotation_degrees_([A-Za-z]+)_k(\d+)$")
_EIGENGAP = re.compile(r"^eigengap_ratio_([A-Za-z]+)$")


@dataclass(frozen=True, slots=True)
class Family:
    """One exported metric family."""

    name: str  # without the counter's ``_total``
    kind: str  # "gauge" | "counter"
    help: str
    labels: tuple[str, ...]

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name

    def empty(self) -> GaugeMetricFamily | CounterMetricFamily:
        """A prometheus_client family object with no samples yet."""
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return cls(self.name, self.help, labels=list(self.labels))

    def header(self) -> str:
        """The ``# HELP`` / ``# TYPE`` lines of the text format."""
        return f"# HELP {self.sample_name} {self.help}\n# TYPE {self.sample_name} {self.kind}\n"


ROTATION = Family(
    "orthoshard_basis_rotation_degrees",
    "gauge",
    "Largest principal angle between the previous and current top-k eigenbasis "
    "(the largest over the sidecar's rotation hold window).",
    ("param", "factor", "k"),
)
EIGENGAP = Family(
    "orthoshard_eigengap_ratio",
    "gauge",
    "(l1 - l2) / l1 of the preconditioner factor's descending eigenvalues.",
    ("param", "factor"),
)
ORTHOGONALITY = Family(
    "orthoshard_orthogonality_error",
    "gauge",
    "||O^T O - I||_F / sqrt(n) of the orthogonalized update.",
    ("param",),
)
NONFINITE = Family(
    "orthoshard_nonfinite_skips",
    "counter",
    "Updates skipped because they were not finite, as the optimizer counts them.",
    ("param",),
)
STEP = Family(
    "orthoshard_optimizer_step", "gauge", "Latest optimizer step reported by the rank.", ("rank",)
)
LAST_SNAPSHOT = Family(
    "orthoshard_last_snapshot_timestamp_seconds",
    "gauge",
    "Unix time at which the sidecar received the rank's latest snapshot "
    "(absent while the rank's run is finished).",
    ("rank",),
)
RECEIVED = Family(
    "orthoshard_snapshots_received",
    "counter",
    "Snapshots accepted from the rank (kept across sidecar restarts).",
    ("rank",),
)
PARAM_FAMILIES = (ROTATION, EIGENGAP, ORTHOGONALITY, NONFINITE)
RANK_FAMILIES = (STEP, LAST_SNAPSHOT, RECEIVED)

Sample = tuple[int, tuple[str, ...], float]  # (index into the families, label values, value)


@functools.lru_cache(maxsize=4096)
def classify(key: str) -> tuple[int, tuple[str, ...]] | None:
    """Map a health metric name to (index into ``PARAM_FAMILIES``, labels after ``param``).

    ``rotation_degrees_L_k8`` -> (0, ("L", "8")); ``eigengap_ratio_R`` -> (1, ("R",));
    ``orthogonality_error`` -> (2, ()); ``nonfinite_skips`` -> (3, ()); anything else -> None.
    """
    if key == "orthogonality_error":
        return 2, ()
    if key == "nonfinite_skips":
        return 3, ()
    if (m := _ROTATION.match(key)) is not None:
        return 0, (m.group(1), m.group(2))
    if (m := _EIGENGAP.match(key)) is not None:
        return 1, (m.group(1),)
    return None


def param_samples(rec: ParamRecord, held: Mapping[str, float] | None = None) -> Iterator[Sample]:
    """The exported samples of one parameter, indexed into ``PARAM_FAMILIES``.

    ``held`` overrides the values of some keys (the rotation hold).
    """
    for key, raw in rec.metrics.items():
        if (kind := classify(key)) is not None:
            value = math.nan if raw is None else raw
            if held is not None:
                value = held.get(key, value)
            yield kind[0], (rec.name, *kind[1]), value


class _Peak:
    """Sliding-window maximum of one series: a deque of (time, value), values decreasing.

    ``push`` is amortized O(1); after ``prune(cutoff)`` the front is the largest value received
    at or after ``cutoff`` (the deque is empty when none was).
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: deque[tuple[float, float]] = deque()

    def push(self, t: float, value: float) -> None:
        entries = self.entries
        while entries and entries[-1][1] <= value:
            entries.pop()
        entries.append((t, value))

    def prune(self, cutoff: float) -> None:
        entries = self.entries
        while entries and entries[0][0] < cutoff:
            entries.popleft()

    def expires(self, hold: float) -> float:
        """When the window's maximum may next change without a new value arriving."""
        return self.entries[0][0] + hold if self.entries else math.inf


def rank_samples(rec: RankRecord) -> Iterator[Sample]:
    """The exported samples of one rank, indexed into ``RANK_FAMILIES``."""
    label = (str(rec.rank),)
    yield 0, label, float(rec.step)
    if rec.finished_at is None:  # a rank whose run ended is not late: no liveness sample
        yield 1, label, rec.received_at
    yield 2, label, float(rec.snapshots_received)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@functools.lru_cache(maxsize=4096)
def _suffix(index: int, extra: tuple[str, ...]) -> str:
    """The label pairs after ``param`` (values matched by the regexes: nothing to escape)."""
    names = PARAM_FAMILIES[index].labels[1:]
    return "".join(f',{k}="{v}"' for k, v in zip(names, extra, strict=True))


def _sample_prefix(name: str, key: str) -> tuple[int, str] | None:
    """``(family index, 'family{labels} ')`` of parameter ``name``'s metric ``key``, or None
    when ``key`` is not exported (the text :func:`param_samples` and ``_line`` spell)."""
    kind = classify(key)
    if kind is None:
        return None
    index, extra = kind
    family = PARAM_FAMILIES[index]
    return index, f'{family.sample_name}{{param="{_escape(name)}"{_suffix(index, extra)}}} '


def _number(value: float) -> str:
    """A sample value as the text format spells it (``repr`` round-trips exactly)."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _line(family: Family, labels: tuple[str, ...], value: float) -> str:
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(family.labels, labels, strict=True))
    return f"{family.sample_name}{{{pairs}}} {_number(value)}\n"


class HealthCollector(Collector):
    """Reads the store at scrape time and yields the orthoshard_* families.

    Args:
        store: the sidecar's store.
        series_ttl_s: records received longer ago than this are not emitted.
        rotation_hold_s: each rotation series exports its largest value over this many seconds.
        clock: Unix seconds (injected for tests; the store's clock stamps ``received_at``).
    """

    def __init__(
        self,
        store: Store,
        *,
        series_ttl_s: float,
        rotation_hold_s: float = DEFAULT_ROTATION_HOLD_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ttl = series_ttl_s
        self._hold = rotation_hold_s
        self._clock = clock
        # name -> (record, one text block per param family, time the blocks go stale)
        self._cache: dict[str, tuple[ParamRecord, list[str], float]] = {}
        # name -> metric key -> (family index, the sample's text up to its value) or None when
        # the key is not exported: the labels of a series never change, only its value
        self._prefixes: dict[str, dict[str, tuple[int, str] | None]] = {}
        # name -> (the run the windows belong to, rotation key -> window max): a new run of
        # the parameter starts empty windows, so that no spike of an earlier run is held
        self._peaks: dict[str, tuple[str, dict[str, _Peak]]] = {}
        self._lock = threading.Lock()
        store.add_listener(self._warm)

    def _warm(self, records: list[ParamRecord]) -> None:
        """Feed the rotation hold and render new records at ingest time (a scrape only joins)."""
        now = self._clock()
        with self._lock:
            for rec in records:
                entry = self._peaks.get(rec.name)
                if entry is None or entry[0] != rec.run_id:
                    entry = self._peaks[rec.name] = (rec.run_id, {})
                peaks = entry[1]
                for key, raw in rec.metrics.items():
                    kind = classify(key)
                    if kind is not None and kind[0] == 0 and raw is not None and math.isfinite(raw):
                        peak = peaks.get(key) or peaks.setdefault(key, _Peak())
                        peak.push(rec.received_at, raw)
                        peak.prune(rec.received_at - self._hold)
                self._cache.pop(rec.name, None)
                self._param_lines(rec, now)

    def _held(self, rec: ParamRecord, now: float) -> tuple[dict[str, float] | None, float]:
        """The rotation values to export for ``rec`` and until when they stay valid."""
        entry = self._peaks.get(rec.name)
        if entry is None or entry[0] != rec.run_id or not entry[1]:
            return None, math.inf
        peaks = entry[1]
        held: dict[str, float] = {}
        valid_until = math.inf
        for key, peak in list(peaks.items()):
            peak.prune(now - self._hold)
            if key not in rec.metrics:
                # not reported now: nothing to export; its window goes once it holds nothing,
                # so keys that come and go do not pile up
                if not peak.entries:
                    del peaks[key]
                continue
            raw = rec.metrics[key]
            finite = [v for v in (raw, peak.entries[0][1] if peak.entries else None)
                      if v is not None and math.isfinite(v)]  # fmt: skip
            held[key] = max(finite) if finite else math.nan
            valid_until = min(valid_until, peak.expires(self._hold))
        return held, valid_until

    def _live(self) -> tuple[float, list[ParamRecord], list[RankRecord]]:
        """The parameters and ranks to export: received within the TTL, and parameters of
        their rank's current run while it runs. A finished run's frozen values, or those of a
        rank's earlier run, would otherwise stay for the TTL and count in the alerts (a spike
        of the next run turned too few of the node's "matrices" to page).

        A rank of the newest run on this sidecar that has not finished stays past the TTL:
        its liveness timestamp is what ``OptimizerSnapshotStale`` reads, and with it gone the
        alert resolved (and Alertmanager said so) while the rank was still dead. It goes when
        the rank finishes (``POST /v1/ranks/{rank}/finish``, also by hand for a rank that is
        gone for good) or another run's snapshot comes after it."""
        now = self._clock()
        cutoff = now - self._ttl
        all_ranks, all_params = self._store.latest()
        latest = {r.rank: r for r in all_ranks}
        params = [p for p in all_params if p.received_at >= cutoff
                  and ((r := latest.get(p.rank)) is None
                       or (r.finished_at is None and r.run_id == p.run_id))]
        newest = max(all_ranks, key=lambda r: r.received_at).run_id if all_ranks else None
        ranks = [r for r in all_ranks if r.received_at >= cutoff
                 or (r.finished_at is None and r.run_id == newest)]
        return now, params, ranks

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's interface (``generate_latest``, ``get_sample_value``)."""
        now, params, ranks = self._live()
        with self._lock:
            samples = [s for rec in params for s in param_samples(rec, self._held(rec, now)[0])]
        yield from self._families(PARAM_FAMILIES, samples)
        yield from self._families(RANK_FAMILIES, (s for r in ranks for s in rank_samples(r)))

    @staticmethod
    def _families(families: tuple[Family, ...], samples: Iterable[Sample]) -> list[Metric]:
        out = [f.empty() for f in families]
        for index, labels, value in samples:
            out[index].add_metric(list(labels), value)
        return list(out)

    def describe(self) -> Iterator[Metric]:
        """The families without samples (lets the registry check for name clashes)."""
        for family in PARAM_FAMILIES + RANK_FAMILIES:
            yield family.empty()

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) of the same samples ``collect`` yields."""
        chunks: list[list[str]] = [[f.header()] for f in PARAM_FAMILIES]
        with self._lock:
            # the live list under the lock: a parameter whose first snapshot is ingested
            # meanwhile is then either in it or not yet warmed (its ingest's _warm waits for
            # the lock), never forgotten right after its spike was pushed
            now, params, ranks = self._live()
            for rec in params:
                for index, text in enumerate(self._param_lines(rec, now)):
                    if text:
                        chunks[index].append(text)
            self._forget(params)
        out = [text for chunk in chunks for text in chunk]
        for index, family in enumerate(RANK_FAMILIES):
            out.append(family.header())
            out.extend(
                _line(family, lb, v) for r in ranks for i, lb, v in rank_samples(r) if i == index
            )
        return "".join(out).encode("utf-8")

    def _param_lines(self, rec: ParamRecord, now: float) -> list[str]:
        """One text block per param family for ``rec``, cached until it changes or goes stale."""
        hit = self._cache.get(rec.name)
        if hit is not None and hit[0] is rec and now < hit[2]:
            return hit[1]
        held, valid_until = self._held(rec, now)
        prefixes = self._prefixes.get(rec.name)
        if prefixes is None:
            prefixes = self._prefixes[rec.name] = {}
        lines: list[list[str]] = [[] for _ in PARAM_FAMILIES]
        for key, raw in rec.metrics.items():
            if key in prefixes:
                entry = prefixes[key]
            else:
                entry = prefixes[key] = _sample_prefix(rec.name, key)
            if entry is None:
                continue
            value = math.nan if raw is None else raw
            if held is not None:
                value = held.get(key, value)
            lines[entry[0]].append(entry[1] + _number(value) + "\n")
        if len(prefixes) > len(rec.metrics):  # keys this record lacks: only its own stay
            self._prefixes[rec.name] = {key: prefixes[key] for key in rec.metrics}
        blocks = ["".join(chunk) for chunk in lines]
        self._cache[rec.name] = (rec, blocks, valid_until)
        return blocks

    def _forget(self, live: list[ParamRecord]) -> None:
        """Drop the cached text, label prefixes and hold windows of expired parameters, so that
        none grows with the parameters that came and went."""
        if max(len(self._cache), len(self._peaks), len(self._prefixes)) > len(live):
            keep = {p.name for p in live}
            for table in (self._cache, self._peaks, self._prefixes):
                for name in [n for n in table if n not in keep]:
                    del table[name]


def build_registry(collector: HealthCollector) -> CollectorRegistry:
    """A fresh private registry holding only ``collector`` (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry

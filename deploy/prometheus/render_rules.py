"""Render the orthoshard alert rules and their promtool unit tests from one source.

Two profiles share every expression, label and annotation and differ only in windows and
thresholds:

- ``prod``: 15 s scrape and evaluation (Prometheus' usual), minutes-long windows.
- ``fast``: 1 s scrape and evaluation, seconds-long windows, for end-to-end tests on loopback
  (the group sets ``interval: 1s`` itself, so the global evaluation interval does not matter).

Each profile writes ``rules[-fast]/orthoshard.rules.yml`` and a promtool test file whose input
series are built from the same numbers, rotations shaped as the sidecar exports them under the
profile's rotation hold (calm noise, a one-step spike, a noisy degenerate spectrum, a slow
drift, a frozen snapshot clock, a NaN, failed scrapes), so changing a window here changes the
rules and the expectations together.

    python deploy/prometheus/render_rules.py          # (re)write the four files
    python deploy/prometheus/render_rules.py --check  # exit 1 if a committed file differs

Standard library only (the sidecar image and CI need no PyYAML): the YAML is emitted by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOB = "orthoshard-sidecar"


@dataclass(frozen=True)
class Profile:
    """Windows in seconds, thresholds in the metric's unit. See docs/deploy.md for the why."""

    name: str
    interval: int  # scrape = evaluation interval the profile is written for
    rot_window: int  # the jump window; also the baseline's offset, so a spike never sits in both
    rot_baseline: int  # length of the baseline window, ending rot_window ago
    rot_ratio: float  # the jump must exceed ratio x baseline average ...
    rot_floor: float  # ... and this absolute angle (degrees)
    rot_breadth: float  # ... on at least this fraction of the sidecar's watched matrices at once
    rot_for: int
    stale_after: int  # seconds without an accepted snapshot (well below --series-ttl 900 s)
    stale_for: int
    ortho_max: float  # Jordan quintic sits at ~0.38, Polar Express at ~0.004 (before softening)
    ortho_for: int
    down_for: int
    group_interval: int | None  # None: the global evaluation_interval
    rot_hold: int  # the sidecar's --rotation-hold the profile expects (scrape <= hold <= window)
    skips_window: int  # skips counted over this window ...
    skips_for: int  # ... in every evaluation for this long: a lone bad batch leaves the window

    @property
    def rules_dir(self) -> str:
        return "rules" if self.name == "prod" else f"rules-{self.name}"


PROD = Profile("prod", 15, 120, 600, 3.0, 30.0, 0.5, 60, 300, 60, 0.6, 300, 60, None, 30, 300,
               600)
FAST = Profile("fast", 1, 5, 20, 3.0, 30.0, 0.5, 2, 10, 2, 0.6, 3, 2, 1, 2, 5, 10)
PROFILES = (PROD, FAST)


def dur(seconds: int) -> str:
    """Prometheus duration: 120 -> 2m, 90 -> 90s, 3600 -> 1h."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def num(x: float) -> str:
    return f"{x:g}"


# --- the rules ------------------------------------------------------------------------------

ROT = 'orthoshard_basis_rotation_degrees{k="1"}'
JUMP = "orthoshard:basis_rotation_jump_degrees"  # recording rule: the per-matrix jump

ANNOTATIONS = {
    "OptimizerBasisRotationSpike": {
        "summary": "Eigenbasis of {{ $labels.param }} ({{ $labels.factor }}) turned "
        '{{ $value | printf "%.1f" }} degrees',
        "description": "The top eigenvector of the {{ $labels.factor }} preconditioner of "
        "{{ $labels.param }} on {{ $labels.instance }} turned by "
        '{{ $value | printf "%.1f" }} degrees, several times its recent average, together '
        "with at least half of the matrices this sidecar watches.",
        "runbook": "Many bases turning at once means a gradient spike (bad batch, loss spike). "
        "Check the training loss around that step (rank 0 appends it to loss.jsonl in the "
        "trainer's --out directory: the out volume under compose). Repeated spikes: lower "
        "the LR or clip "
        "gradients (use_kl_shampoo=True resists some spikes, not all: docs/soap.md). A single "
        "matrix turning alone (two top eigenvalues crossing) does not alert.",
    },
    "OptimizerSnapshotStale": {
        "summary": "Rank {{ $labels.rank }} sent no health snapshot for "
        '{{ $value | printf "%.0f" }} s',
        "description": "The sidecar {{ $labels.instance }} has not accepted a snapshot from "
        'rank {{ $labels.rank }} for {{ $value | printf "%.0f" }} seconds.',
        "runbook": "The rank is hung, dead, much slower than usual, or its publisher cannot "
        "reach the sidecar (token, URL). Check the trainer logs and GET /v1/optimizer on the "
        "sidecar. A run that ended normally does not page: Publisher.close(finished=True) "
        "tells the sidecar, which then drops the rank's timestamp; a trainer that exits "
        "without saying so ends here until --series-ttl drops its series.",
    },
    "OptimizerOrthogonalityErrorHigh": {
        "summary": 'Orthogonality error of {{ $labels.param }} is {{ $value | printf "%.3f" }}',
        "description": "The orthogonalized update of {{ $labels.param }} on "
        "{{ $labels.instance }} is far from orthogonal (or not finite).",
        "runbook": "Newton-Schulz is not converging: NaN/Inf gradients, too few steps or a "
        "coefficient schedule outside its interval, or low precision. Check "
        "orthoshard_nonfinite_skips_total, ns_steps and ns_method (polar_express or cans). "
        "Exactly 1.0 with update_rms 0 (GET /v1/params/{name}) is a zero update: the matrix "
        "gets an all-zero gradient and does not train.",
    },
    "OptimizerNonfiniteUpdatesSkipped": {
        "summary": "{{ $labels.instance }} keeps skipping non-finite updates "
        '({{ $value | printf "%.0f" }} in the last window)',
        "description": "Matrices whose ranks report to {{ $labels.instance }} skipped "
        '{{ $value | printf "%.0f" }} updates with a NaN/Inf gradient or update over the '
        "last window, and have kept doing so: these matrices are not training.",
        "runbook": "Every optimizer (SOAP too, which has no orthogonality error) skips a "
        "matrix whose gradient is not finite and counts it. Skips that keep coming mean the "
        "loss diverged (check loss.jsonl in the trainer's --out directory), the LR is too "
        "high, a data shard is bad, or low precision overflows. Which matrices: "
        "orthoshard_nonfinite_skips_total by param on the dashboard, or GET /v1/params/{name}. "
        "A single bad batch does not page.",
    },
    "OptimizerSidecarDown": {
        "summary": "Health sidecar {{ $labels.instance }} is down",
        "description": "Prometheus cannot scrape {{ $labels.instance }}; optimizer health "
        "alerts for this node are inhibited while it is down.",
        "runbook": "Check the sidecar container (docker compose ps / logs sidecar-N), its "
        "/healthz, the token secret and the --db volume. Training continues: publishers "
        "drop the oldest snapshots while the sidecar is away.",
    },
}


def rules(p: Profile) -> list[dict]:
    w, b = dur(p.rot_window), dur(p.rot_baseline)
    jump = f"max_over_time({ROT}[{w}])"
    # Per matrix: the largest turn of the last w, above the floor and above ratio x the average
    # turn of the b before it (offset w: the spike is never inside its own baseline). The
    # average is over the samples that hold a turn (> 0): SOAP reports 0 between refreshes, and
    # with a refresh every few minutes the zeros pulled the average down to a fraction of an
    # ordinary turn, so every refresh paged (a subquery at the scrape step reads the samples).
    jumped = (
        f"{jump} > {num(p.rot_floor)}\nand\n{jump}\n"
        f"  > {num(p.rot_ratio)} * avg_over_time(({ROT} > 0)[{b}:{dur(p.interval)}] offset {w})"
    )
    # Breadth: a gradient spike turns (nearly) every matrix at once; a lone matrix whose top two
    # eigenvalues cross turns alone (measured, docs/deploy.md). Same target = same sidecar.
    # The denominator counts the matrices seen over the jump window, like the numerator: an
    # instant count is empty after a failed scrape, which reset the alert's `for:` and, with two
    # failed scrapes at the wrong moment, let the spike leave the window without a page.
    rotation = (
        f"{JUMP}\nand on (job, instance)\n(\n"
        f"  count by (job, instance) ({JUMP})\n"
        f"    / count by (job, instance) ({jump})\n  >= {num(p.rot_breadth)}\n)"
    )
    ortho = "orthoshard_orthogonality_error"
    return [
        {"record": JUMP, "expr": jumped},
        _alert("OptimizerBasisRotationSpike", rotation, p.rot_for, "warning"),
        _alert(
            "OptimizerSnapshotStale",
            f"time() - orthoshard_last_snapshot_timestamp_seconds > {p.stale_after}",
            p.stale_for,
            "warning",
        ),
        _alert(
            "OptimizerOrthogonalityErrorHigh",
            f"{ortho} > {num(p.ortho_max)}\nor\n{ortho} != {ortho}",
            p.ortho_for,
            "warning",
        ),
        _alert(
            "OptimizerNonfiniteUpdatesSkipped",
            "sum by (job, instance) (\n"
            f"  increase(orthoshard_nonfinite_skips_total[{dur(p.skips_window)}])\n) > 0",
            p.skips_for,
            "warning",
        ),
        _alert("OptimizerSidecarDown", f'up{{job="{JOB}"}} == 0', p.down_for, "critical"),
    ]


def _alert(name: str, expr: str, for_s: int, severity: str) -> dict:
    return {
        "alert": name,
        "expr": expr,
        "for": dur(for_s),
        "labels": {"severity": severity},
        "annotations": ANNOTATIONS[name],
    }


def rules_doc(p: Profile) -> dict:
    group: dict = {"name": "orthoshard-optimizer-health"}
    if p.group_interval is not None:
        group["interval"] = dur(p.group_interval)
    group["rules"] = rules(p)
    return {"groups": [group]}


# --- the promtool tests -----------------------------------------------------------------------

TARGET = {"job": JOB, "instance": "sidecar-0:9400", "node": "0"}
CALM = [2.0, 4.5, 3.0, 1.5, 4.0, 2.5]  # degrees per step, a spectrum with a gap (measured <= 4.4)
DEGENERATE = [88.0, 45.0, 70.0, 89.0, 60.0, 30.0]  # near-degenerate spectrum: flips every step
SPIKE = 85.0  # plain SOAP's top-1 turn on a rank-1 gradient spike (FIELD-NOTES)
REFRESH_EVERY = 7  # scrapes between SOAP basis refreshes in the sparse cases (100 s at 15 s)
TINY = [0.01, 0.03, 0.02, 0.05, 0.01, 0.02]  # KL-Shampoo: ~0 degrees; a 2-degree bump is 50x


def labels(**extra: str) -> dict[str, str]:
    return {**TARGET, **extra}


def series(name: str, lab: dict[str, str], values: list[float | None]) -> dict:
    """A promtool input series; None is a failed scrape (a staleness marker)."""
    body = ",".join(f'{k}="{v}"' for k, v in lab.items())
    text = " ".join("stale" if v is None else "NaN" if v != v else f"{v:g}" for v in values)
    return {"series": f"{name}{{{body}}}", "values": text}


def render(template: str, lab: dict[str, str], value: float) -> str:
    """Expand the two template forms used in ANNOTATIONS, as Prometheus would."""
    out = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: lab[m.group(1)], template)
    return re.sub(
        r'\{\{ \$value \| printf "(%[^"]+)" \}\}',
        lambda m: "NaN" if value != value else m.group(1) % value,
        out,
    )


def expect(name: str, lab: dict[str, str], value: float, severity: str) -> dict:
    ann = {k: render(v, lab, value) for k, v in ANNOTATIONS[name].items()}
    return {"exp_labels": {**lab, "severity": severity}, "exp_annotations": ann}


def check(t: int, name: str, *alerts: dict) -> dict:
    return {"eval_time": dur(t), "alertname": name, "exp_alerts": list(alerts)}


def cycle(pattern: list[float], n: int) -> list[float]:
    return [pattern[i % len(pattern)] for i in range(n)]


def held(values: list[float], p: Profile) -> list[float]:
    """What the sidecar exports for per-scrape step values: the max over its rotation hold."""
    m = p.rot_hold // p.interval
    return [max(values[max(0, k - m) : k + 1]) for k in range(len(values))]


def rotation_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerBasisRotationSpike"
    lab = labels(param="layers.0.attn.q.weight", factor="L", k="1")
    rot = "orthoshard_basis_rotation_degrees"
    held_for = (p.rot_hold // i) * i  # the spike stays on /metrics this much longer
    n_before = (p.rot_window + p.rot_baseline) // i + 10  # a full baseline before the spike
    t0 = n_before * i
    n = n_before + 1 + (p.rot_window + p.rot_baseline) // i
    spiked = held([*cycle(CALM, n_before), SPIKE, *cycle(CALM, n - n_before - 1)], p)
    calm_n = held(cycle(CALM, n), p)
    long_n = 4 * (p.rot_window + p.rot_baseline) // i
    drift = [2.0 + 88.0 * k / (long_n - 1) for k in range(long_n)]  # 2 -> 90 degrees, slowly
    degenerate = held(cycle(DEGENERATE, long_n), p)
    warmup = held([SPIKE, *cycle(CALM, n)], p)  # first sample large: there is no baseline yet
    bump = held([*cycle(TINY, n_before), 2.0, *cycle(TINY, n - n_before - 1)], p)  # under floor
    k8 = {**lab, "k": "8"}  # k=8 is not watched: same spike, no alert of its own
    # A gradient spike: 3 of the 4 watched matrices on sidecar-0 turn at once (75% >= breadth).
    hit = [lab, *(labels(param=f"layers.{j}.mlp.w.weight", factor="R", k="1") for j in (1, 2))]
    calm = labels(param="layers.3.mlp.w.weight", factor="L", k="1")
    # On sidecar-1 one matrix of four turns alone at the same moment: an eigenvalue crossing.
    other = {"job": JOB, "instance": "sidecar-1:9400", "node": "1"}
    lone = [{**other, "param": f"m{j}", "factor": "L", "k": "1"} for j in range(4)]
    spike_case = {
        "interval": dur(i),
        "input_series": [
            *(series(rot, x, spiked) for x in hit),
            series(rot, k8, spiked),
            series(rot, calm, calm_n),
            series(rot, lone[0], spiked),
            *(series(rot, x, calm_n) for x in lone[1:]),
        ],
        "alert_rule_test": [
            check(t0 - i, name),
            check(t0 + i, name),  # pending, not yet firing
            check(t0 + p.rot_for + i, name, *(expect(name, x, SPIKE, "warning") for x in hit)),
            # resolved once the held spike has left the jump window
            check(t0 + held_for + p.rot_window + 2 * i, name),
        ],
    }
    # Two failed scrapes just before `for:` completes: the page must still come on time (the
    # window-based counts stay defined through the gap; an instant count did not).
    gap = p.rot_for // i  # the scrape at which the alert would fire
    gapped = [None if n_before + gap - 1 <= k <= n_before + gap else v
              for k, v in enumerate(spiked)]
    gap_case = {
        "interval": dur(i),
        "input_series": [
            *(series(rot, x, gapped) for x in hit),
            series(rot, calm, [None if v is None else c
                               for v, c in zip(gapped, calm_n, strict=True)]),
        ],
        "alert_rule_test": [
            check(t0 - i, name),
            check(t0 + p.rot_for + i, name, *(expect(name, x, SPIKE, "warning") for x in hit)),
        ],
    }
    quiet = {
        "interval": dur(i),
        "input_series": [
            series(rot, labels(param="calm", factor="L", k="1"), held(cycle(CALM, long_n), p)),
            series(rot, labels(param="degenerate", factor="R", k="1"), degenerate),
            series(rot, labels(param="drift", factor="L", k="1"), held(drift, p)),
            series(rot, labels(param="warmup", factor="L", k="1"), warmup),
            series(rot, labels(param="tiny", factor="R", k="1"), bump),
        ],
        "alert_rule_test": [
            check(t, name) for t in range(0, long_n * i, max(i, p.rot_window // 2))
        ],
    }
    # SOAP refreshing every REFRESH_EVERY scrapes (100 s at 15 s): 0 between refreshes, each
    # refresh's turn held for rot_hold. Every matrix refreshes at the same step, so breadth
    # holds at each refresh: only the average over the turns themselves keeps this quiet.
    def sparse(turns: list[float]) -> list[float]:
        return held([turns[k // REFRESH_EVERY] if k % REFRESH_EVERY == 0 else 0.0
                     for k in range(len(turns) * REFRESH_EVERY)], p)

    refreshes = long_n // REFRESH_EVERY + 1
    at = (n_before // REFRESH_EVERY + 1)  # the refresh that spikes, after a full baseline
    t_spike = at * REFRESH_EVERY * i
    spiky = [SPIKE if r == at else CALM[r % len(CALM)] for r in range(refreshes)]
    sparse_case = {
        "interval": dur(i),
        "input_series": [
            *(series(rot, x, sparse(spiky)) for x in hit),
            series(rot, calm, sparse(cycle(CALM, refreshes))),
        ],
        "alert_rule_test": [
            *(check(t, name) for t in range(0, t_spike, max(i, p.rot_window // 2))),
            check(t_spike + p.rot_for + i, name, *(expect(name, x, SPIKE, "warning")
                                                    for x in hit)),
        ],
    }
    # Every matrix turning 30-89 degrees at each sparse refresh (a near-degenerate spectrum, as
    # SOAP's top-1 vector of i.i.d. gradients), all at once, no spike: quiet all along. The
    # average over all samples (zeros included) paged here at every refresh.
    quiet_sparse = {
        "interval": dur(i),
        "input_series": [
            series(rot, labels(param=f"p{j}", factor=f, k="1"),
                   sparse(cycle(DEGENERATE[j:] + DEGENERATE[:j], refreshes)))
            for j in range(4) for f in ("L", "R")
        ],
        "alert_rule_test": [
            check(t, name) for t in range(0, long_n * i, max(i, p.rot_window // 2))
        ],
    }
    return [spike_case, gap_case, quiet, sparse_case, quiet_sparse]


def stale_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerSnapshotStale"
    lab = labels(rank="1")
    n_live = (p.stale_after + p.stale_for) // i + 4
    n_frozen = 2 * (p.stale_after + p.stale_for) // i
    frozen_at = (n_live - 1) * i
    values = [float(k * i) for k in range(n_live)] + [float(frozen_at)] * n_frozen
    values += [float((n_live + n_frozen + k) * i) for k in range(n_live)]
    resume = (n_live + n_frozen) * i
    t_fire = frozen_at + p.stale_after + p.stale_for + 2 * i
    return [
        {
            "interval": dur(i),
            "input_series": [series("orthoshard_last_snapshot_timestamp_seconds", lab, values)],
            "alert_rule_test": [
                check(frozen_at, name),
                check(frozen_at + p.stale_after + i, name),  # over the limit, still pending
                check(t_fire, name, expect(name, lab, float(t_fire - frozen_at), "warning")),
                check(resume + i, name),
            ],
        }
    ]


def ortho_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerOrthogonalityErrorHigh"
    ortho = "orthoshard_orthogonality_error"
    bad, good, nan_lab = labels(param="w.bad"), labels(param="w.ok"), labels(param="w.nan")
    n = p.ortho_for // i + 4
    values = [0.37] * n + [0.9] * (2 * n) + [0.37] * n  # Jordan quintic level, then broken
    nans = [0.004] * n + [float("nan")] * (2 * n) + [0.004] * n
    t_bad, t_end = n * i, 3 * n * i
    t_fire = t_bad + p.ortho_for + i
    return [
        {
            "interval": dur(i),
            "input_series": [
                series(ortho, bad, values),
                series(ortho, good, [0.38] * (4 * n)),
                series(ortho, nan_lab, nans),
            ],
            "alert_rule_test": [
                check(t_bad - i, name),
                check(
                    t_fire,
                    name,
                    expect(name, bad, 0.9, "warning"),
                    expect(name, nan_lab, float("nan"), "warning"),
                ),
                check(t_end + i, name),
            ],
        }
    ]


def skips_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerNonfiniteUpdatesSkipped"
    skips = "orthoshard_nonfinite_skips_total"
    n = (p.skips_window + p.skips_for) // i + 10
    # diverged: every scrape brings 12 more skips (a dozen matrices, NaN every step), then
    # training is fixed (restarted from a checkpoint) and the counters stand still
    steady = [0.0] * n + [12.0 * k for k in range(1, 2 * n + 1)]
    steady += [steady[-1]] * (2 * n)
    t_start, t_stop = n * i, 3 * n * i
    t_fire = t_start + p.skips_for + 2 * i
    # one bad batch: every matrix skips once, at one step; then a reset (sidecar restart)
    once = [0.0] * n + [1.0] * (2 * n) + [0.0] * (2 * n)
    lab = {"job": JOB, "instance": "sidecar-0:9400"}
    other = {"job": JOB, "instance": "sidecar-1:9400"}
    # the alert's value: 12 skips per scrape over the window
    return [
        {
            "interval": dur(i),
            "input_series": [
                *(series(skips, {**lab, "node": "0", "param": f"w{j}"},
                         [v / 12 for v in steady]) for j in range(12)),
                *(series(skips, {**other, "node": "1", "param": f"w{j}"}, once)
                  for j in range(12)),
            ],
            "alert_rule_test": [
                check(t_start - i, name),
                check(t_start + p.skips_for // 2, name),  # pending
                check(t_fire, name, expect(name, lab, 12.0 * p.skips_window / i, "warning")),
                check(t_stop + p.skips_window + 2 * i, name),  # resolved once they stop
            ],
        }
    ]


def down_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerSidecarDown"
    lab = {"job": JOB, "instance": "sidecar-1:9400", "node": "1"}
    other = {"job": "prometheus", "instance": "localhost:9090"}
    n = p.down_for // i + 4
    t_down, t_up = n * i, 3 * n * i
    return [
        {
            "interval": dur(i),
            "input_series": [
                series("up", lab, [1.0] * n + [0.0] * (2 * n) + [1.0] * n),
                series("up", other, [0.0] * (4 * n)),  # another job down: not this alert
            ],
            "alert_rule_test": [
                check(t_down - i, name),
                check(t_down + p.down_for + i, name, expect(name, lab, 0.0, "critical")),
                check(t_up + i, name),
            ],
        }
    ]


def tests_doc(p: Profile) -> dict:
    return {
        "rule_files": [f"../{p.rules_dir}/orthoshard.rules.yml"],
        "evaluation_interval": dur(p.interval),
        "tests": rotation_tests(p) + stale_tests(p) + ortho_tests(p) + skips_tests(p)
        + down_tests(p),
    }


# --- a small YAML emitter (block style; strings JSON-quoted, multi-line ones as |- blocks) ---


def to_yaml(obj: object, indent: int = 0) -> str:
    return "\n".join(_lines(obj, indent)) + "\n"


def _scalar(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return f"{v:g}" if isinstance(v, float) else str(v)
    assert isinstance(v, str), v
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", v) and v not in ("true", "false", "null"):
        return v
    return json.dumps(v)


def _lines(obj: object, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _entry(f"{pad}{k}:", v, indent)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                sub = _lines(v, indent + 2)
                out.append(f"{pad}- {sub[0].lstrip()}")
                out += sub[1:]
            else:
                out += _entry(f"{pad}-", v, indent)
    return out


def _entry(head: str, v: object, indent: int) -> list[str]:
    if isinstance(v, dict | list):
        if not v:
            return [f"{head} {'{}' if isinstance(v, dict) else '[]'}"]
        return [head, *_lines(v, indent + 2)]
    if isinstance(v, str) and "\n" in v:
        pad = " " * (indent + 2)
        return [f"{head} |-", *(pad + line for line in v.splitlines())]
    return [f"{head} {_scalar(v)}"]


HEADER = "# GENERATED by deploy/prometheus/render_rules.py (profile {name}); edit that file.\n"


def outputs() -> dict[Path, str]:
    files = {}
    for p in PROFILES:
        head = HEADER.format(name=p.name)
        files[HERE / p.rules_dir / "orthoshard.rules.yml"] = head + to_yaml(rules_doc(p))
        suffix = "" if p.name == "prod" else f"-{p.name}"
        test_path = HERE / "tests" / f"orthoshard{suffix}.rules.test.yml"
        files[test_path] = head + to_yaml(tests_doc(p))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    for path in stale:
        print(f"out of date: {path}; run python {Path(__file__).name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

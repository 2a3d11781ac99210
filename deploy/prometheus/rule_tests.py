"""The promtool unit tests of the alert rules, built from the rules' own profile: input
series shaped as the sidecar exports them under the profile's rotation hold (calm noise, a
one-step spike, a noisy degenerate spectrum, a slow drift, a frozen snapshot clock, a NaN,
failed scrapes) and the alerts each must raise, annotations included. Imported by
``render_rules.py``, which puts this directory on the path."""

from __future__ import annotations

import re
from typing import NamedTuple

from alert_rules import ANNOTATIONS, JOB, Profile, dur

TARGET = {"job": JOB, "instance": "sidecar-0:9400", "node": "0"}
CALM = [2.0, 4.5, 3.0, 1.5, 4.0, 2.5]  # degrees per step, a spectrum with a gap (measured <= 4.4)
DEGENERATE = [88.0, 45.0, 70.0, 89.0, 60.0, 30.0]  # near-degenerate spectrum: flips every step
SPIKE = 85.0  # plain SOAP's top-1 turn on a rank-1 gradient spike (~87 in docs/soap.md)
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


class _Rotations(NamedTuple):
    """What the rotation cases share: the profile, the watched matrices and the series."""

    p: Profile
    lab: dict[str, str]  # the matrix that spikes first
    hit: list[dict[str, str]]  # the 3 of sidecar-0's 4 watched matrices that turn at once
    calm: dict[str, str]  # sidecar-0's fourth, which does not
    n_before: int  # scrapes of baseline before the spike
    t0: int  # the spike's time
    long_n: int  # scrapes of the long quiet cases
    spiked: list[float]  # calm, one spike at t0, calm, as the sidecar holds it
    calm_n: list[float]  # calm all along, held

    @property
    def checks_every(self) -> int:
        return max(self.p.interval, self.p.rot_window // 2)


NAME = "OptimizerBasisRotationSpike"
ROTATION = "orthoshard_basis_rotation_degrees"


def _rotations(p: Profile) -> _Rotations:
    i = p.interval
    n_before = (p.rot_window + p.rot_baseline) // i + 10  # a full baseline before the spike
    n = n_before + 1 + (p.rot_window + p.rot_baseline) // i
    lab = labels(param="layers.0.attn.q.weight", factor="L", k="1")
    # A gradient spike: 3 of the 4 watched matrices on sidecar-0 turn at once (75% >= breadth).
    hit = [lab, *(labels(param=f"layers.{j}.mlp.w.weight", factor="R", k="1") for j in (1, 2))]
    return _Rotations(
        p, lab, hit, labels(param="layers.3.mlp.w.weight", factor="L", k="1"), n_before,
        n_before * i, 4 * (p.rot_window + p.rot_baseline) // i,
        held([*cycle(CALM, n_before), SPIKE, *cycle(CALM, n - n_before - 1)], p),
        held(cycle(CALM, n), p))


def _spike_case(r: _Rotations) -> dict:
    p, i = r.p, r.p.interval
    held_for = (p.rot_hold // i) * i  # the spike stays on /metrics this much longer
    k8 = {**r.lab, "k": "8"}  # k=8 is not watched: same spike, no alert of its own
    # On sidecar-1 one matrix of four turns alone at the same moment: an eigenvalue crossing.
    other = {"job": JOB, "instance": "sidecar-1:9400", "node": "1"}
    lone = [{**other, "param": f"m{j}", "factor": "L", "k": "1"} for j in range(4)]
    return {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, x, r.spiked) for x in r.hit),
            series(ROTATION, k8, r.spiked),
            series(ROTATION, r.calm, r.calm_n),
            series(ROTATION, lone[0], r.spiked),
            *(series(ROTATION, x, r.calm_n) for x in lone[1:]),
        ],
        "alert_rule_test": [
            check(r.t0 - i, NAME),
            check(r.t0 + i, NAME),  # pending, not yet firing
            check(r.t0 + p.rot_for + i, NAME,
                  *(expect(NAME, x, SPIKE, "warning") for x in r.hit)),
            # resolved once the held spike has left the jump window
            check(r.t0 + held_for + p.rot_window + 2 * i, NAME),
        ],
    }


def _gap_case(r: _Rotations) -> dict:
    """Two failed scrapes just before `for:` completes: the page must still come on time (the
    window-based counts stay defined through the gap; an instant count did not)."""
    p, i = r.p, r.p.interval
    gap = p.rot_for // i  # the scrape at which the alert would fire
    gapped = [None if r.n_before + gap - 1 <= k <= r.n_before + gap else v
              for k, v in enumerate(r.spiked)]
    return {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, x, gapped) for x in r.hit),
            series(ROTATION, r.calm, [None if v is None else c
                                 for v, c in zip(gapped, r.calm_n, strict=True)]),
        ],
        "alert_rule_test": [
            check(r.t0 - i, NAME),
            check(r.t0 + p.rot_for + i, NAME,
                  *(expect(NAME, x, SPIKE, "warning") for x in r.hit)),
        ],
    }


def _quiet_case(r: _Rotations) -> dict:
    """Calm noise, a degenerate spectrum, a slow drift, a spike at start-up (no baseline yet)
    and a sub-floor bump: no page."""
    p, i, n = r.p, r.p.interval, len(r.calm_n)
    drift = [2.0 + 88.0 * k / (r.long_n - 1) for k in range(r.long_n)]  # 2 -> 90, slowly
    warmup = held([SPIKE, *cycle(CALM, n)], p)  # first sample large: there is no baseline yet
    bump = held([*cycle(TINY, r.n_before), 2.0, *cycle(TINY, n - r.n_before - 1)], p)
    return {
        "interval": dur(i),
        "input_series": [
            series(ROTATION, labels(param="calm", factor="L", k="1"),
                   held(cycle(CALM, r.long_n), p)),
            series(ROTATION, labels(param="degenerate", factor="R", k="1"),
                   held(cycle(DEGENERATE, r.long_n), p)),
            series(ROTATION, labels(param="drift", factor="L", k="1"), held(drift, p)),
            series(ROTATION, labels(param="warmup", factor="L", k="1"), warmup),
            series(ROTATION, labels(param="tiny", factor="R", k="1"), bump),
        ],
        "alert_rule_test": [check(t, NAME) for t in range(0, r.long_n * i, r.checks_every)],
    }


def _sparse_cases(r: _Rotations) -> list[dict]:
    """SOAP refreshing every REFRESH_EVERY scrapes (100 s at 15 s): 0 between refreshes, each
    refresh's turn held for rot_hold. Every matrix refreshes at the same step, so breadth holds
    at each refresh: only the average over the turns themselves keeps this quiet."""
    p, i = r.p, r.p.interval

    def sparse(turns: list[float]) -> list[float]:
        return held([turns[k // REFRESH_EVERY] if k % REFRESH_EVERY == 0 else 0.0
                     for k in range(len(turns) * REFRESH_EVERY)], p)

    refreshes = r.long_n // REFRESH_EVERY + 1
    at = (r.n_before // REFRESH_EVERY + 1)  # the refresh that spikes, after a full baseline
    t_spike = at * REFRESH_EVERY * i
    spiky = [SPIKE if k == at else CALM[k % len(CALM)] for k in range(refreshes)]
    spike = {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, x, sparse(spiky)) for x in r.hit),
            series(ROTATION, r.calm, sparse(cycle(CALM, refreshes))),
        ],
        "alert_rule_test": [
            *(check(t, NAME) for t in range(0, t_spike, r.checks_every)),
            check(t_spike + p.rot_for + i, NAME, *(expect(NAME, x, SPIKE, "warning")
                                                    for x in r.hit)),
        ],
    }
    # Every matrix turning 30-89 degrees at each sparse refresh (a near-degenerate spectrum, as
    # SOAP's top-1 vector of i.i.d. gradients), all at once, no spike: quiet all along. The
    # average over all samples (zeros included) paged here at every refresh.
    quiet = {
        "interval": dur(i),
        "input_series": [
            series(ROTATION, labels(param=f"p{j}", factor=f, k="1"),
                   sparse(cycle(DEGENERATE[j:] + DEGENERATE[:j], refreshes)))
            for j in range(4) for f in ("L", "R")
        ],
        "alert_rule_test": [check(t, NAME) for t in range(0, r.long_n * i, r.checks_every)],
    }
    return [spike, quiet]


def _noisy_neighbours_case(r: _Rotations) -> dict:
    """A spike on a sidecar where most series cannot jump: 2 matrices turning 30-89 degrees
    every step (their average leaves no room for 3x), 1 all NaN, and 2 calm ones; all turn at
    once. The calm two page: counted among all five (2 / 5), they never reached the breadth."""
    p, i, n = r.p, r.p.interval, len(r.calm_n)
    noisy = held([*cycle(DEGENERATE, r.n_before), 89.0, *cycle(DEGENERATE, n - r.n_before - 1)],
                 p)
    calm = [labels(param=f"calm{j}", factor="L", k="1") for j in range(2)]
    return {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, labels(param=f"noisy{j}", factor="L", k="1"), noisy)
              for j in range(2)),
            series(ROTATION, labels(param="never", factor="L", k="1"), [float("nan")] * n),
            *(series(ROTATION, x, r.spiked) for x in calm),
        ],
        "alert_rule_test": [
            check(r.t0 - i, NAME),
            check(r.t0 + p.rot_for + i, NAME, *(expect(NAME, x, SPIKE, "warning") for x in calm)),
        ],
    }


def _lone_matrix_case(r: _Rotations) -> dict:
    """A sidecar that watches one matrix: its L turning alone is half of its two series, yet
    one matrix turning alone is an eigenvalue crossing, not a gradient spike: no page."""
    i = r.p.interval
    return {
        "interval": dur(i),
        "input_series": [
            series(ROTATION, labels(param="only", factor="L", k="1"), r.spiked),
            series(ROTATION, labels(param="only", factor="R", k="1"), r.calm_n),
        ],
        "alert_rule_test": [check(t, NAME) for t in range(0, len(r.calm_n) * i, r.checks_every)],
    }


def _next_run_case(r: _Rotations) -> dict:
    """A run ends and the next one starts on the same sidecar within the baseline's reach: the
    series have no run label, so its warm-up turns (large, all matrices at once) met the last
    run's calm baseline and paged. Its ranks' steps start over: quiet until the baseline holds
    only the new run."""
    gap = 180 // r.p.interval if r.p.name == "prod" else 3  # finished: no series for a while
    return _two_runs(r, gap, calm_first=0)


def _idle_gap_case(r: _Rotations) -> dict:
    """A run ends, its step series leave the sidecar, and the next run starts a baseline's
    length later: the old run's last steps have left the reach of a step-going-back check,
    but its series were there a reach ago, so the sidecar is not fresh either. The new run's
    warm-up (every basis turning after a few calm scrapes) paged. Its steps still went back
    from the old run's last ones (read across the gap): quiet."""
    p = r.p
    return _two_runs(r, p.rot_baseline // p.interval, calm_first=p.rot_window // p.interval + 2)


def _two_runs(r: _Rotations, gap: int, *, calm_first: int) -> dict:
    """Four matrices turning calmly through a run of a full baseline, no series for ``gap``
    scrapes, then a new run (steps from 1) whose every basis turns far after ``calm_first``
    calm scrapes, a warm-up: no page at any time."""
    p, i = r.p, r.p.interval
    first = (p.rot_window + p.rot_baseline) // i + 10  # a full baseline of calm turns
    after = (p.rot_window + p.rot_baseline) // i + 10
    warm = [85.0, 80.0, 70.0, 60.0]
    turns = held(cycle(CALM, first), p) + [None] * gap + held(
        [*cycle(CALM, calm_first), *warm, *cycle(CALM, after - calm_first - len(warm))], p)
    steps = [float(k + 1) for k in range(first)] + [None] * gap + [float(k + 1)
                                                                     for k in range(after)]
    n = first + gap + after
    return {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, labels(param=f"p{j}", factor="L", k="1"), turns) for j in range(4)),
            series("orthoshard_optimizer_step", labels(rank="0"), steps),
        ],
        "alert_rule_test": [check(t, NAME) for t in range(0, n * i, r.checks_every)],
    }


def _fresh_start_case(r: _Rotations) -> dict:
    """The first run on a sidecar (no series a baseline's reach ago): its first minutes of turns
    are the whole baseline of the minutes after, and a warm-up reorganization of every basis
    after ~2 minutes of small turns paged. Quiet until the series are a reach old; a spike after
    that pages as usual."""
    p, i = r.p, r.p.interval
    calm_first = p.rot_window // i + 2  # small turns while the bases form, then the warm-up
    warm = [85.0, 80.0, 70.0, 60.0]
    spike_at = (p.rot_window + p.rot_baseline) // i + 10  # past the reach
    n = spike_at + 1 + p.rot_window // i
    turns = held([*cycle(CALM, calm_first), *warm,
                  *cycle(CALM, spike_at - calm_first - len(warm)), SPIKE,
                  *cycle(CALM, n - spike_at - 1)], p)
    matrices = [labels(param=f"p{j}", factor="L", k="1") for j in range(4)]
    return {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, x, turns) for x in matrices),
            series("orthoshard_optimizer_step", labels(rank="0"),
                   [float(k + 1) for k in range(n)]),
        ],
        "alert_rule_test": [
            *(check(t, NAME) for t in range(0, spike_at * i, r.checks_every)),
            check(spike_at * i + p.rot_for + i, NAME,
                  *(expect(NAME, x, SPIKE, "warning") for x in matrices)),
        ],
    }


def _old_outage_case(r: _Rotations) -> dict:
    """A sidecar that was down for a few scrapes a reach before a spike: the fresh-sidecar
    guard reads whether its step series were there a reach ago, over a baseline's length, so
    the gap (staleness markers) does not pass for a fresh start, and the spike pages."""
    p, i = r.p, r.p.interval
    reach = (p.rot_window + p.rot_baseline) // i
    spike_at = 2 * reach + 10
    gap = range(spike_at - reach - 1, spike_at - reach + p.rot_for // i + 3)
    n = spike_at + 1 + p.rot_window // i
    turns = held([*cycle(CALM, spike_at), SPIKE, *cycle(CALM, n - spike_at - 1)], p)
    matrices = [labels(param=f"p{j}", factor="L", k="1") for j in range(4)]
    return {
        "interval": dur(i),
        "input_series": [
            *(series(ROTATION, x, [None if k in gap else v for k, v in enumerate(turns)])
              for x in matrices),
            series("orthoshard_optimizer_step", labels(rank="0"),
                   [None if k in gap else float(k + 1) for k in range(n)]),
        ],
        "alert_rule_test": [
            check(spike_at * i + p.rot_for + i, NAME,
                  *(expect(NAME, x, SPIKE, "warning") for x in matrices)),
        ],
    }


def rotation_tests(p: Profile) -> list[dict]:
    r = _rotations(p)
    return [_spike_case(r), _gap_case(r), _quiet_case(r), *_sparse_cases(r),
            _noisy_neighbours_case(r), _lone_matrix_case(r), _next_run_case(r),
            _idle_gap_case(r), _fresh_start_case(r), _old_outage_case(r)]


def stale_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerSnapshotStale"
    lab = labels(rank="1")
    n_live = (p.stale_after + p.stale_for) // i + 4
    n_frozen = 2 * (p.stale_after + p.stale_for) // i
    frozen_at = (n_live - 1) * i
    values: list[float | None] = [float(k * i) for k in range(n_live)]
    values += [float(frozen_at)] * n_frozen
    values += [float((n_live + n_frozen + k) * i) for k in range(n_live)]
    # one failed scrape while pending: the series went stale, the rule read nothing for an
    # evaluation, and `for:` started over (the page came a stale_for late, or never)
    gap = n_live + (p.stale_after + p.stale_for // 2) // i
    values[gap] = None
    up = [0.0 if k == gap else 1.0 for k in range(len(values))]  # the scrape that failed
    resume = (n_live + n_frozen) * i
    t_fire = frozen_at + p.stale_after + p.stale_for + 2 * i
    return [
        {
            "interval": dur(i),
            "input_series": [series("orthoshard_last_snapshot_timestamp_seconds", lab, values),
                             series("up", TARGET, up)],
            "alert_rule_test": [
                check(frozen_at, name),
                check(frozen_at + p.stale_after + i, name),  # over the limit, still pending
                check(t_fire, name, expect(name, lab, float(t_fire - frozen_at), "warning")),
                check(resume + i, name),
            ],
        },
        {
            # frozen, pending, then the run ends (Publisher.close(finished=True)): the sidecar
            # drops the timestamp, the scrapes succeed, and nothing may page on the last value
            "interval": dur(i),
            "input_series": [
                series("orthoshard_last_snapshot_timestamp_seconds", lab,
                       [*values[:n_live + (p.stale_after + p.stale_for // 2) // i - 1],
                        *[None] * n_frozen]),
                series("up", TARGET, [1.0] * len(values)),
            ],
            "alert_rule_test": [check(t, name) for t in range(frozen_at, len(values) * i, i)],
        },
    ]


def ortho_tests(p: Profile) -> list[dict]:
    i, name = p.interval, "OptimizerOrthogonalityErrorHigh"
    ortho = "orthoshard_orthogonality_error"
    bad, good, nan_lab = labels(param="w.bad"), labels(param="w.ok"), labels(param="w.nan")
    n = p.ortho_for // i + 4
    # Jordan quintic level, then broken; one failed scrape while pending (as for staleness)
    values: list[float | None] = [0.37] * n + [0.9] * (2 * n) + [0.37] * n
    gap = n + p.ortho_for // (2 * i)
    values[gap] = None
    up = [0.0 if k == gap else 1.0 for k in range(4 * n)]  # the scrape that failed
    nans = [0.004] * n + [float("nan")] * (2 * n) + [0.004] * n
    t_bad, t_end = n * i, 3 * n * i
    t_fire = t_bad + p.ortho_for + i
    elsewhere = {"job": "sidecar", "instance": "other:9400", "node": "9"}
    return [
        {
            "interval": dur(i),
            "input_series": [
                series(ortho, bad, values),
                series(ortho, good, [0.38] * (4 * n)),
                series(ortho, nan_lab, nans),
                series("up", TARGET, up),
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
        },
        {
            # broken, pending, then the run ends before `for:` is over: the sidecar drops the
            # series, the scrapes succeed, and its last value must not page
            "interval": dur(i),
            "input_series": [
                series(ortho, bad, [0.9] * (p.ortho_for // i - 2) + [None] * (3 * n)),
                series("up", TARGET, [1.0] * (4 * n)),
                # the same on a sidecar scraped under another job name: its own `up` counts
                series(ortho, {**elsewhere, "param": "w.bad"},
                       [0.9] * (p.ortho_for // i - 2) + [None] * (3 * n)),
                series("up", elsewhere, [1.0] * (4 * n)),
            ],
            "alert_rule_test": [check(t, name) for t in range(0, 4 * n * i, i)],
        },
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
    # skips for a while (less than skips_for), the trainer down (the sidecar still exports the
    # last count), then resumed from a checkpoint saved a little before: the counter goes back
    # (1012 -> 1008) and stands still. increase() read the drop as a reset and counted 1008 new
    # skips, which kept the alert pending past skips_for: a page, and a wrong count
    burst = -(-7 * p.skips_window // 10) // i
    rolled = [1000.0] * n + [1000.0 + 12.0 * k / burst for k in range(1, burst + 1)]
    rolled += [1012.0] * burst + [1008.0] * (4 * n)
    rollback = {
        "interval": dur(i),
        "input_series": [series(skips, {**lab, "node": "0", "param": "w0"}, rolled)],
        "alert_rule_test": [check(t, name) for t in range(0, len(rolled) * i, i)],
    }
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
                check(t_fire, name, expect(name, {**lab, "node": "0"}, 12.0 * p.skips_window / i,
                                           "warning")),
                check(t_stop + p.skips_window + 2 * i, name),  # resolved once they stop
            ],
        },
        rollback,
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

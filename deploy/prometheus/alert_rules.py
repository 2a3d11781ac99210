"""The orthoshard alert rules: the two profiles (windows and thresholds) and the rules, with
their annotations, rendered from them by :func:`rules_doc`.

- ``prod``: 15 s scrape and evaluation (Prometheus' usual), minutes-long windows.
- ``fast``: 1 s scrape and evaluation, seconds-long windows, for end-to-end tests on loopback.

``render_rules.py`` writes them out with their promtool tests (``rule_tests.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
# fast stale_for 7 s: the Publisher's longest default pause between retries (5 s) and a scrape,
# with room: a sidecar back from an outage exports its ranks' last times at once, and a 2 s
# `for:` paged healthy ranks before their publishers' next try reached it
FAST = Profile("fast", 1, 5, 20, 3.0, 30.0, 0.5, 2, 10, 7, 0.6, 3, 2, 1, 2, 5, 10)
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
        "with at least half of the matrices this sidecar watches whose recent turns leave "
        "room for such a jump.",
        "runbook": "Many bases turning at once means a gradient spike (bad batch, loss spike). "
        "Check the training loss over the steps before the alert fired (it fires one jump "
        "window and its for duration after the turn; orthoshard_optimizer_step on the same "
        "instance gives each rank's step; rank 0 appends the loss to loss.jsonl in the "
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
        "runbook": "The rank is hung, dead, much slower than usual, or its publisher cannot reach "
        "the sidecar (token, URL). Check the trainer logs and GET /v1/optimizer on the "
        "sidecar (with its bearer token, docs/deploy.md). A run that ended normally "
        "does not page: Publisher.close(finished=True) tells the sidecar, which then "
        "drops the rank's timestamp. A rank that exited without saying so pages until "
        "it reports again, a new run reports to the sidecar as the same rank, its last "
        "snapshot is --series-ttl (default 900 s) old while a newer run reports there, "
        "or it is finished by hand (POST /v1/ranks/RANK/finish with its run_id, "
        "docs/service.md) once it is known to be gone for good.",
    },
    "OptimizerOrthogonalityErrorHigh": {
        "summary": 'Orthogonality error of {{ $labels.param }} is {{ $value | printf "%.3f" }}',
        "description": "The orthogonalized update of {{ $labels.param }} on "
        "{{ $labels.instance }} is far from orthogonal (or not finite).",
        "runbook": "Newton-Schulz is not converging: NaN/Inf gradients, too few steps or a "
        "coefficient schedule outside its interval, or low precision. Check "
        "orthoshard_nonfinite_skips_total, ns_steps and ns_method (polar_express or cans). "
        "1.0 (to rounding) with update_rms 0 (GET /v1/params/{name} on the sidecar, with its "
        "bearer token, docs/deploy.md) is a zero update: the "
        "matrix gets an all-zero gradient and does not train. A gradient of rank r below the "
        "matrix's smaller side n reads sqrt(1 - r/n) however well it is orthogonalized (the "
        "directions it does not span stay 0: 0.71 for rank 127 of 256, the first layer of a "
        "model fed few distinct inputs); torch.linalg.matrix_rank of that parameter's gradient "
        "tells this case apart, and the alert can be silenced for that param.",
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
        "orthoshard_nonfinite_skips_total by param on the dashboard, or GET /v1/params/{name} "
        "on the sidecar (with its bearer token, docs/deploy.md). "
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
    baseline = f"avg_over_time(({ROT} > 0)[{b}:{dur(p.interval)}] offset {w})"
    # Per matrix: the largest turn of the last w, above the floor and above ratio x the average
    # turn of the b before it (offset w: the spike is never inside its own baseline). The
    # average is over the samples that hold a turn (> 0): SOAP reports 0 between refreshes, and
    # with a refresh every few minutes the zeros pulled the average down to a fraction of an
    # ordinary turn, so every refresh paged (a subquery at the scrape step reads the samples).
    jumped = f"{jump} > {num(p.rot_floor)}\nand\n{jump}\n  > {num(p.rot_ratio)} * {baseline}"
    # Breadth: a gradient spike turns (nearly) every matrix at once; a lone matrix whose top two
    # eigenvalues cross turns alone (measured, docs/deploy.md). Same target = same sidecar.
    # The denominator counts the matrices seen over the jump window, like the numerator: an
    # instant count is empty after a failed scrape, which reset the alert's `for:` and, with two
    # failed scrapes at the wrong moment, let the spike leave the window without a page.
    # Only matrices that can jump count: a turn is at most 90 degrees, so one whose recent
    # turns average 90 / ratio or more (a near-degenerate spectrum), or that has no baseline
    # yet (NaN, or new), can never pass the ratio test, and counted, such matrices kept a
    # spike of all the others from reaching the breadth.
    # At least two matrices (params, not their L and R): a lone matrix turning alone never
    # pages, also on a sidecar that watches one.
    # And not while a run started, or resumed, within the baseline's reach: the series carry
    # no run label, so a new run's warm-up turns were compared with the run before's calm
    # ones (a rank's step going back is the sign; the trade: no page for b + w after it).
    # The steps are read with each one carried for b (last_over_time): a run that started
    # after the last one's series had left the sidecar (a run's series leave at its end, and
    # the series' gap outlasted the reach) still shows its step going back, across the gap,
    # until the fresh-sidecar guard below takes over (the old series a reach ago, over b).
    # The first run on a sidecar has no run before it, and no step going back: its first
    # minutes of turns are the whole baseline of the minutes after, and a warm-up turning every
    # basis ~2 minutes in met a baseline of three small turns and paged. Kept off until the
    # sidecar's step series are a reach old, the same trade as after a resume: present at any
    # sample of the baseline's length a reach ago (an instant lookup there went empty for a
    # while a reach after any few failed scrapes, which mark the series stale).
    can_jump = f"{jump}\n    and {baseline} < {num(90.0 / p.rot_ratio)}"
    reach = dur(p.rot_window + p.rot_baseline)
    step = "orthoshard_optimizer_step"
    rotation = (
        f"{JUMP}\nand on (job, instance)\n(\n"
        f"  count by (job, instance) ({JUMP})\n"
        f"    / count by (job, instance) (\n    {can_jump}\n  )\n"
        f"  >= {num(p.rot_breadth)}\n)\n"
        f"and on (job, instance)\n"
        f"  count by (job, instance) (count by (job, instance, param) ({JUMP})) >= 2\n"
        f"unless on (job, instance)\n"
        f"  max by (job, instance) (resets(last_over_time({step}[{b}])[{reach}:{dur(p.interval)}]))"
        f" > 0\n"
        f"unless on (job, instance)\n(\n"
        f"  count by (job, instance) ({step})\n"
        f"    unless on (job, instance)\n"
        f"      count by (job, instance) (present_over_time({step}[{b}] offset {reach}))\n)"
    )
    # Across a failed scrape, the last sample of the last few scrapes: the scrape marks the
    # series stale, and an instant read returned nothing and started `for:` over. Only then
    # (the target's `up` is not 1): a series the sidecar dropped on purpose (its run ended)
    # must not page on its last value.
    last = dur(4 * p.interval)
    # (any job name: `on (job, instance)` ties `up` to the series' own target)
    failed = "unless on (job, instance) up == 1"
    stamp = "orthoshard_last_snapshot_timestamp_seconds"
    ortho = "orthoshard_orthogonality_error"
    return [
        {"record": JUMP, "expr": jumped},
        _alert("OptimizerBasisRotationSpike", rotation, p.rot_for, "warning"),
        _alert(
            "OptimizerSnapshotStale",
            f"time() - {stamp} > {p.stale_after}\nor\n"
            f"(\n  time() - last_over_time({stamp}[{last}]) > {p.stale_after}\n"
            f"  {failed}\n)",
            p.stale_for,
            "warning",
        ),
        _alert(
            "OptimizerOrthogonalityErrorHigh",
            f"{ortho} > {num(p.ortho_max)}\nor\n{ortho} != {ortho}\nor\n"
            # (`unless` binds tighter than `or`: both terms in parentheses)
            f"(\n  (\n    last_over_time({ortho}[{last}]) > {num(p.ortho_max)}\n    or\n"
            f"    last_over_time({ortho}[{last}]) != last_over_time({ortho}[{last}])\n  )\n"
            f"  {failed}\n)",
            p.ortho_for,
            "warning",
        ),
        _alert(
            "OptimizerNonfiniteUpdatesSkipped",
            # a counter that went down was restored from a checkpoint (a resume) or started
            # over (a new run): increase() read it as a reset and counted its whole value
            "sum by (job, instance, node) (\n"
            f"  increase(orthoshard_nonfinite_skips_total[{dur(p.skips_window)}])\n"
            f"  unless resets(orthoshard_nonfinite_skips_total[{dur(p.skips_window)}]) > 0\n"
            ") > 0",
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

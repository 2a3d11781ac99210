"""The demo's outputs: ``summary.json``, ``health.png`` and the terminal table."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import urllib.parse
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["HEALTH_PANELS", "health_panels", "load_health", "plot", "print_footer",
           "print_table", "write_summary"]


#: the name of each rank's health log in ``--out`` (a full-name pattern)
HEALTH_LOG = r"health-rank\d+\.jsonl"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log. A line that is no JSON object (cut short by a rank
    killed mid-write) is skipped and said once per file on stderr: the records around it
    still make the summary and the plot."""
    if not path.exists():
        return []
    records, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    if torn:
        print(f"{path}: skipped {torn} line(s) that are no JSON record (a rank killed while "
              f"writing?)", file=sys.stderr)
    return records


def load_losses(out: Path) -> dict[int, float]:
    """Loss by step (a restarted run logs some steps twice: the last entry wins)."""
    return {r["step"]: r["loss"] for r in _jsonl(out / "loss.jsonl")}


def load_health(out: Path) -> dict[str, dict[str, dict[int, float]]]:
    """``{param: {metric: {step: value}}}`` from every rank's health log. A step logged twice
    (a restart re-runs the steps after its checkpoint, at another world size by other owners,
    in another rank's log) takes the later record, by the time each record carries (a log
    written before records carried one: by rank, then line order)."""
    records = [(record.get("time", -math.inf), seq, record) for seq, record in enumerate(
        r for path in sorted(p for p in out.glob("health-rank*.jsonl")
                             if re.fullmatch(HEALTH_LOG, p.name))
        for r in _jsonl(path))]
    records.sort(key=lambda entry: entry[:2])
    series: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for _, _, record in records:
        for name, metrics in record["params"].items():
            for metric, value in metrics.items():
                series[name][metric][record["step"]] = value
    return series


def write_summary(args: argparse.Namespace, served: dict[str, Any], wall: float) -> dict:
    out: Path = args.out
    ranks = [json.loads(p.read_text()) for r in range(args.nproc)
             if (p := out / f"rank{r}.json").exists()]
    losses = load_losses(out)
    kl = any(r.get("use_kl_shampoo") for r in ranks)
    summary = {
        "optimizer": ranks[0]["optimizer"] if ranks else args.optimizer,
        "use_kl_shampoo": kl, "world_size": args.nproc, "steps": args.steps,
        "spike_at": args.spike_at, "wall_time_s": round(wall, 2),
        "initial_loss": losses[min(losses)] if losses else None,
        "final_loss": losses[max(losses)] if losses else None,
        "entropy_rate": ranks[0]["entropy_rate"] if ranks else None,
        "health": {name: metrics for r in ranks for name, metrics in r["health"].items()},
        "health_served_by_sidecar": {name: d["metrics"] for name, d in served.items()},
        "owner_rank": {name: d["rank"] for name, d in served.items()},
        # per rank, over the "steps" its last (re)start ran: a restart or resume counts anew
        "bytes_communicated": {str(r["rank"]): r["comm_stats"] for r in ranks},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# The health panels, in this order, each drawn when some matrix reports its metric: a Muon run
# shows its orthogonality error and update RMS, a SOAP run its bases (SOAP has no orthogonality
# error, Muon no basis), and any run whose updates were skipped its skip counts.
HEALTH_PANELS: tuple[tuple[str, str], ...] = (
    ("orthogonality error of the update", "orthogonality_error"),
    ("update RMS", "update_rms"),
    ("basis rotation of Q_L, top-1 (degrees)", "rotation_degrees_L_k1"),
    ("basis rotation of Q_L, top-8 span (degrees)", "rotation_degrees_L_k8"),
    ("eigengap ratio of L", "eigengap_ratio_L"),
    ("basis staleness of Q_L", "basis_staleness_L"),
    ("non-finite updates skipped (count)", "nonfinite_skips"),
)


def health_panels(health: dict[str, dict[str, dict[int, float]]]) -> list[tuple[str, str]]:
    """The :data:`HEALTH_PANELS` this run's health fills; skip counts only once one is
    non-zero (every optimizer reports them, and a flat zero says nothing)."""
    def reported(metric: str) -> bool:
        values = [v for series in health.values() for v in series.get(metric, {}).values()]
        return any(v != 0 for v in values) if metric == "nonfinite_skips" else bool(values)

    return [(title, metric) for title, metric in HEALTH_PANELS if reported(metric)]


def plot(out: Path, spike_at: int | None = None) -> Path:
    """Loss and each health metric the run reported (:func:`health_panels`) over steps, one
    panel each, one line per matrix; ``spike_at`` (the demo's ``--spike-at``, a step as the
    logs number them) marks the spike on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = load_losses(out)
    health = load_health(out)
    panels: list[tuple[str, str | None]] = [("loss", None), *health_panels(health)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.3 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, metric) in zip(axes.flat[:len(panels)], panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        if spike_at is not None and losses and min(losses) <= spike_at <= max(losses):
            # (a run resumed past the spike into this --out did not log it)
            ax.axvline(spike_at, color="red", linestyle="--", linewidth=0.8,
                       label="spike")
        if metric is None:
            ax.plot(sorted(losses), [losses[s] for s in sorted(losses)])
            if len(panels) == 1:  # (skip counts alone, all 0, make no panel either)
                ax.text(0.5, 0.9, "no health logged", ha="center", transform=ax.transAxes,
                        color="gray")
            continue
        names = [name for name in sorted(health) if health[name].get(metric)]
        for name in names:
            values = health[name][metric]
            steps = sorted(values)
            ax.plot(steps, [values[s] for s in steps], label=name, linewidth=0.8)
        if len(names) <= 12:
            ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "health.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(served: dict[str, Any], metrics: tuple[str, ...]) -> None:
    shown = [m for m in metrics if any(m in d["metrics"] for d in served.values())]
    width = max((len(n) for n in served), default=10)
    print(f"\n{'parameter':<{width}}  rank  " + "  ".join(f"{m:>22}" for m in shown))
    for name in sorted(served):
        d = served[name]
        cells = [d["metrics"].get(m) for m in shown]
        text = [f"{v:>22.4g}" if isinstance(v, (int, float)) else f"{'-':>22}" for v in cells]
        print(f"{name:<{width}}  {d['rank']:>4}  " + "  ".join(text))


def print_footer(args: argparse.Namespace, summary: dict, url: str) -> None:
    opt = summary["optimizer"]
    if opt == "SOAP":
        opt += " (KL-Shampoo factors)" if summary["use_kl_shampoo"] \
            else " (plain Shampoo factors)"
    counted = summary["bytes_communicated"].values()
    sent = sum(v["bytes_sent"] for v in counted)
    steps = max((v.get("steps", 0) for v in counted), default=0)
    first, last, entropy = (summary[k] for k in ("initial_loss", "final_loss", "entropy_rate"))
    loss = "no loss logged" if first is None or last is None else \
        f"loss {first:.3f} -> {last:.3f}"
    if entropy is not None:
        loss += f" (chain entropy {entropy:.3f})"
    # comm_stats count from each rank's last (re)start: after a restart, not the whole run
    total = summary.get("steps")
    since = "since the last (re)start" if total is not None and steps < total else "this run took"
    print(f"\noptimizer: {opt}; {loss}; optimizer bytes sent, all ranks: {sent:,} over the "
          f"{steps} steps {since}")
    # the demo's sidecar stops at the end, unless --linger keeps it serving
    when = "stops when the demo ends" if getattr(args, "linger", 0) == 0 else "serving"
    print(f"sidecar:   {url}/metrics   {url}/v1/params   ({when}; bearer token in "
          f"{args.out / 'sidecar.token'})")
    print(f"outputs:   {args.out / 'summary.json'}   {args.out / 'health.png'}")
    port = urllib.parse.urlsplit(url).port
    # shell-quoted: the line is to be pasted, and an --out with a space broke it
    db, token = (shlex.quote(str(args.out / name)) for name in ("sidecar.db", "sidecar.token"))
    print(f"history:   {_command()} sidecar --port {port} --db {db} --token-file {token}   "
          f"serves it again after the demo")


def _command() -> str:
    """How to run ``orthoshard`` from this shell: the bare name when it is on the PATH (an
    active venv), else the entry point beside this interpreter (``.venv/bin/orthoshard``,
    which ``bash scripts/demo.sh`` sets up without activating)."""
    beside = Path(sys.executable).parent / "orthoshard"
    found = shutil.which("orthoshard")
    if found is not None and Path(found).resolve() == beside.resolve():
        return "orthoshard"
    if beside.exists():
        try:
            return shlex.quote(str(beside.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m orthoshard.cli"

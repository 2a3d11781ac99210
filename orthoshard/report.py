"""The demo's outputs: ``summary.json``, ``health.png`` and the terminal table."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["load_health", "plot", "print_footer", "print_table", "write_summary"]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_losses(out: Path) -> dict[int, float]:
    """Loss by step (a restarted run logs some steps twice: the last entry wins)."""
    return {r["step"]: r["loss"] for r in _jsonl(out / "loss.jsonl")}


def load_health(out: Path) -> dict[str, dict[str, dict[int, float]]]:
    """``{param: {metric: {step: value}}}`` from every rank's health log."""
    series: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(out.glob("health-rank*.jsonl")):
        for record in _jsonl(path):
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


def plot(out: Path) -> Path:
    """Loss, basis rotation (top-1 and top-8), eigengap, orthogonality error and basis staleness
    over steps, one panel each; a metric the optimizer does not report says so in its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = load_losses(out)
    health = load_health(out)
    panels = [("loss", None),
              ("basis rotation of Q_L, top-1 (degrees)", "rotation_degrees_L_k1"),
              ("basis rotation of Q_L, top-8 span (degrees)", "rotation_degrees_L_k8"),
              ("eigengap ratio of L", "eigengap_ratio_L"),
              ("orthogonality error of the update", "orthogonality_error"),
              ("basis staleness of Q_L", "basis_staleness_L")]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (title, metric) in zip(axes.flat, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        if metric is None:
            ax.plot(sorted(losses), [losses[s] for s in sorted(losses)])
            continue
        drawn = 0
        for name in sorted(health):
            values = health[name].get(metric)
            if values:
                steps = sorted(values)
                ax.plot(steps, [values[s] for s in steps], label=name, linewidth=0.8)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, f"{metric}\nnot reported by this optimizer", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
        elif drawn <= 12:
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
    print(f"\noptimizer: {opt}; {loss}; optimizer bytes sent, all ranks: {sent:,} over the "
          f"{steps} steps this run took")
    print(f"sidecar:   {url}/metrics   {url}/v1/params   (bearer token in "
          f"{args.out / 'sidecar.token'})")
    print(f"outputs:   {args.out / 'summary.json'}   {args.out / 'health.png'}")
    print(f"history:   orthoshard sidecar --db {args.out / 'sidecar.db'} --token-file "
          f"{args.out / 'sidecar.token'}   serves it again after the demo")

"""OwnerSharding against the naive full_tensor() way and torch.optim.Muon on FSDP2, CPU gloo.

    .venv/bin/python bench/sharding.py [--quick] [--worlds 2 4] [--steps N] [--no-soap]
    orthoshard bench sharding [--quick]

W gloo ranks are spawned here (torch.multiprocessing, a file store, a hard timeout), each with
one thread. Every rank builds the same ``orthoshard.model.GPT`` under FSDP2 (``shard_gpt``), and
the optimizers below step its block matrices (qkv, proj, fc, out of every layer: P elements in
total; embeddings, norms and head are not stepped) on the SAME injected gradients:

  ours   ``optim.Muon(..., sharding=OwnerSharding())``: one all-to-all in, one out.
  naive  every rank turns each (sharded) Muon update input into the full matrix with
         ``full_tensor()``, orthogonalizes EVERY matrix with the same kernel
         (``optim.orthogonalize``, quintic, 5 steps, same-shape matrices batched as ours does),
         and keeps its own rows. Same arithmetic as ours, W times over.
  torch  ``torch.optim.Muon`` on the FSDP2 DTensors (DTensor ops hide the communication).

Bytes are counted per rank by a ``TorchDispatchMode`` that sees every collective - the c10d ops
``dist.*`` calls and the functional collectives DTensor uses - in separate, untimed steps, with
these conventions (what a ring implementation puts on the wire per rank, sent = received):
all_to_all: the splits to/from the other ranks; all_gather: (W-1) x the local input;
all_reduce: 2 (W-1)/W x the tensor; reduce_scatter: (W-1)/W x the input. For ours the count is
cross-checked against ``optimizer.comm_stats()``. The design's budget is
``2 (W-1)/W^2 P`` elements per rank (float32: 4 bytes each).

Step time is ``optimizer.step()`` alone (gradients injected outside the timer), the maximum over
ranks of one step (the step is as slow as the slowest rank), median over the timed steps; the
three optimizers are interleaved step by step so machine noise hits them alike. The machine is
shared (2 cores here): W=4 runs 4 single-thread ranks on 2 cores, so only ratios measured in one
run mean anything.

Memory, per rank, max over ranks: the optimizer's state (local shards of DTensor state; the
naive SOAP's full parameter copies and their state too), and the peak a step allocates beyond
what it started with (``torch.profiler``'s CPU allocation events summed over time), taken in one
more untimed step.

A SOAP row compares ``optim.SOAP(sharding=OwnerSharding())`` with the naive way (full_tensor()
of every gradient, a replicated single-process SOAP on full copies, own rows kept); there is no
torch SOAP. The plan table (no processes) gives max/mean owner cost and the per-rank worst bytes
over the budget for the benchmark model and a 24-layer d=1024 transformer at W = 2, 4, 8, 16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file is named like the `sharding` package: run as a script, its own directory would be
# sys.path[0] and `import sharding` would import this file. Drop that entry first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # the repository root: `bench.muon`, and the packages

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from bench._cli import exit_on_signals, positive_float, positive_int  # noqa: E402
from bench._sharding_baselines import (  # noqa: E402
    CommCounter,
    NaiveMuon,
    NaiveSOAP,
    nbytes,
)

FLOAT32 = 4
MATRIX_SUFFIXES = ("qkv.weight", "proj.weight", "fc.weight", "out.weight")


# ---- models and shapes ------------------------------------------------------------------------
def model_config(quick: bool, soap: bool = False) -> dict[str, int]:
    if soap:  # SOAP's eigenbasis refresh is O(d^3) per side per step: a smaller model
        return {"d_model": 64, "n_layers": 2} if quick else {"d_model": 128, "n_layers": 2}
    return {"d_model": 64, "n_layers": 2} if quick else {"d_model": 256, "n_layers": 4}


def block_shapes(d: int, layers: int) -> list[tuple[int, int]]:
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def build_model(cfg: dict[str, int]) -> Any:
    from orthoshard.model import GPT, GPTConfig, shard_gpt

    torch.manual_seed(0)
    return shard_gpt(GPT(GPTConfig(vocab=64, seq_len=32, n_heads=4, **cfg)))


def matrices(model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith(MATRIX_SUFFIXES)]


def inject(params: list[tuple[str, Any]], step: int) -> None:
    """The same full gradient on every rank; each rank keeps its Shard(0) piece (no comms)."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(1000 + step)
    for _, p in params:
        full = torch.randn(p.shape, generator=g)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


# ---- memory -----------------------------------------------------------------------------------
def optimizer_bytes(opt: Any) -> int:
    """Bytes this rank holds for the optimizer beyond the model: its state tensors (a DTensor's
    local shard), and for the naive SOAP also the full parameter copies it steps."""
    if isinstance(opt, NaiveMuon):
        tensors = list(opt.bufs)
    elif isinstance(opt, NaiveSOAP):
        tensors = [*opt.shadow, *(v for st in opt.opt.state.values() for v in st.values())]
    else:
        tensors = [v for st in opt.state.values() for v in st.values()]
    return sum(nbytes(t.to_local() if isinstance(t, DTensor) else t)
               for t in tensors if isinstance(t, torch.Tensor))


def step_peak_bytes(opt: Any, params: list[tuple[str, Any]], step: int) -> int:
    """The most memory one ``opt.step()`` has allocated at any moment beyond what it started
    with (exchange buffers, gathered matrices, Newton-Schulz and SOAP temporaries), on this
    rank (:func:`bench.muon.peak_allocation`, after a step on the same gradients inside the
    profile, so that the state buffers a step replaces are seen released)."""
    from bench.muon import peak_allocation

    inject(params, step)
    dist.barrier()
    return peak_allocation(opt.step, warm=opt.step)


# ---- one rank ---------------------------------------------------------------------------------
def _make(kind: str, params: list[tuple[str, Any]], lr: float) -> Any:
    from optim import Muon
    from optim.soap import SOAP
    from sharding import OwnerSharding

    tensors = [p for _, p in params]
    if kind == "ours":
        return Muon(params, lr=lr, sharding=OwnerSharding(), health_every=0)
    if kind == "naive":
        return NaiveMuon(tensors, lr=lr)
    if kind == "torch":
        return torch.optim.Muon(tensors, lr=lr)
    if kind == "soap_ours":
        return SOAP(params, lr=3e-3, sharding=OwnerSharding(), health_every=0)
    if kind == "soap_naive":
        return NaiveSOAP(tensors, lr=3e-3, health_every=0)
    raise ValueError(kind)


def run_group(rank: int, world: int, kinds: list[str], cfg: dict[str, int], steps: int,
              count_steps: int) -> dict[str, Any]:
    """Interleaved timed steps of each optimizer on its own copy of the model; then bytes."""
    runs = {}
    for kind in kinds:
        model = build_model(cfg)
        params = matrices(model)
        runs[kind] = (model, params, _make(kind, params, 0.02))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for step in range(steps + 2):  # two warm-up steps
        for kind, (_, params, opt) in runs.items():
            inject(params, step)
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if step >= 2:
                times[kind].append(time.perf_counter() - t0)
    out: dict[str, Any] = {}
    for kind, (_, params, opt) in runs.items():
        before = opt.comm_stats() if hasattr(opt, "comm_stats") else None
        with CommCounter(world) as counter:
            for step in range(count_steps):
                inject(params, steps + 2 + step)
                opt.step()
        stats = None
        if before is not None:
            after = opt.comm_stats()
            stats = {k: (after[k] - before[k]) / count_steps for k in after}
        # A second, independent count of the collectives: torch's own CommDebugMode.
        from torch.distributed.tensor.debug import CommDebugMode

        with CommDebugMode() as debug:
            inject(params, steps + 2 + count_steps)
            opt.step()
        out[kind] = {"times": times[kind], "sent": counter.sent / count_steps,
                     "received": counter.received / count_steps,
                     "calls": {k: v / count_steps for k, v in counter.calls.items()},
                     "comm_stats": stats, "debug_calls": debug.get_total_counts(),
                     "state_bytes": optimizer_bytes(opt),
                     "peak_bytes": step_peak_bytes(opt, params, steps + 3 + count_steps),
                     "params": {n: p.full_tensor().detach() for n, p in params}}
    return out


def worker(rank: int, world: int, store: str, out: str, jobs: list[dict[str, Any]]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = [run_group(rank, world, **job) for job in jobs]
        gathered: list[Any] = [None] * world
        keys = ("times", "sent", "received", "state_bytes", "peak_bytes")
        dist.all_gather_object(gathered, [{k: {key: v[key] for key in keys}
                                            for k, v in r.items()} for r in results])
        if rank == 0:
            for j, r in enumerate(results):
                for kind, v in r.items():
                    for key in keys:
                        v[f"rank_{key}"] = [g[j][kind][key] for g in gathered]
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, jobs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        store, out = f"{tmp}/store", f"{tmp}/out.pt"
        ctx = mp.start_processes(worker, args=(world, store, out, jobs), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"W={world}: not done in {timeout:.0f} s; killed")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return torch.load(out)


# ---- reporting --------------------------------------------------------------------------------
def step_time(v: dict[str, Any]) -> float:
    """Median over steps of the slowest rank's step time."""
    per_step = [max(ts) for ts in zip(*v["rank_times"], strict=True)]
    return statistics.median(per_step)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def report_muon(world: int, r: dict[str, Any], n_elements: int) -> list[str]:
    budget = 2 * (world - 1) / world**2 * n_elements * FLOAT32
    ours, naive, tm = r["ours"], r["naive"], r["torch"]
    t = {k: step_time(v) for k, v in r.items()}
    cs = ours["comm_stats"]
    worst = {k: max(max(v["rank_sent"]), max(v["rank_received"])) for k, v in r.items()}
    mem = {k: (max(v["rank_state_bytes"]), max(v["rank_peak_bytes"])) for k, v in r.items()}
    lines = [
        f"| W={world} | bytes/rank (max of sent, received) | ours: {worst['ours'] / 1e6:.3f} MB"
        f" | naive: {worst['naive'] / 1e6:.3f} MB | torch: {worst['torch'] / 1e6:.3f} MB |",
        f"| W={world} | ours bytes / budget 2(W-1)/W^2 P | {worst['ours'] / budget:.3f} | "
        f"naive / budget {worst['naive'] / budget:.2f} | torch / budget {worst['torch'] / budget:.2f} |",
        f"| W={world} | ours bytes / naive, / torch | {worst['ours'] / worst['naive']:.3f} | "
        f"{worst['ours'] / worst['torch']:.4f} | |",
        f"| W={world} | step time ms (median of slowest rank) | ours {t['ours'] * 1e3:.1f} | "
        f"naive {t['naive'] * 1e3:.1f} | torch {t['torch'] * 1e3:.1f} |",
        f"| W={world} | ours time / naive, / torch | {t['ours'] / t['naive']:.3f} | "
        f"{t['ours'] / t['torch']:.3f} | |",
        f"| W={world} | collectives per step | ours {sum(ours['calls'].values()):.0f} | "
        f"naive {sum(naive['calls'].values()):.0f} | torch {sum(tm['calls'].values()):.0f} |",
        f"| W={world} | collectives per step, torch CommDebugMode | ours {ours['debug_calls']} | "
        f"naive {naive['debug_calls']} | torch {tm['debug_calls']} |",
        f"| W={world} | rank-0 comm_stats() sent/received vs counted | "
        f"{cs['bytes_sent']:.0f} / {cs['bytes_received']:.0f} | "
        f"{ours['sent']:.0f} / {ours['received']:.0f} | |",
        f"| W={world} | optimizer state MB per rank (max over ranks) | ours "
        f"{mem['ours'][0] / 1e6:.3f} | naive {mem['naive'][0] / 1e6:.3f} | torch "
        f"{mem['torch'][0] / 1e6:.3f} |",
        f"| W={world} | ours state / naive, / torch | "
        f"{mem['ours'][0] / mem['naive'][0]:.3f} | {mem['ours'][0] / mem['torch'][0]:.3f} | |",
        f"| W={world} | step peak allocation MB per rank (max over ranks) | ours "
        f"{mem['ours'][1] / 1e6:.3f} | naive {mem['naive'][1] / 1e6:.3f} | torch "
        f"{mem['torch'][1] / 1e6:.3f} |",
        f"| W={world} | ours step peak / naive, / torch | "
        f"{mem['ours'][1] / mem['naive'][1]:.3f} | {mem['ours'][1] / mem['torch'][1]:.3f} | |",
        f"| W={world} | max abs param diff after all steps, vs ours | naive "
        f"{max_diff(naive['params'], ours['params']):.1e} | torch "
        f"{max_diff(tm['params'], ours['params']):.1e} | |",
    ]
    for kind in ("naive", "torch"):
        calls = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r[kind]["calls"].items()))
        lines.append(f"| W={world} | {kind} collectives per step by op | {calls} | | |")
    uncounted = {k for v in r.values() for k in v["calls"] if k.startswith("UNCOUNTED")}
    if uncounted:
        lines.append(f"| W={world} | collectives not counted in bytes | {sorted(uncounted)} | | |")
    return lines


def report_soap(world: int, r: dict[str, Any], n_elements: int) -> list[str]:
    budget = 2 * (world - 1) / world**2 * n_elements * FLOAT32
    ours, naive = r["soap_ours"], r["soap_naive"]
    w_ours = max(max(ours["rank_sent"]), max(ours["rank_received"]))
    w_naive = max(max(naive["rank_sent"]), max(naive["rank_received"]))
    t_ours, t_naive = step_time(ours), step_time(naive)
    state = max(ours["rank_state_bytes"]) / max(naive["rank_state_bytes"])
    peak = max(ours["rank_peak_bytes"]) / max(naive["rank_peak_bytes"])
    return [f"| W={world} | SOAP | {w_ours / budget:.3f} | {w_ours / w_naive:.3f} | "
            f"{t_ours * 1e3:.1f} | {t_naive * 1e3:.1f} | {t_ours / t_naive:.3f} | "
            f"{max(ours['rank_state_bytes']) / 1e6:.2f} | {state:.3f} | "
            f"{max(ours['rank_peak_bytes']) / 1e6:.2f} | {peak:.3f} | "
            f"{max_diff(naive['params'], ours['params']):.1e} |"]


def muon_cost(s: tuple[int, int]) -> float:
    return float(s[0] * s[1] * min(s))


def soap_cost(s: tuple[int, int]) -> float:
    return float(sum(d**3 + s[0] * s[1] * d for d in s))


COSTS = {"Muon m n min(m,n)": muon_cost, "SOAP m^3+n^3+mn(m+n)": soap_cost}


def plan_table(models: list[tuple[str, list[tuple[int, int]], list[str]]]) -> list[str]:
    """Max/mean owner cost and worst-rank elements over the budget of the LPT plan."""
    from sharding.plan import build_plan, load_balance

    lines = ["| model | cost model | W | max/mean owner cost | worst rank bytes / budget |",
             "|---|---|---|---|---|"]
    for label, shapes, cost_names in models:
        total = sum(m * n for m, n in shapes)
        for cname in cost_names:
            costs = [COSTS[cname](s) for s in shapes]
            for world in (2, 4, 8, 16):
                plan = build_plan(shapes, [True] * len(shapes), costs, world)
                worst = max(max(plan.elements_sent(r), plan.elements_received(r))
                            for r in range(world))
                budget = 2 * (world - 1) / world**2 * total
                lines.append(f"| {label} ({len(shapes)} matrices) | {cname} | {world} | "
                             f"{load_balance(costs, plan.owners, world):.3f} | "
                             f"{worst / budget:.3f} |")
    return lines


def code_version() -> str:
    """The commit the measured code is at, and whether optim/ or sharding/ differ from it."""
    import subprocess

    root = _HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "optim", "sharding"],
                               cwd=root, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    changed = sorted(line[3:] for line in dirty.splitlines())
    return f"commit {head}" + (f", uncommitted changes in {', '.join(changed)}" if changed else "")


def world_size(text: str) -> int:
    """argparse type: a world size of at least 2 (the budget 2 (W-1)/W^2 P is 0 at one rank,
    and the report divides by it)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps")
    parser.add_argument("--worlds", type=world_size, nargs="+", default=[2, 4],
                        help="world sizes, each >= 2 (one rank has nothing to exchange)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per optimizer")
    parser.add_argument("--no-soap", action="store_true", help="skip the SOAP row")
    parser.add_argument("--timeout", type=positive_float, default=1800.0,
                        help="per world size, seconds")
    args = parser.parse_args()
    exit_on_signals()  # spawn()'s finally stops the rank processes
    steps = args.steps or (5 if args.quick else 15)
    cfg, soap_cfg = model_config(args.quick), model_config(args.quick, soap=True)
    shapes = block_shapes(cfg["d_model"], cfg["n_layers"])
    soap_shapes = block_shapes(soap_cfg["d_model"], soap_cfg["n_layers"])
    p, p_soap = sum(m * n for m, n in shapes), sum(m * n for m, n in soap_shapes)
    print(f"# OwnerSharding benchmark ({datetime.date.today()}, torch {torch.__version__}, CPU "
          f"gloo, 1 thread per rank, {os.cpu_count()} CPUs; Muon model GPT d={cfg['d_model']} "
          f"x {cfg['n_layers']} layers: {len(shapes)} matrices, P = {p / 1e6:.3f} M; "
          f"median over {steps} timed steps of the slowest rank; {code_version()})\n")
    muon_lines, soap_lines = [], []
    for world in args.worlds:
        jobs = [{"kinds": ["ours", "naive", "torch"], "cfg": cfg, "steps": steps,
                 "count_steps": 2}]
        if not args.no_soap:
            jobs.append({"kinds": ["soap_ours", "soap_naive"], "cfg": soap_cfg,
                         "steps": max(3, steps // 3), "count_steps": 1})
        t0 = time.monotonic()
        try:
            results = spawn(world, jobs, args.timeout)
        except TimeoutError as exc:
            raise SystemExit(f"{exc}: pass a larger --timeout (now {args.timeout:g} s) or "
                             f"fewer --steps") from None
        print(f"(W={world} ran in {time.monotonic() - t0:.0f} s)", file=sys.stderr)
        muon_lines += report_muon(world, results[0], p)
        if not args.no_soap:
            soap_lines += report_soap(world, results[1], p_soap)
    print("## Muon: ours (OwnerSharding) vs naive full_tensor() vs torch.optim.Muon on DTensors\n")
    print("| W | quantity | | | |\n|---|---|---|---|---|")
    print("\n".join(muon_lines))
    if soap_lines:
        print(f"\n## SOAP: ours vs naive (GPT d={soap_cfg['d_model']} x {soap_cfg['n_layers']}, "
              f"P = {p_soap / 1e6:.3f} M; median over {max(3, steps // 3)} timed steps)\n")
        print("| W | optimizer | ours bytes / budget | ours bytes / naive | ours ms | naive ms "
              "| ours time / naive | ours state MB/rank | state / naive | ours step peak MB/rank "
              "| peak / naive | max abs param diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(soap_lines))
    print("\n## Ownership plan (no processes)\n")
    muon_c, soap_c = list(COSTS)
    print("\n".join(plan_table([
        (f"Muon bench d={cfg['d_model']} x {cfg['n_layers']}", shapes, [muon_c]),
        (f"SOAP bench d={soap_cfg['d_model']} x {soap_cfg['n_layers']}", soap_shapes, [soap_c]),
        ("24-layer d=1024", block_shapes(1024, 24), [muon_c, soap_c])])))
    print("\n" + json.dumps({"targets": "ours bytes / budget <= 1.05; ours time / naive <= 0.5 "
                                        "at W=4"}))


if __name__ == "__main__":
    main()

"""Muon step time against torch.optim.Muon, and the cost of live health.

    .venv/bin/python bench/muon.py [--quick] [--steps N] [--threads N] [--cpu-time]
    orthoshard bench muon [--quick]

The matrices of a small 2-layer transformer block stack (d_model 256, MLP 1024: per layer
Q, K, V, O of 256x256, up 1024x256, down 256x1024). Gradients are fixed random tensors so both
optimizers do identical work. Each timed step is interleaved between the two optimizers being
compared, and the table shows medians: the machine is shared and noisy, so only the ratio
measured in one process means anything. Its last column holds the quartiles of the per-round
ratios (each round times both back to back): at two threads on this machine they span about
+-5% around the ratio of medians, which itself moves by about +-1.5% from run to run.

Ratios: our ``Muon`` / ``torch.optim.Muon`` (same arguments; ours batches same-shape matrices),
and ``Muon(health_every=1)`` / ``Muon(health_every=0)`` (target < 1.05; the orthogonality error
of the default quintic estimated from 16 probes on matrices whose smaller side is above 64,
exact at 64 and below: on the ``--quick`` stack, all of whose smaller sides are 64, this row
measures what the next one does), the same with the exact Gram
(``health_probes=0``) and for Polar Express (exact by default), plus NorMuon, and the
same health ratio for a whole training step of a small GPT (forward and backward included). Our
optimizers' timed step includes an ``optimizer.health()`` call, as a trainer publishing every
step makes it. A last table gives each optimizer's step peak allocation (``torch.profiler``
CPU allocation events, after a step inside the profile: see :func:`peak_allocation`) against
torch.optim.Muon's, with ours batched (the default) and one matrix at a time. ``--cpu-time`` times with
``time.thread_time`` (this thread's CPU time: other jobs on a shared machine do not inflate it;
it needs ``--threads 1``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from bench._cli import check_cpu_time, positive_int, ratio_quartiles
from optim import Muon, NorMuon


def shapes(quick: bool) -> list[tuple[int, int]]:
    d, ff, layers = (64, 256, 2) if quick else (256, 1024, 2)
    per_layer = [(d, d)] * 4 + [(ff, d), (d, ff)]
    return per_layer * layers


def make(shape_list: list[tuple[int, int]]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shape_list]
    grads = [torch.randn(s, generator=g) for s in shape_list]
    return params, grads


CLOCK = time.perf_counter


def timed_step(opt: torch.optim.Optimizer, params, grads) -> float:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    t0 = CLOCK()
    opt.step()
    if hasattr(opt, "health"):
        opt.health()
    return CLOCK() - t0


def peak_allocation(run, warm=None) -> int:
    """The most memory ``run()`` has allocated at any moment beyond what it started with: the
    running sum of ``torch.profiler``'s CPU allocation events (this process).

    The profiler records no release of a block allocated before it started (it warns: "Memory
    block of unknown size was allocated before the profiling started"), so a step that swaps a
    state tensor's storage for a new one (our momentum commit: the new buffer moves in, the old
    one is freed) would count every new buffer and no old one: P too much by the last matrix.
    ``warm`` (one step) runs first inside the profile, so that the blocks ``run`` releases are
    known; the peak is counted from the start of ``run``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if warm is not None:
            warm()
        with record_function(_MEASURED):
            run()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    start = next(e.start_ns() for e in events if e.name() == _MEASURED)
    running = peak = base = 0
    for e in events:
        if e.name() != "[memory]":
            continue
        running += e.nbytes()
        if e.start_ns() >= start:
            peak = max(peak, running - base)
        else:
            base = running
    return peak


_MEASURED = "bench.peak_allocation.run"


def step_peak_bytes(opt: torch.optim.Optimizer, params, grads) -> int:
    """:func:`peak_allocation` of one step and ``health()``, after one such step (``warm``)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def run() -> None:
        opt.step()
        if hasattr(opt, "health"):
            opt.health()

    return peak_allocation(run, warm=run)


def one_per_batch(opt: Muon) -> Muon:
    """``opt`` computing one matrix at a time (``MAX_BATCH_BYTES`` below any matrix)."""
    opt.MAX_BATCH_BYTES = 1
    return opt


def memory_rows(shape_list) -> list[str]:
    """Step peak allocation of each optimizer against torch.optim.Muon's, in one process (after
    two steps, so that the state exists), and against P, the matrices' fp32 bytes."""
    kw = {"lr": 0.02}
    factories = {"torch.optim.Muon": lambda p: torch.optim.Muon(p, **kw),
                 "ours Muon (health every step)": lambda p: Muon(p, **kw),
                 "ours NorMuon (health every step)": lambda p: NorMuon(p, **kw),
                 "ours Muon, one matrix per batch": lambda p: one_per_batch(Muon(p, **kw)),
                 "ours NorMuon, one matrix per batch":
                     lambda p: one_per_batch(NorMuon(p, **kw))}
    n_bytes = 4 * sum(a * b for a, b in shape_list)
    peaks = {}
    for name, factory in factories.items():
        params, grads = make(shape_list)
        opt = factory(params)
        for _ in range(2):
            timed_step(opt, params, grads)
        peaks[name] = step_peak_bytes(opt, params, grads)
    base = peaks["torch.optim.Muon"]
    return [f"| {name} | {peak / 1e6:.2f} | {peak / n_bytes:.2f} | {peak / base:.2f} |"
            for name, peak in peaks.items()]


def compare(label: str, factories: dict[str, callable], shape_list, steps: int) -> dict:
    runs = {}
    for name, factory in factories.items():
        params, grads = make(shape_list)
        runs[name] = (factory(params), params, grads, [])
    for _ in range(3):  # warm-up
        for opt, params, grads, _ in runs.values():
            timed_step(opt, params, grads)
    order = list(runs.values())
    for step in range(steps):
        # each round in the other order: whichever runs first in a round meets the caches and
        # the frequency the last one left, and a fixed order put that on one side of the ratio
        for opt, params, grads, times in (order if step % 2 == 0 else order[::-1]):
            times.append(timed_step(opt, params, grads))
    return {name: times for name, (_, _, _, times) in runs.items()}


def row(label: str, num: list[float], den: list[float]) -> str:
    """A table row: the medians, their ratio, and the quartiles of the per-round ratios (each
    round times the numerator and the denominator back to back, so a round's ratio shares that
    moment's load on the machine: the spread says how far one run's ratio can be trusted)."""
    paired = [a / b for a, b in zip(num, den, strict=True)]
    q1, q3 = ratio_quartiles(paired)
    on, off = statistics.median(num), statistics.median(den)
    return f"| {label} | {on * 1e3:.1f} | {off * 1e3:.1f} | {on / off:.3f} | {q1:.3f}-{q3:.3f} |"


def training_step_times(steps: int, quick: bool, optimizer: type = Muon, **kwargs
                        ) -> tuple[list[float], list[float]]:
    """Median full training step (forward, backward, optimizer step, ``health()``) of a small
    GPT (``orthoshard.model``, d_model 256, 2 layers, 16 x 128 tokens) with health every step
    against never: what health costs a training loop rather than the optimizer alone.
    ``optimizer(param_groups, health_every=..., **kwargs)`` builds the optimizer (default Muon,
    lr 0.02)."""
    from optim import split_param_groups
    from orthoshard.model import GPT, GPTConfig

    cfg = GPTConfig(vocab=64, seq_len=128, d_model=64 if quick else 256, n_layers=2, n_heads=4)
    tokens = torch.randint(0, cfg.vocab, (16, cfg.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    runs = []
    for every in (1, 0):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = optimizer(split_param_groups(model.named_parameters()), health_every=every,
                        **(kwargs or {"lr": 0.02}))
        runs.append((model, opt, []))

    def one(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = CLOCK()
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.health()
        return CLOCK() - t0

    for _ in range(3):
        for model, opt, _ in runs:
            one(model, opt)
    for step in range(steps):
        for model, opt, times in (runs if step % 2 == 0 else runs[::-1]):  # as compare()
            times.append(one(model, opt))
    return runs[0][2], runs[1][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per optimizer")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time.thread_time, not wall (needs --threads 1)")
    args = parser.parse_args()
    check_cpu_time(parser, args.cpu_time, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    steps = args.steps or (10 if args.quick else 30)
    shape_list = shapes(args.quick)
    n_params = sum(a * b for a, b in shape_list)
    print(f"# Muon step-time benchmark (torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {len(shape_list)} matrices, {n_params / 1e6:.2f} M params, median of "
          f"{steps} interleaved steps, {'CPU' if args.cpu_time else 'wall'} time)\n")
    kw = {"lr": 0.02}
    rows = [
        ("ours Muon / torch.optim.Muon",
         {"ours": lambda p: Muon(p, **kw, health_every=0),
          "torch": lambda p: torch.optim.Muon(p, **kw)}),
        ("ours Muon (health every step) / torch.optim.Muon",
         {"ours": lambda p: Muon(p, **kw, health_every=1),
          "torch": lambda p: torch.optim.Muon(p, **kw)}),
        ("Muon health_every=1 / health_every=0",
         {"ours": lambda p: Muon(p, **kw, health_every=1),
          "torch": lambda p: Muon(p, **kw, health_every=0)}),
        ("Muon health_every=1, exact (health_probes=0) / health_every=0",
         {"ours": lambda p: Muon(p, **kw, health_every=1, health_probes=0),
          "torch": lambda p: Muon(p, **kw, health_every=0)}),
        ("Muon Polar Express health_every=1 (exact) / health_every=0",
         {"ours": lambda p: Muon(p, **kw, ns_method="polar_express", health_every=1),
          "torch": lambda p: Muon(p, **kw, ns_method="polar_express", health_every=0)}),
        ("NorMuon health_every=1 / health_every=0",
         {"ours": lambda p: NorMuon(p, **kw, health_every=1),
          "torch": lambda p: NorMuon(p, **kw, health_every=0)}),
        ("NorMuon / torch.optim.Muon",
         {"ours": lambda p: NorMuon(p, **kw, health_every=0),
          "torch": lambda p: torch.optim.Muon(p, **kw)}),
        ("Muon one matrix per batch / batched (the default MAX_BATCH_BYTES)",
         {"ours": lambda p: one_per_batch(Muon(p, **kw)), "torch": lambda p: Muon(p, **kw)}),
    ]
    print("| comparison | numerator ms | denominator ms | ratio | per-round ratios, quartiles |")
    print("|---|---|---|---|---|")
    for label, factories in rows:
        t = compare(label, factories, shape_list, steps)
        print(row(label, t["ours"], t["torch"]))
    print(row("GPT training step (fwd + bwd + Muon), health_every=1 / 0",
              *training_step_times(steps, args.quick)))
    print("\n| step peak allocation (one process) | MB | / P (fp32 bytes of the matrices) "
          "| / torch.optim.Muon |\n|---|---|---|---|")
    print("\n".join(memory_rows(shape_list)))


if __name__ == "__main__":
    main()

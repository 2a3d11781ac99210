"""What SOAP's health costs per step: ``health_every=1`` against ``health_every=0``.

    .venv/bin/python bench/soap_health.py [--shapes 128x64,512x256] [--model] [--quick]
                                          [--steps N] [--threads N] [--cpu-time]

Lone matrices: one matrix per optimizer, the two optimizers stepped alternately in one process
(their order swapped every step), each health step including ``health()``; medians after the
first fifth of the steps (with a refresh every 10 steps: of the sums over whole periods). Rows: QR
(power iteration), eigh, KL-Shampoo with QR, the three refreshing every 10 steps, and QR
refreshing every 10 steps with ``health_every=10`` (health at the refreshes only). A lone
small matrix is health's worst case: most of its cost is small tensor operations and LAPACK
calls on 8x8 matrices, which do not shrink with the matrix.

``--model``: the same ratio on the 12 matrices of ``bench/muon.py``'s transformer stack (d_model
256, MLP 1024, 2 layers; ``--quick``: 64 / 256), and for a whole training step of the small GPT
``bench/muon.py`` times (forward, backward, SOAP step, ``health()``), refreshing every step and
every 10 steps (the latter as means over whole periods of 10 steps, at least 60 steps). The
machine is shared and noisy, so only the ratio measured in one process means anything (target
< 1.05); the last column holds the quartiles of the ratios of the steps (or periods) timed side
by side. ``--cpu-time`` times with ``time.thread_time`` (this thread's CPU time, which other
jobs on the machine do not inflate; it needs ``--threads 1``). A second table splits what
health adds, for the rows of matrices refreshing every 10 steps (not the GPT training step's,
timed as whole periods only), between the refresh steps and the steps between them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.muon
from bench._cli import check_cpu_time, positive_int, ratio_quartiles, shape_list
from bench.muon import make, shapes, training_step_times
from optim.soap import SOAP

CONFIGS = {"QR": {}, "eigh": {"use_eigh": True}, "KL, QR": {"use_kl_shampoo": True},
           "QR, refresh every 10": {"precondition_frequency": 10},
           "eigh, refresh every 10": {"use_eigh": True, "precondition_frequency": 10},
           "KL, QR, refresh every 10": {"use_kl_shampoo": True, "precondition_frequency": 10},
           # health measured at the refreshes only, as README advises for SOAP
           "QR, refresh every 10, health_every=10": {"precondition_frequency": 10,
                                                     "health_every": 10}}


# (label, solver, health's extra ms at refresh steps, at the steps between), for --phases
PHASES: list[tuple[str, str, float, float]] = []


def ratio(shape_list: list[tuple[int, int]], kwargs: dict, steps: int, label: str = "",
          solver: str = "") -> tuple[list[float], list[float]]:
    """Step times with health every step (every ``kwargs["health_every"]`` steps if given) and
    never, for SOAP on these matrices, after the first
    fifth of the steps; with ``precondition_frequency`` F > 1 the sums over whole refresh
    periods, divided by F (steps differ by phase). With F > 1 it also records in ``PHASES`` the
    median of what health added (on minus off, the two timed side by side) on the refresh steps
    and on the steps between."""
    period = kwargs.get("precondition_frequency", 1)
    steps = max(steps, 10 * period) // period * period
    options = {k: v for k, v in kwargs.items() if k != "health_every"}
    runs = {}
    for every in (1, 0):  # keys: health on, off
        params, grads = make(shape_list)
        runs[every] = (params, grads, SOAP(params, lr=0.01, **options,
                                           health_every=kwargs.get("health_every", 1) * every))
    times: dict[int, list[float]] = {1: [], 0: []}
    for i in range(steps):
        for every in (1, 0) if i % 2 == 0 else (0, 1):
            params, grads, opt = runs[every]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            t0 = bench.muon.CLOCK()
            opt.step()
            if every:
                opt.health()
            times[every].append(bench.muon.CLOCK() - t0)
    def per_step(ts: list[float]) -> list[float]:
        sums = periods(ts, period)
        return sums[len(sums) // 5:]

    if period > 1:  # step i refreshes when i % period == 0 (the optimizer's step i + 1)
        start = steps // period // 5 * period
        extra = [(i % period == 0, on - off) for i, (on, off) in
                 enumerate(zip(times[1], times[0], strict=True)) if i >= start]
        PHASES.append((label, solver, statistics.median(d for r, d in extra if r) * 1e3,
                       statistics.median(d for r, d in extra if not r) * 1e3))
    return per_step(times[1]), per_step(times[0])


def periods(ts: list[float], period: int) -> list[float]:
    """Mean step time of each whole period of ``period`` consecutive steps."""
    return [sum(ts[i:i + period]) / period for i in range(0, len(ts) - period + 1, period)]


def row(label: str, solver: str, on: list[float], off: list[float]) -> None:
    """Medians, their ratio, and the quartiles of the ratios of the periods timed side by side
    (how far one run's ratio can be trusted on a shared machine)."""
    paired = [a / b for a, b in zip(on, off, strict=True)]
    q1, q3 = ratio_quartiles(paired)
    t_on, t_off = statistics.median(on), statistics.median(off)
    print(f"| {label} | {solver} | {t_off * 1e3:.2f} | {t_on * 1e3:.2f} | {t_on / t_off:.3f} | "
          f"{q1:.3f}-{q3:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape_list, default="128x64,512x256",
                        help="lone matrices, MxN,... ('' for none)")
    parser.add_argument("--model", action="store_true", help="also the 12-matrix stack and GPT")
    parser.add_argument("--quick", action="store_true", help="--model at d_model 64")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="default by size; a row of matrices refreshing every F steps runs "
                             "at least 10 F, in whole periods (--steps 60 runs 100 at F = 10), "
                             "the GPT row refreshing every 10 at least 60")
    parser.add_argument("--threads", type=positive_int, default=None, help="default 2")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time.thread_time, not wall (needs --threads 1)")
    args = parser.parse_args()
    check_cpu_time(parser, args.cpu_time, args.threads)  # names a --threads the user gave
    if args.threads is None:
        args.threads = 2
    if not args.shapes and not args.model:
        parser.error("nothing to measure: --shapes '' without --model")
    if args.quick and not args.model:  # it ran the full-size rows, silently
        parser.error("--quick sizes the --model rows (d_model 64): pass --model with it")
    torch.set_num_threads(args.threads)
    if args.cpu_time:  # bench.muon's clock, so that its training step is timed the same way
        bench.muon.CLOCK = time.thread_time
    print(f"# SOAP health cost (torch {torch.__version__}, {args.threads} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time)\n")
    print("| matrices | solver | health off ms | health on ms | on/off | per-period ratios, "
          "quartiles |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        text = f"{shape[0]}x{shape[1]}"
        steps = args.steps or (600 if shape[0] * shape[1] <= 128 * 64 else 160)
        for name, kwargs in CONFIGS.items():
            row(f"{text} alone", name, *ratio([shape], kwargs, steps, f"{text} alone", name))
    if args.model:
        stack = shapes(args.quick)
        label = f"{len(stack)} of d_model {64 if args.quick else 256}"
        steps = args.steps or (100 if args.quick else 20)
        for name, kwargs in CONFIGS.items():
            row(label, name, *ratio(stack, kwargs, steps, label, name))
        on, off = training_step_times(steps, args.quick, SOAP, lr=0.01)
        row(f"GPT training step, d_model {64 if args.quick else 256}", "QR", on, off)
        # any 10 consecutive steps hold exactly one refresh: per-period means of the steps
        on, off = (periods(ts, 10) for ts in training_step_times(
            max(steps, 60) // 10 * 10, args.quick, SOAP, lr=0.01, precondition_frequency=10))
        row(f"GPT training step, d_model {64 if args.quick else 256}", "QR, refresh every 10",
            on, off)
    if PHASES:
        print("\nWhat health adds to the step, refreshing every 10 steps (medians of on - off, "
              "the two timed side by side; the rows of matrices):\n")
        print("| matrices | solver | at a refresh step, ms | at the steps between, ms |")
        print("|---|---|---|---|")
        for label, solver, at_refresh, between in PHASES:
            print(f"| {label} | {solver} | {at_refresh:.3f} | {between:.3f} |")


if __name__ == "__main__":
    main()

"""Orthogonality error against counted matrix products, and quintic's time against torch's.

    .venv/bin/python bench/orthogonalize.py [--quick] [--threads N] [--reps N] [--cpu-time]
        [--timing-only]
    orthoshard bench orthogonalize [--quick]

Accuracy: every method's iterates from ``optim.orthogonalize.polar_iterates``; the x-axis is the
number of matrix products ``count_matmuls`` saw (normalization included), never an assumed
per-step cost. Inputs: 1024x256 and 1024x4096 Gaussians, and 1024x256 matrices with singular
values log-spaced over [1e-3, 1] and [1e-6, 1]; compute in float32 and bfloat16.

Directions: each method at its default bf16 steps against the float64 ``U V^T``, with the
smallest coefficient of a singular direction in the result, which shows a reversed direction
that the orthogonality error cannot.

Timing: ``orthogonalize(X, method="quintic", steps=5)`` (bf16 default path) against
``torch.optim._muon._zeropower_via_newtonschulz`` on the same inputs, interleaved, median of
repetitions, as a ratio in one process (target <= 1.0).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from bench._cli import check_cpu_time, positive_int
from optim import count_matmuls
from optim.health import orthogonality_error
from optim.orthogonalize import JORDAN_QUINTIC, default_steps, orthogonalize, polar_iterates

TARGET = 1e-5
MAX_STEPS = {"quintic": 8, "polar_express": 14, "cans": 20}  # up to 42 / 40 products


def logspaced(m: int, n: int, lo: float, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0.0, math.log10(lo), k, dtype=torch.float64)
    return ((U * sigma) @ V.T).float()


def inputs(quick: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m, n, wide = (256, 64, 1024) if quick else (1024, 256, 4096)
    return {
        f"gauss {m}x{n}": torch.randn(m, n, generator=g),
        f"gauss {m}x{wide}": torch.randn(m, wide, generator=g),
        f"{m}x{n} sv[1e-3,1]": logspaced(m, n, 1e-3, seed=1),
        f"{m}x{n} sv[1e-6,1]": logspaced(m, n, 1e-6, seed=2),
    }


def curve(X: torch.Tensor, method: str, dtype: torch.dtype) -> list[tuple[int, float]]:
    """(products so far, orthogonality error) after each step."""
    points = []
    with count_matmuls() as counter:
        for Y in polar_iterates(X, method=method, steps=MAX_STEPS[method], dtype=dtype):
            done = counter.products  # read before measuring: health does its own product
            points.append((done, float(orthogonality_error(Y))))
    return points


def fmt(err: float) -> str:
    return f"{err:.1e}"


def accuracy_tables(xs: dict[str, torch.Tensor]) -> None:
    summary = []
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        print(f"\n## orthogonality error after k counted products ({dname} compute)\n")
        for name, X in xs.items():
            print(f"### {name}\n")
            print("| method | products: error |")
            print("|---|---|")
            for method in MAX_STEPS:
                pts = curve(X, method, dtype)
                print(f"| {method} | " + " ".join(f"{p}:{fmt(e)}" for p, e in pts) + " |")
                reach = next((p for p, e in pts if e <= TARGET), None)
                summary.append((name, method, dname, reach, min(e for _, e in pts)))
            with count_matmuls() as c:
                svd_err = float(orthogonality_error(orthogonalize(X, method="svd")))
            print(f"| svd (float64 LAPACK, {c.products} counted) | {fmt(svd_err)} |\n")
    print(f"\n## products to reach {TARGET:g} in fp32, and the bf16 floor (min over iterates)\n")
    print("| input | method | products to 1e-5 (fp32) | fp32 best | bf16 floor |")
    print("|---|---|---|---|---|")
    by_key = {(n, m, d): (r, best) for n, m, d, r, best in summary}
    for name in xs:
        for method in MAX_STEPS:
            reach, best32 = by_key[(name, method, "fp32")]
            _, floor16 = by_key[(name, method, "bf16")]
            print(f"| {name} | {method} | {reach if reach is not None else 'not reached'} "
                  f"| {fmt(best32)} | {fmt(floor16)} |")


def direction_table(xs: dict[str, torch.Tensor]) -> None:
    """What a Muon step gets: each method's result at its default bf16 steps against the float64
    ``U V^T``. The orthogonality error cannot see a singular direction the iteration reversed
    (``-u v^T`` is as orthogonal as ``u v^T``); ``min diag(U^T O V)`` can: ~1 when every
    direction is kept, ~-1 for a reversed one, ~0 for one too small for bf16 to resolve (below
    ~1e-3 of the largest)."""
    print("\n## bf16 at the default steps against U V^T\n")
    print("| input | method | steps | orthogonality error | distance to U V^T (Frobenius, "
          "relative) | min diag(U^T O V) |")
    print("|---|---|---|---|---|---|")
    for name, X in xs.items():
        U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        polar = U @ Vh
        for method in MAX_STEPS:
            O = orthogonalize(X, method=method).double()
            kept = torch.diagonal(U.mT @ O @ Vh.mT).min()
            dist = torch.linalg.matrix_norm(O - polar) / torch.linalg.matrix_norm(polar)
            print(f"| {name} | {method} | {default_steps(method, torch.bfloat16)} "
                  f"| {fmt(float(orthogonality_error(O)))} | {fmt(float(dist))} "
                  f"| {float(kept):+.3f} |")


CLOCK = time.perf_counter


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def timing_table(xs: dict[str, torch.Tensor], reps: int) -> None:
    print(f"\n## time of quintic (5 steps, bf16) vs torch.optim.Muon's Newton-Schulz "
          f"(median of {reps}, interleaved)\n")
    print("| input | ours ms | torch ms | ratio ours/torch |")
    print("|---|---|---|---|")
    for name, X in xs.items():
        ours_t, ref_t = [], []
        for _ in range(reps):  # interleave so machine load hits both alike
            ours_t.append(median_time(lambda X=X: orthogonalize(X, method="quintic", steps=5), 1))
            ref_t.append(median_time(
                lambda X=X: _zeropower_via_newtonschulz(X, JORDAN_QUINTIC, 5, 1e-7), 1))
        o, r = statistics.median(ours_t), statistics.median(ref_t)
        print(f"| {name} | {o * 1e3:.1f} | {r * 1e3:.1f} | {o / r:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, few repetitions")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads")
    parser.add_argument("--reps", type=positive_int, default=None, help="timing repetitions")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time.thread_time (this thread's CPU time; needs --threads 1)")
    parser.add_argument("--timing-only", action="store_true", help="skip the accuracy tables")
    args = parser.parse_args()
    check_cpu_time(parser, args.cpu_time, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    xs = inputs(args.quick)
    print(f"# orthogonalize benchmark (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{', quick' if args.quick else ''}, "
          f"{'CPU' if args.cpu_time else 'wall'} time)")
    if not args.timing_only:
        accuracy_tables(xs)
        direction_table(xs)
    timing_table(xs, args.reps or (3 if args.quick else 7))


if __name__ == "__main__":
    main()

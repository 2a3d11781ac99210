"""OFT rotation kernels: error against counted matrix products, and time against matrix_exp.

For each method, block size (8, 32, 128) and spectral norm, random skew blocks (float64, scaled
to the exact norm) are rotated in float32 and bfloat16; the error is the worst relative
Frobenius distance to the method's float64 reference (exp: torch.linalg.matrix_exp; Cayley
methods: the exact Cayley transform by solve). "products" is what optim._matmul counted (a solve
counts one). "time / matrix_exp" is the median of paired float32 timings, kernel over
torch.linalg.matrix_exp on the same batch, measured back to back in this process.

    .venv/bin/python bench/orthogonal.py [--batch 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from bench._cli import positive_int
from optim._matmul import count_matmuls
from optim.orthogonal import AUTO_MAX_NORM, cans_cayley, cayley, cayley_neumann, exp_orthogonal

KERNELS = {"exp": exp_orthogonal, "cans_cayley": cans_cayley, "cayley": cayley,
           "cayley_neumann": cayley_neumann}
NORMS = {"exp": (1.0, math.pi), "cans_cayley": (1.0, AUTO_MAX_NORM["cans_cayley"]),
         "cayley": (1.0, AUTO_MAX_NORM["cans_cayley"]), "cayley_neumann": (0.3, 0.95)}


def skew(b: int, norm: float, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, b, b, generator=g, dtype=torch.float64)
    Q = A - A.mT
    return Q * (norm / torch.linalg.matrix_norm(Q, 2, keepdim=True))


def reference(method: str, Q: torch.Tensor) -> torch.Tensor:
    if method == "exp":
        return torch.linalg.matrix_exp(Q)
    eye = torch.eye(Q.size(-1), dtype=Q.dtype)
    return torch.linalg.solve(eye - Q, eye + Q)


def error(X: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(X.double() - ref) / torch.linalg.matrix_norm(ref)).max().item()


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ratio(fn, baseline, repeats: int) -> float:
    """Median of paired ratios (kernel then baseline, back to back): robust to the load other
    processes put on shared cores, which shifts both halves of a pair alike."""
    fn(), baseline()
    return statistics.median(_seconds(fn) / _seconds(baseline) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| method | b | norm | products | fp32 error | bf16 error | time / matrix_exp |")
    print("|---|---|---|---|---|---|---|")
    for method, kernel in KERNELS.items():
        for b in (8, 32, 128):
            for norm in NORMS[method]:
                Q = skew(b, norm, args.batch)
                ref = reference(method, Q)
                Q32 = Q.float()
                with count_matmuls() as counted:
                    X = kernel(Q32)
                ratio = median_ratio(lambda k=kernel, q=Q32: k(q),
                                     lambda q=Q32: torch.linalg.matrix_exp(q), args.repeats)
                print(f"| {method} | {b} | {norm:.2f} | {counted.products} | {error(X, ref):.1e} "
                      f"| {error(kernel(Q.bfloat16()), ref):.1e} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

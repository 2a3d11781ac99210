"""What SOAP's health costs per step: ``health_every=1`` against ``health_every=0``.

    .venv/bin/python bench/soap_health.py [--shapes 128x64,512x256] [--steps N] [--threads N]

One matrix per optimizer, the two optimizers stepped alternately in one process (their order
swapped every step), each health step including ``health()``; medians after the first fifth of
the steps. Rows: QR (power iteration), eigh, and KL-Shampoo with QR. The machine is shared and
noisy, so only the ratio measured in one process means anything (target < 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optim.soap import SOAP

CONFIGS = {"QR": {}, "eigh": {"use_eigh": True}, "KL, QR": {"use_kl_shampoo": True}}


def ratio(shape: tuple[int, int], kwargs: dict, steps: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) for _ in range(4)]
    runs = {}
    for every in (1, 0):
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        runs[every] = (p, SOAP([p], lr=0.01, health_every=every, **kwargs))
    times: dict[int, list[float]] = {1: [], 0: []}
    for i in range(steps):
        for every in (1, 0) if i % 2 == 0 else (0, 1):
            p, opt = runs[every]
            p.grad = grads[i % 4]
            t0 = time.perf_counter()
            opt.step()
            if every:
                opt.health()
            times[every].append(time.perf_counter() - t0)
    on, off = (statistics.median(times[every][steps // 5:]) for every in (1, 0))
    return on, off


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="128x64,512x256")
    parser.add_argument("--steps", type=int, default=None, help="default 600 / 160 by size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# SOAP health cost (torch {torch.__version__}, {args.threads} threads, one matrix)\n")
    print("| shape | solver | health off ms | health on ms | on/off |")
    print("|---|---|---|---|---|")
    for text in args.shapes.split(","):
        shape = tuple(int(d) for d in text.split("x"))
        steps = args.steps or (600 if shape[0] * shape[1] <= 128 * 64 else 160)
        for name, kwargs in CONFIGS.items():
            on, off = ratio(shape, kwargs, steps)
            print(f"| {text} | {name} | {off * 1e3:.2f} | {on * 1e3:.2f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()

"""Seed-004 spike study for orthoshard's SOAP: does a 1000x gradient spike turn Q_L?

A 128x64 parameter, i.i.d. Gaussian gradients (seed 0), a 1000x spike after 50 steps (step 51, as
the tables number steps from 1), SOAP with ``use_kl_shampoo=True``, lr 1, betas (0.9, 0.95),
shampoo_beta 0.95, no weight decay; both eigenbasis solvers (power iteration: "SOAP (KL)", eigh:
"REKLS") at ``fp32_matmul_prec`` "highest" and "high" (TF32, emulated on CPU by
optim._soap_basis.pmm). For N in 1, 2, 5, 10 it prints the largest principal angle between Q_L N
steps before / after the pre-spike basis Q_L(step 50) and that basis (top-1 and top-8 columns), then
L's top eigenvalues and top/2nd ratio around the spike.

    .venv/bin/python bench/soap_spike.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from bench._cli import positive_int
from optim.health import rotation_angle_degrees
from optim.soap import SOAP

SHAPE, SPIKE_AT, SCALE, OFFSETS = (128, 64), 50, 1000.0, (1, 2, 5, 10)


def trajectory(use_eigh: bool, prec: str, steps: int = SPIKE_AT + 20):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(SHAPE))
    opt = SOAP([p], lr=1.0, betas=(0.9, 0.95), shampoo_beta=0.95, weight_decay=0.0,
               use_kl_shampoo=True, use_eigh=use_eigh, fp32_matmul_prec=prec, health_every=0)
    Qs, eigs = [], []
    for i in range(steps):
        p.grad = torch.randn(SHAPE, generator=gen) * (SCALE if i == SPIKE_AT else 1.0)
        opt.step()
        Qs.append(opt.state[p]["Q_L"].clone())
        eigs.append(torch.linalg.eigvalsh(opt.state[p]["L"].double()).flip(-1))
    return Qs, eigs


def table(label: str, Qs) -> None:
    pre = Qs[SPIKE_AT - 1]
    print(f"\n{label}: principal angle to the pre-spike basis Q_L(step {SPIKE_AT}), degrees")
    print(f"{'N':>4} | {'before top-1':>12} {'top-8':>8} | {'after top-1':>12} {'top-8':>8}")
    for n in OFFSETS:
        b, a = Qs[SPIKE_AT - 1 - n], Qs[SPIKE_AT - 1 + n]
        vals = [float(rotation_angle_degrees(pre, Q, k=k)) for Q in (b, a) for k in (1, 8)]
        print(f"{n:>4} | {vals[0]:>12.3f} {vals[1]:>8.3f} | {vals[2]:>12.3f} {vals[3]:>8.3f}")


def spectrum(eigs) -> None:
    print(f"\n{'step':>5} {'eig[0]':>11} {'eig[1]':>11} {'eig[4]':>11} {'eig[9]':>11} {'top/2nd':>8}")
    for i in (SPIKE_AT - 5, SPIKE_AT - 1, SPIKE_AT, SPIKE_AT + 1, SPIKE_AT + 4, SPIKE_AT + 9,
              SPIKE_AT + 19):
        e = eigs[i]
        mark = "  <- spike" if i == SPIKE_AT else ""
        print(f"{i + 1:>5} {e[0]:>11.4g} {e[1]:>11.4g} {e[4]:>11.4g} {e[9]:>11.4g} "
              f"{float(e[0] / e[1]):>8.4f}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    for prec in ("highest", "high"):
        print(f"\n######## fp32_matmul_prec = {prec!r}")
        for label, use_eigh in (("SOAP (KL, power iteration)", False), ("REKLS (KL, eigh)", True)):
            Qs, eigs = trajectory(use_eigh, prec)
            table(label, Qs)
            if use_eigh:
                print("\nL spectrum (REKLS):")
                spectrum(eigs)


if __name__ == "__main__":
    main()

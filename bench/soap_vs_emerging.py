"""orthoshard SOAP against NVIDIA Emerging-Optimizers' SOAP 0.3.0: update agreement, step time.

Emerging-Optimizers is NOT a project dependency. Run this script in its own venv:

    python3.11 -m venv /tmp/eo-venv
    /tmp/eo-venv/bin/pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}
    /tmp/eo-venv/bin/pip install absl-py numpy
    /tmp/eo-venv/bin/pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0
    /tmp/eo-venv/bin/python bench/soap_vs_emerging.py [--sizes 128x64,512x256] [--reps 3]
        [--divergence] [--near-singular]

(``TORCH_INDEX_URL`` as for ``scripts/setup.sh``: PyPI's torch 2.13.0 for Linux is the CUDA
build, ``https://download.pytorch.org/whl/cpu`` has the CPU one. 0.3.0 declares Python 3.12 for
``typing.override`` only; the shim below supplies it on 3.11.)
The repository root is put on ``sys.path``: ``optim`` needs torch only.

Agreement: identical arguments and gradients, 10 steps, relative difference of each step's
parameter change, for four gradient seeds. The problem is well conditioned: square 64x64
gradients ``A Z B`` with A, B symmetric with spectra in [0.5, 1] and ``Z = U S V^T`` (U, V random
orthogonal, S in [0.5, 1]), so every gradient's condition number is at most 8; scaled to 1e-6 so
that eps (1e-8) dominates float32 round-off in ``Q^T G Q`` (at step 1 the eigenbases diagonalize
G and Adam turns off-diagonal round-off into +-1 signs, which differ between any two
implementations). Each implementation's distance from our float64 run of the same steps is
printed next to it: where the two float32 runs differ by no more than each differs from float64,
the difference is rounding, not the algorithm.

``--near-singular`` repeats it with a Gaussian ``Z`` (a square Gaussian matrix is nearly singular:
condition numbers of 10^3-10^4), where KL-Shampoo's factors inherit that conditioning and float32
eigenvectors of the factors' smallest, crowded eigenvalues move by ~1e-3: the two float32 runs
then differ by up to a few percent, and each differs from float64 by about as much.

Timing: median per-step time after warm-up of ours with health every step (its ``health()`` read
included), ours without health, and Emerging-Optimizers', their steps interleaved in one process
on the same gradients, ``--reps`` x ``--steps`` steps each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import typing
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not hasattr(typing, "override"):  # Python 3.11: EO 0.3.0 imports typing.override
    typing.override = lambda f: f  # type: ignore[attr-defined]

from bench._cli import positive_int, shape_list
from optim.soap import SOAP

CONFIGS = {
    "plain, power iteration": {},
    "plain, eigh": {"use_eigh": True},
    "KL, power iteration": {"use_kl_shampoo": True},
    "KL, eigh": {"use_kl_shampoo": True, "use_eigh": True},
    "nesterov": {"nesterov": True},
    "no bias correction": {"correct_bias": False},
}
AGREEMENT_BOUND = 0.01  # the target: "within 1% over 10 steps"
# Emerging-Optimizers defaults fp32_matmul_prec to "high" (TF32 on CUDA), ours to "highest":
# both are given it, so that the comparison runs the same precision on a GPU too (on CPU
# torch's setting changes no plain matmul)
SAME_PRECISION = {"fp32_matmul_prec": "highest"}


def gradients(shape, steps, scale=1e-6, seed=0, near_singular=False):
    """``steps`` gradients ``scale * A Z B``; ``Z`` has singular values in [0.5, 1], or is
    Gaussian with ``near_singular``."""
    gen = torch.Generator().manual_seed(seed)

    def orthogonal(k):
        return torch.linalg.qr(torch.randn(k, k, generator=gen))[0]

    def spread(k):
        U = orthogonal(k)
        return U @ torch.diag(torch.linspace(1.0, 0.5, k)) @ U.T

    def middle():
        if near_singular:
            return torch.randn(*shape, generator=gen)
        k = min(shape)
        S = torch.diag(torch.linspace(1.0, 0.5, k))
        return orthogonal(shape[0])[:, :k] @ S @ orthogonal(shape[1])[:, :k].T

    A, B = spread(shape[0]), spread(shape[1])
    return [scale * (A @ middle() @ B) for _ in range(steps)]


def changes(cls, kwargs, grads, dtype=torch.float32):
    p = torch.nn.Parameter(torch.zeros(grads[0].shape, dtype=dtype))
    opt = cls([p], **kwargs)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.to(dtype)
        opt.step()
        out.append(p.detach().double() - before.double())
    return out


def _worst(xs, refs) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(xs, refs, strict=True))


def agreement(EO, near_singular: bool = False, seeds: int = 4) -> None:
    kind = "near-singular (Gaussian Z)" if near_singular else "condition number <= 8"
    print(f"update agreement, 64x64, {kind}, 10 steps, {seeds} seeds: the largest over steps of "
          f"||dW_ours - dW_EO|| / ||dW_EO||, and of each one's distance from ours in float64")
    print(f"  {'':<24} {'ours-EO':>9} {'ours-f64':>9} {'EO-f64':>9}")
    for name, extra in CONFIGS.items():
        kwargs = {"lr": 0.1, "weight_decay": 0.01, **SAME_PRECISION, **extra}
        worst = [0.0, 0.0, 0.0]
        for seed in range(seeds):
            grads = gradients((64, 64), 10, seed=seed, near_singular=near_singular)
            ours, theirs = changes(SOAP, kwargs, grads), changes(EO, kwargs, grads)
            exact = changes(SOAP, kwargs, grads, torch.float64)
            got = (_worst(ours, theirs), _worst(ours, exact), _worst(theirs, exact))
            worst = [max(w, g) for w, g in zip(worst, got, strict=True)]
        verdict = "ok" if worst[0] < AGREEMENT_BOUND else "DIFFERS"
        print(f"  {name:<24} {worst[0]:9.2e} {worst[1]:9.2e} {worst[2]:9.2e}  {verdict}")


def step_times(makes: dict, shape, steps, reps) -> dict[str, float]:
    """Median step time of each optimizer ``makes[name]([p])`` builds, their steps interleaved
    (the order turns every step) on the same gradients, so that a shared machine's drift lands
    on all of them alike: timed one after the other, the same comparison read 0.89-1.31x from
    run to run."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]
    runs = {}
    for name, make in makes.items():
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = make([p])
        # ours holds a step's health as one tensor until health() reads it: the read is part
        # of what health costs a training loop (bench/muon.py times it too); EO has no health
        runs[name] = (p, opt, getattr(opt, "health", lambda: None))
        for g in grads[:3]:  # warm-up, past the first (eigh) refresh
            p.grad = g
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in makes}
    names = list(makes)
    for i in range(steps * reps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            p, opt, read = runs[name]
            p.grad = grads[i % 4]
            t0 = time.perf_counter()
            opt.step()
            read()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timing(EO, sizes, steps, reps) -> None:
    print(f"\nstep time, plain SOAP, fp32 'highest', {torch.get_num_threads()} thread(s), "
          f"median of {reps * steps} interleaved steps (ms)")
    print(f"  {'shape':<10} {'solver':<6} {'ours':>8} {'EO':>8} {'ours/EO':>8} "
          f"{'health off':>10} {'on/off':>7}")
    for shape in sizes:
        for solver, use_eigh in (("QR", False), ("eigh", True)):
            kw = {"lr": 0.01, "use_eigh": use_eigh, **SAME_PRECISION}
            t = step_times({"ours": lambda ps, kw=kw: SOAP(ps, **kw),
                            "off": lambda ps, kw=kw: SOAP(ps, health_every=0, **kw),
                            "eo": lambda ps, kw=kw: EO(ps, **kw)}, shape, steps, reps)
            print(f"  {'x'.join(map(str, shape)):<10} {solver:<6} {t['ours'] * 1e3:8.2f} "
                  f"{t['eo'] * 1e3:8.2f} {t['ours'] / t['eo']:8.2f} {t['off'] * 1e3:10.2f} "
                  f"{t['ours'] / t['off']:7.3f}")


def divergence(EO, steps: int = 60) -> None:
    """bench/training.py's MLP with plain SOAP on its matrices (AdamW on the rest), ours and
    EO's with identical arguments: test loss after 10, 30 and 60 steps (docs/soap.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch import nn
    from training import MLP, data

    tensors = data(8192)

    def run(make, lr):
        x_train, y_train, x_test, y_test = tensors
        model = MLP(nn.ReLU(), seed=7)
        named = list(model.named_parameters())
        mats = [p for n, p in named if p.ndim == 2 and n != "head.weight"]
        rest = [p for n, p in named if not (p.ndim == 2 and n != "head.weight")]
        opt = make(mats, lr)
        adam = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for t in range(1, steps + 1):
            idx = torch.randint(0, x_train.shape[0], (128,), generator=gen)
            opt.zero_grad()
            adam.zero_grad()
            nn.functional.mse_loss(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            adam.step()
            if t in (10, 30, 60):
                with torch.no_grad():
                    losses.append(nn.functional.mse_loss(model(x_test), y_test).item())
        return " / ".join(f"{v:.3g}" for v in losses)

    print(f"\nMLP test loss after 10 / 30 / {steps} steps (initial ~0.42), plain SOAP, wd=0")
    for lr in (3e-3, 1e-3):
        for solver, kw in (("power x1", {}), ("power x3", {"power_iter_steps": 3}),
                           ("eigh", {"use_eigh": True}),
                           ("power x1, max_update_rms=1", {"max_update_rms": 1.0}),
                           ("eigh, max_update_rms=1", {"use_eigh": True,
                                                       "max_update_rms": 1.0})):
            kw = {**kw, **SAME_PRECISION}
            ours = run(lambda ps, lr, kw=kw: SOAP(ps, lr=lr, weight_decay=0.0, **kw), lr)
            eo = run(lambda ps, lr, kw=kw: EO(ps, lr=lr, weight_decay=0.0, **kw), lr)
            print(f"  lr={lr:g} {solver:<26} ours {ours:<28} EO {eo}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=shape_list, default="128x64,512x256",
                        help="matrices timed, MxN,... ('' for none)")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--reps", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--divergence", action="store_true",
                        help="also the MLP run of docs/soap.md (power iteration at lr 3e-3)")
    parser.add_argument("--near-singular", action="store_true",
                        help="also the agreement on nearly singular (Gaussian) gradients")
    args = parser.parse_args()
    try:
        from emerging_optimizers.soap.soap import SOAP as EO
    except ImportError as exc:  # nothing measured: a failure, not a success
        raise SystemExit(
            f"emerging-optimizers is not importable here ({exc}): set up its own venv as this "
            f"script's docstring shows and run the script with that venv's python.") from None
    torch.set_num_threads(args.threads)
    agreement(EO)
    if args.near_singular:
        agreement(EO, near_singular=True)
    timing(EO, args.sizes, args.steps, args.reps)
    if args.divergence:
        divergence(EO)


if __name__ == "__main__":
    main()

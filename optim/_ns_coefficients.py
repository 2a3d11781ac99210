"""The iterations' coefficients and step counts, each with its source and what it was tuned
for: Jordan's quintic, Polar Express's list, CANS's cubics in closed form."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

METHODS = ("quintic", "polar_express", "cans", "svd")

# Keller Jordan's Muon quintic (github.com/KellerJordan/Muon; the defaults of torch.optim.Muon).
# Tuned for slope at zero in bfloat16 with 5 steps; p(1) = 0.70, so it never reaches 1.
JORDAN_QUINTIC: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express, Amsel et al. 2025, arXiv 2505.16932, Algorithm 1: degree-5 minimax polynomials
# for sign() composed over [l, u] = [1e-3, 1], eight steps; the last entry is the steady state
# (15/8, -10/8, 3/8) with p(1) = 1, used for every step past the list.
_POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's safety factor for rounding (its section 3.4): p(x) -> p(x / 1.01) on every entry
# but the steady state, so values rounded slightly above 1 are not blown up in bfloat16.
_PE_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    *((a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5)
      for a, b, c in _POLAR_EXPRESS_RAW[:-1]),
    _POLAR_EXPRESS_RAW[-1],
)

# CANS starts from the interval [lower, 1] after normalization. 1e-3 is the interval Polar Express
# was optimized for too, so the two are compared on equal terms; singular values below it still
# converge, only more slowly. Pass ``lower_bound=`` when a tighter bound is known.
CANS_DEFAULT_LOWER_BOUND = 1e-3

# CANS's safety factor in bfloat16 and float16: each cubic is built for ``[a, 1.01 b]``. A cubic
# for ``[a, b]`` with ``a << b`` has its zero just above ``b`` (at ``b sqrt(1 + a/b + (a/b)^2)``:
# 0.05% above it for the first step from ``a = 1e-3``), and bf16 rounding (0.4%) pushes values
# past it: they change sign and converge to -1, a direction of ``U V^T`` reversed (the
# orthogonality error cannot see it). Measured on Gaussian 40x24 and 512x128 inputs: 7 of 20 and
# 6 of 6 reversed without the factor, none with it, and the error after the default steps fell
# from 8.6e-3 to 4.7-5.3e-3 (1024x256, where nothing reversed). Polar Express's list carries
# the same 1.01 for the same reason.
_CANS_HALF_SAFETY = 1.01

# Default step counts. float32: enough to reach 1e-5 on the inputs of bench/orthogonalize.py
# (Gaussian, and singular values spread over [1e-3, 1]). bfloat16: enough to reach the rounding
# floor (4.0-5.3e-3 at these steps, ~2-3e-3 at best) on Gaussian inputs, where more steps buy
# nothing; on the [1e-3, 1] spread they leave the smallest directions unresolved (Polar Express
# reads 2.8e-2 at 6 steps and reaches its floor, 2.7e-3, at 7: pass steps=7 for such inputs).
_DEFAULT_STEPS: dict[str, dict[bool, int]] = {
    # method: {computing in bfloat16 or float16: steps, otherwise: steps}
    "quintic": {True: 5, False: 5},
    "polar_express": {True: 6, False: 8},
    "cans": {True: 9, False: 11},
}


def default_steps(method: str, dtype: torch.dtype) -> int:
    """Number of iterations ``orthogonalize(..., steps=None)`` runs for ``method`` in ``dtype``."""
    if method == "svd":
        return 0
    check_method(method)
    return _DEFAULT_STEPS[method][dtype in (torch.bfloat16, torch.float16)]


def cans_interval_step(a: float, b: float) -> tuple[float, float, float, float]:
    """One CANS cubic for the interval ``[a, b]``, in closed form (arXiv 2506.10935, Thm. 3).

    The odd cubic ``p(x) = alpha * e2 * x - (alpha / 3) * x^3`` with
    ``e2 = (a^2 + a b + b^2) / 3``, ``K = 2 e^3``, ``L = a b (a + b)``, ``alpha = 6 / (K + L)``
    equioscillates on ``[a, b]``: ``p(a) = p(b) = 1 - eps`` and its maximum ``p(e) = 1 + eps``,
    ``eps = (K - L) / (K + L)``. It is the best odd cubic approximation of 1 on ``[a, b]``.

    Returns:
        ``(linear, cubic, new_a, new_b)``: ``p(x) = linear * x + cubic * x^3`` and the interval
        ``[1 - eps, 1 + eps]`` that ``p`` maps ``[a, b]`` onto.
    """
    e2 = (a * a + a * b + b * b) / 3.0
    k = 2.0 * e2**1.5
    ell = a * b * (a + b)
    alpha = 6.0 / (k + ell)
    # 1 -+ eps without the cancellation: 1 - eps rounded to 0 for a below ~1e-16 (in Python
    # floats), and the interval then stayed [0, 2] at every step
    return alpha * e2, -alpha / 3.0, 2.0 * ell / (k + ell), 2.0 * k / (k + ell)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown orthogonalize method {method!r}; choose one of {METHODS}")


def polynomials(method: str, steps: int, quintic: Sequence[float],
                  lower_bound: float | None, compute: torch.dtype) -> Iterator[tuple]:
    """Per-step polynomial: ``("quintic", a, b, c)`` or ``("cubic", linear, cubic)``."""
    if method == "quintic":
        a, b, c = quintic
        for _ in range(steps):
            yield ("quintic", a, b, c)
    elif method == "polar_express":
        table = POLAR_EXPRESS_COEFFICIENTS
        for i in range(steps):
            yield ("quintic", *table[min(i, len(table) - 1)])
    else:  # cans: the interval is tracked in Python floats, so no device sync is needed
        lo, hi = (CANS_DEFAULT_LOWER_BOUND if lower_bound is None else lower_bound), 1.0
        safety = _CANS_HALF_SAFETY if compute in (torch.bfloat16, torch.float16) else 1.0
        for _ in range(steps):
            lin, cub, lo, hi = cans_interval_step(lo, hi * safety)
            yield ("cubic", lin, cub)

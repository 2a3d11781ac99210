"""Orthogonal block rotations from skew-symmetric matrices, for orthogonal fine-tuning (OFT).

OFT (Qiu et al. 2023, arXiv 2306.07280; Liu et al. 2024, arXiv 2311.06243) rotates a frozen
weight by a block-diagonal orthogonal ``R``; each ``(b, b)`` block comes from a skew-symmetric
``Q`` (``Q^T = -Q``, eigenvalues ``±i theta_j``). Every kernel here maps ``(..., b, b) ->
(..., b, b)``, batched over the leading dims, and computes in the input dtype unless it says
otherwise.

``cayley(Q)``           ``(I + Q)(I - Q)^-1`` by a linear solve: exact, rotation angle
                        ``2 atan(theta)`` per eigen-plane.
``cayley_neumann(Q)``   the same with ``(I - Q)^-1`` replaced by a truncated Neumann series
                        (PEFT's OFT default): cheap, diverges for ``||Q||_2 >= 1``.
``cans_cayley(Q)``      the polar factor of ``(I + Q)^2``, which IS the Cayley transform, by CANS
                        (arXiv 2506.10935) from a certified lower bound: products only.
``exp_orthogonal(Q)``   ``exp(Q)``, rotation angle ``theta``; all rotations at ``||Q||_2 <= pi``.

Inputs must be skew-symmetric; the kernels do not check it (a check is a full pass and a device
sync per call). For a non-skew ``Q`` the result is unspecified: in general not orthogonal, not
``exp(Q)`` (``exp_orthogonal``'s closing Newton-Schulz step assumes a nearly orthogonal input)
and not a polar factor of ``(I + Q)^2`` (``cans_cayley``'s certified lower bound assumes the
singular values of ``(I + Q)^2`` are ``>= 1``). Build ``Q`` with :func:`skew` or
:func:`skew_from_vector` from an unconstrained parameter and this cannot happen. Non-square input
raises ``ValueError``.

Every matrix product goes through :mod:`optim._matmul`, so ``count_matmuls()`` reports the
products a call really did (a linear solve is recorded as one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from optim import _matmul
from optim._checks import is_int, is_real, require_tensor

__all__ = [
    "AUTO_MAX_NORM",
    "CANS_CAYLEY_DEFAULT_STEPS",
    "MAX_NORM_LIMIT",
    "METHODS",
    "cans_cayley",
    "cayley",
    "cayley_neumann",
    "clip_spectral_norm",
    "exp_orthogonal",
    "rotation",
    "skew",
    "skew_from_vector",
    "spectral_norm_upper_bound",
    "vector_from_skew",
]

METHODS = ("cayley", "cayley_neumann", "cans_cayley", "exp")

# Bounds that clip_spectral_norm(Q, -1, method=...) applies, per method:
# - cayley: exact at every norm, so no clip (inf).
# - cayley_neumann: the series converges only for ||Q||_2 < 1; 0.95 is OneTrainer's default
#   (PR #1556 "auto"); there the 5-term error is still 0.66 (measured), so prefer smaller Q.
# - cans_cayley: the norm up to which CANS_CAYLEY_DEFAULT_STEPS are certified to reach each
#   dtype's rounding at block sizes up to 128 (see there); larger norms converge with more
#   steps up to about u^(-1/2) (cans_cayley's docstring), past which its (I + Q)^2 is lost to
#   rounding.
# - exp: just under pi (OneTrainer PR #1556 uses 3.13): at theta = pi a plane turns by 180
#   degrees and exp stops being one-to-one; exp_orthogonal is accurate to 1e-6 up to pi.
AUTO_MAX_NORM: dict[str, float] = {
    "cayley": math.inf,
    "cayley_neumann": 0.95,
    "cans_cayley": 3.0,
    "exp": 3.13,
}

# The largest clip (max_norm) under which each method keeps its documented accuracy; OFTConfig
# refuses a larger one (a Q past it trained on garbage: exp at norm 6 is off by 1e-4, at 30 by
# 1e31; 5-term Neumann at norm 5 has an orthogonality error of 3e5):
# - cayley: none (exact; its rounding grows like u ||Q||_2, see cayley).
# - cayley_neumann: the series diverges at ||Q||_2 >= 1, so below 1 (not 1 itself).
# - cans_cayley: where its default steps are certified (AUTO_MAX_NORM); with explicit steps,
#   none (cans_cayley's docstring says how many steps a larger norm needs).
# - exp: pi, up to which exp_orthogonal is accurate to 1e-6 (bench/orthogonal.py).
MAX_NORM_LIMIT: dict[str, float] = {
    "cayley": math.inf,
    "cayley_neumann": 1.0,
    "cans_cayley": AUTO_MAX_NORM["cans_cayley"],
    "exp": math.pi,
}

# CANS steps of cans_cayley(Q, steps=None), by input dtype: the fewest for which the certified
# interval's half-width, the worst-case error against the exact Cayley transform, is below the
# dtype's unit roundoff for every ||Q||_2 <= AUTO_MAX_NORM["cans_cayley"] at block sizes up to
# 128. There M = (I + Q)^2 has singular values in [1, 10] and the Gelfand norm g is at most
# (128 * 10^6)^(1/6) = 22.4, so the start interval is [0.045, 1]; its half-width after steps
# 4..8 is 5.5e-2, 2.3e-3, 3.8e-6, 1.1e-11, < 1e-16 (tests/test_orthogonal.py recomputes it).
# Half-widths against unit roundoffs: bfloat16 2.3e-3 < 3.9e-3 at 5 steps; float16 3.8e-6 <
# 4.9e-4 at 6 (computed in float32, see cans_cayley); float32 1.1e-11 < 6.0e-8 at 7 (6 leave
# 3.8e-6: a block with one eigen-plane at angle 0 and the rest at 3 sits on the lower bound);
# float64 < 1.1e-16 at 8. Near 1 a step roughly squares the half-width, so one step fewer than
# the table leaves about the square root of the dtype's floor, and one more buys nothing.
CANS_CAYLEY_DEFAULT_STEPS: dict[torch.dtype, int] = {
    torch.bfloat16: 5,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
}

# exp_orthogonal: Taylor degree 12 of exp(Q / 2^s), evaluated by Paterson-Stockmeyer with the
# powers X, X^2, X^3, X^4 (Paterson & Stockmeyer 1973, SIAM J. Comput. 2(1); no arXiv id), then s
# squarings. On an eigen-plane the truncation error after the squarings is at most 2^s (pi /
# 2^s)^13 / 13! at ||Q||_2 = pi: s = 1 gives 1.1e-7, at float32 rounding, for 5 + 1 products
# (chosen on bench/orthogonal.py); float64 takes s = 4, 1.7e-18, below float64 rounding, for
# 5 + 4 (s = 3 leaves 6.8e-15, above it).
_EXP_TAYLOR_COEFFS = tuple(1.0 / math.factorial(k) for k in range(13))
_EXP_HALVINGS: dict[torch.dtype, int] = {torch.float64: 4}  # every other dtype: 1


def _check_square(Q: Tensor, name: str) -> None:
    require_tensor(Q, name)
    if Q.ndim < 2 or Q.size(-1) != Q.size(-2):
        raise ValueError(
            f"{name} needs skew-symmetric (..., b, b) blocks, got shape {tuple(Q.shape)}; "
            "reshape a per-block parameter to (..., b, b) or build it with skew_from_vector"
        )
    if not Q.is_floating_point():
        raise ValueError(f"{name} needs a real floating-point tensor, got {Q.dtype}")


def _as_batch(Q: Tensor) -> Tensor:
    """2-D stays 2-D (torch.addmm); more leading dims fold into one (torch.baddbmm is 3-D).
    ``flatten``, not ``reshape(-1, b, b)``: -1 is ambiguous for a tensor of 0 x 0 blocks."""
    return Q if Q.ndim <= 3 else Q.flatten(0, -3)


def _at_least_fp32(X: Tensor) -> Tensor:
    return X.to(torch.promote_types(X.dtype, torch.float32))


def _eye_like(Q: Tensor) -> Tensor:
    return torch.eye(Q.size(-1), dtype=Q.dtype, device=Q.device).expand_as(Q)


def skew(A: Tensor) -> Tensor:
    """The skew-symmetric part ``(A - A^T) / 2`` of square ``(..., b, b)`` blocks."""
    _check_square(A, "skew")
    return 0.5 * (A - A.mT)


def skew_from_vector(v: Tensor, b: int) -> Tensor:
    """Skew-symmetric ``(..., b, b)`` blocks from their strict upper triangles ``(..., b(b-1)/2)``.

    Entry ``k`` of ``v`` goes to ``torch.triu_indices(b, b, 1)[:, k]`` and its negative to the
    transposed position, so an unconstrained parameter vector always gives a skew ``Q``
    (differentiable; half the parameters of a full block). Inverse: :func:`vector_from_skew`.
    """
    require_tensor(v, "skew_from_vector")
    if not v.is_floating_point():  # an integer block, which every rotation refuses
        raise ValueError(f"skew_from_vector needs a real floating-point vector, got {v.dtype}")
    if not is_int(b) or b < 1:
        raise ValueError(f"block size b must be a positive int, got {b!r}")
    b = int(b)
    if v.ndim < 1 or v.size(-1) != b * (b - 1) // 2:
        raise ValueError(
            f"a ({b}, {b}) skew block has {b * (b - 1) // 2} free entries, got a vector of "
            f"shape {tuple(v.shape)}; pass b with v.shape[-1] == b * (b - 1) // 2"
        )
    rows, cols = torch.triu_indices(b, b, 1, device=v.device)
    upper = v.new_zeros(*v.shape[:-1], b, b)
    upper[..., rows, cols] = v
    return upper - upper.mT


def vector_from_skew(Q: Tensor) -> Tensor:
    """The strict upper triangles ``(..., b(b-1)/2)`` of ``(..., b, b)`` blocks."""
    _check_square(Q, "vector_from_skew")
    rows, cols = torch.triu_indices(Q.size(-1), Q.size(-1), 1, device=Q.device)
    return Q[..., rows, cols]


def cayley(Q: Tensor) -> Tensor:
    """Exact Cayley transform ``R = (I + Q)(I - Q)^-1 = (I - Q)^-1 (I + Q)``.

    The two factors commute, so ``R`` solves ``(I - Q) R = I + Q``. For skew ``Q`` the matrix
    ``I - Q`` is never singular (eigenvalues ``1 ∓ i theta``). ``torch.linalg.solve`` has no
    bfloat16/float16 kernel on CPU, so those dtypes are solved in float32 and cast back.
    Recorded as one product. Error: float rounding of an LU solve, which grows with the
    condition number of ``I - Q``, ``sqrt(1 + ||Q||_2^2)``: in float32 at ``b = 128``, ~3e-7
    relative at ``||Q||_2 = 3``, 4e-6 at 100, 2.4e-5 at 1e3 and above (no truncation error at
    any norm).
    """
    _check_square(Q, "cayley")
    work = Q if Q.dtype in (torch.float32, torch.float64) else Q.float()
    eye = _eye_like(work)
    _matmul.count(1)
    return torch.linalg.solve(eye - work, eye + work).to(Q.dtype)


def cayley_neumann(Q: Tensor, terms: int = 5) -> Tensor:
    """Cayley transform with ``(I - Q)^-1`` truncated to a Neumann series (PEFT's OFT).

    ``(I + Q) sum_{k<terms-1} Q^k = I + 2Q + 2Q^2 + ... + 2Q^(terms-2) + Q^(terms-1)``: the
    first ``terms`` terms of the expansion of ``(I + Q)(I - Q)^-1``, evaluated by Horner in
    ``terms - 2`` products. Not orthogonal: the error is about ``||Q||_2^(terms-1)`` (5 terms:
    orthogonality error 1e-2 at norm 0.3, 0.66 at 0.95, measured) and the series diverges
    for ``||Q||_2 >= 1``; clip with ``AUTO_MAX_NORM["cayley_neumann"]`` (0.95) at most.

    Args:
        Q: skew-symmetric ``(..., b, b)``.
        terms: number of terms, >= 1 (1 gives I, 2 gives I + Q).
    """
    _check_square(Q, "cayley_neumann")
    if not is_int(terms) or terms < 1:
        raise ValueError(f"terms must be an int >= 1, got {terms!r}")
    X = _as_batch(Q)
    eye = _eye_like(X)
    if terms == 1:
        return eye.clone().reshape(Q.shape)
    coeffs = [1.0] + [2.0] * (terms - 2) + [1.0]  # of Q^0 .. Q^(terms-1)
    R = coeffs[-1] * X + coeffs[-2] * eye
    for c in reversed(coeffs[:-2]):
        R = _matmul.addmm(eye, X, R, beta=c)  # R <- c I + Q R
    return R.reshape(Q.shape)


def _cans_cubic(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-block CANS cubic on ``[lo, hi]`` (arXiv 2506.10935, Thm. 3): the tensor twin of
    :func:`optim.orthogonalize.cans_interval_step`, so each block gets its own optimal cubic
    without a host sync. Returns ``(linear, cubic, new_lo, new_hi)``."""
    e2 = (lo * lo + lo * hi + hi * hi) / 3.0
    k = 2.0 * e2.pow(1.5)
    ell = lo * hi * (lo + hi)
    alpha = 6.0 / (k + ell)
    # 1 -+ eps without the cancellation: for a tiny lo (a large ||Q||), 1 - eps kept only a
    # few float32 ulps of the new lower bound, which could then exceed the true one
    return alpha * e2, -alpha / 3.0, 2.0 * ell / (k + ell), 2.0 * k / (k + ell)


def cans_cayley(Q: Tensor, steps: int | None = None) -> Tensor:
    """Cayley transform as the polar factor of ``M = (I + Q)^2``, by CANS (arXiv 2506.10935).

    ``I + Q`` is normal with eigenvalues ``1 + i theta``, so ``M`` has singular values
    ``1 + theta^2 >= 1`` and polar factor ``(1 + i theta)^2 / (1 + theta^2) = (1 + i theta) /
    (1 - i theta)``: the Cayley transform. Dividing by the Gelfand norm ``g = ||M M^T M||_F^(1/3)
    >= sigma_max`` (its products are the first step's anyway) puts the singular values in
    ``[1/g, 1]``: a certified lower bound, tight within ``b^(1/6)`` (OneTrainer PR #1512 used
    ``1/||I+Q||_F``, far looser). Each block then runs CANS cubics optimal for its own interval.

    ``M`` is divided by the power of two ``2^e`` at its largest entry (exact) before its cube is
    formed: ``M M^T M`` has entries up to ``(1 + ||Q||_2^2)^3``, which overflowed float32 from
    ``||Q||_2 ~ 1500`` (a zero result) and float64 from ~1e51. Scaling leaves the polar factor
    as it is; the lower bound becomes ``1 / (2^e g)``. (M itself overflows float32 only past
    ``||Q||_2 ~ 1e19``, far beyond the range below.)
    float16 computes in float32 and casts back; bfloat16 has float32's range and computes in
    bfloat16.

    Range: rounding ``M`` costs ``u (1 + ||Q||_2^2)`` against its smallest singular value 1
    (``u`` the unit roundoff), so past ``||Q||_2 ~ u^(-1/2)`` (4096 in float32, 16 in bfloat16)
    the result is neither orthogonal nor the Cayley transform, whatever the steps. Below it
    larger norms need more steps than the default (certified to ``AUTO_MAX_NORM``): with 60
    steps in float32, measured within 2e-7 of orthogonal up to 3000 and 1.1e-3 / 1.3e-2 of the
    exact transform at 1000 / 3000 (b = 8..128, docs/oft.md); at 1e4 (float32) and 100
    (bfloat16) far from both. :func:`cayley` is exact at every norm.

    Args:
        Q: skew-symmetric ``(..., b, b)``.
        steps: CANS steps (2 products each, plus 1 for M); None is
            ``CANS_CAYLEY_DEFAULT_STEPS`` for the dtype (5 in bfloat16, 6 in float16, 7 in
            float32, 8 in float64).

    Returns:
        ``(..., b, b)`` in Q's dtype. Error: the last interval's half-width (below the dtype's
        unit roundoff at ``||Q||_2 <= AUTO_MAX_NORM["cans_cayley"]`` and ``b <= 128``) plus
        float rounding of the products.
    """
    _check_square(Q, "cans_cayley")
    if steps is None:
        steps = CANS_CAYLEY_DEFAULT_STEPS.get(Q.dtype, CANS_CAYLEY_DEFAULT_STEPS[torch.float64])
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 or None, got {steps!r}")
    X = _as_batch(Q.float() if Q.dtype == torch.float16 else Q)
    if X.size(-1) == 0:  # 0 x 0 blocks (amax cannot reduce an empty block)
        return torch.empty_like(Q)
    M = _matmul.addmm(_eye_like(X) + 2.0 * X, X, X)  # (I + Q)^2 = I + 2Q + Q^2
    # M / 2^e, with 2^e at M's largest entry (exact; the polar factor does not change): its
    # cube M M^T M stays within range, and M's singular values, >= 1, become >= 2^-e. A power
    # of two as a float factor, not ldexp: torch's ldexp passes no gradient for a negative
    # integer exponent, and OFT trains through this.
    e = torch.frexp(_at_least_fp32(M.detach().abs().amax(dim=(-2, -1), keepdim=True))).exponent
    inv_scale = torch.exp2(-e.to(torch.float64))  # 2^-e, exact also in M's own dtype
    M = M * inv_scale.to(M.dtype)
    MMtM = _matmul.mm(_matmul.mm(M, M.mT), M)
    g = torch.linalg.matrix_norm(_at_least_fp32(MMtM), keepdim=True).pow(1.0 / 3.0)
    lo, hi = inv_scale.to(g.dtype) / g, torch.ones_like(g)
    lin, cub, lo, hi = _cans_cubic(lo, hi)
    X = (lin / g).to(M.dtype) * M + (cub / g.pow(3)).to(M.dtype) * MMtM
    for _ in range(steps - 1):
        lin, cub, lo, hi = _cans_cubic(lo, hi)
        gram = _matmul.mm(X, X.mT)
        X = lin.to(X.dtype) * X + _matmul.mm(cub.to(X.dtype) * gram, X)
    # A zero block's M is I, and the steps drive c I to 1, but for some sizes above 128 they
    # round to 1 - 1 ulp (float32: 48 sizes in 129..519, float64: 12): OFT's adapter starts at
    # Q = 0 and promises R = I exactly there. Those blocks' values are set to I (exactly: X +
    # (I - X)); the gradient stays the kernel's, as the correction is detached.
    Qb = _as_batch(Q)
    zero = (Qb == 0).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    X = X + ((_eye_like(X) - X) * zero.to(X.dtype)).detach()
    return X.reshape(Q.shape).to(Q.dtype)


def _exp_taylor(X: Tensor) -> Tensor:
    """Degree-12 Taylor polynomial of ``exp(X)`` by Paterson-Stockmeyer: 5 products.

    ``p = B0 + X^4 (B1 + X^4 B2)`` with ``B0 = sum_{k<4} c_k X^k``, ``B1 = sum_{k<4} c_{4+k}
    X^k`` and ``B2 = sum_{k<=4} c_{8+k} X^k``, ``c_k = 1/k!`` (Horner would need 11 products).
    """
    c = _EXP_TAYLOR_COEFFS
    powers = [_eye_like(X), X]
    powers.append(_matmul.mm(X, X))
    powers.append(_matmul.mm(powers[2], X))
    powers.append(_matmul.mm(powers[2], powers[2]))

    def chunk(first: int, count: int) -> Tensor:
        return sum((c[first + k] * powers[k] for k in range(1, count)), c[first] * powers[0])

    inner = _matmul.addmm(chunk(4, 4), powers[4], chunk(8, 5))
    return _matmul.addmm(chunk(0, 4), powers[4], inner)


def _newton_schulz_correct(X: Tensor) -> Tensor:
    """One Newton-Schulz step ``X (3I - X^T X) / 2`` (2 products): for ``X = R (I + E)`` with
    ``R`` orthogonal it returns ``R (I + skew(E)) + O(E^2)``: the non-orthogonal part of the
    error goes, the rotation (phase) error stays."""
    gram = _matmul.mm(X.mT, X)
    return _matmul.addmm(X, X, gram, beta=1.5, alpha=-0.5)


def exp_orthogonal(Q: Tensor) -> Tensor:
    """Matrix exponential ``exp(Q)`` of skew-symmetric blocks: scaling, Taylor, squaring, NS.

    ``exp(Q) = exp(Q / 2)^2``; ``exp(Q / 2)`` is the degree-12 Taylor polynomial evaluated by
    Paterson-Stockmeyer (5 products), then one squaring and one Newton-Schulz correction
    (2 products): 8 products in all, fixed, no host sync. float64 scales by 1/16 instead and
    squares four times (11 products), which puts the truncation below float64 rounding: measured
    <= 1.4e-14 against ``torch.linalg.matrix_exp`` at ``||Q||_2 = pi``, blocks 8-128 (1.3e-8 with
    one squaring).

    Where the error comes from (float32, ``||Q||_2 <= pi``, blocks 8-128; bench/orthogonal.py
    measures <= 4e-7 relative Frobenius against float64 ``torch.linalg.matrix_exp``):

    * Taylor truncation: on an eigen-plane ``|p(i x) - e^(ix)| <= x^13/13!``, 5.7e-8 at
      ``x = pi/2``; it is mostly a phase (rotation-angle) error, which the squaring doubles and
      Newton-Schulz cannot see. The seed's pipeline (degree 4 on Q/4) has 1e-3 here.
    * Normalization: the scaling by 1/2 is exact in binary floating point (no norm estimate,
      no CANS interval to get wrong, unlike the seed's).
    * Rounding: ~u sqrt(b) per product, doubled by the squaring; the Newton-Schulz step
      removes the symmetric (non-orthogonal) part to second order.

    bfloat16 computes in bfloat16 (error ~6e-3, the rounding floor amplified by the squaring).
    Above ``pi`` the truncation grows like ``2^s (||Q||_2 / 2^s)^13 / 13!`` (``s`` squarings);
    clip with ``AUTO_MAX_NORM["exp"]`` (3.13) first.
    """
    _check_square(Q, "exp_orthogonal")
    halvings = _EXP_HALVINGS.get(Q.dtype, 1)
    X = _exp_taylor(_as_batch(Q) * (0.5**halvings))
    for _ in range(halvings):
        X = _matmul.mm(X, X)
    return _newton_schulz_correct(X).reshape(Q.shape)


# The clip tolerance the issue asks for: after clip_spectral_norm the true norm is at most
# the bound, and at most this factor below it (the estimate is a certified upper bound).
_NORM_SLACK = 1.01


def _norm_squarings(b: int) -> int:
    """Squarings k with ``b^(1/2^(k+2)) <= _NORM_SLACK``: the worst-case overestimate of
    :func:`spectral_norm_upper_bound` (all eigenvalues equal) then stays within the slack."""
    need = math.log(max(b, 2)) / (4.0 * math.log(_NORM_SLACK))
    return max(0, math.ceil(math.log2(need)))


def spectral_norm_upper_bound(Q: Tensor) -> Tensor:
    """Certified upper bound of ``||Q||_2`` per block, at most 1% above it; shape ``Q.shape[:-2]``.

    ``||Q||_2^2 = lambda_max(A)`` for ``A = Q^T Q`` (symmetric PSD), and for ``m = 2^k``
    ``lambda_max <= ||A^m||_F^(1/m) <= b^(1/(2m)) lambda_max``: repeated squaring (normalized
    each time, the log-norm carried along) is power iteration on every vector at once, with no
    random start. A single random-start power step estimates ~0.74x on average (measured)
    and can leave a clipped norm far above its bound; this cannot. ``k`` is chosen from ``b``
    (:func:`_norm_squarings`): 1 + 6 products at b = 8, 1 + 7 at b = 128. Computed in float32
    at least; a zero block gives 0. The bound is homogeneous, so each block is divided by its
    largest entry first and the bound scaled back: ``Q^T Q`` of a float32 block above ~1e19
    would overflow (its bound read Inf from ~1e10 on, clipping Q to zero, and 0 from ~1e20,
    leaving it unclipped).
    """
    _check_square(Q, "spectral_norm_upper_bound")
    W = _at_least_fp32(_as_batch(Q))
    if W.size(-1) == 0:  # 0 x 0 blocks: norm 0 (amax cannot reduce an empty block)
        return torch.zeros(Q.shape[:-2], dtype=W.dtype, device=W.device)
    # clamped: a zero block stays 0; a subnormal one is scaled by the smallest normal number
    scale = W.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(W.dtype).tiny)
    W = W / scale
    B = _matmul.mm(W.mT, W)
    tiny = torch.finfo(B.dtype).tiny
    norm0 = torch.linalg.matrix_norm(B, keepdim=True)
    log_norm = norm0.clamp(min=tiny).log()
    B = B / norm0.clamp(min=tiny)
    k = _norm_squarings(Q.size(-1))
    for _ in range(k):
        B = _matmul.mm(B, B)
        n = torch.linalg.matrix_norm(B, keepdim=True).clamp(min=tiny)
        B, log_norm = B / n, 2.0 * log_norm + n.log()
    bound = torch.exp(log_norm / 2.0 ** (k + 1)) * scale  # (||A^(2^k)||_F)^(1 / 2^(k+1))
    # a zero block: 0; a NaN or Inf one: NaN (never a bound it does not meet)
    bound = torch.where(norm0 == 0, torch.zeros_like(bound), bound)
    return bound.reshape(Q.shape[:-2])


def clip_spectral_norm(Q: Tensor, max_norm: float, *, method: str = "exp") -> Tensor:
    """Scale each block down so its spectral norm is at most ``max_norm``.

    ``Q * min(1, max_norm / rho)`` with ``rho = spectral_norm_upper_bound(Q)``: afterwards
    ``||Q||_2 <= max_norm`` and, when clipped, ``>= max_norm / 1.01``. The factor is computed
    without gradient (as gradient-norm clipping does), so the gradient is the scaled identity.
    In bfloat16 and float16 the scaled entries are rounded once to the dtype, which can lift a
    block past the bound by up to that rounding (2^-8 relative in bfloat16; measured: 27 of
    3200 random 32 x 32 blocks at scale 0.5 ended above 0.95, the largest at 0.95059, and 1 of
    3200 8 x 8 at scale 50); the bound holds up to it.

    Args:
        Q: ``(..., b, b)``.
        max_norm: a positive bound, ``math.inf`` (no clip), or ``-1`` for ``AUTO_MAX_NORM
            [method]``: cayley inf, cayley_neumann 0.95, cans_cayley 3.0, exp 3.13.
        method: the rotation method the clip serves, which ``max_norm=-1`` reads; default
            ``"exp"``, :func:`rotation`'s (and ``OFTConfig``'s) default.

    Raises:
        ValueError: non-square Q, ``max_norm`` not a real number (a bool is not one), not
            positive and not -1, or ``-1`` with a ``method`` not in ``METHODS``.
    """
    _check_square(Q, "clip_spectral_norm")
    if not is_real(max_norm) or not (max_norm == -1 or max_norm > 0):
        raise ValueError(
            f"max_norm must be a real number > 0, math.inf or -1 (auto), got {max_norm!r}"
        )
    if max_norm == -1:
        if method not in AUTO_MAX_NORM:
            raise ValueError(f"max_norm=-1 reads the bound of method=, one of {METHODS} (the "
                             f"rotation the clip serves), got {method!r}")
        max_norm = AUTO_MAX_NORM[method]
    if math.isinf(max_norm):
        return Q
    with torch.no_grad():
        rho = spectral_norm_upper_bound(Q)
        factor = (max_norm / rho.clamp(min=torch.finfo(rho.dtype).tiny)).clamp(max=1.0)
    # scaled in float32 at least and rounded once: a bfloat16 factor times bfloat16 entries
    # rounded twice and carried 4 of 64 blocks past a 0.95 bound (by up to 0.2%)
    wide = torch.promote_types(Q.dtype, torch.float32)
    return (Q.to(wide) * factor.to(wide)[..., None, None]).to(Q.dtype)


def rotation(Q: Tensor, *, method: str = "exp", terms: int = 5, steps: int | None = None) -> Tensor:
    """Orthogonal ``(..., b, b)`` blocks from skew ``Q`` by ``method`` in :data:`METHODS`
    (``terms`` is cayley_neumann's, ``steps`` cans_cayley's)."""
    if method == "cayley":
        return cayley(Q)
    if method == "cayley_neumann":
        return cayley_neumann(Q, terms=terms)
    if method == "cans_cayley":
        return cans_cayley(Q, steps=steps)
    if method == "exp":
        return exp_orthogonal(Q)
    raise ValueError(f"unknown rotation method {method!r}; choose one of {METHODS}")

"""Polar factors by Newton-Schulz-type iterations, and the Soft-Muon softening blend.

For ``X = U diag(sigma) V^T`` (thin SVD) the polar factor is ``U V^T``: every nonzero singular
value replaced by 1. An odd matrix polynomial ``p(X) = a X + b (X X^T) X + c (X X^T)^2 X`` acts on
the singular values alone (``p(X) = U diag(p(sigma)) V^T``), so composing a few odd polynomials
that push ``[lower, 1]`` towards 1 approximates ``U V^T`` with matrix products only.

Methods (``orthogonalize(..., method=)``):

``"quintic"``
    Keller Jordan's fixed quintic (a, b, c) = (3.4445, -4.7750, 2.0315), as in ``torch.optim.Muon``.
    It maximizes the slope at zero and does NOT converge: p(1) = 0.70 and after 5 steps singular
    values sit in about [0.68, 1.13]. Kept for parity with Muon, not for accuracy.
``"polar_express"``
    The minimax-optimal per-step quintics of Amsel et al. 2025 (arXiv 2505.16932), computed for
    ``[1e-3, 1]``, with the paper's safety factor 1.01 on steps 1-7 and the steady-state
    polynomial (15/8, -10/8, 3/8), which has p(1) = 1, beyond the list.
``"cans"``
    Chebyshev-optimal odd cubics on an adaptive interval (Grishina et al. 2025, arXiv 2506.10935):
    each step maps ``[a, b]`` onto ``[1 - eps, 1 + eps]`` in closed form, and the next step is
    optimal for that interval, so the iteration never leaves the interval it was built for and
    cannot diverge in bfloat16 (a fixed list whose p(1) != 1 can). In bfloat16 and float16 each
    cubic is built for ``[a, 1.01 b]``, so rounding cannot carry a value past the cubic's zero
    and reverse its direction (``_CANS_HALF_SAFETY``), and the normalization and first cubic
    run in float32 (:func:`_first_dtype`). 2 products per step.
``"svd"
    The exact polar factor by ``torch.linalg.svd`` in float64 (the reference; slow). Not for
    training through: where singular values repeat (an orthogonal input, a scaled one) its
    gradient is NaN, as ``torch.linalg.svd``'s backward divides by their differences; the
    iterations are polynomials, differentiable everywhere.

The coefficients, step counts and their sources are in :mod:`optim._ns_coefficients`.

Normalization. Every iteration needs ``sigma_max <= 1`` first. The Frobenius norm gives it but
wastes range on ill-conditioned inputs (it overestimates sigma_max by up to sqrt(rank)).
``polar_express`` divides by the Gram norm ``||X X^T||_F^(1/2) = (sum sigma^4)^(1/4)`` and
``cans`` by the Gelfand-type norm ``||X X^T X||_F^(1/3) = (sum sigma^6)^(1/6)``; both are upper
bounds of sigma_max that are much tighter, and both come free from products the first step does
anyway. ``quintic`` keeps the Frobenius norm so that it equals ``torch.optim.Muon`` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from optim import _matmul
from optim._checks import is_int, is_real, require_tensor
from optim._ns_coefficients import (
    CANS_DEFAULT_LOWER_BOUND,
    JORDAN_QUINTIC,
    METHODS,
    POLAR_EXPRESS_COEFFICIENTS,
    cans_interval_step,
    check_method,
    default_steps,
    polynomials,
)

__all__ = [
    "CANS_DEFAULT_LOWER_BOUND",
    "JORDAN_QUINTIC",
    "METHODS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "cans_interval_step",
    "default_steps",
    "orthogonalize",
    "polar_iterates",
    "soften",
]

#: ``steps`` must be below this: every method reaches its rounding floor in far fewer (5-11)
_MAX_STEPS = 100


# The smallest lower_bound CANS takes, in units of the first step's machine epsilon u. The first
# cubic maps the top of [a, 1] to p(1) = 1 - eps ~ 5.2 a, a difference of two terms of ~5.2
# computed with an error of a few u: the result's distance to U V^T grows like u / (2 a)
# (float32: 5e-5 at the default 1e-3, 4.6e-3 at 100 u; float64: 4.4e-3 at 100 u), and below
# ~10 u the top directions come out turned or reversed (float32 at 1e-7: <u_i, O v_i> down to
# -0.53; float64 at 1e-16: -0.98; Gaussian 1x64, 64x1, 8x64, 40x24, ten draws each).
_CANS_MIN_BOUND_EPS = 100


def _check_lower_bound(lower_bound: float | None, method: str) -> None:
    if lower_bound is None:
        return
    if not is_real(lower_bound) or not 0.0 < lower_bound <= 1.0:
        raise ValueError(f"lower_bound must be a number in (0, 1], got {lower_bound!r}")
    if method != "cans":  # the other methods' coefficients are fixed: it would do nothing
        raise ValueError(f"lower_bound applies to method='cans' only, got method={method!r}")


def _check_bound_resolves(lower_bound: float | None, method: str, compute: torch.dtype
                          ) -> None:
    """Raise ValueError for a ``lower_bound`` below what the first cubic resolves in its dtype
    (:data:`_CANS_MIN_BOUND_EPS`)."""
    if lower_bound is None or method != "cans":
        return
    first = _first_dtype(method, compute)
    floor = _CANS_MIN_BOUND_EPS * torch.finfo(first).eps
    if lower_bound < floor:
        wider = "" if first == torch.float64 else (
            f", or dtype=torch.float64 (whose floor is "
            f"{_CANS_MIN_BOUND_EPS * torch.finfo(torch.float64).eps:.2g})")
        raise ValueError(
            f"lower_bound={lower_bound!r} is below what CANS's first cubic resolves in {first} "
            f"({_CANS_MIN_BOUND_EPS} x its machine epsilon, {floor:.2g}): the top singular "
            f"directions would be lost in rounding, some reversed. Pass lower_bound >= "
            f"{floor:.2g}{wider}")


def _compute_dtype(X: Tensor, dtype: torch.dtype | None, method: str) -> torch.dtype:
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. "
                             f"torch.float32) or None, got {dtype!r}")
        return dtype
    # Muon's choice: bfloat16 halves memory traffic and the polynomial steps tolerate its
    # rounding. torch.linalg.svd has no bfloat16 kernel, so the exact reference uses float32.
    return torch.float32 if method == "svd" else torch.bfloat16


def _validate(X: Tensor, softening: float, steps: int | None, eps: float,
              coefficients: Sequence[float]) -> None:
    require_tensor(X, "orthogonalize")
    if X.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) matrix, got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"orthogonalize needs a real floating-point tensor, got {X.dtype}")
    if not is_real(softening) or not 0.0 <= softening <= 1.0:
        # NaN fails both comparisons and lands here too.
        raise ValueError(f"softening must be a number in [0, 1], got {softening!r}")
    if steps is not None and not (is_int(steps) and 0 <= steps < _MAX_STEPS):
        raise ValueError(f"steps must be an int in [0, {_MAX_STEPS}) or None, got {steps!r}")
    if not is_real(eps) or not 0.0 <= eps < math.inf:
        raise ValueError(f"eps (the floor of the normalizing norms) must be a finite number >= 0, "
                         f"got {eps!r}")
    if coefficients is not JORDAN_QUINTIC and not (
            isinstance(coefficients, (tuple, list)) and len(coefficients) == 3
            and all(is_real(c) and math.isfinite(c) for c in coefficients)):
        raise ValueError(f"coefficients must be the (a, b, c) of the quintic, three finite "
                         f"numbers (default {JORDAN_QUINTIC}), got {coefficients!r}")


def _widen_half(X: Tensor) -> Tensor:
    """float16 as float32, anything else as it is: float16's largest value is 65504, so the
    Frobenius norm of an ordinary gradient (a 1024x1024 matrix of entries ~100) overflows it,
    and entries below ~6e-8 vanish. bfloat16 has float32's range and stays (Muon's bits)."""
    return X.float() if X.dtype == torch.float16 else X


def _frobenius(X: Tensor) -> Tensor:
    """2-D: exactly torch.optim.Muon's ``X.norm()``; batched: one norm per matrix. A norm that
    overflows the dtype (finite entries beyond ~1e19 in float32 or bfloat16) reads NaN, not Inf:
    dividing by Inf would return zeros, a silent zero update; NaN makes it visibly non-finite
    (an optimizer skips and counts it), with no host sync."""
    norm = X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)
    return norm.nan_to_num(nan=math.nan, posinf=math.nan)


def _dividing_norm(X: Tensor, eps: float) -> Tensor:
    """The Frobenius norm X is divided by: :func:`_frobenius` (torch.optim.Muon's, bit for bit)
    wherever it is at least ``limit = sqrt(tiny) * 2^20`` (where the squares of the entries
    stop underflowing, with room for 2^40 entries). With ``eps`` below that limit (``eps=0``
    among them) a smaller norm is taken again, of X scaled by its largest entry: a finite input
    of norm 1e-25 read norm 0 in float32, was divided by ``tiny`` and came out NaN. Taking every
    norm that way when ``eps`` was small rounded ordinary inputs differently from torch: up to
    3% off its update at ``eps=0``. An overflowing norm stays NaN either way."""
    norm = _frobenius(X)
    limit = math.sqrt(torch.finfo(X.dtype).tiny) * 2.0**20
    if eps >= limit or X.numel() == 0:  # amax has nothing to reduce in a matrix without entries
        return norm
    amax = X.abs().amax() if X.ndim == 2 else X.abs().amax(dim=(-2, -1), keepdim=True)
    scale = amax.clamp(min=torch.finfo(X.dtype).tiny)
    return torch.where(norm < limit, scale * _frobenius(X / scale), norm)


def _divisor(X: Tensor, eps: float) -> Tensor:
    """The norm X is divided by (:func:`_dividing_norm`) floored at ``eps``, and at the
    dtype's smallest positive (subnormal) number when ``eps`` is 0: a zero matrix divides to
    zeros, and a subnormal input by its own norm (floored at the smallest normal number, a
    Frobenius norm of 3e-41 became 1.2e-38 and the quintic's singular values 0.23-0.68)."""
    norm = _dividing_norm(X, eps)
    info = torch.finfo(norm.dtype)
    return norm.clamp(min=max(eps, info.tiny * info.eps))  # tiny * eps: the least subnormal


def _floored(norm: Tensor, eps: float) -> Tensor:
    """``norm`` floored at ``eps``, and at the dtype's smallest normal number when ``eps`` is 0:
    a zero matrix divides to zeros, never 0 / 0."""
    return norm.clamp(min=max(eps, torch.finfo(norm.dtype).tiny))


def _normalize(X: Tensor, method: str, eps: float, *, inplace: bool
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Scale X so sigma_max <= 1; also return the Gram X X^T (and X X^T X) when already formed.
    ``inplace`` divides X itself (a private copy), as ``torch.optim.Muon`` does: same bits.

    The Gram's norms are taken as :func:`_dividing_norm` takes X's: an X below ``eps`` keeps
    its small norm, and with ``eps`` under ~1e-20 the squares of the Gram's entries underflowed,
    the norm read low, sigma_max came out above 1 and the iteration diverged to NaN."""
    norm = _divisor(X, eps)
    X = X.div_(norm) if inplace else X / norm
    if method == "quintic":
        return X, None, None
    gram = _matmul.mm(X, X.mT)
    if method == "polar_express":
        # (sum sigma^4)^(1/4) <= ||X||_F = 1 here; the clamp keeps a zero matrix at zero.
        scale = _floored(_dividing_norm(gram, eps), eps).sqrt()
        return X / scale, gram / scale**2, None
    gram_x = _matmul.mm(gram, X)
    scale = _floored(_dividing_norm(gram_x, eps), eps) ** (1.0 / 3.0)  # (sum sigma^6)^(1/6)
    return X / scale, None, gram_x / scale**3


def _step(X: Tensor, poly: tuple, gram: Tensor | None, gram_x: Tensor | None) -> Tensor:
    """One polynomial step on X (rows <= cols); ``gram`` / ``gram_x`` if already formed."""
    if poly[0] == "quintic":
        _, a, b, c = poly
        if gram is None:
            gram = _matmul.mm(X, X.mT)
        # Same fused form as torch.optim.Muon: (b A + c A^2) X + a X, two addmm.
        update = _matmul.addmm(gram, gram, gram, beta=b, alpha=c)
        return _matmul.addmm(X, update, X, beta=a)
    _, lin, cub = poly
    if gram_x is not None:  # first CANS step: X X^T X came with the normalization
        return lin * X + cub * gram_x
    gram = _matmul.mm(X, X.mT)
    return _matmul.addmm(X, gram, X, beta=lin, alpha=cub)


def _first_dtype(method: str, compute: torch.dtype) -> torch.dtype:
    """The dtype of the normalization and first step. CANS's first cubic maps the top of its
    interval near its root (p(1) = 5.18 - 5.175 at the float32 interval, 0.11 at bfloat16's
    wider one): in bfloat16 that difference of two large terms was rounding noise larger than
    itself, and a dominant singular direction (all of a rank-1 input) came out turned, by 0.19
    in norm on 1 x 64 inputs, which no later step undoes. That step (two products) runs in
    float32, the later ones in ``compute`` (docs/kernels.md has the measurements)."""
    if method == "cans" and compute in (torch.bfloat16, torch.float16):
        return torch.float32
    return compute


def _iterate(X: Tensor, method: str, steps: int, eps: float, quintic: Sequence[float],
             lower_bound: float | None, compute: torch.dtype, *, inplace: bool = False
             ) -> Iterator[Tensor]:
    """Yield the iterate after each step, in ``compute``; X is oriented with rows <= cols, in
    :func:`_first_dtype`, or wider for float16 (:func:`_to_compute`)."""
    X, gram, gram_x = _normalize(X, method, eps, inplace=inplace)
    if X.dtype != _first_dtype(method, compute):  # float16: normalized in float32, cast now
        X, gram = X.to(compute), None if gram is None else gram.to(compute)
    for poly in polynomials(method, steps, quintic, lower_bound, compute):
        X = _step(X, poly, gram, gram_x).to(compute)  # after the first step: a no-op
        gram, gram_x = None, None
        yield X


def _polar(X: Tensor, method: str, steps: int | None, dtype: torch.dtype | None, eps: float,
           quintic: Sequence[float], lower_bound: float | None) -> Tensor:
    """The last iterate only, in X's dtype: the plain path of :func:`orthogonalize`, with no
    per-step conversions (``polar_iterates`` converts every iterate it yields)."""
    compute = _compute_dtype(X, dtype, method)
    if method == "svd":
        return _svd_polar(X, compute).to(X.dtype)
    if X.ndim > 2 and X.shape[:-2].numel() == 1:
        # A batch of one runs the 2-D path: addmm is faster than baddbmm on one matrix on CPU
        # (measured 7% on Muon's step) and equals torch.optim.Muon bit for bit.
        return _polar(X.reshape(X.shape[-2:]), method, steps, dtype, eps, quintic,
                      lower_bound).reshape(X.shape)
    n_steps = steps if steps is not None else default_steps(method, compute)
    transpose = X.size(-2) > X.size(-1)  # iterate on the smaller Gram side
    Y = _to_compute(X, _first_dtype(method, compute))
    # a fresh copy may be normalized in place, unless autograd needs it for the norm's gradient
    private = Y is not X and not (Y.requires_grad and torch.is_grad_enabled())
    Y = Y.mT if transpose else Y
    if n_steps == 0:  # the normalized input, as torch.optim.Muon's ns_steps=0 gives it
        Y = _normalize(Y, method, eps, inplace=private)[0]
        return (Y.mT if transpose else Y).to(X.dtype)
    for Z in _iterate(Y, method, n_steps, eps, quintic, lower_bound, compute, inplace=private):
        Y = Z  # each iterate dropped as the next one comes
    return (Y.mT if transpose else Y).to(X.dtype)


def _to_compute(X: Tensor, first: torch.dtype) -> Tensor:
    """X in the dtype its normalization runs in: ``first`` (:func:`_first_dtype`), but float32
    (at least) for float16, which :func:`_iterate` casts to after the normalization. Cast
    before it, entries beyond 65504 became Inf and entries below ~6e-8 zero; cast at unit norm
    and normalized again, an X under ``eps`` lost its floor (float16 alone returned a full-size
    update where every other dtype returns the shrunk one). Every other dtype is cast as it is
    (Muon's bits)."""
    if first != torch.float16:
        return X.to(first)
    return X.to(torch.promote_types(X.dtype, torch.float32))


#: How far below the singular value before it a tail within the data's rounding must start to be
#: taken as rounding by the ``"svd"`` method. The rounding tails of float32 products of rank 4 to
#: 256 (512x256 to 2048x512, rows and columns scaled over 3 decades) start 3e3 to 1e7 below
#: the last singular value of the data; neighbouring singular values of a full-rank spectrum
#: differ by factors near 1 (1.056 for 256 spread over 6 decades).
_ROUNDING_GAP = 100.0


def _svd_polar(X: Tensor, compute: torch.dtype) -> Tensor:
    """Exact polar factor ``U V^T`` by LAPACK, the reference for the iterations.

    LAPACK runs in float64 (at least): float32 and narrower inputs are exact there, and the
    factor is then accurate for every singular value the stored data resolves. Zero singular
    values have no polar direction and map to 0 (a zero matrix returns zeros, as every odd
    polynomial does). Zero is

    - below the float64 numerical-rank tolerance ``sigma_max * max(m, n) * eps(float64)``
      (~2e-13 relative for 1024 rows: float64 rounding leaves an exact zero singular value
      below it), or
    - a tail of singular values at most ``||X||_F * eps(X's dtype)`` that a gap of at least
      :data:`_ROUNDING_GAP` separates from the rest: what the rounding of a low-rank matrix
      leaves. A rank-4 float32 gradient has its other singular values at ~1e-8 relative, ~1e7
      below its fourth; kept, they became hundreds of unit directions of noise.

    Without a gap, small singular values are data, however close to the rounding: the
    singular values of a full-rank matrix run on continuously (a bfloat16 Gaussian's smallest
    sit below ``||X||_F * eps(bfloat16)``, yet rounding turns each singular direction by about
    one entry's rounding over the neighbouring gaps, not by the norm of the whole rounding, and
    its polar factor is within ~0.05 of the unrounded one). A tolerance alone dropped 3 of them
    at 64x64 and 22 at 256x256. Singular values spread over ``[1e-6, 1]`` all stay.
    """
    if X.numel() == 0:  # no singular values to take the largest of
        return torch.zeros(X.shape, dtype=compute, device=X.device)
    work = torch.promote_types(compute, torch.float64)
    # A matrix with a NaN or Inf has no polar factor: NaN, as the iterations give (an Inf made
    # every singular value non-finite, none passed the tolerance, and the result was a silent
    # zero; a NaN made LAPACK fail). LAPACK sees zeros in its place.
    finite = torch.isfinite(X).flatten(-2).all(dim=-1)[..., None, None]
    U, S, Vh = torch.linalg.svd(torch.where(finite, X, 0).to(work), full_matrices=False)
    rank_tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(work).eps
    # ||X||_F from the singular values: sqrt(sum S^2)
    data_tol = torch.linalg.vector_norm(S, dim=-1, keepdim=True) * torch.finfo(X.dtype).eps
    # the first index j whose singular value is within the data's rounding and a gap below
    # the one before it; S's length (nothing cut) where there is none
    k = S.size(-1)
    after = S[..., 1:]
    gap = (after <= data_tol) & (S[..., :-1] >= _ROUNDING_GAP * after)
    index = torch.arange(1, k, device=S.device).expand_as(after)
    cut = torch.cat([torch.where(gap, index, k), torch.full_like(S[..., :1], k, dtype=index.dtype)],
                    dim=-1).amin(dim=-1, keepdim=True)
    keep = ((S > rank_tol) & (torch.arange(k, device=S.device) < cut)).to(work)
    return torch.where(finite, (U * keep.unsqueeze(-2)) @ Vh, math.nan).to(compute)


def polar_iterates(X: Tensor, *, method: str = "polar_express", steps: int | None = None,
                   dtype: torch.dtype | None = None, eps: float = 1e-7,
                   coefficients: Sequence[float] = JORDAN_QUINTIC,
                   lower_bound: float | None = None) -> Iterator[Tensor]:
    """Yield the approximation after each step (X's shape and dtype): for accuracy-per-product
    studies. The last item equals ``orthogonalize(X, ...)`` without softening (``steps=0``
    yields nothing). Arguments are checked at the call, not at the first ``next()``."""
    _validate(X, 0.0, steps, eps, coefficients)
    check_method(method)
    _check_lower_bound(lower_bound, method)
    compute = _compute_dtype(X, dtype, method)
    _check_bound_resolves(lower_bound, method, compute)
    return _polar_iterates(X, method, steps, eps, coefficients, lower_bound, compute)


def _polar_iterates(X: Tensor, method: str, steps: int | None, eps: float,
                    coefficients: Sequence[float], lower_bound: float | None,
                    compute: torch.dtype) -> Iterator[Tensor]:
    if method == "svd":
        yield _svd_polar(X, compute).to(X.dtype)
        return
    n_steps = steps if steps is not None else default_steps(method, compute)
    transpose = X.size(-2) > X.size(-1)  # iterate on the smaller Gram side
    Y = _to_compute(X, _first_dtype(method, compute))
    Y = Y.mT if transpose else Y
    for Z in _iterate(Y, method, n_steps, eps, coefficients, lower_bound, compute):
        yield (Z.mT if transpose else Z).to(X.dtype)


def orthogonalize(X: Tensor, *, method: str = "polar_express", steps: int | None = None,
                  softening: float = 0.0, dtype: torch.dtype | None = None, eps: float = 1e-7,
                  coefficients: Sequence[float] = JORDAN_QUINTIC,
                  lower_bound: float | None = None) -> Tensor:
    """Approximate polar factor ``U V^T`` of ``X``, optionally softened (Soft-Muon).

    Args:
        X: ``(..., m, n)``, tall or wide, batched over leading dims; any real float dtype.
        method: ``"quintic"``, ``"polar_express"``, ``"cans"`` or ``"svd"`` (module docstring).
        steps: iterations; None is :func:`default_steps` for the method and compute dtype.
            Products per step: quintic and polar_express 3, cans 2 (normalization is free).
            0 returns the input normalized as the method normalizes it: by its Frobenius norm
            for quintic (``torch.optim.Muon``'s ``ns_steps=0``), by ``(sum sigma^4)^(1/4)``
            for polar_express (one product) and ``(sum sigma^6)^(1/6)`` for cans (two).
        softening: ``s`` in [0, 1]. Returns ``(1 - s) * NS(X) + s * X / ||X||_F`` per matrix.
            With an exact polar factor each singular value becomes ``(1 - s) + s sigma/||X||_F``
            (monotone in sigma: a heavier-tailed, finite-Schatten-p update); with a finite NS
            it is ``(1 - s) f(sigma) + s sigma/||X||_F``. ``s = 0`` returns NS(X) untouched.
        dtype: compute dtype; None computes in bfloat16 as Muon does (float32 for ``"svd"``).
        eps: floor of the normalizing norms; a zero matrix returns zeros, never NaN. A finite
            input whose Frobenius norm overflows the compute dtype (entries beyond ~1e19 in
            float32 or bfloat16) returns NaN (``"svd"`` only when softened), never a silent
            zero. Below ~1e-13 (float32, bfloat16; ~1e-148 in float64; ``eps=0`` among them)
            the input's norm is taken scaled by its largest entry, so a tiny input (norm
            1e-25) keeps its polar factor instead of underflowing to NaN. These limits are the
            compute dtype's: a float64 input computed in bfloat16 or float32 is cast as it is
            (as ``torch.optim.Muon`` casts, for its bits), so its entries beyond ~1e19 give
            NaN and those below float32's ~1e-45 become zeros; pass ``dtype=torch.float64``
            for float64's range. float16, whose range is far narrower, is scaled first.
        coefficients: the ``(a, b, c)`` of ``"quintic"`` (Muon's ``ns_coefficients``).
        lower_bound: ``"cans"`` only (refused for the other methods, whose coefficients are
            fixed): a known lower bound of the singular values after CANS's normalization,
            ``sigma_min / (sum sigma^6)^(1/6)``, which is at least ``sigma_min / sigma_max``
            times ``min(m, n)^(-1/6)`` (default :data:`CANS_DEFAULT_LOWER_BOUND`); a tight
            bound saves steps. At least 100 machine epsilons of the first step's dtype
            (float32 for float32, bfloat16 and float16: 1.2e-5; float64: 2.2e-14): the result
            is within about ``eps_dtype / (2 lower_bound)`` of ``U V^T``.

    Returns:
        A tensor of X's shape and dtype.

    Raises:
        ValueError: for fewer than 2 dims, a non-float X, an unknown method, ``softening``
            outside [0, 1] or NaN, ``steps`` outside [0, 100), a negative or non-finite
            ``eps``, ``coefficients`` that are not three finite numbers, or a ``lower_bound``
            outside (0, 1], below the first step's floor, or given for another method.
    """
    _validate(X, softening, steps, eps, coefficients)
    check_method(method)
    _check_lower_bound(lower_bound, method)
    _check_bound_resolves(lower_bound, method, _compute_dtype(X, dtype, method))
    result = _polar(X, method, steps, dtype, eps, coefficients, lower_bound)
    return soften(result, X, softening, eps=eps)


def soften(O: Tensor, X: Tensor, softening: float, *, eps: float = 1e-7) -> Tensor:
    """Soft-Muon blend ``(1 - s) * O + s * X / ||X||_F`` per matrix; ``s = 0`` returns O itself.

    Split out of :func:`orthogonalize` so an optimizer can measure the health of ``O`` before
    blending without computing NS twice.
    """
    if not is_real(softening) or not 0.0 <= softening <= 1.0:  # NaN lands here too
        raise ValueError(f"softening must be a number in [0, 1], got {softening!r}")
    if O.shape != X.shape:  # broadcasting would blend every matrix with every other
        raise ValueError(f"soften needs O and X of one shape, got {tuple(O.shape)} and "
                         f"{tuple(X.shape)}")
    if softening == 0.0:
        return O
    X = _widen_half(X)
    direction = X / _divisor(X, eps)
    return torch.lerp(O, direction.to(O.dtype), float(softening))

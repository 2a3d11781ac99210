"""Health measures of an optimizer's matrices: orthogonality, eigengaps and basis rotation.

All three are cheap on the matrices an update step already holds, and none communicates. They
return tensors (batched over leading dims); callers that report them call ``float()``.

When is each meaningful?

* ``orthogonality_error`` of an orthogonalized update says how far NS stopped from the polar
  factor. Jordan's quintic sits near 0.3 by design; Polar Express / CANS in float32 reach 1e-6.
  The exact value needs the Gram ``O^T O``, a third of one NS iteration;
  :func:`estimate_orthogonality_error` gets it from a few probe vectors instead, accurately when
  the error is spread over many directions (Jordan's quintic), loosely when a few carry it.
* ``rotation_angle_degrees(Q_prev, Q_new, k=1)`` is the angle the top eigenvector turned. It is
  only meaningful when the spectrum has a gap at the top: with ``l1 ~ l2`` (i.i.d. Gaussian
  gradients give ratios of 1.02-1.04) any perturbation swaps the top two eigenvectors and k=1
  reports ~90 degrees of pure noise. Then read ``k=8`` (the largest principal angle between the
  top-8 subspaces), which only moves when the subspace itself turns, and check
  ``eigengap_ratio`` first: a ratio near 0 means k=1 carries no signal.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from optim._checks import is_int, require_tensor

__all__ = ["basis_staleness", "eigengap_ratio", "estimate_orthogonality_error",
           "orthogonality_error", "principal_extremes", "rotation_angle_degrees",
           "rotation_angles_degrees", "update_orthogonality_error"]


def orthogonality_error(O: Tensor) -> Tensor:
    """``||O^T O - I||_F / sqrt(k)`` with the Gram on the smaller side, ``k = min(m, n)``.

    Zero for a matrix with orthonormal columns (tall) or rows (wide); the RMS deviation of the
    Gram's entries from the identity otherwise. Computed in float32 at least (float64 input
    stays float64).

    Args:
        O: ``(..., m, n)``.

    Returns:
        A tensor of shape ``O.shape[:-2]``.
    """
    require_tensor(O, "orthogonality_error")
    if O.ndim < 2:
        raise ValueError(f"orthogonality_error needs a (..., m, n) matrix, got {tuple(O.shape)}")
    _check_real(O, "orthogonality_error")
    work = O.to(torch.promote_types(O.dtype, torch.float32))
    if work.size(-2) < work.size(-1):
        work = work.mT
    gram = work.mT @ work
    k = gram.size(-1)
    gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return torch.linalg.matrix_norm(gram) / math.sqrt(max(k, 1))  # k = 0: no columns, 0


def _check_real(O: Tensor, name: str) -> None:
    """Raise ValueError for a complex tensor: the Gram ``O^T O`` of a unitary complex matrix is
    not the identity (``O^H O`` is), so its error would read as large as any, silently."""
    if O.is_complex():
        raise ValueError(f"{name} needs a real tensor (the orthogonality of real matrices), "
                         f"got {O.dtype}")


@functools.cache
def _native_half_matmul(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` products run natively (faster than float32) on this device type."""
    if device_type == "cuda":
        return dtype in (torch.bfloat16, torch.float16)
    if device_type == "cpu" and dtype == torch.bfloat16:
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def update_orthogonality_error(O: Tensor) -> Tensor:
    """:func:`orthogonality_error` of an optimizer's update, at the cost of one Gram in O's dtype.

    A bf16/fp16 ``O`` on a device with native products of that dtype (CUDA; CPUs with
    AVX512-BF16 or AMX) takes ``O^T O - I`` from one fused ``baddbmm``: the identity is
    subtracted inside the float32 accumulator, before the single rounding to O's dtype, so each
    entry of the deviation keeps 8 significant bits of ITSELF (not of 1): the error is within
    2^-8 relative, one bf16 rounding per entry (measured ~1e-4 on NS outputs; a bf16 ``O``
    carries ~1e-3 of orthogonality error from its own rounding anyway). The float32 Gram costs
    twice as much there: it is ~1/3
    of one Newton-Schulz iteration, which made health 23% of a quintic Muon step. Every other
    input takes the float32 :func:`orthogonality_error`.
    """
    if O.ndim < 2 or not _native_half_matmul(O.device.type, O.dtype):
        return orthogonality_error(O)
    work = O.mT if O.size(-2) < O.size(-1) else O
    k = work.size(-1)
    flat = work.reshape(math.prod(work.shape[:-2]), *work.shape[-2:])  # -1 fails on 0 entries
    eye = _identity(k, O.dtype, O.device).expand(flat.size(0), k, k)
    deviation = torch.baddbmm(eye, flat.mT, flat, beta=-1.0)
    norms = torch.linalg.vector_norm(deviation, dim=(-2, -1), dtype=torch.float32)
    return norms.reshape(O.shape[:-2]) / math.sqrt(max(k, 1))


@functools.lru_cache(maxsize=16)
def _identity(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``I_k`` (cached and only read: each step's Grams would otherwise build it anew, ~9 us per
    batch at k = 64, a tenth of the fused Gram's time there)."""
    return torch.eye(k, dtype=dtype, device=device)


@functools.lru_cache(maxsize=8)
def _probes(k: int, probes: int, seed: int, dtype: torch.dtype, device: torch.device
            ) -> tuple[Tensor, Tensor]:
    """The ``probes x k`` Gaussian probes of ``seed``, stored transposed (the layout both of the
    estimate's products read), and their Frobenius norm in float32 or wider. Cached: the groups
    of one step share them. Drawn in float32 or wider, then rounded to ``dtype``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    wide = torch.promote_types(dtype, torch.float32)
    Zt = torch.randn(k, probes, generator=generator, device=device, dtype=wide).to(dtype).mT
    return Zt.contiguous(), torch.linalg.vector_norm(Zt, dtype=wide)


def estimate_orthogonality_error(O: Tensor, probes: int = 16, *, seed: int = 0) -> Tensor:
    """:func:`orthogonality_error` estimated from ``probes`` Gaussian probe vectors, without
    forming the Gram.

    With ``D = O^T O - I`` (``k x k``, smaller side) and ``Z`` a ``k x probes`` Gaussian matrix,
    ``||D Z||_F^2 / ||Z||_F^2`` estimates ``||D||_F^2 / k`` (``E[Z Z^T]`` is a multiple of the
    identity); ``D Z = O^T (O Z) - Z`` takes two thin products, ``2 m k probes`` multiply-adds
    against the Gram's ``m k^2``. The estimate's spread depends on how the error is spread over
    directions: with ``n_eff = ||D||_F^4 / ||D^2||_F^2`` (1 when one direction carries it all,
    ``k`` when all carry the same) the relative standard deviation of the result is about
    ``sqrt(1 / (2 probes n_eff))``. Jordan's quintic never converges: every direction keeps an
    error of order 0.3, and 16 probes land within 0.2-2.1% (one standard deviation, measured on
    Gaussian, low-rank, rank-deficient and power-law gradients, docs/kernels.md). A converging
    iteration (Polar Express, CANS) leaves its error on the few smallest directions, and the
    spread grows to 10-15%: measure those exactly.

    A bf16/fp16 ``O`` on hardware with native products of its dtype uses them, with ``-Z``
    added inside the float32 accumulator of the second product (as in
    :func:`update_orthogonality_error`); the rounding of ``O Z`` to O's dtype reads up to ~2%
    high when the error is at that dtype's own rounding level (~2e-3 for bf16).

    The probes come from a private generator seeded with ``seed`` (the global RNG is not
    touched): the same ``O`` and ``seed`` give the same value on every rank. When
    ``2 * probes >= k`` the probes cost as much as the Gram and the exact value is returned.

    Args:
        O: ``(..., m, n)``.
        probes: number of probe vectors, >= 1.
        seed: seed of the probes (an optimizer passes its step count, so that the probes
            change from step to step and the error of the estimate does not persist).

    Returns:
        A tensor of shape ``O.shape[:-2]``.
    """
    require_tensor(O, "estimate_orthogonality_error")
    if O.ndim < 2:
        raise ValueError(f"estimate_orthogonality_error needs a (..., m, n) matrix, got "
                         f"{tuple(O.shape)}")
    _check_real(O, "estimate_orthogonality_error")
    if not is_int(probes) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    probes = int(probes)  # a NumPy integer (a sweep's) as Python's
    work = O.mT if O.size(-2) < O.size(-1) else O
    m, k = work.shape[-2:]
    if 2 * probes >= k:
        return update_orthogonality_error(O)
    dtype = O.dtype if _native_half_matmul(O.device.type, O.dtype) \
        else torch.promote_types(O.dtype, torch.float32)
    flat = work.reshape(math.prod(work.shape[:-2]), m, k).to(dtype)
    Zt, z_norm = _probes(k, probes, seed, dtype, O.device)
    # W^T = Z^T work^T (probes x m), then (D Z)^T = W^T work - Z^T (probes x k). When work's rows
    # are contiguous, W comes from ONE 2-D product over the whole batch (the probes are shared);
    # when work is a transposed view, Z^T times the stored (k x m) matrices reads them in order.
    # Either is 15-25% faster than the batched work @ Z on this CPU, whose batched thin products
    # do not split over threads.
    if flat.stride(-1) == 1 and flat.stride(-2) == k and flat.stride(0) == m * k:
        Wt = (flat.reshape(-1, k) @ Zt.mT).view(-1, m, probes).mT
    else:
        Wt = Zt @ flat.mT
    DZt = torch.baddbmm(Zt.expand(flat.size(0), probes, k), Wt, flat, beta=-1.0)
    num = torch.linalg.vector_norm(DZt, dim=(-2, -1), dtype=z_norm.dtype)
    return (num / z_norm).reshape(O.shape[:-2])


def eigengap_ratio(eigvals: Tensor) -> Tensor:
    """``(l1 - l2) / l1`` for eigenvalues sorted in descending order along the last dim.

    0 means a degenerate top (the top eigenvector is not determined); 1 means rank one, and so
    does a single eigenvalue (a 1 x 1 factor: its one direction is determined; read as
    ``l2 = 0``). The ``top/2nd`` ratio some tables print is ``1 / (1 - ratio)``. A zero spectrum
    gives 0.

    Raises:
        ValueError: with no eigenvalue, or complex ones.
    """
    require_tensor(eigvals, "eigengap_ratio")
    if eigvals.is_complex():
        raise ValueError(f"eigengap_ratio needs real eigenvalues (a factor's, symmetric), got "
                         f"{eigvals.dtype}")
    if eigvals.ndim < 1 or eigvals.size(-1) < 1:
        raise ValueError(f"eigengap_ratio needs at least 1 eigenvalue, got {tuple(eigvals.shape)}")
    top = eigvals[..., 0]
    # a factor is positive semi-definite: a negative second eigenvalue is rounding (low
    # precision Rayleigh quotients), read as 0, so the ratio stays in [0, 1]
    second = eigvals[..., 1].clamp(min=0) if eigvals.size(-1) > 1 else torch.zeros_like(top)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    # 0 for a zero (or negative) top, NaN for a NaN one
    return torch.where(top > 0, (top - second) / safe,
                       torch.where(top.isnan(), top, torch.zeros_like(top)))


def rotation_angle_degrees(Q_prev: Tensor, Q_new: Tensor, k: int = 1) -> Tensor:
    """Largest principal angle, in degrees, between the spans of the first k columns.

    With ``M = Q_prev[:, :k]^T Q_new[:, :k]`` the cosines of the principal angles are the
    singular values of M; k=1 gives the acute angle between the two top eigenvectors (sign
    flips do not count). The arccos of a cosine near 1 loses all precision below ~0.03 degrees
    in float32, so small angles come from the sines instead: the singular values of
    ``W = Q_new_k - Q_prev_k M`` (Knyazev & Argentati 2002). Computed in float64; columns are
    assumed orthonormal. ``k`` is clamped to the number of columns.

    Returns:
        A tensor of shape ``Q_prev.shape[:-2]``, in [0, 90]; NaN for a pair of bases with a NaN
        or Inf in either.
    """
    return rotation_angles_degrees(Q_prev, Q_new, (k,))[0]


def rotation_angles_degrees(Q_prev: Tensor, Q_new: Tensor, ks: tuple[int, ...] = (1, 8)
                            ) -> Tensor:
    """:func:`rotation_angle_degrees` for several ``k`` at once (one :func:`principal_extremes`
    per distinct k). Below 45 degrees the angle is the arcsin of the largest sine, above it the
    arccos of the smallest cosine: each is well conditioned where it is used, ~1e-13 degrees
    everywhere on float64 bases.

    Returns:
        A tensor of shape ``(len(ks), *Q_prev.shape[:-2])``, in degrees.
    """
    require_tensor(Q_prev, "rotation_angle_degrees")
    require_tensor(Q_new, "rotation_angle_degrees")
    _check_real(Q_prev, "rotation_angle_degrees")  # casting to float64 dropped the imaginary
    _check_real(Q_new, "rotation_angle_degrees")  # part: a 53 degree turn read 0
    if Q_prev.shape != Q_new.shape or Q_prev.ndim < 2:
        raise ValueError(
            f"rotation_angle_degrees needs two bases of one (..., n, r) shape, got "
            f"{tuple(Q_prev.shape)} and {tuple(Q_new.shape)}"
        )
    bad = [k for k in ks if not (is_int(k) and k >= 1)]
    if not ks or bad:  # a float slices nothing; True would read as 1
        raise ValueError(f"k must be an int >= 1, got {bad[0] if bad else ks!r}")
    r = Q_prev.size(-1)
    if r == 0:  # no columns: empty spans, which do not turn
        return torch.zeros(len(ks), *Q_prev.shape[:-2], dtype=torch.float64,
                           device=Q_prev.device)
    angles: dict[int, Tensor] = {}
    for k in sorted({min(k, r) for k in ks}):
        _, (sines, cosines) = principal_extremes(torch.stack([Q_prev[..., :k], Q_new[..., :k]]))
        sin_max = sines[..., 0].clamp(0.0, 1.0).sqrt()
        cos_min = cosines[..., k - 1].clamp(0.0, 1.0)
        angles[k] = torch.where(sin_max < math.sqrt(0.5), torch.arcsin(sin_max),
                                torch.arccos(cos_min))
    return torch.rad2deg(torch.stack([angles[min(k, r)] for k in ks]))


def principal_extremes(pair: Tensor, *, assume_finite: bool = False) -> tuple[Tensor, Tensor]:
    """What the largest principal angle between the column spans of ``pair[0]`` and ``pair[1]``
    is read from, for a whole batch of pairs in ONE float64 computation: three batched products
    and one LAPACK call, whatever the number of pairs.

    The math (Knyazev & Argentati 2002): with ``A``, ``B`` the k orthonormal columns and ``M =
    A^T B``, the cosines of the principal angles are the singular values of ``M``, the sines
    those of ``W = B - A M``. ``sin_max^2`` is the top singular value of the k x k Gram ``W^T
    W``, accurate relative to itself (tiny angles keep full precision, where ``1 - cos^2`` would
    not); ``cos_min`` is a singular value of ``M`` never squared (near 90 degrees ``M^T M`` would
    lose it). Both Grams and overlaps go to one batched ``svdvals``. Zero rows (padding bases of
    different lengths into one batch) change neither ``A^T B`` nor ``W``'s singular values.

    The angle between the FIRST columns alone needs no second problem: with ``w_1`` the first
    column of ``W``, ``b_1 - a_1 M_11 = w_1 + sum_{j>1} a_j M_j1`` and ``w_1`` is orthogonal to
    every ``a_j``, so ``sin^2 = (W^T W)_11 + sum_{j>1} M_j1^2`` (a sum of non-negative terms: no
    cancellation) and ``cos = |M_11|``. On float32 bases, orthonormal only to ~1e-7, this
    differs from ``||b_1 - a_1 M_11||^2`` by ~1e-7 relative: within the bases' own uncertainty.

    Args:
        pair: ``(2, ..., rows, k)``, columns orthonormal; any float dtype.

    Returns:
        ``(grams, values)`` in float64: ``grams[0]`` is ``W^T W`` and ``grams[1]`` is ``M``
        (``(2, ..., k, k)``); ``values`` their singular values in descending order (``(2, ...,
        k)``): ``sin_max^2 = values[0, ..., 0]``, ``cos_min = values[1, ..., k - 1]``. All NaN
        for a pair with a NaN or Inf in either basis (the other pairs are unaffected), unless
        ``assume_finite``: a caller whose bases are finite (SOAP's: it skips a step whose
        factors are not) skips the masks that take care of them, 15-35% of the call for 16
        pairs of 8 columns.
    """
    if pair.ndim < 3 or pair.size(0) != 2:
        raise ValueError(f"principal_extremes needs a (2, ..., rows, k) pair of bases, got "
                         f"{tuple(pair.shape)}")
    rows, k = pair.shape[-2:]
    batch = pair.shape[1:-2]
    A, B = pair.to(torch.float64).reshape(2, math.prod(batch), rows, k).unbind(0)
    M = torch.bmm(A.mT, B)
    W = torch.baddbmm(B, A, M, alpha=-1.0)
    grams = torch.cat([torch.bmm(W.mT, W), M])
    if assume_finite:
        return grams.view(2, *batch, k, k), torch.linalg.svdvals(grams).view(2, *batch, k)
    # A NaN or Inf in either basis reaches both Grams (every entry of a basis enters M). Such a
    # pair has no angle: NaN, and LAPACK sees zeros in its place (a NaN made svdvals fail for
    # the whole batch, the pairs with finite bases too).
    finite = grams.isfinite().flatten(1).all(1).view(2, -1).all(0).repeat(2)
    values = torch.linalg.svdvals(torch.where(finite[:, None, None], grams, 0.0))
    grams = torch.where(finite[:, None, None], grams, math.nan)
    values = torch.where(finite[:, None], values, math.nan)
    return grams.view(2, *batch, k, k), values.view(2, *batch, k)


def basis_staleness(Q: Tensor, factor: Tensor) -> Tensor:
    """``||B - diag(B)||_F / ||B||_F`` with ``B = Q^T factor Q``: how far the stored eigenbasis
    is from diagonalizing the current factor (0 right after an eigendecomposition)."""
    if Q.ndim < 2 or factor.ndim < 2 or factor.size(-1) != factor.size(-2) or \
            Q.size(-2) != factor.size(-1):
        raise ValueError(f"basis_staleness needs a (..., n, r) basis and an (..., n, n) factor, "
                         f"got {tuple(Q.shape)} and {tuple(factor.shape)}")
    B = Q.mT @ factor @ Q
    off = B - torch.diag_embed(B.diagonal(dim1=-2, dim2=-1))
    total = torch.linalg.matrix_norm(B)
    return torch.where(total > 0, torch.linalg.matrix_norm(off) / total.clamp(min=1e-30),
                       torch.zeros_like(total))

"""SOAP's kernels and functional step: Kronecker factors, eigenbases, Adam in the eigenbasis.

Everything here is pure tensor math on ONE full matrix; :class:`optim.soap.SOAP` gathers state
and calls :func:`soap_step`. The update rule, sources and departures are written out in
:func:`soap_step` and in ``docs/soap.md``.

Matmul precision. ``torch.set_float32_matmul_precision`` switches CUDA matmuls to TF32 ("high")
or bf16 ("medium"), but on CPU plain ``a @ b`` goes to an fp32 BLAS and the setting changes
nothing (measured with torch 2.13: identical bits at all three settings). So that
``fp32_matmul_prec`` means the same numerics on every device, :func:`pmm` rounds the two operands
on CPU to the format the setting names (TF32: 10 explicit mantissa bits; bf16: 7) and multiplies
in fp32 - which is what TF32 / bf16 tensor cores do (rounded inputs, fp32 accumulation). On CUDA
the operands are left alone and :func:`matmul_precision` sets torch's global mode instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from optim.health import principal_extremes

__all__ = ["PRECISIONS", "SideHealth", "SideRefresh", "SoapConfig", "Whitening", "adam_direction",
           "matmul_precision", "pmm", "project_in", "project_out", "refresh_side", "soap_health",
           "soap_step", "update_factors"]

PRECISIONS = ("highest", "high", "medium")
# TF32 keeps 10 of fp32's 23 explicit mantissa bits (NVIDIA A100 whitepaper): drop 13, rounding
# to nearest by adding half of the dropped range first.
_TF32_DROP_MASK = ~((1 << 13) - 1)
_TF32_HALF = 1 << 12


def _round_operand(x: Tensor, prec: str) -> Tensor:
    if prec == "highest" or x.device.type == "cuda" or x.dtype != torch.float32:
        return x
    if prec == "medium":
        return x.bfloat16().float()  # round-to-nearest-even to bf16 (8-bit significand)
    bits = x.contiguous().view(torch.int32)
    return ((bits + _TF32_HALF) & _TF32_DROP_MASK).view(torch.float32)


def pmm(a: Tensor, b: Tensor, prec: str) -> Tensor:
    """``a @ b`` at the fp32 matmul precision ``prec`` (module docstring), fp32 accumulation."""
    return _round_operand(a, prec) @ _round_operand(b, prec)


@contextlib.contextmanager
def matmul_precision(prec: str) -> Iterator[None]:
    """Set torch's float32 matmul precision for the block (CUDA honours it) and restore it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _present(factor: Tensor) -> bool:
    """A side above ``max_precond_dim`` stores ``(0, 0)`` tensors: no factor, identity basis."""
    return factor.numel() > 0


def project_in(X: Tensor, Q_L: Tensor, Q_R: Tensor, prec: str) -> Tensor:
    """``Q_L^T X Q_R`` (an absent side is the identity)."""
    if _present(Q_L):
        X = pmm(Q_L.mT, X, prec)
    if _present(Q_R):
        X = pmm(X, Q_R, prec)
    return X


def project_out(X: Tensor, Q_L: Tensor, Q_R: Tensor, prec: str) -> Tensor:
    """``Q_L X Q_R^T`` (an absent side is the identity)."""
    if _present(Q_L):
        X = pmm(Q_L, X, prec)
    if _present(Q_R):
        X = pmm(X, Q_R.mT, prec)
    return X


def _rayleigh(factor: Tensor, Q: Tensor, prec: str) -> tuple[Tensor, Tensor]:
    """``Y = factor @ Q`` and the Rayleigh quotients ``diag(Q^T factor Q)`` (one product)."""
    Y = pmm(factor, Q, prec)
    return Y, (Q * Y).sum(dim=0)


class Whitening(NamedTuple):
    """The Rayleigh quotients ``lam`` of one side's factor in its basis, as KL-Shampoo's update of
    the other factor used them, and its weights ``1 / (dim max(lam, eps))``."""

    quotients: Tensor
    weights: Tensor


def _kl_whitened(G: Tensor, Q: Tensor, factor: Tensor, *, side: int, eps: float,
                 prec: str) -> tuple[Tensor, Whitening | None]:
    """KL-Shampoo's update of the OTHER factor, built from this side's factor:
    ``G^T Q diag(1/(m lam)) Q^T G`` (side 0) or ``G Q diag(1/(n lam)) Q^T G^T`` (side 1), with
    ``lam = max(diag(Q^T factor Q), eps)`` (arXiv 2509.03378, the eigenvalue approximation of
    Emerging-Optimizers). An absent side whitens with the identity. Returns the term and the
    Rayleigh quotients and weights ``1 / (dim lam)`` it used (None for an absent side)."""
    dim = G.shape[side]
    Gs = G if side == 0 else G.mT
    if not _present(factor):  # (a matrix without rows or columns: an empty sum, zero)
        return pmm(Gs.mT, Gs, prec) / max(dim, 1), None
    _, lam = _rayleigh(factor, Q, prec)
    H = pmm(Q.mT, Gs, prec)                       # (dim, other)
    weights = 1.0 / (dim * lam.clamp_min(eps))
    return pmm(H.mT, H * weights.unsqueeze(-1), prec), Whitening(lam, weights)


def update_factors(L: Tensor, R: Tensor, G: Tensor, *, beta: float, kl: bool, Q_L: Tensor,
                   Q_R: Tensor, eps: float, prec: str
                   ) -> tuple[Tensor, Tensor, tuple[Whitening | None, Whitening | None]]:
    """The Kronecker factors' EMA; returns new ``(L, R)`` (inputs are not modified) and, where
    KL-Shampoo computed them for its whitening (else None), the Rayleigh quotients of the OLD
    ``L`` and ``R`` in ``Q_L``, ``Q_R`` with the weights it derived from them.

    Plain (SOAP, arXiv 2409.11321): ``L <- b L + (1-b) G G^T``, ``R <- b R + (1-b) G^T G``.
    KL-Shampoo (arXiv 2509.03378): ``L <- b L + (1-b)/n G R^-1 G^T``,
    ``R <- b R + (1-b)/m G^T L^-1 G``, both inverses taken from the factors BEFORE this update,
    approximated in the stored eigenbases (see :func:`_kl_whitened`).
    """
    white_L = white_R = None
    if kl:
        new_L_term, white_R = _kl_whitened(G, Q_R, R, side=1, eps=eps, prec=prec) \
            if _present(L) else (None, None)
        new_R_term, white_L = _kl_whitened(G, Q_L, L, side=0, eps=eps, prec=prec) \
            if _present(R) else (None, None)
    else:
        new_L_term = pmm(G, G.mT, prec) if _present(L) else None
        new_R_term = pmm(G.mT, G, prec) if _present(R) else None
    L_new = L.lerp(new_L_term, 1.0 - beta) if new_L_term is not None else L
    R_new = R.lerp(new_R_term, 1.0 - beta) if new_R_term is not None else R
    return L_new, R_new, (white_L, white_R)


@dataclass
class SideRefresh:
    """One side's refreshed eigenbasis, and what health needs from the refresh (kept as the
    refresh produces it: only a step that measures health does any work on it)."""

    Q: Tensor                # new basis, columns in descending eigenvalue (estimate) order
    order: Tensor            # permutation to apply to exp_avg_sq's axis (old index per new one)
    eigvals: Tensor          # eigenvalues (eigh, ascending) or power-step estimates |diag(R)|
                             # (unsorted); health reads the top two
    quotients: Tensor        # Rayleigh quotients diag(Q_old^T F Q_old) of the OLD basis (staleness)
    # power iteration: the last QR's input basis (``base[:, perm]``; perm None: as it is), its
    # Q and R (F Q_prev = Q_raw R; R as geqrf packs it: its upper triangle, Householder vectors
    # below), the re-sort (Q = Q_raw[:, resort]) and the factor F, kept
    # as references: :meth:`new_quotients` reads the new basis's quotients off them when health
    # wants them
    power: tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor] | None = None

    def new_quotients(self) -> Tensor | None:
        """``diag(Q^T F Q)`` of the new basis after a power-iteration refresh (None after eigh,
        whose eigenvalues are those quotients): for a side of ``HALF_PRODUCT_FROM`` or more,
        half an ``F Q`` product (:func:`power_step_quotients`); below, the ``F Q`` product
        itself, which is faster there (the half product's blocks are a dozen small calls)."""
        if self.power is None:
            return None
        base, perm, Q_raw, R, resort, factor = self.power
        if self.Q.size(-1) < HALF_PRODUCT_FROM:
            with matmul_precision("highest"):
                return _rayleigh(factor, self.Q, "highest")[1]
        Q_prev = base if perm is None else base.index_select(1, perm)
        return power_step_quotients(Q_prev, Q_raw, R)[resort]  # sets "highest" itself


# Sides from which the new basis's quotients after a power step come from the half product
# (power_step_quotients) rather than the F Q product. Measured (2026-11-29, 1 / 2 threads, us,
# four row blocks, the half product before the halving, against F Q and its column sums): 64:
# 76 / 86 against 14 / 14; 128: 107 / 107 against 64 / 47; 192: 186 / 156 against 177 / 112;
# 256: 351 / 253 against 399 / 228; 512: 1912 / 1108 against 3278 / 1634; 1024: 15.0 / 8.3 ms
# against 29.2 / 16.4 ms. The halving, on an AVX2-only machine at 1 thread: 256: 500 against 530.
HALF_PRODUCT_FROM = 256

# The diagonal blocks power_step_quotients leaves to one product each (the recursion halves
# blocks down to this size): at d, ``1/2 + leaf / (2 d)`` of the full product, 0.5625 at 1024.
# Measured 2026-11-29 (1 thread, CPU time, medians of 25 runs interleaved, against four row
# blocks at 0.625 of a product): 1024: 31.2 against 33.3 ms (the F Q product: 53.0); 512: 3.54
# against 3.82 ms; 256: 0.50 against 0.68 ms (F Q: 0.53); at 1024 leaves of 64 or 256 were
# slower (31.7, 33.0 ms). At 2 threads (wall, medians): 1024: 11.3 against 11.9 ms (F Q: 20.0);
# 256: 0.40 against 0.50 ms, where F Q takes 0.30 (at 1 thread the two are level there).
_QUOTIENT_LEAF = 128


def power_step_quotients(Q_prev: Tensor, Q_new: Tensor, R: Tensor) -> Tensor:
    """The Rayleigh quotients ``diag(Q_new^T F Q_new)`` after a power step ``F Q_prev = Q_new
    R`` (thin QR of a square ``Q_prev``), without ``F``. Only ``R``'s upper triangle is read
    (what lies below it, e.g. geqrf's Householder vectors, is ignored).

    ``Q_prev`` is square and orthogonal, so ``F = F Q_prev Q_prev^T = Q_new R Q_prev^T`` and
    ``Q_new^T F Q_new = R M`` with ``M = Q_prev^T Q_new``, exactly. ``R`` is upper triangular,
    so ``diag(R M)_i = sum_{j >= i} R_ij M_ji`` reads only M's lower triangle. It is computed
    by halving: a block ``[lo, hi)`` contributes its lower-left quarter ``M[mid:hi, lo:mid] =
    Q_prev[:, mid:hi]^T Q_new[:, lo:mid]`` (one product, all of it below the diagonal) and
    recurses into its two diagonal quarters, down to ``_QUOTIENT_LEAF`` columns, whose block is
    one product with ``R``'s lower part masked. Every product keeps the full inner length ``d``
    (what BLAS runs fastest), and each column's contribution is one ``vecdot`` with ``R^T``
    (row-major as geqrf returns ``R`` column-major). In float32 it lands within 6e-7 of the
    ``F Q_new`` product it replaces, relative to the largest quotient (256 and 1024 sides).
    """
    d = Q_prev.size(-1)
    R_t = R.mT  # R_t[j, i] = R[i, j]: row j of M's block pairs with row j of R_t
    out = torch.zeros(d, dtype=Q_new.dtype, device=Q_new.device)
    blocks = [(0, d)]
    with matmul_precision("highest"):
        while blocks:
            lo, hi = blocks.pop()
            if hi - lo <= _QUOTIENT_LEAF:
                M = Q_prev[:, lo:hi].mT @ Q_new[:, lo:hi]
                out[lo:hi] += torch.linalg.vecdot(R_t[lo:hi, lo:hi].tril(), M, dim=0)
                continue
            mid = (lo + hi) // 2
            M = Q_prev[:, mid:hi].mT @ Q_new[:, lo:mid]
            out[lo:mid] += torch.linalg.vecdot(R_t[mid:hi, lo:mid], M, dim=0)
            blocks += [(lo, mid), (mid, hi)]
    return out


def _eigh_descending(factor: Tensor) -> tuple[Tensor, Tensor]:
    """``(eigenvalues, eigenvectors)``: the vectors in DESCENDING eigenvalue order, the values
    as LAPACK returns them (ascending; only health reads them)."""
    try:
        vals, vecs = torch.linalg.eigh(factor)
    except RuntimeError:  # LinAlgError derives from it; retry in float64 as EO does
        vals, vecs = torch.linalg.eigh(factor.double())
        vals, vecs = vals.to(factor.dtype), vecs.to(factor.dtype)
    # Row-major, as every other state tensor and as a checkpoint restores it: LAPACK returns the
    # vectors column-major, and BLAS may round a product differently for the other layout. SOAP
    # amplifies such last-bit differences where exp_avg_sq is ~0 (directions the gradients never
    # reach), so a resumed run would drift from an uninterrupted one by ~1e-3 in one step.
    return vals, vecs.flip(-1).contiguous()


def _frobenius(t: Tensor) -> Tensor:
    """The Frobenius norms of ``(..., m, n)`` matrices, in float64: each row's norm in the
    matrices' own dtype (one reduction, no temporary), then the norm of those in float64. Squared,
    within 1e-9 - 1e-8 (relative) of the float64 value on float32 factors of 64-1024 rows, at
    0.55-0.75x the time of a row-wise ``vecdot`` summed in float64 (its product is a temporary
    of the factor's size; measured), and far more accurate than one float32 reduction (4e-5 at
    1024 rows). The staleness's difference needs ~1e-8 (:func:`_staleness`)."""
    return torch.linalg.vector_norm(torch.linalg.vector_norm(t, dim=-1), dim=-1,
                                    dtype=torch.float64)


def _finite_norms(norms: Tensor, tensors: list[Tensor]) -> Tensor:
    """``norms`` (float64 norms of ``tensors``), with any that overflowed taken again, scaled.
    :func:`_frobenius` sums a row's squares in the factor's dtype: entries above ~1e19 overflow
    float32 though the factor is finite (KL-Shampoo's factors reach that with gradients of ~1e6:
    its whitening divides by ``dim eps`` while a factor is ~0), and float64 factors or
    quotients above ~1e154 overflow float64 squares. Finite factors keep their norms finite
    (the trace bounds them, :func:`gradient_fits`), so a scaled norm always answers. One
    reduction and one host sync; the slower scaled pass only where needed."""
    if math.isfinite(float(norms.sum())):
        return norms
    exact = norms.clone()
    for i, value in enumerate(norms.tolist()):
        if not math.isfinite(value):
            wide = tensors[i].to(torch.float64)
            scale = wide.abs().amax()
            exact[i] = scale * torch.linalg.vector_norm(wide / scale) if scale > 0 else 0.0
    return exact


def _staleness(total: float, diagonal: float) -> float:
    """``||B - diag B||_F / ||B||_F`` for ``B = Q^T F Q`` WITHOUT forming B, from ``total =
    ||F||_F = ||B||_F`` (Q orthogonal) and ``diagonal = ||diag B||``, the norm of the Rayleigh
    quotients already in hand, both float64 (for ``1 - (diagonal / total)^2``, which cancels;
    the ratio, not the squares themselves: those of a float64 factor's norm could overflow).
    The fp32 quotients put a floor of ~1e-3 under the result."""
    if not total > 0.0:
        return 0.0
    ratio = diagonal / total
    return math.sqrt(max(1.0 - ratio * ratio, 0.0))


def refresh_side(factor: Tensor, Q: Tensor, *, use_eigh: bool, power_iter_steps: int,
                 prec: str) -> SideRefresh:
    """Refresh one eigenbasis, as in SOAP (arXiv 2409.11321, Alg. 4) and Emerging-Optimizers:

    1. Sort the old basis by its Rayleigh quotients under the NEW factor (descending); the same
       permutation is applied to exp_avg_sq's axis, so each second moment follows its
       eigenvector through an eigenvalue crossing.
    2. ``use_eigh``: the factor's eigenvectors, descending. Otherwise ``power_iter_steps`` of
       ``Q <- qr(F Q)`` warm-started from the sorted basis (the first product is reused from
       step 1), then a free re-sort by ``|diag(R)|`` of the last QR (an exact relabelling: the
       basis and exp_avg_sq move together) so the columns are stored in descending order.
    """
    Y, lam = _rayleigh(factor, Q, prec)
    order = torch.argsort(lam, descending=True)
    if use_eigh:
        eigvals, Q_new = _eigh_descending(factor)
        return SideRefresh(Q_new, order, eigvals, lam)
    # index_select, not Y[:, order]: the same gather, 7x faster on CPU (1024x1024: 0.43 against
    # 3.3 ms; 256x256: 24 against 169 us, measured 2026-11-29)
    Y = Y.index_select(1, order)
    Q_last = Q
    for i in range(power_iter_steps):
        if i > 0:
            Q_last = Q_new
            Y = pmm(factor, Q_new, prec)
        # torch.linalg.qr's own two LAPACK calls, without its triu of R (4.6-6 ms at 1024,
        # measured 2026-11-29): the step reads only R's diagonal, and health its upper blocks
        packed, tau = torch.geqrf(Y)
        Q_new = torch.linalg.householder_product(packed, tau)
    estimates = packed.diagonal().abs()
    resort = torch.argsort(estimates, descending=True)
    base, perm = (Q, order) if power_iter_steps == 1 else (Q_last, None)
    return SideRefresh(Q_new.index_select(1, resort), order[resort], estimates, lam,
                       power=(base, perm, Q_new, packed, resort, factor))


@dataclass(frozen=True)
class SoapConfig:
    """One param group's SOAP hyperparameters (validated by :class:`optim.soap.SOAP`)."""

    betas: tuple[float, float]
    shampoo_beta: float
    eps: float
    nesterov: bool
    correct_bias: bool
    fp32_matmul_prec: str
    use_eigh: bool
    qr_fp32_matmul_prec: str
    power_iter_steps: int
    use_kl_shampoo: bool
    precondition_frequency: int


def adam_direction(Gp: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, cfg: SoapConfig,
                   t: int, square: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Adam in the eigenbasis (Emerging-Optimizers' ``calculate_adam_update``):
    ``m <- lerp(m, g, 1-b1)``, ``v <- lerp(v, g^2, 1-b2)``,
    ``d = m_hat / (sqrt(v / (1-b2^t)) + eps)`` with ``m_hat = m / (1-b1^t)``, or with
    ``nesterov`` ``b1 m / (1-b1^(t+1)) + (1-b1) g / (1-b1^t)``. Returns ``(d, m, v)``;
    ``square`` is ``g^2`` if the caller already has it."""
    b1, b2 = cfg.betas
    m = exp_avg.lerp(Gp, 1.0 - b1)
    v = exp_avg_sq.lerp(Gp.square() if square is None else square, 1.0 - b2)
    bc1 = 1.0 - b1**t if cfg.correct_bias else 1.0
    bc2 = 1.0 - b2**t if cfg.correct_bias else 1.0
    if cfg.nesterov:
        bc_next = 1.0 - b1 ** (t + 1) if cfg.correct_bias else 1.0
        m_hat = b1 * m / bc_next + (1.0 - b1) * Gp / bc1
    else:
        m_hat = m / bc1
    return m_hat / ((v / bc2).sqrt() + cfg.eps), m, v


# A factor of at most this many entries has its norm taken by soap_health, with the other
# factors of its size in the step in one reduction; a larger one inside soap_step, right after
# its update, while it is still in cache (read later, a 512x512 factor took 4x as long).
_BATCHED_NORM_MAX = 128 * 128


@dataclass
class SideHealth:
    """What one side's health needs, gathered by :func:`soap_step` (references only, no work);
    turned into metrics for a whole batch of matrices at once by :func:`soap_health`."""

    side: str                # "L" or "R"
    eigvals: Tensor          # eigh values, power-step estimates or Rayleigh quotients, any order
    total: Tensor | None     # ||factor||_F after this step's update (float64 scalar), or None:
                             # soap_health takes it from ``factor``
    quotients: Tensor        # Rayleigh quotients of the basis in use before this step (staleness)
    Q_old: Tensor | None     # the bases before and after a refresh; None: no rotation (no
    Q_new: Tensor | None     # refresh this step, or step 1, whose old basis is the identity)
    factor: Tensor           # the factor after this step's update (``total`` is its norm)


def _side_health(side: str, Q_old: Tensor, refreshed: SideRefresh | None, factor: Tensor, *,
                 total: Tensor | None, first: bool, quotients: Tensor | None) -> SideHealth:
    """One side's health inputs (docs/soap.md "Health"); between refreshes the eigenvalues and
    staleness come from ``quotients``, the Rayleigh quotients of the current basis. ``total``:
    the factor's norm if already taken (else soap_health takes it)."""
    if refreshed is None:
        assert quotients is not None
        return SideHealth(side, quotients, total, quotients, None, None, factor)
    old, new = (None, None) if first else (Q_old, refreshed.Q)  # step 1: no rotation
    return SideHealth(side, refreshed.eigvals, total, refreshed.quotients, old, new, factor)


_SQRT_HALF = math.sqrt(0.5)


def _angle_degrees(sin_sq: float, cos: float) -> float:
    """The angle from its squared sine and its cosine, with whichever function is well
    conditioned: arcsin below 45 degrees, arccos above."""
    sin = min(math.sqrt(max(sin_sq, 0.0)), 1.0)
    if sin < _SQRT_HALF:
        return math.degrees(math.asin(sin))
    return math.degrees(math.acos(min(max(cos, 0.0), 1.0)))


# maps the floats of soap_health's values tensor to each matrix's metric values
HealthFinish = Callable[[list[float]], list[list[float]]]

# one side's layout: (name, dim, number of eigenvalues, rotated this step, factor's norm
# left to soap_health, eigenvalues are the quotients)
_SideLayout = tuple[str, int, int, bool, bool, bool]


class _HealthPlan:
    """Where each side's numbers sit in :func:`soap_health`'s values tensor, and the formulas
    that turn them into metrics. It depends only on the layout (sides, dims, which sides
    were refreshed), which repeats step after step, so it is built once per layout.

    Values: the Frobenius norms of the factors soap_step took them of, then per group of the
    other factors of one size, theirs; per group of sides with quotients of one length, their
    quotients' norms; per group of sides with at least two eigenvalues of one length,
    their top two; then per rotation group (the n sides of one length, ``k = min(8, dim)``)
    :func:`optim.health.principal_extremes` of its pairs: the n Grams ``W^T W`` and the n
    overlaps ``M`` (k x k each), then their singular values (k each). Grouping by length lets
    one stack and one reduction serve every side of that length (a model's matrices share a
    few side lengths; :class:`optim.soap.SOAP` passes all of a step's matrices at once).
    Groups are stacked in the state's dtype and converted afterwards: a ``cat`` that promotes
    (an empty float64 piece) took 40-80 us even for 16 vectors of 64, ``stack`` and ``double`` 6 us.
    """

    def __init__(self, layout: tuple[tuple[_SideLayout, ...], ...]) -> None:
        flat = [side for sides in layout for side in sides]
        self.keys = [_metric_keys(tuple(side[0] for side in sides)) for sides in layout]
        self.counts = [len(sides) for sides in layout]
        self.total_at = [0] * len(flat)
        # factors whose norm soap_step took, then groups of the others by size
        self.taken = [i for i in range(len(flat)) if not flat[i][4]]
        offset = 0
        for i in self.taken:
            self.total_at[i], offset = offset, offset + 1
        self.total_groups = _groups_by((i for i in range(len(flat)) if flat[i][4]),
                                       key=lambda i: flat[i][1])
        for sides in self.total_groups:
            for i in sides:
                self.total_at[i], offset = offset, offset + 1
        self.total_order = self.taken + [i for sides in self.total_groups for i in sides]
        # sides grouped by quotient length, and where each one's norm sits
        self.quotient_groups = _groups_by(range(len(flat)), key=lambda i: flat[i][1])
        self.quotient_at = [0] * len(flat)
        for sides in self.quotient_groups:
            for i in sides:
                self.quotient_at[i], offset = offset, offset + 1
        # sides with two eigenvalues or more, grouped by their number; where each top two sit.
        # A group whose eigenvalues are a quotient group's quotients (between refreshes) reuses
        # that group's stack: (sides, index of that quotient group or None)
        self.top_groups: list[tuple[list[int], int | None]] = []
        for sides in _groups_by((i for i in range(len(flat)) if flat[i][2] >= 2),
                                key=lambda i: (flat[i][2], flat[i][5])):
            same = [j for j, q_sides in enumerate(self.quotient_groups) if q_sides == sides]
            self.top_groups.append((sides, same[0] if same and flat[sides[0]][5] else None))
        self.top_at: list[int | None] = [None] * len(flat)
        for sides, _ in self.top_groups:
            for i in sides:
                self.top_at[i], offset = offset, offset + 2
        # rotated sides grouped by length (zero-padding shorter bases into one batch cost more
        # than a second batch's calls: 20 sides of 64 padded to 256 made soap_health 0.25 ms
        # slower, and 1024 rows for sides of 256 1.1 ms)
        members: dict[int, list[int]] = {}
        for i, (_, dim, _, rotated, _, _) in enumerate(flat):
            if rotated:
                members.setdefault(dim, []).append(i)
        # per group: k, the member sides, their length
        self.groups: list[tuple[int, list[int], int]] = []
        # per rotated side: k, and where its Gram, overlap, sines and cosines start
        self.rot_at: dict[int, tuple[int, int, int, int, int]] = {}
        for rows, sides in members.items():
            k = min(8, rows)
            self.groups.append((k, sides, rows))
            n = len(sides)
            values = offset + 2 * n * k * k
            for j, i in enumerate(sides):
                self.rot_at[i] = (k, offset + j * k * k, offset + (n + j) * k * k,
                                  values + j * k, values + (n + j) * k)
            offset = values + 2 * n * k

    def finish(self, v: list[float]) -> list[list[float]]:
        out: list[list[float]] = []
        i = 0
        for count in self.counts:
            row: list[float] = []
            for _ in range(count):
                top = self.top_at[i]
                gap = 0.0
                if top is not None:
                    l1, l2 = v[top], v[top + 1]
                    gap = (l1 - l2) / l1 if l1 > 0 else (l1 if math.isnan(l1) else 0.0)
                rot1 = rot8 = 0.0
                at = self.rot_at.get(i)
                if at is not None:
                    k, gram, overlap, sines, cosines = at
                    rot8 = _angle_degrees(v[sines], v[cosines + k - 1])
                    # the first columns' angle from the same problem (principal_extremes)
                    sin1_sq = v[gram] + sum(v[overlap + j * k] ** 2 for j in range(1, k))
                    rot1 = _angle_degrees(sin1_sq, abs(v[overlap]))
                row += [gap, rot1, rot8, _staleness(v[self.total_at[i]], v[self.quotient_at[i]])]
                i += 1
            out.append(row)
        return out


def _groups_by(indices: Iterable[int], key: Callable[[int], Hashable]) -> list[list[int]]:
    """``indices`` grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


def _given(t: Tensor | None) -> Tensor:
    assert t is not None  # the plan only reads what the layout says is there
    return t


@functools.lru_cache(maxsize=64)
def _health_plan(layout: tuple[tuple[_SideLayout, ...], ...]) -> _HealthPlan:
    return _HealthPlan(layout)


@functools.cache
def _metric_keys(sides: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{metric}_{side}{suffix}" for side in sides
                 for metric, suffix in (("eigengap_ratio", ""), ("rotation_degrees", "_k1"),
                                        ("rotation_degrees", "_k8"), ("basis_staleness", "")))


def soap_health(per_matrix: list[list[SideHealth]]
                ) -> tuple[list[tuple[str, ...]], Tensor, HealthFinish]:
    """Metrics of every side of every matrix of a step (docs/soap.md "Health").

    At small sizes health is dominated by the number of small tensor operations and Python
    calls, not by flops, so the tensor work is batched over all sides and matrices and ends in
    ONE float64 tensor: the norms of every factor (a large one's taken by
    :func:`soap_step`, the others' here, per size) and of its Rayleigh quotients, the top two
    eigenvalues of each side, and what the largest principal angles are read from for all
    refreshed sides (:func:`optim.health.principal_extremes`, one batch per side length). The
    scalar formulas (eigengap ratio, staleness, arcsin / arccos) then run on Python floats,
    once that tensor is converted (one ``.tolist()``); where each number sits is planned once
    per layout.

    Returns:
        ``(keys, values, finish)``: ``keys[i]`` are matrix i's metric names; ``finish`` maps
        ``values.tolist()`` to their values (per matrix, in ``keys`` order).
    """
    flat = [side for sides in per_matrix for side in sides]
    if not flat:
        return [() for _ in per_matrix], torch.zeros(0, dtype=torch.float64), \
            lambda _: [[] for _ in per_matrix]
    layout = tuple(tuple((side.side, side.quotients.numel(), side.eigvals.numel(),
                          side.Q_old is not None, side.total is None,
                          side.eigvals is side.quotients) for side in sides)
                   for sides in per_matrix)
    plan = _health_plan(layout)
    pieces = [torch.stack([_given(flat[i].total) for i in plan.taken])] if plan.taken else []
    for sides in plan.total_groups:
        pieces.append(_frobenius(torch.stack([flat[i].factor for i in sides])))
    stacks = []
    for sides in plan.quotient_groups:
        stacked = torch.stack([flat[i].quotients for i in sides])
        stacks.append(stacked)
        pieces.append(torch.linalg.vector_norm(stacked, dim=-1, dtype=torch.float64))
    # the factors' norms, then the quotients', as the plan lays them out
    pieces = [_finite_norms(torch.cat(pieces), [flat[i].factor for i in plan.total_order] +
                            [flat[i].quotients for sides in plan.quotient_groups for i in sides])]
    for sides, reuse in plan.top_groups:
        eigvals = stacks[reuse] if reuse is not None else \
            torch.stack([flat[i].eigvals for i in sides])
        pieces.append(eigvals.topk(2).values.view(-1))
    for k, members, rows in plan.groups:
        columns = [getattr(flat[i], attr)[:, :k] for attr in ("Q_old", "Q_new") for i in members]
        grams, values = principal_extremes(
            torch.stack(columns).view(2, len(members), rows, k).double())
        pieces += [grams.view(-1), values.view(-1)]
    return plan.keys, torch.cat(pieces), plan.finish


def _refresh(state: dict[str, Tensor], L: Tensor, R: Tensor, cfg: SoapConfig, *, first: bool
             ) -> tuple[SideRefresh | None, SideRefresh | None, dict[str, Tensor]]:
    """Refresh both bases and carry the moments across: ``exp_avg`` goes out through the old
    basis and back in through the new one (exact: it is the same momentum in parameter space);
    ``exp_avg_sq`` is permuted along each axis to follow its eigenvector (:func:`refresh_side`)."""
    # qr_fp32_matmul_prec acts through torch's global mode only (TF32 on CUDA, as in
    # Emerging-Optimizers; no-op on CPU): emulating TF32 in the power step on CPU changed square
    # problems' updates by up to 50% (docs/soap.md), a price CPU users should not pay by default.
    prec = "highest"
    use_eigh = cfg.use_eigh or first  # the identity is no warm start: the first refresh is eigh
    with matmul_precision(cfg.qr_fp32_matmul_prec):
        momentum = project_out(state["exp_avg"], state["Q_L"], state["Q_R"], prec)
        new = {"Q_L": state["Q_L"], "Q_R": state["Q_R"], "exp_avg_sq": state["exp_avg_sq"]}
        sides: list[SideRefresh | None] = []
        for key, factor, axis in (("Q_L", L, 0), ("Q_R", R, 1)):
            side = refresh_side(factor, state[key], use_eigh=use_eigh,
                                power_iter_steps=cfg.power_iter_steps,
                                prec=prec) if _present(factor) else None
            if side is not None:
                new[key] = side.Q
                new["exp_avg_sq"] = new["exp_avg_sq"].index_select(axis, side.order)
            sides.append(side)
        new["exp_avg"] = project_in(momentum, new["Q_L"], new["Q_R"], prec)
    return sides[0], sides[1], new


# the Rayleigh quotients diag(Q^T F Q) of (L, R) in their current bases; None for an absent side
Quotients = tuple[Tensor | None, Tensor | None]


@functools.lru_cache(maxsize=64)
def _constant(n: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A length-``n`` vector of ``value`` (read-only; cached, as it recurs every step)."""
    return torch.full((n,), value, dtype=dtype, device=device)


def _next_quotients(sq: Tensor, previous: Quotients,
                    whitening: tuple[Whitening | None, Whitening | None], *, beta: float,
                    cfg: SoapConfig) -> Quotients:
    """This step's Rayleigh quotients ``diag(Q^T F_t Q)`` WITHOUT the ``d^3`` product: the bases
    did not change, and ``F_t = b F_{t-1} + (1 - b) T`` is linear, so ``q_t = b q_{t-1} + (1 - b)
    diag(Q^T T Q)``, and every update term's diagonal is a row or column sum of ``sq = Gp^2``
    (which Adam squares anyway), ``Gp = Q_L^T G Q_R`` being the projected gradient (``Q_L`` and
    ``Q_R`` are orthogonal, so ``Q_L^T G Q_R`` has the row norms of ``Q_L^T G`` and the column
    norms of ``G Q_R``):

    * plain: ``diag(Q_L^T G G^T Q_L) = sum_j Gp_ij^2``, ``diag(Q_R^T G^T G Q_R) = sum_i Gp_ij^2``;
    * KL-Shampoo (:func:`_kl_whitened`): ``sum_j Gp_ij^2 / (n max(w^R_j, eps))`` and
      ``sum_i Gp_ij^2 / (m max(w^L_i, eps))``, with ``w`` the very quotients the factor update
      divided by, and its weights (it computes them itself: near-null directions of a
      rank-deficient factor make the division ill-conditioned, so no other estimate will do); an
      absent side whitens with 1.

    Each side's weighted sum and the EMA are one matrix-vector product, ``addmv(q, sq, weights,
    beta=b, alpha=1-b)`` (plain SOAP's weights are ones): one call where a reduction and a
    ``lerp`` took two, which is what health costs on small matrices.

    ``previous`` are ``q_{t-1}`` (None where unknown: that side's result is None). Exact in
    exact arithmetic; in float32 each step adds ~1e-7 relative, below the ~1e-3 floor the
    quotients' rounding already puts under the staleness (docs/soap.md).
    """
    q_L, q_R = previous
    m, n = sq.shape

    def weights(white: Whitening | None, dim: int) -> Tensor:
        if white is not None:
            return white.weights
        value = 1.0 / max(dim, 1) if cfg.use_kl_shampoo else 1.0
        return _constant(dim, value, sq.dtype, sq.device)

    return (torch.addmv(q_L, sq, weights(whitening[1], n), beta=beta, alpha=1.0 - beta)
            if q_L is not None else None,
            torch.addmv(q_R, sq.mT, weights(whitening[0], m), beta=beta, alpha=1.0 - beta)
            if q_R is not None else None)


def _quotients_or_product(carried: Tensor | None, factor: Tensor, Q: Tensor) -> Tensor | None:
    """The carried quotients, else ``diag(Q^T F Q)`` from one product (None: absent side)."""
    if carried is not None or not _present(factor):
        return carried
    return _rayleigh(factor, Q, "highest")[1]


def gradient_fits(norm: float, shape: tuple[int, int], cfg: SoapConfig, dtype: torch.dtype
                  ) -> bool | None:
    """Whether a step on a FINITE gradient of Frobenius norm ``norm`` keeps every state tensor
    of ``dtype`` finite: True, False, or None when only the new factors can tell (then
    :func:`soap_step` with ``verify_factors`` checks them).

    SOAP squares the gradient: a gradient above ~1e19 in float32 is finite, its factor terms and
    second moments are not, and a refresh of an Inf factor raises or returns NaN bases. The
    bound kept is ``limit = max(dtype) / 4`` on every factor's trace and on ``||G||^2``, an
    invariant of all committed state (it holds for the zero state): a factor is positive
    semi-definite, so its trace bounds every entry, eigenvalue and Rayleigh quotient, and each
    lerp's ``T - F`` stays below ``max / 2``. Plain SOAP's terms ``G G^T`` and ``G^T G`` have
    trace ``||G||^2``, and the second moments' ``(Q_L^T G Q_R)^2`` entries are at most
    ``||G||^2``, so ``||G||^2 <= limit`` is enough. KL-Shampoo's terms are ``||G||^2`` times at
    most its largest whitening weight, ``1 / (dim eps)``; a gradient past that bound is not
    refused outright (the weight is that large only while a factor is ~0), its new factors are
    checked instead.
    """
    limit = torch.finfo(dtype).max / 4
    square = norm * norm
    if not square <= limit:  # also Inf and NaN
        return False
    if not cfg.use_kl_shampoo or square == 0.0:  # (a zero gradient also fits a 0-wide matrix)
        return True
    weight = max(1.0, 1.0 / (min(shape) * cfg.eps))
    return True if square * weight <= limit and norm * weight <= limit else None


def _factors_fit(factors: tuple[Tensor, Tensor], beta: float, dtype: torch.dtype) -> bool:
    """:func:`gradient_fits`' bound on new factors ``F = b F_old + (1 - b) T``: ``tr F <= (1 - b)
    limit`` keeps both ``tr T`` and ``tr F`` under ``limit`` (one trace per side, one sync)."""
    present = [F for F in factors if _present(F)]
    if not present:
        return True
    traces = torch.stack([torch.trace(F) for F in present]).tolist()
    bound = (1.0 - beta) * torch.finfo(dtype).max / 4
    return all(tr <= bound for tr in traces)


def soap_step(G: Tensor, state: dict[str, Tensor], cfg: SoapConfig, *, want_health: bool,
              quotients: Quotients | None = None, track: bool = False,
              verify_factors: bool = False
              ) -> tuple[Tensor, dict[str, Tensor], list[SideHealth], Quotients | None] | None:
    """One SOAP step on one full fp32 gradient ``G`` (m, n); the inputs are not modified.

    With ``t`` the 1-based step and ``b = 1 - (1 - shampoo_beta) / (1 - shampoo_beta^t)``
    (``shampoo_beta`` itself without ``correct_bias``), in this order (Emerging-Optimizers'):

    1. factors: ``L, R <- update_factors(L, R, G, b)`` (plain or KL-Shampoo), at
       ``fp32_matmul_prec``;
    2. if ``(t - 1) % precondition_frequency == 0``: refresh ``Q_L, Q_R`` (eigh at ``t = 1``),
       carrying ``exp_avg`` and ``exp_avg_sq`` across (:func:`_refresh`), at
       ``qr_fp32_matmul_prec``;
    3. ``G' = Q_L^T G Q_R``; ``D' = adam_direction(G', ...)``; ``U = Q_L D' Q_R^T``.

    The SOAP paper (arXiv 2409.11321, Alg. 3) refreshes after the parameter update; refreshing
    first, as Emerging-Optimizers does, lets step 1 already use the basis of ``G``.

    Health between refreshes needs the Rayleigh quotients of the current bases under the new
    factors. ``quotients``, those of the previous step's factors in the same bases (returned by
    the previous call), turn them into a few reductions of ``G'`` (:func:`_next_quotients`).
    A refresh returns its new bases' quotients: eigh's eigenvalues, or after a power step
    :meth:`SideRefresh.new_quotients` (half a product; below 256 a product). Without them (the
    first step after ``load_state_dict``, or at a ``fp32_matmul_prec`` other than "highest",
    whose rounded products the increments would not follow) they cost one ``F Q`` product per
    side. ``track`` says that a later health step may fall between refreshes: the carried
    quotients are then kept up to date on steps without health, and a power-iteration refresh
    starts them, so that such a step finds them. Without it (health off, or every health step a
    refresh: :meth:`optim.soap.SOAP._carries_quotients`) a refresh measures its own health
    without them (its old basis's quotients come off its own product).

    ``G`` must be finite and pass :func:`gradient_fits`; where that returned None, pass
    ``verify_factors``: the new factors are checked before anything reads them.

    Returns:
        ``(U, new_state, health, quotients)``; ``health`` (each present side's
        :class:`SideHealth`, for :func:`soap_health`) is empty unless ``want_health``;
        ``quotients`` are this step's, for the next call, or None where unknown. None when
        ``verify_factors`` found a factor past the bound (the step must be skipped).
    """
    t = int(state["step"]) + 1
    beta = cfg.shampoo_beta
    if cfg.correct_bias:
        beta = 1.0 - (1.0 - beta) / (1.0 - beta**t)
    prec = cfg.fp32_matmul_prec
    with matmul_precision(prec):
        L, R, whitening = update_factors(state["L"], state["R"], G, beta=beta,
                                         kl=cfg.use_kl_shampoo, Q_L=state["Q_L"],
                                         Q_R=state["Q_R"], eps=cfg.eps, prec=prec)
    if verify_factors and not _factors_fit((L, R), beta, state["exp_avg"].dtype):
        return None
    # health's ||F||^2 of a large factor now, while the factor just written is in cache
    totals = [_frobenius(F) if want_health and F.numel() > _BATCHED_NORM_MAX else None
              for F in (L, R)]
    side_L = side_R = None
    new = {k: state[k] for k in ("Q_L", "Q_R", "exp_avg", "exp_avg_sq")}
    refresh = (t - 1) % cfg.precondition_frequency == 0
    if refresh:
        side_L, side_R, new = _refresh(state, L, R, cfg, first=t == 1)
    with matmul_precision(prec):
        Gp = project_in(G, new["Q_L"], new["Q_R"], prec)
        square = Gp.square()
        D, exp_avg, exp_avg_sq = adam_direction(Gp, new["exp_avg"], new["exp_avg_sq"], cfg=cfg,
                                                t=t, square=square)
        U = project_out(D, new["Q_L"], new["Q_R"], prec)
    new_state = {"L": L, "R": R, "Q_L": new["Q_L"], "Q_R": new["Q_R"], "exp_avg": exp_avg,
                 "exp_avg_sq": exp_avg_sq, "step": torch.full_like(state["step"], t)}
    current: Quotients | None = None
    if refresh:
        # the new bases diagonalize these factors: their eigenvalues (kept only if health is on)
        if (want_health or track) and (cfg.use_eigh or t == 1):
            current = (side_L.eigvals.flip(0) if side_L is not None else None,
                       side_R.eigvals.flip(0) if side_R is not None else None)
        elif track and prec == "highest" and cfg.precondition_frequency > 1:
            # a power step: half a product (a product on small sides) gives the new bases'
            # quotients (SideRefresh.new_quotients) for the steps until the next refresh (none
            # when every step refreshes, or when no health step falls before the next refresh:
            # a refresh reads its old basis's quotients off its own product), except where
            # KL-Shampoo's whitening computes them at the next step anyway (a side's quotients
            # whiten the other side's update)
            kl = cfg.use_kl_shampoo
            current = (side_L.new_quotients() if side_L is not None and not (kl and _present(R))
                       else None,
                       side_R.new_quotients() if side_R is not None and not (kl and _present(L))
                       else None)
    elif want_health or (track and prec == "highest"):
        # q_{t-1}: KL-Shampoo's own quotients of the old factors, else the previous call's
        previous: Quotients = (whitening[0].quotients if whitening[0] is not None else
                               quotients[0] if quotients else None,
                               whitening[1].quotients if whitening[1] is not None else
                               quotients[1] if quotients else None)
        carried = _next_quotients(square, previous, whitening, beta=beta, cfg=cfg) \
            if prec == "highest" else (None, None)
        if want_health:
            current = (_quotients_or_product(carried[0], L, new["Q_L"]),
                       _quotients_or_product(carried[1], R, new["Q_R"]))
        elif all(q is not None or not _present(F) for q, F in zip(carried, (L, R), strict=True)):
            current = carried
    health: list[SideHealth] = []
    if want_health:
        sides = (("L", "Q_L", L, side_L), ("R", "Q_R", R, side_R))
        for i, (name, key, factor, side) in enumerate(sides):
            if _present(factor):
                health.append(_side_health(name, state[key], side, factor, total=totals[i],
                                           first=t == 1,
                                           quotients=None if current is None else current[i]))
    return U, new_state, health, current

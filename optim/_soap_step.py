"""SOAP's functional step: Adam in the eigenbasis of the Kronecker factors, with the bases'
refresh and the Rayleigh quotients carried between refreshes for health.

Everything here is pure tensor math on ONE full matrix; :class:`optim.soap.SOAP` gathers state
and calls :func:`soap_step`. The update rule, sources and departures are written out in
:func:`soap_step` and in ``docs/soap.md``; the factor and basis kernels are in
:mod:`optim._soap_basis`, the health measures in :mod:`optim._soap_health`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from optim._soap_basis import (
    SideRefresh,
    Whitening,
    _present,
    _rayleigh,
    matmul_precision,
    project_in,
    project_out,
    refresh_side,
    update_factors,
)
from optim._soap_health import SideHealth, _frobenius, _side_health

__all__ = ["SoapConfig", "adam_direction", "clip_update_rms", "soap_step"]


# A factor of at most this many entries has its norm taken by optim._soap_health.soap_health,
# with the other factors of its size in the step in one reduction; a larger one inside
# soap_step, right after its update, while it is still in cache (read later, a 512x512 factor
# took 4x as long).
_BATCHED_NORM_MAX = 128 * 128


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
    max_update_rms: float = 0.0


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


# Emerging-Optimizers' floor under the update's RMS in ``max_rms / (rms + eps)``
_CLIP_RMS_EPS = 1e-7


def clip_update_rms(U: Tensor, max_rms: float) -> Tensor:
    """``U`` scaled by ``min(1, max_rms / (rms(U) + 1e-7))`` (Emerging-Optimizers'
    ``max_update_rms``; 0: ``U`` as it is). No host sync. Where it matters: docs/soap.md
    "Outsized early steps"."""
    if max_rms == 0 or U.numel() == 0:
        return U
    # the norm accumulated in float64: a finite float32 update with entries past ~1e19 has
    # squares that overflow, and an Inf RMS would scale the update to 0, a silent no-op step
    rms = torch.linalg.vector_norm(U, dtype=torch.float64) / U.numel() ** 0.5
    return U * (max_rms / (rms + _CLIP_RMS_EPS)).clamp(max=1.0).to(U.dtype)


def _refresh(state: dict[str, Tensor], L: Tensor, R: Tensor, cfg: SoapConfig, *, first: bool
             ) -> tuple[SideRefresh | None, SideRefresh | None, dict[str, Tensor]]:
    """Refresh both bases and carry the moments across: ``exp_avg`` goes out through the old
    basis and back in through the new one (exact: it is the same momentum in parameter space);
    ``exp_avg_sq`` is permuted along each axis to follow its eigenvector (:func:`refresh_side`)."""
    # qr_fp32_matmul_prec acts through cuBLAS's mode only (TF32 on CUDA, as in
    # Emerging-Optimizers; no-op on CPU): emulating TF32 in the power step on CPU changed square
    # problems' updates by up to 50% (docs/soap.md), a price CPU users should not pay by default.
    prec = "highest"
    use_eigh = cfg.use_eigh or first  # the identity is no warm start: the first refresh is eigh
    with matmul_precision(cfg.qr_fp32_matmul_prec, L.device):
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
    * KL-Shampoo (:func:`optim._soap_basis._kl_whitened`):
      ``sum_j Gp_ij^2 / (n max(w^R_j, eps))`` and ``sum_i Gp_ij^2 / (m max(w^L_i, eps))``, with
      ``w`` the very quotients the factor update divided by, and its weights (it computes them
      itself: near-null directions of a rank-deficient factor make the division ill-conditioned, so
      no other estimate will do); an absent side whitens with 1.

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


# the two sides' refreshed bases (None: no refresh this step, or an absent side)
Refreshed = tuple[SideRefresh | None, SideRefresh | None]


def _factor_beta(cfg: SoapConfig, t: int) -> float:
    """The factors' EMA coefficient at step ``t``: ``1 - (1 - shampoo_beta) / (1 -
    shampoo_beta^t)``, or ``shampoo_beta`` itself without ``correct_bias``."""
    beta = cfg.shampoo_beta
    if cfg.correct_bias:
        beta = 1.0 - (1.0 - beta) / (1.0 - beta**t)
    return beta


def _precondition(G: Tensor, new: dict[str, Tensor], cfg: SoapConfig, *, t: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 3 of :func:`soap_step` in the bases of ``new``, at ``fp32_matmul_prec``: ``G' = Q_L^T
    G Q_R``, ``D' = adam_direction(G', ...)`` on ``new``'s moments, ``U = Q_L D' Q_R^T``.
    Returns ``(U, exp_avg, exp_avg_sq, G'^2)``; the squares also carry the quotients
    (:func:`_next_quotients`)."""
    prec = cfg.fp32_matmul_prec
    with matmul_precision(prec, G.device):
        Gp = project_in(G, new["Q_L"], new["Q_R"], prec)
        square = Gp.square()
        D, exp_avg, exp_avg_sq = adam_direction(Gp, new["exp_avg"], new["exp_avg_sq"], cfg=cfg,
                                                t=t, square=square)
        U = project_out(D, new["Q_L"], new["Q_R"], prec)
    return U, exp_avg, exp_avg_sq, square


def _refreshed_quotients(refreshed: Refreshed, factors: tuple[Tensor, Tensor], cfg: SoapConfig,
                         *, t: int, want_health: bool, track: bool) -> Quotients | None:
    """After a refresh at step ``t``: the new bases' quotients under ``factors`` = ``(L, R)``,
    where health or ``track`` will read them (:func:`soap_step`); None where no one will."""
    side_L, side_R = refreshed
    L, R = factors
    # the new bases diagonalize these factors: their eigenvalues (kept only if health is on)
    if (want_health or track) and (cfg.use_eigh or t == 1):
        return (side_L.eigvals.flip(0) if side_L is not None else None,
                side_R.eigvals.flip(0) if side_R is not None else None)
    if track and cfg.fp32_matmul_prec == "highest" and cfg.precondition_frequency > 1:
        # a power step: half a product (a product on small sides) gives the new bases'
        # quotients (SideRefresh.new_quotients) for the steps until the next refresh (none
        # when every step refreshes, or when no health step falls before the next refresh:
        # a refresh reads its old basis's quotients off its own product), except where
        # KL-Shampoo's whitening computes them at the next step anyway (a side's quotients
        # whiten the other side's update)
        kl = cfg.use_kl_shampoo
        return (side_L.new_quotients() if side_L is not None and not (kl and _present(R))
                else None,
                side_R.new_quotients() if side_R is not None and not (kl and _present(L))
                else None)
    return None


def _carried_quotients(square: Tensor, whitening: tuple[Whitening | None, Whitening | None],
                       quotients: Quotients | None, factors: tuple[Tensor, Tensor],
                       new: dict[str, Tensor], *, beta: float, cfg: SoapConfig,
                       want_health: bool) -> Quotients | None:
    """Between refreshes: this step's quotients of ``factors`` = ``(L, R)`` in the bases of
    ``new``, carried from ``quotients`` (the previous call's) by :func:`_next_quotients` at
    "highest". For health a side without them takes one ``F Q`` product
    (:func:`_quotients_or_product`); without health, None unless every present side has them."""
    L, R = factors
    # q_{t-1}: KL-Shampoo's own quotients of the old factors, else the previous call's
    previous: Quotients = (whitening[0].quotients if whitening[0] is not None else
                           quotients[0] if quotients else None,
                           whitening[1].quotients if whitening[1] is not None else
                           quotients[1] if quotients else None)
    carried = _next_quotients(square, previous, whitening, beta=beta, cfg=cfg) \
        if cfg.fp32_matmul_prec == "highest" else (None, None)
    if want_health:
        return (_quotients_or_product(carried[0], L, new["Q_L"]),
                _quotients_or_product(carried[1], R, new["Q_R"]))
    if all(q is not None or not _present(F) for q, F in zip(carried, (L, R), strict=True)):
        return carried
    return None


def _step_health(state: dict[str, Tensor], factors: tuple[Tensor, Tensor],
                 refreshed: Refreshed, totals: list[Tensor | None], current: Quotients | None,
                 *, first: bool) -> list[SideHealth]:
    """Each present side's :class:`SideHealth` (:func:`_side_health`): ``state`` holds the
    bases before this step, ``factors`` = ``(L, R)`` after its update, ``totals`` their norms
    where already taken, ``current`` this step's quotients."""
    health: list[SideHealth] = []
    L, R = factors
    side_L, side_R = refreshed
    sides = (("L", "Q_L", L, side_L), ("R", "Q_R", R, side_R))
    for i, (name, key, factor, side) in enumerate(sides):
        if _present(factor):
            health.append(_side_health(name, state[key], side, factor, total=totals[i],
                                       first=first,
                                       quotients=None if current is None else current[i]))
    return health


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
    3. ``G' = Q_L^T G Q_R``; ``D' = adam_direction(G', ...)``; ``U = Q_L D' Q_R^T``, its RMS
       clipped to ``max_update_rms`` if that is not 0 (:func:`clip_update_rms`).

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
        :class:`SideHealth`, for :func:`optim._soap_health.soap_health`) is empty unless
        ``want_health``; ``quotients`` are this step's, for the next call, or None where
        unknown. None when
        ``verify_factors`` found a factor past the bound (the step must be skipped).
    """
    t = int(state["step"]) + 1
    beta = _factor_beta(cfg, t)
    prec = cfg.fp32_matmul_prec
    with matmul_precision(prec, G.device):
        L, R, whitening = update_factors(state["L"], state["R"], G, beta=beta,
                                         kl=cfg.use_kl_shampoo, Q_L=state["Q_L"],
                                         Q_R=state["Q_R"], eps=cfg.eps, prec=prec)
    if verify_factors and not _factors_fit((L, R), beta, state["exp_avg"].dtype):
        return None
    # health's ||F||^2 of a large factor now, while the factor just written is in cache
    totals = [_frobenius(F) if want_health and F.numel() > _BATCHED_NORM_MAX else None
              for F in (L, R)]
    refreshed: Refreshed = (None, None)
    new = {k: state[k] for k in ("Q_L", "Q_R", "exp_avg", "exp_avg_sq")}
    refresh = (t - 1) % cfg.precondition_frequency == 0
    if refresh:
        side_L, side_R, new = _refresh(state, L, R, cfg, first=t == 1)
        refreshed = (side_L, side_R)
    U, exp_avg, exp_avg_sq, square = _precondition(G, new, cfg, t=t)
    U = clip_update_rms(U, cfg.max_update_rms)
    new_state = {"L": L, "R": R, "Q_L": new["Q_L"], "Q_R": new["Q_R"], "exp_avg": exp_avg,
                 "exp_avg_sq": exp_avg_sq, "step": torch.full_like(state["step"], t)}
    current: Quotients | None = None
    if refresh:
        current = _refreshed_quotients(refreshed, (L, R), cfg, t=t, want_health=want_health,
                                       track=track)
    elif want_health or (track and prec == "highest"):
        current = _carried_quotients(square, whitening, quotients, (L, R), new, beta=beta,
                                     cfg=cfg, want_health=want_health)
    health = _step_health(state, (L, R), refreshed, totals, current, first=t == 1) \
        if want_health else []
    return U, new_state, health, current

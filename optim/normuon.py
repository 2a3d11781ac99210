"""NorMuon: Muon plus a per-neuron second-moment normalization of the full matrix's update.

:class:`NorMuon` (Li et al. 2025, arXiv 2510.05491) adds, on the full matrix after Muon's
update ``U_t`` of a matrix of shape ``(A, B)`` (:mod:`optim.muon`), a per-neuron (per output
row) second moment and a norm-preserving rescale::

    v_t = beta2 v_{t-1} + (1 - beta2) mean_j(U_t[i, j]^2)        (one value per row i)
    N_t = U_t / (sqrt(v_t) + eps)
    U_t <- N_t ||U_t||_F / ||N_t||_F

The rows of an orthogonalized update have very different norms when ``A > B``; NorMuon evens
them out while the last line keeps Muon's overall step size, so learning rates carry over.
When ``A <= B`` (square and wide matrices: attention projections, down-projections) an exact
polar factor's rows all have norm 1, ``v`` is the same for every row and the rescale undoes
the normalization: NorMuon is Muon there, up to the rows' Newton-Schulz error (one step on a
Gaussian gradient with rows scaled by U[0, 3], ``||NorMuon - Muon|| / ||Muon||``: 0.000 with
``"svd"``, 0.001 Polar Express, 0.13 quintic at 32x128; 0.47-0.49 at 128x32).
``v`` lives with the full matrix on its owner rank.

The step size follows the authors' reference code (norm-preserving, then Muon's shape factor
``adjust_lr_fn``), not the paper's Algorithm 1, which scales every update to an RMS of
``0.2 lr`` (``0.2 lr sqrt(A B) / ||N||_F``). ``adjust_lr_fn="match_rms_adamw"`` gives that
scale only when ``||U||_F = sqrt(min(A, B))``: an exact polar factor, unsoftened (the quintic's
``~0.89 sqrt(min(A, B))`` makes it ``~0.18 lr``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optim._checks import ADAMW, is_real
from optim._exchange import MatrixItem
from optim.muon import NS_STEPS_UNSET, Muon, Softening
from optim.orthogonalize import JORDAN_QUINTIC

__all__ = ["NorMuon", "normuon_normalize"]


def normuon_normalize(U: Tensor, v: Tensor, *, beta2: float, eps: float) -> Tensor:
    """NorMuon's per-row normalization of ``U`` (``(..., m, n)``); updates ``v`` (``(..., m, 1)``)
    in place. See the module docstring for the rule."""
    return _normuon_normalize(U, v, beta2=beta2, eps=eps)[0].to(U.dtype)


def _normuon_normalize(U: Tensor, v: Tensor, *, beta2: float, eps: float
                       ) -> tuple[Tensor, Tensor]:
    """:func:`normuon_normalize` with the result in float32 (or wider), and ``||U||_F`` of each
    matrix (``(..., 1, 1)``): the rescale makes it the result's norm too, so health reads the
    update's RMS from it.

    Two passes over ``U``: its rows' sums of squares (float32 accumulation, also for a bf16
    ``U``) give ``v``, ``||U||_F^2`` (their sum) and ``||N||_F^2 = sum_i |U_i|^2 / (sqrt(v_i) +
    eps)^2``, so ``N`` is never formed; then one product by a per-row factor."""
    wide = torch.promote_types(U.dtype, torch.float32)
    row_norm = torch.linalg.vector_norm(U, dim=-1, keepdim=True, dtype=wide)
    row_sq = row_norm.square()
    # a matrix without columns has no entries: its rows' mean square is 0, not 0/0
    v.lerp_((row_sq / max(U.size(-1), 1)).to(v.dtype), 1.0 - beta2)
    denom = v.sqrt() + eps
    # a row whose second moment is 0 has only zeros (v > 0 once it had an entry): it stays 0,
    # also at eps = 0, where 1 / denom is inf and 0 * inf NaN
    inv = torch.where(denom > 0, denom.reciprocal(), 0.0)                   # (..., m, 1)
    norm = row_sq.sum(dim=-2, keepdim=True).sqrt()                          # ||U||_F
    # ||N||_F from the rows' scaled norms, not their squares times inv^2: at a tiny eps a row
    # of zeros has an inv^2 beyond float32 (0 * inf), while |U_i| inv_i stays bounded
    n_norm = torch.linalg.vector_norm(row_norm * inv, dim=-2, keepdim=True)
    return U * (inv * (norm / n_norm.clamp(min=1e-30))), norm


class NorMuon(Muon):
    """Muon plus NorMuon's per-neuron second-moment normalization (module docstring).

    Extra args: ``beta2`` (second-moment decay, default 0.95) and ``normuon_eps`` (1e-8).
    State on the owner of each matrix: ``second_moment`` of shape ``(rows, 1)``, float32.
    """

    matrix_algorithm = "normuon"
    owner_state_keys = frozenset({"second_moment"})

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = JORDAN_QUINTIC, eps: float = 1e-7,
                 ns_steps: int = NS_STEPS_UNSET, adjust_lr_fn: str | None = None, *,
                 beta2: float = 0.95,
                 normuon_eps: float = 1e-8, ns_method: str = "quintic",
                 softening: Softening = 0.0, sharding: Any = None, health_every: int = 1,
                 health_probes: int | None = None) -> None:
        _check_normuon_args(beta2, normuon_eps)
        super().__init__(params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps,
                         ns_steps, adjust_lr_fn, ns_method=ns_method, softening=softening,
                         sharding=sharding, health_every=health_every,
                         health_probes=health_probes,
                         _extra_defaults={"beta2": beta2, "normuon_eps": normuon_eps})

    def _check_matrix_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_matrix_hyperparameters(group)
        _check_normuon_args(group["beta2"], group["normuon_eps"])

    _merges_orientations = False  # each matrix's rows are normalized as they stand

    def _init_state(self, item: MatrixItem, *, owner: bool) -> None:
        super()._init_state(item, owner=owner)
        state = self.state[item.param]
        if owner and "second_moment" not in state:
            state["second_moment"] = torch.zeros(item.shape[0], 1, dtype=torch.float32,
                                                 device=item.param.device)

    def _state_dtype(self, p: Tensor, key: str) -> torch.dtype | None:
        return torch.float32 if key == "second_moment" else super()._state_dtype(p, key)

    def _state_shapes(self, shape: tuple[int, ...], algorithm: str
                      ) -> dict[str, tuple[tuple[int, ...], ...]]:
        shapes = super()._state_shapes(shape, algorithm)
        if algorithm != ADAMW:
            shapes["second_moment"] = ((shape[0], 1),)
        return shapes

    def update_like(self, item: MatrixItem, input_dtype: torch.dtype
                    ) -> tuple[torch.dtype | None, bool]:
        dtype, transposed = super().update_like(item, input_dtype)
        # the normalized update is float32 or wider, in the orthogonalized update's layout
        return (None if dtype is None else torch.promote_types(dtype, torch.float32)), transposed

    def _post_orthogonalize(self, items: list[MatrixItem], U: Tensor
                            ) -> tuple[Tensor, Tensor | None]:
        group = items[0].group
        for item in items:
            self._init_state(item, owner=True)
        old = torch.stack([self.state[item.param]["second_moment"] for item in items])
        v = old.clone()
        # the normalized update stays float32 (or wider), also for a bf16 U
        out, norms = _normuon_normalize(U, v, beta2=group["beta2"], eps=group["normuon_eps"])
        # A non-finite U (a finite input beyond bfloat16's range) is skipped by the frame: its
        # second moment must stay as it was (a select, no host sync)
        v = torch.where(torch.isfinite(norms), v, old)
        for item, v_new in zip(items, v.unbind(0), strict=True):
            self.state[item.param]["second_moment"].copy_(v_new)
        return out, norms


def _check_normuon_args(beta2: float, normuon_eps: float) -> None:
    if not (is_real(beta2) and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
    if not (is_real(normuon_eps) and 0.0 <= normuon_eps < math.inf):
        raise ValueError(f"normuon_eps must be a finite number >= 0, got {normuon_eps!r}")

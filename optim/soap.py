"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors, with KL-Shampoo factors.

Update rule for a matrix ``W`` (m, n) with gradient ``G`` (Vyas et al. 2024, arXiv 2409.11321;
KL-Shampoo: Lin et al. 2025, arXiv 2509.03378; order of operations and argument semantics of
NVIDIA Emerging-Optimizers' ``SOAP``, so that the same arguments give the same steps)::

    b   = 1 - (1 - shampoo_beta) / (1 - shampoo_beta^t)          (shampoo_beta if not correct_bias)
    L  <- b L + (1-b) G G^T,   R <- b R + (1-b) G^T G            (use_kl_shampoo=False)
    L  <- b L + (1-b)/n G R^-1 G^T,  R <- b R + (1-b)/m G^T L^-1 G   (use_kl_shampoo=True)
    every precondition_frequency steps (and at t = 1, by eigh):
        Q_L, Q_R <- eigenbases of L, R (eigh, or power_iter_steps of QR warm-started)
        exp_avg re-expressed in the new bases; exp_avg_sq permuted to follow its eigenvectors
    G'  = Q_L^T G Q_R
    D'  = Adam(G'; exp_avg, exp_avg_sq, betas, eps, nesterov, correct_bias)
    U   = Q_L D' Q_R^T, scaled to RMS max_update_rms where above it (0: never)
    W  <- W (1 - lr wd) - lr U

All state lives with the FULL matrix on its owner rank (``self.state[p]``, keys ``L``, ``R``,
``Q_L``, ``Q_R``, ``exp_avg``, ``exp_avg_sq``, ``step``); phase 1 only hands the gradient over,
phase 3 applies weight decay and the update to this rank's piece. The math is in
:mod:`optim._soap_step` (the step), :mod:`optim._soap_basis` (factors and eigenbases) and
:mod:`optim._soap_health`; ``docs/soap.md`` explains the choices and where they differ from
Emerging-Optimizers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optim._base import MatrixOptimizer
from optim._checks import ADAMW, as_scalar, check_betas, check_flags, check_rates, is_int, is_real
from optim._exchange import DeferredMetrics, LocalExchange, MatrixItem, all_finite, local
from optim._soap_basis import PRECISIONS
from optim._soap_health import SideHealth, soap_health
from optim._soap_step import SoapConfig, gradient_fits, soap_step

__all__ = ["SOAP"]

_CONFIG_KEYS = ("betas", "shampoo_beta", "eps", "nesterov", "correct_bias", "fp32_matmul_prec",
                "use_eigh", "qr_fp32_matmul_prec", "power_iter_steps", "use_kl_shampoo",
                "precondition_frequency", "max_update_rms")


class SOAP(MatrixOptimizer):
    """SOAP / KL-Shampoo with owner sharding and eigenbasis health (module docstring).

    Args:
        params: matrices, ``model.named_parameters()`` or param groups; ``algorithm="adamw"``
            groups take the AdamW fallback (:func:`optim.split_param_groups`).
        lr, betas, shampoo_beta, eps, weight_decay, nesterov, correct_bias, fp32_matmul_prec,
            use_eigh, qr_fp32_matmul_prec, power_iter_steps, use_kl_shampoo: as
            Emerging-Optimizers' ``SOAP``. ``correct_bias`` corrects both Adam's moments and the
            factors' EMA. ``weight_decay`` is decoupled: ``W <- W (1 - lr wd)``.
            ``fp32_matmul_prec`` ("highest", "high" = TF32, "medium" = bf16) governs the factor
            updates and the projections, emulated on CPU by rounding the operands
            (:mod:`optim._soap_basis`). ``qr_fp32_matmul_prec`` governs the basis refresh
            through torch's global float32 matmul mode only: TF32 on CUDA, no effect on CPU
            (as in Emerging-Optimizers; docs/soap.md says why).
        max_update_rms: as Emerging-Optimizers': scale each matrix's update ``Q_L D' Q_R^T``
            down to this RMS where it is above (0, the default: never). A basis refresh moves
            momentum onto coordinates whose second moment is still ~0, most of all in the
            first steps, where updates can reach hundreds of times Adam's; 1.0 caps those and
            leaves ordinary steps alone (docs/soap.md, "Outsized early steps").
        precondition_frequency: refresh the eigenbases every this many steps (factors are
            updated every step).
        max_precond_dim: a dimension above this gets no factor (one-sided SOAP): its ``L``/``Q_L``
            (or ``R``/``Q_R``) are stored as empty ``(0, 0)`` tensors and act as the identity.
        sharding: None or ``sharding.OwnerSharding()``.
        health_every: measure health every this many steps (0: never).

    Health per matrix and side ``S`` in ``L``/``R`` (a side without factor reports nothing):
    ``eigengap_ratio_S``, ``rotation_degrees_S_k1`` and ``_k8`` (new basis against the basis in
    use before this step; 0 without a refresh), ``basis_staleness_S``, ``nonfinite_skips``.
    """

    matrix_algorithm = "soap"
    owner_state_keys = frozenset({"L", "R", "Q_L", "Q_R", "exp_avg", "exp_avg_sq", "step"})

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 shampoo_beta: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.01, *,
                 nesterov: bool = False, correct_bias: bool = True,
                 fp32_matmul_prec: str = "highest", use_eigh: bool = False,
                 qr_fp32_matmul_prec: str = "high", power_iter_steps: int = 1,
                 max_update_rms: float = 0.0, use_kl_shampoo: bool = False,
                 precondition_frequency: int = 1,
                 max_precond_dim: int = 8192, sharding: Any = None,
                 health_every: int = 1) -> None:
        check_betas("betas", betas)  # before tuple(): a lone 0.9 is not iterable
        defaults = {"lr": lr, "betas": tuple(betas), "shampoo_beta": shampoo_beta, "eps": eps,
                    "weight_decay": weight_decay, "nesterov": nesterov,
                    "correct_bias": correct_bias, "fp32_matmul_prec": fp32_matmul_prec,
                    "use_eigh": use_eigh, "qr_fp32_matmul_prec": qr_fp32_matmul_prec,
                    "power_iter_steps": power_iter_steps, "max_update_rms": max_update_rms,
                    "use_kl_shampoo": use_kl_shampoo,
                    "precondition_frequency": precondition_frequency,
                    "max_precond_dim": max_precond_dim}
        _check_soap_args(defaults)
        super().__init__(params, defaults, sharding=sharding, health_every=health_every)

    def _init_runtime(self) -> None:
        super()._init_runtime()
        # per matrix: (step, Rayleigh quotients of its factors in its bases after that step), so
        # health between refreshes needs no F Q product (soap_step); not state: health only (a
        # copy carries them, __getstate__; a loaded state dict measures them from one product
        # at its next health step)
        self._quotients: dict[Tensor, tuple[int, Any]] = {}
        # health inputs of this step's batches, (names, per-matrix sides), until _end_batches
        self._batch_health: list[tuple[list[str], list[list[SideHealth]]]] = []

    def __getstate__(self) -> dict[str, Any]:
        # the carried quotients too: without them the copy measured its next health from a
        # product, which rounds otherwise (a staleness ~1e-7 apart from the original's)
        return {**super().__getstate__(), "_quotients_carried": dict(self._quotients)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        carried = state.pop("_quotients_carried", {})
        super().__setstate__(state)  # starts the runtime caches afresh
        self._quotients.update(carried)

    def _check_matrix_hyperparameters(self, group: dict[str, Any]) -> None:
        _check_soap_args(group)

    def _required_state(self, algorithm: str) -> set[str]:
        """A matrix's state comes whole: an AdamW state dict (``step``, ``exp_avg``,
        ``exp_avg_sq``, with the same shapes) passed the frame's key and shape checks, loaded,
        and then every step failed on the missing ``L``."""
        return super()._required_state(algorithm) | (set() if algorithm == ADAMW
                                                      else set(self.owner_state_keys))

    def _before_step(self) -> None:
        super()._before_step()
        # one process: every matrix's state is here, so a changed max_precond_dim is refused
        # before any batch steps (and before the step counters move)
        if isinstance(self._exchange, LocalExchange):
            for item in self.matrix_items():
                if state := self.state.get(item.param):
                    _check_layout(item, state)

    def _prepare(self, item: MatrixItem) -> Tensor:
        assert item.param.grad is not None  # MatrixOptimizer.step only passes params with a grad
        # sharded: the owner holds the state; refused here, the exchange raises it on every
        # rank before any owner computes (one process checked every matrix in _before_step)
        if not isinstance(self._exchange, LocalExchange) and \
                (state := self.state.get(item.param)):
            _check_layout(item, state)
        return local(item.param.grad)

    def _init_state(self, item: MatrixItem, *, owner: bool) -> None:
        """All SOAP state is owner state: created on the owner only, in at least fp32 (a float64
        parameter keeps float64 state); an absent side stores ``(0, 0)`` tensors."""
        state = self.state[item.param]
        if not owner or state:
            return
        m, n = item.shape
        limit = item.group["max_precond_dim"]
        dtype = torch.promote_types(item.param.dtype, torch.float32)
        kw: dict[str, Any] = {"dtype": dtype, "device": item.param.device}

        def factor(d: int) -> Tensor:
            return torch.zeros(d, d, **kw) if d <= limit else torch.zeros(0, 0, **kw)

        def basis(d: int) -> Tensor:
            return torch.eye(d, **kw) if d <= limit else torch.zeros(0, 0, **kw)

        state.update({"L": factor(m), "R": factor(n), "Q_L": basis(m), "Q_R": basis(n),
                      "exp_avg": torch.zeros(m, n, **kw), "exp_avg_sq": torch.zeros(m, n, **kw),
                      # float64: exact to 2^53 steps (float32 stops counting at 2^24, and the
                      # refresh schedule with it)
                      "step": torch.tensor(0.0, dtype=torch.float64)})

    def _state_shapes(self, shape: tuple[int, ...], algorithm: str
                      ) -> dict[str, tuple[tuple[int, ...], ...]]:
        shapes = super()._state_shapes(shape, algorithm)
        if algorithm != ADAMW:
            m, n = shape
            absent = (0, 0)  # a side above max_precond_dim
            shapes.update({"L": ((m, m), absent), "Q_L": ((m, m), absent),
                           "R": ((n, n), absent), "Q_R": ((n, n), absent),
                           "exp_avg": (shape,), "exp_avg_sq": (shape,), "step": ((),)})
        return shapes

    def matrix_cost(self, item: MatrixItem) -> float:
        """Eigenbasis refresh ``~m^3 + n^3`` plus projections ``~m n (m + n)`` per step."""
        limit = item.group["max_precond_dim"]
        m, n = item.shape
        return float(sum(d**3 + m * n * d for d in (m, n) if d <= limit)) or float(m * n)

    def _compute(self, items: list[MatrixItem], X: Tensor) -> Tensor:
        group = items[0].group
        cfg = SoapConfig(**{k: group[k] for k in _CONFIG_KEYS})
        due = self._health_due(group)
        # Factors and eigenbases need at least fp32 (bf16 Gram matrices lose their small
        # eigenvalues); a float64 parameter keeps float64 state (the batch holds one dtype).
        X = X.to(torch.promote_types(X.dtype, torch.float32))
        # ||G|| says whether the step keeps the state finite (gradient_fits): one reduction and
        # one host sync for the batch
        for item in items:
            self._init_state(item, owner=True)
        norms = torch.linalg.vector_norm(X, dim=(-2, -1)).tolist()
        updates: list[Tensor] = []
        taken: list[tuple[MatrixItem, tuple, int]] = []
        for item, G, norm in zip(items, X.unbind(0), norms, strict=True):
            # a buffer of its own: a batch's later matrices start at offsets that MKL's sgemm
            # may not find 16-byte aligned (m n not a multiple of 4), and it rounded their
            # products differently there, which SOAP's null-space directions grow into
            # lr-sized changes: 6x9 matrices stepped 0.0065 apart batched and one at a time,
            # and so did a sharded run whose owners batched them otherwise
            G = G.clone()
            state = self.state[item.param]
            step = int(state["step"])
            fits = gradient_fits(norm, item.shape, cfg, state["exp_avg"].dtype)
            result = None
            if fits is not False:
                cached = self._quotients.get(item.param)
                try:
                    result = soap_step(
                        G, state, cfg, want_health=due,
                        track=self._carries_quotients(group["step"] - (step + 1), cfg),
                        quotients=cached[1] if cached and cached[0] == step else None,
                        verify_factors=fits is None)
                except torch.linalg.LinAlgError as exc:
                    # this matrix alone is skipped; the batch's others keep their steps
                    self._warn_failed([item], exc)
            # None: its squares would overflow the state, or its decomposition failed
            if result is None:
                self._skip(item)
                updates.append(torch.full_like(G, math.nan))
                continue
            updates.append(result[0])
            taken.append((item, result, step + 1))  # new_state["step"]
        # commit only usable steps (the frame skips a non-finite update too): one host sync
        names, healths = [], []
        for (item, (_, new_state, health, q), step), ok in zip(
                taken, all_finite([result[0] for _, result, _ in taken]), strict=True):
            if not ok:
                self._skip(item)
                continue
            self.state[item.param].update(new_state)
            if q is not None:
                self._quotients[item.param] = (step, q)
            else:
                self._quotients.pop(item.param, None)
            names.append(item.name)
            healths.append(health)
        if due and names:  # measured with the step's other batches, in _end_batches
            self._batch_health.append((names, healths))
        return torch.stack(updates)

    def _carries_quotients(self, lag: int, cfg: SoapConfig) -> bool:
        """Whether a matrix's steps keep its bases' Rayleigh quotients up to date for a later
        health step (``soap_step``'s ``track``): only if one of its health steps can fall between
        its refreshes. ``lag`` is how many steps the matrix's own count trails the group's (a
        skipped step, a matrix added later). With ``health_every`` a multiple of
        ``precondition_frequency`` and the lag a multiple too, every health step is a refresh,
        which reads its old basis's quotients off its own product, so carrying them would buy
        nothing and cost a half product per side at each power-iteration refresh."""
        every, period = self.health_every, cfg.precondition_frequency
        return every > 0 and not (every % period == 0 and lag % period == 0)

    def _end_batches(self) -> None:
        """Health of every matrix of the step in one :func:`soap_health` call: groups of equal
        lengths span the batches (a transformer's shapes share sides), so a step pays its small
        tensor calls once, not once per shape; one tensor, converted by :meth:`health`."""
        if not self._batch_health:
            return
        names = [name for batch_names, _ in self._batch_health for name in batch_names]
        healths = [health for _, batch in self._batch_health for health in batch]
        self._batch_health = []
        self._record_deferred(names, DeferredMetrics(*soap_health(healths)))

    def update_like(self, item: MatrixItem, input_dtype: torch.dtype
                    ) -> tuple[torch.dtype | None, bool]:
        return torch.promote_types(input_dtype, torch.float32), False  # as _compute computes

    def _state_dtype(self, p: Tensor, key: str) -> torch.dtype | None:
        # as _init_state creates them (a step counter saved in float32 becomes float64)
        return torch.float64 if key == "step" else torch.promote_types(p.dtype, torch.float32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state (``MatrixOptimizer.load_state_dict``); the health quotients, which belong
        to the replaced state, are dropped."""
        super().load_state_dict(state_dict)
        self._quotients.clear()

    def _apply(self, item: MatrixItem, update: Tensor) -> None:
        group = item.group
        p_local = local(item.param)
        lr = as_scalar(group["lr"])  # a (1,) tensor too, as torch's optimizers take it
        p_local.mul_(1 - lr * group["weight_decay"])
        p_local.add_(update.to(p_local.dtype), alpha=-lr)


def _check_layout(item: MatrixItem, state: dict[str, Tensor]) -> None:
    """Raise ValueError when the group's ``max_precond_dim`` no longer matches the factors the
    matrix's state was laid out with at its first step (a side gets a factor or ``(0, 0)``
    then): the step reads the state, so a changed value would be silently ignored."""
    limit = item.group["max_precond_dim"]
    for key, d in (("L", item.shape[0]), ("R", item.shape[1])):
        want = (d, d) if d <= limit else (0, 0)
        if tuple(state[key].shape) != want:
            raise ValueError(
                f"{item.name}: max_precond_dim={limit} {'gives' if d <= limit else 'denies'} "
                f"its side of {d} a factor, but its state was laid out at its first step "
                f"{'without' if d <= limit else 'with'} one ({key} has shape "
                f"{tuple(state[key].shape)}); the layout is fixed then: put the value back, or "
                f"start a new optimizer with the new one")


_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _check_soap_args(d: dict[str, Any]) -> None:
    """Raise ValueError, naming the fix, for an argument SOAP cannot use."""
    check_rates(lr=d["lr"], weight_decay=d["weight_decay"])
    check_betas("betas", d["betas"])
    check_flags(d, "nesterov", "correct_bias", "use_eigh", "use_kl_shampoo")
    if not (is_real(d["shampoo_beta"]) and 0.0 <= d["shampoo_beta"] < 1.0):
        raise ValueError(f"shampoo_beta must be in [0, 1), got {d['shampoo_beta']!r}")
    if not (is_real(d["eps"]) and 0.0 < d["eps"] < math.inf):
        raise ValueError(f"eps must be a finite number > 0 (it also floors KL-Shampoo's "
                         f"eigenvalues; an infinite one makes every update 0), got {d['eps']!r}")
    if d["eps"] < _FLOAT32_TINY:
        raise ValueError(
            f"eps={d['eps']!r} is below float32's smallest normal number ({_FLOAT32_TINY:.3g}), "
            f"and SOAP's state is at least float32: there eps rounds to 0 or a subnormal. A "
            f"coordinate whose gradient has been 0 so far then divides 0 / (0 + eps) = NaN in "
            f"the Adam direction (and KL-Shampoo's whitening weights 1 / (dim eps) come out "
            f"infinite), so every step of that matrix is skipped as non-finite. Take eps >= "
            f"{_FLOAT32_TINY:.3g} (the default is 1e-8)")
    if not (is_real(d["max_update_rms"]) and 0.0 <= d["max_update_rms"] < math.inf):
        raise ValueError(f"max_update_rms must be a finite number >= 0 (0: no clipping), got "
                         f"{d['max_update_rms']!r}")
    d["max_update_rms"] = float(d["max_update_rms"])
    for key in ("fp32_matmul_prec", "qr_fp32_matmul_prec"):
        if d[key] not in PRECISIONS:
            raise ValueError(f"{key} must be one of {PRECISIONS}, got {d[key]!r}")
    for key, low in (("power_iter_steps", 1), ("precondition_frequency", 1),
                     ("max_precond_dim", 0)):
        value = d[key]
        if not is_int(value) or value < low:
            raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        d[key] = int(value)  # a NumPy integer (a sweep's) as Python's, which a checkpoint keeps

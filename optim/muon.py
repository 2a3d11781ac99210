"""Muon: momentum, then the (softened) polar factor of the full matrix.

Update rule of :class:`Muon` for a matrix ``W`` of shape ``(A, B)`` (as ``torch.optim.Muon``)::

    M_t = mu M_{t-1} + (1 - mu) G_t                 (momentum, elementwise: stays sharded)
    X_t = (1 - mu) G_t + mu M_t  if nesterov else M_t
    O_t = orthogonalize(X_t, method, steps)          (full matrix, on its owner rank)
    U_t = (1 - s_t) O_t + s_t X_t / ||X_t||_F        (Soft-Muon; s_t may follow a schedule)
    W  <- W (1 - lr wd) - lr_adj U_t,   lr_adj = lr sqrt(max(1, A/B))   ("original")
                                        lr_adj = 0.2 lr sqrt(max(A, B)) ("match_rms_adamw")

:class:`optim.normuon.NorMuon` normalizes ``U_t`` further, per neuron.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from optim._base import MatrixOptimizer
from optim._checks import ADAMW, as_scalar, check_flags
from optim._exchange import DeferredMetrics, MatrixItem, local
from optim._muon_args import (  # _UnsetSteps: optimizers pickled when it lived here load
    NS_STEPS_UNSET,
    Softening,
    _UnsetSteps,  # noqa: F401
    adjusted_lr,
    check_health_probes,
    check_muon_args,
    follow_method,
    settle_steps,
    softening_at,
)
from optim.health import estimate_orthogonality_error, update_orthogonality_error
from optim.orthogonalize import JORDAN_QUINTIC, orthogonalize, soften

__all__ = ["Muon", "adjusted_lr"]

_MUON_METRICS = ("orthogonality_error", "update_rms", "softening")

#: The largest Frobenius norm of a gradient and of a momentum buffer for which one process
#: moves the momentum in place (:meth:`Muon._prepare_local`): 2^60, so that the float32 sum of
#: squares Newton-Schulz normalizes its input by stays 2^-8 of float32's largest value.
IN_PLACE_NORM = 2.0**60


class Muon(MatrixOptimizer):
    """Muon with selectable Newton-Schulz method, Soft-Muon softening and owner sharding.

    A drop-in for ``torch.optim.Muon``: the same argument names and defaults where they
    overlap, and with equal arguments and ``softening=0`` a step gives the same parameters, bit
    for bit for a matrix alone in its batch: the only one of its shape in its param group,
    counting a tall matrix of at most :attr:`MERGE_ORIENTATIONS_UP_TO` elements as its transpose.
    Same-shape matrices of a group are stacked into one batched Newton-Schulz (faster on small
    matrices; a small tall matrix goes in transposed, with the wide ones), whose ``baddbmm`` can
    round an entry of the bf16 update differently from ``addmm``: at most one bf16 ulp of an
    update entry per step. ``load_state_dict`` takes a ``torch.optim.Muon`` checkpoint. One
    known difference: for a bf16 parameter with ``nesterov=False``, ``torch.optim.Muon`` (2.13)
    normalizes its own momentum buffer in place (``grad.bfloat16()`` of a bf16 buffer is the
    buffer itself, then divided by its norm), so its buffer's norm stays ~1 and its parameters
    leave ours from step 2; ours keeps the momentum the update rule defines.

    Args:
        params: matrices, ``model.named_parameters()`` or param groups; groups with
            ``algorithm="adamw"`` take the AdamW fallback (:func:`optim.split_param_groups`).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as ``torch.optim.Muon``. ``ns_coefficients`` applies to ``ns_method="quintic"``.
        ns_method: any :func:`optim.orthogonalize` method; ``ns_steps`` is its step count.
            Not given, each group runs its method's own count: 5 for the quintic (as
            ``torch.optim.Muon``), 6 for Polar Express, 9 for CANS (their bfloat16 counts,
            :func:`optim.orthogonalize.default_steps`); 5 steps leave CANS far from orthogonal.
            Such a group's ``ns_steps_auto`` names the method its count is for, and the count
            follows a change of the group's ``ns_method`` during training (set
            ``ns_steps_auto`` to None, or ``ns_steps`` to another count, to pin it).
        softening: ``s`` in [0, 1], or a schedule ``step -> s`` (step counts from 1).
        sharding: None or ``sharding.OwnerSharding()``.
        health_every: measure health at step 1 and then every this many steps (0: never).
        health_probes: how ``orthogonality_error`` is measured. ``0``: exactly, one Gram of
            ``O_t`` (a third of one Newton-Schulz iteration: 7-9% of a 5-step quintic).
            ``k >= 1``: estimated from ``k`` Gaussian probes
            (:func:`optim.health.estimate_orthogonality_error`: 1/8 of the Gram's
            multiply-adds at 16 probes and k = 256, 0.25-0.4x its time on CPU, where a thin
            product costs what reading O does). ``None`` (default): 16 probes for Jordan's quintic,
            whose error is spread over every direction so the estimate is within ~1-2%, and
            exact for every other method and coefficient list, whose error can sit on a few
            directions where probes scatter by 10-15%, and for matrices whose smaller side is
            at most 64, where the Gram is the cheaper of the two (8 bf16 matrices of 64x64 on
            CPU: 90 us exact, 119 us from probes; 128x128: 182 and 137 us).

    Health per matrix: ``orthogonality_error`` of ``O_t`` (before softening and scaling),
    ``update_rms`` of ``U_t``, ``softening``, ``nonfinite_skips``.
    """

    #: probes :class:`Muon` uses for Jordan's quintic when ``health_probes=None``, on matrices
    #: whose smaller side exceeds ``AUTO_PROBES_ABOVE`` (below it the exact Gram is cheaper).
    AUTO_PROBES = 16
    AUTO_PROBES_ABOVE = 64

    matrix_algorithm = "muon"
    schedule_keys = frozenset({"softening"})
    _copied = (*MatrixOptimizer._copied, "health_probes")

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = JORDAN_QUINTIC, eps: float = 1e-7,
                 ns_steps: int = NS_STEPS_UNSET, adjust_lr_fn: str | None = None, *,
                 ns_method: str = "quintic", softening: Softening = 0.0, sharding: Any = None,
                 health_every: int = 1, health_probes: int | None = None,
                 _extra_defaults: dict[str, Any] | None = None) -> None:
        check_muon_args(lr, weight_decay, momentum, ns_steps, ns_method, softening, adjust_lr_fn,
                         ns_coefficients, eps)
        check_flags({"nesterov": nesterov}, "nesterov")
        check_health_probes(health_probes)
        self.health_probes = health_probes
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "nesterov": nesterov, "ns_coefficients": tuple(ns_coefficients), "eps": eps,
                    "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn, "ns_method": ns_method,
                    "softening": softening, **(_extra_defaults or {})}
        super().__init__(params, defaults, sharding=sharding, health_every=health_every)

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._softening_now: dict[int, float] = {}  # id(group) -> s at the step being taken
        # (names, orthogonality errors, update norms, sqrt(m n), softening) of this step's
        # batches, until _end_batches
        self._batch_health: list[tuple[list[str], Tensor, Tensor, float, float]] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group without ns_steps runs its own method's count (NS_STEPS_UNSET)
        count = len(self.param_groups)
        super().add_param_group(param_group)
        if len(self.param_groups) > count:
            settle_steps(self.param_groups[-1])

    def _completed(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # a torch.optim.Muon checkpoint's ns_steps counts quintic steps (it has no ns_method):
        # a group that runs another method keeps its own count, as it keeps its method
        completed = super()._completed(state_dict)
        saved = state_dict.get("param_groups")
        if completed is state_dict or not isinstance(saved, list):
            return completed
        groups = list(completed["param_groups"])
        for i, (live, old) in enumerate(zip(self.param_groups, saved, strict=True)):
            if isinstance(old, dict) and "ns_method" not in old \
                    and live.get("ns_method", "quintic") != "quintic":
                groups[i] = {**groups[i], "ns_steps": live["ns_steps"]}
        return {**completed, "param_groups": groups}

    def _check_matrix_hyperparameters(self, group: dict[str, Any]) -> None:
        check_muon_args(group["lr"], group["weight_decay"], group["momentum"], group["ns_steps"],
                         group["ns_method"], group["softening"], group["adjust_lr_fn"],
                         group["ns_coefficients"], group["eps"])
        check_flags(group, "nesterov")
        if not isinstance(group["ns_steps"], int):  # a NumPy integer (a sweep's) as Python's,
            group["ns_steps"] = int(group["ns_steps"])  # which a weights_only checkpoint loads

    def _before_step(self) -> None:
        check_health_probes(self.health_probes)  # an instance attribute a user may have set
        for group in self.param_groups:
            follow_method(group)
        # each matrix group's softening at the coming step, from its schedule once, and checked
        # before anything changes: a schedule returning a bad value raises without half a step
        # (the AdamW group and the step counters already moved when it was read mid-step)
        self._softening_now = {id(group): softening_at(group["softening"], group["step"] + 1)
                               for group in self.param_groups if group["algorithm"] != ADAMW}

    def _init_state(self, item: MatrixItem, *, owner: bool) -> None:
        state = self.state[item.param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(item.param,
                                                        memory_format=torch.preserve_format)

    def _state_shapes(self, shape: tuple[int, ...], algorithm: str
                      ) -> dict[str, tuple[tuple[int, ...], ...]]:
        shapes = super()._state_shapes(shape, algorithm)
        if algorithm != ADAMW:
            shapes["momentum_buffer"] = (shape,)
        return shapes

    def _required_state(self, algorithm: str) -> set[str]:
        return super()._required_state(algorithm) | (set() if algorithm == ADAMW
                                                      else {"momentum_buffer"})

    def _prepare(self, item: MatrixItem) -> Tensor:
        # Out of place: a skipped matrix must keep its momentum. _apply commits it by moving the
        # new storage into the buffer (no copy).
        return self._momentum_step(item, *self._grad_and_momentum(item), in_place=False)

    def _grad_and_momentum(self, item: MatrixItem) -> tuple[Tensor, Tensor]:
        """This rank's gradient and momentum buffer of ``item`` (the buffer made if new)."""
        grad = item.param.grad
        assert grad is not None  # MatrixOptimizer.step only passes params with a gradient
        self._init_state(item, owner=False)
        return local(grad), local(self.state[item.param]["momentum_buffer"])

    def _momentum_step(self, item: MatrixItem, grad: Tensor, buf: Tensor, *,
                       in_place: bool) -> Tensor:
        """The momentum update (in ``buf`` itself, or pending in ``item.pending``) and the
        update input it gives: ``grad.lerp(M_t, momentum)`` with Nesterov, else ``M_t``."""
        group = item.group
        if in_place:
            new_buf = buf.lerp_(grad, 1 - group["momentum"])
            item.pending = None  # nothing left to commit
        else:
            new_buf = item.pending = buf.lerp(grad, 1 - group["momentum"])
        return grad.lerp(new_buf, group["momentum"]) if group["nesterov"] else new_buf

    def _prepare_local(self, batch: list[MatrixItem]) -> tuple[list[Tensor], list[bool]]:
        """One process: the momentum moves in place, as torch.optim.Muon moves it, wherever
        the step cannot be skipped; out of place (:meth:`_prepare`) otherwise.

        A new buffer per matrix and step took ~9% of the d_model 256 stack's step at one and
        at two threads (fresh pages every step; docs/kernels.md). A gradient and a momentum whose
        Frobenius norms are at most :data:`IN_PLACE_NORM` hold no NaN or Inf, the two lerps
        (convex combinations) keep the update input's norm under that bound, and the bfloat16
        Newton-Schulz, which divides its input by its norm first, stays finite: the matrix will
        step. Anything else (a NaN, an Inf, a float64 gradient whose update would overflow)
        takes the out-of-place path, which keeps the momentum until the step is known to be
        finite (tests/test_muon.py runs every magnitude through both paths).
        ``"svd"`` always does: a LinAlgError skips its batch after this phase. An exception
        while the batch computes (out of memory) leaves its momentum one step ahead, as
        torch.optim.Muon's, where the out-of-place path left it as it was. One norm per
        tensor and one host sync per batch, and the inputs they prove finite are not checked
        again (:meth:`_owner_compute`); the bits are those of :meth:`_prepare`."""
        group = batch[0].group
        if group["ns_method"] == "svd":
            return super()._prepare_local(batch)
        pairs = [self._grad_and_momentum(item) for item in batch]
        norms = torch.stack(torch._foreach_norm([t for pair in pairs for t in pair])).tolist()
        finite = [norms[2 * i] <= IN_PLACE_NORM and norms[2 * i + 1] <= IN_PLACE_NORM
                  for i in range(len(batch))]
        inputs = [self._momentum_step(item, grad, buf, in_place=ok)
                  for item, (grad, buf), ok in zip(batch, pairs, finite, strict=True)]
        return inputs, finite

    def _stack(self, items: list[MatrixItem], xs: list[Tensor]) -> Tensor:
        # Without softening the kernel reads X in its compute dtype: convert while stacking
        # (one pass, as torch.optim.Muon's own ``grad.bfloat16()``) instead of stacking in fp32
        # and converting again. Bit-identical: the same round-to-nearest-even cast. (CANS runs
        # its first step in float32, on this bf16-rounded X: the input Muon hands every method,
        # as torch.optim.Muon does its quintic; orthogonalize() on float32 X differs by that
        # rounding, ~1e-3 in the orthogonality error.)
        group = items[0].group
        compute = None if group["ns_method"] == "svd" else torch.bfloat16
        if compute is None or xs[0].dtype == compute or self._softening_now[id(group)] != 0.0:
            return super()._stack(items, xs)
        if len(xs) == 1:
            return xs[0].to(compute).unsqueeze(0)
        out = torch.empty((len(xs), *xs[0].shape), dtype=compute, device=xs[0].device)
        for i, x in enumerate(xs):
            out[i].copy_(x)
        return out

    def _batch_shape(self, item: MatrixItem) -> tuple[int, int]:
        # Newton-Schulz runs on the wide orientation: a small tall matrix goes in transposed and
        # batches with the wide ones of its transposed shape (a transformer's MLP up and down
        # projections), as torch.optim.Muon transposes it too. Not for SVD, whose result keeps
        # the input's orientation (update_like).
        m, n = item.shape
        if (m > n and m * n <= self.MERGE_ORIENTATIONS_UP_TO and self._merges_orientations
                and item.group["ns_method"] != "svd"):
            return n, m
        return item.shape

    #: Elements up to which a tall matrix is stacked transposed, with the wide matrices of its
    #: transposed shape: one batch instead of two saves each product's per-call cost (the
    #: quintic's Newton-Schulz of 2 + 2 MLP matrices of 64 x 256: 0.70x the time at one thread,
    #: 128 x 512: 0.90x), but the transposed copy into the stack costs more than that saves on
    #: larger ones (256 x 1024: 1.08x; docs/kernels.md).
    MERGE_ORIENTATIONS_UP_TO = 1 << 16

    #: whether :meth:`_batch_shape` merges orientations (NorMuon does not: its normalization is
    #: per row of each matrix as it stands)
    _merges_orientations = True

    def update_like(self, item: MatrixItem, input_dtype: torch.dtype
                    ) -> tuple[torch.dtype | None, bool]:
        # Newton-Schulz without softening runs on the bf16 stack (_stack) and returns bf16;
        # softened or by SVD, the result has the input's dtype. The iteration works on the wide
        # orientation, so a tall matrix's update comes back as a transposed view (SVD: not).
        group = item.group
        svd = group["ns_method"] == "svd"
        dtype = torch.bfloat16 if not svd and self._softening_now[id(group)] == 0.0 \
            else input_dtype
        return dtype, not svd and item.shape[0] > item.shape[1]

    def _orthogonalize(self, group: dict[str, Any], X: Tensor) -> Tensor:
        return orthogonalize(X, method=group["ns_method"], steps=group["ns_steps"],
                             eps=group["eps"], coefficients=group["ns_coefficients"])

    def _compute(self, items: list[MatrixItem], X: Tensor) -> Tensor:
        group = items[0].group
        O = self._orthogonalize(group, X)
        s = self._softening_now[id(group)]
        U = soften(O, X, s, eps=group["eps"])
        U, norms = self._post_orthogonalize(items, U)
        if self._health_due(group):
            # A bf16 norm accumulates in float32 and rounds once, to within 2^-8 of the float32
            # norm; asking for a float32 result would first copy U to float32 (2.5x the time).
            # The division by sqrt(m n) is left to _end_batches' finish, on the Python float.
            if norms is None:
                norms = torch.linalg.vector_norm(U, dim=(-2, -1))
            self._batch_health.append(
                ([item.name for item in items], self._orthogonality_error(group, O),
                 norms.reshape(-1), math.sqrt(U.size(-2) * U.size(-1)), s))
        return U

    def _end_batches(self) -> None:
        """The step's health as one tensor (each batch's errors, then its update norms), which
        :meth:`health` converts with a single ``.tolist()``."""
        if not self._batch_health:
            return
        batches, self._batch_health = self._batch_health, []
        values = torch.cat([piece for _, ortho, norms, _, _ in batches for piece in (ortho, norms)])
        layout = [(len(names), root, s) for names, _, _, root, s in batches]

        def finish(v: list[float]) -> list[list[float]]:
            rows, at = [], 0
            for n, root, s in layout:
                rows += [[v[at + i], v[at + n + i] / root if root else 0.0, s]
                         for i in range(n)]
                at += 2 * n
            return rows

        names = [name for batch_names, *_ in batches for name in batch_names]
        self._record_deferred(names, DeferredMetrics([_MUON_METRICS] * len(names), values,
                                                     finish))

    def _orthogonality_error(self, group: dict[str, Any], O: Tensor) -> Tensor:
        probes = self.health_probes
        if probes is None:
            jordan = group["ns_method"] == "quintic" and \
                tuple(group["ns_coefficients"]) == JORDAN_QUINTIC
            big = min(O.shape[-2:]) > self.AUTO_PROBES_ABOVE
            probes = self.AUTO_PROBES if jordan and big else 0
        if probes == 0:
            return update_orthogonality_error(O)
        # Seeded by the step: new probes every step, identical on every rank and after a resume.
        return estimate_orthogonality_error(O, probes, seed=group["step"])

    def _post_orthogonalize(self, items: list[MatrixItem], U: Tensor
                            ) -> tuple[Tensor, Tensor | None]:
        """The final update from the softened one, and its Frobenius norms (``(batch,)`` or
        any shape with that many elements) when the transform already has them, else None."""
        return U, None

    def _apply(self, item: MatrixItem, update: Tensor) -> None:
        group, p = item.group, item.param
        lr = as_scalar(group["lr"])  # torch.optim.Muon takes a (1,) tensor too
        p_local = local(p)
        p_local.mul_(1 - lr * group["weight_decay"])
        # A bf16 update is added as torch.optim.Muon adds it (promoted inside add_, no copy).
        p_local.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], item.shape))
        if item.pending is not None:  # None: the momentum already moved in place
            _commit(local(self.state[p]["momentum_buffer"]), item.pending)
            item.pending = None


def _commit(buf: Tensor, new: Tensor) -> None:
    """Make ``buf`` hold ``new``'s values. When both are plain tensors of one layout and ``buf``
    is not a view, ``buf`` takes over ``new``'s storage (no copy; ``new`` must not be used
    afterwards); otherwise the values are copied."""
    if (buf._base is None and type(buf) is torch.Tensor and type(new) is torch.Tensor
            and buf.dtype == new.dtype and buf.device == new.device
            and buf.shape == new.shape and buf.stride() == new.stride()
            and not buf.requires_grad):
        buf.set_(new.untyped_storage(), new.storage_offset(), new.shape, new.stride())
    else:
        buf.copy_(new)


def __getattr__(name: str) -> Any:
    """``NorMuon`` and ``normuon_normalize``, which this module held before
    :mod:`optim.normuon`: still importable from here, so that code importing them and
    optimizers pickled then keep working (loaded on first use: that module imports this one)."""
    if name in ("NorMuon", "normuon_normalize"):
        from optim import normuon

        return getattr(normuon, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

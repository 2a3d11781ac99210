"""The shared frame of every orthoshard optimizer: routing, the three-phase step, health.

A step runs in three phases, one code path for one process and for N ranks:

1. **prepare** (elementwise, on whatever part of each matrix this rank holds: the whole matrix,
   or an FSDP2 ``Shard(0)`` row block): e.g. Muon's momentum. Produces the matrix's *update
   input* and a pending state change that is committed only in phase 3.
2. **owner compute** (on the FULL matrix, on one owner rank): orthogonalize, NorMuon's
   normalization, or the whole SOAP step. Non-finite inputs are caught here: the matrix is
   skipped, counted and reported, and its state is left untouched; a subclass refuses the same
   way a finite input whose step would make its state non-finite (SOAP squares its gradients).
   Health is measured here, on matrices already in hand, at no communication cost.
3. **apply** (elementwise again): commit the pending state, decoupled weight decay, the update.

Between phases 1 and 2 and between 2 and 3 sits an *exchange*. Without ``sharding=`` it is the
identity (:class:`LocalExchange`); ``sharding.OwnerSharding`` implements the same protocol with
one all-to-all each way. A skipped matrix travels back as NaN, the one value a real update can
never hold (phase 2 rejects non-finite results), so every rank holding a piece of it skips too,
with no extra message.

Parameter groups carry ``algorithm``: the optimizer's own matrix update, or ``"adamw"``, the
fallback for 1-D parameters, embeddings and output heads (see
:func:`optim.params.split_param_groups`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from optim._adamw import ADAMW_DEFAULTS, AdamWFallback
from optim._caller import eager_under_compile
from optim._checks import (
    ADAMW,
    MISPLACED,
    _check_gradient_layout,
    _misplaced,
    _name_unnamed_groups,
    _refuse_misplaced,
    check_health_every,
)
from optim._exchange import (
    DeferredMetrics,
    LocalExchange,
    MatrixItem,
    _nonfinite,
    all_finite,
    group_settings,
    local,
    nonfinite_flags,
)
from optim._guards import StepGuards
from optim._owner_compute import OwnerCompute

__all__ = ["MatrixOptimizer"]




class MatrixOptimizer(StepGuards, AdamWFallback, OwnerCompute):
    """Base class; subclasses implement :meth:`_prepare`, :meth:`_compute` and :meth:`_apply`.

    The checks of groups and steps live in :class:`optim._guards.StepGuards`, the AdamW groups'
    update in :class:`optim._adamw.AdamWFallback`, what :meth:`health` reports in
    :class:`optim._health_book.HealthBook`, phase 2's batching in
    :class:`optim._owner_compute.OwnerCompute`.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``: health is then
            keyed by name) or param-group dicts. A group with ``algorithm="adamw"`` is updated by
            AdamW (``lr``, ``weight_decay``, ``adamw_betas``, ``adamw_eps``); every other group
            must hold 2-D matrices only.
        defaults: the subclass's hyperparameters.
        sharding: None (one process) or an exchange such as ``sharding.OwnerSharding()``.
        health_every: measure health at step 1 and then every this many steps (0 turns it off).
    """

    matrix_algorithm = "matrix"
    # State keys that live only with the full matrix on its owner rank (the rest of the state
    # is elementwise and sharded like the parameter). The exchange turns them into sharded
    # DTensors for checkpoints, so every rank presents the same keys to DCP.
    owner_state_keys: frozenset[str] = frozenset()
    #: Same-shape matrices of a group are computed as one batch of at most this many float32
    #: bytes (at least one matrix), so a step's temporaries scale with the batch, not with the
    #: model: small matrices still batch (the speed of one call for many), large ones go one or
    #: a few at a time (the memory of torch.optim.Muon). Set it on an instance to trade memory
    #: for speed; the results do not depend on it.
    MAX_BATCH_BYTES = 256 * 2**20

    def __init__(self, params: Any, defaults: dict[str, Any], *, sharding: Any = None,
                 health_every: int = 1) -> None:
        check_health_every(health_every)
        defaults = {**ADAMW_DEFAULTS, "algorithm": self.matrix_algorithm, "step": 0, **defaults}
        super().__init__(_name_unnamed_groups(params), defaults)
        self._check_groups()
        for gi, group in enumerate(self.param_groups):
            self._check_hyperparameters(gi, group)
        if sharding is not None and (isinstance(sharding, type) or not all(
                callable(getattr(sharding, method, None)) for method in ("bind", "owned", "run"))):
            # a class passes the attribute test, then its unbound bind() lacked an argument
            raise TypeError(f"sharding must be None (one process) or an exchange such as "
                            f"sharding.OwnerSharding(), got {sharding!r}"
                            + (" (the class: call it)" if isinstance(sharding, type) else ""))
        self.health_every = health_every
        self._health: dict[str, dict[str, Tensor | float]] = {}
        self._exchange = sharding if sharding is not None else LocalExchange()
        self._init_runtime()
        self._exchange.bind(self)

    def _init_runtime(self) -> None:
        """Set the attributes that live only between (or within) steps: caches and the step's
        working lists. Called by the constructor and by :meth:`__setstate__` (a copy starts them
        afresh); a subclass adding its own calls this first."""
        # the latest deferred metrics of each matrix: (batch, its index there), read by health()
        self._deferred: dict[str, tuple[DeferredMetrics, int]] = {}
        self._step_items: list[MatrixItem] = []
        self._skipped: set[int] = set()  # ids of this step's items counted by _skip
        self._applied = 0  # matrices this step applied so far (one process)
        self._gradient_seen = False  # a step found a gradient (or warned that it found none)
        # id(group) -> the algorithm its parameters were last checked for (_check_step)
        self._kinds: dict[int, Any] = {}

    # ---- the step -----------------------------------------------------------------------
    # Under torch.compile the step runs eagerly (a graph break): it decides per matrix on the
    # host (finiteness, batching, the exchange), which no graph captures; the model compiles.
    @eager_under_compile
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step()
        local_only = isinstance(self._exchange, LocalExchange)
        found = self._gradient_seen or any(p.grad is not None for group in self.param_groups
                                           for p in group["params"])
        if not self._gradient_seen and local_only:
            # before the counters move: a warning raised as an error (python -W error) leaves
            # the step uncounted, as it changed nothing
            self._warn_without_gradient(found)
        self._count_step(1)
        # The AdamW groups' gradients: each rank flags its own shards' NaN/Inf now, and the
        # flags are summed over the ranks on the matrices' gather (no collective of their own),
        # so every rank skips a parameter whose shard on any rank is bad. They step after the
        # matrices: a step that raises on the way changes no parameter.
        every = [(group, list(zip(group["param_names"], group["params"], strict=True)))
                 for group in self.param_groups if group["algorithm"] == ADAMW]
        fallback = [(group, [(name, p) for name, p in named if p.grad is not None])
                    for group, named in every]
        matrices = self.matrix_items()
        items = [item for item in matrices if item.param.grad is not None]
        # Across ranks (an exchange that is not local), a rank with no matrix gradient still
        # joins the matrices' gather, whose signatures then refuse the step on every rank
        # unless none has one: decided by the parameters, the same on every rank. Leaving it
        # out made the others wait in the gather until the process group timed out.
        joins = bool(matrices) and not isinstance(self._exchange, LocalExchange)
        # Decided by the parameters, the same on every rank, and one flag per AdamW parameter
        # (0 for one without a gradient): ranks whose gradients differ (one None on some ranks
        # only) still send flags of one length, and the signature of what they flag (the
        # parameters with a gradient) tells them apart instead of a size the backend aborts on.
        params = [p for _, named in every for _, p in named]
        names = [name for _, named in every for name, _ in named]
        has_grad = [p.grad is not None for p in params]
        sharded = bool(items or any(named for _, named in fallback) or joins) and \
            any(hasattr(p, "to_local") for p in params)
        # FSDP2 matrices without sharding=: each rank stepped its row shard as a matrix (a model
        # without biases, or with no AdamW group, got no refusal)
        dtensors = sharded or any(hasattr(item.param, "to_local") for item in items)
        if dtensors and isinstance(self._exchange, LocalExchange):
            self._count_step(-1)  # nothing changed: the step did not happen
            raise ValueError(
                f"{type(self).__name__}: parameters are DTensors (FSDP2) but the optimizer has "
                f"no sharding: pass sharding=OwnerSharding() (sharding.OwnerSharding), so that "
                f"each matrix is gathered whole and every rank skips a parameter whose shard on "
                f"any rank is not finite")
        bad = self._step_matrices(items, fallback, params, names, sharded=sharded, joins=joins)
        if sharded:  # one per AdamW parameter: those with a gradient step
            bad = [b for b, has in zip(bad, has_grad, strict=True) if has]
        flag = iter(bad)
        for group, named in fallback:
            self._adamw_step(group, named, [next(flag) == 0.0 for _ in named])
        if not self._gradient_seen and not local_only:
            # Across ranks, after the step's collectives: raised as an error before them, it
            # left the ranks that had gradients waiting in the gather until the process group
            # timed out. A step that got here with no gradient on this rank found none on any
            # rank (the signatures agreed): it changed nothing, and is uncounted if this raises.
            try:
                self._warn_without_gradient(found)
            except BaseException:
                self._count_step(-1)
                raise
        return loss

    def _count_step(self, change: int) -> None:
        """Move every group's step count by ``change``: +1 as a step starts, -1 when it raises
        before any parameter moved (the step did not happen, and a schedule such as softening,
        or ``health_every``, must not count it)."""
        for group in self.param_groups:
            group["step"] += change

    def _step_matrices(self, items: list[MatrixItem],
                       fallback: list[tuple[dict[str, Any], list[tuple[str, Tensor]]]],
                       params: list[Tensor], names: list[str], *, sharded: bool,
                       joins: bool) -> list[float]:
        """Step the matrices with a gradient (``items``) and return the AdamW parameters'
        non-finite flags: one per parameter of ``params`` (all of the AdamW groups', in order)
        when ``sharded``, summed over the ranks; else one per parameter of ``fallback`` (those
        with a gradient), decided by this process."""
        grads = [p.grad for _, named in fallback for _, p in named if p.grad is not None]
        flags = (nonfinite_flags([p.grad for p in params], device=local(params[0]).device)
                 if sharded else None)  # to sum over the ranks
        if flags is not None and (misplaced := _misplaced(params)):
            flags[misplaced] += MISPLACED  # every rank refuses the step (_refuse_misplaced)
        bad = None if sharded else _nonfinite(grads)  # this process decides alone
        if items and isinstance(self._exchange, LocalExchange):
            self._applied = 0
            try:
                self._step_local(items)
            except BaseException:
                if not self._applied:  # no parameter moved: as on the sharded path below
                    self._count_step(-1)
                raise
            assert bad is not None
            return bad
        # what the flags belong to, with their groups' settings: part of the step's signature
        # (replicated AdamW parameters carry no flags, but ranks stepping them with other
        # settings drift apart: their settings are in the signature too)
        flagged = [f"{name} {settings}" for group, named in fallback
                   for settings in (group_settings(group),) for name, _ in named] \
            if not isinstance(self._exchange, LocalExchange) else []
        try:
            if items or joins:
                carried = self._step_sharded(items, flags, flagged, names)
                if flags is not None and carried is not None:
                    bad = carried.tolist()
            if bad is None:  # sharded AdamW parameters, and no matrix to carry the flags
                assert flags is not None
                summed = self._exchange.all_reduce_sum(flags, flagged)
                _refuse_misplaced(summed, names)
                bad = summed.tolist()
        except BaseException:
            # raised on every rank of the group before any parameter changed
            self._count_step(-1)
            raise
        return bad

    def _step_sharded(self, items: list[MatrixItem], flags: Tensor | None,
                      flagged: Sequence[str] = (), names: Sequence[str] = ()) -> Tensor | None:
        """The three phases of ``items`` through the exchange (every rank of its group at
        once); returns ``flags`` (the AdamW parameters' finiteness, one per parameter of
        ``names``) summed over the ranks when the exchange carried them, which refuses the
        step on every rank, before any owner computes, for a gradient a rank flagged as not
        laid out as its parameter."""
        failure: Exception | None = None
        try:
            for item in items:
                _check_gradient_layout(item)
            inputs = [self._prepare(item) for item in items]
        except Exception as exc:  # raised on every rank by the exchange, none left waiting
            failure, inputs = exc, []
            for item in items:
                item.pending = None
        self._step_items, self._skipped = items, set()
        try:
            updates, carried = self._exchange.run(
                items, inputs, self._owner_compute, carry=flags, failure=failure,
                carry_names=flagged, carry_check=lambda summed: _refuse_misplaced(summed, names))
        finally:
            self._step_items = []
        finite = all_finite(updates)  # each rank's rows, as they came back
        if not all(finite):
            self._count_failed(items, finite)
        for item, update, ok in zip(items, updates, finite, strict=True):
            if ok:
                self._apply(item, update)
            item.pending = None
        return carried

    def _step_local(self, items: list[MatrixItem]) -> None:
        """One process: prepare, compute and apply one batch of matrices at a time (the
        batches :meth:`_owner_compute` forms), so a step holds one batch's inputs and updates
        rather than every matrix's (a step's peak allocation: bench/muon.py). The results are
        those of the three phases over all matrices: each matrix reads only its own gradient,
        state and parameter. Health is still finished once per step (:meth:`_end_batches`).
        An exception from a later batch (other than the LinAlgError a batch skips) leaves the
        earlier batches stepped; :meth:`step` takes its step count back when none had."""
        batches: dict[tuple, list[MatrixItem]] = defaultdict(list)
        for item in items:
            batches[(id(item.group), self._batch_shape(item), item.param.dtype)].append(item)
        self._skipped = set()
        try:
            for batch in (chunk for same in batches.values()
                          for chunk in self._batch_chunks(same, same[0].shape)):
                self._step_items = batch
                inputs, finite = self._prepare_local(batch)
                # the owner's check saw every whole update and counted each non-finite one
                updates = self._owner_compute(list(range(len(batch))), inputs, end=False,
                                              known_finite=finite)
                for item, update in zip(batch, updates, strict=True):
                    if id(item) not in self._skipped:
                        self._apply(item, update)
                        self._applied += 1
                    item.pending = None
                del inputs, updates  # before the next batch's are made
        finally:
            self._step_items = []
            self._end_batches()

    def _count_failed(self, items: list[MatrixItem], finite: list[bool]) -> None:
        """Count, on its owner, a matrix whose update became non-finite after the owner checked
        it (on the way back: an ``exchange_dtype`` too narrow for its values) that no one
        counted yet: skipped like a non-finite gradient."""
        for i in self._exchange.owned(items):
            item = items[i]
            if not finite[i] and id(item) not in self._skipped:
                self._skip(item)
                self._report_skips(item)

    def matrix_items(self) -> list[MatrixItem]:
        """Every matrix parameter of the matrix groups, in param-group order."""
        return [MatrixItem(p, name, group, (int(p.shape[0]), int(p.shape[1])))
                for group in self.param_groups if group["algorithm"] != ADAMW
                for name, p in zip(group["param_names"], group["params"], strict=True)]

    def init_state(self) -> None:
        """Create all state now, as the first step would, without touching the parameters.

        A freshly built optimizer has no state, so its ``state_dict()`` cannot serve as the
        template a ``torch.distributed.checkpoint.load`` fills in: call this first.
        """
        items = self.matrix_items()
        owned = set(self._exchange.owned(items))
        for i, item in enumerate(items):
            self._init_state(item, owner=i in owned)
        for group in self.param_groups:
            if group["algorithm"] == ADAMW:
                for p in group["params"]:
                    self._adamw_state(p)

    # ---- subclass hooks -----------------------------------------------------------------
    def _init_state(self, item: MatrixItem, *, owner: bool) -> None:
        """Create ``item``'s state: the sharded part always, the owner part when ``owner``."""
        raise NotImplementedError

    def _prepare(self, item: MatrixItem) -> Tensor:
        """Phase 1 on this rank's piece; may stash a pending state change in ``item.pending``."""
        raise NotImplementedError

    def _prepare_local(self, batch: list[MatrixItem]) -> tuple[list[Tensor], list[bool]]:
        """Phase 1 of one batch of :meth:`_step_local` (one process, which decides alone
        whether a matrix steps): the update inputs, and for each whether it is already known
        to be finite (else phase 2 checks it). Here :meth:`_prepare` of each matrix, none known;
        a subclass may change its state in place where it can tell that the step cannot be
        skipped."""
        return [self._prepare(item) for item in batch], [False] * len(batch)

    def _stack(self, items: list[MatrixItem], xs: list[Tensor]) -> Tensor:
        """The ``(B, m, n)`` batch :meth:`_compute` receives (one matrix: a view, no copy).
        Subclasses may stack straight into their compute dtype, saving a pass over the data."""
        return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)

    def _compute(self, items: list[MatrixItem], X: Tensor) -> Tensor:
        """Phase 2 on a ``(B, m, n)`` stack of full, finite update inputs; returns the stack of
        update directions (before lr and weight decay). Health is recorded with :meth:`_record` or
        :meth:`_record_deferred`, here or, gathered over the step's batches, in
        :meth:`_end_batches`."""
        raise NotImplementedError

    def _end_batches(self) -> None:
        """Called once all of a step's batches went through :meth:`_compute` (also when one
        raised): where a subclass finishes work it gathered across batches, such as health."""

    def _apply(self, item: MatrixItem, update: Tensor) -> None:
        """Phase 3 on this rank's piece of a finite update."""
        raise NotImplementedError

    def _skip(self, item: MatrixItem) -> None:
        """Count a step ``item`` does not take: a non-finite input, or (from :meth:`_compute`)
        a step whose new state would not be finite. The skipped matrix's result must be
        non-finite (NaN), so that no rank applies it; its state is left as it was."""
        item.group["nonfinite_skips"][item.name] += 1
        self._skipped.add(id(item))

    def update_like(self, item: MatrixItem, input_dtype: torch.dtype
                    ) -> tuple[torch.dtype | None, bool]:
        """How the update :meth:`_compute` returns for ``item`` (from an update input of
        ``input_dtype``) looks, computable on every rank: its dtype (None: whatever arrives) and
        whether it is stored transposed (column-major). An exchange that carries updates in a
        wider, row-major buffer gives them back that look, so that :meth:`_apply` adds exactly
        what one process adds: torch rounds ``p.add_(u)`` differently for a float32 ``u`` than
        for a bf16 one, and its vectorized loop (contiguous ``u``) differently from its strided
        one."""
        return None, False

    def matrix_cost(self, item: MatrixItem) -> float:
        """Relative cost of one matrix's owner update, for balancing owners across ranks.

        Newton-Schulz costs ``m n min(m, n)`` multiply-adds per product; the step count is the
        same for every matrix of a group, so it cancels. Subclasses with other kernels override.
        """
        m, n = item.shape
        return float(m * n * min(m, n))

    # ---- communication ------------------------------------------------------------------
    def comm_stats(self) -> dict[str, int]:
        """Bytes this rank sent and received for optimizer communication, and collectives."""
        return dict(self._exchange.comm_stats())

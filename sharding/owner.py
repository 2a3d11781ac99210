"""OwnerSharding: full-matrix optimizer updates on owner ranks, one all-to-all each way."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from optim._exchange import MatrixItem, local
from sharding import _owner_state
from sharding._layout import is_sharded, local_rows_problem
from sharding._wire import (
    STATUS_ELEMENTS,
    agree,
    all_to_all,
    assemble,
    name_signature,
    placeholder,
    send_lists,
    signature,
)
from sharding.plan import Plan, build_plan

__all__ = ["STATUS_ELEMENTS", "OwnerSharding"]

Compute = Callable[[list[int], list[Tensor]], list[Tensor]]


# the buffers' dtypes: float32's range at least, so that every finite value crosses finite
_EXCHANGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class OwnerSharding:
    """Pass as ``sharding=`` to ``Muon``, ``NorMuon`` or ``SOAP``.

    Communication plan of one optimizer step (``W`` ranks, matrices ``i`` with owner ``o(i)``):

    1. *Gather.* Every rank packs, for each destination rank ``d``, its rows of the update input
       of every row-sharded (FSDP2 ``Shard(0)``) matrix that ``d`` owns, in matrix order, into one
       flat buffer (float32, or float64 when a matrix is), and ONE ``all_to_all_single`` with
       uneven split sizes delivers them.
       The owner concatenates the pieces by source rank: rows arrive in rank order, which is row
       order under ``torch.chunk`` semantics. Replicated matrices (every rank holds them whole, as
       under DDP) need no gather: the owner already has the full input, and with only replicated
       matrices this phase is a small ``all_gather`` of what the blocks' heads carry. Each block
       starts with the sender's status element (a rank that could not prepare its rows sends
       placeholders, flagged, and every rank raises before any owner computes) and step
       signature, then its finiteness flags of the sharded AdamW parameters (``carry``), summed
       on arrival, so that the AdamW group needs no collective of its own. A rank with no
       matrix gradient joins too, with an empty block: every rank then raises unless none has
       one.
    2. *Compute.* The optimizer's owner phase runs on the FULL matrices this rank owns
       (orthogonalize with softening, NorMuon, or the whole SOAP step; health measured there).
    3. *Scatter.* ONE ``all_to_all_single`` sends each rank its rows of every sharded update and,
       for replicated matrices, the whole update from its owner to every rank (an all-gather with
       exact sizes, so no rank repeats another's work). Each block starts with the sender's
       status element: an owner whose compute raised still takes part, flagged, and then every rank
       raises (the owner its own error) and none applies the step's matrix updates, instead of
       the other ranks waiting in the exchange until the process group times out.

    No padding: ``all_to_all_single`` takes exact per-rank split sizes, so uneven shards and empty
    ``(0, n)`` shards cost nothing extra. Per rank and step this moves ``2 (W-1)/W^2 P`` elements on
    average for ``P`` sharded matrix elements (the exact per-rank figure is
    :meth:`sharding.plan.Plan.elements_sent`), against ``(W-1)/W P`` when every rank calls
    ``full_tensor()`` and repeats all the work.

    Ownership is a cost-balanced longest-processing-time plan (:mod:`sharding.plan`) computed
    identically on every rank from the shapes and cached while the set of matrices is unchanged.
    Every rank must step the same parameters in the same order (true under FSDP2, where every rank
    has a gradient for every parameter, possibly an empty shard of it).

    One code path for 1 and N ranks, for gloo (CPU) and NCCL (GPU): the buffers live on the
    parameters' device.

    Args:
        group: the process group (None: the default group). Under FSDP2 it must be the group of
            the parameters' 1-D device mesh.
        exchange_dtype: dtype of the communication buffers. None (default): the widest of
            float32 and the step's matrices' dtypes, which every input and update fits exactly
            (bfloat16 and float32 ride in float32, float64 in float64), so results match one
            process. ``torch.bfloat16`` halves the traffic and rounds what crosses (float16,
            whose range ends at 65504, is refused). Either way the owner computes on each
            matrix's own dtype and every rank receives its update as one process would apply
            it (dtype and layout: ``update_like`` of the optimizer).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 exchange_dtype: torch.dtype | None = None) -> None:
        if exchange_dtype is not None and exchange_dtype not in _EXCHANGE_DTYPES:
            raise ValueError(
                f"exchange_dtype must be None (automatic), torch.float32, torch.float64 or "
                f"torch.bfloat16, got {exchange_dtype!r}: an integer or complex buffer would "
                f"change the values it carries, and float16 or float8 ones overflow (a finite "
                f"gradient over 65504 would arrive as Inf, its matrix skipped as non-finite) and "
                f"flush small values to zero; torch.bfloat16 halves the traffic with float32's "
                f"range")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "OwnerSharding needs an initialized process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment).")
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:  # torch's answer for a process outside the group
            # (new_group hands such a process a shared placeholder, not the group: its ranks
            # cannot be named here)
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not in the OwnerSharding "
                f"group: create OwnerSharding, and the optimizer, only on the group's ranks, "
                f"or pass a group that holds this rank")
        self.world_size = dist.get_world_size(group)
        self.exchange_dtype = exchange_dtype
        self._optimizer: Any = None
        self._plan: Plan | None = None
        self._plan_key: tuple | None = None
        self._layout_error: ValueError | None = None  # this rank's rows are not the plan's
        self._signature: list[float] = []  # this step's (run), sent with every block
        self._index: dict[int, int] = {}
        self._meshes_checked: dict[tuple[int, int], Any] = {}
        self._sharded: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> is_sharded
        self._owner_of: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> its owner rank
        self._stats = {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}

    def bind(self, optimizer: Any) -> None:
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise ValueError("an OwnerSharding serves one optimizer; create one per optimizer")
        self._optimizer = optimizer

    def comm_stats(self) -> dict[str, int]:
        """Bytes of the matrix exchange that crossed to or from other ranks (exact payload,
        with each all-to-all's status element per pair of ranks, ``STATUS_ELEMENTS``, and the
        gather's finiteness flag per AdamW parameter, when any is sharded),
        and the number of collectives: 2 per step (with only replicated matrices the first is
        a small ``all_gather`` of statuses and signatures), 1 in a step where no rank has a
        matrix gradient (the gather, which finds that every rank agrees), or 1 ``all_reduce``
        of those flags for an optimizer without matrices."""
        return dict(self._stats)

    def all_reduce_sum(self, t: Tensor, names: Sequence[str] = ()) -> Tensor:
        """One ``all_reduce`` (sum) of a small tensor: the AdamW-group finiteness flags of an
        optimizer without matrices, whose steps make no gather to carry them. With ``names`` (what
        the entries belong to; none is a signature too) a signature of them rides along, with its
        squares and a count: the sums equal ``count * signature`` and ``count * signature^2`` on
        every rank exactly when every rank passed the same names (their spread is then zero), so
        ranks that flag other parameters all raise ValueError, before anything is applied."""
        # always, also for no names: a rank that flags nothing (no AdamW gradient) sent a
        # shorter tensor than one that flags some, and gloo aborted the process
        mine = torch.tensor(name_signature("\n".join(names)), dtype=t.dtype, device=t.device)
        out = torch.cat([t, mine, mine.square(), torch.ones(1, dtype=t.dtype, device=t.device)])
        dist.all_reduce(out, group=self.group)
        if self.world_size > 1:
            self._stats["bytes_sent"] += out.nbytes
            self._stats["bytes_received"] += out.nbytes
        self._stats["collectives"] += 1
        n = mine.numel()
        sums, squares, count = out[-2 * n - 1:-n - 1], out[-n - 1:-1], out[-1]
        if not (torch.equal(sums, count * mine) and torch.equal(squares, count * mine**2)):
            raise ValueError(
                f"the ranks of the sharding group do not step the same AdamW parameters as "
                f"rank {self.rank} this step (a gradient None on some ranks only?): every "
                f"rank must step the same parameters. Nothing was applied.")
        return out[:t.numel()]

    def reports_fallback(self) -> bool:
        """Rank 0 of the group reports the AdamW group's skip counts (every rank has them)."""
        return self.rank == 0

    # ---- planning -----------------------------------------------------------------------
    def global_plan(self, *, check: bool = True) -> tuple[Plan, dict[int, int]]:
        """The plan over ALL of the optimizer's matrices (ownership does not depend on which
        have a gradient this step) and the map ``id(param) -> plan index``. Raises ValueError
        when this rank's rows are not the plan's (``check=False``: the step, which hands that
        error to every rank through the exchange instead, so no rank is left waiting)."""
        items = self._optimizer.matrix_items()
        sharded = tuple(self._sharded_of(item.param) for item in items)
        key = tuple((id(item.param), item.shape, s) for item, s in zip(items, sharded, strict=True))
        if key != self._plan_key:
            costs = [float(self._optimizer.matrix_cost(item)) for item in items]
            # A changed set of matrices (add_param_group, a group removed, a matrix moved to
            # another group, a removed one added back) keeps every matrix's owner, by parameter,
            # as long as the parameter lives: its owner-only state (SOAP's factors, NorMuon's
            # second moments) stays there. Only matrices never planned are placed.
            fixed = [self._owner_of.get(item.param) for item in items]
            self._plan = build_plan([item.shape for item in items], sharded, costs,
                                    self.world_size, fixed)
            for item, owner in zip(items, self._plan.owners, strict=True):
                self._owner_of[item.param] = owner
            self._plan_key = key
            self._index = {id(item.param): i for i, item in enumerate(items)}
            self._layout_error = local_rows_problem(items, self._plan, self.rank)
        assert self._plan is not None
        if check and self._layout_error is not None:
            raise self._layout_error
        return self._plan, self._index

    def plan_for(self, items: Sequence[MatrixItem], *, check: bool = True) -> Plan:
        """The global plan restricted to ``items``, in their order."""
        plan, index = self.global_plan(check=check)
        return plan.subset([index[id(item.param)] for item in items])

    def owned(self, items: Sequence[MatrixItem]) -> list[int]:
        # ownership does not depend on how this rank's rows are laid out: a layout the plan
        # does not expect is raised on every rank by the step or the state dict's collective
        # (check_layout), not here on some ranks alone (init_state, outside any collective)
        return self.plan_for(items, check=False).owned_by(self.rank)

    def check_layout(self, device: torch.device) -> None:
        """Raise on every rank of the group when any rank's rows are not laid out as the plan
        expects (``torch.chunk`` over dim 0): one ``all_reduce`` of a flag per rank (on
        ``device``, one the backend serves), for the state dict's export and import, which
        raised on those ranks alone and left the others waiting in their next collective.
        That rank raises its own error, the others a ValueError naming the ranks."""
        self.global_plan(check=False)
        flags = torch.zeros(self.world_size, dtype=torch.float32, device=device)
        flags[self.rank] = float(self._layout_error is not None)
        dist.all_reduce(flags, group=self.group)
        bad = [r for r, v in enumerate(flags.tolist()) if v]
        if self._layout_error is not None:
            raise self._layout_error
        if bad:
            raise ValueError(
                f"ranks {bad} of the sharding group hold rows of a matrix not laid out as "
                f"torch.chunk row sharding over dim 0 (their own error names it): every rank "
                f"raises; lay the rows out as FSDP2's fully_shard does")

    def _sharded_of(self, param: Tensor) -> bool:
        """:func:`sharding._layout.is_sharded`, once per parameter object (a DTensor's
        placements do not change; the checks cost ~2 us a matrix, every step)."""
        known = self._sharded.get(param)
        if known is None:
            known = self._sharded[param] = is_sharded(param, self.group, self.world_size,
                                                      self._meshes_checked)
        return known

    # ---- the step -----------------------------------------------------------------------
    def run(self, items: Sequence[MatrixItem], inputs: Sequence[Tensor],
            compute: Compute, *, carry: Tensor | None = None, failure: Exception | None = None,
            carry_names: Sequence[str] = (),
            carry_check: Callable[[Tensor], None] | None = None
            ) -> tuple[list[Tensor], Tensor | None]:
        plan = self.plan_for(items, check=False)
        if failure is None and self._layout_error is not None:
            # rows not laid out as the plan's: this rank takes part with placeholders of the
            # plan's sizes, flagged, and every rank raises (raising here left the others
            # waiting in the gather)
            failure = self._layout_error
            if isinstance(inputs, list):
                inputs.clear()
            inputs = []
        owned = plan.owned_by(self.rank)
        self._signature = signature(
            items, carry_names or ([] if carry is None else [str(carry.numel())]))
        # ``failure``: this rank could not prepare its inputs (there are none). It still takes
        # part, flagged, so that every rank raises in this step instead of waiting for it.
        if failure is None:
            shapes = [tuple(t.shape) for t in inputs]
            dtypes = [t.dtype for t in inputs]
        else:
            shapes = [tuple(local(item.param).shape) for item in items]
            dtypes = [item.param.dtype for item in items]
        # A rank with no matrix to step still joins the gather (its signature tells the others),
        # on the device of the optimizer's matrices. The wire's dtype is decided by all of them,
        # not by this step's: ranks whose steps differ must still agree on it.
        every = [item.param for item in self._optimizer.matrix_items()]
        device = local(every[0]).device
        wire = self._wire_dtype([*dtypes, *(p.dtype for p in every)])
        # What the rest of the step needs of the inputs: they are dropped once sent (the caller
        # hands its list over), compute drops each full input once stacked, and _scatter the
        # results once they are in its send buffer, so a step's peak holds no second copy of
        # any of them. Every rank joins the gather, an owner of nothing too (it sends its rows).
        received, carried, failed = self._gather(plan, inputs, owned, wire, device, carry,
                                                 failure is not None, carry_names)
        if failed:  # known to every rank after the gather: no owner computes
            if isinstance(inputs, list):
                inputs.clear()
            self._raise_failed(failure, failed, "before the exchange (preparing its rows)", items,
                               plan)
        if carried is not None and carry_check is not None:
            carry_check(carried)  # the same sum on every rank: all raise, before any compute
        if not items:  # nor any rank's: their signatures agreed with this one (no scatter)
            return [], carried
        # An owner whose assembly of its full matrices or compute raises (out of memory on a
        # full matrix, a bug), or that cannot lay out its results to send, still joins the
        # scatter, flagged as failed: left out, every other rank would wait in it until the
        # process group timed out. Every rank then raises, and none applies this step's updates.
        send: list[list[Tensor]] | None = None
        if failure is None:
            try:
                full_inputs = assemble(plan, inputs, owned, received, wire)
                if isinstance(inputs, list):
                    inputs.clear()
                received = []  # the blocks: copied into the full inputs
                results = compute(owned, full_inputs) if owned else []
                del full_inputs  # emptied by compute
                send = send_lists(plan, owned, results, wire, device)
            except Exception as exc:  # raised again below, after the exchange
                failure = exc
        received = []
        if isinstance(inputs, list):
            inputs.clear()
        if send is None:  # placeholders of the same sizes, no new memory, flagged
            send = send_lists(plan, owned, None, wire, device)
        updates, failed = self._scatter(plan, shapes, device, send, wire,
                                        failed=failure is not None)
        if failed:
            self._raise_failed(failure, failed, "this step", items, plan)
        # the look the owner's update had (dtype, layout), which every rank can tell from the
        # matrix alone, so each rank adds exactly what one process adds
        out = []
        for item, dtype_in, update in zip(items, dtypes, updates, strict=True):
            dtype, transposed = self._optimizer.update_like(item, dtype_in)
            if dtype is not None:
                update = update.to(dtype)
            out.append(update.mT.contiguous().mT if transposed else update)
        return out, carried

    def _raise_failed(self, failure: Exception | None, failed: list[int], when: str,
                      items: Sequence[MatrixItem], plan: Plan) -> None:
        """Raise on this rank for the ``failed`` ranks of the group: its own ``failure`` (with
        a note) if it is one of them, else a RuntimeError naming them."""
        if failure is not None:
            failure.add_note(f"orthoshard: raised on every rank of the group; no rank applied "
                             f"this step's matrix updates (failed: ranks {failed})")
            raise failure
        raise RuntimeError(
            f"the matrix update on rank {failed[0]} of the sharding group failed {when}: its "
            f"own error is raised there; every rank of the group raises and none applied this "
            f"step's matrix updates (failed: ranks {failed}; owners of "
            f"{_owned_names(plan, failed, items)})")

    def _wire_dtype(self, dtypes: Sequence[torch.dtype]) -> torch.dtype:
        """The buffers' dtype: ``exchange_dtype``, or the widest of float32 and ``dtypes``
        (the caller's: every matrix parameter's, the same on every rank)."""
        if self.exchange_dtype is not None:
            return self.exchange_dtype
        wire = torch.float32
        for dtype in dtypes:
            wire = torch.promote_types(wire, dtype)
        return wire

    def _gather(self, plan: Plan, inputs: Sequence[Tensor], owned: list[int],
                wire: torch.dtype, device: torch.device, carry: Tensor | None, failed: bool,
                carry_names: Sequence[str] = ()
                ) -> tuple[list[Tensor], Tensor | None, list[int]]:
        """The gather: each source rank's block of this rank's owned sharded matrices' rows
        (:func:`sharding._wire.assemble` makes the full matrices of them), ``carry`` summed
        over the ranks (exact for the 0/1 flags it holds, in any wire dtype) and the ranks that
        could not prepare their inputs (``failed`` here: placeholders are sent, no new memory).
        Every block starts with the sender's status and signature, then ``carry``. With only
        replicated matrices (all of the optimizer's, not only this step's) no rows move: one
        small ``all_gather`` of the carry, statuses and signatures (:func:`sharding._wire.agree`)
        tells every rank of a failure or a mismatch before any owner computes. Found in the
        scatter instead, a step refused there had advanced the owners' own state (NorMuon's
        second moments, SOAP's factors), and an owner sending a matrix its receiver does not
        step made gloo abort both processes."""
        # all replicated (DDP-style): owners already hold everything. Decided by all of the
        # optimizer's matrices, not this step's, so that ranks whose steps differ make the same
        # collective and learn of it from the signatures.
        every, _ = self.global_plan(check=False)
        if not any(every.sharded):
            carried, failed_ranks = agree(
                carry, failed=failed, signature=self._signature, device=device,
                group=self.group, rank=self.rank, world_size=self.world_size, stats=self._stats)
            return [], carried, failed_ranks
        send = [[placeholder(plan.rows_of(i, self.rank) * plan.shapes[i][1], wire, device)
                 if failed else inputs[i].reshape(-1)
                 for i in plan.owned_by(d) if plan.sharded[i]]
                for d in range(self.world_size)]
        recv_sizes = [sum(plan.rows_of(i, s) * plan.shapes[i][1] for i in owned if plan.sharded[i])
                      for s in range(self.world_size)]
        capacity = None
        if dist.get_backend(self.group) == dist.Backend.GLOO:
            # room for the rows of every matrix this rank owns, stepped here or not: a rank
            # stepping one this rank does not (a gradient None here only) is then refused by
            # its signature, where gloo would abort both processes on a longer block. (Its own
            # block gloo requires exact: it holds what this rank steps.)
            mine = every.owned_by(self.rank)
            capacity = [size if s == self.rank else
                        max(size, sum(every.rows_of(i, s) * every.shapes[i][1]
                                      for i in mine if every.sharded[i]))
                        for s, size in enumerate(recv_sizes)]
        received, failed_ranks, carried = self._all_to_all(send, recv_sizes, device, wire,
                                                           failed=failed, carry=carry,
                                                           capacity=capacity)
        return received, carried, failed_ranks

    def _scatter(self, plan: Plan, shapes: list[tuple[int, ...]], device: torch.device,
                 send: list[list[Tensor]], wire: torch.dtype, *, failed: bool
                 ) -> tuple[list[Tensor], list[int]]:
        """Send ``send`` (:func:`sharding._wire.send_lists`; consumed); each rank's rows of
        every matrix (``shapes``: of this rank's inputs), and the ranks that failed (``failed``:
        this one, which sends placeholders).

        Each block starts with the status (0: computed, 1: failed) and the step's signature, so
        that every rank learns of a failed owner in this one collective: ``STATUS_ELEMENTS``
        per destination."""
        recv_sizes = [sum(plan.rows_of(i, self.rank) * plan.shapes[i][1] if plan.sharded[i]
                          else plan.shapes[i][0] * plan.shapes[i][1]
                          for i in plan.owned_by(s)) for s in range(self.world_size)]
        received, failed_ranks, _ = self._all_to_all(send, recv_sizes, device, wire,
                                                     failed=failed)
        if failed_ranks:
            return [], failed_ranks
        out: list[Tensor] = []
        for i, shape in enumerate(shapes):
            src = plan.owners[i]
            shape = shape if plan.sharded[i] else plan.shapes[i]
            size = math.prod(shape)
            out.append(received[src][:size].view(shape))
            received[src] = received[src][size:]
        return out, []

    def _all_to_all(self, send: list[list[Tensor]], recv_sizes: list[int],
                    device: torch.device, wire: torch.dtype, *, failed: bool,
                    carry: Tensor | None = None, capacity: list[int] | None = None
                    ) -> tuple[list[Tensor], list[int], Tensor | None]:
        """:func:`sharding._wire.all_to_all` in this group with this step's signature, counted
        in :meth:`comm_stats`."""
        return all_to_all(send, recv_sizes, device, wire, failed=failed, carry=carry,
                          signature=self._signature, group=self.group, rank=self.rank,
                          stats=self._stats, capacity=capacity)

    # ---- checkpoints ----------------------------------------------------------------------
    def export_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return _owner_state.export_owner_state(self, state_dict)

    def import_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return _owner_state.import_owner_state(self, state_dict)


def _owned_names(plan: Plan, ranks: list[int], items: Sequence[MatrixItem]) -> str:
    """The matrices ``ranks`` own this step, by name (the first few), for an error."""
    names = [items[i].name for r in ranks for i in plan.owned_by(r)]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return shown or "no matrices"

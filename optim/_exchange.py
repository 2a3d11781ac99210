"""What a step hands between its phases: the matrices taking part, the exchange that moves their
update inputs to their owners and the updates back (its protocol and its one-process form),
finiteness flags, and health metrics held as one tensor until read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from optim._base import MatrixOptimizer

__all__ = ["DeferredMetrics", "LocalExchange", "MatrixExchange", "MatrixItem", "all_finite",
           "group_settings", "local", "nonfinite_flags"]


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank stores: a DTensor's local shard, or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _real(t: Tensor) -> Tensor:
    """``t``, or a complex ``t``'s real and imaginary parts as a real view."""
    return torch.view_as_real(t) if t.is_complex() else t


def all_finite(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values, with one fused reduction and one host sync.

    A finite sum implies finite entries (NaN and Inf propagate, ``+Inf + -Inf`` is NaN), and a sum
    reads the data once, where ``torch.isfinite(x).all()`` makes four passes and allocates two
    masks (measured 7 ms against 0.15 ms on a 1024x1024 fp32 matrix, one thread). A non-finite
    sum can also be an overflow of finite entries, so only those tensors are checked exactly.
    A DTensor is judged by this process's shard (:func:`nonfinite_flags`, summed over the
    ranks, decides for a whole sharded tensor).
    """
    return [flag == 0.0 for flag in _nonfinite(tensors)]


def _nonfinite(tensors: Sequence[Tensor]) -> list[float]:
    """:func:`nonfinite_flags` as Python floats (no tensor made)."""
    if not tensors:
        return []
    # a complex tensor is summed as its real and imaginary parts (casting its sum to a real dtype
    # would drop a NaN in the imaginary part)
    sums = torch.stack([_real(local(t)).sum().to(torch.float64) for t in tensors])
    return [0.0 if good else float(not bool(torch.isfinite(local(t)).all()))
            for t, good in zip(tensors, torch.isfinite(sums).tolist(), strict=True)]


def nonfinite_flags(tensors: Sequence[Tensor | None], device: torch.device | None = None
                    ) -> Tensor:
    """Per tensor, 1.0 where THIS process's part of it (a DTensor's local shard) holds a NaN
    or an Inf, else 0.0; 0.0 for a None (a parameter without a gradient keeps its place).
    Float64, on ``device`` (default: the first tensor's; empty for no tensors).

    Exact, with one fused sum per tensor and one host sync (as :func:`all_finite`): a finite sum
    clears a shard, and a non-finite one, which can be an overflow of finite entries, is checked
    entry by entry. Summed over the ranks (any exchange can carry them), nonzero flags say which
    sharded tensors to skip on every rank."""
    present = [t for t in tensors if t is not None]
    if device is None and present:
        device = local(present[0]).device
    found = iter(_nonfinite(present))
    return torch.tensor([0.0 if t is None else next(found) for t in tensors],
                        dtype=torch.float64, device=device)


def _one_row(values: list[float]) -> list[list[float]]:
    """The ``finish`` of a :class:`DeferredMetrics` holding one matrix's final values."""
    return [values]


@dataclass(eq=False)
class DeferredMetrics:
    """The health metrics of several matrices of one step, held as ONE tensor until
    :meth:`MatrixOptimizer.health` reads them: converting it then takes a single ``.tolist()``
    (one host transfer on an accelerator), where a tensor per metric takes one ``float()`` each,
    and the final scalar formulas run on Python floats instead of as tiny tensor operations.

    ``keys[i]`` names matrix i's metrics; ``finish(values.tolist())`` returns, per matrix, their
    values in that order.
    """

    keys: list[tuple[str, ...]]
    values: Tensor
    finish: Callable[[list[float]], list[list[float]]]
    _floats: list[list[float]] | None = field(default=None, repr=False)

    def floats(self, i: int) -> list[float]:
        """Matrix i's metric values (the tensor is converted once, on first use)."""
        if self._floats is None:
            self._floats = self.finish(self.values.tolist())
        return self._floats[i]


@dataclass
class MatrixItem:
    """One matrix parameter taking part in a step."""

    param: Tensor
    name: str
    group: dict[str, Any]
    shape: tuple[int, int]  # the GLOBAL shape (a DTensor reports it too)
    pending: Any = field(default=None, repr=False)


# a group's entries that are not settings of its update: its members, and skip counts kept
# where each matrix is counted (its owner), which differ from rank to rank
_NOT_SETTINGS = ("params", "param_names", "nonfinite_skips")


def group_settings(group: dict[str, Any]) -> str:
    """A param group's settings as text, the same on every rank that holds the same ones: every
    value but its members and skip counts (tensors by their values, a schedule as a mark: its
    value at a step is a function of the step count, which is in the text). A sharded step
    sends a checksum of it (``sharding._wire.signature``): ranks whose groups differ (another
    learning rate, another method, another step count) stepped each their own rows with their
    own settings, silently."""
    parts = []
    for key in sorted(group):
        if key in _NOT_SETTINGS:
            continue
        value = group[key]
        if callable(value):
            text = "<schedule>"
        elif isinstance(value, Tensor):
            text = repr(value.detach().cpu().tolist())
        else:
            text = repr(value)
            if " at 0x" in text:  # an object without a value repr: its address differs by rank
                text = type(value).__qualname__
        parts.append(f"{key}={text}")
    return ";".join(parts)


class MatrixExchange(Protocol):
    """How update inputs reach the owners of full matrices, and updates come back."""

    def run(self, items: Sequence[MatrixItem], inputs: Sequence[Tensor],
            compute: Callable[[list[int], list[Tensor]], list[Tensor]], *,
            carry: Tensor | None = None, failure: Exception | None = None,
            carry_names: Sequence[str] = (),
            carry_check: Callable[[Tensor], None] | None = None
            ) -> tuple[list[Tensor], Tensor | None]:
        """``inputs[i]`` is this rank's piece of matrix i's update input. Call ``compute`` with
        the indices this rank owns and a list of their FULL inputs, which ``compute`` consumes
        (it drops each entry once stacked, to bound a step's memory); return this rank's piece
        of every matrix's update, in ``items`` order. The caller hands ``inputs`` over too: it
        does not read them after the call. ``items`` may be empty (no matrix of this rank has a
        gradient): the rank still joins, so that its peers are not left waiting for it, and
        every rank raises unless none has one.

        ``carry``: a small float64 vector (the same length on every rank) to be summed over the
        ranks on the way; returned second, the same on every rank, or None when the exchange
        made no call that could carry it (the caller then uses :meth:`all_reduce_sum`; an
        optimizer without matrices calls it alone).
        ``carry_names``: what each entry of ``carry`` belongs to (the AdamW parameters with a
        gradient); ranks that pass other names raise, as for other matrices, since summing
        entries of different parameters would step each with another's flags.
        ``carry_check``: called with the summed ``carry`` as soon as it is known, before any
        owner computes (the same sum on every rank, so what it raises every rank raises).
        ``failure``: this rank could not prepare its inputs (``inputs`` is then empty); it is
        raised, and every other rank raises too, once the ranks have learnt of it."""
        ...

    def bind(self, optimizer: MatrixOptimizer) -> None:
        """Called once by the optimizer that uses this exchange."""
        ...

    def owned(self, items: Sequence[MatrixItem]) -> list[int]:
        """Indices of ``items`` whose full matrix this rank owns."""
        ...

    def export_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Make owner-only state checkpointable (same keys on every rank)."""
        ...

    def import_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`export_state` under the current ownership plan."""
        ...

    def comm_stats(self) -> dict[str, int]:
        """Cumulative optimizer communication of this rank."""
        ...

    def all_reduce_sum(self, t: Tensor, names: Sequence[str] = ()) -> Tensor:
        """``t`` summed over the ranks (one collective); the identity in one process.
        ``names``: what its entries belong to; ranks that pass other names raise."""
        ...

    def reports_fallback(self) -> bool:
        """Whether this rank reports the AdamW group's skip counts in ``health()``: every rank
        steps those parameters and counts alike, and one rank reports them, as one owner
        reports each matrix (a count summed over ranks or nodes is then the true one)."""
        ...


class LocalExchange:
    """Single process: every matrix is whole and owned here."""

    def bind(self, optimizer: MatrixOptimizer) -> None:
        return None

    def owned(self, items: Sequence[MatrixItem]) -> list[int]:
        return list(range(len(items)))

    def export_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def import_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def run(self, items: Sequence[MatrixItem], inputs: Sequence[Tensor],
            compute: Callable[[list[int], list[Tensor]], list[Tensor]], *,
            carry: Tensor | None = None, failure: Exception | None = None,
            carry_names: Sequence[str] = (),
            carry_check: Callable[[Tensor], None] | None = None
            ) -> tuple[list[Tensor], Tensor | None]:
        if failure is not None:
            raise failure
        if carry is not None and carry_check is not None:
            carry_check(carry)  # one process: its own flags are the sum
        # the caller's list itself (handed over, see Exchange.run): compute drops each input
        # once stacked, and none outlives its batch
        return compute(list(range(len(items))),
                       inputs if isinstance(inputs, list) else list(inputs)), carry

    def comm_stats(self) -> dict[str, int]:
        return {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}

    def all_reduce_sum(self, t: Tensor, names: Sequence[str] = ()) -> Tensor:
        return t

    def reports_fallback(self) -> bool:
        return True

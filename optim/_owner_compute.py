"""Phase 2 of :class:`optim._base.MatrixOptimizer`'s step, on the owner: the full update inputs
of the matrices this rank owns, checked for finiteness, batched by group, shape and dtype (at
most ``MAX_BATCH_BYTES`` a batch), computed, and checked again on the way out."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import Tensor

from optim._caller import user_stacklevel
from optim._exchange import MatrixItem, all_finite

__all__ = ["OwnerCompute"]

T = TypeVar("T")


class OwnerCompute:
    """The owner phase; :class:`optim._base.MatrixOptimizer` provides the hooks it calls."""

    MAX_BATCH_BYTES: int
    _step_items: list[MatrixItem]
    _skipped: set[int]

    if TYPE_CHECKING:  # the hooks, which MatrixOptimizer and HealthBook define
        def _stack(self, items: list[MatrixItem], xs: list[Tensor]) -> Tensor: ...
        def _compute(self, items: list[MatrixItem], X: Tensor) -> Tensor: ...
        def _end_batches(self) -> None: ...
        def _skip(self, item: MatrixItem) -> None: ...
        def _report_skips(self, item: MatrixItem) -> None: ...

    def _owner_compute(self, indices: list[int], full_inputs: list[Tensor], *,
                       end: bool = True, known_finite: Sequence[bool] = ()) -> list[Tensor]:
        """Phase 2 for the matrices this rank owns; batches the matrices of one group and
        :meth:`_batch_shape`.
        ``end``: finish the step's batches here (:meth:`_end_batches`); False when the caller
        does, after more batches. ``known_finite[j]`` True: phase 1 already proved input j
        finite, and it is not checked again."""
        items = [self._step_items[i] for i in indices]
        results: list[Tensor | None] = [None] * len(indices)
        batches: dict[tuple, list[int]] = defaultdict(list)
        unknown = [j for j in range(len(full_inputs))
                   if not (j < len(known_finite) and known_finite[j])]
        checked = dict(zip(unknown, all_finite([full_inputs[j] for j in unknown]), strict=True))
        for j in range(len(full_inputs)):
            ok = checked.get(j, True)
            if ok:  # stacking promotes mixed dtypes: one batch per dtype
                batches[(id(items[j].group), self._batch_shape(items[j]),
                         full_inputs[j].dtype)].append(j)
            else:
                self._skip(items[j])
                results[j] = torch.full_like(full_inputs[j], float("nan"))
        # The list is handed over: each batch's entries are dropped once stacked (the stack, or
        # for one matrix its view, holds them), so no input outlives its batch's compute.
        pending = cast("list[Tensor | None]", full_inputs)
        try:
            for js in (chunk for same in batches.values()
                       for chunk in self._batch_chunks(same, items[same[0]].shape)):
                batch_items = [items[j] for j in js]
                flip = [self._batch_shape(items[j]) != items[j].shape for j in js]
                X = self._stack(batch_items, [full_inputs[j].mT if f else full_inputs[j]
                                              for j, f in zip(js, flip, strict=True)])
                like = [(full_inputs[j].shape, full_inputs[j].dtype) for j in js]
                for j in js:
                    pending[j] = None
                try:
                    stacked = self._compute(batch_items, X)
                except torch.linalg.LinAlgError as exc:
                    # A decomposition that did not converge (an SVD; SOAP catches its own per
                    # matrix): skipped and counted like a non-finite update, with a warning.
                    # Raised here, on the owner, it would leave every other rank waiting in the
                    # exchange; a _compute that lets it through has committed no state.
                    self._warn_failed(batch_items, exc)
                    for j, (shape, dtype) in zip(js, like, strict=True):
                        self._skip(items[j])
                        results[j] = torch.full(shape, float("nan"), dtype=dtype,
                                                device=X.device)
                    continue
                finally:
                    del X
                for j, f, o in zip(js, flip, stacked.unbind(0), strict=True):
                    results[j] = o.mT if f else o
        finally:
            if end:
                self._end_batches()
        out = [r for r in results if r is not None]
        # A finite input whose update came out non-finite (a float64 gradient beyond bfloat16's
        # range, which Newton-Schulz computes in) is counted here, where the whole update is
        # seen: counted after the exchange, an owner holding no rows of the matrix (an empty
        # FSDP2 shard) saw nothing wrong and the skip went unreported. All NaN, so that no
        # rank applies its rows of a partly finite update.
        for j, ok in enumerate(all_finite(out)):
            if not ok:
                if id(items[j]) not in self._skipped:
                    self._skip(items[j])
                out[j] = torch.full_like(out[j], float("nan"))
        for item in items:
            self._report_skips(item)
        return out

    def _batch_shape(self, item: MatrixItem) -> tuple[int, int]:
        """The shape in which ``item``'s update input is stacked with others of that shape:
        its own, or its transpose (the input then goes in transposed, and its update comes out
        as the transposed view of the batch's)."""
        return item.shape

    def _batch_chunks(self, same: list[T], shape: tuple[int, int]) -> list[list[T]]:
        """``same`` (matrices of one group, shape and dtype) cut, in order, into batches of
        at most :attr:`MAX_BATCH_BYTES` float32 bytes each, at least one matrix."""
        per = max(1, self.MAX_BATCH_BYTES // max(1, 4 * shape[0] * shape[1]))
        return [same[k:k + per] for k in range(0, len(same), per)]

    def _warn_failed(self, items: list[MatrixItem], exc: Exception) -> None:
        """Warn that the update of ``items`` failed with ``exc`` and is skipped this step."""
        warnings.warn(f"{type(self).__name__}: the update of "
                      f"{', '.join(item.name for item in items)} failed ({exc}); skipped this "
                      f"step", RuntimeWarning, stacklevel=user_stacklevel())

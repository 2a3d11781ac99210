"""What an optimizer's :meth:`health` reports: each matrix's latest metrics, kept as recorded
(tensors, or batches converted only when read) and as floats when asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from optim._exchange import DeferredMetrics, MatrixItem
from optim._state_dict import StateDictOptimizer

__all__ = ["HealthBook"]


class HealthBook(StateDictOptimizer):
    """Records health for :class:`optim._base.MatrixOptimizer`, which sets the attributes."""

    health_every: int
    # the latest metrics of each matrix, by name: recorded values, and deferred ones as
    # (batch, its index there), read by health()
    _health: dict[str, dict[str, Tensor | float]]
    _deferred: dict[str, tuple[DeferredMetrics, int]]

    def _health_due(self, group: dict[str, Any]) -> bool:
        """Steps 1, N + 1, 2N + 1, ... for ``health_every=N``: the steps SOAP refreshes its
        bases at when N is a multiple of ``precondition_frequency`` (refreshes come at steps 1,
        f + 1, ...), so every measured step measures a rotation. At N, 2N, ... they never met,
        and the rotations read 0 on every measured step."""
        return self.health_every > 0 and (group["step"] - 1) % self.health_every == 0

    def _record(self, name: str, metrics: dict[str, Tensor | float]) -> None:
        self._health.setdefault(name, {}).update(metrics)

    def _record_deferred(self, names: Sequence[str], batch: DeferredMetrics) -> None:
        """Record ``batch``'s metrics for the matrices ``names`` (in order), converted to floats
        only when :meth:`health` is called; they replace the matrix's earlier deferred ones."""
        if len(names) != len(batch.keys):
            raise ValueError(f"{len(names)} names for {len(batch.keys)} matrices of metrics")
        for i, name in enumerate(names):
            self._deferred[name] = (batch, i)

    def health(self) -> dict[str, dict[str, float]]:
        """``{param_name: {metric: float}}`` for the matrices this rank owns (latest values).

        Only parameters still in a param group: a group removed during training (a block
        frozen) takes its matrices' last values with it, which would otherwise be reported, and
        published, as if they were current."""
        self._drop_gone_health()
        out: dict[str, dict[str, float]] = {}
        for name, (batch, i) in self._deferred.items():
            out[name] = dict(zip(batch.keys[i], batch.floats(i), strict=True))
        for name, metrics in self._health.items():
            out.setdefault(name, {}).update({k: float(v) for k, v in metrics.items()})
        return out

    def _drop_gone_health(self) -> None:
        """Forget the health of matrices no longer in a param group."""
        present = {name for group in self.param_groups for name in group["param_names"]}
        for stale in [n for n in (*self._deferred, *self._health) if n not in present]:
            self._deferred.pop(stale, None)
            self._health.pop(stale, None)

    def _report_skips(self, item: MatrixItem) -> None:
        """Put ``item``'s skip count in what :meth:`health` reports."""
        self._health.setdefault(item.name, {})["nonfinite_skips"] = \
            float(item.group["nonfinite_skips"][item.name])

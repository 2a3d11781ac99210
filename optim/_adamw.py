"""The AdamW update of the ``algorithm="adamw"`` groups (1-D parameters, embeddings, output
heads), through ``torch.optim.adam`` with decoupled weight decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from optim._health_book import HealthBook

__all__ = ["ADAMW_DEFAULTS", "AdamWFallback"]

ADAMW_DEFAULTS = {"adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8}


class AdamWFallback(HealthBook):
    """AdamW for :class:`optim._base.MatrixOptimizer`'s fallback groups."""

    _exchange: Any

    def _adamw_step(self, group: dict[str, Any], named: list[tuple[str, Tensor]],
                    finite: list[bool]) -> None:
        """AdamW on the fallback group's parameters with a gradient (``named``). As for
        matrices, a parameter whose gradient holds a NaN or Inf (``finite`` False, decided on
        every rank alike) is skipped (its state and value untouched) and counted; it appears in
        :meth:`health` from its first skip on, as ``{"nonfinite_skips": n}``."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        avgs: list[Tensor] = []
        sqs: list[Tensor] = []
        steps: list[Tensor] = []
        for (name, p), ok in zip(named, finite, strict=True):
            if not ok:
                group["nonfinite_skips"][name] += 1
                if self._exchange.reports_fallback():
                    self._record(name, {"nonfinite_skips": float(group["nonfinite_skips"][name])})
                continue
            state = self._adamw_state(p)
            assert p.grad is not None  # named holds the parameters with a gradient
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["adamw_betas"]
        adam(params, grads, avgs, sqs, [], steps, foreach=False, decoupled_weight_decay=True,
             amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["adamw_eps"], maximize=False)

    def _adamw_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

"""Trainer-side glue: an optimizer's health and configuration as plain values for the sidecar.

``optim`` knows nothing of the service and the service nothing of torch; this module joins them::

    pub = Publisher(url=..., token=...)
    ...
    publish_health(pub, optimizer, step=step, rank=rank)   # one line in the training loop
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["optimizer_summary", "publish_health"]

_HYPER_KEYS = ("algorithm", "lr", "weight_decay", "momentum", "nesterov", "ns_method",
               "ns_steps", "adjust_lr_fn", "beta2", "betas", "shampoo_beta", "eps",
               "use_kl_shampoo", "use_eigh", "precondition_frequency", "fp32_matmul_prec",
               "adamw_betas")
_TOP_K = 8


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    return str(value)


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    out = []
    for group in optimizer.param_groups:
        hyper = {k: _plain(group[k]) for k in _HYPER_KEYS if k in group}
        if "softening" in group:
            s = group["softening"]
            hyper["softening"] = float(s(group["step"]) if callable(s) else s)
        out.append({"hyperparameters": hyper, "params": list(group.get("param_names", []))})
    return out


def _state_summary(optimizer: Any, owned: set[str], rank: int) -> dict[str, Any]:
    summary = {}
    for item in optimizer.matrix_items():
        if item.name not in owned:
            continue
        state = optimizer.state.get(item.param, {})
        norms = {k: float(torch.linalg.vector_norm(v.to_local() if hasattr(v, "to_local") else v))
                 for k, v in state.items() if torch.is_tensor(v) and v.ndim >= 1 and k[0] != "Q"}
        eig = {}
        for factor in ("L", "R"):
            f = state.get(factor)
            if torch.is_tensor(f) and f.ndim == 2 and f.numel() > 0:
                vals = torch.linalg.eigvalsh(f.float()).flip(0)[:_TOP_K]
                eig[factor] = [float(v) for v in vals]
        summary[item.name] = {"shape": list(item.shape), "owner_rank": rank,
                              "buffer_norms": dict(list(norms.items())[:16]), "eigenvalues": eig}
    return summary


def optimizer_summary(optimizer: Any, *, rank: int) -> dict[str, Any]:
    """Class, per-group hyperparameters and state summaries of the matrices this rank owns."""
    owned = set(optimizer.health())
    return {"class_name": type(optimizer).__name__, "groups": _groups(optimizer),
            "state": _state_summary(optimizer, owned, rank)}


def publish_health(publisher: Any, optimizer: Any, *, step: int, rank: int,
                   with_summary: bool = False) -> dict[str, dict[str, float]]:
    """Hand this rank's health (and, if asked, the state summary) to the publisher; returns
    the health it published. Never blocks on the network (the publisher's queue does)."""
    health = optimizer.health()
    summary = optimizer_summary(optimizer, rank=rank) if with_summary else None
    publisher.publish(step=step, rank=rank, params=health, optimizer=summary)
    return health

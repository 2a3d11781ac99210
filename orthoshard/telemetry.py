"""Trainer-side glue: an optimizer's health and configuration as plain values for the sidecar.

``optim`` knows nothing of the service and the service nothing of torch; this module joins them::

    pub = Publisher(url=..., token=...)
    ...
    publish_health(pub, optimizer, step=step, rank=rank)   # one line in the training loop
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from service.schema import MAX_GROUPS

__all__ = ["optimizer_summary", "publish_health"]

# what each kind of group reads (an AdamW group also holds the matrix optimizer's defaults,
# which its update ignores: publishing them would misreport it)
_HYPER_KEYS = ("algorithm", "lr", "weight_decay", "momentum", "nesterov", "ns_method",
               "ns_steps", "ns_coefficients", "adjust_lr_fn", "beta2", "normuon_eps", "betas",
               "shampoo_beta", "eps", "correct_bias", "use_kl_shampoo", "use_eigh",
               "power_iter_steps", "precondition_frequency", "max_precond_dim",
               "fp32_matmul_prec", "qr_fp32_matmul_prec", "max_update_rms")
_ADAMW_KEYS = ("algorithm", "lr", "weight_decay", "adamw_betas", "adamw_eps")
_TOP_K = 8


def _plain(value: Any) -> Any:
    """A JSON-ready hyperparameter: one-element tensors (a tensor ``lr``) and NumPy scalars as
    numbers, sequences as lists of floats, anything else as its ``str`` (at most 256
    characters, as the sidecar takes them)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            return str(value)[:256]
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)[:256]


def _softening(group: dict[str, Any]) -> float | None:
    """The softening of the group's last step (of its first before it has taken one: a
    schedule counts steps from 1); None when a schedule raises or returns no number, which
    the step itself would refuse, so that the summary never raises into the training loop."""
    s = group["softening"]
    if not callable(s):
        return float(s)
    try:
        return float(s(max(int(group["step"]), 1)))
    except Exception:
        return None


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this module, for a warning raised by the
    function that calls this: the training loop's ``publish_health`` or ``optimizer_summary``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    """Each group's hyperparameters, as its update reads them, and parameter names: at most
    ``MAX_GROUPS`` (the sidecar's schema), the first ones, with a warning (once). Past the
    limit the sidecar refused the whole snapshot, the health with it."""
    out = []
    groups = optimizer.param_groups
    if len(groups) > MAX_GROUPS and not getattr(optimizer, "_orthoshard_groups_warned", False):
        warnings.warn(f"the optimizer state summary lists the first {MAX_GROUPS} of "
                      f"{len(groups)} param groups (the most a snapshot holds); the health of "
                      f"every matrix is published as usual (warned once)", RuntimeWarning,
                      stacklevel=_caller_level())
        optimizer._orthoshard_groups_warned = True
    for group in groups[:MAX_GROUPS]:
        keys = _ADAMW_KEYS if group.get("algorithm") == "adamw" else _HYPER_KEYS
        # ns_coefficients are the quintic's: another method's update does not read them
        hyper = {k: _plain(group[k]) for k in keys if k in group and not (
            k == "ns_coefficients" and group.get("ns_method", "quintic") != "quintic")}
        if "softening" in group and group.get("algorithm") != "adamw":
            hyper["softening"] = _softening(group)
        out.append({"hyperparameters": hyper, "params": list(group.get("param_names", []))})
    return out


def _sharded(v: Any) -> bool:
    return isinstance(v, DTensor) and any(p.is_shard() for p in v.placements)


def _sharded_norms(optimizer: Any) -> dict[tuple[str, str], float]:
    """``(param name, state key) -> Frobenius norm`` of the state tensors stored as shards
    (Muon's and NorMuon's momentum under FSDP2: each rank holds its rows only), from ONE
    ``all_reduce`` of every rank's local sums of squares per device mesh, so a collective:
    every rank must call it at the same step. Without sharded state it makes no call. Under
    HSDP the sums run over the sharded mesh dimension only (the replicas hold the same rows)."""
    entries: dict[tuple[Any, int], list[tuple[str, str, Tensor]]] = {}
    for item in optimizer.matrix_items():
        for key, v in optimizer.state.get(item.param, {}).items():
            if _sharded(v):
                local = torch.linalg.vector_norm(v.to_local(), dtype=torch.float64)
                dim = next(d for d, pl in enumerate(v.placements) if pl.is_shard())
                entries.setdefault((v.device_mesh, dim), []).append((item.name, key, local))
    norms = {}
    for (mesh, dim), rows in entries.items():
        sums = torch.stack([local.square() for _, _, local in rows])
        dist.all_reduce(sums, group=mesh.get_group(dim))
        norms.update({(name, key): math.sqrt(total)
                      for (name, key, _), total in zip(rows, sums.tolist(), strict=True)})
    return norms


def _top_quotients(factor: Any, basis: Any) -> list[float]:
    """SOAP's estimates of a factor's top eigenvalues: the Rayleigh quotients ``q^T F q`` of the
    first ``_TOP_K`` columns of its eigenbasis (kept in descending order), sorted descending.
    They are the eigenvalues themselves right after an eigh refresh. ``8 d^2`` multiply-adds
    where an eigendecomposition is ``~d^3`` (measured: 1.9 against 49 ms at d = 1024, 12 ms
    against 1.0 s at 2048, per factor), which the summary of a large model could not afford
    every few steps. Empty for an absent side."""
    if not (torch.is_tensor(factor) and factor.ndim == 2 and factor.numel() > 0
            and torch.is_tensor(basis) and basis.shape == factor.shape):
        return []
    top = basis[:, :_TOP_K].float()
    quotients = (top * (factor.float() @ top)).sum(dim=0)
    return sorted((float(q) for q in quotients), reverse=True)


def _state_summary(optimizer: Any, owned: set[str], rank: int) -> dict[str, Any]:
    sharded = _sharded_norms(optimizer)
    summary = {}
    for item in optimizer.matrix_items():
        if item.name not in owned:
            continue
        state = optimizer.state.get(item.param, {})
        norms = {k: sharded[(item.name, k)] if _sharded(v) else
                 float(torch.linalg.vector_norm(v.to_local() if isinstance(v, DTensor) else v,
                                                dtype=torch.float64))
                 for k, v in state.items()
                 # an absent side of one-sided SOAP is stored as a (0, 0) tensor: no buffer
                 if torch.is_tensor(v) and v.ndim >= 1 and v.numel() > 0 and k[0] != "Q"}
        eig = {factor: values for factor in ("L", "R")
               if (values := _top_quotients(state.get(factor), state.get(f"Q_{factor}")))}
        summary[item.name] = {"shape": list(item.shape), "owner_rank": rank,
                              "buffer_norms": dict(list(norms.items())[:16]), "eigenvalues": eig}
    return summary


def optimizer_summary(optimizer: Any, *, rank: int) -> dict[str, Any]:
    """Class, per-group hyperparameters and state summaries of the matrices this rank owns.

    Buffer norms are of the whole buffer: where a buffer is stored as shards (Muon's momentum
    under FSDP2) one small ``all_reduce`` completes them, so under FSDP2 every rank must call
    this at the same step, as it calls ``checkpoint.save``."""
    owned = set(optimizer.health())
    return {"class_name": type(optimizer).__name__, "groups": _groups(optimizer),
            "state": _state_summary(optimizer, owned, rank)}


def publish_health(publisher: Any, optimizer: Any, *, step: int, rank: int,
                   with_summary: bool = False) -> dict[str, dict[str, float]]:
    """Hand this rank's health (and, if asked, the state summary) to the publisher; returns
    the health it published. Never blocks on the sidecar (the publisher's queue does); with
    ``with_summary`` under FSDP2 it is collective (:func:`optimizer_summary`): every rank
    passes the same ``with_summary`` at a step, also a rank without a sidecar, whose
    ``publisher`` is None (it takes part in the collective and publishes nothing; skipping the
    call there would leave the other ranks waiting in it)."""
    health = optimizer.health()
    summary = optimizer_summary(optimizer, rank=rank) if with_summary else None
    if publisher is not None:
        publisher.publish(step=step, rank=rank, params=health, optimizer=summary)
    return health

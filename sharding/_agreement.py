"""Checks every rank makes before a checkpoint's collectives: that it belongs to the group,
pairs the optimizer with the model that holds its parameters, and steps what the other ranks
saving (or loading) with it step. Each refuses on every rank alike, so none is left waiting in
DCP's collectives.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from sharding.owner import OwnerSharding

__all__ = ["check_ranks_agree"]


def _check_member(process_group: dist.ProcessGroup | None) -> None:
    """Raise ValueError when this rank is outside ``process_group`` (whose members do not wait
    for it: nothing to agree on with them)."""
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise ValueError(
            f"process_group does not hold rank {dist.get_rank()}: pass the group of ranks that "
            f"save this model (a pipeline stage's group), created on every rank with "
            f"dist.new_group, and call save/load only on its ranks")


def _check_group(optimizer: Any, process_group: dist.ProcessGroup | None) -> None:
    """Raise ValueError when the optimizer's sharding group holds ranks outside
    ``process_group``: the state dict is a collective over the sharding group, so those ranks
    would have to call ``save`` or ``load`` too, and the ranks that did would wait for them
    until the process group times out."""
    if process_group is None:
        return
    sharding = getattr(optimizer, "_exchange", None)
    if not isinstance(sharding, OwnerSharding):  # one process: nothing else takes part
        return
    group = sharding.group if sharding.group is not None else dist.group.WORLD
    sharding_ranks = set(dist.get_process_group_ranks(group))
    outside = sorted(sharding_ranks - set(dist.get_process_group_ranks(process_group)))
    if outside:
        raise ValueError(
            f"the optimizer's OwnerSharding group holds ranks {outside} that process_group "
            f"does not: its state dict is a collective over that group. Pass a process_group "
            f"that holds every rank of the OwnerSharding group (the stage's group itself, or "
            f"None for the default group)")


def _names(model: torch.nn.Module, optimizer: Any) -> list[str]:
    """The model's names of the optimizer's parameters in state-dict order (each position's
    name; the model's, as the optimizer's own may be the positions it gave unnamed ones)."""
    fqns = {id(p): name for name, p in model.named_parameters()}
    return [fqns.get(id(p), "?") for group in optimizer.param_groups for p in group["params"]]


def _optimizer_identity(model: torch.nn.Module, optimizer: Any) -> tuple[str, int, str]:
    """What must be equal on every rank that saves into (or loads from) one directory: the
    optimizer's class, and its parameters' number and a digest of their names in state-dict
    order (a few bytes whatever the model: it goes to every rank)."""
    names = _names(model, optimizer)
    return type(optimizer).__name__, len(names), \
        hashlib.sha256("\0".join(names).encode()).hexdigest()


def check_ranks_agree(model: torch.nn.Module, optimizer: Any,
                       process_group: dist.ProcessGroup | None, action: str) -> None:
    """Raise ValueError on every rank of ``process_group`` when any of them pairs the optimizer
    with a model that does not hold its parameters (:func:`check_pair`), or when its ranks do
    not all step the same parameters with the same optimizer class (one all_gather_object of a
    few strings). The optimizer's state is saved by position (``optim.state.0``), so pipeline
    stages saving together into one directory would write each other's keys, and DCP keeps
    ONE copy of a key it sees on several ranks (as for replicas): a stage of the same shapes
    would load another stage's momentum without a word. A rank's own problem is raised there,
    and the others name it: none of them is left waiting in DCP's collectives."""
    _check_member(process_group)  # a rank outside the group cannot join the gather
    try:
        _check_group(optimizer, process_group)
        _check_pair(model, optimizer)
        problem = None
    except ValueError as exc:
        problem = str(exc)
    if not dist.is_initialized():
        if problem is not None:
            raise ValueError(problem)
        return
    mine = (problem, _optimizer_identity(model, optimizer))
    everyone: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(everyone, mine, group=process_group)
    if problem is not None:
        raise ValueError(problem)
    failed = [r for r, (other, _) in enumerate(everyone) if other is not None]
    if failed:
        raise ValueError(f"rank {failed[0]} of the group refused to {action} this checkpoint "
                         f"(its error: {everyone[failed[0]][0]}); nothing was done on any rank")
    kinds: dict[tuple[str, int, str], list[int]] = {}
    for r, (_, identity) in enumerate(everyone):
        kinds.setdefault(identity, []).append(r)
    if len(kinds) == 1:
        return
    # every rank sees the same kinds: the names, to say where they part, only on this path
    names: list[Any] = [None] * len(everyone)
    dist.all_gather_object(names, _names(model, optimizer), group=process_group)

    def parting(a: list[str], b: list[str]) -> int:
        """The first position where ``a`` and ``b`` differ (the shorter length if none)."""
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)))

    shown = []
    for (cls, count, _), ranks in kinds.items():
        mine = names[ranks[0]]
        at = min(parting(mine, names[other[0]]) for other in kinds.values() if other != ranks)
        where = (f"position {at}: {mine[at]!r}" if at < len(mine) else
                 f"{count} parameter{'' if count == 1 else 's'}")
        shown.append(f"ranks {ranks} a {cls}, {where}")
    raise ValueError(
        f"the ranks that {action} this checkpoint together (ranks of the group) step different "
        f"parameters or optimizers ({'; '.join(shown)}): their optimizer state goes under the "
        f"same keys (optim.state.<position>), one rank's in place of another's. Pass each "
        f"model's group (a pipeline stage's) as process_group, with a directory of its own; "
        f"nothing was done on any rank")


def _check_pair(model: torch.nn.Module, optimizer: Any) -> None:
    """Raise ValueError (on every rank alike: no collective) when ``optimizer`` steps parameters
    ``model`` does not hold: saved, another instance of the model (or one of another size) was
    paired with the optimizer's state in one checkpoint, accepted, and a load then put one
    model's weights next to another's momentum (or failed on shapes, naming the optimizer)."""
    held = {id(p) for p in model.parameters()}
    foreign = [name for group in optimizer.param_groups
               for name, p in zip(group.get("param_names", ()), group["params"], strict=False)
               if id(p) not in held]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise ValueError(
            f"the {type(optimizer).__name__} steps parameters this model does not hold "
            f"({shown}): pass the model the optimizer was built on (build the optimizer after "
            f"fully_shard, which replaces the model's parameters)")

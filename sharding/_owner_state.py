"""Owner-only optimizer state as shards every rank holds alike, and back.

Most optimizer state is elementwise and lives like the parameter (a ``Shard(0)`` DTensor under
FSDP2), which DCP already reshards. Owner-only state (SOAP's factors and eigenbases, NorMuon's
second moment) exists on one rank, and DCP hangs or fails when ranks present different keys.
:func:`export_owner_state` turns every owner-only tensor into a ``Shard(0)`` DTensor scattered
from its owner (0-dim tensors: replicated from it), giving every rank the same keys and a layout
DCP can reshard to any world size; :func:`import_owner_state` gathers each one back in full
(``full_tensor``) and keeps it only on the matrix's owner under the CURRENT plan, which may
differ from the plan it was saved under. Both are collectives: call them on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from optim._checks import is_int

if TYPE_CHECKING:
    from sharding.owner import OwnerSharding

__all__ = ["SHARDS_OF", "export_owner_state", "import_owner_state"]


def _mesh(sharding: OwnerSharding, device: torch.device) -> DeviceMesh:
    group = sharding.group if sharding.group is not None else dist.group.WORLD
    assert group is not None  # OwnerSharding requires an initialized process group
    return DeviceMesh.from_group(group, device_type=device.type)


def _params_by_state_index(optimizer: Any) -> list[torch.Tensor]:
    """The optimizer's parameters in the order of ``state_dict()["state"]``'s indices."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _owners_by_state_index(sharding: OwnerSharding) -> dict[int, int]:
    """``{index in state_dict()["state"]: owner rank}`` for every matrix parameter."""
    plan, index = sharding.global_plan(check=False)  # the layout: checked by the caller
    return {k: plan.owners[index[id(p)]]
            for k, p in enumerate(_params_by_state_index(sharding._optimizer)) if id(p) in index}


def _device(params: list[torch.Tensor]) -> torch.device:
    """Where a small collective of the optimizer's goes: its parameters' device (NCCL serves
    CUDA tensors only), the CPU without any."""
    return params[0].device if params else torch.device("cpu")


def _global_skip_counts(sharding: OwnerSharding, state_dict: dict[str, Any]) -> None:
    """Each matrix's non-finite skip count grows on its owner only, and DCP keeps one rank's
    param groups: take the maximum over ranks (one all-reduce) so the saved counts are whole."""
    groups = [g.get("nonfinite_skips") or {} for g in state_dict["param_groups"]]
    keys = [(gi, name) for gi, counts in enumerate(groups) for name in sorted(counts)]
    if not keys:
        return
    device = next((p.device for g in sharding._optimizer.param_groups for p in g["params"]),
                  torch.device("cpu"))
    values = torch.tensor([groups[gi][name] for gi, name in keys], dtype=torch.int64,
                          device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=sharding.group)
    for (gi, name), value in zip(keys, values.tolist(), strict=True):
        groups[gi][name] = int(value)


#: Top-level key of a rank's ``state_dict()`` that holds shards (DTensors): whose they are,
#: ``{"rank": r, "world_size": w}``, so that a dict loaded on another rank is refused even where
#: the shards' sizes cannot tell (every rank's of the same size). Dropped by
#: :func:`save` (DCP places every shard itself) and ignored by torch's ``load_state_dict``.
SHARDS_OF = "owner_shards"


def export_owner_state(sharding: OwnerSharding, state_dict: dict[str, Any]) -> dict[str, Any]:
    _global_skip_counts(sharding, state_dict)
    keys = sharding._optimizer.owner_state_keys
    if keys:
        _owner_state_to_shards(sharding, state_dict, keys)
    if any(isinstance(v, DTensor) for entry in state_dict["state"].values()
           for v in entry.values()):
        state_dict[SHARDS_OF] = {"rank": sharding.rank, "world_size": sharding.world_size}
    return state_dict


def _owner_state_to_shards(sharding: OwnerSharding, state_dict: dict[str, Any],
                           keys: Any) -> None:
    """Each owner-only state tensor (``keys``) as a ``Shard(0)`` DTensor scattered from its
    owner, in ``state_dict`` (changed in place)."""
    flat = _params_by_state_index(sharding._optimizer)
    sharding.check_layout(_device(flat))  # on every rank, before the owners are trusted
    owners = _owners_by_state_index(sharding)
    # the device TYPE only: a placeholder goes on this rank's own device of that type (the
    # owner's "cuda:1" is another rank's GPU); CPU state (SOAP's step counter) stays on CPU
    mine = {k: {name: (tuple(v.shape), v.dtype, v.device.type)
                for name, v in state_dict["state"].get(k, {}).items() if name in keys}
            for k, owner in owners.items() if owner == sharding.rank}
    gathered: list[Any] = [None] * sharding.world_size
    dist.all_gather_object(gathered, mine, group=sharding.group)
    meta = {k: v for part in gathered for k, v in part.items()}
    for k in sorted(meta):
        # torch's state_dict() shares each parameter's state dict with the live optimizer:
        # copy before replacing entries, or saving would turn live state into DTensors.
        entry = state_dict["state"][k] = dict(state_dict["state"].get(k, {}))
        for name in sorted(meta[k]):
            shape, dtype, device_type = meta[k][name]
            source = entry.get(name) if owners[k] == sharding.rank else None
            if source is None:
                device = torch.device("cpu") if device_type == "cpu" else flat[k].device
                source = torch.empty(shape, dtype=dtype, device=device)
            placement = Shard(0) if len(shape) >= 1 else Replicate()
            entry[name] = distribute_tensor(source, _mesh(sharding, source.device), [placement],
                                            src_data_rank=owners[k])
        state_dict["state"][k] = {name: entry[name] for name in sorted(entry)}
    # The same order on every rank, of the parameters and of each one's keys (an owner's
    # entries had their creation order, the other ranks' were added in sorted order): torch's
    # full-state consolidation walks the state in order with one collective per tensor, and
    # paired the owner's R with another rank's Q_L (wrong values, or a gloo abort where the
    # shapes differ).
    state_dict["state"] = {k: state_dict["state"][k] for k in sorted(state_dict["state"])}


def _params_by_saved_key(optimizer: Any, state_dict: dict[str, Any]) -> dict[Any, torch.Tensor]:
    """``{key in state_dict["state"]: live parameter}``.

    Each saved group's ``params`` are paired with the live group's parameters in order, as
    torch's ``load_state_dict`` pairs them, so the keys may be positions (``state_dict()``) or
    parameter names (``torch.distributed.checkpoint.state_dict.set_state_dict`` passes state
    keyed by FQN, and groups listing FQNs)."""
    return {k: p for saved, live in zip(state_dict["param_groups"], optimizer.param_groups,
                                        strict=True)
            for k, p in zip(saved["params"], live["params"], strict=True)}


def import_owner_state(sharding: OwnerSharding, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict to load (a shallow copy; the caller's is left as it was) with each tensor
    in the layout this rank keeps it in.

    Owner-only state (``Shard(0)`` DTensors from :func:`export_owner_state`, or whole tensors
    from a one-process ``state_dict()``) is kept whole on the matrix's owner under the current
    plan and dropped elsewhere. A whole tensor of a parameter's shape, for a ``Shard(0)``
    DTensor parameter (a one-process state dict: momentum, AdamW moments), becomes a DTensor
    placed like the parameter, each rank cutting its own rows (no communication; every rank
    loads the same dict). Every rank takes the same decisions, and makes the same collectives
    (one ``full_tensor`` per owner-only DTensor) in the same order."""
    _refuse_foreign_shards(sharding, state_dict)
    keys = sharding._optimizer.owner_state_keys
    params = _params_by_saved_key(sharding._optimizer, state_dict)
    if keys:  # owner-only state goes by the plan: checked on every rank first
        sharding.check_layout(_device(_params_by_state_index(sharding._optimizer)))
    plan, index = sharding.global_plan(check=False)
    state = dict(state_dict["state"])
    # sorted by str: the same order on every rank, for integer and for name keys
    for k in sorted(state, key=str):
        p = params.get(k)
        if p is None:
            continue
        owner = plan.owners[index[id(p)]] if id(p) in index else None  # None: AdamW group
        entry = state[k] = dict(state[k])
        for name in sorted(entry):
            value = entry[name]
            if not isinstance(value, torch.Tensor):
                continue
            if owner is not None and name in keys:
                full = value.full_tensor() if isinstance(value, DTensor) else value
                if owner == sharding.rank:
                    entry[name] = full
                else:
                    del entry[name]
            elif isinstance(p, DTensor) and not isinstance(value, DTensor) and \
                    value.ndim > 0 and value.shape == p.shape:
                entry[name] = distribute_tensor(value.to(p.to_local().device), p.device_mesh,
                                                p.placements, src_data_rank=None)
    return {**state_dict, "state": state}


def _own_shard_shape(t: DTensor) -> tuple[int, ...] | None:
    """The local shape this rank's shard of ``t`` has under ``t``'s placements (``Shard``
    splits as ``torch.chunk`` does), or None when this rank is not in ``t``'s mesh. The
    position is looked up in the mesh's ranks: a mesh unpickled on another rank than the one
    that pickled it reports that rank's ``get_coordinate()``."""
    where = (t.device_mesh.mesh == dist.get_rank()).nonzero()
    if where.numel() == 0:
        return None
    coordinate = where[0].tolist()
    shape = list(t.shape)
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            rows, parts = shape[placement.dim], t.device_mesh.size(mesh_dim)
            chunk = -(-rows // parts)
            shape[placement.dim] = max(0, min(chunk, rows - coordinate[mesh_dim] * chunk))
    return tuple(shape)


def _foreign_shard(key: Any, name: str, value: DTensor) -> str | None:
    """Why ``value`` (state ``name`` of parameter ``key``) is not this rank's shard, or None."""
    own = _own_shard_shape(value)
    if own is None:
        return (f"state {name!r} of parameter {key!r} is sharded over ranks "
                f"{value.device_mesh.mesh.flatten().tolist()}, without this one: the dict was "
                f"saved at another world size")
    if tuple(value.to_local().shape) != own:
        return (f"state {name!r} of parameter {key!r} holds a shard of shape "
                f"{tuple(value.to_local().shape)}, not this rank's {own}: the dict is another "
                f"rank's")
    return None


def _foreign_stamp(sharding: OwnerSharding, stamp: Any) -> str | None:
    """Why a dict whose :data:`SHARDS_OF` is ``stamp`` (None: not stamped) is not this rank's,
    or None."""
    if stamp is None:
        return None
    if not (isinstance(stamp, dict) and is_int(stamp.get("rank"))
            and is_int(stamp.get("world_size"))):
        return (f"its {SHARDS_OF!r} is {stamp!r}, not the {{'rank': r, 'world_size': w}} a "
                f"rank's state_dict() writes")
    rank, world = stamp["rank"], stamp["world_size"]
    if world != sharding.world_size:
        return (f"it holds the shards of rank {rank} of {world} ranks: the dict was saved at "
                f"another world size")
    if rank != sharding.rank:
        return f"it holds the shards of rank {rank}: the dict is another rank's"
    return None


def _refuse_foreign_shards(sharding: OwnerSharding, state_dict: dict[str, Any]) -> None:
    """Raise ValueError on every rank of the sharding group when some rank's state dict holds
    DTensors that are not its own shards: a dict saved over ranks without it, or one rank's
    dict (``torch.save`` on rank 0) loaded on every rank, whose shards the others took as
    theirs (``full_tensor`` assembled rank 0's rows twice, or failed in a collective). Shards
    of even size cannot tell: the dict's :data:`SHARDS_OF` names its rank. One
    ``all_gather_object``."""
    problem = _foreign_stamp(sharding, state_dict.get(SHARDS_OF)) or next(
        (why for k in sorted(state_dict["state"], key=str)
         for name, value in sorted(state_dict["state"][k].items())
         if isinstance(value, DTensor) and (why := _foreign_shard(k, name, value)) is not None),
        None)
    everyone: list[Any] = [None] * sharding.world_size
    dist.all_gather_object(everyone, problem, group=sharding.group)
    refused = [(r, why) for r, why in enumerate(everyone) if why is not None]
    if refused:
        r, why = refused[0]
        raise ValueError(
            f"cannot load this state dict on rank {r}{' and others' if len(refused) > 1 else ''}"
            f": {why}. Under OwnerSharding each rank's state_dict() holds its own shards: save "
            f"through sharding.checkpoint (which reshards), or each rank's dict for the same "
            f"rank at the same world size")

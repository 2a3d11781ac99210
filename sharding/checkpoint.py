"""Checkpoints of owner-sharded optimizers through torch.distributed.checkpoint (DCP).

Most optimizer state is elementwise and lives like the parameter (a ``Shard(0)`` DTensor under
FSDP2), which DCP already reshards. Owner-only state (SOAP's factors and eigenbases, NorMuon's
second moment) exists on one rank, and DCP hangs or fails when ranks present different keys. So
``state_dict()`` turns every owner-only tensor into a ``Shard(0)`` DTensor scattered from its
owner (0-dim tensors: replicated from it), giving every rank the same keys and a layout DCP can
reshard to any world size; ``load_state_dict()`` gathers each one back in full (``full_tensor``)
and keeps it only on the matrix's owner under the CURRENT plan, which may differ from the plan
it was saved under. Both are collectives: call them on every rank, as DCP does.

:func:`save` and :func:`load` wrap the usual ``{"model": ..., "optim": ...}`` round trip.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    CheckpointException,
    FileSystemReader,
    FileSystemWriter,
    TensorStorageMetadata,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from optim._checks import is_int

if TYPE_CHECKING:
    from sharding.owner import OwnerSharding

__all__ = ["SHARDS_OF", "export_owner_state", "import_owner_state", "load", "save"]


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


def _failure(exc: CheckpointException, fragment: str) -> str | None:
    """The first of a DCP failure's per-rank errors whose message contains ``fragment``."""
    return next((str(error) for error, _ in exc.failures.values() if fragment in str(error)),
                None)


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
    from sharding.owner import OwnerSharding  # (owner imports this module)

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


def _check_ranks_agree(model: torch.nn.Module, optimizer: Any,
                       process_group: dist.ProcessGroup | None, action: str) -> None:
    """Raise ValueError on every rank of ``process_group`` when any of them pairs the optimizer
    with a model that does not hold its parameters (:func:`_check_pair`), or when its ranks do
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


def save(directory: str | Path, model: torch.nn.Module, optimizer: Any,
         extra: dict[str, Any] | None = None, *,
         process_group: dist.ProcessGroup | None = None) -> None:
    """Save model and optimizer with DCP into a NEW directory (collective on every rank of
    ``process_group``).

    ``process_group``: the ranks that save this model together (None: the default group, every
    rank). Pipeline stages, or any part of the world training a model of its own, pass their
    own group (the one their ``OwnerSharding`` and ``fully_shard`` mesh use) and save each to a
    directory of its own: over the default group one stage saving alone would wait for ranks
    that never call ``save``, and stages saving together into one directory would write the
    same keys (the optimizer's state is keyed by position, ``optim.state.0``), which is refused.

    Raises:
        FileExistsError: on every rank, when ``directory`` already holds a checkpoint, which is
            left as it was. DCP would overwrite it file by file, and a crash midway would leave
            the old metadata over a mix of old and new data. DCP itself refuses (its planning
            is collective, so every rank learns it together; a check of our own could see
            different filesystems on different nodes and leave some ranks in the collective).
        ValueError: on every rank, when the optimizer steps parameters the model does not hold
            (another instance of the model) on any rank, or ``process_group`` leaves out this
            rank or a rank of the optimizer's sharding group, or its ranks step different
            parameters or optimizer classes (pipeline stages sharing a directory); nothing is
            written.
        RuntimeError: when DCP fails to write (the ranks it failed on and the first error).
    """
    _check_ranks_agree(model, optimizer, process_group, "save")
    # State every parameter will have, as :func:`load`'s template asks for it: a checkpoint taken
    # before the first step, or while a matrix has had no gradient yet, would otherwise lack
    # entries and be refused on load. The zeros it creates are what a first step creates.
    optimizer.init_state()
    optim = optimizer.state_dict()
    optim.pop(SHARDS_OF, None)  # each rank's own: DCP places the shards by their DTensors
    state = {"model": model.state_dict(), "optim": optim, **(extra or {})}
    try:
        dcp.save(state, storage_writer=FileSystemWriter(str(directory), overwrite=False),
                 process_group=process_group)
    except CheckpointException as exc:
        if _failure(exc, "already exists") is not None:
            raise FileExistsError(
                f"{directory} already holds a checkpoint; save each checkpoint to a new "
                f"directory (e.g. step-000100), then point to it (orthoshard.train writes "
                f"LATEST last).") from None
        # a failed write (a full disk): an Exception, as callers catch (DCP's is a
        # BaseException); the directory may hold part of the checkpoint
        raise RuntimeError(_failed("save", directory, exc) + _space_left(directory)
                           + ". The directory may hold part of it: do not load it.") from exc


#: Free bytes under which a failed save's message suggests a full disk.
_LOW_SPACE_BYTES = 64 << 20


def _space_left(directory: str | Path) -> str:
    """A note on the free space where ``directory`` is, when little is left: torch's zip
    writer turns a full disk into "unexpected pos 704 vs 598", which names no cause ("" when
    there is room, or it cannot tell)."""
    import shutil

    for where in (Path(directory), *Path(directory).parents):
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            continue
        if free >= _LOW_SPACE_BYTES:
            return ""
        return f" (its filesystem has {free} bytes free: a full disk?)"
    return ""


def _failed(action: str, directory: str | Path, exc: CheckpointException) -> str:
    """What DCP could not ``action`` (save, load), on which ranks, and each distinct error with
    its type (a file cut short raises an ``EOFError`` whose message is empty)."""
    errors: dict[str, list[int]] = {}
    for rank, failure in sorted(exc.failures.items()):
        error = failure[0]
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        errors.setdefault(text, []).append(rank)
    described = "; ".join(f"{text} (ranks {ranks})" if len(errors) > 1 else text
                          for text, ranks in errors.items())
    return (f"torch.distributed.checkpoint could not {action} {directory} on ranks "
            f"{sorted(exc.failures)}: {described}")


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


def _dcp_load(state: dict[str, Any], directory: str | Path, optimizer: Any, *,
              process_group: dist.ProcessGroup | None, partial: bool = False) -> None:
    """``dcp.load`` in place. A checkpoint without an entry asked for, or of other shapes,
    raises ValueError (DCP finds both while planning, before it reads anything); any other
    failure a RuntimeError (DCP's own ``CheckpointException`` is a BaseException, which
    ``except Exception`` does not catch), which says so when ``partial`` (``state`` holds the
    live model's and optimizer's own tensors, which a failed read can leave half written)."""
    try:
        dcp.load(state, checkpoint_id=str(directory), process_group=process_group)
    except CheckpointException as exc:
        # DCP plans the load collectively, so every rank sees the same missing key, before
        # any data is read; its message alone ("Missing key ...: optim.state.0.L") does not
        # say that the optimizer is the mismatch
        missing = _failure(exc, "Missing key in checkpoint state_dict: optim.")
        if missing is not None:
            raise ValueError(
                f"{directory} does not hold this {type(optimizer).__name__}'s state "
                f"({missing}): it was saved by another optimizer or for other parameters. "
                f"Load it with the optimizer that saved it, or load the model alone "
                f"(torch.distributed.checkpoint) and start this optimizer afresh.") from None
        # also planned collectively, before any data is read; DCP raises it as a
        # CheckpointException, a BaseException that `except Exception` does not catch
        mismatch = _failure(exc, "Size mismatch between saved")
        if mismatch is not None:
            what = "the model"
            if " for optim." in mismatch:
                what = "this optimizer's state" + (
                    " (SOAP's factors follow max_precond_dim: a side above it stores none)"
                    if "max_precond_dim" in getattr(optimizer, "defaults", {}) else "")
            raise ValueError(
                f"{directory} was saved for other shapes than {what} ({mismatch}): load it "
                f"into the model and optimizer settings that saved it.") from None
        missing = _failure(exc, "Missing key in checkpoint state_dict: ")
        if missing is not None:
            if "state_dict: model." in missing:
                raise ValueError(_lacks_model_entries(directory, [missing])) from None
            raise ValueError(f"{directory} lacks an entry ({missing}): it was saved without an "
                             f"entry asked for with `extra`. Nothing was loaded.") from None
        # anything else (a file unreadable or cut short): an Exception, as callers catch
        raise RuntimeError(_failed("load", directory, exc) + (
            ". The model and optimizer may hold part of it: load a complete checkpoint into "
            "them, or start afresh." if partial else "")) from exc


def _lacks_model_entries(directory: str | Path, missing: list[str]) -> str:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"{directory} lacks an entry ({shown}): it was saved for another model (a parameter "
            f"or buffer added or renamed since): load it into the model that saved it. Nothing "
            f"was loaded.")


def _read_metadata(directory: str | Path) -> Any:
    """The checkpoint's DCP metadata, or None where it cannot be read here (not a DCP
    checkpoint): ``dcp.load`` then says what it finds."""
    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception:
        return None


def _model_entries_missing(metadata: Any, model: torch.nn.Module) -> list[str]:
    """The entries of ``model.state_dict()`` that the checkpoint does not hold (a parameter or
    buffer added or renamed since it was saved), as ``model.<name>``; none where its metadata
    does not say (``metadata`` None, or saved without DCP's flattening)."""
    paths = getattr(metadata, "planner_data", None)
    if not isinstance(paths, dict):
        return []
    saved = {path[1] for path in paths.values() if len(path) >= 2 and path[0] == "model"}
    return [f"model.{name}" for name in model.state_dict() if name not in saved]


def _saved_groups(metadata: Any, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A template of the checkpoint's own param groups, for DCP to fill: every key its metadata
    lists under ``optim.param_groups``, nested as saved (``nonfinite_skips`` by name), whether
    the live groups have it or not. An LR scheduler's ``initial_lr`` saved with it is loaded, and
    a key the checkpoint lacks (a scheduler made before the load; an older checkpoint without
    ``nonfinite_skips``) is not asked for: ``load_state_dict`` takes it from the live group.
    Without readable metadata (not a DCP checkpoint, or saved without DCP's flattening), the
    live groups' keys, and ``dcp.load`` says what it finds."""
    paths = getattr(metadata, "planner_data", None)  # {flat key: its path in the saved dict}
    if not isinstance(paths, dict):
        return copy.deepcopy(live)
    groups: dict[int, dict[str, Any]] = {}
    for fqn, path in paths.items():
        if tuple(path[:2]) != ("optim", "param_groups") or len(path) < 4:
            continue
        node = groups.setdefault(path[2], {})
        for key in path[3:-1]:
            node = node.setdefault(key, {})
        item = metadata.state_dict_metadata.get(fqn)
        node[path[-1]] = (torch.empty(item.size, dtype=item.properties.dtype)
                          if isinstance(item, TensorStorageMetadata) else None)
    return [groups.get(gi, {}) for gi in range(max(groups, default=-1) + 1)]


def _keyed_as_saved(state: dict[Any, Any], live: list[dict[str, Any]],
                    saved: list[dict[str, Any]]) -> dict[Any, Any]:
    """``state`` (keyed by the live state dict's positions) keyed by the checkpoint's position of
    each parameter, where the checkpoint lists the live names in another order (within a group,
    or the groups themselves): DCP fills ``optim.state.<position>`` from the checkpoint's same
    position, which held another parameter's state (refused as a shape mismatch where the
    shapes differ), and ``load_state_dict`` then pairs the groups and positions by name.
    Checkpoints under the same order or under other names keep the keys."""
    where_live, where_saved = _positions(live), _positions(saved)
    if (where_live is None or where_saved is None or where_live.keys() != where_saved.keys()
            or where_live == where_saved):
        return state  # check_state_dict says what does not fit
    return {where_saved[name]: state[position] for name, position in where_live.items()
            if position in state}


def _positions(groups: list[dict[str, Any]]) -> dict[str, int] | None:
    """Each parameter's state-dict position by name, over all ``groups``; None where a group
    does not pair its names with int positions one to one, or a name repeats."""
    out: dict[str, int] = {}
    for group in groups:
        names, positions = group.get("param_names"), group.get("params")
        if not (isinstance(names, list) and isinstance(positions, list)
                and len(names) == len(positions) and all(isinstance(n, str) for n in names)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in positions)):
            return None
        out.update(zip(names, positions, strict=True))
    if len(out) != sum(len(group["param_names"]) for group in groups):
        return None
    return out


def load(directory: str | Path, model: torch.nn.Module, optimizer: Any,
         extra: dict[str, Any] | None = None, *,
         process_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Load what :func:`save` wrote, at any world size (collective on every rank of
    ``process_group``: None, the default group; a pipeline stage's group, as for :func:`save`).

    ``extra`` is a template of additional entries (filled in place and returned).

    DCP writes into the model's and the optimizer's own tensors (their state dicts share them),
    so the checkpoint's param groups are read and checked first
    (``optimizer.check_state_dict``): a refused checkpoint leaves model and optimizer as they
    were. The groups keep the keys they were saved with (an LR scheduler's ``initial_lr``), and
    a key they lack takes the live group's value, as with ``load_state_dict``. Shapes need no
    such step: DCP refuses a size mismatch while planning, before it reads.

    Raises:
        ValueError: on every rank, when the optimizer steps parameters the model does not hold,
            or the checkpoint lacks state this optimizer needs (it was
            saved by another optimizer class, or for other parameters), or its param groups
            do not fit this optimizer's (another algorithm, hyperparameters it cannot use,
            another split of the parameters), or lacks an entry of the model or of ``extra``,
            or ``process_group`` leaves out this rank or a rank of the optimizer's sharding
            group, or its ranks step different parameters or optimizer classes; nothing is
            loaded.
        RuntimeError: when DCP fails to read (a file unreadable or cut short); the model and
            optimizer may then hold part of the checkpoint.
    """
    _check_ranks_agree(model, optimizer, process_group, "load")
    optimizer.init_state()
    optim_state = optimizer.state_dict()
    # the groups alone first: a few small objects, and a collective plan every rank shares,
    # so every rank refuses together; their template holds the checkpoint's keys (the live
    # groups stay as they are), and check_state_dict completes them from the live groups
    metadata = _read_metadata(directory)
    groups = {"optim": {"param_groups": _saved_groups(metadata, optim_state["param_groups"])}}
    _dcp_load(groups, directory, optimizer, process_group=process_group)
    # each live tensor where the checkpoint keeps its parameter's state: the checkpoint's
    # position of that name, when its group lists the same names in another order
    optim_state["state"] = _keyed_as_saved(optim_state["state"], optim_state["param_groups"],
                                           groups["optim"]["param_groups"])
    optim_state["param_groups"] = groups["optim"]["param_groups"]
    try:
        optimizer.check_state_dict(optim_state)
    except ValueError as exc:
        # a parameter added to the model and the optimizer alike shows first as a group of
        # another size: name the model's entries the checkpoint lacks, as DCP's own check
        # names one the optimizer does not step. Every rank refuses either way (the groups
        # were read collectively), so a rank that cannot read the metadata only words it less.
        missing = _model_entries_missing(metadata, model)
        if missing:
            raise ValueError(_lacks_model_entries(directory, missing)) from None
        raise ValueError(f"{directory} cannot be loaded into this "
                         f"{type(optimizer).__name__} (nothing was loaded): {exc}") from None
    # then the tensors, into the model's and the optimizer's own
    state = {"model": model.state_dict(), "optim": {"state": optim_state["state"]},
             **(extra or {})}
    _dcp_load(state, directory, optimizer, process_group=process_group, partial=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(optim_state)
    return {k: v for k, v in state.items() if k not in ("model", "optim")}

"""How a rank holds a matrix parameter: the placements OwnerSharding accepts and the rows it
expects of each rank (``torch.chunk`` over dim 0, as FSDP2's ``fully_shard`` lays them out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from optim._exchange import MatrixItem, local
from sharding.plan import Plan


def is_sharded(param: Tensor, group: dist.ProcessGroup | None, world_size: int,
               meshes_checked: dict[tuple[int, int], Any]) -> bool:
    """Whether ``param`` is row-sharded over ``group`` (False: replicated, a plain tensor).

    A DTensor must be ``Shard(0)`` over one mesh dimension (FSDP2's ``fully_shard``) and
    ``Replicate()`` over any others (HSDP's replica dimension: every replica holds the same
    shards and gradients, so each runs the same exchange within its shard group).
    ``meshes_checked`` remembers the meshes whose ranks were checked (:func:`check_mesh_ranks`).

    Raises:
        ValueError: any other placement, or a mesh dimension that is not the group's.
    """
    if not isinstance(param, DTensor):
        return False
    placements = tuple(param.placements)
    shard_dims = [d for d, pl in enumerate(placements) if pl == Shard(0)]
    if len(shard_dims) != 1 or not all(isinstance(pl, Replicate) for d, pl in
                                       enumerate(placements) if d != shard_dims[0]):
        raise ValueError(
            f"OwnerSharding supports DTensor parameters sharded Shard(0) over one mesh "
            f"dimension (FSDP2 fully_shard) and replicated over any others (HSDP), got "
            f"mesh {param.device_mesh} and placements {param.placements}")
    mesh, dim = param.device_mesh, shard_dims[0]
    if mesh.size(dim) != world_size:
        raise ValueError(
            f"parameter mesh has {mesh.size(dim)} ranks along its Shard(0) dimension but the "
            f"OwnerSharding group has {world_size}; pass the FSDP shard group as "
            f"OwnerSharding(group=mesh.get_group(<shard dimension>))")
    if (id(mesh), dim) not in meshes_checked:
        check_mesh_ranks(mesh, dim, group)
        meshes_checked[(id(mesh), dim)] = mesh  # kept alive, so its id is not reused
    return True


def check_mesh_ranks(mesh: Any, dim: int, group: dist.ProcessGroup | None) -> None:
    """Shard ``i`` of a parameter must live on group rank ``i``: the exchange assembles a
    matrix from its shards in group rank order. A mesh of the right size over other ranks
    (another group of a 2-D layout) or in another order would assemble another matrix."""
    # the ranks along the Shard(0) dimension through this rank
    coordinate = mesh.get_coordinate()
    assert coordinate is not None  # a parameter on this rank: the rank is in its mesh
    index = tuple(slice(None) if d == dim else c for d, c in enumerate(coordinate))
    mesh_ranks = mesh.mesh[index].flatten().tolist()
    group_ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if mesh_ranks != group_ranks:
        raise ValueError(
            f"parameter mesh holds global ranks {mesh_ranks} along its Shard(0) dimension "
            f"but the OwnerSharding group holds {group_ranks} in that order: shard i must "
            f"live on group rank i. Pass that dimension's group as "
            f"OwnerSharding(group=mesh.get_group(<shard dimension>)), and build the mesh "
            f"with its ranks in ascending order (init_device_mesh does).")


def local_rows_problem(items: Sequence[MatrixItem], plan: Plan, rank: int) -> ValueError | None:
    """The error for the first of ``items`` whose rows on ``rank`` are not the plan's, if any."""
    for i, item in enumerate(items):
        rows = local(item.param).shape[0]
        if rows != plan.rows_of(i, rank):
            return ValueError(
                f"{item.name}: this rank holds {rows} rows, the plan expects "
                f"{plan.rows_of(i, rank)} (torch.chunk row sharding over dim 0)")
    return None

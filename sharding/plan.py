"""Pure planning arithmetic for owner sharding: who owns which matrix, who holds which rows.

Nothing here touches a process group, so all of it is unit-tested in one process, including
FSDP2's uneven and empty shards.

Row shards follow ``torch.chunk`` semantics, as FSDP2's ``Shard(0)`` does: with ``m`` rows over
``W`` ranks each rank gets ``c = ceil(m / W)`` rows, the last non-empty rank fewer, and ranks
past ``ceil(m / c)`` an EMPTY ``(0, n)`` shard (7 rows over 4 ranks: 2, 2, 2, 1; 2 rows over 4
ranks: 1, 1, 0, 0).

Ownership is a longest-processing-time greedy on the matrix-update cost: matrices sorted by cost
(ties by index), each to the currently least-loaded rank (ties to the lowest rank). LPT is
within 4/3 of the optimal makespan and, unlike padding groups with zero matrices, wastes no
bytes. Every rank computes the same plan from the same shapes: no communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Plan", "assign_owners", "build_plan", "load_balance", "row_bounds"]


def row_bounds(rows: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each rank's rows of a ``rows``-row matrix (torch.chunk)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    chunk = math.ceil(rows / world_size) if rows else 0
    bounds = []
    for r in range(world_size):
        start = min(r * chunk, rows)
        bounds.append((start, min(start + chunk, rows)))
    return bounds


def assign_owners(costs: Sequence[float], world_size: int,
                  fixed: Sequence[int | None] = ()) -> list[int]:
    """Owner rank of each item by longest-processing-time greedy (deterministic).

    ``fixed``: owners kept as they are, item by item (matrices whose state already exists must
    not move it: their owner holds it); ``fixed[i]`` for the first ``len(fixed)`` items, None
    where item ``i`` has none yet. The others are placed greedily on top of them.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(fixed) > len(costs) or any(o is not None and not 0 <= o < world_size for o in fixed):
        raise ValueError(f"fixed owners {list(fixed)} do not fit {len(costs)} items over "
                         f"{world_size} ranks")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    free = list(range(len(fixed), len(costs)))
    for i, rank in enumerate(fixed):
        if rank is None:
            free.append(i)
        else:
            owners[i] = rank
            loads[rank] += costs[i]
    for i in sorted(free, key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def load_balance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> float:
    """max / mean of the per-rank cost (1.0 is perfect)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    for c, o in zip(costs, owners, strict=True):
        loads[o] += c
    mean = sum(loads) / world_size
    return max(loads) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class Plan:
    """Owner and row bounds of every matrix of one step, identical on every rank.

    ``sharded[i]`` says whether matrix i is row-sharded (FSDP2) or replicated (every rank holds
    it whole). ``bounds[i][r]`` are rank r's rows of a sharded matrix.
    """

    world_size: int
    shapes: tuple[tuple[int, int], ...]
    sharded: tuple[bool, ...]
    owners: tuple[int, ...]
    bounds: tuple[tuple[tuple[int, int], ...], ...]

    def subset(self, indices: Sequence[int]) -> Plan:
        """The plan restricted to some matrices (those with a gradient this step), in order."""
        return Plan(self.world_size, tuple(self.shapes[i] for i in indices),
                    tuple(self.sharded[i] for i in indices),
                    tuple(self.owners[i] for i in indices), tuple(self.bounds[i] for i in indices))

    def rows_of(self, i: int, rank: int) -> int:
        start, end = self.bounds[i][rank]
        return end - start

    def owned_by(self, rank: int) -> list[int]:
        return [i for i, o in enumerate(self.owners) if o == rank]

    def elements_sent(self, rank: int) -> int:
        """Elements ``rank`` sends to other ranks in one step (both exchanges)."""
        total = 0
        for i, ((m, n), owner) in enumerate(zip(self.shapes, self.owners, strict=True)):
            if self.sharded[i]:
                if owner != rank:  # gather: my rows go to the owner
                    total += self.rows_of(i, rank) * n
                else:  # scatter: every other rank's rows go back
                    total += (m - self.rows_of(i, rank)) * n
            elif owner == rank:  # replicated: the owner's result goes to everyone else
                total += (self.world_size - 1) * m * n
        return total

    def elements_received(self, rank: int) -> int:
        """Elements ``rank`` receives from other ranks in one step (both exchanges)."""
        total = 0
        for i, ((m, n), owner) in enumerate(zip(self.shapes, self.owners, strict=True)):
            if self.sharded[i]:
                total += (m - self.rows_of(i, rank)) * n if owner == rank \
                    else self.rows_of(i, rank) * n
            elif owner != rank:
                total += m * n
        return total


def build_plan(shapes: Sequence[tuple[int, int]], sharded: Sequence[bool],
               costs: Sequence[float], world_size: int,
               fixed_owners: Sequence[int | None] = ()) -> Plan:
    """The plan for matrices of these global shapes, placement and update costs; matrices with
    an owner in ``fixed_owners`` keep it (:func:`assign_owners`)."""
    if not len(shapes) == len(sharded) == len(costs):
        raise ValueError("shapes, sharded and costs must have one entry per matrix")
    owners = assign_owners(costs, world_size, fixed_owners)
    bounds = tuple(
        tuple(row_bounds(m, world_size)) if s else tuple((0, m) for _ in range(world_size))
        for (m, _), s in zip(shapes, sharded, strict=True))
    return Plan(world_size, tuple(tuple(s) for s in shapes), tuple(sharded),  # type: ignore[misc]
                tuple(owners), bounds)

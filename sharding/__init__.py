"""orthoshard.sharding: the torch.distributed layer (owner-rank full-matrix updates, DCP)."""

from sharding.owner import OwnerSharding
from sharding.plan import Plan, assign_owners, build_plan, load_balance, row_bounds

__all__ = ["OwnerSharding", "Plan", "assign_owners", "build_plan", "load_balance", "row_bounds"]

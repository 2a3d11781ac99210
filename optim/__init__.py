"""orthoshard.optim: the math. Pure torch; never imports torch.distributed or the service."""

from optim import health
from optim._matmul import count_matmuls
from optim.muon import Muon, NorMuon
from optim.orthogonalize import orthogonalize
from optim.params import split_param_groups

__all__ = ["Muon", "NorMuon", "count_matmuls", "health", "orthogonalize", "split_param_groups"]

"""orthoshard.optim: the math. Pure torch; never imports torch.distributed or the service."""

from optim import health
from optim._matmul import count_matmuls
from optim.orthogonalize import orthogonalize

__all__ = ["count_matmuls", "health", "orthogonalize"]

"""Matrix-product counting shared by the kernels.

Benchmarks and tests report accuracy against the number of matrix products a kernel really
performed, not the number its docstring promises. Every kernel routes its products through
:func:`mm`, :func:`addmm` or :func:`count`, and :func:`count_matmuls` reads the tally.

The counter is a :class:`contextvars.ContextVar`, so concurrent threads (the publisher, a data
loader) never see each other's counts, and the cost outside a counting block is one lookup.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MatmulCount", "addmm", "count", "count_matmuls", "mm"]


@dataclass
class MatmulCount:
    """Number of (batched) matrix products performed inside a :func:`count_matmuls` block."""

    products: int = 0


_ACTIVE: contextvars.ContextVar[MatmulCount | None] = contextvars.ContextVar(
    "orthoshard_matmul_count", default=None
)


@contextlib.contextmanager
def count_matmuls() -> Iterator[MatmulCount]:
    """Count the matrix products kernels perform inside the block (nested blocks both count)."""
    counter = MatmulCount()
    outer = _ACTIVE.get()
    token = _ACTIVE.set(counter)
    try:
        yield counter
    finally:
        _ACTIVE.reset(token)
        if outer is not None:
            outer.products += counter.products


def count(n: int = 1) -> None:
    """Record ``n`` matrix products done by a call that is not :func:`mm` (a solve, say)."""
    counter = _ACTIVE.get()
    if counter is not None:
        counter.products += n


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D or batched 3-D operands, counted as one product."""
    count()
    return a @ b


def addmm(c: Tensor, a: Tensor, b: Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``beta * c + alpha * (a @ b)`` fused (``addmm`` / ``baddbmm``), counted as one product.

    The 2-D case calls ``torch.addmm`` exactly as ``torch.optim.Muon`` does, so the quintic kernel
    reproduces it bit for bit; the batched case calls ``torch.baddbmm``.
    """
    count()
    if a.ndim == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(c.flatten(0, -3), a.flatten(0, -3), b.flatten(0, -3), beta=beta, alpha=alpha).unflatten(0, a.shape[:-2])  # noqa: E501

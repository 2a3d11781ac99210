"""What bench/sharding.py measures ours against: the naive way of sharded Muon and SOAP (every
rank gathers every matrix with ``full_tensor()`` and does all the work), and the counter of each
rank's collective traffic (the byte conventions are in bench/sharding.py's docstring)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommCounter", "NaiveMuon", "NaiveSOAP", "nbytes"]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class NaiveMuon:
    """Every rank gathers every update input (``full_tensor()``) and runs Muon on all of it.

    Momentum stays sharded (elementwise, as ours); the orthogonalization is the same kernel and
    arguments as ``optim.Muon``'s defaults, batched over same-shape matrices, stacked straight
    into bfloat16 with each gathered input dropped once copied (as ``optim.Muon`` stacks: the
    memory compared is the gather's, not a wasteful stack's); each rank keeps its own rows of
    every result.
    """

    def __init__(self, params: list[Any], *, lr: float, momentum: float = 0.95,
                 weight_decay: float = 0.1, eps: float = 1e-7, ns_steps: int = 5) -> None:
        self.params = params
        self.lr, self.momentum, self.wd, self.eps, self.ns_steps = \
            lr, momentum, weight_decay, eps, ns_steps
        self.bufs = [torch.zeros_like(p.to_local()) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        from optim.muon import adjusted_lr
        from optim.orthogonalize import JORDAN_QUINTIC, orthogonalize
        from sharding.plan import row_bounds

        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        fulls: list[torch.Tensor | None] = []
        for i, (p, buf) in enumerate(zip(self.params, self.bufs, strict=True)):
            g = p.grad.to_local()
            buf.lerp_(g, 1 - self.momentum)
            x = g.lerp(buf, self.momentum)  # nesterov
            dx = DTensor.from_local(x, p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())
            fulls.append(dx.full_tensor())
            by_shape[tuple(p.shape)].append(i)
        rank, world = dist.get_rank(), dist.get_world_size()
        for shape, idx in by_shape.items():
            X = torch.empty((len(idx), *shape), dtype=torch.bfloat16)
            for j, i in enumerate(idx):
                X[j].copy_(fulls[i])
                fulls[i] = None
            O = orthogonalize(X, method="quintic", steps=self.ns_steps, eps=self.eps,
                              coefficients=JORDAN_QUINTIC)
            start, end = row_bounds(shape[0], world)[rank]
            for i, o in zip(idx, O.unbind(0), strict=True):
                p_local = self.params[i].to_local()
                p_local.mul_(1 - self.lr * self.wd)
                p_local.add_(o[start:end].to(p_local.dtype),
                             alpha=-adjusted_lr(self.lr, None, shape))


class NaiveSOAP:
    """Every rank gathers every gradient and runs a single-process SOAP on full copies."""

    def __init__(self, params: list[Any], **kwargs: Any) -> None:
        from optim.soap import SOAP

        self.params = params
        self.shadow = [torch.nn.Parameter(p.full_tensor().detach().clone()) for p in params]
        self.opt = SOAP(self.shadow, **kwargs)

    @torch.no_grad()
    def step(self) -> None:
        from sharding.plan import row_bounds

        for p, s in zip(self.params, self.shadow, strict=True):
            s.grad = p.grad.full_tensor()
        self.opt.step()
        rank, world = dist.get_rank(), dist.get_world_size()
        for p, s in zip(self.params, self.shadow, strict=True):
            start, end = row_bounds(p.shape[0], world)[rank]
            p.to_local().copy_(s[start:end])


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row (along dim 0) of ``t``: also of a tensor with no rows."""
    return t.element_size() * math.prod(t.shape[1:])


def _others(splits: list[int], t: torch.Tensor, world: int, me: int) -> int:
    """Rows an all-to-all moves to (or from) the other ranks: by its split sizes, or, given
    none (an even split), ``t``'s rows over the world."""
    if not splits:
        return (world - 1) * (t.shape[0] // world)
    return sum(s for r, s in enumerate(splits) if r != me)


class CommCounter(TorchDispatchMode):
    """Counts this rank's collective traffic (conventions in bench/sharding.py's docstring)."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.sent = self.received = 0
        self.calls: dict[str, int] = defaultdict(int)

    def _add(self, sent: float, received: float | None = None) -> None:
        self.sent += int(sent)
        self.received += int(sent if received is None else received)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor desugar into plain ops and collectives first (as CommDebugMode does).
            return NotImplemented
        ns, name = func.namespace, func.__name__.split(".")[0]
        if ns in ("_c10d_functional", "c10d_functional", "c10d") and name not in (
                "wait_tensor", "barrier", "monitored_barrier", "_wrap_tensor_autograd"):
            self.calls[f"{ns}.{name}"] += 1
            self._count(ns, name, args)
        return func(*args, **kwargs)

    def _count(self, ns: str, name: str, args: tuple) -> None:
        w, me = self.world, dist.get_rank()
        if ns == "c10d" and name == "alltoall_base_":  # (out, in, pg, out_splits, in_splits, ...)
            out, inp, _, out_splits, in_splits = args[:5]
            self._add(_others(in_splits, inp, w, me) * _row_bytes(inp),
                      _others(out_splits, out, w, me) * _row_bytes(out))
        elif name == "all_to_all_single":  # functional: (in, out_splits, in_splits, group)
            inp, out_splits, in_splits = args[:3]
            # (no output tensor here; an even split receives as many rows as it sends)
            self._add(_others(in_splits, inp, w, me) * _row_bytes(inp),
                      _others(out_splits, inp, w, me) * _row_bytes(inp))
        elif name in ("all_gather_into_tensor", "_allgather_base_"):
            inp = args[0] if ns != "c10d" else args[1]
            self._add((w - 1) * nbytes(inp))
        elif name == "all_reduce":
            self._add(2 * (w - 1) / w * nbytes(args[0]))
        elif name == "allreduce_":
            self._add(2 * (w - 1) / w * sum(nbytes(t) for t in args[0]))
        elif name in ("reduce_scatter_tensor", "_reduce_scatter_base_"):
            inp = args[0] if ns != "c10d" else args[1]
            self._add((w - 1) / w * nbytes(inp))
        else:
            self.calls[f"UNCOUNTED {ns}.{name}"] += 1

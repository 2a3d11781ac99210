"""Run a function on W gloo ranks (processes forked from a preloaded server) with a hard timeout.

Collectives that mismatch hang rather than fail, so every multi-process test goes through
:func:`run_ranks`, which kills the whole group and fails the test when the deadline passes.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

__all__ = ["init_gloo", "run_ranks"]

# Ranks start from a fork server that has imported these once, not as fresh interpreters: a
# spawned rank spent ~2-3 s of CPU importing torch, which was most of a short test's time on
# two cores. The server itself only imports (one thread, measured; no tensor op runs in it),
# so what it forks is what a fresh interpreter would be after the same imports. A rank inherits
# the server's environment as it was when the server started (the first run_ranks), not the
# test's at the call: pass what a rank needs as an argument, not an environment variable.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor",
            "torch.distributed.checkpoint", "optim", "sharding", "_sharding_workers"]
multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)


def init_gloo(rank: int, world_size: int, store: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # As orthoshard.train: gloo's eager full-mesh connect at init is the one step seen to hang
    # or refuse connections on this machine; lazy pair connection changes no result.
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)


def _entry(rank: int, fn: Callable[..., None], world_size: int, store: str, args: tuple) -> None:
    # A rank that dies on a signal (a C++ abort in a collective) prints its Python stack to the
    # stderr the test captures, instead of only "terminated with signal SIGABRT".
    faulthandler.enable()
    init_gloo(rank, world_size, store)
    import torch.distributed as dist

    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without interpreter finalization. About 1 run in 40 aborted
    # AFTER the last Python frame ("terminate called without an active exception", faulthandler:
    # "<no Python frame>"), in a C++ destructor of torch's process-group machinery; every result
    # is already written. A failure above still raises and is reported as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., None], world_size: int, tmp: Path, *args: Any,
              timeout: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise on error/timeout."""
    store = tmp / f"store-{world_size}-{time.monotonic_ns()}"
    ctx = mp.start_processes(_entry, args=(fn, world_size, str(store), args),
                             nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks did not finish in {timeout:.0f} s "
                                   "(a mismatched collective hangs): killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

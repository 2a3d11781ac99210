"""Every rank of a training job starts it, or every rank refuses it, saying why.

A rank that refused its command line alone (a bad argument, a checkpoint its ``--resume``
cannot take, an ``--out`` it cannot write) used to exit before the process group existed, or
after it, with only rank 0 saying why: the other ranks, another node's, waited in
``init_process_group`` or in the checkpoint's collectives, without a word, until the group
timed out. Ranks started with different training arguments (a node's ``--d-model`` or
``--optimizer`` edited alone) failed in a collective on mismatched sizes, or hung.

So every rank joins the group first and :func:`job_problem` gathers, in one
``all_gather_object``, each rank's refusal and the arguments every rank must share
(:data:`SHARED`); every rank then refuses together, and the first local rank of each node
says why (:func:`refuse`), so each node's log names the cause.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch.distributed as dist

__all__ = ["SHARED", "job_problem", "refuse"]

#: The arguments every rank of one job must be given alike: they choose the model, the data,
#: the optimizer, the steps, the checkpoints and the spike, and ranks that differ in them fail
#: in a collective (sizes that do not match), wait in one another rank never enters (a
#: checkpoint saved or loaded by some ranks only), or train another run than they report.
#: Paths, the sidecar and the progress display are each node's own.
SHARED = ("optimizer", "kl_shampoo", "steps", "d_model", "layers", "seed", "batch_size",
          "replicas", "checkpoint_every", "resume", "spike_at", "spike_scale")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _ranks(ranks: list[int], world: int) -> str:
    return "every rank" if len(ranks) == world else f"rank{'s' * (len(ranks) > 1)} " + \
        ", ".join(map(str, ranks))


def job_problem(args: argparse.Namespace | None, problem: str | None) -> str | None:
    """Why this job cannot start on some rank (None: every rank starts it); the same answer on
    every rank. ``args``: this rank's arguments (None where they did not parse); ``problem``:
    this rank's own refusal. A collective of the default group: call it on every rank."""
    shared = None if args is None else {name: getattr(args, name) for name in SHARED}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (problem, shared))
    world = len(everyone)
    refused: dict[str, list[int]] = {}
    for rank, (theirs, _) in enumerate(everyone):
        if theirs is not None:
            refused.setdefault(theirs, []).append(rank)
    if refused:
        return "; ".join(why if len(refused) == 1 and len(ranks) == world
                         else f"{_ranks(ranks, world)}: {why}" for why, ranks in refused.items())
    differ = []
    for name in SHARED:
        values: dict[str, list[int]] = {}
        for rank, (_, theirs) in enumerate(everyone):
            values.setdefault(repr(theirs[name]), []).append(rank)
        if len(values) > 1:
            differ.append(f"{_flag(name)} " + ", ".join(
                f"{value} on {_ranks(ranks, world)}" for value, ranks in values.items()))
    if differ:
        return (f"the ranks of this job were started with different arguments "
                f"({'; '.join(differ)}): start every node with the same training arguments")
    return None


def refuse(problem: str) -> int:
    """Say ``problem`` on the first local rank of each node (every node's log names it), once
    every rank knows it, and return the exit status 2. The ranks wait for the sayers (one
    barrier): the launcher stops a node's other ranks once one exits, which could cut the
    message off."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"orthoshard.train: {problem}; nothing ran on any rank", file=sys.stderr,
              flush=True)
    dist.barrier()
    return 2

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

Some refusals hold only on torchrun's first attempt of the group, others only on a restarted
one (:func:`orthoshard.train_args._check_checkpoints`). torchrun counts a restart only on the
node whose rank failed; a node restarted along with it reads 0, and took the restarted group
for a first attempt (it refused the run's own checkpoints as another run's). The gather
carries each rank's count too, and the group is restarted when any rank's count is above 0.

A job that writes its checkpoint directory holds it (:func:`hold_checkpoint_dir`, on global
rank 0, before the group exists): another job's hold there refuses this one in the same gather,
before it writes anything in the directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from typing import Any

import torch.distributed as dist

from orthoshard.checkpoints import hold_directory, write_whole, writes_directory
from orthoshard.train_args import (
    attempt,
    keep_restart_refusal,
    launch_mark,
    publishes,
    refused_before,
)

__all__ = ["SHARED", "job_problem", "own_problem", "refuse"]

#: The arguments every rank of one job must be given alike: they choose the model, the data,
#: the optimizer, the steps, the checkpoints and the spike, and ranks that differ in them fail
#: in a collective (sizes that do not match), wait in one another rank never enters (a
#: checkpoint saved or loaded by some ranks only), or train another run than they report.
#: Paths, the sidecar and the progress display are each node's own.
SHARED = ("optimizer", "kl_shampoo", "steps", "d_model", "layers", "seed", "batch_size",
          "replicas", "checkpoint_every", "resume", "spike_at", "spike_scale")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _ranks(ranks: list[int], world: int, hosts: list[str]) -> str:
    """``ranks`` named for a log, with their hosts: torchrun's c10d rendezvous numbers the
    nodes in the order they arrive, not by ``--node-rank``."""
    if len(ranks) == world:
        return "every rank"
    on = sorted({hosts[r] for r in ranks})
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} (on {', '.join(on)})"


def own_problem(args: argparse.Namespace | None, problem: str | None, *,
                restarted: bool) -> str | None:
    """This rank's refusal on the group's first attempt (``restarted`` False) or on a
    restarted one: ``problem`` (its arguments') or one that holds on that attempt only. On a
    first attempt the refusal of another run's checkpoints comes first: the checks of the
    resume it would have made follow from it."""
    if args is None:
        return problem
    if args.busy_refusal is not None:  # another job's directory: nothing else of it is ours
        return args.busy_refusal
    if restarted:
        return problem or args.restarted_refusal
    return args.restart_refusal or problem or args.resume_refusal


def job_problem(args: argparse.Namespace | None, problem: str | None) -> str | None:
    """Why this job cannot start on some rank (None: every rank starts it); the same answer on
    every rank. ``args``: this rank's arguments (None where they did not parse); ``problem``:
    this rank's own refusal. On the group's first attempt it also keeps (or clears) this
    rank's refusal of another run's checkpoints for the attempts after it. A collective of the
    default group: call it on every rank."""
    shared = None if args is None else {
        **{_flag(name): getattr(args, name) for name in SHARED},
        # each node reads its own --checkpoint-dir: a resume must find the same checkpoint
        "the checkpoint --resume continues": args.resumes_from}
    mine = (own_problem(args, problem, restarted=False),
            own_problem(args, problem, restarted=True), shared, attempt(), socket.gethostname(),
            args is not None and publishes(args),
            args is not None and args.busy_refusal is not None)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    restarted = any(entry[3] > 0 for entry in everyone)
    hosts = [entry[4] for entry in everyone]
    # another job trains in the checkpoint directory (rank 0 holds no lock on it): this job
    # keeps nothing there, where a REFUSED file it wrote made that job's next restart refuse
    # itself
    busy = any(entry[6] for entry in everyone)
    if args is not None:
        args.restarted = restarted  # the group's, for what the job does on a first attempt only
        # a node publishing to its sidecar while another does not: the run id every rank
        # publishes and checkpoints under is drawn and broadcast if any rank needs it
        args.any_publishes = any(entry[5] for entry in everyone)
    if args is not None and not restarted and not busy:
        keep_restart_refusal(args)
    if busy and not restarted and os.environ.get("LOCAL_RANK", "0") == "0":
        _keep_busy_refusal(next(entry[0] for entry in everyone if entry[6]))
    world = len(everyone)
    refused: dict[str, list[int]] = {}
    for rank, (first, later, *_) in enumerate(everyone):
        theirs = later if restarted else first
        if theirs is not None:
            refused.setdefault(theirs, []).append(rank)
    if refused:
        return "; ".join(why if len(refused) == 1 and len(ranks) == world
                         else f"{_ranks(ranks, world, hosts)}: {why}"
                         for why, ranks in refused.items())
    differ = []
    for name in everyone[0][2]:
        values: dict[str, list[int]] = {}
        for rank, (_, _, theirs, *_) in enumerate(everyone):
            values.setdefault(repr(theirs[name]), []).append(rank)
        if len(values) > 1:
            differ.append(f"{name} " + ", ".join(
                f"{value} on {_ranks(ranks, world, hosts)}" for value, ranks in values.items()))
    if differ:
        return (f"the ranks of this job were started with different arguments "
                f"({'; '.join(differ)}): start every node with the same training arguments")
    return None


def hold_checkpoint_dir(args: argparse.Namespace | None) -> tuple[int | None, str | None]:
    """On the job's first rank, lock the checkpoint directory the job writes, whatever else
    refuses the job (:func:`orthoshard.checkpoints.hold_directory`): another job's lock sets
    ``args.busy_refusal``, which refuses this job before anything else and keeps it from
    writing there. The lock's descriptor, and why the lock file is not usable (a refusal after
    the others: an unwritable directory is named by them first)."""
    if args is None:
        return None, None
    mark = launch_mark()
    if mark is not None and (kept := refused_before(mark)) is not None:
        args.busy_refusal = kept  # this launch was refused at its first attempt
        return None, None
    if args.checkpoint_dir is None or os.environ.get("RANK", "0") != "0" \
            or not args.checkpoint_dir.is_dir() or not writes_directory(
                args.checkpoint_dir, resume=args.resume, every=args.checkpoint_every):
        return None, None
    held, args.busy_refusal, error = hold_directory(args.checkpoint_dir)
    return held, error


def _keep_busy_refusal(why: str) -> None:
    """Keep the refusal of a checkpoint directory another job trains in for the attempts
    torchrun restarts (:func:`orthoshard.train_args.launch_mark`, on each node): once that
    job's lock is gone (it ended, or is between its own attempts), a restart of this launch
    resumed that job's checkpoints and trained on in its directory."""
    if (mark := launch_mark()) is not None:
        with contextlib.suppress(OSError):  # unwritable: a later attempt may train
            write_whole(mark, why)


def refuse(problem: str) -> int:
    """Say ``problem`` on the first local rank of each node (every node's log names it), once
    every rank knows it, and return the exit status 2. The ranks wait for the sayers (one
    barrier): the launcher stops a node's other ranks once one exits, which could cut the
    message off."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"orthoshard.train: {problem}; no rank started training", file=sys.stderr,
              flush=True)
    dist.barrier()
    return 2

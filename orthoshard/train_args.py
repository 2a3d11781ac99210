"""The training job's command line (:func:`parse_args`), and what torchrun tells it of its
restarts."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import NoReturn

from orthoshard.arguments import argument_problem, restart_problem
from orthoshard.checkpoints import (
    REFUSED_FILE,
    Checkpoints,
    spike_problem,
    write_whole,
    writes_directory,
)
from orthoshard.model import GPTConfig

__all__ = ["OPTIMIZERS", "attempt", "keep_restart_refusal", "parse_args", "parse_job_args",
           "publishes"]

DESCRIPTION = ("The training job, one process per rank under torchrun: "
               "``torchrun ... -m orthoshard.train``.")
OPTIMIZERS = ("muon", "normuon", "soap")
#: the largest --seed (and the most negative, negated): MarkovData seeds each batch's generator
#: with ``seed * 1_000_003 + step * 4_099 + rank``, which must stay a 64-bit integer (a seed past
#: ~9.2e12 failed in every rank's first batch, after the model was built); 1e12 leaves the step
#: term room for 2e15 steps
MAX_SEED = 10**12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments, checked before any process group: a mistake exits with argparse's
    usage line and status 2 (one process; under a launcher :func:`parse_job_args`)."""
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    return args


def parse_job_args(argv: list[str] | None = None
                   ) -> tuple[argparse.Namespace | None, str | None]:
    """:func:`parse_args` for a rank under a launcher: ``(args, problem)``, where ``problem``
    says why this rank refuses (``args`` None where they did not parse) instead of exiting, so
    the rank can join the process group and every rank refuse together
    (:mod:`orthoshard.agreement`). ``--help`` still prints and exits."""
    p = _parser(defer=True)
    try:
        args = p.parse_args(argv)
    except _Refused as exc:
        return None, str(exc)
    try:
        _check(p, args)
    except _Refused as exc:
        return args, str(exc)
    return args, None


class _Refused(Exception):
    """A command line :class:`_Parser` refused, when it defers its errors."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors, when ``defer`` is set, raise :class:`_Refused` instead
    of printing the usage and exiting."""

    defer = False

    def error(self, message: str) -> NoReturn:
        if self.defer:
            raise _Refused(message)
        super().error(message)


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_numbers(p, args)
    _check_sidecar(p, args)
    _check_checkpoints(p, args)


def _parser(*, defer: bool = False) -> argparse.ArgumentParser:
    p = _Parser(prog="orthoshard.train", description=DESCRIPTION)
    p.defer = defer
    p.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="muon",
                   help="hidden-matrix optimizer (default: Muon, softened by a schedule)")
    p.add_argument("--kl-shampoo", action="store_true", help="SOAP: KL-Shampoo factors")
    p.add_argument("--spike-at", type=int, default=None,
                   help="add a rank-1 spike to every hidden matrix's gradient of this step "
                        "(counted from 1, as the logs number steps)")
    p.add_argument("--spike-scale", type=float, default=30.0,
                   help="spike Frobenius norm as a multiple of the gradient's")
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="directory for loss.jsonl, health-rank*.jsonl, rank*.json and "
                        "final_params.pt (default ./out)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="directory for DCP checkpoints, LATEST and the run id (RUN_ID)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a checkpoint every N steps and at the last (0: never; needs "
                        "--checkpoint-dir)")
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="K",
                   help="after each save, remove this run's older checkpoints but the newest K "
                        "(0, the default: keep every one)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint-dir's LATEST checkpoint (a new run if there is "
                        "none)")
    p.add_argument("--sidecar-url", default=None, metavar="URL",
                   help="publish health snapshots to the node's sidecar at URL "
                        "(e.g. http://127.0.0.1:9400)")
    p.add_argument("--sidecar-uds", default=None, metavar="PATH",
                   help="publish health snapshots to the sidecar's Unix socket PATH")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the sidecar's bearer token (the file its --token-file "
                        "reads)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per rank per step (default 16)")
    p.add_argument("--d-model", type=int, default=64,
                   help="model width, a multiple of the attention heads (default 64)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--replicas", type=int, default=1,
                   help="HSDP: this many replicas, each sharding the model over WORLD/replicas "
                        "consecutive ranks (e.g. the nodes; 1: FSDP over all ranks)")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="sleep this long after each step (to watch a short run live)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="rank 0 draws a progress bar (default on)")
    p.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="rank 0 prints the step and loss every N steps, a line each (for logs "
                        "without a terminal, with --no-progress; 0: never)")
    # what the checks and orthoshard.agreement decide, present also where a check refused
    # before its own (see _check_checkpoints)
    p.set_defaults(restart_guarded=False, restart_refusal=None, restarted_refusal=None,
                   resume_refusal=None, resumes_from=None, restarted=False, any_publishes=False,
                   busy_refusal=None)
    return p


def _check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = argument_problem(args)
    if problem is not None:
        p.error(problem)
    for name in ("batch_size", "d_model", "layers", "replicas"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not -MAX_SEED <= args.seed <= MAX_SEED:  # the data's generator seeds are derived from it
        p.error(f"--seed must be an integer in [-{MAX_SEED}, {MAX_SEED}], got {args.seed}")
    if args.keep_checkpoints < 0:
        p.error(f"--keep-checkpoints must be >= 0 (0: keep every checkpoint), got "
                f"{args.keep_checkpoints}")
    if args.keep_checkpoints and not args.checkpoint_every:
        p.error("--keep-checkpoints needs --checkpoint-every N (this run saves no checkpoint)")
    if args.log_every < 0:
        p.error(f"--log-every must be >= 0 (0: no step lines), got {args.log_every}")
    # checked here, on every rank before any process group, rather than failing in each rank
    # once the model is built or the first snapshot is due
    if args.d_model % GPTConfig.n_heads:
        p.error(f"--d-model {args.d_model} must be a multiple of the model's "
                f"{GPTConfig.n_heads} attention heads")
    if not 0 < args.spike_scale < math.inf:
        p.error(f"--spike-scale must be a finite number > 0 (the spike's Frobenius norm as a "
                f"multiple of the gradient's), got {args.spike_scale}")


def _check_sidecar(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.sidecar_url is not None:
        from service.targets import url_problem  # the Publisher's own check (imports httpx)

        if (problem := url_problem(args.sidecar_url)) is not None:
            p.error(f"--sidecar-url {problem}")
    if args.sidecar_uds is not None:
        from service.targets import uds_problem

        if (problem := uds_problem(args.sidecar_uds)) is not None:
            p.error(f"--sidecar-uds {problem}")
    if args.checkpoint_every or publishes(args):
        from service.targets import environment_run_id, run_id_problem

        # the id _run_id takes from the environment, checked as the sidecar will (it is also
        # kept with each checkpoint, which a later resume publishes under)
        given = environment_run_id(torchrun=args.checkpoint_dir is None)
        if given is not None and (problem := run_id_problem(given)) is not None:
            source = ("ORTHOSHARD_RUN_ID" if os.environ.get("ORTHOSHARD_RUN_ID")
                      else "torchrun's run id (--rdzv-id)")
            p.error(f"{source} {problem}")
    if (args.sidecar_url is not None or args.sidecar_uds is not None) and args.token_file is None:
        p.error("--sidecar-url / --sidecar-uds need --token-file: the sidecar refuses snapshots "
                "without its bearer token (the file its --token-file reads)")
    if args.token_file is not None:
        from service.settings import read_token_file  # the sidecar's own check of the file

        try:
            read_token_file(args.token_file)
        except ValueError as exc:
            p.error(f"--token-file: {exc}")


def _check_checkpoints(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--checkpoint-dir`` writable, a restarted group resuming, and ``--resume``'s
    ``LATEST`` saved by this optimizer (before a spike it would then replay).

    What depends on whether the group is torchrun's first attempt or a restarted one is left
    in ``args`` for :mod:`orthoshard.agreement`, which decides it over every rank: torchrun
    counts a restart only on the node whose rank failed (``TORCHELASTIC_RESTART_COUNT``), and
    another node's ranks, restarted with it, read 0. ``args.restart_refusal``: a first
    attempt's refusal of another run's checkpoints, kept in :data:`REFUSED_FILE` for the
    attempts after it; ``args.restarted_refusal``: a restarted group's refusal, from that file;
    ``args.resume_refusal``: a first attempt's refusal of the ``--resume`` it was given;
    ``args.resumes_from``: the name of the checkpoint a resume continues (every rank must find
    the same one)."""
    resume_given = args.resume
    args.restart_guarded = bool(args.checkpoint_every and not args.resume and _restartable())
    if args.restart_guarded:
        args.restart_refusal, args.restarted_refusal = _restart_refusals(args.checkpoint_dir)
        args.resume = True  # a restarted group resumes where the last checkpoint was
    if args.checkpoint_dir is not None and writes_directory(
            args.checkpoint_dir, resume=args.resume, every=args.checkpoint_every):
        try:  # before the sidecar's first snapshot or a rank's traceback from the run id
            Checkpoints(args.checkpoint_dir).check_writable()
        except OSError as exc:
            p.error(str(exc))
    if args.resume:
        from orthoshard.checkpoints import checkpoint_step, optimizer_mismatch

        try:
            latest = Checkpoints(args.checkpoint_dir).latest()
        except OSError as exc:  # LATEST names no checkpoint: said once, not by every rank
            p.error(str(exc))
        args.resumes_from = None if latest is None else latest.name
        if latest is not None and (problem := optimizer_mismatch(
                latest, args.optimizer, args.kl_shampoo)) is not None:
            p.error(problem)
        if latest is not None and (step := checkpoint_step(latest)) is not None and \
                step > args.steps:
            p.error(f"--resume: the checkpoint in {args.checkpoint_dir} is at step {step}, past "
                    f"--steps {args.steps}: pass a --steps larger than {step} to train on")
        # (a first attempt the user resumed; a restarted attempt resumes past a spike that
        # already happened, as it should)
        if latest is not None and resume_given:
            args.resume_refusal = spike_problem(latest, args.spike_at)


def _restart_refusals(checkpoint_dir: Path) -> tuple[str | None, str | None]:
    """Under ``--max-restarts`` without ``--resume``: ``(first, restarted)``, the refusals of
    the group's first attempt and of a restarted one. A first attempt refuses a
    ``checkpoint_dir`` holding another run's checkpoints (``LATEST``), which a restarted
    attempt would resume; torchrun restarts the group that the refusal stopped, and that
    attempt cannot tell another run's ``LATEST`` from its own first attempt's, so the refusal
    is kept in the directory (:data:`REFUSED_FILE`, by :func:`keep_restart_refusal`) and read
    back by the attempts after it."""
    refused = checkpoint_dir / REFUSED_FILE
    return (restart_problem(checkpoint_dir, resume=False, restarts=True),
            refused_before(refused))


def refused_before(kept: Path) -> str | None:
    """The refusal of this launch's first attempt that ``kept`` holds, said for a restarted
    attempt; None without one."""
    if not kept.is_file():
        return None
    return (f"{kept.read_text().strip()} (refused at this launch's first attempt; torchrun "
            f"restarted the group)")


def keep_restart_refusal(args: argparse.Namespace) -> None:
    """On the group's first attempt, keep this rank's refusal of another run's checkpoints in
    :data:`REFUSED_FILE` for the attempts after it, or remove one an earlier launch left."""
    if not args.restart_guarded:
        return
    refused = args.checkpoint_dir / REFUSED_FILE
    with contextlib.suppress(OSError):  # unwritable: every attempt refuses it anyway
        if args.restart_refusal is not None:
            write_whole(refused, args.restart_refusal)
        else:
            refused.unlink(missing_ok=True)


def launch_mark() -> Path | None:
    """Under torchrun with restarts, a node-local file that names this launch: its agent (the
    ranks' parent process) by pid and start time, which the attempts it restarts share and no
    other launch has. Where a launch refused at its first attempt (another job trained in its
    checkpoint directory) keeps that refusal for the attempts after it: kept in the directory,
    as the other refusals are, it made the other job's restarts refuse themselves. None
    without restarts (the parent may be a shell that starts other runs)."""
    if not _restartable():
        return None
    parent = os.getppid()
    try:  # the start time: field 22 of /proc/PID/stat, counted after the command's ")"
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return Path(tempfile.gettempdir()) / f"orthoshard-refused-{parent}-{started}"


def _restartable() -> bool:
    """Whether torchrun restarts this group when a rank fails (``--max-restarts`` > 0)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0


def attempt() -> int:
    """This node's count of its group's restarts under torchrun: 0 first, then 1, 2, ...
    after each restart of a failure of one of its own ranks (a node restarted with another
    node's failure keeps its count: :mod:`orthoshard.agreement` takes the largest)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def publishes(args: argparse.Namespace) -> bool:
    """Whether this run publishes its health to a sidecar."""
    return args.sidecar_url is not None or args.sidecar_uds is not None

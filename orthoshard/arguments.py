"""The checks of the arguments ``orthoshard demo`` hands to ``orthoshard.train``, shared by
both. Torch-free: the demo refuses bad arguments and starts its sidecar without importing torch,
which took ~2.5 s of its start-up before."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["argument_problem", "restart_problem"]


def argument_problem(args: argparse.Namespace) -> str | None:
    """What makes the arguments the demo shares with ``orthoshard.train`` unusable (None: they
    are fine); both refuse them before starting anything."""
    if args.steps < 1:
        return "--steps must be >= 1"
    if (args.checkpoint_every or args.resume) and args.checkpoint_dir is None:
        return "--checkpoint-every and --resume need --checkpoint-dir"
    if args.checkpoint_dir is not None and not args.checkpoint_every and not args.resume:
        return ("--checkpoint-dir without --checkpoint-every N would write no checkpoint; "
                "pass --checkpoint-every (or --resume to continue the run there)")
    if args.checkpoint_every < 0 or not 0 <= args.step_delay < math.inf:
        return "--checkpoint-every and --step-delay must be >= 0 (and finite)"
    if args.checkpoint_dir is not None and args.checkpoint_dir.exists() \
            and not args.checkpoint_dir.is_dir():
        return f"--checkpoint-dir {args.checkpoint_dir} is not a directory"
    if args.kl_shampoo and args.optimizer != "soap":
        return "--kl-shampoo applies to --optimizer soap"
    if args.spike_at is not None and not 0 <= args.spike_at < args.steps:
        return (f"--spike-at must be a step in [0, --steps={args.steps}) (0-based), got "
                f"{args.spike_at}")
    return None


def restart_problem(checkpoint_dir: Path | None, *, resume: bool, restarts: bool) -> str | None:
    """What stops a first attempt under ``--max-restarts`` (``restarts``) without ``--resume``
    (None: nothing): a restarted group resumes from ``LATEST``, and with another run's there,
    a rank dying before this run's first checkpoint would continue that run."""
    if restarts and not resume and checkpoint_dir is not None \
            and (checkpoint_dir / "LATEST").exists():
        return (f"--checkpoint-dir {checkpoint_dir} holds a run's checkpoints (LATEST), which "
                f"a restart (--max-restarts) would resume from: pass --resume to continue that "
                f"run, or an empty --checkpoint-dir for a new one")
    return None

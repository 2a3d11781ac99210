"""The checks of the arguments ``orthoshard demo`` hands to ``orthoshard.train``, shared by
both. Torch-free: the demo refuses bad arguments and starts its sidecar without importing torch,
which took ~2.5 s of its start-up before."""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

__all__ = ["MAX_SLEEP_S", "argument_problem", "directory_problem", "probe_writable",
           "restart_problem"]

#: The longest pause the demo and train take on request (``--step-delay``, ``--linger``): ~31
#: years, under the platform's limit of ``time.sleep`` (a larger one raised OverflowError after
#: the run had trained, and turned it into a failed one).
MAX_SLEEP_S = 1e9


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
    if args.checkpoint_every < 0:
        return f"--checkpoint-every must be >= 0 (0: no checkpoints), got {args.checkpoint_every}"
    if not 0 <= args.step_delay <= MAX_SLEEP_S:
        return f"--step-delay must be >= 0 seconds and at most {MAX_SLEEP_S:g}, got " \
            f"{args.step_delay}"
    if args.checkpoint_dir is not None and args.checkpoint_dir.exists() \
            and not args.checkpoint_dir.is_dir():
        return f"--checkpoint-dir {args.checkpoint_dir} is not a directory"
    if args.kl_shampoo and args.optimizer != "soap":
        return "--kl-shampoo applies to --optimizer soap"
    if args.spike_at is not None and not 1 <= args.spike_at <= args.steps:
        return (f"--spike-at must be a step in [1, --steps={args.steps}] (steps count from 1, "
                f"as the logs, the plot and the sidecar number them), got {args.spike_at}")
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


#: What the writability probe writes: a block of most filesystems.
_PROBE_BYTES = 4096


def probe_writable(directory: Path) -> None:
    """Write a file of :data:`_PROBE_BYTES` in ``directory``, sync it and remove it; raises the
    ``OSError`` of what failed. Some bytes, synced: an empty file takes no data block, and
    passed on a full disk. The name is this process's alone: every rank may probe at once
    (ranks on other hosts sharing the directory may have the same pid)."""
    probe = directory / f".write-test-{uuid.uuid4().hex}"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


def directory_problem(path: Path, option: str) -> str | None:
    """Create the directory ``path`` and prove it writable now, rather than at its first write
    after minutes of work (None: it is); what is wrong, named by ``option``, otherwise. Every
    rank may call it at once: the probe's name is this process's alone (ranks on other hosts
    sharing the directory may have the same pid)."""
    if path.exists() and not path.is_dir():
        return f"{option} {path} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe_writable(path)
    except OSError as exc:
        return (f"{option} {path} is not writable ({exc}): fix its permissions or pass "
                f"another directory")
    return None

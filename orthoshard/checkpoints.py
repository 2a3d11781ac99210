"""The training job's checkpoint directory: ``DIR/step-NNNNNN`` DCP checkpoints, never
overwritten, and ``DIR/LATEST`` naming the one in force, written last and atomically (a crash
mid-save leaves the previous checkpoint in force). Saving and loading are collectives over the
job's ranks (:mod:`sharding.checkpoint`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["HORIZON_KEY", "Checkpoints", "write_whole"]


def write_whole(path: Path, text: str) -> None:
    """Write ``path`` so that a reader sees the old text or the new, never a part: through
    ``path.tmp`` and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


#: the checkpoint entry holding the run's softening schedule length (its first --steps): a
#: resume with another --steps keeps the schedule the checkpoint was trained with
HORIZON_KEY = "softening_steps"


class Checkpoints:
    """``DIR/step-NNNNNN`` DCP directories plus a ``DIR/LATEST`` pointer written last."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory

    def latest(self) -> Path | None:
        """The checkpoint ``LATEST`` names, or None without one.

        Raises:
            FileNotFoundError: ``LATEST`` is empty or names a directory that is not there (a
                checkpoint deleted or not copied along): resuming from another one, or from
                nothing, would silently train a different run.
        """
        if self.dir is None or not (self.dir / "LATEST").exists():
            return None
        name = (self.dir / "LATEST").read_text().strip()
        path = self.dir / name
        if not name or not path.is_dir():
            raise FileNotFoundError(
                f"{self.dir / 'LATEST'} names {name!r}, which is not a checkpoint directory "
                f"in {self.dir}: restore it, point LATEST at an existing step-NNNNNN "
                f"directory, or remove LATEST to start from step 0")
        return path

    def save(self, model: torch.nn.Module, optimizer: Any, step: int, horizon: int) -> None:
        """Save at ``step``; ``horizon``: the run's softening schedule length (its --steps)."""
        from sharding import checkpoint

        assert self.dir is not None
        path = self._fresh(step)
        checkpoint.save(path, model, optimizer, extra={"progress": torch.tensor(step),
                                                       HORIZON_KEY: torch.tensor(horizon)})
        dist.barrier()
        if dist.get_rank() == 0:
            write_whole(self.dir / "LATEST", path.name)
        dist.barrier()

    def _fresh(self, step: int) -> Path:
        """``step-NNNNNN``, or ``step-NNNNNN.K`` (the first free K) when that directory exists:
        left by an earlier run in this directory, or by an attempt that died after writing it
        but before LATEST. Checkpoints are never overwritten (checkpoint.save refuses); rank 0
        picks the name and every rank uses it."""
        assert self.dir is not None
        name: list[str | None] = [None]
        if dist.get_rank() == 0:
            base = candidate = f"step-{step:06d}"
            k = 0
            while (self.dir / candidate).exists():
                k += 1
                candidate = f"{base}.{k}"
            name[0] = candidate
        dist.broadcast_object_list(name, src=0)
        assert name[0] is not None
        return self.dir / name[0]

    def load(self, model: torch.nn.Module, optimizer: Any) -> int:
        from torch.distributed.checkpoint.api import CheckpointException

        from sharding import checkpoint

        path = self.latest()
        if path is None:
            return 0
        try:
            extra = checkpoint.load(path, model, optimizer, extra={"progress": torch.tensor(0)})
        except ValueError:
            raise  # refused: another optimizer, model or flags (the message says which)
        except (Exception, CheckpointException) as exc:  # a file missing, cut short, unreadable
            # (DCP's CheckpointException is a BaseException)
            earlier = sorted(p.name for p in self.dir.glob("step-*") if p != path) \
                if self.dir is not None else []
            exc.add_note(f"orthoshard.train: {path}, which {self.dir}/LATEST names, could not "
                         f"be read. If its save was cut short, point LATEST at an earlier "
                         f"complete checkpoint ({', '.join(earlier) or 'there is none'}), or "
                         f"remove LATEST to start from step 0.")
            raise
        return int(extra["progress"])

    def horizon(self) -> int | None:
        """The softening schedule's length saved with the latest checkpoint (None without a
        checkpoint, or one saved before it was recorded). Each rank reads it alone."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        path = self.latest()
        if path is None:
            return None
        box = {HORIZON_KEY: torch.tensor(0)}
        try:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            if HORIZON_KEY not in saved:
                return None
            with warnings.catch_warnings():  # "assuming the intent is to load in one process"
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(box, checkpoint_id=str(path), no_dist=True)
        except (Exception, CheckpointException):
            return None  # unreadable: load(), which comes next, raises and says what to do
        return int(box[HORIZON_KEY])

    def check_writable(self) -> None:
        """Create the directory and prove it writable now, not at the first save after
        ``--checkpoint-every`` steps of work (every rank: each writes its own files)."""
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        probe = self.dir / f".write-test-{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise OSError(f"--checkpoint-dir {self.dir} is not writable ({exc}): fix its "
                          f"permissions or pass another directory") from exc

"""The training job's checkpoint directory: ``DIR/step-NNNNNN`` DCP checkpoints, never
overwritten, and ``DIR/LATEST`` naming the one in force, written last and atomically (a crash
mid-save leaves the previous checkpoint in force). Saving and loading are collectives over the
job's ranks (:mod:`sharding.checkpoint`)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orthoshard.arguments import directory_problem

__all__ = ["HORIZON_KEY", "JOB_LOCK_FILE", "REFUSED_FILE", "RUN_ID_FILE", "RUN_KEYS",
           "Checkpoints", "checkpoint_step", "complete_before", "hold_directory",
           "optimizer_mismatch", "spike_problem",
           "write_whole", "writes_directory"]

#: in a checkpoint directory: the run id drawn for a run torchrun gave no id of its own
RUN_ID_FILE = "RUN_ID"
#: the prefix a checkpoint being removed (:meth:`Checkpoints.prune`) is renamed to
_REMOVING = ".removing-"


def checkpoint_step(path: Path) -> int | None:
    """The step a ``step-NNNNNN`` (or ``step-NNNNNN.K``) checkpoint directory was saved at
    (None for another name)."""
    order = _save_order(path)
    return order[0] if order is not None else None


def _save_order(path: Path) -> tuple[int, int] | None:
    """``(step, K)`` of ``step-NNNNNN.K`` (K 0 without a suffix): the order of the saves, a
    ``.K`` being the same step saved again later (:meth:`Checkpoints._fresh`)."""
    match = re.fullmatch(r"step-(\d+)(?:\.(\d+))?", path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def complete_before(directory: Path, path: Path) -> list[str]:
    """The checkpoints in ``directory`` saved before ``path``, of its run and whole, newest
    first: where LATEST can go back to. Complete: DCP writes a checkpoint's ``.metadata``
    last. Of its run: the one ``path`` keeps (:data:`RUN_ID_FILE`), when it keeps one; another
    run's checkpoint in the same directory, offered first, continued that run instead. Whole:
    no :func:`checkpoint_damage` (a save cut short after its ``.metadata``, a copy not
    finished)."""
    order, run = _save_order(path), _run_id_of(path)
    found = [(o, p) for p in directory.glob("step-*")
             if (o := _save_order(p)) is not None and (order is None or o < order)
             and (p / ".metadata").is_file()
             and (run is None or _run_id_of(p) in (run, None))]
    return [p.name for _, p in sorted(found, reverse=True) if checkpoint_damage(p) is None]


def checkpoint_damage(path: Path) -> str | None:
    """What a reader can see is wrong with the checkpoint ``path`` without loading it: its
    ``.metadata`` missing or unreadable, or a data file it lists missing or shorter than the
    bytes it keeps there (a save cut short, a copy not finished). None: every file is there at
    its full length, so a load that failed there failed for another reason (a rank lost while
    loading, damaged bytes)."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # DCP raises its own errors, and pickle's
        return f"its .metadata cannot be read ({type(exc).__name__}: {exc})"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if isinstance(name, str):
            end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
            ends[name] = max(ends.get(name, 0), end)
    if not ends:  # nothing this check can read: no claim that the files are whole
        return "its .metadata lists no data file this check can read"
    for name, end in sorted(ends.items()):
        try:
            size = (path / name).stat().st_size
        except OSError:
            return f"{name}, which its .metadata lists, is missing"
        if size < end:
            return f"{name} is cut short ({size} bytes, its .metadata lists {end})"
    return None


def _run_id_of(path: Path) -> str | None:
    """The run id kept in the checkpoint ``path`` (:data:`RUN_ID_FILE`), None without one."""
    try:
        return (path / RUN_ID_FILE).read_text().strip()
    except OSError:
        return None


def writes_directory(directory: Path, *, resume: bool, every: int) -> bool:
    """Whether a run with these flags writes to its checkpoint ``directory``: checkpoints every
    ``every`` steps, or the run id it keeps there (:data:`RUN_ID_FILE`), which a run writes
    unless it resumes a checkpoint (``LATEST``) that has one (its own, or the directory's).
    Only such a directory need be writable: a run resumed from a read-only one without new
    checkpoints is fine."""
    if every:
        return True
    if not (resume and (directory / "LATEST").is_file()):
        return True
    latest = directory / (directory / "LATEST").read_text().strip()
    return not ((latest / RUN_ID_FILE).is_file() or (directory / RUN_ID_FILE).is_file())


def write_whole(path: Path, text: str) -> None:
    """Write ``path`` so that a reader sees the old text or the new, never a part: through
    ``path.tmp`` and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def optimizer_mismatch(path: Path, optimizer: str, kl_shampoo: bool) -> str | None:
    """Why ``--optimizer optimizer`` (``--kl-shampoo`` as given) cannot resume the checkpoint
    at ``path`` (None: it can, or the checkpoint cannot tell): another of the job's optimizers
    saved it, or SOAP with the other KL-Shampoo setting. Read in one process, before any
    process group: the ranks' load would refuse it too, but in every rank and after the
    model is built. (A launcher that restarts failed groups, torchrun ``--max-restarts``,
    still tries again after this refusal's exit 2: each attempt just stops sooner.)"""
    keys = _checkpoint_keys(path)
    saved = _checkpoint_optimizer(keys)
    if saved is not None and saved != optimizer:
        return (f"--resume: the checkpoint {path} holds --optimizer {saved}'s state: resume it "
                f"with --optimizer {saved}, or start a new run in an empty --checkpoint-dir")
    kl = _checkpoint_kl_shampoo(path, keys) if saved == optimizer == "soap" else None
    if kl is not None and kl != kl_shampoo:
        flag = "with --kl-shampoo" if kl else "without --kl-shampoo"
        return (f"--resume: the checkpoint {path} was saved by SOAP "
                f"{'with' if kl else 'without'} KL-Shampoo factors: resume it {flag}, or start "
                f"a new run in an empty --checkpoint-dir")
    return None


def _checkpoint_keys(path: Path) -> list[str]:
    """The keys the DCP checkpoint at ``path`` lists in its metadata (no tensor is read);
    none when it is not a DCP checkpoint or unreadable (the ranks' own load says why)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception:
        return []


def _checkpoint_kl_shampoo(path: Path, keys: list[str]) -> bool | None:
    """Whether the SOAP checkpoint at ``path`` (its metadata ``keys``) was saved with
    KL-Shampoo factors: its groups' ``use_kl_shampoo``, read alone (DCP loads just those
    values, in this process, no process group). None when the checkpoint cannot tell."""
    import torch.distributed.checkpoint as dcp

    wanted: dict[str, Any] = {k: None for k in keys if k.startswith("optim.param_groups.")
                              and k.endswith(".use_kl_shampoo")}
    if not wanted:
        return None
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": it is one
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, checkpoint_id=str(path))
    except Exception:  # unreadable: the ranks' own load says why
        return None
    return any(bool(v) for v in wanted.values())


def _checkpoint_optimizer(keys: list[str]) -> str | None:
    """Which of the job's optimizers saved a DCP checkpoint, from the state keys its metadata
    lists (``keys``): NorMuon's ``second_moment``, SOAP's factors, Muon's ``momentum_buffer``
    alone. None when they cannot tell."""
    state = {key.rsplit(".", 1)[-1] for key in keys if key.startswith("optim.state.")}
    if "second_moment" in state:
        return "normuon"
    if state & {"L", "R", "Q_L", "Q_R"}:
        return "soap"
    return "muon" if "momentum_buffer" in state else None


#: the checkpoint entry holding the run's softening schedule length (its first --steps): a
#: resume with another --steps keeps the schedule the checkpoint was trained with
HORIZON_KEY = "softening_steps"
#: checkpoint entries holding the flags a resume must keep, by the flag's name: the data stream
#: (``--seed`` also fixes the spike's direction; a resume with others trained another run,
#: unannounced) and the model's shape (another failed in a traceback on every rank, once the
#: checkpoint was read)
RUN_KEYS = {"data_seed": "--seed", "batch_size": "--batch-size", "d_model": "--d-model",
            "layers": "--layers"}
#: in a checkpoint directory: the reason the first attempt of a launch under ``--max-restarts``
#: refused it, for the attempts torchrun restarts after that refusal (which would resume it)
REFUSED_FILE = "REFUSED"


#: in a checkpoint directory: the lock the first rank of the job training there holds (flock,
#: released when that process ends), naming the process and its host
JOB_LOCK_FILE = "JOB.lock"


def hold_directory(directory: Path) -> tuple[int | None, str | None, str | None]:
    """Lock ``directory`` for this job (:data:`JOB_LOCK_FILE`): ``(descriptor, busy, error)``,
    the descriptor to release with :func:`service.lockfile.release` when the job ends; ``busy``
    says which job holds the lock instead, ``error`` why the lock file is not usable (a link in
    its place, a directory this process cannot write). Two jobs writing one directory
    overwrote each other's ``LATEST``: one's restart resumed the other's checkpoint, or read
    the ``REFUSED`` file the other's first attempt left and refused itself."""
    from service import lockfile  # torch-free, a file lock: what the sidecar's database uses

    path = directory / JOB_LOCK_FILE
    try:
        held = lockfile.hold(str(path), f"process {os.getpid()} on {socket.gethostname()}",
                             shared=True)
    except lockfile.LockHeld as exc:
        return None, (f"another job is training with --checkpoint-dir {directory} "
                      f"({exc.holder} holds {path}): two jobs writing one directory overwrite "
                      f"each other's checkpoints and LATEST; stop that job, or give this one "
                      f"another --checkpoint-dir"), None
    except lockfile.LockFileError as exc:
        if exc.unsupported:  # trained there before the lock came: trains on, unguarded
            print(f"orthoshard.train: note: {exc} (a filesystem without flock); training "
                  f"without the lock that keeps a second job out of --checkpoint-dir "
                  f"{directory}", file=sys.stderr)
            return None, None, None
        return None, None, f"--checkpoint-dir {directory}: {exc}"
    return held, None, None


def spike_problem(latest: Path, spike_at: int | None) -> str | None:
    """What stops a ``--resume`` from ``latest`` with ``--spike-at`` at or before its step
    (None: nothing): the run trains from the step after it on, so the spike would never
    happen."""
    done = checkpoint_step(latest)
    if done is None or spike_at is None or spike_at > done:
        return None
    return (f"--resume: the checkpoint {latest} is at step {done}, past --spike-at {spike_at}: "
            f"this run trains from step {done + 1} on and would never spike; pass a later "
            f"--spike-at, or none")


class Checkpoints:
    """``DIR/step-NNNNNN`` DCP directories plus a ``DIR/LATEST`` pointer written last."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        # the integer entries of the checkpoint read by _scalars, and which one (a start reads
        # the horizon and the run flags: one DCP read for both)
        self._read: tuple[Path, dict[str, int]] | None = None

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

    def save(self, model: torch.nn.Module, optimizer: Any, step: int, horizon: int, *,
             run_id: str | None = None, flags: dict[str, int] | None = None,
             keep: int = 0) -> None:
        """Save at ``step``; ``horizon``: the run's softening schedule length (its --steps);
        ``run_id``: the run's id, kept in the checkpoint (:data:`RUN_ID_FILE`) for a resume;
        ``flags``: the values of :data:`RUN_KEYS` (:meth:`flags_problem` checks a resume's);
        ``keep`` > 0: then remove the run's older checkpoints but the newest ``keep``
        (:meth:`prune`)."""
        from sharding import checkpoint

        assert self.dir is not None
        path = self._fresh(step)
        extra = {"progress": torch.tensor(step), HORIZON_KEY: torch.tensor(horizon),
                 **{key: torch.tensor(value) for key, value in (flags or {}).items()}}
        checkpoint.save(path, model, optimizer, extra=extra)
        dist.barrier()
        if dist.get_rank() == 0:
            if run_id is not None:
                write_whole(path / RUN_ID_FILE, run_id)
            write_whole(self.dir / "LATEST", path.name)
            if keep and run_id is not None:
                self.prune(keep, run_id)
        dist.barrier()

    def prune(self, keep: int, run_id: str) -> None:
        """Remove the whole checkpoints of the run ``run_id`` (their :data:`RUN_ID_FILE` says
        so) of steps before the one LATEST names, all but the newest ``keep - 1`` of them: with
        LATEST's, ``keep`` stay. Other runs' checkpoints, incomplete or damaged ones, and those
        of LATEST's step or later, which a resume from an earlier one left behind, stay: taken
        for newer by their names, a rollback's damaged checkpoint was kept, and the one it went
        back to removed. Each is renamed out of the ``step-*`` names first, so that one left
        half removed by a crash is no checkpoint, and leftovers of that kind go too. A
        checkpoint that cannot be removed is warned about; training goes on."""
        assert self.dir is not None and keep >= 1
        latest = self.dir / (self.dir / "LATEST").read_text().strip()
        step = checkpoint_step(latest)
        mine = [name for name in complete_before(self.dir, latest)
                if _run_id_of(self.dir / name) == run_id
                and (step is None or (checkpoint_step(self.dir / name) or 0) < step)]
        for name in mine[keep - 1:]:
            try:
                (self.dir / name).rename(self.dir / f"{_REMOVING}{name}")
            except OSError as exc:
                warnings.warn(f"--keep-checkpoints: could not remove {self.dir / name}: {exc}",
                              stacklevel=2)
        for path in self.dir.glob(f"{_REMOVING}*"):
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                warnings.warn(f"--keep-checkpoints: could not remove all of {path}",
                              stacklevel=2)

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
        from sharding import checkpoint

        path = self.latest()
        if path is None:
            return 0
        try:
            extra = checkpoint.load(path, model, optimizer, extra={"progress": torch.tensor(0)})
        except ValueError:
            raise  # refused: another optimizer, model or flags (the message says which)
        except Exception as exc:  # a file missing, cut short, unreadable; or a rank lost
            earlier = complete_before(self.dir, path) if self.dir is not None else []
            back = (f"point LATEST at an earlier complete checkpoint "
                    f"({', '.join(earlier) or 'there is none'}), or remove LATEST to start "
                    f"from step 0")
            damage = checkpoint_damage(path)
            if damage is not None:
                exc.add_note(f"orthoshard.train: {path}, which {self.dir}/LATEST names, could "
                             f"not be read: {damage}; {back}.")
            else:
                # a collective of the load failed (gloo's "Connection refused" when a peer
                # died): the checkpoint is no cause to go back
                exc.add_note(f"orthoshard.train: {path}, which {self.dir}/LATEST names, has "
                             f"every file its .metadata lists, at full length: the error above "
                             f"need not be the checkpoint's (a rank lost while loading, say); "
                             f"--resume again once every rank runs. Should it fail the same way "
                             f"again, its bytes are damaged: {back}.")
            raise
        return int(extra["progress"])

    def horizon(self) -> int | None:
        """The softening schedule's length saved with the latest checkpoint (None without a
        checkpoint, or one saved before it was recorded). Each rank reads it alone."""
        return self._scalars().get(HORIZON_KEY)

    def flags_problem(self, flags: dict[str, int]) -> str | None:
        """What stops a resume whose :data:`RUN_KEYS` values ``flags`` differ from those the
        latest checkpoint was saved with (None: they agree, or the checkpoint predates them).
        Each rank reads them alone, before anything loads."""
        saved = self._scalars()
        changed = [f"{RUN_KEYS[key]} {saved[key]} (this run: {value})"
                   for key, value in flags.items() if key in saved and saved[key] != value]
        if not changed:
            return None
        return (f"--resume: the checkpoint in {self.dir} was trained with "
                f"{', '.join(changed)}: resume it with the checkpoint's values, or start a new "
                f"run in an empty --checkpoint-dir")

    def _scalars(self) -> dict[str, int]:
        """The integer entries (:data:`HORIZON_KEY`, :data:`RUN_KEYS`) the latest checkpoint
        holds (none without a checkpoint, or from one that cannot be read: :meth:`load`, which
        comes next, raises and says what to do); read once per checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        path = self.latest()
        if path is None:
            return {}
        if self._read is not None and self._read[0] == path:
            return self._read[1]
        found: dict[str, int] = {}
        try:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            box = {key: torch.tensor(0) for key in (HORIZON_KEY, *RUN_KEYS) if key in saved}
            if box:
                with warnings.catch_warnings():  # "assuming the intent is to load in one process"
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load(box, checkpoint_id=str(path), no_dist=True)
                found = {key: int(value) for key, value in box.items()}
        except (Exception, CheckpointException):
            return {}
        self._read = (path, found)
        return found

    def check_writable(self) -> None:
        """Create the directory and prove it writable now, not at the first save after
        ``--checkpoint-every`` steps of work (every rank: each writes its own files)."""
        assert self.dir is not None
        if (problem := directory_problem(self.dir, "--checkpoint-dir")) is not None:
            raise OSError(problem)

"""Checkpoints of owner-sharded optimizers through torch.distributed.checkpoint (DCP).

:func:`save` and :func:`load` wrap the usual ``{"model": ..., "optim": ...}`` round trip at any
world size. The optimizer's ``state_dict()`` under ``OwnerSharding`` already holds its
owner-only state as shards every rank has alike (:mod:`sharding._owner_state`), which DCP
reshards; these two add the checks every rank makes first (:mod:`sharding._agreement`), a
checkpoint's param groups read and checked before any tensor is written into the live model
and optimizer, and errors that name what does not fit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    CheckpointException,
    FileSystemReader,
    FileSystemWriter,
    TensorStorageMetadata,
)

from sharding._agreement import check_ranks_agree
from sharding._owner_state import SHARDS_OF, export_owner_state, import_owner_state

__all__ = ["SHARDS_OF", "export_owner_state", "import_owner_state", "load", "save"]


def _failure(exc: CheckpointException, fragment: str) -> str | None:
    """The first of a DCP failure's per-rank errors whose message contains ``fragment``."""
    return next((str(error) for error, _ in exc.failures.values() if fragment in str(error)),
                None)


def save(directory: str | Path, model: torch.nn.Module, optimizer: Any,
         extra: dict[str, Any] | None = None, *,
         process_group: dist.ProcessGroup | None = None) -> None:
    """Save model and optimizer with DCP into a NEW directory (collective on every rank of
    ``process_group``).

    ``process_group``: the ranks that save this model together (None: the default group, every
    rank). Pipeline stages, or any part of the world training a model of its own, pass their
    own group (the one their ``OwnerSharding`` and ``fully_shard`` mesh use) and save each to a
    directory of its own: over the default group one stage saving alone would wait for ranks
    that never call ``save``, and stages saving together into one directory would write the
    same keys (the optimizer's state is keyed by position, ``optim.state.0``), which is refused.

    Raises:
        FileExistsError: on every rank, when ``directory`` already holds a checkpoint, which is
            left as it was. DCP would overwrite it file by file, and a crash midway would leave
            the old metadata over a mix of old and new data. DCP itself refuses (its planning
            is collective, so every rank learns it together; a check of our own could see
            different filesystems on different nodes and leave some ranks in the collective).
        ValueError: on every rank, when the optimizer steps parameters the model does not hold
            (another instance of the model) on any rank, or ``process_group`` leaves out this
            rank or a rank of the optimizer's sharding group, or its ranks step different
            parameters or optimizer classes (pipeline stages sharing a directory); nothing is
            written.
        RuntimeError: when DCP fails to write (the ranks it failed on and the first error).
    """
    check_ranks_agree(model, optimizer, process_group, "save")
    # State every parameter will have, as :func:`load`'s template asks for it: a checkpoint taken
    # before the first step, or while a matrix has had no gradient yet, would otherwise lack
    # entries and be refused on load. The zeros it creates are what a first step creates.
    optimizer.init_state()
    optim = optimizer.state_dict()
    optim.pop(SHARDS_OF, None)  # each rank's own: DCP places the shards by their DTensors
    state = {"model": model.state_dict(), "optim": optim, **(extra or {})}
    try:
        dcp.save(state, storage_writer=FileSystemWriter(str(directory), overwrite=False),
                 process_group=process_group)
    except CheckpointException as exc:
        if _failure(exc, "already exists") is not None:
            raise FileExistsError(
                f"{directory} already holds a checkpoint; save each checkpoint to a new "
                f"directory (e.g. step-000100), then point to it (orthoshard.train writes "
                f"LATEST last).") from None
        # a failed write (a full disk): an Exception, as callers catch (DCP's is a
        # BaseException); the directory may hold part of the checkpoint
        raise RuntimeError(_failed("save", directory, exc) + _space_left(directory)
                           + ". The directory may hold part of it: do not load it.") from exc


#: Free bytes under which a failed save's message suggests a full disk.
_LOW_SPACE_BYTES = 64 << 20


def _space_left(directory: str | Path) -> str:
    """A note on the free space where ``directory`` is, when little is left: torch's zip
    writer turns a full disk into "unexpected pos 704 vs 598", which names no cause ("" when
    there is room, or it cannot tell)."""
    import shutil

    for where in (Path(directory), *Path(directory).parents):
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            continue
        if free >= _LOW_SPACE_BYTES:
            return ""
        return f" (its filesystem has {free} bytes free: a full disk?)"
    return ""


def _failed(action: str, directory: str | Path, exc: CheckpointException) -> str:
    """What DCP could not ``action`` (save, load), on which ranks, and each distinct error with
    its type (a file cut short raises an ``EOFError`` whose message is empty)."""
    errors: dict[str, list[int]] = {}
    for rank, failure in sorted(exc.failures.items()):
        error = failure[0]
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        errors.setdefault(text, []).append(rank)
    described = "; ".join(f"{text} (ranks {ranks})" if len(errors) > 1 else text
                          for text, ranks in errors.items())
    return (f"torch.distributed.checkpoint could not {action} {directory} on ranks "
            f"{sorted(exc.failures)}: {described}")


def _dcp_load(state: dict[str, Any], directory: str | Path, optimizer: Any, *,
              process_group: dist.ProcessGroup | None, partial: bool = False) -> None:
    """``dcp.load`` in place. A checkpoint without an entry asked for, or of other shapes,
    raises ValueError (DCP finds both while planning, before it reads anything); any other
    failure a RuntimeError (DCP's own ``CheckpointException`` is a BaseException, which
    ``except Exception`` does not catch), which says so when ``partial`` (``state`` holds the
    live model's and optimizer's own tensors, which a failed read can leave half written)."""
    try:
        dcp.load(state, checkpoint_id=str(directory), process_group=process_group)
    except CheckpointException as exc:
        # DCP plans the load collectively, so every rank sees the same missing key, before
        # any data is read; its message alone ("Missing key ...: optim.state.0.L") does not
        # say that the optimizer is the mismatch
        missing = _failure(exc, "Missing key in checkpoint state_dict: optim.")
        if missing is not None:
            raise ValueError(
                f"{directory} does not hold this {type(optimizer).__name__}'s state "
                f"({missing}): it was saved by another optimizer or for other parameters. "
                f"Load it with the optimizer that saved it, or load the model alone "
                f"(torch.distributed.checkpoint) and start this optimizer afresh.") from None
        # also planned collectively, before any data is read; DCP raises it as a
        # CheckpointException, a BaseException that `except Exception` does not catch
        mismatch = _failure(exc, "Size mismatch between saved")
        if mismatch is not None:
            what = "the model"
            if " for optim." in mismatch:
                what = "this optimizer's state" + (
                    " (SOAP's factors follow max_precond_dim: a side above it stores none)"
                    if "max_precond_dim" in getattr(optimizer, "defaults", {}) else "")
            raise ValueError(
                f"{directory} was saved for other shapes than {what} ({mismatch}): load it "
                f"into the model and optimizer settings that saved it.") from None
        missing = _failure(exc, "Missing key in checkpoint state_dict: ")
        if missing is not None:
            if "state_dict: model." in missing:
                raise ValueError(_lacks_model_entries(directory, [missing])) from None
            raise ValueError(f"{directory} lacks an entry ({missing}): it was saved without an "
                             f"entry asked for with `extra`. Nothing was loaded.") from None
        # anything else (a file unreadable or cut short): an Exception, as callers catch
        raise RuntimeError(_failed("load", directory, exc) + (
            ". The model and optimizer may hold part of it: load a complete checkpoint into "
            "them, or start afresh." if partial else "")) from exc


def _lacks_model_entries(directory: str | Path, missing: list[str]) -> str:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (f"{directory} lacks an entry ({shown}): it was saved for another model (a parameter "
            f"or buffer added or renamed since): load it into the model that saved it. Nothing "
            f"was loaded.")


def _read_metadata(directory: str | Path) -> Any:
    """The checkpoint's DCP metadata, or None where it cannot be read here (not a DCP
    checkpoint): ``dcp.load`` then says what it finds."""
    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception:
        return None


def _model_entries_missing(metadata: Any, model: torch.nn.Module) -> list[str]:
    """The entries of ``model.state_dict()`` that the checkpoint does not hold (a parameter or
    buffer added or renamed since it was saved), as ``model.<name>``; none where its metadata
    does not say (``metadata`` None, or saved without DCP's flattening)."""
    paths = getattr(metadata, "planner_data", None)
    if not isinstance(paths, dict):
        return []
    saved = {path[1] for path in paths.values() if len(path) >= 2 and path[0] == "model"}
    return [f"model.{name}" for name in model.state_dict() if name not in saved]


def _saved_groups(metadata: Any, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A template of the checkpoint's own param groups, for DCP to fill: every key its metadata
    lists under ``optim.param_groups``, nested as saved (``nonfinite_skips`` by name), whether
    the live groups have it or not. An LR scheduler's ``initial_lr`` saved with it is loaded, and
    a key the checkpoint lacks (a scheduler made before the load; an older checkpoint without
    ``nonfinite_skips``) is not asked for: ``load_state_dict`` takes it from the live group.
    Without readable metadata (not a DCP checkpoint, or saved without DCP's flattening), the
    live groups' keys, and ``dcp.load`` says what it finds."""
    paths = getattr(metadata, "planner_data", None)  # {flat key: its path in the saved dict}
    if not isinstance(paths, dict):
        return copy.deepcopy(live)
    groups: dict[int, dict[str, Any]] = {}
    for fqn, path in paths.items():
        if tuple(path[:2]) != ("optim", "param_groups") or len(path) < 4:
            continue
        node = groups.setdefault(path[2], {})
        for key in path[3:-1]:
            node = node.setdefault(key, {})
        item = metadata.state_dict_metadata.get(fqn)
        node[path[-1]] = (torch.empty(item.size, dtype=item.properties.dtype)
                          if isinstance(item, TensorStorageMetadata) else None)
    return [groups.get(gi, {}) for gi in range(max(groups, default=-1) + 1)]


def _keyed_as_saved(state: dict[Any, Any], live: list[dict[str, Any]],
                    saved: list[dict[str, Any]]) -> dict[Any, Any]:
    """``state`` (keyed by the live state dict's positions) keyed by the checkpoint's position of
    each parameter, where the checkpoint lists the live names in another order (within a group,
    or the groups themselves): DCP fills ``optim.state.<position>`` from the checkpoint's same
    position, which held another parameter's state (refused as a shape mismatch where the
    shapes differ), and ``load_state_dict`` then pairs the groups and positions by name.
    Checkpoints under the same order or under other names keep the keys."""
    where_live, where_saved = _positions(live), _positions(saved)
    if (where_live is None or where_saved is None or where_live.keys() != where_saved.keys()
            or where_live == where_saved):
        return state  # check_state_dict says what does not fit
    return {where_saved[name]: state[position] for name, position in where_live.items()
            if position in state}


def _positions(groups: list[dict[str, Any]]) -> dict[str, int] | None:
    """Each parameter's state-dict position by name, over all ``groups``; None where a group
    does not pair its names with int positions one to one, or a name repeats."""
    out: dict[str, int] = {}
    for group in groups:
        names, positions = group.get("param_names"), group.get("params")
        if not (isinstance(names, list) and isinstance(positions, list)
                and len(names) == len(positions) and all(isinstance(n, str) for n in names)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in positions)):
            return None
        out.update(zip(names, positions, strict=True))
    if len(out) != sum(len(group["param_names"]) for group in groups):
        return None
    return out


def load(directory: str | Path, model: torch.nn.Module, optimizer: Any,
         extra: dict[str, Any] | None = None, *,
         process_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Load what :func:`save` wrote, at any world size (collective on every rank of
    ``process_group``: None, the default group; a pipeline stage's group, as for :func:`save`).

    ``extra`` is a template of additional entries (filled in place and returned).

    DCP writes into the model's and the optimizer's own tensors (their state dicts share them),
    so the checkpoint's param groups are read and checked first
    (``optimizer.check_state_dict``): a refused checkpoint leaves model and optimizer as they
    were. The groups keep the keys they were saved with (an LR scheduler's ``initial_lr``), and
    a key they lack takes the live group's value, as with ``load_state_dict``. Shapes need no
    such step: DCP refuses a size mismatch while planning, before it reads.

    Raises:
        ValueError: on every rank, when the optimizer steps parameters the model does not hold,
            or the checkpoint lacks state this optimizer needs (it was
            saved by another optimizer class, or for other parameters), or its param groups
            do not fit this optimizer's (another algorithm, hyperparameters it cannot use,
            another split of the parameters), or lacks an entry of the model or of ``extra``,
            or ``process_group`` leaves out this rank or a rank of the optimizer's sharding
            group, or its ranks step different parameters or optimizer classes; nothing is
            loaded.
        RuntimeError: when DCP fails to read (a file unreadable or cut short); the model and
            optimizer may then hold part of the checkpoint.
    """
    check_ranks_agree(model, optimizer, process_group, "load")
    optimizer.init_state()
    optim_state = optimizer.state_dict()
    # the groups alone first: a few small objects, and a collective plan every rank shares,
    # so every rank refuses together; their template holds the checkpoint's keys (the live
    # groups stay as they are), and check_state_dict completes them from the live groups
    metadata = _read_metadata(directory)
    groups = {"optim": {"param_groups": _saved_groups(metadata, optim_state["param_groups"])}}
    _dcp_load(groups, directory, optimizer, process_group=process_group)
    # each live tensor where the checkpoint keeps its parameter's state: the checkpoint's
    # position of that name, when its group lists the same names in another order
    optim_state["state"] = _keyed_as_saved(optim_state["state"], optim_state["param_groups"],
                                           groups["optim"]["param_groups"])
    optim_state["param_groups"] = groups["optim"]["param_groups"]
    try:
        optimizer.check_state_dict(optim_state)
    except ValueError as exc:
        # a parameter added to the model and the optimizer alike shows first as a group of
        # another size: name the model's entries the checkpoint lacks, as DCP's own check
        # names one the optimizer does not step. Every rank refuses either way (the groups
        # were read collectively), so a rank that cannot read the metadata only words it less.
        missing = _model_entries_missing(metadata, model)
        if missing:
            raise ValueError(_lacks_model_entries(directory, missing)) from None
        raise ValueError(f"{directory} cannot be loaded into this "
                         f"{type(optimizer).__name__} (nothing was loaded): {exc}") from None
    # then the tensors, into the model's and the optimizer's own
    state = {"model": model.state_dict(), "optim": {"state": optim_state["state"]},
             **(extra or {})}
    _dcp_load(state, directory, optimizer, process_group=process_group, partial=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(optim_state)
    return {k: v for k, v in state.items() if k not in ("model", "optim")}

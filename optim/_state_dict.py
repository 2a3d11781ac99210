"""What a matrix optimizer keeps and restores: ``state_dict`` / ``load_state_dict`` with their
checks (another optimizer's or model's state dict is refused before anything changes), the state
dtypes a load keeps, and copies (``copy.deepcopy``, ``pickle``).

:class:`StateDictOptimizer` sits between ``torch.optim.Optimizer`` and
:class:`optim._base.MatrixOptimizer`, whose exchange, group checks and recorded health its
methods read: it declares them, the frame sets and defines them.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from optim._checks import ADAMW, is_int, plain_numbers
from optim._exchange import DeferredMetrics, LocalExchange, _one_row, local

__all__ = ["StateDictOptimizer"]


@contextlib.contextmanager
def _hooks_held(optimizer: Optimizer, *attributes: str) -> Iterator[None]:
    """Empty the named hook registries of ``optimizer`` for the block (torch's ``state_dict``
    and ``load_state_dict`` would run them mid-way; :class:`optim._base.MatrixOptimizer` runs
    them itself, before and after its own work) and put them back after."""
    held = {name: getattr(optimizer, name) for name in attributes}
    for name in attributes:
        setattr(optimizer, name, OrderedDict())
    try:
        yield
    finally:
        for name, hooks in held.items():
            setattr(optimizer, name, hooks)


#: What every torch.optim.Muon param group holds (torch 2.13), and an SGD one does not.
_TORCH_MUON_KEYS = frozenset({"ns_coefficients", "ns_steps", "eps", "adjust_lr_fn"})


def _unmarked_group(state_dict: dict[str, Any]) -> str | None:
    """A group (completed by ``_completed``) still without ``algorithm``: not a torch.optim.Muon
    group loaded into a Muon, the one kind saved without it that loads. Checked after every
    other check, whose messages name the state that does not fit more precisely."""
    for gi, saved in enumerate(state_dict["param_groups"]):
        if "algorithm" not in saved:
            return (f"param group {gi} has no 'algorithm' and is not a torch.optim.Muon group "
                    f"(with {', '.join(sorted(_TORCH_MUON_KEYS))}) loaded into a Muon: it comes "
                    f"from another optimizer")
    return None


class StateDictOptimizer(Optimizer):
    """The state dict and the copies of :class:`optim._base.MatrixOptimizer` (its base)."""

    # Group keys that may hold a schedule (a callable of the step): state_dict() saves them as
    # None, and load_state_dict() keeps the live group's value for them.
    schedule_keys: frozenset[str] = frozenset()
    #: Instance attributes a copy (``copy.deepcopy``, ``pickle``) carries besides torch's
    #: ``defaults``, ``state`` and ``param_groups``: the settings and the recorded health
    #: (``MAX_BATCH_BYTES`` when set on the instance). A subclass adds its own.
    _copied: tuple[str, ...] = ("health_every", "_health", "_exchange", "MAX_BATCH_BYTES")

    # Set and defined by the frame (optim._base.MatrixOptimizer), read here.
    _exchange: Any  # the MatrixExchange: LocalExchange or the sharding layer's
    _health: dict[str, dict[str, Tensor | float]]
    _deferred: dict[str, tuple[DeferredMetrics, int]]

    def _init_runtime(self) -> None:
        raise NotImplementedError

    def _check_groups(self) -> None:
        raise NotImplementedError

    def _check_hyperparameters(self, index: int, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _record(self, name: str, metrics: dict[str, Tensor | float]) -> None:
        raise NotImplementedError

    # ---- copies -------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` carry: torch's three entries (``defaults``,
        ``state``, ``param_groups``), this optimizer's settings (:attr:`_copied`), and the
        latest health (as plain floats); the per-step caches start afresh in the copy
        (:meth:`_init_runtime`) and, as in torch's copies, the hooks start empty (an LR
        scheduler's wrapper of ``step`` stays with the original). An optimizer with
        ``sharding`` holds a process group, which no copy can share: save it with
        ``state_dict()`` (``sharding.checkpoint``) instead."""
        if not isinstance(self._exchange, LocalExchange):
            raise TypeError(f"a {type(self).__name__} with sharding= cannot be copied or "
                            f"pickled (its exchange holds a process group): save and load it "
                            f"with sharding.checkpoint (state_dict / load_state_dict) instead")
        state = super().__getstate__()
        state.update((k, self.__dict__[k]) for k in self._copied if k in self.__dict__)
        # each matrix's deferred metrics, converted (their finish functions do not pickle)
        state["_deferred_floats"] = {name: (batch.keys[i], batch.floats(i))
                                     for name, (batch, i) in self._deferred.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        floats = state.pop("_deferred_floats", {})
        super().__setstate__(state)  # torch's: fresh (empty) hooks, step patched for profiling
        self._init_runtime()
        for name, (keys, values) in floats.items():
            batch = DeferredMetrics([keys], torch.tensor(values, dtype=torch.float64), _one_row)
            self._deferred[name] = (batch, 0)


    # ---- state dict ---------------------------------------------------------------------
    def _state_shapes(self, shape: tuple[int, ...], algorithm: str
                      ) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The shapes each state tensor of a parameter of ``shape`` may have; subclasses add
        their matrix state. Checked by :meth:`load_state_dict`."""
        if algorithm == ADAMW:
            return {"step": ((),), "exp_avg": (shape,), "exp_avg_sq": (shape,)}
        return {}

    def _required_state(self, algorithm: str) -> set[str]:
        """The state keys a parameter's non-empty state always holds (a state dict without one
        was cut short: accepted, the next step raised KeyError); subclasses add their matrix
        state's."""
        return {"step", "exp_avg", "exp_avg_sq"} if algorithm == ADAMW else set()

    def _state_dict_problem(self, state_dict: dict[str, Any]) -> str | None:
        """What makes ``state_dict`` unfit for this optimizer, or None; torch's own checks
        (counts of groups and of their parameters) included, so that :meth:`check_state_dict`
        answers for all of :meth:`load_state_dict`."""
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict) or \
                not all(isinstance(g, dict) for g in saved_groups):
            return "it is not an optimizer state dict ({'state': {...}, 'param_groups': [...]})"
        if len(saved_groups) != len(self.param_groups):
            return (f"it has {len(saved_groups)} param groups and this optimizer "
                    f"{len(self.param_groups)}: it comes from another split of the parameters")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            indices = saved.get("params", [])
            if len(indices) != len(group["params"]):
                return (f"param group {gi} was saved with {len(indices)} parameters and has "
                        f"{len(group['params'])} here: it comes from another model or another "
                        f"split of the parameters")
            algorithm = saved.get("algorithm", group["algorithm"])  # (see _unmarked_group)
            if algorithm != group["algorithm"]:
                return (f"param group {gi} was saved for {algorithm!r} and is "
                        f"{group['algorithm']!r} here: it comes from another optimizer or "
                        f"another split of the parameters")
            # the group as it would be after loading (schedules are kept, as load keeps them)
            candidate = {**saved, "algorithm": algorithm,
                         **{k: v for k, v in group.items() if callable(v)}}
            try:
                self._check_hyperparameters(gi, candidate)
            except (ValueError, KeyError, TypeError) as exc:
                return f"{exc}" if isinstance(exc, ValueError) else \
                    f"param group {gi} lacks or mistypes {exc}"
            problem = _group_fields_problem(gi, saved, len(indices))
            if problem is not None:
                return problem
            for name, p, index in zip(group["param_names"], group["params"], indices,
                                      strict=True):
                shapes = self._state_shapes(tuple(p.shape), group["algorithm"])
                entry = saved_state.get(index) or {}
                for key, value in entry.items():
                    if shapes and key not in shapes:
                        return (f"parameter {name!r} has state {key!r}, which "
                                f"{type(self).__name__} does not keep (it keeps "
                                f"{', '.join(sorted(shapes))}): it comes from another optimizer")
                    if shapes and not isinstance(value, Tensor):
                        return (f"state {key!r} of parameter {name!r} is a "
                                f"{type(value).__name__}, not a tensor")
                    if hasattr(value, "to_local") and isinstance(self._exchange, LocalExchange):
                        # (this layer never imports torch.distributed): kept as it was, the
                        # next step failed inside the update on DTensor and plain operands
                        return (f"state {key!r} of parameter {name!r} is a DTensor: the state "
                                f"dict comes from an optimizer with sharding=, and this one has "
                                f"none. Load it into the same sharding, or move between the "
                                f"two through sharding.checkpoint.save and .load, which "
                                f"reshard (one process without a process group included)")
                    if isinstance(value, Tensor) and key in shapes and \
                            tuple(value.shape) not in shapes[key]:
                        allowed = " or ".join(str(shape) for shape in shapes[key])
                        return (f"state {key!r} of parameter {name!r} has shape "
                                f"{tuple(value.shape)}, not {allowed} as a parameter of shape "
                                f"{tuple(p.shape)} needs: it comes from another model")
                    problem = _state_value_problem(name, key, value)
                    if problem is not None:
                        return problem
                missing = sorted(self._required_state(group["algorithm"]) - set(entry))
                if entry and missing:
                    return (f"parameter {name!r} has state without {', '.join(missing)}, which "
                            f"{type(self).__name__} keeps with the rest: the state dict was cut "
                            f"short or comes from another optimizer")
        return None

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, ready for ``torch.distributed.checkpoint``.

        Schedules (callables in a group) are not data: saved as None, kept on load. Under
        ``OwnerSharding`` it is a collective over the sharding group, for every optimizer
        (Muon with replicated parameters too): each matrix's skip count is taken from its owner
        (one ``all_reduce``) and the owner-only state becomes ``Shard(0)`` DTensors, so the keys
        are the same on every rank and DCP can reshard. Call it on every rank of the group
        (``if rank == 0: torch.save(opt.state_dict(), ...)`` waits for the other ranks until
        the process group times out). Each rank's dict holds its own shards: save them through
        ``sharding.checkpoint``, or each to a file its rank loads, never one rank's dict on
        every rank (each would take that rank's rows; a dict that holds shards names its rank,
        ``"owner_shards"``, and ``load_state_dict`` refuses it on another).

        Only the parameters in ``param_groups`` are saved: the state of a group removed from
        them (a block frozen) is kept for when it comes back, but is not in the state dict
        (torch's packing numbers the groups' parameters, and raised KeyError on the others).
        """
        for pre_hook in list(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        present = {id(p) for group in self.param_groups for p in group["params"]}
        live = self.state
        if any(id(p) not in present for p in live):
            self.state = defaultdict(dict, {p: s for p, s in live.items() if id(p) in present})
        try:
            with _hooks_held(self, "_optimizer_state_dict_pre_hooks",
                             "_optimizer_state_dict_post_hooks"):
                sd = super().state_dict()
        finally:
            self.state = live
        for g in sd["param_groups"]:  # torch's copies of the groups
            for key, value in list(g.items()):
                if callable(value):
                    g[key] = None
            # a scheduler's NumPy value written since the last step (which converts them):
            # torch.load(weights_only=True) refuses NumPy scalars
            plain_numbers(g)
            if "nonfinite_skips" in g:  # a snapshot, not the live counter
                g["nonfinite_skips"] = dict(g["nonfinite_skips"])
        sd = self._exchange.export_state(sd)
        for post_hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = post_hook(self, sd)  # the finished state dict, as torch's hooks get it
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; under ``OwnerSharding`` a collective on every rank.

        A group saved without some of this optimizer's keys (e.g. by ``torch.optim.Muon``, whose
        ``momentum_buffer`` is the same state) takes them from the group it replaces. State
        tensors keep the dtype this optimizer keeps them in (torch would cast them all to the
        parameter's: a bf16 parameter's float32 SOAP factors would lose their precision).

        Raises:
            ValueError: before anything changes, when a group was saved for another algorithm,
                holds a hyperparameter its update cannot use, or a state tensor's key or shape
                does not fit its parameter (a state dict of another optimizer or model). The
                checks read shapes and plain values only; under ``OwnerSharding`` every rank
                sees the same, so every rank raises together.
        """
        state_dict = state_dict.copy()  # the caller's stays as it was, as torch keeps it
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)  # first, as torch runs them: they may migrate it
            if result is not None:
                state_dict = result
        state_dict = self._completed(state_dict)
        self._refuse_unfit(state_dict)
        state_dict = self._exchange.import_state(state_dict)
        callables = [{k: v for k, v in g.items() if callable(v)} for g in self.param_groups]
        saved = self._saved_matrix_state(state_dict)
        with _hooks_held(self, "_optimizer_load_state_dict_pre_hooks",
                         "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(state_dict)
        for group, kept in zip(self.param_groups, callables, strict=True):
            group.update(kept)
        for p, entries in saved:  # torch cast them to p's dtype: take the saved values again
            state = self.state[p]
            for key, value in entries.items():
                dtype = self._state_dtype(p, key)
                if dtype is not None and key in state and state[key].dtype != dtype:
                    state[key] = value.to(dtype=dtype, device=local(p).device)
        self._check_groups()  # owns a copy of the loaded skip counts (older checkpoints: 0)
        loaded = {name: count for group in self.param_groups
                  for name, count in group["nonfinite_skips"].items()}
        for name, metrics in self._health.items():  # what health() reported is the loaded count
            if "nonfinite_skips" in metrics and name in loaded:
                metrics["nonfinite_skips"] = float(loaded[name])
        for group in self.param_groups:
            for name, count in group["nonfinite_skips"].items():
                # matrices re-report at their next step, on their owner
                if count and group["algorithm"] == ADAMW and self._exchange.reports_fallback():
                    self._record(name, {"nonfinite_skips": float(count)})
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)  # the optimizer as loaded, dtypes and counts restored

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise the ValueError :meth:`load_state_dict` would raise for ``state_dict`` as given
        (the load pre-hooks are not run), changing nothing (not a collective). For loaders that
        write tensors in place before the optimizer sees them, as
        :func:`sharding.checkpoint.load` does: they check first."""
        self._refuse_unfit(self._completed(state_dict))

    def _refuse_unfit(self, state_dict: dict[str, Any]) -> None:
        problem = self._state_dict_problem(state_dict) or _unmarked_group(state_dict)
        if problem is not None:
            raise ValueError(f"cannot load this state dict: {problem}")

    def _completed(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` (a shallow copy) whose groups have every key of the groups they
        replace: a missing one takes the live group's value (the step counter: 0), and so does
        a schedulable one (:attr:`schedule_keys`) saved as None, i.e. saved from a schedule,
        which is not data: the live group's schedule or number stands."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            return state_dict  # _state_dict_problem names the mismatch
        saved_groups = _in_live_order(self.param_groups, saved_groups)
        groups = []
        for live, saved in zip(self.param_groups, saved_groups, strict=True):
            if not isinstance(saved, dict):
                return state_dict
            missing = {k: v for k, v in live.items()
                       if (k not in saved or (k in self.schedule_keys and saved[k] is None))
                       and k not in ("params", "param_names")}
            if "step" in missing:
                missing["step"] = 0
            if "algorithm" not in saved and not (live["algorithm"] == "muon"
                                                 and _TORCH_MUON_KEYS <= saved.keys()):
                # torch.optim.Muon's groups have no "algorithm", and a Muon loads them; so has
                # another optimizer's (SGD's momentum_buffer has Muon's shape and another rule),
                # which _state_dict_problem refuses for the key it lacks
                missing.pop("algorithm", None)
            groups.append(_under_live_names(live, {**saved, **missing} if missing else saved))
        return {**state_dict, "param_groups": groups}

    def _saved_matrix_state(self, state_dict: dict[str, Any]
                            ) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """The matrix parameters' saved state tensors, by parameter, as torch pairs them."""
        out = []
        for live, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            if live["algorithm"] == ADAMW:
                continue
            for p, index in zip(live["params"], saved["params"], strict=True):
                entry = state_dict["state"].get(index)
                if entry:
                    out.append((p, {k: v for k, v in entry.items() if isinstance(v, Tensor)}))
        return out

    def _state_dtype(self, p: Tensor, key: str) -> torch.dtype | None:
        """The dtype of matrix parameter ``p``'s state tensor ``key``, which a loaded one is
        given (None: torch's rule, the parameter's dtype; ``step`` it leaves alone)."""
        return None


def _names_fit(names: Any, indices: Any) -> bool:
    """Whether a saved group's ``param_names`` name its ``params`` one to one."""
    return isinstance(names, list) and isinstance(indices, list) and \
        len(names) == len(indices) and all(isinstance(n, str) for n in names) and \
        len(set(names)) == len(names)


def _in_live_order(live_groups: list[dict[str, Any]], saved_groups: list[Any]) -> list[Any]:
    """``saved_groups`` in the order of the live groups holding the same names, where each
    saved group names (with packed indices, as ``state_dict()`` writes them) exactly the
    parameters of one live group and the groups are only listed in another order: torch pairs
    groups by position, which gave each group the other's hyperparameters and each parameter
    the state of another (or refused it as another model's where the shapes differ). Otherwise
    as given: the groups pair by position, as in torch."""
    keys = []
    for saved in saved_groups:
        if not isinstance(saved, dict):
            return saved_groups
        names: Any = saved.get("param_names")
        indices: Any = saved.get("params")
        if not _names_fit(names, indices) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices):
            return saved_groups
        keys.append(frozenset(names))
    free = dict.fromkeys(range(len(saved_groups)))
    order = []
    for live in live_groups:
        want = frozenset(live["param_names"])
        match = next((i for i in free if keys[i] == want), None)
        if match is None:
            return saved_groups
        del free[match]
        order.append(match)
    return [saved_groups[i] for i in order]


def _under_live_names(live: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` as this optimizer loads it into ``live``: under the live names, which torch
    would replace with the saved ones (health is keyed by them); and, where torch's packed
    indices come with the names they were saved under and those are the live names in another
    order (the parameters listed otherwise), paired with the live parameters by name, not by
    position. Under other names (a model saved under another prefix) the pairing stays
    torch's, by position, and so do the skip counts. A ``torch.distributed.checkpoint`` load
    arrives already paired by FQN (``params`` are names, not indices): only the names change.
    """
    names: Any = saved.get("param_names")
    indices: Any = saved.get("params")
    live_names: list[str] = live["param_names"]
    if not _names_fit(names, indices) or names == live_names or \
            len(names) != len(live_names):
        return saved  # no names to keep, nothing to change, or _state_dict_problem says why
    out = {**saved, "param_names": list(live_names)}
    packed = all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
    if packed and set(names) == set(live_names):
        where = dict(zip(names, indices, strict=True))
        out["params"] = [where[name] for name in live_names]
    elif packed and isinstance(saved.get("nonfinite_skips"), dict):
        skips = saved["nonfinite_skips"]
        out["nonfinite_skips"] = {new: skips.get(old, 0)
                                  for old, new in zip(names, live_names, strict=True)}
    return out


# State entries that are averages of squares (SOAP's and AdamW's, NorMuon's per row): >= 0.
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "second_moment"})


def _state_value_problem(name: str, key: str, value: Any) -> str | None:
    """What is wrong with one saved state tensor's values, or None. A NaN or Inf in a
    matrix's state made every later step of it non-finite, so each was skipped and counted and
    the matrix never trained again; a step count below 0 or not whole failed the next step half
    way (AdamW's bias correction divided by zero). Plain tensors only: a DTensor's shards differ
    by rank, and a check that raised on some ranks only would leave the others waiting in the
    load's collectives (the loaders of ``sharding.checkpoint`` check a template first)."""
    if type(value) is not Tensor or not (value.is_floating_point() or value.is_complex()) \
            or value.device.type == "meta":
        return None
    if not bool(torch.isfinite(value).all()):
        return (f"state {key!r} of parameter {name!r} holds NaN or Inf: the checkpoint was saved "
                f"from a run that had already diverged, or was damaged. Load an earlier one.")
    if key in _SECOND_MOMENTS and value.numel() and bool((value < 0).any()):
        # an average of squares: each step takes its square root, and a matrix whose root
        # came out NaN was skipped and counted at every step, never to train again
        return (f"state {key!r} of parameter {name!r} holds negative values, which an average "
                f"of squares cannot: the checkpoint was damaged. Load an earlier one.")
    if key == "step" and value.numel() == 1:
        count = float(value)
        if count < 0 or count != int(count):
            return (f"state 'step' of parameter {name!r} is {count}, not a step count (a whole "
                    f"number >= 0)")
    return None


def _group_fields_problem(index: int, saved: dict[str, Any], count: int) -> str | None:
    """What is wrong with a saved group's names, step counter or skip counts, or None
    (checked before anything is loaded: torch would install them, and the next step fail on
    them)."""
    step = saved.get("step", 0)
    if not (is_int(step) and step >= 0):
        return (f"param group {index} has step {step!r}, not a step count (an int >= 0)")
    names = saved.get("param_names")
    if names is not None and not _names_fit(names, list(range(count))):
        return (f"param group {index} has param_names that do not name its {count} "
                f"parameters one to one (a list of distinct strings, one per parameter)")
    skips = saved.get("nonfinite_skips")
    if skips is not None and not (isinstance(skips, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in skips.items())):
        return (f"param group {index} has nonfinite_skips that are not counts by parameter "
                f"name ({{name: int >= 0}})")
    return None

"""What :class:`optim._base.MatrixOptimizer` checks before anything changes: each param group
when it is added, and everything a step reads from its groups when the step starts. A refused
group is not added; a refused step changes no state, parameter or counter."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from optim._caller import user_stacklevel
from optim._checks import (
    ADAMW,
    _check_adamw_hyperparameters,
    _check_dense,
    _refuse_matrix_keys_in_adamw,
    _refuse_unsupported_adam_flags,
    check_group_kind,
    check_health_every,
    check_param_groups,
    free_group_prefix,
    is_int,
    plain_numbers,
)
from optim._health_book import HealthBook

__all__ = ["StepGuards"]


class StepGuards(HealthBook):
    """The checks of :class:`optim._base.MatrixOptimizer`, which sets the attributes."""

    matrix_algorithm: str
    MAX_BATCH_BYTES: int
    _gradient_seen: bool
    _kinds: dict[int, Any]

    def _check_groups(self) -> None:
        check_param_groups(self.param_groups, self.matrix_algorithm, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (e.g. layers unfrozen during training), with what the
        constructor does for its groups: names for unnamed parameters (``group{i}.param{j}``),
        skip counters, and the checks (``algorithm``, 2-D matrices outside AdamW groups); a
        group that fails them is not added.

        Under ``OwnerSharding`` call it on every rank in the same order, as every step: the
        new matrices get owners without moving the existing ones, whose state stays where it is.
        """
        if not isinstance(param_group, dict):  # as torch.optim
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        _refuse_matrix_keys_in_adamw(param_group)
        if not hasattr(self, "_exchange"):  # torch's constructor; ours then checks every group
            super().add_param_group(param_group)
            return
        # a removed group's matrices' last health, until health() dropped it, would be read as
        # the new group's where it takes their names (group{i}.param{j})
        self._drop_gone_health()
        # the caller's dict itself, as torch.optim adds it: later edits to it reach the group;
        # put back as it was if the group is refused (the names written into it made a
        # corrected retry fail on their count)
        group, given = param_group, dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):  # a set: torch says why not
            params = list(params)  # e.g. layer.parameters(), read once
        group["params"] = given["params"] = params  # (a generator, read once, stays read)
        if "param_names" not in group and isinstance(params, list) and \
                not any(isinstance(p, tuple) for p in params):
            # an empty group too (a place to add parameters later, as torch.optim allows):
            # torch refuses a group without names next to named ones
            # group{i} after the last group, past any index a removed group's neighbours hold
            taken = {name.split(".", 1)[0] for g in self.param_groups for name in g["param_names"]}
            prefix = free_group_prefix(len(self.param_groups), taken)
            group["param_names"] = [f"{prefix}.param{i}" for i in range(len(params))]
        try:
            super().add_param_group(group)
        except (TypeError, ValueError):
            group.clear()
            group.update(given)
            raise
        try:
            self._check_groups()
            self._check_hyperparameters(len(self.param_groups) - 1, self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            group.clear()
            group.update(given)
            raise

    def _check_hyperparameters(self, index: int, group: dict[str, Any]) -> None:
        """Raise ValueError, naming the group, for a hyperparameter its update cannot use: a
        group's own values (``[{"params": ..., "lr": ...}]``) bypass the constructor's checks.
        The AdamW group's are checked here (as ``torch.optim.AdamW`` checks them), a matrix
        group's by :meth:`_check_matrix_hyperparameters`."""
        try:
            _refuse_unsupported_adam_flags(group)
            if group["algorithm"] == ADAMW:
                _check_adamw_hyperparameters(group)
            else:
                self._check_matrix_hyperparameters(group)
        except ValueError as exc:
            raise ValueError(f"param group {index}: {exc}") from None
        plain_numbers(group)

    def _check_matrix_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raise ValueError for a matrix group's hyperparameter the update cannot use."""

    def _check_step(self) -> None:
        """Raise, before anything changes, for what this step cannot run with."""
        if torch.is_inference_mode_enabled():
            # the state it would create are inference tensors, which no later step outside
            # inference_mode may update in place: that step failed after moving parameters
            raise RuntimeError(
                f"{type(self).__name__}.step() under torch.inference_mode(): the optimizer "
                f"state it creates could not be updated by any later step. Step outside "
                f"inference_mode (the step runs under torch.no_grad itself).")
        for gi, group in enumerate(self.param_groups):
            if len(group["params"]) != len(group["param_names"]):
                # torch optimizers step a tensor appended to a group's list; here it has no
                # name, no checks, no skip counter and, under OwnerSharding, no owner
                raise ValueError(
                    f"param group {gi} lists {len(group['params'])} parameters and "
                    f"{len(group['param_names'])} names (param_names): parameters put into "
                    f"param_groups[{gi}]['params'] (or taken out) by hand are not set up. "
                    f"Add parameters with optimizer.add_param_group({{'params': [...]}}), "
                    f"which names and checks them, and put the list back as it was.")
        for gi, group in enumerate(self.param_groups):
            # an algorithm edited since the last check (every parameter's shape, read at each
            # step, cost ~0.9 us a parameter; a group's parameters are checked when it is added)
            if self._kinds.get(id(group)) != group["algorithm"]:
                check_group_kind(gi, group, self.matrix_algorithm, type(self).__name__)
                self._kinds[id(group)] = group["algorithm"]
        _check_dense(self.param_groups)
        if not is_int(self.MAX_BATCH_BYTES) or self.MAX_BATCH_BYTES < 0:
            raise ValueError(f"MAX_BATCH_BYTES must be an int >= 0 (float32 bytes per batch of "
                             f"same-shape matrices; 0: one matrix at a time), got "
                             f"{self.MAX_BATCH_BYTES!r}")
        check_health_every(self.health_every)  # an instance attribute a user may have set
        # A group's values may have changed since they were checked (a scheduler, user code):
        # a step with one the update cannot use would fail half-way through the groups.
        for gi, group in enumerate(self.param_groups):
            self._check_hyperparameters(gi, group)
        self._before_step()

    def _before_step(self) -> None:
        """Evaluate and check what a step reads from its groups that can be wrong (e.g. a
        schedule's value), before any state or parameter changes; raise ValueError if it is."""

    def _warn_without_gradient(self, found: bool) -> None:
        """Until a step finds a gradient: warn, once, of a step that found none."""
        warn = not found and bool(self.param_groups)
        self._gradient_seen = found or bool(self.param_groups)  # warned: once (also when the
        if warn:                                                # warning is raised as an error)
            warnings.warn(
                f"{type(self).__name__}.step() found no gradient on any of its parameters "
                f"and changed nothing. Was backward() run? Was the optimizer built after "
                f"fully_shard (which replaces the model's parameters with new ones) and "
                f"anything else that replaces them? (warned once)", RuntimeWarning,
                stacklevel=user_stacklevel())

"""Argument and parameter-group checks shared by every orthoshard optimizer and kernel.

Each raises ``ValueError`` (``RuntimeError`` where torch would) naming the value, what it must be
and how to fix it, before any state changes. The kernels (``optim.orthogonalize``,
``optim.orthogonal``, ``optim.stiefel``) use its number checks too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from optim._exchange import local

if TYPE_CHECKING:
    from optim._exchange import MatrixItem

__all__ = ["ADAMW", "check_betas", "check_flags", "check_group_kind", "check_health_every",
           "check_param_groups", "check_rates", "is_int", "is_real", "require_tensor"]

ADAMW = "adamw"


# Keys a user may take for AdamW's own: the AdamW group reads adamw_betas and adamw_eps, and
# these belong to the matrix optimizer, so in an AdamW group they would be ignored.
_MATRIX_KEYS_ADAMW_IGNORES = ("betas", "eps", "momentum", "nesterov")


def _refuse_matrix_keys_in_adamw(group: Any) -> None:
    """Raise ValueError for an AdamW group (as given) that sets a key AdamW does not read."""
    if not isinstance(group, dict) or group.get("algorithm") != ADAMW:
        return
    given = [key for key in _MATRIX_KEYS_ADAMW_IGNORES if key in group]
    if given:
        raise ValueError(
            f"a param group with algorithm='adamw' sets {', '.join(map(repr, given))}, which "
            f"its AdamW update does not read (they are the matrix optimizer's): give AdamW's "
            f"as adamw_betas=(beta1, beta2) and adamw_eps")


def _check_gradient_layout(item: MatrixItem) -> None:
    """Raise ValueError when this rank's piece of ``item``'s gradient is not shaped as its piece
    of the parameter: a full plain-tensor ``.grad`` set on a sharded (DTensor) parameter, which
    torch accepts, failed inside the exchange with a collective's size mismatch."""
    grad = item.param.grad
    assert grad is not None  # the step passes only matrices with a gradient
    mine, theirs = local(grad).shape, local(item.param).shape
    if mine != theirs:
        raise ValueError(
            f"{item.name}: this rank's gradient has shape {tuple(mine)} ({type(grad).__name__}) "
            f"but its part of the parameter {tuple(theirs)} ({type(item.param).__name__}): set "
            f".grad laid out as the parameter is (a DTensor with its placements, as FSDP2's "
            f"backward does)")


#: Added to a sharded AdamW parameter's finiteness flag by a rank whose gradient of it is not
#: laid out as the parameter: the flags are summed over the ranks, so every rank finds it and
#: refuses the step (:func:`_refuse_misplaced`) before anything is applied. A power of two, exact
#: in any wire dtype, far above the 0/1 flags' sum over any group.
MISPLACED = 2.0**20


def _misplaced(params: list[Tensor]) -> list[int]:
    """The indices of ``params`` whose gradient this rank holds in another shape than its part
    of the parameter (a full plain-tensor ``.grad`` set on a DTensor parameter)."""
    return [i for i, p in enumerate(params)
            if p.grad is not None and local(p.grad).shape != local(p).shape]


def _refuse_misplaced(summed: Tensor, names: Sequence[str]) -> None:
    """Raise ValueError on every rank when any rank flagged a gradient not laid out as its
    parameter (``summed``: the finiteness flags summed over the ranks, :data:`MISPLACED`)."""
    bad = [name for name, value in zip(names, summed.tolist(), strict=True)
           if value >= MISPLACED]
    if bad:
        raise ValueError(
            f"{', '.join(bad)}: on a rank of the sharding group the gradient is not laid out as "
            f"the parameter (a plain-tensor .grad set on a DTensor parameter?): set .grad laid "
            f"out as the parameter is (a DTensor with its placements, as FSDP2's backward "
            f"does). Nothing was applied.")


def _name_unnamed_groups(params: Any) -> Any:
    """Param groups where some carry names (``split_param_groups``' ``param_names``, or
    ``(name, tensor)`` pairs) and some do not (``{"params": [w], "algorithm": "adamw"}``): the
    unnamed get ``group{i}.param{j}``, as :meth:`MatrixOptimizer.add_param_group` names them
    (torch refuses groups "with/without names" mixed). Anything else is returned as it is."""
    if isinstance(params, Tensor):
        return params
    params = list(params)
    if not params or not all(isinstance(g, dict) for g in params):
        return params
    # copies of the caller's group dicts (torch keeps the dicts themselves): the optimizer
    # writes its defaults, step count, algorithm and names into its groups, and a list of
    # groups given to a second optimizer (a notebook's next try, a sweep) then started at the
    # first one's step (a softening schedule read mid-way), or was refused (an AdamW group
    # "setting" the first one's Muon keys; another algorithm). Each group's parameters become
    # a list first.
    for group in params:  # in the caller's dict, as torch keeps it: a generator is read once
        ps = group["params"]
        if isinstance(ps, set):  # left for torch to refuse (an unordered set names nothing)
            return params
        group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
    params = [dict(group) for group in params]
    named = ["param_names" in g or any(isinstance(p, tuple) for p in g["params"])
             for g in params]
    if any(named) and not all(named):
        taken = {_prefix(name) for g in params for name in g.get("param_names", [])} | \
            {_prefix(p[0]) for g in params for p in g["params"]
             if isinstance(p, tuple) and p and isinstance(p[0], str)}
        for i, group in enumerate(params):
            if not named[i]:
                prefix = free_group_prefix(i, taken)
                taken.add(prefix)
                group["param_names"] = [f"{prefix}.param{j}" for j in range(len(group["params"]))]
    return params


def _prefix(name: Any) -> str:
    return name.split(".", 1)[0] if isinstance(name, str) else ""


def free_group_prefix(index: int, taken: set[str]) -> str:
    """``group{index}``, or the first ``group{k}`` after it that no given name starts with:
    an unnamed group's parameters are named ``group{k}.param{j}``, which must not take a name
    the user gave (``"group1.param0"`` in another group was refused as given twice)."""
    while f"group{index}" in taken:
        index += 1
    return f"group{index}"


def check_param_groups(groups: list[dict[str, Any]], matrix_algorithm: str, optimizer: str
                       ) -> None:
    """Check ``groups`` of the optimizer named ``optimizer`` (whose matrix update is
    ``matrix_algorithm``) and complete them in place: names for unnamed parameters, each
    name and tensor given once, skip counters (kept from a loaded group), and 2-D real
    matrices outside the AdamW groups."""
    seen: dict[str, int] = {}  # name -> its group
    tensors: dict[int, str] = {}  # id(parameter) -> its name
    for gi, group in enumerate(groups):
        if group["algorithm"] not in (matrix_algorithm, ADAMW):  # before anything is written
            check_group_kind(gi, group, matrix_algorithm, optimizer)
        if "param_names" not in group:
            group["param_names"] = [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        _check_names(gi, group)
        for name in group["param_names"]:
            if name in seen:  # health, skip counts and checkpoints are keyed by name
                where = f"group {gi}" if seen[name] == gi else f"groups {seen[name]} and {gi}"
                raise ValueError(
                    f"parameter name {name!r} is given twice ({where}); health, skip counts "
                    f"and checkpoints are keyed by name: give each parameter its own, e.g. "
                    f"from model.named_parameters().")
            seen[name] = gi
        for name, p in zip(group["param_names"], group["params"], strict=True):
            # torch only warns within a group; stepped twice, it would take two updates and
            # two weight decays each step, and report its health twice
            if id(p) in tensors:
                raise ValueError(
                    f"parameter {name!r} is the same tensor as {tensors[id(p)]!r}: list each "
                    f"parameter once (model.parameters() already removes shared weights).")
            tensors[id(p)] = name
        # Non-finite skip counts live in the param group so that state_dict() carries them
        # (plain ints, the same keys on every rank); health() reports them.
        saved = group.get("nonfinite_skips") or {}
        group["nonfinite_skips"] = {name: int(saved.get(name, 0))
                                    for name in group["param_names"]}
        check_group_kind(gi, group, matrix_algorithm, optimizer)


def check_group_kind(gi: int, group: dict[str, Any], matrix_algorithm: str, optimizer: str
                     ) -> None:
    """Raise ValueError unless group ``gi``'s ``algorithm`` is the optimizer's matrix update or
    AdamW and, outside AdamW, each of its parameters is a real 2-D matrix. Checked again at
    every step: edited in ``param_groups`` (a typo, ``"AdamW"``), a group ran as the matrix
    update, or failed half-way through a step it had already counted."""
    if group["algorithm"] not in (matrix_algorithm, ADAMW):
        raise ValueError(
            f"param group {gi}: algorithm must be {matrix_algorithm!r} or "
            f"{ADAMW!r}, got {group['algorithm']!r}")
    if group["algorithm"] == ADAMW:
        return
    for name, p in zip(group["param_names"], group["params"], strict=True):
        if p.ndim != 2:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(p.shape)}; {optimizer} "
                f"updates 2-D matrices only. Put it in an algorithm='adamw' group, e.g. "
                f"with optim.split_param_groups(model) (which sends every nn.Embedding "
                f"there too).")
        if p.is_complex():  # as torch.optim.Muon: no polar factor or eigenbasis of these
            raise ValueError(
                f"parameter {name!r} is complex ({p.dtype}); {optimizer} "
                f"updates real matrices only. Put it in an algorithm='adamw' group "
                f"(AdamW handles complex parameters), or optimize its real and "
                f"imaginary parts as real parameters.")


def _check_names(gi: int, group: dict[str, Any]) -> None:
    """Raise ValueError unless the group's ``param_names`` are strings, one per parameter: a
    name keys the parameter's health, skip count and checkpoint entry, and ``load_state_dict``
    refuses any other name (``enumerate(model.parameters())`` named them 0, 1, ...: the
    optimizer stepped, then refused its own state dict)."""
    names, params = group["param_names"], group["params"]
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"param group {gi}: param_names must be a list of strings, got "
                         f"{type(names).__name__}")
    if len(names) != len(params):
        raise ValueError(f"param group {gi}: param_names holds {len(names)} names for "
                         f"{len(params)} parameters; give one name per parameter, in the same "
                         f"order")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(
                f"param group {gi}: the name of parameter {i} is {name!r} "
                f"({type(name).__name__}); names must be strings, e.g. from "
                f"model.named_parameters() (not enumerate(model.parameters())).")


def check_rates(**rates: Any) -> None:
    """Raise ValueError unless each named value (``lr``, ``weight_decay``; a float or a one-element
    tensor) is a finite number >= 0: an infinite one turns every parameter non-finite at the
    first step, a negative learning rate ascends the loss."""
    for name, value in rates.items():
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.is_complex():
                raise ValueError(f"{name} must be a number or a one-element real tensor, got a "
                                 f"tensor of shape {tuple(value.shape)} ({value.dtype})")
            number = float(value)
        elif is_real(value):
            number = float(value)
        else:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r} "
                             f"({type(value).__name__})")
        if not 0.0 <= number < math.inf:  # also NaN
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def plain_numbers(group: dict[str, Any]) -> None:
    """Replace the NumPy scalars among ``group``'s hyperparameters (a sweep's ``np.float64``
    learning rate, an ``np.float32`` a scheduler wrote, in a tuple of betas too) by Python's:
    ``torch.load(weights_only=True)`` refuses a checkpoint holding a NumPy value."""
    for key, value in group.items():
        if key not in ("params", "param_names"):
            plain = _plain(value)
            if plain is not value:
                group[key] = plain


def _plain(value: Any) -> Any:
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, tuple | list):
        items = [_plain(v) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return type(value)(items)
    return value


def as_scalar(value: Any) -> Any:
    """``value`` as an ``alpha`` of ``add_`` takes it: a one-element tensor of any shape as a
    0-d view of it (as torch's optimizers squeeze one), anything else as it is."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.reshape(())
    return value


def require_tensor(value: Any, name: str) -> None:
    """Raise TypeError unless ``value`` is a torch Tensor: a NumPy array or a list failed deep
    inside (``'int' object is not callable``, ``no attribute 'is_floating_point'``)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} needs a torch.Tensor, got {type(value).__name__}; convert it "
                        f"with torch.as_tensor(...)")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``steps=True`` would silently mean 1): Python's int and
    NumPy's integer scalars."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_health_every(value: Any) -> None:
    """Raise ValueError unless ``value`` is an int >= 0 (``health_every``; 0: never). The
    optimizers check it at construction and again at each step, since it is an attribute a user
    may set on the instance."""
    if not is_int(value) or value < 0:
        raise ValueError(f"health_every must be an int >= 0 (measure health at step 1 and every "
                         f"this many steps after; 0: never), got {value!r}")


def is_real(value: Any) -> bool:
    """A real number that is not a bool: Python's int and float, and NumPy's scalars (an LR
    scheduler may write ``np.float32`` into a group)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_flags(d: dict[str, Any], *names: str) -> None:
    """Raise ValueError unless each named entry of ``d`` is a bool: ``nesterov="false"`` is a
    true string, which would silently turn the option on."""
    for name in names:
        if not isinstance(d[name], bool):
            raise ValueError(f"{name} must be True or False, got {d[name]!r} "
                             f"({type(d[name]).__name__})")


def check_betas(name: str, betas: Any) -> None:
    """Raise ValueError unless ``betas`` are two decay rates in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
            is_real(b) and 0.0 <= b < 1.0
            for b in betas):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {betas!r}")


# AdamW's flags that would change the update, set in a group copied from an AdamW setup; the
# updates here have neither (nor torch.optim.Muon), so a set one is refused, not ignored.
_UNSUPPORTED_ADAM_FLAGS = {
    "maximize": "every update here descends: negate the loss to ascend",
    "amsgrad": "the AdamW group runs plain AdamW: leave amsgrad out (or False)",
}


def _refuse_unsupported_adam_flags(group: dict[str, Any]) -> None:
    """Raise ValueError for a group that turns ``maximize`` or ``amsgrad`` on (no update here
    reads them: an ascent would silently descend)."""
    for key, fix in _UNSUPPORTED_ADAM_FLAGS.items():
        if group.get(key, False):  # False, 0, numpy's False: what AdamW reads as off
            raise ValueError(f"{key}={group[key]!r} is not supported ({fix})")


def _check_adamw_hyperparameters(group: dict[str, Any]) -> None:
    """The AdamW fallback group's hyperparameters, checked as ``torch.optim.AdamW`` does."""
    check_rates(lr=group["lr"], weight_decay=group["weight_decay"])
    check_betas("adamw_betas", group["adamw_betas"])
    if not is_real(group["adamw_eps"]) or not group["adamw_eps"] >= 0.0:
        raise ValueError(f"adamw_eps must be a number >= 0, got {group['adamw_eps']!r}")


def _check_dense(groups: list[dict[str, Any]]) -> None:
    """Raise, naming the parameter and the fix, for a sparse gradient (``nn.Embedding(...,
    sparse=True)``): no update here, AdamW fallback included, reads one; for a parameter on
    the meta device (no values); and for a gradient set on an integer or bool parameter (no
    gradient step is defined for those; frozen ones, e.g. packed weights, are skipped as any
    parameter without a gradient)."""
    for group in groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            if p.grad is not None and not (p.is_floating_point() or p.is_complex()):
                raise ValueError(
                    f"parameter {name!r} is {p.dtype} and has a gradient; optimizers update "
                    f"floating-point parameters: convert it (e.g. .float()), or leave it "
                    f"without a gradient (frozen) or out of the optimizer.")
            if p.grad is not None and p.is_meta:
                raise RuntimeError(
                    f"parameter {name!r} is on the meta device, which holds no values to "
                    f"update: materialize the model first (e.g. model.to_empty(device=...) "
                    f"and initialize it).")
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    f"parameter {name!r} has a sparse gradient, which this optimizer cannot "
                    f"use: build its module with sparse=False (e.g. nn.Embedding(..., "
                    f"sparse=False)), or give it to a sparse optimizer such as "
                    f"torch.optim.SparseAdam and leave it out of this one.")

"""Muon's arguments: their checks, the shape-adjusted learning rate, the softening schedule's
value at a step, and the Newton-Schulz step count that follows a group's ``ns_method``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from optim._checks import ADAMW, check_rates, is_int, is_real
from optim.orthogonalize import JORDAN_QUINTIC, METHODS, default_steps

Softening = float | Callable[[int], float]


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, int]) -> float:
    """Muon's shape-dependent learning rate, exactly as ``torch.optim.Muon`` (which divides by
    zero on a matrix without columns; it has no entries to scale, so ``lr`` is returned)."""
    a, b = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, a / b)) if b else lr
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(a, b)))  # torch's grouping: bit-identical lr
    raise ValueError(
        f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


class _UnsetSteps(int):
    """``ns_steps``' default: equal to ``torch.optim.Muon``'s 5 (so the signatures agree and the
    quintic runs 5 iterations), but recognisable as "not given", so that a group with another
    ``ns_method`` runs that method's own count (:func:`optim.orthogonalize.default_steps` in
    bfloat16: Polar Express 6, CANS 9) instead of 5. On a 256x96 Gaussian matrix 5 steps leave
    CANS's singular values in [0.28, 1.80] (orthogonality error 1.33, worse than the quintic's
    0.38; 5.2e-3 at 9 steps) and Polar Express's in [0.87, 1.12] (0.17; 4.0e-3 at 6)."""

    def __repr__(self) -> str:
        return int.__repr__(self)


#: the default of ``ns_steps`` (compares equal to 5: see :class:`_UnsetSteps`)
NS_STEPS_UNSET = _UnsetSteps(5)


def _own_count(method: Any) -> int:
    """A method's own Newton-Schulz step count (:func:`optim.orthogonalize.default_steps` in
    bfloat16; the quintic: 5, as ``torch.optim.Muon``); 5 for ``"svd"``, which counts no steps,
    and for an unknown method, which the group's check refuses."""
    if isinstance(method, str) and method in METHODS and method != "svd":
        return default_steps(method, torch.bfloat16)
    return 5


def settle_steps(group: dict[str, Any]) -> None:
    """Replace an unset ``ns_steps`` (:data:`NS_STEPS_UNSET`) in ``group`` by a plain int, its
    method's own count (:func:`_own_count`; 5 for an AdamW group, which does not read it), and
    record that method in ``ns_steps_auto`` (None where ``ns_steps`` was given), so that the
    count follows a later change of ``ns_method`` (:func:`follow_method`). No group keeps the
    marker, so a state dict holds only plain values (``torch.load``'s ``weights_only`` refuses
    unknown classes)."""
    if type(group.get("ns_steps")) is not _UnsetSteps:
        group.setdefault("ns_steps_auto", None)
        return
    method = group.get("ns_method") if group.get("algorithm") != ADAMW else None
    group["ns_steps"] = _own_count(method)
    group["ns_steps_auto"] = method if isinstance(method, str) else None


def follow_method(group: dict[str, Any]) -> None:
    """Keep a group's derived ``ns_steps`` its method's own count when ``ns_method`` changes
    during training (5 quintic steps leave CANS far from orthogonal: :class:`_UnsetSteps`).
    ``ns_steps_auto`` names the method the count was derived for; a count the user changed
    (it no longer equals that method's) is theirs from then on (``ns_steps_auto`` None), as is
    every count once ``ns_steps_auto`` is set to None."""
    auto = group.get("ns_steps_auto")
    if auto is None or group.get("algorithm") == ADAMW:
        return
    if group["ns_steps"] != _own_count(auto):
        group["ns_steps_auto"] = None
    elif group["ns_method"] != auto:
        group["ns_steps"] = _own_count(group["ns_method"])
        group["ns_steps_auto"] = group["ns_method"]


def softening_at(softening: Softening, step: int) -> float:
    s = softening(step) if callable(softening) else softening
    if not is_real(s) or not 0.0 <= s <= 1.0:
        what = f"softening({step}) (the schedule)" if callable(softening) else "softening"
        raise ValueError(f"{what} must be a number in [0, 1], got {s!r}")
    return float(s)


def check_health_probes(value: Any) -> None:
    if value is not None and not (is_int(value) and value >= 0):
        raise ValueError(f"health_probes must be None (automatic), 0 (exact) or a number of "
                         f"probes >= 1, got {value!r}")


def check_muon_args(lr: float, weight_decay: float, momentum: float, ns_steps: int,
                     ns_method: str, softening: Softening, adjust_lr_fn: str | None,
                     ns_coefficients: Any, eps: float) -> None:
    check_rates(lr=lr, weight_decay=weight_decay)
    if not (is_real(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not is_int(ns_steps) or not 0 <= ns_steps < 100:  # 0, as torch: the normalized input
        raise ValueError(f"ns_steps must be an int in [0, 100), got {ns_steps!r}")
    if ns_method not in METHODS:
        raise ValueError(f"ns_method must be one of {METHODS}, got {ns_method!r}")
    if not callable(softening):
        softening_at(softening, 0)
    adjusted_lr(1.0, adjust_lr_fn, (1, 1))
    if not (isinstance(ns_coefficients, (tuple, list)) and len(ns_coefficients) == 3
            and all(is_real(c) and math.isfinite(c)
                    for c in ns_coefficients)):
        raise ValueError(f"ns_coefficients must be the (a, b, c) of the quintic, three finite "
                         f"numbers (default {JORDAN_QUINTIC}), got {ns_coefficients!r}")
    if not (is_real(eps) and 0.0 <= eps < math.inf):
        raise ValueError(f"eps (the floor of Newton-Schulz's normalizing norm) must be a finite "
                         f"number >= 0, got {eps!r}")

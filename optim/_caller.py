"""How a step meets its caller: warnings that point at the user's ``step()`` call, and a step
that runs eagerly when a ``torch.compile``'d function calls it."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["eager_under_compile", "user_stacklevel"]

# torch's files, this package's and the sharding layer's (which calls the owner compute)
_INTERNAL_FILES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep,
                   os.path.join(os.path.dirname(os.path.dirname(__file__)), "sharding") + os.sep)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by its caller point at the first frame
    outside torch and this package: the user's ``step()`` call, whatever wraps the step
    (torch's hooks, a graph break under compile, an LR scheduler)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_FILES):
        frame, level = frame.f_back, level + 1
    return level


def eager_under_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run eagerly when a ``torch.compile``'d function calls it (a graph break). The
    disabling wrapper is made at the first call, not at import: ``torch.compiler.disable``
    imports torch._dynamo and inductor, 1.6 s of every process's start-up (measured). With it
    at import, the restart of a killed rank under torchrun (tests/test_train_dist.py) failed to
    reconnect its process group in 3 of 5 runs, and in none of 5 without. torch.optim's own
    methods import it at their first call likewise."""
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def eager(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return eager

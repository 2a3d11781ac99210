"""Stopping a training job between steps: a SIGTERM caught on any rank ends the step in
progress on every rank (see :mod:`orthoshard.train`), also within a ``--step-delay``."""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DELAY_SLICE_S", "STOP_POLL_S", "StopRequest", "delay"]

# how often a --step-delay's sleep looks for a stop request (SIGTERM) on its own rank, and
# how often the ranks tell each other of one (an all-reduce closing each slice of the delay)
STOP_POLL_S = 0.1
DELAY_SLICE_S = 1.0


def delay(seconds: float, stop: StopRequest, device: torch.device) -> None:
    """``--step-delay``: sleep ``seconds``, ended on every rank within ~:data:`DELAY_SLICE_S`
    once one of them is asked to stop. A SIGTERM may reach some ranks only (one node's
    torchrun stopped), and a rank that woke alone waited in the next step's all-reduce while
    the others slept on: a delay longer than torchrun's grace (30 s) let it kill them before
    they checkpointed. Each slice ends in an all-reduce of the stop flags, as many on every
    rank, so they leave the delay together."""
    slices = max(1, math.ceil(seconds / DELAY_SLICE_S))
    for _ in range(slices):
        stop.sleep(seconds / slices)
        asked = torch.tensor(float(stop.requested), device=device)
        dist.all_reduce(asked)
        if asked.item() > 0:
            return


class StopRequest:
    """SIGTERM, caught while training: ``requested`` turns True and the step in progress goes
    on (the loop stops after it, on every rank). The handler is installed for the ``with``
    block and the previous one put back after it. Every SIGTERM in the block is caught, not
    only the first: SLURM and systemd signal every process of a job or unit, torchrun passes its
    own signal on as well, and a rank that took the second one as "stop now" died mid-step
    without its checkpoint. SIGKILL, which torchrun, docker and SLURM send once their grace
    period is over, still ends a rank that is stuck."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _caught(self, signum: int, frame: Any) -> None:
        self.requested = True

    def sleep(self, seconds: float) -> None:
        """``time.sleep(seconds)``, cut short by a stop request: a ``--step-delay`` longer
        than torchrun's grace period (30 s) let it kill the ranks before they checkpointed.
        A signal's handler runs within a sleep, which then resumes, so the flag is read
        every :data:`STOP_POLL_S`."""
        end = time.monotonic() + seconds
        while not self.requested and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, STOP_POLL_S))

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # else Python cannot catch
            previous = signal.signal(signal.SIGTERM, self._caught)
            # None: a handler installed from outside Python, which cannot be put back
            self._previous = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

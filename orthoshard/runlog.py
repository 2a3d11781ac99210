"""What a training job writes as it goes: the progress bar and loss log on rank 0, each rank's
health log, and each rank's final report."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLog", "last_logged", "log_file"]


def log_file(path: Path, mode: str) -> Any:
    """``path`` opened for JSON lines; appended to, on a line of its own: a line cut short
    by a rank killed mid-write would have run into the resumed run's first record."""
    f = path.open(mode)
    if mode == "a" and f.tell() > 0:
        with path.open("rb") as tail:
            tail.seek(-1, os.SEEK_END)
            if tail.read(1) != b"\n":
                f.write("\n")
    return f


class RunLog:
    """Progress bar and loss log on rank 0, health log and final report on every rank."""

    def __init__(self, out: Path, rank: int, start: int, steps: int, progress: bool,
                 log_every: int = 0) -> None:
        self.out, self.rank = out, rank
        self.steps_run = 0
        self.steps, self.log_every = steps, log_every if rank == 0 else 0
        self.since = (start, time.monotonic())  # the last step line's step and time
        # a run from step 0 starts its logs over: appended to an earlier run's (a new run
        # under docker compose keeps the out volume), its steps 1, 2, ... followed that run's
        # and the runbooks' "loss around that step" read two runs
        mode = "a" if start > 0 else "w"
        self.health_file = log_file(out / f"health-rank{rank}.jsonl", mode)
        self.loss_file = log_file(out / "loss.jsonl", mode) if rank == 0 else None
        self.bar = None
        if rank == 0 and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step")

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the logs and the progress bar (also after an error on the way)."""
        if self.bar is not None:
            self.bar.close()
        self.health_file.close()
        if self.loss_file is not None:
            self.loss_file.close()

    def _logged_health(self, step: int) -> dict[str, Any]:
        return last_logged(self.out / f"health-rank{self.rank}.jsonl", step)

    def step(self, step: int, loss: float, health: dict[str, dict[str, float]]) -> None:
        self.steps_run += 1
        self.health_file.write(json.dumps({"step": step, "time": time.time(),
                                           "params": health}) + "\n")
        self.health_file.flush()
        if self.loss_file is not None:
            self.loss_file.write(json.dumps({"step": step, "loss": loss, "time": time.time()})
                                 + "\n")
            self.loss_file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}")
            self.bar.update(1)
        if self.log_every and (step % self.log_every == 0 or step == self.steps):
            then, at = self.since
            now = time.monotonic()
            rate = (step - then) / (now - at) if now > at else math.inf
            print(f"step {step}/{self.steps} loss {loss:.4f} ({rate:.2f} steps/s)", flush=True)
            self.since = (step, now)

    def finish(self, optimizer: Any, final: dict[str, torch.Tensor], entropy: float,
               final_step: int, *, run_id: str | None = None) -> None:
        self.close()  # the logs are complete: a report read from them finds every line
        # A restart that resumed at the last step (a rank died after the final checkpoint)
        # trained nothing, and a loaded optimizer has measured nothing: the health of the last
        # step is the one this rank logged then.
        health = optimizer.health() if self.steps_run else self._logged_health(final_step)
        # comm_stats count from this process's start: after a restart or a resume, the steps
        # since the checkpoint it continued from
        report = {"rank": self.rank, "final_step": final_step, "run_id": run_id,
                  "health": health,
                  "comm_stats": {**optimizer.comm_stats(), "steps": self.steps_run},
                  "entropy_rate": entropy,
                  "optimizer": type(optimizer).__name__,
                  "use_kl_shampoo": any(bool(g.get("use_kl_shampoo", False))
                                        for g in optimizer.param_groups)}
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(report, indent=1))
        if self.rank == 0:
            torch.save(final, self.out / "final_params.pt")


def last_logged(path: Path, step: int) -> dict[str, Any]:
    """The ``params`` of the last record of ``step`` in the health log ``path`` ({} if none)."""
    found: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                if record.get("step") == step and isinstance(record.get("params"), dict):
                    found = record["params"]
    return found

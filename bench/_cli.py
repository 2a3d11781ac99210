"""Command-line checks shared by the benchmarks: counts, durations and matrix sizes must be
positive, and a CPU-time clock needs one thread; and the benchmarks' exit on a signal."""

from __future__ import annotations

import argparse
import signal
import statistics


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (``--steps 0`` used to mean the default, silently)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a timeout of 0 failed every run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def shape_list(text: str) -> list[tuple[int, int]]:
    """argparse type: comma-separated matrix sizes ``MxN`` with M, N >= 1 (``''``: none)."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        dims = item.lower().split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) >= 1 for d in dims):
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a matrix size: write rows x columns, both at least 1, "
                f"e.g. 128x64 (several: 128x64,512x256)")
        out.append((int(dims[0]), int(dims[1])))
    return out


def ratio_quartiles(ratios: list[float]) -> tuple[float, float]:
    """The lower and upper quartiles of per-round ratios, within them: the "inclusive" method
    (the default "exclusive" one extrapolated past the data when there were 2 or 3 rounds)."""
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def check_cpu_time(parser: argparse.ArgumentParser, cpu_time: bool, threads: int | None) -> None:
    """Refuse ``--cpu-time`` unless ``--threads 1``: ``time.thread_time`` counts the calling
    thread only, so work on torch's other threads would go uncounted, and uncounted unevenly
    (single-threaded operations in full, parallel ones in part)."""
    if cpu_time and threads != 1:
        given = "no --threads" if threads is None else f"--threads {threads}"
        parser.error(f"--cpu-time reads this thread's CPU time only: pass --threads 1 with it "
                     f"(got {given})")


def exit_on_signals() -> None:
    """End this process on SIGTERM or SIGHUP as on an error: through its ``finally`` clauses,
    which stop what it started (a sidecar, rank processes). Signalled alone (``kill PID``,
    not its whole process group), a benchmark left them running, orphaned."""
    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)

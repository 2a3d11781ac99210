"""Command-line checks shared by the benchmarks: counts must be positive, and a CPU-time clock
needs one thread."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (``--steps 0`` used to mean the default, silently)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_cpu_time(parser: argparse.ArgumentParser, cpu_time: bool, threads: int | None) -> None:
    """Refuse ``--cpu-time`` unless ``--threads 1``: ``time.thread_time`` counts the calling
    thread only, so work on torch's other threads would go uncounted, and uncounted unevenly
    (single-threaded operations in full, parallel ones in part)."""
    if cpu_time and threads != 1:
        given = "no --threads" if threads is None else f"--threads {threads}"
        parser.error(f"--cpu-time reads this thread's CPU time only: pass --threads 1 with it "
                     f"(got {given})")

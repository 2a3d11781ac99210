"""The test harness's own promises: what a timed-out multi-process test leaves behind."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import run_whole

pytestmark = [pytest.mark.multiprocess]

# a parent that starts a child in a session of its own, as torchrun starts its ranks, and hangs
HANGING_PARENT = """
import subprocess, sys, time
print("started the child", file=sys.stderr, flush=True)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_a_timed_out_command_leaves_no_process_behind_even_in_another_session():
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_whole([sys.executable, "-c", HANGING_PARENT], timeout=5)
    child = int(caught.value.output.split()[0])
    assert "started the child" in str(caught.value)  # the report shows where it hung
    deadline = time.monotonic() + 10  # SIGKILL is immediate; the reaping by init may lag
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)

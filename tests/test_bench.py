"""The benchmarks run: each measures internals that change with the code (a bench that broke
with them printed nothing, and its README figures could not be reproduced). The smallest
settings, for a few seconds; the numbers themselves are the bench's to report, not a test's."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, run_whole

pytestmark = [pytest.mark.multiprocess]


@pytest.mark.timeout(90)
def test_the_sidecar_bench_runs_to_its_table():
    # it crashed after every measurement, before printing any (Checkpointer.close lost its
    # default timeout)
    proc = run_whole([sys.executable, "bench/sidecar.py", "--ranks", "1", "--params", "5",
                      "--rounds", "3"], timeout=80, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("/metrics fresh (ms)", "publish() calling thread (us)", "ingest (snapshots/s",
                "Store.ingest alone, 5 params"):
        assert row in proc.stdout, proc.stdout

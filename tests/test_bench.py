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


def test_bench_arguments_are_checked_before_anything_runs(monkeypatch):
    import argparse

    monkeypatch.syspath_prepend(str(ROOT))  # the scripts put the root on sys.path themselves
    from bench._cli import positive_float, shape_list

    assert shape_list("128x64, 512X256,") == [(128, 64), (512, 256)]
    assert shape_list("") == []
    # each used to pass on: a traceback later ('abc', '5'), an empty matrix timed as a result
    # ('0x5'), or a run killed at once (a timeout of 0)
    for bad in ("abc", "5", "0x5", "4x4x4", "-2x3", "2.5x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a matrix size"):
            shape_list(bad)
    assert positive_float("0.5") == 0.5
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)


@pytest.mark.timeout(90)
def test_the_emerging_comparison_fails_where_it_cannot_compare():
    # without Emerging-Optimizers it printed SKIP and exited 0: a run that measured nothing
    # read as a success (the project's venv has no Emerging-Optimizers: see the script)
    proc = run_whole([sys.executable, "bench/soap_vs_emerging.py", "--sizes", "16x8"],
                     timeout=80, cwd=ROOT)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "emerging-optimizers is not importable here" in proc.stderr
    proc = run_whole([sys.executable, "bench/soap_vs_emerging.py", "--sizes", "0x5"],
                     timeout=80, cwd=ROOT)
    assert proc.returncode == 2 and "'0x5' is not a matrix size" in proc.stderr, proc.stderr


@pytest.mark.timeout(90)
def test_soap_health_with_nothing_to_measure_prints_only_the_error():
    # its table header went to stdout before the refusal
    proc = run_whole([sys.executable, "bench/soap_health.py", "--shapes", ""], timeout=80,
                     cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert "nothing to measure: --shapes '' without --model" in proc.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("argv", "message"), [
    # it ran the full-size lone-matrix rows, --quick ignored
    (["--quick", "--shapes", "16x8"], "--quick sizes the --model rows (d_model 64)"),
    # it blamed a "--threads 2" never given (the default)
    (["--cpu-time"], "pass --threads 1 with it (got no --threads)"),
])
def test_soap_health_refuses_options_it_would_not_honour(argv, message):
    proc = run_whole([sys.executable, "bench/soap_health.py", *argv], timeout=80, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert message in proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
def test_the_sharding_bench_counts_every_all_to_all_form(tmp_path, world):
    # an input without rows raised IndexError, and one without split sizes (an even split)
    # counted 0 bytes
    import torch
    from _dist import run_ranks
    from _sharding_workers import comm_counter_worker

    run_ranks(comm_counter_worker, world, tmp_path, str(tmp_path / "counts"))
    row = 4 * 4  # float32 bytes of a row of 4
    for rank in range(world):
        counted = torch.load(tmp_path / f"counts.{rank}")
        others = [r for r in range(world) if r != rank]
        assert counted["splits"] == (sum(1 + r for r in others) * row,
                                     (world - 1) * (1 + rank) * row)
        assert counted["even"] == ((world - 1) * 2 * row,) * 2
        assert counted["functional, no rows"] == (0, 0)


def test_the_ratio_quartiles_stay_within_the_measured_ratios():
    # statistics.quantiles' default ("exclusive") printed 0.750-2.250 for per-round ratios of
    # 1.0 and 2.0 (bench --steps 2), a spread wider than anything measured
    sys.path.insert(0, str(ROOT))
    from bench._cli import ratio_quartiles

    assert ratio_quartiles([1.0, 2.0]) == (1.25, 1.75)
    assert ratio_quartiles([2.0, 1.0, 3.0]) == (1.5, 2.5)
    assert ratio_quartiles([1.1]) == (1.1, 1.1)
    for ratios in ([0.9, 1.3], [1.0, 1.02, 0.97, 1.4, 1.1]):
        low, high = ratio_quartiles(ratios)
        assert min(ratios) <= low <= high <= max(ratios)

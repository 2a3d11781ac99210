"""Arguments the demo and the training job refuse before starting anything (no processes, no
sidecar): each names the flag and what it needs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from orthoshard import demo, train


def _demo_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps and --nproc must be >= 1"),
    (["--kl-shampoo"], "--kl-shampoo applies to --optimizer soap"),
    (["--spike-at", "300"], "--spike-at must be a step in [0, --steps=300)"),
    (["--spike-at", "-1"], "--spike-at must be a step"),
    (["--resume"], "need --checkpoint-dir"),
    (["--checkpoint-every", "5"], "need --checkpoint-dir"),
    (["--max-restarts", "-1"], "must be >= 0"),
    (["--step-delay", "-0.5"], "must be >= 0"),
    (["--linger", "-2"], "--linger must be >= 0 seconds, or -1"),
    (["--sidecar-port", "70000"], "--sidecar-port must be a TCP port"),
    (["--sidecar-port", "-5"], "--sidecar-port must be a TCP port"),
    (["--rotation-hold", "-1"], "--rotation-hold must be >= 0 seconds"),
])
def test_the_demo_refuses_arguments_it_cannot_honour(argv, message):
    problem = demo._argument_problem(_demo_args(*argv))
    assert problem is not None and message in problem


@pytest.mark.parametrize("argv", [
    [], ["--optimizer", "soap", "--kl-shampoo", "--spike-at", "150"], ["--linger", "-1"],
    ["--checkpoint-dir", "ckpt", "--checkpoint-every", "50", "--resume", "--max-restarts", "2"],
])
def test_the_demo_takes_what_the_readme_shows(argv):
    assert demo._argument_problem(_demo_args(*argv)) is None


@pytest.mark.parametrize("argv", [
    [], ["--max-restarts", "2"], ["--optimizer", "soap", "--kl-shampoo", "--spike-at", "150"],
    ["--checkpoint-dir", "ckpt", "--checkpoint-every", "50", "--max-restarts", "2"],
    ["--checkpoint-dir", "ckpt", "--resume"],
])
def test_what_the_demo_hands_the_training_job_is_accepted_there(argv):
    # restarts without a checkpoint directory start over: no --resume (which needs one)
    train_argv = demo._train_argv(_demo_args(*argv), "http://127.0.0.1:9400", Path("token"))
    assert train.parse_args(train_argv).steps == 300


@pytest.mark.parametrize(("argv", "message"), [
    (["--resume"], "need --checkpoint-dir"),
    (["--kl-shampoo"], "--kl-shampoo applies to --optimizer soap"),
    (["--steps", "10", "--spike-at", "10"], "--spike-at must be a step in [0, --steps=10)"),
    (["--step-delay", "-1"], "must be >= 0"),
    (["--layers", "0"], "--layers must be >= 1"),
])
def test_the_training_job_refuses_arguments_it_cannot_honour(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("pointer", ["", "step-000040"])
def test_a_latest_pointer_to_no_checkpoint_is_refused_by_name(tmp_path, pointer):
    # it raised a bare FileNotFoundError from deep inside DCP's load on every rank
    (tmp_path / "step-000020").mkdir()
    (tmp_path / "LATEST").write_text(pointer)
    with pytest.raises(FileNotFoundError, match=r"LATEST names .* remove LATEST to start"):
        train.Checkpoints(tmp_path).latest()
    (tmp_path / "LATEST").write_text("step-000020\n")
    assert train.Checkpoints(tmp_path).latest() == tmp_path / "step-000020"
    assert train.Checkpoints(None).latest() is None

"""Arguments the demo and the training job refuse before starting anything (no processes, no
sidecar): each names the flag and what it needs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from orthoshard import checkpoints, demo, runlog, train
from service.client import Publisher


def _demo_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps and --nproc must be >= 1"),
    (["--nproc", "65"], "--nproc 65: the local demo runs every rank on this machine, at most 64"),
    (["--kl-shampoo"], "--kl-shampoo applies to --optimizer soap"),
    (["--spike-at", "301"], "--spike-at must be a step in [1, --steps=300] (steps count from 1"),
    (["--spike-at", "0"], "--spike-at must be a step in [1, --steps=300]"),
    (["--spike-at", "-1"], "--spike-at must be a step"),
    (["--resume"], "need --checkpoint-dir"),
    (["--checkpoint-every", "5"], "need --checkpoint-dir"),
    # it trained and wrote no checkpoint at all
    (["--checkpoint-dir", "ckpt"], "--checkpoint-dir without --checkpoint-every N would write "
                                   "no checkpoint"),
    (["--max-restarts", "-1"], "must be >= 0"),
    (["--step-delay", "-0.5"], "must be >= 0"),
    (["--linger", "-2"], "--linger must be >= 0 seconds and at most 1e+09, or -1"),
    (["--sidecar-port", "70000"], "--sidecar-port must be a TCP port"),
    (["--sidecar-port", "-5"], "--sidecar-port must be a TCP port"),
    (["--rotation-hold", "-1"], "--rotation-hold must be >= 0 seconds"),
    # not a number or not finite: they started the sidecar and torchrun, then failed (or, for
    # --linger, slept for ever)
    (["--step-delay", "inf"], "--step-delay must be >= 0 seconds and at most 1e+09"),
    (["--step-delay", "nan"], "--step-delay must be >= 0 seconds and at most 1e+09"),
    (["--linger", "nan"], "--linger must be >= 0 seconds and at most 1e+09, or -1"),
    (["--linger", "inf"], "--linger must be >= 0 seconds and at most 1e+09, or -1"),
    # finite, yet past time.sleep's limit: OverflowError once the run had trained (exit 1)
    (["--step-delay", "1e20"], "--step-delay must be >= 0 seconds and at most 1e+09"),
    (["--linger", "1e20"], "--linger must be >= 0 seconds and at most 1e+09, or -1"),
    (["--rotation-hold", "inf"], "--rotation-hold must be >= 0 seconds and under the "
                                 "sidecar's series TTL, 900 s"),
    # the sidecar refused it, after --out had been cleared of the last run's results
    (["--rotation-hold", "900"], "--rotation-hold must be >= 0 seconds and under the "
                                 "sidecar's series TTL, 900 s, got 900.0"),
])
def test_the_demo_refuses_arguments_it_cannot_honour(argv, message):
    problem = demo._argument_problem(_demo_args(*argv))
    assert problem is not None and message in problem


def test_the_demo_checks_its_arguments_without_importing_torch():
    # it imported orthoshard.train for the checks it shares with the job, and torch with it:
    # ~2.5 s before the sidecar started, in every demo run
    code = ("import argparse, sys\n"
            "from orthoshard import demo\n"
            "p = argparse.ArgumentParser()\n"
            "demo.add_arguments(p)\n"
            "assert demo._argument_problem(p.parse_args(['--optimizer', 'soap'])) is None\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize("argv", [
    [], ["--optimizer", "soap", "--kl-shampoo", "--spike-at", "150"], ["--linger", "-1"],
    ["--checkpoint-dir", "ckpt", "--checkpoint-every", "50", "--resume", "--max-restarts", "2"],
    ["--nproc", "64"],  # the most the local demo starts
])
def test_the_demo_takes_what_the_readme_shows(argv):
    assert demo._argument_problem(_demo_args(*argv)) is None


@pytest.mark.parametrize("argv", [
    [], ["--max-restarts", "2"], ["--optimizer", "soap", "--kl-shampoo", "--spike-at", "150"],
    ["--checkpoint-dir", "ckpt", "--checkpoint-every", "50", "--max-restarts", "2"],
    ["--checkpoint-dir", "ckpt", "--resume"],
    ["--out", "elsewhere", "--step-delay", "0.25", "--steps", "7"],  # not the job's defaults
])
def test_what_the_demo_hands_the_training_job_is_accepted_there(argv, tmp_path, monkeypatch):
    # restarts without a checkpoint directory start over: no --resume (which needs one)
    monkeypatch.chdir(tmp_path)  # the job's check creates the relative --checkpoint-dir
    token = tmp_path / "token"
    token.write_text("t" * 32)  # the demo writes it before it launches the ranks
    token.chmod(0o600)
    given = _demo_args(*argv)
    train_argv = demo._train_argv(given, "http://127.0.0.1:9400", token)
    got = train.parse_args(train_argv)
    # every setting the job reads arrives as the demo was given it (the job's defaults filled
    # in for a dropped one, unnoticed)
    assert (got.steps, got.optimizer, got.kl_shampoo, got.spike_at, got.out) == \
        (given.steps, given.optimizer, given.kl_shampoo, given.spike_at, given.out)
    assert (got.checkpoint_dir, got.checkpoint_every) == \
        (given.checkpoint_dir, given.checkpoint_every if given.checkpoint_dir else 0)
    # a restarted group resumes from its checkpoint (restarts without one start over)
    assert got.resume == (given.checkpoint_dir is not None
                          and (given.resume or given.max_restarts > 0))
    assert (got.sidecar_url, got.token_file, got.step_delay) == \
        ("http://127.0.0.1:9400", token, given.step_delay)


@pytest.mark.parametrize(("argv", "message"), [
    (["--resume"], "need --checkpoint-dir"),
    (["--kl-shampoo"], "--kl-shampoo applies to --optimizer soap"),
    (["--steps", "10", "--spike-at", "11"], "--spike-at must be a step in [1, --steps=10]"),
    (["--step-delay", "-1"], "must be >= 0"),
    (["--step-delay", "nan"], "--step-delay must be >= 0 seconds and at most 1e+09"),
    (["--step-delay", "1e20"], "--step-delay must be >= 0 seconds and at most 1e+09"),
    (["--checkpoint-dir", "ckpt", "--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--layers", "0"], "--layers must be >= 1"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    # the data's generator seeds overflowed 64 bits: a traceback from every rank's first batch
    (["--seed", str(10**16)], "--seed must be an integer in [-1000000000000, 1000000000000], "
                              "got 10000000000000000"),
    (["--seed", str(-10**13)], "--seed must be an integer in [-1000000000000, 1000000000000]"),
    # each failed inside every rank, after the process group was up: a traceback per rank
    (["--d-model", "30"], "--d-model 30 must be a multiple of the model's 4 attention heads"),
    (["--token-file", "/nonexistent/token"], "--token-file: cannot read token file "
                                             "/nonexistent/token"),
    # a spike of nan / inf made every matrix skip that step, reported as a spike
    (["--spike-at", "1", "--spike-scale", "nan"], "--spike-scale must be a finite number > 0"),
    (["--spike-at", "1", "--spike-scale=-inf"], "--spike-scale must be a finite number > 0"),
    (["--spike-at", "1", "--spike-scale", "0"], "--spike-scale must be a finite number > 0"),
    (["--log-every", "-1"], "--log-every must be >= 0"),
    # the run trained to the end and exit 0 with every snapshot refused (HTTP 401)
    (["--sidecar-url", "http://127.0.0.1:9400"], "--sidecar-url / --sidecar-uds need "
                                                 "--token-file"),
    (["--sidecar-uds", "/run/orthoshard.sock"], "need --token-file"),
    (["--sidecar-url", "not a url"], "--sidecar-url must be the sidecar's http(s)://host[:port]"),
    # a traceback (urlsplit's "Invalid IPv6 URL"), exit 1
    (["--sidecar-url", "http://[::1"], "--sidecar-url must be the sidecar's http(s)://host"),
    # taken, then every send failed in the background, retried as an unreachable sidecar
    (["--sidecar-uds", ""], "--sidecar-uds must be the path of the sidecar's Unix socket"),
    (["--sidecar-uds", "/tmp/" + "s" * 120], "a Unix socket's path holds at most 107 (start the "
                                             "sidecar's --uds in a shorter directory)"),
    # accepted here, then refused by the Publisher on every rank once its model was set up
    (["--sidecar-url", "http://host:port"], "--sidecar-url must be the sidecar's http(s)://host"),
    (["--sidecar-url", "localhost:9400"], "--sidecar-url must be the sidecar's http(s)://host"),
    # trained to the end, exit 0, every snapshot refused (404 at /v1/v1/snapshots)
    (["--sidecar-url", "http://127.0.0.1:9400/v1"], "the path '/v1' is not the sidecar's base"),
])
def test_the_training_job_refuses_arguments_it_cannot_honour(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("url", ["https://sidecar.example.com", "http://sidecar-3",
                                 "http://127.0.0.1:9400/"])
def test_the_training_job_takes_every_url_the_publisher_takes(url, tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    assert train.parse_args(["--sidecar-url", url, "--token-file", str(token)]).sidecar_url == url
    Publisher(url=url, run_id="r").close(timeout_s=0.1)


@pytest.mark.parametrize("pointer", ["", "step-000040"])
def test_a_latest_pointer_to_no_checkpoint_is_refused_by_name(tmp_path, pointer):
    # it raised a bare FileNotFoundError from deep inside DCP's load on every rank
    (tmp_path / "step-000020").mkdir()
    (tmp_path / "LATEST").write_text(pointer)
    with pytest.raises(FileNotFoundError, match=r"LATEST names .* remove LATEST to start"):
        checkpoints.Checkpoints(tmp_path).latest()
    (tmp_path / "LATEST").write_text("step-000020\n")
    assert checkpoints.Checkpoints(tmp_path).latest() == tmp_path / "step-000020"
    assert checkpoints.Checkpoints(None).latest() is None


def test_a_latest_pointer_to_no_checkpoint_stops_the_job_before_any_rank_starts(tmp_path,
                                                                                  capsys):
    # parse_args let it through, and every rank raised it in a traceback, on every attempt
    (tmp_path / "LATEST").write_text("step-000099")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--checkpoint-dir", str(tmp_path), "--resume", "--steps", "10"])
    assert exit_info.value.code == 2
    assert "LATEST names 'step-000099', which is not a checkpoint directory" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--sidecar-url", "http://127.0.0.1:9400", "--token-file", "TOKEN"],
    ["--checkpoint-dir", "CKPT", "--checkpoint-every", "5"],  # kept with each checkpoint
])
def test_a_run_id_the_sidecar_would_refuse_stops_the_job_before_any_rank_starts(
        tmp_path, monkeypatch, capsys, argv):
    # refused by the Publisher in every rank once its model was built (a traceback each), or
    # saved unchecked with the checkpoints, for a later resume with a sidecar to fail on
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    argv = [a.replace("TOKEN", str(token)).replace("CKPT", str(tmp_path / "ckpt"))
            for a in argv]
    monkeypatch.setenv("ORTHOSHARD_RUN_ID", "bad id")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert "ORTHOSHARD_RUN_ID 'bad id' would be refused by the sidecar" in capsys.readouterr().err
    monkeypatch.setenv("ORTHOSHARD_RUN_ID", "good-id.1")
    assert train.parse_args(argv).steps > 0


def test_an_out_that_is_no_writable_directory_stops_the_job_before_its_process_group(
        tmp_path, monkeypatch, capsys):
    # --out was created inside every rank once the process group was up: FileExistsError in a
    # traceback per rank. (Under a launcher every rank refuses it together, through the group:
    # tests/test_train_dist.py.)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for launcher in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(launcher, raising=False)
    started = []
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **k: started.append(a))
    for out, message in ((blocker, f"--out {blocker} is not a directory"),
                         (blocker / "out", f"--out {blocker / 'out'} is not writable")):
        assert train.main(["--out", str(out), "--steps", "1"]) == 2
        assert message in capsys.readouterr().err
    assert started == []


def test_the_jobs_logs_are_closed_also_when_a_step_raises(tmp_path):
    # the health and loss logs were left open (a ResourceWarning each) on every path
    with pytest.raises(RuntimeError), runlog.RunLog(tmp_path, 0, 0, 2, False) as log:
        log.step(1, 1.0, {})
        raise RuntimeError("a step failed")
    assert log.health_file.closed and log.loss_file is not None and log.loss_file.closed
    assert (tmp_path / "loss.jsonl").read_text().count("\n") == 1


def test_a_log_line_cut_short_by_a_killed_rank_is_skipped_and_the_resume_starts_a_new_line(
        tmp_path, capsys):
    # a rank killed mid-write leaves a line without its end; the resumed run appended its first
    # record to it, and the demo's summary and plot raised JSONDecodeError on the merged line
    from orthoshard import report

    (tmp_path / "loss.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    (tmp_path / "health-rank0.jsonl").write_text('{"step": 1, "params": {}}\n{"ste')
    with runlog.RunLog(tmp_path, 0, 2, 3, False) as log:  # resumed from the step-2 checkpoint
        log.step(3, 1.5, {"w": {"update_rms": 0.5}})
    assert report.load_losses(tmp_path) == {1: 2.0, 3: 1.5}
    assert report.load_health(tmp_path) == {"w": {"update_rms": {3: 0.5}}}
    err = capsys.readouterr().err
    assert "loss.jsonl: skipped 1 line(s) that are no JSON record" in err
    assert "health-rank0.jsonl: skipped 1 line(s)" in err


def test_restarts_into_another_runs_checkpoints_are_refused(tmp_path):
    # torchrun --max-restarts makes every attempt resume from LATEST, the first one too: a new
    # run in a directory holding another run's checkpoints continued that run
    (tmp_path / "step-000010").mkdir()
    (tmp_path / "LATEST").write_text("step-000010")
    argv = ["--checkpoint-dir", str(tmp_path), "--checkpoint-every", "5", "--max-restarts", "1"]
    problem = demo._argument_problem(_demo_args(*argv))
    assert problem is not None and "pass --resume to continue that run" in problem
    assert demo._argument_problem(_demo_args(*argv, "--resume")) is None
    assert demo._argument_problem(_demo_args(*argv[:-2])) is None  # no restarts: starts over
    (tmp_path / "LATEST").unlink()
    assert demo._argument_problem(_demo_args(*argv)) is None  # an empty directory


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    # it trained up to the first checkpoint, then every rank died in NotADirectoryError
    path = tmp_path / "afile"
    path.write_text("")
    argv = ["--checkpoint-dir", str(path), "--checkpoint-every", "1"]
    problem = demo._argument_problem(_demo_args(*argv))
    assert problem is not None and f"--checkpoint-dir {path} is not a directory" in problem
    with pytest.raises(SystemExit):
        train.parse_args(argv)


@pytest.mark.parametrize(("latest", "message"), [
    ("step-999999", "names 'step-999999', which is not a checkpoint directory"),
    ("step-000004", "is at step 4, not before --steps 4: nothing is left to train"),
    ("step-000006.1", "is at step 6, not before --steps 4"),
])
def test_a_resume_that_cannot_continue_is_refused_before_any_rank_starts(tmp_path, latest,
                                                                         message):
    # each raised inside every rank (a traceback per rank), or trained 0 steps and exited 0
    for name in ("step-000002", "step-000004", "step-000006.1"):
        (tmp_path / name).mkdir()
    (tmp_path / "LATEST").write_text(latest)
    argv = ["--checkpoint-dir", str(tmp_path), "--resume", "--steps", "4"]
    problem = demo._argument_problem(_demo_args(*argv))
    assert problem is not None and message in problem
    (tmp_path / "LATEST").write_text("step-000002")
    assert demo._argument_problem(_demo_args(*argv)) is None


def test_a_resume_past_the_spike_is_refused_before_any_rank_starts(tmp_path):
    # the run trained from the checkpoint on, never spiked, and summary.json and health.png
    # said it had
    (tmp_path / "step-000020").mkdir()
    (tmp_path / "LATEST").write_text("step-000020")
    argv = ["--checkpoint-dir", str(tmp_path), "--resume", "--steps", "25"]
    problem = demo._argument_problem(_demo_args(*argv, "--spike-at", "5"))
    assert problem is not None and "past --spike-at 5" in problem
    # the checkpoint's own step trained already; the next one is still ahead
    problem = demo._argument_problem(_demo_args(*argv, "--spike-at", "20"))
    assert problem is not None and "trains from step 21 on" in problem
    assert demo._argument_problem(_demo_args(*argv, "--spike-at", "21")) is None


def test_clearing_the_last_runs_outputs_leaves_other_files_alone(tmp_path):
    # the glob rank*.json took ranking.json too, and sidecar.db* a sidecar.db.bak
    ours = ["rank0.json", "rank12.json", "summary.json", "health.png", "final_params.pt",
            "health-rank0.jsonl", "loss.jsonl", "sidecar.db", "sidecar.db-wal", "sidecar.db-shm"]
    theirs = ["ranking.json", "rank-notes.json", "rankings-2025.json", "sidecar.db.bak",
              "health-rank-old.jsonl", "notes.txt"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    demo._fresh_outputs(tmp_path, resume=True)  # keeps the logs and the history
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs + ours[5:])
    demo._fresh_outputs(tmp_path, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def _save_one_step(directory: Path, optimizer: str, *, kl_shampoo: bool = False) -> None:
    """A DCP checkpoint ``step-000002`` (and LATEST) of the demo's ``optimizer`` after one step
    on a small model, saved in this process."""
    import torch
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    opt = train.build_optimizer(optimizer, model, steps=4, kl_shampoo=kl_shampoo)
    model(torch.randn(3, 6)).square().mean().backward()
    opt.step()
    with warnings.catch_warnings():  # DCP says it saves in one process, as it is asked to
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(directory / "step-000002"),
                 no_dist=True)
    (directory / "LATEST").write_text("step-000002")


@pytest.mark.parametrize("saved", ["muon", "normuon", "soap"])
def test_a_resume_with_another_optimizer_is_refused_before_any_rank_starts(tmp_path, saved,
                                                                          capsys):
    # it failed inside every rank, a traceback each, on DCP's missing key
    _save_one_step(tmp_path, saved)
    for other in ("muon", "normuon", "soap"):
        argv = ["--checkpoint-dir", str(tmp_path), "--resume", "--optimizer", other]
        problem = demo._argument_problem(_demo_args(*argv))
        if other == saved:
            assert problem is None
            assert train.parse_args(argv).optimizer == other
        else:
            assert problem is not None and f"resume it with --optimizer {saved}" in problem
            # the job itself (as compose runs it, with no demo before it) refuses it too: it
            # failed in every rank, and torchrun restarted the group into the same failure
            with pytest.raises(SystemExit) as exit_info:
                train.parse_args(argv)
            assert exit_info.value.code == 2
            assert f"resume it with --optimizer {saved}" in capsys.readouterr().err


@pytest.mark.parametrize("saved_kl", [False, True])
def test_a_demo_resume_with_the_other_kl_shampoo_setting_is_refused_before_launch(tmp_path,
                                                                                 saved_kl):
    # it failed inside every rank, a traceback each, on the training job's own check
    _save_one_step(tmp_path, "soap", kl_shampoo=saved_kl)
    argv = ["--checkpoint-dir", str(tmp_path), "--resume", "--optimizer", "soap"]
    same = ["--kl-shampoo"] if saved_kl else []
    other = [] if saved_kl else ["--kl-shampoo"]
    assert demo._argument_problem(_demo_args(*argv, *same)) is None
    problem = demo._argument_problem(_demo_args(*argv, *other))
    expected = "with KL-Shampoo" if saved_kl else "without KL-Shampoo"
    assert problem is not None and f"was saved by SOAP {expected} factors" in problem


@pytest.mark.parametrize(("saved", "flag"), [(False, True), (True, False)])
def test_resuming_soap_with_the_other_kl_shampoo_setting_is_refused(saved, flag):
    # loading takes the checkpoint's groups: --kl-shampoo over a plain SOAP checkpoint ran plain
    # SOAP while rank*.json and summary.json said KL-Shampoo
    import torch

    from optim.soap import SOAP

    opt = SOAP([torch.nn.Parameter(torch.zeros(4, 3))], lr=1e-3, use_kl_shampoo=saved)
    args = _demo_args("--optimizer", "soap", "--checkpoint-dir", "ckpt", "--resume",
                      *(["--kl-shampoo"] if flag else []))
    with pytest.raises(ValueError, match=r"resume it (with|without) --kl-shampoo"):
        train._check_resumed_flags(opt, args)
    same = _demo_args("--optimizer", "soap", *(["--kl-shampoo"] if saved else []))
    train._check_resumed_flags(opt, same)  # the setting it was saved with


def test_the_footer_of_a_run_that_logged_no_loss_says_so(tmp_path, capsys):
    from orthoshard import report

    args = _demo_args("--out", str(tmp_path))
    summary = {"optimizer": "Muon", "use_kl_shampoo": False, "initial_loss": None,
               "final_loss": None, "entropy_rate": None,
               "bytes_communicated": {"0": {"bytes_sent": 10, "steps": 0}}}
    report.print_footer(args, summary, "http://127.0.0.1:9400")
    assert "no loss logged" in capsys.readouterr().out


def test_the_footers_history_command_runs_as_pasted_with_spaces_in_the_path(tmp_path, capsys):
    # printed unquoted, "--db /tmp/my run/sidecar.db" split into two arguments
    import shlex

    from orthoshard import report

    out = tmp_path / "my run"
    args = _demo_args("--out", str(out))
    summary = {"optimizer": "Muon", "use_kl_shampoo": False, "initial_loss": 4.3,
               "final_loss": 2.0, "entropy_rate": None, "steps": 3,
               "bytes_communicated": {"0": {"bytes_sent": 10, "steps": 3}}}
    report.print_footer(args, summary, "http://127.0.0.1:9400")
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("history:")]
    argv = shlex.split(line.removeprefix("history:").split("   serves")[0])
    at = argv.index("sidecar")
    assert argv[at:] == ["sidecar", "--port", "9400", "--db", str(out / "sidecar.db"),
                         "--token-file", str(out / "sidecar.token")]


def test_the_footer_counts_bytes_over_the_steps_since_the_last_restart(tmp_path, capsys):
    # a 30-step run restarted at step 20 read "over the 10 steps this run took"
    from orthoshard import report

    args = _demo_args("--out", str(tmp_path))
    for ran, says in ((10, "over the 10 steps since the last (re)start"),
                      (30, "over the 30 steps this run took")):
        summary = {"optimizer": "Muon", "use_kl_shampoo": False, "initial_loss": 4.3,
                   "final_loss": 2.0, "entropy_rate": None, "steps": 30,
                   "bytes_communicated": {"0": {"bytes_sent": 10, "steps": ran}}}
        report.print_footer(args, summary, "http://127.0.0.1:9400")
        assert says in capsys.readouterr().out


def test_a_step_logged_by_two_ranks_plots_the_later_record(tmp_path):
    # a resume at another world size re-runs steps after its checkpoint with other owners: the
    # higher rank's log won whatever was written last (the abandoned run's values plotted)
    from orthoshard import report

    def log(rank: int, *records: tuple[int, float, float]) -> None:
        (tmp_path / f"health-rank{rank}.jsonl").write_text("".join(
            json.dumps({"step": step, "time": when, "params": {"w": {"update_rms": value}}})
            + "\n" for step, when, value in records))

    log(1, (21, 100.0, 0.5), (22, 101.0, 0.6))  # the first run's owner, abandoned after 22
    log(0, (21, 200.0, 0.7), (22, 201.0, 0.8), (23, 202.0, 0.9))  # the resumed run's
    assert report.load_health(tmp_path)["w"]["update_rms"] == {21: 0.7, 22: 0.8, 23: 0.9}


def test_a_resume_at_fewer_ranks_summarizes_the_ranks_that_ran(tmp_path):
    import json

    from orthoshard import report

    out = tmp_path
    (out / "rank3.json").write_text("left by a 4-rank run")  # removed before the run starts
    demo._fresh_outputs(out, resume=True)
    assert not (out / "rank3.json").exists()
    for r in range(4):  # and a file that appears anyway is not read for a 2-rank run
        (out / f"rank{r}.json").write_text(json.dumps({
            "rank": r, "health": {f"w{r}": {"x": float(r)}}, "optimizer": "Muon",
            "entropy_rate": 1.0, "comm_stats": {"bytes_sent": 1, "steps": 3}}))
    summary = report.write_summary(_demo_args("--out", str(out), "--nproc", "2"), {}, 1.0)
    assert set(summary["health"]) == {"w0", "w1"}
    assert set(summary["bytes_communicated"]) == {"0", "1"}


def test_an_output_directory_it_cannot_write_is_named_before_anything_starts(tmp_path, monkeypatch,
                                                                             capsys):
    # a read-only --out passed mkdir and failed later, writing the sidecar's token, with a
    # traceback (exit 1); root may write anywhere but on a read-only mount, as simulated here
    import errno

    real = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    real_open = Path.open

    def read_only_open(self, mode="r", *args, **kwargs):  # the writability probe's way in
        if self.parent == tmp_path and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "open", read_only_open)
    started = []
    monkeypatch.setattr(demo, "Sidecar", lambda *a, **k: started.append(a))
    assert demo.run(_demo_args("--out", str(tmp_path), "--steps", "2")) == 2
    assert started == []
    assert f"cannot use --out {tmp_path}: Read-only file system" in capsys.readouterr().err


def test_a_checkpoint_dir_it_cannot_create_is_named_before_anything_starts(tmp_path,
                                                                          monkeypatch, capsys):
    # mkdir's own error escaped the "not writable" message, in a traceback on every rank
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    directory = blocker / "ckpt"
    with pytest.raises(OSError, match=rf"--checkpoint-dir {directory} is not writable"):
        checkpoints.Checkpoints(directory).check_writable()
    started = []
    monkeypatch.setattr(demo, "Sidecar", lambda *a, **k: started.append(a))
    argv = ["--out", str(tmp_path / "out"), "--steps", "2", "--checkpoint-dir", str(directory),
            "--checkpoint-every", "1"]
    assert demo.run(_demo_args(*argv)) == 2
    assert started == []
    assert f"--checkpoint-dir {directory} is not writable" in capsys.readouterr().err
    checkpoints.Checkpoints(tmp_path / "fine").check_writable()
    assert list((tmp_path / "fine").iterdir()) == []  # the probe is gone


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_end_the_demo_through_its_cleanup(tmp_path, monkeypatch, sig):
    # SIGHUP (the terminal closed) must stop torchrun, which runs in a session of its own: the
    # demo ends on it as on SIGTERM, by SystemExit through the finally clauses that stop the
    # trainers and the sidecar (tests/test_demo.py sends SIGTERM to a running demo), and puts
    # the handlers it found back
    import os
    import signal
    import time

    number = getattr(signal, sig)
    cleaned = []

    def run_until_signalled(args):
        try:
            os.kill(os.getpid(), number)
            time.sleep(5)  # the handler raises before this ends
        finally:
            cleaned.append(True)
        return 0

    monkeypatch.setattr(demo, "_run", run_until_signalled)
    # handlers of the test's own meanwhile: a signal the demo did not handle would otherwise
    # end the test process, and is recorded instead
    missed: list[int] = []

    def record(signum, frame):
        missed.append(signum)

    before = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as exit_info:
            demo.run(_demo_args("--out", str(tmp_path), "--steps", "2"))
        assert exit_info.value.code == 128 + number and cleaned == [True] and missed == []
        assert all(signal.getsignal(s) is record for s in before)  # put back
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _health_log(out, params: dict[str, dict[str, float]], steps: int = 3) -> None:
    import json

    with (out / "health-rank0.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "params": params}) + "\n")
    (out / "loss.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in range(1, steps + 1)))


PLOT_CASES = {
    # a Muon run drew four empty SOAP panels ("not reported by this optimizer") beside its two
    "muon": ({"w": {"orthogonality_error": 0.35, "update_rms": 0.2, "softening": 0.1,
                    "nonfinite_skips": 0.0}},
             ["orthogonality_error", "update_rms"]),
    "soap": ({"w": {"eigengap_ratio_L": 0.5, "rotation_degrees_L_k1": 1.0,
                    "rotation_degrees_L_k8": 2.0, "basis_staleness_L": 0.01,
                    "eigengap_ratio_R": 0.4, "nonfinite_skips": 0.0}},
             ["rotation_degrees_L_k1", "rotation_degrees_L_k8", "eigengap_ratio_L",
              "basis_staleness_L"]),
    "skips": ({"w": {"orthogonality_error": 0.35, "nonfinite_skips": 2.0}},
              ["orthogonality_error", "nonfinite_skips"]),
    "no health": ({}, []),
}


@pytest.mark.parametrize("case", PLOT_CASES)
def test_health_png_draws_the_metrics_the_run_reported(tmp_path, case):
    from orthoshard import report

    params, metrics = PLOT_CASES[case]
    _health_log(tmp_path, params)
    assert [m for _, m in report.health_panels(report.load_health(tmp_path))] == metrics
    path = report.plot(tmp_path, spike_at=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_names_its_benchmarks_and_refuses_an_unknown_one(capsys) -> None:
    from orthoshard import cli

    # every script but the shared helpers (bench/_cli.py), which run nothing
    names = sorted(p.stem for p in (Path(cli.__file__).parent.parent / "bench").glob("*.py")
                   if not p.stem.startswith("_"))
    assert "sharding" in names and "sidecar" in names and "_cli" not in names
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert f"one of: {', '.join(names)}" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["bench", "no_such_bench"]) == 2
    assert f"unknown benchmark 'no_such_bench'; available: {', '.join(names)}" in \
        capsys.readouterr().err
    # none named: argparse said "the following arguments are required: name, rest"
    assert cli.main(["bench"]) == 2
    assert f"name a benchmark, one of: {', '.join(names)}" in capsys.readouterr().err


def test_bench_without_the_benchmarks_says_where_they_run(tmp_path, monkeypatch, capsys):
    # a wheel (pip install . without -e) has no bench/: "unknown benchmark 'sharding';
    # available: " named nothing
    from orthoshard import cli

    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path / "bench")
    assert cli.main(["bench", "sharding"]) == 2
    assert "they run from a clone of the repository" in capsys.readouterr().err


def test_a_demo_still_serving_its_out_is_left_alone_by_a_second_one(tmp_path, monkeypatch,
                                                                    capsys):
    # the second deleted the first's results, logs, live database and token, then stopped
    # (its sidecar refused by the first's lock), pointing at a --db the demo does not have
    from service.store import Store

    out = tmp_path / "out"
    out.mkdir()
    kept = {name: f"the first demo's {name}" for name in (
        "summary.json", "health.png", "loss.jsonl", "health-rank0.jsonl", "sidecar.token")}
    for name, text in kept.items():
        (out / name).write_text(text)
    serving = Store(str(out / "sidecar.db"), history_max_rows=10)  # as its sidecar holds it
    started = []
    monkeypatch.setattr(demo, "Sidecar", lambda *a, **k: started.append(a))
    try:
        assert demo.run(_demo_args("--out", str(out), "--steps", "2")) == 2
        assert (out / "sidecar.db").exists()
    finally:
        serving.close()
    assert started == []
    err = capsys.readouterr().err
    assert f"--out {out} is in use: another sidecar" in err and "pass another --out" in err
    assert {name: (out / name).read_text() for name in kept} == kept
    # once it stopped, the next demo clears them as usual
    assert demo._outputs_problem(_demo_args("--out", str(out))) is None
    assert not (out / "summary.json").exists() and not (out / "loss.jsonl").exists()


def test_a_taken_sidecar_port_is_named_by_the_demos_option(tmp_path, monkeypatch, capsys):
    # the sidecar's own message said "choose another --port", an option the demo does not have
    import socket

    started = []
    monkeypatch.setattr(demo, "Sidecar", lambda *a, **k: started.append(a))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert demo.run(_demo_args("--out", str(tmp_path), "--sidecar-port", str(port))) == 2
    assert started == []
    assert f"--sidecar-port {port} is taken on 127.0.0.1" in capsys.readouterr().err


def test_a_sidecar_gone_before_the_summary_still_leaves_the_summary_and_the_plot(
        tmp_path, monkeypatch, capsys):
    # httpx.ConnectError in a traceback, and neither summary.json nor health.png, although
    # training had finished and both come from its files
    import httpx

    class Gone:
        url, token_file = "http://127.0.0.1:9", tmp_path / "token"

        def __init__(self, *args):
            self.proc = argparse.Namespace(poll=lambda: -9)

        def params(self):
            raise httpx.ConnectError("[Errno 111] Connection refused")

        def stop(self):
            pass

    def trained(args, sidecar):
        _health_log(tmp_path, {"w": {"orthogonality_error": 0.3, "update_rms": 0.2}})
        (tmp_path / "rank0.json").write_text(json.dumps({
            "rank": 0, "health": {"w": {"update_rms": 0.2}}, "optimizer": "Muon",
            "entropy_rate": 1.0, "comm_stats": {"bytes_sent": 1, "steps": 3}}))
        return 0

    monkeypatch.setattr(demo, "Sidecar", Gone)
    monkeypatch.setattr(demo, "_torchrun", trained)
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)
    assert demo.run(_demo_args("--out", str(tmp_path), "--steps", "3")) == 1
    err = capsys.readouterr().err
    assert "the sidecar did not answer" in err and "it exited with code -9" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_loss"] == 4.0 / 3 and summary["health_served_by_sidecar"] == {}
    assert (tmp_path / "health.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resume_that_writes_its_run_id_needs_a_writable_checkpoint_dir(tmp_path):
    # the run keeps its id in the directory: a --resume that starts a new run there died in
    # each rank's mkdir (a traceback), after the sidecar and torchrun had started
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    directory = blocker / "ckpt"
    argv = ["--out", str(tmp_path / "out"), "--checkpoint-dir", str(directory), "--resume"]
    assert checkpoints.writes_directory(directory, resume=True, every=0)
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    # resuming a checkpoint that has its run id writes nothing there: a read-only one will do
    done = tmp_path / "done"
    (done / "step-000004").mkdir(parents=True)
    (done / "LATEST").write_text("step-000004")
    (done / checkpoints.RUN_ID_FILE).write_text("abc")
    assert not checkpoints.writes_directory(done, resume=True, every=0)
    assert checkpoints.writes_directory(done, resume=False, every=0)  # a new run: a new id
    assert checkpoints.writes_directory(done, resume=True, every=2)
    # ... also where only the checkpoint keeps it (the step directory and LATEST copied alone)
    (done / checkpoints.RUN_ID_FILE).unlink()
    assert checkpoints.writes_directory(done, resume=True, every=0)
    (done / "step-000004" / checkpoints.RUN_ID_FILE).write_text("abc")
    assert not checkpoints.writes_directory(done, resume=True, every=0)


def test_a_restarted_group_resumes_and_a_first_attempt_refuses_another_runs_latest(
        tmp_path, monkeypatch):
    # without --resume a restarted group started over from step 0 (the docstring promises it
    # resumes where the last checkpoint was), and the first attempt, were it to resume, could
    # continue another run's LATEST. Which attempt it is, orthoshard.agreement decides over
    # every rank (restarted: any rank's restart count above 0); here both are asked for.
    from orthoshard.agreement import own_problem
    from orthoshard.train_args import keep_restart_refusal

    argv = ["--checkpoint-dir", str(tmp_path), "--checkpoint-every", "5"]
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    args = train.parse_args(argv)
    assert args.resume and own_problem(args, None, restarted=False) is None  # a new run
    (tmp_path / "step-000005").mkdir()
    (tmp_path / "LATEST").write_text("step-000005")
    args = train.parse_args(argv)  # a restarted group: this run's own LATEST by now
    assert args.resume and own_problem(args, None, restarted=True) is None
    # a new launch into that directory: refused, and so is every attempt torchrun restarts
    # after the refusal (the first such attempt resumed the other run, and exited 0)
    first = own_problem(args, None, restarted=False)
    assert first is not None and "pass --resume to continue that run" in first
    assert "refused at this launch's first attempt" not in first
    keep_restart_refusal(args)
    for _ in range(2):
        again = own_problem(train.parse_args(argv), None, restarted=True)
        assert again is not None and "pass --resume to continue that run" in again
        assert "refused at this launch's first attempt" in again
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not train.parse_args(argv).resume  # no restarts: a new run next to the old one
    # the launch after it, with --resume: its restarts resume too
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    args = train.parse_args([*argv, "--resume"])
    assert args.resume and own_problem(args, None, restarted=True) is None
    # an empty directory again (the old run removed): a first attempt takes it and clears the
    # kept refusal, and its restarts resume its own checkpoints
    (tmp_path / "LATEST").unlink()
    args = train.parse_args(argv)
    assert args.resume and own_problem(args, None, restarted=False) is None
    keep_restart_refusal(args)
    assert not (tmp_path / "REFUSED").exists()
    (tmp_path / "LATEST").write_text("step-000005")
    assert own_problem(train.parse_args(argv), None, restarted=True) is None


def test_the_footer_names_a_command_this_shell_can_run(monkeypatch):
    # it said "orthoshard sidecar ...", which scripts/demo.sh's venv, not activated, does not
    # put on the PATH
    import shutil

    from orthoshard import report

    beside = Path(sys.executable).parent / "orthoshard"
    assert beside.exists()  # the entry point the project's install puts beside python
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert Path(report._command()).resolve() == beside.resolve()
    monkeypatch.setattr(shutil, "which", lambda name: str(beside))
    assert report._command() == "orthoshard"


def test_a_sidecar_token_file_error_names_the_path_as_given(tmp_path, capsys) -> None:
    # the option-name rewrite of the settings' errors also ran over the token file's, and a
    # directory named host, port or uds in its path came out as --host, --port, --uds
    from orthoshard import cli

    token = tmp_path / "host" / "port" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("short")
    token.chmod(0o600)
    assert cli.main(["sidecar", "--token-file", str(token), "--db", str(tmp_path / "db"),
                     "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert str(token) in err and "too short" in err, err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_the_checkpoints_a_failed_load_points_back_to_are_earlier_whole_and_of_its_run(
        tmp_path):
    # every other step-* directory was offered as "an earlier complete checkpoint": a later
    # one, one a crash left without its metadata, another run's in the same directory
    # (following the advice continued that run) and one cut short after its metadata
    import torch.distributed.checkpoint as dcp

    for name, run in (("step-000001", "r"), ("step-000002", "r"), ("step-000004", "r"),
                      ("step-000004.1", "r"), ("step-000006", "r"), ("step-000005", "other"),
                      ("step-000003.1", "r"), ("step-000002.1", None), ("notes", "r")):
        dcp.save({"w": torch.arange(64.0)}, checkpoint_id=str(tmp_path / name))
        if run is not None:
            (tmp_path / name / checkpoints.RUN_ID_FILE).write_text(run)
    (tmp_path / "step-000003").mkdir()  # a save cut short before its metadata
    (data,) = (tmp_path / "step-000003.1").glob("*.distcp")
    data.write_bytes(data.read_bytes()[:10])  # cut short after it
    # step-000004 was saved before step-000004.1 (the same step saved again); a checkpoint
    # without a run id may be this run's
    assert checkpoints.complete_before(tmp_path, tmp_path / "step-000004.1") == \
        ["step-000004", "step-000002.1", "step-000002", "step-000001"]
    assert checkpoints.complete_before(tmp_path, tmp_path / "step-000006") == \
        ["step-000004.1", "step-000004", "step-000002.1", "step-000002", "step-000001"]
    assert checkpoints.complete_before(tmp_path, tmp_path / "step-000001") == []
    # a failed checkpoint without a run id: every run's whole checkpoints before it
    assert checkpoints.complete_before(tmp_path, tmp_path / "step-000006.1") == \
        ["step-000006", "step-000005", "step-000004.1", "step-000004", "step-000002.1",
         "step-000002", "step-000001"]


def test_a_failed_checkpoint_load_names_each_error_with_its_type():
    # an EOFError (a file cut short) has no message: the error read "... on ranks [0, 1]: ."
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from sharding.checkpoint import _failed

    stack = traceback.StackSummary()
    same = CheckpointException("load", {0: (EOFError(), stack), 1: (EOFError(), stack)})
    assert _failed("load", "ckpt/step-000004", same) == (
        "torch.distributed.checkpoint could not load ckpt/step-000004 on ranks [0, 1]: EOFError")
    mixed = CheckpointException("load", {1: (EOFError(), stack),
                                         0: (OSError(5, "Input/output error"), stack)})
    assert _failed("load", "d", mixed) == (
        "torch.distributed.checkpoint could not load d on ranks [0, 1]: OSError: [Errno 5] "
        "Input/output error (ranks [0]); EOFError (ranks [1])")


ONE_PROCESS_DCP = "ignore:torch.distributed is disabled:UserWarning"


def test_the_demo_tells_a_signalled_torchrun_from_a_failed_run():
    # orthoshard._torchrun exits 128 + the signal that stopped it (torchrun: 1 and a traceback)
    assert demo._torchrun_outcome(143) == "training stopped: torchrun got SIGTERM (exit 143)"
    assert demo._torchrun_outcome(130) == "training stopped: torchrun got SIGINT (exit 130)"
    assert demo._torchrun_outcome(1) == "training failed (torchrun exit 1)"
    assert demo._torchrun_outcome(137) == "training failed (torchrun exit 137)"  # SIGKILL


@pytest.mark.filterwarnings(ONE_PROCESS_DCP)
def test_a_failed_demo_names_the_checkpoint_its_resume_continues_from(tmp_path):
    # a SIGTERM to torchrun: the ranks checkpointed the step they stopped after, and the demo
    # said only "training failed (torchrun exit 1)"
    assert demo._resumable(None, 20) == ""
    assert demo._resumable(tmp_path, 20) == ""  # no LATEST: nothing to resume
    import torch.distributed.checkpoint as dcp

    from orthoshard.checkpoints import checkpoint_damage

    dcp.save({"w": torch.arange(64.0)}, checkpoint_id=str(tmp_path / "step-000011"))
    (tmp_path / "LATEST").write_text("step-000011")
    assert demo._resumable(tmp_path, 20) == \
        f"; its last checkpoint is {tmp_path / 'step-000011'}: --resume continues from it"
    # the last step's checkpoint: the demo's --resume refuses it (nothing left to train)
    assert demo._resumable(tmp_path, 11) == (
        f"; its last checkpoint, {tmp_path / 'step-000011'}, is of step 11: training reached "
        f"--steps 11, and what failed came after it")
    # the checkpoint a failed --resume could not load: it said "--resume continues from it"
    (data,) = (tmp_path / "step-000011").glob("*.distcp")
    data.write_bytes(data.read_bytes()[:100])
    assert demo._resumable(tmp_path, 20).startswith(
        f"; its last checkpoint, {tmp_path / 'step-000011'}, cannot be resumed: {data.name} is "
        f"cut short (100 bytes, its .metadata lists ")
    (tmp_path / "LATEST").write_text("step-000099")  # names none: said by --resume itself
    assert demo._resumable(tmp_path, 20) == ""
    # a checkpoint whose metadata lists no file: nothing checked, so no "whole" verdict
    dcp.save({}, checkpoint_id=str(tmp_path / "empty"))
    assert checkpoint_damage(tmp_path / "empty") == \
        "its .metadata lists no data file this check can read"


@pytest.mark.filterwarnings(ONE_PROCESS_DCP)
def test_a_load_that_fails_on_a_whole_checkpoint_does_not_send_the_user_back(tmp_path,
                                                                            monkeypatch):
    # a rank lost while loading (gloo: "Connection refused") read "could not be read ...
    # point LATEST at an earlier complete checkpoint", which throws training away
    import torch.distributed.checkpoint as dcp

    import sharding.checkpoint
    from orthoshard.checkpoints import Checkpoints

    for step in (2, 4):
        dcp.save({"w": torch.arange(64.0)}, checkpoint_id=str(tmp_path / f"step-00000{step}"))
    (tmp_path / "LATEST").write_text("step-000004")

    def lost(*args, **kwargs):
        raise RuntimeError("timed out connecting: SO_ERROR: Connection refused")

    monkeypatch.setattr(sharding.checkpoint, "load", lost)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError) as raised:
        Checkpoints(tmp_path).load(model, torch.optim.SGD(model.parameters()))
    (note,) = raised.value.__notes__
    assert "has every file its .metadata lists, at full length" in note
    assert "--resume again once every rank runs" in note
    (data,) = (tmp_path / "step-000004").glob("*.distcp")
    data.unlink()  # now the checkpoint is what failed
    with pytest.raises(RuntimeError) as raised:
        Checkpoints(tmp_path).load(model, torch.optim.SGD(model.parameters()))
    (note,) = raised.value.__notes__
    assert f"could not be read: {data.name}, which its .metadata lists, is missing; point " \
           f"LATEST at an earlier complete checkpoint (step-000002)" in note


def test_the_writability_probe_writes_and_syncs_bytes(tmp_path, monkeypatch):
    # an empty probe takes no data block: it passed on a full disk, and a resumed run trained
    # until its first checkpoint failed
    import errno
    import os

    from orthoshard.arguments import directory_problem

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    problem = directory_problem(tmp_path / "ckpt", "--checkpoint-dir")
    assert problem is not None and "No space left on device" in problem
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == []  # no probe left behind
    monkeypatch.undo()
    assert directory_problem(tmp_path / "ckpt", "--checkpoint-dir") is None


def test_a_ctrl_c_while_the_demo_starts_its_sidecar_leaves_none_running(tmp_path, monkeypatch):
    # In a session of its own, out of the terminal's reach, the sidecar was started before the
    # block that stops it on an interrupt: a Ctrl-C in between (building the HTTP client, ~0.2
    # s) left it running, holding --out's database.
    started: list[object] = []

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    class Started:
        def __init__(self, *args: object, **kwargs: object) -> None:
            started.append(self)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(demo.subprocess, "Popen", Started)
    monkeypatch.setattr(demo.httpx, "Client", interrupted)  # before anything starts
    with pytest.raises(KeyboardInterrupt):
        demo.Sidecar(tmp_path, 0)
    assert started == []
    monkeypatch.setattr(demo.httpx, "Client", lambda *a, **k: type(
        "C", (), {"close": lambda self: None})())
    monkeypatch.setattr(demo.Sidecar, "_wait_healthy", interrupted)  # once it has started
    stopped: list[object] = []
    monkeypatch.setattr(demo.Sidecar, "stop", lambda self: stopped.append(self.proc))
    with pytest.raises(KeyboardInterrupt):
        demo.Sidecar(tmp_path, 0)
    assert stopped == started and len(started) == 1

"""The training job under real torchrun: at 1, 2 and 4 ranks against one process on the same
batches, restarts after a killed rank, and two nodes.

Each run is a real ``torchrun`` (a few seconds of start-up each: they import torch), so the
uninterrupted single-node reference is computed once per module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import computed_once, descendants, killed_whole, run_whole

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 12
TRAIN = ["-m", "orthoshard.train", "--steps", str(STEPS), "--optimizer", "normuon",
         "--no-progress"]
# A store of its own for each attempt of a restarted group, as the demo and compose run torchrun
# (orthoshard.train's note on torchrun's shared store)
STORE_PER_ATTEMPT = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# Same data order, same kernels and one thread per rank on both sides of each comparison:
# the resumed run reproduces the uninterrupted one exactly in practice; 1e-6 absorbs nothing
# but a differently blocked BLAS call.
EXACT_ATOL = 1e-6


def _torchrun(*args: str, env: dict | None = None, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **STORE_PER_ATTEMPT, **(env or {})}
    proc = run_whole(cmd, timeout=timeout, env=full_env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=EXACT_ATOL, rtol=0, msg=k)


@pytest.fixture(scope="module")
def uninterrupted_out(tmp_path_factory) -> Path:
    return computed_once(tmp_path_factory, "train-ref", lambda out: _torchrun(
        "--standalone", "--nproc-per-node=2", *TRAIN, "--out", str(out)))


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_out: Path) -> dict[str, torch.Tensor]:
    return _params(uninterrupted_out / "final_params.pt")


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def _one_process(world: int, *extra: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The job of ``TRAIN`` (and ``extra`` arguments) in this process, without
    torch.distributed: the same model, seed, optimizer, data and spike, each step's gradient
    the mean of the ``world`` ranks' gradients (rank r's batch is ``data.batch(step, r)``), as
    FSDP2's reduce-scatter averages them. Returns the final parameters and each step's loss,
    the mean over the ranks' batches."""
    import torch.nn.functional as F

    from orthoshard.data import MarkovData
    from orthoshard.model import GPT, GPTConfig
    from orthoshard.train import add_spike, build_optimizer, parse_args

    args = parse_args([*TRAIN[2:], "--out", "unused", *extra])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): the same BLAS blocking
    try:
        torch.manual_seed(args.seed)
        cfg = GPTConfig(d_model=args.d_model, n_layers=args.layers)
        model = GPT(cfg)
        optimizer = build_optimizer(args.optimizer, model, steps=args.steps)
        data = MarkovData(vocab=cfg.vocab, seq_len=cfg.seq_len, batch_size=args.batch_size,
                          seed=args.seed)
        losses = []
        for step in range(args.steps):
            total = [torch.zeros_like(p) for p in model.parameters()]
            loss_sum = 0.0
            for rank in range(world):
                x, y = data.batch(step, rank)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
                loss_sum += float(loss.detach())
                for t, p in zip(total, model.parameters(), strict=True):
                    t += p.grad
                model.zero_grad(set_to_none=True)
            for t, p in zip(total, model.parameters(), strict=True):
                p.grad = t / world
            if step + 1 == args.spike_at:  # steps logged from 1
                add_spike(optimizer, scale=args.spike_scale, seed=args.seed)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum / world)
        return {n: p.detach() for n, p in model.named_parameters()}, losses
    finally:
        torch.set_num_threads(threads)


# At W = 1 and 2 the job's gradient is the one process's to the bit (two ranks' sum does not
# depend on the order of its terms), so the runs match exactly. At W = 4 the reduce-scatter
# sums four ranks in an order of its own (per shard), ~1e-7 relative, and NorMuon's bf16
# Newton-Schulz turns that into parameter differences of ~1e-3 in 12 steps; the losses stay
# within 1.5e-5 (relative, measured with and without the spike), and 1e-3 leaves room for other
# CPUs while a rank training on another rank's batch moves them by far more.
W4_LOSS_RTOL = 1e-3
# The job logs the ranks' mean loss from a float32 all-reduce, the one process a float64 sum of
# the same float32 losses: float32 rounding apart, a few 1e-8.
LOSS_LOG_RTOL = 1e-6


SPIKE = ("--spike-at", str(STEPS // 2))


@pytest.fixture(scope="module")
def fsdp4_out(tmp_path_factory) -> Path:
    """The job at 4 ranks (FSDP over all four), with a spike: the HSDP test's reference too."""
    return computed_once(tmp_path_factory, "train-fsdp4", lambda out: _torchrun(
        "--standalone", "--nproc-per-node=4", *TRAIN, "--out", str(out), *SPIKE))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_job_on_w_ranks_trains_as_one_process_on_the_ranks_batches(
        request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        world: int) -> None:
    extra: tuple[str, ...] = ()
    if world == 1:  # the job's own main, as torchrun's one rank, in this process
        out = tmp_path / "out"
        assert _train_here(monkeypatch, *TRAIN[2:], "--out", str(out)) == 0
    elif world == 2:
        out = request.getfixturevalue("uninterrupted_out")
    else:
        out, extra = request.getfixturevalue("fsdp4_out"), SPIKE
    params, losses = _one_process(world, *extra)
    if world < 4:
        _assert_same(_params(out / "final_params.pt"), params)
        assert _losses(out) == pytest.approx(losses, rel=LOSS_LOG_RTOL)
    else:
        assert _losses(out) == pytest.approx(losses, rel=W4_LOSS_RTOL)


@pytest.mark.timeout(300)
def test_killed_rank_restarts_from_checkpoint_and_matches_uninterrupted_run(tmp_path,
                                                                          uninterrupted):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    _torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1", *TRAIN,
              "--out", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4",
              "--resume", env={"ORTHOSHARD_KILL_RANK_AT": "1:6"})
    # The kill really happened: steps 5 and 6 ran twice (before the kill and after resuming
    # from the step-4 checkpoint), so the loss log holds more lines than steps.
    lines = (out / "loss.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 2
    assert (ckpt / "LATEST").read_text().strip() == f"step-{STEPS:06d}"
    _assert_same(_params(out / "final_params.pt"), uninterrupted)
    # the same command again (a compose restart after the run ended): nothing is left to train,
    # and the reports stay
    reports = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".pt")}
    _torchrun("--standalone", "--nproc-per-node=2", *TRAIN, "--out", str(out),
              "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", "--resume")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".pt")} \
        == reports and "rank0.json" in reports


@pytest.mark.timeout(300)
def test_a_rank_killed_after_the_final_checkpoint_gets_this_runs_reports(tmp_path,
                                                                      uninterrupted_out):
    # The restart resumes at the last step and trains nothing. It kept an earlier run's reports
    # found in the same --out (same final step: here a SOAP run's) and exited 0; without them
    # it wrote reports with empty health, a loaded optimizer having measured nothing. Now a
    # run from step 0 removes the reports before it, a report names its run, and the health of
    # a report written after no step is the one the rank logged at the final step.
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    soap = [*TRAIN, "--optimizer", "soap"]  # the last --optimizer wins
    _torchrun("--standalone", "--nproc-per-node=2", *soap, "--out", str(out))
    assert json.loads((out / "rank0.json").read_text())["optimizer"] == "SOAP"
    _torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1", *TRAIN,
              "--out", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4",
              "--resume", env={"ORTHOSHARD_KILL_RANK_AT": f"1:{STEPS}"})
    # killed after the final checkpoint: no step ran twice
    assert len((out / "loss.jsonl").read_text().splitlines()) == STEPS
    run_id = (ckpt / f"step-{STEPS:06d}" / "RUN_ID").read_text().strip()
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        want = json.loads((uninterrupted_out / f"rank{rank}.json").read_text())
        assert (report["optimizer"], report["final_step"], report["run_id"]) == \
            ("NorMuon", STEPS, run_id)
        assert report["health"] and report["health"] == want["health"], rank
    _assert_same(_params(out / "final_params.pt"), _params(uninterrupted_out / "final_params.pt"))


@pytest.mark.timeout(300)
def test_a_second_run_in_the_same_checkpoint_dir_overwrites_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    short = ["-m", "orthoshard.train", "--steps", "4", "--optimizer", "soap", "--no-progress",
             "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
    _torchrun("--standalone", "--nproc-per-node=2", *short, "--out", str(tmp_path / "a"))
    first = sorted(p.name for p in (ckpt / "step-000004").iterdir())
    assert ".metadata" in first
    # a fresh run (no --resume) into the same directory: step 4 again
    _torchrun("--standalone", "--nproc-per-node=2", *short, "--out", str(tmp_path / "b"))
    assert (ckpt / "LATEST").read_text().strip() == "step-000004.1"
    assert sorted(p.name for p in (ckpt / "step-000004").iterdir()) == first
    # each checkpoint keeps the id of the run that saved it (what a resume of it publishes
    # under): two runs, two ids
    ids = {(ckpt / name / "RUN_ID").read_text() for name in ("step-000004", "step-000004.1")}
    assert len(ids) == 2 and (ckpt / "RUN_ID").read_text() in ids
    _assert_same(_params(tmp_path / "a" / "final_params.pt"),
                 _params(tmp_path / "b" / "final_params.pt"))


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun ``agent``'s worker of global ``rank`` (from its environment)."""
    for pid in descendants(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if f"RANK={rank}".encode() in environ and \
                any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
            return pid
    return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["torchrun", "rank 1", "every process"])
def test_sigterm_stops_every_rank_after_the_same_step_with_one_checkpoint(
        tmp_path, uninterrupted, target):
    # torchrun stopped (docker compose stop, a preemption: it passes SIGTERM on to its ranks),
    # one rank alone (as one node's torchrun stopped reaches that node's ranks only), or every
    # process (SLURM at a time limit, systemd: each rank then gets two): every rank of the job
    # stops after the same step, where they all save one checkpoint, and the resume ends where
    # the uninterrupted run does. The signal comes in a --step-delay far longer than
    # torchrun's grace (30 s) and this test's wait: the ranks slept on, and one signalled
    # alone waited in the next step's all-reduce for the others' whole delay. torchrun runs as
    # the demo runs it (orthoshard._torchrun): signalled, it exits 143 without a traceback.
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    keep = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "100"]  # none regularly
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "stderr").open("w") as err, killed_whole(subprocess.Popen(
            [sys.executable, "-m", "orthoshard._torchrun", "--standalone",
             "--nproc-per-node=2", *TRAIN, "--out", str(out), *keep, "--step-delay", "600"],
            env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)) as agent:
        deadline = time.monotonic() + 120
        while not ((out / "loss.jsonl").exists()
                   and len((out / "loss.jsonl").read_text().splitlines()) >= 1):
            assert agent.poll() is None and time.monotonic() < deadline, "no step logged"
            time.sleep(0.05)
        time.sleep(1.5)  # into the delay (a step takes ~0.1 s)
        pids = {"torchrun": [agent.pid], "rank 1": [_rank_pid(agent.pid, 1)],
                "every process": [_rank_pid(agent.pid, 0), _rank_pid(agent.pid, 1),
                                  agent.pid]}[target]
        assert None not in pids
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        code = agent.wait(timeout=120)
    if agent.pid in pids:  # torchrun signalled: 128 + SIGTERM, with no SignalException
        assert code == 128 + signal.SIGTERM
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    else:  # a rank alone: torchrun reports its failure (its ranks: 143)
        assert code != 0
    stopped = len((out / "loss.jsonl").read_text().splitlines())
    assert 2 <= stopped < STEPS
    assert (ckpt / "LATEST").read_text().strip() == f"step-{stopped:06d}"
    assert [p.name for p in ckpt.iterdir() if p.name.startswith("step-")] == \
        [f"step-{stopped:06d}"]
    assert f"stopped by SIGTERM after step {stopped} of {STEPS}" in \
        (tmp_path / "stderr").read_text()
    _torchrun("--standalone", "--nproc-per-node=2", *TRAIN, "--out", str(out), *keep,
              "--resume")
    assert len((out / "loss.jsonl").read_text().splitlines()) == STEPS  # no step twice
    _assert_same(_params(out / "final_params.pt"), uninterrupted)


@pytest.mark.timeout(300)
def test_two_torchrun_agents_rendezvous_over_c10d_and_match_one_node(tmp_path, uninterrupted):
    port = _free_port()
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **STORE_PER_ATTEMPT}
    with contextlib.ExitStack() as stack:  # each agent's session killed whole on a failure
        agents = [stack.enter_context(killed_whole(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *common, *TRAIN, "--out",
             str(tmp_path / f"node{i}")], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True))) for i in range(2)]
        deadline = time.monotonic() + 240
        for a in agents:
            _, err = a.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert a.returncode == 0, err[-4000:]
    finals = [p for p in (tmp_path / "node0" / "final_params.pt",
                          tmp_path / "node1" / "final_params.pt") if p.exists()]
    assert len(finals) == 1, "exactly one node hosts global rank 0"
    _assert_same(_params(finals[0]), uninterrupted)


def _two_nodes(tmp_path: Path, *node_args: list[str], env: dict | None = None,
               restarts: int = 0, timeout: float = 120,
               rdzv_id: str = "two-nodes") -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of one process each over c10d (``--max-restarts restarts``), node
    ``i`` given ``node_args[i]`` after :data:`TRAIN` (its ``--out``: ``tmp_path/node{i}``);
    both must end within ``timeout``."""
    port = _free_port()
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
              f"--max-restarts={restarts}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **STORE_PER_ATTEMPT, **(env or {})}
    done = []
    with contextlib.ExitStack() as stack:  # each agent's session killed whole on a failure
        agents = [stack.enter_context(killed_whole(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *common, *TRAIN, "--out",
             str(tmp_path / f"node{i}"), *extra], env=full_env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)))
            for i, extra in enumerate(node_args)]
        deadline = time.monotonic() + timeout
        for a in agents:
            out, err = a.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(a.args, a.returncode, out, err))
    return done


@pytest.mark.timeout(300)
def test_a_node_started_with_other_arguments_stops_every_node_saying_why(tmp_path):
    # one node's --d-model edited alone: the ranks failed in a collective on mismatched sizes
    # (a gloo abort); a refusal of one node's own (a bad argument, a --resume its checkpoint
    # cannot take) left the other node's ranks waiting in the process group, without a word,
    # until it timed out (30 min)
    # (each rank named with its host, both "nodes" here; the rendezvous numbers the nodes in
    # the order they arrive, so either may be rank 0)
    host = re.escape(socket.gethostname())
    for node_args, says in (
            (["--d-model", "32"], rf"started with different arguments \(--d-model (64|32) "
                                  rf"on rank [01] \(on {host}\), (32|64) on rank [01] "
                                  rf"\(on {host}\)\)"),
            (["--steps", "0"], rf"orthoshard\.train: rank [01] \(on {host}\): --steps must be "
                               rf">= 1; no rank started training")):
        for agent in _two_nodes(tmp_path, [], node_args):  # each node's log names the cause
            assert agent.returncode != 0 and re.search(says, agent.stderr), agent.stderr[-4000:]
    # --resume finds a checkpoint on one node's --checkpoint-dir and none on the other's: the
    # ranks that found one waited in its load for ranks that never came
    found, empty = tmp_path / "found", tmp_path / "empty"
    alone = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    run_whole([sys.executable, "-m", "orthoshard.train", "--steps", "2", "--optimizer",
               "normuon", "--no-progress", "--out", str(tmp_path / "first"), "--checkpoint-dir",
               str(found), "--checkpoint-every", "2"], timeout=100,
              env={**alone, "OMP_NUM_THREADS": "1"})
    says = r"the checkpoint --resume continues ('step-000002'|None) on rank [01] .*, " \
           r"(None|'step-000002') on rank [01]"
    for agent in _two_nodes(tmp_path, *(["--resume", "--checkpoint-every", "4",
                                         "--checkpoint-dir", str(d)] for d in (found, empty))):
        assert agent.returncode != 0 and re.search(says, agent.stderr), agent.stderr[-4000:]


@pytest.mark.timeout(300)
def test_a_node_publishing_to_its_sidecar_next_to_one_that_does_not_trains(tmp_path):
    # the run id goes out from rank 0 to every rank when a rank publishes: a node without
    # --sidecar-url skipped that broadcast and the other node's ranks waited in it (no
    # --rdzv-id: torchrun's "none" gives no id). The sidecar here is away: publishing fails
    # quietly and training goes on.
    token = tmp_path / "token"
    token.write_text("t" * 64)
    token.chmod(0o600)
    publish = ["--sidecar-url", f"http://127.0.0.1:{_free_port()}", "--token-file", str(token)]
    for agent in _two_nodes(tmp_path, publish, [], rdzv_id="none", timeout=200):
        assert agent.returncode == 0, agent.stderr[-4000:]


@pytest.mark.timeout(300)
def test_a_rank_killed_on_one_of_two_nodes_restarts_both_from_the_checkpoint(tmp_path,
                                                                           uninterrupted):
    # torchrun counts the restart on the killed rank's node only: the other node's rank,
    # restarted with it, read attempt 0 and refused the run's own checkpoints as another
    # run's (and kept that refusal in REFUSED for every attempt after it)
    # (the delay holds rank 0 out of any collective when rank 1 dies, so that its node
    # restarts it for the other node's failure instead of failing itself)
    keep = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "4",
            "--step-delay", "2"]
    agents = _two_nodes(tmp_path, keep, keep, restarts=1, timeout=240,
                        env={"ORTHOSHARD_KILL_RANK_AT": "1:6", "LOGLEVEL": "INFO"})
    # the case: one node restarted its rank for the other's failure (its count kept at 0)
    assert "new nodes from group_rank" in "".join(a.stderr for a in agents)
    for agent in agents:
        assert agent.returncode == 0, agent.stderr[-4000:]
    assert not (tmp_path / "ckpt" / "REFUSED").exists()
    finals = list(tmp_path.glob("node*/final_params.pt"))
    assert len(finals) == 1, "exactly one node hosts global rank 0"
    _assert_same(_params(finals[0]), uninterrupted)


# HSDP against FSDP over the same 4 ranks and data: the gradients agree to 1e-7 (relative,
# measured: the layouts reduce in different orders), and NorMuon's bf16 Newton-Schulz turns that
# rounding into parameter differences of ~1e-3 after 12 steps, so the runs are compared by
# their loss: 3e-5 apart (relative) at step 12, measured; 1e-3 leaves room for other CPUs.
HSDP_LOSS_RTOL = 1e-3


@pytest.mark.timeout(300)
def test_hsdp_replicas_train_like_fsdp_and_each_replica_reports_every_matrix(tmp_path,
                                                                             fsdp4_out):
    # with a spike: its rows are each rank's rows of its shard group (from the global rank and
    # world size every HSDP rank failed on a shape mismatch at the spike step)
    _torchrun("--standalone", "--nproc-per-node=4", *TRAIN, "--out", str(tmp_path / "r2"),
              "--replicas", "2", *SPIKE)
    losses = {1: _losses(fsdp4_out), 2: _losses(tmp_path / "r2")}
    assert losses[2][-1] == pytest.approx(losses[1][-1], rel=HSDP_LOSS_RTOL)
    # and both train: 12 NorMuon steps take the loss from 4.32 (about ln(64) = 4.16, the
    # uniform guess) to 3.18 (measured, both layouts); half that drop still fails a run that
    # does not learn
    assert losses[2][-1] < losses[2][0] - 0.5
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc", "out")}
    reports = [json.loads((tmp_path / "r2" / f"rank{r}.json").read_text())["health"]
               for r in range(4)]
    for replica in (reports[:2], reports[2:]):  # ranks 0-1 and 2-3: each replica's shard group
        assert set().union(*replica) == hidden
    # replicas that do not divide the ranks: refused before training starts
    proc = run_whole([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node=2", *TRAIN, "--out", str(tmp_path / "bad"),
                      "--replicas", "3"], timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "--replicas 3 does not divide the 2 ranks" in proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("torchelastic_id", ["none", "a1b2c3d4"])
def test_every_rank_publishes_under_one_run_id_even_when_torchrun_gives_none(tmp_path,
                                                                             torchelastic_id):
    # torchrun --master-port or a static rendezvous: TORCHELASTIC_RUN_ID=none for every run;
    # rank 0 draws the id and broadcasts it, so the ranks agree and the runs do not mix
    import _sharding_workers as w
    from _dist import run_ranks

    ids = []
    for attempt in range(2):
        out = tmp_path / f"id{attempt}"
        run_ranks(w.run_id_worker, 2, tmp_path, str(out), torchelastic_id)
        ids.append({Path(f"{out}.{r}").read_text() for r in range(2)})
    assert all(len(agreed) == 1 for agreed in ids)  # the ranks of a run agree
    if torchelastic_id == "none":
        assert ids[0] != ids[1] and "none" not in ids[0]  # two runs, two ids
    else:
        assert ids[0] == ids[1] == {torchelastic_id}  # torchrun's own id, as given


@pytest.mark.timeout(120)
@pytest.mark.parametrize("torchelastic_id", ["none", "orthoshard-compose"])
def test_a_drawn_run_id_is_kept_for_the_runs_resumes(tmp_path, torchelastic_id):
    # torchrun's "none" and --max-restarts: each attempt drew a new id, so one run's history
    # was split in two at the sidecar; the id drawn first is kept in the checkpoint directory.
    # A fixed --rdzv-id (docker-compose.yml's) names the job: every new run of it published
    # under that one id and overwrote the previous run's history at the sidecar.
    import _sharding_workers as w
    from _dist import run_ranks

    ckpt = tmp_path / "ckpt"

    def run_id(name: str, resumed: bool) -> str:
        out = tmp_path / name
        run_ranks(w.run_id_worker, 2, tmp_path, str(out), torchelastic_id, str(ckpt), resumed)
        ids = {Path(f"{out}.{r}").read_text() for r in range(2)}
        assert len(ids) == 1  # the ranks agree
        return ids.pop()

    first = run_id("a", resumed=False)
    assert run_id("b", resumed=True) != first  # no checkpoint (LATEST) yet: a fresh start
    drawn = run_id("c", resumed=False)
    (ckpt / "step-000004").mkdir()
    (ckpt / "LATEST").write_text("step-000004")
    assert run_id("d", resumed=True) == drawn  # a restart or --resume: the same run
    later = run_id("e", resumed=False)  # a new run in the directory: a new id
    assert later != drawn
    assert torchelastic_id not in {first, drawn, later}
    # that run saved no checkpoint, so LATEST is still the first run's: a resume continues
    # it, under the id saved with it (it took the later run's from the directory's RUN_ID)
    (ckpt / "step-000004" / "RUN_ID").write_text(drawn)
    assert run_id("f", resumed=True) == drawn



# ------------------------------------------------------------------- resume, in this process

@pytest.mark.timeout(300)
def test_a_second_job_on_a_running_jobs_checkpoint_dir_is_refused_and_writes_nothing_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # Two jobs in one directory overwrote each other's LATEST (one's restart resumed the other's
    # checkpoint), and a second one under --max-restarts wrote the REFUSED file with which the
    # first one's next restart refused itself. Job A trains (2 ranks, torchrun); job B, started
    # as a rank of a torchrun with restarts on the same directory, is refused and writes there
    # nothing; once A has ended, the directory is free.
    out, ckpt = tmp_path / "a", tmp_path / "ckpt"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where B's launch keeps its mark
    env = {**os.environ, "OMP_NUM_THREADS": "1", **STORE_PER_ATTEMPT}
    with (tmp_path / "stderr").open("w") as err, killed_whole(subprocess.Popen(
            [sys.executable, "-m", "orthoshard._torchrun", "--standalone", "--nproc-per-node=2",
             *TRAIN, "--out", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every",
             "2", "--step-delay", "0.5"],
            env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)) as agent:
        deadline = time.monotonic() + 120
        while not (ckpt / "LATEST").is_file():  # A's first checkpoint: B would refuse it too
            assert agent.poll() is None and time.monotonic() < deadline, "A saved nothing"
            time.sleep(0.05)
        before = sorted(p.name for p in ckpt.iterdir())
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
        code = _train_here(monkeypatch, "--steps", "4", "--out", str(tmp_path / "b"),
                           "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
        running = agent.poll() is None
        assert agent.wait(timeout=120) == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert running  # B was refused while A trained
    assert code == 2
    err_text = capsys.readouterr().err
    assert f"another job is training with --checkpoint-dir {ckpt} (process " in err_text
    assert f"holds {ckpt / 'JOB.lock'}): two jobs writing one directory" in err_text
    assert not (ckpt / "REFUSED").exists()
    assert not (tmp_path / "b" / "loss.jsonl").exists()
    # only A's checkpoints, to its last step
    assert {p.name for p in ckpt.iterdir()} >= set(before)
    assert (ckpt / "LATEST").read_text().strip() == f"step-{STEPS:06d}"
    # B's launch restarted by torchrun once A has ended (its lock gone): still refused, where
    # it resumed A's checkpoint and trained on in A's directory
    marks = list(tmp_path.glob("orthoshard-refused-*"))
    assert len(marks) == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _train_here(monkeypatch, "--steps", "16", "--out", str(tmp_path / "b"),
                       "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2") == 2
    assert "(refused at this launch's first attempt; torchrun restarted the group)" in \
        capsys.readouterr().err
    assert (ckpt / "LATEST").read_text().strip() == f"step-{STEPS:06d}"
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    assert _train_here(monkeypatch, "--optimizer", "normuon", "--steps", str(STEPS + 2),
                       "--out", str(out), "--checkpoint-dir", str(ckpt), "--resume") == 0


@pytest.mark.timeout(120)
def test_a_checkpoint_dir_on_a_filesystem_without_flock_trains_with_a_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # such a directory trained before the lock came; then the lock's OSError (ENOLCK on
    # Lustre without -o flock) ended every rank in a traceback
    import errno

    from service import lockfile

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lockfile.fcntl, "flock", no_flock)
    ckpt = tmp_path / "ckpt"
    assert _train_here(monkeypatch, "--steps", "2", "--out", str(tmp_path / "out"),
                       "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2") == 0
    assert "(a filesystem without flock); training without the lock" in capsys.readouterr().err
    assert (ckpt / "LATEST").read_text().strip() == "step-000002"


def _train_here(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """``orthoshard.train`` as rank 0 of 1 in this process (as torchrun starts a rank; a few
    steps take a second, not a torchrun's start-up). Returns its exit code."""
    from orthoshard import train

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "TORCH_GLOO_LAZY_INIT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ORTHOSHARD_RUN_ID", "resume-test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(["--no-progress", *argv])  # muon unless argv says otherwise
    finally:
        torch.set_num_threads(threads)


# health() values pass through float32 (2^-24 relative rounding: the schedule's values measured
# at most 4e-8 apart); the JSON log round-trips floats exactly
HEALTH_FLOAT32_REL = 1e-6


def _softening(out: Path) -> dict[int, float]:
    lines = (out / "health-rank0.jsonl").read_text().splitlines()
    return {rec["step"]: rec["params"]["blocks.0.fc.weight"]["softening"]
            for rec in map(json.loads, lines)}


@pytest.mark.timeout(120)
def test_log_every_prints_a_step_line_that_a_log_without_a_terminal_shows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # with --no-progress (docker compose) rank 0 printed nothing while it trained: `docker
    # compose logs -f trainer-0` showed torchrun's banner alone
    assert _train_here(monkeypatch, "--steps", "5", "--log-every", "2",
                       "--out", str(tmp_path / "out")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert [line.split(" (")[0] for line in lines] == [
        f"step {t}/5 loss {losses[t - 1]:.4f}" for t in (2, 4, 5)]
    assert all(line.endswith(" steps/s)") for line in lines)


@pytest.mark.timeout(120)
def test_a_run_from_step_0_starts_its_logs_over_and_a_resumed_run_appends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a new run in the out directory of an earlier one (docker compose keeps the out volume)
    # appended its steps 1, 2, ... after that run's in loss.jsonl and health-rank0.jsonl
    out, keep = tmp_path / "out", ["--checkpoint-dir", str(tmp_path / "ckpt"),
                                   "--checkpoint-every", "2"]

    def steps(name: str) -> list[int]:
        return [json.loads(line)["step"] for line in (out / name).read_text().splitlines()]

    assert _train_here(monkeypatch, "--steps", "3", "--out", str(out)) == 0
    assert _train_here(monkeypatch, "--steps", "2", "--out", str(out), *keep) == 0
    assert steps("loss.jsonl") == steps("health-rank0.jsonl") == [1, 2]
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(out), "--resume", *keep) == 0
    assert steps("loss.jsonl") == steps("health-rank0.jsonl") == [1, 2, 3, 4]


def _terminate_at(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """SIGTERM this process once step ``at`` is done (where the fault injection hook runs)."""
    from orthoshard import train

    def hook(step: int, *, restarted: bool) -> None:
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_maybe_die", hook)


@pytest.mark.timeout(120)
def test_sigterm_stops_after_the_step_with_a_checkpoint_the_resume_continues_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # SIGTERM (docker compose stop, a preemption) killed the ranks at once: the steps since
    # the last --checkpoint-every were lost. Now the rank finishes the step it is in, saves
    # there and exits 143; the resumed run ends where an uninterrupted one does.
    ckpt, out, ref = tmp_path / "ckpt", tmp_path / "out", tmp_path / "ref"
    keep = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "100"]  # none regularly
    previous = signal.getsignal(signal.SIGTERM)
    _terminate_at(monkeypatch, 2)  # seen at step 3's all-reduce
    assert _train_here(monkeypatch, "--steps", "6", "--out", str(out), *keep) == 128 + 15
    assert signal.getsignal(signal.SIGTERM) == previous  # put back
    assert (ckpt / "LATEST").read_text().strip() == "step-000003"
    assert [json.loads(line)["step"] for line in
            (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (out / "rank0.json").exists() and not (out / "final_params.pt").exists()
    assert ("stopped by SIGTERM after step 3 of 6; saved a checkpoint at step 3"
            in capsys.readouterr().err)
    monkeypatch.setattr("orthoshard.train._maybe_die", lambda step, restarted: None)
    assert _train_here(monkeypatch, "--steps", "6", "--out", str(out), "--resume", *keep) == 0
    assert _train_here(monkeypatch, "--steps", "6", "--out", str(ref)) == 0
    assert len((out / "loss.jsonl").read_text().splitlines()) == 6  # no step twice
    _assert_same(_params(out / "final_params.pt"), _params(ref / "final_params.pt"))


def _checkpoint_names(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name not in ("LATEST", "RUN_ID", "JOB.lock"))


@pytest.mark.timeout(120)
def test_keep_checkpoints_removes_this_runs_older_ones_across_resumes_and_no_other_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # checkpoints piled up without end: a long run filled its disk
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    every = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
    assert _train_here(monkeypatch, "--steps", "2", "--out", str(out), *every) == 0
    for name in ("step-000001", "step-000002"):  # now another run's
        (ckpt / name / "RUN_ID").write_text("another-run")
    (ckpt / "step-000003").mkdir()  # a save cut short: no .metadata, no run id
    keep = [*every, "--keep-checkpoints", "2"]
    assert _train_here(monkeypatch, "--steps", "3", "--out", str(out), *keep) == 0
    assert _checkpoint_names(ckpt) == ["step-000001", "step-000002", "step-000002.1",
                                       "step-000003", "step-000003.1"]
    # and across a resume, which continues the run (its id)
    assert _train_here(monkeypatch, "--steps", "5", "--out", str(out), "--resume", *keep) == 0
    assert (ckpt / "LATEST").read_text().strip() == "step-000005"
    assert _checkpoint_names(ckpt) == ["step-000001", "step-000002", "step-000003",
                                       "step-000004", "step-000005"]
    assert (ckpt / "step-000001" / ".metadata").is_file()  # the other run's, whole
    # a removal a crash cut short (renamed, half removed) is no checkpoint, and goes next time
    (ckpt / ".removing-step-000009").mkdir()
    assert _train_here(monkeypatch, "--steps", "6", "--out", str(out), "--resume", *keep) == 0
    assert _checkpoint_names(ckpt) == ["step-000001", "step-000002", "step-000003",
                                       "step-000005", "step-000006"]


@pytest.mark.timeout(120)
def test_keep_checkpoints_keeps_the_checkpoint_a_rollback_resumed_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LATEST pointed back at step-000002 past a damaged step-000004: the resumed run's save,
    # step-000004.1, took step-000004 for the newer one to keep and removed step-000002
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    keep = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(out), *keep) == 0
    (data, *_) = sorted((ckpt / "step-000004").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    (ckpt / "LATEST").write_text("step-000002")
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(out), "--resume", *keep) == 0
    assert (ckpt / "LATEST").read_text().strip() == "step-000004.1"
    assert _checkpoint_names(ckpt) == ["step-000002", "step-000004", "step-000004.1"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--keep-checkpoints", "2"], "--keep-checkpoints needs --checkpoint-every N"),
])
def test_keep_checkpoints_refuses_what_it_cannot_do(flags: list[str], message: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    from orthoshard.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "unused", *flags])
    assert message in capsys.readouterr().err


def test_every_sigterm_while_training_is_caught_and_the_handler_before_is_put_back() -> None:
    # SLURM and systemd signal every process of the job, and torchrun passes its own SIGTERM
    # on too: a rank that let the second one through died mid-step, without its checkpoint
    from orthoshard.stopping import StopRequest

    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopRequest() as stop:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.timeout(30)
def test_a_sigterm_cuts_a_step_delay_short() -> None:
    # the ranks slept the whole --step-delay: longer than torchrun's 30 s grace, it killed them
    # before they checkpointed. A 600 s delay here ends within the test's timeout or fails it.
    from orthoshard.stopping import StopRequest

    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    with StopRequest() as stop:
        timer.start()
        try:
            stop.sleep(600)
        finally:  # the signal comes while the handler is in place, or never
            timer.cancel()
            timer.join()
        assert stop.requested


@pytest.mark.timeout(120)
def test_a_finished_run_resumed_again_trains_nothing_whatever_its_checkpoint_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # --steps 6 --checkpoint-every 4: the last checkpoint was step 4, so every --resume of the
    # finished run (compose restarting it) trained steps 5 and 6 again and rewrote its reports
    args = ("--steps", "6", "--out", str(tmp_path / "out"), "--checkpoint-dir",
            str(tmp_path / "ckpt"), "--checkpoint-every", "4", "--resume")
    assert _train_here(monkeypatch, *args) == 0
    assert (tmp_path / "ckpt" / "LATEST").read_text().strip() == "step-000006"
    reports = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert _train_here(monkeypatch, *args) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == reports
    assert len(reports["loss.jsonl"].splitlines()) == 6
    assert "nothing is left to train" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_sigterm_during_the_last_step_ends_the_run_as_usual(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _terminate_at(monkeypatch, 2)  # seen at step 3's all-reduce: nothing is left to train
    assert _train_here(monkeypatch, "--steps", "3", "--out", str(tmp_path)) == 0
    assert json.loads((tmp_path / "rank0.json").read_text())["final_step"] == 3
    assert (tmp_path / "final_params.pt").is_file()


@pytest.mark.timeout(120)
def test_sigterm_without_checkpoints_stops_after_the_step_and_says_nothing_was_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _terminate_at(monkeypatch, 1)
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(tmp_path)) == 128 + 15
    assert len((tmp_path / "loss.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "final_params.pt").exists()
    assert "no checkpoint (--checkpoint-every 0)" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_resume_with_other_steps_keeps_the_schedule_and_rewrites_stale_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from orthoshard.train import SOFTENING_MAX

    ckpt, first, second = tmp_path / "ckpt", tmp_path / "first", tmp_path / "second"
    keep = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(first), *keep) == 0
    # trained on to 8 steps: the schedule of the 4-step run goes on (it had reached its top),
    # where one over the new --steps jumped back from 0.2 to 0.125 at step 5
    assert _train_here(monkeypatch, "--steps", "8", "--out", str(second), "--resume",
                       *keep) == 0
    assert "keeps the checkpoint's length of 4 steps" in capsys.readouterr().err
    softening = _softening(first) | _softening(second)
    assert softening == pytest.approx(  # health's float32 values, JSON exact
        {t: SOFTENING_MAX * min(1.0, t / 4) for t in range(1, 9)}, rel=HEALTH_FLOAT32_REL)
    # the first run's reports, then a restart that finds the step-8 checkpoint: they were
    # kept as if they were this run's (its parameters 4 steps old)
    assert json.loads((first / "rank0.json").read_text())["final_step"] == 4
    assert _train_here(monkeypatch, "--steps", "8", "--out", str(first), "--resume",
                       "--checkpoint-dir", str(ckpt)) == 0
    assert json.loads((first / "rank0.json").read_text())["final_step"] == 8
    _assert_same(_params(first / "final_params.pt"), _params(second / "final_params.pt"))
    # a --steps before the checkpoint's step finished at the checkpoint, silently
    capsys.readouterr()
    assert _train_here(monkeypatch, "--steps", "6", "--out", str(tmp_path / "third"),
                       "--resume", "--checkpoint-dir", str(ckpt)) == 2
    assert "is at step 8, past --steps 6: pass a --steps larger than 8 to train on" in \
        capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_resume_with_another_seed_batch_size_or_model_is_refused_before_it_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # they fix the data: such a resume trained another run, without a word
    ckpt = tmp_path / "ckpt"
    keep = ["--checkpoint-dir", str(ckpt), "--resume"]
    assert _train_here(monkeypatch, "--steps", "2", "--out", str(tmp_path / "a"), "--seed", "3",
                       "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2") == 0
    capsys.readouterr()
    for flags, says in ((["--seed", "7"], "--seed 3 (this run: 7)"),
                        (["--seed", "3", "--batch-size", "4"], "--batch-size 16 (this run: 4)"),
                        (["--batch-size", "4"], "--seed 3 (this run: 0), --batch-size 16 "
                                                "(this run: 4)"),
                        # another model: a traceback on every rank once the checkpoint was read
                        (["--seed", "3", "--d-model", "32", "--layers", "3"],
                         "--d-model 64 (this run: 32), --layers 2 (this run: 3)")):
        out = tmp_path / "refused"
        assert _train_here(monkeypatch, "--steps", "4", "--out", str(out), *flags, *keep) == 2
        assert f"the checkpoint in {ckpt} was trained with {says}: resume it with the " \
            f"checkpoint's values" in capsys.readouterr().err
        assert not (out / "loss.jsonl").exists()  # nothing trained
    # a spike before the checkpoint's step would never happen (it trained without one)
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(tmp_path / "refused"),
                       "--seed", "3", "--spike-at", "1", *keep) == 2
    assert "past --spike-at 1: this run trains from step 3 on and would never spike" in \
        capsys.readouterr().err
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(tmp_path / "b"), "--seed", "3",
                       *keep) == 0


@pytest.mark.timeout(120)
def test_a_restart_that_resumes_at_the_last_step_still_ends_the_run_at_the_sidecar(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A rank died after the final checkpoint, before its reports and its finish. The restart
    # trains nothing and published nothing, so close(finished=True) finished no rank: the run
    # had ended, and OptimizerSnapshotStale paged for it.
    from test_service_live import start_sidecar

    from orthoshard import runlog

    car = start_sidecar(tmp_path)
    try:
        argv = ["--steps", "2", "--out", str(tmp_path / "out"), "--checkpoint-dir",
                str(tmp_path / "ckpt"), "--checkpoint-every", "2", "--sidecar-url", car.url,
                "--token-file", str(tmp_path / "token")]

        def dies(*args: object, **kwargs: object) -> None:
            raise RuntimeError("rank died after the final checkpoint")

        with monkeypatch.context() as m:
            m.setattr(runlog.RunLog, "finish", dies)
            with pytest.raises(RuntimeError, match="rank died"):
                _train_here(m, *argv)
        assert not (tmp_path / "out" / "rank0.json").exists()
        with car.client() as c:
            deadline = time.monotonic() + 30  # the dead rank's last snapshot lands
            while (ranks := c.get("/v1/optimizer").json()["ranks"]) == [] \
                    or ranks[0]["step"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert ranks[0]["finished_at"] is None  # the run has not said it ended
            assert _train_here(monkeypatch, *argv, "--resume") == 0
            (rank,) = c.get("/v1/optimizer").json()["ranks"]
            assert rank["run_id"] == "resume-test" and rank["finished_at"] is not None
            assert 'orthoshard_last_snapshot_timestamp_seconds{rank="0"}' not in \
                c.get("/metrics").text
        assert json.loads((tmp_path / "out" / "rank0.json").read_text())["final_step"] == 2
    finally:
        car.stop()


def test_a_run_whose_snapshots_the_sidecar_refused_says_so_at_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # a wrong token: every snapshot refused (HTTP 401), and the run ended with exit 0 and no
    # word of it past the publisher's warnings
    from test_service_live import start_sidecar

    car = start_sidecar(tmp_path)
    try:
        wrong = tmp_path / "wrong-token"
        wrong.write_text("w" * 32)
        wrong.chmod(0o600)
        assert _train_here(monkeypatch, "--steps", "2", "--out", str(tmp_path / "out"),
                           "--sidecar-url", car.url, "--token-file", str(wrong)) == 0
    finally:
        car.stop()
    err = capsys.readouterr().err
    assert "rank 0: the sidecar did not take all this rank sent (health snapshots: 2 " \
           "published, 0 sent, 0 dropped, 2 refused; then the end of the run)" in err, err


def test_a_run_at_fewer_ranks_removes_the_reports_of_the_ranks_that_are_gone(tmp_path):
    from orthoshard.train import _forget_gone_ranks

    logs = ["health-rank0.jsonl", "health-rank1.jsonl", "health-rank2.jsonl",
            "health-rank10.jsonl", "health-ranking.jsonl"]
    for name in ("rank0.json", "rank1.json", "rank2.json", "rank10.json", "ranking.json", *logs):
        (tmp_path / name).write_text("{}")
    # resumed: the gone ranks' logs hold this run's own earlier steps
    _forget_gone_ranks(tmp_path, 2, logs=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["rank0.json", "rank1.json", "ranking.json", *logs])
    # a new run: the plot drew a 4-rank run's logs of ranks 2 and 3 as this 2-rank run's
    _forget_gone_ranks(tmp_path, 2, logs=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["rank0.json", "rank1.json", "ranking.json", *logs[:2], logs[4]])


@pytest.mark.timeout(120)
def test_an_unwritable_checkpoint_dir_and_an_unreadable_checkpoint_are_named_up_front(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from orthoshard import train

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.setattr(train.Path, "write_text", _refuse_writes_in(ckpt))
    monkeypatch.setattr(train.Path, "open", _refuse_opening_for_writes_in(ckpt))
    # refused with the arguments, before the model is built (every rank together)
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(tmp_path / "out"),
                       "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2") == 2
    assert f"--checkpoint-dir {ckpt} is not writable" in capsys.readouterr().err
    monkeypatch.undo()
    assert _train_here(monkeypatch, "--steps", "4", "--out", str(tmp_path / "out"),
                       "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2") == 0
    # saves cut short: a data file without its end, then no metadata (DCP's own errors, as an
    # Exception: DCP raises a BaseException, which `except Exception` let through; with a note
    # naming what to do)
    data = next((ckpt / "step-000004").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    for damage in ("truncated", "no metadata"):
        if damage == "no metadata":
            (ckpt / "step-000004" / ".metadata").unlink()
        with pytest.raises(RuntimeError, match=r"torch\.distributed\.checkpoint could not load") \
                as raised:
            _train_here(monkeypatch, "--steps", "6", "--out", str(tmp_path / "out"),
                        "--resume", "--checkpoint-dir", str(ckpt))
        assert any("point LATEST at an earlier complete checkpoint (step-000002)" in note
                   for note in getattr(raised.value, "__notes__", [])), (damage, raised.value)


def _refuse_writes_in(directory: Path) -> Any:
    real = Path.write_text

    def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.parent == directory:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    return write_text


def _refuse_opening_for_writes_in(directory: Path) -> Any:
    real = Path.open

    def open_(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.parent == directory and set(mode) & set("wax+"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, mode, *args, **kwargs)

    return open_


# standard errors within which a Monte-Carlo mean must land: 4 leaves a false failure at
# ~6e-5 per run
MC_STANDARD_ERRORS = 4.0


def test_the_chain_entropy_is_the_loss_a_model_that_knows_the_chain_gets() -> None:
    # it was the unweighted mean of the tokens' successor entropies: 1.284 for seed 0, whose
    # floor is 1.271 (131,072 tokens put 4 standard errors at ~0.008)
    from orthoshard.data import MarkovData

    data = MarkovData(vocab=64, seq_len=64, batch_size=512, seed=0)
    logp = data.transitions.double().log()
    losses = torch.cat([-logp[x, y].flatten() for x, y in (data.batch(s, 0) for s in range(4))])
    error = float(losses.std()) / len(losses) ** 0.5
    assert abs(float(losses.mean()) - data.entropy_rate()) < MC_STANDARD_ERRORS * error


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_heads": 0}, "n_heads must be >= 1, got 0"),  # it was a ZeroDivisionError
    ({"d_model": 30}, "d_model 30 must be divisible by n_heads 4"),
    ({"vocab": 0}, "vocab must be >= 1, got 0"),
])
def test_a_model_config_it_cannot_build_is_refused_by_name(kwargs: dict, message: str) -> None:
    from orthoshard.model import GPTConfig

    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


@pytest.mark.timeout(120)
def test_the_job_run_without_torchrun_trains_as_one_rank(tmp_path: Path) -> None:
    # `python -m orthoshard.train` raised "environment variable RANK expected" in a traceback
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = run_whole([sys.executable, "-m", "orthoshard.train", "--steps", "2", "--no-progress",
                      "--out", str(tmp_path / "out")], timeout=100,
                     env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

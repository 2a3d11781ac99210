"""The training job, one process per rank under torchrun: ``torchrun ... -m orthoshard.train``.

A small GPT on the synthetic Markov language (:mod:`orthoshard.data`), FSDP2 (``fully_shard``)
on every block, hidden matrices updated by Muon / NorMuon / SOAP through ``OwnerSharding``,
embeddings, norms and the head by AdamW. Every rank publishes the health of the matrices it
owns to its node's sidecar (``--sidecar-url`` or ``--sidecar-uds``) and appends it to
``OUT/health-rank{r}.jsonl``; rank 0 draws the progress bar and logs the loss to
``OUT/loss.jsonl``. A run from step 0 starts both logs over (and removes those of ranks an
earlier run at more ranks left); a resumed one appends to them.

Checkpoints: every ``--checkpoint-every`` steps, and at the last, a new DCP directory
``step-NNNNNN`` under ``--checkpoint-dir`` (``step-NNNNNN.K`` when an earlier run or attempt
left that one: nothing is overwritten) and then ``LATEST`` naming it (written last, atomically,
so a crash mid-save leaves the previous checkpoint in force). ``--keep-checkpoints K`` then
removes the run's older checkpoints but the newest K (other runs' stay). ``--resume`` continues
from ``LATEST`` when there is one; under ``torchrun --max-restarts`` a restarted group resumes
where the last checkpoint was (``--resume`` or not), and a first attempt without ``--resume``
refuses a directory holding another run's ``LATEST``, which a restart would otherwise continue.

Stopping: on SIGTERM (``docker compose stop``, a scheduler's preemption, torchrun passing on its
own) every rank finishes the step it is in, saves a checkpoint there when checkpoints are on
(unless that step just saved one) and exits with 143 (128 + SIGTERM), writing no final report:
``--resume`` continues from that step, and nothing trained is lost. The ranks agree on the
step through the all-reduce each step already makes, and a SIGTERM that comes again (from
the launcher and the scheduler both) changes nothing. torchrun waits 30 s
(``--shutdown-timeout``) after passing the signal on before it kills its ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from optim import Muon, NorMuon, split_param_groups
from orthoshard.agreement import hold_checkpoint_dir, job_problem, own_problem, refuse
from orthoshard.arguments import directory_problem
from orthoshard.checkpoints import (
    RUN_ID_FILE,
    Checkpoints,
    write_whole,
)
from orthoshard.data import MarkovData
from orthoshard.model import GPT, GPTConfig, shard_gpt
from orthoshard.runlog import RunLog
from orthoshard.stopping import StopRequest, delay
from orthoshard.telemetry import publish_health
from orthoshard.train_args import attempt, parse_args, parse_job_args, publishes

__all__ = ["build_optimizer", "main", "parse_args"]

# Soft-Muon in the demo: softening grows over training (Soft-Muon softens more later on).
SOFTENING_MAX = 0.2


def build_optimizer(name: str, model: torch.nn.Module, *, steps: int, kl_shampoo: bool = False,
                    sharding: Any = None) -> Any:
    """The demo's optimizer: hidden matrices by ``name``, the rest by AdamW (lr 3e-3)."""
    groups = split_param_groups(model.named_parameters(), adamw_lr=3e-3, adamw_weight_decay=0.0)
    if name == "muon":
        return Muon(groups, lr=0.02, weight_decay=0.01, sharding=sharding,
                    softening=lambda t: SOFTENING_MAX * min(1.0, t / steps))
    if name == "normuon":
        return NorMuon(groups, lr=0.02, weight_decay=0.01, sharding=sharding)
    from optim.soap import SOAP

    # max_update_rms: the first refreshes move momentum onto coordinates whose second moment is
    # still ~0, and this model's unclipped steps 2-4 reached ~150x Adam's RMS (docs/soap.md,
    # "Outsized early steps"); 1.0 leaves its later steps (RMS ~0.5) alone
    return SOAP(groups, lr=3e-3, weight_decay=0.01, use_kl_shampoo=kl_shampoo,
                max_update_rms=1.0, sharding=sharding)


def add_spike(optimizer: Any, *, scale: float, seed: int) -> None:
    """Add ``scale * ||G||_F * u v^T`` (unit u, v fixed by the seed) to every matrix gradient.

    A rank-1 spike is a real change of curvature: SOAP's top eigenvector of ``L`` turns towards
    ``u``. In this model KL-Shampoo's bases turn too (docs/soap.md, "Which optimizer is robust
    to what").
    """
    for k, item in enumerate(optimizer.matrix_items()):
        g = torch.Generator().manual_seed(seed * 7919 + k)
        m, n = item.shape
        u = torch.nn.functional.normalize(torch.randn(m, generator=g), dim=0)
        v = torch.nn.functional.normalize(torch.randn(n, generator=g), dim=0)
        grad = item.param.grad
        full_norm = grad.full_tensor().norm() if hasattr(grad, "full_tensor") else grad.norm()
        start, end = _local_rows(grad, m)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        local.add_(scale * float(full_norm) * torch.outer(u[start:end], v).to(local.device))


def _local_rows(t: Any, rows: int) -> tuple[int, int]:
    """The rows of a ``rows``-row matrix this rank holds of ``t``: all of a plain tensor, a
    DTensor's ``Shard(0)`` chunk by its own coordinate on that mesh dimension (under HSDP the
    shard group, not the global rank and world size)."""
    from torch.distributed.tensor import Shard

    from sharding.plan import row_bounds

    if not hasattr(t, "to_local"):
        return 0, rows
    dims = [d for d, p in enumerate(t.placements) if p == Shard(0)]
    if not dims:
        return 0, rows
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    assert coordinate is not None  # this rank is in the mesh the parameter lives on
    return row_bounds(rows, mesh.size(dims[0]))[coordinate[dims[0]]]


def _publisher(args: argparse.Namespace, run_id: str | None) -> Any:
    from service.client import Publisher

    token = args.token_file.read_text().strip() if args.token_file else None
    return Publisher(url=args.sidecar_url, uds=args.sidecar_uds, token=token, run_id=run_id)


def _run_id(checkpoint_dir: Path | None, resumed: bool) -> str:
    """The id every rank publishes under: ``ORTHOSHARD_RUN_ID`` if set; else, with a checkpoint
    directory, the run's own id kept there and with each checkpoint (``RUN_ID``: drawn by rank
    0 when the run starts from step 0 and sent to all, a collective; a run resumed from one of
    its checkpoints, as ``--resume`` and every attempt of an elastic restart are, publishes
    under the id saved with that checkpoint again, or the directory's for one saved without);
    without one, torchrun's run id, or a drawn one where torchrun gives its shared default
    ``"none"`` (``--master-port``, static rendezvous), which would mix this run with earlier
    ones. The kept id goes before torchrun's because a fixed ``--rdzv-id`` (as
    docker-compose.yml's) names the job, not the run: every new run of the job published under
    it and overwrote the history of the run before."""
    from service.targets import environment_run_id

    if (value := environment_run_id(torchrun=checkpoint_dir is None)) is not None:
        return value
    box: list[str | None] = [None]
    if dist.get_rank() == 0:
        kept = checkpoint_dir / RUN_ID_FILE if checkpoint_dir is not None else None
        # only with a checkpoint to resume from (LATEST): an attempt restarted before the
        # first one starts over, and may as well be a new run. The id saved with that
        # checkpoint first: the directory's may be of a later run that saved none (and a
        # resume would have continued this run under that one's id)
        latest = Checkpoints(checkpoint_dir).latest() if resumed else None
        own = latest / RUN_ID_FILE if latest is not None else None
        if own is not None and own.is_file():
            drawn = own.read_text().strip()
        elif latest is not None and kept is not None and kept.is_file():
            drawn = kept.read_text().strip()  # a checkpoint saved without its id
        else:
            drawn = uuid.uuid4().hex[:16]
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                write_whole(kept, drawn)
        box[0] = drawn
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _maybe_die(step: int, *, restarted: bool) -> None:
    """Fault injection for the restart test: SIGKILL this rank once, on the group's first
    attempt (``restarted``: decided over every rank, :mod:`orthoshard.agreement`)."""
    kill_at = os.environ.get("ORTHOSHARD_KILL_RANK_AT")  # "rank:step"
    if not kill_at or restarted:
        return
    rank, at = (int(x) for x in kill_at.split(":"))
    if dist.get_rank() == rank and step == at:
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ  # torchrun's environment
    if launched:  # a refusal waits for the process group, so that every rank refuses with it
        args, problem = parse_job_args(argv)
    else:  # `python -m orthoshard.train`: one rank, which refuses at once
        args, problem = parse_args(argv), None
    held, error = hold_checkpoint_dir(args)
    try:
        return _start(args, problem or error, launched=launched)
    finally:
        from service.lockfile import release

        release(held)


def _start(args: argparse.Namespace | None, problem: str | None, *, launched: bool) -> int:
    """Join the process group, agree with every rank, and train or refuse."""
    if args is not None and problem is None:
        problem = _start_problem(args)
    if not launched and (problem := own_problem(args, problem, restarted=False)) is not None:
        print(f"orthoshard.train: {problem}", file=sys.stderr)
        return 2
    # GPU: NCCL for CUDA tensors and gloo for the few CPU ones (SOAP's step counters in a
    # checkpoint); CPU: gloo
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # one GPU per local rank, chosen before anything touches CUDA: FSDP2 places the
        # parameters on the current device, and NCCL serves CUDA tensors only
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        # Gloo's eager full-mesh connect at init hung in ~1 of 3 group restarts after a killed
        # rank (torchrun --max-restarts) on this CPU set-up; connecting pairs lazily, on first
        # use, made 6 of 6 restarts succeed. It changes no result, only when sockets open.
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    if launched:
        dist.init_process_group(backend)
    else:  # no launcher, no port to pick
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if launched:
        _note_shared_store()
    try:
        if launched and (problem := job_problem(args, problem)) is not None:
            return refuse(problem)
        assert args is not None  # parsed, or refused above
        return _train(args)
    finally:
        dist.destroy_process_group()


def _note_shared_store() -> None:
    """Under ``--max-restarts``, say once (first local rank, first attempt) when torchrun keeps
    one store for every attempt of the group (its default): the store holds a killed
    attempt's addresses, and a restarted rank whose first collective came before its peer had
    published anew read the dead peer's address and failed to connect (its attempt used up).
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each attempt a store of its own."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and attempt() == 0 and os.environ.get("LOCAL_RANK", "0") == "0"):
        print("orthoshard.train: note: torchrun keeps one store across the restarts of this "
              "group, with a killed attempt's addresses, which can fail a restart: set "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment", file=sys.stderr)


def _run_flags(args: argparse.Namespace) -> dict[str, int]:
    """What fixes the data and the model: kept with each checkpoint, and a resume's must match."""
    return {"data_seed": args.seed, "batch_size": args.batch_size, "d_model": args.d_model,
            "layers": args.layers}


def _start_problem(args: argparse.Namespace) -> str | None:
    """Why this rank cannot start the job (None: it can), found before any process group: the
    launcher's ranks and ``--replicas``, ``--out``, and a resume's data and model flags."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if world % args.replicas:
        return f"--replicas {args.replicas} does not divide the {world} ranks"
    # created and proven writable here (not in parse_args, which creates nothing), rather than
    # failing in a traceback from every rank once the process group is up
    if (problem := directory_problem(args.out, "--out")) is not None:
        return problem
    if args.resume:  # each rank reads the checkpoint's flags alone, before anything loads
        return Checkpoints(args.checkpoint_dir).flags_problem(_run_flags(args))
    return None


def _reports_written(out: Path, rank: int, step: int, run_id: str | None) -> bool:
    """Whether every rank finds its ``rank{r}.json`` in ``out``, written at ``step`` by the run
    ``run_id`` (one all-reduce, so that every rank decides alike). A report of another run with
    the same final step (an earlier run into the same ``--out``) is not this run's."""
    path = out / f"rank{rank}.json"
    try:
        report = json.loads(path.read_text())
        mine = report.get("final_step") == step and report.get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        mine = False
    have = torch.tensor([float(mine)])
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    return bool(have.item())


def _forget_gone_ranks(out: Path, world: int, *, logs: bool) -> None:
    """Remove ``rank{r}.json`` of ranks ``r >= world`` (rank 0): left by a run at more ranks,
    their reports would be read as this run's (matrices counted twice). With ``logs`` (a run
    from step 0, whose ranks start their logs over) their ``health-rank{r}.jsonl`` too, which
    the demo's plot drew as this run's matrices, past its last step. A resumed run keeps them:
    they hold its own earlier steps."""
    kinds = [("rank", ".json")] + ([("health-rank", ".jsonl")] if logs else [])
    for prefix, suffix in kinds:
        for f in out.glob(f"{prefix}*{suffix}"):
            r = f.name[len(prefix):-len(suffix)]
            if r.isdigit() and int(r) >= world:
                f.unlink(missing_ok=True)


def _hsdp_mesh(replicas: int, world: int) -> tuple[Any, Any]:
    """``(mesh, OwnerSharding group)``: (None, None) for FSDP over every rank; for HSDP a
    ``("replicate", "shard")`` mesh whose shard groups are consecutive ranks (a node's, when
    ``replicas`` is the number of nodes) and its shard group, where owners exchange."""
    if replicas == 1:
        return None, None
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (replicas, world // replicas),
                            mesh_dim_names=("replicate", "shard"))
    return mesh, mesh.get_group("shard")


def _train(args: argparse.Namespace) -> int:
    from sharding import OwnerSharding

    rank, world = dist.get_rank(), dist.get_world_size()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(d_model=args.d_model, n_layers=args.layers)
    mesh, group = _hsdp_mesh(args.replicas, world)
    model = shard_gpt(GPT(cfg), mesh)
    ckpt = Checkpoints(args.checkpoint_dir)
    # the softening schedule the checkpoint was trained with, whatever this --steps says (a
    # schedule over the new --steps would jump back mid-run)
    horizon = (ckpt.horizon() if args.resume else None) or args.steps
    run_flags = _run_flags(args)
    optimizer = build_optimizer(args.optimizer, model, steps=horizon,
                                kl_shampoo=args.kl_shampoo, sharding=OwnerSharding(group))
    data = MarkovData(vocab=cfg.vocab, seq_len=cfg.seq_len, batch_size=args.batch_size,
                      seed=args.seed)
    start = ckpt.load(model, optimizer) if args.resume else 0
    if start > args.steps:  # refused before the load (parse_args); here LATEST moved since
        raise RuntimeError(f"the checkpoint loaded from {args.checkpoint_dir} is at step "
                           f"{start}, past --steps {args.steps}: its LATEST changed while this "
                           f"job started (another job writing there?)")
    # the run's id, published under and saved with each checkpoint (a resume publishes under
    # the id of the checkpoint it continues), and written into the reports
    run_id = (_run_id(args.checkpoint_dir, args.resume)
              if args.checkpoint_every or publishes(args) or args.any_publishes else None)
    if start >= args.steps and _reports_written(args.out, rank, start, run_id):
        # a --resume of a finished run (compose restarted, say): training nothing would still
        # rewrite its reports. (A restart that finds the last checkpoint but no reports, a
        # rank having died after it, goes on and writes them.)
        if rank == 0:
            print(f"orthoshard.train: --resume: the checkpoint is at step {start}, not before "
                  f"--steps {args.steps}: nothing is left to train, and the reports in "
                  f"{args.out} are kept; pass a larger --steps to train on", file=sys.stderr)
        return 0
    _check_resumed_flags(optimizer, args)
    if start == 0:
        # a new run: the reports of one before it in this --out are not its own, and a
        # restart that finds its final checkpoint and those reports must not keep them
        (args.out / f"rank{rank}.json").unlink(missing_ok=True)
        if rank == 0:
            (args.out / "final_params.pt").unlink(missing_ok=True)
    if rank == 0:
        _forget_gone_ranks(args.out, world, logs=start == 0)
        if args.optimizer == "muon" and horizon != args.steps:
            print(f"orthoshard.train: --resume: the softening schedule keeps the checkpoint's "
                  f"length of {horizon} steps (this run's --steps: {args.steps})",
                  file=sys.stderr)
    publisher = _publisher(args, run_id) if publishes(args) else None
    with StopRequest() as stop, \
            RunLog(args.out, rank, start, args.steps, args.progress, args.log_every) as log:
        stopped = _loop(args, model, optimizer, data, ckpt, log, publisher, stop, start=start,
                        horizon=horizon, run_id=run_id, run_flags=run_flags)
    if stopped is not None:
        # not finished: the run goes on from its checkpoint, and until it does its ranks'
        # silence pages (a stop nobody resumes is training that is not running)
        if publisher is not None:
            publisher.close()
        if rank == 0:
            where = (f"saved a checkpoint at step {stopped} in {args.checkpoint_dir}: --resume "
                     f"continues from it" if args.checkpoint_every
                     else "no checkpoint (--checkpoint-every 0): a new run starts from step 0")
            print(f"orthoshard.train: stopped by SIGTERM after step {stopped} of {args.steps}; "
                  f"{where}", file=sys.stderr)
        return 128 + signal.SIGTERM
    # the run ended: its silence from now on is no alert. This rank's finish also when it
    # published nothing: a restart that resumed at the last step (a rank died after the
    # final checkpoint) trains nothing, and ends the run its rank reported before.
    if publisher is not None and not publisher.close(finished=True, ranks=(rank,)):
        stats = publisher.stats
        print(f"rank {rank}: the sidecar did not take all this rank sent (health "
              f"snapshots: {stats.published} published, {stats.sent} sent, {stats.dropped} "
              f"dropped, {stats.rejected} refused; then the end of the run): the warnings "
              f"above say why", file=sys.stderr)
    return 0


def _loop(args: argparse.Namespace, model: torch.nn.Module, optimizer: Any, data: MarkovData,
          ckpt: Checkpoints, log: RunLog, publisher: Any, stop: StopRequest, *, start: int,
          horizon: int, run_id: str | None, run_flags: dict[str, int]) -> int | None:
    """Train from step ``start`` to ``args.steps``, then write the reports and return None;
    or, once a rank was asked to stop (``stop``), return the step every rank stopped after
    (checkpointed there when checkpoints are on)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device  # where fully_shard put the parameters
    for step in range(start, args.steps):
        x, y = (t.to(device) for t in data.batch(step, rank))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if args.spike_at is not None and step + 1 == args.spike_at:  # (logged as step + 1)
            add_spike(optimizer, scale=args.spike_scale, seed=args.seed)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the loss summed over ranks (logging only) and how many ranks were asked to stop:
        # one all-reduce, so that every rank stops after the same step
        shared = torch.stack([loss.detach().float(),
                              torch.tensor(float(stop.requested), device=loss.device)])
        dist.all_reduce(shared)
        loss_sum, asked = shared.tolist()
        stopping = asked > 0 and step + 1 < args.steps  # after the last step: the run's end
        # on every rank, with a sidecar or not: the summary is collective under FSDP2 (a node
        # started without --sidecar-url would otherwise leave the others waiting in it)
        health = publish_health(publisher, optimizer, step=step + 1, rank=rank,
                                with_summary=(step + 1) % 10 == 0 or step + 1 == args.steps)
        log.step(step + 1, loss_sum / world, health)
        # the last step too: a --resume of the finished run (compose restarting it) then
        # finds nothing left to train, where it trained the steps after the last multiple again
        due = bool(args.checkpoint_every) and ((step + 1) % args.checkpoint_every == 0
                                               or step + 1 == args.steps)
        if due or (stopping and args.checkpoint_every):
            ckpt.save(model, optimizer, step + 1, horizon, run_id=run_id, flags=run_flags,
                      keep=args.keep_checkpoints)
        if stopping:
            return step + 1
        _maybe_die(step + 1, restarted=args.restarted)
        if args.step_delay:
            delay(args.step_delay, stop, loss.device)
    final = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
             for n, p in model.named_parameters()}
    log.finish(optimizer, final, data.entropy_rate(), args.steps,  # start <= steps (above)
               run_id=run_id)
    return None


def _check_resumed_flags(optimizer: Any, args: argparse.Namespace) -> None:
    """Raise ValueError (on every rank: each loaded the same checkpoint) when a loaded
    checkpoint's groups run another algorithm than the flags ask for: loading takes the saved
    hyperparameters, so ``--kl-shampoo`` over a plain SOAP checkpoint ran plain SOAP."""
    for group in optimizer.param_groups:
        if "use_kl_shampoo" in group and bool(group["use_kl_shampoo"]) != args.kl_shampoo:
            saved = "KL-Shampoo" if group["use_kl_shampoo"] else "plain SOAP"
            raise ValueError(
                f"the checkpoint in {args.checkpoint_dir} was saved by {saved}: resume it "
                f"{'with' if group['use_kl_shampoo'] else 'without'} --kl-shampoo, or start a "
                f"new run in an empty --checkpoint-dir")


def _exit_now(code: int) -> None:
    """Exit with ``code`` without interpreter finalization, once ``main`` has returned.

    After ``destroy_process_group`` every output is written and closed or flushed, yet about one
    multi-process run in 40 here aborted during finalization, with no Python frame left, in a
    C++ destructor of torch's process-group machinery ("terminate called without an active
    exception"). Under torchrun that turns a finished run into a failed one, and with
    ``--max-restarts`` into a restart. ``os._exit`` skips that teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())

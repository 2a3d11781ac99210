"""Workers for the multi-process sharding tests (imported by spawned gloo ranks).

Every world size trains the same awkward model on the SAME injected gradients, so parameters
after N steps must equal the single-process optimizer's.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from optim import Muon, NorMuon, split_param_groups
from optim._checks import ADAMW
from optim._exchange import local

# Awkward on purpose: rows that divide by neither 2 nor 4 (7, 5), fewer rows than ranks (3: an
# empty shard at W=4), tall (40x6) and wide (5x33), and two matrices of one shape (batched).
SHAPES: tuple[tuple[int, int], ...] = ((7, 12), (3, 8), (40, 6), (5, 33), (16, 16), (16, 16))
BIAS = 5  # a 1-D parameter: the AdamW fallback, sharded by FSDP2 too
STEPS = 4
NAN_STEP, NAN_PARAM, NAN_ROW = 2, "ws.0", 6  # row 6 lives on the LAST rank at W = 2 and 4
# what a "bad" scenario puts at NAN_PARAM[NAN_ROW, 0] at NAN_STEP: a NaN, or a finite gradient
# whose squares overflow float32 (SOAP must skip it like a NaN)
BAD_VALUES = {"nan": float("nan"), "huge": 1e30}


def _soap(params: Any, sharding: Any, **kwargs: Any) -> Any:
    from optim.soap import SOAP

    return SOAP(params, lr=3e-3, sharding=sharding, **kwargs)


def _one_per_batch(opt: Any) -> Any:
    opt.MAX_BATCH_BYTES = 1
    return opt


OPTIMIZERS: dict[str, Callable[[Any, Any], Any]] = {
    "muon": lambda params, sharding: Muon(params, lr=0.02, sharding=sharding),
    "muon_soft_pe": lambda params, sharding: Muon(
        params, lr=0.02, ns_method="polar_express", softening=lambda t: 0.1 * t,
        sharding=sharding),
    "normuon": lambda params, sharding: NorMuon(params, lr=0.02, sharding=sharding),
    # Two probes: the orthogonality error is estimated (not exact) on every matrix with a
    # smaller side above 4, so the owner's seeded probes are checked against one process.
    "muon_probes": lambda params, sharding: Muon(params, lr=0.02, health_probes=2,
                                                 sharding=sharding),
    "soap": _soap,
    # One matrix per batch, on the owners too (the two 16x16 matrices batch otherwise)
    "soap_unbatched": lambda params, sharding: _one_per_batch(_soap(params, sharding)),
    # One-sided SOAP: dims above 16 get no factor ((0, 0) state tensors) - 40x6, 7x12 both ways.
    "soap_onesided_kl": lambda params, sharding: _soap(params, sharding, max_precond_dim=16,
                                                       use_kl_shampoo=True, use_eigh=True),
    # Refresh every 2 steps: health between refreshes from Rayleigh quotients carried on the
    # owner (power iteration: one product after each refresh), and across the NaN-skipped step.
    # The update's RMS clipped at 0.5 (which every matrix's first steps pass): an RMS of the
    # full matrix, taken on its owner, not of a rank's rows.
    "soap_every2": lambda params, sharding: _soap(params, sharding, precondition_frequency=2,
                                                  max_update_rms=0.5),
}


# "name@dtype" runs optimizer "name" on a model (and gradients) of that dtype: the exchange must
# hand the owner each matrix in its own dtype and bring back the update one process applies
DTYPES = {"bf16": torch.bfloat16, "f64": torch.float64}


def split_name(name: str) -> tuple[str, torch.dtype]:
    """``("soap", torch.float64)`` for ``"soap@f64"``; float32 without a suffix."""
    base, _, suffix = name.partition("@")
    return base, DTYPES[suffix] if suffix else torch.float32


class Awkward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(*s, generator=g) / s[1] ** 0.5)
                                   for s in SHAPES)
        self.bias = nn.Parameter(torch.zeros(BIAS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard needs a forward
        return x


def full_grads(step: int, *, bad: str | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    grads = {f"ws.{i}": torch.randn(*s, generator=g) for i, s in enumerate(SHAPES)}
    grads["bias"] = torch.randn(BIAS, generator=g)
    if bad is not None and step == NAN_STEP:
        grads[NAN_PARAM][NAN_ROW, 0] = BAD_VALUES[bad]
        grads["bias"][BIAS - 1] = float("inf")  # on one rank's shard only (W = 2 and 4)
    return grads


def inject(model: nn.Module, step: int, *, bad: str | None = None) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    grads = full_grads(step, bad=bad)
    for name, p in model.named_parameters():
        grad = grads[name].to(p.dtype)
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = grad.clone()


def distribute_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``p`` (this rank's piece of a DTensor parameter, or a copy)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(p.dtype)
    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full.clone()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def build(name: str, *, fsdp: bool, sharding: Any, mesh: Any = None) -> tuple[nn.Module, Any]:
    """The Awkward model (``fully_shard`` over ``mesh``, default the world, when ``fsdp``) and
    optimizer ``name`` over it."""
    base, dtype = split_name(name)
    model = Awkward().to(dtype)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    opt = OPTIMIZERS[base](split_param_groups(model.named_parameters()), sharding)
    if sharding is not None:
        assert_owners_batch_alone(opt, sharding)
    return model, opt


def hsdp_mesh(world: int) -> Any:
    """HSDP over ``world`` ranks: 2 replicas of ``world // 2`` shards (ranks 0..world/2-1 hold
    the first replica)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))


def layout(kind: str, world: int) -> tuple[Any, Any]:
    """``(mesh for fully_shard, OwnerSharding)`` of a layout: "fsdp" (the world, the default
    group) or "hsdp" (:func:`hsdp_mesh`, OwnerSharding over each replica's shard group)."""
    from sharding import OwnerSharding

    if kind == "fsdp":
        return None, OwnerSharding()
    mesh = hsdp_mesh(world)
    return mesh, OwnerSharding(group=mesh.get_group("shard"))


# One process batches every matrix of a group, shape and dtype; an owner only those it owns.
# Muon's bf16 Newton-Schulz rounds a batch of two otherwise than one matrix alone in rare
# inputs (docs/sharding.md; on AVX512 CPUs one 16x16 matrix of this model's grow scenario
# came out 0.006 apart after 5 iterations, 7.5e-5 in the parameter after 2 steps). At W > 1
# this model's Muon and NorMuon owners never hold two matrices of one shape
# (assert_owners_batch_alone), so the references take those steps one matrix per batch, as
# the owners do.
def batch_as_owners(opt: Any, alone: bool, batched: int) -> None:
    """Make ``opt`` (one process) batch as the owners at W > 1 when ``alone``, else as it was
    built (``batched``: its ``MAX_BATCH_BYTES`` then)."""
    opt.MAX_BATCH_BYTES = 1 if alone else batched


def assert_owners_batch_alone(opt: Any, sharding: Any) -> None:
    """What the references' ``alone`` steps assume at W > 1: no owner of ``sharding``'s plan
    holds two of ``opt``'s matrices of one batch shape (:meth:`Muon._batch_shape`: so each runs
    as a batch of one). Muon's and NorMuon's only: SOAP steps each matrix from a buffer of its
    own, so its batches change no bit (its owners do batch: the two 16x16 matrices at W = 2)."""
    if sharding.world_size == 1 or not isinstance(opt, Muon):
        return
    plan, index = sharding.global_plan(check=False)  # a misplaced shard is the step's to report
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for item in opt.matrix_items():
        key = (plan.owners[index[id(item.param)]], tuple(opt._batch_shape(item)))
        assert key not in seen, (f"rank {key[0]} owns {seen[key]} and {item.name}, both "
                                 f"{key[1]}: the references no longer batch as the owners do")
        seen[key] = item.name


def reference(name: str, steps: int, *, bad: str | None = None, alone: Container[int] = ()
              ) -> dict[str, torch.Tensor]:
    """Single process, no process group: the result every world size must reproduce.
    ``alone``: the steps it runs as owners at W > 1 do (:func:`batch_as_owners`)."""
    return reference_run(name, steps, bad=bad, alone=alone)[0]


def reference_run(name: str, steps: int, *, bad: str | None = None, alone: Container[int] = ()
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict]:
    """:func:`reference`'s parameters, the single process's ``health()`` and its state summary
    (``orthoshard.telemetry.optimizer_summary``) after the run."""
    from orthoshard.telemetry import optimizer_summary

    model, opt = build(name, fsdp=False, sharding=None)
    batched = opt.MAX_BATCH_BYTES
    for step in range(steps):
        batch_as_owners(opt, step in alone, batched)
        inject(model, step, bad=bad)
        opt.step()
    return full_params(model), opt.health(), optimizer_summary(opt, rank=0)["state"]


# add_param_group during training: the first matrices train from step 0, the last two join at
# GROW_AT (as unfrozen layers do); under OwnerSharding the joiners must not move the others' state
GROW_AT, GROW_JOINERS = 2, ("ws.4", "ws.5")


def _awkward(fsdp: bool) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The awkward model (under FSDP2 if ``fsdp``) and its parameters by name."""
    model = Awkward()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return model, dict(model.named_parameters())


def _step(opt: Any, sharding: Any) -> None:
    """``opt.step()``; under OwnerSharding, then :func:`assert_owners_batch_alone`."""
    opt.step()
    if sharding is not None:
        assert_owners_batch_alone(opt, sharding)


def grow_run(name: str, steps: int, *, fsdp: bool, sharding: Any, alone: bool = False
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Train with the joiners added at ``GROW_AT``; the parameters and this rank's health."""
    model, named = _awkward(fsdp)
    first = [(n, p) for n, p in named.items() if n not in GROW_JOINERS]
    opt = OPTIMIZERS[name](split_param_groups(first), sharding)
    batch_as_owners(opt, alone, opt.MAX_BATCH_BYTES)
    for step in range(steps):
        if step == GROW_AT:
            opt.add_param_group({"params": [(n, named[n]) for n in GROW_JOINERS]})
        inject(model, step)
        if step < GROW_AT:
            for n in GROW_JOINERS:
                named[n].grad = None  # frozen until they join
        _step(opt, sharding)
    return full_params(model), opt.health()


# a group removed during training (a block frozen): its matrices leave at GROW_AT; the others'
# owners must stay where their state is (a fresh plan over the rest moved some of them)
SHRINK_LEAVERS = ("ws.2", "ws.3")


def shrink_run(name: str, steps: int, *, fsdp: bool, sharding: Any, alone: bool = False
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Train with the leavers' group removed at ``GROW_AT``; the parameters and this rank's
    health (the leavers keep the gradients injected, which no optimizer reads any more)."""
    model, named = _awkward(fsdp)
    rest = [(n, p) for n, p in named.items() if n not in SHRINK_LEAVERS]
    groups = [{"params": [(n, named[n]) for n in SHRINK_LEAVERS]}, *split_param_groups(rest)]
    opt = OPTIMIZERS[name](groups, sharding)
    batch_as_owners(opt, alone, opt.MAX_BATCH_BYTES)
    for step in range(steps):
        if step == GROW_AT:
            opt.param_groups.pop(0)
        inject(model, step)
        _step(opt, sharding)
    # checkpointable while the group is out (torch's packing raised KeyError on its state);
    # under OwnerSharding a collective, which every rank makes here
    saved = opt.state_dict()
    assert len(saved["param_groups"]) == len(opt.param_groups)
    assert saved["state"] and set(saved["state"]) <= {
        k for g in saved["param_groups"] for k in g["params"]}  # none of the leavers' state
    return full_params(model), opt.health()


# a block frozen and unfrozen again: ws.0's group leaves at step 2, ws.4 first joins at 3,
# ws.0 comes back at 4 (placed afresh it moved to another rank and restarted from zero state)
REFREEZE_STEPS = 6


def refreeze_run(name: str, steps: int, *, fsdp: bool, sharding: Any, alone: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    model, named = _awkward(fsdp)
    rest = [(n, p) for n, p in named.items() if n not in ("ws.0", "ws.4")]
    opt = OPTIMIZERS[name]([{"params": [("ws.0", named["ws.0"])]}, *split_param_groups(rest)],
                           sharding)
    batch_as_owners(opt, alone, opt.MAX_BATCH_BYTES)
    for step in range(steps):
        if step == 2:
            opt.param_groups.pop(0)
        if step in (3, 4):
            joiner = "ws.4" if step == 3 else "ws.0"
            opt.add_param_group({"params": [(joiner, named[joiner])]})
        inject(model, step)
        if step < 3:
            named["ws.4"].grad = None
        _step(opt, sharding)
    return full_params(model), opt.health()


REGROUPS: dict[str, tuple[Callable[..., Any], int]] = {
    "grow": (grow_run, STEPS), "shrink": (shrink_run, STEPS),
    "refreeze": (refreeze_run, REFREEZE_STEPS)}


def grow_worker(rank: int, world: int, out: str, names: list[str], change: str = "grow"
                ) -> None:
    """:func:`grow_run` (or another of :data:`REGROUPS`) under FSDP2 and OwnerSharding for
    each optimizer; rank 0 saves the parameters and every rank's health."""
    from sharding import OwnerSharding

    run, steps = REGROUPS[change]
    results = {}
    for name in names:
        params, health = run(name, steps, fsdp=True, sharding=OwnerSharding())
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, health)
        results[name] = {"params": params, "health": gathered}
    if rank == 0:
        torch.save(results, Path(out))


def _every_rank_says(world: int, expected: type[Exception], action: Callable[[], Any]
                     ) -> list[str]:
    """Run ``action`` on this rank; every rank's outcome ("done", or the ``expected`` exception
    as "Name: message"), gathered."""
    try:
        action()
        outcome = "done"
    except expected as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, outcome)
    return outcomes


def _on_every_rank(world: int, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (gathered): a rank's own state, plain tensors
    included, is seen by that rank alone."""
    flags: list[Any] = [None] * world
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


def grad_on_one_rank_worker(rank: int, world: int, out: str, name: str,
                            replicated: bool = False, dropped: str = "owned by 0") -> None:
    """Rank 1 drops gradients rank 0 keeps: ``dropped`` is "owned by 0" or "owned by 1" (one
    matrix that rank owns), "matrices" (every matrix gradient, the AdamW one kept) or
    "everything"; "everything, every rank": no rank has a gradient. Every rank's outcome of that
    step, whether any parameter or state changed, and the next (matching) step's.
    ``replicated``: plain parameters (DDP-style), no FSDP2."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    model = Awkward()
    if not replicated:
        fully_shard(model)
    named = dict(model.named_parameters())
    sharding = OwnerSharding()
    opt = OPTIMIZERS[name](split_param_groups(list(named.items())), sharding)
    inject(model, 0)
    opt.step()
    plan, index = sharding.global_plan()
    matrices = [item.name for item in opt.matrix_items()]
    if dropped.startswith("owned by "):
        owner = int(dropped.removeprefix("owned by "))
        victims = [next(item.name for item in opt.matrix_items()
                        if plan.owners[index[id(item.param)]] == owner)]
    else:
        victims = matrices + (["bias"] if dropped.startswith("everything") else [])

    def spoil() -> None:
        if rank == 1 or dropped.endswith("every rank"):
            for victim in victims:
                named[victim].grad = None

    _refused_step(rank, world, model, opt, spoil, out)


def no_gradient_warned_as_error_worker(rank: int, world: int, out: str, everyone: bool
                                       ) -> None:
    """Warnings raised as errors (``python -W error``), and a first step without a gradient on
    rank 1 (``everyone``: on every rank), where the optimizer warns of a step that found none.
    Every rank's outcome, and whether the step counts moved."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    warnings.simplefilter("error")
    model = Awkward()
    fully_shard(model)
    opt = OPTIMIZERS["muon"](split_param_groups(list(model.named_parameters())),
                             OwnerSharding())
    if rank == 0 and not everyone:
        inject(model, 0)
    outcomes = _every_rank_says(world, Exception, opt.step)
    if rank == 0:
        torch.save({"outcomes": outcomes,
                    "steps": [group["step"] for group in opt.param_groups]}, out)


def full_state_dict_worker(rank: int, world: int, out: str, name: str) -> None:
    """torch's own full (consolidated) optimizer state dict of a sharded model, against the
    owners' live state: every owner-kept tensor, per matrix, whether equal."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    model = Awkward()
    fully_shard(model)
    named = dict(model.named_parameters())
    sharding = OwnerSharding()
    opt = OPTIMIZERS[name](split_param_groups(list(named.items())), sharding)
    for step in range(2):
        inject(model, step)
        opt.step()
    full = get_optimizer_state_dict(model, opt,
                                    options=StateDictOptions(full_state_dict=True))
    plan, index = sharding.global_plan()
    keys = sharding._optimizer.owner_state_keys
    mine = {}
    for item in opt.matrix_items():
        if plan.owners[index[id(item.param)]] == rank:
            live, got = opt.state[item.param], full["state"][item.name]
            mine[item.name] = {k: torch.equal(got[k], live[k]) for k in keys if k in live}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, out)


def save_twice_worker(rank: int, world: int, directory: str, out: str) -> None:
    """Save a checkpoint, then save again into the same directory: every rank must refuse the
    second save together (none left waiting in a collective); rank 0 writes what each saw."""
    from sharding import OwnerSharding, checkpoint

    model, opt = build("soap", fsdp=True, sharding=OwnerSharding())
    inject(model, 0)
    opt.step()
    checkpoint.save(directory, model, opt)
    first = full_params(model)
    inject(model, 1)
    opt.step()
    outcomes = _every_rank_says(world, FileExistsError,
                                lambda: checkpoint.save(directory, model, opt))
    fresh, fresh_opt = build("soap", fsdp=True, sharding=OwnerSharding())
    checkpoint.load(directory, fresh, fresh_opt)
    loaded = full_params(fresh)
    # the SOAP checkpoint into a Muon: refused on every rank, naming the mismatch
    other, other_opt = build("muon", fsdp=True, sharding=OwnerSharding())
    wrongs = _every_rank_says(world, ValueError,
                              lambda: checkpoint.load(directory, other, other_opt))
    # a NorMuon checkpoint holds every tensor a Muon asks for (and more): DCP alone would load
    # them into the Muon's model and state before its groups ("normuon") were refused
    normuon, normuon_opt = build("normuon", fsdp=True, sharding=OwnerSharding())
    inject(normuon, 0)
    normuon_opt.step()
    checkpoint.save(f"{directory}-normuon", normuon, normuon_opt)
    inject(other, 2)
    other_opt.step()
    before = (full_params(other), _full_state(other_opt))
    groups = _every_rank_says(world, ValueError,
                              lambda: checkpoint.load(f"{directory}-normuon", other, other_opt))
    after = (full_params(other), _full_state(other_opt))
    # the SOAP checkpoint into a one-sided SOAP (max_precond_dim 16: the 40- and 33-long sides
    # store no factor): DCP's size mismatch came as a CheckpointException, a BaseException
    narrow, _ = build("soap", fsdp=True, sharding=None)
    narrow_opt = OPTIMIZERS["soap_onesided_kl"](split_param_groups(narrow.named_parameters()),
                                                OwnerSharding())
    shapes = _every_rank_says(world, ValueError,
                              lambda: checkpoint.load(directory, narrow, narrow_opt))
    if rank == 0:
        torch.save({"outcomes": outcomes, "first": first, "loaded": loaded, "wrong": wrongs,
                    "groups": groups, "before": before, "after": after, "shapes": shapes},
                   Path(out))


def _full_state(opt: Any) -> dict[tuple[int, str], torch.Tensor]:
    """Every state tensor of ``opt.state_dict()`` in full (a collective under OwnerSharding)."""
    from torch.distributed.tensor import DTensor

    return {(k, key): (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, entry in opt.state_dict()["state"].items() for key, v in entry.items()
            if isinstance(v, torch.Tensor)}


class A2ACounter:
    """An independent byte count: wraps ``dist.all_to_all_single`` for the duration."""

    def __init__(self) -> None:
        self.sent = self.received = self.calls = 0
        self._orig = dist.all_to_all_single

    def __enter__(self) -> A2ACounter:
        def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
            me = dist.get_rank(kw.get("group"))
            self.sent += sum(s for r, s in enumerate(input_split_sizes) if r != me) \
                * input.element_size()
            self.received += sum(s for r, s in enumerate(output_split_sizes) if r != me) \
                * output.element_size()
            self.calls += 1
            return self._orig(output, input, output_split_sizes=output_split_sizes,
                              input_split_sizes=input_split_sizes, **kw)

        dist.all_to_all_single = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_to_all_single = self._orig  # type: ignore[assignment]


def parity_worker(rank: int, world: int, out: str, fsdp: bool,
                  scenarios: list[tuple[str, str | None]]) -> None:
    """Run each ``(optimizer name, bad gradient or None)`` scenario; rank 0 saves params and
    stats."""
    from orthoshard.telemetry import optimizer_summary
    from sharding import OwnerSharding

    results: dict[tuple[str, str | None], Any] = {}
    for name, bad in scenarios:
        sharding = OwnerSharding()
        model, opt = build(name, fsdp=fsdp, sharding=sharding)
        # torch's own count of every collective the steps ran (CommDebugMode: all_reduce,
        # all_gather, broadcast, ... as well as the all-to-alls A2ACounter wraps)
        from torch.distributed.tensor.debug import CommDebugMode

        with A2ACounter() as counter, CommDebugMode() as debug:
            for step in range(STEPS):
                inject(model, step, bad=bad)
                opt.step()
        plan, _ = sharding.global_plan()
        mine = {"stats": opt.comm_stats(), "counted": (counter.sent, counter.received,
                                                       counter.calls),
                "all_collectives": debug.get_total_counts(),
                "plan": (plan.elements_sent(rank), plan.elements_received(rank)),
                "health": opt.health(),
                # collective under FSDP2 (sharded momentum): every rank calls it here
                "summary": optimizer_summary(opt, rank=rank)["state"]}
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, mine)
        params = full_params(model)
        if rank == 0:
            results[(name, bad)] = {"params": params, "ranks": per_rank}
    if rank == 0:
        torch.save(results, Path(out))


def dcp_worker(rank: int, world: int, names: list[str], load_dir: str | None,
               save_dir: str | None, first: int, last: int, out: str,
               kind: str = "fsdp") -> None:
    """Per optimizer: load ``load_dir/name`` if given, train steps [first, last) with the NaN
    scenario's gradients, save; rank 0 writes the final parameters and the skip counts that
    the ranks' health reports (gathered). ``kind``: the :func:`layout`."""
    from sharding import checkpoint

    finals = {}
    for name in names:
        mesh, sharding = layout(kind, world)
        model, opt = build(name, fsdp=True, sharding=sharding, mesh=mesh)
        if load_dir:
            checkpoint.load(Path(load_dir) / name, model, opt)
        for step in range(first, last):
            inject(model, step, bad="nan")
            opt.step()
        if save_dir:
            checkpoint.save(Path(save_dir) / name, model, opt)
        health: list[Any] = [None] * world
        dist.all_gather_object(health, opt.health())
        skips = {k: v["nonfinite_skips"] for h in health for k, v in h.items()}
        finals[name] = {"params": full_params(model), "skips": skips}
    if rank == 0:
        torch.save(finals, Path(out))


# A float64 gradient entry finite in float64 and beyond bfloat16's range: Muon's update (Newton-
# Schulz in bfloat16) comes out non-finite from a finite input, and only its owner can tell.
BEYOND_BF16 = 1e300
EMPTY_OWNER_SHAPES = ((8, 8), (1, 8))  # at W = 2 the 1-row matrix's second shard is empty


def _empty_owner_grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in EMPTY_OWNER_SHAPES]
    if step == 1:
        grads[1][0, 3] = BEYOND_BF16
    return grads


def empty_owner_run(model: nn.Module, optimizer: Any, steps: int = 3) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in range(steps):
        for p, g in zip(model.parameters(), _empty_owner_grads(step), strict=True):
            p.grad = (distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(p, DTensor) else g)
        optimizer.step()


def empty_owner_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    return nn.ParameterList(nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64))
                            for s in EMPTY_OWNER_SHAPES)


def empty_owner_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    model = empty_owner_model()
    fully_shard(model)
    sharding = OwnerSharding()
    optimizer = Muon(list(model.named_parameters()), lr=0.02, sharding=sharding)
    empty_owner_run(model, optimizer)
    plan, _ = sharding.global_plan()
    mine = {"rank": rank, "owners": plan.owners, "bounds": plan.bounds,
            "health": optimizer.health(),
            "saved": optimizer.state_dict()["param_groups"][0]["nonfinite_skips"]}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"ranks": gathered, "params": params}, out)


FAILING_EIGH_SIDE = 24  # an eigendecomposition of this size raises, as a non-converging one does
FAILING_SHAPES = ((24, 16), (8, 8))


def failing_eigh() -> Callable[..., Any]:
    """``torch.linalg.eigh`` that raises for a ``FAILING_EIGH_SIDE`` factor (float64 retry too)."""
    real = torch.linalg.eigh

    def eigh(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if a.size(-1) == FAILING_EIGH_SIDE:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real(a, *args, **kwargs)

    return eigh


def failing_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    return nn.ParameterList(nn.Parameter(torch.randn(*s, generator=g)) for s in FAILING_SHAPES)


def failing_run(model: nn.Module, optimizer: Any, steps: int = 2) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in model.parameters():
            grad = torch.randn(*p.shape, generator=g)
            p.grad = (distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(p, DTensor) else grad)
        optimizer.step()


def failing_owner_worker(rank: int, world: int, out: str) -> None:
    import warnings

    from torch.distributed.fsdp import fully_shard

    from optim.soap import SOAP
    from sharding import OwnerSharding

    torch.linalg.eigh = failing_eigh()  # this spawned process only
    model = failing_model()
    fully_shard(model)
    optimizer = SOAP(list(model.named_parameters()), lr=3e-3, use_eigh=True,
                     sharding=OwnerSharding())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        failing_run(model, optimizer)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, optimizer.health())
    # where each rank's warnings point (the owner warns): the step() call in failing_run
    places: list[Any] = [None] * world
    dist.all_gather_object(places, [w.filename for w in caught
                                    if issubclass(w.category, RuntimeWarning)])
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"health": gathered, "params": params, "warned_at": places}, out)


FAILING_MATRIX = "ws.3"  # its owner's compute raises (owner_error_worker)


def owner_error_worker(rank: int, world: int, out: str, phase: str, fsdp: bool) -> None:
    """Muon whose step raises on one rank at the second step, as an out-of-memory error would:
    in the compute of ``FAILING_MATRIX``'s owner (``phase`` "compute"), while that owner
    assembles its full matrices from the gathered rows ("assemble") or lays out its results
    for the scatter ("send"), or while the last rank prepares its rows ("prepare"). What every
    rank saw, the parameters and momentum around that step, and a third step once the fault is
    gone. Rank 0 writes them."""
    from sharding import OwnerSharding

    model, opt = build("muon", fsdp=fsdp, sharding=OwnerSharding())
    inject(model, 0)
    opt.step()
    plan, _ = opt._exchange.global_plan()
    names = [item.name for item in opt.matrix_items()]
    failing = world - 1 if phase == "prepare" else plan.owners[names.index(FAILING_MATRIX)]
    import sharding.owner

    target, method = {"compute": (opt, "_compute"), "prepare": (opt, "_prepare"),
                      "assemble": (sharding.owner, "assemble"),
                      "send": (sharding.owner, "send_lists")}[phase]
    real = getattr(target, method)

    def fail(*args: Any) -> Any:
        if phase in ("compute", "prepare"):
            items = args[0] if phase == "compute" else [args[0]]
            due = any(item.name == FAILING_MATRIX for item in items)
        else:  # the owner's own step of the exchange (not the placeholders of a failed one)
            due = phase == "assemble" or args[2] is not None
        if rank == failing and due:
            raise RuntimeError(f"injected failure on rank {rank}")
        return real(*args)

    setattr(target, method, fail)
    before, momentum = full_params(model), _momentum(opt)
    steps = [group["step"] for group in opt.param_groups]
    inject(model, 1)
    failed = _every_rank_says(world, Exception, opt.step)
    after, momentum_after = full_params(model), _momentum(opt)
    steps_after = [group["step"] for group in opt.param_groups]
    setattr(target, method, real)  # the real one again
    inject(model, 2)
    recovered = _every_rank_says(world, Exception, opt.step)
    final = full_params(model)  # a collective: every rank
    if rank == 0:
        torch.save({"failing": failing, "failed": failed, "recovered": recovered,
                    "before": before, "after": after, "final": final, "momentum": momentum,
                    "momentum_after": momentum_after, "steps": steps,
                    "steps_after": steps_after}, out)


def _momentum(opt: Any) -> dict[str, torch.Tensor]:
    """Every matrix's full momentum buffer (a collective under FSDP2)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for item in opt.matrix_items():
        buf = opt.state[item.param]["momentum_buffer"]
        out[item.name] = (buf.full_tensor() if isinstance(buf, DTensor) else buf).clone()
    return out


def bias_only_run(model: nn.Module, opt: Any) -> list[float]:
    """Three steps: every gradient; then the bias alone (no matrix takes part, so no gather
    can carry its finiteness flag) with an Inf in rank 0's shard alone, then finite. The AdamW
    skip count after each step."""
    counts = []
    for step in range(3):
        inject(model, step)
        if step > 0:
            for name, p in model.named_parameters():
                if name != "bias":
                    p.grad = None
        if step == 1:
            _set_first(model.bias.grad, float("inf"))
        opt.step()
        counts.append(float(opt.param_groups[-1]["nonfinite_skips"]["bias"]))
    return counts


def _set_first(grad: torch.Tensor, value: float) -> None:
    """Put ``value`` in the first entry of a gradient (rank 0's shard holds it)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor):
        grad[0] = value
    elif dist.get_rank() == 0:
        grad.to_local()[0] = value


def bias_only_worker(rank: int, world: int, out: str) -> None:
    from sharding import OwnerSharding

    model, opt = build("muon", fsdp=True, sharding=OwnerSharding())
    counts = bias_only_run(model, opt)
    stats = opt.comm_stats()
    params = full_params(model)
    if rank == 0:
        torch.save({"counts": counts, "stats": stats, "params": params}, out)


MESH_SHAPE = (8, 6)  # rows divide by 2 and 4: only the ranks check can tell a wrong mesh


def mesh_run(mesh: Any, sharding: Any) -> dict[str, torch.Tensor]:
    """Two Muon steps on one ``MESH_SHAPE`` matrix sharded over ``mesh`` (or not: None)."""
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(MESH_SHAPE[1], MESH_SHAPE[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(*MESH_SHAPE, generator=g))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(lin, mesh=mesh)
    opt = Muon([("w", lin.weight)], lr=0.05, sharding=sharding)
    for _ in range(2):
        # the same gradient on every rank: src_data_rank=None keeps each rank's own chunk
        grad = torch.randn(*MESH_SHAPE, generator=g)
        lin.weight.grad = grad if mesh is None else distribute_tensor(
            grad, mesh, lin.weight.placements, src_data_rank=None)
        opt.step()
    return full_params(lin)


def _column_sharded_step(world: int) -> None:
    """A Muon step on a ``Shard(1)`` (tensor-parallel style) parameter: refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sharding import OwnerSharding

    mesh = init_device_mesh("cpu", (world,))
    weight = nn.Parameter(distribute_tensor(torch.randn(*MESH_SHAPE), mesh, [Shard(1)]))
    opt = Muon([("w", weight)], lr=0.05, sharding=OwnerSharding())
    weight.grad = distribute_tensor(torch.ones(*MESH_SHAPE), mesh, [Shard(1)])
    opt.step()


def mesh_checks_worker(rank: int, world: int, out: str) -> None:
    """At W = 4, FSDP over 2-rank meshes with OwnerSharding over the right and wrong groups;
    rank 0 saves what every rank saw and the right group's parameters."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from sharding import OwnerSharding

    two_d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))
    shard, replica = two_d["shard"], two_d["replica"]
    reversed_mesh = DeviceMesh("cpu", torch.arange(world).flip(0))
    cases = {
        # the mesh's ranks, in another order than the group's
        "reversed": lambda: mesh_run(reversed_mesh, OwnerSharding()),
        # right size, other ranks: rank 0 would assemble its row chunk with rank 2's, which
        # is the same chunk of the other replica
        "other ranks": lambda: mesh_run(shard, OwnerSharding(group=replica.get_group())),
        "other size": lambda: mesh_run(shard, OwnerSharding()),
        "column shards": lambda: _column_sharded_step(world),
    }
    outcomes = {name: _every_rank_says(world, ValueError, case) for name, case in cases.items()}
    # a group of ranks 0 and 1 only (every rank creates it): ranks 2 and 3 are not in it
    first_two = dist.new_group([0, 1])
    outcomes["not a member"] = _every_rank_says(world, ValueError,
                                                lambda: OwnerSharding(group=first_two))
    right = mesh_run(shard, OwnerSharding(group=shard.get_group()))
    if rank == 0:
        torch.save({"outcomes": outcomes, "right": right}, out)


def hsdp_worker(rank: int, world: int, out: str, scenarios: list[tuple[str, str | None]]
                ) -> None:
    """Each scenario under HSDP (:func:`layout`); rank 0 saves the parameters, every rank's
    health, state summary (by its rank in its shard group) and byte counts."""
    from orthoshard.telemetry import optimizer_summary

    results: dict[tuple[str, str | None], Any] = {}
    for name, bad in scenarios:
        mesh, sharding = layout("hsdp", world)
        model, opt = build(name, fsdp=True, sharding=sharding, mesh=mesh)
        for step in range(STEPS):
            inject(model, step, bad=bad)
            opt.step()
        mine = {"stats": opt.comm_stats(), "health": opt.health(),
                "summary": optimizer_summary(opt, rank=sharding.rank)["state"]}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        results[(name, bad)] = {"params": full_params(model), "ranks": gathered}
    if rank == 0:
        torch.save(results, Path(out))


def run_id_worker(rank: int, world: int, out: str, torchelastic_id: str,
                  checkpoint_dir: str | None = None, resumed: bool = False) -> None:
    """``orthoshard.train._run_id`` on every rank with torchrun's id set to ``torchelastic_id``
    (``ORTHOSHARD_RUN_ID`` unset); writes it to ``out.<rank>``."""
    import os

    from orthoshard.train import _run_id

    os.environ.pop("ORTHOSHARD_RUN_ID", None)
    os.environ["TORCHELASTIC_RUN_ID"] = torchelastic_id
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    Path(f"{out}.{rank}").write_text(_run_id(directory, resumed))


def plain_grad_worker(rank: int, world: int, out: str, name: str) -> None:
    """A full plain-tensor ``.grad`` set on one FSDP2 (DTensor) matrix: every rank's outcome of
    that step, whether any parameter changed, and the next (correct) step's outcome."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    model = Awkward()
    fully_shard(model)
    named = dict(model.named_parameters())
    opt = OPTIMIZERS[name](split_param_groups(list(named.items())), OwnerSharding())
    inject(model, 0)
    opt.step()

    def spoil() -> None:
        named["ws.0"].grad = torch.zeros(SHAPES[0])  # torch takes it; the exchange could not

    _refused_step(rank, world, model, opt, spoil, out)


def _refused_step(rank: int, world: int, model: nn.Module, opt: Any,
                  spoil: Callable[[], None], out: str) -> None:
    """Step 1's gradients, ``spoil``-ed, then a step that every rank should refuse; saves every
    rank's outcome, whether any parameter or step count changed, the collectives rank 0 counted
    for the refused step, and the outcomes of a correct step 2."""
    before, state = full_params(model), _full_state(opt)
    steps = [group["step"] for group in opt.param_groups]
    inject(model, 1)
    spoil()
    calls = opt.comm_stats()["collectives"]
    outcomes = _every_rank_says(world, ValueError, opt.step)
    calls = opt.comm_stats()["collectives"] - calls
    after, state_after = full_params(model), _full_state(opt)
    # nor the step counts (the step did not happen), nor any state (an owner that computed
    # before the refusal advanced NorMuon's second moments, SOAP's factors)
    counted = [group["step"] for group in opt.param_groups] != steps
    # each rank's own comparison: a replicated parameter's state is a plain tensor per rank
    state_kept = _on_every_rank(world, state.keys() == state_after.keys() and all(
        torch.equal(state[k], state_after[k]) for k in state))
    inject(model, 2)
    recovered = _every_rank_says(world, ValueError, opt.step)
    if rank == 0:
        kept = all(torch.equal(before[k], after[k]) for k in before)
        torch.save({"outcomes": outcomes, "unchanged": not counted and kept,
                    "params unchanged": kept, "counted": counted, "recovered": recovered,
                    "state unchanged": state_kept, "collectives": calls}, out)


RESUME_AT = 2  # the resumed runs load a checkpoint of the first RESUME_AT steps


def torch_recipe_worker(rank: int, world: int, names: list[str], directory: str, save: bool,
                        out: str) -> None:
    """torch's own FSDP2 checkpoint recipe (``get_state_dict`` / ``set_state_dict``) with each
    optimizer: if ``save``, train ``RESUME_AT`` steps and save both a sharded DCP checkpoint
    (``directory/name``) and a full state dict (rank 0, ``directory/name.pt``); then, from
    each of the two, a fresh model and optimizer load and train to ``STEPS`` with the NaN
    scenario's gradients. Rank 0 writes the final parameters by ``(name, "sharded" | "full")``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    from sharding import OwnerSharding

    full = StateDictOptions(full_state_dict=True)
    results = {}
    for name in names:
        path = Path(directory) / name
        if save:
            model, opt = build(name, fsdp=True, sharding=OwnerSharding())
            for step in range(RESUME_AT):
                inject(model, step, bad="nan")
                opt.step()
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
            model_sd, optim_sd = get_state_dict(
                model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save({"model": model_sd, "optim": optim_sd}, f"{path}.pt")
            dist.barrier()
        for kind in ("sharded", "full"):
            model, opt = build(name, fsdp=True, sharding=OwnerSharding())
            if kind == "sharded":
                model_sd, optim_sd = get_state_dict(model, opt)
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=str(path))
                set_state_dict(model, opt, model_state_dict=state["model"],
                               optim_state_dict=state["optim"])
            else:
                state = torch.load(f"{path}.pt", weights_only=False)
                set_state_dict(model, opt, model_state_dict=state["model"],
                               optim_state_dict=state["optim"], options=full)
            for step in range(RESUME_AT, STEPS):
                inject(model, step, bad="nan")
                opt.step()
            results[(name, kind)] = full_params(model)
    if rank == 0:
        torch.save(results, Path(out))


def sharded_into_plain_worker(rank: int, world: int, names: list[str], directory: str,
                              out: str) -> None:
    """Each optimizer under FSDP2 and OwnerSharding trains ``RESUME_AT`` steps (the NaN
    scenario's gradients) and saves a DCP checkpoint to ``directory/name``; every rank then
    offers its ``state_dict()`` (DTensors) to a one-process optimizer's ``load_state_dict``.
    Rank 0 writes, per optimizer, the error it raised (None if it took the dict) and whether the
    one-process optimizer was left as it was."""
    from sharding import OwnerSharding, checkpoint

    results = {}
    for name in names:
        model, opt = build(name, fsdp=True, sharding=OwnerSharding())
        for step in range(RESUME_AT):
            inject(model, step, bad="nan")
            opt.step()
        checkpoint.save(Path(directory) / name, model, opt)
        saved = opt.state_dict()  # a collective: on every rank
        _, plain = build(name, fsdp=False, sharding=None)
        try:
            plain.load_state_dict(saved)
            error = None
        except ValueError as exc:
            error = str(exc)
        untouched = not plain.state and all(g["step"] == 0 for g in plain.param_groups)
        results[name] = {"error": error, "untouched": untouched}
    if rank == 0:
        torch.save(results, Path(out))


def foreign_shards_worker(rank: int, world: int, names: list[str], saved: str, out: str
                          ) -> None:
    """Replicated parameters under OwnerSharding, per optimizer: at the world size of the
    ``saved`` file (none yet: write it) train two steps, then load rank 0's state dict on every
    rank, then each rank's own; at another world size load the file's. Rank 0 writes, per
    optimizer, each rank's error (None if the load was taken) for each load, and whether the
    refused loads left the state as it was."""
    from sharding import OwnerSharding

    path = Path(saved)
    results: dict[str, Any] = {}
    for name in names:
        model, opt = build(name, fsdp=False, sharding=OwnerSharding())
        for step in range(2):
            inject(model, step)
            opt.step()
        own = opt.state_dict()  # a collective: on every rank
        box = [own if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # as torch.save on rank 0, torch.load on all
        if not path.exists() and rank == 0:
            torch.save(box[0], path.with_suffix(f".{name}"))
        loads = {"rank0": box[0], "own": own}
        if path.exists():
            loads = {"file": torch.load(path.with_suffix(f".{name}"), weights_only=False)}
        errors: dict[str, Any] = {}
        for label, sd in loads.items():
            errors[label], kept = _load_everywhere(world, model, opt, sd)
            errors[f"{label} state kept"] = kept if any(errors[label]) else None
        results[name] = errors
    if rank == 0:
        if not path.exists():
            path.touch()
        torch.save(results, Path(out))


class EvenRows(nn.Module):
    """Matrices and a bias whose rows split evenly over 2 ranks: every rank's shard of a
    tensor has the same shape, so shapes cannot tell one rank's state dict from another's."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(*s, generator=g) / s[1] ** 0.5)
                                   for s in ((8, 4), (6, 10), (16, 16)))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard needs a forward
        return x


def even_shards_worker(rank: int, world: int, cases: list[tuple[str, bool]], out: str) -> None:
    """Per ``(optimizer, fsdp)`` case on :class:`EvenRows`: two steps, then rank 0's
    ``state_dict()`` loaded on every rank, then each rank's own. Rank 0 writes each load's
    errors on every rank (None: taken) and whether a refused load left the state as it was."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    results: dict[str, Any] = {}
    for name, fsdp in cases:
        model = EvenRows()
        if fsdp:
            fully_shard(model)
        opt = OPTIMIZERS[name](split_param_groups(list(model.named_parameters())),
                               OwnerSharding())
        g = torch.Generator().manual_seed(7)
        for _ in range(2):
            for p in model.parameters():
                p.grad = distribute_like(torch.randn(p.shape, generator=g), p)
            opt.step()
        own = opt.state_dict()  # a collective: on every rank
        box = [own if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # as torch.save on rank 0, torch.load on all
        errors: dict[str, Any] = {}
        for label, sd in (("rank0", box[0]), ("own", own)):
            errors[label], errors[f"{label} state kept"] = _load_everywhere(world, model, opt, sd)
        results[f"{name} {'fsdp2' if fsdp else 'replicated'}"] = errors
    if rank == 0:
        torch.save(results, Path(out))


def _load_everywhere(world: int, model: nn.Module, opt: Any, sd: dict[str, Any]
                     ) -> tuple[list[str | None], bool]:
    """``opt.load_state_dict(sd)`` on this rank: every rank's error (None where the load was
    taken), and whether the parameters and the optimizer state stayed as they were on every rank
    (collectives: call on every rank)."""
    before, state = full_params(model), _local_state(opt)
    try:
        opt.load_state_dict(sd)
        error = None
    except ValueError as exc:
        error = str(exc)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, error)
    kept = all(torch.equal(before[n], p) for n, p in full_params(model).items()) and \
        _same_tensors(state, _local_state(opt))
    return gathered, _on_every_rank(world, kept)


def _local_state(opt: Any) -> dict[tuple[int, str], torch.Tensor]:
    """A copy of this rank's own state tensors (an owner's whole ones, shards elsewhere)."""
    return {(id(p), key): local(v).detach().clone() for p, per in opt.state.items()
            for key, v in per.items() if isinstance(v, torch.Tensor)}


def _same_tensors(a: dict[Any, torch.Tensor], b: dict[Any, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def plain_state_dict_worker(rank: int, world: int, names: list[str], saved: str, out: str
                            ) -> None:
    """Each optimizer under FSDP2 loads the model and the optimizer ``state_dict()`` that one
    process saved (``torch.save``) after ``RESUME_AT`` steps (``saved``: ``{name: {"model",
    "optim"}}``) with the optimizer's own ``load_state_dict``, and trains to ``STEPS`` with
    the NaN scenario's gradients. Rank 0 writes the final parameters and whether any rank's
    loaded dict was changed (a DTensor put into it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from sharding import OwnerSharding

    results: dict[str, Any] = {}
    for name, state in torch.load(saved, weights_only=False).items():
        if name not in names:
            continue
        model, opt = build(name, fsdp=True, sharding=OwnerSharding())
        set_model_state_dict(model, state["model"],
                             options=StateDictOptions(full_state_dict=True))
        opt.load_state_dict(state["optim"])
        untouched = not any(isinstance(v, DTensor) for entry in state["optim"]["state"].values()
                            for v in entry.values())
        for step in range(RESUME_AT, STEPS):
            inject(model, step, bad="nan")
            opt.step()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, untouched)
        results[name] = {"params": full_params(model), "untouched": all(gathered)}
    if rank == 0:
        torch.save(results, Path(out))


def halving(epoch: int) -> float:
    """An LR factor for ``LambdaLR``: halved every 2 steps. A LambdaLR made after a load with
    ``last_epoch=k - 1`` resumes it exactly (its lr is ``initial_lr * halving(k)``)."""
    return 0.5 ** (epoch // 2)


def train(model: nn.Module, opt: Any, first: int, last: int, sched: Any = None) -> None:
    """Steps [first, last) with the NaN scenario's gradients; ``sched`` steps after each."""
    for step in range(first, last):
        inject(model, step, bad="nan")
        opt.step()
        if sched is not None:
            sched.step()


def group_keys_worker(rank: int, world: int, name: str, directory: str, out: str) -> None:
    """``sharding.checkpoint`` with param-group keys on one side only. "scheduled": saved
    with a LambdaLR's ``initial_lr``, loaded into an optimizer without it, the scheduler made
    after the load (it reads ``initial_lr``). "older": saved without a scheduler and with
    groups lacking ``nonfinite_skips`` (as older checkpoints), loaded into an optimizer whose
    scheduler was made before the load. Both then train to ``STEPS``; rank 0 writes the
    parameters, the groups' ``initial_lr`` and the skip counts the ranks report."""
    import torch.distributed.checkpoint as dcp
    from torch.optim.lr_scheduler import LambdaLR

    from sharding import OwnerSharding, checkpoint

    results: dict[str, Any] = {}
    scheduled, older = Path(directory) / "scheduled", Path(directory) / "older"
    model, opt = build(name, fsdp=True, sharding=OwnerSharding())
    train(model, opt, 0, RESUME_AT, LambdaLR(opt, halving))
    checkpoint.save(scheduled, model, opt)
    model, opt = build(name, fsdp=True, sharding=OwnerSharding())
    train(model, opt, 0, RESUME_AT)
    opt.init_state()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["nonfinite_skips"]
    dcp.save({"model": model.state_dict(), "optim": state}, checkpoint_id=str(older))
    for kind in ("scheduled", "older"):
        model, opt = build(name, fsdp=True, sharding=OwnerSharding())
        sched = None
        if kind == "scheduled":
            checkpoint.load(scheduled, model, opt)
            sched = LambdaLR(opt, halving, last_epoch=RESUME_AT - 1)
        else:
            LambdaLR(opt, halving)  # sets initial_lr; not stepped
            checkpoint.load(older, model, opt)
        initial = [g["initial_lr"] for g in opt.param_groups]
        train(model, opt, RESUME_AT, STEPS, sched)
        health: list[Any] = [None] * world
        dist.all_gather_object(health, opt.health())
        skips = {k: v["nonfinite_skips"] for h in health for k, v in h.items()}
        results[kind] = {"params": full_params(model), "initial_lr": initial, "skips": skips}
    if rank == 0:
        torch.save(results, Path(out))


# FSDP2 with a MixedPrecisionPolicy (bf16 compute, fp32 gradient reduction) and clip_grad_norm_,
# as most FSDP training runs: the optimizer sees fp32 DTensor parameters and clipped fp32
# DTensor gradients. MP_ROWS divides by 1, 2 and 4, so each rank takes an equal slice.
MP_ROWS, MP_STEPS, MP_MAX_NORM = 8, 4, 0.05


class MPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 7)   # 7 rows: divides by neither 2 nor 4
        self.l2 = nn.Linear(7, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.nn.functional.gelu(self.l1(x)))


def mixed_precision_worker(rank: int, world: int, out: str, name: str) -> None:
    """Train :class:`MPNet` under FSDP2 with bf16 compute and ``OwnerSharding``, clipping the
    gradients each step; record the clipped full gradients and replay them through the same
    optimizer in one process (rank 0). Saves both parameter sets, health and the gradient norms."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from sharding import OwnerSharding

    torch.manual_seed(0)
    model = MPNet()
    replay = MPNet()
    replay.load_state_dict(model.state_dict())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in (model.l1, model.l2, model):
        fully_shard(module, mp_policy=policy)
    make = OPTIMIZERS[name]
    opt = make(split_param_groups(model.named_parameters()), OwnerSharding())
    one = make(split_param_groups(replay.named_parameters()), None)
    gen = torch.Generator().manual_seed(1)
    rows = MP_ROWS // world
    norms = []
    for _ in range(MP_STEPS):
        x, y = torch.randn(MP_ROWS, 12, generator=gen), torch.randn(MP_ROWS, 5, generator=gen)
        out_ = model(x[rank * rows:(rank + 1) * rows])
        assert out_.dtype == torch.bfloat16  # the policy is in force
        loss = (out_.float() - y[rank * rows:(rank + 1) * rows]).square().mean()
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), MP_MAX_NORM)
        norms.append(float(total.full_tensor() if isinstance(total, DTensor) else total))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        assert all(g.dtype == torch.float32 for g in grads.values())
        opt.step()
        opt.zero_grad()
        for n, p in replay.named_parameters():
            p.grad = grads[n].clone()
        one.step()
    health: list[Any] = [None] * world
    dist.all_gather_object(health, opt.health())
    params = full_params(model)
    if rank == 0:
        torch.save({"params": params, "replay": full_params(replay), "health": health,
                    "replay_health": one.health(), "norms": norms}, Path(out))


class _Recorder:
    """A publisher that keeps what it is handed."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish(self, **snapshot: Any) -> None:
        self.published.append(snapshot)


def summary_without_sidecar_worker(rank: int, world: int, out: str) -> None:
    """Rank 0 publishes to a sidecar, the others have none (``publisher=None``); every rank
    calls ``publish_health`` with the summary due, then the ranks sum a check value. Under
    FSDP2 the summary's all_reduce completes the sharded momentum's norms: a rank that skipped
    it would pair the others' all_reduce with the check's."""
    from orthoshard.telemetry import publish_health
    from sharding import OwnerSharding

    model, opt = build("muon", fsdp=True, sharding=OwnerSharding())
    publisher = _Recorder() if rank == 0 else None
    for step in range(2):
        inject(model, step)
        opt.step()
        publish_health(publisher, opt, step=step + 1, rank=rank, with_summary=True)
    check = torch.tensor([float(rank + 1)])
    dist.all_reduce(check)
    if rank == 0:
        assert publisher is not None
        torch.save({"check": float(check), "published": publisher.published}, Path(out))


class _Biases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias_a, self.bias_b = (nn.Parameter(torch.zeros(6)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TwoBiases(nn.Module):
    """Two matrices and two AdamW parameters of one size, all sharded by FSDP2; ``nested``:
    the biases in a submodule of their own (``norm``), for FSDP2 on them alone."""

    def __init__(self, nested: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.wa, self.wb = (nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(2))
        if nested:
            self.norm = _Biases()
        else:
            self.bias_a, self.bias_b = (nn.Parameter(torch.zeros(6)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard needs a forward
        return x


def adamw_mismatch_worker(rank: int, world: int, out: str, replicated: bool = False,
                          name: str = "muon") -> None:
    """Ranks 0 and 1 each drop the gradient of another AdamW parameter (as many gradients on
    each), rank 1 alone drops one, or rank 1 drops both: with the matrices' gather carrying
    the flags, and in a step with no matrix gradient (where rank 1 dropping both steps nothing
    at all, and the gather still carries the flags and signatures). Every rank's
    outcome, whether anything changed, and a correct step after. ``replicated``: the
    matrices replicated, the biases alone sharded (no rows to gather: the flags ride on the
    exchange's small all_gather)."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    model = TwoBiases(nested=replicated)
    fully_shard(model.norm if replicated else model)
    named = dict(model.named_parameters())
    opt = OPTIMIZERS[name](split_param_groups(list(named.items())), OwnerSharding())
    g = torch.Generator().manual_seed(4)
    full = {n: torch.randn(p.shape, generator=g) for n, p in named.items()}
    a, b = (n for n in named if n.endswith(("bias_a", "bias_b")))

    dropped = {"other": (a, b)[rank % 2:rank % 2 + 1],
               "fewer": (b,) if rank == 1 else (),
               "none": (a, b) if rank == 1 else ()}

    def set_grads(matrices: bool, drop: str) -> None:
        for n, p in named.items():
            keep = (matrices or not n.startswith("w")) and n not in dropped[drop]
            p.grad = distribute_like(full[n], p) if keep else None

    results = {}
    for drop in dropped:
        for collective, matrices in (("gather", True), ("all_reduce", False)):
            case = collective if drop == "other" else f"{collective}, {drop}"
            before = full_params(model)
            set_grads(matrices, drop)
            outcomes = _every_rank_says(world, ValueError, opt.step)
            after = full_params(model)
            results[case] = {"outcomes": outcomes,
                             "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    for n, p in named.items():
        p.grad = distribute_like(full[n], p)
    results["recovered"] = _every_rank_says(world, ValueError, opt.step)
    if rank == 0:
        torch.save(results, Path(out))


def no_sharding_worker(rank: int, world: int, out: str) -> None:
    """FSDP2 parameters and an optimizer built without ``sharding=``: every rank's outcome of a
    step with every gradient, then with the AdamW ones dropped, and the group steps after."""
    from torch.distributed.fsdp import fully_shard

    model = TwoBiases()
    fully_shard(model)
    named = dict(model.named_parameters())
    opt = Muon(split_param_groups(list(named.items())), lr=0.02)
    full = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(5))
            for n, p in named.items()}
    results: dict[str, Any] = {}
    for case, keep in (("all", lambda n: True), ("no adamw", lambda n: n.startswith("w"))):
        for n, p in named.items():
            p.grad = distribute_like(full[n], p) if keep(n) else None
        results[case] = _every_rank_says(world, ValueError, opt.step)
    results["steps"] = [g["step"] for g in opt.param_groups]
    # no AdamW parameter in the optimizer at all (a bias-free model): each rank stepped its
    # shard of every matrix as a matrix of its own, silently
    matrices = Muon([named["wa"], named["wb"]], lr=0.02)
    before = {n: named[n].full_tensor() for n in ("wa", "wb")}
    for n in ("wa", "wb"):
        named[n].grad = distribute_like(full[n], named[n])
    results["matrices only"] = _every_rank_says(world, ValueError, matrices.step)
    results["matrices unchanged"] = all(torch.equal(before[n], named[n].full_tensor())
                                        for n in ("wa", "wb"))
    results["matrices steps"] = [g["step"] for g in matrices.param_groups]
    if rank == 0:
        torch.save(results, Path(out))


class PartlySharded(nn.Module):
    """Two matrices left whole on every rank (replicated, as under DDP) and a bias in a
    submodule that FSDP2 shards: the step's exchange makes no gather."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.wa, self.wb = (nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(2))
        self.inner = nn.Module()
        self.inner.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard needs a forward
        return x


def misplaced_grad_worker(rank: int, world: int, out: str) -> None:
    """A full plain-tensor ``.grad`` on a sharded AdamW parameter (the bias), set on every rank
    or on rank 1 alone, with the matrices' gradients (FSDP2: carried by the gather; partly
    sharded: no gather) or without them (one all_reduce): every rank's outcome, whether every
    parameter and step count stayed as they were, and a step once the gradient is right."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    results: dict[str, Any] = {}
    for layout in ("fsdp", "fsdp soap", "partly"):
        if layout.startswith("fsdp"):
            model, opt = build(layout.split()[-1].replace("fsdp", "muon"), fsdp=True,
                               sharding=OwnerSharding())
        else:
            model = PartlySharded()
            fully_shard(model.inner)
            opt = Muon(split_param_groups(model.named_parameters()), lr=0.02,
                       sharding=OwnerSharding())
        named = dict(model.named_parameters())
        bias = next(p for n, p in named.items() if n.endswith("bias"))

        def grads(step: int, keep_matrices: bool = True,
                  named: dict[str, nn.Parameter] = named) -> None:
            g = torch.Generator().manual_seed(50 + step)
            for p in named.values():
                full = torch.randn(p.shape, generator=g)
                p.grad = distribute_like(full, p) if keep_matrices or p.ndim == 1 else None

        grads(0)
        opt.step()
        cases = [("every rank", True, True), ("rank 1", False, True)]
        if layout == "fsdp":
            cases.append(("bias alone", False, False))

        def state(opt: Any = opt) -> list[torch.Tensor]:  # this rank's, owners' included
            return [local(v).clone() for per in opt.state.values() for v in per.values()
                    if isinstance(v, torch.Tensor)]

        for case, everywhere, matrices in cases:
            grads(1, keep_matrices=matrices)
            if everywhere or rank == 1:
                bias.grad = torch.ones(bias.shape)  # whole, not this rank's shard
            before, steps = full_params(model), [g["step"] for g in opt.param_groups]
            kept = state()
            outcomes = _every_rank_says(world, ValueError, opt.step)
            after = full_params(model)
            results[(layout, case)] = {
                "outcomes": outcomes,
                "unchanged": all(torch.equal(before[k], after[k]) for k in before),
                # SOAP's owners commit their factors and moments before the scatter: every
                # rank's owners
                "state unchanged": _on_every_rank(world, all(
                    torch.equal(a, b) for a, b in zip(kept, state(), strict=True))),
                "steps": steps == [g["step"] for g in opt.param_groups]}
        grads(2)
        results[(layout, "recovered")] = _every_rank_says(world, ValueError, opt.step)
    if rank == 0:
        torch.save(results, Path(out))


def uneven_rows_worker(rank: int, world: int, out: str) -> None:
    """A 7x4 matrix laid out 3/2/2 over 3 ranks (``DTensor.from_local``; torch.chunk gives
    3/3/1): every rank's outcome of a step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from sharding import OwnerSharding, checkpoint

    mesh = init_device_mesh("cpu", (world,))
    rows = [3, 2, 2][rank]

    def uneven() -> DTensor:
        return DTensor.from_local(torch.randn(rows, 4), mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size((7, 4)), stride=(4, 1))

    p = nn.Parameter(uneven())
    p.grad = uneven()
    opt = Muon([("w", p)], lr=0.02, sharding=OwnerSharding())
    results: dict[str, Any] = {"outcomes": _every_rank_says(world, Exception, opt.step)}
    # what reads the plan outside the step: ranks whose rows agreed went on into the next
    # collective alone (an all_gather_object, DCP's planning) and waited there
    model = nn.Module()
    model.w = p
    for name in ("normuon", "soap"):  # owner-only state: kept whole by the plan's owner
        built = OPTIMIZERS[name]([("w", p)], OwnerSharding())
        whole = OPTIMIZERS[name]([("w", nn.Parameter(torch.randn(7, 4)))], None)
        whole.param_groups[0]["params"][0].grad = torch.randn(7, 4)
        whole.step()  # a one-process state dict to load
        results[name] = {
            "init_state": _every_rank_says(world, Exception, built.init_state),
            "state_dict": _every_rank_says(world, Exception, built.state_dict),
            "load": _every_rank_says(world, Exception,
                                     lambda b=built, w=whole: b.load_state_dict(w.state_dict())),
            "save": _every_rank_says(world, Exception, lambda b=built, n=name: checkpoint.save(
                Path(out).parent / f"ckpt-{n}", model, b)),
        }
    if rank == 0:
        torch.save(results, Path(out))


def _matrix_group_reversed(model: nn.Module) -> list[dict[str, Any]]:
    """``split_param_groups`` of ``model`` with the matrix group's parameters listed in
    reverse (a model refactored between save and resume lists them otherwise)."""
    groups = split_param_groups(model.named_parameters())
    for group in groups:
        if group.get("algorithm") != "adamw":
            group["params"] = group["params"][::-1]
            group["param_names"] = group["param_names"][::-1]
    return groups


def reordered_load_worker(rank: int, world: int, names: list[str], directory: str,
                          phase: int, out: str) -> None:
    """Phase 0: train each optimizer ``name`` 2 steps under FSDP2 and save. Phase 1: load into
    the same model with the matrix group reversed, train 2 more steps; rank 0 saves the
    parameters (or the error) by name."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding, checkpoint

    results: dict[str, Any] = {}
    for name in names:
        model = Awkward()
        fully_shard(model)
        groups = (split_param_groups(model.named_parameters()) if phase == 0
                  else _matrix_group_reversed(model))
        sharding = OwnerSharding()
        opt = OPTIMIZERS[name](groups, sharding)
        assert_owners_batch_alone(opt, sharding)
        path = Path(directory) / name
        if phase == 0:
            for step in range(2):
                inject(model, step)
                opt.step()
            checkpoint.save(path, model, opt)
            continue
        try:
            checkpoint.load(path, model, opt)
        except ValueError as exc:
            results[name] = f"ValueError: {exc}"
            continue
        for step in range(2, 4):
            inject(model, step)
            opt.step()
        results[name] = full_params(model)
    if rank == 0 and phase == 1:
        torch.save(results, Path(out))


def comm_counter_worker(rank: int, world: int, out: str) -> None:
    """Bytes ``bench._sharding_baselines.CommCounter`` counts for this rank's all-to-alls:
    split sizes given, none given (an even split), and an input with no rows."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from bench._sharding_baselines import CommCounter

    counted = {}
    rows = [1 + r for r in range(world)]  # to rank r: 1 + r rows of 4 float32
    cases = {
        "splits": lambda: dist.all_to_all_single(
            torch.empty(world * (1 + rank), 4), torch.ones(sum(rows), 4),
            [1 + rank] * world, rows),
        "even": lambda: dist.all_to_all_single(torch.empty(2 * world, 4),
                                               torch.ones(2 * world, 4)),
        "functional, no rows": lambda: funcol.wait_tensor(funcol.all_to_all_single(
            torch.ones(0, 4), [0] * world, [0] * world, dist.group.WORLD)),
    }
    for name, run in cases.items():
        with CommCounter(world) as c:
            run()
        counted[name] = (c.sent, c.received)
    torch.save(counted, f"{out}.{rank}")


def settings_mismatch_worker(rank: int, world: int, out: str, replicated: bool) -> None:
    """Ranks whose optimizers differ where parameter names cannot tell: rank 1 with another
    learning rate for the matrices, then for the AdamW group, then (a new optimizer) with the
    unnamed matrices listed in reverse order. Each case: every rank's outcome of the step,
    whether any parameter changed, and the outcome of a step once the ranks agree again."""
    from torch.distributed.fsdp import fully_shard

    from sharding import OwnerSharding

    model = Awkward()
    if not replicated:
        fully_shard(model)
    opt = Muon(split_param_groups(list(model.named_parameters())), lr=0.02,
               sharding=OwnerSharding())
    inject(model, 0)
    opt.step()
    adamw = next(i for i, g in enumerate(opt.param_groups) if g["algorithm"] == ADAMW)
    result: dict[str, Any] = {}
    for case, gi in (("matrix lr", 1 - adamw), ("adamw lr", adamw)):
        before = full_params(model)
        inject(model, 1)
        if rank == 1:
            opt.param_groups[gi]["lr"] *= 2
        outcomes = _every_rank_says(world, ValueError, opt.step)
        after = full_params(model)
        if rank == 1:
            opt.param_groups[gi]["lr"] /= 2
        recovered = _every_rank_says(world, ValueError, opt.step)
        result[case] = {"outcomes": outcomes, "recovered": recovered,
                        "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    ws = list(model.ws)
    matrices = ws if rank == 0 else ws[::-1]
    unnamed = Muon([{"params": matrices}, {"params": [model.bias], "algorithm": ADAMW}],
                   lr=0.02, sharding=OwnerSharding())
    before = full_params(model)
    inject(model, 2)
    outcomes = _every_rank_says(world, ValueError, unnamed.step)
    result["order"] = {"outcomes": outcomes, "recovered": ["done"] * world,
                       "unchanged": all(torch.equal(before[k], v)
                                        for k, v in full_params(model).items())}
    if rank == 0:
        torch.save(result, out)


STAGE_OPTIMIZERS = ("soap", "normuon")  # stage k of stage_checkpoint_worker trains the k-th


def stage_checkpoint_worker(rank: int, world: int, directory: str, out: str) -> None:
    """At W = 4, two "pipeline stages" of two ranks each (groups [0, 1] and [2, 3]), each with
    its own model (FSDP2 over a mesh of its group), OwnerSharding over its group and optimizer
    (STAGE_OPTIMIZERS): each stage trains RESUME_AT steps, saves with its group into a directory
    of its own, loads it into a new model and optimizer and trains to STEPS. Rank 0 writes each
    stage's parameters and every rank's outcome of saving with a group that leaves out a rank
    of the optimizer's sharding group, and with a group that does not hold the rank."""
    from torch.distributed.device_mesh import DeviceMesh

    from sharding import OwnerSharding, checkpoint

    stages = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    k = rank // 2
    group = stages[k]
    name, path = STAGE_OPTIMIZERS[k], Path(directory) / f"stage{k}"

    def run(first: int, last: int, load: bool) -> tuple[nn.Module, Any]:
        model, opt = build(name, fsdp=True, sharding=OwnerSharding(group=group),
                           mesh=DeviceMesh.from_group(group, "cpu"))
        if load:
            checkpoint.load(path, model, opt, process_group=group)
        for step in range(first, last):
            inject(model, step, bad="nan")
            opt.step()
        return model, opt

    model, opt = run(0, RESUME_AT, load=False)
    checkpoint.save(path, model, opt, process_group=group)
    model, opt = run(RESUME_AT, STEPS, load=True)
    params = full_params(model)  # a collective of the stage's mesh
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, params)

    world_model, world_opt = build(name, fsdp=True, sharding=OwnerSharding())
    # a Muon per stage over a parameter of the stage's own name, given unnamed (the optimizer
    # calls it group0.param0 in both stages), replicated in the stage
    named = nn.ParameterDict({f"w{k}": nn.Parameter(torch.randn(6, 4))})
    muon = Muon(list(named.parameters()), lr=0.02, sharding=OwnerSharding(group=group))
    outcomes = {
        # one directory for both stages, over the default group (what a single-model job does)
        "shared": _every_rank_says(world, ValueError, lambda: checkpoint.save(
            Path(directory) / "shared", model, opt)),
        "shared muon": _every_rank_says(world, ValueError, lambda: checkpoint.save(
            Path(directory) / "shared", named, muon)),
        "shared load": _every_rank_says(world, ValueError, lambda: checkpoint.load(
            Path(directory) / "stage0", model, opt)),
        "narrower": _every_rank_says(world, ValueError, lambda: checkpoint.save(
            Path(directory) / "narrower", world_model, world_opt, process_group=group)),
        "not a member": _every_rank_says(world, ValueError, lambda: checkpoint.load(
            path, model, opt, process_group=stages[1 - k])),
    }
    if rank == 0:
        torch.save({"params": [gathered[0], gathered[2]], "outcomes": outcomes}, out)

"""OwnerSharding on real gloo process groups at W = 1, 2, 4 against one process.

Spawning ranks costs seconds (each imports torch), so one spawn per world size runs every
scenario and the tests below read its results.
"""

from __future__ import annotations

import math
from pathlib import Path

import _sharding_workers as w
import pytest
import torch
from _dist import run_ranks
from conftest import computed_once

from optim import Muon, split_param_groups
from sharding.owner import STATUS_ELEMENTS
from sharding.plan import build_plan

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]

# The exchange moves float32 inputs and updates unchanged, the momentum is elementwise, and the
# owner runs the very kernels one process runs, on the same batches (the references batch as
# the owners do: w.batch_as_owners), so results agree to the last bit in practice. 1e-5 (the
# design's fp32 bar) leaves room for a BLAS that blocks a float32 product differently.
PARITY_ATOL = 1e-5
PARITY_RTOL = 0.0
FLOAT32_BYTES = 4
# bf16 parameters: the owner computes and returns exactly one process's update (its dtype and
# layout: bit-equal at W = 1), but torch's vectorized p.add_(u) rounds the elements of its
# scalar tail differently, and which elements form the tail depends on the shard's length. So a
# bf16 entry may land one ulp apart per step: at most 2^-7 of its magnitude.
BF16_PARITY_RTOL = w.STEPS * 2.0**-7

# "@bf16" / "@f64": the model in that dtype. A bf16 parameter must add the bf16 update one process
# adds (torch rounds p.add_(u) differently for a float32 u), softening must blend in bf16, and
# float64 must cross the exchange without passing through float32.
NAMES = ["muon", "muon_soft_pe", "normuon", "muon_probes", "soap", "soap_unbatched",
         "soap_onesided_kl",
         "soap_every2", "muon@bf16", "muon_soft_pe@bf16", "normuon@bf16", "soap@bf16",
         "soap@f64", "muon@f64"]
BAD_SCENARIOS = [("muon", "nan"), ("normuon", "nan"), ("soap", "huge"), ("soap_every2", "nan")]
SCENARIOS = [(n, None) for n in NAMES] + BAD_SCENARIOS


def _wire_bytes(scenario: tuple[str, str | None]) -> int:
    """Bytes per exchanged element: float32, float64 for a float64 model (and bf16 in float32)."""
    return 8 if w.split_name(scenario[0])[1] == torch.float64 else FLOAT32_BYTES


def _status_bytes(world: int, wire: int) -> int:
    """What one exchange's status elements add to one rank's bytes sent (or received) over
    the run: one element to (from) each other rank per step (the scatter's; the gather's too
    when any matrix is sharded)."""
    return STATUS_ELEMENTS * (world - 1) * wire * w.STEPS


def _assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         what: object = "", *, world: int = 1) -> None:
    assert got.keys() == want.keys()
    scenario = what[0] if isinstance(what, tuple) else what
    bf16 = isinstance(scenario, str) and w.split_name(scenario)[1] == torch.bfloat16
    rtol = BF16_PARITY_RTOL if bf16 and world > 1 else PARITY_RTOL
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=PARITY_ATOL, rtol=rtol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def alone(world: int, first: int = 0, last: int = w.STEPS) -> range:
    """The steps in [first, last) that a reference runs one matrix per batch, as the owners
    at ``world`` do (w.batch_as_owners): all of them at W > 1, none at W = 1."""
    return range(first, last) if world > 1 else range(0)


@pytest.fixture(scope="module")
def references() -> dict[bool, dict[tuple[str, str | None], tuple]]:
    """``references[world > 1][scenario]``: one process's parameters, health and state
    summary, batched as the owners at that world size batch (w.batch_as_owners)."""
    # The ranks run with one thread (_dist.init_gloo); LAPACK's eigh/QR round differently with
    # other thread counts, and SOAP's eigenbasis of a near-degenerate factor amplifies that.
    # The reference runs under the same setting, so parity means the same arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {world > 1: {(name, bad): w.reference_run(name, w.STEPS, bad=bad,
                                                           alone=alone(world))
                            for name, bad in SCENARIOS} for world in (1, 2)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"W{n}")
def fsdp_run(request, tmp_path_factory) -> tuple[int, dict]:
    world = request.param
    tmp = computed_once(tmp_path_factory, f"sharding-fsdp{world}", lambda tmp: run_ranks(
        w.parity_worker, world, tmp, str(tmp / "out.pt"), True, SCENARIOS))
    return world, torch.load(tmp / "out.pt")


def test_fsdp2_steps_equal_single_process(fsdp_run, references):
    world, results = fsdp_run
    for scenario in SCENARIOS:
        _assert_params_close(results[scenario]["params"], references[world > 1][scenario][0],
                             scenario, world=world)


def test_health_of_the_owners_equals_single_process_health(fsdp_run, references):
    # Health is measured by the owner on the full matrix, with the very kernels one process
    # runs (the estimated orthogonality error of "muon_probes" included: its probes are seeded
    # by the step, not by the rank), so the union of the ranks' reports is the one-process
    # report. PARITY_ATOL as for the parameters; the values are O(1) or angles in degrees.
    world, results = fsdp_run
    for scenario in SCENARIOS:
        merged: dict[str, dict[str, float]] = {}
        for report in results[scenario]["ranks"]:
            for name, metrics in report["health"].items():
                merged.setdefault(name, {}).update(metrics)
        want = references[world > 1][scenario][1]
        assert merged.keys() == want.keys(), scenario
        for name, metrics in want.items():
            assert merged[name].keys() == metrics.keys(), (scenario, name)
            for metric, value in metrics.items():
                assert merged[name][metric] == pytest.approx(value, abs=PARITY_ATOL,
                                                             nan_ok=True), \
                    (scenario, name, metric)


def test_the_owners_state_summaries_equal_the_single_process_summary(fsdp_run, references):
    # Buffer norms are of the whole buffer: Muon's momentum is stored as FSDP2 shards, and a
    # norm of the owner's rows alone (what was reported before) reads low at W = 2 and 4.
    # Eigenvalues come from the owner's full factors. PARITY_ATOL as for the health values.
    world, results = fsdp_run
    for scenario in SCENARIOS:
        merged: dict[str, dict] = {}
        for rank, report in enumerate(results[scenario]["ranks"]):
            # the matrices it owns (health also names an AdamW parameter that skipped a NaN)
            assert set(report["summary"]) == set(report["health"]) - {"bias"}, scenario
            for name, summary in report["summary"].items():
                assert summary["owner_rank"] == rank
                merged[name] = summary
        want = references[world > 1][scenario][2]
        assert merged.keys() == want.keys(), scenario
        for name, summary in want.items():
            got = merged[name]
            assert got["shape"] == summary["shape"]
            assert got["buffer_norms"].keys() == summary["buffer_norms"].keys() != set()
            for key, value in summary["buffer_norms"].items():
                assert got["buffer_norms"][key] == pytest.approx(value, abs=PARITY_ATOL), \
                    (scenario, name, key)
            assert got["eigenvalues"].keys() == summary["eigenvalues"].keys()
            for factor, values in summary["eigenvalues"].items():
                assert got["eigenvalues"][factor] == pytest.approx(values, abs=PARITY_ATOL)


def test_each_matrix_has_exactly_one_owner_reporting_health(fsdp_run):
    _, results = fsdp_run
    for name in NAMES:
        owned = [set(r["health"]) for r in results[(name, None)]["ranks"]]
        assert set().union(*owned) == {f"ws.{i}" for i in range(len(w.SHAPES))}
        assert sum(len(o) for o in owned) == len(w.SHAPES)


# Per step, the AdamW group (the sharded 1-D ``bias``) agrees on finiteness through the gather:
# each rank's flag for its shard ends every block it sends, one element per pair of ranks.
ADAMW_FLAGS = 1


def _flag_bytes(world: int, wire: int) -> int:
    """What the AdamW flags carried by the gather add to one rank's bytes sent (or received)."""
    return ADAMW_FLAGS * (world - 1) * wire * w.STEPS


def test_comm_stats_equal_plan_and_an_independent_count(fsdp_run):
    world, results = fsdp_run
    for scenario in SCENARIOS:
        wire = _wire_bytes(scenario)
        extra = 2 * _status_bytes(world, wire) + _flag_bytes(world, wire)  # gather, scatter
        for rank, r in enumerate(results[scenario]["ranks"]):
            sent, received = (wire * w.STEPS * e + extra for e in r["plan"])
            assert r["stats"]["bytes_sent"] == sent == r["counted"][0], (scenario, rank)
            assert r["stats"]["bytes_received"] == received == r["counted"][1], (scenario, rank)
            assert r["counted"][2] == 2 * w.STEPS  # all-to-all calls: one in, one out per step
            # nothing else, the steps with a NaN or Inf bias gradient included: by the
            # optimizer's count and by torch's of every collective (CommDebugMode)
            assert r["stats"]["collectives"] == 2 * w.STEPS
            assert r["all_collectives"] == 2 * w.STEPS, (scenario, rank)


def test_bytes_are_two_exchanges_of_the_rows_not_on_their_owner(fsdp_run):
    world, results = fsdp_run
    # Every element of a matrix that does not sit on its owner crosses the wire exactly twice
    # per step (in and out); nothing else is sent but a status element each way and the
    # gather's AdamW flag per pair of ranks. Averaged over ranks this is the design's budget
    # 2 (W-1)/W^2 P when shards are even.
    plan = build_plan(list(w.SHAPES), [True] * len(w.SHAPES),
                      [m * n * min(m, n) for m, n in w.SHAPES], world)
    off_owner = sum((m - plan.rows_of(i, plan.owners[i])) * n
                    for i, (m, n) in enumerate(w.SHAPES))
    ranks = results[("muon", None)]["ranks"]
    extra = 2 * _status_bytes(world, FLOAT32_BYTES) + _flag_bytes(world, FLOAT32_BYTES)
    assert sum(r["stats"]["bytes_sent"] - extra for r in ranks) == \
        2 * off_owner * FLOAT32_BYTES * w.STEPS


def test_nonfinite_gradient_shard_skips_the_whole_matrix_on_every_rank(fsdp_run):
    # SOAP's "huge" gradient is finite: only the owner, whose step would overflow its state,
    # knows it must skip; the NaN it sends back makes every other rank skip too.
    _, results = fsdp_run
    for scenario in BAD_SCENARIOS:
        skips = {k: v["nonfinite_skips"] for r in results[scenario]["ranks"]
                 for k, v in r["health"].items()}
        assert skips[w.NAN_PARAM] == 1.0
        assert skips["bias"] == 1.0  # the AdamW parameter: every rank skipped its shard
        # each name is reported by one rank: the owner for a matrix, rank 0 for the AdamW
        # parameter (else a sum over ranks or nodes would count its one skip W times)
        reporters = [set(r["health"]) for r in results[scenario]["ranks"]]
        assert sum(len(names) for names in reporters) == len(set().union(*reporters))
        assert "bias" in reporters[0]
        assert all(v == 0.0 for k, v in skips.items() if k not in (w.NAN_PARAM, "bias"))


def test_a_skip_only_the_owner_sees_is_counted_when_it_holds_no_rows(tmp_path):
    # The 1-row matrix's update is NaN from a finite float64 gradient (beyond bfloat16's range):
    # only the owner sees it whole. At W = 2 its owner holds an empty shard; the skip must still
    # be counted, reported and saved, as one process does.
    reference = w.empty_owner_model()
    named = [(str(i), p) for i, p in enumerate(reference)]
    single = Muon(named, lr=0.02)
    w.empty_owner_run(reference, single)
    assert single.param_groups[0]["nonfinite_skips"] == {"0": 0, "1": 1}
    run_ranks(w.empty_owner_worker, 2, tmp_path, str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    owner = result["ranks"][0]["owners"][1]
    start, end = result["ranks"][0]["bounds"][1][owner]
    assert start == end, "the case needs an owner without rows of the matrix"
    health = {k: v for r in result["ranks"] for k, v in r["health"].items()}
    assert health["1"]["nonfinite_skips"] == 1.0 and health["0"]["nonfinite_skips"] == 0.0
    assert all(r["saved"] == {"0": 0, "1": 1} for r in result["ranks"])
    _assert_params_close(result["params"], {k: p.detach() for k, p in named}, "empty owner")


def test_a_decomposition_that_fails_on_its_owner_skips_the_matrix_on_every_rank(tmp_path,
                                                                               monkeypatch):
    # raised on the owner, the error ended that rank while the other waited in the exchange
    # until a launcher killed it; now every rank skips that matrix, as one process does
    monkeypatch.setattr(torch.linalg, "eigh", w.failing_eigh())
    reference = w.failing_model()
    named = [(str(i), p) for i, p in enumerate(reference)]
    from optim.soap import SOAP

    with pytest.warns(RuntimeWarning, match="update of 0 failed"):
        w.failing_run(reference, SOAP(named, lr=3e-3, use_eigh=True))
    run_ranks(w.failing_owner_worker, 2, tmp_path, str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    health = {k: v for report in result["health"] for k, v in report.items()}
    assert health["0"]["nonfinite_skips"] == 2.0 and health["1"]["nonfinite_skips"] == 0.0
    # the owner's warnings point at the caller's step(), not into the sharding layer
    warned = [place for places in result["warned_at"] for place in places]
    assert len(warned) == 2 and set(warned) == {w.__file__}, result["warned_at"]
    _assert_params_close(result["params"], {k: p.detach() for k, p in named}, "failing eigh")


@pytest.mark.parametrize("world", [2, 4])
def test_the_adamw_flags_agree_without_a_gather_to_carry_them(tmp_path, world):
    # a step where no matrix has a gradient: the sharded bias's flags take one all_reduce
    run_ranks(w.bias_only_worker, world, tmp_path, str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    model, opt = w.build("muon", fsdp=False, sharding=None)
    assert w.bias_only_run(model, opt) == result["counts"] == [0.0, 1.0, 1.0]
    _assert_params_close(result["params"], w.full_params(model), "bias only")
    assert result["stats"]["collectives"] == 2 + 1 + 1  # the exchange, then one all_reduce each


@pytest.mark.parametrize(("phase", "fsdp", "world"), [
    ("compute", True, 1), ("compute", True, 2), ("compute", True, 4),
    ("prepare", True, 2), ("prepare", True, 4),
    ("compute", False, 2), ("prepare", False, 2),  # replicated: no gather to learn it from
    # the owner's full matrices from the gathered rows, and its results laid out to send: an
    # out-of-memory error there left the other ranks waiting in the scatter
    ("assemble", True, 2), ("send", True, 2), ("send", False, 2),
])
def test_an_error_on_one_rank_is_raised_on_every_rank_and_nothing_changes(tmp_path, phase,
                                                                           fsdp, world):
    # raised on one rank alone, it left every other rank waiting in the exchange until the
    # process group timed out (30 minutes by default): here that is run_ranks' deadline
    run_ranks(w.owner_error_worker, world, tmp_path, str(tmp_path / "out.pt"), phase, fsdp,
              timeout=90)
    result = torch.load(tmp_path / "out.pt")
    failing = result["failing"]
    # replicated matrices too: their small all_gather of statuses tells every rank before any
    # owner computes
    when = "before the exchange" if phase == "prepare" else "this step"
    for rank, outcome in enumerate(result["failed"]):
        if rank == failing:  # its own error, unchanged
            assert outcome == f"RuntimeError: injected failure on rank {failing}"
        else:
            assert outcome.startswith(
                f"RuntimeError: the matrix update on rank {failing} of the sharding group "
                f"failed {when}"), outcome
            assert "none applied" in outcome
    # no rank changed a parameter (the AdamW group steps last) or a momentum buffer
    for name, value in result["before"].items():
        assert torch.equal(result["after"][name], value), name
    for name, value in result["momentum"].items():
        assert torch.equal(result["momentum_after"][name], value), name
    # nor counted the step (a softening schedule read the next value a step too early)
    assert result["steps_after"] == result["steps"] == [1] * len(result["steps"])
    # the collectives stayed matched: the next step runs on every rank and updates every matrix
    assert result["recovered"] == ["done"] * world
    for name, value in result["after"].items():
        assert not torch.equal(result["final"][name], value), name


@pytest.mark.parametrize(("change", "world"), [
    ("grow", 1), ("grow", 2), ("grow", 4), ("shrink", 2), ("shrink", 4), ("refreeze", 2)])
def test_a_group_added_or_removed_during_training_keeps_the_other_matrices_state(tmp_path,
                                                                                 change, world):
    # SOAP's factors and NorMuon's second moments live on owners only: a plan built afresh
    # over the new set of matrices (joiners added; a group removed) moved some owners, whose
    # new owner started from zero state while the old one kept a stale copy
    names = ["soap", "normuon"]
    run_ranks(w.grow_worker, world, tmp_path, str(tmp_path / "out.pt"), names, change)
    results = torch.load(tmp_path / "out.pt")
    run, steps = w.REGROUPS[change]
    left = set(w.SHRINK_LEAVERS) if change == "shrink" else set()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        for name in names:
            want, health = run(name, steps, fsdp=False, sharding=None, alone=world > 1)
            _assert_params_close(results[name]["params"], want, name)
            reported = {k for report in results[name]["health"] for k in report}
            assert reported == set(health) == {f"ws.{i}" for i in range(len(w.SHAPES))} - left
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["soap", "muon"])
def test_a_plain_gradient_on_a_sharded_matrix_is_refused_by_name_on_every_rank(tmp_path, name):
    # it failed inside gloo's all-to-all (SOAP: "inLengthPerRank ... == outLengthPerRank") or
    # with a broadcast error (Muon), naming neither the matrix nor the cause
    run_ranks(w.plain_grad_worker, 2, tmp_path, str(tmp_path / "out.pt"), name, timeout=90)
    result = torch.load(tmp_path / "out.pt")
    for rows, outcome in zip((4, 3), result["outcomes"], strict=True):  # torch.chunk of 7 rows
        assert outcome.startswith(f"ValueError: ws.0: this rank's gradient has shape (7, 12) "
                                  f"(Tensor) but its part of the parameter ({rows}, 12) "
                                  f"(DTensor)"), outcome
    assert result["unchanged"]  # no rank changed a parameter or counted the step
    assert result["state unchanged"]  # nor any rank's state
    assert result["recovered"] == ["done", "done"]


@pytest.mark.parametrize("name", ["soap", "normuon"])
def test_torch_full_optimizer_state_dict_holds_the_owners_state(tmp_path, name):
    # the owner's entry listed SOAP's keys in creation order (L, R, Q_L, ...), the other
    # ranks' in sorted order (L, Q_L, Q_R, R, ...): torch's consolidation, one collective per
    # tensor in order, paired different tensors (wrong R, Q_L, Q_R; a gloo abort on 12 x 8)
    run_ranks(w.full_state_dict_worker, 2, tmp_path, str(tmp_path / "out.pt"), name,
              timeout=90)
    result = torch.load(tmp_path / "out.pt")
    assert set(result) == {f"ws.{i}" for i in range(len(w.SHAPES))}
    assert all(result.values()) and all(all(v.values()) for v in result.values()), result


@pytest.mark.parametrize(("name", "replicated"), [
    ("soap", False), ("muon", False), ("soap", True), ("normuon", True), ("muon", True)])
def test_a_gradient_on_one_rank_only_is_refused_on_every_rank(tmp_path, name, replicated):
    # rank 1 sent a block shorter than rank 0 expected: rank 0 read its status from memory
    # nobody wrote (a false "failed before the exchange", or an update built from it,
    # applied), while rank 1 went on to the second all-to-all and waited there. Replicated
    # matrices: found in the scatter only, after the owners had advanced NorMuon's second
    # moments and SOAP's factors (a retried step then counted that gradient twice).
    run_ranks(w.grad_on_one_rank_worker, 2, tmp_path, str(tmp_path / "out.pt"), name,
              replicated, timeout=90)
    _assert_refused_on_both_ranks(torch.load(tmp_path / "out.pt"))


@pytest.mark.parametrize(("dropped", "replicated"), [
    ("owned by 1", False), ("matrices", False), ("matrices", True), ("everything", False),
    ("everything", True)])
def test_a_rank_stepping_fewer_or_no_matrices_is_refused_on_every_rank(tmp_path, dropped,
                                                                        replicated):
    # "owned by 1": rank 0 sent rank 1 rows of a matrix rank 1 did not expect, and gloo
    # aborted both processes ("Received data size doesn't match expected size"). Rank 1
    # stepping no matrix at all made no all-to-all, and rank 0 waited in its own until the
    # process group timed out (here: run_ranks' deadline)
    run_ranks(w.grad_on_one_rank_worker, 2, tmp_path, str(tmp_path / "out.pt"), "muon",
              replicated, dropped, timeout=90)
    _assert_refused_on_both_ranks(torch.load(tmp_path / "out.pt"))


@pytest.mark.parametrize("replicated", [False, True], ids=["fsdp2", "replicated"])
def test_a_step_without_any_gradient_on_any_rank_changes_nothing(tmp_path, replicated):
    # every rank joins the gather with nothing to step (one collective), and all agree
    run_ranks(w.grad_on_one_rank_worker, 2, tmp_path, str(tmp_path / "out.pt"), "muon",
              replicated, "everything, every rank", timeout=90)
    result = torch.load(tmp_path / "out.pt")
    assert result["outcomes"] == ["done", "done"]
    assert result["params unchanged"] and result["counted"]  # a step, of nothing
    assert result["state unchanged"]
    assert result["collectives"] == 1
    assert result["recovered"] == ["done", "done"]


@pytest.mark.parametrize("everyone", [False, True], ids=["rank-1", "every-rank"])
def test_a_first_step_without_gradients_warned_as_an_error_raises_on_every_rank(tmp_path,
                                                                                 everyone):
    # with warnings raised as errors, the "found no gradient" warning raised on rank 1 before
    # the gather, and rank 0 waited in it until the process group timed out
    run_ranks(w.no_gradient_warned_as_error_worker, 2, tmp_path, str(tmp_path / "out.pt"),
              everyone, timeout=90)
    result = torch.load(tmp_path / "out.pt")
    if everyone:  # every rank agreed on a step of nothing, then warned
        assert all(o.startswith("RuntimeWarning: Muon.step() found no gradient")
                   for o in result["outcomes"]), result["outcomes"]
    else:  # the refusal of ranks that step other parameters, on both
        assert [o.startswith("ValueError: ranks [") for o in result["outcomes"]] == \
            [True, True], result["outcomes"]
    assert set(result["steps"]) == {0}  # nothing happened: no group counted the step


def _assert_refused_on_both_ranks(result: dict) -> None:
    for rank, (outcome, other) in enumerate(zip(result["outcomes"], (1, 0), strict=True)):
        assert outcome.startswith(f"ValueError: ranks [{other}] of the sharding group do not "
                                  f"step the same parameters as rank {rank}"), outcome
    assert result["unchanged"]  # no rank changed a parameter or counted the step
    assert result["state unchanged"]
    # the first collective was made (and counted), then refused: the gather, or the
    # replicated matrices' all_gather of statuses (Muon's owner sent rank 1 an update it did
    # not expect in the scatter: gloo aborted both processes)
    assert result["collectives"] == 1
    assert result["recovered"] == ["done", "done"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_replicated_parameters_match_single_process(tmp_path, references, world):
    scenarios = [(n, None) for n in NAMES]
    run_ranks(w.parity_worker, world, tmp_path, str(tmp_path / "out.pt"), False, scenarios)
    results = torch.load(tmp_path / "out.pt")
    for scenario in scenarios:
        _assert_params_close(results[scenario]["params"], references[world > 1][scenario][0],
                             scenario, world=world)
        wire = _wire_bytes(scenario)
        # no gather (owners hold every input): each step's small all_gather of statuses and
        # signatures (float64, to every other rank), then the scatter, in which each owner's
        # full update goes to every other rank
        agreed = STATUS_ELEMENTS * 8 * (world - 1) * w.STEPS
        for r in results[scenario]["ranks"]:
            assert r["stats"]["bytes_sent"] == \
                wire * w.STEPS * r["plan"][0] + _status_bytes(world, wire) + agreed
            assert r["stats"]["collectives"] == 2 * w.STEPS


def test_a_model_the_optimizer_does_not_step_is_refused_by_save_and_load(tmp_path):
    # another instance of the model (same shapes) was saved with the optimizer's state and
    # loaded back next to it: untrained weights beside trained momentum, silently. Refused
    # before any collective, on every rank alike (each holds the same pairing).
    from sharding import checkpoint

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))

    ours, other = model(), model()
    opt = Muon(split_param_groups(ours.named_parameters()), lr=0.02)
    for call in (checkpoint.save, checkpoint.load):
        with pytest.raises(ValueError, match=r"the Muon steps parameters this model does not "
                                             r"hold \(0\.weight, 1\.weight, 0\.bias and 1 more\)"):
            call(tmp_path / "ckpt", other, opt)
    assert not (tmp_path / "ckpt").exists()
    assert opt.state_dict()["state"] == {}  # nothing was created either


class _ThreeMatrices(torch.nn.Module):
    """Matrices of two shapes, and optionally one more the optimizer does not step."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.nn.Parameter(torch.randn(8, 4, generator=g)) for _ in range(2))
        self.c = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        if extra:
            self.d = torch.nn.Parameter(torch.randn(3, 3, generator=g))


def _three_groups(model: _ThreeMatrices, cls: type, swapped: bool) -> torch.optim.Optimizer:
    groups = [{"params": [("a", model.a), ("b", model.b)], "lr": 0.02},
              {"params": [("c", model.c)], "lr": 0.01}]
    return cls(groups[::-1] if swapped else groups, lr=0.02)


def _train_three(model: _ThreeMatrices, opt: torch.optim.Optimizer, steps: range) -> None:
    for k in steps:
        g = torch.Generator().manual_seed(k)
        for p in (model.a, model.b, model.c):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


# DCP in one process, without a process group, says it assumes one process: it is one
ONE_PROCESS_DCP = "ignore:torch.distributed is disabled:UserWarning"


@pytest.mark.filterwarnings(ONE_PROCESS_DCP)
@pytest.mark.parametrize("name", ["normuon", "soap"])
def test_a_checkpoint_loads_into_param_groups_listed_in_another_order(tmp_path, name):
    # load filled each live group's positions from the checkpoint's same positions, which held
    # the other group's parameters: refused as "another model" where the shapes differ
    # (load_state_dict pairs the groups by name, and so continued right)
    from optim import SOAP, NorMuon
    from sharding import checkpoint

    cls = {"normuon": NorMuon, "soap": SOAP}[name]
    whole = _ThreeMatrices()
    _train_three(whole, _three_groups(whole, cls, False), range(4))
    model = _ThreeMatrices()
    opt = _three_groups(model, cls, False)
    _train_three(model, opt, range(2))
    checkpoint.save(tmp_path / "ckpt", model, opt)
    resumed = _ThreeMatrices()
    opt = _three_groups(resumed, cls, True)
    checkpoint.load(tmp_path / "ckpt", resumed, opt)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.02]  # each group its own
    _train_three(resumed, opt, range(2, 4))
    for p, q in zip(resumed.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=PARITY_ATOL, rtol=PARITY_RTOL)


@pytest.mark.filterwarnings(ONE_PROCESS_DCP)
def test_checkpoint_failures_are_exceptions_that_name_what_to_do(tmp_path, monkeypatch):
    # a parameter the checkpoint lacks, and a failed write, came as DCP's CheckpointException:
    # a BaseException, which `except Exception` does not catch
    from torch.distributed.checkpoint import FileSystemWriter

    from sharding import checkpoint

    model = _ThreeMatrices()
    opt = _three_groups(model, Muon, False)
    _train_three(model, opt, range(1))
    checkpoint.save(tmp_path / "ckpt", model, opt)
    grown = _ThreeMatrices(extra=True)  # a parameter added since (not in the optimizer)
    grown_opt = _three_groups(grown, Muon, False)
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    with pytest.raises(ValueError, match=r"lacks an entry \(Missing key in checkpoint "
                                         r"state_dict: model\.d\.\): it was saved for another "
                                         r"model .* Nothing was loaded"):
        checkpoint.load(tmp_path / "ckpt", grown, grown_opt)
    assert all(torch.equal(before[k], v) for k, v in grown.state_dict().items())
    assert grown_opt.state_dict()["state"].keys() == {0, 1, 2}  # the zeros init_state made
    assert all(v.abs().sum() == 0 for s in grown_opt.state_dict()["state"].values()
               for v in s.values())
    # the added parameter stepped by the optimizer too: its group of another size was refused
    # first, as "another split of the parameters", without naming the parameter
    stepped_opt = Muon([{"params": [("a", grown.a), ("b", grown.b)], "lr": 0.02},
                        {"params": [("c", grown.c), ("d", grown.d)], "lr": 0.01}], lr=0.02)
    with pytest.raises(ValueError, match=r"lacks an entry \(model\.d\): it was saved for "
                                         r"another model \(a parameter or buffer added or "
                                         r"renamed since\).* Nothing was loaded"):
        checkpoint.load(tmp_path / "ckpt", grown, stepped_opt)
    assert all(torch.equal(before[k], v) for k, v in grown.state_dict().items())
    assert all(v.abs().sum() == 0 for s in stepped_opt.state_dict()["state"].values()
               for v in s.values())
    # the same groups without a model entry missing: still refused by the group check
    shrunk = Muon([{"params": [("a", model.a)], "lr": 0.02},
                   {"params": [("c", model.c)], "lr": 0.01}], lr=0.02)
    with pytest.raises(ValueError, match=r"cannot be loaded into this Muon \(nothing was "
                                         r"loaded\): .*param group 0 was saved with 2 "
                                         r"parameters and has 1 here"):
        checkpoint.load(tmp_path / "ckpt", model, shrunk)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(RuntimeError, match=r"could not save .*ckpt2 on ranks \[0\]: .*No space "
                                           r"left on device.*do not load it"):
        checkpoint.save(tmp_path / "ckpt2", model, opt)

    # torch's zip writer names no cause for a full disk ("unexpected pos 704 vs 598"): the
    # message says how much room is left
    def zip_writer(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs "
                           "598")

    import shutil
    import types

    monkeypatch.setattr(FileSystemWriter, "write_data", zip_writer)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(
        total=10**9, used=10**9 - 4096, free=4096))
    with pytest.raises(RuntimeError, match=r"unexpected pos 704 vs 598 \(its filesystem has "
                                           r"4096 bytes free: a full disk\?\)"):
        checkpoint.save(tmp_path / "ckpt3", model, opt)


def test_a_checkpoint_is_never_overwritten_and_every_rank_says_so(tmp_path):
    directory = tmp_path / "ckpt"
    run_ranks(w.save_twice_worker, 2, tmp_path, str(directory), str(tmp_path / "twice.pt"))
    result = torch.load(tmp_path / "twice.pt")
    assert all(o.startswith("FileExistsError") and "new directory" in o for o in result["outcomes"])
    _assert_params_close(result["loaded"], result["first"], "the first checkpoint, intact")
    # a checkpoint of another optimizer: DCP's "Missing key" alone did not say so. Its
    # groups are read with the keys they were saved with, and the group check names the
    # algorithm they were saved for
    assert all(o.startswith("ValueError") and "nothing was loaded" in o
               and "saved for 'soap'" in o and "another optimizer" in o
               for o in result["wrong"]), result["wrong"]
    # one whose tensors fit but whose groups do not: refused on every rank before DCP wrote
    # anything into the Muon's parameters or state
    assert all(o.startswith("ValueError") and "nothing was loaded" in o
               and "saved for 'normuon'" in o for o in result["groups"]), result["groups"]
    # one saved with other state shapes (another max_precond_dim): a ValueError naming it
    assert all(o.startswith("ValueError") and "saved for other shapes than this optimizer's"
               in o and "max_precond_dim" in o for o in result["shapes"]), result["shapes"]
    for before, after, what in zip(result["before"], result["after"], ("params", "state"),
                                   strict=True):
        assert before.keys() == after.keys() and before, what
        for key in before:
            assert torch.equal(before[key], after[key]), (what, key)


def test_a_checkpoint_taken_before_the_first_step_loads_and_continues_exactly(tmp_path):
    # load asks for every parameter's state; a checkpoint saved before any gradient lacked it
    # and was refused as "saved by another optimizer"
    names = ["muon", "normuon", "soap"]
    run_ranks(w.dcp_worker, 2, tmp_path, names, None, str(tmp_path / "ckpt"), 0, 0,
              str(tmp_path / "empty.pt"))
    run_ranks(w.dcp_worker, 2, tmp_path, names, str(tmp_path / "ckpt"), None, 0, w.STEPS,
              str(tmp_path / "final.pt"))
    finals = torch.load(Path(tmp_path / "final.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        for name in names:
            _assert_params_close(finals[name]["params"],
                                 w.reference(name, w.STEPS, bad="nan", alone=alone(2)), name)
    finally:
        torch.set_num_threads(threads)


def test_dcp_checkpoint_reshards_2_to_4_to_1_and_training_continues_exactly(tmp_path):
    # The NaN/Inf gradients arrive at step 2, in the W = 4 phase, on the last ranks: the skip
    # counts must survive the reshard to W = 1, where one rank owns everything.
    names = ["normuon", "muon_soft_pe", "soap", "soap_onesided_kl"]
    finals = _run_checkpoint_phases(tmp_path, names, [("fsdp", 2, 0, 2), ("fsdp", 4, 2, 3),
                                                      ("fsdp", 1, 3, 5)])
    for name in names:
        assert finals[name]["skips"]["bias"] == 1.0, name


def _run_checkpoint_phases(tmp_path: Path, names: list[str],
                           phases: list[tuple[str, int, int, int]]) -> dict:
    """Train ``names`` phase by phase, ``(layout, world size, first step, last step)``, each
    phase loading the checkpoint the previous one saved, with the NaN scenario's gradients; check
    the last phase's parameters against one uninterrupted process and the skip of NAN_PARAM
    (counted once, whichever phase saw it); return the last phase's results."""
    load_dir = None
    for k, (kind, world, first, last) in enumerate(phases):
        save_dir = str(tmp_path / f"ckpt{k}") if k < len(phases) - 1 else None
        run_ranks(w.dcp_worker, world, tmp_path, names, load_dir, save_dir, first, last,
                  str(tmp_path / "final.pt"), kind)
        load_dir = save_dir
    finals = torch.load(Path(tmp_path / "final.pt"))
    steps = phases[-1][3]
    by_owners = {step for _, world, first, last in phases for step in alone(world, first, last)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        for name in names:
            _assert_params_close(finals[name]["params"],
                                 w.reference(name, steps, bad="nan", alone=by_owners), name)
            assert finals[name]["skips"][w.NAN_PARAM] == 1.0, name
    finally:
        torch.set_num_threads(threads)
    return finals


def test_a_mesh_over_other_ranks_than_the_sharding_group_is_refused_on_every_rank(tmp_path):
    # the exchange assembles a matrix from its shards in group rank order: a mesh of the right
    # size over other ranks (the other dimension of a 2-D layout) or in another order passed
    # the size check and assembled another matrix
    run_ranks(w.mesh_checks_worker, 4, tmp_path, str(tmp_path / "mesh.pt"))
    result = torch.load(tmp_path / "mesh.pt")
    outcomes = result["outcomes"]
    assert all(o.startswith("ValueError") and "shard i must live on group rank i" in o
               for name in ("reversed", "other ranks") for o in outcomes[name]), outcomes
    assert all(o.startswith("ValueError") and "mesh has 2 ranks" in o
               for o in outcomes["other size"]), outcomes
    assert all(o.startswith("ValueError") and "Shard(0) over one mesh dimension" in o
               for o in outcomes["column shards"]), outcomes
    # a rank outside the group is told so when it creates OwnerSharding (it read rank -1 and
    # failed at the first step on "world_size must be >= 1, got -1")
    assert outcomes["not a member"][:2] == ["done", "done"], outcomes
    assert all(o.startswith(f"ValueError: this process (global rank {r}) is not in the "
                            f"OwnerSharding group: create OwnerSharding")
               for r, o in enumerate(outcomes["not a member"]) if r >= 2), outcomes
    # each replica's shard group, as the message says: the single-process result
    _assert_params_close(result["right"], w.mesh_run(None, None), "shard group of each replica")


HSDP_SCENARIOS = [("muon", None), ("normuon", None), ("soap", None), ("soap_onesided_kl", None),
                  ("soap_every2", "nan"), ("muon", "nan")]


def test_hsdp_steps_equal_single_process_in_each_replica(tmp_path, references):
    # FSDP2 HSDP (2 replicas x 2 shards, placements (Replicate(), Shard(0))): OwnerSharding over
    # each replica's shard group. Before, a 2-D mesh was refused outright.
    run_ranks(w.hsdp_worker, 4, tmp_path, str(tmp_path / "hsdp.pt"), HSDP_SCENARIOS)
    results = torch.load(tmp_path / "hsdp.pt")
    for scenario in HSDP_SCENARIOS:
        result = results[scenario]
        want_run = references[True][scenario]  # shard groups of 2: the owners batch as at W = 2
        _assert_params_close(result["params"], want_run[0], scenario, world=4)
        ranks = result["ranks"]
        for replica in (ranks[:2], ranks[2:]):  # mesh [[0, 1], [2, 3]]: rows are shard groups
            merged: dict[str, dict[str, float]] = {}
            for report in replica:
                for name, metrics in report["health"].items():
                    merged.setdefault(name, {}).update(metrics)
            want = want_run[1]
            assert merged.keys() == want.keys(), scenario
            for name, metrics in want.items():
                for metric, value in metrics.items():
                    assert merged[name][metric] == pytest.approx(
                        value, abs=PARITY_ATOL, nan_ok=True), (scenario, name, metric)
            # the state summaries too: a momentum's norm sums its shards over the shard
            # dimension only (mesh.get_group() raised on the 2-D mesh)
            summaries = {n: s for report in replica for n, s in report["summary"].items()}
            assert summaries.keys() == want_run[2].keys(), scenario
            for name, summary in want_run[2].items():
                for key, value in summary["buffer_norms"].items():
                    assert summaries[name]["buffer_norms"][key] == pytest.approx(
                        value, abs=PARITY_ATOL), (scenario, name, key)
        # the replicas run the same exchange, each within its shard group
        for r in range(2):
            assert ranks[r]["stats"] == ranks[r + 2]["stats"], scenario
            assert ranks[r]["stats"]["bytes_sent"] > 0


def test_a_checkpoint_moves_between_hsdp_and_fsdp_and_training_continues_exactly(tmp_path):
    # HSDP at W = 4 saves (owner state from each replica's owners), FSDP at W = 2 loads and
    # saves, HSDP loads again; the NaN of step 2 falls in the FSDP phase
    _run_checkpoint_phases(tmp_path, ["normuon", "soap", "soap_onesided_kl"],
                           [("hsdp", 4, 0, 2), ("fsdp", 2, 2, 3), ("hsdp", 4, 3, 5)])


def test_torch_fsdp2_checkpoint_recipe_loads_owner_state_and_continues_exactly(tmp_path):
    # set_state_dict hands load_state_dict state keyed by parameter name (groups listing
    # names), sharded or full: owners were looked up by position only, every entry was
    # skipped, and the owner-only state stayed a Shard(0) DTensor on every rank (the next
    # step raised "got mixed torch.Tensor and DTensor"). Saved at W = 2, loaded at 2 and 4.
    names = ["normuon", "soap"]
    for world, save in ((2, True), (4, False)):
        run_ranks(w.torch_recipe_worker, world, tmp_path, names, str(tmp_path / "ckpt"), save,
                  str(tmp_path / "out.pt"), timeout=180)
        results = torch.load(tmp_path / "out.pt")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ranks (see references)
        try:
            for name in names:
                # saved at W = 2, resumed at W = 2 or 4: the owners' batches throughout
                want = w.reference(name, w.STEPS, bad="nan", alone=alone(2))
                for kind in ("sharded", "full"):
                    _assert_params_close(results[(name, kind)], want, (name, kind, world))
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_one_process_state_dict_loads_into_fsdp2_and_continues_exactly(tmp_path, world):
    # torch.save(opt.state_dict()) of one process, loaded with load_state_dict under FSDP2 and
    # OwnerSharding: its whole tensors passed the (global) shape check and the next step
    # failed (Muon: size mismatch 7 vs 4; SOAP: mixed Tensor/DTensor in the AdamW moments).
    # Now elementwise state is placed like its parameter and owner-only state kept whole on
    # its owner.
    names = ["muon", "normuon", "soap"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        saved = {}
        for name in names:
            model, opt = w.build(name, fsdp=False, sharding=None)
            for step in range(w.RESUME_AT):
                w.inject(model, step, bad="nan")
                opt.step()
            saved[name] = {"model": model.state_dict(), "optim": opt.state_dict()}
        torch.save(saved, tmp_path / "plain.pt")
        run_ranks(w.plain_state_dict_worker, world, tmp_path, names, str(tmp_path / "plain.pt"),
                  str(tmp_path / "out.pt"), timeout=180)
        results = torch.load(tmp_path / "out.pt")
        for name in names:
            # one process's batches up to RESUME_AT, then the owners'
            want = w.reference(name, w.STEPS, bad="nan", alone=alone(world, w.RESUME_AT))
            _assert_params_close(results[name]["params"], want, (name, world))
            assert results[name]["untouched"], name  # the caller's dict is left as it was
    finally:
        torch.set_num_threads(threads)


@pytest.mark.filterwarnings(ONE_PROCESS_DCP)
def test_a_sharded_state_dict_is_refused_by_one_process_which_loads_the_checkpoint(tmp_path):
    # The sharded optimizer's state_dict() holds DTensors (owner-only state as Shard(0), the
    # momentum placed like its parameter). A one-process optimizer took them and its next step
    # failed inside the update (mixed Tensor and DTensor), its step counter moved. Now it
    # refuses them by name; sharding.checkpoint.load, in a process without a process group,
    # reshards the same run's DCP checkpoint, and training continues as one process would.
    from sharding import checkpoint

    names = ["muon", "normuon", "soap"]
    run_ranks(w.sharded_into_plain_worker, 2, tmp_path, names, str(tmp_path),
              str(tmp_path / "out.pt"), timeout=180)
    results = torch.load(tmp_path / "out.pt")
    for name in names:
        assert results[name]["error"] is not None, name
        assert "is a DTensor: the state dict comes from an optimizer with sharding=" in \
            results[name]["error"], name
        assert results[name]["untouched"], name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        for name in names:
            model, opt = w.build(name, fsdp=False, sharding=None)
            checkpoint.load(tmp_path / name, model, opt)
            for step in range(w.RESUME_AT, w.STEPS):
                w.inject(model, step, bad="nan")
                opt.step()
            want = w.reference(name, w.STEPS, bad="nan", alone=alone(2, 0, w.RESUME_AT))
            _assert_params_close(w.full_params(model), want, name)
    finally:
        torch.set_num_threads(threads)


def test_another_ranks_or_world_sizes_state_dict_is_refused_on_every_rank(tmp_path):
    # Each rank's state_dict() holds its own shards (Shard(0) DTensors, the owner-only state
    # of replicated parameters too). Rank 0's dict loaded on every rank assembled rank 0's rows
    # twice (replicated NorMuon and SOAP went on 0.004 and 0.11 off one process, no error), and
    # a dict of W = 2 loaded at W = 4 failed inside a collective ("narrow unexpectedly changed
    # concrete size"). Where the shards' sizes tell (7 rows: 4 and 3), every rank now refuses
    # it by name before anything changes; a rank's own dict still loads.
    names = ["normuon", "soap"]
    saved, out = tmp_path / "rank0", tmp_path / "out.pt"
    run_ranks(w.foreign_shards_worker, 2, tmp_path, names, str(saved), str(out), timeout=180)
    results = torch.load(out)
    for name in names:
        refused = results[name]["rank0"]
        assert refused[0] is not None and refused[0] == refused[1], name  # every rank alike
        assert "on rank 1" in refused[0] and "the dict is another rank's" in refused[0], name
        assert results[name]["rank0 state kept"], name
        assert results[name]["own"] == [None, None], name
    run_ranks(w.foreign_shards_worker, 4, tmp_path, names, str(saved), str(out), timeout=180)
    results = torch.load(out)
    for name in names:
        refused = results[name]["file"]
        # every rank: the dict says it holds rank 0's shards of 2 (before that stamp, rank 0
        # passed the shapes' check: the file's mesh of 2 holds rank 0)
        assert all(r is not None and "on rank 0 and others" in r and "of 2 ranks" in r
                   and "saved at another world size" in r for r in refused), (name, refused)
        assert results[name]["file state kept"], name


def test_another_ranks_state_dict_is_refused_where_its_shards_have_this_ranks_shapes(tmp_path):
    # every rank's shards of the same shape (8, 6 and 16 rows over 2 ranks): rank 0's dict
    # loaded on rank 1 was taken silently, and rank 1 trained on rank 0's rows of the momentum
    # (FSDP2) or of the owner-only state. Replicated Muon keeps whole tensors, the same on every
    # rank, so any rank's dict is right everywhere, and is taken.
    cases = [("muon", True), ("normuon", False), ("soap", True), ("muon", False)]
    run_ranks(w.even_shards_worker, 2, tmp_path, cases, str(tmp_path / "out.pt"), timeout=120)
    results = torch.load(tmp_path / "out.pt")
    for case in ("muon fsdp2", "normuon replicated", "soap fsdp2"):
        refused = results[case]["rank0"]
        assert refused[0] is not None and refused[0] == refused[1], case  # every rank alike
        assert "on rank 1:" in refused[0] and "the shards of rank 0" in refused[0], refused
        assert "the dict is another rank's" in refused[0], case
        assert results[case]["rank0 state kept"], case
        assert results[case]["own"] == [None, None], case
    assert results["muon replicated"]["rank0"] == [None, None]
    assert results["muon replicated"]["own"] == [None, None]


def test_checkpoint_load_takes_the_saved_group_keys_and_completes_the_missing_ones(tmp_path):
    # load asked DCP for exactly the live groups' keys: a scheduler's initial_lr in the
    # checkpoint was dropped (a LambdaLR made after the load raised KeyError), and a key the
    # checkpoint lacks (initial_lr of a scheduler made before the load; nonfinite_skips of an
    # older checkpoint, which load_state_dict takes as 0) was refused as "saved by another
    # optimizer". Both resume at RESUME_AT and end as one uninterrupted process.
    from torch.optim.lr_scheduler import LambdaLR

    name = "normuon"
    run_ranks(w.group_keys_worker, 2, tmp_path, name, str(tmp_path / "ckpt"),
              str(tmp_path / "out.pt"), timeout=180)
    results = torch.load(tmp_path / "out.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        model, opt = w.build(name, fsdp=False, sharding=None)
        w.batch_as_owners(opt, True, opt.MAX_BATCH_BYTES)  # the ranks run at W = 2
        w.train(model, opt, 0, w.STEPS, LambdaLR(opt, w.halving))
        scheduled = w.full_params(model)
        plain = w.reference(name, w.STEPS, bad="nan", alone=alone(2))
    finally:
        torch.set_num_threads(threads)
    # the saved initial_lr, and the live one (the scheduler made before the load): both the
    # constructor's lr, as in the uninterrupted run
    initial = [g["initial_lr"] for g in opt.param_groups]
    assert results["scheduled"]["initial_lr"] == initial == results["older"]["initial_lr"]
    _assert_params_close(results["scheduled"]["params"], scheduled, "scheduled")
    # skips counted from 0 (none before RESUME_AT), as one process counts them
    _assert_params_close(results["older"]["params"], plain, "older")
    assert results["older"]["skips"][w.NAN_PARAM] == 1.0
    assert results["older"]["skips"]["bias"] == 1.0


@pytest.mark.parametrize(("name", "world"), [("muon", 2), ("muon", 4), ("soap", 2)])
def test_fsdp2_mixed_precision_with_clipping_steps_as_one_process_on_the_same_gradients(
        tmp_path, name, world):
    # bf16 compute, fp32 reduction, clip_grad_norm_ on the DTensor gradients: the step the
    # owners compute from the clipped gradients is the one one process computes from them, bit
    # for bit (fp32 parameters; the replay runs on rank 0 with the ranks' one thread), and
    # health covers every matrix with one process's values.
    run_ranks(w.mixed_precision_worker, world, tmp_path, str(tmp_path / "out.pt"), name)
    result = torch.load(tmp_path / "out.pt")
    assert result["params"].keys() == result["replay"].keys()
    for param, value in result["params"].items():
        assert torch.equal(value, result["replay"][param]), param
    assert any(norm > w.MP_MAX_NORM for norm in result["norms"]), result["norms"]  # it clipped
    merged: dict[str, dict[str, float]] = {}
    for report in result["health"]:
        merged.update(report)
    assert merged.keys() == result["replay_health"].keys() == {"l1.weight", "l2.weight"}
    for param, metrics in result["replay_health"].items():
        assert merged[param] == pytest.approx(metrics, abs=PARITY_ATOL, nan_ok=True), param
    assert result["params"]["l1.weight"].dtype == torch.float32


def test_a_rank_without_a_sidecar_still_joins_the_state_summarys_collective(tmp_path):
    # orthoshard.train published (and so summarized) only on ranks with a sidecar: a node
    # started without --sidecar-url left the others in the summary's all_reduce
    run_ranks(w.summary_without_sidecar_worker, 2, tmp_path, str(tmp_path / "out.pt"),
              timeout=60)
    result = torch.load(tmp_path / "out.pt")
    assert result["check"] == 1.0 + 2.0  # the ranks' collectives paired up
    assert [s["step"] for s in result["published"]] == [1, 2]
    for snapshot in result["published"]:
        norms = {name: state["buffer_norms"]["momentum_buffer"]
                 for name, state in snapshot["optimizer"]["state"].items()}
        assert norms and all(math.isfinite(v) and v > 0 for v in norms.values())


@pytest.mark.parametrize("replicated", [False, True], ids=["fsdp2", "replicated"])
def test_ranks_with_other_settings_or_unnamed_matrices_in_another_order_are_refused(
        tmp_path, replicated):
    # the signature held the parameters' names only: a rank with another learning rate
    # stepped its own rows with it (FSDP2: 0.038 from one process after 2 steps; replicated:
    # the replicas drifted apart), and unnamed parameters, named by position, agreed in any
    # order while owners read other matrices' rows as their own (0.015 after 2 steps)
    run_ranks(w.settings_mismatch_worker, 2, tmp_path, str(tmp_path / "out.pt"), replicated,
              timeout=90)
    result = torch.load(tmp_path / "out.pt")
    for case in ("matrix lr", "adamw lr", "order"):
        outcomes = result[case]["outcomes"]
        assert all(o.startswith("ValueError: ranks [") and "not with the same settings" in o
                   for o in outcomes), (case, outcomes)
        assert result[case]["unchanged"], case
        assert result[case]["recovered"] == ["done", "done"], case


@pytest.mark.parametrize(("replicated", "name"), [(False, "muon"), (True, "muon"),
                                                  (True, "normuon")])
def test_ranks_flagging_other_adamw_parameters_are_refused_on_every_rank(tmp_path, replicated,
                                                                         name):
    # the signature named the matrices and only counted the AdamW flags: with as many AdamW
    # gradients on each rank but of other parameters, the flags were summed across different
    # parameters and each rank stepped its shard of another one (two biases half-stepped)
    # (and with fewer AdamW gradients on one rank, the flags were of another length: gloo
    # aborted every process, "Received data size doesn't match expected size"). Replicated
    # matrices: a rank flagging no AdamW parameter sent its flags without a signature, and
    # gloo aborted the process the same way.
    run_ranks(w.adamw_mismatch_worker, 2, tmp_path, str(tmp_path / "out.pt"), replicated,
              name, timeout=60)
    result = torch.load(tmp_path / "out.pt")
    # ("all_reduce, none": rank 1 stepped nothing at all, and rank 0 waited for it until the
    # process group timed out)
    for case in ("gather", "all_reduce", "gather, fewer", "all_reduce, fewer", "gather, none",
                 "all_reduce, none"):
        outcomes = result[case]["outcomes"]
        assert all(o.startswith("ValueError: ") and "step the same" in o
                   and "parameters as rank" in o for o in outcomes), (case, outcomes)
        assert result[case]["unchanged"], case
    assert result["recovered"] == ["done", "done"]


def test_fsdp2_parameters_without_sharding_are_refused_by_name(tmp_path):
    # a bare AssertionError from the step (and, with the AdamW gradients dropped, a step of
    # each rank's own shards under LocalExchange, never gathered)
    run_ranks(w.no_sharding_worker, 2, tmp_path, str(tmp_path / "out.pt"), timeout=60)
    result = torch.load(tmp_path / "out.pt")
    for case in ("all", "no adamw", "matrices only"):
        assert all(o.startswith("ValueError: Muon: parameters are DTensors") and
                   "sharding=OwnerSharding()" in o for o in result[case]), (case, result[case])
    assert result["steps"] == [0, 0]  # the refused steps did not count
    assert result["matrices unchanged"] and result["matrices steps"] == [0]


def test_a_plain_gradient_on_a_sharded_adamw_parameter_is_refused_on_every_rank(tmp_path):
    # the matrices were updated, then AdamW failed with torch's "got mixed torch.Tensor and
    # DTensor" (the step counted); set on one rank alone, the others would have gone on
    run_ranks(w.misplaced_grad_worker, 2, tmp_path, str(tmp_path / "out.pt"), timeout=90)
    result = torch.load(tmp_path / "out.pt")
    cases = [("fsdp", "every rank"), ("fsdp", "rank 1"), ("fsdp", "bias alone"),
             ("fsdp soap", "every rank"), ("fsdp soap", "rank 1"),
             ("partly", "every rank"), ("partly", "rank 1")]
    for case in cases:
        outcomes = result[case]["outcomes"]
        assert all(o.startswith("ValueError: bias") or o.startswith("ValueError: inner.bias")
                   for o in outcomes), (case, outcomes)
        assert all("not laid out as the parameter" in o and "Nothing was applied" in o
                   for o in outcomes), (case, outcomes)
        assert result[case]["unchanged"] and result[case]["state unchanged"], case
        assert result[case]["steps"], case
    for layout in ("fsdp", "fsdp soap", "partly"):
        assert result[(layout, "recovered")] == ["done"] * 2, layout


def test_rows_not_laid_out_as_torch_chunk_are_refused_on_every_rank(tmp_path):
    # the ranks whose rows disagreed with the plan raised before the gather, and the rank
    # whose rows happened to agree waited in it (FSDP2 never lays rows out so; a hand-made
    # DTensor.from_local can)
    run_ranks(w.uneven_rows_worker, 3, tmp_path, str(tmp_path / "out.pt"), timeout=60)
    outcomes = torch.load(tmp_path / "out.pt")["outcomes"]
    assert outcomes[1].startswith("ValueError: w: this rank holds 2 rows, the plan expects 3")
    assert outcomes[2].startswith("ValueError: w: this rank holds 2 rows, the plan expects 1")
    # rank 0's rows agree: it learns of the others' error in the gather and raises too
    assert outcomes[0].startswith("RuntimeError: the matrix update on rank 1") and \
        "failed: ranks [1, 2]" in outcomes[0], outcomes
    # the state dict's export and import, and a checkpoint's save, read the plan too: raised
    # there on ranks 1 and 2 alone, rank 0 waited in the next collective
    result = torch.load(tmp_path / "out.pt")
    for name in ("normuon", "soap"):
        assert result[name]["init_state"] == ["done"] * 3  # no collective: nothing to raise
        for action in ("state_dict", "load", "save"):
            said = result[name][action]
            assert said[1].startswith("ValueError: w: this rank holds 2 rows, the plan expects 3")
            assert said[2].startswith("ValueError: w: this rank holds 2 rows, the plan expects 1")
            assert said[0].startswith("ValueError: ranks [1, 2] of the sharding group hold rows"), \
                (name, action, said)
    assert not any((tmp_path / f"ckpt-{name}").exists() for name in ("normuon", "soap"))


def test_a_checkpoint_loads_into_a_group_listing_its_parameters_in_another_order(tmp_path,
                                                                                references):
    # DCP filled each live position from the checkpoint's same position, which held another
    # matrix's state: where the shapes differ (NorMuon's second moment, SOAP's factors) the
    # load was refused as "another model"
    names = ["normuon", "soap"]
    run_ranks(w.reordered_load_worker, 2, tmp_path, names, str(tmp_path / "ckpt"), 0, "",
              timeout=120)
    run_ranks(w.reordered_load_worker, 2, tmp_path, names, str(tmp_path / "ckpt"), 1,
              str(tmp_path / "out.pt"), timeout=120)
    results = torch.load(tmp_path / "out.pt")
    for name in names:
        assert not isinstance(results[name], str), results[name]
        _assert_params_close(results[name], references[True][(name, None)][0], name, world=2)


def test_pipeline_stages_checkpoint_over_their_own_groups_and_continue_exactly(tmp_path):
    # without process_group, save/load ran DCP over the default group: one stage alone waited
    # for the other's ranks, and both stages at once mixed their writes (the load then failed)
    run_ranks(w.stage_checkpoint_worker, 4, tmp_path, str(tmp_path), str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see references)
    try:
        for name, params in zip(w.STAGE_OPTIMIZERS, result["params"], strict=True):
            _assert_params_close(params, w.reference(name, w.STEPS, bad="nan", alone=alone(2)),
                                 name)
    finally:
        torch.set_num_threads(threads)
    outcomes = result["outcomes"]
    assert all(o.startswith("ValueError: the optimizer's OwnerSharding group holds ranks")
               for o in outcomes["narrower"]), outcomes
    assert all(o.startswith(f"ValueError: process_group does not hold rank {r}")
               for r, o in enumerate(outcomes["not a member"])), outcomes
    assert not (tmp_path / "narrower").exists()  # refused before DCP wrote anything
    # both stages into ONE directory over the default group: their optimizer state has the same
    # keys (positions), and DCP keeps one copy of a key several ranks write, so a stage of the
    # same shapes would have loaded the other's state silently
    for case, want in [("shared", "ranks [0, 1] a SOAP, 7 parameters; ranks [2, 3] a NorMuon, 7 "
                                  "parameters"),
                       ("shared muon", "ranks [0, 1] a Muon, position 0: 'w0'; ranks [2, 3] a "
                                       "Muon, position 0: 'w1'"),
                       ("shared load", "ranks [0, 1] a SOAP")]:
        assert all(o.startswith("ValueError: the ranks that ") and want in o
                   and "Pass each model's group (a pipeline stage's) as process_group" in o
                   for o in outcomes[case]), (case, outcomes[case])
    assert not (tmp_path / "shared").exists()

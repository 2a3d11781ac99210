"""What every torch.optim optimizer is expected to survive, for Muon, NorMuon and SOAP: copies
(``copy.deepcopy``, ``pickle``), ``torch.compile`` around the step, the state-dict hooks, a
method changed mid-training, and parameters or arguments that cannot work."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from optim import SOAP, Muon, NorMuon, split_param_groups
from optim.health import orthogonality_error
from optim.orthogonalize import default_steps, orthogonalize

# A copy runs the very same operations on the very same values as the optimizer it was copied
# from: its steps must match bit for bit.
EXACT = 0.0

OPTIMIZERS: list[tuple[type, dict[str, Any]]] = [
    (Muon, {"lr": 0.02}), (NorMuon, {"lr": 0.02}),
    (SOAP, {"lr": 0.01, "precondition_frequency": 2}),
    (SOAP, {"lr": 0.01, "use_kl_shampoo": True, "use_eigh": True}),
    # copied right after a refresh: the next steps' health reads the quotients carried since
    (SOAP, {"lr": 0.01, "precondition_frequency": 3})]
IDS = ["Muon", "NorMuon", "SOAP", "SOAP-KL-eigh", "SOAP-every3"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 8))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        model.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _pickled(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_copy_continues_exactly_as_the_original(cls: type, kwargs: dict[str, Any],
                                                  copier: Callable[[Any], Any]) -> None:
    model = _model()
    opt = cls(split_param_groups(model), **kwargs)
    _train(model, opt, 4, seed=1)
    health = opt.health()
    model2, opt2 = copier((model, opt))  # one object graph: the copy's state keys its params
    assert opt2.health() == health  # carried as plain floats
    assert opt2.health_every == opt.health_every
    # two steps, so that SOAP's last one falls between refreshes (its health carried)
    _train(model, opt, 2, seed=2)
    _train(model2, opt2, 2, seed=2)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p2, p, atol=EXACT, rtol=EXACT, msg=name)
    assert opt2.health() == opt.health()
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_a_copy_keeps_the_settings_given_to_the_constructor() -> None:
    w = nn.Parameter(torch.randn(96, 80))
    opt = Muon([w], lr=0.02, health_every=3, health_probes=0)
    opt.MAX_BATCH_BYTES = 4096
    clone = copy.deepcopy(opt)
    assert (clone.health_every, clone.health_probes, clone.MAX_BATCH_BYTES) == (3, 0, 4096)


class _ProcessGroupExchange:
    """Stands for ``sharding.OwnerSharding`` (which needs a process group): an exchange other
    than the single-process one."""

    def bind(self, optimizer: Any) -> None:
        pass

    def owned(self, items: Any) -> list[int]:
        return []

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not stepped here")


def test_a_sharded_optimizer_refuses_to_be_copied_and_says_how_to_save_it() -> None:
    opt = Muon([nn.Parameter(torch.randn(8, 8))], lr=0.02, sharding=_ProcessGroupExchange())
    for copier in (copy.deepcopy, _pickled):
        with pytest.raises(TypeError, match=r"sharding\.checkpoint"):
            copier(opt)


@pytest.mark.parametrize(("cls", "kwargs"), [
    (Muon, {"lr": 0.02, "softening": lambda step: 0.1 * step}),
    (NorMuon, {"lr": 0.02}), (SOAP, {"lr": 0.01})], ids=["Muon-scheduled", "NorMuon", "SOAP"])
def test_a_compiled_function_that_steps_matches_the_eager_step(cls: type,
                                                               kwargs: dict[str, Any]) -> None:
    # the step itself runs eagerly under torch.compile (a graph break); this is what failed
    # (Muon's softening looked up by id(group) inside a traced frame raised KeyError)
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8))
    w_eager = nn.Parameter(w.detach().clone())
    opt, eager = cls([w], **kwargs), cls([w_eager], **kwargs)

    @torch.compile(backend="eager", fullgraph=False)
    def step() -> None:
        opt.step()

    for _ in range(3):
        grad = torch.randn(16, 8)
        w.grad, w_eager.grad = grad.clone(), grad.clone()
        step()
        eager.step()
    torch.testing.assert_close(w, w_eager, atol=EXACT, rtol=EXACT)


def test_a_load_pre_hook_migrates_the_state_dict_before_it_is_checked() -> None:
    w = nn.Parameter(torch.randn(16, 8))
    opt = Muon([w], lr=0.02)
    w.grad = torch.randn(16, 8)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)  # as an older version wrote it, under another key
    for entry in old["state"].values():
        entry["old_buf"] = entry.pop("momentum_buffer")

    def migrate(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        sd = copy.deepcopy(sd)
        for entry in sd["state"].values():
            entry["momentum_buffer"] = entry.pop("old_buf")
        return sd

    fresh = Muon([nn.Parameter(w.detach().clone())], lr=0.02)
    with pytest.raises(ValueError, match="old_buf"):  # without the hook: refused, by name
        fresh.load_state_dict(old)
    fresh.register_load_state_dict_pre_hook(migrate)
    fresh.load_state_dict(old)
    torch.testing.assert_close(next(iter(fresh.state.values()))["momentum_buffer"],
                               saved["state"][0]["momentum_buffer"], atol=EXACT, rtol=EXACT)


def test_state_dict_post_hooks_see_the_finished_dict_and_load_post_hooks_the_loaded_state(
        ) -> None:
    w = nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = SOAP([w], lr=0.01)
    w.grad = torch.randn(16, 8, dtype=torch.bfloat16)
    opt.step()
    seen: dict[str, Any] = {}

    def after_save(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        seen["saved"] = pickle.dumps(sd)  # plain data: no live schedule in it

    def after_load(optimizer: torch.optim.Optimizer) -> None:
        seen["dtypes"] = {k: v.dtype for k, v in optimizer.state[w].items()
                          if isinstance(v, torch.Tensor) and v.ndim == 2}

    muon = Muon([nn.Parameter(torch.randn(8, 8))], lr=0.02, softening=lambda step: 0.5)
    muon.register_state_dict_post_hook(after_save)
    muon.state_dict()
    assert pickle.loads(seen["saved"])["param_groups"][0]["softening"] is None
    opt.register_load_state_dict_post_hook(after_load)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    # the factors, bases and moments of a bf16 parameter are float32, as SOAP keeps them, when
    # the hook runs (torch's loader casts them to bf16 first; the optimizer restores them)
    assert seen["dtypes"] and set(seen["dtypes"].values()) == {torch.float32}


# CANS after its own 9 steps is near-orthogonal; after the quintic's 5 it is not (1.3 on this
# matrix, measured; see optim._muon_args._UnsetSteps): below 0.05 only the right count gets.
CANS_OWN_COUNT_ERROR = 0.05


def test_a_derived_step_count_follows_a_change_of_method_during_training() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(256, 96))
    pinned = nn.Parameter(torch.randn(256, 96))
    opt = Muon([{"params": [w]}, {"params": [pinned], "ns_steps": 5}], lr=0.02)
    w.grad, pinned.grad = torch.randn(256, 96), torch.randn(256, 96)
    opt.step()
    for group in opt.param_groups:
        group["ns_method"] = "cans"
    w.grad, pinned.grad = torch.randn(256, 96), torch.randn(256, 96)
    opt.step()
    follows, kept = opt.param_groups
    assert (follows["ns_steps"], follows["ns_steps_auto"]) == (9, "cans")
    assert (kept["ns_steps"], kept["ns_steps_auto"]) == (5, None)  # given: the user's count
    assert default_steps("cans", torch.bfloat16) == 9
    health = opt.health()
    assert health["group0.param0"]["orthogonality_error"] < CANS_OWN_COUNT_ERROR
    g = torch.randn(256, 96)
    assert orthogonality_error(orthogonalize(g, method="cans", steps=5)) > CANS_OWN_COUNT_ERROR


def test_a_count_set_by_hand_or_unpinned_stays_through_a_change_of_method() -> None:
    a, b = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(32, 16))
    opt = Muon([{"params": [a]}, {"params": [b]}], lr=0.02)
    opt.param_groups[0]["ns_steps"] = 7            # set by hand: the user's from now on
    opt.param_groups[1]["ns_steps_auto"] = None    # pinned at the quintic's 5
    for group in opt.param_groups:
        group["ns_method"] = "polar_express"
    a.grad, b.grad = torch.randn(32, 16), torch.randn(32, 16)
    opt.step()
    assert [(g["ns_steps"], g["ns_steps_auto"]) for g in opt.param_groups] == [(7, None),
                                                                                (5, None)]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("algorithm", ["muon", "adamw"])
def test_a_gradient_on_an_integer_parameter_is_refused_by_name_before_anything_moves(
        dtype: torch.dtype, algorithm: str) -> None:
    counts = torch.zeros(4, 4, dtype=dtype)
    w = nn.Parameter(torch.randn(8, 8))
    opt = Muon([{"params": [counts], "param_names": ["counts"], "algorithm": algorithm},
                {"params": [w], "param_names": ["w"]}], lr=0.02)
    counts.grad = torch.ones(4, 4, dtype=dtype)
    w.grad = torch.randn(8, 8)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=rf"'counts' is {dtype} and has a gradient"):
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [0, 0]
    torch.testing.assert_close(w.detach(), before, atol=EXACT, rtol=EXACT)


def test_frozen_integer_parameters_are_skipped_as_torch_optimizers_skip_them() -> None:
    # packed or quantized weights: integer parameters cannot require a gradient
    model = _model()
    model.register_parameter("packed", nn.Parameter(torch.zeros(4, 4, dtype=torch.int8),
                                                     requires_grad=False))
    for cls, kwargs in ((Muon, {"lr": 0.02}), (SOAP, {"lr": 0.01})):
        opt = cls([{"params": [model.packed], "param_names": ["packed"], "algorithm": "adamw"},
                   {"params": [model[0].weight], "param_names": ["w"]}], **kwargs)
        _train(model, opt, 2, seed=3)
        assert model.packed.dtype == torch.int8 and not model.packed.any()
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def test_a_copy_made_after_an_lr_scheduler_steps_its_own_parameters_and_pickles() -> None:
    model = _model()
    opt = Muon(split_param_groups(model), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.register_step_post_hook(lambda optimizer, args, kwargs: None)
    _train(model, opt, 1, seed=4)
    scheduler.step()
    before = [p.detach().clone() for p in model.parameters()]
    model2, opt2 = copy.deepcopy((model, opt))
    _pickled((model, opt))  # the scheduler's wrapper of step is not part of the optimizer's copy
    assert not opt2._optimizer_step_post_hooks  # hooks start empty, as in torch's copies
    _train(model2, opt2, 1, seed=5)
    for p, b in zip(model.parameters(), before, strict=True):  # the original did not move
        torch.testing.assert_close(p.detach(), b, atol=EXACT, rtol=EXACT)
    assert any(not torch.equal(p2, b) for p2, b in zip(model2.parameters(), before, strict=True))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.01


def test_load_pre_hooks_leave_the_callers_state_dict_as_it_was() -> None:
    w = nn.Parameter(torch.randn(16, 8))
    opt = Muon([w], lr=0.02)
    w.grad = torch.randn(16, 8)
    opt.step()
    sd = opt.state_dict()
    keys, state = set(sd), sd["state"]

    def replace(optimizer: torch.optim.Optimizer, given: dict[str, Any]) -> None:
        given["note"] = "migrated"  # in place, as torch lets a pre-hook do
        given["state"] = dict(given["state"])

    opt.register_load_state_dict_pre_hook(replace)
    opt.load_state_dict(sd)
    assert set(sd) == keys and sd["state"] is state


def test_bad_sharding_and_adamw_eps_are_refused_by_name() -> None:
    w = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(TypeError, match=r"sharding must be None .* got 'x'"):
        Muon([w], lr=0.02, sharding="x")
    from sharding import OwnerSharding  # the class passed the attribute test, then bind failed

    with pytest.raises(TypeError, match=r"got <class .*OwnerSharding'> \(the class: call it\)"):
        Muon([w], lr=0.02, sharding=OwnerSharding)
    with pytest.raises(ValueError, match="adamw_eps must be a number >= 0, got 'x'"):
        Muon([{"params": [nn.Parameter(torch.randn(4))], "algorithm": "adamw",
               "adamw_eps": "x"}], lr=0.02)


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("flag", ["maximize", "amsgrad"])
def test_adamw_flags_no_update_here_reads_are_refused_not_ignored(
        cls: type, kwargs: dict[str, Any], flag: str) -> None:
    # an AdamW group copied with maximize=True descended where torch.optim.AdamW ascends
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=rf"param group 1: {flag}=True is not supported"):
        cls([{"params": [w]}, {"params": [b], "algorithm": "adamw", flag: True}], **kwargs)
    for off in (0, np.False_):  # what AdamW reads as off is accepted, as False is
        cls([{"params": [w]}, {"params": [b], "algorithm": "adamw", flag: off}], **kwargs)
    opt = cls([{"params": [w]}, {"params": [b], "algorithm": "adamw", flag: False}], **kwargs)
    b.grad = torch.ones(4)
    opt.param_groups[0][flag] = True  # set by user code mid-training: refused before a move
    with pytest.raises(ValueError, match=rf"param group 0: {flag}=True is not supported"):
        opt.step()
    assert torch.equal(b, torch.zeros(4)) and not opt.state


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_group_added_after_one_was_removed_gets_a_name_of_its_own(
        cls: type, kwargs: dict[str, Any]) -> None:
    # removing a group (to freeze a block) and adding one named the new group after the count
    # of groups: "group2" again, refused as given twice though the user named nothing
    ws = [nn.Parameter(torch.randn(4, 4)) for _ in range(4)]
    opt = cls([{"params": [w]} for w in ws[:3]], **kwargs)
    opt.param_groups.pop(1)
    opt.add_param_group({"params": [ws[3]]})
    assert [g["param_names"] for g in opt.param_groups] == [
        ["group0.param0"], ["group2.param0"], ["group3.param0"]]
    for w in (ws[0], ws[2], ws[3]):
        w.grad = torch.randn(4, 4)
    opt.step()
    assert set(opt.health()) == {"group0.param0", "group2.param0", "group3.param0"}


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_add_param_group_adds_the_callers_dict_as_torch_optim_does(
        cls: type, kwargs: dict[str, Any]) -> None:
    # it added a copy: an edit to the dict afterwards (its lr) reached no group
    ws = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    opt, ref = cls([ws[0]], **kwargs), torch.optim.SGD([ws[0]], lr=0.1)
    for o in (opt, ref):
        group = {"params": [ws[1]]}
        o.add_param_group(group)
        assert o.param_groups[-1] is group
    with pytest.raises(TypeError, match="must be a dict"):
        opt.add_param_group([ws[1]])


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_parameter_appended_to_a_groups_list_is_refused_with_the_way_to_add_it(
        cls: type, kwargs: dict[str, Any]) -> None:
    # the step failed on "zip() argument 2 is longer than argument 1", naming nothing
    ws = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    opt = cls([ws[0]], **kwargs)
    opt.param_groups[0]["params"].append(ws[1])
    for w in ws:
        w.grad = torch.randn(4, 4)
    before = [w.detach().clone() for w in ws]
    with pytest.raises(ValueError, match=r"param group 0 lists 2 parameters and 1 names.*"
                                         r"add_param_group"):
        opt.step()
    assert all(torch.equal(w, b) for w, b in zip(ws, before, strict=True))
    assert opt.param_groups[0]["step"] == 0 and not opt.state
    opt.param_groups[0]["params"].pop()
    opt.add_param_group({"params": [ws[1]]})
    opt.step()
    assert not any(torch.equal(w, b) for w, b in zip(ws, before, strict=True))


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_an_empty_group_can_be_added_as_torch_optim_allows(
        cls: type, kwargs: dict[str, Any]) -> None:
    # torch refused it next to the named groups ("with/without names"), with no fix named
    w = nn.Parameter(torch.randn(4, 4))
    opt = cls([w], **kwargs)
    opt.add_param_group({"params": []})
    assert opt.param_groups[1]["params"] == [] == opt.param_groups[1]["param_names"]
    w.grad = torch.randn(4, 4)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert set(opt.health()) == {"group0.param0"}


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_set_of_parameters_in_a_group_is_refused_as_torch_refuses_it(
        cls: type, kwargs: dict[str, Any]) -> None:
    # a set's order can differ from run to run, and names, health and checkpoints follow it
    ws = {nn.Parameter(torch.randn(4, 4)) for _ in range(2)}
    with pytest.raises(TypeError, match="ordered collections"):
        cls([{"params": ws}], **kwargs)
    with pytest.raises(TypeError, match="ordered collections"):
        torch.optim.AdamW([{"params": ws}])  # the same refusal as torch's


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_step_that_finds_no_gradient_at_all_warns_once(cls: type, kwargs: dict[str, Any]
                                                         ) -> None:
    # an optimizer built before fully_shard (which installs new parameters) holds tensors no
    # backward reaches: its steps changed nothing, silently
    model = _model()
    opt = cls(split_param_groups(model.named_parameters()), **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"found no gradient on any of its parameters.*"
                                            r"fully_shard") as caught:
        opt.step()
    assert [w.filename for w in caught] == [__file__]  # points at the caller's step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once
        fresh = cls(split_param_groups(model.named_parameters()), **kwargs)
        _train(model, fresh, 2, seed=0)  # gradients from the first step on: no warning
        model.zero_grad(set_to_none=True)
        fresh.step()  # a later step without any: legitimate (e.g. a skipped micro-batch)


def test_a_list_of_groups_given_to_a_second_optimizer_starts_it_afresh() -> None:
    # the first optimizer wrote its defaults, step count and algorithm into the caller's
    # dicts: a second Muon on the same list started at the first one's step (its softening
    # schedule read from step 4), and a SOAP or the AdamW group were refused
    model = _model()
    groups = split_param_groups(model.named_parameters())
    given = [dict(g) for g in groups]
    first = Muon(groups, lr=0.02, softening=lambda t: min(1.0, 0.25 * (t - 1)))
    _train(model, first, 3, seed=0)
    assert [dict(g) for g in groups] == given  # the caller's dicts as they were
    second = Muon(groups, lr=0.02, softening=lambda t: min(1.0, 0.25 * (t - 1)))
    _train(model, second, 1, seed=1)
    assert [g["step"] for g in second.param_groups] == [1, 1]
    assert {m["softening"] for m in second.health().values() if "softening" in m} == {0.0}
    third = SOAP(groups, lr=0.01)
    assert [g["algorithm"] for g in third.param_groups] == ["soap", "adamw"]
    # parameters given as a generator: read once, into the caller's dict (as torch keeps it),
    # not into the copy alone (a second optimizer, or a corrected retry, got an empty group)
    w = nn.Parameter(torch.randn(4, 4))
    lazy = [{"params": (p for p in [w])}]
    assert [len(o.param_groups[0]["params"]) for o in (Muon(lazy, lr=0.02),
                                                        Muon(lazy, lr=0.02))] == [1, 1]


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_refused_group_can_be_corrected_and_given_again(cls: type,
                                                          kwargs: dict[str, Any]) -> None:
    # the names written into the refused group stayed: the corrected retry failed on their
    # count ("zip() argument 2 is longer than argument 1")
    vector = nn.Parameter(torch.zeros(3))
    matrices = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    group: dict[str, Any] = {"params": [vector]}
    with pytest.raises(ValueError, match="2-D"):
        cls([group], **kwargs)
    assert group == {"params": [vector]}
    group["params"] = matrices
    assert len(cls([group], **kwargs).param_groups[0]["params"]) == 2
    opt = cls([nn.Parameter(torch.randn(4, 4))], **kwargs)
    added: dict[str, Any] = {"params": [vector]}
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group(added)
    assert added == {"params": [vector]} and len(opt.param_groups) == 1
    added["params"] = matrices
    opt.add_param_group(added)
    assert opt.param_groups[-1] is added and len(added["param_names"]) == 2
    # a generator refused: the corrected retry still has its parameters (it got none)
    more = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    lazy: dict[str, Any] = {"params": (p for p in more), "lr": -1.0}
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group(lazy)
    lazy["lr"] = 0.01
    opt.add_param_group(lazy)
    assert opt.param_groups[-1]["params"] == more


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=IDS)
def test_a_group_added_in_a_removed_groups_place_reports_no_health_of_the_removed_one(
        cls: type, kwargs: dict[str, Any]) -> None:
    # the removed group's matrix's last health (a skip counted, too) was reported under the
    # new group's name (group1.param0 again) until the new matrix stepped
    a, b, c = (nn.Parameter(torch.randn(6, 3)) for _ in range(3))
    opt = cls([{"params": [a]}, {"params": [b]}], **kwargs)
    for bad in (False, True):
        a.grad, b.grad = torch.randn(6, 3), torch.full((6, 3), math.nan if bad else 1.0)
        opt.step()
    del opt.param_groups[1]
    opt.add_param_group({"params": [c]})
    assert opt.param_groups[1]["param_names"] == ["group1.param0"]
    assert "group1.param0" not in opt.health()


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:3], ids=IDS[:3])
def test_a_no_gradient_warning_raised_as_an_error_counts_no_step_and_is_given_once(
        cls: type, kwargs: dict[str, Any]) -> None:
    # python -W error turns the warning into an exception: the step it interrupted had already
    # counted itself, and the warning came again at every later call
    import warnings

    model = _model()
    opt = cls(split_param_groups(model.named_parameters()), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="found no gradient"):
            opt.step()
        assert [group["step"] for group in opt.param_groups] == [0] * len(opt.param_groups)
        opt.step()  # warned once: no second warning


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:3], ids=IDS[:3])
def test_a_step_under_inference_mode_is_refused_before_anything_changes(
        cls: type, kwargs: dict[str, Any]) -> None:
    # its state would be inference tensors, which the next step outside inference_mode could
    # not update in place: that step raised after moving the parameters
    model = _model()
    opt = cls(split_param_groups(model.named_parameters()), **kwargs)
    _train(model, opt, 1, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    assert all(p.grad is not None for p in model.parameters())  # _train's last gradients
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    after = opt.state_dict()
    assert [g["step"] for g in after["param_groups"]] == [g["step"] for g in state["param_groups"]]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    opt.step()  # outside it, the same gradients step


def _bad_state(cls: type, kwargs: dict[str, Any]) -> tuple[torch.optim.Optimizer,
                                                            dict[str, Any]]:
    model = _model()
    opt = cls(split_param_groups(model.named_parameters()), **kwargs)
    _train(model, opt, 2, seed=0)
    return opt, copy.deepcopy(opt.state_dict())


def _assert_refused_unchanged(opt: torch.optim.Optimizer, sd: dict[str, Any],
                              message: str) -> None:
    """``opt.load_state_dict(sd)`` raises ValueError matching ``message``, changing nothing."""
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    for i, entry in kept["state"].items():
        for k, v in entry.items():
            assert torch.equal(opt.state_dict()["state"][i][k], v)


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:3], ids=IDS[:3])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_state_dict_holding_nan_or_inf_is_refused_by_name(cls: type, kwargs: dict[str, Any],
                                                            value: float) -> None:
    # accepted, it made every later step of that matrix non-finite: each was skipped, and the
    # matrix never trained again (an AdamW parameter turned NaN)
    for index in (0, 1):  # a matrix's state, then an AdamW parameter's
        opt, sd = _bad_state(cls, kwargs)
        key = next(k for k, v in sd["state"][index].items() if k != "step" and v.numel())
        sd["state"][index][key].view(-1)[0] = value
        _assert_refused_unchanged(opt, sd, rf"state '{key}' of parameter .* holds NaN or Inf")


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:3], ids=IDS[:3])
def test_a_negative_second_moment_is_refused_at_load(cls: type, kwargs: dict[str, Any]) -> None:
    # an average of squares below zero: its square root came out NaN at every later step, and
    # the matrix was skipped and counted for ever (SOAP's exp_avg_sq, NorMuon's second_moment,
    # the AdamW group's exp_avg_sq; Muon keeps none for its matrices)
    opt, _ = _bad_state(cls, kwargs)
    indices = [i for i, entry in opt.state_dict()["state"].items()
               if {"exp_avg_sq", "second_moment"} & set(entry)]
    assert len(indices) >= (1 if cls is Muon else 2)  # the AdamW parameters, and matrices
    for index in indices:
        opt, sd = _bad_state(cls, kwargs)
        key = next(k for k in ("exp_avg_sq", "second_moment") if k in sd["state"][index])
        sd["state"][index][key].view(-1)[-1] = -1e-3
        _assert_refused_unchanged(opt, sd, rf"state '{key}' of parameter .* holds negative")


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS[:1], ids=IDS[:1])
@pytest.mark.parametrize("bad", [-1.0, 1.5, math.nan])
def test_step_counts_that_are_no_count_are_refused_at_load(cls: type, kwargs: dict[str, Any],
                                                           bad: float) -> None:
    # a negative AdamW step divided by zero in the bias correction, after the matrices had
    # stepped; a group step of None raised TypeError after another group's count had moved
    opt, sd = _bad_state(cls, kwargs)
    adamw = next(i for i, g in enumerate(opt.param_groups) if g["algorithm"] == "adamw")
    index = sd["param_groups"][adamw]["params"][0]
    sd["state"][index]["step"] = torch.tensor(bad)
    with pytest.raises(ValueError,
                       match=r"state 'step' of parameter .* (not a step count|holds NaN)"):
        opt.load_state_dict(sd)
    for group_step in (None, "x", -1, 2.0, True):
        opt, sd = _bad_state(cls, kwargs)
        sd["param_groups"][0]["step"] = group_step
        with pytest.raises(ValueError, match=r"param group 0 has step .* not a step count"):
            opt.load_state_dict(sd)


def test_a_scheduler_numpy_value_written_after_the_last_step_saves_with_weights_only(
        tmp_path) -> None:
    # the step converts NumPy hyperparameters, but a checkpoint is usually taken right after
    # scheduler.step(), which wrote np.float64 into the groups
    model = _model()
    opt = Muon(split_param_groups(model.named_parameters()), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + np.cos(np.pi * e / 10)))
    _train(model, opt, 1, seed=0)
    sched.step()
    assert type(opt.param_groups[0]["lr"]).__module__ == "numpy"  # the premise
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["lr"] == float(opt.param_groups[0]["lr"])
    fresh = Muon(split_param_groups(model.named_parameters()), lr=0.02)
    fresh.load_state_dict(loaded)

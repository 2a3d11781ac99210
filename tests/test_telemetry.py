"""orthoshard.telemetry, single process: the summary the state API serves says what each group
and matrix really uses, and building it never raises into the training loop."""

from __future__ import annotations

import json
import math
import time
import warnings

import pytest
import torch
from torch import nn

from optim import Muon, split_param_groups
from optim.soap import SOAP
from orthoshard.telemetry import optimizer_summary
from service.schema import Snapshot


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _validated(summary: dict) -> dict:
    """The summary as the sidecar reads it (a strict schema: a str where a number belongs, or
    a null in a shape, is refused), after the JSON round trip the publisher makes."""
    body = {"schema_version": 1, "run_id": "r", "rank": 0, "step": 1, "wall_time": time.time(),
            "params": {}, "optimizer": summary}
    return Snapshot.model_validate_json(json.dumps(body)).model_dump()["optimizer"]


def test_the_adamw_group_reports_what_adamw_reads():
    # it carried the matrix optimizer's eps, betas, momentum, nesterov and ns_method (which the
    # AdamW update ignores) and not the adamw_eps it does use
    model = _model()
    opt = SOAP(split_param_groups(model.named_parameters(), adamw_lr=3e-4, adamw_eps=1e-6),
               lr=3e-3, betas=(0.8, 0.99), eps=1e-10, max_precond_dim=512, max_update_rms=1.0)
    _step(model, opt)
    matrix, adamw = (g["hyperparameters"] for g in _validated(optimizer_summary(opt, rank=0))
                     ["groups"])
    # weight_decay: SOAP's default (0.01), which the AdamW group of split_param_groups takes
    # when it is given none
    assert adamw == {"algorithm": "adamw", "lr": 3e-4, "weight_decay": 0.01,
                     "adamw_betas": [0.9, 0.95], "adamw_eps": 1e-6}
    assert matrix["betas"] == [0.8, 0.99] and matrix["eps"] == 1e-10
    assert matrix["max_precond_dim"] == 512 and "adamw_eps" not in matrix
    assert matrix["max_update_rms"] == 1.0  # the update clip the demo's SOAP applies


def test_a_tensor_learning_rate_is_reported_as_a_number():
    model = _model()
    opt = Muon(split_param_groups(model.named_parameters()), lr=torch.tensor(0.02))
    _step(model, opt)
    groups = _validated(optimizer_summary(opt, rank=0))["groups"]
    assert groups[0]["hyperparameters"]["lr"] == float(torch.tensor(0.02))  # "tensor(0.0200)"


def test_a_softening_schedule_is_read_at_a_step_it_is_defined_for():
    # a schedule counts steps from 1: read at a group's step 0 (before its first step, or a
    # group just added) 0.2 / sqrt(t) divided by zero inside publish_health
    def schedule(t: int) -> float:
        return 0.2 / math.sqrt(t)

    model = _model()
    named = list(model.named_parameters())
    opt = Muon([named[0]], lr=0.02, softening=schedule)
    assert optimizer_summary(opt, rank=0)["groups"][0]["hyperparameters"]["softening"] == 0.2
    _step(model, opt)
    _step(model, opt)
    opt.add_param_group({"params": [named[2]]})
    groups = optimizer_summary(opt, rank=0)["groups"]
    assert [g["hyperparameters"]["softening"] for g in groups] == [0.2 / math.sqrt(2), 0.2]


def test_a_schedule_that_raises_is_reported_as_unknown_not_raised():
    def broken(t: int) -> float:
        raise RuntimeError("schedule bug")

    model = _model()
    opt = Muon([next(model.parameters())], lr=0.02, softening=broken)
    summary = _validated(optimizer_summary(opt, rank=0))
    assert summary["groups"][0]["hyperparameters"]["softening"] is None


def test_an_absent_side_of_one_sided_soap_has_no_buffer_norm():
    # the (0, 0) placeholder was reported as a factor of norm 0, which health and the
    # eigenvalues (both without that side) contradicted
    w = nn.Parameter(torch.randn(40, 32))
    opt = SOAP([("w", w)], lr=1e-3, max_precond_dim=35)  # 40 rows: no L
    w.grad = torch.randn(40, 32)
    opt.step()
    state = _validated(optimizer_summary(opt, rank=0))["state"]["w"]
    assert set(state["buffer_norms"]) == {"R", "exp_avg", "exp_avg_sq"}  # (step is 0-d)
    assert set(state["eigenvalues"]) == {"R"}
    assert not any(k.endswith("_L") for k in opt.health()["w"])


def test_more_groups_than_a_snapshot_holds_keep_the_summary_within_the_schema():
    # 300 groups (a learning rate per layer): the sidecar refused the snapshot (at most 256
    # groups), and the step's health went with it
    from service.schema import MAX_GROUPS

    layers = [nn.Linear(4, 4, bias=False) for _ in range(MAX_GROUPS + 44)]
    opt = Muon([{"params": [(f"l{i}.weight", layer.weight)], "lr": 0.01 * (1 + i % 3)}
                for i, layer in enumerate(layers)])
    for layer in layers:
        layer.weight.grad = torch.randn(4, 4)
    opt.step()
    with pytest.warns(RuntimeWarning, match=f"first {MAX_GROUPS} of {MAX_GROUPS + 44} param"):
        groups = _validated(optimizer_summary(opt, rank=0))["groups"]
    assert [g["params"] for g in groups] == [[f"l{i}.weight"] for i in range(MAX_GROUPS)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        optimizer_summary(opt, rank=0)


def test_a_group_reports_the_quintics_coefficients_only_where_its_method_reads_them():
    # Polar Express reported coefficients it never reads; SOAP's qr_fp32_matmul_prec, which
    # its refresh reads, was missing
    model = _model()
    for method, reported in (("quintic", True), ("polar_express", False), ("cans", False)):
        opt = Muon(split_param_groups(model.named_parameters()), ns_method=method,
                   ns_coefficients=(3.0, -3.2, 1.2) if method == "quintic" else
                   (2.0, -1.5, 0.5))
        matrix = _validated(optimizer_summary(opt, rank=0))["groups"][0]["hyperparameters"]
        assert ("ns_coefficients" in matrix) == reported, method
    opt = SOAP(split_param_groups(model.named_parameters()), lr=3e-3, qr_fp32_matmul_prec="high")
    matrix = _validated(optimizer_summary(opt, rank=0))["groups"][0]["hyperparameters"]
    assert matrix["qr_fp32_matmul_prec"] == "high"

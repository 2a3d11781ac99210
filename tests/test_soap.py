"""SOAP behaviour: published spike results through health(), skips, checkpoints, schedules,
argument validation, one-sided SOAP and the fp32 matmul precision knob."""

from __future__ import annotations

import copy
import gc
import math
import random
import weakref

import numpy as np
import pytest
import torch

from optim._soap_basis import matmul_precision, pmm, power_step_quotients
from optim._soap_health import SideHealth, _frobenius, soap_health
from optim._soap_step import _BATCHED_NORM_MAX, SoapConfig, gradient_fits
from optim.health import (
    basis_staleness,
    eigengap_ratio,
    rotation_angle_degrees,
    rotation_angles_degrees,
)
from optim.muon import Muon
from optim.soap import SOAP

STATE_KEYS = {"L", "R", "Q_L", "Q_R", "exp_avg", "exp_avg_sq", "step"}


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI machine has 2 cores shared with other jobs; 2 BLAS threads then spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- seed 004: a 1000x isotropic spike under KL-Shampoo at fp32 "highest" ----------------------
SPIKE_AT, OFFSETS = 50, (1, 2, 5, 10)
# The study found <= 0.06 degrees; 1 degree is the bound.
SEED004_MAX_DEGREES = 1.0


def seed004_trajectory(use_eigh: bool, prec: str = "highest") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(128, 64))
    opt = SOAP([p], lr=1.0, betas=(0.9, 0.95), shampoo_beta=0.95, weight_decay=0.0,
               use_kl_shampoo=True, use_eigh=use_eigh, fp32_matmul_prec=prec, health_every=0)
    out = []
    for i in range(SPIKE_AT + max(OFFSETS)):
        p.grad = torch.randn(128, 64, generator=gen) * (1000.0 if i == SPIKE_AT else 1.0)
        opt.step()
        out.append(opt.state[p]["Q_L"].clone())
    return out


@pytest.mark.parametrize("use_eigh", [False, True])
def test_seed004_kl_basis_stays_within_one_degree_after_a_1000x_spike(use_eigh):
    Q = seed004_trajectory(use_eigh)
    pre = Q[SPIKE_AT - 1]
    for n in OFFSETS:
        for k in (1, 8):
            angle = float(rotation_angle_degrees(pre, Q[SPIKE_AT - 1 + n], k=k))
            assert angle < SEED004_MAX_DEGREES, (n, k, angle)


def test_seed004_tf32_factor_matmuls_turn_the_basis_on_cpu_too():
    """The study's GPU finding (86-89 degrees under TF32) reproduces through the CPU emulation."""
    Q = seed004_trajectory(use_eigh=True, prec="high")
    assert float(rotation_angle_degrees(Q[SPIKE_AT - 1], Q[SPIKE_AT + 9], k=8)) > 45.0


# ---- a rank-1 spike on a stable low-rank spectrum ----------------------------------------------
RANK1_SPIKE_AT = 30
# Measured with Emerging-Optimizers: plain SOAP turns ~85 degrees at the spike, calm steps <= 4.4;
# KL-Shampoo ~0. Measured here: 87.5 / <= 0.87 and <= 4e-5 degrees.
PLAIN_SPIKE_MIN_DEGREES = 60.0
CALM_MAX_DEGREES = 5.0
KL_SPIKE_MAX_DEGREES = 1.0


def rank1_rotations(use_kl_shampoo: bool) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    m, n = 32, 16
    U = torch.linalg.qr(torch.randn(m, 4, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, 4, generator=gen))[0]
    signal = U @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0])) @ V.T
    u, v = torch.randn(m, generator=gen), torch.randn(n, generator=gen)
    spike = 1000.0 * torch.outer(u / u.norm(), v / v.norm())
    p = torch.nn.Parameter(torch.zeros(m, n))
    opt = SOAP([("w", p)], lr=1e-3, use_kl_shampoo=use_kl_shampoo)
    rotations = []
    for t in range(RANK1_SPIKE_AT + 6):
        p.grad = signal + 0.1 * torch.randn(m, n, generator=gen) + (spike if t == RANK1_SPIKE_AT
                                                                    else 0.0)
        opt.step()
        rotations.append(opt.health()["w"]["rotation_degrees_L_k1"])
    return rotations


def test_rank1_spike_turns_plain_soaps_top_eigenvector_and_health_shows_it():
    rot = rank1_rotations(use_kl_shampoo=False)
    assert rot[RANK1_SPIKE_AT] > PLAIN_SPIKE_MIN_DEGREES
    assert max(rot[5:RANK1_SPIKE_AT]) < CALM_MAX_DEGREES  # after the first factors settle


def test_rank1_spike_is_normalized_away_by_kl_shampoo():
    rot = rank1_rotations(use_kl_shampoo=True)
    assert max(rot[1:]) < KL_SPIKE_MAX_DEGREES


# ---- skips, checkpoints, schedules -------------------------------------------------------------
def _grads(steps, shape=(12, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_step_keeps_state_and_training_resumes(bad):
    grads = _grads(4)
    p = torch.nn.Parameter(torch.ones(12, 8))
    opt = SOAP([("w", p)], lr=0.1)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    before_p, before_state = p.detach().clone(), copy.deepcopy(opt.state[p])
    poisoned = grads[2].clone()
    poisoned[3, 4] = bad
    p.grad = poisoned
    opt.step()
    assert torch.equal(p.detach(), before_p)
    for key in STATE_KEYS:
        assert torch.equal(opt.state[p][key], before_state[key]), key
    assert opt.health()["w"]["nonfinite_skips"] == 1.0
    p.grad = grads[3].clone()
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before_p)
    assert int(opt.state[p]["step"]) == 3


# A finite gradient whose squares overflow the state's dtype (float32: entries of ~1e19) would
# make a factor or the second moments Inf, and a refresh of an Inf factor raises: such a step is
# skipped and counted like a non-finite one. KL-Shampoo divides by dim * eps along directions a
# factor has not seen yet (L is 12x12 of rank 8 after one 12x8 gradient), so there 1e17 is
# already too much; it is refused after its new factors are checked (gradient_fits: None).
OVERFLOW_CASES = {
    "QR": ({}, 1e20),
    "eigh": ({"use_eigh": True}, 1e20),
    "between refreshes": ({"precondition_frequency": 3}, 1e20),
    "one-sided": ({"max_precond_dim": 10}, 1e20),
    "no factor": ({"max_precond_dim": 0}, 1e20),  # Adam alone: its second moments
    "KL": ({"use_kl_shampoo": True}, 1e17),
}


@pytest.mark.parametrize("case", OVERFLOW_CASES)
def test_gradient_whose_squares_overflow_is_skipped_and_training_resumes_unchanged(case):
    kwargs, scale = OVERFLOW_CASES[case]
    grads = _grads(4)
    runs = [torch.nn.Parameter(torch.ones(12, 8)) for _ in range(2)]
    (p, opt), (ref_p, ref) = [(q, SOAP([("w", q)], lr=0.1, **kwargs)) for q in runs]
    p.grad, ref_p.grad = grads[0].clone(), grads[0].clone()
    opt.step()
    ref.step()
    before_p, before_state = p.detach().clone(), copy.deepcopy(opt.state[p])
    huge = grads[1] * scale
    assert torch.isfinite(huge).all()
    cfg = SoapConfig(**{k: opt.param_groups[0][k] for k in SoapConfig.__dataclass_fields__})
    fits = gradient_fits(torch.linalg.vector_norm(huge).item(), (12, 8), cfg, torch.float32)
    assert fits is (None if kwargs.get("use_kl_shampoo") else False)
    p.grad = huge
    opt.step()
    assert torch.equal(p.detach(), before_p)
    for key in STATE_KEYS:
        assert torch.equal(opt.state[p][key], before_state[key]), key
    health = opt.health()["w"]
    assert health["nonfinite_skips"] == 1.0
    assert all(math.isfinite(v) for v in health.values()), health
    for g in grads[2:]:  # as if the huge gradient had never come
        p.grad, ref_p.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(p.detach(), ref_p.detach())


def test_kl_shampoo_takes_a_large_gradient_its_factors_can_hold():
    """Past the static bound (gradient_fits: None), but the factors' quotients are ~1e33: the
    whitened terms are small, the check of the new factors lets the step through."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.zeros(8, 8))
    opt = SOAP([("w", p)], lr=0.1, use_kl_shampoo=True)
    p.grad = torch.randn(8, 8, generator=gen) * 1e12
    opt.step()
    big = torch.randn(8, 8, generator=gen) * 1e16
    cfg = SoapConfig(**{k: opt.param_groups[0][k] for k in SoapConfig.__dataclass_fields__})
    assert gradient_fits(torch.linalg.vector_norm(big).item(), (8, 8), cfg, torch.float32) is None
    before = p.detach().clone()
    p.grad = big
    opt.step()
    assert opt.health()["w"]["nonfinite_skips"] == 0.0
    assert int(opt.state[p]["step"]) == 2 and not torch.equal(p.detach(), before)
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())


FUZZ_CONFIGS = [{}, {"use_eigh": True}, {"use_kl_shampoo": True},
                {"use_kl_shampoo": True, "use_eigh": True}, {"precondition_frequency": 3},
                {"precondition_frequency": 3, "use_kl_shampoo": True}, {"max_precond_dim": 6},
                {"max_precond_dim": 6, "use_kl_shampoo": True}, {"fp32_matmul_prec": "medium"},
                {"use_kl_shampoo": True, "eps": 1e-30},
                {"use_kl_shampoo": True, "correct_bias": False, "shampoo_beta": 0.999}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_finite_gradient_makes_state_parameters_or_health_non_finite(dtype):
    """Gradients of every magnitude the dtype holds (full rank and rank one), through every
    configuration: a step is taken or skipped, never raises, and leaves everything finite."""
    rng = random.Random(0)
    top = math.log10(torch.finfo(dtype).max) - 1
    taken_above_1e15 = skipped = 0
    for trial in range(60):
        cfg = rng.choice(FUZZ_CONFIGS)
        shape = rng.choice([(8, 4), (4, 8), (12, 12), (10, 3)])
        gen = torch.Generator().manual_seed(trial)
        p = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=dtype))
        opt = SOAP([("w", p)], lr=1e-3, **cfg)
        for _ in range(6):
            scale = 10 ** rng.uniform(-3, top)
            g = torch.randn(*shape, generator=gen, dtype=dtype)
            if rng.random() < 0.3:
                g = torch.outer(g[:, 0], g[0])
            g = g * scale
            if not torch.isfinite(g).all():
                continue
            before = int(opt.state[p]["step"]) if opt.state[p] else 0
            p.grad = g
            opt.step()
            taken = int(opt.state[p]["step"]) > before
            taken_above_1e15 += taken and scale > 1e15
            skipped += not taken
            health = opt.health()["w"]
            assert all(math.isfinite(v) for v in health.values()), (trial, cfg, scale, health)
            assert torch.isfinite(p).all(), (trial, cfg, scale)
            for key, value in opt.state[p].items():
                assert torch.isfinite(value).all(), (trial, cfg, scale, key)
    assert taken_above_1e15 > 0 and skipped > 0  # both outcomes were exercised


def test_state_dict_round_trip_continues_identically():
    grads = _grads(6)
    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = SOAP([p], lr=0.05, use_kl_shampoo=True, precondition_frequency=2)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    assert set(opt.state[p]) == STATE_KEYS
    saved, saved_p = copy.deepcopy(opt.state_dict()), p.detach().clone()
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(saved_p.clone())
    resumed = SOAP([q], lr=0.05, use_kl_shampoo=True, precondition_frequency=2)
    resumed.load_state_dict(saved)
    for g in grads[3:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(q.detach(), p.detach())


@pytest.mark.parametrize("frequency", [4, 10])
def test_the_refresh_schedule_holds_past_two_to_the_24_steps(frequency):
    # a float32 step counter stopped at 2^24 = 16,777,216: with f = 10 the bases were never
    # refreshed again, with f = 4 refreshed at every step
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = SOAP([p], lr=0.01, precondition_frequency=frequency, health_every=0)
    p.grad = torch.randn(8, 6)
    opt.step()
    start = 2**24 - 4  # what a run holds after ~16.8 M steps
    opt.state[p]["step"].fill_(start)
    refreshed = []
    for t in range(start + 1, start + 25):
        before = opt.state[p]["Q_L"].clone()
        p.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(t))
        opt.step()
        assert int(opt.state[p]["step"]) == t
        if not torch.equal(before, opt.state[p]["Q_L"]):
            refreshed.append(t)
    assert refreshed == [t for t in range(start + 1, start + 25) if (t - 1) % frequency == 0]


def test_a_checkpoint_with_a_float32_step_counter_loads_as_float64():
    # checkpoints written before the counter was float64 keep resuming
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = SOAP([p], lr=0.01)
    p.grad = torch.randn(8, 6)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = saved["state"][0]["step"].float()
    resumed = SOAP([torch.nn.Parameter(p.detach().clone())], lr=0.01)
    resumed.load_state_dict(saved)
    step = next(iter(resumed.state.values()))["step"]
    assert step.dtype == torch.float64 and float(step) == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_state_dict_round_trip_keeps_the_state_dtype_of_a_bf16_or_float64_matrix(dtype):
    # torch's load_state_dict casts state to the parameter's dtype: a bf16 matrix's float32
    # factors came back as bf16 and the next step raised on the dtype mismatch
    grads = [g.to(dtype) for g in _grads(6)]
    p = torch.nn.Parameter(torch.randn(12, 8, dtype=dtype))
    opt = SOAP([p], lr=0.05, precondition_frequency=2)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved, saved_p = copy.deepcopy(opt.state_dict()), p.detach().clone()
    wide = torch.promote_types(dtype, torch.float32)
    q = torch.nn.Parameter(saved_p.clone())
    resumed = SOAP([q], lr=0.05, precondition_frequency=2)
    resumed.load_state_dict(saved)
    for key, value in resumed.state[q].items():
        assert value.dtype == opt.state[p][key].dtype == (torch.float64 if key == "step"
                                                          else wide), key
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(q.detach(), p.detach())


@pytest.mark.parametrize("use_eigh", [True, False])
def test_a_restored_state_in_row_major_layout_continues_identically(use_eigh):
    """A checkpoint (DCP) restores every tensor row-major. If the live state held another layout
    (LAPACK returns eigenvectors column-major), BLAS could round the next products differently,
    and SOAP amplifies last-bit differences where exp_avg_sq is ~0: a (3, 8) gradient leaves
    R's null space unvisited, where a 1e-7 difference became a 2.5e-3 update difference."""
    grads = [torch.randn(3, 8, generator=torch.Generator().manual_seed(t)) for t in range(5)]
    p = torch.nn.Parameter(torch.randn(3, 8))
    q = torch.nn.Parameter(p.detach().clone())
    kw = {"lr": 3e-3, "use_kl_shampoo": True, "use_eigh": use_eigh}
    live, resumed = SOAP([p], **kw), SOAP([q], **kw)
    for g in grads[:3]:
        p.grad = g.clone()
        live.step()
    for key, value in live.state[p].items():
        assert value.is_contiguous(), key
    state = copy.deepcopy(live.state_dict())
    state["state"] = {i: {k: v.contiguous() for k, v in st.items()}
                      for i, st in state["state"].items()}  # fmt: skip
    q.data.copy_(p.detach())
    resumed.load_state_dict(state)
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        live.step()
        resumed.step()
    assert torch.equal(q.detach(), p.detach())


def test_lr_scheduler_drives_the_group_lr():
    p = torch.nn.Parameter(torch.randn(12, 8))
    opt = SOAP([p], lr=0.1, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for g in _grads(3):
        p.grad = g
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5**3  # halvings: exact
    p.grad = torch.randn(12, 8)
    before = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert torch.equal(p.detach(), before)


def test_named_parameters_with_an_adamw_group_and_bf16_matrix():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4, bias=False))
    model[1].to(torch.bfloat16)
    named = dict(model.named_parameters())
    opt = SOAP([{"params": [("0.weight", named["0.weight"]), ("1.weight", named["1.weight"])]},
                {"params": [("0.bias", named["0.bias"])], "algorithm": "adamw"}], lr=0.01)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.health()) == {"0.weight", "1.weight"}
    assert opt.state[named["1.weight"]]["L"].dtype == torch.float32
    assert set(opt.state[named["0.bias"]]) == {"step", "exp_avg", "exp_avg_sq"}


# ---- structure of the state --------------------------------------------------------------------
# Rayleigh quotients of eigh's float32 eigenvectors against its eigenvalues: ~d eps of the
# largest eigenvalue (measured below 1e-6 relative on 24x16 factors); 10x room. Adjacent
# quotients of the 20x12 run below are >= 0.97% of the largest apart, far above it.
QUOTIENT_EIGH_RTOL = 1e-5


def test_eigh_columns_are_in_descending_eigenvalue_order():
    p = torch.nn.Parameter(torch.zeros(20, 12))
    opt = SOAP([p], lr=0.1, use_eigh=True)
    for g in _grads(3, (20, 12)):
        p.grad = g
        opt.step()
    for f, q in (("L", "Q_L"), ("R", "Q_R")):
        lam = torch.diagonal(opt.state[p][q].T @ opt.state[p][f] @ opt.state[p][q])
        assert (lam[:-1] >= lam[1:] - QUOTIENT_EIGH_RTOL * lam[0]).all()


def test_dimension_above_max_precond_dim_gets_no_factor_and_no_health():
    p = torch.nn.Parameter(torch.zeros(12, 40))
    opt = SOAP([("w", p)], lr=0.1, max_precond_dim=32)
    p.grad = torch.randn(12, 40)
    opt.step()
    state = opt.state[p]
    assert set(state) == STATE_KEYS
    assert state["R"].shape == (0, 0) and state["Q_R"].shape == (0, 0)
    assert state["L"].shape == (12, 12)
    health = opt.health()["w"]
    assert "eigengap_ratio_L" in health and "eigengap_ratio_R" not in health


def test_the_state_summary_reports_the_bases_top_quotients_without_an_eigendecomposition(
        monkeypatch):
    # orthoshard.telemetry's summary for the state API: an eigvalsh per factor cost 1 s at
    # d = 2048 (measured; it grows as d^3) every few steps; the quotients of the basis's leading
    # columns cost 8 d^2 and equal the eigenvalues right after an eigh refresh
    from orthoshard.telemetry import optimizer_summary

    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(24, 16, generator=g))
    opt = SOAP([("w", w)], lr=1e-3, use_eigh=True)  # refreshes by eigh every step
    for _ in range(3):
        w.grad = torch.randn(24, 16, generator=g)
        opt.step()
    want = {f: torch.linalg.eigvalsh(opt.state[w][f]).flip(0)[:8].tolist() for f in ("L", "R")}
    monkeypatch.setattr(torch.linalg, "eigvalsh", None)  # the summary must not decompose
    monkeypatch.setattr(torch.linalg, "eigh", None)
    got = optimizer_summary(opt, rank=0)["state"]["w"]["eigenvalues"]
    assert got.keys() == {"L", "R"} and all(len(v) == 8 for v in got.values())
    for factor, values in want.items():
        assert got[factor] == sorted(got[factor], reverse=True)
        assert got[factor] == pytest.approx(values, rel=QUOTIENT_EIGH_RTOL,
                                            abs=QUOTIENT_EIGH_RTOL * values[0])


def test_health_lists_every_metric_for_a_two_sided_matrix():
    p = torch.nn.Parameter(torch.zeros(12, 8))
    opt = SOAP([("w", p)], lr=0.1)
    for g in _grads(2):
        p.grad = g
        opt.step()
    expected = {f"{m}_{s}" for m in ("eigengap_ratio", "basis_staleness") for s in "LR"} | {
        f"rotation_degrees_{s}_k{k}" for s in "LR" for k in (1, 8)} | {"nonfinite_skips"}
    assert set(opt.health()["w"]) == expected
    assert all(isinstance(v, float) for v in opt.health()["w"].values())


# ---- health: one batched computation, checked against optim.health's reference functions ------
# Angles of float64 inputs: arcsin/arccos of float64 values, ~1e-13 degrees (as test_health.py).
ANGLE64_ATOL_DEG = 1e-9
# SOAP reads the first columns' angle off the 8-column problem, which assumes orthonormal
# columns (optim.health.principal_extremes); float32 bases are orthonormal to ~1e-7, which moves
# sin^2 by ~1e-7 relative against the direct formula: measured up to 8e-6 degrees here and
# 2.9e-5 over 30-step runs; 1e-4 is the bound test_health.py sets for any angle of float32 bases.
FIRST_COLUMN_FP32_ATOL_DEG = 1e-4
# basis_staleness forms B = Q^T F Q in float64; SOAP's staleness takes ||B||_F = ||F||_F and the
# fp32 Rayleigh quotients, whose rounding puts a floor of ~1e-3 under it (docs/soap.md).
STALENESS_FP32_ATOL = 2e-3
# ... and in float64 a floor of ~sqrt(rows * 2^-52) ~ 1e-7 (the difference of squared norms).
STALENESS64_ATOL = 1e-6
# Relative part for staleness values up to 0.35, a float64 ratio of norms (measured 2e-15); it
# never binds next to STALENESS64_ATOL, which is larger for every staleness <= 1.
STALENESS64_RTOL = 1e-9
# The same float64 formulas on the same inputs, one matrix or a batch of them: bit-identical here
# (measured 0), but a batched reduction may sum in another order: ~1e-16 per operation on O(1)
# values, and 1e-12 leaves 1e4x that. The absolute part covers values at or near 0 (angles of
# unturned bases).
SAME_FLOAT64_RTOL = 1e-12
SAME_FLOAT64_ATOL = 1e-12
# A one-row side's eigengap is exactly 0 (measured 0): a few float64 ulps of 1 at most.
ZERO_GAP_ATOL = 1e-15


def _orthonormal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].to(dtype)


def _turned(Q: torch.Tensor, turns: list[tuple[int, int, float]]) -> torch.Tensor:
    """Q with column i turned by ``degrees`` towards column j, for each (i, j, degrees)."""
    out = Q.clone()
    for i, j, degrees in turns:
        t = math.radians(degrees)
        ci, cj = out[:, i].clone(), out[:, j].clone()
        out[:, i] = math.cos(t) * ci + math.sin(t) * cj
        out[:, j] = -math.sin(t) * ci + math.cos(t) * cj
    return out


# (rows, turns, expected k=1 and k=8 degrees): tiny, large, near-90 and exactly-90 angles, a
# column swap inside the top 8, k < 8 and k = 1, on bases of five row counts (zero-padded)
HEALTH_CASES = [
    (16, [(0, 9, 1e-3), (3, 12, 35.0)], 1e-3, 35.0),
    (10, [(1, 9, 50.0)], 0.0, 50.0),
    (12, [(0, 10, 90.0 - 1e-5)], 90.0 - 1e-5, 90.0 - 1e-5),
    (12, [(0, 1, 90.0)], 90.0, 0.0),
    (5, [(0, 4, 1e-6), (1, 3, 70.0)], 1e-6, 0.0),  # k = 5 = all columns: the span is fixed
    (1, [], 0.0, 0.0),
]


def test_eigengap_stays_in_its_range_when_rounding_turns_the_second_eigenvalue_negative():
    # a positive semi-definite factor's second eigenvalue below 0 is rounding: it read 1.5
    # ("more than rank one"), here and in eigengap_ratio
    factor = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    eigvals = torch.tensor([-0.5, 1.0], dtype=torch.float64)  # any order
    side = SideHealth("L", eigvals, None, torch.diagonal(factor), None, None, factor)
    _, values, finish = soap_health([[side]])
    (row,) = finish(values.tolist())
    assert row[0] == 1.0 == eigengap_ratio(torch.tensor([1.0, -0.5])).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_health_equals_the_reference_functions_on_mixed_lengths_and_extreme_cases(dtype):
    sides, expected = [], []
    for seed, (rows, turns, k1, k8) in enumerate(HEALTH_CASES):
        Q_old = _orthonormal(rows, seed, dtype)
        Q_new = -_turned(Q_old, turns) if rows == 1 else _turned(Q_old, turns)  # a sign flip
        spectrum = torch.linspace(float(rows), 1.0, rows, dtype=dtype) ** 2
        factor = Q_new @ torch.diag(spectrum) @ Q_new.mT
        quotients = (Q_old * (factor @ Q_old)).sum(0)
        eigvals = spectrum[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))]
        sides.append(SideHealth("L", eigvals, _frobenius(factor), quotients, Q_old, Q_new, factor))
        rot = rotation_angles_degrees(Q_old, Q_new, (1, 8))
        gap = eigengap_ratio(spectrum.double()).item()  # rows 1: rank one (read 0 before)
        expected.append((gap, rot[0].item(), rot[1].item(),
                         basis_staleness(Q_old.double(), factor.double()).item(), k1, k8))
    keys, values, finish = soap_health([[side] for side in sides])
    assert values.dtype == torch.float64 and values.ndim == 1
    rows_out = finish(values.tolist())
    for key, row, (gap, rot1, rot8, stale, k1, k8) in zip(keys, rows_out, expected, strict=True):
        assert key == ("eigengap_ratio_L", "rotation_degrees_L_k1", "rotation_degrees_L_k8",
                       "basis_staleness_L")
        assert row[0] == pytest.approx(gap, rel=SAME_FLOAT64_RTOL, abs=ZERO_GAP_ATOL)
        first_atol = ANGLE64_ATOL_DEG if dtype == torch.float64 else FIRST_COLUMN_FP32_ATOL_DEG
        assert row[1] == pytest.approx(rot1, abs=first_atol)
        assert row[2] == pytest.approx(rot8, abs=ANGLE64_ATOL_DEG)
        if dtype == torch.float64:
            assert row[1] == pytest.approx(k1, abs=ANGLE64_ATOL_DEG)
            assert row[2] == pytest.approx(k8, abs=ANGLE64_ATOL_DEG)
            # sqrt(1 - ||diag B||^2 / ||F||^2) cancels: float64 floor ~sqrt(rows * 2^-52)
            assert row[3] == pytest.approx(stale, rel=STALENESS64_RTOL, abs=STALENESS64_ATOL)


# 136x16: L has more entries than _BATCHED_NORM_MAX (its norm is taken inside the step), R not
@pytest.mark.parametrize("shape", [(24, 16), (136, 16)])
@pytest.mark.parametrize("use_eigh", [False, True])
def test_soap_health_matches_the_reference_functions_on_the_stored_state(use_eigh, shape):
    assert shape[0] ** 2 > _BATCHED_NORM_MAX or shape == (24, 16)
    p = torch.nn.Parameter(torch.zeros(*shape))
    opt = SOAP([("w", p)], lr=0.01, use_eigh=use_eigh)
    for t, g in enumerate(_grads(6, shape)):
        old = {s: opt.state[p][f"Q_{s}"].clone() for s in "LR"} if t else {}
        p.grad = g
        opt.step()
        health = opt.health()["w"]
        for s in "LR" if t else ():
            new, factor = opt.state[p][f"Q_{s}"], opt.state[p][s]
            rot = rotation_angles_degrees(old[s], new, (1, 8))
            assert health[f"rotation_degrees_{s}_k1"] == pytest.approx(
                rot[0].item(), abs=FIRST_COLUMN_FP32_ATOL_DEG)  # fp32 state
            assert health[f"rotation_degrees_{s}_k8"] == pytest.approx(rot[1].item(),
                                                                       abs=ANGLE64_ATOL_DEG)
            assert health[f"basis_staleness_{s}"] == pytest.approx(
                basis_staleness(old[s].double(), factor.double()).item(), abs=STALENESS_FP32_ATOL)
            if use_eigh:  # the same fp32 eigh of the same factor
                gap = eigengap_ratio(torch.linalg.eigh(factor)[0].flip(-1).double()).item()
                assert health[f"eigengap_ratio_{s}"] == pytest.approx(gap, rel=SAME_FLOAT64_RTOL)


# (rank of the factor, turns of the new basis, expected k1 and k8): k8 reads the top
# min(8, rank) columns, k1 needs rank >= 1 (an angle of 1e-6 degrees is reported to ~1e-9)
RANK_CASES = [
    (0, [(0, 9, 30.0), (2, 12, 60.0)], 0.0, 0.0),
    (1, [(0, 9, 30.0), (2, 12, 60.0)], 30.0, 30.0),
    (3, [(0, 9, 30.0), (2, 12, 60.0), (4, 13, 80.0)], 30.0, 60.0),
    (3, [(1, 2, 40.0), (5, 14, 80.0)], 0.0, 0.0),  # a turn within the top 3: the span holds
    (5, [(3, 11, 1e-6), (6, 12, 89.0)], 0.0, 1e-6),
    (8, [(3, 11, 1e-6), (6, 12, 89.0)], 0.0, 89.0),
    (16, [(7, 12, 45.0), (9, 13, 89.0)], 0.0, 45.0),
]


@pytest.mark.parametrize("rank, turns, k1, k8", RANK_CASES)
def test_rotations_read_within_the_factors_numerical_rank(rank, turns, k1, k8):
    """A factor of rank r < 8 (gradients confined to r directions) leaves its basis's other
    columns spanning directions no gradient reached, where a refresh may turn them anyhow (QR
    completes a rank-deficient product arbitrarily): k8 reads the top r columns, and a zero
    factor reads no rotation at all."""
    rows = 16
    Q_old = _orthonormal(rows, rank)
    Q_new = _turned(Q_old, turns)
    # the rank's eigenvalues descending, the rest under the rank rule's 16 * eps * 4 = 1.4e-14
    spectrum = torch.cat([torch.linspace(4.0, 1.0, rank, dtype=torch.float64),
                          torch.full((rows - rank,), 1e-15 if rank else 0.0, dtype=torch.float64)])
    factor = Q_new @ torch.diag(spectrum) @ Q_new.mT
    quotients = (Q_old * (factor @ Q_old)).sum(0)
    side = SideHealth("L", spectrum.flip(0), _frobenius(factor), quotients, Q_old, Q_new, factor)
    _, values, finish = soap_health([[side]])
    (row,) = finish(values.tolist())
    assert row[1] == pytest.approx(k1, abs=ANGLE64_ATOL_DEG)
    assert row[2] == pytest.approx(k8, abs=ANGLE64_ATOL_DEG)
    if rank:  # the reference on the top min(8, rank) columns, as optim.health measures them
        top = min(8, rank)
        assert row[2] == pytest.approx(
            rotation_angles_degrees(Q_old[:, :top], Q_new[:, :top], (top,))[0].item(),
            abs=ANGLE64_ATOL_DEG)


@pytest.mark.parametrize("cfg", [{"precondition_frequency": 1}, {"precondition_frequency": 4},
                                 {"precondition_frequency": 4, "use_eigh": True},
                                 {"precondition_frequency": 4, "use_kl_shampoo": True}])
def test_a_low_rank_or_zero_gradient_reads_no_turn_of_directions_it_never_reached(cfg):
    """An expert no token reached (zero gradients) and a layer whose gradients span 3 fixed
    directions: their refreshes turn the unreached columns arbitrarily (measured: 90 degrees
    at the first power-iteration refresh of a zero factor, 76-89 degrees for a rank-3 one's
    top 8 on every refresh), which health must not report as a rotation."""
    shape = (32, 16)
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(shape[0], 3, generator=gen))[0]
    zero, low = (torch.nn.Parameter(torch.randn(*shape, generator=gen)) for _ in range(2))
    opt = SOAP([("zero", zero), ("low", low)], lr=0.01, **cfg)
    arbitrary = 0.0
    for _ in range(13):
        old = opt.state[low]["Q_L"].clone() if opt.state[low] else None
        zero.grad = torch.zeros(shape)
        low.grad = U @ torch.randn(3, shape[1], generator=gen)
        opt.step()
        health = opt.health()
        assert all(value == 0.0 for key, value in health["zero"].items()
                   if key.startswith("rotation_degrees"))
        assert health["low"]["rotation_degrees_L_k8"] < 1e-2  # the 3-dim span never moves
        if old is not None:
            arbitrary = max(arbitrary, rotation_angles_degrees(old, opt.state[low]["Q_L"],
                                                               (8,))[0].item())
    assert arbitrary > 45.0  # the unreached columns did turn: the case is exercised


# ---- health between refreshes: Rayleigh quotients carried from step to step ------------------
# Against a direct float64 Q^T F Q of the stored state the staleness keeps its float32 floor
# (STALENESS_FP32_ATOL); the carried quotients add ~1e-7 relative per step, and eigengaps from
# them agreed within 5.7e-7 - 6.5e-7 over these configurations (by machine): 1e-5 is ~15x that.
EIGENGAP_CARRIED_ATOL = 1e-5
# ... unless a power step's new quotients were multiplied in bf16 (BF16_QUOTIENTS): measured
# up to 1.3e-3 at these 24- and 16-long sides, where bf16 rounding weighs most (the quotients'
# error shrinks with the side: test_power_step_quotients_in_bf16_from_the_old_quotients_...);
# 4e-3 is ~3x that, about one bf16 rounding (2^-8) of a gap near 1.
EIGENGAP_BF16_ATOL = 4e-3
CARRIED_CONFIGS = {
    "QR every step": {"precondition_frequency": 1},
    "QR": {"precondition_frequency": 4},
    "QR, 2 power steps": {"precondition_frequency": 4, "power_iter_steps": 2},
    "eigh": {"precondition_frequency": 4, "use_eigh": True},
    "KL": {"precondition_frequency": 3, "use_kl_shampoo": True},
    "KL-eigh": {"precondition_frequency": 3, "use_kl_shampoo": True, "use_eigh": True},
    "one-sided": {"precondition_frequency": 3, "max_precond_dim": 20},
    "one-sided-KL": {"precondition_frequency": 3, "max_precond_dim": 20, "use_kl_shampoo": True},
}


def _spiky_grads(steps, shape=(24, 16), seed=1):
    """Noise plus a rank-1 signal: a spectrum with real gaps (and L rank-deficient at 24x16)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen)
            + 2.0 * torch.outer(torch.randn(shape[0], generator=gen),
                                torch.randn(shape[1], generator=gen)) for _ in range(steps)]


def _check_against_stored_state(opt, p, health, basis_before, refreshed, *,
                                eigengap_atol=EIGENGAP_CARRIED_ATOL):
    for s in "LR":
        factor = opt.state[p][s]
        if factor.numel() == 0:
            assert f"basis_staleness_{s}" not in health
            continue
        Q = basis_before[s].double()
        assert health[f"basis_staleness_{s}"] == pytest.approx(
            basis_staleness(Q, factor.double()).item(), abs=STALENESS_FP32_ATOL)
        if not refreshed:  # the eigengap of the current basis's quotients
            quotients = torch.diagonal(Q.mT @ factor.double() @ Q).sort(descending=True).values
            assert health[f"eigengap_ratio_{s}"] == pytest.approx(
                eigengap_ratio(quotients).item(), abs=eigengap_atol)


def _counting_products(monkeypatch):
    """Count the F Q products (``_rayleigh``) and the half products of a power step's
    quotients (``power_step_quotients``) soap_step makes: ``calls[0]``, ``calls[1]``."""
    import optim._soap_basis as soap_basis
    import optim._soap_step as soap_step_module
    calls = [0, 0]
    for i, name in enumerate(("_rayleigh", "power_step_quotients")):
        original = getattr(soap_basis, name)

        def counted(*args, _i=i, _original=original, **kwargs):
            calls[_i] += 1
            return _original(*args, **kwargs)

        # wherever the name is looked up: soap_step's module imports _rayleigh too
        for module in (soap_basis, soap_step_module):
            if getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)
    return calls


def _rotation_flops(opt, p) -> int:
    """The matrix-product flops of a refresh's rotation angles: per side with a factor, three
    products of the first ``k = min(8, d)`` columns of two ``d``-long bases (``k x d`` by
    ``d x k``), the ``k^2`` Grams and overlaps of ``optim.health.principal_extremes``."""
    sides = [opt.state[p][f"Q_{s}"].shape[0] for s in "LR" if opt.state[p][f"Q_{s}"].numel()]
    return sum(3 * 2 * min(8, d) ** 2 * d for d in sides)


def _with_and_without_health(cfg, every, steps, monkeypatch):
    """Step SOAP(health_every=every) and SOAP(health_every=0) on the same gradients; yield
    ``(t, optimizer, param, bases before the step, (F Q products, half products) only health
    made, matrix-product flops only health made)``. The flops are torch's own count of every
    mm / bmm / addmm / baddbmm the step and ``health()`` ran (``FlopCounterMode``), so a
    product made some other way than the two counted helpers shows there."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = _counting_products(monkeypatch)
    runs = []
    for health_every in (every, 0):
        p = torch.nn.Parameter(torch.zeros(24, 16))
        runs.append((p, SOAP([("w", p)], lr=0.01, health_every=health_every, **cfg)))
    (p, opt), (p_off, opt_off) = runs
    for t, g in enumerate(_spiky_grads(steps)):
        before = {s: opt.state[p][f"Q_{s}"].clone() for s in "LR"} if t else {}
        p.grad, p_off.grad = g.clone(), g.clone()
        flops = []
        counts = []
        for o in (opt, opt_off):
            calls[:] = [0, 0]
            with FlopCounterMode(display=False) as counter:
                o.step()
                o.health()
            flops.append(counter.get_total_flops())
            counts.append(list(calls))
        yield (t, opt, p, before, (counts[0][0] - counts[1][0], counts[0][1] - counts[1][1]),
               flops[0] - flops[1])


@pytest.mark.parametrize("route", ["half product", "bf16 half product", "product"])
@pytest.mark.parametrize("cfg", CARRIED_CONFIGS.values(), ids=CARRIED_CONFIGS.keys())
def test_health_between_refreshes_matches_the_stored_state_without_extra_products(
        cfg, route, monkeypatch):
    import optim._soap_basis as soap_basis
    # the sides here (24, 16) are below the size where the half product pays: force it to
    # check its values on every configuration too, in float32 and (after one power step) in
    # bf16 from the old quotients, whichever this machine would choose
    half_product = route != "product"
    if half_product:
        monkeypatch.setattr(soap_basis, "HALF_PRODUCT_FROM", 0)
    monkeypatch.setattr(soap_basis, "BF16_QUOTIENTS", route == "bf16 half product")
    assert (24 >= soap_basis.HALF_PRODUCT_FROM) == half_product
    bf16 = route == "bf16 half product" and cfg.get("power_iter_steps", 1) == 1
    freq = cfg["precondition_frequency"]
    for t, opt, p, before, extra, flops in _with_and_without_health(cfg, 1, 14, monkeypatch):
        if t:
            _check_against_stored_state(opt, p, opt.health()["w"], before, t % freq == 0,
                                        eigengap_atol=EIGENGAP_BF16_ATOL if bf16
                                        else EIGENGAP_CARRIED_ATOL)
        if t % freq:  # between refreshes health multiplies no matrices at all
            assert flops == 0, (t, flops)
        # no F Q product for health between refreshes, ever; at a power-iteration refresh
        # followed by steps without one, half a product (or on a small side one product) per
        # side whose quotients KL-Shampoo's own whitening will not supply at the next step
        # (refreshing every step needs none: each refresh reads its old basis's quotients off
        # its own product)
        power_refresh = t % freq == 0 and not cfg.get("use_eigh") and t > 0 and freq > 1
        sides = sum(opt.state[p][s].numel() > 0 for s in "LR")
        if cfg.get("use_kl_shampoo") and sides == 2:
            sides = 0
        expected = (0, sides) if half_product else (sides, 0)
        assert extra == (expected if power_refresh else (0, 0)), (t, extra)


# Factors of large but trainable gradients: plain SOAP's entries pass 1e19 with gradients of
# ~1e9, KL-Shampoo's with gradients of ~1e6 (it divides by dim * eps where a factor is ~0). The
# rows' sums of squares then overflow float32 although the factor is finite.
LARGE_FACTOR_CASES = {"QR": ({"precondition_frequency": 3}, 1e9),
                      "KL": ({"precondition_frequency": 3, "use_kl_shampoo": True}, 1e6),
                      "KL 136x16": ({"use_kl_shampoo": True, "shape": (136, 16)}, 1e6)}


@pytest.mark.parametrize("case", LARGE_FACTOR_CASES)
def test_staleness_of_factors_past_float32_squares_matches_the_stored_state(case):
    cfg, scale = LARGE_FACTOR_CASES[case]
    cfg = dict(cfg)
    shape = cfg.pop("shape", (24, 16))
    p = torch.nn.Parameter(torch.zeros(*shape))
    opt = SOAP([("w", p)], lr=0.01, **cfg)
    overflowed = 0
    for t, g in enumerate(_spiky_grads(7, shape)):
        before = {s: opt.state[p][f"Q_{s}"].clone() for s in "LR"} if t else {}
        p.grad = g * scale
        opt.step()
        health = opt.health()["w"]
        assert all(math.isfinite(v) for v in health.values()), (t, health)
        overflowed += any(not torch.isfinite(torch.linalg.vector_norm(opt.state[p][s], dim=-1))
                          .all() for s in "LR")
        if t:
            _check_against_stored_state(opt, p, health, before,
                                        t % cfg.get("precondition_frequency", 1) == 0)
    assert overflowed  # the case reaches the float64 fallback


# float64 sums of d <= 130 products: ~d * 1.1e-16 = 1.4e-14 of the largest quotient at worst
# (measured 6.5e-16); 1e-12 is 70x the worst case.
QUOTIENT64_RTOL = 1e-12


def _power_step(d, *, warm, seed, dtype=torch.float64):
    """A factor F, an old basis (random, or the eigenbasis of a nearby factor), its Rayleigh
    quotients, and one power step F Q_prev = Q_new R as refresh_side takes it (geqrf's
    packing: Householder vectors below R's diagonal), with the direct diag(Q_new^T F Q_new)
    in float64."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(d, d // 2 + 3, generator=gen, dtype=dtype)
    F = G @ G.mT
    if warm:
        near = G + 0.05 * torch.randn(G.shape, generator=gen, dtype=dtype)
        Q_prev = torch.linalg.eigh(near @ near.mT)[1].flip(-1).contiguous()
    else:
        Q_prev = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dtype))[0]
    Y = F @ Q_prev
    packed, tau = torch.geqrf(Y)
    Q_new = torch.linalg.householder_product(packed, tau)
    direct = (Q_new.double() * (F.double() @ Q_new.double())).sum(0)
    return Q_prev, Q_new, packed, (Q_prev * Y).sum(0), direct


@pytest.mark.parametrize("route", ["diag(R M)", "old quotients"])
@pytest.mark.parametrize("leaf", [None, 3], ids=["default-leaf", "leaf-3"])
@pytest.mark.parametrize("d", [1, 7, 64, 130])
def test_power_step_quotients_equal_the_direct_rayleigh_quotients(d, leaf, route, monkeypatch):
    # F Q_prev = Q_new R makes Q_new^T F Q_new = R Q_prev^T Q_new exactly, and column i of
    # F Q_prev makes it lam_i plus terms of M's strict lower triangle; in float64 both equal
    # the direct diagonal to rounding (sizes that split into uneven halves, and a 1x1); leaves
    # of 3 columns take the halving several levels deep
    import optim._soap_basis as soap_basis
    if leaf is not None:
        monkeypatch.setattr(soap_basis, "_QUOTIENT_LEAF", leaf)
    Q_prev, Q_new, packed, lam, direct = _power_step(d, warm=False, seed=d)
    if d > 1:
        assert packed.tril(-1).abs().max() > 0.1  # what the quotients must not read
    old = lam if route == "old quotients" else None
    for r in (packed.triu(), packed):
        got = power_step_quotients(Q_prev, Q_new, r, old_quotients=old)
        assert torch.allclose(got, direct, rtol=0,
                              atol=QUOTIENT64_RTOL * direct.abs().max().item())


# bf16 products from the old quotients, against the direct float64 diagonal, relative to the
# largest quotient: measured <= 5.2e-4 from random old bases and <= 1.5e-5 from a nearby
# factor's eigenbasis (256; three seeds). 2e-3 is about one bf16 rounding (2^-9) of the top
# quotient itself; the warm bound 1e-4 is ~7x the measured one.
BF16_QUOTIENT_COLD_RTOL = 2e-3
BF16_QUOTIENT_WARM_RTOL = 1e-4


@pytest.mark.parametrize("warm", [False, True], ids=["random old basis", "nearby eigenbasis"])
def test_power_step_quotients_in_bf16_from_the_old_quotients_stay_close(warm):
    # Only M's strict lower triangle enters, as corrections to the old quotients: once the basis
    # has settled (the corrections are small) rounding the bases to bf16 moves the result far
    # less than it moves the whole diag(R M)
    for seed in range(3):
        Q_prev, Q_new, packed, lam, direct = _power_step(256, warm=warm, seed=seed,
                                                         dtype=torch.float32)
        scale = direct.abs().max().item()
        got = power_step_quotients(Q_prev, Q_new, packed, old_quotients=lam,
                                   dtype=torch.bfloat16)
        assert got.dtype == torch.float32
        error = (got.double() - direct).abs().max().item() / scale
        assert error < (BF16_QUOTIENT_WARM_RTOL if warm else BF16_QUOTIENT_COLD_RTOL)
        if warm:  # 43-69x better here (from random bases 1.8-2.7x: corrections are large)
            M = (Q_prev.mT.bfloat16() @ Q_new.bfloat16()).float()
            whole = ((packed.triu().mT * M).sum(0).double() - direct).abs().max().item() / scale
            assert error < whole / 10, (error, whole)
    with pytest.raises(ValueError, match="old quotients"):
        power_step_quotients(Q_prev, Q_new, packed, dtype=torch.bfloat16)


def test_bf16_quotients_by_default_only_on_long_sides_of_bf16_hardware(monkeypatch):
    import optim._soap_basis as soap_basis
    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(soap_basis, "_native_half_matmul",
                            lambda device, dtype, native=native: native)
        long_side = soap_basis.BF16_QUOTIENTS_FROM
        assert soap_basis.bf16_quotients(cpu, long_side) == native
        assert not soap_basis.bf16_quotients(cpu, long_side - 1)
        for forced in (False, True):  # forced either way at any length
            monkeypatch.setattr(soap_basis, "BF16_QUOTIENTS", forced)
            assert soap_basis.bf16_quotients(cpu, 16) == forced
            monkeypatch.setattr(soap_basis, "BF16_QUOTIENTS", None)


def test_bf16_quotients_serve_health_only(monkeypatch):
    # the new bases' quotients feed health between refreshes and nothing else: the parameters
    # and the whole state come out the same whichever precision multiplied them
    import optim._soap_basis as soap_basis
    monkeypatch.setattr(soap_basis, "HALF_PRODUCT_FROM", 0)
    runs = []
    for bf16 in (False, True):
        monkeypatch.setattr(soap_basis, "BF16_QUOTIENTS", bf16)
        p = torch.nn.Parameter(torch.zeros(24, 16))
        opt = SOAP([("w", p)], lr=0.01, precondition_frequency=3)
        healths = []
        for g in _spiky_grads(9):
            p.grad = g.clone()
            opt.step()
            healths.append(opt.health()["w"])
        runs.append((p.detach().clone(), opt.state_dict(), healths))
    (p32, state32, h32), (p16, state16, h16) = runs
    assert torch.equal(p32, p16)
    for key, value in state32["state"][0].items():
        assert torch.equal(value, state16["state"][0][key]), key
    # ... while the health steps between power refreshes did read the bf16 quotients
    assert any(a["eigengap_ratio_L"] != b["eigengap_ratio_L"]
               for a, b in zip(h32, h16, strict=True))


@pytest.mark.parametrize("cfg", [CARRIED_CONFIGS["eigh"], CARRIED_CONFIGS["KL"]],
                         ids=["eigh", "KL"])
def test_health_every_n_keeps_the_quotients_carried_between_health_steps(cfg, monkeypatch):
    # health every 3 steps, refresh every 3-4: the quotients are carried through the steps
    # without health, so no health step needs a product (eigh and KL start them for free)
    for t, opt, p, before, extra, flops in _with_and_without_health(cfg, 3, 13, monkeypatch):
        assert extra == (0, 0), t
        assert flops == 0 or t % cfg["precondition_frequency"] == 0, (t, flops)
        if t and t % 3 == 0:  # a health step (steps 1, 4, 7, ...: t = step - 1)
            refreshed = t % cfg["precondition_frequency"] == 0
            _check_against_stored_state(opt, p, opt.health()["w"], before, refreshed)


@pytest.mark.parametrize("cfg", [CARRIED_CONFIGS["QR"], CARRIED_CONFIGS["KL"],
                                 CARRIED_CONFIGS["one-sided"]], ids=["QR", "KL", "one-sided"])
@pytest.mark.parametrize("multiple", [1, 2])
def test_health_only_at_refreshes_carries_no_quotients(cfg, multiple, monkeypatch):
    # health_every a multiple of precondition_frequency: every health step is a refresh, whose
    # old basis's quotients come off its own product, so a power-iteration refresh starts no
    # carried quotients (no product or half product for health at any step) and the steps
    # between keep none (step 1's eigh keeps its eigenvalues, which cost nothing)
    every = multiple * cfg["precondition_frequency"]
    for t, opt, p, before, extra, flops in _with_and_without_health(cfg, every, 2 * every + 2,
                                                                    monkeypatch):
        assert extra == (0, 0), (t, extra)
        # nothing between health steps; at one (a refresh), only the rotations' products (step
        # 1 has no earlier basis to turn from)
        rotated = t > 0 and t % every == 0
        assert flops == (_rotation_flops(opt, p) if rotated else 0), (t, flops)
        assert (p in opt._quotients) == (t == 0), t
        if t and t % every == 0:  # a health step, and a refresh
            _check_against_stored_state(opt, p, opt.health()["w"], before, refreshed=True)


def test_a_skip_that_moves_the_refreshes_off_the_health_steps_starts_the_carried_quotients(
        monkeypatch):
    # health and refreshes every 3 steps coincide until a skipped step delays the matrix's own
    # count by one: from then on its health steps fall between its refreshes, and each is
    # measured from carried quotients (a product only where none are carried yet)
    calls = _counting_products(monkeypatch)
    p = torch.nn.Parameter(torch.zeros(24, 16))
    opt = SOAP([("w", p)], lr=0.01, precondition_frequency=3, health_every=3)
    products, between = [], 0
    for step, g in enumerate(_spiky_grads(17), start=1):  # the group's step
        grad = g.clone()
        if step == 5:
            grad[0, 0] = float("nan")
        t = int(opt.state[p]["step"]) + 1 if p in opt.state else 1  # the matrix's step
        before = {s: opt.state[p][f"Q_{s}"].clone() for s in "LR"} if t > 1 else {}
        p.grad = grad
        calls[:] = [0, 0]
        opt.step()
        if step == 5:
            assert int(opt.state[p]["step"]) == 4 and opt.health()["w"]["nonfinite_skips"] == 1
            continue
        if step > 1 and (step - 1) % 3 == 0:  # a health step
            refreshed = (t - 1) % 3 == 0
            _check_against_stored_state(opt, p, opt.health()["w"], before, refreshed)
            if not refreshed:
                between += 1
                products.append(calls[0])
    # group steps 7, 10, 13, 16 are the matrix's steps 6, 9, 12, 15; its refreshes come at 7,
    # 10, 13, 16. Step 6 has no carried quotients (none were started at its refresh at 4): one
    # product per side; then the refreshes start them
    assert between == 4 and products == [2, 0, 0, 0], products


def test_an_adamw_group_of_soap_refuses_betas():
    bias = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="sets 'betas'"):
        SOAP([{"params": [bias], "param_names": ["b"], "algorithm": "adamw",
               "betas": (0.5, 0.6)}], lr=0.1)


@pytest.mark.parametrize("every", [5, 10])
def test_health_every_a_multiple_of_the_refresh_period_measures_every_refresh(every):
    # measured at N, 2N, ... while refreshing at 1, f + 1, ..., the two never met: every
    # rotation read 0, through a spike too
    p = torch.nn.Parameter(torch.zeros(24, 16))
    opt = SOAP([("w", p)], lr=0.01, precondition_frequency=5, health_every=every)
    turns = []
    for t, g in enumerate(_spiky_grads(31)):
        p.grad = g
        opt.step()
        if t % every == 0 and t:  # a measured step (step t + 1), and a refresh step
            turns.append(opt.health()["w"]["rotation_degrees_L_k8"])
    assert len(turns) == 30 // every and all(turn > 0 for turn in turns), turns


def test_carried_quotients_survive_a_skipped_step_and_are_dropped_with_loaded_state():
    cfg = {"precondition_frequency": 5}
    grads, other = _spiky_grads(8), _spiky_grads(8, seed=2)
    p = torch.nn.Parameter(torch.zeros(24, 16))
    opt = SOAP([("w", p)], lr=0.01, **cfg)
    for g in grads[:3]:
        p.grad = g
        opt.step()
    poisoned = grads[3].clone()
    poisoned[0, 0] = float("nan")
    p.grad = poisoned
    opt.step()  # skipped: state and carried quotients stay at step 3
    before = {s: opt.state[p][f"Q_{s}"].clone() for s in "LR"}
    p.grad = grads[4]
    opt.step()
    _check_against_stored_state(opt, p, opt.health()["w"], before, refreshed=False)
    # another run's state at the same step number: quotients carried for this one must not
    # be applied to it
    q = torch.nn.Parameter(torch.zeros(24, 16))
    donor = SOAP([("w", q)], lr=0.01, **cfg)
    for g in other[:4]:
        q.grad = g
        donor.step()
    assert int(donor.state[q]["step"]) == int(opt.state[p]["step"]) == 4
    opt.load_state_dict(copy.deepcopy(donor.state_dict()))
    before = {s: opt.state[p][f"Q_{s}"].clone() for s in "LR"}
    p.grad = other[4]
    opt.step()
    _check_against_stored_state(opt, p, opt.health()["w"], before, refreshed=False)


def test_recorded_health_holds_no_tensor_of_the_step_until_it_is_read():
    p = torch.nn.Parameter(torch.zeros(12, 8))
    opt = SOAP([("w", p)], lr=0.1)
    grads = _grads(3)
    for g in grads[:2]:
        p.grad = g
        opt.step()
    basis = weakref.ref(opt.state[p]["Q_L"])
    p.grad = grads[2]
    opt.step()  # refreshes Q_L: the old basis is health's, and must not outlive the step
    gc.collect()
    assert basis() is None
    first, again = opt.health()["w"], opt.health()["w"]
    assert first == again and all(isinstance(v, float) for v in first.values())


# ---- fp32 matmul precision ---------------------------------------------------------------------
FP32_PRODUCT_MAX_ERR = 1e-4


def test_fp32_matmul_prec_really_changes_cpu_products_and_restores_the_global_mode():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
    exact = a.double() @ b.double()
    err = {prec: float((pmm(a, b, prec).double() - exact).abs().max())
           for prec in ("highest", "high", "medium")}
    # "highest": float32 dot products of 64 terms, measured 1.1e-5 off the float64 product;
    # "high" (bf16x3) 1.1e-2, "medium" (bf16) 0.1: the bound separates them by 10x each way
    assert err["highest"] < FP32_PRODUCT_MAX_ERR < err["high"] < err["medium"]
    # the block sets oneDNN's float32 products to IEEE on CPU (pmm has rounded the operands;
    # torch's "medium" lets oneDNN multiply float32 in bf16 where the CPU can) and restores
    # what was set before it, not torch's default, also when it raises
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        with matmul_precision("medium", a.device):
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        with pytest.raises(RuntimeError, match="inside"), matmul_precision("medium", a.device):
            raise RuntimeError("inside")
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("setting", ["generic", "cuda", "legacy"])
def test_soap_steps_under_any_matmul_precision_setting_and_leaves_it_as_set(setting):
    # torch.backends.fp32_precision = "tf32" (the per-backend settings torch's docs recommend)
    # makes torch.get_float32_matmul_precision() raise, and every SOAP step raised with it,
    # after the step counters had moved
    def read() -> tuple[str, str, str]:
        return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                torch.backends.mkldnn.matmul.fp32_precision)

    try:
        if setting == "generic":
            torch.backends.fp32_precision = "tf32"
        elif setting == "cuda":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("high")
        before = read()
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 6, generator=gen))
        opt = SOAP([w], lr=0.01, precondition_frequency=1, use_eigh=False)
        for _ in range(3):
            start = w.detach().clone()
            w.grad = torch.randn(8, 6, generator=gen)
            opt.step()
            assert not torch.equal(w, start)
        assert int(opt.state[w]["step"]) == 3 and read() == before
    finally:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"shampoo_beta": 1.5}, "shampoo_beta"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"fp32_matmul_prec": "tf32"}, "fp32_matmul_prec"),
    ({"qr_fp32_matmul_prec": "low"}, "qr_fp32_matmul_prec"),
    ({"power_iter_steps": 0}, "power_iter_steps"),
    ({"precondition_frequency": 1.5}, "precondition_frequency"),
    ({"max_precond_dim": -1}, "max_precond_dim"),
    ({"health_every": -1}, "health_every"),
    ({"max_update_rms": -1.0}, "max_update_rms"),
    ({"max_update_rms": math.inf}, "max_update_rms"),
    ({"max_update_rms": math.nan}, "max_update_rms"),
    ({"max_update_rms": "1"}, "max_update_rms"),
    ({"max_update_rms": True}, "max_update_rms"),
])
def test_bad_arguments_raise_value_errors_naming_the_argument(kwargs, fragment):
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        SOAP([torch.nn.Parameter(torch.zeros(4, 4))], **args)


def test_a_vector_in_a_soap_group_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="adamw"):
        SOAP([torch.nn.Parameter(torch.zeros(4))], lr=0.1)


# Shapes whose sides recur across (group, shape) batches, and one L above _BATCHED_NORM_MAX
MULTI_SHAPES = [(24, 16), (16, 24), (24, 16), (40, 16), (136, 16)]


@pytest.mark.parametrize("cfg", [{"precondition_frequency": 2},
                                 {"precondition_frequency": 3, "use_kl_shampoo": True}],
                         ids=["QR", "KL"])
def test_health_of_a_multi_shape_step_equals_each_matrix_measured_alone(cfg):
    # soap_health runs once per step over every batch; each matrix's numbers must be the ones
    # its own optimizer reports (refresh steps, steps between, and the first step)
    grads = [_spiky_grads(6, shape, seed=i) for i, shape in enumerate(MULTI_SHAPES)]
    params = [torch.nn.Parameter(torch.zeros(*shape)) for shape in MULTI_SHAPES]
    together = SOAP([(f"w{i}", p) for i, p in enumerate(params)], lr=0.01, **cfg)
    alone = [(q, SOAP([(f"w{i}", q)], lr=0.01, **cfg))
             for i, q in enumerate(torch.nn.Parameter(torch.zeros(*s)) for s in MULTI_SHAPES)]
    for t in range(6):
        for p, g in zip(params, grads, strict=True):
            p.grad = g[t].clone()
        together.step()
        health = together.health()
        assert sorted(health) == [f"w{i}" for i in range(len(MULTI_SHAPES))]
        for i, ((q, opt), g) in enumerate(zip(alone, grads, strict=True)):
            q.grad = g[t].clone()
            opt.step()
            # every reduction is row-wise or per matrix: the same numbers, batched or not
            assert health[f"w{i}"] == pytest.approx(opt.health()[f"w{i}"], rel=SAME_FLOAT64_RTOL,
                                                    abs=SAME_FLOAT64_ATOL)


def test_an_eigendecomposition_that_fails_skips_that_matrix_with_a_warning(monkeypatch):
    # raised on an owner, the error left every other rank waiting in the exchange; now the
    # matrix is skipped and counted like a non-finite update, and the others train
    real = torch.linalg.eigh

    def eigh(a, *args, **kwargs):
        if a.size(-1) == 24:  # the (24, 16) matrix's L, in float32 and in the float64 retry
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    a, b = torch.nn.Parameter(torch.zeros(24, 16)), torch.nn.Parameter(torch.zeros(8, 8))
    opt = SOAP([("a", a), ("b", b)], lr=0.01, use_eigh=True)
    grads = _spiky_grads(1)[0], _spiky_grads(1, shape=(8, 8))[0]
    a.grad, b.grad = grads
    with pytest.warns(RuntimeWarning, match="update of a failed.*converge") as caught:
        opt.step()
    assert [w.filename for w in caught] == [__file__]  # it points at the step() call
    assert torch.equal(a, torch.zeros(24, 16)) and not torch.equal(b, torch.zeros(8, 8))
    health = opt.health()
    assert health["a"]["nonfinite_skips"] == 1.0 and health["b"]["nonfinite_skips"] == 0.0
    assert int(opt.state[a]["step"]) == 0  # its state was left as it was


def test_a_failed_decomposition_skips_only_its_matrix_within_a_batch(monkeypatch):
    # Two matrices of one shape go through one batch. The failure of one skipped both before
    # (its batch-mates' updates were dropped with it); now each matrix's step is committed on
    # its own, so the other steps exactly as it would alone.
    real = torch.linalg.eigh
    marked = 1e4  # the failing matrix's gradient scale: its factor's trace is far above 1e6

    def eigh(f, *args, **kwargs):
        if float(f.diagonal(dim1=-2, dim2=-1).sum()) > 1e6:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    g_ok, g_bad = _spiky_grads(1, shape=(8, 8))[0], _spiky_grads(1, shape=(8, 8))[0] * marked
    a, b = torch.nn.Parameter(torch.ones(8, 8)), torch.nn.Parameter(torch.ones(8, 8))
    opt = SOAP([("a", a), ("b", b)], lr=0.01, use_eigh=True)
    a.grad, b.grad = g_ok.clone(), g_bad.clone()
    with pytest.warns(RuntimeWarning, match="update of b failed.*converge"):
        opt.step()
    alone = torch.nn.Parameter(torch.ones(8, 8))
    single = SOAP([("a", alone)], lr=0.01, use_eigh=True)
    alone.grad = g_ok.clone()
    single.step()
    assert torch.equal(a, alone)
    assert torch.equal(b, torch.ones(8, 8)) and int(opt.state[b]["step"]) == 0
    health = opt.health()
    assert health["a"]["nonfinite_skips"] == 0.0 and health["b"]["nonfinite_skips"] == 1.0


def _stepped_soap(steps: int = 2, **kw) -> tuple[SOAP, torch.nn.Parameter]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = SOAP([("w", w)], lr=1e-2, **kw)
    for _ in range(steps):
        w.grad = torch.randn(16, 8)
        opt.step()
    return opt, w


def test_an_adamw_or_cut_state_dict_is_refused_before_anything_changes():
    # AdamW's step / exp_avg / exp_avg_sq fit SOAP's keys and shapes: it loaded, and every
    # step after raised KeyError: 'L'
    opt, w = _stepped_soap()
    before = copy.deepcopy(opt.state_dict())
    adam_w = torch.nn.Parameter(w.detach().clone())
    adam = torch.optim.AdamW([adam_w], lr=1e-3)
    adam_w.grad = torch.randn(16, 8)
    adam.step()
    cut = copy.deepcopy(before)
    del cut["state"][0]["Q_L"]
    for saved, missing in ((adam.state_dict(), "L, Q_L, Q_R, R"), (cut, "Q_L")):
        with pytest.raises(ValueError, match=f"'w' has state without {missing}.*another"):
            opt.load_state_dict(saved)
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for key, value in before["state"][0].items():
            assert torch.equal(after["state"][0][key], value), key
    w.grad = torch.randn(16, 8)
    opt.step()  # still trains


def test_max_precond_dim_changed_after_the_first_step_is_refused_and_can_be_put_back():
    # the layout is fixed at the first step: the new value was silently ignored; and refused
    # mid-step, a matrix of an earlier batch had already stepped
    torch.manual_seed(0)
    a, w = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(16, 8))
    opt = SOAP([("a", a), ("w", w)], lr=1e-2)
    for _ in range(2):
        a.grad, w.grad = torch.randn(4, 4), torch.randn(16, 8)
        opt.step()
    for changed in (8, 4):  # 8: drops the 16 side's factor; 4: both sides of w
        opt.param_groups[0]["max_precond_dim"] = changed
        kept = copy.deepcopy(opt.state_dict())
        params = [a.detach().clone(), w.detach().clone()]
        a.grad, w.grad = torch.randn(4, 4), torch.randn(16, 8)
        with pytest.raises(ValueError, match=r"w: max_precond_dim=\d+ denies its side of 16"):
            opt.step()
        assert torch.equal(a, params[0]) and torch.equal(w, params[1])
        after = opt.state_dict()
        assert after["param_groups"][0]["step"] == kept["param_groups"][0]["step"]
        for index, entry in kept["state"].items():
            assert all(torch.equal(after["state"][index][k], v) for k, v in entry.items())
    opt, w = _stepped_soap(max_precond_dim=8)  # the other way: a side gets a factor
    opt.param_groups[0]["max_precond_dim"] = 8192
    w.grad = torch.randn(16, 8)
    with pytest.raises(ValueError, match="gives its side of 16 a factor"):
        opt.step()
    opt.param_groups[0]["max_precond_dim"] = 8
    opt.step()


def test_a_scalar_betas_and_numpy_counts_get_the_documented_checks():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        SOAP([w], lr=1e-2, betas=0.9)  # was TypeError: 'float' object is not iterable
    opt = SOAP([w], lr=1e-2, precondition_frequency=np.int64(2), max_precond_dim=np.int32(64))
    assert type(opt.param_groups[0]["precondition_frequency"]) is int
    opt.param_groups[0]["power_iter_steps"] = np.int64(2)  # as a sweep writes it mid-run
    w.grad = torch.randn(4, 4)
    opt.step()
    assert type(opt.param_groups[0]["power_iter_steps"]) is int


@pytest.mark.parametrize("make", [
    lambda ps, lr: SOAP(ps, lr=lr, weight_decay=0.5),
    lambda ps, lr: Muon(ps, lr=lr, weight_decay=0.5),
], ids=["soap", "muon"])
def test_a_learning_rate_tensor_of_shape_1_steps_as_a_0d_one(make) -> None:
    # accepted (as torch.optim.Muon takes it), then add_(alpha=lr) raised TypeError half-way
    # through the step: the weight decay applied, the state advanced, the update not
    grads = [torch.randn(8, 6, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    results = []
    for lr in (torch.tensor(0.01), torch.tensor([0.01])):  # as the 0-d tensor, bit for bit
        w = torch.nn.Parameter(torch.ones(8, 6))
        opt = make([("w", w)], lr)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_numpy_hyperparameters_leave_a_checkpoint_that_loads_with_weights_only(tmp_path) -> None:
    # np.float64 values (a sweep's, or written by a scheduler) were kept as they came, and
    # torch.load(weights_only=True) refused the optimizer's state dict
    w = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = SOAP([{"params": [("w", w)]}, {"params": [("b", b)], "algorithm": "adamw"}],
               lr=np.float64(0.01), betas=(np.float64(0.9), 0.95), shampoo_beta=np.float64(0.9),
               eps=np.float32(1e-8), weight_decay=np.float64(0.01))
    opt.param_groups[1]["adamw_betas"] = (np.float32(0.9), np.float64(0.99))  # mid-run
    w.grad, b.grad = torch.randn(6, 4), torch.randn(4)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    for group in loaded["param_groups"]:
        assert type(group["lr"]) is float and all(type(v) is float for v in (
            group.get("betas", (0.0,)) + group.get("adamw_betas", (0.0,))))
    assert type(loaded["param_groups"][0]["shampoo_beta"]) is float


@pytest.mark.parametrize("kl", [False, True], ids=["plain", "kl"])
def test_an_eps_that_float32_cannot_hold_is_refused(kl: bool) -> None:
    # taken as a "finite number > 0": in the float32 state it was 0. Plain SOAP then divided
    # 0 / (sqrt(0) + 0) on a coordinate whose gradient had always been 0 (a dead row), and
    # KL-Shampoo's whitening weights 1 / (dim eps) came out infinite: every step was skipped
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"eps=1e-50 is below float32's smallest normal "
                                         r"number \(1.18e-38\)"):
        SOAP([w], lr=0.01, eps=1e-50, use_kl_shampoo=kl)
    opt = SOAP([w], lr=0.01, use_kl_shampoo=kl)
    opt.param_groups[0]["eps"] = 1e-300  # set mid-run: refused by the step, which changes nothing
    w.grad = torch.randn(8, 6)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"eps=1e-300 is below float32's smallest normal"):
        opt.step()
    assert torch.equal(w, before) and not opt.state[w]
    # the smallest eps taken trains a matrix with a dead row (and, one-sided, a dead column
    # of the Adam-only side) without a skip
    opt = SOAP([("w", w)], lr=0.01, eps=1e-37, use_kl_shampoo=kl, max_precond_dim=6)
    for k in range(3):
        g = torch.randn(8, 6, generator=torch.Generator().manual_seed(k))
        g[3] = 0.0
        w.grad = g
        opt.step()
    assert opt.health()["w"]["nonfinite_skips"] == 0 and not torch.equal(w, before)


# ---- max_update_rms: the early steps' outsized updates ------------------------------------------


def _early_gradients(m: int, n: int, steps: int) -> list[torch.Tensor]:
    """A fixed rank-8 signal plus noise, at a transformer weight's gradient scale (~1e-3)."""
    gen = torch.Generator().manual_seed(3)
    signal = torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen)
    return [(signal + 3.0 * torch.randn(m, n, generator=gen)) * 1e-3 for _ in range(steps)]


def _update_rms(opt_kwargs: dict, grads: list[torch.Tensor]) -> list[float]:
    """Each step's parameter change divided by lr, as an RMS (weight decay 0)."""
    p = torch.nn.Parameter(torch.zeros(grads[0].shape))
    opt = SOAP([p], lr=1e-3, weight_decay=0.0, health_every=0, **opt_kwargs)
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(float((p.detach() - before).square().mean().sqrt()) / 1e-3)
    return out


# Adam's update has entries of at most ~1 (m_hat / sqrt(v_hat)), so an RMS above this many
# times 1 is an outsized step, not an ordinary one
OUTSIZED_RMS = 10.0
# the clipped RMS may exceed the cap by float32 rounding of the scale and the RMS (~1e-7)
CLIP_RTOL = 1e-5


@pytest.mark.parametrize("use_eigh", [False, True])
def test_max_update_rms_caps_the_outsized_updates_of_the_first_refreshes(use_eigh):
    # at step 1 the bases diagonalize G itself, so the second moments are ~0 off its diagonal;
    # the next refreshes rotate momentum onto those coordinates, and m / (sqrt(v) + eps) takes
    # steps of tens to hundreds of times Adam's (docs/soap.md "Outsized early steps")
    grads = _early_gradients(64, 16, 8)
    free = _update_rms({"use_eigh": use_eigh}, grads)
    assert max(free[1:4]) > OUTSIZED_RMS and free[0] < 1.0 and free[-1] < 1.0
    capped = _update_rms({"use_eigh": use_eigh, "max_update_rms": 1.0}, grads)
    assert max(capped) <= 1.0 * (1 + CLIP_RTOL)
    # ordinary steps are left alone: the state does not depend on the clip, so a step whose
    # update was under the cap is the same step
    for f, c in zip(free, capped, strict=True):
        assert c == pytest.approx(min(f, 1.0), rel=CLIP_RTOL)


def test_max_update_rms_scales_the_update_and_changes_no_state():
    # float64, so that recovering the update from the parameters loses nothing to rounding
    grads = [g.double() for g in _early_gradients(24, 12, 6)]
    params = [torch.nn.Parameter(torch.zeros(24, 12, dtype=torch.float64)) for _ in range(2)]
    opts = [SOAP([p], lr=1e-3, weight_decay=0.01, max_update_rms=cap, health_every=0)
            for p, cap in zip(params, (0.0, 0.5), strict=True)]
    scales = []
    for g in grads:
        before = [p.detach().clone() for p in params]
        for p, opt in zip(params, opts, strict=True):
            p.grad = g.clone()
            opt.step()
        free, capped = (p.detach() - (1 - 1e-3 * 0.01) * b for p, b in zip(params, before,
                                                                             strict=True))
        rms = free.square().mean().sqrt() / 1e-3
        scale = min(1.0, 0.5 / (float(rms) + 1e-7))
        scales.append(scale)
        torch.testing.assert_close(capped, free * scale, rtol=CLIP_RTOL, atol=0.0)
        for key in STATE_KEYS:  # the clip acts on the update alone
            assert torch.equal(opts[0].state[params[0]][key], opts[1].state[params[1]][key])
    assert min(scales) < 0.1 and max(scales) == 1.0  # clipped hard, and not at all


def test_a_checkpoint_without_max_update_rms_loads_with_the_live_groups_value():
    p = torch.nn.Parameter(torch.zeros(8, 4))
    old = SOAP([p], lr=1e-3, health_every=0)
    p.grad = torch.randn(8, 4)
    old.step()
    saved = old.state_dict()
    for group in saved["param_groups"]:
        del group["max_update_rms"]  # as a checkpoint from before the argument was taken
    new = SOAP([p], lr=1e-3, max_update_rms=1.0, health_every=0)
    new.load_state_dict(saved)
    assert new.param_groups[0]["max_update_rms"] == 1.0
    p.grad = torch.randn(8, 4)
    new.step()


def test_max_update_rms_clips_a_finite_update_whose_squares_overflow_float32():
    # its RMS read Inf and scaled the update to 0: a silent step that moved nothing
    from optim._soap_step import clip_update_rms

    U = torch.full((4, 3), 1e20)
    clipped = clip_update_rms(U, 1.0)
    assert float(clipped.square().mean().sqrt()) == pytest.approx(1.0, rel=CLIP_RTOL)
    assert clip_update_rms(torch.zeros(0, 3), 1.0).shape == (0, 3)

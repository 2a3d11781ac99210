"""Muon and NorMuon: parity with torch.optim.Muon, softening, NorMuon's rule, non-finite skips,
state dicts, schedulers and health keyed by parameter name."""

from __future__ import annotations

import copy
import io
import math
import random

import pytest
import torch
from torch import nn

from optim import SOAP, Muon, NorMuon, split_param_groups
from optim.health import estimate_orthogonality_error, orthogonality_error
from optim.muon import IN_PLACE_NORM, adjusted_lr
from optim.orthogonalize import METHODS, default_steps, orthogonalize, soften

# Our Muon runs the same ops in the same order as torch.optim.Muon (lerp momentum, bf16 NS with
# addmm, mul_ then add_): for a matrix alone in its batch (Muon._batch_shape), parity is exact.
PARITY_ATOL = 0.0
PARITY_RTOL = 0.0
# Same-shape matrices are stacked and run through baddbmm instead of addmm. On CPU, baddbmm can
# round an entry of a bf16 product differently from addmm (different blocking of the same sum),
# measured: 2 of 512 entries off by one fp32 ulp after 6 steps with custom coefficients; with the
# defaults 6 of 200 seed/shape pairs differ after one step (2e-5 at lr 0.02). A bound that holds
# whatever entry flips: one bf16 ulp of an update entry of magnitude < 2 (2**-7), scaled by the
# adjusted lr, per step. Momentum never sees the update, so
# differences add up over steps instead of compounding.
BF16_ULP_BELOW_2 = 2.0**-7


def batched_atol(lr_adj: float, steps: int) -> float:
    return steps * lr_adj * BF16_ULP_BELOW_2


# Updates reconstructed from parameters: (W0 - W1) / lr_adj divides a float32 difference of
# O(1) values by lr_adj ~ 0.03, amplifying fp32 rounding (6e-8) by ~30: 1e-5 is 5x that.
UPDATE_ATOL = 1e-5
UPDATE_RTOL = 1e-4
# NorMuon after one step: every row's RMS becomes 1/sqrt(1 - beta2) up to normuon_eps (1e-8)
# against sqrt(v) ~ 0.02 and fp32 rounding: 1e-4 relative spread is far below the ~40% spread
# of the rows of a tall orthogonalized update.
NORMUON_ROW_SPREAD = 1e-4
NORM_RTOL = 1e-5  # Frobenius norms of fp32 matrices of ~1000 entries
# health's orthogonality error against the test's float32 one: on CPUs with native bf16 (as
# here) the step takes the fused bf16 Gram, whose independent per-entry roundings move the norm
# by far less than one bf16 rounding (test_health.FUSED_BF16_RTOL; measured <= 2.1e-4 below).
FUSED_BF16_RTOL = 2.0**-9
# update_rms is a bf16 norm: the float32 sum rounded once to bf16, within 2^-8 (the unit
# roundoff of 8 significant bits) of it; measured up to 3.3e-3, as close to the bound as one
# rounding gets. O itself may differ from the test's in the last bit of a few entries, so the
# bound is twice one rounding.
BF16_NORM_RTOL = 2.0**-7
# 16 Gaussian probes estimate a quintic update's error within 0.2-2.1% (one standard deviation,
# test_health.QUINTIC_PROBE16_RTOL); 8% is 4x the largest. k probes spread sqrt(16 / k) times
# more, so k probes get 8% * sqrt(16 / k). Measured here: 0.5% with 16 probes, 7.3% with 5
# (bound 14%).
QUINTIC_PROBE16_RTOL = 0.08
# A softening schedule's value is the same Python float product 0.1 * step on both sides
# (measured exact); 1e-12 would allow another float64 evaluation of O(0.1) values.
SCHEDULE_ATOL = 1e-12
# 8 polar_express steps in bf16 reach its rounding floor (~1e-2; measured 5.6e-3 on tiny_mlp);
# 0.05 is 9x that and still 6x below quintic's ~0.3.
POLAR_EXPRESS_BF16_ORTHO_MAX = 0.05
# Loss reduction a working optimizer must reach on the quadratic in 40 steps (measured 0.01-0.2).
QUADRATIC_MAX_FINAL_OVER_INITIAL = 0.5

SHAPES = [(32, 16), (16, 48), (24, 24), (32, 16)]  # includes two same-shape matrices


def make_params(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def grads_for(params, step, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run(opt, params, steps, *, start=0, seed=100):
    for t in range(start, start + steps):
        for p, gr in zip(params, grads_for(params, t, seed), strict=True):
            p.grad = gr.clone()
        opt.step()


def assert_params_equal(a, b, atol=PARITY_ATOL, rtol=PARITY_RTOL):
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol)


# ---- parity with torch.optim.Muon -------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="defaults"),
    pytest.param({"lr": 0.02, "weight_decay": 0.01}, id="lr-wd"),
    pytest.param({"nesterov": False, "momentum": 0.9}, id="no-nesterov"),
    pytest.param({"adjust_lr_fn": "original"}, id="adjust-original"),
    pytest.param({"adjust_lr_fn": "match_rms_adamw", "lr": 0.01}, id="adjust-match-rms-adamw"),
    pytest.param({"ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 3, "eps": 1e-6},
                 id="custom-ns"),
    pytest.param({"ns_steps": 0}, id="no-ns-steps"),  # the normalized momentum; was refused
    # eps below where squares underflow: every norm was taken of the input scaled by its
    # largest entry, which rounded differently from torch's (up to 3% of an update at eps=0)
    pytest.param({"eps": 0.0, "lr": 0.02}, id="eps-0"),
    pytest.param({"eps": 1e-15, "lr": 0.02}, id="eps-tiny"),
])
def test_muon_equals_torch_muon_over_several_steps(kwargs):
    ours_p, ref_p = make_params(), make_params()
    ours, ref = Muon(ours_p, **kwargs), torch.optim.Muon(ref_p, **kwargs)
    run(ours, ours_p, 6)
    run(ref, ref_p, 6)
    for shape, p, q in zip(SHAPES, ours_p, ref_p, strict=True):
        assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        if SHAPES.count(shape) == 1:
            assert torch.equal(p, q), shape
        else:
            lr_adj = adjusted_lr(kwargs.get("lr", 1e-3), kwargs.get("adjust_lr_fn"), shape)
            torch.testing.assert_close(p, q, atol=batched_atol(lr_adj, 6), rtol=0.0)


def test_adjusted_lr_matches_torch_for_both_rules_and_rejects_unknown():
    from torch.optim._muon import _adjust_lr
    for shape in [(32, 16), (16, 48), (7, 7)]:
        for fn in (None, "original", "match_rms_adamw"):
            assert adjusted_lr(0.02, fn, shape) == _adjust_lr(0.02, fn, torch.Size(shape))
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon(make_params(), adjust_lr_fn="unit")


def test_same_argument_names_and_defaults_as_torch_muon():
    import inspect
    ours = inspect.signature(Muon.__init__).parameters
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name


# ---- every method trains ----------------------------------------------------------------------

def quadratic_run(opt_cls, steps=40, **kwargs):
    g = torch.Generator().manual_seed(7)
    target = torch.randn(32, 16, generator=g)
    W = nn.Parameter(torch.zeros(32, 16))
    opt = opt_cls([W], lr=0.05, weight_decay=0.0, **kwargs)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (W - target).square().sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = 0.5 * (W.detach() - target).square().sum().item()
    return losses[0], final, opt


def test_a_checkpoint_from_before_the_skips_brings_back_its_counts_in_health():
    # going back to the last good checkpoint after NaN steps: health() kept the counts of the
    # abandoned steps, for good on an AdamW parameter (it reports only when it skips)
    w, bias = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))
    opt = Muon(split_param_groups([("w", w), ("bias", bias)]), lr=0.02)
    for p in (w, bias):
        p.grad = torch.ones_like(p)
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    for _ in range(2):
        for p in (w, bias):
            p.grad = torch.full_like(p, float("nan"))
        opt.step()
    assert opt.health()["w"]["nonfinite_skips"] == opt.health()["bias"]["nonfinite_skips"] == 2
    opt.load_state_dict(good)
    assert opt.health()["w"]["nonfinite_skips"] == opt.health()["bias"]["nonfinite_skips"] == 0
    for p in (w, bias):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.health()["bias"]["nonfinite_skips"] == 0.0


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
@pytest.mark.parametrize("method", METHODS)
def test_every_ns_method_reduces_a_quadratic_loss(opt_cls, method):
    initial, final, opt = quadratic_run(opt_cls, ns_method=method)
    assert math.isfinite(final)
    assert final < QUADRATIC_MAX_FINAL_OVER_INITIAL * initial, (initial, final)
    assert opt.health()["group0.param0"]["nonfinite_skips"] == 0.0


def test_softened_muon_reduces_a_quadratic_loss_with_a_schedule():
    initial, final, _ = quadratic_run(Muon, softening=lambda step: min(0.5, step / 20))
    assert final < QUADRATIC_MAX_FINAL_OVER_INITIAL * initial


def test_unknown_ns_method_and_bad_softening_raise_value_error():
    with pytest.raises(ValueError, match="ns_method"):
        Muon(make_params(), ns_method="newton")
    with pytest.raises(ValueError, match="softening"):
        Muon(make_params(), softening=1.5)
    with pytest.raises(ValueError, match="softening"):
        Muon(make_params(), softening=float("nan"))
    opt = Muon(make_params(), softening=lambda step: 2.0)  # a schedule is checked when used
    with pytest.raises(ValueError, match=r"softening\(1\) \(the schedule\) must be"):
        run(opt, opt.param_groups[0]["params"], 1)



@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_a_schedule_going_bad_mid_training_raises_before_anything_changes(opt_cls):
    # read mid-step, a bad value left the AdamW group stepped and the step counters moved
    bad = {"now": False}

    def schedule(step):
        return float("nan") if bad["now"] else 0.1

    def make():
        torch.manual_seed(0)
        w, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(3))
        return w, b, opt_cls([{"params": [("w", w)]},
                              {"params": [("b", b)], "algorithm": "adamw"}],
                             lr=0.01, softening=schedule)

    grads = [(torch.randn(6, 4), torch.randn(3)) for _ in range(4)]
    w, b, opt = make()
    w_ref, b_ref, ref = make()
    for t, (gw, gb) in enumerate(grads):
        if t == 2:
            before = copy.deepcopy(opt.state_dict())
            w_before, b_before = w.detach().clone(), b.detach().clone()
            bad["now"] = True
            w.grad, b.grad = gw.clone(), gb.clone()
            with pytest.raises(ValueError, match=r"softening\(3\) \(the schedule\)"):
                opt.step()
            bad["now"] = False
            assert torch.equal(w, w_before) and torch.equal(b, b_before)
            after = opt.state_dict()
            assert [g["step"] for g in after["param_groups"]] == [2, 2]
            assert all(torch.equal(before["state"][k][n], after["state"][k][n])
                       for k in before["state"] for n in before["state"][k])
        w.grad, b.grad = gw.clone(), gb.clone()
        w_ref.grad, b_ref.grad = gw.clone(), gb.clone()
        opt.step()
        ref.step()
    # the retried step and the ones after it: as if the bad value had never come
    assert torch.equal(w, w_ref) and torch.equal(b, b_ref)


# ---- softening inside the optimizer -----------------------------------------------------------

def one_step_update(opt_cls, W0, grad, **kwargs):
    """The update direction the optimizer applied, from (W0 - W1) / lr_adj (no weight decay)."""
    W = nn.Parameter(W0.clone())
    opt = opt_cls([("w", W)], lr=0.02, weight_decay=0.0, **kwargs)
    W.grad = grad.clone()
    opt.step()
    return (W0 - W.detach()) / adjusted_lr(0.02, None, tuple(W0.shape)), opt


def nesterov_input(grad, momentum=0.95):
    buf = torch.zeros_like(grad).lerp(grad, 1 - momentum)
    return grad.lerp(buf, momentum)


@pytest.mark.parametrize("s", [0.3, 1.0])
def test_numeric_softening_applies_the_blend_and_reports_it(s):
    g = torch.Generator().manual_seed(1)
    W0, grad = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    update, opt = one_step_update(Muon, W0, grad, softening=s)
    X = nesterov_input(grad)
    O = orthogonalize(X, method="quintic", steps=5)
    torch.testing.assert_close(update, soften(O, X, s), atol=UPDATE_ATOL, rtol=UPDATE_RTOL)
    health = opt.health()["w"]
    assert health["softening"] == s
    # orthogonality is measured on O, before softening
    assert health["orthogonality_error"] == pytest.approx(orthogonality_error(O).item(),
                                                          rel=FUSED_BF16_RTOL)


@pytest.mark.parametrize("kwargs, probes", [
    ({}, Muon.AUTO_PROBES),                                     # Jordan's quintic: estimated
    ({"health_probes": 0}, 0),                                  # exact on request
    ({"health_probes": 5}, 5),
    ({"ns_coefficients": (3.0, -3.2, 1.2)}, 0),                 # other coefficients: exact
    ({"ns_method": "polar_express"}, 0),                        # a converging method: exact
], ids=["auto-quintic", "exact", "five", "other-coefficients", "polar-express"])
def test_orthogonality_error_is_estimated_for_jordans_quintic_and_exact_otherwise(kwargs, probes):
    g = torch.Generator().manual_seed(2)
    W0, grad = torch.randn(96, 80, generator=g), torch.randn(96, 80, generator=g)
    _, opt = one_step_update(Muon, W0, grad, **kwargs)
    group = opt.param_groups[0]
    O = orthogonalize(nesterov_input(grad).bfloat16(), method=group["ns_method"],
                      steps=group["ns_steps"], coefficients=group["ns_coefficients"])
    want = orthogonality_error(O) if probes == 0 else \
        estimate_orthogonality_error(O, probes, seed=1)  # seed: the step count
    # the test's O and the step's O are both bf16 NS outputs of the same input; the exact path
    # may take the fused bf16 Gram
    health = opt.health()["w"]
    got = health["orthogonality_error"]
    assert got == pytest.approx(want.item(), rel=FUSED_BF16_RTOL)
    # update_rms of U = O (no softening)
    assert health["update_rms"] == pytest.approx(
        torch.linalg.vector_norm(O.float()).item() / math.sqrt(O.numel()), rel=BF16_NORM_RTOL)
    if probes:  # and it is an estimate of the exact value
        exact = orthogonality_error(O).item()
        assert got == pytest.approx(exact, rel=QUINTIC_PROBE16_RTOL * math.sqrt(16 / probes))
        # not the exact value itself (which the fused bf16 Gram gives within FUSED_BF16_RTOL):
        # the estimates here are >= 4.9e-3 off it
        assert got != pytest.approx(exact, rel=FUSED_BF16_RTOL)


@pytest.mark.parametrize("softening", [0.0, 0.4])
def test_normuon_update_rms_is_the_rms_of_the_update_it_applied(softening):
    # NorMuon's rescale keeps ||U||_F, and health reads the RMS from that norm: check it against
    # the update actually applied (W0 = 0, so -W1 / lr_adj is the update up to one rounding)
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(160, 96, generator=g)
    update, opt = one_step_update(NorMuon, torch.zeros(160, 96), grad, softening=softening)
    want = torch.linalg.vector_norm(update).item() / math.sqrt(update.numel())
    assert opt.health()["w"]["update_rms"] == pytest.approx(want, rel=NORM_RTOL)


@pytest.mark.parametrize("shape", [(64, 64), (200, 64), (64, 90)])
def test_automatic_health_measures_small_matrices_exactly(shape):
    # smaller side <= AUTO_PROBES_ABOVE: the Gram costs less than the probes, so it is exact
    g = torch.Generator().manual_seed(3)
    W0, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    _, opt = one_step_update(Muon, W0, grad)
    O = orthogonalize(nesterov_input(grad).bfloat16(), method="quintic")
    got = opt.health()["w"]["orthogonality_error"]
    # the step may take the fused bf16 Gram
    assert got == pytest.approx(orthogonality_error(O).item(), rel=FUSED_BF16_RTOL)
    assert min(shape) <= Muon.AUTO_PROBES_ABOVE


def test_health_probes_must_be_none_zero_or_a_positive_int():
    for bad in (-1, 1.5, True, "16"):
        with pytest.raises(ValueError, match="health_probes"):
            Muon(make_params(), health_probes=bad)
    assert NorMuon(make_params(), health_probes=4).health_probes == 4


def test_scheduled_softening_follows_the_step_and_health_reports_the_scheduled_value():
    params = make_params([(24, 12)])
    schedule = lambda step: 0.1 * step  # noqa: E731
    opt = Muon([("w", params[0])], lr=0.02, softening=schedule)
    ref_params = make_params([(24, 12)])
    buf = torch.zeros(24, 12)
    for t in range(4):
        run(opt, params, 1, start=t)
        assert opt.health()["w"]["softening"] == pytest.approx(0.1 * (t + 1), abs=SCHEDULE_ATOL)
        # reference: the update rule written out, with s_t = 0.1 t
        (grad,) = grads_for(ref_params, t)
        buf = buf.lerp(grad, 0.05)
        X = grad.lerp(buf, 0.95)
        U = soften(orthogonalize(X, method="quintic", steps=5), X, 0.1 * (t + 1))
        with torch.no_grad():
            ref_params[0].mul_(1 - 0.02 * 0.1).add_(U, alpha=-adjusted_lr(0.02, None, (24, 12)))
    # the reference runs the optimizer's own kernels on the one matrix: equal to the last bit
    assert torch.equal(params[0], ref_params[0])


# ---- NorMuon ----------------------------------------------------------------------------------

def row_rms(M):
    return M.square().mean(dim=-1).sqrt()


@pytest.mark.parametrize("s", [0.0, 0.4])
def test_normuon_evens_row_rms_and_preserves_the_softened_frobenius_norm(s):
    g = torch.Generator().manual_seed(2)
    W0, grad = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    update, opt = one_step_update(NorMuon, W0, grad, softening=s)
    X = nesterov_input(grad)
    U = soften(orthogonalize(X, method="quintic", steps=5), X, s)
    # the rows of the softened tall update are uneven; NorMuon's first step makes them equal
    rms_before, rms_after = row_rms(U), row_rms(update)
    assert (rms_before.max() / rms_before.min()).item() > 1.2
    assert (rms_after.max() / rms_after.min()).item() - 1 < NORMUON_ROW_SPREAD
    torch.testing.assert_close(torch.linalg.matrix_norm(update), torch.linalg.matrix_norm(U),
                               atol=0.0, rtol=NORM_RTOL)
    assert opt.state[opt.param_groups[0]["params"][0]]["second_moment"].shape == (64, 1)


# NorMuon against its rule written out (v, N and the rescale as separate float32 expressions, in
# another order than the fused kernel): float32 rounding only, measured after 5 steps 9.7e-7
# relative (2.4e-7 absolute on entries up to 4) for the parameters and 2.1e-7 relative for the
# second moments; about 10x above each.
NORMUON_RULE_RTOL, NORMUON_RULE_ATOL = 1e-5, 2e-6


def test_normuon_is_still_found_where_it_lived_before_its_own_module():
    # code importing it from optim.muon, and optimizers pickled when it lived there (their
    # pickles name optim.muon.NorMuon), keep working
    import pickle

    import optim.muon
    import optim.normuon
    from optim.muon import NorMuon as OldPath
    from optim.muon import normuon_normalize

    assert OldPath is NorMuon and normuon_normalize is optim.normuon.normuon_normalize
    assert pickle.Unpickler(io.BytesIO()).find_class("optim.muon", "NorMuon") is NorMuon
    with pytest.raises(AttributeError, match="no attribute 'Nor'"):
        optim.muon.Nor


def test_normuon_follows_its_written_rule_over_several_steps():
    beta2, eps, lr, wd = 0.9, 1e-8, 0.02, 0.05
    (W,), (R,) = make_params([(48, 24)]), make_params([(48, 24)])
    opt = NorMuon([W], lr=lr, weight_decay=wd, beta2=beta2, normuon_eps=eps, softening=0.2)
    buf, v = torch.zeros(48, 24), torch.zeros(48, 1)
    for t in range(5):
        run(opt, [W], 1, start=t)
        (grad,) = grads_for([R], t)
        buf = buf.lerp(grad, 0.05)
        X = grad.lerp(buf, 0.95)
        U = soften(orthogonalize(X, method="quintic", steps=5), X, 0.2)
        v = beta2 * v + (1 - beta2) * U.square().mean(dim=-1, keepdim=True)
        N = U / (v.sqrt() + eps)
        N = N * torch.linalg.matrix_norm(U) / torch.linalg.matrix_norm(N)
        with torch.no_grad():
            R.mul_(1 - lr * wd).add_(N, alpha=-adjusted_lr(lr, None, (48, 24)))
    torch.testing.assert_close(W, R, atol=NORMUON_RULE_ATOL, rtol=NORMUON_RULE_RTOL)
    torch.testing.assert_close(opt.state[W]["second_moment"], v, atol=0.0, rtol=NORMUON_RULE_RTOL)


# the rule in float64 against the step on float64 parameters: the second moment is kept in
# float32 and each row's factor 1 / (sqrt(v) + eps) is computed from it in float32 (three
# roundings of 6e-8, measured 2.1e-7 at most), as is a bf16 update's normalization
FLOAT64_NORMUON_RTOL = 1e-6


@pytest.mark.parametrize("ns_method", ["svd", "quintic"])
def test_normuon_on_float64_parameters_follows_its_rule(ns_method):
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(40, 24, generator=g, dtype=torch.float64)
    update, opt = one_step_update(NorMuon, torch.zeros(40, 24, dtype=torch.float64), grad,
                                  ns_method=ns_method)
    assert update.dtype == torch.float64
    X = nesterov_input(grad)
    O = orthogonalize(X.bfloat16() if ns_method == "quintic" else X, method=ns_method)
    U = O.double()
    v = (0.05 * U.square().mean(dim=-1, keepdim=True)).float().double()  # beta2 = 0.95
    N = U / (v.sqrt() + 1e-8)
    N = N * torch.linalg.matrix_norm(U) / torch.linalg.matrix_norm(N)
    torch.testing.assert_close(update, N, atol=0.0, rtol=FLOAT64_NORMUON_RTOL)
    state = opt.state[opt.param_groups[0]["params"][0]]
    torch.testing.assert_close(state["second_moment"], v.float(), atol=0.0,
                               rtol=FLOAT64_NORMUON_RTOL)
    assert opt.health()["w"]["update_rms"] == pytest.approx(
        torch.linalg.vector_norm(N).item() / math.sqrt(N.numel()), rel=FLOAT64_NORMUON_RTOL)


def test_normuon_rejects_bad_beta2():
    with pytest.raises(ValueError, match="beta2"):
        NorMuon(make_params(), beta2=1.0)


# ---- non-finite gradients ---------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_nonfinite_gradient_skips_only_that_matrix_and_training_resumes(opt_cls):
    # a and b share a shape (batched together), c does not
    shapes = [(32, 16), (32, 16), (16, 8)]
    names = ["a", "b", "c"]
    params = make_params(shapes)
    opt = opt_cls(list(zip(names, params, strict=True)), lr=0.02)
    # reference: the same optimizer class, where a never sees the bad steps
    ref_params = make_params(shapes)
    ref = opt_cls(list(zip(names, ref_params, strict=True)), lr=0.02)

    def feed(o, ps, t, bad=None):
        gs = grads_for(ps, t)
        for i, (p, gr) in enumerate(zip(ps, gs, strict=True)):
            p.grad = gr.clone() if bad is None or i != 0 else None
        if bad is not None and o is opt:
            ps[0].grad = torch.full(shapes[0], 1.0)
            ps[0].grad[3, 5] = bad
        o.step()

    feed(opt, params, 0)
    feed(ref, ref_params, 0)
    for t, bad in ((1, float("nan")), (2, float("inf")), (3, -float("inf"))):
        a_before = params[0].detach().clone()
        buf_before = opt.state[params[0]]["momentum_buffer"].clone()
        extra_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
        feed(opt, params, t, bad)
        feed(ref, ref_params, t, bad)  # ref: a has no gradient, b and c train
        assert torch.equal(params[0], a_before), "skipped matrix must not move (nor decay)"
        assert torch.equal(opt.state[params[0]]["momentum_buffer"], buf_before)
        for k, v in extra_before.items():
            assert torch.equal(opt.state[params[0]][k], v), k
        assert opt.health()["a"]["nonfinite_skips"] == float(t)
        assert opt.health()["b"]["nonfinite_skips"] == 0.0
    for t in (4, 5):  # finite again: trains exactly like the reference that never saw the bad steps
        feed(opt, params, t)
        feed(ref, ref_params, t)
    assert_params_equal(params, ref_params)
    assert not torch.equal(params[0], a_before)
    assert opt.health()["a"]["nonfinite_skips"] == 3.0


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_update_that_overflows_from_a_finite_gradient_is_skipped_and_counted(opt_cls):
    """A float64 gradient beyond bfloat16's range (~3.4e38), where Newton-Schulz computes: the
    update comes out NaN; the step is skipped and counted like a non-finite gradient, and the
    next gradient trains as if it had never come."""
    shape, gen = (16, 8), torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    runs = [nn.Parameter(torch.ones(*shape, dtype=torch.float64)) for _ in range(2)]
    (p, opt), (ref_p, ref) = [(q, opt_cls([("w", q)], lr=0.02)) for q in runs]
    p.grad, ref_p.grad = grads[0].clone(), grads[0].clone()
    opt.step()
    ref.step()
    before_p, before_state = p.detach().clone(), copy.deepcopy(opt.state[p])
    p.grad = grads[1] * 1e40
    opt.step()
    assert torch.equal(p.detach(), before_p)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before_state.items())
    health = opt.health()["w"]
    assert health["nonfinite_skips"] == 1.0
    assert math.isnan(health["orthogonality_error"])  # what the skipped update measured
    p.grad, ref_p.grad = grads[2].clone(), grads[2].clone()
    opt.step()
    ref.step()
    assert torch.equal(p.detach(), ref_p.detach())
    assert opt.health()["w"]["nonfinite_skips"] == 1.0


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_one_process_moves_the_momentum_in_place_unless_the_step_could_be_skipped(opt_cls):
    """In one process a step that cannot be skipped moves each momentum in place, as
    torch.optim.Muon does: the buffer keeps its storage (no new buffer per matrix and step,
    bench/muon.py). A gradient whose norm is above IN_PLACE_NORM (float64 entries of 1e37, finite
    in bfloat16, whose update comes out NaN) takes the out-of-place path: skipped and counted
    with the momentum as it was, and the next step moves it in place again."""
    gen = torch.Generator().manual_seed(0)
    shape = (16, 8)
    p = nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
    opt = opt_cls([("w", p)], lr=0.02)

    def step(scale: float) -> None:
        p.grad = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        opt.step()

    step(1.0)
    buf = opt.state[p]["momentum_buffer"]
    storage, before = buf.data_ptr(), buf.clone()
    step(1.0)
    assert buf.data_ptr() == storage and not torch.equal(buf, before)  # moved, in place
    big = 1e37
    assert math.sqrt(shape[0] * shape[1]) * big > IN_PLACE_NORM
    before, params_before = buf.clone(), p.detach().clone()
    step(big)
    assert opt.health()["w"]["nonfinite_skips"] == 1.0
    assert torch.equal(opt.state[p]["momentum_buffer"], before)
    assert torch.equal(p.detach(), params_before)
    step(1.0)
    assert opt.state[p]["momentum_buffer"].data_ptr() == storage
    assert not torch.equal(opt.state[p]["momentum_buffer"], before)
    assert opt.health()["w"]["nonfinite_skips"] == 1.0


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_skipped_step_leaves_the_momentum_as_it_was_at_every_magnitude(opt_cls, dtype):
    """Gradients from 1e10 to beyond bfloat16's range: wherever a step is skipped (its update
    came out non-finite), the momentum and the parameter are exactly as before, so the
    in-place path never took a step that could be skipped. With the bound at a quarter of
    bfloat16's largest value instead of IN_PLACE_NORM, float64 gradients of norm 1e20-1e37
    moved the momentum in place and were then skipped."""
    skipped = 0
    for exponent in range(10, 40):
        gen = torch.Generator().manual_seed(exponent)
        p = nn.Parameter(torch.randn(16, 8, generator=gen, dtype=dtype))
        opt = opt_cls([("w", p)], lr=0.02)
        p.grad = torch.randn(16, 8, generator=gen, dtype=dtype)
        opt.step()
        g = torch.randn(16, 8, generator=gen, dtype=torch.float64) * 10.0**exponent
        if not torch.isfinite(g.to(dtype)).all():
            continue
        p.grad = g.to(dtype)
        buf, weights = opt.state[p]["momentum_buffer"].clone(), p.detach().clone()
        opt.step()
        if opt.health()["w"]["nonfinite_skips"] == 1.0:
            skipped += 1
            assert torch.equal(opt.state[p]["momentum_buffer"], buf), exponent
            assert torch.equal(p.detach(), weights), exponent
    assert skipped > 0  # the range reaches where updates overflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_no_finite_gradient_makes_state_or_parameters_non_finite(dtype):
    """Gradients of every magnitude the dtype holds, through every method: each step is taken
    (health finite) or skipped and counted, and state and parameters stay finite."""
    rng = random.Random(0)
    top = math.log10(torch.finfo(dtype).max) - 0.5
    configs = [{}, {"ns_method": "polar_express"}, {"ns_method": "cans"}, {"ns_method": "svd"},
               {"softening": 0.3}, {"health_probes": 4}]
    skipped = taken = 0
    for trial in range(40):
        opt_cls, cfg = rng.choice([Muon, NorMuon]), rng.choice(configs)
        shape = rng.choice([(8, 4), (4, 8), (80, 80), (10, 3)])
        gen = torch.Generator().manual_seed(trial)
        p = nn.Parameter(torch.randn(*shape, generator=gen).to(dtype))
        opt = opt_cls([("w", p)], lr=0.02, **cfg)
        for _ in range(5):
            scale = 10 ** rng.uniform(-30, top)
            g = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
            if not torch.isfinite(g).all():
                continue
            count = opt.health().get("w", {}).get("nonfinite_skips", 0.0)
            p.grad = g
            opt.step()
            health = opt.health()["w"]
            if health["nonfinite_skips"] > count:
                skipped += 1
            else:
                taken += 1
                assert all(math.isfinite(v) for v in health.values()), (trial, cfg, scale)
            assert torch.isfinite(p).all(), (trial, cfg, scale)
            for key, value in opt.state[p].items():
                assert torch.isfinite(value).all(), (trial, cfg, scale, key)
    # an optimizer that skipped every step passed all of the above: steps are taken (here
    # 150 of 200 in float32 and bfloat16, 49 in float64, whose scales reach 1e308), and
    # float64's range reaches where the update overflows
    assert taken > 0
    assert skipped > 0 or dtype != torch.float64


@pytest.mark.parametrize("factory", [
    lambda ps: Muon(ps, lr=0.02), lambda ps: NorMuon(ps, lr=0.02),
    lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=2)], ids=["Muon", "NorMuon", "SOAP"])
def test_a_group_added_during_training_trains_like_an_optimizer_of_its_own(factory):
    gen = torch.Generator().manual_seed(0)
    w0, q0 = torch.randn(8, 4, generator=gen), torch.randn(6, 6, generator=gen)
    grads_w = [torch.randn(8, 4, generator=gen) for _ in range(4)]
    grads_q = [torch.randn(6, 6, generator=gen) for _ in range(2)]
    w, q, ref_w, ref_q = (nn.Parameter(t.clone()) for t in (w0, q0, w0, q0))
    opt, ref, ref_joined = factory([w]), factory([ref_w]), None
    for t in range(4):
        if t == 2:  # q is unfrozen and joins, with an AdamW group; named like the constructor's
            opt.add_param_group({"params": iter([q])})  # as layer.parameters() gives them
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "algorithm": "adamw"})
            ref_joined = factory([ref_q])
        w.grad, ref_w.grad = grads_w[t].clone(), grads_w[t].clone()
        if ref_joined is not None:
            q.grad, ref_q.grad = grads_q[t - 2].clone(), grads_q[t - 2].clone()
            ref_joined.step()
        opt.step()
        ref.step()
    assert torch.equal(w.detach(), ref_w.detach())
    assert torch.equal(q.detach(), ref_q.detach())
    assert [g["param_names"] for g in opt.param_groups] == [
        ["group0.param0"], ["group1.param0"], ["group2.param0"]]
    assert set(opt.health()) == {"group0.param0", "group1.param0"}
    with pytest.raises(ValueError, match="2-D matrices only"):  # refused, and not added
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(5))]})
    assert len(opt.param_groups) == 3


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_a_group_added_later_counts_its_own_steps_for_schedule_and_health(opt_cls):
    gen = torch.Generator().manual_seed(1)
    a, b = (nn.Parameter(torch.randn(8, 4, generator=gen)) for _ in range(2))
    asked: list[tuple[str, int]] = []

    def schedule(name):
        return lambda t: asked.append((name, t)) or 0.1

    extra = {} if opt_cls is SOAP else {"softening": schedule("a")}
    opt = opt_cls([{"params": [("a", a)], **extra}], lr=0.01, health_every=3)
    measured: dict[str, list[int]] = {"a": [], "b": []}
    last: dict[str, dict] = {}
    for t in range(1, 11):
        if t == 5:
            opt.add_param_group({"params": [("b", b)],
                                 **({} if opt_cls is SOAP else {"softening": schedule("b")})})
        for p in (a, b):
            p.grad = torch.randn(8, 4, generator=gen)
        opt.step()
        for name, health in opt.health().items():
            if health != last.get(name):  # a fresh gradient gives fresh values when measured
                measured[name].append(t)
            last[name] = dict(health)
    assert measured == {"a": [1, 4, 7, 10], "b": [5, 8]}  # b's own steps 1 and 4
    assert [g["step"] for g in opt.param_groups] == [10, 6]
    if opt_cls is not SOAP:
        assert [t for name, t in asked if name == "b"] == [1, 2, 3, 4, 5, 6]


def test_sparse_gradient_is_refused_by_name_before_anything_changes():
    from optim import split_param_groups

    emb = nn.Embedding(10, 8, sparse=True)
    named = [("embed.weight", emb.weight), ("h.weight", nn.Parameter(torch.randn(8, 8)))]
    opt = Muon(split_param_groups(named), lr=0.02)  # the embedding goes to the AdamW group
    emb(torch.tensor([1, 2])).sum().backward()
    named[1][1].grad = torch.randn(8, 8)
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(RuntimeError, match=r"'embed\.weight' has a sparse gradient.*sparse=False"):
        opt.step()
    assert all(g["step"] == 0 for g in opt.param_groups)
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before, strict=True))
    assert not opt.state



@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_a_parameter_name_given_twice_is_refused(opt_cls):
    # health, skip counts and checkpoints are keyed by name: two matrices called "w" reported
    # one "w" (the other's numbers and skips lost in it)
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"'w' is given twice \(group 0\)"):
        opt_cls([("w", a), ("w", b)], lr=0.01)
    with pytest.raises(ValueError, match=r"'w' is given twice \(groups 0 and 1\)"):
        opt_cls([{"params": [("w", a)]}, {"params": [("w", b)], "algorithm": "adamw"}], lr=0.01)
    opt = opt_cls([("w", a)], lr=0.01)
    with pytest.raises(ValueError, match="given twice"):  # refused, and not added
        opt.add_param_group({"params": [("w", b)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_names_that_are_not_one_string_per_parameter_are_refused(opt_cls):
    # enumerate(model.parameters()) named them 0, 1: the optimizer stepped, then refused its own
    # state_dict() on load, and add_param_group failed with AttributeError on int.split
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 4, bias=False))
    with pytest.raises(ValueError, match=r"parameter 0 is 0 \(int\); names must be strings"):
        opt_cls(enumerate(model.parameters()), lr=0.01)
    w = model[0].weight
    with pytest.raises(ValueError, match="param_names holds 2 names for 1 parameters"):
        opt_cls([{"params": [w], "param_names": ["a", "b"]}], lr=0.01)
    with pytest.raises(ValueError, match="param_names must be a list of strings, got str"):
        opt_cls([{"params": [w], "param_names": "a"}], lr=0.01)
    opt = opt_cls(model.named_parameters(), lr=0.01)
    extra = nn.Parameter(torch.randn(3, 3))
    for bad in ([3], ["x", "y"]):
        with pytest.raises(ValueError, match="param group 1"):
            opt.add_param_group({"params": [extra], "param_names": bad})
        assert len(opt.param_groups) == 1  # refused, and not added
    opt.add_param_group({"params": [extra], "param_names": ["x"]})
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[1]["param_names"] == ["x"]


# A group's own hyperparameters (torch's per-group overrides) skipped the constructor's checks:
# a negative lr ascended the loss, momentum 1.5 diverged, precondition_frequency 0 raised
# ZeroDivisionError mid-step. One bad value per optimizer and for the AdamW group.
GROUP_HYPER_CASES = [
    (Muon, {"lr": -1.0}, "lr must be a finite number >= 0"),
    (Muon, {"momentum": 1.5}, "momentum must be in"),
    (Muon, {"ns_coefficients": (1.0, 2.0)}, "ns_coefficients must be"),
    (Muon, {"eps": -1.0}, "eps"),
    (NorMuon, {"beta2": 1.0}, "beta2 must be in"),
    (NorMuon, {"normuon_eps": -1.0}, "normuon_eps"),
    (SOAP, {"betas": (1.0, 0.9)}, "betas must be"),
    (SOAP, {"precondition_frequency": 0}, "precondition_frequency must be"),
    (Muon, {"algorithm": "adamw", "adamw_betas": (0.9, 1.0)}, "adamw_betas must be"),
    (SOAP, {"algorithm": "adamw", "lr": -0.1}, "lr must be a finite number >= 0"),
    (SOAP, {"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
    (NorMuon, {"lr": float("nan")}, "lr must be a finite number >= 0"),
]


@pytest.mark.parametrize(("opt_cls", "bad", "message"), GROUP_HYPER_CASES)
def test_a_groups_own_hyperparameter_is_checked_and_names_the_group(opt_cls, bad, message):
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=f"param group 1: {message}"):
        opt_cls([{"params": [("a", a)]}, {"params": [("b", b)], **bad}], lr=0.01)
    opt = opt_cls([("a", a)], lr=0.01)
    with pytest.raises(ValueError, match=f"param group 1: {message}"):  # refused, not added
        opt.add_param_group({"params": [("b", b)], **bad})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("b", b)]})  # the same group with the defaults is fine
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_complex_matrices_are_refused_by_name_and_adamw_takes_them(opt_cls):
    # as torch.optim.Muon; before, Muon dropped the imaginary parts and SOAP raised mid-step
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
    with pytest.raises(ValueError, match=r"'z' is complex.*algorithm='adamw'"):
        opt_cls([("z", z)], lr=0.01)
    opt = opt_cls([("w", nn.Parameter(torch.randn(4, 4)))], lr=0.01)
    with pytest.raises(ValueError, match="is complex"):  # refused, and not added
        opt.add_param_group({"params": [("z", z)]})
    assert len(opt.param_groups) == 1
    # the AdamW group: torch's AdamW on the complex parameter, and a NaN in an imaginary part
    # is caught like any other (the finiteness check sums real and imaginary parts)
    ref = nn.Parameter(z.detach().clone())
    opt = opt_cls([{"params": [("z", z)], "algorithm": "adamw"}], lr=0.01)
    torch_adamw = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=opt.param_groups[0]["weight_decay"])
    for _ in range(2):
        z.grad = torch.randn(4, 4, dtype=torch.cfloat)
        ref.grad = z.grad.clone()
        opt.step()
        torch_adamw.step()
    assert torch.equal(z.detach(), ref.detach())
    before = z.detach().clone()
    z.grad = torch.full((4, 4), complex(1.0, float("nan")), dtype=torch.cfloat)
    opt.step()
    assert torch.equal(z.detach(), before)
    assert opt.health()["z"]["nonfinite_skips"] == 1.0


EMPTY_CASES = [(Muon, {}), (Muon, {"ns_method": "polar_express"}), (Muon, {"ns_method": "svd"}),
               (Muon, {"health_probes": 2}), (Muon, {"softening": 0.3}),
               (Muon, {"adjust_lr_fn": "match_rms_adamw"}), (NorMuon, {}), (SOAP, {}),
               # eps below the norm's underflow limit rescales by the largest entry, which an
               # empty matrix has not (amax raised)
               (Muon, {"eps": 0.0}), (NorMuon, {"eps": 0.0}),
               (SOAP, {"use_kl_shampoo": True, "precondition_frequency": 2}),
               (SOAP, {"use_eigh": True, "precondition_frequency": 2})]


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)])
@pytest.mark.parametrize("case", range(len(EMPTY_CASES)))
def test_matrices_without_entries_step_report_zero_and_leave_the_others_alone(case, shape):
    # a matrix without rows or columns (a zero-width layer): its update is empty; its health
    # reads 0, and the matrix beside it trains exactly as alone. Before, Muon raised in its
    # health (a reshape by -1) or in the learning-rate scale (a division by 0 columns), and
    # KL-Shampoo divided an empty sum by 0
    opt_cls, kwargs = EMPTY_CASES[case]
    empty, w = nn.Parameter(torch.randn(*shape)), nn.Parameter(torch.randn(5, 3))
    w_alone = nn.Parameter(w.detach().clone())
    opt = opt_cls([("e", empty), ("w", w)], lr=0.01, **kwargs)
    alone = opt_cls([("w", w_alone)], lr=0.01, **kwargs)
    for step in range(4):
        if step == 2:  # a round trip through state_dict on the way
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        empty.grad, w.grad = torch.randn(*shape), torch.randn(5, 3)
        w_alone.grad = w.grad.clone()
        opt.step()
        alone.step()
        health = opt.health()
        # w takes the same operations in both optimizers (the empty matrix is a batch of
        # its own): equal to the last bit
        assert health["w"] == alone.health()["w"]
        # zero but for the rotations: SOAP's side of the empty matrix that has a factor (4x4
        # when the other side is 0) only ever sees zero gradients, and a zero factor's
        # eigenbasis is arbitrary (its eigengap, 0, says so: docs/soap.md)
        assert all(v == 0.0 for k, v in health["e"].items()
                   if k != "softening" and not k.startswith("rotation")), health["e"]
        assert all(0.0 <= v <= 90.0 for k, v in health["e"].items() if k.startswith("rotation"))
    assert empty.shape == shape
    assert torch.equal(w, w_alone)


def test_an_empty_matrix_steps_as_in_torch_optim_muon():
    # torch.optim.Muon steps a (0, n) matrix (it divides by zero on an (n, 0) one)
    ours, theirs = nn.Parameter(torch.randn(0, 4)), nn.Parameter(torch.randn(0, 4))
    w, w_ref = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    w_ref.data.copy_(w.data)
    opt = Muon([ours, w], lr=0.02)
    ref = torch.optim.Muon([theirs, w_ref], lr=0.02)
    for _ in range(3):
        g = torch.randn(6, 4)
        ours.grad, theirs.grad, w.grad, w_ref.grad = torch.randn(0, 4), torch.randn(0, 4), g, g
        opt.step()
        ref.step()
    assert torch.equal(w.detach(), w_ref.detach())
    assert ours.shape == theirs.shape == (0, 4)


# ---- state dict -------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
@pytest.mark.parametrize("softening", [0.25, lambda step: 0.5 / step], ids=["number", "schedule"])
def test_state_dict_round_trip_continues_identically(opt_cls, softening):
    params = make_params()
    opt = opt_cls(params, lr=0.02, softening=softening, ns_method="polar_express")
    run(opt, params, 3)
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # a schedule is not pickled: the saved state is plain data
    buffer.seek(0)
    loaded_sd = torch.load(buffer, weights_only=False)

    clone = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = opt_cls(clone, lr=0.02, softening=softening, ns_method="polar_express")
    fresh.load_state_dict(loaded_sd)
    assert fresh.param_groups[0]["step"] == 3
    assert fresh.param_groups[0]["softening"] == softening  # a schedule survives the load
    run(opt, params, 3, start=3)
    run(fresh, clone, 3, start=3)
    assert_params_equal(params, clone)


def test_state_dict_replaces_a_schedule_by_none_without_touching_the_live_group():
    schedule = lambda step: 0.1  # noqa: E731
    opt = Muon(make_params(), softening=schedule)
    assert opt.state_dict()["param_groups"][0]["softening"] is None
    assert opt.param_groups[0]["softening"] is schedule


def test_a_schedule_saved_as_none_leaves_the_live_number_in_force():
    # saved from a schedule (None: not data) and loaded where softening is a number: the group
    # read None, and the next step raised
    params = make_params(SHAPES[:1])
    opt = Muon(params, lr=0.02, softening=lambda step: 0.1)
    run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    fresh = Muon([nn.Parameter(p.detach().clone()) for p in params], lr=0.02, softening=0.25)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["softening"] == 0.25 and fresh.param_groups[0]["step"] == 2
    run(fresh, fresh.param_groups[0]["params"], 1, start=2)
    assert fresh.health()["group0.param0"]["softening"] == 0.25


def _stepped(factory, shape):
    p = nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))
    opt = factory([("w", p)])
    p.grad = torch.ones(*shape)
    opt.step()
    return p, opt


# (saved by, loaded into, what the error names): another optimizer, another shape (a (1, 8)
# momentum would broadcast over a (4, 8) parameter without a word), SOAP's factors
LOAD_MISMATCHES = {
    "optimizer": (lambda ps: SOAP(ps, lr=1e-3), (4, 8), lambda ps: Muon(ps), (4, 8),
                  "saved for 'soap' and is 'muon'"),
    "broadcastable shape": (lambda ps: Muon(ps), (1, 8), lambda ps: Muon(ps), (4, 8),
                            r"'momentum_buffer' of parameter 'w' has shape \(1, 8\)"),
    "factor shape": (lambda ps: SOAP(ps, lr=1e-3), (8, 4), lambda ps: SOAP(ps, lr=1e-3), (4, 8),
                     r"'L' of parameter 'w' has shape \(8, 8\), not \(4, 4\) or \(0, 0\)"),
}


@pytest.mark.parametrize("case", LOAD_MISMATCHES)
def test_a_state_dict_that_does_not_fit_is_refused_before_anything_changes(case):
    saver, saved_shape, loader, shape, message = LOAD_MISMATCHES[case]
    _, source = _stepped(saver, saved_shape)
    p, opt = _stepped(loader, shape)
    groups, state = copy.deepcopy(opt.param_groups), copy.deepcopy(opt.state[p])
    with pytest.raises(ValueError, match=message):  # what a loader asks before it writes
        opt.check_state_dict(source.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(source.state_dict())
    assert opt.param_groups[0].keys() == groups[0].keys()
    assert all(opt.param_groups[0][k] == groups[0][k] for k in groups[0] if k != "params")
    assert state.keys() == opt.state[p].keys()
    assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())


# A group saved with hyperparameters its update cannot use, or state another optimizer keeps:
# refused before anything changes (a loaded shampoo_beta of 1 divided by zero at the next step,
# betas[0] = 1 made every step a silent "non-finite" skip).
LOAD_BAD_GROUPS = {
    "soap shampoo_beta": (lambda ps: SOAP(ps, lr=1e-3), {"shampoo_beta": 1.0},
                          "param group 0: shampoo_beta must be in"),
    "soap betas": (lambda ps: SOAP(ps, lr=1e-3), {"betas": (1.0, 0.95)},
                   "param group 0: betas must be"),
    "muon momentum": (lambda ps: Muon(ps), {"momentum": 1.0}, "param group 0: momentum must be"),
    "muon nesterov": (lambda ps: Muon(ps), {"nesterov": "no"}, "nesterov must be True or False"),
}


@pytest.mark.parametrize("case", LOAD_BAD_GROUPS)
def test_a_state_dict_with_an_unusable_hyperparameter_is_refused_before_anything_changes(case):
    factory, bad, message = LOAD_BAD_GROUPS[case]
    p, opt = _stepped(factory, (4, 8))
    saved = opt.state_dict()
    saved["param_groups"][0].update(bad)
    groups, state = copy.deepcopy(opt.param_groups), copy.deepcopy(opt.state[p])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert all(opt.param_groups[0][k] == groups[0][k] for k in groups[0] if k != "params")
    assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())
    p.grad = torch.ones(4, 8)
    opt.step()  # still usable


# Malformed names, counts or state values: torch installed them, and the next step (and any
# later load) failed on them, so a bad dict left the optimizer unusable
LOAD_BAD_FIELDS = {
    "short param_names": (lambda sd: sd["param_groups"][0].update(param_names=["w"]),
                          "param_names that do not name its 2 parameters"),
    "repeated param_names": (lambda sd: sd["param_groups"][0].update(param_names=["w", "w"]),
                             "param_names that do not name its 2 parameters"),
    "skip count not an int": (lambda sd: sd["param_groups"][0].update(
        nonfinite_skips={"w": None, "v": 0}), "nonfinite_skips that are not counts"),
    "state not a tensor": (lambda sd: sd["state"][0].update(momentum_buffer="buf"),
                           "'momentum_buffer' of parameter 'w' is a str, not a tensor"),
}


@pytest.mark.parametrize("case", LOAD_BAD_FIELDS)
def test_a_state_dict_with_malformed_names_counts_or_state_is_refused_before_anything_changes(
        case):
    spoil, message = LOAD_BAD_FIELDS[case]
    w, v = (nn.Parameter(torch.randn(4, 8)) for _ in range(2))
    opt = Muon([("w", w), ("v", v)], lr=0.02)
    w.grad, v.grad = torch.ones(4, 8), torch.ones(4, 8)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    spoil(saved)
    groups, state = copy.deepcopy(opt.param_groups), copy.deepcopy(opt.state[w])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert all(opt.param_groups[0][k] == groups[0][k] for k in groups[0] if k != "params")
    assert all(torch.equal(x, opt.state[w][k]) for k, x in state.items())
    w.grad, v.grad = torch.ones(4, 8), torch.ones(4, 8)
    opt.step()  # still usable
    opt.load_state_dict(opt.state_dict())


def _named_opt(order, factory, prefix=""):
    torch.manual_seed(0)
    params = {name: nn.Parameter(torch.randn(8, 8)) for name in ("attn.weight", "mlp.weight")}
    return params, factory([(prefix + name, params[name]) for name in order])


@pytest.mark.parametrize("factory", [lambda ps: Muon(ps, lr=0.02), lambda ps: SOAP(ps, lr=3e-3)],
                         ids=["Muon", "SOAP"])
def test_a_state_dict_loads_by_name_into_parameters_listed_in_another_order(factory):
    # torch pairs saved state with parameters by position and then put the saved names in
    # place of the live ones: a parameter got another matrix's state without a word, and
    # health() reported it under the other's name
    params, opt = _named_opt(["attn.weight", "mlp.weight"], factory)
    for scale in (1.0, 100.0, 1.0):
        params["attn.weight"].grad = torch.randn(8, 8)
        params["mlp.weight"].grad = torch.randn(8, 8) * 100.0 * scale
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other, reordered = _named_opt(["mlp.weight", "attn.weight"], factory)
    reordered.load_state_dict(saved)
    assert reordered.param_groups[0]["param_names"] == ["mlp.weight", "attn.weight"]
    for name in params:
        for key, value in opt.state[params[name]].items():
            assert torch.equal(reordered.state[other[name]][key], value), (name, key)
    other["mlp.weight"].grad = torch.randn(8, 8)
    reordered.step()
    assert list(reordered.health()) == ["mlp.weight"]


@pytest.mark.parametrize("factory", [lambda gs: Muon(gs, lr=0.02), lambda gs: SOAP(gs, lr=3e-3)],
                         ids=["Muon", "SOAP"])
@pytest.mark.parametrize("shapes", [((8, 8), (8, 8)), ((8, 8), (6, 4))], ids=["same", "other"])
def test_a_state_dict_loads_by_name_into_groups_listed_in_another_order(factory, shapes):
    # the names were matched within a group only: groups listed in another order took each
    # other's hyperparameters and state, silently where the shapes agree, and where they
    # differ the load was refused as "another model"
    torch.manual_seed(0)
    params = {"attn.weight": nn.Parameter(torch.randn(*shapes[0])),
              "mlp.weight": nn.Parameter(torch.randn(*shapes[1]))}

    def build(order):
        return factory([{"params": [(name, params[name])], "lr": lr, "weight_decay": 0.0}
                        for name, lr in order])

    opt = build([("attn.weight", 0.01), ("mlp.weight", 0.03)])
    for scale in (1.0, 100.0):
        for p in params.values():
            p.grad = torch.randn_like(p) * scale
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    reordered = build([("mlp.weight", 0.5), ("attn.weight", 0.5)])
    reordered.load_state_dict(saved)
    assert [(g["param_names"], g["lr"]) for g in reordered.param_groups] == [
        (["mlp.weight"], 0.03), (["attn.weight"], 0.01)]
    for name, p in params.items():
        for key, value in opt.state[p].items():
            assert torch.equal(reordered.state[p][key], value), (name, key)


def test_a_state_dict_saved_under_other_names_loads_by_position_and_keeps_the_live_names():
    # torch's pairing where the names differ (a model saved under DDP's "module." prefix); the
    # loaded names were the saved ones, so health reported "module.*" for this model
    params, opt = _named_opt(["attn.weight", "mlp.weight"], lambda ps: Muon(ps, lr=0.02),
                             prefix="module.")
    for p in params.values():
        p.grad = torch.full((8, 8), float("nan"))
    opt.step()  # one skip each, counted under the saved names
    for p in params.values():
        p.grad = torch.randn(8, 8)
    opt.step()
    other, fresh = _named_opt(["attn.weight", "mlp.weight"], lambda ps: Muon(ps, lr=0.02))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["param_names"] == ["attn.weight", "mlp.weight"]
    assert fresh.param_groups[0]["nonfinite_skips"] == {"attn.weight": 1, "mlp.weight": 1}
    assert torch.equal(fresh.state[other["mlp.weight"]]["momentum_buffer"],
                       opt.state[params["mlp.weight"]]["momentum_buffer"])


def test_another_split_of_the_parameters_is_named_by_check_state_dict_and_load():
    # torch's load_state_dict counted groups and parameters itself, but only after a loader
    # that writes in place (sharding.checkpoint.load) had asked check_state_dict, which let
    # these through
    w, v = (nn.Parameter(torch.randn(4, 8)) for _ in range(2))
    one = Muon([("w", w), ("v", v)])
    two = Muon([{"params": [("w", w)]}, {"params": [("v", v)], "lr": 0.01}])
    alone = Muon([("w", w)])
    cases = [(two, one.state_dict(), "it has 1 param groups and this optimizer 2"),
             (one, alone.state_dict(), "param group 0 was saved with 1 parameters and has 2"),
             (one, {"state": {}}, "it is not an optimizer state dict")]
    for opt, saved, message in cases:
        for action in (opt.check_state_dict, opt.load_state_dict):
            with pytest.raises(ValueError, match=message):
                action(copy.deepcopy(saved))


def test_state_another_optimizer_keeps_is_refused_by_key():
    _, adamw_like = _stepped(lambda ps: torch.optim.AdamW([p for _, p in ps]), (4, 8))
    _, opt = _stepped(lambda ps: Muon(ps), (4, 8))
    with pytest.raises(ValueError, match=r"state '\w+', which Muon does not keep"):
        opt.load_state_dict(adamw_like.state_dict())


def test_a_torch_muon_checkpoint_resumes_identically():
    # a drop-in switch mid-run: torch.optim.Muon's groups lack our keys, its momentum_buffer is
    # our state; before, the load raised KeyError and left the optimizer unable to step
    ours_p, ref_p = make_params(SHAPES[:3]), make_params(SHAPES[:3])
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.01)
    run(ref, ref_p, 3)
    for p, q in zip(ours_p, ref_p, strict=True):
        p.data.copy_(q.data)
    ours = Muon(ours_p, lr=0.02, weight_decay=0.01)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # a copy, as a file gives it
    assert ours.param_groups[0]["step"] == 0 and ours.param_groups[0]["algorithm"] == "muon"
    run(ref, ref_p, 3, start=3)
    run(ours, ours_p, 3, start=3)
    assert_params_equal(ours_p, ref_p)  # unique shapes: bit for bit


def test_torch_muon_takes_our_checkpoint_and_continues_identically():
    # the switch back: our groups hold keys torch ignores and names for unnamed parameters,
    # which torch keeps (so it refuses an unnamed group until they are deleted, README)
    ours_p, ref_p = make_params(SHAPES[:3]), make_params(SHAPES[:3])
    ours = Muon(ours_p, lr=0.02, weight_decay=0.01)
    run(ours, ours_p, 3)
    for p, q in zip(ref_p, ours_p, strict=True):
        p.data.copy_(q.data)
    saved = copy.deepcopy(ours.state_dict())
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.01)
    ref.load_state_dict(copy.deepcopy(saved))
    run(ours, ours_p, 3, start=3)
    run(ref, ref_p, 3, start=3)
    assert_params_equal(ref_p, ours_p)  # unique shapes: bit for bit
    extra = {"params": [torch.nn.Parameter(torch.randn(4, 4))]}
    with pytest.raises(ValueError, match="with/without names"):
        ref.add_param_group(dict(extra))
    for group in saved["param_groups"]:
        del group["param_names"]
    unnamed = torch.optim.Muon(make_params(SHAPES[:3]), lr=0.02, weight_decay=0.01)
    unnamed.load_state_dict(saved)
    unnamed.add_param_group(extra)
    assert len(unnamed.param_groups) == 2


@pytest.mark.parametrize(("method", "kwargs", "steps_after"), [
    ("quintic", {}, 3), ("cans", {}, 9), ("cans", {"ns_steps": 7}, 7)])
def test_a_torch_muon_checkpoint_keeps_a_non_quintic_groups_step_count(method, kwargs,
                                                                       steps_after):
    # torch.optim.Muon saves ns_steps (its quintic's count) and no ns_method: loaded into a
    # CANS group it set CANS to 5 steps, far from orthogonal; the quintic takes the saved count
    params = make_params(SHAPES[:1])
    ref = torch.optim.Muon(make_params(SHAPES[:1]), lr=0.02, ns_steps=3)
    ours = Muon(params, lr=0.02, ns_method=method, **kwargs)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert ours.param_groups[0]["ns_method"] == method
    assert ours.param_groups[0]["ns_steps"] == steps_after


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_normuon_second_moment_stays_float32_through_a_round_trip(dtype):
    # torch's load_state_dict casts every state tensor to the parameter's dtype: a bf16
    # parameter's float32 second moment lost its precision, and the resumed run drifted
    def steps(opt, params, start):
        for t in range(start, start + 2):
            for p, gr in zip(params, grads_for(params, t), strict=True):
                p.grad = gr.to(dtype)
            opt.step()

    params = [nn.Parameter(p.detach().to(dtype)) for p in make_params()]
    opt = NorMuon(params, lr=0.02)
    steps(opt, params, 0)
    saved = copy.deepcopy(opt.state_dict())
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = NorMuon(clone, lr=0.02)
    fresh.load_state_dict(saved)
    assert all(fresh.state[p]["second_moment"].dtype == torch.float32 for p in clone)
    assert all(fresh.state[p]["momentum_buffer"].dtype == dtype for p in clone)
    steps(opt, params, 2)
    steps(fresh, clone, 2)
    assert_params_equal(params, clone)


# ---- ns_steps not given: each method's own count ----------------------------------------------

@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
@pytest.mark.parametrize("method", ["quintic", "polar_express", "cans"])
def test_unset_ns_steps_runs_the_methods_own_count(opt_cls, method):
    # the quintic keeps torch.optim.Muon's 5; Polar Express and CANS run their bf16 counts (6,
    # 9): at 5 CANS is less orthogonal than the quintic. Bit-identical to naming the count.
    count = default_steps(method, torch.bfloat16)
    params, clone = make_params(), make_params()
    opt = opt_cls(params, lr=0.02, ns_method=method)
    named = opt_cls(clone, lr=0.02, ns_method=method, ns_steps=count)
    assert opt.param_groups[0]["ns_steps"] == count
    assert type(opt.param_groups[0]["ns_steps"]) is int  # a plain int: see the next test
    run(opt, params, 2)
    run(named, clone, 2)
    assert_params_equal(params, clone)


def test_unset_ns_steps_follows_each_groups_method_and_a_given_count_is_kept():
    a, b, c, d = (nn.Parameter(torch.zeros(8, 4)) for _ in range(4))
    opt = Muon([{"params": [a]}, {"params": [b], "ns_method": "cans"},
                {"params": [c], "ns_method": "cans", "ns_steps": 5}], lr=0.02)
    opt.add_param_group({"params": [d], "ns_method": "polar_express"})
    assert [g["ns_steps"] for g in opt.param_groups] == [5, 9, 5, 6]
    given = Muon([nn.Parameter(torch.zeros(8, 4))], ns_method="cans", ns_steps=5)
    assert given.param_groups[0]["ns_steps"] == 5
    # the state dict holds plain values, so torch.load's default weights_only reads it back
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert [g["ns_steps"] for g in loaded["param_groups"]] == [5, 9, 5, 6]


def test_unset_ns_steps_with_an_adamw_group_and_svd():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    opt = Muon(split_param_groups(model.named_parameters()), lr=0.02, ns_method="svd")
    assert all(type(g["ns_steps"]) is int for g in opt.param_groups)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # raises on a class it does not know


# ---- argument types and duplicates ------------------------------------------------------------

ARG_TYPE_CASES = [
    (Muon, {"nesterov": "False"}, "nesterov must be True or False"),  # a true string
    (Muon, {"ns_steps": True}, "ns_steps must be an int"),
    (Muon, {"softening": True}, "softening must be a number in"),
    (Muon, {"health_every": True}, "health_every must be an int"),
    (Muon, {"lr": torch.tensor([0.1, 0.2])}, "lr must be a number or a one-element"),
    (Muon, {"lr": "0.02"}, r"lr must be a finite number >= 0, got '0.02' \(str\)"),
    (NorMuon, {"nesterov": 1}, "nesterov must be True or False"),
    (SOAP, {"nesterov": "false"}, "nesterov must be True or False"),
    (SOAP, {"use_eigh": 1}, "use_eigh must be True or False"),
    (SOAP, {"correct_bias": None}, "correct_bias must be True or False"),
    (SOAP, {"use_kl_shampoo": "yes"}, "use_kl_shampoo must be True or False"),
    (SOAP, {"eps": float("inf")}, "eps must be a finite number > 0"),
]


@pytest.mark.parametrize(("opt_cls", "bad", "message"), ARG_TYPE_CASES)
def test_arguments_of_the_wrong_type_are_refused_by_name(opt_cls, bad, message):
    kwargs = {"lr": 0.01, **bad}
    with pytest.raises(ValueError, match=message):
        opt_cls(make_params(), **kwargs)


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_numpy_scalars_are_numbers_for_hyperparameters_and_schedulers(opt_cls):
    # a LambdaLR returning np.float32 wrote it into the group; the per-step check refused it
    import numpy as np  # matplotlib's dependency, installed with the project

    params = make_params(SHAPES[:2])
    opt = opt_cls(params, lr=np.float32(0.02), weight_decay=np.float32(0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: np.float32(0.5) ** step)
    for t in range(3):
        run(opt, params, 1, start=t)
        sched.step()
    assert float(opt.param_groups[0]["lr"]) == float(np.float32(0.02) * np.float32(0.5)**3)


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_numpy_counts_step_and_checkpoint_as_python_ints(opt_cls, tmp_path):
    # health_probes=np.int64(16) passed the constructor, then every step raised inside the
    # compute (NorMuon's second moments moved each time); ns_steps=np.int64(5) stayed NumPy in
    # the group, and torch.load's weights_only refused the checkpoint
    import numpy as np

    params = make_params(SHAPES[:2])
    given = opt_cls(params, lr=0.02, health_probes=np.int64(2), ns_steps=np.int64(5))
    ints = [nn.Parameter(p.detach().clone()) for p in params]
    plain = opt_cls(ints, lr=0.02, health_probes=2, ns_steps=5)
    run(given, params, 2)
    run(plain, ints, 2)
    for p, q in zip(params, ints, strict=True):
        assert torch.equal(p, q)
    assert given.health() == plain.health()
    torch.save(given.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt")  # weights_only, torch's default
    assert type(loaded["param_groups"][0]["ns_steps"]) is int


def test_an_unnamed_group_is_named_past_the_names_given():
    # "group1.param0" given by the user in group 0 and the generated name of group 1 collided:
    # refused as "given twice", though the user gave it once
    p, q = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    opt = Muon([{"params": [("group1.param0", p)]}, {"params": [q]}], lr=0.02)
    assert [g["param_names"] for g in opt.param_groups] == [["group1.param0"], ["group2.param0"]]


def test_muon_refuses_an_unknown_keyword_as_torch_muon_does():
    with pytest.raises(TypeError, match="nesterof"):
        Muon(make_params(), nesterof=False)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_the_same_tensor_twice_is_refused(opt_cls):
    # torch only warns within a group; it was stepped (and weight-decayed) twice per step
    w = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match="'b' is the same tensor as 'a'"):
        opt_cls([("a", w), ("b", w)], lr=0.01)


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_a_hyperparameter_changed_after_construction_is_refused_before_the_step(opt_cls):
    # group 1 broken by user code after construction: the step refuses it before group 0's
    # state, parameters or step counters move
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5, 3))
    opt = opt_cls([{"params": [("a", a)]}, {"params": [("b", b)]}], lr=0.01)
    a.grad, b.grad = torch.randn(6, 4), torch.randn(5, 3)
    opt.step()
    before = (a.detach().clone(), copy.deepcopy(opt.state[a]),
              [g["step"] for g in opt.param_groups])
    opt.param_groups[1]["lr"] = -0.5
    with pytest.raises(ValueError, match="param group 1: lr must be a finite number >= 0"):
        opt.step()
    assert torch.equal(a, before[0]) and [g["step"] for g in opt.param_groups] == before[2]
    assert all(torch.equal(v, opt.state[a][k]) for k, v in before[1].items())


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
@pytest.mark.parametrize(("group", "algorithm", "message"), [
    # a typo ran the group as the matrix update; the constructor refuses the same value
    (0, "AdamW", "param group 0: algorithm must be"),
    # a 1-D bias sent to the matrix update failed mid-step (an IndexError), its step counted
    (1, None, "parameter 'b' has shape \\(5,\\)"),
])
def test_an_algorithm_edited_after_construction_is_refused_before_the_step(
        opt_cls, group, algorithm, message):
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(5))
    opt = opt_cls([{"params": [("a", a)]}, {"params": [("b", b)], "algorithm": "adamw"}],
                  lr=0.01)
    a.grad, b.grad = torch.randn(6, 4), torch.randn(5)
    opt.step()
    before = (a.detach().clone(), b.detach().clone(), copy.deepcopy(opt.state[a]),
              [g["step"] for g in opt.param_groups])
    opt.param_groups[group]["algorithm"] = algorithm or opt.param_groups[0]["algorithm"]
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert [g["step"] for g in opt.param_groups] == before[3]
    assert all(torch.equal(v, opt.state[a][k]) for k, v in before[2].items())


def test_same_shape_matrices_of_different_dtypes_in_one_group_step():
    # stacked together, float32 and float64 promoted to float64 and the float32 state refused
    # the float64 gradient mid-step
    a = nn.Parameter(torch.randn(6, 4))
    b = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    for opt_cls in (Muon, NorMuon, SOAP):
        opt = opt_cls([("a", a), ("b", b)], lr=0.01)
        alone = [opt_cls([(n, nn.Parameter(p.detach().clone()))], lr=0.01) for n, p in
                 (("a", a), ("b", b))]
        for _ in range(2):
            ga, gb = torch.randn(6, 4), torch.randn(6, 4, dtype=torch.float64)
            a.grad, b.grad = ga, gb
            opt.step()
            for single, g in zip(alone, (ga, gb), strict=True):
                single.param_groups[0]["params"][0].grad = g.clone()
                single.step()
        for single, p in zip(alone, (a, b), strict=True):  # each in its own batch
            assert torch.equal(single.param_groups[0]["params"][0], p)
            assert p.dtype == single.param_groups[0]["params"][0].dtype


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
def test_a_gradient_whose_norm_overflows_is_skipped_and_counted_not_a_silent_zero_update(method):
    # finite entries overflowing the Frobenius norm (Nesterov's update here is ~0.1 of the
    # gradient: ~1e19 entries, 2.3e39 for the sum of squares): Newton-Schulz divided by Inf
    # and returned zeros, an uncounted step of weight decay alone with orthogonality_error 1.0
    w = nn.Parameter(torch.randn(6, 4))
    opt = Muon([("w", w)], lr=0.02, ns_method=method)
    w.grad = torch.full((6, 4), 1e20)
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w, before)
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.zeros(6, 4))
    assert opt.health()["w"]["nonfinite_skips"] == 1.0
    w.grad = torch.randn(6, 4)
    opt.step()
    assert not torch.equal(w, before)


def test_normuon_keeps_a_matrix_without_columns_finite():
    e = nn.Parameter(torch.zeros(5, 0))
    opt = NorMuon([("e", e)], lr=0.01)
    e.grad = torch.zeros(5, 0)
    opt.step()
    assert torch.equal(opt.state[e]["second_moment"], torch.zeros(5, 1))


@pytest.mark.parametrize("normuon_eps", [0.0, 1e-30])
def test_normuon_trains_a_matrix_with_a_dead_row_at_any_accepted_eps(normuon_eps):
    # a row without gradient (a dead neuron) has second moment 0: at eps = 0 its 0 * 1/0 made
    # the update NaN, and at eps = 1e-30 its inv^2 overflowed float32 (0 * inf), so the matrix
    # was skipped as non-finite at every step
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    opt = NorMuon([("w", w)], lr=0.02, normuon_eps=normuon_eps)
    for _ in range(3):
        g = torch.randn(6, 4)
        g[2] = 0.0
        before = w.detach().clone()
        w.grad = g
        opt.step()
        assert torch.isfinite(w).all() and not torch.equal(before, w.detach())
        assert torch.equal(w.detach()[2], before[2] * (1 - 0.02 * 0.1))  # decay only
        assert opt.health()["w"]["nonfinite_skips"] == 0.0
    assert opt.state[w]["second_moment"][2].item() == 0.0


# ---- LR schedulers ----------------------------------------------------------------------------

def test_lr_scheduler_drives_muon_like_torch_muon():
    ours_p, ref_p = make_params(), make_params()
    ours, ref = Muon(ours_p, lr=0.05), torch.optim.Muon(ref_p, lr=0.05)
    s_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    s_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for t in range(6):
        run(ours, ours_p, 1, start=t)
        run(ref, ref_p, 1, start=t)
        s_ours.step()
        s_ref.step()
    assert ours.param_groups[0]["lr"] == 0.05 / 8  # halvings: exact
    assert_params_equal(ours_p, ref_p)


def test_zero_lr_from_scheduler_freezes_parameters():
    params = make_params([(16, 8)])
    opt = Muon(params, lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    before = params[0].detach().clone()
    run(opt, params, 2)
    sched.step()
    assert torch.equal(params[0], before)


# ---- health keyed by name ---------------------------------------------------------------------

def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 4, bias=False))


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_named_parameters_key_health_by_name_with_plain_floats(opt_cls):
    model = tiny_mlp()
    opt = opt_cls(model.named_parameters(), lr=0.02, ns_method="polar_express", ns_steps=8)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    model(x).square().mean().backward()
    opt.step()
    health = opt.health()
    assert set(health) == {"0.weight", "2.weight"}
    for metrics in health.values():
        assert set(metrics) >= {"orthogonality_error", "update_rms", "softening",
                                "nonfinite_skips"}
        assert all(type(v) is float for v in metrics.values())
        assert 0.0 <= metrics["orthogonality_error"] < POLAR_EXPRESS_BF16_ORTHO_MAX
        assert metrics["update_rms"] > 0.0


@pytest.mark.parametrize("opt_cls", [Muon, SOAP])
def test_a_removed_groups_matrices_leave_health(opt_cls):
    # a block frozen by removing its group kept reporting (and publishing) its last values as
    # if they were current
    model = tiny_mlp()
    named = list(model.named_parameters())
    opt = opt_cls([{"params": named[:1]}, {"params": named[1:]}], lr=0.02)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    model(x).square().mean().backward()
    opt.step()
    assert set(opt.health()) == {"0.weight", "2.weight"}
    opt.param_groups.pop(0)
    assert set(opt.health()) == {"2.weight"}
    opt.step()
    assert set(opt.health()) == {"2.weight"}


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_a_state_dict_with_a_group_removed_saves_the_others_and_keeps_the_removed_state(
        opt_cls):
    # torch's packing numbers the groups' parameters: the removed group's state raised KeyError,
    # so nothing could be checkpointed while a block was frozen
    params = make_params()
    opt = opt_cls([{"params": [("a", params[0])]},
                   {"params": [(f"b{i}", p) for i, p in enumerate(params[1:])]}], lr=0.02)
    run(opt, params, 3)
    frozen = opt.param_groups.pop(0)
    kept = {k: v.clone() for k, v in opt.state[params[0]].items()}
    run(opt, params[1:], 2, start=3)
    saved = copy.deepcopy(opt.state_dict())
    assert len(saved["param_groups"]) == 1 and len(saved["state"]) == len(params) - 1
    clone = [nn.Parameter(p.detach().clone()) for p in params[1:]]
    fresh = opt_cls([{"params": [(f"b{i}", p) for i, p in enumerate(clone)]}], lr=0.02)
    fresh.load_state_dict(saved)
    run(opt, params[1:], 2, start=5)
    run(fresh, clone, 2, start=5)
    assert_params_equal(params[1:], clone)
    opt.param_groups.insert(0, frozen)  # the block comes back with the state it left with
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in kept.items())


# Several (shape) batches per step, with the exact Gram (side <= 64) and 2 probes (side 96)
MULTI_SHAPES = [(16, 8), (8, 16), (16, 8), (96, 100), (24, 24)]


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_health_of_a_multi_shape_step_equals_each_matrix_measured_alone(opt_cls):
    # health is gathered over a step's batches and converted once; each matrix's numbers must
    # be the ones its own optimizer reports (the probes are seeded by the step, not the batch)
    params = make_params(MULTI_SHAPES)
    together = opt_cls([(f"w{i}", p) for i, p in enumerate(params)], lr=0.02, health_probes=2)
    alone = [opt_cls([(f"w{i}", q)], lr=0.02, health_probes=2)
             for i, q in enumerate(make_params(MULTI_SHAPES))]
    for t in range(3):
        run(together, together.param_groups[0]["params"], 1, start=t)
        health = together.health()
        assert sorted(health) == [f"w{i}" for i in range(len(MULTI_SHAPES))]
        for i, opt in enumerate(alone):
            opt.param_groups[0]["params"][0].grad = grads_for(params, t)[i].clone()
            opt.step()
            assert health[f"w{i}"] == opt.health()[f"w{i}"]  # the same kernels on the same data


def test_health_every_controls_when_metrics_are_measured():
    params = make_params([(16, 8)])
    off = Muon([("w", params[0])], health_every=0)
    run(off, params, 2)
    assert off.health() == {"w": {"nonfinite_skips": 0.0}}
    every2 = Muon([("w", make_params([(16, 8)])[0])], health_every=2)
    measured = []
    for t in range(5):  # steps 1, 3, 5: step 1, then every 2
        run(every2, every2.param_groups[0]["params"], 1, start=t)
        measured.append(every2.health()["w"].get("orthogonality_error"))
    assert measured[0] is not None and measured[1] == measured[0]
    assert measured[2] not in (None, measured[1]) and measured[3] == measured[2]
    assert measured[4] not in (None, measured[3])
    with pytest.raises(ValueError, match="health_every"):
        Muon(make_params(), health_every=-1)


def test_closure_is_called_and_its_loss_returned():
    model = tiny_mlp()
    opt = Muon(model.parameters(), lr=0.02)
    x = torch.randn(4, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0
    before = copy.deepcopy(model.state_dict())
    opt.step(closure)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- AdamW fallback: non-finite gradients, skip counts in the state dict ------------------------

def _routed_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_adamw_fallback_skips_a_nonfinite_gradient_counts_it_and_trains_on():
    from optim import split_param_groups
    model, ref_model = _routed_model(), _routed_model()
    opt = Muon(split_param_groups(model.named_parameters()), lr=0.02)
    ref = Muon(split_param_groups(ref_model.named_parameters()), lr=0.02)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    for t in range(4):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
        if t == 1:  # a NaN in one bias: that bias is skipped; the reference gets no grad for it
            bias = dict(model.named_parameters())["0.bias"]
            before = bias.detach().clone()
            state_before = {k: v.clone() for k, v in opt.state[bias].items()}
            bias.grad[3] = float("nan")
            dict(ref_model.named_parameters())["0.bias"].grad = None
        opt.step()
        ref.step()
        if t == 1:
            assert torch.equal(bias, before)
            for k, v in state_before.items():
                assert torch.equal(opt.state[bias][k], v), k
            assert opt.health()["0.bias"] == {"nonfinite_skips": 1.0}
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)
    assert "2.bias" not in opt.health()  # never skipped: not reported


def test_nonfinite_skip_counts_survive_a_state_dict_round_trip():
    from optim import split_param_groups
    model = _routed_model()
    names = [n for n, _ in model.named_parameters()]
    opt = Muon(split_param_groups(model.named_parameters()), lr=0.02)
    x = torch.randn(16, 8)
    for bad in ("0.weight", "0.weight", "2.bias"):
        opt.zero_grad()
        model(x).square().mean().backward()
        dict(model.named_parameters())[bad].grad.view(-1)[0] = float("inf")
        opt.step()
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    fresh = Muon(split_param_groups(model.named_parameters()), lr=0.02)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert fresh.health()["2.bias"]["nonfinite_skips"] == 1.0  # AdamW: reported on load
    opt.zero_grad()
    model(x).square().mean().backward()
    fresh.step()
    health = fresh.health()
    assert health["0.weight"]["nonfinite_skips"] == 2.0
    assert health["2.weight"]["nonfinite_skips"] == 0.0
    # the same keys whatever happened (every rank presents identical state dict keys)
    for group in saved["param_groups"]:
        assert set(group["nonfinite_skips"]) <= set(names)
    assert sorted(k for g in saved["param_groups"] for k in g["nonfinite_skips"]) == sorted(names)
    # the saved snapshot does not follow the live counter
    dict(model.named_parameters())["2.bias"].grad.view(-1)[0] = float("inf")
    opt.step()
    assert sum(sum(g["nonfinite_skips"].values()) for g in opt.param_groups) == 4
    assert sum(sum(g["nonfinite_skips"].values()) for g in saved["param_groups"]) == 3


# ---- batches ------------------------------------------------------------------------------

def record_batch_sizes(opt) -> list[int]:
    """The list the size of every batch ``opt`` computes is appended to, from now on."""
    sizes: list[int] = []
    real = opt._compute

    def compute(items, X):
        sizes.append(X.shape[0])
        return real(items, X)

    opt._compute = compute
    return sizes


@pytest.mark.parametrize("factory", [
    lambda p: Muon(p, lr=0.02),
    lambda p: Muon(p, lr=0.02, health_probes=2),  # probes shared by a batch, seeded by the step
    lambda p: NorMuon(p, lr=0.02, softening=0.1),
    lambda p: SOAP(p, lr=3e-3, precondition_frequency=2),
], ids=["muon", "muon_probes", "normuon_soft", "soap"])
def test_max_batch_bytes_cuts_the_batches_and_changes_no_result(factory):
    shapes = [(32, 16)] * 3 + [(16, 8)] * 2
    names = [f"w{i}" for i in range(len(shapes))]
    runs = {}
    for cap in (None, 2 * 32 * 16 * 4):  # default (one batch per shape); two 32x16 per batch
        params = make_params(shapes)
        opt = factory(list(zip(names, params, strict=True)))
        if cap is not None:
            opt.MAX_BATCH_BYTES = cap
        sizes = record_batch_sizes(opt)
        for t in range(4):
            for p, g in zip(params, grads_for(params, t), strict=True):
                p.grad = g
            opt.step()
        runs[cap] = (params, opt.health(), sizes)
    (batched, batched_health, batched_sizes), (cut, cut_health, cut_sizes) = runs.values()
    assert batched_sizes == [3, 2] * 4 and cut_sizes == [2, 1, 2] * 4
    # each matrix reads only its own slice of a batch: bit-identical, health too
    assert all(torch.equal(a, b) for a, b in zip(cut, batched, strict=True))
    assert cut_health == batched_health


MLP_PAIR = [(32, 16), (16, 32)] * 2  # a small block's up (tall) and down (wide) projections


def smaller_merge_bound(p):
    opt = Muon(p, lr=0.02)
    opt.MERGE_ORIENTATIONS_UP_TO = 32 * 16 - 1
    return opt


@pytest.mark.parametrize(("factory", "sizes"), [
    (lambda p: Muon(p, lr=0.02), [4]),  # the tall ones go in transposed, with the wide ones
    (lambda p: Muon(p, lr=0.02, softening=0.2), [4]),
    (lambda p: Muon(p, lr=0.02, ns_method="svd"), [2, 2]),  # SVD keeps the orientation
    (lambda p: NorMuon(p, lr=0.02), [2, 2]),  # normalizes each matrix's rows as they stand
    (smaller_merge_bound, [2, 2]),
], ids=["muon", "muon_soft", "svd", "normuon", "above_bound"])
def test_a_small_tall_matrix_batches_with_the_wide_ones_of_its_transposed_shape(factory, sizes):
    params, alone_p = make_params(MLP_PAIR), make_params(MLP_PAIR)
    opt = factory(list(zip("abcd", params, strict=True)))
    alone = factory(list(zip("abcd", alone_p, strict=True)))
    alone.MAX_BATCH_BYTES = 0
    got = record_batch_sizes(opt)
    run(opt, params, 4)
    run(alone, alone_p, 4)
    assert got == sizes * 4
    # each update comes back in its matrix's orientation, as one matrix alone would have it:
    # one bf16 rounding of a batched product apart at most (batched_atol)
    lr_adj = adjusted_lr(0.02, None, (32, 16))
    assert_params_equal(params, alone_p, atol=batched_atol(lr_adj, 4), rtol=0.0)
    # health of updates that far apart, each a bf16 norm: within BF16_NORM_RTOL (which allows
    # for O differing in the last bit of a few entries)
    health, health_alone = opt.health(), alone.health()
    assert set(health) == set("abcd")
    for name in "abcd":
        for metric, value in health[name].items():
            torch.testing.assert_close(value, health_alone[name][metric],
                                       atol=0.0, rtol=BF16_NORM_RTOL)


def test_muon_merging_orientations_equals_torch_muon_within_a_batched_rounding():
    ours_p, ref_p = make_params(MLP_PAIR), make_params(MLP_PAIR)
    ours, ref = Muon(ours_p, lr=0.02), torch.optim.Muon(ref_p, lr=0.02)
    run(ours, ours_p, 6)
    run(ref, ref_p, 6)
    for shape, p, q in zip(MLP_PAIR, ours_p, ref_p, strict=True):
        assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        torch.testing.assert_close(p, q, atol=batched_atol(adjusted_lr(0.02, None, shape), 6),
                                   rtol=0.0)


@pytest.mark.parametrize("factory", [
    lambda p: Muon(p, lr=0.02),
    lambda p: NorMuon(p, lr=0.02),
    lambda p: SOAP(p, lr=3e-3),
    lambda p: SOAP(p, lr=3e-3, use_eigh=False, precondition_frequency=2),
], ids=["muon", "normuon", "soap", "soap_power"])
def test_matrices_of_unaligned_sizes_step_alike_in_a_batch_and_alone(factory):
    # a batch's second 6x9 matrix starts 216 bytes in, not 16-byte aligned: MKL rounded its
    # products there otherwise than for the same matrix alone, and SOAP stepped it 0.0065
    # apart (a sharded run, whose owners batch other subsets, as much)
    shapes = [(6, 9)] * 3 + [(5, 33)] * 2
    runs = []
    for cap in (None, 1):
        params = make_params(shapes)
        opt = factory(list(zip([f"w{i}" for i in range(5)], params, strict=True)))
        if cap is not None:
            opt.MAX_BATCH_BYTES = cap
        for t in range(4):
            for p, g in zip(params, grads_for(params, t), strict=True):
                p.grad = g
            opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_max_batch_bytes_below_one_matrix_computes_one_matrix_at_a_time():
    params = make_params([(8, 4)] * 2)
    before = [p.detach().clone() for p in params]
    opt = Muon(list(zip("ab", params, strict=True)), lr=0.02)
    opt.MAX_BATCH_BYTES = 0
    sizes = record_batch_sizes(opt)
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    opt.step()
    assert sizes == [1, 1]
    assert not any(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert set(opt.health()) == {"a", "b"}


@pytest.mark.parametrize("bad", [-1, 1.5, "256MiB", True, None])
def test_a_bad_max_batch_bytes_is_refused_before_anything_changes(bad):
    params = make_params([(8, 4), (3,)])
    opt = Muon(split_param_groups([("w", params[0]), ("b", params[1])]), lr=0.02)
    before = [p.detach().clone() for p in params]
    opt.MAX_BATCH_BYTES = bad
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    with pytest.raises(ValueError, match="MAX_BATCH_BYTES must be an int >= 0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(group["step"] == 0 for group in opt.param_groups)


@pytest.mark.parametrize(("opt_cls", "attribute", "bad"), [
    *[(cls, "health_every", bad) for cls in (Muon, NorMuon, SOAP)
      for bad in (-1, 2.5, "3", True, None)],
    *[(Muon, "health_probes", bad) for bad in (-1, 2.5, "16", False)],
])
def test_a_bad_health_setting_set_on_the_instance_is_refused_before_anything_changes(
        opt_cls, attribute, bad):
    # Both are constructor arguments and attributes a user may set later (health_every = 0 to
    # stop measuring); a bad one used to fail mid-step after the step counters moved ('3',
    # None), or to be taken silently (2.5 measured at no step, -1 at every step).
    params = make_params([(8, 4), (6, 4), (3,)])
    opt = opt_cls(split_param_groups([("a", params[0]), ("b", params[1]), ("c", params[2])]),
                  lr=0.02)
    before = [p.detach().clone() for p in params]
    setattr(opt, attribute, bad)
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    with pytest.raises(ValueError, match=f"{attribute} must be "):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(group["step"] == 0 for group in opt.param_groups)
    assert opt.state == {} or all(not s for s in opt.state.values())
    setattr(opt, attribute, 2 if attribute == "health_every" else 4)  # good again: it steps
    opt.step()
    assert not any(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert set(opt.health()) == {"a", "b"}


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon])
def test_another_optimizers_momentum_of_the_same_shape_is_refused(opt_cls):
    # an SGD state dict (momentum_buffer of Muon's shape, another rule; lr 0.5, dampening)
    # loaded silently into Muon and NorMuon, and torch.optim.Muon's into NorMuon
    sources = [torch.optim.SGD, lambda ps: torch.optim.Muon(ps, lr=0.02)]
    for make in sources[:1] if opt_cls is Muon else sources:
        params = make_params(SHAPES[:2])
        other = make(params) if make is not torch.optim.SGD else make(params, lr=0.5,
                                                                     momentum=0.9)
        for p, g in zip(params, grads_for(params, 0), strict=True):
            p.grad = g
        other.step()
        ours = opt_cls(params, lr=0.02)
        before = copy.deepcopy(ours.state_dict())
        with pytest.raises(ValueError, match=r"param group 0 has no 'algorithm' and is not a "
                                             r"torch\.optim\.Muon group"):
            ours.load_state_dict(other.state_dict())
        assert ours.state_dict() == before  # nothing changed
    ours = Muon(make_params(SHAPES[:2]), lr=0.02)  # torch.optim.Muon's still loads into Muon
    ours.load_state_dict(torch.optim.Muon(make_params(SHAPES[:2])).state_dict())


def test_an_adamw_state_cut_short_is_refused_before_anything_changes():
    # accepted, and the next step raised KeyError: 'exp_avg_sq'
    w, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(3))
    opt = Muon([{"params": [("w", w)]}, {"params": [("b", b)], "algorithm": "adamw"}], lr=0.02)
    w.grad, b.grad = torch.randn(6, 4), torch.randn(3)
    opt.step()
    cut = copy.deepcopy(opt.state_dict())
    del cut["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match="parameter 'b' has state without exp_avg_sq, which "
                                         "Muon keeps with the rest: the state dict was cut"):
        opt.load_state_dict(cut)
    w.grad, b.grad = torch.randn(6, 4), torch.randn(3)
    opt.step()  # unchanged state: it steps


@pytest.mark.parametrize("opt_cls", [Muon, NorMuon, SOAP])
def test_a_step_that_raises_before_any_matrix_moved_does_not_count(opt_cls, monkeypatch):
    # On the sharded path an exception raised before any parameter changed takes the step
    # counters back; one process kept them moved, so each failed attempt shifted softening
    # schedules and health_every. An exception after a batch stepped leaves the count: that
    # step happened, in part.
    params = make_params([(8, 4), (6, 4), (3,)])
    opt = opt_cls(split_param_groups([("a", params[0]), ("b", params[1]), ("c", params[2])]),
                  lr=0.02)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads_for(params, 0), strict=True):
        p.grad = g
    real_apply, calls = type(opt)._apply, []

    def failing_apply(self, item, update):
        calls.append(item.name)
        if len(calls) in fail_at:
            raise RuntimeError("apply failed")
        return real_apply(self, item, update)

    monkeypatch.setattr(type(opt), "_apply", failing_apply)
    fail_at = {1}
    with pytest.raises(RuntimeError, match="apply failed"):
        opt.step()
    assert all(group["step"] == 0 for group in opt.param_groups)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    fail_at = {3}  # the second matrix (a batch of its own shape) fails after the first moved
    with pytest.raises(RuntimeError, match="apply failed"):
        opt.step()
    assert all(group["step"] == 1 for group in opt.param_groups)
    fail_at = set()
    opt.step()
    assert all(group["step"] == 2 for group in opt.param_groups)


def test_a_muon_pickled_when_its_argument_rules_lived_in_optim_muon_loads() -> None:
    # a whole Muon pickled (torch.save) keeps its defaults' unset ns_steps marker by class
    # path; the class moved to optim._muon_args and the old pickles failed to load
    import pickle

    opt = Muon([torch.nn.Parameter(torch.randn(4, 3))])
    old = pickle.dumps(opt.defaults, protocol=0).replace(b"optim._muon_args", b"optim.muon")
    assert b"optim.muon\n_UnsetSteps" in old
    loaded = pickle.loads(old)
    assert loaded["ns_steps"] == 5 and type(loaded["ns_steps"]).__name__ == "_UnsetSteps"

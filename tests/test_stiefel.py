"""optim.stiefel: tangent spaces, retractions and the seed-003 feedback system."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from optim._matmul import count_matmuls
from optim.health import orthogonality_error
from optim.orthogonalize import orthogonalize
from optim.stiefel import (
    FeedbackConfig,
    StiefelFeedbackSystem,
    cayley_retract,
    feedback_update,
    polar_retract,
    qr_retract,
    random_stiefel,
    tangent_project,
)

# The bar: U^T U = I to 1e-6 in fp32 after 1,000 retraction steps (a fresh float32 QR
# frame meets it too: the feedback system's 8x100 C measured 4.8e-7).
ORTHO_FP32 = 1e-6
# float64 products of 64-long columns with entries up to ~3: rounding ~64 * 1.1e-16 * 3 = 2e-14 at
# worst (measured 2.2e-15); 1e-12 is 50x the worst case.
FP64_ATOL = 1e-12
# Without its Newton-Schulz polish the Cayley retraction drifts like a random walk,
# ~sqrt(steps) * u = 32 * 6e-8 = 2e-6 after 1,000 steps (measured 1.9e-6); 5x margin.
CAYLEY_DRIFT_1000_UNPOLISHED = 1e-5
# fp32 rounding of a few products on 64 x 8 frames, relative to O(1) entries.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5
# qr_retract of a 64x8 matrix moved by 1e-4 moves by ~5e-5 (measured); a flipped column's sign
# would move entries by O(0.1-1)
QR_CONTINUITY_MAX = 1e-2
# central difference at t = 1e-6 in float64: truncation ~t^2 = 1e-12, rounding ~eps / t ~ 2e-10
# on O(1) entries (measured 9.3e-11); 100x above
FD_ATOL, FD_RTOL = 1e-8, 1e-8
# float32 polar_retract against the float64 SVD polar factor: fp32 rounding of the Newton-Schulz
# products, measured 5.8e-7 on entries up to 0.43
POLAR_FP32_ATOL, POLAR_FP32_RTOL = 1e-5, 1e-5
# the feedback system's learned frame against the planted one after 200 steps: measured 4.2e-7
# (the planted map is noiseless, so it converges to fp32 rounding); 1e-4 still fails a frame
# that is only roughly aligned
LEARNED_FRAME_ATOL = 1e-4
# ... and its least-squares gain against the planted scale 2: the gain's EMA (0.05) of noisy
# per-step targets, measured 1.995; 0.1 (5%) still fails a gain that missed the scale.
PLANTED_GAIN_ATOL = 0.1


@pytest.fixture
def one_thread():
    """1,000 tiny LAPACK calls: thread start-up dominates and the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def frame(d: int = 64, r: int = 8, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return random_stiefel(d, r, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_tangent_project_gives_tangent_vectors_and_is_a_projection():
    U = frame(dtype=torch.float64)
    G = torch.randn(64, 8, dtype=torch.float64)
    D = tangent_project(U, G)
    torch.testing.assert_close(U.T @ D + D.T @ U, torch.zeros(8, 8, dtype=torch.float64),
                               atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(tangent_project(U, D), D, atol=FP64_ATOL, rtol=0)
    # a float32 frame with a float64 gradient (or the reverse) raised torch's matmul dtype
    # error; cayley_retract promoted them: now both do
    for u, g in ((U.float(), G), (U, G.float())):
        mixed = tangent_project(u, g)
        assert mixed.dtype == torch.float64
        torch.testing.assert_close(mixed, tangent_project(u.double(), g.double()), atol=0, rtol=0)


def test_qr_retract_is_sign_fixed_identity_on_the_manifold_and_continuous():
    U = frame()
    torch.testing.assert_close(qr_retract(U), U, atol=FP32_ATOL, rtol=FP32_RTOL)
    X = torch.randn(64, 8)
    nearby = qr_retract(X + 1e-4 * torch.randn(64, 8))
    assert (qr_retract(X) - nearby).abs().max() < QR_CONTINUITY_MAX  # no column flips
    assert torch.all(torch.diagonal(qr_retract(X).T @ X) > 0)  # diag(R) > 0


def test_qr_retract_keeps_orthonormal_to_1e6_after_1000_steps(one_thread):
    U = frame()
    g = torch.Generator().manual_seed(3)
    for _ in range(1000):
        D = tangent_project(U, torch.randn(64, 8, generator=g))
        U = qr_retract(U + 0.05 * D)
    assert orthogonality_error(U) <= ORTHO_FP32


def test_cayley_retract_stays_on_manifold_for_1000_steps_and_moves_along_projection(one_thread):
    U = frame()
    g = torch.Generator().manual_seed(4)
    raw = U.clone()
    for _ in range(1000):
        G = torch.randn(64, 8, generator=g)
        U = cayley_retract(U, G, 0.05)
        raw = cayley_retract(raw, G, 0.05, polish=False)
    assert orthogonality_error(U) <= ORTHO_FP32
    assert orthogonality_error(raw) <= CAYLEY_DRIFT_1000_UNPOLISHED
    U64, G = frame(dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    t = 1e-6
    velocity = (cayley_retract(U64, G, t) - cayley_retract(U64, G, -t)) / (2 * t)
    torch.testing.assert_close(velocity, tangent_project(U64, G), atol=FD_ATOL, rtol=FD_RTOL)


def test_polar_retract_matches_svd_polar_factor():
    X = frame(dtype=torch.float64) + 0.1 * torch.randn(64, 8, dtype=torch.float64)
    ref = orthogonalize(X, method="svd", dtype=torch.float64)
    torch.testing.assert_close(polar_retract(X.float()).double(), ref, atol=POLAR_FP32_ATOL,
                               rtol=POLAR_FP32_RTOL)
    assert orthogonality_error(polar_retract(X.float())) <= ORTHO_FP32


@pytest.mark.parametrize("kernel", [qr_retract, polar_retract])
def test_retractions_batched_equal_per_frame(kernel):
    X = torch.randn(3, 32, 4)
    torch.testing.assert_close(kernel(X), torch.stack([kernel(x) for x in X]),
                               atol=FP32_ATOL, rtol=FP32_RTOL)


def test_cayley_retract_broadcasts_one_frame_over_a_batch_of_g():
    # torch.cat refused the (d, r) frame next to the (B, d, r) tangent: "same number of dims"
    U, G = frame(32, 4), torch.randn(3, 32, 4)
    Y = cayley_retract(U, G, 0.1)
    torch.testing.assert_close(Y, torch.stack([cayley_retract(U, g, 0.1) for g in G]),
                               atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(Y, cayley_retract(U.expand_as(G), G, 0.1), atol=FP32_ATOL,
                               rtol=FP32_RTOL)


@pytest.mark.parametrize("shape", [(256, 256), (128, 128), (64, 56), (64, 34), (128, 70),
                                   (512, 64), (64, 32)])
def test_cayley_retract_stays_orthonormal_for_long_steps(shape):
    # the 2r x 2r Woodbury system I - t/2 B^T A is not normal: solved in float32 it left frames
    # up to 8e-2 from orthonormal at t = 1e3, even after the polish (worst where 2r > d; 64 x 34:
    # 8.9e-4, 512 x 64: 5.7e-6)
    g = torch.Generator().manual_seed(5)
    U, G = frame(*shape, seed=5), torch.randn(*shape, generator=g)
    for t in (1e3, 1e5):
        assert orthogonality_error(cayley_retract(U, G, t)) <= ORTHO_FP32


def test_integer_frames_and_directions_are_refused():
    # qr_retract returned zeros and cayley_retract garbage in int64; tangent_project failed
    # inside the product
    X = torch.tensor([[3, 1], [4, 2], [0, 5]])
    U = frame(3, 2)
    for call in (lambda: qr_retract(X), lambda: cayley_retract(X, X, 0.1),
                 lambda: tangent_project(X, X)):
        with pytest.raises(ValueError, match="real floating-point frame"):
            call()
    for call in (lambda: cayley_retract(U, X, 0.1), lambda: tangent_project(U, X)):
        with pytest.raises(ValueError, match="G must be a real floating-point"):
            call()


def test_cayley_retract_takes_numpy_steps_and_refuses_bools():
    # np.float32(0.1) was refused as "t must be a finite number"; True was taken as 1
    U, G = frame(), torch.randn(64, 8)
    for t in (np.float32(0.1), np.float64(0.1)):
        torch.testing.assert_close(cayley_retract(U, G, t), cayley_retract(U, G, 0.1),
                                   atol=FP32_ATOL, rtol=FP32_RTOL)
    for t in (True, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="t must be a finite real number"):
            cayley_retract(U, G, t)


def test_cayley_retract_counts_its_products():
    with count_matmuls() as counted:
        cayley_retract(frame(), torch.randn(64, 8), 0.1, polish=False)
    # U^T G, U (U^T G), B^T A, B^T U, A (.), and the 2r x 2r solve recorded as one.
    assert counted.products == 6
    with count_matmuls() as counted:
        cayley_retract(frame(), torch.randn(64, 8), 0.1)
    assert counted.products == 6 + 2  # the polish: Y^T Y and Y (Y^T Y)


def test_random_stiefel_takes_numpy_ints_and_refuses_bools():
    import numpy as np  # a dependency (matplotlib's, and the bench's): never skipped

    U = random_stiefel(np.int64(6), np.int32(2), generator=torch.Generator().manual_seed(0))
    assert U.shape == (6, 2)
    torch.testing.assert_close(U.T @ U, torch.eye(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs ints"):  # a raw TypeError from torch.randn
        random_stiefel(True, True)


def test_stiefel_tools_name_a_non_tensor_input():
    import numpy as np

    for call in (lambda: qr_retract(np.zeros((3, 2))),
                 lambda: tangent_project(torch.zeros(3, 2), np.zeros((3, 2)))):
        with pytest.raises(TypeError, match=r"needs a torch\.Tensor, got ndarray"):
            call()


def test_frames_with_fewer_rows_than_columns_are_refused():
    for call in (lambda: qr_retract(torch.zeros(3, 5)), lambda: random_stiefel(3, 5),
                 lambda: tangent_project(torch.zeros(3, 5), torch.zeros(3, 5))):
        with pytest.raises(ValueError, match=r"d >= r|r <= d"):
            call()


def test_feedback_config_validates_when_built():
    with pytest.raises(ValueError, match="EMA rate"):
        FeedbackConfig(ema=1.5)
    with pytest.raises(ValueError, match="gain_min <= gain_init"):
        FeedbackConfig(gain_init=100.0)
    with pytest.raises(ValueError, match="max_step_norm"):
        FeedbackConfig(max_step_norm=0.0)
    # a TypeError from the comparison, or (eps=inf) accepted with every gain target read as 0
    for field, value in (("ema", "0.9"), ("eps", None), ("eps", float("inf")),
                         ("gain_max", float("nan")), ("max_step_norm", "1")):
        with pytest.raises(ValueError, match=field):
            FeedbackConfig(**{field: value})


def test_feedback_system_shapes_and_bad_ranks():
    with pytest.raises(ValueError, match="rank"):
        StiefelFeedbackSystem(16, [64], rank=32)
    with pytest.raises(ValueError, match="lower rank"):
        StiefelFeedbackSystem(100, [64, 8], rank=16)
    system = StiefelFeedbackSystem(100, [64, 32], rank=8,
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(system.C @ system.C.T, torch.eye(8), atol=ORTHO_FP32, rtol=0)
    c = system.compress_error(torch.randn(2, 5, 100))
    assert [tuple(d.shape) for d in system.compute_deltas(c)] == [(2, 5, 64), (2, 5, 32)]


def test_feedback_learns_a_planted_expander_and_reports_diagnostics(one_thread):
    torch.manual_seed(0)
    # The step is lr * alpha * D: lr * alpha ~ 0.4 here; much larger oscillates (measured).
    config = FeedbackConfig(lr=0.2, ema=0.5, gain_ema=0.05)
    system = StiefelFeedbackSystem(50, [24], rank=4, config=config,
                                   generator=torch.Generator().manual_seed(1))
    target = frame(24, 4, seed=9)
    for _ in range(200):
        c = system.compress_error(torch.randn(64, 50))
        diag = system.update_all([2.0 * c @ target.T], c)[0]
    U = system.layers[0].U
    torch.testing.assert_close(U.T @ target, torch.eye(4), atol=LEARNED_FRAME_ATOL, rtol=0)
    assert diag["correlation"] > 0.9  # cosine of G and U; sampling noise in G keeps it < 1
    assert abs(diag["gain"] - 2.0) < PLANTED_GAIN_ATOL  # the gain found the planted scale
    assert diag["orthogonality_error"] <= ORTHO_FP32
    assert set(diag) >= {"cross_cov_norm", "step_norm", "step_clipped", "gain_target"}


def run_planted_feedback(lr: float, *, anti_correlated: bool = False,
                         steps: int = 200) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    """The planted map ``g = 2 c target^T`` (ema 0.5, gain_ema 0.05): diagnostics and U per
    step. ``anti_correlated`` plants ``-U`` of the initial frame."""
    g = torch.Generator().manual_seed(2)
    config = FeedbackConfig(lr=lr, ema=0.5, gain_ema=0.05)
    system = StiefelFeedbackSystem(50, [24], rank=4, config=config,
                                   generator=torch.Generator().manual_seed(1))
    layer = system.layers[0]
    target = -layer.U.clone() if anti_correlated else frame(24, 4, seed=9)
    diags, frames = [], []
    for _ in range(steps):
        c = system.compress_error(torch.randn(64, 50, generator=g))
        diags.append(system.update_all([2.0 * c @ target.T], c)[0])
        frames.append(layer.U.clone())
    return diags, frames


def test_feedback_anti_correlated_start_drives_the_gain_to_its_floor_and_stalls(one_thread):
    # the step is lr * alpha * D: the least-squares gain of an anti-aligned U is negative, so
    # alpha is clamped toward gain_min and U barely moves (measured: 1.0e-4, correlation < -0.92)
    diags, _ = run_planted_feedback(0.2, anti_correlated=True)
    assert diags[-1]["gain"] <= 2 * FeedbackConfig().gain_min
    assert all(d["correlation"] < -0.9 for d in diags[100:])


def test_feedback_step_far_above_half_oscillates(one_thread):
    # lr * alpha ~ 0.4 settles (correlation mean 0.97 over the last 50 steps, measured); ~5
    # overshoots: each step of U reverses the last (mean cosine -0.98) and the correlation
    # swings over 0.67-0.89 (mean 0.80)
    diags, _ = run_planted_feedback(0.2)
    assert 0.3 < 0.2 * diags[-1]["gain"] < 0.5
    assert sum(d["correlation"] for d in diags[-50:]) / 50 > 0.95
    diags, frames = run_planted_feedback(3.0)
    assert 3.0 * diags[-1]["gain"] > 4.0
    tail = [d["correlation"] for d in diags[-50:]]
    assert sum(tail) / 50 < 0.85 and max(tail) - min(tail) > 0.15
    moves = [b - a for a, b in pairwise(frames[-51:])]
    cosines = [float((m * n).sum() / (m.norm() * n.norm())) for m, n in pairwise(moves)]
    assert sum(cosines) / len(cosines) < -0.9


def test_feedback_refuses_a_code_of_the_wrong_rank():
    # a (N, 1) code was broadcast over the rank-4 expander without a word
    U, ema, alpha = frame(16, 4), torch.zeros(16, 4), torch.tensor(0.1)
    for c in (torch.randn(32, 1), torch.randn(32, 3)):
        with pytest.raises(ValueError, match=r"c \(\.\.\., 4\)"):
            feedback_update(U, ema, alpha, torch.randn(32, 16), c, config=FeedbackConfig())
    assert not ema.any()


def test_feedback_skips_a_non_finite_signal_counts_it_and_trains_on():
    # one NaN went into the EMA, then U and the gain, and every later diagnostic read NaN
    system = StiefelFeedbackSystem(50, [40], rank=8, generator=torch.Generator().manual_seed(0))
    layer = system.layers[0]
    g = torch.Generator().manual_seed(1)
    c = system.compress_error(torch.randn(2, 50, generator=g))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        signal = torch.randn(2, 40, generator=g)
        signal[0, 0] = bad
        (diag,) = system.update_all([signal], c)
        assert diag["nonfinite"] == 1.0
        for key, value in layer.state_dict().items():
            if key != "nonfinite_skips":  # the count, which does change
                assert torch.equal(value, before[key]), key
    assert diag["nonfinite_skips"] == 2.0
    (diag,) = system.update_all([torch.randn(2, 40, generator=g)], c)
    assert diag["nonfinite"] == 0.0 and diag["nonfinite_skips"] == 2.0
    assert all(math.isfinite(value) for value in diag.values())
    assert not torch.equal(layer.U, before["U"])
    assert orthogonality_error(layer.U) <= ORTHO_FP32


def test_feedback_frozen_only_accumulates_and_step_is_clipped():
    U, ema = frame(16, 4), torch.zeros(16, 4)
    alpha = torch.tensor(0.1)
    U0 = U.clone()
    c, g = torch.randn(32, 4), torch.randn(32, 16)
    diag = feedback_update(U, ema, alpha, g, c, config=FeedbackConfig(), frozen=True)
    assert torch.equal(U, U0) and ema.abs().sum() > 0 and diag["frozen"] == 1.0
    diag = feedback_update(U, ema, alpha, 1e3 * g, c, config=FeedbackConfig(max_step_norm=1e-3))
    assert diag["step_clipped"] == 1.0 and diag["step_norm"] > 1e-3


def test_the_skip_count_survives_a_state_dict_round_trip():
    # it was a plain attribute: a layer loaded from a state_dict started again from 0
    system = StiefelFeedbackSystem(50, [40], rank=8, generator=torch.Generator().manual_seed(0))
    c = system.compress_error(torch.randn(2, 50))
    system.update_all([torch.full((2, 40), float("nan"))], c)
    saved = system.layers[0].state_dict()
    fresh = StiefelFeedbackSystem(50, [40], rank=8).layers[0]
    fresh.load_state_dict(saved)
    assert int(fresh.nonfinite_skips) == 1
    (diag,) = system.update_all([torch.randn(2, 40)], c)
    assert diag["nonfinite_skips"] == 1.0
    # a state saved before the count was kept loads, counting from zero
    fresh.load_state_dict({k: v for k, v in saved.items() if k != "nonfinite_skips"})
    assert int(fresh.nonfinite_skips) == 0


@pytest.mark.parametrize("lr", [math.inf, math.nan, -1.0, True])
def test_feedback_config_refuses_a_rate_that_is_not_finite_and_nonnegative(lr):
    # lr=inf turned U all NaN in one update, which the non-finite guard does not see
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        FeedbackConfig(lr=lr)


def test_a_partial_load_keeps_the_skip_counts_it_does_not_hold():
    # the default for a layer saved before the count was kept also reset the counts of layers
    # a strict=False load did not hold at all, and hid them from its missing keys
    system = StiefelFeedbackSystem(50, [40, 40], rank=8,
                                   generator=torch.Generator().manual_seed(0))
    c = system.compress_error(torch.randn(2, 50))
    system.update_all([torch.full((2, 40), float("nan"))] * 2, c)
    saved = system.state_dict()
    result = system.load_state_dict({"layers.0.U": saved["layers.0.U"]}, strict=False)
    assert [int(layer.nonfinite_skips) for layer in system.layers] == [1, 1]
    assert {"layers.0.nonfinite_skips", "layers.1.nonfinite_skips"} <= set(result.missing_keys)

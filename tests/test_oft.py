"""The OFT nn.Linear adapter: identity at init, merge equivalence, health, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from optim.oft import OFTConfig, OFTLinear
from optim.orthogonal import METHODS, clip_spectral_norm, rotation, skew_from_vector

# fp32 products of 64-wide rows: a few ulp of O(1) outputs.
MERGE_ATOL, MERGE_RTOL = 1e-5, 1e-5
# the fp32 bar for an orthogonal rotation (exp of 16x16 blocks: measured 1.2e-7)
ORTHO_FP32 = 1e-6
# R must differ from R^T by far more than MERGE_ATOL for the layer comparison to tell them apart:
# with the vector's std 0.1, max |R - R^T| measured 0.66 (exp) to 1.08 (cayley); 1e-2 is 66x below
# that and 1e5x above the fp32 rounding of R (~1e-7).
TRANSPOSE_DISTINCT_ATOL = 1e-2
# a float32 rotation of 4 x 4 blocks within its method's range: a few products' rounding
# (u = 6e-8; 0.9e-7 to 1.4e-7 measured for cayley, exp at pi, cans_cayley at 3 and at 100 with 12
# steps), with room for other CPUs' summation orders
ROTATION_ORTHOGONALITY_ATOL = 1e-6
# cayley_neumann's 5 terms at ||Q||_2 = 0.99: a truncation of about 0.99^4 = 0.96
NEUMANN_NEAR_1_ORTHOGONALITY = 1.0
# 5-term Cayley-Neumann at the auto clip 0.95 errs like 0.95^4 (0.66 measured elsewhere; measured
# 0.43-0.48 over seeds 0-4); exact methods stay at ORTHO_FP32. 1e-2 lies between.
NEUMANN_CLIP_ERROR_MIN = 1e-2


def adapted(method: str, *, seed: int = 0) -> OFTLinear:
    torch.manual_seed(seed)
    layer = OFTLinear(nn.Linear(64, 24), config=OFTConfig(block_size=16, method=method))
    return layer


@pytest.mark.parametrize("method", METHODS)
def test_adapter_equals_base_layer_at_init(method):
    layer = adapted(method)
    x = torch.randn(5, 3, 64)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("method", METHODS)
def test_forward_and_merge_equal_x_times_w_block_diag_r(method):
    # against the documented W' = W diag(R_1, ..., R_k), built from the kernels and not from the
    # layer: comparing merge() with forward() alone passed a layer that applied R^T in both
    layer = adapted(method)
    with torch.no_grad():
        layer.oft_vector.normal_(std=0.1)
    x = torch.randn(7, 64)
    with torch.no_grad():
        Q = clip_spectral_norm(skew_from_vector(layer.oft_vector, 16), -1, method=method)
        R = torch.block_diag(*rotation(Q, method=method))
        expected = x @ (layer.base.weight @ R).T + layer.base.bias
        assert not torch.allclose(R, R.T, atol=TRANSPOSE_DISTINCT_ATOL)  # R^T: another layer
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and not torch.equal(merged.weight, layer.base.weight)
    torch.testing.assert_close(layer(x), expected, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    torch.testing.assert_close(merged(x), expected, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def test_only_the_skew_vector_trains_and_health_reports_orthogonality():
    layer = adapted("exp")
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["oft_vector"]
    with torch.no_grad():
        layer.oft_vector.normal_(std=0.5)  # norms far above pi: the auto clip keeps exp exact
    layer(torch.randn(4, 64)).square().sum().backward()
    assert layer.oft_vector.grad is not None and torch.isfinite(layer.oft_vector.grad).all()
    assert layer.health()["orthogonality_error"] <= ORTHO_FP32


def test_cayley_neumann_health_shows_its_truncation_error():
    layer = adapted("cayley_neumann")
    with torch.no_grad():
        layer.oft_vector.normal_(std=0.5)
    assert layer.health()["orthogonality_error"] > NEUMANN_CLIP_ERROR_MIN  # 0.95: not exact


def test_bad_configuration_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="pick a divisor such as 24"):
        OFTLinear(nn.Linear(48, 8), config=OFTConfig(block_size=32))
    # a prime width: 1 was suggested, which OFTConfig refuses (nothing to train); one block of
    # all 7 inputs is the block that works
    with pytest.raises(ValueError, match=r"pick a divisor such as 7$"):
        OFTLinear(nn.Linear(7, 8), config=OFTConfig(block_size=4))
    with pytest.raises(ValueError, match="no block of 2 or more does"):
        OFTLinear(nn.Linear(1, 8), config=OFTConfig(block_size=4))
    with pytest.raises(ValueError, match="method must be one of"):
        OFTConfig(method="householder")
    with pytest.raises(ValueError, match="max_norm"):
        OFTConfig(max_norm=0.0)
    for max_norm in (None, True, float("nan"), "3.0"):  # None raised a TypeError
        with pytest.raises(ValueError, match="max_norm must be a real number"):
            OFTConfig(max_norm=max_norm)
    with pytest.raises(ValueError, match="block_size"):
        OFTConfig(block_size=True)  # a bool would have built 1 x 1 blocks
    with pytest.raises(ValueError, match="steps"):
        OFTConfig(method="cans_cayley", steps=True)
    with pytest.raises(ValueError, match="terms"):
        OFTConfig(terms=False)
    # one term is the constant I: the adapter built, and had no gradient to train on
    with pytest.raises(ValueError, match=r"cayley_neumann needs terms >= 2 \(1 gives R = I"):
        OFTConfig(method="cayley_neumann", terms=1)
    assert OFTConfig(method="exp", terms=1).terms == 1  # read by cayley_neumann alone
    # 1 x 1 blocks likewise: the adapter had no parameter at all
    with pytest.raises(ValueError, match=r"block_size must be >= 2 \(a 1 x 1 block's rotation"):
        OFTConfig(block_size=1)


@pytest.mark.parametrize(("method", "max_norm", "limit"), [
    ("exp", math.inf, "at most 3.14159"),
    ("exp", 20.0, "at most 3.14159"),
    ("cayley_neumann", 1.0, "below 1"),
    ("cayley_neumann", 5.0, "below 1"),
    ("cans_cayley", 10.0, "at most 3"),
])
def test_a_clip_above_what_the_method_is_accurate_under_is_refused(method, max_norm, limit):
    # accepted, such a clip let R of a large Q go wrong without a word: exp at norm 6 was off
    # by 1e-4 and non-finite by norm 30, 5-term Neumann had orthogonality error 3e5 at norm 5
    with pytest.raises(ValueError, match=rf"max_norm={max_norm!r} is above .*{limit}.*'cayley'"):
        OFTConfig(block_size=4, method=method, max_norm=max_norm)


@pytest.mark.parametrize(("method", "max_norm", "steps"), [
    ("cayley", math.inf, None), ("cayley", 1e6, None), ("exp", math.pi, None),
    ("cayley_neumann", 0.99, None), ("cans_cayley", 3.0, None), ("cans_cayley", 100.0, 12),
])
def test_a_clip_within_the_methods_range_builds_a_layer_whose_rotation_stays_orthogonal(
        method, max_norm, steps):
    torch.manual_seed(0)
    config = OFTConfig(block_size=4, method=method, max_norm=max_norm, steps=steps)
    layer = OFTLinear(nn.Linear(8, 2), config=config)
    with torch.no_grad():
        layer.oft_vector.normal_(std=30.0)  # a Q far past the clip: every block is clipped
    assert torch.isfinite(layer(torch.randn(3, 8))).all()
    # Neumann's 5 terms are not orthogonal near 1: their truncation is about ||Q||^4 (0.96 at
    # 0.99; 0.72 measured), far below the 3e5 of norm 5. The others: float32 rounding.
    bound = NEUMANN_NEAR_1_ORTHOGONALITY if method == "cayley_neumann" \
        else ROTATION_ORTHOGONALITY_ATOL
    assert layer.health()["orthogonality_error"] < bound


def test_wrong_inputs_and_bases_are_refused_by_name():
    # a wrong width failed inside unflatten, a Conv2d base on a missing in_features
    layer = OFTLinear(nn.Linear(8, 3), config=OFTConfig(block_size=4))
    for x in (torch.randn(2, 6), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="in_features=8"):
            layer(x)
    with pytest.raises(TypeError, match=r"adapts an nn\.Linear, got Conv2d"):
        OFTLinear(nn.Conv2d(4, 4, 1), config=OFTConfig(block_size=2))


@pytest.mark.parametrize("max_norm", [np.float32(0.5), np.float64(0.5)])
def test_numpy_max_norm_builds_a_layer_that_runs(max_norm):
    # OFTConfig took np.float32 and the layer's first forward then refused it
    torch.manual_seed(0)
    layer = OFTLinear(nn.Linear(8, 2), config=OFTConfig(block_size=4, max_norm=max_norm))
    with torch.no_grad():
        layer.oft_vector.normal_(std=1.0)
    reference = OFTLinear(layer.base, config=OFTConfig(block_size=4, max_norm=0.5))
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), reference(x), atol=MERGE_ATOL, rtol=MERGE_RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_sgd_moves_the_adapter_with_every_method(method):
    # with cans_cayley the gradient was exactly zero: no step moved oft_vector from 0
    layer = adapted(method)
    x, target = torch.randn(16, 64), torch.randn(16, 24)
    opt = torch.optim.SGD([layer.oft_vector], lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert layer.oft_vector.norm() > 0.01 and losses[-1] < losses[0], (method, losses)

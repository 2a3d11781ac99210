"""The OFT nn.Linear adapter: identity at init, merge equivalence, health, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim.oft import OFTConfig, OFTLinear
from optim.orthogonal import METHODS

# fp32 products of 64-wide rows: a few ulp of O(1) outputs.
MERGE_ATOL, MERGE_RTOL = 1e-5, 1e-5
# the fp32 bar for an orthogonal rotation (exp of 16x16 blocks: measured 1.2e-7)
ORTHO_FP32 = 1e-6


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
def test_merge_equals_the_adapted_forward(method):
    layer = adapted(method)
    with torch.no_grad():
        layer.oft_vector.normal_(std=0.1)
    x = torch.randn(7, 64)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and not torch.equal(merged.weight, layer.base.weight)
    torch.testing.assert_close(merged(x), layer(x), atol=MERGE_ATOL, rtol=MERGE_RTOL)


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
    assert layer.health()["orthogonality_error"] > 1e-2  # the auto clip 0.95 is not exact


def test_bad_configuration_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="pick a divisor such as 24"):
        OFTLinear(nn.Linear(48, 8), config=OFTConfig(block_size=32))
    with pytest.raises(ValueError, match="method must be one of"):
        OFTConfig(method="householder")
    with pytest.raises(ValueError, match="max_norm"):
        OFTConfig(max_norm=0.0)

"""The optimizer frame's fused finiteness check (optim._base.all_finite)."""

from __future__ import annotations

import torch

from optim._base import all_finite


def test_finite_entries_whose_sum_overflows_count_as_finite():
    huge = torch.full((10,), 3e38)  # each entry is a finite float32; their float32 sum is inf
    assert not torch.isfinite(huge.sum())
    assert all_finite([huge, torch.randn(3)]) == [True, True]


def test_nan_and_opposite_infinities_are_not_finite():
    nan = torch.tensor([1.0, float("nan")])
    infs = torch.tensor([float("inf"), -float("inf")])  # their sum is NaN, their entries infinite
    one_inf = torch.tensor([0.0, float("inf")])
    assert all_finite([nan, infs, one_inf, torch.zeros(2)]) == [False, False, False, True]


def test_the_agreement_hook_decides_for_sharded_tensors_only_when_needed():
    calls = []

    class Shard(torch.Tensor):  # stands in for a DTensor: has to_local
        def to_local(self) -> torch.Tensor:
            return self.as_subclass(torch.Tensor)

    def agree(t: torch.Tensor) -> torch.Tensor:  # another rank's shard holds a NaN
        calls.append(t.clone())
        return t + (1.0 if len(calls) > 1 else float("nan"))  # its flag, or its partial sum

    shard = torch.ones(4).as_subclass(Shard)
    # The hook reports another rank's NaN: the local shard is finite, yet the call is "skip".
    assert all_finite([shard], agree=agree) == [False]
    assert len(calls) == 2  # the sums, then the exact flags of the suspects
    assert all_finite([torch.ones(2)], agree=agree) == [True]  # plain tensors: no agreement
    assert len(calls) == 2

"""The optimizer frame's fused finiteness checks (optim._exchange.all_finite, nonfinite_flags)."""

from __future__ import annotations

import torch

from optim._exchange import all_finite, nonfinite_flags


def test_finite_entries_whose_sum_overflows_count_as_finite():
    huge = torch.full((10,), 3e38)  # each entry is a finite float32; their float32 sum is inf
    assert not torch.isfinite(huge.sum())
    assert all_finite([huge, torch.randn(3)]) == [True, True]


def test_nan_and_opposite_infinities_are_not_finite():
    nan = torch.tensor([1.0, float("nan")])
    infs = torch.tensor([float("inf"), -float("inf")])  # their sum is NaN, their entries infinite
    one_inf = torch.tensor([0.0, float("inf")])
    assert all_finite([nan, infs, one_inf, torch.zeros(2)]) == [False, False, False, True]


def test_nonfinite_flags_judge_this_processs_shard_exactly():
    class Shard(torch.Tensor):  # stands in for a DTensor: its local part is what is judged
        def to_local(self) -> torch.Tensor:
            return self.as_subclass(torch.Tensor)[:2]

    bad_elsewhere = torch.tensor([1.0, 2.0, float("nan")]).as_subclass(Shard)  # NaN not local
    bad_here = torch.tensor([float("inf"), 2.0, 3.0]).as_subclass(Shard)
    huge = torch.full((10,), 3e38)  # finite entries, non-finite float32 sum: checked exactly
    flags = nonfinite_flags([bad_elsewhere, bad_here, huge, torch.tensor([-float("inf")])])
    assert flags.dtype == torch.float64 and flags.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert nonfinite_flags([]).numel() == 0

"""SOAP's eigenbasis health (docs/soap.md "Health"): what :func:`optim._soap_step.soap_step`
gathers per side (:class:`SideHealth`), and :func:`soap_health`, which turns the sides of all of
a step's matrices into eigengap ratios, basis rotations and staleness in one batched pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from optim._soap_basis import SideRefresh
from optim.health import principal_extremes

__all__ = ["SideHealth", "soap_health"]


def _frobenius(t: Tensor) -> Tensor:
    """The Frobenius norms of ``(..., m, n)`` matrices, in float64: each row's norm in the
    matrices' own dtype (one reduction, no temporary), then the norm of those in float64. Squared,
    within 1e-9 - 1e-8 (relative) of the float64 value on float32 factors of 64-1024 rows, at
    0.55-0.75x the time of a row-wise ``vecdot`` summed in float64 (its product is a temporary
    of the factor's size; measured), and far more accurate than one float32 reduction (4e-5 at
    1024 rows). The staleness's difference needs ~1e-8 (:func:`_staleness`)."""
    return torch.linalg.vector_norm(torch.linalg.vector_norm(t, dim=-1), dim=-1,
                                    dtype=torch.float64)


def _finite_norms(norms: Tensor, tensors: list[Tensor]) -> Tensor:
    """``norms`` (float64 norms of ``tensors``), with any that overflowed taken again, scaled.
    :func:`_frobenius` sums a row's squares in the factor's dtype: entries above ~1e19 overflow
    float32 though the factor is finite (KL-Shampoo's factors reach that with gradients of ~1e6:
    its whitening divides by ``dim eps`` while a factor is ~0), and float64 factors or
    quotients above ~1e154 overflow float64 squares. Finite factors keep their norms finite
    (the trace bounds them, :func:`optim._soap_step.gradient_fits`), so a scaled norm always
    answers. One reduction and one host sync; the slower scaled pass only where needed."""
    if math.isfinite(float(norms.sum())):
        return norms
    exact = norms.clone()
    for i, value in enumerate(norms.tolist()):
        if not math.isfinite(value):
            wide = tensors[i].to(torch.float64)
            scale = wide.abs().amax()
            exact[i] = scale * torch.linalg.vector_norm(wide / scale) if scale > 0 else 0.0
    return exact


def _staleness(total: float, diagonal: float) -> float:
    """``||B - diag B||_F / ||B||_F`` for ``B = Q^T F Q`` WITHOUT forming B, from ``total =
    ||F||_F = ||B||_F`` (Q orthogonal) and ``diagonal = ||diag B||``, the norm of the Rayleigh
    quotients already in hand, both float64 (for ``1 - (diagonal / total)^2``, which cancels;
    the ratio, not the squares themselves: those of a float64 factor's norm could overflow).
    The fp32 quotients put a floor of ~1e-3 under the result."""
    if not total > 0.0:
        return 0.0
    ratio = diagonal / total
    return math.sqrt(max(1.0 - ratio * ratio, 0.0))


@dataclass
class SideHealth:
    """What one side's health needs, gathered by :func:`optim._soap_step.soap_step`
    (references only, no work); turned into metrics for a whole batch of matrices at once by
    :func:`soap_health`."""

    side: str                # "L" or "R"
    eigvals: Tensor          # eigh values, power-step estimates or Rayleigh quotients, any order
    total: Tensor | None     # ||factor||_F after this step's update (float64 scalar), or None:
                             # soap_health takes it from ``factor``
    quotients: Tensor        # Rayleigh quotients of the basis in use before this step (staleness)
    Q_old: Tensor | None     # the bases before and after a refresh; None: no rotation (no
    Q_new: Tensor | None     # refresh this step, or step 1, whose old basis is the identity)
    factor: Tensor           # the factor after this step's update (``total`` is its norm)


def _side_health(side: str, Q_old: Tensor, refreshed: SideRefresh | None, factor: Tensor, *,
                 total: Tensor | None, first: bool, quotients: Tensor | None) -> SideHealth:
    """One side's health inputs (docs/soap.md "Health"); between refreshes the eigenvalues and
    staleness come from ``quotients``, the Rayleigh quotients of the current basis. ``total``:
    the factor's norm if already taken (else soap_health takes it)."""
    if refreshed is None:
        assert quotients is not None
        return SideHealth(side, quotients, total, quotients, None, None, factor)
    old, new = (None, None) if first else (Q_old, refreshed.Q)  # step 1: no rotation
    return SideHealth(side, refreshed.eigvals, total, refreshed.quotients, old, new, factor)


_SQRT_HALF = math.sqrt(0.5)


def _angle_degrees(sin_sq: float, cos: float) -> float:
    """The angle from its squared sine and its cosine, with whichever function is well
    conditioned: arcsin below 45 degrees, arccos above."""
    sin = min(math.sqrt(max(sin_sq, 0.0)), 1.0)
    if sin < _SQRT_HALF:
        return math.degrees(math.asin(sin))
    return math.degrees(math.acos(min(max(cos, 0.0), 1.0)))


# maps the floats of soap_health's values tensor to each matrix's metric values
HealthFinish = Callable[[list[float]], list[list[float]]]

# one side's layout: (name, dim, number of eigenvalues, rotated this step, factor's norm
# left to soap_health, eigenvalues are the quotients, the eigenvalues' dtype)
_SideLayout = tuple[str, int, int, bool, bool, bool, torch.dtype]


def _top_count(side: _SideLayout) -> int:
    """How many of a side's largest eigenvalues health reads: the top two for the eigengap;
    after a refresh up to 8, the rotation's k, to find the factor's numerical rank among them."""
    _, dim, count, _, _, quotients, _ = side
    return min(count, 2 if quotients else max(2, min(8, dim)))


def _rank_below(top: list[float], dim: int, eps: float) -> int:
    """The factor's numerical rank if below ``len(top)``, else ``len(top)``: how many of its
    largest eigenvalues (``top``, descending) exceed ``dim * eps * top[0]`` (the rank rule of
    LAPACK-based ``matrix_rank``: below it, fp32 eigenvalues are rounding, 3.6e-7 relative or
    less for factors of 32-1024 rows whose gradients span a few directions, against a
    threshold of 3.8e-6-1.2e-4). A zero factor has rank 0."""
    if not top[0] > 0.0:
        return 0
    floor = dim * eps * top[0]
    return sum(1 for value in top if value > floor)


def _rotation_within(r: int, k: int, gram: list[float], overlap: list[float]) -> float:
    """The largest principal angle between the first ``r < k`` columns of two bases, from the
    k x k ``W^T W`` and ``M = A^T B`` of their first k (:func:`optim.health.principal_extremes`,
    row-major): with ``A_r``, ``B_r`` those columns, ``W_r = B_r - A_r M_r`` has the Gram
    ``(W^T W)_rr + sum_{j >= r} M_j,:r^T M_j,:r`` (the k = 1 formula's sum of non-negative
    terms), whose top eigenvalue is the sine squared, and ``M_r``'s smallest singular value is
    the cosine. Rare (a side whose factor has rank below 8), so two tiny LAPACK calls."""
    G = torch.tensor(gram, dtype=torch.float64).view(k, k)
    M = torch.tensor(overlap, dtype=torch.float64).view(k, k)
    G_r = G[:r, :r] + M[r:, :r].mT @ M[r:, :r]
    sin_sq = float(torch.linalg.eigvalsh(G_r)[-1])
    cos = float(torch.linalg.svdvals(M[:r, :r])[-1])
    return _angle_degrees(sin_sq, cos)


class _HealthPlan:
    """Where each side's numbers sit in :func:`soap_health`'s values tensor, and the formulas
    that turn them into metrics. It depends only on the layout (sides, dims, which sides
    were refreshed), which repeats step after step, so it is built once per layout.

    Values: the Frobenius norms of the factors soap_step took them of, then per group of the
    other factors of one size, theirs; per group of sides with quotients of one length, their
    quotients' norms; per group of sides with at least two eigenvalues of one length,
    their top two; then per rotation group (the n sides of one length, ``k = min(8, dim)``)
    :func:`optim.health.principal_extremes` of its pairs: the n Grams ``W^T W`` and the n
    overlaps ``M`` (k x k each), then their singular values (k each). Grouping by length lets
    one stack and one reduction serve every side of that length (a model's matrices share a
    few side lengths; :class:`optim.soap.SOAP` passes all of a step's matrices at once).
    Groups are stacked in the state's dtype and converted afterwards: a ``cat`` that promotes
    (an empty float64 piece) took 40-80 us even for 16 vectors of 64, ``stack`` and ``double`` 6 us.
    """

    def __init__(self, layout: tuple[tuple[_SideLayout, ...], ...]) -> None:
        flat = [side for sides in layout for side in sides]
        self.keys = [_metric_keys(tuple(side[0] for side in sides)) for sides in layout]
        self.counts = [len(sides) for sides in layout]
        self.total_at = [0] * len(flat)
        # factors whose norm soap_step took, then groups of the others by size
        self.taken = [i for i in range(len(flat)) if not flat[i][4]]
        offset = 0
        for i in self.taken:
            self.total_at[i], offset = offset, offset + 1
        self.total_groups = _groups_by((i for i in range(len(flat)) if flat[i][4]),
                                       key=lambda i: flat[i][1])
        for sides in self.total_groups:
            for i in sides:
                self.total_at[i], offset = offset, offset + 1
        self.total_order = self.taken + [i for sides in self.total_groups for i in sides]
        # sides grouped by quotient length, and where each one's norm sits
        self.quotient_groups = _groups_by(range(len(flat)), key=lambda i: flat[i][1])
        self.quotient_at = [0] * len(flat)
        for sides in self.quotient_groups:
            for i in sides:
                self.quotient_at[i], offset = offset, offset + 1
        # sides with two eigenvalues or more, grouped by their number; where each top two sit.
        # A group whose eigenvalues are a quotient group's quotients (between refreshes) reuses
        # that group's stack: (sides, index of that quotient group or None)
        self.top_groups: list[tuple[list[int], int | None]] = []
        for sides in _groups_by((i for i in range(len(flat)) if flat[i][2] >= 2),
                                key=lambda i: (flat[i][2], flat[i][5], _top_count(flat[i]))):
            same = [j for j, q_sides in enumerate(self.quotient_groups) if q_sides == sides]
            self.top_groups.append((sides, same[0] if same and flat[sides[0]][5] else None))
        self.top_at: list[int | None] = [None] * len(flat)
        self.top_count = [_top_count(side) for side in flat]
        self.dims = [side[1] for side in flat]
        self.eps = [torch.finfo(side[6]).eps for side in flat]  # (once per layout)
        # a side of one eigenvalue (a 1 x n matrix's L): its factor's norm is that eigenvalue
        self.single = [flat[i][2] == 1 for i in range(len(flat))]
        for sides, _ in self.top_groups:
            for i in sides:
                self.top_at[i], offset = offset, offset + self.top_count[i]
        # rotated sides grouped by length (zero-padding shorter bases into one batch cost more
        # than a second batch's calls: 20 sides of 64 padded to 256 made soap_health 0.25 ms
        # slower, and 1024 rows for sides of 256 1.1 ms)
        members: dict[int, list[int]] = {}
        for i, (_, dim, _, rotated, _, _, _) in enumerate(flat):
            if rotated:
                members.setdefault(dim, []).append(i)
        # per group: k, the member sides, their length
        self.groups: list[tuple[int, list[int], int]] = []
        # per rotated side: k, and where its Gram, overlap, sines and cosines start
        self.rot_at: dict[int, tuple[int, int, int, int, int]] = {}
        for rows, sides in members.items():
            k = min(8, rows)
            self.groups.append((k, sides, rows))
            n = len(sides)
            values = offset + 2 * n * k * k
            for j, i in enumerate(sides):
                self.rot_at[i] = (k, offset + j * k * k, offset + (n + j) * k * k,
                                  values + j * k, values + (n + j) * k)
            offset = values + 2 * n * k

    def finish(self, v: list[float]) -> list[list[float]]:
        out: list[list[float]] = []
        i = 0
        for count in self.counts:
            row: list[float] = []
            for _ in range(count):
                top = self.top_at[i]
                gap = 0.0
                if top is not None or self.single[i]:
                    # one eigenvalue: rank one, as eigengap_ratio reads it (l2 = 0)
                    l1, l2 = (v[top], v[top + 1]) if top is not None else (v[self.total_at[i]], 0.0)
                    l2 = max(l2, 0.0) if not math.isnan(l2) else l2  # as eigengap_ratio
                    gap = (l1 - l2) / l1 if l1 > 0 else (l1 if math.isnan(l1) else 0.0)
                rot1 = rot8 = 0.0
                at = self.rot_at.get(i)
                if at is not None:
                    k, gram, overlap, sines, cosines = at
                    # beyond the factor's rank the basis spans directions no gradient reached,
                    # whose columns any refresh may turn: the top k are read within the rank
                    rank = k if top is None else \
                        min(k, _rank_below(v[top:top + self.top_count[i]], self.dims[i],
                                           self.eps[i]))
                    if rank > 0:
                        # the first columns' angle from the same problem (principal_extremes)
                        sin1_sq = v[gram] + sum(v[overlap + j * k] ** 2 for j in range(1, k))
                        rot1 = _angle_degrees(sin1_sq, abs(v[overlap]))
                    if rank == k:
                        rot8 = _angle_degrees(v[sines], v[cosines + k - 1])
                    elif rank > 1:
                        rot8 = _rotation_within(rank, k, v[gram:gram + k * k],
                                                v[overlap:overlap + k * k])
                    else:
                        rot8 = rot1
                row += [gap, rot1, rot8, _staleness(v[self.total_at[i]], v[self.quotient_at[i]])]
                i += 1
            out.append(row)
        return out


def _groups_by(indices: Iterable[int], key: Callable[[int], Hashable]) -> list[list[int]]:
    """``indices`` grouped by ``key``, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


def _given(t: Tensor | None) -> Tensor:
    assert t is not None  # the plan only reads what the layout says is there
    return t


@functools.lru_cache(maxsize=64)
def _health_plan(layout: tuple[tuple[_SideLayout, ...], ...]) -> _HealthPlan:
    return _HealthPlan(layout)


@functools.cache
def _metric_keys(sides: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{metric}_{side}{suffix}" for side in sides
                 for metric, suffix in (("eigengap_ratio", ""), ("rotation_degrees", "_k1"),
                                        ("rotation_degrees", "_k8"), ("basis_staleness", "")))


def soap_health(per_matrix: list[list[SideHealth]]
                ) -> tuple[list[tuple[str, ...]], Tensor, HealthFinish]:
    """Metrics of every side of every matrix of a step (docs/soap.md "Health").

    At small sizes health is dominated by the number of small tensor operations and Python
    calls, not by flops, so the tensor work is batched over all sides and matrices and ends in
    ONE float64 tensor: the norms of every factor (a large one's taken by
    :func:`optim._soap_step.soap_step`, the others' here, per size) and of its Rayleigh
    quotients, the top two eigenvalues of each side, and what the largest principal angles are read
    from for all refreshed sides (:func:`optim.health.principal_extremes`, one batch per side
    length). The scalar formulas (eigengap ratio, staleness, arcsin / arccos) then run on Python
    floats, once that tensor is converted (one ``.tolist()``); where each number sits is planned
    once per layout.

    Returns:
        ``(keys, values, finish)``: ``keys[i]`` are matrix i's metric names; ``finish`` maps
        ``values.tolist()`` to their values (per matrix, in ``keys`` order).
    """
    flat = [side for sides in per_matrix for side in sides]
    if not flat:
        return [() for _ in per_matrix], torch.zeros(0, dtype=torch.float64), \
            lambda _: [[] for _ in per_matrix]
    layout = tuple(tuple((side.side, side.quotients.numel(), side.eigvals.numel(),
                          side.Q_old is not None, side.total is None,
                          side.eigvals is side.quotients, side.eigvals.dtype)
                         for side in sides)
                   for sides in per_matrix)
    plan = _health_plan(layout)
    pieces = [torch.stack([_given(flat[i].total) for i in plan.taken])] if plan.taken else []
    for sides in plan.total_groups:
        pieces.append(_frobenius(torch.stack([flat[i].factor for i in sides])))
    stacks = []
    for sides in plan.quotient_groups:
        stacked = torch.stack([flat[i].quotients for i in sides])
        stacks.append(stacked)
        pieces.append(torch.linalg.vector_norm(stacked, dim=-1, dtype=torch.float64))
    # the factors' norms, then the quotients', as the plan lays them out
    pieces = [_finite_norms(torch.cat(pieces), [flat[i].factor for i in plan.total_order] +
                            [flat[i].quotients for sides in plan.quotient_groups for i in sides])]
    for sides, reuse in plan.top_groups:
        eigvals = stacks[reuse] if reuse is not None else \
            torch.stack([flat[i].eigvals for i in sides])
        pieces.append(eigvals.topk(plan.top_count[sides[0]]).values.view(-1))
    for k, members, rows in plan.groups:
        columns = [getattr(flat[i], attr)[:, :k] for attr in ("Q_old", "Q_new") for i in members]
        grams, values = principal_extremes(
            torch.stack(columns).view(2, len(members), rows, k).double(), assume_finite=True)
        pieces += [grams.view(-1), values.view(-1)]
    return plan.keys, torch.cat(pieces), plan.finish

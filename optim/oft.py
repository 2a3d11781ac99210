"""OFT adapter for ``nn.Linear``: a block-diagonal rotation of the frozen weight.

``W' = W R`` with ``R = diag(R_1, ..., R_k)`` and ``R_i = rotation(Q_i)`` orthogonal
(:mod:`optim.orthogonal`), ``Q_i`` skew-symmetric ``(b, b)`` built from a trainable vector of
its ``b(b-1)/2`` free entries (Qiu et al. 2023, arXiv 2306.07280; PEFT's OFT). The forward
rotates the input instead of materializing ``W'``: ``y = base(x R^T)``, per block, so training
never touches the frozen ``(out, in)`` weight. The parameter starts at zero, where every method
gives ``R = I`` exactly: the adapted layer equals the base layer at init. ``merge()`` folds
``R`` into a plain ``nn.Linear`` for inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optim._checks import is_int, is_real
from optim.health import orthogonality_error
from optim.orthogonal import (
    AUTO_MAX_NORM,
    MAX_NORM_LIMIT,
    METHODS,
    clip_spectral_norm,
    rotation,
    skew_from_vector,
)

__all__ = ["OFTConfig", "OFTLinear"]


@dataclass(frozen=True)
class OFTConfig:
    """Attributes:
    block_size: ``b``; must divide the layer's ``in_features`` (:class:`OFTLinear` checks it,
        the config does not know the layer). 32 is a common OFT choice.
    method: one of ``optim.orthogonal.METHODS``; ``"exp"`` (default) is exact to 1e-6 in
        float32 at 8 products and reaches every rotation (OneTrainer PR #1556).
    max_norm: spectral-norm clip of each ``Q`` before the rotation, a real number (NumPy
        scalars included, bools not); -1 (default) is the method's ``AUTO_MAX_NORM``,
        ``math.inf`` disables it.
    terms: ``cayley_neumann``'s number of terms (PEFT default 5).
    steps: ``cans_cayley``'s CANS steps (None: its dtype default).
    """

    block_size: int = 32
    method: str = "exp"
    max_norm: float = -1.0
    terms: int = 5
    steps: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.block_size == 1:
            # a 1 x 1 skew block is 0: the adapter built with no parameter to train
            raise ValueError("block_size must be >= 2 (a 1 x 1 block's rotation is 1 whatever "
                             "the adapter learns, which leaves nothing to train)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not is_real(self.max_norm) or not (self.max_norm == -1 or self.max_norm > 0):
            raise ValueError(f"max_norm must be a real number > 0, math.inf or -1 (auto), got "
                             f"{self.max_norm!r}")
        self._check_max_norm_limit()
        if not is_int(self.terms) or self.terms < 1:
            raise ValueError(f"terms must be an int >= 1, got {self.terms!r}")
        if self.method == "cayley_neumann" and self.terms == 1:
            # one term is the constant I: nothing the adapter could learn (no gradient)
            raise ValueError("cayley_neumann needs terms >= 2 (1 gives R = I whatever Q, which "
                             "leaves nothing to train)")
        if self.steps is not None and (not is_int(self.steps) or self.steps < 1):
            raise ValueError(f"steps must be an int >= 1 or None, got {self.steps!r}")

    def _check_max_norm_limit(self) -> None:
        """Refuse a clip above what the method is accurate under (``MAX_NORM_LIMIT``): R of
        a larger Q was silently wrong, then Inf or NaN (exp at norm 30, Neumann past 1)."""
        if self.max_norm == -1 or (self.method == "cans_cayley" and self.steps is not None):
            return
        limit = MAX_NORM_LIMIT[self.method]
        if self.max_norm > limit or (self.method == "cayley_neumann" and self.max_norm >= 1):
            bound = "below 1 (its series diverges at 1)" if self.method == "cayley_neumann" \
                else f"at most {limit:.6g}"
            extra = ", or give cans_cayley more steps" if self.method == "cans_cayley" else ""
            raise ValueError(
                f"max_norm={self.max_norm!r} is above what method={self.method!r} is accurate "
                f"under: use a max_norm {bound} (-1 picks {AUTO_MAX_NORM[self.method]:g}), or "
                f"method='cayley', exact at any norm{extra}")


class OFTLinear(nn.Module):
    """``y = x (W R)^T + bias`` with the base ``nn.Linear`` frozen and ``R`` block-orthogonal.

    Args:
        base: the layer to adapt; its parameters are frozen (``requires_grad=False``).
        config: an :class:`OFTConfig` (default: 32-blocks, exp, auto clip).

    Raises:
        TypeError: ``base`` is not an ``nn.Linear``.
        ValueError: ``block_size`` does not divide ``base.in_features``.
    """

    def __init__(self, base: nn.Linear, *, config: OFTConfig | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"OFTLinear adapts an nn.Linear, got {type(base).__name__}")
        self.config = config if config is not None else OFTConfig()
        b = self.config.block_size
        if base.in_features % b:
            divisor = _block_divisor(base.in_features, b)
            raise ValueError(
                f"block_size={b} must divide in_features={base.in_features}; "
                + (f"pick a divisor such as {divisor}" if divisor is not None else
                   "no block of 2 or more does: OFT cannot rotate this layer's inputs")
            )
        self.base = base.requires_grad_(False)
        blocks = base.in_features // b
        self.oft_vector = nn.Parameter(
            torch.zeros(blocks, b * (b - 1) // 2, dtype=base.weight.dtype,
                        device=base.weight.device)
        )

    def rotation_blocks(self) -> Tensor:
        """The ``(in_features / b, b, b)`` orthogonal blocks of R (differentiable)."""
        cfg = self.config
        Q = skew_from_vector(self.oft_vector, cfg.block_size)
        Q = clip_spectral_norm(Q, cfg.max_norm, method=cfg.method)
        return rotation(Q, method=cfg.method, terms=cfg.terms, steps=cfg.steps)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.size(-1) != self.base.in_features:
            raise ValueError(f"OFTLinear expects inputs of in_features={self.base.in_features} "
                             f"in the last dim, got shape {tuple(x.shape)}")
        R = self.rotation_blocks()
        blocks = x.unflatten(-1, (R.size(0), R.size(1)))  # (..., k, b)
        rotated = torch.einsum("...kj,kij->...ki", blocks, R.to(x.dtype)).flatten(-2)
        return self.base(rotated)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight ``W R`` (computed in float32 at least) and the bias."""
        R = self.rotation_blocks()
        W = self.base.weight
        work = torch.promote_types(W.dtype, torch.float32)
        merged_w = torch.einsum("okj,kji->oki", W.unflatten(1, (R.size(0), R.size(1))).to(work),
                                R.to(work)).flatten(1)
        merged = nn.Linear(self.base.in_features, self.base.out_features,
                           bias=self.base.bias is not None, device=W.device, dtype=W.dtype)
        merged.weight.copy_(merged_w.to(W.dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """``orthogonality_error`` of R (the worst block) as a plain float."""
        return {"orthogonality_error": float(orthogonality_error(self.rotation_blocks()).max())}


def _block_divisor(n: int, near: int) -> int | None:
    """A block size for ``n`` inputs: the largest divisor of ``n`` from 2 to ``near``, else
    the smallest above it (``n`` itself for a prime), None for ``n = 1``."""
    divisors = [d for d in range(2, n + 1) if n % d == 0]
    below = [d for d in divisors if d <= near]
    return max(below) if below else min(divisors, default=None)

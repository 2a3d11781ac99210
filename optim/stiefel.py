"""The Stiefel manifold ``St(d, r) = {U in R^(d x r): U^T U = I}``: tangent projection,
retractions, and the factored feedback module of seed 003.

Kernels act on ``(..., d, r)`` with ``d >= r``, batched over leading dims:

* ``tangent_project(U, G) = G - U sym(U^T G)``: the orthogonal projection (Euclidean metric)
  onto ``T_U St = {D: U^T D + D^T U = 0}`` (Edelman, Arias & Smith 1998, arXiv physics/9806030).
* ``qr_retract(X)``: the Q factor of a thin QR with R's diagonal made positive, which makes it
  unique and continuous in X (Absil, Mahony & Sepulchre 2008, Example 4.1.3).
* ``polar_retract(X)``: the polar factor ``X (X^T X)^(-1/2)``, the closest point on St(d, r),
  by :func:`optim.orthogonalize.orthogonalize`.
* ``cayley_retract(U, G, t)``: the Cayley curve through U along ``tangent_project(U, G)`` (Wen &
  Yin 2013, Math. Program. 142; Li, Fuxin & Todorovic 2020, arXiv 2002.01113), by the
  Sherman-Morrison-Woodbury form: a ``2r x 2r`` solve instead of ``d x d``.

Factored feedback (seed 003): a fixed row-orthonormal compressor ``C`` (``r x V``, ``C C^T =
I``) compresses the output error ``e`` to ``c = e C^T``; each layer ``l`` receives ``delta_l =
alpha_l c U_l^T`` with ``U_l in St(d_l, r)``. ``U_l`` follows a Riemannian step on the EMA of the
cross-covariance ``G = g^T c / N`` (clipped, then QR-retracted); the gain ``alpha_l`` tracks the
least-squares fit ``<G, U> / mean ||c||^2`` (correlation-based, not a norm ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from optim import _matmul
from optim._checks import is_int, is_real, require_tensor
from optim.health import orthogonality_error
from optim.orthogonalize import orthogonalize

__all__ = [
    "FeedbackConfig",
    "StiefelFeedbackLayer",
    "StiefelFeedbackSystem",
    "cayley_retract",
    "feedback_update",
    "polar_retract",
    "qr_retract",
    "random_stiefel",
    "tangent_project",
]


def _check_frame(X: Tensor, name: str) -> None:
    require_tensor(X, name)
    if X.ndim < 2 or X.size(-2) < X.size(-1):
        raise ValueError(
            f"{name} needs a (..., d, r) frame with d >= r (St(d, r)), got {tuple(X.shape)}"
        )
    if not X.is_floating_point():
        raise ValueError(f"{name} needs a real floating-point frame, got {X.dtype}")


def _check_direction(G: Tensor, U: Tensor) -> None:
    require_tensor(G, "G")
    if G.shape[-2:] != U.shape[-2:]:
        raise ValueError(f"G must have U's shape {tuple(U.shape)}, got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a real floating-point tensor, got {G.dtype}")


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.mT)


def tangent_project(U: Tensor, G: Tensor) -> Tensor:
    """``G - U sym(U^T G)``, ``sym(A) = (A + A^T)/2``: the tangent part of G at U (1 + 1 products).

    The result ``D`` satisfies ``U^T D + D^T U = 0`` when ``U^T U = I``. U and G of different
    dtypes are computed in the promoted one (as :func:`cayley_retract` does), which D keeps.
    """
    _check_frame(U, "tangent_project")
    _check_direction(G, U)
    common = torch.promote_types(U.dtype, G.dtype)
    U, G = U.to(common), G.to(common)
    return G - _matmul.mm(U, _sym(_matmul.mm(U.mT, G)))


def qr_retract(X: Tensor) -> Tensor:
    """Q of the thin QR ``X = Q R`` with ``diag(R) > 0``: columns flipped by ``sign(diag R)``.

    LAPACK's Householder QR leaves the signs of ``diag(R)`` free, so without the fix a tiny
    change of X can flip a column of Q; with it the retraction is continuous and ``X = U``
    returns ``U``. A zero pivot keeps its column (sign +1). Computed in float32 at least.
    """
    _check_frame(X, "qr_retract")
    work = X.to(torch.promote_types(X.dtype, torch.float32))
    Q, R = torch.linalg.qr(work, mode="reduced")
    signs = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (Q * signs.unsqueeze(-2)).to(X.dtype)


def polar_retract(X: Tensor) -> Tensor:
    """Polar factor ``X (X^T X)^(-1/2)`` by Polar Express (arXiv 2505.16932) in float32 (float64
    stays float64): about 1e-6 from orthonormal in float32, which makes it a retraction to use
    every step, not a one-off projection of far-away matrices (use ``orthogonalize(X,
    method="svd")`` for those)."""
    _check_frame(X, "polar_retract")
    compute = torch.promote_types(X.dtype, torch.float32)
    return orthogonalize(X, method="polar_express", dtype=compute)


def cayley_retract(U: Tensor, G: Tensor, t: float, *, polish: bool = True) -> Tensor:
    """Cayley retraction ``Y(t) = (I - t/2 W)^-1 (I + t/2 W) U`` with ``W = P U^T - U P^T``,
    ``P = G - U (U^T G) / 2``.

    W is skew, so ``Y(t)`` stays on St(d, r) for every t, and ``Y'(0) = W U =
    tangent_project(U, G)``. With ``W = A B^T``, ``A = [P, U]``, ``B = [U, -P]`` (``d x 2r``),
    Woodbury gives ``Y(t) = U + t A (I - t/2 B^T A)^-1 B^T U``: 5 products (2 for P) and a
    ``2r x 2r`` solve (recorded as one product). P is computed in float32 at least, the
    Woodbury part in float64: ``I - t/2 B^T A`` is not normal and turns badly conditioned for
    long steps where ``I - t/2 W`` does not, worst when ``2r > d`` (A and B then have dependent
    columns). In float32, at ``t = 1e3`` and Gaussian G, a 256 x 256 frame ended 8e-2 from
    orthonormal even after the polish, 64 x 34 8.9e-4, 512 x 64 5.7e-6; in float64 all stay
    at 3e-7 (measured), for 1.7x (256 x 256) to 3.2x (1024 x 32) the float32 time.
    Leading dims broadcast as in :func:`tangent_project`: one frame ``U`` (d, r) against a
    batch ``G`` (..., d, r) gives (..., d, r).

    In exact arithmetic Y(t) is orthonormal; in float32 rounding drifts off the manifold like a
    random walk (~2e-6 after 1,000 steps). ``polish=True`` (default) ends with one Newton-Schulz
    step ``Y (3 I - Y^T Y) / 2`` (2 more products), which maps an orthogonality error ``e`` to
    ``O(e^2)``: the drift stays at the float32 floor (<= 1e-6 after 1,000 steps, tested), and
    the map differs from the exact Cayley map by ``O(e^2)`` only. The polish assumes ``U`` on
    St(d, r) up to such drift: the step maps a singular value ``y`` of Y to ``y (3 - y^2) / 2``,
    near 1 for ``y`` near 1 but 1.5 to 0.56 and 2 to -1, so a frame far off (``1.5 U`` came back
    with error 0.68, ``2 U`` as ``-U``) needs :func:`qr_retract` or :func:`polar_retract` first.
    """
    _check_frame(U, "cayley_retract")
    _check_direction(G, U)
    if not is_real(t) or not math.isfinite(t):
        raise ValueError(f"t must be a finite real number (not a bool), got {t!r}")
    compute = torch.promote_types(torch.promote_types(U.dtype, G.dtype), torch.float32)
    Uc, Gc = U.to(compute), G.to(compute)
    P = Gc - 0.5 * _matmul.mm(Uc, _matmul.mm(Uc.mT, Gc))
    Uc = Uc.expand_as(P)  # one frame against a batch of G broadcasts, as in tangent_project
    wide = torch.float64 if P.device.type != "mps" else compute  # (MPS has no float64)
    A = torch.cat([P, Uc], dim=-1).to(wide)
    B = torch.cat([Uc, -P], dim=-1).to(wide)
    eye = torch.eye(A.size(-1), dtype=wide, device=A.device)
    inner = eye - (0.5 * t) * _matmul.mm(B.mT, A)
    _matmul.count(1)
    Uw = Uc.to(wide)
    coeffs = torch.linalg.solve(inner, _matmul.mm(B.mT, Uw))
    Y = (Uw + t * _matmul.mm(A, coeffs)).to(compute)
    if polish:
        gram = _matmul.mm(Y.mT, Y)
        Y = 1.5 * Y - 0.5 * _matmul.mm(Y, gram)
    return Y.to(U.dtype)


def random_stiefel(d: int, r: int, *, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """A ``(d, r)`` frame with orthonormal columns, Haar-distributed (sign-fixed QR of a
    Gaussian; Mezzadri 2007, arXiv math-ph/0609050)."""
    if not (is_int(d) and is_int(r) and 1 <= r <= d):
        raise ValueError(f"St(d, r) needs ints 1 <= r <= d, got d={d!r}, r={r!r}")
    return qr_retract(torch.randn(d, r, generator=generator, dtype=dtype))


@dataclass(frozen=True)
class FeedbackConfig:
    """Hyper-parameters of the factored feedback update; defaults are seed 003's.

    Attributes:
        lr: ``eta`` of the Riemannian step ``U + eta alpha D`` (seed: 3e-5).
        ema: decay ``tau`` of the cross-covariance EMA (seed: 0.99).
        gain_ema: rate ``beta`` at which alpha moves to its least-squares target (seed: 0.01).
        gain_init: alpha at construction (seed: 0.1).
        gain_min, gain_max: clamp of the least-squares target (seed: 1e-4, 10).
        max_step_norm: Frobenius clip of the tangent step D, None for no clip (seed: 1.0).
        eps: floor of the denominators (seed: 1e-8).
    """

    lr: float = 3e-5
    ema: float = 0.99
    gain_ema: float = 0.01
    gain_init: float = 0.1
    gain_min: float = 1e-4
    gain_max: float = 10.0
    max_step_norm: float | None = 1.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("ema", "gain_ema", "gain_init", "gain_min", "gain_max", "eps"):
            value = getattr(self, name)
            if not (is_real(value) and math.isfinite(value)):
                # a string or None compared with a float raised TypeError; eps=inf read every
                # gain target as 0
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.max_step_norm is not None and not (is_real(self.max_step_norm)
                                                   and math.isfinite(self.max_step_norm)):
            raise ValueError(f"max_step_norm must be a finite number > 0 or None, got "
                             f"{self.max_step_norm!r}")
        if not (is_real(self.lr) and 0 <= self.lr < math.inf):
            # an infinite lr made U all NaN in one update, past the non-finite guard
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        for name in ("ema", "gain_ema"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is an EMA rate in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.gain_min <= self.gain_init <= self.gain_max:
            raise ValueError(
                "need 0 < gain_min <= gain_init <= gain_max, got "
                f"{self.gain_min!r}, {self.gain_init!r}, {self.gain_max!r}"
            )
        if self.max_step_norm is not None and not self.max_step_norm > 0:
            raise ValueError(f"max_step_norm must be > 0 or None, got {self.max_step_norm!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")


def feedback_update(U: Tensor, ema_G: Tensor, alpha: Tensor, g_hat: Tensor, c: Tensor, *,
                    config: FeedbackConfig, frozen: bool = False) -> dict[str, float]:
    """One in-place update of a layer's expander ``U`` (d, r), EMA ``ema_G`` and gain ``alpha``.

    ``G = g^T c / N`` over the N rows of ``g_hat`` (..., d) and ``c`` (..., r);
    ``ema_G <- tau ema_G + (1 - tau) G``; ``D = tangent_project(U, ema_G)``, scaled to Frobenius
    norm ``max_step_norm`` if above; ``U <- qr_retract(U + lr alpha D)``;
    ``alpha <- (1 - beta) alpha + beta clamp(<G, U> / mean ||c||^2)``, with the new U.
    ``frozen=True`` only accumulates the EMA. Returns plain-float diagnostics, ``nonfinite``
    among them: 1.0 when ``G`` is not finite (a NaN or Inf in ``g_hat`` or ``c``, or a product
    that overflowed), in which case nothing is updated (one NaN in the EMA would reach ``U``
    and ``alpha`` and stay there for good); the next finite signal trains normally.
    """
    g_flat = g_hat.reshape(-1, g_hat.size(-1))
    c_flat = c.reshape(-1, c.size(-1))
    if g_flat.size(0) != c_flat.size(0) or g_flat.size(1) != U.size(0) or \
            c_flat.size(1) != U.size(1):
        raise ValueError(f"g_hat (..., {U.size(0)}) and c (..., {U.size(1)}) need the same "
                         f"leading dims, got {tuple(g_hat.shape)} and {tuple(c.shape)}")
    n = max(g_flat.size(0), 1)
    G = _matmul.mm(g_flat.mT, c_flat) / n
    norm = float(torch.linalg.matrix_norm(G))
    diag = {"cross_cov_norm": norm, "frozen": float(frozen)}
    if not math.isfinite(norm):  # (the norm of a finite G that overflows: skipped too)
        return diag | {"nonfinite": 1.0, "gain": float(alpha),
                       "orthogonality_error": float(orthogonality_error(U))}
    diag["nonfinite"] = 0.0
    ema_G.mul_(config.ema).add_(G, alpha=1.0 - config.ema)
    if not frozen:
        diag |= _riemannian_step(U, ema_G, alpha, config)
        c2_mean = c_flat.square().sum() / n
        target = ((U * G).sum() / (c2_mean + config.eps)).clamp(config.gain_min, config.gain_max)
        alpha.lerp_(target.to(alpha.dtype), config.gain_ema)
        diag["gain_target"] = float(target)
    corr = (U * G).sum() / (norm * math.sqrt(U.size(1)) + config.eps)
    diag |= {"gain": float(alpha), "correlation": float(corr),
             "orthogonality_error": float(orthogonality_error(U))}
    return diag


def _riemannian_step(U: Tensor, ema_G: Tensor, alpha: Tensor,
                     config: FeedbackConfig) -> dict[str, float]:
    D = tangent_project(U, ema_G)
    norm = torch.linalg.matrix_norm(D)
    clipped = config.max_step_norm is not None and bool(norm > config.max_step_norm)
    if clipped:
        D = D * (config.max_step_norm / (norm + config.eps))
    U.copy_(qr_retract(U + (config.lr * alpha) * D))
    return {"step_norm": float(norm), "step_clipped": float(clipped)}


class StiefelFeedbackLayer(nn.Module):
    """One layer's feedback ``delta = alpha c U^T`` with ``U in St(d, r)`` (buffers, no grads)."""

    U: Tensor
    alpha: Tensor
    ema_G: Tensor
    nonfinite_skips: Tensor

    def __init__(self, d: int, r: int, *, config: FeedbackConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FeedbackConfig()
        self.register_buffer("U", random_stiefel(d, r, generator=generator))
        self.register_buffer("alpha", torch.tensor(self.config.gain_init))
        self.register_buffer("ema_G", torch.zeros(d, r))
        # updates skipped for a non-finite signal (feedback_update); a buffer, so that
        # state_dict() carries it as it carries U
        self.register_buffer("nonfinite_skips", torch.tensor(0, dtype=torch.int64))

    def compute_delta(self, c: Tensor) -> Tensor:
        """``c`` (..., r) -> ``alpha c U^T`` (..., d)."""
        return self.alpha * _matmul.mm(c, self.U.mT)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # a layer saved before the count was a buffer has every buffer but it: it starts from
        # zero. A partial dict (a strict=False load) keeps the count, which is reported missing.
        if all(prefix + key in state_dict for key in ("U", "alpha", "ema_G")):
            state_dict.setdefault(prefix + "nonfinite_skips", torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, g_hat: Tensor, c: Tensor, *, frozen: bool = False) -> dict[str, float]:
        """:func:`feedback_update` on this layer's buffers; the diagnostics also carry
        ``nonfinite_skips``, this layer's count of skipped updates."""
        diag = feedback_update(self.U, self.ema_G, self.alpha, g_hat, c,
                               config=self.config, frozen=frozen)
        self.nonfinite_skips += int(diag["nonfinite"])  # in place: the buffer stays
        return diag | {"nonfinite_skips": float(self.nonfinite_skips)}


class StiefelFeedbackSystem(nn.Module):
    """A row-orthonormal compressor ``C`` (r, V) shared by per-layer Stiefel expanders."""

    C: Tensor

    def __init__(self, vocab_size: int, layer_dims: list[int], *, rank: int = 128,
                 config: FeedbackConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= vocab_size:
            raise ValueError(f"rank must be in [1, vocab_size={vocab_size}], got {rank}; "
                             "C (rank x vocab) cannot have more orthonormal rows than columns")
        too_small = [d for d in layer_dims if d < rank]
        if too_small:
            raise ValueError(f"every layer dim must be >= rank={rank} (U in St(d, rank)), got "
                             f"{too_small}; lower rank")
        self.rank = rank
        self.register_buffer("C", random_stiefel(vocab_size, rank, generator=generator).T.clone())
        self.layers = nn.ModuleList(
            StiefelFeedbackLayer(d, rank, config=config, generator=generator) for d in layer_dims
        )

    def compress_error(self, e: Tensor) -> Tensor:
        """``e`` (..., V) -> ``c = e C^T`` (..., r)."""
        return _matmul.mm(e, self.C.mT)

    def compute_deltas(self, c: Tensor) -> list[Tensor]:
        return [layer.compute_delta(c) for layer in self.layers]  # type: ignore[operator]

    def update_all(self, g_hats: list[Tensor], c: Tensor, *,
                   frozen: bool = False) -> list[dict[str, float]]:
        """Update every layer from its local signal; one diagnostics dict per layer."""
        if len(g_hats) != len(self.layers):
            raise ValueError(f"need one g_hat per layer ({len(self.layers)}), got {len(g_hats)}")
        return [layer.update(g, c, frozen=frozen)  # type: ignore[operator]
                for layer, g in zip(self.layers, g_hats, strict=True)]

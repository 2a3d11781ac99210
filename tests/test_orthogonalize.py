"""optim.orthogonalize against the exact polar factor, torch.optim.Muon, and its own contract.

Reference: the float64 SVD polar factor ``U V^T``. Inputs with a known spectrum are built as
``U diag(sigma) V^T`` from float64 QR factors, so every test knows its condition number.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from optim import count_matmuls
from optim._ns_coefficients import _POLAR_EXPRESS_RAW
from optim.health import orthogonality_error
from optim.orthogonalize import (
    _ROUNDING_GAP,
    JORDAN_QUINTIC,
    METHODS,
    POLAR_EXPRESS_COEFFICIENTS,
    cans_interval_step,
    default_steps,
    orthogonalize,
    polar_iterates,
    soften,
)

ITERATIVE = ("polar_express", "cans")  # the methods that converge to U V^T
ALL = METHODS

# fp32 compute against the float64 polar factor on inputs with sigma in [0.1, 1] (condition
# number 10): the iterations converge well past fp32 resolution there, so what is left is fp32
# rounding accumulated over ~20 products of 64-wide dot products (a few 1e-7 per product, measured
# max 3e-6). 1e-5 leaves 3x headroom and still rejects any unconverged iterate (>= 1e-3).
POLAR_FP32_ATOL = 1e-5
POLAR_FP32_RTOL = 1e-5
# Jordan's quintic never converges: after 5 steps its singular values sit in about
# [0.68, 1.13] (measured). The band below is that range widened by bf16 rounding.
QUINTIC_SIGMA_BAND = (0.6, 1.25)
# Singular values of the softened exact polar factor: an fp32 SVD of an fp32 result, values O(1):
# a few fp32 ulps (1.2e-7) times the dimension is the achievable accuracy.
SOFT_SIGMA_ATOL = 2e-5
SOFT_SIGMA_RTOL = 1e-5
# softening 1 returns X / ||X||_F with the norm from another float32 reduction than X.norm():
# a few fp32 ulps (1.2e-7) of the norm (measured exact); 1e-6 is ~8 ulps.
SOFT_ONE_RTOL = 1e-6
# bf16 on sigma in [1e-6, 1]: nothing may blow up. The polar factor has spectral norm 1; a
# diverging polynomial (NVIDIA's fixed CANS list: 1.99 -> 4.5 -> 639 -> NaN) would leave this band.
BF16_MAX_SPECTRAL_NORM = 1.25
# Half-precision runs on Gaussian inputs: each singular direction's coefficient in the result,
# diag(U^T O V), sits within ~1e-2 of 1 (the bf16 floor); a direction the iteration reversed
# reads ~-1 (an orthogonal but wrong factor, which the orthogonality error cannot see). 0.9 is
# far from both.
DIRECTION_KEPT_MIN = 0.9
# A float16 softened result against the float32 blend of its parts: entries near 0, where the
# relative bound 2^-10 means nothing, sit at most 1.2e-6 apart (measured over the methods).
FP16_BLEND_NEAR_ZERO_ATOL = 1e-5


def spectrum_matrix(m: int, n: int, sigma: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """float64 ``U diag(sigma) V^T`` with random orthonormal U (m x k) and V (n x k)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * sigma.to(torch.float64)) @ V.T


def logspaced(m: int, n: int, lo: float, hi: float, *, seed: int = 0) -> torch.Tensor:
    sigma = torch.logspace(math.log10(lo), math.log10(hi), min(m, n), dtype=torch.float64)
    return spectrum_matrix(m, n, sigma.flip(0), seed=seed)


def polar64(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X.to(torch.float64), full_matrices=False)
    return U @ Vh


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- accuracy against the exact polar factor -------------------------------------------------

@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (64, 64)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("method", (*ITERATIVE, "svd"))
def test_converging_methods_match_float64_svd_polar_factor_in_fp32(method, shape):
    X = logspaced(*shape, 0.1, 1.0).float()
    O = orthogonalize(X, method=method, steps=None if method == "svd" else 12,
                      dtype=torch.float32)
    torch.testing.assert_close(O.double(), polar64(X), atol=POLAR_FP32_ATOL, rtol=POLAR_FP32_RTOL)


@pytest.mark.parametrize("method", (*ITERATIVE, "svd"))
def test_default_steps_reach_polar_factor_in_fp32_on_gaussian(method):
    X = gaussian(128, 64)
    O = orthogonalize(X, method=method, dtype=torch.float32)
    torch.testing.assert_close(O.double(), polar64(X), atol=POLAR_FP32_ATOL, rtol=POLAR_FP32_RTOL)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["tall", "wide"])
def test_quintic_keeps_singular_vectors_and_lands_in_its_documented_band(shape):
    # Quintic does not converge to U V^T, but it is an odd polynomial with p > 0 on (0, 1]:
    # U p(Sigma) V^T has X's polar factor and singular values in the documented band.
    X = logspaced(*shape, 0.1, 1.0).float()
    O = orthogonalize(X, method="quintic", dtype=torch.float32)
    torch.testing.assert_close(polar64(O), polar64(X), atol=POLAR_FP32_ATOL,
                               rtol=POLAR_FP32_RTOL)
    sigma = torch.linalg.svdvals(O.double())
    lo, hi = QUINTIC_SIGMA_BAND
    assert lo <= sigma.min().item() and sigma.max().item() <= hi


def test_quintic_bf16_default_equals_torch_muon_newton_schulz_bit_for_bit():
    for shape in [(96, 64), (64, 96), (64, 64)]:
        X = gaussian(*shape, seed=sum(shape))
        ours = orthogonalize(X, method="quintic")  # the default steps: torch.optim.Muon's 5
        ref = _zeropower_via_newtonschulz(X, JORDAN_QUINTIC, 5, 1e-7)
        assert ours.dtype == X.dtype
        assert torch.equal(ours, ref.to(X.dtype)), shape
        # the bf16 -> fp32 cast is exact, so equality of the fp32 results is equality in bf16
        assert torch.equal(ours.bfloat16(), ref)


def test_quintic_custom_coefficients_and_steps_equal_torch_muon():
    X = gaussian(80, 48, seed=3)
    coeffs = (3.0, -3.2, 1.2)
    ours = orthogonalize(X, method="quintic", steps=3, coefficients=coeffs)
    ref = _zeropower_via_newtonschulz(X, coeffs, 3, 1e-7)
    assert torch.equal(ours, ref.to(X.dtype))


# ---- batching ---------------------------------------------------------------------------------

# Batched slices are compared bit for bit: each slice goes through the same per-matrix norm and
# gemm (baddbmm runs one gemm per batch entry on CPU), measured identical on torch 2.13 CPU.
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["bf16", "fp32"])
def test_batched_3d_equals_per_slice(method, dtype):
    X = gaussian(3, 48, 32, seed=1)
    batched = orthogonalize(X, method=method, dtype=dtype)
    assert batched.shape == X.shape
    for i in range(X.shape[0]):
        assert torch.equal(batched[i], orthogonalize(X[i], method=method, dtype=dtype)), i


@pytest.mark.parametrize("method", ALL)
def test_batched_4d_wide_equals_per_slice(method):
    X = gaussian(2, 3, 24, 40, seed=2)
    batched = orthogonalize(X, method=method, dtype=torch.float32, softening=0.25)
    assert batched.shape == X.shape
    for i in range(2):
        for j in range(3):
            single = orthogonalize(X[i, j], method=method, dtype=torch.float32, softening=0.25)
            assert torch.equal(batched[i, j], single), (i, j)


def test_batched_zero_slice_stays_zero_and_others_are_unaffected():
    X = gaussian(3, 32, 24, seed=4)
    X[1] = 0.0
    for method in ALL:
        out = orthogonalize(X, method=method, dtype=torch.float32)
        assert torch.equal(out[1], torch.zeros_like(out[1])), method
        assert torch.equal(out[0], orthogonalize(X[0], method=method, dtype=torch.float32))


# ---- softening --------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.1, 0.5, 0.9, 1.0])
def test_softened_svd_singular_values_follow_blend_formula(s):
    X = logspaced(64, 40, 1e-2, 3.0).float()
    out = orthogonalize(X, method="svd", softening=s)
    sigma = torch.linalg.svdvals(X.double())
    expected = (1 - s) + s * sigma / torch.linalg.matrix_norm(X.double())
    got = torch.linalg.svdvals(out.double())
    torch.testing.assert_close(got, expected, atol=SOFT_SIGMA_ATOL, rtol=SOFT_SIGMA_RTOL)


def test_softening_one_is_the_frobenius_normalized_input():
    X = gaussian(40, 24, seed=5)
    out = orthogonalize(X, method="cans", softening=1.0, dtype=torch.float32)
    torch.testing.assert_close(out, X / X.norm(), atol=0.0, rtol=SOFT_ONE_RTOL)


@pytest.mark.parametrize("method", ALL)
def test_softening_zero_is_byte_identical_to_no_softening(method):
    X = gaussian(48, 32, seed=6)
    plain = orthogonalize(X, method=method)
    assert torch.equal(orthogonalize(X, method=method, softening=0.0), plain)
    assert torch.equal(orthogonalize(X, method=method, softening=0), plain)
    assert soften(plain, X, 0.0) is plain


@pytest.mark.parametrize("s", [-0.01, 1.01, float("nan"), float("inf"), "0.5", None])
def test_softening_outside_unit_interval_or_nan_raises_value_error(s):
    with pytest.raises(ValueError, match="softening"):
        orthogonalize(gaussian(8, 4), softening=s)


# ---- input validation -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    pytest.param(dict(X=torch.ones(5)), id="1-D"),
    pytest.param(dict(X=torch.ones(4, 3, dtype=torch.int64)), id="int-dtype"),
    pytest.param(dict(X=torch.ones(4, 3, dtype=torch.bool)), id="bool-dtype"),
    pytest.param(dict(method="newton"), id="unknown-method"),
    pytest.param(dict(steps=-2), id="steps-negative"),
    pytest.param(dict(steps=100), id="steps-100"),
    pytest.param(dict(steps=2.5), id="steps-float"),
    pytest.param(dict(steps=True), id="steps-bool"),
    pytest.param(dict(dtype=torch.int32), id="int-compute-dtype"),
    pytest.param(dict(method="cans", lower_bound=0.0), id="cans-lower-bound-0"),
    pytest.param(dict(method="cans", lower_bound=1.5), id="cans-lower-bound-1.5"),
    pytest.param(dict(softening=True), id="softening-bool"),
    pytest.param(dict(eps=-1.0), id="eps-negative"),
    pytest.param(dict(eps=float("nan")), id="eps-nan"),
    pytest.param(dict(coefficients=(1.0, 2.0)), id="coefficients-two"),
    pytest.param(dict(coefficients=(3.4, float("inf"), 2.0)), id="coefficients-inf"),
    # an AttributeError ('str' object has no attribute 'is_floating_point')
    pytest.param(dict(dtype="float32"), id="dtype-string"),
    pytest.param(dict(dtype=float), id="dtype-python-type"),
    pytest.param(dict(dtype=torch.int32), id="dtype-integer"),
])
def test_bad_input_raises_value_error(bad):
    kwargs = {"X": gaussian(6, 4), **bad}
    X = kwargs.pop("X")
    with pytest.raises(ValueError):
        orthogonalize(X, **kwargs)


def test_numpy_scalars_are_accepted_as_the_python_numbers_they_equal():
    # a schedule or a config loaded with NumPy hands over np.float32 / np.int64
    import numpy as np  # a dependency (matplotlib's, and the bench's): never skipped

    X = gaussian(6, 4)
    assert torch.equal(orthogonalize(X, softening=np.float32(0.5), steps=np.int64(3)),
                       orthogonalize(X, softening=0.5, steps=3))


def test_a_non_tensor_input_raises_naming_the_type():
    import numpy as np

    with pytest.raises(TypeError, match=r"needs a torch\.Tensor, got ndarray"):
        orthogonalize(np.ones((3, 3)))


def test_unknown_method_error_lists_the_valid_methods():
    with pytest.raises(ValueError, match="polar_express"):
        orthogonalize(gaussian(6, 4), method="newton")


# ---- robustness -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (2, 8, 8)])
def test_zero_matrix_returns_zeros_without_nan(method, dtype, shape):
    X = torch.zeros(shape, dtype=dtype)
    for softening in (0.0, 0.5):
        # eps=0 (no floor asked for) divided 0 by 0: NaN
        for eps in (1e-7, 0.0):
            out = orthogonalize(X, method=method, softening=softening, eps=eps)
            assert out.dtype == dtype
            assert torch.equal(out, torch.zeros_like(out)), (method, softening, eps)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 3, 5)])
def test_empty_input_returns_an_empty_result_of_its_shape(method, shape):
    out = orthogonalize(torch.randn(shape), method=method, softening=0.5)
    assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize(("method", "steps"), [(m, None) for m in ALL]
                         + [(m, 30) for m in ALL if m != "svd"])
def test_bf16_stays_finite_on_singular_values_from_1_to_1e6(method, steps):
    X = logspaced(128, 64, 1e-6, 1.0).to(torch.bfloat16)
    out = orthogonalize(X, method=method, steps=steps)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert torch.linalg.matrix_norm(out.float(), ord=2).item() <= BF16_MAX_SPECTRAL_NORM


# ---- products counted -------------------------------------------------------------------------

PRODUCTS_PER_STEP = {"quintic": 3, "polar_express": 3, "cans": 2}


@pytest.mark.parametrize("method", sorted(PRODUCTS_PER_STEP))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_products_counted_per_step_with_free_normalization(method, steps):
    X = gaussian(40, 24)
    with count_matmuls() as counter:
        orthogonalize(X, method=method, steps=steps, dtype=torch.float32, softening=0.3)
    assert counter.products == PRODUCTS_PER_STEP[method] * steps


# The defaults' cost in products: quintic 5 steps (torch.optim.Muon's), Polar Express 8 / 6,
# CANS 11 / 9 (float32 / bfloat16), the counts optim/orthogonalize.py documents. Written out
# here, so that a changed default shows.
DEFAULT_PRODUCTS = {("quintic", torch.float32): 15, ("quintic", torch.bfloat16): 15,
                    ("polar_express", torch.float32): 24, ("polar_express", torch.bfloat16): 18,
                    ("cans", torch.float32): 22, ("cans", torch.bfloat16): 18}


@pytest.mark.parametrize("method", sorted(PRODUCTS_PER_STEP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_step_products_match_default_steps(method, dtype):
    with count_matmuls() as counter:
        orthogonalize(gaussian(3, 24, 40), method=method, dtype=dtype)
    assert counter.products == PRODUCTS_PER_STEP[method] * default_steps(method, dtype)
    assert counter.products == DEFAULT_PRODUCTS[(method, dtype)]


def test_polar_iterates_count_products_cumulatively_and_end_at_orthogonalize():
    X = gaussian(48, 32)
    with count_matmuls() as counter:
        seen = []
        for it in polar_iterates(X, method="cans", steps=4, dtype=torch.float32):
            seen.append((counter.products, it))
    assert [c for c, _ in seen] == [2, 4, 6, 8]
    assert torch.equal(seen[-1][1], orthogonalize(X, method="cans", steps=4, dtype=torch.float32))


def test_nested_counters_both_count():
    with count_matmuls() as outer:
        orthogonalize(gaussian(8, 8), method="quintic", steps=1)
        with count_matmuls() as inner:
            orthogonalize(gaussian(8, 8), method="quintic", steps=2)
    assert (inner.products, outer.products) == (6, 9)


# ---- dtypes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("compute", [None, torch.float32])
def test_result_dtype_equals_input_dtype(method, in_dtype, compute):
    X = gaussian(12, 8).to(in_dtype)
    out = orthogonalize(X, method=method, dtype=compute, softening=0.2)
    assert out.dtype == in_dtype and out.shape == X.shape


# ---- coefficient tables -----------------------------------------------------------------------

# p(1) = 0.70 as optim.orthogonalize states it, to two decimals: half a unit of the last digit
# (the exact value is 0.701).
PRINTED_2DP_ATOL = 5e-3
# float64 identities of the coefficients (a polynomial evaluated two ways, CANS's closed form):
# ~1e-16 per operation on O(1) values (Polar Express's safety factor: measured 2.2e-15); CANS's
# new_a = 1 - eps ~ 5e-3 loses two more digits to the cancellation (measured 4.3e-14). 1e-12 is
# 20x the largest.
COEFF64_RTOL = 1e-12


def _odd_quintic(coeffs, x):
    a, b, c = coeffs
    return a * x + b * x**3 + c * x**5


def test_jordan_quintic_p1_is_0_70_and_never_reaches_one():
    assert _odd_quintic(JORDAN_QUINTIC, 1.0) == pytest.approx(0.70, abs=PRINTED_2DP_ATOL)


def test_polar_express_safety_factor_is_p_of_x_over_1_01_on_all_but_steady_state():
    assert _odd_quintic(POLAR_EXPRESS_COEFFICIENTS[-1], 1.0) == 1.0
    assert POLAR_EXPRESS_COEFFICIENTS[-1] == _POLAR_EXPRESS_RAW[-1] == (1.875, -1.25, 0.375)
    assert len(POLAR_EXPRESS_COEFFICIENTS) == len(_POLAR_EXPRESS_RAW) == 8
    xs = [i / 20 for i in range(1, 21)]
    for safe, raw in zip(POLAR_EXPRESS_COEFFICIENTS[:-1], _POLAR_EXPRESS_RAW[:-1], strict=True):
        for x in xs:
            assert _odd_quintic(safe, x) == pytest.approx(_odd_quintic(raw, x / 1.01),
                                                          rel=COEFF64_RTOL)


def test_cans_interval_step_equioscillates_on_its_interval():
    a, b = 1e-3, 1.0
    lin, cub, new_a, new_b = cans_interval_step(a, b)
    p = lambda x: lin * x + cub * x**3  # noqa: E731
    e = math.sqrt((a * a + a * b + b * b) / 3)
    assert p(a) == pytest.approx(new_a, rel=COEFF64_RTOL)
    assert p(b) == pytest.approx(new_a, rel=COEFF64_RTOL)
    assert p(e) == pytest.approx(new_b, rel=COEFF64_RTOL)
    assert new_a + new_b == pytest.approx(2.0, rel=COEFF64_RTOL)


# ---- the svd reference on ill-conditioned and rank-deficient inputs ---------------------------

def _logspaced(m, n, lo, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0.0, math.log10(lo), k, dtype=torch.float64)
    return ((U * sigma) @ V.T).float()


# fp32 output of an exactly orthogonal float64 factor: entries rounded by ~6e-8, Gram entries
# off by ~sqrt(m) * 6e-8 ~ 2e-6 for m = 1024; 1e-5 leaves 5x margin. Before the fix the svd
# reference dropped the singular values below 1.2e-4 and read ~0.59 here.
SVD_REFERENCE_ORTHO_MAX = 1e-5
# the float32 SVD reference on 32x12 inputs, against itself or a closed form: a few ulp of O(1)
# entries and singular values (measured 0: bit-identical here)
SVD_FP32_ATOL = 1e-6


def test_svd_reference_keeps_every_direction_of_singular_values_spread_over_1e_6_to_1():
    X = _logspaced(1024, 256, 1e-6, seed=2)
    O = orthogonalize(X, method="svd")
    assert orthogonality_error(O).item() < SVD_REFERENCE_ORTHO_MAX
    sigma = torch.linalg.svdvals(O.double())
    assert sigma.min().item() > 1.0 - SVD_REFERENCE_ORTHO_MAX


def test_svd_reference_maps_exact_zero_singular_values_and_zero_matrices_to_zero():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(32, 12, generator=g)
    X = torch.cat([A, torch.zeros(32, 4)], dim=1)  # 4 exact zero singular values
    O = orthogonalize(X, method="svd")
    assert torch.equal(O[:, 12:], torch.zeros(32, 4))
    torch.testing.assert_close(O[:, :12], orthogonalize(A, method="svd"), atol=SVD_FP32_ATOL,
                               rtol=0.0)
    sigma = torch.linalg.svdvals(O.double())
    assert (sigma[:12] - 1.0).abs().max().item() < SVD_FP32_ATOL
    assert sigma[12:].max().item() < SVD_FP32_ATOL
    assert torch.equal(orthogonalize(torch.zeros(2, 8, 5), method="svd"), torch.zeros(2, 8, 5))
    # rank one, stored exactly: u v^T with small-integer entries has exact zero singular values
    u = torch.tensor([1.0, 2.0, -1.0, 3.0])
    v = torch.tensor([2.0, 0.0, 1.0])
    O1 = orthogonalize(torch.outer(u, v), method="svd")
    expected = torch.outer(u / u.norm(), v / v.norm())
    torch.testing.assert_close(O1, expected, atol=SVD_FP32_ATOL, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ITERATIVE)
def test_half_precision_iterations_keep_every_singular_direction(method, dtype):
    # A CANS cubic for [a, b] with a << b has its zero just above b: bf16 rounding pushed values
    # past it and they converged to -1 (7 of 20 Gaussian 40x24 inputs, every 512x128 one)
    cases = [((40, 24), seed) for seed in range(12)] + [((512, 128), seed) for seed in range(2)]
    for shape, seed in cases:
        X = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        O = orthogonalize(X, method=method, dtype=dtype).double()
        kept = torch.diagonal(U.mT @ O @ Vh.mT)
        assert kept.min() > DIRECTION_KEPT_MIN, (shape, seed, kept.min().item())


@pytest.mark.parametrize("method", ALL)
def test_gradients_flow_through_the_default_half_precision_path(method):
    # the private bf16 copy used to be normalized in place, which autograd refused
    X = gaussian(12, 8).requires_grad_(True)
    orthogonalize(X, method=method, softening=0.2).sum().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0


@pytest.mark.parametrize("method", (*ITERATIVE, "quintic"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_input_whose_norm_overflows_reads_nan_not_a_silent_zero(method, dtype):
    # entries of 1e19 are finite but their squares overflow: X / inf used to return zeros
    X = gaussian(12, 8).to(dtype) * 1e19
    assert torch.isfinite(X).all()
    assert torch.isnan(orthogonalize(X, method=method)).all()


# ---- float16 range, low-rank data, and the normalization that buys the product counts ---------

# float16 compute against the float64 polar factor on sigma in [0.1, 1]: float16 rounding (2^-11)
# of every product over ~20 products; measured 2.6e-3 (entries of 1e-8), 2.8e-3 (of 1e5). 1e-2
# rejects the garbage these inputs gave before (0.88 orthogonality error, or NaN).
FP16_POLAR_ATOL = 1e-2


@pytest.mark.parametrize("scale", [1e-8, 1e5])
@pytest.mark.parametrize("method", ITERATIVE)
def test_float16_compute_takes_entries_beyond_its_range(method, scale):
    # cast before normalizing, 1e5 became Inf (a NaN result) and 1e-8 zero
    X = logspaced(64, 32, 0.1, 1.0).float() * scale
    O = orthogonalize(X, method=method, dtype=torch.float16)
    assert O.dtype == torch.float32
    torch.testing.assert_close(O.double(), polar64(X), atol=FP16_POLAR_ATOL, rtol=0.0)


# An input under eps (norm 1e-10, eps 1e-7) is divided by eps: every compute dtype returns the
# same update (the quintic's shrunk; Polar Express and CANS normalize again by their Gram's
# norm). float16 against float32, measured 3.5e-5 (quintic, ~0.06 of its entries), 7.4e-4
# (Polar Express), 1.1e-3 (CANS): float16 rounding, under FP16_POLAR_ATOL.
@pytest.mark.parametrize("method", ALL[:3])
def test_float16_compute_keeps_the_eps_floor_of_an_input_below_it(method):
    # scaled to a unit norm before the cast and normalized again after it, float16 alone
    # returned a full-size quintic update (norm 2.78 against 0.48)
    torch.manual_seed(0)
    X = torch.randn(64, 32)
    X = X / X.norm() * 1e-10
    want = orthogonalize(X, method=method, dtype=torch.float32)
    got = orthogonalize(X, method=method, dtype=torch.float16)
    torch.testing.assert_close(got, want, atol=FP16_POLAR_ATOL, rtol=0.0)
    if method == "quintic":  # the floor shrinks it: not the unit-norm input's update
        assert float(want.norm()) < 0.5 * float(orthogonalize(X / X.norm(), method=method,
                                                              dtype=torch.float32).norm())


@pytest.mark.parametrize("method", ALL)
def test_softening_a_float16_input_whose_norm_overflows_float16_stays_finite(method):
    # ||X||_F of 128x128 entries ~800 is ~1e5 > 65504: X / inf was NaN, so Muon with
    # softening skipped every such step of a float16 parameter. (128, not 1024: a CPU without
    # native float16 products takes ~50 s per 1024x1024 float16 Newton-Schulz, 0.04 s here.)
    X = gaussian(128, 128, dtype=torch.float16) * 800
    assert torch.isinf(X.norm())
    O = orthogonalize(X, method=method, softening=0.3)
    assert O.dtype == torch.float16 and torch.isfinite(O).all()
    direction = X.float() / torch.linalg.vector_norm(X.float())
    plain = orthogonalize(X, method=method).float()
    # the blend of the two, within float16 rounding: 2^-11 relative per rounding, two of them
    # (O's and the blend's), so rtol 2^-10; atol for entries near 0, where a relative bound
    # means nothing (entries past rtol: at most 1.2e-6 apart, measured over the methods)
    torch.testing.assert_close(O.float(), 0.7 * plain + 0.3 * direction,
                               atol=FP16_BLEND_NEAR_ZERO_ATOL, rtol=2**-10)


def test_svd_reference_of_a_low_rank_float32_gradient_has_its_rank():
    # the gradient of a linear layer over 4 examples: rank 4. Its other singular values are
    # float32 rounding (~1e-8 relative); kept, they became 252 unit directions of noise
    g = torch.Generator().manual_seed(0)
    G = torch.randn(512, 4, generator=g) @ torch.randn(4, 256, generator=g)
    O = orthogonalize(G, method="svd").double()
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert S[4].item() < 1e-5 * S[0].item()  # rank 4 up to rounding
    rank4 = U[:, :4] @ Vh[:4]
    assert (O.norm() ** 2).item() == pytest.approx(4.0, rel=SVD_REFERENCE_ORTHO_MAX)
    torch.testing.assert_close(O, rank4, atol=SVD_REFERENCE_ORTHO_MAX, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 256])
def test_svd_reference_keeps_the_small_singular_values_of_a_full_rank_half_precision_matrix(
        n, dtype):
    # A Gaussian's smallest singular values sit below ||X||_F eps(bfloat16) with no gap above
    # them: data, not rounding. Dropped (3 of 64, 20 of 256), each left the factor a unit away.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, n, generator=g).to(dtype)
    U, S, Vh = torch.linalg.svd(X.double())
    # a continuous spectrum: no singular value _ROUNDING_GAP below the one before it (a square
    # Gaussian has one in ~2.5% of draws; in bfloat16 that one is then below the rounding of
    # an entry, which decides its sign, and is taken as rounding)
    assert (S[:-1] < _ROUNDING_GAP * S[1:]).all()
    exact = U @ Vh  # the polar factor of the stored matrix
    O = orthogonalize(X, method="svd")
    assert O.dtype == dtype
    # the result is the exact factor rounded to X's dtype (through float32: a second rounding
    # at most doubles the first), against the sqrt(3) and more of a dropped direction
    assert (O.double() - exact).norm() <= 2 * (exact.to(dtype).double() - exact).norm()
    assert torch.linalg.svdvals(O.double()).min() > 0.9


# The design's target: 1e-5 within 24 products on singular values spread over [1e-3, 1]
# (measured: Polar Express 24, CANS 22, on 1024x256 and on this 256x64). The tighter first
# normalization (Gram norm, Gelfand-type norm) buys them: with the Frobenius norm alone both took
# 30.
PRODUCTS_TO_1E5 = {"polar_express": 24, "cans": 22}


@pytest.mark.parametrize("method", ITERATIVE)
def test_products_to_reach_1e_5_on_a_spread_spectrum(method):
    X = logspaced(256, 64, 1e-3, 1.0).float()
    with count_matmuls() as counter:
        for O in polar_iterates(X, method=method, steps=20, dtype=torch.float32):
            if orthogonality_error(O).item() < 1e-5:
                break
    assert counter.products <= PRODUCTS_TO_1E5[method], counter.products


def test_svd_of_a_non_finite_matrix_is_nan_like_the_iterations():
    # an Inf gave a silent all-zero "polar factor"; a NaN made LAPACK raise
    good = torch.randn(5, 3)
    for bad in (math.inf, -math.inf, math.nan):
        X = torch.stack([good, good.clone()])
        X[1, 0, 0] = bad
        for method in ("svd", "polar_express"):
            O = orthogonalize(X, method=method, dtype=torch.float32)
            assert torch.isnan(O[1]).all(), (method, bad)
            assert torch.isfinite(O[0]).all(), (method, bad)
        reference = orthogonalize(good, method="svd")
        assert torch.equal(orthogonalize(X, method="svd")[0], reference)


def test_polar_iterates_and_soften_check_their_arguments_at_the_call():
    X = torch.randn(4, 6)
    with pytest.raises(ValueError, match="unknown orthogonalize method"):
        polar_iterates(X, method="bogus")  # was raised only at the first next()
    with pytest.raises(ValueError, match="lower_bound must be a number"):
        orthogonalize(X, method="cans", lower_bound=True)  # True read as 1.0
    with pytest.raises(ValueError, match="lower_bound applies to method='cans' only"):
        orthogonalize(X, method="polar_express", lower_bound=0.1)  # silently ignored
    O = orthogonalize(X)
    for s in (1.5, -0.1, math.nan, True):
        with pytest.raises(ValueError, match="softening must be a number in"):
            soften(O, X, s)  # 1.5 extrapolated, NaN made every entry NaN
    with pytest.raises(ValueError, match="one shape"):
        soften(O[:1], X, 0.5)  # broadcast every row of X against the one of O


# A unit vector's bf16 rounding: ~2^-9 per entry, ~4e-3 in norm over 64 entries; measured at
# most 6.8e-3 for CANS over 20 draws (Polar Express 4.9e-3). Before CANS's first cubic ran in
# float32 the median was 0.19: the vector came out turned.
RANK1_BF16_ATOL = 1e-2


@pytest.mark.parametrize("shape", [(1, 64), (64, 1), (3, 1, 200)])
def test_bf16_cans_keeps_the_direction_of_a_rank_one_input(shape):
    # the first cubic maps the top of its interval near its root: p(1) = lin + cub cancels to
    # 0.11 of terms near 5, and bf16 rounding of those terms outweighed it
    for seed in range(5):
        torch.manual_seed(seed)
        X = torch.randn(shape)
        direction = X / torch.linalg.matrix_norm(X, keepdim=True)
        for method in ("cans", "polar_express"):
            O = orthogonalize(X, method=method)  # bf16, the default
            error = torch.linalg.matrix_norm(O - direction).max()
            assert error <= RANK1_BF16_ATOL, (method, shape, seed, float(error))


def test_zero_steps_return_the_normalized_input_as_torch_muon_does():
    # torch.optim.Muon takes ns_steps=0 (its update is then the normalized momentum); this
    # refused it, so a configuration carried over from torch failed here
    X = torch.randn(6, 10)
    assert torch.equal(orthogonalize(X, method="quintic", steps=0, dtype=torch.float32),
                       X / X.norm())  # the same one division
    assert list(polar_iterates(X, method="cans", steps=0)) == []
    with pytest.raises(ValueError, match=r"steps must be an int in \[0, 100\)"):
        orthogonalize(X, steps=-1)


@pytest.mark.parametrize("method", ["quintic", "polar_express", "cans"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_steps_normalize_once_whatever_the_input_dtype(method, dtype):
    # a copy made for the compute dtype was normalized twice, in place: the result depended on
    # the input's dtype (polar_express 1.00 instead of its Gram scaling, 2.15), and the quintic
    # left torch.optim.Muon's ns_steps=0 in 30 of 200 draws
    torch.manual_seed(0)
    X = torch.randn(64, 32).to(dtype)
    same = orthogonalize(X.float(), method=method, steps=0, dtype=torch.float32)
    for compute in (torch.float32, torch.float64):
        got = orthogonalize(X, method=method, steps=0, dtype=compute).float()
        # one normalization in either dtype: they differ by the input's rounding only
        torch.testing.assert_close(got, same, rtol=0, atol=float(torch.finfo(dtype).eps))
    if method == "quintic":
        for seed in range(20):
            torch.manual_seed(seed)
            G = torch.randn(48, 24)
            assert torch.equal(orthogonalize(G, method=method, steps=0),
                               _zeropower_via_newtonschulz(G, JORDAN_QUINTIC, 0, 1e-7))


# new_a = 2 L / (K + L) -> 3 sqrt(3) a as a -> 0, with a relative error O(a) (~1e-17 here) plus
# float64 rounding (~1e-16): measured 0 at a = 1e-17 and 1e-30.
CANS_ASYMPTOTE_REL = 1e-12
# p(1) = linear + cubic: two terms of ~2.6 that cancel to new_a, so their float64 sum carries an
# absolute error of a few 1e-16: 1e-10 of new_a at a = 1e-6 (all of it at a = 1e-17, where the
# closed form new_a is what keeps the interval).
CANS_SUM_REL = 1e-9


def test_cans_intervals_keep_their_lower_end_however_small():
    # 1 - eps cancelled to 0 below ~1e-16: the interval stayed [0, 2] and nothing converged
    for a in (1e-17, 1e-30):
        _, _, new_a, new_b = cans_interval_step(a, 1.0)
        assert new_a > 0
        assert new_a == pytest.approx(3 * math.sqrt(3) * a, rel=CANS_ASYMPTOTE_REL, abs=0)
        assert new_b == pytest.approx(2.0, rel=CANS_ASYMPTOTE_REL, abs=0)
    lin, cub, new_a, _ = cans_interval_step(1e-6, 1.0)
    assert lin + cub == pytest.approx(new_a, rel=CANS_SUM_REL, abs=0)  # p(b) = 1 - eps


@pytest.mark.parametrize(("compute", "floor"), [(torch.float32, 1.19e-5), (torch.bfloat16, 1.19e-5),
                                                (torch.float16, 1.19e-5),
                                                (torch.float64, 2.2e-14)])
def test_a_cans_bound_below_the_first_steps_rounding_is_refused_at_the_call(compute, floor):
    # below ~10 machine epsilons the first cubic reversed top directions with no error: float32
    # at 1e-7 gave <u_i, O v_i> = -0.53, float64 at 1e-16 gave -0.98
    X = torch.randn(8, 64, dtype=torch.float64)
    for call in (orthogonalize, polar_iterates):
        with pytest.raises(ValueError, match=r"lower_bound=.* is below what CANS's first cubic "
                                             r"resolves in torch\.float(32|64)"):
            call(X, method="cans", dtype=compute, lower_bound=floor / 2)
    # at the floor it converges with every direction kept; the distance to U V^T is about
    # eps / (2 floor) = 1/200 relative (4.4e-3 to 4.6e-3 measured), bounded at twice that
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    O = orthogonalize(X, method="cans", dtype=compute, lower_bound=floor * 1.01,
                      steps=60).double()
    assert torch.diagonal(U.mT @ O @ Vh.mT).min() > DIRECTION_KEPT_MIN
    if compute in (torch.float32, torch.float64):
        assert torch.linalg.matrix_norm(O - U @ Vh) / math.sqrt(8) < 2 * 0.5 / 100


# A 64x32 input scaled by 1e-25 or 1e-35 against itself: the same iteration from a start that
# differs by float32 rounding of the normalization; measured at most 2.4e-6 apart (CANS, the
# most steps), 9.5e-7 (Polar Express), 7.5e-7 (quintic) on entries of ~0.2.
TINY_INPUT_ATOL = 1e-5


@pytest.mark.parametrize("method", ["quintic", "polar_express", "cans"])
def test_eps_zero_keeps_a_tiny_inputs_polar_factor(method):
    # float32 squares of entries below ~1e-19 underflow: the norm read 0, X was divided by
    # float32's tiny and the products overflowed to NaN
    torch.manual_seed(0)
    X = torch.randn(64, 32)
    want = orthogonalize(X, method=method, eps=0.0, dtype=torch.float32)
    for scale in (1e-25, 1e-35):
        got = orthogonalize(X * scale, method=method, eps=0.0, dtype=torch.float32)
        # the same singular directions scaled to the same start: float32 rounding apart
        torch.testing.assert_close(got, want, rtol=0, atol=TINY_INPUT_ATOL)
    tiny_soft = orthogonalize(X * 1e-30, method=method, eps=0.0, dtype=torch.float32,
                              softening=0.5)
    torch.testing.assert_close(tiny_soft, soften(want, X, 0.5, eps=0.0), rtol=0,
                               atol=TINY_INPUT_ATOL)
    assert torch.equal(orthogonalize(torch.zeros(4, 3), method=method, eps=0.0),
                       torch.zeros(4, 3))


@pytest.mark.parametrize(("method", "compute", "scale", "eps", "floored"), [
    ("polar_express", torch.float32, 1e-35, 1e-23, False),
    ("polar_express", torch.float32, 1e-35, 1e-26, False),
    ("polar_express", torch.float64, 1e-305, 1e-250, False),
    ("cans", torch.float32, 1e-35, 1e-26, False),
    ("cans", torch.float64, 1e-305, 1e-250, False),
    # X X^T X of norm ~1e-32 is floored at eps = 1e-23: a start of norm ~2e-3, as eps asks
    ("cans", torch.float32, 1e-35, 1e-23, True),
])
def test_a_tiny_eps_above_a_tiny_inputs_norm_stays_finite(method, compute, scale, eps, floored):
    # divided by eps, X kept a norm of ~1e-11: its Gram's squared entries underflowed, the
    # Gram's norm read low, sigma_max came out above 1 and the iteration diverged to NaN
    torch.manual_seed(0)
    X = torch.randn(16, 8, dtype=compute)
    got = orthogonalize(X * scale, method=method, eps=eps, dtype=compute)
    assert bool(torch.isfinite(got).all())
    if not floored:  # the Gram's normalization brings it to X's unit start: rounding apart
        want = orthogonalize(X, method=method, eps=0.0, dtype=compute)
        torch.testing.assert_close(got, want, rtol=0, atol=TINY_INPUT_ATOL)


# Scaled by 2^-138, float32 entries of ~1 are subnormal and keep ~11 of their 24 bits: the
# input's own rounding, 2^-11 = 4.9e-4 relative, bounds how far its polar factor can land
# (measured 7.5e-5 to 8.4e-5 on entries of ~0.2).
SUBNORMAL_INPUT_ATOL = 4.9e-4


@pytest.mark.parametrize("method", ["quintic", "polar_express", "cans"])
def test_eps_zero_divides_a_subnormal_input_by_its_own_norm(method):
    # its norm (3e-41) was floored at float32's smallest normal number, 1.2e-38: the quintic
    # came out with singular values 0.23-0.68 (0.31 off), and softening=1 with norm 0.003
    torch.manual_seed(0)
    X = torch.randn(64, 32)
    tiny = X * 2.0**-138
    want = orthogonalize(X, method=method, eps=0.0, dtype=torch.float32)
    got = orthogonalize(tiny, method=method, eps=0.0, dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=SUBNORMAL_INPUT_ATOL)
    direction = orthogonalize(tiny, method=method, eps=0.0, dtype=torch.float32, softening=1.0)
    assert abs(float(torch.linalg.matrix_norm(direction)) - 1.0) < SUBNORMAL_INPUT_ATOL

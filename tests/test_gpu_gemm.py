"""Half-precision matmuls through cuBLAS (autopar/backend/gemm.py) equal the cast-to-float32
product ops.contraction defines: run on a machine with CuPy and a GPU, skipped elsewhere.

Both sides multiply the same half values in float32; only the summation order differs, so a
relative 1e-4 (with 1e-4 absolute near zero) is far above float32's reorder error at these
depths (sqrt(k) x 6e-8) and far below a wrong stride, transpose or leading dimension (O(1))."""
from __future__ import annotations

import numpy as np
import pytest
from gpu import cupy_or_skip

cupy = cupy_or_skip()

import autopar  # noqa: E402,F401  (registers bfloat16)
from autopar.backend import half_matmul  # noqa: E402
from autopar.ops.contraction import _matmul  # noqa: E402

SHAPES = [((64, 48), (48, 32)), ((1, 7), (7, 1)), ((4, 16, 24), (4, 24, 8)), ((2, 3, 16, 24), (2, 3, 24, 16)),
          ((2, 16, 24), (24, 40)), ((2, 1, 8, 4), (1, 3, 4, 8)), ((0, 4), (4, 5)), ((3, 0), (0, 2))]


def half(shape, dtype, seed):
    return cupy.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sa, sb", SHAPES)
def test_half_matmul_equals_the_float32_product(dtype, sa, sb):
    a, b = half(sa, dtype, 0), half(sb, dtype, 1)
    got = half_matmul(a, b)
    assert got is not None, "the cuBLAS path refused a supported case (see the warning)"
    want = cupy.matmul(a.astype(np.float32), b.astype(np.float32))
    assert got.dtype == np.float32 and got.shape == want.shape
    cupy.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_transposed_views_and_the_ops_path(dtype):
    """The VJPs hand transposed views (``swapaxes``); the op's own ``_matmul`` takes the path."""
    a, b = half((3, 24, 16), dtype, 2).swapaxes(-1, -2), half((3, 8, 24), dtype, 3).swapaxes(-1, -2)
    want = cupy.matmul(a.astype(np.float32), b.astype(np.float32))
    cupy.testing.assert_allclose(half_matmul(a, b), want, rtol=1e-4, atol=1e-4)
    cupy.testing.assert_allclose(_matmul(a, b), want, rtol=1e-4, atol=1e-4)


def test_other_dtypes_take_the_array_modules_matmul():
    a = cupy.ones((4, 4), np.float32)
    assert half_matmul(a, a) is None
    assert half_matmul(a.astype(np.float16), a.astype("bfloat16")) is None     # mixed: the caller casts


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sa, sb", SHAPES[:6])
def test_a_half_result_is_the_float32_product_rounded_once(dtype, sa, sb):
    """``out_dtype``: cuBLAS stores the float32 sum in the half dtype -- the cast product
    rounded once, up to the one rounding a reordered sum can move (2**-7 relative)."""
    a, b = half(sa, dtype, 4), half(sb, dtype, 5)
    got = half_matmul(a, b, dtype)
    assert got is not None and got.dtype == np.dtype(dtype)
    want = cupy.matmul(a.astype(np.float32), b.astype(np.float32)).astype(dtype)
    cupy.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2.0 ** -7, atol=2.0 ** -7)

"""Half-precision matmuls on a GPU through cuBLAS: float16 or bfloat16 operands multiplied on
the tensor cores, accumulated in float32 and returned in float32 or rounded once to the
operands' dtype (``cublasGemmEx`` / ``cublasGemmStridedBatchedEx`` with ``CUBLAS_COMPUTE_32F``).

That is the product ``ops.contraction`` defines for half operands -- the host casts both to
float32 and multiplies there (numpy has no half GEMM), leaving one rounding to the caller --
without the two casts and at tensor-core speed: the 350M PanGu-α step in bfloat16 ran
*slower* than in float32 on an H100 while its GEMMs went through the cast.

cuBLAS is column-major. A row-major (m, k) array is a column-major (k, m) one, so
``C = A @ B`` (row-major, C-contiguous) is computed as ``C^T = B^T A^T``: the call takes B
first, with m and n swapped, and every leading dimension is a row length. Batches go
through the strided-batched call (a 2-D B under a contiguous batched A folds A's batch into
rows: one GEMM; a 2-D operand under a batch repeats with stride 0); other broadcast batch
dimensions are materialised first. Transposed views -- what the VJPs pass -- are read in
place through ``CUBLAS_OP_T``.

Each dtype's path is checked once per process against the cast-and-multiply product on a
small random problem; a CuPy without these bindings, a driver that refuses the call, or a
result that differs leaves the cast path in force (a warning says why). Importing this
module imports nothing of CuPy.

A training step makes about 1500 of these calls and the host issues them one after another,
so the Python around the cuBLAS call is kept short: the alpha/beta scalars are module
constants (their addresses taken once), dtype names come from a memo, and the batch shape
is broadcast by numpy only when the operands' batches differ.
"""
from __future__ import annotations

import functools
import itertools
import math
import sys
import warnings

import numpy as np

from .arrays import dtype_name, is_cupy_type

CUDA_DATA_TYPES = {"float16": 2, "bfloat16": 14}   # cudaDataType: CUDA_R_16F, CUDA_R_16BF
CUDA_R_32F = 0
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
CUBLAS_POINTER_MODE_HOST = 0
CHECK_RTOL = 1e-4        # float32 sums of the same half products in another order differ far less

# alpha = 1, beta = 0 as host float32 scalars (CUBLAS_POINTER_MODE_HOST), read-only and alive
# for the process: cuBLAS reads them during each call
_ONE = np.ones(1, np.float32)
_ZERO = np.zeros(1, np.float32)
_ONE.flags.writeable = _ZERO.flags.writeable = False
_ONE_PTR, _ZERO_PTR = _ONE.ctypes.data, _ZERO.ctypes.data


def half_matmul(a, b, out_dtype=None):
    """``a @ b`` of two CuPy arrays of one half dtype as a float32 CuPy array -- or, with
    ``out_dtype`` the operands' own dtype, that float32 sum rounded once to it, written by
    cuBLAS (no float32 array to read again) -- or None when this path does not serve them
    (host arrays, other dtypes, a CuPy or device that failed the check): the caller then
    casts and multiplies."""
    if not _served(a, b):
        return None
    out = _out_name(a, out_dtype)
    if not _checked(dtype_name(a.dtype), out):
        return None
    return _gemm(a, b, out)


def _out_name(a, out_dtype) -> str:
    """The result's dtype name: the operands' half dtype when asked for, else float32."""
    if out_dtype is not None and np.dtype(out_dtype) == a.dtype:
        return dtype_name(a.dtype)
    return "float32"


def _served(a, b) -> bool:
    if not (is_cupy_type(type(a)) and is_cupy_type(type(b))):
        return False
    if a.dtype != b.dtype or dtype_name(a.dtype) not in CUDA_DATA_TYPES or a.ndim < 2 or b.ndim < 2:
        return False
    cublas = getattr(getattr(sys.modules.get("cupy"), "cuda", None), "cublas", None)
    return hasattr(cublas, "gemmEx") and hasattr(cublas, "gemmStridedBatchedEx")


def _batch_shape(a_batch: tuple[int, ...], b_batch: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast of two batch shapes, as ``np.broadcast_shapes`` gives it; equal ones
    and one empty one (a 2-D operand) -- every call a model makes -- without numpy."""
    if a_batch == b_batch or not b_batch:
        return a_batch
    if not a_batch:
        return b_batch
    return tuple(np.broadcast_shapes(a_batch, b_batch))


def _layout(x, batch: tuple[int, ...]):
    """How cuBLAS reads the row-major (..., r, c) operand ``x`` under ``batch``:
    (array, transposed, leading dimension, batch stride), copying only when it must.

    A C-contiguous matrix is read as is (ld c). A transposed view of one -- what the VJPs
    hand over, ``swapaxes(-1, -2)`` -- is read through ``CUBLAS_OP_T`` from its base's
    memory (ld r) instead of being copied. A 2-D operand under a batch repeats with
    batch stride 0; any other layout or broadcast is made contiguous first."""
    cp = sys.modules["cupy"]
    r, c = x.shape[-2:]
    if x.shape[:-2] != batch:
        if x.ndim == 2:
            x2, transposed, ld, _ = _layout(x, ())
            return x2, transposed, ld, 0
        x = cp.broadcast_to(x, batch + (r, c))
    if x.flags.c_contiguous:
        return x, False, c, r * c
    if x.swapaxes(-1, -2).flags.c_contiguous:
        return x, True, r, r * c
    return cp.ascontiguousarray(x), False, c, r * c


def _gemm(a, b, out: str = "float32"):
    """The product accumulated in float32 and stored as ``out``, shapes as ``matmul``'s:
    (..., m, k) @ (..., k, n) -> (..., m, n)."""
    cp = sys.modules["cupy"]
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if b.ndim == 2 and a.ndim > 2 and a.flags.c_contiguous:   # a weight under a batch: one GEMM over every row
        return _gemm(a.reshape(-1, k), b, out).reshape(a.shape[:-1] + (n,))   # (..., m, k) -> (rows, k)
    batch = _batch_shape(a.shape[:-2], b.shape[:-2])
    c = cp.empty(batch + (m, n), out)
    if c.size == 0:
        return c
    if k == 0:
        c.fill(0)
        return c
    a, a_t, lda, stride_a = _layout(a, batch)
    b, b_t, ldb, stride_b = _layout(b, batch)
    op_a, op_b = (CUBLAS_OP_T if a_t else CUBLAS_OP_N), (CUBLAS_OP_T if b_t else CUBLAS_OP_N)
    cublas = cp.cuda.cublas
    handle = cp.cuda.device.get_cublas_handle()
    dtype, count = CUDA_DATA_TYPES[dtype_name(a.dtype)], math.prod(batch)
    c_type = CUDA_DATA_TYPES.get(out, CUDA_R_32F)
    mode = cublas.getPointerMode(handle)
    if mode != CUBLAS_POINTER_MODE_HOST:
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    try:
        if count == 1:      # column-major C^T (n x m) = B^T (n x k) A^T (k x m)
            cublas.gemmEx(handle, op_b, op_a, n, m, k, _ONE_PTR, b.data.ptr, dtype, ldb,
                          a.data.ptr, dtype, lda, _ZERO_PTR, c.data.ptr, c_type, n,
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        else:
            cublas.gemmStridedBatchedEx(handle, op_b, op_a, n, m, k, _ONE_PTR,
                                        b.data.ptr, dtype, ldb, stride_b, a.data.ptr, dtype, lda, stride_a,
                                        _ZERO_PTR, c.data.ptr, c_type, n, m * n, count,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    finally:
        if mode != CUBLAS_POINTER_MODE_HOST:
            cublas.setPointerMode(handle, mode)
    return c


@functools.lru_cache(maxsize=None)
def _checked(dtype: str, out: str = "float32") -> bool:
    """Whether cuBLAS's product of ``dtype`` operands, stored as ``out``, equals the
    cast-and-multiply one (rounded to ``out``) here
    (plain, batched, folded-batch, 2-D-under-a-batch and broadcast shapes, each with neither,
    one or both operands transposed views), once per process."""
    cp = sys.modules["cupy"]
    rng = np.random.default_rng(0)
    cases = [((33, 17), (17, 9)), ((3, 5, 7), (3, 7, 4)), ((2, 6, 8), (8, 5)), ((6, 8), (2, 8, 5)),
             ((2, 1, 4, 3), (2, 3, 3, 6))]

    def operand(shape, transposed: bool):
        if not transposed:
            return cp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
        flipped = shape[:-2] + (shape[-1], shape[-2])           # (..., r, c) stored as (..., c, r)
        return cp.asarray(rng.standard_normal(flipped).astype(np.float32)).astype(dtype).swapaxes(-1, -2)

    tol = CHECK_RTOL if out == "float32" else 2.0 ** -7   # a half result: one rounding apart at most
    try:
        for (sa, sb), (ta, tb) in itertools.product(cases, itertools.product((False, True), repeat=2)):
            a, b = operand(sa, ta), operand(sb, tb)
            got = _gemm(a, b, out).astype(np.float32)
            want = cp.matmul(a.astype(np.float32), b.astype(np.float32)).astype(out).astype(np.float32)
            if got.shape != want.shape or not bool(cp.allclose(got, want, rtol=tol, atol=tol)):
                raise ValueError(f"{sa} @ {sb} (transposed views: {ta}, {tb}): cuBLAS and the float32 product differ by "
                                 f"{float(cp.abs(got - want).max()):.3g}")
    except Exception as err:      # a missing binding, a refused call, a wrong result: use the cast path
        warnings.warn(f"autopar: {dtype} matmuls with {out} results stay on the cast-to-float32 path: "
                      f"{type(err).__name__}: {err}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True

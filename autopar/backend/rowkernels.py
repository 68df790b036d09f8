"""One-pass row kernels on a GPU: Softmax and LayerNorm over the last axis of (R, C), one
warp per row, for float32 and bfloat16 activations.

CuPy's reductions and elementwise kernels run at 120-200 G elements/s on an H100 whatever
the dtype (session 8: the fused softmax over (131072, 1024) took 1.6 ms forward and 1.3 ms
backward in float32 and bfloat16 alike, where one bandwidth-bound bfloat16 pass is about
0.16 ms). Here a warp owns a row: it reads the row a few times from cache (max, sum,
output), combines its lanes' partial results with shuffles, and writes once -- no (R, 1)
statistics arrays, no separate reduction launches.

    softmax(x2) / softmax_grad(dy2, y2)                        (R, C) -> (R, C)
    layer_norm(x2, gamma, beta, eps) / layer_norm_grad(dy2, x2, gamma, eps, need_p)

The same operations as ``kernels``' fused kernels (and the CPU's), in float32, in the same
order within an element; only the order of a row's sums differs, so results agree to
rounding. bfloat16 values travel as their 16 bits (``unsigned short``) and convert by
hand -- widening is a shift, narrowing rounds to nearest even as ml_dtypes does -- so no
CUDA half header is needed. Each (kernel, dtypes) pair checks itself once per process
against plain CuPy float32 array operations on a small odd shape; a compile error or a
difference leaves ``kernels``' fused path in force, with a warning (:func:`serves`).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from .arrays import dtype_name
from .csource import LOAD, STORAGE, STORE, TO_BF16
from .cupy_import import import_cupy

ROW_DTYPES = ("float32", "bfloat16")
WARPS_PER_BLOCK = 8
CHECK_SHAPE = (37, 100)            # rows not a multiple of the block's 8, columns not of the warp's 32
CHECK_RTOL = {"float32": 1e-5, "bfloat16": 2.0 ** -6}   # reordered float32 sums; a bf16 output's rounding

PRELUDE = TO_BF16 + r"""
__device__ __forceinline__ float autopar_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
__device__ __forceinline__ float autopar_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
"""

# {T}: activations' storage, {P}: parameters' storage; LT/ST load and store activations, LP parameters
SOFTMAX = r"""
extern "C" __global__ void autopar_row_softmax(const {T}* x, {T}* y, long long rows, int cols) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const {T}* xr = x + row * cols;
    {T}* yr = y + row * cols;
    float m = -3.402823466e38f;
    for (int c = lane; c < cols; c += 32) m = fmaxf(m, LT(xr[c]));
    m = autopar_warp_max(m);
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s += expf(LT(xr[c]) - m);
    float inv = 1.0f / autopar_warp_sum(s);
    for (int c = lane; c < cols; c += 32) yr[c] = ST(expf(LT(xr[c]) - m) * inv);
}
"""

SOFTMAX_GRAD = r"""
extern "C" __global__ void autopar_row_softmax_grad(const {T}* dy, const {T}* y, {T}* dx, long long rows, int cols) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    long long at = row * cols;
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s += LT(dy[at + c]) * LT(y[at + c]);
    s = autopar_warp_sum(s);
    for (int c = lane; c < cols; c += 32) dx[at + c] = ST((LT(dy[at + c]) - s) * LT(y[at + c]));
}
"""

# mean, then the variance of (x - mean): normalization.py's two passes, in float32
ROW_STATS = r"""
    float mean = 0.0f;
    for (int c = lane; c < cols; c += 32) mean += LT(xr[c]);
    mean = autopar_warp_sum(mean) / cols;
    float var = 0.0f;
    for (int c = lane; c < cols; c += 32) { float d = LT(xr[c]) - mean; var += d * d; }
    float rstd = 1.0f / sqrtf(autopar_warp_sum(var) / cols + eps);
"""

LAYER_NORM = r"""
extern "C" __global__ void autopar_row_layer_norm(const {T}* x, const {P}* gamma, const {P}* beta, {T}* y,
                                                   long long rows, int cols, float eps) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const {T}* xr = x + row * cols;
    {T}* yr = y + row * cols;
""" + ROW_STATS + r"""
    for (int c = lane; c < cols; c += 32) {
        float xh = LT(xr[c]) - mean;
        xh = xh * rstd;
        float o = xh * LP(gamma[c]);
        o = o + LP(beta[c]);
        yr[c] = ST(o);
    }
}
"""

# dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma, as kernels.LAYER_NORM_GRAD;
# p = dy * xhat (float32), whose column sums are dgamma (kernels.column_sum), when asked for
LAYER_NORM_GRAD = r"""
extern "C" __global__ void autopar_row_layer_norm_grad(const {T}* dy, const {T}* x, const {P}* gamma, {T}* dx,
                                                        float* p, long long rows, int cols, float eps, int need_dx) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const {T}* xr = x + row * cols;
    const {T}* dyr = dy + row * cols;
""" + ROW_STATS + r"""
    if (p != 0) {
        for (int c = lane; c < cols; c += 32) p[row * cols + c] = LT(dyr[c]) * ((LT(xr[c]) - mean) * rstd);
    }
    if (!need_dx) return;
    float gs = 0.0f, gx = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        float g = LT(dyr[c]) * LP(gamma[c]);
        gs += g;
        gx += g * ((LT(xr[c]) - mean) * rstd);
    }
    float gmean = autopar_warp_sum(gs) / cols;
    float proj = autopar_warp_sum(gx) / cols;
    for (int c = lane; c < cols; c += 32) {
        float g = LT(dyr[c]) * LP(gamma[c]);
        g = g - gmean;
        float xh = LT(xr[c]) - mean;
        xh = xh * rstd;
        xh = xh * proj;
        g = g - xh;
        g = g * rstd;
        dx[row * cols + c] = ST(g);
    }
}
"""

KERNELS = {"softmax": SOFTMAX, "softmax_grad": SOFTMAX_GRAD, "layer_norm": LAYER_NORM,
           "layer_norm_grad": LAYER_NORM_GRAD}


def source(kind: str, t: str, p: str = "float32") -> str:
    """The CUDA C of kernel ``kind`` for activations of dtype ``t`` and parameters of ``p``
    (plain text: built and inspected without CuPy)."""
    macros = f"#define LT(v) {LOAD[t]}\n#define ST(f) {STORE[t]}\n#define LP(v) {LOAD[p]}\n"
    body = KERNELS[kind].replace("{T}", STORAGE[t]).replace("{P}", STORAGE[p])
    return macros + PRELUDE + body


@functools.cache
def _kernel(kind: str, t: str, p: str):
    cupy = import_cupy("autopar.backend.rowkernels")
    return cupy.RawKernel(source(kind, t, p), f"autopar_row_{kind}", options=("--fmad=false",))


def _launch(kind: str, t: str, p: str, rows: int, args: tuple) -> None:
    threads = 32 * WARPS_PER_BLOCK
    blocks = (rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    _kernel(kind, t, p)((blocks,), (threads,), args)


def softmax(x2):
    """Softmax over the rows of the C-contiguous (R, C) ``x2``."""
    y = import_cupy("autopar.backend.rowkernels").empty_like(x2)
    _launch("softmax", dtype_name(x2.dtype), "float32", x2.shape[0], (x2, y, np.int64(x2.shape[0]), np.int32(x2.shape[1])))
    return y


def softmax_grad(dy2, y2):
    """dx = (dy - sum(dy * y)) * y over the rows of (R, C) ``dy2``, ``y2``."""
    dx = import_cupy("autopar.backend.rowkernels").empty_like(y2)
    _launch("softmax_grad", dtype_name(y2.dtype), "float32", y2.shape[0],
            (dy2, y2, dx, np.int64(y2.shape[0]), np.int32(y2.shape[1])))
    return dx


def layer_norm(x2, gamma, beta, eps: float):
    """LayerNorm over the rows of (R, C) ``x2``; gamma, beta (C,) of one dtype."""
    y = import_cupy("autopar.backend.rowkernels").empty_like(x2)
    _launch("layer_norm", dtype_name(x2.dtype), dtype_name(gamma.dtype), x2.shape[0],
            (x2, gamma, beta, y, np.int64(x2.shape[0]), np.int32(x2.shape[1]), np.float32(eps)))
    return y


def layer_norm_grad(dy2, x2, gamma, eps: float, need_dx: bool, need_p: bool):
    """(dx or None, p or None): dx of LayerNorm over the rows, p = dy * xhat in float32
    (its column sums are dgamma)."""
    cupy = import_cupy("autopar.backend.rowkernels")
    dx = cupy.empty_like(x2) if need_dx else None
    p = cupy.empty(x2.shape, np.float32) if need_p else None
    _launch("layer_norm_grad", dtype_name(x2.dtype), dtype_name(gamma.dtype), x2.shape[0],
            (dy2, x2, gamma, dx if need_dx else np.uint64(0), p if need_p else np.uint64(0),
             np.int64(x2.shape[0]), np.int32(x2.shape[1]), np.float32(eps), np.int32(need_dx)))
    return dx, p


def serves(kind: str, *arrays, params=()) -> bool:
    """Whether the row kernel ``kind`` computes for these (R, C) activations and (C,)
    parameters: CuPy arrays, the activations C-contiguous of one dtype in ROW_DTYPES, the
    parameters of one dtype in ROW_DTYPES, columns below 2**31, and this kernel's
    once-per-process check passed for those dtypes."""
    t = dtype_name(arrays[0].dtype)
    p = dtype_name(params[0].dtype) if params else "float32"
    if t not in ROW_DTYPES or p not in ROW_DTYPES or arrays[0].shape[-1] >= 2 ** 31:
        return False
    if not all(a.dtype == arrays[0].dtype and a.flags.c_contiguous for a in arrays):
        return False
    if not all(q.dtype == params[0].dtype and q.flags.c_contiguous for q in params):
        return False
    return _checked(kind, t, p)


def _reference(kind: str, x, dy, gamma, beta, eps: float, y=None) -> list:
    """``kind``'s results by plain CuPy float32 array operations, the check's yardstick:
    softmax; its VJP at ``y``; LayerNorm; its dx and dgamma."""
    cupy = import_cupy("autopar.backend.rowkernels")
    x, dy, gamma, beta = (a.astype(np.float32) for a in (x, dy, gamma, beta))
    if kind == "softmax":
        e = cupy.exp(x - x.max(axis=1, keepdims=True))
        return [e / e.sum(axis=1, keepdims=True)]
    if kind == "softmax_grad":
        y = y.astype(np.float32)
        return [(dy - (dy * y).sum(axis=1, keepdims=True)) * y]
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1.0 / cupy.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    if kind == "layer_norm":
        return [xhat * gamma + beta]
    g = dy * gamma
    dx = (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True)) * rstd
    return [dx, (dy * xhat).sum(axis=0)]


@functools.cache
def _checked(kind: str, t: str, p: str) -> bool:
    """Whether kernel ``kind`` on (t, p) agrees with :func:`_reference` on CHECK_SHAPE here
    (to float32 reordering, and one rounding of each bfloat16 output)."""
    cupy = import_cupy("autopar.backend.rowkernels")
    rng = np.random.default_rng(0)

    def rand(shape, dtype, scale=3.0):
        return cupy.asarray((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)
    x, dy = rand(CHECK_SHAPE, t), rand(CHECK_SHAPE, t, 1.0)
    gamma, beta = rand(CHECK_SHAPE[1:], p, 1.0), rand(CHECK_SHAPE[1:], p, 1.0)
    eps, y = 1e-5, None
    try:
        if kind == "softmax":
            got = [softmax(x)]
        elif kind == "softmax_grad":
            y = softmax(x)
            got = [softmax_grad(dy, y)]
        elif kind == "layer_norm":
            got = [layer_norm(x, gamma, beta, eps)]
        else:
            dx, prod = layer_norm_grad(dy, x, gamma, eps, True, True)
            got = [dx, prod.sum(axis=0)]
        for a, b in zip(got, _reference(kind, x, dy, gamma, beta, eps, y)):
            a, tol = a.astype(np.float32), CHECK_RTOL[t]
            if not bool(cupy.allclose(a, b, rtol=tol, atol=tol * (float(cupy.abs(b).max()) + 1.0))):
                raise ValueError(f"differs from float32 array operations by {float(cupy.abs(a - b).max()):.3g}")
    except Exception as err:        # a refused compile, a launch error, a wrong result: the fused path serves
        warnings.warn(f"autopar: the row kernel {kind} ({t} activations, {p} parameters) is not used here: "
                      f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)
        return False
    return True

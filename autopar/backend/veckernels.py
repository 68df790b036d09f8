"""Vectorised dropout on a GPU: 16-byte loads and stores, 8 bfloat16 or 4 float32 elements a
thread, for an array whose elements are consecutive in the logical tensor (a whole tensor,
or a shard that is one contiguous run of it).

CuPy's elementwise kernels moved 120-200 G elements/s on an H100 whatever the dtype
(session 8: the fused dropout over 134M elements took 715 us in float32 and bfloat16 alike;
a bandwidth-bound bfloat16 pass is about 160 us). The keep bit is the same hash of the
element's flat index as :func:`autopar.ir.random.keep_mask` (``csource.KEEP_HASH``, shared
with ``kernels``' walking kernel), and the value the same ``(x * keep) * scale`` in float32 with
the scale rounded to x's dtype first: the CPU's bits. Each dtype checks itself once per
process against ``keep_mask`` on the device and falls back, with a warning, to ``kernels``'
element-by-element kernel.

    dropout(flat, key, keep_prob, base)   y[i] = x[i] * keep(base + i) / keep_prob
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from ..ir.random import keep_mask
from .csource import KEEP_HASH, LOAD, LOWBIAS32, STORAGE, STORE, TO_BF16, keep_threshold
from .cupy_import import import_cupy

VEC_DTYPES = {"float32": ("float4", 4), "bfloat16": ("uint4", 8)}   # 16-byte vectors

DROPOUT = r"""
__device__ __forceinline__ float autopar_kept(unsigned long long idx, unsigned int key_lo, unsigned int key_hi,
                                               unsigned int threshold) {
""" + KEEP_HASH + r"""
    return h < threshold ? 1.0f : 0.0f;
}
extern "C" __global__ void autopar_vec_dropout(const {S}* x, {S}* y, unsigned long long n, unsigned int key_lo,
                                               unsigned int key_hi, unsigned int threshold, float scale,
                                               unsigned long long base) {
    unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long vecs = n / {V};
    for (unsigned long long v = tid; v < vecs; v += step) {
        {VT} in = ((const {VT}*)x)[v];
        {VT} out;
        const {S}* pi = (const {S}*)&in;
        {S}* po = ({S}*)&out;
#pragma unroll
        for (int j = 0; j < {V}; ++j) {
            float keep = autopar_kept(base + v * {V} + j, key_lo, key_hi, threshold);
            po[j] = ST((LT(pi[j]) * keep) * scale);
        }
        ((({VT}*)y))[v] = out;
    }
    for (unsigned long long i = vecs * {V} + tid; i < n; i += step) {
        float keep = autopar_kept(base + i, key_lo, key_hi, threshold);
        y[i] = ST((LT(x[i]) * keep) * scale);
    }
}
"""

THREADS = 256
MAX_BLOCKS = 65536


def source(dtype: str) -> str:
    """The CUDA C of the vectorised dropout for ``dtype`` (plain text, no CuPy needed)."""
    vector, width = VEC_DTYPES[dtype]
    body = DROPOUT.replace("{S}", STORAGE[dtype]).replace("{VT}", vector).replace("{V}", str(width))
    return f"#define LT(v) {LOAD[dtype]}\n#define ST(f) {STORE[dtype]}\n" + TO_BF16 + LOWBIAS32 + body


@functools.cache
def _kernel(dtype: str):
    cupy = import_cupy("autopar.backend.veckernels")
    return cupy.RawKernel(source(dtype), "autopar_vec_dropout", options=("--fmad=false",))


def dropout(flat, key: int, keep_prob: float, base: int):
    """``flat * keep(base + i) * (1 / keep_prob)`` for the 1-D C-contiguous ``flat`` whose
    element i is the logical tensor's element ``base + i`` (see :func:`serves`)."""
    cupy = import_cupy("autopar.backend.veckernels")
    out = cupy.empty_like(flat)
    width = VEC_DTYPES[flat.dtype.name][1]
    blocks = max(1, min(MAX_BLOCKS, (flat.size // width + THREADS - 1) // THREADS))
    scale = np.float32(flat.dtype.type(1.0 / keep_prob))      # rounded to x's dtype first, as the CPU
    _kernel(flat.dtype.name)((blocks,), (THREADS,),
                             (flat, out, np.uint64(flat.size), np.uint32(key & 0xFFFFFFFF),
                              np.uint32((key >> 32) & 0xFFFFFFFF), np.uint32(keep_threshold(keep_prob)), scale,
                              np.uint64(base)))
    return out


def serves(flat) -> bool:
    """Whether the vectorised kernel computes for ``flat``: a 1-D C-contiguous CuPy array of
    a dtype in VEC_DTYPES whose data starts on a 16-byte boundary (the vector loads need
    it), and this dtype's once-per-process check passed."""
    return (flat.dtype.name in VEC_DTYPES and flat.ndim == 1 and flat.flags.c_contiguous
            and flat.data.ptr % 16 == 0 and _checked(flat.dtype.name))


@functools.cache
def _checked(dtype: str) -> bool:
    """Whether the kernel gives :func:`autopar.ir.random.keep_mask`'s bits on a run of odd
    length starting past 2**32 (the hash's high half) and at 0, here."""
    cupy = import_cupy("autopar.backend.veckernels")
    rng = np.random.default_rng(0)
    try:
        for base, n in ((0, 1000003), (2 ** 32 - 517, 4099)):
            x = cupy.asarray(rng.standard_normal(n).astype(np.float32)).astype(dtype)
            key, keep = 0x1234_5678_9ABC_DEF0 + base, 0.9
            got = dropout(x, key, keep, base)
            mask = keep_mask(key, cupy.arange(base, base + n, dtype=np.uint64), keep)
            scale = np.float32(np.dtype(dtype).type(1.0 / keep))
            want = ((x.astype(np.float32) * mask.astype(np.float32)) * scale).astype(dtype)
            if not bool((got.view(np.uint16 if dtype == "bfloat16" else np.uint32)
                         == want.view(np.uint16 if dtype == "bfloat16" else np.uint32)).all()):
                raise ValueError(f"{int((got != want).sum())} of {n} elements differ from keep_mask's "
                                 f"(base {base})")
    except Exception as err:        # a refused compile, a launch error, a wrong bit: the element kernel serves
        warnings.warn(f"autopar: the vectorised dropout is not used for {dtype} here: {type(err).__name__}: {err}",
                      RuntimeWarning, stacklevel=3)
        return False
    return True

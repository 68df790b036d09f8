"""Vectorised elementwise kernels on a GPU: dropout, add and the float32 <-> bfloat16 / float16 casts,
several elements a thread through 16-byte (or 8-byte) loads and stores. Dropout takes an
array whose elements are consecutive in the logical tensor (a whole tensor, or a shard that
is one contiguous run of it); add and cast take C-contiguous arrays of one shape.

CuPy's elementwise kernels moved 120-200 G elements/s on an H100 whatever the dtype
(session 8: the fused dropout over 134M elements took 715 us in float32 and bfloat16 alike;
a bandwidth-bound bfloat16 pass is about 160 us). The keep bit is the same hash of the
element's flat index as :func:`autopar.ir.random.keep_mask` (``csource.KEEP_HASH``, shared
with ``kernels``' walking kernel), and the value the same ``(x * keep) * scale`` in float32 with
the scale rounded to x's dtype first: the CPU's bits. Each dtype checks itself once per
process against ``keep_mask`` on the device and falls back, with a warning, to ``kernels``'
element-by-element kernel.

    dropout(flat, key, keep_prob, base)   y[i] = x[i] * keep(base + i) / keep_prob
    add(a, b, out=None)                   a + b in float32, rounded once (out may be a or b)
    cast(x, dtype)                        float32 -> bfloat16 or float16 (to nearest even) or back

add and cast give CuPy's and the CPU's bits (a bfloat16 or float16 sum is the float32 sum
rounded once, as ml_dtypes and numpy compute it); each (kernel, dtype) checks itself once against CuPy's own
operations and falls back, with a warning, to them.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from ..ir.random import keep_mask
from .arrays import dtype_name, is_cupy_type
from .csource import F16, KEEP_HASH, LOAD, LOWBIAS32, STORAGE, STORE, TO_BF16, keep_threshold
from .cupy_import import import_cupy

VEC_DTYPES = {"float32": ("float4", 4), "bfloat16": ("uint4", 8), "float16": ("uint4", 8)}   # 16-byte vectors

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


@functools.cache
def source(dtype: str) -> str:
    """The CUDA C of the vectorised dropout for ``dtype`` (plain text, no CuPy needed; built
    once per dtype, as add_source and cast_source: every launch looks its kernel up by it)."""
    vector, width = VEC_DTYPES[dtype]
    body = DROPOUT.replace("{S}", STORAGE[dtype]).replace("{VT}", vector).replace("{V}", str(width))
    return f"#define LT(v) {LOAD[dtype]}\n#define ST(f) {STORE[dtype]}\n" + TO_BF16 + F16 + LOWBIAS32 + body


def dropout(flat, key: int, keep_prob: float, base: int):
    """``flat * keep(base + i) * (1 / keep_prob)`` for the 1-D C-contiguous ``flat`` whose
    element i is the logical tensor's element ``base + i`` (see :func:`serves`)."""
    cupy = import_cupy("autopar.backend.veckernels")
    out = cupy.empty_like(flat)
    name = dtype_name(flat.dtype)
    blocks = _blocks(flat.size, VEC_DTYPES[name][1])
    scale = np.float32(flat.dtype.type(1.0 / keep_prob))      # rounded to x's dtype first, as the CPU
    _raw("autopar_vec_dropout", source(name))((blocks,), (THREADS,),
                             (flat, out, np.uint64(flat.size), np.uint32(key & 0xFFFFFFFF),
                              np.uint32((key >> 32) & 0xFFFFFFFF), np.uint32(keep_threshold(keep_prob)), scale,
                              np.uint64(base)))
    return out


def serves(flat) -> bool:
    """Whether the vectorised kernel computes for ``flat``: a 1-D C-contiguous CuPy array of
    a dtype in VEC_DTYPES whose data starts on a 16-byte boundary (the vector loads need
    it), and this dtype's once-per-process check passed."""
    name = dtype_name(flat.dtype)
    return (name in VEC_DTYPES and flat.ndim == 1 and flat.flags.c_contiguous
            and flat.data.ptr % 16 == 0 and _checked(name))


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
            bits = np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint32
            if not bool((got.view(bits) == want.view(bits)).all()):
                raise ValueError(f"{int((got != want).sum())} of {n} elements differ from keep_mask's "
                                 f"(base {base})")
    except Exception as err:        # a refused compile, a launch error, a wrong bit: the element kernel serves
        warnings.warn(f"autopar: the vectorised dropout is not used for {dtype} here: {type(err).__name__}: {err}",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


# ---- add and cast --------------------------------------------------------------------------------

ADD = r"""
extern "C" __global__ void autopar_vec_add(const {S}* a, const {S}* b, {S}* y, unsigned long long n) {
    unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long vecs = n / {V};
    for (unsigned long long v = tid; v < vecs; v += step) {
        {VT} va = ((const {VT}*)a)[v];
        {VT} vb = ((const {VT}*)b)[v];
        {VT} out;
        const {S}* pa = (const {S}*)&va;
        const {S}* pb = (const {S}*)&vb;
        {S}* po = ({S}*)&out;
#pragma unroll
        for (int j = 0; j < {V}; ++j) po[j] = ST(LT(pa[j]) + LT(pb[j]));
        (({VT}*)y)[v] = out;
    }
    for (unsigned long long i = vecs * {V} + tid; i < n; i += step) y[i] = ST(LT(a[i]) + LT(b[i]));
}
"""

# four elements a thread: a float4 on the float32 side, a uint2 on the 16-bit side
CAST = r"""
extern "C" __global__ void autopar_vec_cast(const {SI}* x, {SO}* y, unsigned long long n) {
    unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long vecs = n / 4;
    for (unsigned long long v = tid; v < vecs; v += step) {
        {VI} in = ((const {VI}*)x)[v];
        {VO} out;
        const {SI}* pi = (const {SI}*)&in;
        {SO}* po = ({SO}*)&out;
#pragma unroll
        for (int j = 0; j < 4; ++j) po[j] = ST(LI(pi[j]));
        (({VO}*)y)[v] = out;
    }
    for (unsigned long long i = vecs * 4 + tid; i < n; i += step) y[i] = ST(LI(x[i]));
}
"""
CAST_VECTORS = {"float32": "float4", "bfloat16": "uint2", "float16": "uint2"}
CASTS = (("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16"), ("float16", "float32"))


@functools.cache
def add_source(dtype: str) -> str:
    """The CUDA C of the vectorised add for ``dtype`` (plain text)."""
    vector, width = VEC_DTYPES[dtype]
    body = ADD.replace("{S}", STORAGE[dtype]).replace("{VT}", vector).replace("{V}", str(width))
    return f"#define LT(v) {LOAD[dtype]}\n#define ST(f) {STORE[dtype]}\n" + TO_BF16 + F16 + body


@functools.cache
def cast_source(src: str, dst: str) -> str:
    """The CUDA C of the vectorised ``src`` -> ``dst`` cast (plain text)."""
    body = (CAST.replace("{SI}", STORAGE[src]).replace("{SO}", STORAGE[dst])
            .replace("{VI}", CAST_VECTORS[src]).replace("{VO}", CAST_VECTORS[dst]))
    return f"#define LI(v) {LOAD[src]}\n#define ST(f) {STORE[dst]}\n" + TO_BF16 + F16 + body


@functools.cache
def _raw(name: str, src: str):
    return import_cupy("autopar.backend.veckernels").RawKernel(src, name, options=("--fmad=false",))


def _blocks(n: int, width: int) -> int:
    return max(1, min(MAX_BLOCKS, (n // width + THREADS - 1) // THREADS))


def add(a, b, out=None):
    """``a + b`` (see :func:`add_serves`), into ``out`` when given (which may be ``a`` or ``b``)."""
    out = import_cupy("autopar.backend.veckernels").empty_like(a) if out is None else out
    name = dtype_name(a.dtype)
    width = VEC_DTYPES[name][1]
    _raw("autopar_vec_add", add_source(name))((_blocks(a.size, width),), (THREADS,),
                                                      (a, b, out, np.uint64(a.size)))
    return out


def cast(x, dtype):
    """``x.astype(dtype)`` (see :func:`cast_serves`)."""
    out = import_cupy("autopar.backend.veckernels").empty(x.shape, dtype)
    _raw("autopar_vec_cast", cast_source(dtype_name(x.dtype), dtype_name(np.dtype(dtype))))(
        (_blocks(x.size, 4),), (THREADS,), (x, out, np.uint64(x.size)))
    return out


def _aligned(*arrays) -> bool:
    for a in arrays:
        if not (a.flags.c_contiguous and a.data.ptr % 16 == 0):
            return False
    return True


def add_serves(a, b, out=None) -> bool:
    """Whether :func:`add` computes ``a + b``: CuPy arrays of one shape and one dtype in
    VEC_DTYPES, C-contiguous on 16-byte boundaries, not empty, and the check passed."""
    arrays = (a, b) if out is None else (a, b, out)
    for x in arrays:
        if not is_cupy_type(type(x)):
            return False
    name = dtype_name(a.dtype)
    if name not in VEC_DTYPES or a.size == 0:
        return False
    for x in arrays:
        if x.shape != a.shape or x.dtype != a.dtype:
            return False
    return _aligned(*arrays) and _checked_op("add", name, name)


def cast_serves(x, dtype) -> bool:
    """Whether :func:`cast` computes ``x.astype(dtype)``: a C-contiguous, 16-byte-aligned,
    non-empty CuPy array, float32 -> bfloat16 / float16 or back, and the check passed."""
    if not is_cupy_type(type(x)):
        return False
    pair = (dtype_name(x.dtype), dtype_name(np.dtype(dtype)))
    return pair in CASTS and x.size > 0 and _aligned(x) and _checked_op("cast", *pair)


@functools.cache
def _checked_op(kind: str, src: str, dst: str) -> bool:
    """Whether the add or cast kernel gives CuPy's bits (a bfloat16 sum: the float32 sum
    rounded once) on a run of odd length, here."""
    cupy = import_cupy("autopar.backend.veckernels")
    rng = np.random.default_rng(0)
    bits = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16}
    try:
        a = cupy.asarray((rng.standard_normal(100003) * 3).astype(np.float32)).astype(src)
        if kind == "add":
            b = cupy.asarray((rng.standard_normal(100003) * 3).astype(np.float32)).astype(src)
            got, want = add(a, b), (a.astype(np.float32) + b.astype(np.float32)).astype(src)
        else:
            got, want = cast(a, dst), a.astype(dst)
        if not bool((got.view(bits[dst]) == want.view(bits[dst])).all()):
            raise ValueError(f"{int((got != want).sum())} of {a.size} elements differ from CuPy's")
    except Exception as err:        # a refused compile, a launch error, a wrong bit: CuPy's own op serves
        warnings.warn(f"autopar: the vectorised {kind} ({src} -> {dst}) is not used here: "
                      f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)
        return False
    return True

"""CUDA C pieces the GPU kernels share (plain strings: importing this imports nothing of CuPy).

    LOWBIAS32, KEEP_HASH      dropout's keep bit: :func:`autopar.ir.random.keep_mask`'s hash
    TO_BF16                   float -> bfloat16 bits, rounded to nearest even (as ml_dtypes)
    F16                       float16 bits <-> float, rounded to nearest even (as numpy)
    STORAGE, LOAD, STORE      how a raw kernel holds, widens and narrows float32 / bfloat16 / float16
    keep_threshold(p)         the uint32 bound of the keep bit
"""
from __future__ import annotations

LOWBIAS32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)   # ir/random.py's _H1, _H2
LOWBIAS32 = """
__device__ __forceinline__ unsigned int autopar_lowbias32(unsigned int x) {
    x ^= x >> 16;
    x *= %#010xu;
    x ^= x >> 15;
    x *= %#010xu;
    x ^= x >> 16;
    return x;
}
""" % LOWBIAS32_MULTIPLIERS

# keep_mask's two rounds: the index's low half and the key's low half, then the key's high
# half and the index's high half (zero below 2**32, where keep_mask skips it: the same bits)
KEEP_HASH = """
unsigned long long u = (unsigned long long)idx;
unsigned int h = autopar_lowbias32((unsigned int)u ^ key_lo);
h ^= key_hi;
h ^= (unsigned int)(u >> 32);
h = autopar_lowbias32(h);
"""

TO_BF16 = r"""
__device__ __forceinline__ unsigned short autopar_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                                   /* to nearest even */
    return (unsigned short)(u >> 16);
}
"""

# float16 from and to its bits, without the CUDA half header: subnormals, infinities and
# rounding to nearest even as numpy's astype (checked against it for every half and 14M floats)
F16 = r"""
__device__ __forceinline__ float autopar_from_f16(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16, e = ((unsigned int)h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0u) { float v = (float)m * 5.9604644775390625e-08f; return sign ? -v : v; }     /* 2^-24 units */
    if (e == 31u) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
__device__ __forceinline__ unsigned short autopar_to_f16(float f) {
    unsigned int x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);                    /* NaN stays NaN */
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);                   /* >= 65520: inf */
    if (ax < 0x38800000u) return (unsigned short)(sign | __float2uint_rn(__uint_as_float(ax) * 16777216.0f));
    unsigned int r = ax - 0x38000000u;                                                 /* exponent rebias */
    r += 0xfffu + ((r >> 13) & 1u);                                                    /* to nearest even */
    return (unsigned short)(sign | (r >> 13));
}
"""

# bfloat16 and float16 travel as their 16 bits: bfloat16 widens by a shift and narrows by
# TO_BF16, float16 through F16 (no CUDA half header)
STORAGE = {"float32": "float", "bfloat16": "unsigned short", "float16": "unsigned short"}
LOAD = {"float32": "(v)", "bfloat16": "__uint_as_float(((unsigned int)(v)) << 16)", "float16": "autopar_from_f16(v)"}
STORE = {"float32": "(f)", "bfloat16": "autopar_to_bf16(f)", "float16": "autopar_to_f16(f)"}


def keep_threshold(keep_prob: float) -> int:
    """The uint32 bound of :func:`autopar.ir.random.keep_mask`: keep iff hash < bound."""
    return min(int(keep_prob * 2.0 ** 32), 2 ** 32 - 1)

"""CUDA C pieces the GPU kernels share (plain strings: importing this imports nothing of CuPy).

    LOWBIAS32, KEEP_HASH      dropout's keep bit: :func:`autopar.ir.random.keep_mask`'s hash
    TO_BF16                   float -> bfloat16 bits, rounded to nearest even (as ml_dtypes)
    STORAGE, LOAD, STORE      how a raw kernel holds, widens and narrows float32 / bfloat16
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

# bfloat16 travels as its 16 bits: widening is a shift, narrowing TO_BF16 (no CUDA half header)
STORAGE = {"float32": "float", "bfloat16": "unsigned short"}
LOAD = {"float32": "(v)", "bfloat16": "__uint_as_float(((unsigned int)(v)) << 16)"}
STORE = {"float32": "(f)", "bfloat16": "autopar_to_bf16(f)"}


def keep_threshold(keep_prob: float) -> int:
    """The uint32 bound of :func:`autopar.ir.random.keep_mask`: keep iff hash < bound."""
    return min(int(keep_prob * 2.0 ** 32), 2 ** 32 - 1)

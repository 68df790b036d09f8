"""Activation functions: sigmoid family, ReLU, GeLU (tanh and erf forms), FastGeLU.

Members of the elementwise family (:class:`Unary`). The tanh GeLU runs fused, cache-blocked
kernels (``blocked``): on (B*S, 4H) activations its eight passes then read and write main
memory once.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module, cache_blocked, device_erf, hostkernels, kernels
from .elementwise import Unary, same_buffer_inputs
from .registry import register


@register
class Sigmoid(Unary):
    save_inputs, save_output = "none", True

    def fn(self, x):
        return _sigmoid(x)

    def dfn(self, x, y, dy):
        return dy * y * (1.0 - y)


@register
class ReLU(Unary):
    save_inputs, save_output = "none", True

    def fn(self, x):
        return array_module(x).maximum(x, 0)

    def dfn(self, x, y, dy):
        return dy * (y > 0)


@register
class SiLU(Unary):
    """x * sigmoid(x) (Swish), used by SwiGLU."""

    def fn(self, x):
        return x * _sigmoid(x)

    def dfn(self, x, y, dy):
        s = _sigmoid(x)
        return dy * s * (1.0 + x * (1.0 - s))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


_BLOCK = 1 << 14  # elements per block: the block and its temporaries stay in L2


def blocked(kernel, out, *ins, scratch: int = 1):
    """Run ``kernel(xp, out_block, *in_blocks, *scratch_blocks)`` over flat blocks, so a
    multi-pass formula reads and writes main memory once instead of once per pass (on a
    GPU, where a block is a kernel launch, over one block: the whole array).
    float16/bfloat16 blocks are computed in float32 scratch and rounded once into ``out``
    (numpy's half arithmetic converts every element of every pass: ~30x slower)."""
    xp = array_module(out, *ins)
    flat_out = out.reshape(-1)
    flat_in = [xp.ascontiguousarray(a).reshape(-1) for a in ins]
    wide = np.promote_types(out.dtype, np.float32)
    step = _BLOCK if cache_blocked(out) else max(flat_out.size, 1)
    n = min(step, flat_out.size)
    tmp = [xp.empty(n, wide) for _ in range(scratch)]
    acc = xp.empty(n, wide) if wide != out.dtype else None
    for s in range(0, flat_out.size, step):
        e = min(s + step, flat_out.size)
        o = flat_out[s:e] if acc is None else acc[:e - s]
        kernel(xp, o, *[a[s:e] for a in flat_in], *[t[:e - s] for t in tmp])
        if acc is not None:
            flat_out[s:e] = o
    return out


def _gelu_tanh(xp, o, x, t):
    """o = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    xp.multiply(x, x, out=t)
    t *= 0.044715
    t += 1.0
    t *= x
    t *= _SQRT_2_OVER_PI
    xp.tanh(t, out=t)
    t += 1.0
    xp.multiply(t, x, out=o)
    o *= 0.5


def _gelu_tanh_grad(xp, o, x, dy, t, u):
    """o = dy (0.5 (1 + tanh_) + 0.5 x (1 - tanh_^2) c (1 + 3 * 0.044715 x^2))."""
    xp.multiply(x, x, out=u)
    xp.multiply(u, 0.044715, out=t)
    t += 1.0
    t *= x
    t *= _SQRT_2_OVER_PI
    xp.tanh(t, out=t)                   # tanh_
    u *= 3 * 0.044715
    u += 1.0
    u *= x
    u *= 0.5 * _SQRT_2_OVER_PI          # 0.5 x d(inner)/dx
    xp.multiply(t, t, out=o)
    xp.subtract(1.0, o, out=o)
    o *= u
    t *= 0.5
    t += 0.5
    o += t
    o *= dy


@register
class GeLU(Unary):
    """GeLU; ``approximate=True`` (MindSpore's default) is the tanh form, False the erf form."""

    def __init__(self, approximate: bool = True):
        super().__init__(approximate=approximate)

    def fn(self, x):
        if self._fused(x):
            return kernels.gelu(x, self.attrs["approximate"])
        if self.attrs["approximate"] and hostkernels.serves(x):
            return hostkernels.gelu_tanh(x)
        if self.attrs["approximate"]:
            return blocked(_gelu_tanh, array_module(x).empty_like(x), x)
        return 0.5 * x * (1.0 + erf(x * _INV_SQRT_2))

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out) if self.attrs["approximate"] else ()

    def forward_inplace(self, j, x):
        if self._fused(x):
            return kernels.gelu(x, True, out=x)
        if hostkernels.serves(x):
            return hostkernels.gelu_tanh(x, out=x)
        return blocked(_gelu_tanh, x, x)  # each block reads x before writing it

    def dfn(self, x, y, dy):
        if self._fused(x, dy):
            return kernels.gelu_grad(x, dy, self.attrs["approximate"])
        if self.attrs["approximate"] and hostkernels.serves(x, dy):
            return hostkernels.gelu_tanh_grad(x, dy)
        if self.attrs["approximate"]:
            return blocked(_gelu_tanh_grad, array_module(x).empty_like(x), x, dy, scratch=2)
        cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * array_module(x).exp(-0.5 * x * x)
        return dy * (cdf + x * pdf)

    def _fused(self, *arrays) -> bool:
        """Whether the fused GPU kernels (``backend.kernels``) compute: CuPy arrays of one
        dtype, float16 too for the tanh form (which computes halves in float32)."""
        dtypes = kernels.FUSED_DTYPES if self.attrs["approximate"] else kernels.EXACT_DTYPES
        return kernels.fusable(*arrays, dtypes=dtypes)

    def flops(self, specs, out):
        return 14 * out.size


@register
class FastGeLU(Unary):
    """MindSpore's FastGeLU: x / (1 + exp(-1.702|x|)) * exp(0.851 (x - |x|)) = x * sigmoid(1.702 x)."""

    def fn(self, x):
        return x * _sigmoid(1.702 * x)

    def dfn(self, x, y, dy):
        s = _sigmoid(1.702 * x)
        return dy * (s + 1.702 * x * s * (1.0 - s))


def _sigmoid(x):
    """Numerically stable logistic function."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


_ERF_EXACT = np.frompyfunc(math.erf, 1, 1)   # a ufunc of host Python floats, built once


def erf(x):
    """erf. float64 numpy arrays: exact (``math.erf`` per element, for tests and fp64 runs);
    device arrays: CUDA's own erf (``cupyx.scipy.special``, exact to the dtype: the GPU's
    float64 GeLU equals the CPU's); otherwise (lower precisions on the CPU): Numerical
    Recipes' erfc Chebyshev fit, |error| < 1.2e-7 (float32 level)."""
    xp = array_module(x)
    if x.dtype == np.float64 and xp is np:
        return _ERF_EXACT(x).astype(np.float64)
    if xp is not np:
        exact = device_erf()
        if exact is not None:
            return exact(x).astype(x.dtype, copy=False)
    z = xp.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    ans = 1.0 - t * xp.exp(poly)
    return xp.where(x >= 0, ans, -ans).astype(x.dtype, copy=False)

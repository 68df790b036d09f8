"""Elementwise ops: one family, one broadcasting rule.

Unary ops define ``fn(x)`` and ``dfn(x, y, dy)``; binary ops define ``fn(a, b)`` and
``dfn(a, b, y, dy) -> (da, db)`` on broadcast shapes, and the family reduces each
gradient back to its input's shape (``sum_to``). Comparisons give bool and no gradient.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpArgError
from .primitive import Primitive, TensorSpec, check_float
from .registry import register

# ---- shared rules ------------------------------------------------------------------------


def broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise OpArgError("input shapes", "shapes that broadcast (numpy rules)",
                         " and ".join(str(s) for s in shapes),
                         "reshape or expand_dims one input so trailing dims match or are 1") from None


def result_dtype(specs) -> np.dtype:
    return np.result_type(*[np.empty((), s.dtype) for s in specs])


def sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reduce a broadcast gradient back to ``shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, d in enumerate(shape) if d == 1 and g.shape[i + lead] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def same_buffer_inputs(specs, out) -> tuple[int, ...]:
    """Inputs with exactly the output's shape and dtype: their buffer can hold the output."""
    return tuple(i for i, s in enumerate(specs) if s.shape == out.shape and s.dtype == out.dtype)


class Unary(Primitive):
    n_inputs = 1
    fresh_output = fresh_grads = True
    ufunc = None  # a numpy ufunc computing fn, if there is one (enables in-place lowering)

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out) if self.ufunc is not None else ()

    def forward_inplace(self, j, x):
        return self.ufunc(x, out=x)

    def infer(self, x: TensorSpec) -> TensorSpec:
        check_float(x, "input 0")
        return x

    def forward(self, x):
        return self.fn(x)

    def vjp(self, dy, xs, y, specs, needs):
        return (self.dfn(xs[0], y, dy),)

    def fn(self, x):
        raise NotImplementedError

    def dfn(self, x, y, dy):
        raise NotImplementedError


class Binary(Primitive):
    n_inputs = 2
    fresh_output = True
    ufunc = None

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out) if self.ufunc is not None else ()

    def forward_inplace(self, j, a, b):
        return self.ufunc(a, b, out=(a, b)[j])

    def infer(self, a: TensorSpec, b: TensorSpec) -> TensorSpec:
        return TensorSpec(broadcast_shape([a.shape, b.shape]), result_dtype([a, b]))

    def forward(self, a, b):
        return self.fn(a, b)

    def vjp(self, dy, xs, y, specs, needs):
        da, db = self.dfn(xs[0], xs[1], y, dy, needs)
        return (sum_to(da, specs[0].shape).astype(specs[0].dtype, copy=False) if needs[0] else None,
                sum_to(db, specs[1].shape).astype(specs[1].dtype, copy=False) if needs[1] else None)


# ---- arithmetic ----------------------------------------------------------------------------

@register
class Add(Binary):
    ufunc = staticmethod(np.add)
    save_inputs = "none"

    def fn(self, a, b):
        return np.add(a, b)

    def dfn(self, a, b, y, dy, needs):
        return dy, dy


@register
class Sub(Binary):
    ufunc = staticmethod(np.subtract)
    save_inputs = "none"

    def fn(self, a, b):
        return np.subtract(a, b)

    def dfn(self, a, b, y, dy, needs):
        return dy, (np.negative(dy) if needs[1] else None)


@register
class Mul(Binary):
    ufunc = staticmethod(np.multiply)
    def fn(self, a, b):
        return np.multiply(a, b)

    def dfn(self, a, b, y, dy, needs):
        return (dy * b if needs[0] else None), (dy * a if needs[1] else None)


@register
class RealDiv(Binary):
    ufunc = staticmethod(np.true_divide)
    def fn(self, a, b):
        return np.true_divide(a, b)

    def dfn(self, a, b, y, dy, needs):
        da = dy / b
        return da, (-da * a / b if needs[1] else None)


@register
class Maximum(Binary):
    ufunc = staticmethod(np.maximum)
    def fn(self, a, b):
        return np.maximum(a, b)

    def dfn(self, a, b, y, dy, needs):
        pick_a = a >= b
        return (np.where(pick_a, dy, 0) if needs[0] else None), (np.where(pick_a, 0, dy) if needs[1] else None)


@register
class Pow(Binary):
    """x ** p. The exponent is usually a constant; its gradient needs x > 0."""

    save_output = True

    def fn(self, a, b):
        return np.power(a, b)

    def dfn(self, a, b, y, dy, needs):
        da = dy * b * np.power(a, b - 1) if needs[0] else None
        db = dy * y * np.log(a) if needs[1] else None
        return da, db


@register
class AddN(Primitive):
    """Sum of any number of same-shaped tensors (gradient accumulation)."""

    n_inputs = None
    save_inputs = "none"
    fresh_output = True

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out)

    def forward_inplace(self, j, *xs):
        acc = xs[j]
        for i, x in enumerate(xs):
            if i != j:
                acc += x
        return acc

    def infer(self, *specs):
        if not specs:
            raise OpArgError("inputs", "at least one tensor", "none")
        shape = broadcast_shape([s.shape for s in specs])
        return TensorSpec(shape, result_dtype(specs))

    def forward(self, *xs):
        out = np.add(xs[0], xs[1]) if len(xs) > 1 else xs[0].copy()
        for x in xs[2:]:
            out += x
        return out

    def vjp(self, dy, xs, y, specs, needs):
        return tuple(sum_to(dy, s.shape) if n else None for s, n in zip(specs, needs))


# ---- comparisons and selection -------------------------------------------------------------

class Compare(Binary):
    save_inputs = "none"
    nondiff_inputs = (0, 1)

    def infer(self, a, b):
        return TensorSpec(broadcast_shape([a.shape, b.shape]), np.dtype(np.bool_))


@register
class Equal(Compare):
    def fn(self, a, b):
        return np.equal(a, b)


@register
class NotEqual(Compare):
    def fn(self, a, b):
        return np.not_equal(a, b)


@register
class Less(Compare):
    def fn(self, a, b):
        return np.less(a, b)


@register
class Greater(Compare):
    def fn(self, a, b):
        return np.greater(a, b)


@register
class LogicalAnd(Compare):
    def fn(self, a, b):
        return np.logical_and(a, b)


@register
class Select(Primitive):
    """``Select()(cond, x, y)``: x where cond else y (masked fill when y is a constant)."""

    n_inputs = 3
    fresh_output = True
    save_inputs = (0,)
    nondiff_inputs = (0,)

    def infer(self, c, x, y):
        if c.dtype != np.bool_:
            raise OpArgError("input 0 (condition) dtype", "bool", np.dtype(c.dtype).name,
                             "compare first, e.g. ops.Equal()(ids, eod_id)")
        return TensorSpec(broadcast_shape([c.shape, x.shape, y.shape]), result_dtype([x, y]))

    def forward(self, c, x, y):
        return np.where(c, x, y)

    def vjp(self, dy, xs, y, specs, needs):
        c = xs[0]
        dx = sum_to(np.where(c, dy, 0), specs[1].shape) if needs[1] else None
        dz = sum_to(np.where(c, 0, dy), specs[2].shape) if needs[2] else None
        return None, dx, dz


@register
class Cast(Primitive):
    """``Cast()(x, dtype)``; the gradient is cast back to the input's dtype."""

    static_args = ("dtype",)
    save_inputs = "none"

    def infer(self, x):
        return TensorSpec(x.shape, np.dtype(self.attrs["dtype"]))

    def forward(self, x):
        return x.astype(self.attrs["dtype"], copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        return (dy.astype(specs[0].dtype, copy=False),)

    def flops(self, specs, out):
        return 0


# ---- unary math ------------------------------------------------------------------------------

@register
class Neg(Unary):
    ufunc = staticmethod(np.negative)
    save_inputs = "none"

    def fn(self, x):
        return np.negative(x)

    def dfn(self, x, y, dy):
        return np.negative(dy)


@register
class Exp(Unary):
    ufunc = staticmethod(np.exp)
    save_inputs, save_output = "none", True

    def fn(self, x):
        return np.exp(x)

    def dfn(self, x, y, dy):
        return dy * y


@register
class Log(Unary):
    ufunc = staticmethod(np.log)
    def fn(self, x):
        return np.log(x)

    def dfn(self, x, y, dy):
        return dy / x


@register
class Sqrt(Unary):
    ufunc = staticmethod(np.sqrt)
    save_inputs, save_output = "none", True

    def fn(self, x):
        return np.sqrt(x)

    def dfn(self, x, y, dy):
        return dy * 0.5 / y


@register
class Rsqrt(Unary):
    save_inputs, save_output = "none", True

    def fn(self, x):
        return 1.0 / np.sqrt(x)

    def dfn(self, x, y, dy):
        return dy * -0.5 * y * y * y


@register
class Square(Unary):
    ufunc = staticmethod(np.square)
    def fn(self, x):
        return np.square(x)

    def dfn(self, x, y, dy):
        return dy * 2.0 * x


@register
class Tanh(Unary):
    ufunc = staticmethod(np.tanh)
    save_inputs, save_output = "none", True

    def fn(self, x):
        return np.tanh(x)

    def dfn(self, x, y, dy):
        return dy * (1.0 - y * y)


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
        return np.maximum(x, 0)

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


def blocked(kernel, out: np.ndarray, *ins: np.ndarray, scratch: int = 1) -> np.ndarray:
    """Run ``kernel(out_block, *in_blocks, *scratch_blocks)`` over flat blocks, so a
    multi-pass formula reads and writes main memory once instead of once per pass."""
    flat_out = out.reshape(-1)
    flat_in = [np.ascontiguousarray(a).reshape(-1) for a in ins]
    tmp = [np.empty(min(_BLOCK, flat_out.size), out.dtype) for _ in range(scratch)]
    for s in range(0, flat_out.size, _BLOCK):
        e = min(s + _BLOCK, flat_out.size)
        kernel(flat_out[s:e], *[a[s:e] for a in flat_in], *[t[:e - s] for t in tmp])
    return out


def _gelu_tanh(o, x, t):
    """o = 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    np.multiply(x, x, out=t)
    t *= 0.044715
    t += 1.0
    t *= x
    t *= _SQRT_2_OVER_PI
    np.tanh(t, out=t)
    t += 1.0
    np.multiply(t, x, out=o)
    o *= 0.5


def _gelu_tanh_grad(o, x, dy, t, u):
    """o = dy (0.5 (1 + tanh_) + 0.5 x (1 - tanh_^2) c (1 + 3 * 0.044715 x^2))."""
    np.multiply(x, x, out=u)
    np.multiply(u, 0.044715, out=t)
    t += 1.0
    t *= x
    t *= _SQRT_2_OVER_PI
    np.tanh(t, out=t)                   # tanh_
    u *= 3 * 0.044715
    u += 1.0
    u *= x
    u *= 0.5 * _SQRT_2_OVER_PI          # 0.5 x d(inner)/dx
    np.multiply(t, t, out=o)
    np.subtract(1.0, o, out=o)
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
        if self.attrs["approximate"]:
            return blocked(_gelu_tanh, np.empty_like(x), x)
        return 0.5 * x * (1.0 + erf(x * _INV_SQRT_2))

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out) if self.attrs["approximate"] else ()

    def forward_inplace(self, j, x):
        return blocked(_gelu_tanh, x, x)  # each block reads x before writing it

    def dfn(self, x, y, dy):
        if self.attrs["approximate"]:
            return blocked(_gelu_tanh_grad, np.empty_like(x), x, dy, scratch=2)
        cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * x * x)
        return dy * (cdf + x * pdf)

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
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


_ERF_EXACT = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """erf in numpy. float64: exact (``math.erf`` per element, for tests and fp64 runs);
    lower precisions: Numerical Recipes' erfc Chebyshev fit, |error| < 1.2e-7 (float32 level)."""
    if x.dtype == np.float64:
        return _ERF_EXACT(x).astype(np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    ans = 1.0 - t * np.exp(poly)
    return np.where(x >= 0, ans, -ans).astype(x.dtype, copy=False)

"""Elementwise ops: one family, one broadcasting rule.

Unary ops define ``fn(x)`` and ``dfn(x, y, dy)``; binary ops define ``fn(a, b)`` and
``dfn(a, b, y, dy) -> (da, db)`` on broadcast shapes, and the family reduces each
gradient back to its input's shape (``sum_to``). Comparisons give bool and no gradient.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module, kernels, veckernels
from ..dtype import accumulate_dtype
from ..errors import OpArgError
from ..ir.spec import TensorSpec
from .primitive import Primitive, check_float
from .registry import register
from .sharding import broadcast_indexing

# ---- shared rules ------------------------------------------------------------------------


def broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise OpArgError("input shapes", "shapes that broadcast (numpy rules)",
                         " and ".join(str(s) for s in shapes),
                         "reshape or expand_dims one input so trailing dims match or are 1") from None


def result_dtype(specs) -> np.dtype:
    return np.result_type(*[np.dtype(s.dtype) for s in specs])


def sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reduce a broadcast gradient back to ``shape``, summing half dtypes in float32
    (numpy sums bfloat16 in bfloat16, which stalls after a few hundred terms)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, d in enumerate(shape) if d == 1 and g.shape[i + lead] != 1)
    if axes == tuple(range(lead)) and lead and g.flags.c_contiguous and kernels.fusable(g):
        # a bias's gradient on a GPU: (..., C) -> (C,) as one GEMV (a reduction over leading
        # axes would stride through memory), accumulated in float32 for half dtypes
        rows = g.reshape(-1, math.prod(shape))                  # (..., *shape) -> (R, C)
        return kernels.column_sum(rows, accumulate_dtype(g.dtype)).astype(g.dtype, copy=False).reshape(shape)
    if axes:
        g = g.sum(axis=axes, keepdims=True, dtype=accumulate_dtype(g.dtype)).astype(g.dtype, copy=False)
    return g.reshape(shape)


def _cast(x, dtype):
    """``x.astype(dtype, copy=False)``; float32 <-> bfloat16 on a GPU through vector loads."""
    if x.dtype != dtype and veckernels.cast_serves(x, dtype):
        return veckernels.cast(x, dtype)
    return x.astype(dtype, copy=False)


def same_buffer_inputs(specs, out) -> tuple[int, ...]:
    """Inputs with exactly the output's shape and dtype: their buffer can hold the output."""
    return tuple(i for i, s in enumerate(specs) if s.shape == out.shape and s.dtype == out.dtype)


def elementwise_indexing(specs, out):
    return broadcast_indexing([s.shape for s in specs], len(out.shape))


class Unary(Primitive):
    n_inputs = 1
    fresh_output = fresh_grads = True
    ufunc: str | None = None  # name of the array module's ufunc computing fn (enables in-place lowering)

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out) if self.ufunc is not None else ()

    indexing = staticmethod(elementwise_indexing)

    def forward_inplace(self, j, x):
        return getattr(array_module(x), self.ufunc)(x, out=x)

    def infer(self, x: TensorSpec) -> TensorSpec:
        check_float(x, "input 0")
        return x

    # Results come back in the input's dtype: a formula's Python constants (``1.0 + x``)
    # widen a bfloat16 array to float32 under ml_dtypes < 0.7; astype is free when they don't.
    def forward(self, x):
        return self.fn(x).astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        return (self.dfn(xs[0], y, dy).astype(specs[0].dtype, copy=False),)

    def fn(self, x):
        """The named ufunc of the input's array module (``ufunc``), by default."""
        return getattr(array_module(x), self.ufunc)(x)

    def dfn(self, x, y, dy):
        raise NotImplementedError


class Binary(Primitive):
    n_inputs = 2
    fresh_output = True
    ufunc: str | None = None   # as Unary.ufunc

    def inplace_inputs(self, specs, out):
        return same_buffer_inputs(specs, out) if self.ufunc is not None else ()

    def forward_inplace(self, j, a, b):
        return getattr(array_module(a, b), self.ufunc)(a, b, out=(a, b)[j])

    indexing = staticmethod(elementwise_indexing)

    def infer(self, a: TensorSpec, b: TensorSpec) -> TensorSpec:
        return TensorSpec(broadcast_shape([a.shape, b.shape]), result_dtype([a, b]))

    def forward(self, a, b):
        return self.fn(a, b)

    def fn(self, a, b):
        """The named ufunc of the inputs' array module (``ufunc``), by default."""
        return getattr(array_module(a, b), self.ufunc)(a, b)

    def vjp(self, dy, xs, y, specs, needs):
        da, db = self.dfn(xs[0], xs[1], y, dy, needs)
        return (sum_to(da, specs[0].shape).astype(specs[0].dtype, copy=False) if needs[0] else None,
                sum_to(db, specs[1].shape).astype(specs[1].dtype, copy=False) if needs[1] else None)


# ---- arithmetic ----------------------------------------------------------------------------

@register
class Add(Binary):
    ufunc = "add"
    save_inputs = "none"

    def fn(self, a, b):
        if veckernels.add_serves(a, b):       # float32/bfloat16 device arrays of one shape: vector loads
            return veckernels.add(a, b)
        return super().fn(a, b)

    def forward_inplace(self, j, a, b):
        if veckernels.add_serves(a, b):
            return veckernels.add(a, b, out=(a, b)[j])
        return super().forward_inplace(j, a, b)

    def dfn(self, a, b, y, dy, needs):
        return dy, dy


@register
class Sub(Binary):
    ufunc = "subtract"
    save_inputs = "none"

    def dfn(self, a, b, y, dy, needs):
        return dy, (array_module(dy).negative(dy) if needs[1] else None)


@register
class Mul(Binary):
    ufunc = "multiply"

    def dfn(self, a, b, y, dy, needs):
        return (dy * b if needs[0] else None), (dy * a if needs[1] else None)


@register
class RealDiv(Binary):
    ufunc = "true_divide"

    def dfn(self, a, b, y, dy, needs):
        da = dy / b
        return da, (-da * a / b if needs[1] else None)


@register
class Maximum(Binary):
    ufunc = "maximum"

    def dfn(self, a, b, y, dy, needs):
        xp = array_module(dy, a, b)
        pick_a = a >= b
        return (xp.where(pick_a, dy, 0) if needs[0] else None), (xp.where(pick_a, 0, dy) if needs[1] else None)


@register
class Pow(Binary):
    """x ** p. The exponent is usually a constant; its gradient needs x > 0."""

    save_output = True

    def fn(self, a, b):
        return array_module(a, b).power(a, b)

    def dfn(self, a, b, y, dy, needs):
        xp = array_module(dy, a, b)
        da = dy * b * xp.power(a, b - 1) if needs[0] else None
        db = dy * y * xp.log(a) if needs[1] else None
        return da, db


@register
class AddN(Primitive):
    """Sum of any number of same-shaped tensors (gradient accumulation)."""

    indexing = staticmethod(elementwise_indexing)

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
        out = array_module(*xs).add(xs[0], xs[1]) if len(xs) > 1 else xs[0].copy()
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
        return array_module(a, b).equal(a, b)


@register
class NotEqual(Compare):
    def fn(self, a, b):
        return array_module(a, b).not_equal(a, b)


@register
class Less(Compare):
    def fn(self, a, b):
        return array_module(a, b).less(a, b)


@register
class Greater(Compare):
    def fn(self, a, b):
        return array_module(a, b).greater(a, b)


@register
class LogicalAnd(Compare):
    def fn(self, a, b):
        return array_module(a, b).logical_and(a, b)


@register
class Select(Primitive):
    """``Select()(cond, x, y)``: x where cond else y (masked fill when y is a constant)."""

    indexing = staticmethod(elementwise_indexing)

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
        return array_module(c, x, y).where(c, x, y)

    def vjp(self, dy, xs, y, specs, needs):
        c = xs[0]
        xp = array_module(dy, c)
        dx = sum_to(xp.where(c, dy, 0), specs[1].shape) if needs[1] else None
        dz = sum_to(xp.where(c, 0, dy), specs[2].shape) if needs[2] else None
        return None, dx, dz


@register
class Cast(Primitive):
    """``Cast()(x, dtype)``; the gradient is cast back to the input's dtype."""

    indexing = staticmethod(elementwise_indexing)

    static_args = ("dtype",)
    save_inputs = "none"

    def infer(self, x):
        return TensorSpec(x.shape, np.dtype(self.attrs["dtype"]))

    def forward(self, x):
        return _cast(x, self.attrs["dtype"])

    def vjp(self, dy, xs, y, specs, needs):
        return (_cast(dy, specs[0].dtype),)

    def flops(self, specs, out):
        return 0


# ---- unary math ------------------------------------------------------------------------------

@register
class Neg(Unary):
    ufunc = "negative"
    save_inputs = "none"

    def dfn(self, x, y, dy):
        return array_module(dy).negative(dy)


@register
class Exp(Unary):
    ufunc = "exp"
    save_inputs, save_output = "none", True

    def dfn(self, x, y, dy):
        return dy * y


@register
class Log(Unary):
    ufunc = "log"
    def dfn(self, x, y, dy):
        return dy / x


@register
class Sqrt(Unary):
    ufunc = "sqrt"
    save_inputs, save_output = "none", True

    def dfn(self, x, y, dy):
        return dy * 0.5 / y


@register
class Rsqrt(Unary):
    save_inputs, save_output = "none", True

    def fn(self, x):
        return 1.0 / array_module(x).sqrt(x)

    def dfn(self, x, y, dy):
        return dy * -0.5 * y * y * y


@register
class Square(Unary):
    ufunc = "square"

    def dfn(self, x, y, dy):
        return dy * 2.0 * x


@register
class Tanh(Unary):
    ufunc = "tanh"
    save_inputs, save_output = "none", True

    def dfn(self, x, y, dy):
        return dy * (1.0 - y * y)

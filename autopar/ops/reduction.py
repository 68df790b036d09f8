"""Reductions over axes, running sums and argmax, with MindSpore's call spellings.

=========================================  ==============================================
``ReduceSum(keep_dims)(x, axis)``           sum; int inputs keep their dtype (no gradient)
``ReduceMean(keep_dims)(x, axis)``          mean (float inputs only)
``ReduceMax/ReduceMin(keep_dims)(x, axis)`` max/min; the gradient goes to the extreme
                                            positions, split evenly among ties
``Cumsum(exclusive, reverse)(x, axis)``     running sum along one axis
``ArgMax(axis, output_type)(x)``            index of the max (greedy decoding); no gradient
=========================================  ==============================================

``axis`` is an int, a tuple of ints, or ``()`` (the default) meaning every axis. The reduced
dims are dropped, or kept with size 1 when ``keep_dims``::

    ReduceSum()(x, (0, 2))                  # (B, S, H) -> (S,)
    ReduceMean(keep_dims=True)(x, -1)       # (B, S, H) -> (B, S, 1)

Every gradient first puts ``dy`` back on the kept-dims shape, then broadcasts it (a view,
no copy) over the reduced axes.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..dtype import accumulate_dtype, int32, int64, is_float
from ..errors import OpArgError, OpTypeError
from ..ir.spec import TensorSpec
from .primitive import Primitive, check_float, normalize_axes, normalize_axis
from .registry import register
from .sharding import FRESH, Indexing, same_letters


def _check_numeric(spec: TensorSpec, arg: str = "input 0") -> None:
    if np.dtype(spec.dtype).kind not in "iu" and not is_float(spec.dtype):
        raise OpArgError(f"{arg} dtype", "an int or float dtype", np.dtype(spec.dtype).name,
                         "cast it first with ops.Cast()(x, autopar.int32) or autopar.float32")


def _cut(axis: int, piece: slice) -> tuple:
    """The index that takes ``piece`` along ``axis`` and everything along the others."""
    return (slice(None),) * axis + (piece,)


class Reduce(Primitive):
    """``Op(keep_dims=False)(x, axis=())``: the shared shape rule of the axis reductions."""

    static_args = ("axis",)

    def __init__(self, keep_dims: bool = False):
        super().__init__(keep_dims=bool(keep_dims))

    def bind(self, args):
        if len(args) == 1:  # MindSpore's default: reduce every axis
            args = (args[0], ())
        return super().bind(args)

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The reduced axes, sorted and non-negative."""
        axis = self.attrs.get("axis", ())
        if isinstance(axis, list):
            axis = tuple(axis)
        if axis is not None and not isinstance(axis, (int, np.integer, tuple)):
            raise OpTypeError("axis", "an int, a tuple of ints, or () for every axis", repr(axis))
        if ndim == 0 and axis not in ((), None):
            raise OpArgError("axis", "() for a 0-d input", repr(axis))
        return normalize_axes(axis, ndim)

    linear = False  # a sum: splitting a reduced dim leaves a partial sum; else it is fixed

    def indexing(self, specs, out):
        axes = self.axes(specs[0].ndim)
        letters, fixed = same_letters(specs[0].ndim, () if self.linear else axes)
        fresh = iter(FRESH)
        kept = "".join(next(fresh) if i in axes else ch for i, ch in enumerate(letters)) \
            if self.attrs["keep_dims"] else "".join(ch for i, ch in enumerate(letters) if i not in axes)
        return Indexing((letters,), kept, fixed | frozenset(ch for ch in kept if ch.isupper()))

    def kept_shape(self, shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))

    def check_dtype(self, x: TensorSpec) -> None:
        _check_numeric(x)

    def infer(self, x: TensorSpec) -> TensorSpec:
        self.check_dtype(x)
        axes = self.axes(x.ndim)
        if self.attrs["keep_dims"]:
            shape = self.kept_shape(x.shape, axes)
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return TensorSpec(shape, x.dtype)

    def flops(self, specs, out):
        return specs[0].size

    def dy_kept(self, dy: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
        """``dy`` on the kept-dims shape (a view), and the reduced axes."""
        axes = self.axes(len(shape))
        return dy.reshape(self.kept_shape(shape, axes)), axes


@register
class ReduceSum(Reduce):
    """Sum over ``axis``. Int inputs are summed in their own dtype (MindSpore keeps it);
    float16 and bfloat16 in float32, the result rounded back."""

    linear = True

    save_inputs = "none"

    def forward(self, x):
        acc = accumulate_dtype(x.dtype)
        total = array_module(x).sum(x, axis=self.axes(x.ndim), keepdims=self.attrs["keep_dims"], dtype=acc)
        return total if acc == x.dtype else total.astype(x.dtype)

    def vjp(self, dy, xs, y, specs, needs):
        shape = specs[0].shape
        g, _ = self.dy_kept(dy, shape)
        return (array_module(g).broadcast_to(g, shape),)


@register
class ReduceMean(Reduce):
    """Mean over ``axis``. Sharded over a reduced dim, each rank divides its local sum by
    the *global* count (bound by :meth:`local`), so the partial results add up to the mean."""

    linear = True
    save_inputs = "none"

    def check_dtype(self, x):
        check_float(x, "input 0")

    def local(self, sharding, rank, specs, out, comm_for=None):
        shape = specs[0].shape
        count = math.prod(shape[a] for a in self.axes(len(shape)))
        return self.with_attrs(count=count)

    def forward(self, x):
        xp = array_module(x)
        axes = self.axes(x.ndim)
        acc = accumulate_dtype(x.dtype)   # half dtypes: the sum in float32
        if "count" not in self.attrs:
            mean = xp.mean(x, axis=axes, keepdims=self.attrs["keep_dims"], dtype=acc)
            return mean if acc == x.dtype else mean.astype(x.dtype)
        total = xp.sum(x, axis=axes, keepdims=self.attrs["keep_dims"], dtype=acc)
        return xp.asarray(total / max(self.attrs["count"], 1), dtype=x.dtype)

    def vjp(self, dy, xs, y, specs, needs):
        shape = specs[0].shape
        g, axes = self.dy_kept(dy, shape)
        count = self.attrs.get("count", math.prod(shape[a] for a in axes))
        return (array_module(g).broadcast_to(g / max(count, 1), shape),)


class _Extreme(Reduce):
    """Max or min. Gradient: ``dy`` goes to every position equal to the result, divided by
    the number of such positions (ties share it evenly, so the total is ``dy``). A slice
    whose result is NaN matches no position and gets no gradient."""

    save_inputs = (0,)
    save_output = True
    reduce: str = ""  # the array module's "max" or "min"

    def infer(self, x):
        out = super().infer(x)
        empty = [a for a in self.axes(x.ndim) if x.shape[a] == 0]
        if empty:
            raise OpArgError("axis", "reduced dims of size >= 1 (max/min of nothing is undefined)",
                             f"axis {empty[0]} of size 0 in input shape {x.shape}")
        return out

    def forward(self, x):
        return getattr(array_module(x), self.reduce)(x, axis=self.axes(x.ndim), keepdims=self.attrs["keep_dims"])

    def vjp(self, dy, xs, y, specs, needs):
        x = xs[0]
        xp = array_module(dy, x)
        g, axes = self.dy_kept(dy, x.shape)
        hit = x == y.reshape(g.shape)
        count = xp.maximum(xp.sum(hit, axis=axes, keepdims=True, dtype=dy.dtype), 1)
        return (hit * (g / count),)


@register
class ReduceMax(_Extreme):
    reduce = "max"


@register
class ReduceMin(_Extreme):
    reduce = "min"


# ---- running sum -------------------------------------------------------------------------

def cumsum(x, axis: int, exclusive: bool, reverse: bool):
    """Inclusive or exclusive running sum, from the start or (reverse) from the end,
    written straight into one output array (flips are views)."""
    xp = array_module(x)
    out = xp.empty_like(x)
    src, dst = (xp.flip(x, axis), xp.flip(out, axis)) if reverse else (x, out)
    if exclusive:
        dst[_cut(axis, slice(0, 1))] = 0
        xp.cumsum(src[_cut(axis, slice(None, -1))], axis=axis, dtype=x.dtype,
                  out=dst[_cut(axis, slice(1, None))])
    else:
        xp.cumsum(src, axis=axis, dtype=x.dtype, out=dst)
    return out


@register
class Cumsum(Primitive):
    """``Cumsum(exclusive=False, reverse=False)(x, axis)``; e.g. along ``[1, 2, 3, 4]``:
    plain ``[1, 3, 6, 10]``, exclusive ``[0, 1, 3, 6]``, reverse ``[10, 9, 7, 4]``.

    The gradient of a running sum is the running sum of ``dy`` the other way round
    (same ``exclusive``, opposite ``reverse``)."""

    static_args = ("axis",)
    save_inputs = "none"

    def indexing(self, specs, out):
        letters, fixed = same_letters(specs[0].ndim, (self.axis(specs[0].ndim),))
        return Indexing((letters,), letters, fixed)

    def __init__(self, exclusive: bool = False, reverse: bool = False):
        super().__init__(exclusive=bool(exclusive), reverse=bool(reverse))

    def axis(self, ndim: int) -> int:
        if ndim == 0:
            raise OpArgError("input 0 rank", ">= 1", "a 0-d input", "reshape it to (1,) first")
        return normalize_axis(self.attrs["axis"], ndim)

    def infer(self, x):
        _check_numeric(x)
        self.axis(x.ndim)
        return x

    def forward(self, x):
        return cumsum(x, self.axis(x.ndim), self.attrs["exclusive"], self.attrs["reverse"])

    def vjp(self, dy, xs, y, specs, needs):
        axis = self.axis(len(specs[0].shape))
        return (cumsum(dy, axis, self.attrs["exclusive"], not self.attrs["reverse"]),)


# ---- argmax ------------------------------------------------------------------------------

@register
class ArgMax(Primitive):
    """``ArgMax(axis=-1, output_type=int32)(x)``: the first index of the max along ``axis``,
    that axis removed. Integer output, so no gradient: ``(B, S, V) -> (B, S)``."""

    save_inputs = "none"
    nondiff_inputs = (0,)

    def indexing(self, specs, out):
        axis = normalize_axis(self.attrs["axis"], specs[0].ndim)
        letters, fixed = same_letters(specs[0].ndim, (axis,))
        return Indexing((letters,), letters[:axis] + letters[axis + 1:], fixed)

    def __init__(self, axis: int = -1, output_type=int32):
        super().__init__(axis=axis, output_type=output_type)

    def infer(self, x):
        out_type = np.dtype(self.attrs["output_type"]) if self.attrs["output_type"] in (int32, int64) else None
        if out_type is None:
            raise OpArgError("output_type", "autopar.int32 or autopar.int64", repr(self.attrs["output_type"]))
        if x.ndim == 0:
            raise OpArgError("input 0 rank", ">= 1", "a 0-d input")
        axis = normalize_axis(self.attrs["axis"], x.ndim)
        if x.shape[axis] == 0:
            raise OpArgError("axis", "a dim of size >= 1", f"axis {axis} of size 0 in input shape {x.shape}")
        return TensorSpec(x.shape[:axis] + x.shape[axis + 1:], out_type)

    def forward(self, x):
        idx = array_module(x).argmax(x, axis=self.attrs["axis"])
        return idx.astype(self.attrs["output_type"], copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        return (None,)

    def flops(self, specs, out):
        return specs[0].size

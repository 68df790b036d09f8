"""Joining and slicing ops (Concat, StridedSlice, Slice) and ``getitem``, the Python
indexing of traced tensors built on them. Members of the movement family: pure data
movement, gradients that never read the forward values."""
from __future__ import annotations

import itertools

import numpy as np

from ..backend import array_module
from ..errors import OpArgError, OpTypeError, at_scope, is_int
from ..ir.spec import TensorSpec
from ..ir.tracing import current_tracer
from .movement import ExpandDims, Movement, Squeeze, _ints
from .primitive import normalize_axis
from .registry import register
from .sharding import Indexing, same_letters

# ---- joining -----------------------------------------------------------------------------

@register
class Concat(Movement):
    """``Concat(axis=0)((x, y, ...))``: MindSpore passes one tuple; its elements are the
    inputs. ``(B, S1, H), (B, S2, H) -> (B, S1+S2, H)`` at axis 1. Gradient: split ``dy``."""

    n_inputs = None

    def indexing(self, specs, out):
        axis = normalize_axis(self.attrs["axis"], len(out.shape))
        letters, fixed = same_letters(len(out.shape), (axis,))
        return Indexing((letters,) * len(specs), letters, fixed)

    def __init__(self, axis: int = 0):
        super().__init__(axis=axis)

    def bind(self, args):
        if len(args) != 1 or not isinstance(args[0], (tuple, list)):
            raise OpArgError("arguments", "one tuple of tensors, as in Concat(axis)((x, y))",
                             f"{len(args)} argument(s)", "wrap the tensors in a tuple")
        return tuple(args[0]), {}

    def infer(self, *specs):
        if not specs:
            raise OpArgError("inputs", "at least one tensor", "an empty tuple")
        first = specs[0]
        if first.ndim == 0:
            raise OpArgError("input 0 rank", ">= 1", "a 0-d input", "expand_dims it first")
        axis = normalize_axis(self.attrs["axis"], first.ndim)
        for i, s in enumerate(specs[1:], 1):
            if s.dtype != first.dtype:
                raise OpArgError(f"input {i} dtype", f"{np.dtype(first.dtype).name} (the dtype of input 0)",
                                 np.dtype(s.dtype).name, "cast it first with ops.Cast()")
            same = s.ndim == first.ndim and all(a == b for k, (a, b) in enumerate(zip(s.shape, first.shape))
                                                if k != axis)
            if not same:
                raise OpArgError(f"input {i} shape", f"input 0's shape {first.shape} except along axis {axis}",
                                 str(s.shape))
        total = sum(s.shape[axis] for s in specs)
        return TensorSpec(first.shape[:axis] + (total,) + first.shape[axis + 1:], first.dtype)

    def forward(self, *xs):
        return array_module(*xs).concatenate(xs, axis=self.attrs["axis"])

    def vjp(self, dy, xs, y, specs, needs):
        axis = normalize_axis(self.attrs["axis"], len(specs[0].shape))
        cuts = list(itertools.accumulate(s.shape[axis] for s in specs))[:-1]
        parts = array_module(dy).split(dy, cuts, axis=axis)
        return tuple(p if n else None for p, n in zip(parts, needs))


# ---- slicing -----------------------------------------------------------------------------

class Slicing(Movement):
    """A box of the input picked by one slice per dim. Gradient: ``dy`` scattered into zeros."""

    def indexing(self, specs, out):
        """A dim cut by the slice cannot be split (its pieces would not line up)."""
        shape = specs[0].shape
        cut = [d for d, (n, m) in enumerate(zip(shape, out.shape)) if n != m or self.slices(shape)[d].step not in (None, 1)]
        letters, fixed = same_letters(len(shape), cut)
        return Indexing((letters,), letters, fixed)

    def slices(self, shape) -> tuple[slice, ...]:
        raise NotImplementedError

    def infer(self, x):
        box = self.slices(x.shape)
        return TensorSpec(tuple(len(range(*s.indices(n))) for s, n in zip(box, x.shape)), x.dtype)

    def forward(self, x):
        return x[self.slices(x.shape)]

    def vjp(self, dy, xs, y, specs, needs):
        shape = specs[0].shape
        dx = array_module(dy).zeros(shape, dy.dtype)
        dx[self.slices(shape)] = dy
        return (dx,)


@register
class StridedSlice(Slicing):
    """``StridedSlice()(x, begin, end, strides)`` = ``x[b0:e0:s0, ...]`` with Python's rules
    (negative bounds count from the end, out-of-range bounds clamp); strides must be > 0.
    Dims past ``len(begin)`` are kept whole."""

    static_args = ("begin", "end", "strides")

    def slices(self, shape):
        begin, end, strides = (_ints(self.attrs[k], k) for k in self.static_args)
        if not len(begin) == len(end) == len(strides) <= len(shape):
            raise OpArgError("begin, end, strides", f"three tuples of one length <= {len(shape)} "
                             f"(the rank of input shape {tuple(shape)})", f"{begin}, {end}, {strides}")
        if any(s < 1 for s in strides):
            raise OpArgError("strides", "strides >= 1", str(strides), "negative strides are not supported")
        box = tuple(slice(b, e, s) for b, e, s in zip(begin, end, strides))
        return box + (slice(None),) * (len(shape) - len(box))


@register
class Slice(Slicing):
    """``Slice()(x, begin, size)`` = ``x[b0:b0+n0, ...]``; ``size[i] = -1`` takes the rest of
    dim i. Unlike StridedSlice, the box must lie inside the input."""

    static_args = ("begin", "size")

    def slices(self, shape):
        begin, size = _ints(self.attrs["begin"], "begin"), _ints(self.attrs["size"], "size")
        if not len(begin) == len(size) == len(shape):
            raise OpArgError("begin, size", f"two tuples of length {len(shape)} (the rank of input shape "
                             f"{tuple(shape)})", f"{begin}, {size}")
        box = []
        for b, n, d in zip(begin, size, shape):
            e = d if n == -1 else b + n
            if not 0 <= b <= e <= d:
                raise OpArgError("begin, size", f"a box inside input shape {tuple(shape)} "
                                 "(0 <= begin, size >= 0 or -1, begin + size <= dim)", f"{begin}, {size}")
            box.append(slice(b, e))
        return tuple(box)


# ---- indexing ----------------------------------------------------------------------------

def _shape_of(x) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(x))


def _index_items(index, ndim: int) -> list:
    """The index as a list with the Ellipsis expanded, one entry per input dim plus Nones."""
    items = list(index) if isinstance(index, tuple) else [index]
    for it in items:
        ok = it is None or it is Ellipsis or is_int(it) or isinstance(it, slice)
        if not ok:
            raise OpTypeError("index", "ints, slices, ... or None", f"{it!r} ({type(it).__name__})",
                              "use ops.Gather for tensor indices")
    n_ellipsis = sum(it is Ellipsis for it in items)
    used = sum(it is not None and it is not Ellipsis for it in items)
    if n_ellipsis > 1 or used > ndim:
        raise OpArgError("index", f"at most one ... and at most {ndim} ints/slices (the input's rank)",
                         repr(index))
    fill = [slice(None)] * (ndim - used)
    if n_ellipsis:
        k = next(i for i, it in enumerate(items) if it is Ellipsis)
        return items[:k] + fill + items[k + 1:]
    return items + fill


def _getitem_where() -> str:
    tracer = current_tracer()
    if tracer is None:
        return "getitem"
    return f"{tracer.frames[-1].scope or '<root>'} (getitem)"


def _index_plan(shape: tuple[int, ...], index):
    """StridedSlice's begin/end/strides, the int positions to squeeze (input dims) and the
    None positions to expand (output dims) for ``x[index]``."""
    begin, end, strides, squeeze, new_axes = [], [], [], [], []
    dim = out_dim = 0
    for it in _index_items(index, len(shape)):
        if it is None:
            new_axes.append(out_dim)
            out_dim += 1
            continue
        n = shape[dim]
        if isinstance(it, slice):
            for bound in (it.start, it.stop, it.step):
                if bound is not None and not is_int(bound):
                    raise OpTypeError("index", "slice bounds that are ints or None", repr(it))
            if it.step is not None and it.step < 1:
                raise OpArgError("index", "slice steps >= 1", repr(it), "negative steps are not supported")
            b, e, s = it.indices(n)
            begin.append(b)
            end.append(max(b, e))
            strides.append(s)
            out_dim += 1
        else:
            i = int(it) + n if it < 0 else int(it)
            if not 0 <= i < n:
                raise OpArgError("index", f"an index in [{-n}, {n}) for dim {dim} of shape {shape}", str(int(it)))
            begin.append(i)
            end.append(i + 1)
            strides.append(1)
            squeeze.append(dim)
        dim += 1
    return begin, end, strides, squeeze, new_axes


def getitem(x, index):
    """``x[index]`` through primitives, so it traces (``Tensor.__getitem__``) and runs
    eagerly on numpy arrays alike: one StridedSlice for the box, one Squeeze for the int
    positions, one ExpandDims per None. ``x[:, 1:-1]``: ``(B, S) -> (B, S-2)``;
    ``x[0]``: ``(B, S) -> (S,)``; ``x[..., None]``: ``(B, S) -> (B, S, 1)``.

    Ints and slice bounds may be negative (counted from the end); ints must be in range,
    slice bounds clamp as in Python; slice steps must be > 0."""
    shape = _shape_of(x)
    try:
        begin, end, strides, squeeze, new_axes = _index_plan(shape, index)
    except (OpArgError, OpTypeError) as err:
        raise at_scope(err, _getitem_where()) from None
    y = x
    if any(box != (0, n, 1) for box, n in zip(zip(begin, end, strides), shape)):
        y = StridedSlice()(y, tuple(begin), tuple(end), tuple(strides))
    if squeeze:
        y = Squeeze(axis=tuple(squeeze))(y)
    for a in new_axes:  # ascending: each lands where its None stood in the index
        y = ExpandDims()(y, a)
    return y

"""Data movement: ops that rearrange elements without arithmetic (no flops).

=========================================  ==============================================
``Reshape()(x, shape)``                     new shape, same elements; one dim may be -1
``Transpose()(x, perm)``                    output dim i is input dim ``perm[i]``
``ExpandDims()(x, axis)``                   insert a dim of size 1 at ``axis``
``Squeeze(axis=())(x)``                     drop dims of size 1 (``()``: all of them)
``Concat(axis=0)((x, y, ...))``             join along ``axis`` (a tuple of tensors)
``StridedSlice()(x, begin, end, strides)``  ``x[b0:e0:s0, b1:e1:s1, ...]``, Python clamping
``Slice()(x, begin, size)``                 ``x[b0:b0+n0, ...]``; size -1 = to the end
``BroadcastTo(shape)(x)``                   numpy broadcasting to ``shape``
``Tile()(x, multiples)``                    repeat ``multiples[i]`` times along dim i
``getitem(x, index)``                       ``x[...]`` (ints, slices, ``...``, ``None``)
=========================================  ==============================================

Forward kernels return numpy views where numpy can (reshape of contiguous data,
transpose, slices, broadcast); gradients are the inverse movement of ``dy`` (reshape
back, inverse permutation, scatter into zeros, sum over broadcast copies).
"""
from __future__ import annotations

import numpy as np

from ..errors import OpArgError, OpTypeError, at_scope
from .elementwise import sum_to
from .primitive import Primitive, TensorSpec, normalize_axes, normalize_axis
from .registry import register


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _ints(value, arg: str, what: str = "a tuple of ints") -> tuple[int, ...]:
    """A static tuple argument (shape, perm, begin, ...) as plain ints."""
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise OpTypeError(arg, what, repr(value))
    return tuple(int(v) for v in value)


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


class Movement(Primitive):
    """Pure data movement: the gradient never reads the forward values."""

    save_inputs = "none"

    def flops(self, specs, out):
        return 0


# ---- shape-only ops ----------------------------------------------------------------------

@register
class Reshape(Movement):
    """``Reshape()(x, shape)``, e.g. split heads: ``(B, S, H) -> (B, S, heads, H/heads)``."""

    static_args = ("shape",)

    def indexing(self, specs, out):
        return reshape_indexing(specs[0].shape, out.shape)

    def local(self, sharding, rank, specs, out, comm_for=None):
        return self.with_attrs(shape=sharding.output_layout().local_shape(out.shape))

    def infer(self, x):
        shape = _ints(self.attrs["shape"], "shape")
        free = [i for i, d in enumerate(shape) if d == -1]
        if len(free) > 1 or any(d < -1 for d in shape):
            raise OpArgError("shape", "dims >= 0 with at most one -1", str(shape))
        known = _size([d for d in shape if d != -1])
        fits = known == x.size
        if free:  # the -1 dim is x.size / known, if that is a whole number
            fits = known > 0 and x.size % known == 0
            shape = shape[:free[0]] + (x.size // max(known, 1),) + shape[free[0] + 1:]
        if not fits:
            raise OpArgError("shape", f"a shape with {x.size} elements, as input shape {x.shape} has",
                             f"{tuple(self.attrs['shape'])}",
                             "the new dims must multiply to the input's size (-1 infers one dim)")
        return TensorSpec(shape, x.dtype)

    def forward(self, x):
        return np.reshape(x, self.attrs["shape"])

    def vjp(self, dy, xs, y, specs, needs):
        return (dy.reshape(specs[0].shape),)


@register
class Transpose(Movement):
    """``Transpose()(x, perm)``, e.g. heads first: ``(B, S, heads, D) -> (B, heads, S, D)``
    with ``perm = (0, 2, 1, 3)``. Gradient: the inverse permutation."""

    static_args = ("perm",)

    def indexing(self, specs, out):
        from ..strategy.sharding import Indexing, same_letters
        letters, _ = same_letters(specs[0].ndim)
        return Indexing((letters,), "".join(letters[p] for p in _ints(self.attrs["perm"], "perm")))

    def perm(self, shape) -> tuple[int, ...]:
        perm = _ints(self.attrs["perm"], "perm")
        if sorted(perm) != list(range(len(shape))):
            raise OpArgError("perm", f"a permutation of {tuple(range(len(shape)))} for input shape {tuple(shape)}",
                             str(perm))
        return perm

    def infer(self, x):
        perm = self.perm(x.shape)
        return TensorSpec(tuple(x.shape[p] for p in perm), x.dtype)

    def forward(self, x):
        return np.transpose(x, self.attrs["perm"])

    def vjp(self, dy, xs, y, specs, needs):
        return (np.transpose(dy, np.argsort(self.attrs["perm"])),)


@register
class ExpandDims(Movement):
    """``ExpandDims()(x, axis)``: axis in ``[-ndim-1, ndim]``; ``(B, S) -> (B, 1, S)`` at 1."""

    static_args = ("axis",)

    def indexing(self, specs, out):
        from ..strategy.sharding import Indexing, same_letters
        letters, _ = same_letters(specs[0].ndim)
        axis = self.axis(specs[0].ndim)
        return Indexing((letters,), letters[:axis] + "Z" + letters[axis:], frozenset("Z"))

    def axis(self, ndim: int) -> int:
        return normalize_axis(self.attrs["axis"], ndim + 1)

    def infer(self, x):
        a = self.axis(x.ndim)
        return TensorSpec(x.shape[:a] + (1,) + x.shape[a:], x.dtype)

    def forward(self, x):
        return np.expand_dims(x, self.axis(x.ndim))

    def vjp(self, dy, xs, y, specs, needs):
        return (dy.reshape(specs[0].shape),)


@register
class Squeeze(Movement):
    """``Squeeze(axis=())(x)``: drop the named dims (each must have size 1), or every
    size-1 dim when ``axis`` is ``()``. ``(B, 1, S) -> (B, S)``."""

    def local(self, sharding, rank, specs, out, comm_for=None):
        """Name the squeezed dims from the logical shape: a dim split down to local size 1
        must stay."""
        return self.with_attrs(axis=self.axes(specs[0].shape))

    def indexing(self, specs, out):
        from ..strategy.sharding import Indexing, same_letters
        axes = self.axes(specs[0].shape)
        letters, fixed = same_letters(specs[0].ndim, axes)
        return Indexing((letters,), "".join(ch for i, ch in enumerate(letters) if i not in axes), fixed)

    def __init__(self, axis=()):
        super().__init__(axis=tuple(axis) if isinstance(axis, list) else axis)

    def axes(self, shape) -> tuple[int, ...]:
        axis = self.attrs["axis"]
        if axis == ():
            return tuple(i for i, d in enumerate(shape) if d == 1)
        if not (_is_int(axis) or isinstance(axis, tuple)):
            raise OpTypeError("axis", "an int, a tuple of ints, or ()", repr(axis))
        if len(shape) == 0:
            raise OpArgError("axis", "() for a 0-d input", repr(axis))
        axes = normalize_axes(axis, len(shape))
        wide = [a for a in axes if shape[a] != 1]
        if wide:
            raise OpArgError("axis", f"dims of size 1 in input shape {tuple(shape)}",
                             f"{axis!r} (dim {wide[0]} has size {shape[wide[0]]})")
        return axes

    def infer(self, x):
        axes = self.axes(x.shape)
        return TensorSpec(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)

    def forward(self, x):
        return np.squeeze(x, axis=self.axes(x.shape))

    def vjp(self, dy, xs, y, specs, needs):
        return (dy.reshape(specs[0].shape),)


@register
class BroadcastTo(Movement):
    """``BroadcastTo(shape)(x)`` by numpy's rules; a -1 in ``shape`` keeps the input's dim
    there. ``(S, S) -> (B, heads, S, S)`` for an attention mask. Gradient: sum over the copies."""

    def __init__(self, shape):
        super().__init__(shape=tuple(shape) if isinstance(shape, list) else shape)

    def target(self, shape) -> tuple[int, ...]:
        want = _ints(self.attrs["shape"], "shape")
        lead = len(want) - len(shape)
        out = []
        for i, d in enumerate(want):
            has = shape[i - lead] if i >= lead else None
            if d == -1 and has is not None:
                d = has
            if d < 0 or (has is not None and has not in (1, d)):
                raise OpArgError("shape", f"a shape that input shape {tuple(shape)} broadcasts to "
                                 "(each input dim 1 or equal, aligned from the right)", str(want))
            out.append(d)
        if lead < 0:
            raise OpArgError("shape", f"at least {len(shape)} dims (the rank of input shape {tuple(shape)})",
                             str(want))
        return tuple(out)

    def infer(self, x):
        return TensorSpec(self.target(x.shape), x.dtype)

    def forward(self, x):
        return np.broadcast_to(x, self.target(x.shape))

    def vjp(self, dy, xs, y, specs, needs):
        return (sum_to(dy, specs[0].shape),)


@register
class Tile(Movement):
    """``Tile()(x, multiples)``: ``np.tile``; a longer ``multiples`` prepends dims to x.

    Gradient: view ``dy`` as ``(m0, d0, m1, d1, ...)`` and sum over the ``m`` axes."""

    static_args = ("multiples",)

    def multiples(self, shape) -> tuple[int, ...]:
        mult = _ints(self.attrs["multiples"], "multiples")
        if len(mult) < len(shape) or any(m < 1 for m in mult):
            raise OpArgError("multiples", f"{len(shape)} or more counts >= 1 (input shape {tuple(shape)})",
                             str(mult))
        return mult

    def infer(self, x):
        mult = self.multiples(x.shape)
        padded = (1,) * (len(mult) - x.ndim) + x.shape
        return TensorSpec(tuple(m * d for m, d in zip(mult, padded)), x.dtype)

    def forward(self, x):
        return np.tile(x, self.attrs["multiples"])

    def vjp(self, dy, xs, y, specs, needs):
        shape = specs[0].shape
        mult = self.multiples(shape)
        padded = (1,) * (len(mult) - len(shape)) + shape
        pairs = tuple(n for m, d in zip(mult, padded) for n in (m, d))  # (m0, d0, m1, d1, ...)
        g = dy.reshape(pairs).sum(axis=tuple(range(0, len(pairs), 2)))
        return (g.reshape(shape),)


# ---- joining -----------------------------------------------------------------------------

@register
class Concat(Movement):
    """``Concat(axis=0)((x, y, ...))``: MindSpore passes one tuple; its elements are the
    inputs. ``(B, S1, H), (B, S2, H) -> (B, S1+S2, H)`` at axis 1. Gradient: split ``dy``."""

    n_inputs = None

    def indexing(self, specs, out):
        from ..strategy.sharding import Indexing, same_letters
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
        return np.concatenate(xs, axis=self.attrs["axis"])

    def vjp(self, dy, xs, y, specs, needs):
        axis = normalize_axis(self.attrs["axis"], len(specs[0].shape))
        cuts = np.cumsum([s.shape[axis] for s in specs])[:-1]
        parts = np.split(dy, cuts, axis=axis)
        return tuple(p if n else None for p, n in zip(parts, needs))


# ---- slicing -----------------------------------------------------------------------------

class Slicing(Movement):
    """A box of the input picked by one slice per dim. Gradient: ``dy`` scattered into zeros."""

    def indexing(self, specs, out):
        """A dim cut by the slice cannot be split (its pieces would not line up)."""
        from ..strategy.sharding import Indexing, same_letters
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
        dx = np.zeros(shape, dy.dtype)
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
        ok = it is None or it is Ellipsis or _is_int(it) or isinstance(it, slice)
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
    from ..runtime.trace import current_tracer  # runtime depends on ops, not the other way round
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
                if bound is not None and not _is_int(bound):
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


def reshape_indexing(src: tuple[int, ...], dst: tuple[int, ...]):
    """Letters for a reshape: dims are grouped where the running products of both shapes
    meet; in each group the major input dim and the major output dim share a letter (a
    split of it carries over when it divides the output dim), every other dim is fixed.
    ``(B, S, H) -> (B*S, H)``: ``bSh -> bh``; ``(B, S, H) -> (B, S, N, D)``: ``bsh -> bshD``."""
    from ..strategy.sharding import FRESH, LETTERS, Indexing
    fresh = iter(FRESH)
    letters = iter(LETTERS)
    ins, outs, fixed = [], [], set()
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [i], [j]
        pi = src[i] if i < len(src) else 1
        pj = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                gi.append(i)
                i += 1
            else:
                pj *= dst[j]
                gj.append(j)
                j += 1
        shared = next(letters)
        gi = [d for d in gi if d < len(src)]
        gj = [d for d in gj if d < len(dst)]
        major_i = next((d for d in gi if src[d] > 1), gi[0] if gi else None)
        major_j = next((d for d in gj if dst[d] > 1), gj[0] if gj else None)
        for d in gi:
            ch = shared if d == major_i and major_j is not None else next(fresh)
            ins.append(ch)
            if ch != shared:
                fixed.add(ch)
        for d in gj:
            ch = shared if d == major_j and major_i is not None else next(fresh)
            outs.append(ch)
            if ch != shared:
                fixed.add(ch)
    return Indexing(("".join(ins),), "".join(outs), frozenset(fixed))

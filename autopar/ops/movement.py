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

Concat, the slices and ``getitem`` live in ``slicing.py``; the shape-only ops here.

Forward kernels return numpy views where numpy can (reshape of contiguous data,
transpose, slices, broadcast); gradients are the inverse movement of ``dy`` (reshape
back, inverse permutation, scatter into zeros, sum over broadcast copies).
"""
from __future__ import annotations

import math

from ..backend import array_module
from ..errors import OpArgError, OpTypeError, is_int
from ..ir.spec import TensorSpec
from .elementwise import sum_to
from .primitive import Primitive, normalize_axes, normalize_axis
from .registry import register
from .sharding import FRESH, LETTERS, Indexing, same_letters


def _ints(value, arg: str, what: str = "a tuple of ints") -> tuple[int, ...]:
    """A static tuple argument (shape, perm, begin, ...) as plain ints."""
    if not isinstance(value, (tuple, list)) or not all(is_int(v) for v in value):
        raise OpTypeError(arg, what, repr(value))
    return tuple(int(v) for v in value)


def _size(shape) -> int:
    return math.prod(shape)


class Movement(Primitive):
    """Pure data movement: the gradient never reads the forward values."""

    save_inputs = "none"

    def flops(self, specs, out):
        return 0


# ---- shape-only ops ----------------------------------------------------------------------

@register
class Reshape(Movement):
    """``Reshape()(x, shape)``, e.g. split heads: ``(B, S, H) -> (B, S, heads, H/heads)``.
    A view of a contiguous input; a copy of a strided one (after a transpose)."""

    view = "alias"

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
        return x.reshape(self.attrs["shape"])

    def vjp(self, dy, xs, y, specs, needs):
        return (dy.reshape(specs[0].shape),)


@register
class Transpose(Movement):
    """``Transpose()(x, perm)``, e.g. heads first: ``(B, S, heads, D) -> (B, heads, S, D)``
    with ``perm = (0, 2, 1, 3)``. Gradient: the inverse permutation."""

    view = "strided"

    static_args = ("perm",)

    def indexing(self, specs, out):
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
        return x.transpose(self.attrs["perm"])

    def vjp(self, dy, xs, y, specs, needs):
        perm = self.attrs["perm"]
        return (dy.transpose(sorted(range(len(perm)), key=perm.__getitem__)),)   # the inverse permutation


@register
class ExpandDims(Movement):
    """``ExpandDims()(x, axis)``: axis in ``[-ndim-1, ndim]``; ``(B, S) -> (B, 1, S)`` at 1."""

    view = "alias"

    static_args = ("axis",)

    def indexing(self, specs, out):
        letters, _ = same_letters(specs[0].ndim)
        axis = self.axis(specs[0].ndim)
        return Indexing((letters,), letters[:axis] + "Z" + letters[axis:], frozenset("Z"))

    def axis(self, ndim: int) -> int:
        return normalize_axis(self.attrs["axis"], ndim + 1)

    def infer(self, x):
        a = self.axis(x.ndim)
        return TensorSpec(x.shape[:a] + (1,) + x.shape[a:], x.dtype)

    def forward(self, x):
        return array_module(x).expand_dims(x, self.axis(x.ndim))

    def vjp(self, dy, xs, y, specs, needs):
        return (dy.reshape(specs[0].shape),)


@register
class Squeeze(Movement):
    """``Squeeze(axis=())(x)``: drop the named dims (each must have size 1), or every
    size-1 dim when ``axis`` is ``()``. ``(B, 1, S) -> (B, S)``."""

    view = "alias"

    def local(self, sharding, rank, specs, out, comm_for=None):
        """Name the squeezed dims from the logical shape: a dim split down to local size 1
        must stay."""
        return self.with_attrs(axis=self.axes(specs[0].shape))

    def indexing(self, specs, out):
        axes = self.axes(specs[0].shape)
        letters, fixed = same_letters(specs[0].ndim, axes)
        return Indexing((letters,), "".join(ch for i, ch in enumerate(letters) if i not in axes), fixed)

    def __init__(self, axis=()):
        super().__init__(axis=tuple(axis) if isinstance(axis, list) else axis)

    def axes(self, shape) -> tuple[int, ...]:
        axis = self.attrs["axis"]
        if axis == ():
            return tuple(i for i, d in enumerate(shape) if d == 1)
        if not (is_int(axis) or isinstance(axis, tuple)):
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
        return x.squeeze(axis=self.axes(x.shape))

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
        return array_module(x).broadcast_to(x, self.target(x.shape))

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
        return array_module(x).tile(x, self.attrs["multiples"])

    def vjp(self, dy, xs, y, specs, needs):
        shape = specs[0].shape
        mult = self.multiples(shape)
        padded = (1,) * (len(mult) - len(shape)) + shape
        pairs = tuple(n for m, d in zip(mult, padded) for n in (m, d))  # (m0, d0, m1, d1, ...)
        g = dy.reshape(pairs).sum(axis=tuple(range(0, len(pairs), 2)))
        return (g.reshape(shape),)


def reshape_indexing(src: tuple[int, ...], dst: tuple[int, ...]):
    """Letters for a reshape: dims are grouped where the running products of both shapes
    meet; in each group the major input dim and the major output dim share a letter (a
    split of it carries over when it divides the output dim), every other dim is fixed.
    ``(B, S, H) -> (B*S, H)``: ``bSh -> bh``; ``(B, S, H) -> (B, S, N, D)``: ``bsh -> bshD``."""
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

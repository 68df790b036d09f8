"""Op sharding: which mesh axes split each index letter of an op.

Every op states its indexing einsum-style (``Primitive.indexing``): one letter per dim of
each input and of the output. ``MatMul`` is ``ik,kj->ij``; ``Add`` of (B, S, H) and (H,)
is ``bsh,h->bsh``; a broadcast size-1 dim gets a letter of its own that nothing may split.
Three kinds of letters:

* output letters: splitting one splits the output the same way;
* *sum* letters (absent from the output: a contraction, a sum): splitting one leaves the
  output a partial sum over that mesh axis;
* *fixed* letters (a softmax axis, a normalized axis, a sliced dim): never split;
* *internal* letters: the kernel reduces over them itself, with collectives along their
  axes (the vocabulary-parallel cross-entropy); the output is whole.

An :class:`OpSharding` maps letters to mesh axes. Every layout follows from it:

* input i:            its letters' axes; nothing partial;
* output:             its letters' axes; partial over the axes of split sum letters;
* gradient of input i: the input's layout, partial over the axes of split letters the
  input lacks (``dA`` of a MatMul is partial over ``j``'s axis; a weight replicated over
  the data-parallel axis gets a gradient partial over it);
* dy (what the VJP reads): the output's layout, nothing partial.

A user strategy (``((dp, 1), (1, mp))``) becomes a sharding on a fresh device matrix made
of the split counts in letter order, with a trailing ``rep`` axis when the strategy uses
fewer devices than the stage has (MindSpore's repeated calculation, whose repeated
dimension goes on the right by default): ``((dp, 1),)`` on dp x mp devices keeps dp major,
so it lines up with ops split ``(dp, mp)``. An op without one
takes its inputs' axes (propagation): it runs on the mesh of its most split input, so
neighbouring ops agree without communication and whole inputs are only sliced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import OpArgError
from ..ir.layout import Layout
from ..ir.mesh import Mesh


@dataclass(frozen=True)
class Indexing:
    inputs: tuple[str, ...]
    output: str
    fixed: frozenset[str] = frozenset()
    internal: frozenset[str] = frozenset()  # reduced inside the kernel (with communication)
    major: str = ""     # letters whose mesh axes come first in a strategy's device matrix

    @property
    def letters(self) -> tuple[str, ...]:
        """Every letter once, in order of first appearance (inputs, then output)."""
        seen: dict[str, None] = {}
        for s in self.inputs + (self.output,):
            for ch in s:
                seen.setdefault(ch, None)
        return tuple(seen)

    @property
    def sum_letters(self) -> frozenset[str]:
        return frozenset(ch for s in self.inputs for ch in s if ch not in self.output) - self.fixed - self.internal


def broadcast_indexing(shapes: Sequence[Sequence[int]], out_ndim: int, fixed_out: Sequence[int] = ()) -> Indexing:
    """Letters for numpy broadcasting: output dim d is ``letters[d]``; an input's dim that
    broadcasts (size 1 against a larger output) gets its own fixed letter."""
    base = "abcdefghijklmnopqrstuvwxyz"
    out = base[:out_ndim]
    fresh = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    fixed = {out[d] for d in fixed_out}
    out_shape = [max(s[d - (out_ndim - len(s))] if d >= out_ndim - len(s) else 1 for s in shapes)
                 for d in range(out_ndim)]
    ins = []
    for shape in shapes:
        lead = out_ndim - len(shape)
        letters = ""
        for k, n in enumerate(shape):
            d = lead + k
            if n == 1 and out_shape[d] != 1:
                ch = next(fresh)
                fixed.add(ch)
                letters += ch
            else:
                letters += out[d]
        ins.append(letters)
    return Indexing(tuple(ins), out, frozenset(fixed))


LETTERS = "abcdefghijklmnopqrstuvwxyz"
FRESH = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def same_letters(ndim: int, fixed_dims: Sequence[int] = ()) -> tuple[str, frozenset[str]]:
    """Letters of an ``ndim``-d tensor and the fixed set for ``fixed_dims`` of it."""
    letters = LETTERS[:ndim]
    return letters, frozenset(letters[d] for d in fixed_dims)


@dataclass(frozen=True)
class OpSharding:
    indexing: Indexing
    mesh: Mesh
    axes: tuple[tuple[str, tuple[int, ...]], ...]  # (letter, mesh axes), letters sorted

    def letter_axes(self, ch: str) -> tuple[int, ...]:
        for letter, axes in self.axes:
            if letter == ch:
                return axes
        return ()

    def _dims(self, letters: str) -> tuple[tuple[int, ...], ...]:
        return tuple(self.letter_axes(ch) for ch in letters)

    def input_layout(self, i: int) -> Layout:
        return Layout(self.mesh, self._dims(self.indexing.inputs[i]))

    def output_layout(self) -> Layout:
        partial = tuple(a for ch in sorted(self.indexing.sum_letters) for a in self.letter_axes(ch))
        return Layout(self.mesh, self._dims(self.indexing.output), partial)

    def dy_layout(self) -> Layout:
        return Layout(self.mesh, self._dims(self.indexing.output))

    def grad_layout(self, i: int) -> Layout:
        own = self.indexing.inputs[i]
        partial = tuple(a for ch, axes in self.axes if ch not in own for a in axes)
        return Layout(self.mesh, self._dims(own), partial)

    def splits(self) -> tuple[tuple[int, ...], ...]:
        """The ``.shard()`` spelling: split counts per input dim."""
        return tuple(self.input_layout(i).splits() for i in range(len(self.indexing.inputs)))

    def __str__(self) -> str:
        return str(self.splits()).replace(" ", "")


def _make(indexing: Indexing, mesh: Mesh, axes: dict[str, tuple[int, ...]]) -> OpSharding:
    return OpSharding(indexing, mesh, tuple(sorted((ch, a) for ch, a in axes.items() if a)))


def from_strategy(indexing: Indexing, strategy: Sequence[Sequence[int]], shapes: Sequence[Sequence[int]],
                  stage: Mesh, where: str = "") -> OpSharding:
    """A user's split counts (one tuple per input) as a sharding on a fresh device matrix."""
    counts: dict[str, tuple[int, int]] = {}  # letter -> (count, input that set it)
    for i, (letters, split, shape) in enumerate(zip(indexing.inputs, strategy, shapes)):
        for d, (ch, k, n) in enumerate(zip(letters, split, shape)):
            if k > 1 and ch in indexing.fixed:
                raise OpArgError(f"in_strategy[{i}][{d}]", "1: this op cannot split that dim", str(k),
                                 "leave it 1 and split another dim", where=where)
            if n % k:
                raise OpArgError(f"in_strategy[{i}][{d}]", f"a split that divides dim {d} of input {i} "
                                 f"(size {n})", str(k), f"use a divisor of {n}", where=where)
            if ch in counts and counts[ch][0] != k:
                j = counts[ch][1]
                raise OpArgError(f"in_strategy[{i}][{d}]", f"{counts[ch][0]}, as input {j} splits the same "
                                 f"index (they are contracted or broadcast together)", str(k),
                                 "split matching dims the same number of ways", where=where)
            counts.setdefault(ch, (k, i))
    # device-matrix order: the op's major letters first (a Gather's batch), then first appearance
    order = tuple(dict.fromkeys(tuple(indexing.major) + indexing.letters))
    letters = [ch for ch in order if counts.get(ch, (1, 0))[0] > 1]
    used = math.prod(counts[ch][0] for ch in letters)
    if used > stage.size or stage.size % used:
        raise OpArgError("in_strategy", f"a product of splits dividing the {stage.size} devices of the stage",
                         f"{used} ({tuple(map(tuple, strategy))})", "use fewer or other splits", where=where)
    rep = stage.size // used
    shape = tuple(counts[ch][0] for ch in letters) + ((rep,) if rep > 1 else ())
    names = tuple(letters) + (("rep",) if rep > 1 else ())
    mesh = stage.reshaped(shape or (1,), names or ("rep",))
    return _make(indexing, mesh, {ch: (k,) for k, ch in enumerate(letters)})


def propagate(indexing: Indexing, layouts: Sequence[Layout | None], shapes: Sequence[Sequence[int]],
              out_shape: Sequence[int], stage: Mesh) -> OpSharding:
    """A sharding for an op without a user strategy: each letter takes the mesh axes that
    the first input laid out on the reference mesh gives it, unless the letter is fixed or
    the split would not divide every dim the letter indexes (then it stays whole)."""
    known = [lay for lay in layouts if lay is not None]
    if not known:
        return _make(indexing, stage, {})
    ref = max(known, key=lambda lay: math.prod(lay.splits()))  # the most split input leads
    sizes: dict[str, list[int]] = {}
    for letters, shape in zip(indexing.inputs + (indexing.output,), list(shapes) + [out_shape]):
        for ch, n in zip(letters, shape):
            sizes.setdefault(ch, []).append(n)
    axes: dict[str, tuple[int, ...]] = {}
    taken: set[int] = set()
    for letters, lay in zip(indexing.inputs, layouts):
        if lay is None or lay.mesh != ref.mesh:
            continue
        for ch, dim_axes in zip(letters, lay.dims):
            if ch in axes or ch in indexing.fixed or not dim_axes or taken & set(dim_axes):
                continue
            k = math.prod(ref.mesh.shape[a] for a in dim_axes)
            if any(n % k for n in sizes[ch]):
                continue
            axes[ch] = dim_axes
            taken.update(dim_axes)
    return _make(indexing, ref.mesh, axes)


def candidates(indexing: Indexing, shapes: Sequence[Sequence[int]], devices: int,
               out_shape: Sequence[int] = ()) -> list[tuple[tuple[int, ...], ...]]:
    """Every strategy (split counts per input dim) on ``devices`` devices: each splittable
    letter gets a count dividing every dim it indexes, inputs' and output's (a reshape ties
    an input dim to a smaller output dim), the counts' product divides ``devices`` (fewer
    devices than the stage = repeated calculation). Non-powers of two included where the
    shapes allow."""
    sizes: dict[str, int] = {}
    for letters, shape in zip(indexing.inputs + (indexing.output,), list(shapes) + [out_shape]):
        for ch, n in zip(letters, shape):
            sizes[ch] = math.gcd(sizes.get(ch, 0), n)
    in_letters = set("".join(indexing.inputs))
    free = [ch for ch in indexing.letters if ch in in_letters and ch not in indexing.fixed]
    found: list[dict[str, int]] = [{}]
    for ch in free:
        grown = []
        for counts in found:
            used = math.prod(counts.values())
            for k in range(1, devices // used + 1):
                if sizes[ch] % k == 0 and devices % (used * k) == 0:
                    grown.append({**counts, ch: k})
        found = grown
    return [tuple(tuple(c.get(ch, 1) for ch in letters) for letters in indexing.inputs) for c in found]

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

A layout strategy with MindSpore's ``"interleaved_parallel"`` alias adds
:attr:`OpSharding.interleave`, ``(letter, k)``: every local input holding that letter is
cut into k pieces along it and the op runs once per piece (lowering concatenates the k
outputs). The letter must be an output letter whose local size k divides; the layouts
are those of the same sharding without it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import OpArgError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.strategy import Strategy


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
    out_dims: tuple[tuple[int, ...], ...] | None = None   # out_strategy: the output's home dims
    interleave: tuple[str, int] | None = None   # (letter, k): the op runs as k copies along that letter

    def letter_axes(self, ch: str) -> tuple[int, ...]:
        for letter, axes in self.axes:
            if letter == ch:
                return axes
        return ()

    def _dims(self, letters: str) -> tuple[tuple[int, ...], ...]:
        return tuple(self.letter_axes(ch) for ch in letters)

    def input_layout(self, i: int) -> Layout:
        return Layout(self.mesh, self._dims(self.indexing.inputs[i]))

    def gemm_min_dim(self, specs) -> int | None:
        """min(m, n, k) of a contraction's local GEMM (batch dims aside) on the local input
        ``specs``, from its letters: m only in the first input and the output, n only in the
        second and the output, k in both inputs and not the output; None for an op that is no
        two-input contraction (the cost model's GEMM rate by shape reads it)."""
        ix = self.indexing
        if len(ix.inputs) != 2 or not ix.sum_letters:
            return None
        size: dict[str, int] = {}
        for letters, spec in zip(ix.inputs, specs):
            size.update(zip(letters, spec.shape))
        a, b, out = set(ix.inputs[0]), set(ix.inputs[1]), set(ix.output)
        m = math.prod(size[ch] for ch in (a & out) - b)
        n = math.prod(size[ch] for ch in (b & out) - a)
        k = math.prod(size[ch] for ch in ix.sum_letters)
        return min(m, n, k)

    def output_layout(self) -> Layout:
        partial = tuple(a for ch in sorted(self.indexing.sum_letters) for a in self.letter_axes(ch))
        return Layout(self.mesh, self._dims(self.indexing.output), partial)

    def home_layout(self) -> Layout:
        """Where the output lives for its readers: :meth:`output_layout` (what the kernel
        makes, partial sums and all), or, under an ``out_strategy``, that layout: a reader
        then takes the output split (a partial sum becomes a reduce-scatter) or whole (an
        all-reduce), and the plan's redistributions follow from the layouts alone."""
        if self.out_dims is None:
            return self.output_layout()
        return Layout(self.mesh, self.out_dims)

    def dy_layout(self) -> Layout:
        return Layout(self.mesh, self._dims(self.indexing.output))

    def grad_layout(self, i: int) -> Layout:
        own = self.indexing.inputs[i]
        partial = tuple(a for ch, axes in self.axes if ch not in own for a in axes)
        return Layout(self.mesh, self._dims(own), partial)

    def splits(self) -> tuple[tuple[int, ...], ...]:
        """The ``.shard()`` spelling: split counts per input dim."""
        return tuple(self.input_layout(i).splits() for i in range(len(self.indexing.inputs)))

    def interleaved_dims(self) -> tuple[tuple[int | None, ...], int | None]:
        """Under :attr:`interleave`: per input, the dim holding the interleaved letter (None:
        the input is whole in every copy), and the output's dim of it."""
        ch = self.interleave[0]
        return (tuple(s.index(ch) if ch in s else None for s in self.indexing.inputs),
                self.indexing.output.index(ch))

    def __str__(self) -> str:
        text = str(self.splits()).replace(" ", "")
        if self.interleave is not None:
            text += f"~{self.interleave[0]}x{self.interleave[1]}"
        return text if self.out_dims is None else f"{text}->{str(self.home_layout().splits()).replace(' ', '')}"


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


def from_layouts(indexing: Indexing, strategy: Strategy, shapes: Sequence[Sequence[int]], stage: Mesh,
                 where: str = "") -> OpSharding:
    """A layout strategy as a sharding on its own device matrix: the aliases name the mesh
    axes, each letter takes the axes its dims name (``MatMul`` under ``(layout("dp",
    "None"), layout("None", "mp"))`` splits ``i`` over ``dp`` and ``j`` over ``mp``: the
    sharding of ``((dp, 1), (1, mp))``, with the axes named ``dp``/``mp`` instead of the
    letters). Unlike a tuple, a layout may order a dim's axes or leave an axis in the middle
    unused (it replicates)."""
    matrix = strategy.layout
    if matrix.devices != stage.size:
        raise OpArgError("in_strategy device_matrix", f"a device matrix of the stage's {stage.size} devices "
                         "(MindSpore's rule: its product is the devices of one pipeline stage; an "
                         "'interleaved_parallel' axis does not count)",
                         f"{matrix} ({matrix.devices} devices)",
                         "size the Layout's device matrix to the stage", where=where)
    mesh = matrix.mesh(stage)
    axes: dict[str, tuple[tuple[int, ...], int]] = {}  # letter -> (axes, input that set it)
    for i, (letters, dims, shape) in enumerate(zip(indexing.inputs, strategy.input_axes, shapes)):
        for d, (ch, dim_axes, n) in enumerate(zip(letters, dims, shape)):
            k = math.prod(mesh.shape[a] for a in dim_axes)
            names = tuple(mesh.names[a] for a in dim_axes)
            if dim_axes and ch in indexing.fixed and k > 1:
                raise OpArgError(f"in_strategy[{i}] dim {d}", "'None': this op cannot split that dim", str(names),
                                 "leave it 'None' and split another dim", where=where)
            if n % k:
                raise OpArgError(f"in_strategy[{i}] dim {d}", f"aliases whose sizes divide dim {d} of input {i} "
                                 f"(size {n})", f"{names} ({k} ways)", f"use a split that divides {n}", where=where)
            if ch in axes and axes[ch][0] != dim_axes:
                j = axes[ch][1]
                raise OpArgError(f"in_strategy[{i}] dim {d}", f"{tuple(mesh.names[a] for a in axes[ch][0])}, as "
                                 f"input {j} splits the same index (they are contracted or broadcast together)",
                                 str(names), "split matching dims over the same aliases", where=where)
            axes.setdefault(ch, (dim_axes, i))
    used = [a for dim_axes, _ in axes.values() for a in dim_axes]
    if len(set(used)) != len(used):
        raise OpArgError("in_strategy", "each alias splitting one index of the op", str(strategy),
                         "split different dims of the op over different aliases", where=where)
    sharding = _make(indexing, mesh, {ch: a for ch, (a, _) in axes.items()})
    if strategy.interleaved is None:
        return sharding
    letter, k = _interleave(sharding, strategy, shapes, where)
    return sharding if k == 1 else dataclasses.replace(sharding, interleave=(letter, k))   # 1 copy: the op as is


def _interleave(sharding: OpSharding, strategy: Strategy, shapes: Sequence[Sequence[int]],
                where: str) -> tuple[str, int]:
    """(letter, k) of an interleaved layout strategy, checked: one letter, kept by the
    output (a contracted letter's copies would be partial sums, a fixed one cannot be cut),
    and k dividing its size on each device."""
    indexing, k = sharding.indexing, strategy.copies
    named = {(i, d): indexing.inputs[i][d] for i, d in enumerate(strategy.interleaved) if d is not None}
    if len(set(named.values())) > 1:
        raise OpArgError("in_strategy 'interleaved_parallel'", "one index of the op cut into copies (inputs "
                         "interleaving dims the op matches together)", ", ".join(
                             f"input {i} dim {d}" for i, d in named), "interleave the same index on every input",
                         where=where)
    (i, d), ch = next(iter(named.items()))
    arg = f"in_strategy[{i}] dim {d} 'interleaved_parallel'"
    if ch in indexing.sum_letters:
        raise OpArgError(arg, "a dim the output keeps (the op runs once per copy and the copies are joined)",
                         "a contracted dim (each copy would be a partial sum)",
                         "interleave a dim of the output, e.g. the batch dim", where=where)
    if ch not in indexing.output or ch in indexing.fixed or ch in indexing.internal:
        raise OpArgError(arg, "a dim this op can cut (one the output keeps)", "a dim the op reads whole",
                         "interleave another dim", where=where)
    ways = math.prod(sharding.mesh.shape[a] for a in sharding.letter_axes(ch))
    for j, (letters, shape) in enumerate(zip(indexing.inputs, shapes)):
        if ch in letters and (shape[letters.index(ch)] // ways) % k:
            n = shape[letters.index(ch)]
            raise OpArgError(arg, f"{k} copies dividing dim {letters.index(ch)} of input {j} on each device "
                             f"(size {n} split {ways} ways)", f"{n // ways} rows per device",
                             f"use an 'interleaved_parallel' size dividing {n // ways}", where=where)
    return ch, k


def user_sharding(indexing: Indexing, strategy: Strategy, shapes: Sequence[Sequence[int]],
                  out_shape: Sequence[int], stage: Mesh, takes_out_strategy: bool, where: str = "") -> OpSharding:
    """The sharding a ``.shard()`` strategy asks for: tuples or layouts, then its
    ``out_strategy`` (:func:`with_out_strategy`) when the op takes one (contractions);
    an ``out_strategy`` on another op is an error, never ignored."""
    if strategy.layout is not None:
        sharding = from_layouts(indexing, strategy, shapes, stage, where)
    else:
        sharding = from_strategy(indexing, strategy.inputs, shapes, stage, where)
    if strategy.outputs is None:
        return sharding
    if not takes_out_strategy:
        raise OpArgError("out_strategy", "None: this op's output layout follows its inputs' (MindSpore takes an "
                         "out_strategy on MatMul and BatchMatMul)", str(strategy),
                         "drop out_strategy, or shard the op that reads this output", where=where)
    return with_out_strategy(sharding, strategy, out_shape, where)


def with_out_strategy(sharding: OpSharding, strategy: Strategy, out_shape: Sequence[int],
                      where: str = "") -> OpSharding:
    """MindSpore's ``out_strategy`` of a contraction split over its contracted index: the
    output home either whole over the contracted split (``((a_i, b_j),)``: an all-reduce,
    the default) or split by it too (``((a_i * a_k, b_j),)``: a reduce-scatter; the
    contracted axes join that dim's split, minor, as MindSpore's MatMul forward
    reduce-scatter lays out its output). A layout ``out_strategy`` names the output's axes
    on the op's device matrix directly."""
    out = sharding.output_layout()
    if len(strategy.outputs) != 1 or len(strategy.outputs[0]) != len(out_shape):
        raise OpArgError("out_strategy", f"one tuple of {len(out_shape)} split counts (the output's dims)",
                         str(strategy.outputs), where=where)
    if strategy.output_axes is not None:
        dims = strategy.output_axes[0]
    else:
        dims = _out_dims_of(out, strategy.outputs[0], where)
    keeps = all(tuple(d[:len(o)]) == o and set(d[len(o):]) <= set(out.partial) for d, o in zip(dims, out.dims))
    if not keeps:
        raise OpArgError("out_strategy", f"the output's own split {out}, its contracted axes "
                         f"{tuple(sharding.mesh.names[a] for a in out.partial)} optionally added (minor) to a dim",
                         str(tuple(tuple(sharding.mesh.names[a] for a in d) for d in dims)),
                         "split the output only over axes the op already uses", where=where)
    Layout(sharding.mesh, dims).check_shape(out_shape, where, "out_strategy output")
    return dataclasses.replace(sharding, out_dims=dims)


def _out_dims_of(out: Layout, wanted: Sequence[int], where: str) -> tuple[tuple[int, ...], ...]:
    """Output dims for an ``out_strategy`` tuple: each dim keeps its axes; a dim asking for
    more ways takes the next partial (contracted) axes whose sizes make up the factor."""
    pending = list(out.partial)
    dims = []
    for d, (axes, have, want) in enumerate(zip(out.dims, out.splits(), wanted)):
        extra: list[int] = []
        while want != have * math.prod(out.mesh.shape[a] for a in extra) and pending:
            extra.append(pending.pop(0))
        if want != have * math.prod(out.mesh.shape[a] for a in extra):
            scattered = list(out.splits())
            scattered[d] *= math.prod(out.mesh.shape[a] for a in out.partial)
            also = f" or {scattered[d]} (reduce-scatter into this dim)" if out.partial else ""
            raise OpArgError(f"out_strategy[0][{d}]", f"{have} (all-reduce over the contracted split){also}",
                             str(want), f"e.g. out_strategy=({out.splits()},) or ({tuple(scattered)},)",
                             where=where)
        dims.append(tuple(axes) + tuple(extra))
    return tuple(dims)


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

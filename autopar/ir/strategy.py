"""A strategy is what ``op.shard(in_strategy, out_strategy)`` records.

MindSpore's spellings: one tuple of split counts per input, one count per dimension, or one
:class:`~autopar.ir.parallel_layout.TensorLayout` per input (MindSpore 2.x's ``Layout``)::

    MatMul().shard(((dp, 1), (1, mp)))   # A (B, H) split dp ways on B; W (H, F) split mp on F
    layout = Layout((dp, mp), ("dp", "mp"))
    MatMul().shard((layout("dp", "None"), layout("None", "mp")))   # the same, axes named

A layout strategy keeps its device matrix and, per input dim, the axes that split it
(:attr:`Strategy.layout`, :attr:`Strategy.input_axes`); its split counts are in
:attr:`Strategy.inputs` like a tuple strategy's, so every rule that reads counts reads both.

A layout with the ``"interleaved_parallel"`` alias also cuts one dim per input into copies
inside each device (:attr:`Strategy.interleaved`: per input, that dim or None;
:attr:`Strategy.copies`: how many): the op runs once per copy. The split counts and axes
are the devices' alone, so such a strategy lays tensors out exactly as the same layouts
without the alias; a tuple strategy never interleaves.

This module only checks that the spelling is well formed (tuples of positive ints; layouts
of one device matrix). Whether the counts fit the shapes and the device mesh is the op's
sharding rule's question, asked at plan time when shapes are known.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OpArgError, OpTypeError, is_int
from .parallel_layout import INTERLEAVED, Layout, TensorLayout

Splits = tuple[tuple[int, ...], ...]
Axes = tuple[tuple[tuple[int, ...], ...], ...]   # per tensor, per dim: device-matrix axes


@dataclass(frozen=True)
class Strategy:
    """Split counts per input (and optionally per output) of one op; for a strategy given as
    layouts, also its Layout (the named device matrix) and the axes splitting each dim (``None`` for tuples)."""

    inputs: Splits
    outputs: Splits | None = None
    layout: Layout | None = None        # the device matrix a layout strategy names
    input_axes: Axes | None = None
    output_axes: Axes | None = None
    interleaved: tuple[int | None, ...] | None = None   # per input: the dim cut into copies, or None
    copies: int = 1                                      # copies per device of that dim

    def __str__(self) -> str:
        text = str(self.inputs).replace(" ", "")
        if self.interleaved is not None:
            text += f"~interleaved{str(self.interleaved).replace(' ', '')}x{self.copies}"
        return text if self.outputs is None else f"{text}->{str(self.outputs).replace(' ', '')}"


def _normalize_splits(value, arg: str) -> Splits:
    if not isinstance(value, (tuple, list)):
        raise OpTypeError(arg, "a tuple with one tuple of split counts per input, e.g. ((2, 1), (1, 4))",
                          repr(value))
    out = []
    for i, dims in enumerate(value):
        if not isinstance(dims, (tuple, list)):
            raise OpTypeError(f"{arg}[{i}]", "a tuple of split counts, one per dimension", repr(dims),
                              "wrap a single input's counts in a tuple: ((4, 1),)")
        row = []
        for d, n in enumerate(dims):
            if not is_int(n):
                raise OpTypeError(f"{arg}[{i}][{d}]", "an int split count", f"{n!r} ({type(n).__name__})",
                                  "use whole numbers such as 1, 2, 4")
            if n < 1:
                raise OpArgError(f"{arg}[{i}][{d}]", "a split count >= 1", str(n), "use 1 for 'not split'")
            row.append(int(n))
        out.append(tuple(row))
    return tuple(out)


def _layouts_of(value, arg: str, matrix: Layout | None) -> tuple[Layout, Axes] | None:
    """(device matrix, axes per tensor) when ``value`` is all layouts, None when it holds
    none; a mix, or layouts of two device matrices, is an error."""
    if not isinstance(value, (tuple, list)):
        return None
    kinds = [isinstance(v, TensorLayout) for v in value]
    if not any(kinds):
        return None
    if not all(kinds):
        raise OpTypeError(arg, "all tuples of split counts or all Layouts", repr(tuple(value)),
                          "give every tensor a layout of the same Layout, or every tensor a tuple")
    for i, v in enumerate(value):
        matrix = matrix or v.layout
        if v.layout != matrix:
            raise OpArgError(f"{arg}[{i}]", f"a layout of {matrix} like the others", str(v.layout),
                             "lay out every tensor of an op on one device matrix")
    return matrix, tuple(v.dims for v in value)


def normalize_strategy(in_strategy, out_strategy=None) -> Strategy:
    """Validate the form of a ``.shard()`` argument and freeze it."""
    in_layouts = _layouts_of(in_strategy, "in_strategy", None)
    out_layouts = _layouts_of(out_strategy, "out_strategy", in_layouts[0] if in_layouts else None)
    if (in_layouts is None) != (out_layouts is None) and out_strategy is not None:
        raise OpTypeError("out_strategy", "layouts when in_strategy is layouts, tuples when it is tuples",
                          repr(out_strategy), "spell both strategies the same way")
    if in_layouts is not None:
        matrix, in_axes = in_layouts
        out_axes = out_layouts[1] if out_layouts else None
        _check_output_not_interleaved(out_strategy if out_axes is not None else ())
        interleaved = tuple(v.interleaved for v in in_strategy)
        if all(d is None for d in interleaved):
            interleaved = None
        return Strategy(tuple(v.splits() for v in in_strategy),
                        None if out_axes is None else tuple(v.splits() for v in out_strategy),
                        matrix, in_axes, out_axes, interleaved, matrix.interleave if interleaved else 1)
    inputs = _normalize_splits(in_strategy, "in_strategy")
    outputs = None if out_strategy is None else _normalize_splits(out_strategy, "out_strategy")
    return Strategy(inputs, outputs)


def _check_output_not_interleaved(out_layouts) -> None:
    """The output's copies are the inputs' (the op's copies, concatenated): an
    ``out_strategy`` says where the output lives on the devices, not how it is cut."""
    for i, v in enumerate(out_layouts):
        if v.interleaved is not None:
            raise OpArgError(f"out_strategy[{i}] dim {v.interleaved}", f"no {INTERLEAVED!r} alias (the op's copies "
                             "are set by in_strategy; the output joins them)", str(v),
                             f"drop {INTERLEAVED!r} from the out_strategy layout")


def check_strategy_ranks(strategy: Strategy, specs) -> None:
    """One tuple per input, one split count per dimension (shapes known at trace time)."""
    if len(strategy.inputs) != len(specs):
        raise OpArgError("in_strategy", f"{len(specs)} tuple(s), one per input", f"{len(strategy.inputs)}: "
                         f"{strategy}", "give a split tuple for every tensor input")
    for i, (dims, spec) in enumerate(zip(strategy.inputs, specs)):
        if len(dims) != len(spec.shape):
            raise OpArgError(f"in_strategy[{i}]", f"{len(spec.shape)} split counts for input {i} of shape "
                             f"{tuple(spec.shape)}", f"{dims}", "one count per dimension, 1 = not split")

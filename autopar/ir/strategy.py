"""A strategy is what ``op.shard(in_strategy, out_strategy)`` records.

MindSpore's spelling: one tuple of split counts per input, one count per dimension::

    MatMul().shard(((dp, 1), (1, mp)))   # A (B, H) split dp ways on B; W (H, F) split mp on F

This module only checks that the spelling is well formed (tuples of positive ints). Whether
the counts fit the shapes and the device mesh is the op's sharding rule's question, asked at
plan time when shapes are known.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import OpArgError, OpTypeError, is_int

Splits = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Strategy:
    """Split counts per input (and optionally per output) of one op."""

    inputs: Splits
    outputs: Splits | None = None

    def __str__(self) -> str:
        text = str(self.inputs).replace(" ", "")
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


def normalize_strategy(in_strategy, out_strategy=None) -> Strategy:
    """Validate the form of a ``.shard()`` argument and freeze it."""
    inputs = _normalize_splits(in_strategy, "in_strategy")
    outputs = None if out_strategy is None else _normalize_splits(out_strategy, "out_strategy")
    return Strategy(inputs, outputs)


def check_strategy_ranks(strategy: Strategy, specs) -> None:
    """One tuple per input, one split count per dimension (shapes known at trace time)."""
    if len(strategy.inputs) != len(specs):
        raise OpArgError("in_strategy", f"{len(specs)} tuple(s), one per input", f"{len(strategy.inputs)}: "
                         f"{strategy}", "give a split tuple for every tensor input")
    for i, (dims, spec) in enumerate(zip(strategy.inputs, specs)):
        if len(dims) != len(spec.shape):
            raise OpArgError(f"in_strategy[{i}]", f"{len(spec.shape)} split counts for input {i} of shape "
                             f"{tuple(spec.shape)}", f"{dims}", "one count per dimension, 1 = not split")

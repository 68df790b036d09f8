"""``autopar.shard(fn, in_strategy, out_strategy=None, parameter_plan=None)``: MindSpore's
function-level ``ms.shard`` / ``mindspore.parallel.shard``.

For a Cell it is :meth:`Cell.shard` and returns the cell. For a function of tensors called
inside a cell's ``construct`` it returns the function with its tensor arguments and
results crossing boundary ops that carry the strategies (autopar/nn/boundaries.py);
``parameter_plan`` needs a Cell (a function owns no parameters), as in MindSpore.
"""
from __future__ import annotations

from ..errors import OpArgError
from .boundaries import shard_spec, with_boundaries
from .cell import Cell


def shard(fn, in_strategy, out_strategy=None, parameter_plan=None):
    """Lay out ``fn``'s tensor inputs (and outputs, and a Cell's named parameters) as the
    strategies say; the ops inside follow by propagation. Returns the Cell, or the wrapped
    function."""
    if isinstance(fn, Cell):
        return fn.shard(in_strategy, out_strategy, parameter_plan)
    where = f"shard({getattr(fn, '__name__', type(fn).__name__)})"
    if not callable(fn):
        raise TypeError(f"{where}: fn: expected a Cell or a function, got {type(fn).__name__}")
    if parameter_plan is not None:
        raise OpArgError("parameter_plan", "None for a function (parameters belong to a Cell)", repr(parameter_plan),
                         "shard the Cell that owns the parameters", where=where)
    return with_boundaries(fn, shard_spec(where, in_strategy, out_strategy))

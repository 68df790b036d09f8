"""The cell boundary: an identity that carries a cell-level strategy into the graph.

``Cell.shard(in_strategy, out_strategy, parameter_plan)`` and ``autopar.shard(fn, ...)``
(MindSpore's ``ms.shard``) record one :class:`ShardBoundary` per tensor crossing the
boundary, with the strategy asked for that tensor. The planner treats it like any op with
a user strategy: its input is read in that layout (a redistribution at the boundary where
the tensor arrives otherwise), its output lives there, and the ops inside the cell without
a strategy propagate from it. A parameter's boundary is its first reader, so the parameter
itself is laid out as ``parameter_plan`` says.

forward: identity (a view) / backward: identity; the layouts do the communication.
"""
from __future__ import annotations

from ..ir.spec import TensorSpec
from .primitive import Primitive
from .sharding import Indexing, same_letters


class ShardBoundary(Primitive):
    """Identity whose strategy is a cell's (or function's) strategy for one tensor. Not in
    the op registry: like lowering's Redistribute it is inserted, never called by a user."""

    save_inputs = "none"
    view = "alias"

    def __init__(self, role: str = "input"):
        super().__init__(role=role)   # 'input', 'output' or 'parameter': how plans name it

    def infer(self, x: TensorSpec) -> TensorSpec:
        return x

    def indexing(self, specs, out):
        letters, _ = same_letters(len(out.shape))
        return Indexing((letters,), letters)

    def forward(self, x):
        return x.view()

    def vjp(self, dy, xs, y, specs, needs):
        return (dy,)

    def flops(self, specs, out):
        return 0

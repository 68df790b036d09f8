"""Tracing: run ``construct`` on abstract tensors and record one node per primitive call.

The tracer in effect is held in a :class:`contextvars.ContextVar` for the duration of one
trace (as JAX keeps its trace stack): primitives called on parameters or constants need
to find the graph being built. It is set and reset by :func:`trace` only; there is no
other mutable module state.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from ..errors import OpArgError, OpTypeError, at_scope
from ..ir.graph import FORWARD, Graph, GraphBuilder
from ..ir.spec import TensorSpec, spec_of
from ..ir.strategy import check_strategy_ranks
from ..ir.tracing import tracing
from ..ops.primitive import Primitive
from .tensor import Tensor, TensorOps, Weight


@dataclass(frozen=True)
class _Frame:
    scope: str
    stage: int | None
    recompute: bool      # the innermost explicit cell mark around it (False: none)
    comm: bool = True    # that cell's mp_comm_recompute: redistributions feeding its ops recomputed too


def _recomputed(prim: Primitive, frame: _Frame) -> bool:
    """A node is recomputed when its op says so (``op.recompute()``), or, the op saying
    nothing (None), when the innermost cell with an explicit mark does: so
    ``op.recompute(False)`` and ``cell.recompute(False)`` keep outputs inside a recomputed
    cell. (A copy made for static call arguments, ``Primitive.with_attrs``, may carry no mode.)"""
    mode = getattr(prim, "recompute_mode", None)
    return frame.recompute if mode is None else mode


class Tracer:
    """Builds one graph. Cells push their scope while their ``construct`` runs."""

    def __init__(self, cell_paths: dict[int, str]):
        self.builder = GraphBuilder()
        self.cell_paths = cell_paths
        self.frames = [_Frame("", None, False)]
        self.param_vids: dict[int, int] = {}   # id(Parameter) -> value id
        self.params: list = []
        self.const_vids: dict[int, tuple[np.ndarray, int]] = {}

    # ---- scopes ---------------------------------------------------------------------
    @contextlib.contextmanager
    def cell_scope(self, cell):
        outer = self.frames[-1]
        path = self.cell_paths.get(id(cell))
        if path is None:  # a cell created inside construct: name it after its class
            path = f"{outer.scope}.{type(cell).__name__}" if outer.scope else type(cell).__name__
        elif not path:    # the root (or a transparent wrapper's child): its class names it
            path = type(cell).__name__
        stage = cell.pipeline_stage if cell.pipeline_stage is not None else outer.stage
        mark = outer.recompute if cell.is_recompute is None else cell.is_recompute
        comm = outer.comm if cell.is_recompute is None else cell.recompute_comm
        self.frames.append(_Frame(path, stage, mark, comm))
        try:
            yield
        except (OpArgError, OpTypeError) as err:
            if err.where:
                raise
            raise at_scope(err, f"{path} ({type(cell).__name__})") from None
        finally:
            self.frames.pop()

    # ---- values ---------------------------------------------------------------------
    def input(self, spec: TensorSpec) -> Tensor:
        return Tensor(self.builder.new_value(spec), spec, self)

    def lift(self, x) -> int:
        """The value id of an op argument: a traced tensor, a parameter or a constant."""
        if isinstance(x, Tensor):
            if x.tracer is not self:
                raise ValueError(f"a Tensor from another trace ({x!r}) was used here; "
                                 "do not keep traced tensors between calls")
            return x.vid
        if isinstance(x, Weight):
            vid = self.param_vids.get(id(x))
            if vid is None:
                vid = self.builder.new_value(TensorSpec(x.shape, x.dtype))
                self.param_vids[id(x)] = vid
                self.params.append(x)
            return vid
        if isinstance(x, np.ndarray):  # one constant per array object (a mask shared by all blocks)
            hit = self.const_vids.get(id(x))
            if hit is None or hit[0] is not x:
                hit = self.const_vids[id(x)] = (x, self.builder.const(x))
            return hit[1]
        if isinstance(x, (bool, int, float, np.number, np.bool_)):
            return self.builder.const(np.asarray(x))
        raise TypeError(f"{self.frames[-1].scope or '<root>'}: op argument: expected a Tensor, "
                        f"Parameter, number or numpy array, got {type(x).__name__}")

    def add(self, prim: Primitive, args: tuple) -> Tensor:
        frame = self.frames[-1]
        vids = tuple(self.lift(a) for a in args)
        specs = tuple(self.builder.values[v].spec for v in vids)
        where = f"{frame.scope or '<root>'} ({prim.kind})"
        try:
            prim.check_n_inputs(specs)
            if prim.strategy is not None:
                check_strategy_ranks(prim.strategy, specs)
            out = prim.infer(*specs)
        except (OpArgError, OpTypeError) as err:
            raise at_scope(err, where) from None
        node = self.builder.add_node(prim, vids, (out,), frame.scope, phase=FORWARD,
                                     stage=frame.stage, recompute=_recomputed(prim, frame),
                                     recompute_comm=frame.comm)
        return Tensor(node.outputs[0], out, self)


# ---- tracing a cell ----------------------------------------------------------------------

@dataclass(frozen=True)
class Traced:
    """A traced call: the graph and how to map Python arguments and results onto it."""

    graph: Graph
    arg_kinds: tuple[str, ...]      # per positional/keyword argument: 'tensor', 'none' or 'static'
    out_tuple: bool                 # construct returned a tuple (else one tensor)


def signature_key(args: tuple, kwargs: dict) -> tuple:
    """Cache key of a call: shapes and dtypes of array arguments, values of the rest."""
    def one(a):
        if isinstance(a, TensorSpec):
            return ("T", a.shape, np.dtype(a.dtype).str)
        if isinstance(a, np.ndarray):
            return ("T", a.shape, a.dtype.str)
        if a is None:
            return ("N",)
        return ("S", repr(a))
    return tuple(one(a) for a in args) + tuple((k,) + one(v) for k, v in sorted(kwargs.items()))


def trace(cell, args: tuple, kwargs: dict | None = None) -> Traced:
    """Trace ``cell.construct`` on the shapes of ``args`` (arrays or TensorSpecs)."""
    kwargs = kwargs or {}
    cell.parameters_dict()  # assigns scope names to parameters before any node names them
    tracer = Tracer({id(c): path for path, c in cell.named_cells()})
    with tracing(tracer):
        input_vids, kinds = [], []

        def to_tensor(a):
            if isinstance(a, (np.ndarray, TensorSpec)):
                spec = a if isinstance(a, TensorSpec) else spec_of(a)
                t = tracer.input(spec)
                input_vids.append(t.vid)
                kinds.append("tensor")
                return t
            if a is None:
                input_vids.append(None)
                kinds.append("none")
                return None
            kinds.append("static")
            return a

        t_args = tuple(to_tensor(a) for a in args)
        t_kwargs = {k: to_tensor(v) for k, v in sorted(kwargs.items())}
        with tracer.cell_scope(cell):
            result = cell.construct(*t_args, **t_kwargs)
        out_tuple = isinstance(result, (tuple, list))
        outs = tuple(result) if out_tuple else (result,)
        for o in outs:
            if not isinstance(o, TensorOps):
                raise TypeError(f"{type(cell).__name__}.construct: expected it to return Tensors, "
                                f"got {type(o).__name__}")
        out_vids = [tracer.lift(o) for o in outs]
    graph = tracer.builder.build(input_vids, [tracer.param_vids[id(p)] for p in tracer.params],
                                 tracer.params, out_vids)
    return Traced(graph, tuple(kinds), out_tuple)

"""Sharding plan: a sharding for every forward op and a home layout for every value.

The same on every rank, with no communication, so any device count is planned in one
process:

* graph inputs: split on the batch dim over the stage (``full_batch=False``) or whole;
  a ``dataset_strategy`` tuple gives each input its own layout (:func:`fed_layout`), set
  on the plan by :func:`with_fed_inputs`;
* parameters: the layout their first consumer's sharding asks for;
* op outputs: their sharding's home layout: the output layout (possibly a partial sum),
  or the layout an ``out_strategy`` asks for, which readers then take (a reduce-scatter
  where the output is split, an all-reduce where it is whole).

Ops with a user strategy (``semi_auto_parallel``; tuples or MindSpore layouts) use it; the
others take their inputs' axes (``autopar.ops.sharding.propagate``); ops with no rule run
replicated. A cell-level ``Cell.shard`` reaches the plan as user strategies of its
boundary ops (``autopar.ops.boundary``): a parameter's first reader is its
``parameter_plan`` boundary, so the parameter is laid out as planned and its readers
inside the cell propagate from it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OpArgError, OpTypeError, at_scope, format_error
from ..ir.graph import FORWARD, Graph
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.spec import TensorSpec
from ..ops.sharding import Indexing, OpSharding, propagate, user_sharding

log = logging.getLogger(__name__)


MODES = ("stand_alone", "data_parallel", "semi_auto_parallel")


@dataclass(frozen=True, eq=False)
class ShardingPlan:
    stage: Mesh
    shardings: dict[int, OpSharding]   # forward node id -> its sharding
    layouts: dict[int, Layout]         # forward value id -> home layout

    def table(self, graph: Graph) -> str:
        """One line per op: scope, strategy, output layout."""
        rows = [f"{graph.nodes[n].name:48s} {str(s):24s} {s.output_layout()}" for n, s in self.shardings.items()]
        return "\n".join(rows)


def replicated_sharding(n_inputs: int, specs, out: TensorSpec, stage: Mesh) -> OpSharding:
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ins = tuple("".join(next(letters) for _ in s.shape) for s in specs)
    outl = "".join(next(letters) for _ in out.shape)
    return OpSharding(Indexing(ins, outl, frozenset("".join(ins)) | frozenset(outl)), stage, ())


def input_layout(spec: TensorSpec, stage: Mesh, full_batch: bool) -> Layout:
    """Data-parallel datasets: each rank feeds its slice of the batch (dim 0)."""
    if full_batch or not spec.shape or spec.shape[0] % stage.size:
        return Layout.replicated(stage, len(spec.shape))
    flat = Mesh((stage.size,), ("data",), stage.ranks)
    return Layout(flat, ((0,),) + ((),) * (len(spec.shape) - 1))


# ---- what each rank is fed: MindSpore's dataset_strategy --------------------------------
DATASET = "dataset_strategy"


def fed_splits(shapes: Sequence[tuple[int, ...]], devices: int, whole: bool,
               strategy: str | tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Per array input (``shapes``: their local shapes, in feeding order), how many ways each
    dim is split among the ``devices`` ranks of a stage: all 1s when every rank is fed the
    whole batch (``whole``: ``full_batch`` or a tuple of all 1s), ``(devices, 1, ...)`` for
    ``"data_parallel"`` (a 0-dim input whole), else the ``dataset_strategy`` tuple, checked:
    one tuple per input, one count per dim (an all-1s tuple too), their product dividing
    ``devices``."""
    if isinstance(strategy, tuple):
        _check_tuple(strategy, shapes)
    if whole:
        return tuple((1,) * len(s) for s in shapes)
    if not isinstance(strategy, tuple):
        return tuple((devices,) + (1,) * (len(s) - 1) if s else () for s in shapes)
    for k, splits in enumerate(strategy):
        if devices % math.prod(splits):
            raise ValueError(format_error(DATASET, f"input {k}", f"split counts whose product divides the {devices} "
                                          "devices of a stage", f"{splits} (product {math.prod(splits)})",
                                          "use splits whose product divides the stage's devices; the rest repeat"))
    return strategy


def _check_tuple(strategy: tuple[tuple[int, ...], ...], shapes: Sequence[tuple[int, ...]]) -> None:
    """One tuple of split counts per array input, one count per dim."""
    if len(strategy) != len(shapes):
        raise ValueError(format_error(DATASET, "number of inputs", f"one tuple per array input ({len(shapes)}: "
                                      f"shapes {[tuple(s) for s in shapes]})", f"{len(strategy)} tuples {strategy}",
                                      "give one tuple of split counts per input the network is fed"))
    for k, (splits, shape) in enumerate(zip(strategy, shapes)):
        if len(splits) != len(shape):
            raise ValueError(format_error(DATASET, f"input {k}", f"{len(shape)} split counts (one per dim of its "
                                          f"shape {tuple(shape)})", str(splits), "give one count per dim"))


def fed_layout(splits: Sequence[int], stage: Mesh) -> Layout:
    """The layout of an input split ``splits`` ways per dim over ``stage``: the stage's ranks
    viewed as the device matrix ``(s0, s1, ..., R)`` row-major, ``R = devices / prod(splits)``
    repeating blocks (unit axes dropped). Worked on 4 ranks::

        (2, 1)   matrix (s0=2, R=2)   ranks 0,1 rows 0:B/2; ranks 2,3 rows B/2:B
        (2, 2)   matrix (s0=2, s1=2)  rank 2*i + j holds rows block i, columns block j
        (4, 1)   matrix (s0=4)        rank r holds rows block r (= "data_parallel")

    Data-parallel blocks outer, so model-parallel ranks (consecutive) share a block; this is
    MindSpore's VirtualDataset with ``repeat_dim_direct="right"`` and MindFormers'
    ``shard_id = rank // mp``."""
    axes = [(d, s) for d, s in enumerate(splits) if s > 1]
    if not axes:
        return Layout.replicated(stage, len(splits))
    repeat = stage.size // math.prod(splits)
    shape = tuple(s for _, s in axes) + ((repeat,) if repeat > 1 else ())
    names = tuple("data" if d == 0 else f"data{d}" for d, _ in axes) + (("repeat",) if repeat > 1 else ())
    dims = [()] * len(splits)
    for axis, (d, _) in enumerate(axes):
        dims[d] = (axis,)
    return Layout(Mesh(shape, names, stage.ranks), tuple(dims))


def global_inputs(args: Sequence, splits: Sequence[tuple[int, ...]]) -> tuple:
    """The global specs of what a rank is fed (its blocks, ``splits[k]`` per array input in
    order: local shape x splits); anything else as it is."""
    it = iter(splits)

    def one(a):
        if not isinstance(a, (np.ndarray, TensorSpec)):
            return a
        shape = tuple(n * k for n, k in zip(a.shape, next(it)))
        return a if shape == tuple(a.shape) else TensorSpec(shape, a.dtype)
    return tuple(one(a) for a in args)


def with_fed_inputs(plan: ShardingPlan, graph: Graph, splits: Sequence[tuple[int, ...]]) -> ShardingPlan:
    """``plan`` with each graph input laid out as it is fed (:func:`fed_layout`): lowering
    places the fed blocks there and every reader redistributes from it. The ops' shardings
    stay as planned (the rules' propagation and the search start from the data-parallel
    feed), so a feed unlike it costs a redistribution where the first reader differs."""
    inputs = [v for v in graph.inputs if v is not None]
    assert len(inputs) == len(splits), (len(inputs), len(splits))
    layouts = {**plan.layouts, **{v: fed_layout(s, plan.stage) for v, s in zip(inputs, splits)}}
    return ShardingPlan(plan.stage, plan.shardings, layouts)


def plan_shardings(graph: Graph, mode: str, stage: Mesh, full_batch: bool = False) -> ShardingPlan:
    """Shardings of the forward nodes and home layouts of the forward values."""
    if mode not in MODES:
        raise ValueError(f"parallel_mode: expected one of {MODES} here, got {mode!r}")
    layouts: dict[int, Layout] = {}
    for v in graph.inputs:
        if v is not None:
            layouts[v] = input_layout(graph.spec(v), stage, full_batch or mode == "stand_alone")
    for v in graph.consts:
        layouts[v] = Layout.replicated(stage, len(graph.spec(v).shape))
    params = set(graph.params)
    shardings: dict[int, OpSharding] = {}
    warned: set[str] = set()
    weight_side: list = []          # ops on weights alone (a Cast to the compute dtype): laid out last
    wanted: dict[int, Layout] = {}  # their outputs -> what the first consumer reads
    for node in graph.nodes:
        if node.phase != FORWARD:
            continue
        specs = [graph.spec(v) for v in node.inputs]
        out = graph.spec(node.outputs[0])
        indexing = node.prim.indexing(specs, out)
        where = f"{node.scope} ({node.prim.kind})"
        if mode != "stand_alone" and _on_weights_alone(node, indexing, params, layouts, wanted, graph):
            weight_side.append((node, indexing))
            wanted.setdefault(node.outputs[0], None)
            continue
        if indexing is None:
            if node.prim.kind not in warned and mode != "stand_alone":
                log.warning("%s has no sharding rule; it runs replicated", node.prim.kind)
                warned.add(node.prim.kind)
            sharding = replicated_sharding(len(specs), specs, out, stage)
        elif mode == "stand_alone":
            sharding = OpSharding(indexing, stage, ())
        elif mode == "semi_auto_parallel" and node.prim.strategy is not None:
            try:
                sharding = user_sharding(indexing, node.prim.strategy, [s.shape for s in specs], out.shape,
                                         stage, node.prim.takes_out_strategy, where)
                sharding.output_layout().check_shape(out.shape, where, "output")
            except (OpArgError, OpTypeError) as err:
                raise at_scope(err, where) from None
        else:
            known = [layouts.get(v) if v not in params or v in layouts else None for v in node.inputs]
            sharding = propagate(indexing, known, [s.shape for s in specs], out.shape, stage)
        _check_parameter_plan(node, sharding, layouts, params, graph)
        _place(node, sharding, params, layouts, wanted, shardings)
    for node, indexing in reversed(weight_side):   # in the layout their consumer reads: no gather
        want = wanted.get(node.outputs[0]) or Layout.replicated(stage, len(graph.spec(node.outputs[0]).shape))
        sharding = OpSharding(indexing, want.mesh, tuple(sorted(
            (ch, axes) for ch, axes in zip(indexing.output, want.dims) if axes)))
        _place(node, sharding, params, layouts, wanted, shardings)
    return ShardingPlan(stage, dict(sorted(shardings.items())), layouts)


def _check_parameter_plan(node, sharding: OpSharding, layouts: dict, params, graph) -> None:
    """A ``parameter_plan`` boundary must be its parameter's first reader: a parameter an
    op outside the cell reads first was laid out there, and the plan would be ignored."""
    if node.prim.kind != "ShardBoundary" or node.prim.attrs["role"] != "parameter":
        return
    v = node.inputs[0]
    if v in params and v in layouts and layouts[v] != sharding.input_layout(0):
        name = graph.param_objs[graph.params.index(v)].name
        first = next(n for n in graph.nodes if v in n.inputs)
        raise ValueError(format_error(f"{node.scope} (shard)", f"parameter_plan[{name!r}]",
                                      "the layout of a parameter the cell reads first",
                                      f"a parameter {first.name} reads before it, laid out {layouts[v]} there",
                                      "shard the cell that reads it first, or that op"))


def _place(node, sharding: OpSharding, params, layouts: dict, wanted: dict, shardings: dict) -> None:
    """Record ``node``'s sharding and output layout; weights it reads first take the layout
    it reads them in, and so do weight-side outputs (casts) still waiting for a consumer."""
    for i, v in enumerate(node.inputs):
        if v in params and v not in layouts:
            layouts[v] = sharding.input_layout(i)
        elif v in wanted and wanted[v] is None:
            wanted[v] = sharding.input_layout(i)
    shardings[node.id] = sharding
    layouts[node.outputs[0]] = sharding.home_layout()


def _on_weights_alone(node, indexing, params, layouts, wanted, graph) -> bool:
    """An op with no strategy, reading only weights not yet laid out (or such ops'
    outputs) and constants, elementwise (its tensor input's letters are its output's):
    it takes the layout its consumer reads, so a weight cast to the compute dtype is split
    like the weight, not replicated and then sliced."""
    if indexing is None or node.prim.strategy is not None or indexing.fixed or indexing.internal:
        return False
    tensors = [(i, v) for i, v in enumerate(node.inputs) if v not in graph.consts]
    if len(tensors) != 1:
        return False
    i, v = tensors[0]
    fresh_param = v in params and v not in layouts
    return (fresh_param or v in wanted) and indexing.inputs[i] == indexing.output

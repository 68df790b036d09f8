"""SPMD lowering: one local program per rank from the traced training graph.

Planning (the same on every rank, no communication) gives every forward op an
:class:`~autopar.strategy.sharding.OpSharding` and every forward value a *home* layout:

* graph inputs: split on the batch dim over the stage (``full_batch=False``) or whole;
* parameters: the layout their first consumer's sharding asks for;
* op outputs: their sharding's output layout (possibly a partial sum).

Lowering, for one rank, rewrites each node to run on local shards (``prim.local``) and
inserts a ``Redistribute`` instruction wherever a value's layout differs from the layout
its consumer needs; a redistribution is planned once per (value, layout) and shared. The
backward pass obeys one invariant: the gradient of a value ends in that value's layout
(partial sums reduced), so the data-parallel all-reduce of a replicated weight's gradient
is simply the redistribution of a gradient partial over the data-parallel axis. The result
is an ordinary :class:`~autopar.runtime.graph.Graph` on local shapes, compiled by
:class:`~autopar.runtime.program.Program` like a serial one.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..comm import redistribution as rd
from ..errors import OpArgError, OpTypeError, at_scope
from ..ops.primitive import Primitive, TensorSpec
from ..strategy.layout import Layout
from ..strategy.mesh import Mesh
from ..strategy.sharding import Indexing, OpSharding, from_strategy, propagate
from .graph import BACKWARD, FORWARD, Graph, GraphBuilder

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


def _replicated_sharding(n_inputs: int, specs, out: TensorSpec, stage: Mesh) -> OpSharding:
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ins = tuple("".join(next(letters) for _ in s.shape) for s in specs)
    outl = "".join(next(letters) for _ in out.shape)
    return OpSharding(Indexing(ins, outl, frozenset(ins) | frozenset(outl)), stage, ())


def input_layout(spec: TensorSpec, stage: Mesh, full_batch: bool) -> Layout:
    """Data-parallel datasets: each rank feeds its slice of the batch (dim 0)."""
    if full_batch or not spec.shape or spec.shape[0] % stage.size:
        return Layout.replicated(stage, len(spec.shape))
    flat = Mesh((stage.size,), ("data",), stage.ranks)
    return Layout(flat, ((0,),) + ((),) * (len(spec.shape) - 1))


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
    for node in graph.nodes:
        if node.phase != FORWARD:
            continue
        specs = [graph.spec(v) for v in node.inputs]
        out = graph.spec(node.outputs[0])
        indexing = node.prim.indexing(specs, out)
        where = f"{node.scope} ({node.prim.kind})"
        if indexing is None:
            if node.prim.kind not in warned and mode != "stand_alone":
                log.warning("%s has no sharding rule; it runs replicated", node.prim.kind)
                warned.add(node.prim.kind)
            sharding = _replicated_sharding(len(specs), specs, out, stage)
        elif mode == "stand_alone":
            sharding = OpSharding(indexing, stage, ())
        elif mode == "semi_auto_parallel" and node.prim.strategy is not None:
            try:
                sharding = from_strategy(indexing, node.prim.strategy.inputs, [s.shape for s in specs], stage,
                                         where)
                sharding.output_layout().check_shape(out.shape, where, "output")
            except (OpArgError, OpTypeError) as err:
                raise at_scope(err, where) from None
        else:
            known = [layouts.get(v) if v not in params or v in layouts else None for v in node.inputs]
            sharding = propagate(indexing, known, [s.shape for s in specs], out.shape, stage)
        for i, v in enumerate(node.inputs):
            if v in params and v not in layouts:
                layouts[v] = sharding.input_layout(i)
        shardings[node.id] = sharding
        layouts[node.outputs[0]] = sharding.output_layout()
    return ShardingPlan(stage, shardings, layouts)


def settled(layout: Layout) -> Layout:
    """The layout a gradient must end in: the value's own, with partial sums reduced."""
    return Layout(layout.mesh, layout.dims) if layout.partial else layout


class Redistribute(Primitive):
    """One planned redistribution on one rank (an inserted instruction, never traced)."""

    save_inputs = "none"

    def __init__(self, redist: rd.Redistribution, rank: int, comms: dict, world, clock: list):
        super().__init__(redist=redist)
        self.rank, self.comms, self.world, self.clock = rank, comms, world, clock

    def infer(self, x):
        r = self.attrs["redist"]
        return TensorSpec(r.dst.local_shape(r.shape), x.dtype)

    def forward(self, x):
        t0 = time.perf_counter()
        y = rd.run(self.attrs["redist"], x, self.rank, self.comms.__getitem__, self.world)
        self.clock[0] += time.perf_counter() - t0   # seconds spent redistributing, for reports
        return y

    def flops(self, specs, out):
        return 0


class ParamShard:
    """A rank's shard of a Parameter, as the runtime and optimizers see it: ``name``,
    local ``shape``, ``dtype`` and ``data`` (generated from the initializer for just this
    region, or cut from data the user set)."""

    def __init__(self, param, layout: Layout, rank: int):
        self.param, self.layout, self.rank = param, layout, rank
        self.name, self.dtype, self.requires_grad = param.name, param.dtype, param.requires_grad
        self.region = layout.slices(rank, param.shape)
        self.spec = TensorSpec(layout.local_shape(param.shape), param.dtype)
        self.shape, self.ndim, self.size = self.spec.shape, self.spec.ndim, self.spec.size
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            p = self.param
            src = p._data[self.region] if p._data is not None else p.init_data(self.region)
            self._data = np.array(src, dtype=p.dtype)
        return self._data

    def gather(self, world) -> np.ndarray:
        """The full logical value on every rank (collective; for users and tests)."""
        return gather(self.data, self.layout, self.param.shape, world)

    def __repr__(self) -> str:
        return f"ParamShard({self.name!r}, {self.layout}, rank {self.rank}, shape {self.shape})"


def gather(local: np.ndarray, layout: Layout, shape: Sequence[int], world) -> np.ndarray:
    """A sharded value made whole on every rank: one rank per block contributes its block
    (partial ranks all contribute), one all-reduce over the world. Not for the hot path."""
    full = np.zeros(tuple(shape), dtype=local.dtype)
    coord = layout.mesh.coord(world.rank)
    if not any(coord[a] for a in layout.replicated_axes()):
        full[layout.slices(world.rank, shape)] = local
    return world.allreduce(full) if world.size > 1 else full


def shard_of(param, layout: Layout, rank: int) -> ParamShard:
    """The rank's shard of ``param`` in ``layout``: the one already in use when layouts
    agree (programs for training and evaluation share the weights the optimizer updates),
    else a new one cut from the current value (gathered first if another layout holds it:
    a collective, reached in the same order on every rank)."""
    attached = param._shard[0] if param._shard is not None else None
    if attached is not None and attached.layout == layout and attached.rank == rank:
        return attached
    if attached is not None:
        param.detach_shard()
    return ParamShard(param, layout, rank)


class _Comms:
    """Sub-communicators of one rank, one per (mesh, axis) group structure, made in
    lowering order -- the same on every rank, so the collective splits match."""

    def __init__(self, world):
        self.world = world
        self._by_key: dict = {}

    def along(self, mesh: Mesh, axes: Sequence[int]):
        """This rank's communicator over the given axes of ``mesh``."""
        key = (mesh.shape, mesh.ranks, tuple(axes))
        if key not in self._by_key:
            self._by_key[key] = self.world.split(mesh.groups(list(axes)))
        return self._by_key[key]

    def for_redist(self, redist: rd.Redistribution) -> dict:
        """Mesh axis -> this rank's communicator along it, for the axes the steps use."""
        mesh, out = redist.src.mesh, {}
        for step in redist.steps:
            if step.axis is None:
                continue
            out[step.axis] = self.along(mesh, (step.axis,))
        return out


def _passable_partial(have: Layout, sh: OpSharding, f, needs, graph: Graph) -> tuple[int, ...]:
    """Partial axes of a gradient that a VJP may take as they are.

    Every VJP is linear in dy, so a dy that is a partial sum over axes the op's sharding
    does not use gives input gradients partial over the same axes: the reduction moves
    later and merges with others (three column-parallel layers reading one input reduce
    its gradient once). Not done when the gradients are bigger than dy (a lookup table's
    gradient), where reducing dy first is cheaper."""
    want = sh.dy_layout()
    same_grid = have.mesh.shape == want.mesh.shape and have.mesh.ranks == want.mesh.ranks
    if not have.partial or not same_grid or have.dims != want.dims:
        return ()
    used = {a for _, axes in sh.axes for a in axes}
    if used & set(have.partial):
        return ()
    dy_size = graph.spec(f.outputs[0]).size
    grads_size = sum(graph.spec(v).size for v, n in zip(f.inputs, needs) if n)
    return have.partial if grads_size <= dy_size else ()


def lower(graph: Graph, outputs: Sequence[int], plan: ShardingPlan, rank: int, world,
          output_layouts: dict[int, Layout] | None = None):
    """The local graph of ``rank``: returns it, its output values, the layout each
    requested output is delivered in (the loss replicated, a parameter's gradient in the
    parameter's layout), and a one-element list accumulating seconds spent redistributing."""
    b = GraphBuilder()
    comms = _Comms(world)
    clock = [0.0]
    local: dict[int, tuple[Layout, int]] = {}           # global value -> (layout, local value)
    moved: dict[tuple[int, Layout], int] = {}           # (global value, layout) -> local value

    def local_spec(v: int, layout: Layout) -> TensorSpec:
        spec = graph.spec(v)
        return TensorSpec(layout.local_shape(spec.shape), spec.dtype)

    def get(v: int, want: Layout, scope: str, phase: str) -> int:
        have, lv = local[v]
        if have == want:
            return lv
        hit = moved.get((v, want))
        if hit is not None:
            return hit
        spec = graph.spec(v)
        redist = rd.plan(have, want, spec.shape, spec.dtype.itemsize)
        if not redist.steps:
            moved[(v, want)] = lv
            return lv
        prim = Redistribute(redist, rank, comms.for_redist(redist), world, clock)
        node = b.add_node(prim, (lv,), (local_spec(v, want),), scope, phase=phase)
        moved[(v, want)] = node.outputs[0]
        return node.outputs[0]

    inputs = []
    for v in graph.inputs:
        if v is None:
            inputs.append(None)
            continue
        lay = plan.layouts[v]
        lv = b.new_value(local_spec(v, lay))
        local[v] = (lay, lv)
        inputs.append(lv)
    params, shards = [], []
    for v, p in zip(graph.params, graph.param_objs):
        lay = plan.layouts.get(v) or Layout.replicated(plan.stage, len(p.shape))
        lv = b.new_value(local_spec(v, lay))
        local[v] = (lay, lv)
        params.append(lv)
        shards.append(shard_of(p, lay, rank))
    for v, array in graph.consts.items():
        lay = plan.layouts.get(v) or Layout.replicated(plan.stage, array.ndim)
        local[v] = (lay, b.const(lay.shard(array, rank) if any(lay.dims) else array))

    fwd_ins: dict[int, list[int]] = {}     # forward node -> local inputs it ran on
    fwd_node: dict[int, int] = {}          # forward node -> local node id
    for node in graph.nodes:
        if node.phase == FORWARD:
            sh = plan.shardings[node.id]
            ins = [get(v, sh.input_layout(i), node.scope, FORWARD) for i, v in enumerate(node.inputs)]
            specs = [graph.spec(v) for v in node.inputs]
            out = graph.spec(node.outputs[0])
            lay = sh.output_layout()
            new = b.add_node(node.prim.local(sh, rank, specs, out, comms.along), tuple(ins),
                             (local_spec(node.outputs[0], lay),), node.scope, phase=FORWARD,
                             stage=node.stage, recompute=node.recompute)
            local[node.outputs[0]] = (lay, new.outputs[0])
            fwd_ins[node.id], fwd_node[node.id] = ins, new.id
        elif node.forward_of is not None:
            f = graph.nodes[node.forward_of]
            sh = plan.shardings[f.id]
            extra = _passable_partial(local[node.inputs[0]][0], sh, f, node.needs, graph)
            want = sh.dy_layout()
            dy = get(node.inputs[0], Layout(want.mesh, want.dims, extra), node.scope, BACKWARD)
            prim = b.nodes[fwd_node[f.id]].prim
            saved = [fwd_ins[f.id][i] for i in prim.saved_input_indices(len(f.inputs))]
            if prim.save_output:
                saved.append(get(f.outputs[0], settled(sh.output_layout()), node.scope, BACKWARD))
            outs, lays = [], []
            for i, (v, need) in enumerate(zip(f.inputs, node.needs)):
                if need:
                    g = sh.grad_layout(i)
                    lays.append(Layout(g.mesh, g.dims, tuple(sorted(g.partial + extra))))
                    outs.append(local_spec(v, lays[-1]))
            new = b.add_node(prim, (dy, *saved), tuple(outs), node.scope, phase=BACKWARD,
                             forward_of=fwd_node[f.id], needs=node.needs, stage=node.stage,
                             recompute=node.recompute)
            for g, lay, lg in zip(node.outputs, lays, new.outputs):
                local[g] = (lay, lg)
        else:  # gradient accumulation (AddN): parts alike stay as they are (partial sums add
            # up before one reduction); otherwise each settles into the value's layout first
            parts = [local[v][0] for v in node.inputs]
            target = parts[0] if all(p == parts[0] for p in parts) else \
                settled(local[graph.grad_of[node.outputs[0]]][0])
            ins = [get(v, target, node.scope, BACKWARD) for v in node.inputs]
            new = b.add_node(node.prim, tuple(ins), (local_spec(node.outputs[0], target),), node.scope,
                             phase=BACKWARD)
            local[node.outputs[0]] = (target, new.outputs[0])

    delivered, out_layouts = [], {}
    for v in outputs:
        want = (output_layouts or {}).get(v)
        if want is None:
            base = graph.grad_of.get(v)
            want = settled(local[base][0]) if base is not None and base in local else \
                Layout.replicated(plan.stage, len(graph.spec(v).shape))
        delivered.append(get(v, want, "<outputs>", BACKWARD))
        out_layouts[v] = want
    local_graph = b.build(inputs, params, shards, delivered)
    return local_graph, tuple(delivered), out_layouts, clock


class ShardedGradProgram:
    """Loss and local gradient shards of ``params`` on one rank of ``world``.

    Inputs are what this rank is fed: its slice of the batch (``full_batch=False``) or the
    whole batch. The loss comes back whole on every rank; gradients come back as this
    rank's shards, aligned with :attr:`shards` (the ParamShards an optimizer updates)."""

    def __init__(self, cell, args: tuple, params: Sequence, mode: str, world, full_batch: bool = False,
                 sens: float = 1.0):
        from .autodiff import differentiate
        from .program import Program
        from .trace import trace
        stage = Mesh((world.size,), ("devices",), tuple(range(world.size)))
        feed_whole = full_batch or mode == "stand_alone"
        global_args = tuple(a if feed_whole or not isinstance(a, np.ndarray) or a.ndim == 0
                            else TensorSpec((a.shape[0] * world.size,) + a.shape[1:], a.dtype) for a in args)
        graph = trace(cell, global_args, {}).graph
        loss = graph.outputs[0]
        by_id = {id(p): v for v, p in zip(graph.params, graph.param_objs)}
        missing = [p.name for p in params if id(p) not in by_id]
        if missing:
            raise ValueError(f"{type(cell).__name__}: parameters {missing} are not used by the loss")
        wrt = [by_id[id(p)] for p in params]
        self.graph, grads = differentiate(graph, loss, wrt, sens)
        self.plan = plan_shardings(graph, mode, stage, feed_whole)
        self.local_graph, _, self.out_layouts, self.comm_clock = lower(
            self.graph, (loss,) + grads, self.plan, world.rank, world)
        self.program = Program(self.local_graph, self.local_graph.outputs)
        order = {id(p): i for i, p in enumerate(self.local_graph.param_objs)}
        pos = {v: i for i, v in enumerate(graph.params)}
        self.shards = [self.local_graph.param_objs[pos[by_id[id(p)]]] for p in params]
        assert all(id(s) in order for s in self.shards)
        self.layouts = [self.out_layouts[g] for g in grads]
        self.world = world
        for s in self.shards:             # the Parameter now reads through its shard
            if s.param._shard is None or s.param._shard[0] is not s:
                s.param.attach_shard(s, world)

    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0):
        """(loss, this rank's gradient shards); the same call as the serial GradProgram."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        outs = self.program.run(arrays, step)
        return outs[0], outs[1:]

    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full gradients on every rank (collective)."""
        return [gather(g, lay, s.param.shape, self.world) for g, lay, s in zip(grads, self.layouts, self.shards)]

    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        """The gradients' global L2 norm, each element counted once across ranks."""
        total = 0.0
        for g, lay in zip(grads, self.layouts):
            copies = math.prod(lay.mesh.shape[a] for a in lay.replicated_axes())
            flat = g.reshape(-1).astype(np.float64, copy=False)
            total += float(np.dot(flat, flat)) / copies
        if self.world.size > 1:
            total = float(self.world.allreduce(np.array(total)))
        return math.sqrt(total)

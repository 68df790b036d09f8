"""SPMD lowering: one local program per rank from the traced training graph.

Planning (``autopar/strategy/plan.py``) gives every forward op an
:class:`~autopar.strategy.sharding.OpSharding` and every forward value a *home* layout.
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

import time
from typing import Sequence

from ..comm import redistribution as rd
from ..ops.primitive import Primitive, TensorSpec
from ..strategy.layout import Layout
from ..strategy.mesh import Mesh
from ..strategy.plan import ShardingPlan
from ..strategy.sharding import OpSharding
from .graph import BACKWARD, FORWARD, Graph, GraphBuilder
from .shards import shard_of


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

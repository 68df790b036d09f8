"""SPMD lowering: one local program per rank from the traced training graph.

Planning (``autopar/strategy/sharding_plan.py``) gives every forward op an
:class:`~autopar.ops.sharding.OpSharding` and every forward value a *home* layout.
Lowering, for one rank, rewrites each node to run on local shards (``prim.local``) and
inserts a ``Redistribute`` instruction wherever a value's layout differs from the layout
its consumer needs; a redistribution is planned once per (value, layout) and shared. The
backward pass obeys one invariant: the gradient of a value ends in that value's layout
(partial sums reduced), so the data-parallel all-reduce of a replicated weight's gradient
is simply the redistribution of a gradient partial over the data-parallel axis. The result
is an ordinary :class:`~autopar.ir.graph.Graph` on local shapes, compiled by
:class:`~autopar.runtime.program.Program` like a serial one.
"""
from __future__ import annotations

import time
from typing import Sequence

from ..comm import redistribution as rd
from ..errors import OpArgError, OpTypeError, format_error
from ..ir.graph import BACKWARD, FORWARD, Graph, GraphBuilder
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.spec import TensorSpec
from ..ops.elementwise import AddN
from ..ops.primitive import Primitive
from ..ops.sharding import OpSharding
from ..ops.slicing import Concat, Slice
from ..strategy.gradient_flow import passable_partial
from ..strategy.sharding_plan import ShardingPlan
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
    gradient), where reducing dy first is cheaper. The rule is
    :func:`~autopar.strategy.gradient_flow.passable_partial`, which the cost model prices with."""
    dy_size = graph.spec(f.outputs[0]).size
    grads_size = sum(graph.spec(v).size for v, n in zip(f.inputs, needs) if n)
    return passable_partial(have, sh, dy_size, grads_size)


def _piece(spec: TensorSpec, dim: int | None, k: int) -> TensorSpec:
    """One copy's share of a local ``spec``: ``dim`` cut k ways (None: the whole)."""
    if dim is None:
        return spec
    shape = tuple(n // k if d == dim else n for d, n in enumerate(spec.shape))
    return TensorSpec(shape, spec.dtype)


def _check_copies(node, prim: Primitive, in_specs, in_dims, out_spec: TensorSpec, out_dim: int, k: int) -> None:
    """An op runs as copies when its local op maps pieces to pieces: it draws no random
    numbers (each copy would draw its own mask, not the serial one's) and it infers each
    copy's output as that piece of its output (a Reshape to a fixed local shape does not)."""
    where, arg = f"{node.scope} ({node.prim.kind})", "in_strategy 'interleaved_parallel'"
    if prim.needs_rng:
        raise ValueError(format_error(where, arg, "an op whose copies compute the op's result",
                                      "an op drawing random numbers (each copy would draw its own)",
                                      "interleave the op before or after it instead"))
    want = _piece(out_spec, out_dim, k)
    try:
        got = prim.infer(*(_piece(spec, d, k) for spec, d in zip(in_specs, in_dims)))
    except (OpArgError, OpTypeError) as err:
        got = f"an error ({err})"
    if got != want:
        raise ValueError(format_error(where, arg, f"an op whose copy on a piece makes a piece {want.shape} of "
                                      f"its local output {out_spec.shape}", f"{got}",
                                      "this op cannot run as copies; interleave another op"))


def lower(graph: Graph, outputs: Sequence[int], plan: ShardingPlan, rank: int, world,
          output_layouts: dict[int, Layout] | None = None, param_layouts: dict[int, Layout] | None = None):
    """The local graph of ``rank``: returns it, its output values, the layout each
    requested output is delivered in (the loss replicated, a parameter's gradient in the
    parameter's layout), and a one-element list accumulating seconds spent redistributing.

    ``param_layouts``: parameters *held* in another layout than the plan's (ZeRO-3's slices):
    each is redistributed into the plan's layout where it is used -- in the forward pass,
    and again for the backward pass that reads it, so the gathered weight is not kept alive
    in between. A parameter whose attached shard is held that way already (training made
    it, ``ParamShard.per_use``) is held so here too."""
    low = Lowering(graph, plan, rank, world, param_layouts or {})
    inputs = low.place_inputs()
    params, shards = low.place_params()
    low.place_consts()
    for node in graph.nodes:
        low.lower_node(node)
    delivered, out_layouts = low.deliver(outputs, output_layouts or {})
    return low.builder.build(inputs, params, shards, delivered), tuple(delivered), out_layouts, low.clock


def _held_per_use(param, stage: Mesh) -> Layout | None:
    """The layout ``param`` is held in when a training program keeps it as ZeRO-3 slices on
    these ranks (gathered per use), else None."""
    attached = param._shard[0] if param._shard is not None else None
    if attached is not None and attached.per_use and attached.layout.mesh.ranks == stage.ranks:
        return attached.layout
    return None


class Lowering:
    """The lowering of one graph for one rank, in the phases :func:`lower` runs in order:
    place the inputs, parameters and constants in their planned layouts; lower each node
    (forward op, its VJP, or a gradient accumulation) on local shards, redistributing what
    it reads; deliver the outputs in the layouts asked for.

    Sub-communicators are made as the phases first need them, so the order of these calls
    is the order of the collective splits and must be the same on every rank."""

    def __init__(self, graph: Graph, plan: ShardingPlan, rank: int, world, param_layouts: dict | None = None):
        self.graph, self.plan, self.rank, self.world = graph, plan, rank, world
        self.param_layouts = dict(param_layouts or {})      # parameter -> the layout it is held in
        self.per_use: set[int] = set()                       # parameters gathered again for the backward
        self.builder = GraphBuilder()
        self.comms = _Comms(world)
        self.clock = [0.0]                                   # seconds spent redistributing
        self.local: dict[int, tuple[Layout, int]] = {}       # global value -> (layout, local value)
        self.moved: dict[tuple[int, Layout], int] = {}       # (global value, layout) -> local value
        self.fwd_ins: dict[int, list[int]] = {}              # forward node -> local inputs it ran on
        self.fwd_node: dict[int, int] = {}                   # forward node -> local node id
        self.fwd_copies: dict[int, list[int]] = {}           # interleaved forward node -> its copies' ids

    def local_spec(self, v: int, layout: Layout) -> TensorSpec:
        """Global value ``v``'s spec as this rank holds it in ``layout``."""
        spec = self.graph.spec(v)
        return TensorSpec(layout.local_shape(spec.shape), spec.dtype)

    def get(self, v: int, want: Layout, scope: str, phase: str, fresh: bool = False) -> int:
        """The local value of ``v`` in layout ``want``: as it is, or redistributed by an
        inserted :class:`Redistribute` planned once per (value, layout) and shared
        (``fresh``: a new one, not shared -- a ZeRO-3 weight gathered again)."""
        have, lv = self.local[v]
        if have == want:
            return lv
        hit = self.moved.get((v, want))
        if hit is not None and not fresh:
            return hit
        spec = self.graph.spec(v)
        redist = rd.plan(have, want, spec.shape, spec.dtype.itemsize)
        if not redist.steps:
            self.moved[(v, want)] = lv
            return lv
        prim = Redistribute(redist, self.rank, self.comms.for_redist(redist), self.world, self.clock)
        node = self.builder.add_node(prim, (lv,), (self.local_spec(v, want),), scope, phase=phase)
        if not fresh:
            self.moved[(v, want)] = node.outputs[0]
        return node.outputs[0]

    # -- phase 1: place what the graph starts from -------------------------------------

    def place_inputs(self) -> list[int | None]:
        """A local input per graph input, in its planned layout (None keeps its place)."""
        inputs = []
        for v in self.graph.inputs:
            if v is None:
                inputs.append(None)
                continue
            lay = self.plan.layouts[v]
            lv = self.builder.new_value(self.local_spec(v, lay))
            self.local[v] = (lay, lv)
            inputs.append(lv)
        return inputs

    def place_params(self) -> tuple[list[int], list]:
        """A local value and this rank's shard per parameter, in its planned layout (one
        the plan does not lay out is held whole)."""
        params, shards = [], []
        for v, p in zip(self.graph.params, self.graph.param_objs):
            lay = self.param_layouts.get(v) or _held_per_use(p, self.plan.stage) or self.plan.layouts.get(v) \
                or Layout.replicated(self.plan.stage, len(p.shape))
            if lay != self.plan.layouts.get(v, lay):
                self.per_use.add(v)
            lv = self.builder.new_value(self.local_spec(v, lay))
            self.local[v] = (lay, lv)
            params.append(lv)
            shard = shard_of(p, lay, self.rank)
            shard.per_use = shard.per_use or v in self.per_use
            shards.append(shard)
        return params, shards

    def place_consts(self) -> None:
        """Each constant as this rank's block of it."""
        for v, array in self.graph.consts.items():
            lay = self.plan.layouts.get(v) or Layout.replicated(self.plan.stage, array.ndim)
            self.local[v] = (lay, self.builder.const(lay.shard(array, self.rank) if any(lay.dims) else array))

    # -- phase 2: lower each node --------------------------------------------------------

    def lower_node(self, node) -> None:
        """One node of the global graph on local shards."""
        if node.phase == FORWARD:
            self.forward(node)
        elif node.forward_of is not None:
            self.backward(node)
        else:
            self.accumulate(node)

    def forward(self, node) -> None:
        """A forward op as its sharding's local op, on its inputs in the layouts it reads
        (an interleaved sharding: as copies, :meth:`forward_copies`)."""
        graph = self.graph
        sh = self.plan.shardings[node.id]
        ins = [self.get(v, sh.input_layout(i), node.scope, FORWARD) for i, v in enumerate(node.inputs)]
        specs = [graph.spec(v) for v in node.inputs]
        out = graph.spec(node.outputs[0])
        lay = sh.output_layout()
        prim = node.prim.local(sh, self.rank, specs, out, self.comms.along)
        out_spec = self.local_spec(node.outputs[0], lay)
        fields = dict(stage=node.stage, recompute=node.recompute, recompute_comm=node.recompute_comm)
        if sh.interleave is None:
            new = self.builder.add_node(prim, tuple(ins), (out_spec,), node.scope, phase=FORWARD, **fields)
            self.fwd_node[node.id], y = new.id, new.outputs[0]
        else:
            self.fwd_copies[node.id], y = self.forward_copies(node, sh, prim, ins, out_spec, fields)
            self.fwd_node[node.id] = self.fwd_copies[node.id][0]
        self.local[node.outputs[0]] = (lay, y)
        self.fwd_ins[node.id] = ins

    def forward_copies(self, node, sh: OpSharding, prim, ins: list[int], out_spec: TensorSpec,
                       fields: dict) -> tuple[list[int], int]:
        """MindSpore's interleaved op on local arrays: every input holding the interleaved
        letter cut into k pieces along it (views), the local op run once per piece, the k
        outputs concatenated along the output's dim of the letter; no communication.
        Returns the copies' node ids and the joined output.

        ``MatMul`` of x (B, H) and W (H, F), interleaved on B, k = 2, dp = 2::

            x local (B/2, H) -> pieces (B/4, H) x 2 -> MatMul(piece, W) x 2 -> Concat -> (B/2, F)
        """
        k = sh.interleave[1]
        in_dims, out_dim = sh.interleaved_dims()
        in_specs = [self.local_spec(v, sh.input_layout(i)) for i, v in enumerate(node.inputs)]
        _check_copies(node, prim, in_specs, in_dims, out_spec, out_dim, k)
        pieces = [self.cut(lv, spec, d, k, node.scope, FORWARD, fields) for lv, spec, d in zip(ins, in_specs, in_dims)]
        part = _piece(out_spec, out_dim, k)
        copies = [self.builder.add_node(prim, tuple(p[c] for p in pieces), (part,), node.scope, phase=FORWARD,
                                        **fields) for c in range(k)]
        y = self.join([n.outputs[0] for n in copies], out_spec, out_dim, node.scope, FORWARD, fields)
        return [n.id for n in copies], y

    def cut(self, lv: int, spec: TensorSpec, dim: int | None, k: int, scope: str, phase: str,
            fields: dict) -> list[int]:
        """``lv`` (local ``spec``) as k equal pieces along ``dim`` (Slice views, no
        communication); ``lv`` itself k times when ``dim`` is None (every copy reads it whole)."""
        if dim is None:
            return [lv] * k
        part = _piece(spec, dim, k)
        n, size = part.shape[dim], part.shape
        begins = [tuple(c * n if d == dim else 0 for d in range(len(size))) for c in range(k)]
        return [self.builder.add_node(Slice(begin=b, size=size), (lv,), (part,), scope, phase=phase,
                                      **fields).outputs[0] for b in begins]

    def join(self, parts: list[int], spec: TensorSpec, dim: int | None, scope: str, phase: str,
             fields: dict) -> int:
        """The copies' results as one value of ``spec``: concatenated along ``dim``, or summed
        when ``dim`` is None (the gradient of an input every copy read whole)."""
        prim = AddN() if dim is None else Concat(axis=dim)
        return self.builder.add_node(prim, tuple(parts), (spec,), scope, phase=phase, **fields).outputs[0]

    def backward(self, node) -> None:
        """A VJP with the local op of its forward node: dy in the layout the sharding asks
        (partial sums it may take as they are kept, :func:`_passable_partial`), gradients
        out in their grad layouts."""
        graph, b = self.graph, self.builder
        f = graph.nodes[node.forward_of]
        sh = self.plan.shardings[f.id]
        extra = _passable_partial(self.local[node.inputs[0]][0], sh, f, node.needs, graph)
        want = sh.dy_layout()
        dy = self.get(node.inputs[0], Layout(want.mesh, want.dims, extra), node.scope, BACKWARD)
        prim = b.nodes[self.fwd_node[f.id]].prim
        saved = [self.fwd_ins[f.id][i] if f.inputs[i] not in self.per_use else
                 self.get(f.inputs[i], sh.input_layout(i), node.scope, BACKWARD, fresh=True)
                 for i in prim.saved_input_indices(len(f.inputs))]
        if prim.save_output:
            saved.append(self.get(f.outputs[0], settled(sh.output_layout()), node.scope, BACKWARD))
        outs, lays = [], []
        for i, (v, need) in enumerate(zip(f.inputs, node.needs)):
            if need:
                g = sh.grad_layout(i)
                lays.append(Layout(g.mesh, g.dims, tuple(sorted(g.partial + extra))))
                outs.append(self.local_spec(v, lays[-1]))
        fields = dict(needs=node.needs, stage=node.stage, recompute=node.recompute)
        if f.id in self.fwd_copies:
            grads = self.backward_copies(node, f, sh, prim, (dy, *saved), outs, fields)
        else:
            grads = b.add_node(prim, (dy, *saved), tuple(outs), node.scope, phase=BACKWARD,
                               forward_of=self.fwd_node[f.id], **fields).outputs
        for g, lay, lg in zip(node.outputs, lays, grads):
            self.local[g] = (lay, lg)

    def backward_copies(self, node, f, sh: OpSharding, prim, reads: tuple[int, ...], outs: list[TensorSpec],
                        fields: dict) -> list[int]:
        """The VJP of an interleaved op as copies too, copy c differentiating forward copy c
        on the same pieces of what the VJP reads (dy, the saved inputs, the output), each
        cut again from the whole local value: an input's gradient pieces concatenated, the
        gradient of an input every copy read whole (a MatMul's weight) summed."""
        k = sh.interleave[1]
        in_dims, out_dim = sh.interleaved_dims()
        saved_idx = prim.saved_input_indices(len(f.inputs))
        dims = [out_dim] + [in_dims[i] for i in saved_idx] + ([out_dim] if prim.save_output else [])
        specs = [self.local_spec(f.outputs[0], sh.dy_layout())] + \
            [self.local_spec(f.inputs[i], sh.input_layout(i)) for i in saved_idx] + \
            ([self.local_spec(f.outputs[0], sh.dy_layout())] if prim.save_output else [])
        plain = {key: fields[key] for key in ("stage", "recompute")}
        pieces = [self.cut(lv, spec, d, k, node.scope, BACKWARD, plain) for lv, spec, d in zip(reads, specs, dims)]
        grad_dims = [in_dims[i] for i, need in enumerate(node.needs) if need]
        parts = tuple(_piece(spec, d, k) for spec, d in zip(outs, grad_dims))
        copies = [self.builder.add_node(prim, tuple(p[c] for p in pieces), parts, node.scope, phase=BACKWARD,
                                        forward_of=fid, **fields) for c, fid in enumerate(self.fwd_copies[f.id])]
        return [self.join([n.outputs[j] for n in copies], spec, d, node.scope, BACKWARD, plain)
                for j, (spec, d) in enumerate(zip(outs, grad_dims))]

    def accumulate(self, node) -> None:
        """Gradient accumulation (AddN): parts alike stay as they are (partial sums add up
        before one reduction); otherwise each settles into the value's layout first."""
        graph = self.graph
        parts = [self.local[v][0] for v in node.inputs]
        target = parts[0] if all(p == parts[0] for p in parts) else \
            settled(self.local[graph.grad_of[node.outputs[0]]][0])
        ins = [self.get(v, target, node.scope, BACKWARD) for v in node.inputs]
        new = self.builder.add_node(node.prim, tuple(ins), (self.local_spec(node.outputs[0], target),),
                                    node.scope, phase=BACKWARD)
        self.local[node.outputs[0]] = (target, new.outputs[0])

    # -- phase 3: deliver the outputs ---------------------------------------------------

    def deliver(self, outputs: Sequence[int], wanted: dict[int, Layout]) -> tuple[list[int], dict[int, Layout]]:
        """Each output in the layout asked for, else a gradient in its value's settled
        layout and anything else replicated: (local values, global value -> layout)."""
        graph = self.graph
        delivered, out_layouts = [], {}
        for v in outputs:
            want = wanted.get(v)
            if want is None:
                base = graph.grad_of.get(v)
                want = settled(self.local[base][0]) if base is not None and base in self.local else \
                    Layout.replicated(self.plan.stage, len(graph.spec(v).shape))
            delivered.append(self.get(v, want, "<outputs>", BACKWARD))
            out_layouts[v] = want
        return delivered, out_layouts

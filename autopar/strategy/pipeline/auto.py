"""The joint plan of an ``auto_parallel`` run: pipeline stages, layer split, micro-batches,
recompute and optimizer parallel, with the op-level search inside every stage.

The runtime hands over the model as forward graphs (one per micro-batch size, traced on
abstract inputs) and what the user fixed; each candidate is planned exactly as the run
would plan it -- the layers annotated with their stages, :func:`~.planner.plan_pipeline`
searching every stage's ops on that stage's ranks -- and priced stage by stage by
:class:`~autopar.strategy.costmodel.CostModel`. Per micro-batch, stage s costs ``T_s``
(its ops' compute and communication, the forward of the layers it recomputes once more,
and the send/receive of its boundary values); a step of m micro-batches on p stages is

    step = replay of the schedule's table  +  max_s (gradient reductions + update)_s

plus the step's own collectives (the gradient-norm all-reduce). The replay
(:meth:`~.schedule.Schedule.makespan`) walks the table the run walks (1F1B or GPipe,
interleaved or not) with each stage's forward and backward seconds (recompute in the
backward; collectives and sends split evenly between the two, each having its conjugate):
``(m + p - 1) * T`` for alike stages, ``m * max T + (sum T - max T)`` when the last stage is
the slowest (PanGu-α's: head and query layer), and neither closed form when the slowest
stage's warm-up hides part of the fill. 1F1B holds min(p - s, m) micro-batches on stage s,
GPipe all m. Interleaved (v chunks a stage, ``virtual_stages``): the layers are split into
p * v virtual stages, each planned on its stage's ranks, a stage's T_s is the sum over its
chunks (a chunk boundary on one rank sends nothing), and stage s holds
:func:`~.stage_search.in_flight` micro-batch chunks of 1/v of its activations. Memory of
stage s = weights + optimizer states + the largest of its phases (:func:`_stage_memory`):
with one micro-batch the cost model's peak over the step
(:meth:`~autopar.strategy.costmodel.PlanCost.memory_bytes`); with several, the end of a
forward (the micro-batches in flight, the gradients of those before), the first backward
(the others in flight, its own walk) and a later backward (beside the step's gradients and
its own), the gradients at their accumulated size -- whole under level-1 optimizer
parallel until the step's reduce-scatter. With recompute: each layer's input kept, plus one
layer's activations while it is rebuilt.
Recompute is off, full (whole layers) or selective (each layer's attention core only,
:func:`attention_cores`, priced by the cost model's own recompute pricing: the cores run
again in backward and their (B, heads, S, S) activations are not kept).
The fastest candidate within the memory cap wins; ties go
to the simpler plan (fewer stages, fewer micro-batches, no recompute, no optimizer
parallel).

The layers to pipeline are found in the graph itself (:func:`find_layer_stack`): a run of
cells named ``<prefix>.0 .. <prefix>.<L-1>`` (a ``CellList``) with the same ops on the
same shapes. Ops outside the stack follow the stage rules of
:mod:`~.assignment` (the embedding on the first stage, the head and loss on the last).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ...ir.graph import FORWARD, Graph, differentiable_values, with_node_changes
from ...ir.mesh import Mesh
from ..backward_memory import recomputed_walk
from ..costmodel import CostModel
from ..formulas import collective_seconds
from ..plan_cost import issued_seconds
from ..plan_source import PlanOptions
from ..profile import MachineProfile
from .assignment import assign_stages
from .planner import PipelinePlan, plan_pipeline
from .schedule import make_schedule
from .stage_search import in_flight

SCHEDULES = ("1f1b", "gpipe")
_INDEXED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LayerStack:
    """``count`` identical layers, scopes ``prefix.0`` .. ``prefix.<count-1>``."""
    prefix: str
    count: int

    def layer_of(self, scope: str) -> int | None:
        """The layer a scope lies in, or None."""
        head = self.prefix + "."
        if not scope.startswith(head):
            return None
        index = scope[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() and int(index) < self.count else None


def _signature(graph: Graph, nodes) -> tuple:
    return tuple((n.prim.kind, tuple(graph.spec(v).shape for v in n.inputs)) for n in nodes)


def find_layer_stack(graph: Graph) -> LayerStack | None:
    """The stack of identical indexed cells in ``graph`` holding the most ops, or None.
    A node in scope ``<prefix>.<k>[.rest]`` belongs to layer k of ``prefix`` (the first
    indexed level of its scope); a stack needs layers 0..L-1, L >= 2, with the same op
    kinds on the same input shapes in every layer."""
    by_layer: dict[tuple[str, int], list] = {}
    for n in graph.nodes:
        m = _INDEXED.match(n.scope) if n.phase == FORWARD else None
        if m:
            by_layer.setdefault((m.group(1), int(m.group(2))), []).append(n)
    best, size = None, 0
    for prefix in sorted({p for p, _ in by_layer}):
        count = 0
        while (prefix, count) in by_layer:
            count += 1
        if count < 2 or len({_signature(graph, by_layer[(prefix, k)]) for k in range(count)}) != 1:
            continue
        total = sum(len(by_layer[(prefix, k)]) for k in range(count))
        if total > size:
            best, size = LayerStack(prefix, count), total
    return best


def annotate(graph: Graph, stack: LayerStack | None, layers_per_stage: Sequence[int], recompute: bool,
             stages: bool = True, selective: bool = False) -> Graph:
    """``graph`` with the stack's layers given their stages (consecutive counts
    ``layers_per_stage``; not with ``stages=False``, keeping the user's) and, with
    ``recompute``, marked recomputed -- with ``selective``, only their attention cores
    (:func:`attention_cores`); other nodes keep theirs."""
    if stack is None or not (stages or recompute or selective):
        return graph
    bounds = np.cumsum(layers_per_stage)
    cores = attention_cores(graph, stack) if selective else set()

    def marks(n) -> dict:
        k = stack.layer_of(n.scope)
        if k is None:
            return {}
        return {"stage": int(np.searchsorted(bounds, k, side="right")) if stages else n.stage,
                "recompute": n.recompute or recompute or n.id in cores}
    return with_node_changes(graph, marks)


def attention_cores(graph: Graph, stack: LayerStack) -> set[int]:
    """Forward nodes of each stack layer's attention core (Megatron's selective recompute,
    whatever the model): around every Softmax, the BatchMatMul making its scores, the one
    reading its probabilities, and every node on a path between the two (scale, mask add,
    softmax, dropout). Their inputs (q, k, v, the mask) stay saved; the (B, heads, S, S)
    tensors between are rebuilt in backward."""
    forward = [n for n in graph.nodes if n.phase == FORWARD]
    readers: dict[int, list] = {}
    for n in forward:
        for v in n.inputs:
            readers.setdefault(v, []).append(n)
    out: set[int] = set()
    for soft in (n for n in forward if n.prim.kind == "Softmax" and stack.layer_of(n.scope) is not None):
        layer = stack.layer_of(soft.scope)
        up = _reach(soft, lambda n: [graph.node_of(v) for v in n.inputs], stack, layer)
        down = _reach(soft, lambda n: [r for o in n.outputs for r in readers.get(o, ())], stack, layer)
        first = [n for n in up if n.prim.kind == "BatchMatMul"]
        last = [n for n in down if n.prim.kind == "BatchMatMul"]
        if first and last:
            out |= {n.id for n in up | down}
    return out


def _reach(start, step, stack: LayerStack, layer: int) -> set:
    """Nodes reached from ``start`` (itself included) along ``step`` inside the layer,
    stopping at (and keeping) each BatchMatMul."""
    seen, todo = {start}, [start]
    while todo:
        n = todo.pop()
        if n is not start and n.prim.kind == "BatchMatMul":
            continue
        for m in step(n):
            if m is not None and m not in seen and m.phase == FORWARD and stack.layer_of(m.scope) == layer:
                seen.add(m)
                todo.append(m)
    return seen


def without_layer_marks(graph: Graph, stack: LayerStack | None) -> Graph:
    """``graph`` with the stack's layers unmarked for recompute: the candidates with
    recompute on price full layer recompute themselves (``layer_forward_s``,
    ``recompute_bytes``), so the layers' own marks, which the cost model would price too,
    must not count twice."""
    if stack is None or not any(n.recompute and stack.layer_of(n.scope) is not None for n in graph.nodes):
        return graph
    nodes = tuple(dataclasses.replace(n, recompute=False) if stack.layer_of(n.scope) is not None else n
                  for n in graph.nodes)
    return dataclasses.replace(graph, nodes=nodes)


def even_split(layers: int, stages: int) -> tuple[int, ...]:
    """The most even split of ``layers`` over ``stages``, later stages taking the extra ones
    (the first stage holds the most micro-batches in flight under 1F1B)."""
    base, extra = divmod(layers, stages)
    return tuple(base + (s >= stages - extra) for s in range(stages))


@dataclass(frozen=True)
class AutoFixed:
    """What the user fixed; None: the joint search chooses. ``max_pp`` bounds the stages
    searched (MindSpore's ``auto_pipeline`` with ``pipeline_stages``)."""
    pp: int | None = None
    max_pp: int | None = None
    micro_batches: int | None = None
    recompute: bool | None = None
    optimizer_parallel: bool | None = None
    schedule: str | None = None
    keep_stages: bool = False          # the user's pipeline_stage annotations place the layers
    virtual_stages: int | None = 1     # chunks per stage (interleaved 1F1B); None: searched over (1, 2)


@dataclass(frozen=True)
class AutoPlan:
    """One joint plan and its prediction (seconds per step, bytes per rank of each stage)."""
    pp: int
    micro_batches: int
    layers_per_stage: tuple[int, ...]
    recompute: bool
    optimizer_parallel: bool
    schedule: str
    step_seconds: float
    compute_s: float           # m x the slowest stage's compute per micro-batch
    comm_s: float              # m x its communication + the step's gradient reductions
    bubble_s: float            # the schedule replay beyond m slowest micro-batches (fill, drain, waits)
    update_s: float
    memory_bytes: tuple[int, ...]
    stage_devices: int = 1
    virtual_stages: int = 1    # chunks per stage; > 1: layers_per_stage counts the p * v virtual stages
    selective: bool = False    # recompute only each layer's attention core (recompute is then False)

    @property
    def peak_memory_bytes(self) -> int:
        return max(self.memory_bytes)

    def describe(self) -> str:
        split = ",".join(map(str, self.layers_per_stage)) or "-"
        schedule = self.schedule + (f" interleaved x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        return (f"pp{self.pp} x {self.stage_devices} devices per stage (ops searched), {self.micro_batches} "
                f"micro-batches, layers {split}, {schedule}, recompute "
                f"{'selective' if self.selective else 'on' if self.recompute else 'off'}, "
                f"optimizer parallel {'on' if self.optimizer_parallel else 'off'}")


@dataclass(frozen=True)
class _StageCost:
    compute_s: float
    comm_s: float
    grad_s: float
    update_s: float
    static_bytes: int          # weights + optimizer states
    grad_bytes: int            # the step's gradients as micro-batches accumulate them (level1: whole)
    activation_bytes: int      # kept for backward, one micro-batch
    one_batch_peak: int        # the cost model's peak of gradients and activations, one micro-batch
    recompute_bytes: int       # kept with the layers recomputed (their inputs, the rest's own)
    backward_bytes: int        # most activations + activation gradients alive in one micro-batch's backward
    recompute_peak: int        # one_batch_peak with the layers recomputed
    recompute_backward: int    # backward_bytes with the layers recomputed
    layer_forward_s: float     # the forward of the stack's layers (what recompute runs again)
    backward_s: float          # of compute_s, the backward kernels
    own_grad_bytes: int        # the gradients as the cost model holds them for one micro-batch (the peaks' own)


def _stage_cost(model: CostModel, plan, stack: LayerStack | None) -> _StageCost:
    graph = model.graph
    compute = comm = grad = update = layer_forward = backward = 0.0
    kept: dict = {}
    per_layer: dict[int, dict] = {}
    inputs: dict[int, dict] = {}
    walk: list[tuple[int, int | None, int]] = []    # per op: gradient bytes, layer, bytes it keeps first
    node_costs = []
    for n, c, edge in model.op_costs(plan):
        node_costs.append(c)
        compute, comm, backward = compute + c.compute_s, comm + c.comm_s + edge, backward + c.backward_s
        grad, update = grad + c.grad_s, update + c.update_s
        k = stack.layer_of(n.scope) if stack is not None else None
        held = model.kept_for_backward(n, plan.shardings[n.id])
        into = kept if k is None else per_layer.setdefault(k, {})
        walk.append((c.grad_bytes, k, sum(b for key, b in held if key not in into)))
        into.update(held)
        if k is not None:
            layer_forward += c.compute_s - c.backward_s
            for v in n.inputs:
                src = graph.node_of(v)
                if v not in model.params and v not in graph.consts and (
                        src is None or (stack.layer_of(src.scope) != k)):
                    lay = model.producer_layout(v, plan.shardings)
                    if lay is not None:
                        inputs.setdefault(k, {})[v] = math.prod(lay.local_shape(graph.spec(v).shape)) * \
                            np.dtype(graph.spec(v).dtype).itemsize
    if model.profile.asynchronous:   # a GPU: the longer of the host's and the device's sums, in proportion
        issued, update = issued_seconds(node_costs, model.profile)
        scale = issued / compute if compute else 1.0
        compute, backward, layer_forward = issued, backward * scale, layer_forward * scale
    cost = model.evaluate(plan)
    if model.fusion_rules:      # comm_fusion: the stage's deferred reductions in buckets, after its micro-batches
        buckets, alone, _ = model.gradient_buckets(plan, deferred=True)
        grad += sum(b.seconds for b in buckets) + sum(r.seconds for r in alone) - \
            sum(g for _, g in model.gradient_costs(plan).values())
    outside = sum(kept.values())
    layers = [sum(d.values()) for d in per_layer.values()]
    whole = outside + sum(layers)
    layer_inputs = {k: sum(d.values()) for k, d in inputs.items()}
    grads_of, layer_of, kept_by = zip(*walk) if walk else ((), (), ())
    rc_peak, rc_bare = recomputed_walk(grads_of, layer_of, kept_by, layer_inputs,
                                       model.gradients_in_flight(plan.shardings))
    # optimizer parallel at level1 reduce-scatters the step's gradient after the last micro-batch:
    # until then it accumulates whole (tracemalloc, H256 pp2 dp2 m2: the slice under-predicted by 13 MiB)
    shard = model.optimizer_shard
    accumulated = cost.grad_bytes if shard.shards_accumulation else cost.param_bytes
    return _StageCost(compute, comm, grad, update, cost.param_bytes + cost.state_bytes, accumulated, whole,
                      cost.memory_bytes - cost.param_bytes - cost.state_bytes,
                      outside + sum(layer_inputs.values()), cost.backward_working_bytes, rc_peak, rc_bare,
                      layer_forward, backward, cost.grad_bytes)


def _p2p_seconds(plan: PipelinePlan, s: int, n: int, profile: MachineProfile, pp: int | None = None) -> float:
    """Per micro-batch: (virtual) stage s's sends and receives of boundary values (and their
    gradients) in their transfer layouts and dtypes; inter-node when rank i of the two
    stages sit on different nodes; nothing between two chunks of one stage (``pp``: the
    stages of ranks, virtual stage c on c % pp)."""
    sg, per, pp = plan.stages[s], profile.devices_per_node, pp or len(plan.stages)
    total = 0.0
    for c in sg.received + sg.sent:
        other = c.src if c in sg.received else c.dsts[0]
        if other % pp == s % pp:
            continue                                # a hand-over between chunks of one rank
        lay, spec = plan.transfer[c.value], sg.graph.spec(sg.value(c))
        nbytes = math.prod(lay.local_shape(spec.shape)) * np.dtype(spec.dtype).itemsize
        inter = ((s % pp) * n) // per != ((other % pp) * n) // per
        lat = profile.inter_node_latency_s if inter else profile.intra_node_latency_s
        bw = profile.inter_node_bandwidth_bytes_per_s if inter else profile.intra_node_bandwidth_bytes_per_s
        total += (1 + c.needs_grad) * (lat + nbytes / bw)
    return total


def _shared_seconds(plan: PipelinePlan, graph: Graph, s: int, n: int, profile: MachineProfile,
                    pp: int | None = None) -> float:
    """Once per step: the all-reduce adding a parameter's gradients over the stages holding it
    (a tied embedding on the first and last stage; chunks of one stage hold one copy)."""
    total, pp = 0.0, pp or len(plan.stages)
    for v, virtual_owners in plan.param_stages.items():
        owners = sorted({o % pp for o in virtual_owners})
        if len(owners) > 1 and s in owners:
            lay = plan.param_home[v]
            nbytes = math.prod(lay.local_shape(graph.spec(v).shape)) * np.dtype(graph.spec(v).dtype).itemsize
            per = profile.devices_per_node
            inter = len({(o * n) // per for o in owners}) > 1
            total += collective_seconds("all_reduce", nbytes, len(owners), profile, inter)
    return total


def price(graph: Graph, stack: LayerStack | None, devices: int, pp: int, micro_batches: int,
          layers_per_stage: Sequence[int], optimizer_parallel: bool, recomputes: Sequence[bool],
          schedule: str, options: PlanOptions = PlanOptions(), full_batch: bool = False,
          keep_stages: bool = False, virtual: int = 1, selective: bool = False) -> list[AutoPlan]:
    """The plans of one (stages, micro-batches, split, optimizer parallel), one per recompute
    setting in ``recomputes``; ``graph`` is the forward graph on one micro-batch. Planned as
    the run plans it (every stage's ops searched under ``options``, whose machine profile
    prices everything); [] when its shapes do not divide. ``virtual`` > 1: interleaved,
    ``layers_per_stage`` counts the ``pp * virtual`` virtual stages. Recompute marks in
    ``graph`` (``Cell.recompute()``, selective ``Primitive.recompute()``) are priced by the
    cost model (their forward again, their activations dropped); with recompute in
    ``recomputes`` the stack's layers are priced fully recomputed instead, their marks
    cleared (for every candidate of the call). ``selective``: the stack's attention cores
    marked (:func:`attention_cores`), priced by the cost model like the graph's own marks."""
    n, profile = devices // pp, options.profile()
    chunks = pp * virtual
    g = annotate(graph, stack, layers_per_stage, False, stages=not keep_stages, selective=selective)
    if any(recomputes):         # the graph's own marks are priced by the cost model, full recompute here
        g = without_layer_marks(g, stack)
    assign = assign_stages(g, chunks, differentiable_values(g, g.params), virtual)
    opts = dataclasses.replace(options, optimizer_parallel=optimizer_parallel, memory_cap=math.inf)
    try:
        plan = plan_pipeline(g, assign, n, "auto_parallel", full_batch, opts, ranks_stages=pp)
    except ValueError:
        return []                                   # no strategy divides these shapes
    costs = [_stage_cost(CostModel(sg.graph, pl.stage, profile, full_batch, optimizer_parallel=optimizer_parallel,
                                   comm_fusion=options.comm_fusion, optimizer_shard=options.optimizer_shard), pl, stack)
             for sg, pl in zip(plan.stages, plan.plans)]
    p2p = [_p2p_seconds(plan, c, n, profile, pp) for c in range(chunks)]
    shared = [_shared_seconds(plan, graph, s, n, profile, pp) for s in range(pp)]
    world = Mesh((devices,), ("devices",), tuple(range(devices)))
    once = CostModel(graph, world, profile, full_batch).step_collectives_seconds(world)    # the norm all-reduce
    out = []
    m = micro_batches
    mine = [range(s, chunks, pp) for s in range(pp)]            # the virtual stages of stage s
    for recompute in recomputes:
        times = [(sum(costs[c].compute_s + (costs[c].layer_forward_s if recompute else 0.0)
                      for c in mine[s]), sum(costs[c].comm_s + p2p[c] for c in mine[s])) for s in range(pp)]
        slow = max(range(pp), key=lambda s: sum(times[s]))
        grads = max(sum(costs[c].grad_s for c in mine[s]) + shared[s] for s in range(pp))
        update = max(sum(costs[c].update_s for c in mine[s]) for s in range(pp))
        memory = tuple(_rank_memory([costs[c] for c in mine[s]], in_flight(pp, s, m, schedule, virtual), m, recompute)
                       for s in range(pp))
        # the schedule the run walks, replayed with each stage's forward and backward (recompute
        # runs in the backward; collectives and sends split evenly: each has its conjugate)
        backward = [sum(costs[c].backward_s + (costs[c].layer_forward_s if recompute else 0.0) for c in mine[s])
                    for s in range(pp)]
        forward = [times[s][0] - backward[s] + times[s][1] / 2 for s in range(pp)]
        loop = make_schedule(schedule, pp, m, virtual).makespan(forward, [b + t[1] / 2 for b, t in zip(backward, times)])
        bubble = loop - m * sum(times[slow])
        out.append(AutoPlan(pp, m, tuple(layers_per_stage) if stack else (), recompute, optimizer_parallel, schedule,
                            loop + grads + update + once, m * times[slow][0],
                            m * times[slow][1] + grads + once, bubble, update, memory, n, virtual,
                            selective and not recompute))
    return out


def _rank_memory(chunks: list[_StageCost], kept: int, m: int, recompute: bool) -> int:
    """Peak bytes of a stage running ``chunks`` (one without virtual stages) with ``kept``
    micro-batch chunks in flight: :func:`_stage_memory` of the chunks as one stage whose
    micro-batch is a chunk's (its activations the chunks' mean, its first backward the
    largest chunk's own, no other chunk's gradients made yet) over ``m`` x chunks passes,
    whose weights, states and accumulated gradients are all the chunks'."""
    if len(chunks) == 1:
        return _stage_memory(chunks[0], kept, m, recompute)
    grads, mean = sum(c.grad_bytes for c in chunks), len(chunks)
    one = dataclasses.replace(
        chunks[0], static_bytes=sum(c.static_bytes for c in chunks), grad_bytes=grads, own_grad_bytes=grads,
        activation_bytes=sum(c.activation_bytes for c in chunks) // mean,
        recompute_bytes=sum(c.recompute_bytes for c in chunks) // mean,
        one_batch_peak=max(c.one_batch_peak + c.grad_bytes - c.own_grad_bytes for c in chunks),
        recompute_peak=max(c.recompute_peak + c.grad_bytes - c.own_grad_bytes for c in chunks),
        backward_bytes=max(c.backward_bytes for c in chunks),
        recompute_backward=max(c.recompute_backward for c in chunks))
    return _stage_memory(one, kept, m * mean, recompute)


def _stage_memory(c: _StageCost, kept: int, m: int, recompute: bool) -> int:
    """Peak bytes of a stage holding ``kept`` of its ``m`` micro-batches at once (module
    docstring): the largest of the end of a forward (``kept`` micro-batches' activations,
    the gradients of those before them if any) and a backward: ``kept - 1`` micro-batches
    kept while one walks back making its gradients beside those accumulated so far (the
    runtime adds each micro-batch's gradients into the step's after its backward: both
    exist at its end). Its gradients have the accumulated size when micro-batches
    accumulate (level-1 optimizer parallel: whole until the step's reduce-scatter), the
    cost model's own (a slice) with one. For a later micro-batch the bound "its activation
    peak with both sets of gradients alive" is what the runtime measures (tracemalloc,
    PanGu-α tiny pp2 m2: 4.97 / 6.04 MiB per stage against 4.98 / 5.91 predicted; the
    walk's own peak gave 15% less)."""
    acts = c.recompute_bytes if recompute else c.activation_bytes
    peak, bare = (c.recompute_peak, c.recompute_backward) if recompute else (c.one_batch_peak, c.backward_bytes)
    if m == 1:
        return c.static_bytes + max(acts, peak)
    first = (kept - 1) * acts + peak + c.grad_bytes - c.own_grad_bytes    # the first backward: none before it
    later = 2 * c.grad_bytes + (kept - 1) * acts + bare      # bound: measured (pp2 m2, tiny: within 2%)
    forward = kept * acts + (c.grad_bytes if m > kept else 0)
    return c.static_bytes + max(first, later, forward)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_auto(graph_at: Callable[[int], Graph], batch: int, devices: int, options: PlanOptions = PlanOptions(),
                fixed: AutoFixed = AutoFixed(), full_batch: bool = False,
                memory_cap: float | None = None) -> tuple[AutoPlan | None, list[AutoPlan]]:
    """The fastest joint plan within ``memory_cap`` (default: the memory of ``options``'
    machine profile) and every plan priced. ``graph_at(rows)`` is the forward graph on a
    micro-batch of ``rows`` sequences (the global batch ``batch`` divided by the micro-batch
    count)."""
    profile = options.profile()
    graphs: dict[int, Graph] = {}

    def at(rows: int) -> Graph:
        if rows not in graphs:
            graphs[rows] = graph_at(rows)
        return graphs[rows]

    stack = find_layer_stack(at(batch))
    most = stack.count if stack else 1
    pps = [fixed.pp] if fixed.pp else [d for d in _divisors(devices) if d <= most and d <= (fixed.max_pp or devices)]
    recomputes = [fixed.recompute] if fixed.recompute is not None else [False, True]
    # selective recompute (attention cores) is a third choice when the user marked nothing
    selectives = [False, True] if fixed.recompute is None and stack is not None and \
        attention_cores(at(batch), stack) else [False]
    zeros = [fixed.optimizer_parallel] if fixed.optimizer_parallel is not None else [False, True]
    schedule = fixed.schedule or "1f1b"
    vs = [fixed.virtual_stages] if fixed.virtual_stages is not None else [1, 2]
    tried: list[AutoPlan] = []
    for pp in pps:
        fed = batch if full_batch else batch // (devices // pp)     # rows each rank is fed, cut into micro-batches
        ms = [fixed.micro_batches] if fixed.micro_batches else [m for m in _divisors(fed) if m >= pp]
        for v in vs if pp > 1 else [1]:
            if v > 1 and (stack is None or stack.count < pp * v) and not fixed.keep_stages:
                continue                                # a layer per chunk at least
            split = even_split(stack.count, pp * v) if stack else ()
            for m in ms:
                if v > 1 and m % pp:
                    continue                            # interleaving needs m % p == 0 (Megatron's rule)
                for zero in zeros:
                    tried += price(at(batch // m), stack, devices, pp, m, split, zero, recomputes, schedule, options,
                                   full_batch, fixed.keep_stages, v)
                    if True in selectives:
                        tried += price(at(batch // m), stack, devices, pp, m, split, zero, [False], schedule,
                                       options, full_batch, fixed.keep_stages, v, selective=True)
    cap = float(profile.memory_bytes if memory_cap is None else memory_cap)
    fitting = [p for p in tried if p.peak_memory_bytes <= cap]
    best = min(fitting, key=lambda p: (p.step_seconds, p.pp, p.micro_batches, p.recompute, p.selective,
                                       p.optimizer_parallel), default=None)
    return best, tried


def plan_table(best: AutoPlan | None, tried: Sequence[AutoPlan], rows: int = 8) -> str:
    """The chosen plan and the fastest others, one line each: step, memory, the plan."""
    lines = [f"{'':2}{'step s':>10} {'peak MiB':>9}  plan"]
    for p in sorted(tried, key=lambda p: p.step_seconds)[:rows]:
        mark = "->" if p is best else ""
        lines.append(f"{mark:2}{p.step_seconds:10.4g} {p.peak_memory_bytes / 2**20:9.1f}  {p.describe()}")
    if best is not None and best not in sorted(tried, key=lambda p: p.step_seconds)[:rows]:
        lines.append(f"->{best.step_seconds:10.4g} {best.peak_memory_bytes / 2**20:9.1f}  {best.describe()}")
    return "\n".join(lines)


__all__ = ["AutoFixed", "AutoPlan", "LayerStack", "SCHEDULES", "annotate", "even_split", "find_layer_stack",
           "plan_table", "price", "search_auto"]

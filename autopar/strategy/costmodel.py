"""The cost model: seconds and bytes of a plan, as pure functions of (graph, plan, profile).

A training step of one stage is charged, per rank (every rank of a stage runs the same
local program on same-sized shards, so rank 0 speaks for all):

* **op**: forward + backward compute of its local shards,
  ``flops / gemm_rate + bytes / elementwise_bandwidth + op_overhead`` (formulas in
  :mod:`autopar.strategy.formulas`) -- on a GPU, whose host only queues kernels, the longer
  of that work and the host's issue of the op (``MachineProfile.op_seconds``) -- plus the collectives its kernel runs itself (the
  vocabulary-parallel cross-entropy);
* **edge** (a value from its producer to a consumer): the redistribution of the producer's
  output layout into the layout the consumer reads, once per (value, layout) however many
  consumers read it so (the column-parallel Q, K and V of a sequence-split LayerNorm
  output: one all-gather);
* **gradient of a value**: one part per op reading it that needs it. As the runtime does
  (:mod:`~autopar.strategy.gradient_flow`), alike parts are added first, unlike parts each
  reduced, then added; a partial sum its producer's VJP may take passes on to that op's
  inputs (Q, K and V's partial input gradients cross ``Dense``'s reshape and meet at the
  LayerNorm output: one all-reduce, or under sequence parallel one reduce-scatter); the
  sum (``AddN``) reads k parts and writes one, at the ``AddN`` rate;
* **parameter**: the reduction of its gradient into its layout (the data-parallel
  all-reduce; with optimizer parallel a reduce-scatter and, after the update, an all-gather
  paying latency but no wait: the same bytes in two calls; level3 one all-gather more), the
  update and the clipping copies (11 passes over its local bytes, the slice with optimizer
  parallel), and its bytes: weight + gradient + states, split as the level says; level3's
  all-gathers, started a layer ahead of use (``prefetch_layers``), hide behind the compute
  before them as far as the profile's ``comm_overlap`` says, all but the first weight's
  (:func:`prefetched_exposed_seconds`; ``PlanCost.gather_comm_s`` / ``gather_exposed_s``);
* **step**: the all-reduce of the squared gradient norm, once;
* **gradient buckets** (``comm_fusion``, :mod:`~autopar.strategy.grad_buckets`): with a rule
  for the gradients' all-reduces (reduce-scatters under optimizer parallel) the weights'
  reductions are grouped as the runtime groups them, one collective and one copy per
  bucket, run beside the backward pass; the step pays their exposed part
  (``PlanCost.grad_exposed_s``), memory one bucket more at the end of backward;
* every collective call pays the profile's latency, so calls count, not only bytes;
* **activations**: the bytes each op keeps for its backward (its saved inputs and output),
  all alive at the end of forward;
* **recompute** follows the graph's marks (``Cell.recompute()``, ``Primitive.recompute()``;
  regions by :mod:`~autopar.strategy.recompute_regions`, the runtime pass's rule): a value a
  region makes and only backward reads is not kept; the ops that rebuild such values run
  their forward (and the redistributions into them) again, and keep what they read from
  outside the region instead; while a region's backward runs, its rebuilt values are alive;
* **memory peak**: the larger of the step's two phases, not their sum. Weights and
  optimizer states live all step; at the end of forward every activation is kept and no
  gradient exists yet; in backward, walking the ops in reverse, each op's backward makes
  its weights' gradients while the activations of the ops before it are still kept::

      peak = weights + states + max(activations, max_j (gradients of ops >= j + activations of ops <= j
                                                        + rebuilt values of op j's recompute region
                                                        + activation gradients in flight at j))

  (:mod:`~autopar.strategy.backward_memory`);

The search sees the same figures as a pairwise problem: one cost per (op, candidate)
and one per (edge, producer candidate, consumer candidate), each gradient part reduced on
its own edge, so the sum the search minimises is :meth:`CostModel.evaluate`'s prediction
less the plan-independent norm all-reduce, plus the reductions saved where alike
gradient parts merge (equal where none do). :meth:`CostModel.evaluate` prices any plan,
searched or hand-given, as the runtime runs it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np

from ..comm import redistribution as rd
from ..comm.fusion import DEFAULT_COMM_FUSION, CommFusion
from ..ir.graph import FORWARD, Graph, Node, differentiable_values, gradient_inputs
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.spec import TensorSpec
from ..ops.sharding import OpSharding
from . import formulas, gradient_flow
from .backward_memory import backward_peak, gradients_in_flight
from .canonical import canonical
from .grad_buckets import GradBucket, GradReduction, bucket, bucketable, exposed_seconds, trained_order
from .optimizer_shard import DEFAULT_OPTIMIZER_SHARD, OptimizerShard, slice_layout
from .plan_cost import NodeCost, PlanCost, issued_seconds  # noqa: F401 - the cost model's values
from .profile import MachineProfile
from .recompute_regions import internal_values, rebuild_set, recompute_regions, resolve_marks, whole_cells
from .sharding_plan import ShardingPlan, input_layout

# collective kind in formulas.py for each redistribution step kind
_STEP_KIND = {rd.ALLGATHER: "all_gather", rd.REDUCE_SCATTER: "reduce_scatter",
              rd.ALLREDUCE: "all_reduce", rd.ALLTOALL: "all_to_all"}
ADAM_BYTES_PER_ELEMENT = 8   # an Adam-style update reads w, g, m, v and writes w, m, v: ~7-8 passes
CLIP_BYTES_PER_ELEMENT = 3   # global-norm clipping reads every gradient for the norm, then reads and writes it scaled
# passes over a weight's local bytes per step: the update and the clipping copies (what
# autopar.models.op_rates times together as OPTIMIZER_KIND and divides by this)
OPTIMIZER_BYTES_PER_ELEMENT = ADAM_BYTES_PER_ELEMENT + CLIP_BYTES_PER_ELEMENT
OPTIMIZER_KIND = "optimizer_update"   # the profile's rate for it (clipping included), if calibrated
GRAD_SUM_KIND = "AddN"                # autodiff's sum of a value's gradient parts: elementwise


def prefetched_exposed_seconds(gathers: Sequence[float], compute_s: float, overlap: float) -> float:
    """The seconds of ZeRO-3's weight all-gathers (``gathers``, per op in forward order)
    left exposed when each starts ahead of its use (autopar/runtime/prefetch.py): the first
    weight's cannot hide (nothing runs before it), the rest hide behind at most the step's
    ``compute_s``, as far as the machine overlaps (``overlap``, the profile's
    ``comm_overlap``, as for gradient buckets)::

        exposed = total - overlap x min(total - first, compute)

    so it is never below the first gather's seconds, nor above the total (prefetch off)."""
    total = sum(gathers)
    first = next((g for g in gathers if g > 0.0), 0.0)
    return total - overlap * min(total - first, compute_s)


def _local(spec: TensorSpec, layout: Layout) -> TensorSpec:
    return TensorSpec(layout.local_shape(spec.shape), spec.dtype)


class CostModel:
    """Costs of the forward ops of ``graph`` on ``stage`` under ``profile``.

    ``optimizer_states``: optimizer arrays per parameter element (2 for Adam's moments, 1
    for momentum SGD); ``optimizer_parallel``: states are split over the ranks a weight is
    replicated on (ZeRO-1), whose gradient is then reduce-scattered and the weight
    all-gathered: the same bytes on a ring as the all-reduce, so only memory changes.
    ``optimizer_shard`` (``parallel_optimizer_config``): its shard size splits over groups
    of that many copies; at ``level3`` the weight is held as its slice too and gathered
    where used, forward and again in backward (one all-gather more than the all-reduce).
    ``comm_fusion``: the context's setting; its gradient rules bucket the weights' reductions
    (module docstring), none (the default) prices each alone. ``param_order``: the names of
    the trained parameters in the order the optimizer lists them (what an ``index`` rule
    counts in and the runtime orders gradients by); default the graph's order of first use."""

    def __init__(self, graph: Graph, stage: Mesh, profile: MachineProfile, full_batch: bool = False,
                 optimizer_states: int = 2, optimizer_parallel: bool = False,
                 comm_fusion: CommFusion = DEFAULT_COMM_FUSION, param_order: Sequence[str] | None = None,
                 optimizer_shard: OptimizerShard = DEFAULT_OPTIMIZER_SHARD):
        self.graph, self.stage, self.profile = graph, stage, profile
        self.fusion_rules = comm_fusion.gradient_rules()   # redistribution step kind -> rule
        names = graph.param_names()
        self.param_order = trained_order(names, names if param_order is None else param_order)
        self.optimizer_states, self.optimizer_parallel = optimizer_states, optimizer_parallel
        self.optimizer_shard = optimizer_shard
        self.weights_sliced = bool(optimizer_parallel) and optimizer_shard.shards_weights   # ZeRO-3
        self.forward = [n for n in graph.nodes if n.phase == FORWARD]
        self.nodes = {n.id: n for n in self.forward}
        self.params = set(graph.params)
        self.input_layouts = {v: input_layout(graph.spec(v), stage, full_batch) for v in graph.inputs
                              if v is not None}
        self.needs_grad = differentiable_values(graph, graph.params)   # autodiff's rule: gradients flow here
        self.weight_values = self._weight_values()
        self.home: dict[int, tuple[int, int]] = {}       # parameter -> (first consumer node, input index)
        self.consumers: dict[int, list[tuple[int, int]]] = {}
        for n in self.forward:
            for i, v in enumerate(n.inputs):
                self.consumers.setdefault(v, []).append((n.id, i))
                if v in self.params:
                    self.home.setdefault(v, (n.id, i))
        self.grad_readers = {v: sum(gradient_inputs(self.nodes[n], self.needs_grad)[i] for n, i in readers)
                             for v, readers in self.consumers.items()}   # value -> readers needing its gradient
        self.region, self.dropped, self.rerun = self._recompute_marks()
        self._inter: dict = {}
        self._redist = lru_cache(maxsize=None)(self._redist_seconds)

    def _recompute_marks(self) -> tuple[dict[int, int], dict[int, int], frozenset[int]]:
        """(forward node -> recompute region, value not kept -> its region, nodes whose
        forward runs again) for the graph's recompute marks (module doc)."""
        forward = self.forward
        if not any(n.recompute for n in forward):
            return {}, {}, frozenset()
        marks = resolve_marks(forward)
        region = recompute_regions(forward, marks)
        internal = internal_values(forward, region, self.graph.outputs, whole_cells(forward, marks, region))
        read: dict[int, set[int]] = {}              # region -> its internal values backward reads
        for n in forward:
            if not any(gradient_inputs(n, self.needs_grad)):
                continue
            saved = [n.inputs[i] for i in n.prim.saved_input_indices(len(n.inputs))]
            for v in saved + ([n.outputs[0]] if n.prim.save_output else []):
                if v in internal:
                    read.setdefault(internal[v], set()).add(v)
        rerun = {k for values in read.values() for k in rebuild_set(self.graph, internal, values)}
        return region, internal, frozenset(rerun)

    # ---- collectives ----------------------------------------------------------------------
    def _crosses_nodes(self, mesh: Mesh, axis: int | None) -> bool:
        key = (mesh.shape, mesh.ranks, axis)
        if key not in self._inter:
            per = self.profile.devices_per_node
            group = mesh.ranks if axis is None else mesh.group(mesh.ranks[0], [axis])
            self._inter[key] = len({r // per for r in group}) > 1
        return self._inter[key]

    def collective_seconds(self, kind: str, nbytes: float, mesh: Mesh, axes, waits: bool = True) -> float:
        """One collective over the group along ``axes`` of ``mesh``; ``nbytes`` and ``waits``
        as in formulas.py."""
        n = math.prod(mesh.shape[a] for a in axes)
        if n == 1:
            return 0.0
        inter = any(self._crosses_nodes(mesh, a) for a in axes)
        return formulas.collective_seconds(kind, nbytes, n, self.profile, inter, waits)

    def _redist_seconds(self, src: Layout, dst: Layout, shape: tuple, itemsize: int) -> float:
        plan = rd.plan(src, dst, shape, itemsize, checked=True)
        mesh, total = plan.src.mesh, 0.0
        for step in plan.steps:
            if step.kind == rd.SLICE:
                continue
            if step.kind == rd.GENERAL:   # add into a zero tensor, all-reduce it over the mesh
                total += self.collective_seconds("all_reduce", step.bytes, mesh, range(mesh.ndim))
                continue
            n = mesh.shape[step.axis]
            nbytes = step.bytes * n if step.kind == rd.ALLGATHER else step.bytes   # gathered buffer
            total += self.collective_seconds(_STEP_KIND[step.kind], nbytes, mesh, (step.axis,))
        return total

    def redistribution_seconds(self, src: Layout, dst: Layout, value: int) -> float:
        if src == dst:
            return 0.0
        spec = self.graph.spec(value)
        return self._redist(canonical(src), canonical(dst), spec.shape, np.dtype(spec.dtype).itemsize)

    # ---- ops and edges --------------------------------------------------------------------
    def node_cost(self, node: Node, sh: OpSharding, reductions: bool = True) -> NodeCost:
        """``reductions=False`` leaves out the gradient reduction of the weights it owns
        (:meth:`op_costs` prices every gradient of a value together, as the runtime sums
        its parts)."""
        g, prof = self.graph, self.profile
        specs = [_local(g.spec(v), sh.input_layout(i)) for i, v in enumerate(node.inputs)]
        out_lay = sh.output_layout()
        out = _local(g.spec(node.outputs[0]), out_lay)
        needs = gradient_inputs(node, self.needs_grad)
        prim, dtype = node.prim, np.dtype(out.dtype).name
        flops = fwd_flops = prim.flops(specs, out)
        nbytes = fwd_bytes = prim.bytes_accessed(specs, out)
        backward = any(needs)
        if backward:
            flops += prim.vjp_flops(specs, out, needs)
            nbytes += nbytes + (0 if prim.view == "alias" else out.nbytes)   # backward reads what forward did, plus dy
        launches = 2 if backward else 1
        if node.id in self.rerun:       # recomputed: its forward runs again before backward
            flops, nbytes, launches = flops + fwd_flops, nbytes + fwd_bytes, launches + 1
        if dtype not in prof.gemm_flops:   # a dtype the profile lists no rate for: its slowest rate
            dtype = min(prof.gemm_flops, key=prof.gemm_flops.get)
        min_dim, kind = sh.gemm_min_dim(specs), prim.kind
        work = prof.device_seconds(kind, nbytes, launches, formulas.compute_seconds(flops, 0, dtype, prof, min_dim))
        host = prof.host_seconds(kind, launches)
        compute = prof.op_seconds(kind, work, launches)
        forward_s = prof.op_seconds(kind, prof.device_seconds(
            kind, fwd_bytes, 1, formulas.compute_seconds(fwd_flops, 0, dtype, prof, min_dim)))
        comm = self._internal_seconds(node, sh, out, backward)
        sums = [self.grad_sum_parts(node.outputs[0], out_lay)]
        grad = update = update_work = update_host = gather = 0.0
        pbytes = gbytes = sbytes = 0
        for i, v in enumerate(node.inputs):
            if v not in self.params or self.home.get(v) != (node.id, i):
                continue
            lay, local_bytes = sh.input_layout(i), specs[i].nbytes
            sums.append(self.grad_sum_parts(v, lay))
            if reductions:
                grad += self.redistribution_seconds(sh.grad_layout(i), lay, v)
            copies = self._copies(v, lay)
            if copies > 1:      # optimizer parallel: the updated slices are all-gathered, one more call,
                # back to back after the update: no rank waits for another (the 16-core run measured
                # ZeRO's comm within 5% of plain DP's; charging each call's wait put it 70% above)
                grad += self.collective_seconds("all_gather", 0, lay.mesh, lay.replicated_axes(), waits=False)
                if self.weights_sliced:   # level3: gathered for forward and again for backward
                    gather += self.collective_seconds("all_gather", local_bytes, lay.mesh, lay.replicated_axes())
            pbytes += local_bytes // copies if self.weights_sliced else local_bytes
            gbytes += local_bytes // copies   # optimizer parallel: a reduce-scattered slice
            sbytes += self.state_bytes(v, local_bytes, lay)
            moved = prof.device_seconds(OPTIMIZER_KIND, OPTIMIZER_BYTES_PER_ELEMENT * (local_bytes // copies))
            issue = prof.host_seconds(OPTIMIZER_KIND, 1) if prof.asynchronous else 0.0   # CPU: in the rate
            update, update_work, update_host = update + max(moved, issue), update_work + moved, update_host + issue
        act = sum(nbytes for _, nbytes in self.kept_for_backward(node, sh))
        flight = out.nbytes if node.outputs[0] in self.needs_grad else 0
        for sum_work, sum_launches in sums:
            compute += prof.op_seconds(GRAD_SUM_KIND, sum_work, sum_launches)
            work, host = work + sum_work, host + prof.host_seconds(GRAD_SUM_KIND, sum_launches)
        return NodeCost(compute, comm, grad + gather, update, pbytes, gbytes, sbytes, act, float(flops), float(nbytes),
                        compute - forward_s if backward else 0.0, flight, work, host, update_work, update_host, gather)

    def grad_sum_parts(self, value: int, layout: Layout) -> tuple[float, int]:
        """(work seconds, instructions) of autodiff's sum of ``value``'s gradient parts, one
        per op reading it that needs its gradient (k of them): an ``AddN`` reading k parts and
        writing one, priced in the value's own layout, ``(k + 1) x local bytes`` at the
        ``AddN`` rate, one instruction; nothing for k < 2. Charged to the op making the value
        (a weight: to its first reader), so the search sees it."""
        k = self.grad_readers.get(value, 0)
        if k < 2:
            return 0.0, 0
        nbytes = (k + 1) * _local(self.graph.spec(value), layout).nbytes
        return self.profile.device_seconds(GRAD_SUM_KIND, nbytes), 1

    def state_bytes(self, value: int, local_bytes: int, layout: Layout) -> int:
        """Optimizer-state bytes of weight ``value`` of ``local_bytes`` per rank in ``layout``:
        split over its data-parallel copies with optimizer parallel."""
        return self.optimizer_states * local_bytes // self._copies(value, layout)

    def _copies(self, value: int, layout: Layout) -> int:
        """Ranks a weight's optimizer state and gradient are split over: with optimizer
        parallel, what the runtime's slice divides its block by (:func:`~.optimizer_shard.
        slice_layout`, the one rule: under the threshold or with no dim to cut, whole), else 1."""
        if not self.optimizer_parallel:
            return 1
        spec, shard, g = self.graph.spec(value), self.optimizer_shard, self.graph
        name = g.param_names()[g.params.index(value)] if value in self.params else "weight"   # what a misfit names
        sliced = slice_layout(layout, spec.shape, np.dtype(spec.dtype).itemsize, shard.threshold_kb, shard.shard_size,
                              name)
        return 1 if sliced is None else \
            math.prod(layout.local_shape(spec.shape)) // math.prod(sliced.local_shape(spec.shape))

    def param_memory(self, value: int, layout: Layout) -> tuple[int, int]:
        """(weight + gradient + states, states) bytes per rank of a parameter in ``layout``."""
        weight, grad, states = self.param_bytes(value, layout)
        return weight + grad + states, states

    def param_bytes(self, value: int, layout: Layout) -> tuple[int, int, int]:
        """(weight, gradient, states) bytes per rank of a parameter in ``layout``. With
        optimizer parallel the runtime reduce-scatters the gradient, so it is kept as a
        slice like the states (ZeRO-2's memory for gradients)."""
        local, copies = _local(self.graph.spec(value), layout).nbytes, self._copies(value, layout)
        weight = local // copies if self.weights_sliced else local
        return weight, local // copies, self.state_bytes(value, local, layout)

    def _internal_seconds(self, node: Node, sh: OpSharding, out: TensorSpec, backward: bool) -> float:
        """Collectives a kernel runs itself over its *internal* letters' axes: the
        vocabulary-parallel cross-entropy all-reduces output-sized rows (max, sum, picked
        logit) in forward and the picked logit again in backward."""
        internal = sh.indexing.internal
        axes = tuple(a for ch in sorted(internal) for a in sh.letter_axes(ch))
        if not axes:
            return 0.0
        fwd, bwd = getattr(node.prim, "internal_allreduces", (0, 0))
        calls = fwd + (bwd if backward else 0)
        return calls * self.collective_seconds("all_reduce", out.nbytes, sh.mesh, axes)

    def edge_seconds(self, value: int, src: Layout, consumer: Node, i: int, sh: OpSharding) -> float:
        """Forward redistribution of ``value`` from ``src`` into what ``consumer`` reads as
        input ``i``, plus the backward one of its gradient into ``value``'s layout."""
        return sum(self.edge_parts(value, src, consumer, i, sh))

    def edge_parts(self, value: int, src: Layout, consumer: Node, i: int, sh: OpSharding) -> tuple[float, float]:
        """(activation seconds, gradient-reduction seconds) of an edge. The backward of a
        weight's value (the weight cast to the compute dtype) is the weight's gradient
        reduction: the runtime passes the partial sum through the cast to the weight, so
        it happens once per step, not once per micro-batch."""
        t = self.redistribution_seconds(src, sh.input_layout(i), value) * (1 + (consumer.id in self.rerun))
        if not gradient_inputs(consumer, self.needs_grad)[i]:
            return t, 0.0
        back = self.redistribution_seconds(sh.grad_layout(i), Layout(src.mesh, src.dims), value)
        return (t, back) if value in self.weight_values else (t + back, 0.0)

    def _weight_values(self) -> set[int]:
        """Parameters and what elementwise ops make of them alone (casts)."""
        out = set(self.params)
        for n in self.forward:
            tensors = [v for v in n.inputs if v not in self.graph.consts]
            if len(tensors) == 1 and tensors[0] in out:
                specs = [self.graph.spec(v) for v in n.inputs]
                ix = n.prim.indexing(specs, self.graph.spec(n.outputs[0]))
                if ix is not None and ix.inputs[n.inputs.index(tensors[0])] == ix.output:
                    out.add(n.outputs[0])
        return out

    def producer_layout(self, value: int, shardings: dict[int, OpSharding]) -> Layout | None:
        """Where ``value`` lives before its consumers read it: an op's output layout, a
        parameter's home (its first consumer's input layout), a data input's feed layout."""
        node = self.graph.node_of(value)
        if node is not None:
            return shardings[node.id].output_layout()
        if value in self.home:
            n, i = self.home[value]
            return shardings[n].input_layout(i)
        return self.input_layouts.get(value)

    # ---- whole plans ----------------------------------------------------------------------
    def op_costs(self, plan: ShardingPlan, back: dict | None = None) -> list[tuple[Node, NodeCost, float]]:
        """Per forward op: its cost under ``plan`` and the communication seconds per
        micro-batch of the edges into it. The gradients of each value it is the first
        reader of are priced with it (:meth:`gradient_costs`): their reductions in ``grad_s``
        for weights (once per step), with the edges for activations. ``back``: those costs if
        already made."""
        sh, out = plan.shardings, []
        back = self.gradient_costs(plan) if back is None else back
        moved: set = set()      # (value, layout): the runtime redistributes a value into a layout once
        for n in self.forward:
            act = 0.0
            for i, v in enumerate(n.inputs):
                src = self.producer_layout(v, sh)
                if src is None or (v in self.home and self.home[v] == (n.id, i)):
                    continue
                dst = sh[n.id].input_layout(i)
                t = self.redistribution_seconds(src, dst, v)
                act += t * ((v, canonical(dst)) not in moved) + t * (n.id in self.rerun)
                moved.add((v, canonical(dst)))
            c = self.node_cost(n, sh[n.id], reductions=False)
            a, g = back.get(n.id, (0.0, 0.0))
            out.append((n, replace(c, grad_s=c.grad_s + g), act + a))
        return out

    def gradient_costs(self, plan: ShardingPlan) -> dict[int, tuple[float, float]]:
        """First reader's node id -> (activation-gradient seconds per micro-batch, weight-
        gradient seconds per step) of the values it reads first, as the runtime's lowering
        reduces them: alike parts added first, partial sums passed through the VJPs that
        may take them (:mod:`~autopar.strategy.gradient_flow`). The op searches price each
        part on its own edge: an upper bound, equal where no parts merge."""
        return gradient_flow.gradient_costs(self, plan)

    def step_collectives_seconds(self, mesh: Mesh) -> float:
        """Collectives once per step outside the graph: the all-reduce of the squared
        gradient norm (global-norm clipping and the overflow check) over ``mesh``'s ranks."""
        if not self.params:
            return 0.0
        return self.collective_seconds("all_reduce", 8, mesh, range(mesh.ndim))

    def evaluate(self, plan: ShardingPlan) -> PlanCost:
        """The predicted step of ``plan`` (any plan: searched, rule-made or loaded)."""
        sh = plan.shardings
        compute = comm = update = 0.0
        pb = gb = sb = 0
        kept: dict[tuple[int, Layout], int] = {}   # activations: each (value, layout) once
        freed: list[int] = []                       # per op: the kept bytes its backward frees
        grads: list[int] = []                       # per op: the gradient bytes its backward makes
        rebuilt: dict[int, dict] = {}               # recompute region -> the values it rebuilds: bytes
        rows = []
        back = self.gradient_costs(plan)
        costs = self.op_costs(plan, back)
        for n, c, edge in costs:
            compute, comm, update = compute + c.compute_s, comm + c.comm_s + c.grad_s + edge, update + c.update_s
            pb, gb, sb = pb + c.param_bytes, gb + c.grad_bytes, sb + c.state_bytes
            new = 0
            for key, nbytes in self.kept_for_backward(n, sh[n.id], sh):
                if key not in kept:                 # freed with the earliest op keeping it: its backward runs last
                    kept[key] = nbytes
                    new += nbytes
            freed.append(new)
            grads.append(c.grad_bytes)
            for key, nbytes in self._saved(n, sh[n.id]):
                if key[0] in self.dropped:          # what its region rebuilds for backward, each once
                    rebuilt.setdefault(self.dropped[key[0]], {})[key] = nbytes
            rows.append((n.name, str(sh[n.id]), str(sh[n.id].output_layout()), c.comm_s + c.grad_s + edge,
                         c.seconds + edge))
        comm += self.step_collectives_seconds(self.stage)
        compute, update = issued_seconds([c for _, c, _ in costs], self.profile)
        during = [sum(rebuilt.get(self.region.get(n.id), {}).values()) + w
                  for n, w in zip(self.forward, self.gradients_in_flight(sh))]
        peak, working = backward_peak(grads, freed, during), backward_peak([0] * len(grads), freed, during)
        alone = sum(g for _, g in back.values())   # each reduction on its own, at the end of the step
        gathers = [c.gather_s for _, c, _ in costs]
        gathered = sum(gathers)
        shown = prefetched_exposed_seconds(gathers, compute, self.profile.comm_overlap) \
            if self.optimizer_shard.prefetches else gathered
        comm -= gathered - shown
        if not self.fusion_rules:
            return PlanCost(compute, comm, update, pb, gb, sb, sum(kept.values()), tuple(rows), peak, working,
                            alone, alone, gathered, shown)
        buckets, unfused, backward = self.gradient_buckets(plan, costs)
        total = sum(b.seconds for b in buckets) + sum(r.seconds for r in unfused)
        exposed = exposed_seconds(buckets, backward, self.profile.comm_overlap) + sum(r.seconds for r in unfused)
        peak = max(peak, sum(grads) + max((b.nbytes for b in buckets), default=0))   # one bucket's buffer more
        return PlanCost(compute, comm - alone + exposed, update, pb, gb, sb, sum(kept.values()), tuple(rows), peak,
                        working, total, exposed, gathered, shown)

    # ---- gradient buckets (comm_fusion) ---------------------------------------------------
    def gradient_buckets(self, plan: ShardingPlan, costs=None, deferred: bool = False) -> tuple[
            list[GradBucket], list[GradReduction], float]:
        """(buckets in start order, reductions left alone, backward seconds) of the weight
        gradients under the ``comm_fusion`` rules (module :mod:`.grad_buckets`; ``deferred``:
        as a pipeline stage buckets them); ``costs``: :meth:`op_costs` of ``plan`` if made.
        Backward walks the ops in reverse, each taking its ``backward_s``."""
        ends, t = {}, 0.0
        for n, c, _ in reversed(costs or self.op_costs(plan)):
            t += c.backward_s
            ends[n.id] = t
        items = self.grad_reductions(plan, ends)
        splits = [r.config[-1] + 1 for r in self.fusion_rules.values() if r.mode == "index"]   # checked by the
        n_params = max([len(self.param_order)] + splits)     # runtime: a stage's graph holds only some parameters
        buckets, alone = bucket(items, self.fusion_rules, n_params, self._bucket_seconds, deferred)
        return buckets, alone, t

    def _bucket_seconds(self, kind: str, nbytes: int, mesh: Mesh, axis: int) -> float:
        """One bucket: its collective once, and the copy of its bytes into its buffer."""
        return self.collective_seconds(kind, nbytes, mesh, (axis,)) + nbytes / self.profile.elementwise_bytes_per_s

    def grad_reductions(self, plan: ShardingPlan, ends: dict[int, float]) -> list[GradReduction]:
        """Each weight gradient's reduction as :meth:`gradient_costs` prices it: alike parts
        summed, then one reduction ready when the last part is made (the backward of its
        first reader); unlike parts each reduced, ready when made. ``ends``: forward node
        id -> when its backward ends."""
        sh, out = plan.shardings, []
        position = {n.id: k for k, n in enumerate(self.forward)}
        for v, readers in self.consumers.items():
            parts = [(n, sh[n].grad_layout(i)) for n, i in readers
                     if gradient_inputs(self.nodes[n], self.needs_grad)[i]]
            src = self.producer_layout(v, sh) if parts and v in self.weight_values else None
            if src is None:
                continue
            alike = all(p == parts[0][1] for _, p in parts)
            for n, lay in parts[:1] if alike else parts:      # readers come in forward order
                out.append(self._reduction(v, lay, Layout(src.mesh, src.dims), position[n], ends[n], not alike))
        return out

    def _reduction(self, value: int, part: Layout, target: Layout, position: int, ready_s: float,
                   summed: bool) -> GradReduction:
        """One reduction of ``value``'s gradient (part) from ``part`` into ``target``:
        bucketable when it is one all-reduce (a reduce-scatter under optimizer parallel:
        the runtime scatters a sliced weight's gradient), as the runtime's pass decides."""
        spec = self.graph.spec(value)
        alone = GradReduction(ready_s, position, self._param_index(value), self.redistribution_seconds(part, target, value),
                              _local(spec, part).nbytes, summed=summed)
        if part == target:
            return alone
        src, dtype = canonical(part), np.dtype(spec.dtype)
        steps = rd.plan(src, canonical(target), spec.shape, dtype.itemsize, checked=True).steps
        return bucketable(alone, steps, src.mesh, self._copies(value, target), dtype.str, value)

    def _param_index(self, value: int) -> int:
        """Index in the trained list (``param_order``) of the parameter ``value`` is (or is a
        cast of)."""
        while value not in self.params:
            value = next(u for u in self.graph.node_of(value).inputs if u in self.weight_values)
        return self.param_order[self.graph.param_names()[self.graph.params.index(value)]]

    def _saved(self, node: Node, sh: OpSharding) -> list:
        """((value, layout), local bytes) of what ``node``'s backward reads: its saved
        inputs (weights aside) and output, recomputed or not."""
        if not any(gradient_inputs(node, self.needs_grad)):
            return []
        g, out = self.graph, []
        for i in node.prim.saved_input_indices(len(node.inputs)):
            v = node.inputs[i]
            if v not in self.params:
                lay = sh.input_layout(i)
                out.append(((v, canonical(lay)), _local(g.spec(v), lay).nbytes))
        if node.prim.save_output:
            v, lay = node.outputs[0], sh.output_layout()
            out.append(((v, canonical(Layout(lay.mesh, lay.dims))), _local(g.spec(v), lay).nbytes))
        return out

    def gradients_in_flight(self, shardings: dict[int, OpSharding]) -> list[int]:
        """Per forward op: bytes of the activation gradients alive while its backward runs
        (:func:`~.backward_memory.gradients_in_flight`), each in its producer's layout."""
        def nbytes(v: int) -> int:
            lay = self.producer_layout(v, shardings)
            spec = self.graph.spec(v)
            return spec.nbytes if lay is None or len(lay.dims) != len(spec.shape) else _local(spec, lay).nbytes
        return gradients_in_flight(self.forward, self.needs_grad, self.params, nbytes)

    def kept_for_backward(self, node: Node, sh: OpSharding, shardings: dict | None = None):
        """((value, layout), local bytes) of each activation ``node`` keeps for its backward: a
        plan's activations are these summed over its ops, each (value, layout) once. Under
        recompute a value its region rebuilds is not kept; an op that runs again keeps
        what it reads from outside the region instead (the region's inputs): with the
        plan's ``shardings``, in its producer's layout when the redistribution into the op
        runs again too (``recompute_comm``: a sequence shard, not its all-gather), else in
        the layout the op reads."""
        g = self.graph
        out = [(key, nbytes) for key, nbytes in self._saved(node, sh) if key[0] not in self.dropped]
        if node.id in self.rerun:
            for i, v in enumerate(node.inputs):
                src = self.producer_layout(v, shardings) if shardings and node.recompute_comm else None
                lay = sh.input_layout(i) if src is None else Layout(src.mesh, src.dims)
                key = (v, canonical(lay))
                if v not in self.params and v not in g.consts and v not in self.dropped and key not in dict(out):
                    out.append((key, _local(g.spec(v), lay).nbytes))
        return out

"""Stage search: pipeline stages, layer split, data/model degrees, micro-batches, recompute
and optimizer parallel, chosen jointly to minimise predicted step time under a memory cap.

A decoder is a stack of identical layers between a head and a tail: the first stage also
runs the embeddings, the last also the query layer, head and loss. So one stage setting --
(devices per stage, data x model degrees, micro-batch size) -- is priced once, on a graph
of ONE layer with its extras (the graph its family registered, :mod:`.registry`), by
:class:`~autopar.strategy.costmodel.CostModel`; a pipeline of any depth is then arithmetic
on those parts (seconds per micro-batch, bytes):

* stage s runs on the stage-major ranks ``s*n .. s*n + n - 1`` and is priced there: a
  stage straddling two nodes pays inter-node collectives (:func:`stage_offset`);
* stage time per micro-batch ``T_s = n_s x layer + extras_s (+ a forward again with
  recompute) + the sends of its boundaries``: each value entering a layer goes as its
  local block in its own dtype, and its gradient comes back, inter-node where the
  boundary crosses nodes (:func:`transfer_seconds`);
* step = ``m x max_s T_s + (sum_s T_s - max_s T_s)`` (the bubble: the other stages' times,
  :func:`~autopar.strategy.formulas.pipeline_seconds`; ``(m + p - 1) x T`` for equal
  stages) + the gradient reduction, optimizer update and clipping, and the step's own
  collectives (gradient norm, loss broadcast), once per step;
* interleaved 1F1B (``virtual_stages`` v > 1: each stage's layers in v chunks, chunk c of
  the p * v on stage c % p): the bubble is ``(sum_s T_s - max_s T_s) / v``, and every chunk
  boundary sends -- v boundaries into and out of each stage, one of them across the wrap
  from stage p - 1 to stage 0;
* memory of stage s = its weights and optimizer states (divided over the data-parallel
  copies with optimizer parallel) + the largest of the end of forward (activations of the
  ``min(p - s, m)`` micro-batches in flight under 1F1B: all of a layer's with no
  recompute; with recompute only each layer's input), the first backward and a later one
  (beside the step's gradients and its own, the gradients at their accumulated size:
  whole under level-1 optimizer parallel, the only level this planner prices):
  :func:`stage_memory`, the joint search's rule.
  Interleaved, stage s holds :func:`in_flight` micro-batch *chunks*, each 1/v of its layers.

Early stages hold more micro-batches, so when the uniform split overflows the first stage
the split moves layers back (Yuan 2.0's non-uniform lists).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ...ir.graph import Graph
from ...ir.mesh import Mesh
from .. import formulas
from ..costmodel import CostModel
from ..plan_cost import issued_seconds
from ..profile import MachineProfile
from ..sharding_plan import plan_shardings
from .registry import ModelFamily


@dataclass(frozen=True)
class Part:
    """Costs of a group of ops for one micro-batch on one rank of a stage."""
    compute_s: float = 0.0
    comm_s: float = 0.0          # activation redistributions and in-kernel collectives
    grad_s: float = 0.0          # gradient reductions (once per step)
    update_s: float = 0.0
    model_bytes: int = 0         # weights + gradients + optimizer states
    state_bytes: int = 0         # of which optimizer states
    activation_bytes: int = 0    # kept for backward, one micro-batch
    boundary_bytes: int = 0      # the values entering the group (what recompute keeps), local bytes
    boundary_sends: tuple[int, ...] = ()   # each of them, local bytes in its dtype: one send each
    boundary_grads: tuple[int, ...] = ()   # the gradients sent back (those that need one)
    grad_bytes: int = 0          # of model_bytes, the weights' gradients
    shared_bytes: int = 0        # of model_bytes, weights the first-stage extras read too (a tied table)
    shared_grad_bytes: int = 0   # of those, the gradients
    working_bytes: int = 0       # most activation gradients in flight while one of its ops runs backward
    forward_s: float = 0.0       # of compute_s, the forward kernels (what recompute runs again)
    accumulated_bytes: int | None = None   # the gradients as micro-batches accumulate them (level1
    shared_accumulated: int | None = None  # optimizer parallel: whole); of those, the shared weights'; None: as grad_bytes


@dataclass(frozen=True)
class StageSetting:
    """One point of the joint search: pipeline stages x data x model degrees, micro-batches
    per step, recompute and optimizer parallel; the layer split (None: the most even one
    that fits the memory cap)."""
    pp: int
    dp: int
    mp: int
    micro_batches: int
    recompute: bool = False
    optimizer_parallel: bool = False
    layers_per_stage: tuple[int, ...] | None = None
    virtual_stages: int = 1                   # chunks per stage; > 1: interleaved 1F1B


@dataclass(frozen=True)
class StagePlan:
    """One pipeline plan and its prediction."""
    pp: int
    dp: int
    mp: int
    micro_batches: int
    micro_batch_size: int
    layers_per_stage: tuple[int, ...]
    recompute: bool
    optimizer_parallel: bool
    step_seconds: float
    compute_s: float             # m x the slowest stage's compute per micro-batch
    comm_s: float                # m x its communication, + gradient reduction
    bubble_s: float              # (sum_s T_s - max_s T_s) / v: the fill and drain
    update_s: float
    memory_bytes: tuple[int, ...]   # per stage (the most loaded rank of each)
    virtual_stages: int = 1         # chunks per stage (layers_per_stage counts a stage's, all chunks)
    parts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def peak_memory_bytes(self) -> int:
        return max(self.memory_bytes)

    def describe(self) -> str:
        split = ",".join(map(str, self.layers_per_stage))
        chunks = f" in {self.virtual_stages} chunks a stage (interleaved)" if self.virtual_stages > 1 else ""
        return (f"pp{self.pp} x dp{self.dp} x mp{self.mp}, {self.micro_batches} micro-batches of "
                f"{self.micro_batch_size}, layers {split}{chunks}, recompute {'on' if self.recompute else 'off'}, "
                f"optimizer parallel {'on' if self.optimizer_parallel else 'off'}")


class StageCoster:
    """Prices stage settings of one model family on one machine, caching each setting."""

    def __init__(self, family: ModelFamily, devices: int, profile: MachineProfile):
        self.family, self.devices, self.profile = family, devices, profile
        self._parts: dict = {}

    def parts(self, stage_devices: int, dp: int, mp: int, mb: int, zero: bool, first_rank: int = 0
              ) -> tuple[Part, Part, Part]:
        """(first-stage extras, one layer, last-stage extras) for one micro-batch, on the
        stage whose ranks are ``first_rank .. first_rank + stage_devices - 1`` (stage-major:
        stage s starts at ``s * stage_devices``). Priced once per placement on nodes: a
        stage that fits in one node, or starts on a node boundary, is priced as rank 0's."""
        offset = stage_offset(first_rank, stage_devices, self.profile.devices_per_node)
        key = (stage_devices, dp, mp, mb, offset)
        if key not in self._parts:
            self._parts[key] = self._price(stage_devices, dp, mp, mb, offset)
        return self._parts[key][zero]

    def _price(self, stage_devices, dp, mp, mb, offset):
        """Both optimizer-parallel settings from one pricing: the ops' seconds are priced
        once and only the weights' bytes again (states split over the data-parallel copies)."""
        fam = self.family
        graph = fam.graph(mb, dp, mp, one_layer=True)
        stage = Mesh((stage_devices,), ("devices",), tuple(range(offset, offset + stage_devices)))
        plan = plan_shardings(graph, "semi_auto_parallel", stage, True)
        model = CostModel(graph, stage, self.profile, True)
        zero = CostModel(graph, stage, self.profile, True, optimizer_parallel=True)
        rows = model.op_costs(plan)
        zero_rows = zero.op_costs(plan)
        return {False: split_parts(model, plan, fam.layer_scope, rows=rows),
                True: split_parts(zero, plan, fam.layer_scope, rows=zero_rows)}


def stage_offset(first_rank: int, stage_devices: int, per_node: int) -> int:
    """Where a stage starting at ``first_rank`` sits on its nodes, as the first rank of an
    equivalent stage: which of its ranks share a node is all the cost model asks, and that
    is rank 0's when the stage fits in a node evenly or starts on a node boundary."""
    if per_node % stage_devices == 0:
        return 0
    return first_rank % per_node


def boundary_crosses_nodes(s: int, stage_devices: int, per_node: int, to: int | None = None) -> bool:
    """Whether the transfers between stage s and stage ``to`` (default s + 1) cross nodes:
    position i of stage s (rank ``s*n + i``) sends to position i of the other."""
    n, to = stage_devices, s + 1 if to is None else to
    return n >= per_node or any(r // per_node != (r + (to - s) * n) // per_node for r in range(s * n, (s + 1) * n))


def chunk_boundaries(pp: int, s: int, virtual: int = 1) -> list[tuple[int, int]]:
    """(sending stage, receiving stage) of every chunk boundary stage s sits on: between
    virtual stages c and c + 1 (c < p v - 1), which run on stages c % p and (c + 1) % p."""
    out = []
    for c in range(pp * virtual - 1):
        a, b = c % pp, (c + 1) % pp
        if s in (a, b) and a != b:
            out.append((a, b))
    return out


def transfer_seconds(profile: MachineProfile, pp: int, s: int, stage_devices: int, layer: Part,
                     virtual: int = 1) -> float:
    """Send/receive seconds of stage s per micro-batch: over each of its boundaries, every
    value crossing into a layer (forward) and every gradient of one coming back, each a
    blocking send of its local block in its own dtype (``latency + bytes / bandwidth``,
    inter-node where the boundary crosses nodes). Both ends of a transfer wait for it, so
    a middle stage pays both boundaries; interleaved, every chunk boundary (v of them on
    each side of a stage, the wrap p - 1 -> 0 included)."""
    total = 0.0
    for a, b in chunk_boundaries(pp, s, virtual):
        if boundary_crosses_nodes(a, stage_devices, profile.devices_per_node, b):
            lat, bw = profile.inter_node_latency_s, profile.inter_node_bandwidth_bytes_per_s
        else:
            lat, bw = profile.intra_node_latency_s, profile.intra_node_bandwidth_bytes_per_s
        lat += profile.collective_wait_s
        total += sum(lat + nbytes / bw for nbytes in layer.boundary_sends + layer.boundary_grads)
    return total


def step_collectives_seconds(profile: MachineProfile, devices: int, pp: int) -> float:
    """Collectives the runtime runs once per step over every rank, outside the stage
    programs: the all-reduce of the squared gradient norm (one float64; global-norm
    clipping and the overflow check), and with a pipeline the broadcast of the loss from
    the last stage (one float32)."""
    inter = devices > profile.devices_per_node
    total = formulas.collective_seconds("all_reduce", 8, devices, profile, inter) if devices > 1 else 0.0
    if pp > 1:
        total += formulas.collective_seconds("broadcast", 4, devices, profile, inter)
    return total


def split_parts(model: CostModel, plan, layer_scope: str, memory_model: CostModel | None = None,
                rows: list | None = None) -> tuple[Part, Part, Part]:
    """Group a one-layer plan's op costs (``rows``: ``model.op_costs(plan)``, computed here
    when not given): before the layer, the layer, after it (weights' bytes priced by
    ``memory_model``, e.g. the optimizer-parallel one)."""
    memory_model = memory_model or model
    graph: Graph = model.graph
    groups = {"first": [], "layer": [], "last": []}
    seen_layer = False
    for n, c, edge in (model.op_costs(plan) if rows is None else rows):
        if n.scope.startswith(layer_scope) or n.scope == layer_scope.rstrip("."):
            seen_layer = True
            groups["layer"].append((n, c, edge))
        else:
            groups["last" if seen_layer else "first"].append((n, c, edge))
    parts = []
    layer_ops = {n.id for n, _, _ in groups["layer"]}
    in_flight_grads = dict(zip((n.id for n in model.forward), model.gradients_in_flight(plan.shardings)))
    first_reads: set[int] = set()
    for name in ("first", "layer", "last"):
        rows = groups[name]
        kept: dict = {}
        for n, _, _ in rows:
            for key, nbytes in model.kept_for_backward(n, plan.shardings[n.id]):
                kept[key] = nbytes
        model_bytes = state = grad = shared = shared_grad = acc = shared_acc = 0
        reads = {v for n, _, _ in rows for v in n.inputs if v in model.params}   # every weight it reads
        for v in reads:
            w, g, st = memory_model.param_bytes(v, plan.layouts[v])
            # level1 optimizer parallel reduce-scatters after the last micro-batch: until then whole
            a = g if memory_model.optimizer_shard.shards_accumulation else w
            model_bytes, state, grad, acc = model_bytes + w + g + st, state + st, grad + g, acc + a
            if name == "last" and v in first_reads:
                shared, shared_grad, shared_acc = shared + w + g + st, shared_grad + g, shared_acc + a
        if name == "first":
            first_reads = reads
        sends, grads = [], []
        if name == "layer":                 # values entering the layer from before it
            for v in dict.fromkeys(v for n, _, _ in rows for v in n.inputs):
                src = graph.node_of(v)
                if src is None or src.id in layer_ops or v in model.params:
                    continue
                spec = graph.spec(v)
                nbytes = math.prod(model.producer_layout(v, plan.shardings).local_shape(spec.shape)) \
                    * np.dtype(spec.dtype).itemsize
                sends.append(nbytes)
                if v in model.needs_grad:
                    grads.append(nbytes)
        costs = [c for _, c, _ in rows]
        compute, update = issued_seconds(costs, model.profile)   # a GPU's host runs ahead: the longer sum
        summed = sum(c.compute_s for c in costs)
        forward = sum(c.compute_s - c.backward_s for c in costs) * (compute / summed if summed else 1.0)
        parts.append(Part(compute,
                          sum(c.comm_s + e for _, c, e in rows),
                          sum(c.grad_s for _, c, _ in rows),
                          update,
                          model_bytes, state, sum(kept.values()), sum(sends), tuple(sends), tuple(grads), grad,
                          shared, shared_grad, max((in_flight_grads[n.id] for n, _, _ in rows), default=0),
                          forward, acc, shared_acc))
    return tuple(parts)


def in_flight(pp: int, s: int, m: int, schedule: str = "1f1b", virtual: int = 1) -> int:
    """Micro-batches whose activations stage s holds at its peak; interleaved (v > 1),
    micro-batch chunks: Megatron's warm-up ``(p - s - 1) * 2 + (v - 1) * p`` + 1, or all
    ``m v`` under GPipe and when m == p (the schedule tables hold exactly these)."""
    if virtual == 1 or pp == 1:
        return m if schedule == "gpipe" else min(pp - s, m)
    if schedule == "gpipe" or m == pp:
        return m * virtual
    return min((pp - s - 1) * 2 + (virtual - 1) * pp + 1, m * virtual)


def stage_time(first: Part, layer: Part, last: Part, pp: int, s: int, n: int, recompute: bool
               ) -> tuple[float, float]:
    """(compute, communication) seconds of one micro-batch on stage s holding n layers."""
    extras = ([first] if s == 0 else []) + ([last] if s == pp - 1 else [])
    compute = n * (layer.compute_s + (layer.forward_s if recompute else 0.0)) + sum(p.compute_s for p in extras)
    return compute, n * layer.comm_s + sum(p.comm_s for p in extras)


def stage_memory(first: Part, layer: Part, last: Part, pp: int, s: int, n: int, m: int,
                 recompute: bool, virtual: int = 1) -> int:
    """Bytes on a rank of stage s holding n layers: weights and optimizer states, which
    live all step, plus the largest of the step's phases (not their sum)::

        static + max(k x A + (G if more micro-batches follow),       end of a forward
                     (k - 1) x A + walk(the first backward),           no gradients before it
                     2 x G + (k - 1) x A + walk(a later backward))     the step's and its own

    with k = :func:`in_flight`, A the activations one micro-batch keeps on the stage (with
    recompute only each layer's input) and G the step's gradients as the micro-batches
    accumulate them (whole under level-1 optimizer parallel). A walk goes through one
    micro-batch's backward group by group in reverse (last extras, layers, first extras),
    each making its gradients while the groups before it keep theirs and its activation
    gradients in flight are alive (``Part.working_bytes``, the most over its ops); with
    recompute one layer's activations are rebuilt at a time. A later micro-batch's backward
    makes its gradients beside the step's (the runtime adds them in after it): bounded by
    both sets whole, as the runtime measures (the same rule as the joint search's
    ``auto._stage_memory``). One micro-batch: the larger of its activations and its walk.

    Interleaved (``virtual`` v > 1): k counts micro-batch chunks, A is a chunk's (1/v of the
    stage's), and the backward walks one chunk (its share of the layers, with the extras)."""
    accumulates = m * (virtual if pp > 1 else 1) > 1

    def grads_of(p: Part) -> int:
        return p.accumulated_bytes if accumulates and p.accumulated_bytes is not None else p.grad_bytes

    groups = ([(1, last)] if s == pp - 1 else []) + [(n, layer)] + ([(1, first)] if s == 0 else [])
    if s == 0 and s == pp - 1:           # one stage holds both ends: a weight they share (a tied table) once
        last = replace(last, model_bytes=last.model_bytes - last.shared_bytes,
                       grad_bytes=last.grad_bytes - last.shared_grad_bytes,
                       accumulated_bytes=None if last.accumulated_bytes is None else
                       last.accumulated_bytes - (last.shared_accumulated or 0))
        groups[0] = (1, last)
    held = [(c, grads_of(p), p.activation_bytes if p is not layer or not recompute else p.boundary_bytes,
             (p.activation_bytes if p is layer and recompute else 0) + p.working_bytes) for c, p in groups]
    static = sum(c * (p.model_bytes - p.grad_bytes) for c, p in groups)
    grads = sum(c * g for c, g, _, _ in held)
    v = virtual if pp > 1 else 1
    per_mb = sum(c * a for c, _, a, _ in held)               # one micro-batch in flight
    per_mb = per_mb if v == 1 else per_mb / v                # interleaved: one chunk
    walked = [(-(-c // v) if p is layer else c, g, a, w) for (c, g, a, w), (_, p) in zip(held, groups)]
    k = in_flight(pp, s, m, "1f1b", v)
    first_backward = (k - 1) * per_mb + _backward_walk(walked)
    if not accumulates:
        return int(static + max(per_mb, first_backward))
    later = 2 * grads + (k - 1) * per_mb + _backward_walk([(c, 0, a, w) for c, _, a, w in walked])
    forward = k * per_mb + (grads if m * v > k else 0)
    return int(static + max(first_backward, later, forward))


def _backward_walk(groups: list[tuple[int, int, int, int]]) -> int:
    """Peak of gradients made + activations still kept over one micro-batch's backward.
    ``groups`` in backward order, each ``(count, gradient bytes, kept bytes, working bytes)``
    for ``count`` identical groups; a group makes its gradients and frees its activations
    as its ops run backward (a ramp between its start and its end) and holds its working
    bytes meanwhile. The peak is then at the start of some group, or at the end; within a
    run of identical groups the starts lie on a line, so its first and last bound them."""
    alive, made = sum(c * a for c, _, a, _ in groups), 0
    peak = alive
    for c, g, a, w in groups:
        if c == 0:
            continue
        peak = max(peak, made + alive + w, made + (c - 1) * (g - a) + alive + w)
        made, alive = made + c * g, alive - c * a
    return max(peak, made + alive)


def split_layers(layers: int, pp: int, fits: Callable[[int, int], bool],
                 time: Callable[[int, int], float] | None = None, least: int = 1) -> tuple[int, ...] | None:
    """Layers per stage minimising the slowest stage's ``time(stage, n)`` (default: n)
    among splits where every stage ``fits(stage, n)`` in memory and holds at least
    ``least`` layers (interleaved: one per chunk); None when none does.
    Stages with extra work (embeddings, head) or more micro-batches in flight get fewer.

    ``time(s, n)`` must not decrease with n: the most layers stage s takes under a bound
    is then found by bisection in its table, and the smallest bound that holds every layer
    by bisection over the distinct levels (holding every layer is monotone in the bound)."""
    time = time or (lambda s, n: float(n))
    most = []
    for s in range(pp):
        n = 0
        while n < layers and fits(s, n + 1):
            n += 1
        most.append(n)
    if sum(most) < layers or min(most) < least:
        return None
    table = [[time(s, n) for n in range(1, most[s] + 1)] for s in range(pp)]   # table[s][n - 1]

    def split_under(bound: float) -> list[int]:
        return [bisect.bisect_right(row, bound) for row in table]

    levels = sorted({t for row in table for t in row})
    lo, hi = 0, len(levels) - 1             # split_under(levels[-1]) == most, which holds every layer
    while lo < hi:
        mid = (lo + hi) // 2
        split = split_under(levels[mid])
        if min(split) >= least and sum(split) >= layers:
            hi = mid
        else:
            lo = mid + 1
    split = split_under(levels[lo])
    extra = sum(split) - layers
    while extra:                           # give the surplus back from the slowest stages
        s = max((s for s in range(pp) if split[s] > least), key=lambda s: (table[s][split[s] - 1], -s))
        split[s] -= 1
        extra -= 1
    return tuple(split)


def evaluate(coster: StageCoster, batch: int, setting: StageSetting,
             memory_cap: float | None = None) -> StagePlan | None:
    """The predicted step of one pipeline plan; None if its shapes don't divide. With no
    ``setting.layers_per_stage`` the split is the most even one that fits ``memory_cap``."""
    prof, fam = coster.profile, coster.family
    pp, dp, mp, m = setting.pp, setting.dp, setting.mp, setting.micro_batches
    recompute, zero, layers_per_stage = setting.recompute, setting.optimizer_parallel, setting.layers_per_stage
    v = setting.virtual_stages if pp > 1 else 1
    if coster.devices % pp or (coster.devices // pp) != dp * mp or batch % m or (batch // m) % dp:
        return None
    if v > 1 and (m % pp or fam.layers < pp * v):
        return None       # interleaving needs m % p == 0 (Megatron's rule) and a layer per chunk
    mb = batch // m
    n_dev = coster.devices // pp
    try:
        first = coster.parts(n_dev, dp, mp, mb, zero)[0]
        last = coster.parts(n_dev, dp, mp, mb, zero, (pp - 1) * n_dev)[2]
        layers = [coster.parts(n_dev, dp, mp, mb, zero, s * n_dev)[1] for s in range(pp)]
    except ValueError:
        return None       # the config refuses these degrees (heads not divisible, ...)
    p2p = [transfer_seconds(prof, pp, s, n_dev, layers[s], v) for s in range(pp)]

    def time(s: int, n: int) -> float:
        return sum(stage_time(first, layers[s], last, pp, s, n, recompute)) + p2p[s]

    cap = float(prof.memory_bytes if memory_cap is None else memory_cap)
    if layers_per_stage is None:
        split = split_layers(fam.layers, pp,
                             lambda s, n: stage_memory(first, layers[s], last, pp, s, n, m, recompute, v) <= cap, time,
                             v)
        if split is None:
            split = tuple(int(n) for n in np.diff(np.linspace(0, fam.layers, pp + 1).round().astype(int)))
    else:
        split = tuple(layers_per_stage)
        if len(split) != pp or sum(split) != fam.layers:
            raise ValueError(f"layers_per_stage: expected {pp} counts summing to {fam.layers}, got {split}")
    if min(split) < v:
        return None       # a stage with fewer layers than chunks
    times, memories, grads, updates = [], [], [], []
    for s, n in enumerate(split):
        layer = layers[s]
        extras = ([first] if s == 0 else []) + ([last] if s == pp - 1 else [])
        compute, comm = stage_time(first, layer, last, pp, s, n, recompute)
        times.append((compute, comm + p2p[s]))
        grads.append(n * layer.grad_s + sum(p.grad_s for p in extras))
        updates.append(n * layer.update_s + sum(p.update_s for p in extras))
        memories.append(stage_memory(first, layer, last, pp, s, n, m, recompute, v))
    slow = max(range(pp), key=lambda s: sum(times[s]))
    once = max(grads) + step_collectives_seconds(prof, coster.devices, pp)
    compute_s, comm_s = m * times[slow][0], m * times[slow][1] + once
    _, bubble = formulas.pipeline_seconds([sum(t) for t in times], m, v)
    step = compute_s + comm_s + bubble + max(updates)
    return StagePlan(pp, dp, mp, m, mb, split, recompute, zero, step, compute_s, comm_s, bubble, max(updates),
                     tuple(memories), v)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def micro_batch_counts(batch: int, pp: int, dp: int) -> list[int]:
    """Every micro-batch count m the runtime can run: m divides the batch, each micro-batch
    splits evenly over the dp ranks ((batch / m) % dp == 0), and every stage has a
    micro-batch to start with (m >= pp, as MindSpore's ``micro_size >= stages``)."""
    return [m for m in divisors(batch) if m >= pp and (batch // m) % dp == 0]


def search_stages(coster: StageCoster, batch: int, memory_cap: float | None = None,
                  max_mp: int | None = None, virtual_stages: tuple[int, ...] = (1,)
                  ) -> tuple[StagePlan | None, list[StagePlan]]:
    """The fastest plan fitting the memory cap over stages, degrees, micro-batches,
    recompute and optimizer parallel (and the chunks per stage in ``virtual_stages``, where
    interleaving runs: p > 1, m % p == 0, a layer per chunk); and every plan priced (for
    reports).

    Every micro-batch count the runtime can run is tried (:func:`micro_batch_counts`), none
    pruned: a setting's parts are priced once per (stage devices, dp, mp, micro-batch size)
    and cached, so each further count costs one trace of the one-layer graph and the
    pipeline arithmetic (200B on 2048 devices: about 1 s on one core)."""
    prof, fam = coster.profile, coster.family
    cap = float(prof.memory_bytes if memory_cap is None else memory_cap)
    max_mp = max_mp or prof.devices_per_node        # model parallel inside a node, as PanGu-α did
    tried: list[StagePlan] = []
    for pp in divisors(coster.devices):
        if pp > fam.layers:
            break
        stage_dev = coster.devices // pp
        for mp in [d for d in divisors(stage_dev) if d <= max_mp]:
            dp = stage_dev // mp
            for m in micro_batch_counts(batch, pp, dp):
                for recompute in (False, True):
                    for zero in (False, True):
                        for v in virtual_stages if pp > 1 else (1,):
                            plan = evaluate(coster, batch, StageSetting(pp, dp, mp, m, recompute, zero, None, v),
                                            memory_cap=cap)
                            if plan is not None:
                                tried.append(plan)
    fitting = [p for p in tried if p.peak_memory_bytes <= cap]
    best = min(fitting, key=lambda p: p.step_seconds) if fitting else None
    return best, tried


__all__ = ["Part", "StageSetting", "StagePlan", "StageCoster", "evaluate", "search_stages",
           "split_layers", "in_flight"]

"""Pipeline parallelism: loss and this rank's gradient shards, a
:class:`~autopar.runtime.protocol.TrainingProgram` like the serial and sharded programs.

Built once per input signature, on every rank:

1. split the world into stage communicators (stage-major ranks), and one communicator per
   set of stages sharing a parameter (rank i of each of those stages together);
2. trace the network on global shapes: one micro-batch (the programs' shapes) and, when it
   drops out, the whole batch too (for whole-batch dropout indices); give every op its
   stage (:mod:`autopar.strategy.pipeline.assignment`);
3. plan its stage, and the stages it depends on, each on its own mesh
   (:mod:`autopar.strategy.pipeline.planner`);
4. for this rank's stage only: differentiate the stage graph, lower it on the stage
   communicator (sub-communicator splits stay inside the stage), map its dropouts onto
   whole-batch indices per micro-batch, and cut it into forward and backward halves
   (:mod:`autopar.runtime.pipeline.split`).

Virtual stages (``virtual`` v > 1, interleaved 1F1B): the graph is cut into p * v virtual
stages (``pipeline_stage`` annotations name them, 0..p*v-1), virtual stage c planned on the
ranks of stage ``c % p``; steps 3 and 4 run for each of this rank's chunks (virtual stages
``stage, stage + p, ...``), and the chunks' gradients of a parameter they share add up in
one slot. On one stage v is ignored, as the annotations are.

Per call: the fed batch is cut into ``micro`` micro-batches along dim 0, the schedule is
walked (:mod:`autopar.runtime.pipeline.runner`), gradients summed over micro-batches, then
reduced over the stage's replicas once and summed over the copies of shared parameters
(:mod:`autopar.runtime.pipeline.grads`, which also slices them for optimizer parallel),
and the loss -- the mean of the micro-batch losses, computed on the last stage --
broadcast to every rank. A micro-batch's loss gradient is seeded with ``sens / micro``,
so the gradients are those of that mean.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ...comm.consistency import NO_GROUP
from ...context import ParallelContext, current_world
from ...errors import format_error
from ...ir.graph import FORWARD, Graph, differentiable_values, with_node_changes
from ...ir.layout import Layout
from ...ir.spec import TensorSpec
from ...ops.dropout import Dropout
from ...strategy.pipeline.assignment import assign_stages
from ...strategy.pipeline.files import save_pipeline_plan
from ...strategy.pipeline.planner import PipelinePlan, plan_pipeline
from ...strategy.pipeline.schedule import make_schedule
from ...strategy.plan_source import PlanOptions
from ...strategy.sharding_plan import fed_splits
from ..autodiff import differentiate
from ..consistency import ConsistencyCheck
from ..program import Program
from ..protocol import TrainingProgram, gradient_factors, loss_targets, scaled
from ..setting import DEFAULT_CONTEXT
from ..spmd import Redistribute, lower
from ..trace import trace
from .dropout import MicroBatchDropout, MicroFeed, whole_batch_coords
from .grads import StageGradients, defer_reductions
from .memory import StepMemory
from .runner import ChunkStep, StageStep, run_step, transfers
from .shards import AbsentShard, StageShard, attach
from .split import split_halves

WHERE = "PipelineCell"


def _check_pipeline_feed(arrays: Sequence[np.ndarray], devices: int, whole: bool, ctx: ParallelContext) -> None:
    """A pipeline feeds the whole batch or each rank its rows of the stage's data-parallel
    slice (then cut into micro-batches), so of ``dataset_strategy`` tuples it takes those
    two alone (all 1s, or dim 0 split over the ``devices`` of a stage and nothing else);
    any other is refused at compile time rather than fed as something else."""
    strategy = ctx.dataset_strategy
    if not isinstance(strategy, tuple):
        return
    shapes = [tuple(a.shape) for a in arrays]
    given = fed_splits(shapes, devices, whole, strategy)          # counts, dims, divisors checked
    if whole:
        return
    rows = fed_splits(shapes, devices, False, "data_parallel")
    for k, (mine, want) in enumerate(zip(given, rows)):
        if mine != want:
            raise ValueError(format_error(
                WHERE, f"dataset_strategy input {k}", f"{want} (dim 0 split over the {devices} devices of a stage) "
                "or all 1s under pipeline stages / micro-batches", str(mine),
                "feed pipelines dataset_strategy='data_parallel' or 'full_batch'; other tuples need one stage"))


class PipelineGradProgram(TrainingProgram):
    """Loss and local gradient shards of ``params`` on one rank of ``world`` under
    ``stages`` pipeline stages and ``micro`` micro-batches (``schedule``: "1f1b" or "gpipe"),
    interleaved over ``virtual`` chunks per stage when ``virtual`` > 1.

    ``args`` are what this rank is fed: the whole batch (``full_batch``) or, data-parallel,
    the slice ``rank % (world.size // stages)`` of the stage's ranks (ranks at the same
    position of every stage are fed the same rows); a ``dataset_strategy`` tuple saying
    anything else is refused (:func:`_check_pipeline_feed`). :attr:`param_shards` has one entry per
    parameter: this rank's :class:`StageShard` or an :class:`AbsentShard`; :attr:`shards`
    is what the optimizer updates (the same, or under optimizer parallel the
    :class:`~autopar.runtime.optimizer_parallel.SliceShard` of a StageShard)."""

    def __init__(self, network, args: tuple, params: Sequence, world, *, stages: int = 1, micro: int = 1,
                 schedule: str = "1f1b", mode: str = "semi_auto_parallel", full_batch: bool = False,
                 sens: float = 1.0, ctx: ParallelContext = DEFAULT_CONTEXT,
                 annotate: Callable[[Graph], Graph] | None = None, plan_options: PlanOptions | None = None,
                 virtual: int = 1):
        if world.size % stages:
            raise ValueError(format_error(WHERE, "pipeline_stages", f"a divisor of the {world.size} ranks",
                                          str(stages), "each stage needs the same number of ranks"))
        virtual = _check_virtual(virtual, stages, micro)
        if ctx.slice_threshold is not None and ctx.parallel_optimizer_config.shards_weights:
            raise ValueError(format_error(WHERE, "parallel_optimizer_config.optimizer_level", "'level1' or 'level2' "
                                          "under a PipelineCell / GradAccumulationCell", "'level3'",
                                          "ZeRO-3 runs without micro-batches; use level2 here (gradients sliced too)"))
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        self.rows = _batch_rows(arrays, micro)
        world.stats.doing = f"compiling {type(self).__name__}"     # named by the watchdog's reports
        # before any collective: a rank with another model or batch shape would pair them wrongly
        self.check = ConsistencyCheck(type(self).__name__, world, params, arrays)
        self.world, self.stages, self.micro, self.virtual = world, stages, micro, virtual
        self.schedule = make_schedule(schedule, stages, micro, virtual)
        n = self.ranks_per_stage = world.size // stages
        self.stage, self.position = divmod(world.rank, n)
        self.chunks = tuple(c * stages + self.stage for c in range(virtual))   # this rank's virtual stages
        self.stage_comm = world.split([tuple(range(s * n, (s + 1) * n)) for s in range(stages)])
        feed_whole = full_batch or mode == "stand_alone"
        _check_pipeline_feed(arrays, n, feed_whole, ctx)

        scale = 1 if feed_whole else n
        whole_args = tuple(_spec(a, scale, 1) for a in args)
        micro_args = tuple(_spec(a, scale, micro) for a in args)
        annotate = annotate or (lambda g: g)      # the joint plan's stages and recompute marks
        graph = self.graph = annotate(trace(network, micro_args, {}).graph)
        self.whole = None       # the whole-batch trace, for dropout's whole-batch indices
        if any(isinstance(node.prim, Dropout) and node.prim.attrs["keep_prob"] < 1.0 for node in graph.nodes):
            self.whole = annotate(trace(network, whole_args, {}).graph)
            _check_same_ops(graph, self.whole)
        self.targets = loss_targets(graph, params, type(network).__name__)
        self.loss_dtype = graph.spec(self.targets.loss).dtype
        self.params = list(params)
        wrt = list(self.targets.wrt)        # None: a parameter the loss does not use (zero gradients)
        assign = assign_stages(graph, stages * virtual, differentiable_values(graph, self.targets.used), virtual)
        saving = bool(ctx.strategy_ckpt_save_file)
        writer = saving and world.rank == 0           # plans every stage, to write them all
        self.plan: PipelinePlan = plan_pipeline(graph, assign, n, mode, feed_whole, plan_options or ctx.plan_options,
                                                stages=None if writer else self.chunks, ranks_stages=stages)
        if writer:
            save_pipeline_plan(ctx.strategy_ckpt_save_file, self.plan, feed_whole, plan_options or ctx.plan_options)
        if saving and world.size > 1:
            world.barrier()                           # the file is complete when compiling returns
        shared = self._shared_comms(wrt)
        self.grads = StageGradients(self._attach(wrt), ctx.slice_threshold, self.stage_comm, world, shared,
                                    comm_fusion=ctx.comm_fusion, optimizer_shard=ctx.parallel_optimizer_config)
        self.param_shards, self.shards, self.layouts = self.grads.param_shards, self.grads.shards, self.grads.layouts
        homes = [getattr(s, "layout", None) for s in self.param_shards]   # None: absent from this stage
        self.factors = gradient_factors(mode, ctx.mirror_mean, homes, n)
        feed = MicroFeed(micro, self.rows, self.rows * scale // micro)
        self.step_plan = self._build_stage(wrt, sens, feed)
        self.program = StagePrograms(self.step_plan.forward + self.step_plan.backward)
        self.input_groups = _feed_groups(len(arrays), self.step_plan.batch_inputs,
                                         None if mode == "stand_alone" else 0 if feed_whole else self.position)
        self.last_step = None
        self.last_memory: StepMemory | None = None   # the last measured step's

    # ---- building ------------------------------------------------------------------------
    def _shared_comms(self, wrt: list[int]) -> list[tuple[int, object]]:
        """(parameter index, communicator over its copies) for this rank's shared parameters
        held by several stages (chunks of one stage share one copy); the splits are collective
        over the world, made in one order on every rank."""
        n, p, by_stages = self.ranks_per_stage, self.stages, {}
        for i, v in enumerate(wrt):
            owners = tuple(sorted({c % p for c in self.plan.param_stages.get(v, ())}))
            if len(owners) > 1:
                by_stages.setdefault(owners, []).append(i)
        out = []
        for owners in sorted(by_stages):
            groups = [tuple(s * n + i for s in owners) for i in range(n)]
            groups += [(r,) for r in range(self.world.size) if r // n not in owners]
            comm = self.world.split(groups)
            if self.stage in owners:
                out += [(i, comm) for i in by_stages[owners]]
        return sorted(out, key=lambda e: e[0])

    def _attach(self, wrt: list[int | None]) -> list:
        """One entry per parameter (collective when replacing shards already attached). A
        parameter the loss does not use is held whole by the first stage (zero gradients),
        absent on the others."""
        plan, out = self.plan, []
        for p, v in zip(self.params, wrt):
            held = [c for c in self.chunks if v in plan.stages[c].local_of]
            if held:
                layout = plan.plans[held[0]].layouts[plan.stages[held[0]].local_of[v]]
                owner = plan.param_stages[v][0] % self.stages == self.stage
                out.append(attach(p, layout, self.world.rank, owner, self.world))
            elif v is None and self.stage == 0:
                layout = Layout.replicated(plan.plans[0].stage, len(p.shape))
                out.append(attach(p, layout, self.world.rank, True, self.world))
            else:
                out.append(attach(p, None, self.world.rank, False, self.world))
        return out

    def _build_stage(self, wrt: list[int], sens: float, feed: MicroFeed) -> StageStep:
        """This rank's chunks (one without virtual stages), gradient slots and transfers."""
        plan, p = self.plan, self.stages
        held = [i for i, v in enumerate(wrt) if any(v in plan.stages[c].local_of for c in self.chunks)]
        self._grad_index = {i: j for j, i in enumerate(held)}
        lowered = [self._lower_chunk(c, wrt, sens) for c in self.chunks]    # one order on every rank
        deferred = _common_reductions(lowered)
        if self.grads.optimizer_shard.shards_accumulation:    # level2: each micro-batch's slice, accumulated
            deferred = {i: r for i, r in deferred.items() if self.grads.sliced[i] is None}
        chunks, saved = [], 0
        for low in lowered:
            chunk, n_saved = self._chunk_step(low, deferred, feed)
            chunks.append(chunk)
            saved += n_saved
        self.grads.deferred = deferred
        self.saved_per_micro = saved
        clocks = [low.clock for low in lowered]
        self.comm_clock = clocks[0] if len(clocks) == 1 else ClockSum(clocks)
        wire = {v: (lay.local_shape(self.graph.spec(v).shape), self.graph.spec(v).dtype)
                for v, lay in plan.transfer.items()}
        assignment = plan.assignment
        mine_transfers = tuple(t for t in transfers(
            self.schedule, lambda st: [(c.value, c.dsts) for c in assignment.sent_by(st)],
            lambda st: [(c.value, c.src) for c in assignment.received_by(st) if c.needs_grad])
            if self.stage in (t.src % p, t.dst % p))
        return StageStep(stage=self.stage, ranks_per_stage=self.ranks_per_stage, position=self.position,
                         schedule=self.schedule, chunks=tuple(chunks), n_param_grads=len(held), wire=wire,
                         transfers=mine_transfers)

    def _lower_chunk(self, c: int, wrt: list[int], sens: float) -> _LoweredChunk:
        """Virtual stage c differentiated and lowered on the stage communicator, with its
        parameter gradients' final reductions taken out (see :func:`_common_reductions`)."""
        plan = self.plan
        sg, last = plan.stages[c], c == self.stages * self.virtual - 1
        mine = [(i, sg.local_of[v]) for i, v in enumerate(wrt) if v in sg.local_of]
        back = [x for x in sg.received if x.needs_grad]
        train, grads = differentiate(sg.graph, sg.objective, [lv for _, lv in mine] + [sg.value(x) for x in back],
                                     sens / self.micro if last else 1.0)
        delivered = [sg.value(x) for x in sg.sent] + ([sg.loss] if last else [])
        wanted = {sg.value(x): plan.transfer[x.value] for x in sg.sent}
        wanted.update({g: self.grads.sliced[i] for (i, _), g in zip(mine, grads) if self.grads.sliced[i]})
        local, _, _, clock = lower(train, delivered + list(grads), plan.plans[c], self.world.rank,
                                   self.stage_comm, output_layouts=wanted)
        for i, _ in mine:
            assert any(o is self.param_shards[i] for o in local.param_objs), "lowering did not take the stage shard"
        reduced, deferred = defer_reductions(local, len(delivered), len(mine))   # reduced once per step
        return _LoweredChunk(c, last, tuple(i for i, _ in mine), tuple(back), len(delivered), local, reduced,
                             deferred, clock)

    def _chunk_step(self, low: _LoweredChunk, deferred: dict, feed: MicroFeed) -> tuple[ChunkStep, int]:
        """The chunk's halves, its gradients' reductions left out where ``deferred`` takes
        them (once per step), kept in the program elsewhere; and the values it saves per
        micro-batch."""
        outputs = list(low.reduced.outputs)
        for j, i in enumerate(low.params):
            if low.deferred[j] is not None and i not in deferred:
                outputs[low.n_delivered + j] = low.local.outputs[low.n_delivered + j]
        graph = dataclasses.replace(low.reduced, outputs=tuple(outputs))
        sg = self.plan.stages[low.virtual_stage]
        cotangents = graph.inputs[len(graph.inputs) - len(sg.cotangent_inputs):]
        variants = self._micro_variants(graph, sg, feed)
        halves = [split_halves(g, low.n_delivered, cotangents) for g in variants]
        chunk = ChunkStep(
            virtual_stage=low.virtual_stage, forward=tuple(Program(h.forward, h.forward.outputs) for h in halves),
            backward=tuple(Program(h.backward, h.backward.outputs) for h in halves),
            batch_inputs=sg.batch_inputs, received=tuple(x.value for x in sg.received),
            sent=tuple((x.value, x.dsts) for x in sg.sent), has_loss=low.last,
            cotangents=tuple((x.value, d) for x, d in sg.cotangents), grads_back=tuple(x.value for x in low.back),
            grad_slots=tuple(self._grad_index[i] for i in low.params))
        return chunk, len(halves[0].saved)

    def _micro_variants(self, local: Graph, sg, feed: MicroFeed) -> list[Graph]:
        """The local graph with its traced forward ops named as in the whole graph (dropout
        keys come from names), once per micro-batch when it drops out (the masks differ)."""
        traced = iter(sg.origin)
        origin: dict[int, int] = {}                  # local node id -> global node id
        for node in local.nodes:
            if node.phase == FORWARD and not isinstance(node.prim, Redistribute):
                gid = next(traced, None)
                if gid is None:
                    break                            # the objective's ops follow the traced ones
                assert self.graph.nodes[gid].prim.kind == node.prim.kind
                origin[node.id] = gid
        drops = [nid for nid, gid in origin.items() if isinstance(local.nodes[nid].prim, Dropout)
                 and local.nodes[nid].prim.attrs["keep_prob"] < 1.0]
        micros = range(self.micro) if drops else [None]
        return [_rewrite(local, origin, drops, self.graph, self.whole, feed, k) for k in micros]

    # ---- running -------------------------------------------------------------------------
    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0):
        """(loss, this rank's gradient shards): the same call as ShardedGradProgram."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        self.world.stats.doing = f"{type(self).__name__} at step {step}"
        self.check(arrays, self.input_groups, step)
        per = self.rows // self.micro
        micro_batches = [[a[k * per:(k + 1) * per] if a.ndim else a for a in arrays] for k in range(self.micro)]
        meter = self.program.meter
        memory = StepMemory(micro_batches) if meter is not None else None
        result = run_step(self.step_plan, self.world, micro_batches, step, memory)
        self.last_step = result
        if memory is not None:   # the whole step, as TrainOneStepCell.memory_report reads it
            meter.last = memory.usage(result.losses[0] if result.losses else None, result.grads)
            self.last_memory = memory
        return self._loss(result.losses), scaled(self.grads.finish(result.grads, self._grad_index), self.factors)

    def _loss(self, losses: list) -> np.ndarray:
        """The mean of the micro-batch losses, on every rank."""
        if losses:
            total = np.sum(np.stack([np.asarray(x, np.float64) for x in losses]), axis=0) / self.micro
            loss = np.asarray(total, dtype=self.loss_dtype)
        else:
            loss = np.zeros((), dtype=self.loss_dtype)
        if self.stages > 1:
            loss = self.world.broadcast(loss, root=(self.stages - 1) * self.ranks_per_stage)
        return loss

    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full gradients on every rank (collective over the world)."""
        return self.grads.gathered(grads)

    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        """The gradients' global L2 norm, each element counted once."""
        return self.grads.global_norm(grads)

    def sync_weights(self) -> None:
        """After the optimizer step: all-gather optimizer-parallel slices (collective)."""
        self.grads.sync_weights()

    @property
    def in_flight(self) -> int:
        """Micro-batches whose saved values were alive at once in the last step (measured)."""
        return self.last_step.peak_in_flight if self.last_step is not None else 0


# ---- helpers ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _LoweredChunk:
    """One chunk lowered: ``local`` with every gradient reduction, ``reduced`` with the
    final ones taken out (``deferred[j]`` for parameter ``params[j]``, None where none)."""
    virtual_stage: int
    last: bool
    params: tuple[int, ...]          # parameter indices whose gradients it makes, in output order
    back: tuple                      # received crossings whose gradients it sends back
    n_delivered: int
    local: Graph
    reduced: Graph
    deferred: tuple
    clock: list


def _common_reductions(lowered: Sequence[_LoweredChunk]) -> dict[int, Redistribute]:
    """Parameter index -> the reduction applied once per step to its summed gradient: each
    parameter whose every chunk on this rank ends its gradient with the same reduction
    (two chunks sharing a weight: R(g1) + R(g2) = R(g1 + g2)). The others reduce inside
    their programs, so their chunks' gradients add up already reduced."""
    seen: dict[int, list] = {}
    for low in lowered:
        for i, r in zip(low.params, low.deferred):
            seen.setdefault(i, []).append(r)
    return {i: rs[0] for i, rs in seen.items()
            if rs[0] is not None and all(r is not None and r.attrs["redist"] == rs[0].attrs["redist"] for r in rs)}


class ClockSum:
    """Seconds spent redistributing, summed over the chunks' clocks (``[0]`` like the
    one-element list a single program keeps; setting it resets them all)."""

    def __init__(self, clocks: list[list[float]]):
        self.clocks = clocks

    def __getitem__(self, i: int) -> float:
        return sum(c[i] for c in self.clocks)

    def __setitem__(self, i: int, value: float) -> None:
        for k, c in enumerate(self.clocks):
            c[i] = value if k == 0 else 0.0


class StagePrograms:
    """The stage's programs (forward and backward halves) seen as one. ``meter`` (a
    MemoryMeter, as TrainOneStepCell.measure_memory sets it) measures whole steps: each
    half runs under its own meter (:mod:`autopar.runtime.pipeline.memory`) and the step's
    usage lands in ``meter.last``."""

    def __init__(self, programs: tuple):
        self.programs = programs
        self.meter = None


def _check_virtual(virtual: int, stages: int, micro: int) -> int:
    """Chunks per stage actually run: ``virtual``, checked, or 1 on one stage (nothing to
    interleave). Interleaving sends groups of ``stages`` micro-batches through each chunk."""
    if isinstance(virtual, bool) or not isinstance(virtual, int) or virtual < 1:
        raise ValueError(format_error(WHERE, "virtual_stages", "an int >= 1 (chunks of the layers per stage)",
                                      repr(virtual)))
    if stages == 1:
        return 1
    if virtual > 1 and micro % stages:
        raise ValueError(format_error(WHERE, "micro_size", f"a multiple of pipeline_stages={stages} with "
                                      f"virtual_stages={virtual} (interleaved 1F1B sends groups of {stages} "
                                      "micro-batches through each chunk, as Megatron-LM requires)", str(micro),
                                      f"use micro_size={stages * -(-micro // stages)}, or virtual_stages=1"))
    return virtual


def _batch_rows(arrays: list[np.ndarray], micro: int) -> int:
    """Rows along dim 0 shared by every array input with a dim, checked to split ``micro`` ways."""
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ValueError(format_error(WHERE, "micro_size", "an int >= 1", repr(micro)))
    batched = [(i, a) for i, a in enumerate(arrays) if a.ndim >= 1]
    if not batched:
        if micro > 1:
            raise ValueError(format_error(WHERE, "inputs", "an array with a batch dim to split into micro-batches",
                                          "only scalars", "feed a batch, or use micro_size=1"))
        return 1
    rows = batched[0][1].shape[0]
    for i, a in batched:
        if a.shape[0] != rows:
            raise ValueError(format_error(WHERE, f"input {i} dim 0", f"{rows} rows like input {batched[0][0]} "
                                          "(every array input is split into micro-batches along dim 0)",
                                          str(a.shape[0])))
    if rows % micro:
        raise ValueError(format_error(WHERE, "micro_size", f"a divisor of the batch ({rows} rows fed to this "
                                      "rank along dim 0)", str(micro), f"use a micro_size dividing {rows}"))
    return rows


def _feed_groups(n: int, read: Sequence[int], group: int | None) -> list[int]:
    """Per fed array: the group of ranks that must hold the same data of it -- ``group`` (0:
    every rank is fed the whole batch; the position in the stage: the replicas' slices) for
    the arrays this stage reads, NO_GROUP (compared with no rank) for the others, and for
    all when ``group`` is None (stand-alone: each rank trains on its own)."""
    mine = set(read)
    return [group if group is not None and k in mine else NO_GROUP for k in range(n)]


def _spec(a, scale: int, micro: int):
    """The global shape of one micro-batch of a fed argument (``scale`` ranks feed slices)."""
    if not isinstance(a, np.ndarray):
        return a
    if a.ndim == 0:
        return TensorSpec(a.shape, a.dtype)
    return TensorSpec((a.shape[0] * scale // micro,) + a.shape[1:], a.dtype)


def _check_same_ops(graph: Graph, whole: Graph) -> None:
    """The micro-batch trace must be the whole-batch trace with other batch sizes."""
    same = len(graph.nodes) == len(whole.nodes) and all(
        a.name == b.name for a, b in zip(graph.nodes, whole.nodes))
    if not same:
        raise ValueError(format_error(WHERE, "network", "the same ops for a micro-batch as for the whole batch",
                                      f"{len(graph.nodes)} ops vs {len(whole.nodes)}",
                                      "do not branch on the batch size in construct"))


def _rewrite(local: Graph, origin: dict[int, int], drops: list[int], graph: Graph, whole: Graph,
             feed: MicroFeed, k: int | None) -> Graph:
    """``local`` with traced forward ops renamed to their whole-graph names and, for
    micro-batch ``k``, dropouts masked with whole-batch indices."""
    drop_set = set(drops)

    def changes(node) -> dict:
        gid = origin.get(node.id)
        if gid is None:
            return {}
        change = {"name": graph.nodes[gid].name} if node.name != graph.nodes[gid].name else {}
        if k is not None and node.id in drop_set:
            g = graph.nodes[gid]
            micro_shape, whole_shape = graph.spec(g.outputs[0]).shape, whole.spec(whole.nodes[gid].outputs[0]).shape
            coords = whole_batch_coords(micro_shape, whole_shape, node.prim.attrs.get("region"), feed, k,
                                        f"{g.scope} (Dropout)")
            change["prim"] = MicroBatchDropout.of(node.prim, whole_shape, coords)
        return change
    return with_node_changes(local, changes)


__all__ = ["AbsentShard", "PipelineGradProgram", "Pipelined", "StageShard"]


class Pipelined:
    """What a cell is to be run as a pipeline: it holds the ``network`` that returns the loss,
    its ``micro_size`` (micro-batches per step), its ``pipeline_schedule`` ("1f1b",
    "gpipe") and ``virtual_stages`` (chunks per stage; > 1 interleaves). ``nn.PipelineCell``
    is the one implementation; defined here, below nn, so the runtime never asks nn what a
    cell is."""

    network: object
    micro_size: int
    pipeline_schedule: str
    virtual_stages: int = 1


def pipelined(cell, setting) -> bool:
    """Whether ``grad_program`` builds a pipeline program: for a PipelineCell (micro-batches,
    also on one stage), or whenever the context asks for pipeline_stages > 1."""
    return isinstance(cell, Pipelined) or (setting is not None and (setting.ctx.pipeline_stages > 1
                                                                     or setting.ctx.grad_accumulation_step > 1))


def pipeline_grad_program(cell, args: tuple, kwargs: dict, params: Sequence, sens: float, setting):
    """The pipeline program for ``cell`` (a PipelineCell, or a network taken as one
    micro-batch) under ``setting`` (``setting.parallel_setting()``; None: serial)."""
    if kwargs:
        raise ValueError(format_error(WHERE, "inputs", "positional inputs only", f"keywords {sorted(kwargs)}"))
    steps = setting.ctx.grad_accumulation_step if setting is not None else 1   # the context's accumulation
    if isinstance(cell, Pipelined):
        if steps > 1:
            raise ValueError(format_error(WHERE, "grad_accumulation_step", "1 with a PipelineCell (its micro_size "
                                          "counts the micro-batches)", str(steps), "set one of the two"))
        network, micro, schedule, virtual = cell.network, cell.micro_size, cell.pipeline_schedule, cell.virtual_stages
    else:
        network, micro, schedule, virtual = cell, steps, "1f1b", 1
    if setting is None:
        return PipelineGradProgram(network, args, params, current_world(), stages=1, micro=micro,
                                   schedule=schedule, mode="stand_alone", full_batch=True, sens=sens)
    return PipelineGradProgram(network, args, params, setting.world, stages=setting.ctx.pipeline_stages,
                               micro=micro, schedule=schedule, mode=setting.mode, full_batch=setting.full_batch,
                               sens=sens, ctx=setting.ctx, virtual=virtual)

"""The sharded counterpart of :class:`~autopar.runtime.compiled.GradProgram`: trace, plan,
lower for this rank, compile; then loss and this rank's gradient shards per call.

With optimizer parallel (``ctx.enable_parallel_optimizer``) the gradient of each weight it
slices comes out reduce-scattered into the weight's slice layout, the optimizer updates
that slice, and :meth:`ShardedGradProgram.sync_weights` all-gathers the new slices back
(see :mod:`autopar.runtime.optimizer_parallel`). With ``comm_fusion``, the gradients'
all-reduces go in buckets started during the backward pass (:mod:`autopar.runtime.fusion`).
At ``level3`` each weight's all-gathers start ``prefetch_layers`` layers ahead of their use
(:mod:`autopar.runtime.prefetch`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..context import ParallelContext
from ..errors import format_error
from ..ir.graph import Graph
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.spec import TensorSpec
from ..strategy.plan_source import PlanOptions, make_plan, save_plan
from ..strategy.sharding_plan import fed_splits, global_inputs, with_fed_inputs
from .autodiff import differentiate
from .consistency import ConsistencyCheck, feed_group
from .fusion import Fusion, fuse_gradient_reductions
from .optimizer_parallel import SliceShard, WeightGather, slice_layouts, slice_of
from .prefetch import held_weights, prefetch_weight_gathers
from .program import Program
from .protocol import TrainingProgram, gradient_factors, loss_targets, scaled, with_zeros
from .setting import DEFAULT_CONTEXT
from .shards import ParamShard, gather, global_norm, shard_of
from .spmd import lower
from .trace import trace


def fed_program_splits(args: tuple, devices: int, whole: bool, ctx: ParallelContext,
                       mode: str) -> tuple[tuple[int, ...], ...]:
    """How a sharded program's array inputs are split over the ``devices`` ranks it runs on
    (:func:`~autopar.strategy.sharding_plan.fed_splits`); one helper for the training and
    forward programs. A ``dataset_strategy`` tuple is read under ``semi_auto_parallel`` and
    ``auto_parallel`` (MindSpore's VirtualDataset); under ``data_parallel`` each rank's
    loader cuts the rows, so a tuple there is an error rather than ignored."""
    arrays = [a for a in args if isinstance(a, (np.ndarray, TensorSpec))]
    strategy = ctx.dataset_strategy
    if isinstance(strategy, tuple) and not whole and mode == "data_parallel":
        raise ValueError(format_error("dataset_strategy", "parallel_mode", "'semi_auto_parallel' or 'auto_parallel' "
                                      f"for a tuple ({strategy})", repr(mode),
                                      "use dataset_strategy='data_parallel' (or 'full_batch') under data_parallel"))
    return fed_splits([tuple(a.shape) for a in arrays], devices, whole, strategy)


class ShardedGradProgram(TrainingProgram):
    """Loss and local gradient shards of ``params`` on one rank of ``world``.

    Inputs are what this rank is fed: its slice of the batch (``full_batch=False``), the
    whole batch, or its block of each input under a ``dataset_strategy`` tuple
    (:func:`fed_program_splits`). The loss comes back whole on every rank; gradients come back as this
    rank's shards in :attr:`layouts`, aligned with :attr:`shards` (what an optimizer
    updates: the ParamShard of each parameter, or under optimizer parallel the SliceShard
    of it that this rank updates; :attr:`param_shards` are always the ParamShards)."""

    def __init__(self, cell, args: tuple, params: Sequence, mode: str, world, full_batch: bool = False,
                 sens: float = 1.0, ctx: ParallelContext = DEFAULT_CONTEXT,
                 annotate: Callable[[Graph], Graph] | None = None, plan_options: PlanOptions | None = None):
        world.stats.doing = f"compiling {type(self).__name__}"     # named by the watchdog's reports
        # before any collective: a rank with another model or batch shape would pair them wrongly
        self.check = ConsistencyCheck(type(self).__name__, world, params,
                                      [a for a in args if isinstance(a, np.ndarray)])
        stage = Mesh((world.size,), ("devices",), tuple(range(world.size)))
        feed_whole = full_batch or mode == "stand_alone"
        splits = fed_program_splits(args, world.size, feed_whole, ctx, mode)      # per array input, per dim
        graph = trace(cell, global_inputs(args, splits), {}).graph
        if annotate is not None:               # the joint plan's recompute marks
            graph = annotate(graph)
        self.targets = loss_targets(graph, params, type(cell).__name__)
        self.forward_graph, self.stage, self.feed_whole = graph, stage, feed_whole   # what the plan was made for
        self.graph, grads = differentiate(graph, self.targets.loss, self.targets.used, sens)
        options = plan_options or ctx.plan_options    # the joint plan's, or the context's
        self.plan_options = options
        self.plan = with_fed_inputs(make_plan(graph, mode, stage, feed_whole, options), graph, splits)
        if ctx.strategy_ckpt_save_file:
            trained = [p.name for p in params]          # the optimizer's order, then any frozen weight
            save_plan(ctx.strategy_ckpt_save_file, graph, self.plan, feed_whole, options,
                      param_order=trained + [n for n in graph.param_names() if n not in set(trained)])
        # the layouts lower gives the parameters; one the loss does not use is held whole
        homes = [self.plan.layouts.get(v) or Layout.replicated(self.plan.stage, len(p.shape))
                 for v, p in zip(self.targets.wrt, params)]
        opt = ctx.parallel_optimizer_config
        sliced = slice_layouts(params, homes, ctx.slice_threshold, opt.shard_size)
        used_sliced = [lay for v, lay in zip(self.targets.wrt, sliced) if v is not None]
        wanted = {g: lay for g, lay in zip(grads, used_sliced) if lay is not None}
        # ZeRO-3 (optimizer_level "level3"): a rank holds its slices, gathered where used
        held = {v: lay for v, lay in zip(self.targets.wrt, sliced) if v is not None and lay is not None} \
            if opt.shards_weights else {}
        self.local_graph, _, self.out_layouts, self.comm_clock = lower(
            self.graph, (self.targets.loss,) + grads, self.plan, world.rank, world, output_layouts=wanted,
            param_layouts=held)
        self.local_graph, self.prefetch = prefetch_weight_gathers(self.local_graph, held_weights(self.local_graph),
                                                                  opt.prefetch_layers)
        self.fusion = self._fuse(ctx.comm_fusion.gradient_rules(), len(params))
        self.program = Program(self.local_graph, self.local_graph.outputs)
        self.param_shards = self._param_shards(graph, params, [held.get(v, home) for v, home in
                                                               zip(self.targets.wrt, homes)], world)
        self.shards = [s if lay is None or s.per_use else slice_of(s, lay) for s, lay in zip(self.param_shards, sliced)]
        out = iter(self.out_layouts[g] for g in grads)      # the layouts the gradients come out in
        self.layouts = [next(out) if v is not None else s.layout for v, s in zip(self.targets.wrt, self.shards)]
        self.factors = gradient_factors(mode, ctx.mirror_mean, homes, world.size)
        self.world = world
        self.input_groups = [feed_group(self.plan.layouts.get(v), world.rank) for v in graph.inputs if v is not None]
        for s in self.param_shards:       # the Parameter now reads through its shard
            if s.param._shard is None or s.param._shard[0] is not s:
                s.param.attach_shard(s, world)
        self._weight_gather = WeightGather([s for s in self.shards if isinstance(s, SliceShard)], world,
                                           ctx.comm_fusion.rule("allgather"))

    def _fuse(self, rules: dict, n_params: int) -> Fusion:
        """Bucket the gradients' all-reduces and reduce-scatters (``comm_fusion``; nothing
        without rules): started during the backward pass, waited for at its end
        (autopar/runtime/fusion.py)."""
        if not rules:
            return Fusion(())
        used = [i for i, v in enumerate(self.targets.wrt) if v is not None]   # parameter of each gradient output
        self.local_graph, fusion = fuse_gradient_reductions(self.local_graph, 1, used, rules, n_params)
        return fusion

    def _param_shards(self, graph, params: Sequence, homes: Sequence[Layout], world) -> list[ParamShard]:
        """This rank's shard of each parameter: the one lowering made (in its home layout),
        or for a parameter the loss does not use, its whole value (replicated)."""
        pos = {v: i for i, v in enumerate(graph.params)}
        out = []
        for p, v, home in zip(params, self.targets.wrt, homes):
            s = self.local_graph.param_objs[pos[v]] if v is not None else shard_of(p, home, world.rank)
            assert s.layout == home
            out.append(s)
        return out

    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0):
        """(loss, this rank's gradient shards); the same call as the serial GradProgram."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        self.world.stats.doing = f"{type(self).__name__} at step {step}"
        self.check(arrays, self.input_groups, step)
        outs = self.program.run(arrays, step)
        return outs[0], scaled(with_zeros(outs[1:], self.targets, self.shards), self.factors)

    def sync_weights(self) -> None:
        """After the optimizer updated :attr:`shards`: all-gather the slices it updated back
        into the parameters' layouts (collective; nothing without optimizer parallel)."""
        self._weight_gather()

    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full gradients on every rank (collective)."""
        return [gather(g, lay, s.param.shape, self.world) for g, lay, s in zip(grads, self.layouts, self.shards)]

    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        """The gradients' global L2 norm, each element counted once across ranks."""
        return global_norm(zip(grads, self.layouts), self.world)

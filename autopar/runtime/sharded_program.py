"""The sharded counterpart of :class:`~autopar.runtime.compiled.GradProgram`: trace, plan,
lower for this rank, compile; then loss and this rank's gradient shards per call.

With optimizer parallel (``ctx.enable_parallel_optimizer``) the gradient of each weight it
slices comes out reduce-scattered into the weight's slice layout, the optimizer updates
that slice, and :meth:`ShardedGradProgram.sync_weights` all-gathers the new slices back
(see :mod:`autopar.runtime.optimizer_parallel`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ops.primitive import TensorSpec
from ..strategy.layout import Layout
from ..strategy.mesh import Mesh
from ..strategy.plan import make_plan
from .compiled import ConsistencyCheck, feed_group
from .optimizer_parallel import SliceShard, WeightGather, slice_layouts, slice_of
from .shards import gather, global_norm
from .spmd import lower


class ShardedGradProgram:
    """Loss and local gradient shards of ``params`` on one rank of ``world``.

    Inputs are what this rank is fed: its slice of the batch (``full_batch=False``) or the
    whole batch. The loss comes back whole on every rank; gradients come back as this
    rank's shards in :attr:`layouts`, aligned with :attr:`shards` (what an optimizer
    updates: the ParamShard of each parameter, or under optimizer parallel the SliceShard
    of it that this rank updates; :attr:`param_shards` are always the ParamShards)."""

    def __init__(self, cell, args: tuple, params: Sequence, mode: str, world, full_batch: bool = False,
                 sens: float = 1.0, ctx=None):
        from .autodiff import differentiate
        from .program import Program
        from .trace import trace
        world.stats.doing = f"compiling {type(self).__name__}"     # named by the watchdog's reports
        # before any collective: a rank with another model or batch shape would pair them wrongly
        self.check = ConsistencyCheck(type(self).__name__, world, params,
                                      [a for a in args if isinstance(a, np.ndarray)])
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
        self.plan = make_plan(graph, mode, stage, feed_whole, ctx)
        homes = [self.plan.layouts.get(v) or Layout.replicated(self.plan.stage, len(p.shape))
                 for v, p in zip(wrt, params)]    # the layouts lower gives the parameters
        sliced = slice_layouts(ctx, params, homes)
        self.local_graph, _, self.out_layouts, self.comm_clock = lower(
            self.graph, (loss,) + grads, self.plan, world.rank, world,
            output_layouts={g: lay for g, lay in zip(grads, sliced) if lay is not None})
        self.program = Program(self.local_graph, self.local_graph.outputs)
        order = {id(p): i for i, p in enumerate(self.local_graph.param_objs)}
        pos = {v: i for i, v in enumerate(graph.params)}
        self.param_shards = [self.local_graph.param_objs[pos[by_id[id(p)]]] for p in params]
        assert all(id(s) in order for s in self.param_shards)
        assert all(s.layout == h for s, h in zip(self.param_shards, homes))
        self.shards = [s if lay is None else slice_of(s, lay) for s, lay in zip(self.param_shards, sliced)]
        self.layouts = [self.out_layouts[g] for g in grads]
        self.world = world
        self.input_groups = [feed_group(self.plan.layouts.get(v), world.rank) for v in graph.inputs if v is not None]
        for s in self.param_shards:       # the Parameter now reads through its shard
            if s.param._shard is None or s.param._shard[0] is not s:
                s.param.attach_shard(s, world)
        self._weight_gather = WeightGather([s for s in self.shards if isinstance(s, SliceShard)], world)

    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0):
        """(loss, this rank's gradient shards); the same call as the serial GradProgram."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        self.world.stats.doing = f"{type(self).__name__} at step {step}"
        self.check(arrays, self.input_groups, step)
        outs = self.program.run(arrays, step)
        return outs[0], outs[1:]

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

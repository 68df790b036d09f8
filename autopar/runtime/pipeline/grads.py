"""A pipeline rank's parameter gradients after its micro-batches: reduced once per step,
summed over the copies of shared parameters, sliced under optimizer parallel.

Once per step. Lowering ends a parameter's gradient in the parameter's layout: for a weight
replicated over the stage's data-parallel ranks, an all-reduce of a partial sum (under
optimizer parallel, a reduce-scatter into its slice layout). :func:`defer_reductions`
takes that last redistribution out of the stage program; the runner sums the micro-batches'
unreduced gradients and :meth:`StageGradients.finish` applies it once to the sum.
Redistributions are linear, so

    R(g_1) + ... + R(g_m) = R(g_1 + ... + g_m)          m times fewer collectives

(equal up to the order of float additions). A gradient whose last step is not a
redistribution (parts of different layouts settled before one sum) keeps its reductions
inside the program, per micro-batch. With ``comm_fusion``, the deferred all-reduces go in
buckets (one collective per bucket, autopar/runtime/fusion.py), and so do their
reduce-scatters under optimizer parallel and the all-gathers of the updated slices; the
buckets start together and are waited for after the other deferred reductions.

Then, per step:

=======================  ================================  =================================
parameter                gradient handed to the optimizer   after the update
=======================  ================================  =================================
on this stage only       the stage's sum                   --
on several stages        all-reduce over the copies (the    each copy updated alike: they
(a tied word table)      same block on every stage)         stay identical
sliced (optimizer        this rank's slice (reduce-         all-gather of the slices over
parallel)                scattered over the stage's         the stage's replicas
                         replicas: once per step, or per
                         micro-batch under level2)
not on this stage        zeros of shape (0, ...)            --
=======================  ================================  =================================

Optimizer parallel works inside each stage: a weight's replicas are the ranks of its stage
that hold the same block (:func:`~autopar.strategy.optimizer_shard.slice_layout` on the
stage mesh), so optimizer state per rank falls by the stage's data-parallel degree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ...backend import array_module, to_host
from ...comm.fusion import DEFAULT_COMM_FUSION, CommFusion, Fusible, plan_buckets
from ...ir.graph import Graph
from ...strategy.optimizer_shard import DEFAULT_OPTIMIZER_SHARD, OptimizerShard
from ..fusion import InFlight, bucketable, finish_bucket, start_bucket
from ..optimizer_parallel import SliceShard, WeightGather, slice_layout, slice_of
from ..shards import global_norm
from ..spmd import Redistribute
from .shards import StageShard


def defer_reductions(local: Graph, first: int, count: int) -> tuple[Graph, tuple]:
    """``local`` with outputs ``first .. first+count-1`` taken before their final
    redistribution, and those redistributions (None where an output has none to defer: it
    is not made by a Redistribute, or another node reads the redistributed value)."""
    readers: dict[int, int] = {}
    for n in local.nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    made_by = {o: n for n in local.nodes for o in n.outputs}
    outputs, deferred = list(local.outputs), []
    for j in range(first, first + count):
        node = made_by.get(outputs[j])
        if node is None or not isinstance(node.prim, Redistribute) or readers.get(outputs[j]) \
                or outputs.count(outputs[j]) > 1:
            deferred.append(None)
            continue
        outputs[j] = node.inputs[0]
        deferred.append(node.prim)
    return dataclasses.replace(local, outputs=tuple(outputs)), tuple(deferred)


class StageGradients:
    """One pipeline rank's view of the parameters' gradients and optimizer shards.

    ``shared``: (parameter index, communicator over its copies) for parameters on several
    stages. ``param_shards[i]``: the rank's :class:`StageShard` of parameter i, or an AbsentShard.
    ``shards[i]``: what the optimizer updates -- the StageShard, its :class:`SliceShard`
    under optimizer parallel, or the AbsentShard. ``layouts[i]``: the layout of the gradient
    handed over (the shard's; None when absent)."""

    def __init__(self, param_shards: Sequence, slice_threshold: int | None, stage_comm, world, shared: Sequence = (),
                 comm_fusion: CommFusion = DEFAULT_COMM_FUSION, optimizer_shard: OptimizerShard = DEFAULT_OPTIMIZER_SHARD):
        self.rules = comm_fusion.gradient_rules()       # collective -> rule; none: each deferred reduction alone
        self.param_shards = list(param_shards)
        self.world, self.stage_comm = world, stage_comm
        self.optimizer_shard = optimizer_shard
        self.sliced = [slice_layout(s.layout, s.param.shape, np.dtype(s.dtype).itemsize, slice_threshold,
                                    optimizer_shard.shard_size, s.name)
                       if slice_threshold is not None and isinstance(s, StageShard) else None
                       for s in self.param_shards]
        self.shards = [s if lay is None else slice_of(s, lay) for s, lay in zip(self.param_shards, self.sliced)]
        self.layouts = [lay or getattr(s, "layout", None) for s, lay in zip(self.param_shards, self.sliced)]
        self._weight_gather = WeightGather([s for s in self.shards if isinstance(s, SliceShard)], stage_comm,
                                           comm_fusion.rule("allgather"))
        self.shared = list(shared)                       # (parameter index, communicator over its copies)
        self.deferred: dict[int, Redistribute] = {}     # parameter index -> its once-per-step reduction,
                                                         # set once the stage program is lowered

    def finish(self, stage_grads: list, grad_index: dict[int, int]) -> list[np.ndarray]:
        """The summed stage gradients (``stage_grads[grad_index[i]]`` for parameter i) made
        into the optimizer's: reduced once, summed over copies; zeros for absent parameters."""
        buckets = self._buckets([stage_grads[grad_index[i]] for i in self.deferred])
        flights = [(b, self._start(b, stage_grads, grad_index)) for b in buckets]
        fused = {i for b in buckets for i in b}
        for i, r in self.deferred.items():
            if i not in fused:
                j = grad_index[i]
                stage_grads[j] = r.forward(stage_grads[j])
        for b, flight in flights:
            self._finish(b, flight, stage_grads, grad_index)
        for i, comm in self.shared:
            j = grad_index[i]
            stage_grads[j] = comm.allreduce(stage_grads[j])
        return [stage_grads[grad_index[i]] if i in grad_index else array_module(s.data).zeros(s.shape, s.dtype)
                for i, s in enumerate(self.shards)]       # zeros where the shard lives (host or device)

    def _buckets(self, grads: Sequence[np.ndarray]) -> list[list[int]]:
        """The deferred reductions' buckets, as parameter indices (none without rules);
        ``grads``: the gradients they reduce, in :attr:`deferred`'s order."""
        out = []
        for kind, rule in self.rules.items():
            mine = [(i, bucketable(r), g) for (i, r), g in zip(self.deferred.items(), grads)
                    if bucketable(r) is not None and bucketable(r)[0] == kind]
            items = [Fusible(i, g.nbytes, (how[1], g.dtype.str)) for i, how, g in mine]
            out += [[mine[k][0] for k in b] for b in plan_buckets(items, rule, len(self.param_shards))]
        return out

    def _start(self, bucket: list[int], stage_grads: list, grad_index: dict[int, int]) -> InFlight:
        kind, comm, _ = bucketable(self.deferred[bucket[0]])
        dims = [bucketable(self.deferred[i])[2] for i in bucket]
        return start_bucket(comm, [stage_grads[grad_index[i]] for i in bucket], kind, dims)

    def _finish(self, bucket: list[int], flight: InFlight, stage_grads: list, grad_index: dict[int, int]) -> None:
        redists = [self.deferred[i].attrs["redist"] for i in bucket]
        shapes = [r.dst.local_shape(r.shape) for r in redists]
        for i, g in zip(bucket, finish_bucket(flight, shapes)):
            stage_grads[grad_index[i]] = g

    def sync_weights(self) -> None:
        """After the optimizer updated :attr:`shards`: all-gather the updated slices back
        into the stage's blocks (collective on the stage; nothing without optimizer parallel)."""
        self._weight_gather()

    def _contributes(self, i: int) -> bool:
        """Whether this rank's gradient block of parameter i counts once in a world total:
        on the parameter's first stage, at coordinate 0 of the replicated axes."""
        s, lay = self.param_shards[i], self.layouts[i]
        if not isinstance(s, StageShard) or not s.owner:
            return False
        coord = lay.mesh.coord(s.rank)
        return not any(coord[a] for a in lay.replicated_axes())

    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full gradients on every rank (collective over the world)."""
        out = []
        for i, (g, s) in enumerate(zip(grads, self.param_shards)):
            full = np.zeros(s.param.shape, dtype=s.dtype)
            if self._contributes(i):
                full[self.layouts[i].slices(s.rank, s.param.shape)] = to_host(g)     # gathered on the host
            out.append(self.world.allreduce(full) if self.world.size > 1 else full)
        return out

    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        """The gradients' global L2 norm, each element counted once (a shared parameter on
        its first stage only)."""
        owned = ((g, self.layouts[i]) for i, (g, s) in enumerate(zip(grads, self.param_shards))
                 if isinstance(s, StageShard) and s.owner)
        return global_norm(owned, self.world)

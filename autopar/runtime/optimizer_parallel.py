"""Optimizer parallel (ZeRO stage 1, MindSpore's ``enable_parallel_optimizer``).

A weight whose layout replicates it over some mesh axes is held whole (its local block) by
every rank of those axes. With optimizer parallel, each of them keeps optimizer state for,
and updates, only a slice of that block:

=======================  ==================================  =====================================
per step and weight      without                             with optimizer parallel
=======================  ==================================  =====================================
gradient                 partial sum -> all-reduce           partial sum -> reduce-scatter into
                                                             the slice layout
update                   every replica, the whole block      each replica, its slice
optimizer state / rank   the block                           the block / replicas
weight                   --                                  all-gather of the new slices
=======================  ==================================  =====================================

The *slice layout* is the weight's layout with its replicated axes (size > 1, ascending)
appended to the first dim whose local size they divide. Worked example: a (128, 32)
weight in ``[S(y), R]`` on ``Mesh(x=2, y=2)`` is replicated over ``x``; its slice layout is
``[S(y,x), R]``: rank (x=1, y=0) holds rows 0:64 of the weight and updates rows 32:64.
The reduce-scatter is the lowering's redistribution of the gradient into that layout; the
all-gather is one collective per weight over the group of ``x`` (members ordered
row-major over the appended axes, which is the order of the sub-blocks). The replicated
axes are all those the weight is not split over, model-parallel ones included: under
dp2 x mp2 a LayerNorm gain is sliced 4 ways. A gradient computed whole on every replica
(no partial sum) needs no reduce-scatter: each rank just takes its slice.

A weight stays whole (updated redundantly, gradient all-reduced) when it is smaller than
``parallel_optimizer_threshold`` KB (its full logical size), replicates over no axis, or
has no dim whose local size the replica count divides.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backend import Backend, array_module
from ..comm.fusion import Fusible, FusionRule, plan_buckets
from ..ir.layout import Layout
from ..ir.mesh import common_refinement
from ..strategy.optimizer_shard import slice_layout
from .shards import ParamShard


def slice_layouts(params: Sequence, layouts: Sequence[Layout], threshold: int | None,
                  shard_size: int = -1) -> list[Layout | None]:
    """Per parameter, its slice layout (None: not sharded) when optimizer parallel slices
    weights of at least ``threshold`` KiB; all None when ``threshold`` is None (off: the
    context's :attr:`~autopar.context.ParallelContext.slice_threshold`)."""
    if threshold is None:
        return [None] * len(params)
    return [slice_layout(lay, p.shape, np.dtype(p.dtype).itemsize, threshold, shard_size, p.name)
            for p, lay in zip(params, layouts)]


class SliceShard(ParamShard):
    """The slice of a rank's :class:`ParamShard` that its optimizer updates under optimizer
    parallel: ``layout`` is the slice layout, ``region`` the slice's global region, and
    ``data`` a view into the parameter shard's block, so an in-place update writes there."""

    def __init__(self, base: ParamShard, layout: Layout):
        super().__init__(base.param, layout, base.rank)
        self.base = base
        self.local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(self.region, base.region))
        # the base layout on the slice's mesh (refined under optimizer_weight_shard_size)
        home = base.layout.refine(common_refinement(base.layout.mesh.shape, layout.mesh.shape)[0])
        self.dim = next(d for d, (a, b) in enumerate(zip(layout.dims, home.dims)) if a != b)
        self.axes = layout.dims[self.dim][len(home.dims[self.dim]):]   # the replicated axes sliced over

    @property
    def data(self) -> np.ndarray:
        return self.base.data[self.local]

    def device_data(self, backend: Backend):
        """The slice on ``backend``'s device: a view into its shard, placed there once."""
        return self.base.device_data(backend)[self.local]

    def __repr__(self) -> str:
        return f"SliceShard({self.name!r}, {self.layout}, rank {self.rank}, shape {self.shape})"


def slice_of(base: ParamShard, layout: Layout) -> SliceShard:
    """The slice of ``base`` in ``layout``; the same object for every program over this
    shard (a training and an evaluation program share what the optimizer updates)."""
    hit = base.optimizer_slices.get(layout)
    if hit is None:
        hit = base.optimizer_slices[layout] = SliceShard(base, layout)
    return hit


class WeightGather:
    """After an update: each sliced weight's new slices all-gathered into its layout, one
    all-gather per weight over the group of its replicated axes (communicators made here,
    once, in the same order on every rank). With a ``comm_fusion`` allgather rule, one
    all-gather per bucket of slices (same group and dtype) instead: the members' slices
    flattened end to end, gathered as (n, m) rows, row j cut back into member j's slices."""

    def __init__(self, slices: Sequence[SliceShard], world, rule: FusionRule | None = None):
        self.slices = list(slices)
        comms: dict = {}
        self.comms = []
        for s in self.slices:
            mesh = s.layout.mesh
            key = (mesh.shape, mesh.ranks, s.axes)
            if key not in comms:
                comms[key] = world.split(mesh.groups(list(s.axes)))
            self.comms.append(comms[key])
        items = [Fusible(k, s.data.nbytes, (id(c), np.dtype(s.dtype).str))
                 for k, (s, c) in enumerate(zip(self.slices, self.comms))]
        self.buckets = plan_buckets(items, rule, len(items)) if rule is not None else [[k] for k in range(len(items))]

    def __call__(self) -> None:
        for bucket in self.buckets:
            if len(bucket) == 1:
                s, comm = self.slices[bucket[0]], self.comms[bucket[0]]
                s.base.data[...] = comm.allgather(s.data, axis=s.dim)
            else:
                self._gather_bucket(bucket)

    def _gather_bucket(self, bucket: list[int]) -> None:
        slices, comm = [self.slices[k] for k in bucket], self.comms[bucket[0]]
        xp = array_module(slices[0].data)                 # where the weights live
        flat = xp.concatenate([s.data.reshape(-1) for s in slices])
        rows = comm.allgather(flat, axis=0).reshape(comm.size, flat.size)     # (n, m): row j is member j's slices
        at = 0
        for s in slices:
            size = s.data.size
            parts = [row[at:at + size].reshape(s.data.shape) for row in rows]
            s.base.data[...] = xp.concatenate(parts, axis=s.dim)
            at += size

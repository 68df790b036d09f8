"""Parameter shards: what one rank holds of each weight, gathering it back whole, and the
gradients' global norm (over ranks, or of one rank's whole gradients)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from ..backend import Backend, array_module, to_device, to_host
from ..ir.layout import Layout
from ..ir.spec import TensorSpec
from ..ops.norm import sum_of_squares


class ParamShard:
    """A rank's shard of a Parameter, as the runtime and optimizers see it: ``name``,
    local ``shape``, ``dtype`` and ``data`` (generated from the initializer for just this
    region, or cut from data the user set)."""

    def __init__(self, param, layout: Layout, rank: int):
        self.param, self.layout, self.rank = param, layout, rank
        self.name, self.dtype, self.requires_grad = param.name, param.dtype, param.requires_grad
        self.region = layout.slices(rank, param.shape)
        self.spec = TensorSpec(layout.local_shape(param.shape), param.dtype)
        self.shape, self.ndim, self.size = self.spec.shape, self.spec.ndim, self.spec.size
        self._data: np.ndarray | None = None
        self.optimizer_slices: dict = {}   # slice layout -> SliceShard (optimizer_parallel.slice_of)
        self.per_use = False               # a ZeRO-3 slice: programs gather the weight where they use it

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            p = self.param
            src = p._data[self.region] if p._data is not None else p.init_data(self.region)
            self._data = np.array(to_host(src), dtype=p.dtype)      # cut on the host; placed by device_data
        return self._data

    def device_data(self, backend: Backend):
        """The shard on ``backend``'s device, moved there on the first call and kept there
        (the optimizer updates it on the device), as ``Parameter.device_data``."""
        data = self.data
        if array_module(data) is not backend.xp:
            self._data = data = to_device(data, backend)
        return data

    def gather(self, world) -> np.ndarray:
        """The full logical value on every rank (collective; for users and tests)."""
        return gather(self.data, self.layout, self.param.shape, world)

    def __repr__(self) -> str:
        return f"ParamShard({self.name!r}, {self.layout}, rank {self.rank}, shape {self.shape})"


def gather(local: np.ndarray, layout: Layout, shape: Sequence[int], world) -> np.ndarray:
    """A sharded value made whole on every rank, on the host (a device ``local`` is copied
    there): one rank per block contributes its block (partial ranks all contribute), one
    all-reduce over the world. Not for the hot path."""
    full = np.zeros(tuple(shape), dtype=local.dtype)
    coord = layout.mesh.coord(world.rank)
    if not any(coord[a] for a in layout.replicated_axes()):
        full[layout.slices(world.rank, shape)] = to_host(local)
    return world.allreduce(full) if world.size > 1 else full


def shard_of(param, layout: Layout, rank: int) -> ParamShard:
    """The rank's shard of ``param`` in ``layout``: the one already in use when layouts
    agree (programs for training and evaluation share the weights the optimizer updates),
    else a new one cut from the current value (gathered first if another layout holds it:
    a collective, reached in the same order on every rank)."""
    attached = param._shard[0] if param._shard is not None else None
    if attached is not None and attached.layout == layout and attached.rank == rank:
        return attached
    if attached is not None:
        param.detach_shard()
    return ParamShard(param, layout, rank)


def global_norm(grads_and_layouts, world) -> float:
    """Global L2 norm of gradient shards, each element counted once across ranks: a shard
    held by r replicas adds its squared norm / r; one all-reduce sums the ranks."""
    total = 0.0
    for g, lay in grads_and_layouts:
        copies = math.prod(lay.mesh.shape[a] for a in lay.replicated_axes())
        flat = g.reshape(-1).astype(np.float64, copy=False)
        total += float(array_module(flat).dot(flat, flat)) / copies     # on the device g lives on
    if world.size > 1:
        total = float(world.allreduce(np.array(total)))
    return math.sqrt(total)


def local_norm(grads: Iterable[np.ndarray]) -> float:
    """sqrt of the sum of squares of every element of ``grads`` (float64 accumulation, on the
    host or the device the gradients live on: :func:`autopar.ops.norm.sum_of_squares`)."""
    return math.sqrt(sum_of_squares(grads))


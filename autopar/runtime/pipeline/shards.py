"""What a pipeline rank holds of each parameter: its stage's shard, or nothing.

Every rank gets one entry per parameter so optimizers see the same list everywhere:

* :class:`StageShard` -- the rank's shard in its stage's layout. A parameter read on two
  stages (a tied word table) has a copy on each; the copy on the earliest stage is the
  *owner*: reading the full value gathers from the owner's ranks only.
* :class:`AbsentShard` -- a parameter of another stage: an empty array (shape (0, ...)),
  so optimizer steps on it do nothing.

Reading ``Parameter.data`` gathers over the world (a collective: every rank reads the same
parameters in the same order), as with the sharded program.
"""
from __future__ import annotations

import numpy as np

from ...backend import to_host
from ...ir.layout import Layout
from ..shards import ParamShard


class StageShard(ParamShard):
    """A rank's shard of a parameter on its stage; ``owner``: this stage's copy is gathered."""

    def __init__(self, param, layout: Layout, rank: int, owner: bool):
        super().__init__(param, layout, rank)
        self.owner = owner

    def contributes(self) -> bool:
        """Whether this rank's block goes into the gathered value (one copy of each block)."""
        coord = self.layout.mesh.coord(self.rank)
        return self.owner and not any(coord[a] for a in self.layout.replicated_axes())

    def gather(self, world) -> np.ndarray:
        full = np.zeros(self.param.shape, dtype=self.param.dtype)
        if self.contributes():
            full[self.region] = to_host(self.data)      # gathered on the host
        return world.allreduce(full) if world.size > 1 else full


class AbsentShard:
    """A parameter this rank's stage does not read: nothing held, nothing updated."""

    layout = None
    owner = False

    def __init__(self, param, rank: int):
        self.param, self.rank = param, rank
        self.name, self.dtype, self.requires_grad = param.name, param.dtype, param.requires_grad
        self.shape = (0,) * len(param.shape)
        self.ndim, self.size = len(self.shape), 0
        self.region = tuple(slice(0, 0) for _ in param.shape)
        self._data = np.zeros(self.shape, dtype=param.dtype)

    @property
    def data(self) -> np.ndarray:
        return self._data

    def contributes(self) -> bool:
        return False

    def gather(self, world) -> np.ndarray:
        full = np.zeros(self.param.shape, dtype=self.param.dtype)
        return world.allreduce(full) if world.size > 1 else full

    def __repr__(self) -> str:
        return f"AbsentShard({self.name!r}, rank {self.rank})"


def attach(param, layout: Layout | None, rank: int, owner: bool, world):
    """The rank's entry for ``param`` (None layout: absent), attached so the Parameter reads
    through it; the one already attached is kept when it is the same."""
    cur = param._shard[0] if param._shard is not None else None
    if layout is None and isinstance(cur, AbsentShard):
        return cur
    if (isinstance(cur, StageShard) and cur.layout == layout and cur.rank == rank and cur.owner == owner):
        return cur
    if cur is not None:
        param.detach_shard()            # gathers the value it had (collective)
    new = AbsentShard(param, rank) if layout is None else StageShard(param, layout, rank, owner)
    param.attach_shard(new, world)
    return new

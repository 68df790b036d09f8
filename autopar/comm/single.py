"""The one-rank communicator: every collective is a copy; no MPI needed.

What ``world()`` returns for a process not launched under ``mpiexec`` (or launched with
``-n 1``), so the same script runs serially.
"""
from __future__ import annotations

import numpy as np

from .base import CommStats, Communicator
from .checks import CommChecks


class SelfCommunicator(Communicator):
    """A group of one: rank 0 of size 1, world rank 0."""

    def __init__(self, stats: CommStats | None = None, checks: CommChecks | None = None):
        super().__init__(stats if stats is not None else CommStats(), checks)

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    @property
    def ranks(self) -> tuple[int, ...]:
        return (0,)

    def _allreduce(self, x, op):
        return x.copy()

    def _allgather(self, x, axis):
        return x.copy()

    def _reduce_scatter(self, x, axis):
        return x.copy()

    def _alltoall(self, x, split_axis, concat_axis):
        return x.copy()

    def _broadcast(self, x, root):
        return x.copy()

    def _send(self, x, dest, tag):
        raise AssertionError("unreachable: a one-rank group has no other member to send to")

    def _recv(self, shape, dtype, source, tag) -> np.ndarray:
        raise AssertionError("unreachable: a one-rank group has no other member to receive from")

    def _barrier(self):
        pass

    def _split(self, groups, index):
        return SelfCommunicator(self.stats, self.checks)

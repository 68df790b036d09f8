"""The cross-rank agreement checks a sharded or pipeline program runs at compile and every
few calls (the facts and the all-gather that compares them: :mod:`autopar.comm.consistency`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..comm.consistency import MAX_FACTS, NO_GROUP, Fact, agree, digest


def feed_group(layout, rank: int) -> int:
    """Ranks fed the same block of an input (the same group) must hold the same data; an
    input the plan gives no layout (None) is compared with no other rank."""
    return NO_GROUP if layout is None else digest(layout.block_index(rank))


class ConsistencyCheck:
    """The cross-rank agreement checks of one sharded or pipeline program
    (:mod:`autopar.comm.consistency`), on every rank of ``world``.

    At compile (construction): the model -- parameter names, shapes, dtypes -- and the
    shapes of the fed arrays, on every rank. Then, at the first call and every
    ``world.checks.check_interval``-th (every call in debug mode, never at 0): the step
    counter on every rank, and each input among the ranks fed the same data of it
    (``groups[k]``: ranks with the same group >= 0 must hold the same input k). Calls are
    counted, not steps, so that every rank checks at the same call even when the step
    counters differ. One all-gather of a few int64 per check."""

    def __init__(self, program: str, world, params: Sequence, arrays: Sequence[np.ndarray]):
        self.program, self.world = program, world
        self.interval = world.checks.check_interval if world.size > 1 else 0
        self.calls = 0
        if not self.interval:
            return
        model = tuple(f"parameter {p.name} shape {tuple(p.shape)} {np.dtype(p.dtype)}" for p in params)
        shapes = tuple(f"input {k} shape {a.shape} {a.dtype}" for k, a in enumerate(arrays))
        agree(world, [
            Fact("model", digest(*model), "the same parameters (names, shapes, dtypes) on every rank",
                 "build the same network with the same config on every rank", items=model),
            Fact("inputs", digest(*shapes), "the same number of arrays, shapes and dtypes fed to every rank",
                 "feed every rank a batch of the same shape (its slice under data parallelism)", items=shapes),
        ], f"{program} (consistency check at compile)")

    def __call__(self, arrays: Sequence[np.ndarray], groups: Sequence[int], step: int) -> None:
        calls, self.calls = self.calls, self.calls + 1
        if not self.interval or calls % self.interval:
            return
        facts = [Fact("step counter", int(step), "the same step on every rank",
                      "every rank must run the same steps: one ran more, or resumed from another checkpoint",
                      literal=True)]
        for k, (a, group) in enumerate(zip(arrays, groups)):
            if len(facts) == MAX_FACTS:
                break
            facts.append(Fact(f"input {k}", digest(a), "the same data on the ranks that are fed the same batch "
                              "(model-parallel peers, full_batch, pipeline stages of one replica)",
                              "feed each rank its data from the same source, order and seed", group=group))
        agree(self.world, facts, f"{self.program} (consistency check at call {calls})")

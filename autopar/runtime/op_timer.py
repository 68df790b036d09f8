"""Time every instruction of one run of a Program, summed per op kind (a backward
instruction counts for its forward op's kind, a redistribution as ``comm``). For
calibration and benchmarks; the normal step loop never pays for it."""
from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import numpy as np

from .program import Program
from .spmd import Redistribute


def kind_of(program: Program, node) -> str:
    """The op kind an instruction is charged to."""
    fwd = node if node.forward_of is None else program.graph.nodes[node.forward_of]
    return "comm" if isinstance(fwd.prim, Redistribute) else fwd.prim.kind


def time_ops(program: Program, inputs: Sequence[np.ndarray], step: int = 0,
             clock: Callable[[], float] = time.perf_counter,
             before_comm: Callable[[], None] | None = None,
             timed: Callable[[int, Callable[[], object]], tuple[object, float]] | None = None,
             ) -> tuple[dict[str, float], dict[str, int]]:
    """({kind: seconds}, {kind: instructions}) of one run, executed exactly as
    ``Program.run`` executes it (same slots, frees, random keys and deferred checks). ``before_comm`` (e.g.
    a barrier) runs before each redistribution, timed apart as ``comm wait``: the time
    ranks wait for each other inside collectives. ``timed(k, run)`` -> (result, seconds)
    times instruction ``k`` some other way than ``clock`` around it (a GPU's device time)."""
    if timed is None:
        def timed(_k, run):
            t0 = clock()
            out = run()
            return out, clock() - t0
    slots = program.initial_slots(inputs)
    deferred: list = []
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for k, ins in enumerate(program.instructions):
        args = [slots[i] for i in ins.ins]
        kind = kind_of(program, ins.node)
        if before_comm is not None and kind == "comm":
            t0 = clock()
            before_comm()
            seconds["comm wait"] = seconds.get("comm wait", 0.0) + clock() - t0
        keywords = program.keywords(k, ins.node, step, deferred)     # a random key, a list for deferred checks
        res, s = timed(k, functools.partial(ins.fn, *args, **keywords))
        seconds[kind] = seconds.get(kind, 0.0) + s
        counts[kind] = counts.get(kind, 0) + 1
        if len(ins.outs) == 1 and not isinstance(res, tuple):
            res = (res,)
        for o, r in zip(ins.outs, res):
            slots[o] = r
        for f in ins.frees:
            slots[f] = None
    if deferred:
        program.raise_failed_checks(deferred)
    return seconds, counts

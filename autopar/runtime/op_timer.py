"""Time every instruction of one run of a Program, summed per op kind (a backward
instruction counts for its forward op's kind, a redistribution as ``comm``). For
calibration and benchmarks; the normal step loop never pays for it."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from .program import Program


def kind_of(program: Program, node) -> str:
    """The op kind an instruction is charged to."""
    fwd = node if node.forward_of is None else program.graph.nodes[node.forward_of]
    kind = fwd.prim.kind
    return "comm" if kind == "Redistribute" else kind


def time_ops(program: Program, inputs: Sequence[np.ndarray], step: int = 0,
             clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict[str, int]]:
    """({kind: seconds}, {kind: instructions}) of one run, executed exactly as
    ``Program.run`` executes it (same slots, frees and random keys)."""
    slots: list = [None] * program.n_slots
    for v, a in zip(program.inputs, inputs):
        slots[v] = a
    for v, a in program.graph.consts.items():
        slots[v] = a
    for v, p in zip(program.graph.params, program.graph.param_objs):
        slots[v] = p.data
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for k, ins in enumerate(program.instructions):
        args = [slots[i] for i in ins.ins]
        t0 = clock()
        res = ins.fn(*args, key=program.rng_key(ins.node, step)) if k in program._rng_nodes else ins.fn(*args)
        dt = clock() - t0
        kind = kind_of(program, ins.node)
        seconds[kind] = seconds.get(kind, 0.0) + dt
        counts[kind] = counts.get(kind, 0) + 1
        if len(ins.outs) == 1 and not isinstance(res, tuple):
            res = (res,)
        for o, r in zip(ins.outs, res):
            slots[o] = r
        for f in ins.frees:
            slots[f] = None
    return seconds, counts

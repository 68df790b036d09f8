"""``recursive_programming``: the device count as repeated cuts, one prime factor at a time.

For N = f1 x f2 x ... devices (largest factor first), each cut lets every op either split
one more of its dims f ways or leave the new devices repeating the work, choosing for all
ops at once with the exact eliminations of :mod:`.elimination` on that small problem (at
most one candidate per dim plus "none"). Costs of a cut are the full model's, with the
devices not yet cut repeating the computation. Eleven cuts plan 2048 devices: the work
grows with log N instead of the number of ways to factor N over every dim.
"""
from __future__ import annotations

import math

from ...ir.graph import Node
from ...ops.sharding import OpSharding, from_strategy
from ..costmodel import CostModel
from .elimination import solve
from .problem import build, node_candidates, user_strategy


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return sorted(out, reverse=True)


def _splittable(node: Node, model: CostModel):
    """(indexing, input shapes, {letter: gcd of the dims it indexes}) or None (fixed op)."""
    g = model.graph
    specs = [g.spec(v) for v in node.inputs]
    out = g.spec(node.outputs[0])
    indexing = node.prim.indexing(specs, out)
    if indexing is None or user_strategy(node) is not None:
        return None
    sizes: dict[str, int] = {}
    for letters, shape in zip(indexing.inputs + (indexing.output,), [s.shape for s in specs] + [out.shape]):
        for ch, n in zip(letters, shape):
            sizes[ch] = math.gcd(sizes.get(ch, 0), n)
    in_letters = set("".join(indexing.inputs))
    free = {ch: n for ch, n in sizes.items() if ch in in_letters and ch not in indexing.fixed}
    return indexing, [s.shape for s in specs], free


def _sharding(indexing, shapes, counts: dict[str, int], model: CostModel) -> OpSharding:
    strategy = tuple(tuple(counts.get(ch, 1) for ch in letters) for letters in indexing.inputs)
    return from_strategy(indexing, strategy, shapes, model.stage)


def recursive(model: CostModel, lam: float = 0.0) -> dict[int, OpSharding]:
    """A sharding per forward op, by repeated cuts of the stage's devices."""
    info = {n.id: _splittable(n, model) for n in model.forward}
    counts: dict[int, dict[str, int]] = {n: {} for n in info}
    fixed = {n.id: node_candidates(model, n)[:1] for n in model.forward if info[n.id] is None}
    for f in prime_factors(model.stage.size):
        options: dict[int, list[dict[str, int]]] = {}
        restrict: dict[int, list[OpSharding]] = dict(fixed)
        for n, spec in info.items():
            if spec is None:
                continue
            indexing, shapes, free = spec
            opts = [counts[n]]
            for ch, size in free.items():
                k = counts[n].get(ch, 1) * f
                if size % k == 0:
                    opts.append({**counts[n], ch: k})
            options[n] = opts
            restrict[n] = [_sharding(indexing, shapes, c, model) for c in opts]
        choice, _ = solve(build(model, restrict), lam)
        for n, opts in options.items():
            counts[n] = opts[choice[n]]
    out = dict((n, c[0]) for n, c in fixed.items())
    for n, spec in info.items():
        if spec is not None:
            out[n] = _sharding(spec[0], spec[1], counts[n], model)
    return out

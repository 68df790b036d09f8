"""``dynamic_programming``: MindSpore's graph eliminations, then recovery.

The problem is a graph of cost tables: a vector per op (its candidates' costs) and a
matrix per edge. Eliminations shrink it while keeping the optimum, each remembering how
to recover the choice it removed:

=============  ==========================================================================
edge           two tables over the same ops are summed into one
merge          an op whose only neighbour consumes it: its best candidate for each of the
               neighbour's folds into the neighbour's vector
contract       an op whose only neighbour produces it: the same, folded the other way
op             an op between two others (a chain link): ``min_k A[a,k] + c[k] + B[k,b]``
               becomes one edge table between its neighbours
triangle       an op whose two neighbours are themselves joined: the same table is added
               to their existing edge
star           an op with three or more neighbours: one table over the neighbours'
               candidates (exact; taken last, cheapest first)
=============  ==========================================================================

When one op is left its best candidate is read off, and the eliminations are replayed
backwards: each removed op takes its remembered best choice given its neighbours'.
The result equals the brute-force optimum (a test), in time linear in the ops for
chains and trees, and small-polynomial for transformer blocks (residual branches make
triangles).
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .problem import Problem

STAR_LIMIT = 30_000_000   # most entries one elimination may build before refusing


@dataclass(frozen=True)
class Step:
    kind: str
    var: int
    neighbours: tuple[int, ...]
    best: np.ndarray          # argmin over the var's candidates, indexed by the neighbours' choices


class _Tables:
    """Cost tables over sets of ops: one per set (parallel tables summed on insert)."""

    def __init__(self, sizes: dict[int, int]):
        self.sizes = sizes
        self.by_vars: dict[tuple[int, ...], np.ndarray] = {}
        self.of: dict[int, set[tuple[int, ...]]] = {v: set() for v in sizes}
        self.edge_merges = 0

    def add(self, vars_: tuple[int, ...], table: np.ndarray) -> bool:
        """Add a table (axes in ``vars_`` order); True when one over the same ops existed."""
        order = np.argsort(vars_)
        key = tuple(vars_[k] for k in order)
        table = np.transpose(table, order) if len(key) > 1 else table
        if key in self.by_vars:
            self.by_vars[key] = self.by_vars[key] + table
            self.edge_merges += 1
            return True
        self.by_vars[key] = np.asarray(table, dtype=float)
        for v in key:
            self.of[v].add(key)
        return False

    def neighbours(self, v: int) -> set[int]:
        return {u for key in self.of[v] for u in key if u != v}

    def pop(self, v: int) -> list[tuple[tuple[int, ...], np.ndarray]]:
        out = []
        for key in list(self.of[v]):
            out.append((key, self.by_vars.pop(key)))
            for u in key:
                self.of[u].discard(key)
        del self.of[v]
        return out


def solve(problem: Problem, lam: float = 0.0) -> tuple[dict[int, int], Counter]:
    """The optimal candidate per op (indices) and the count of each elimination kind used."""
    sizes = problem.sizes()
    tables = _Tables(sizes)
    for n in problem.nodes:
        tables.add((n,), problem.unary[n] + lam * problem.memory[n])
    for (a, b), m in problem.pairs.items():
        tables.add((a, b), m)
    kinds: Counter = Counter(edge=tables.edge_merges)
    position = {n: k for k, n in enumerate(problem.nodes)}
    steps: list[Step] = []
    constant_choice: dict[int, int] = {}
    remaining = set(problem.nodes)
    heap = [(_elimination_cost(tables, v, sizes), v) for v in problem.nodes]
    heapq.heapify(heap)
    while remaining:
        prio, var = heapq.heappop(heap)
        if var not in remaining:
            continue
        now = _elimination_cost(tables, var, sizes)
        if now != prio:              # stale entry: its neighbourhood changed since it was pushed
            heapq.heappush(heap, (now, var))
            continue
        nbrs = tuple(sorted(tables.neighbours(var), key=position.get))
        if nbrs and math.prod(sizes[u] for u in nbrs) * sizes[var] > STAR_LIMIT:
            raise ValueError(f"dynamic_programming: eliminating op {var} would build a table of "
                             f"{math.prod(sizes[u] for u in nbrs) * sizes[var]:,} entries; use "
                             "search_mode='recursive_programming' for this graph and device count")
        kind = _kind(tables, var, nbrs, position)
        combined = _combine(tables.pop(var), nbrs + (var,), sizes)   # axes: nbrs..., var
        best = np.argmin(combined, axis=-1)
        if nbrs:
            tables.add(nbrs, np.min(combined, axis=-1))
        else:
            constant_choice[var] = int(best)
        kinds[kind] += 1
        steps.append(Step(kind, var, nbrs, best))
        remaining.discard(var)
        for u in nbrs:
            heapq.heappush(heap, (_elimination_cost(tables, u, sizes), u))
    choice = dict(constant_choice)
    for step in reversed(steps):
        if step.var not in choice:
            choice[step.var] = int(step.best[tuple(choice[u] for u in step.neighbours)])
    return choice, kinds


def _elimination_cost(tables: _Tables, v: int, sizes: dict[int, int]) -> tuple:
    """Cheapest first: fewest neighbours, then smallest table to build."""
    nbrs = tables.neighbours(v)
    return (min(len(nbrs), 3), math.prod(sizes[u] for u in nbrs) * sizes[v], v)


def _kind(tables: _Tables, var: int, nbrs: tuple[int, ...], position: dict[int, int]) -> str:
    if not nbrs:
        return "final"
    if len(nbrs) == 1:
        return "merge" if position[var] < position[nbrs[0]] else "contract"
    if len(nbrs) == 2:
        return "triangle" if tuple(sorted(nbrs)) in tables.by_vars else "op"
    return "star"


def _combine(parts, axes: tuple[int, ...], sizes: dict[int, int]) -> np.ndarray:
    """Sum of tables over subsets of ``axes``, broadcast to the full table over ``axes``."""
    shape = tuple(sizes[a] for a in axes)
    total = np.zeros(shape)
    for key, table in parts:
        # (key...) -> broadcastable over axes: move to axes order, unit dims elsewhere
        order = sorted(range(len(key)), key=lambda k: axes.index(key[k]))
        t = np.transpose(table, order) if len(key) > 1 else table
        view = [1] * len(axes)
        for k in order:
            view[axes.index(key[k])] = sizes[key[k]]
        total = total + t.reshape(view)
    return total

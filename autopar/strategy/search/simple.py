"""The other solvers of a :class:`~autopar.strategy.search.problem.Problem`.

* :func:`brute_force` -- every assignment (the reference the tests hold the others to);
* :func:`propagate` -- ``sharding_propagation``: ops with one candidate (the user's
  strategies) are fixed first; then, repeatedly, the op with the most fixed neighbours
  (reading a data input counts as one; ties: the most compute) takes the candidate
  cheapest given what is fixed: its own cost, the edges to fixed neighbours, and each free
  neighbour's best reply. One pass, no backtracking: fast, not optimal.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .problem import Problem

BRUTE_LIMIT = 20_000_000


def brute_force(problem: Problem, lam: float = 0.0) -> dict[int, int]:
    """The optimal assignment by enumeration: the last op vectorised, the rest looped."""
    nodes = problem.nodes
    sizes = [len(problem.cands[n]) for n in nodes]
    if math.prod(sizes) > BRUTE_LIMIT:
        raise ValueError(f"brute_force: {math.prod(sizes):,} assignments; expected at most {BRUTE_LIMIT:,}")
    last = nodes[-1]
    lead = nodes[:-1]
    best, best_choice = math.inf, None
    for combo in itertools.product(*(range(s) for s in sizes[:-1])):
        choice = dict(zip(lead, combo))
        vec = problem.unary[last] + lam * problem.memory[last]
        fixed = sum(float(problem.unary[n][k] + lam * problem.memory[n][k]) for n, k in choice.items())
        for (a, b), m in problem.pairs.items():
            if b == last:
                vec = vec + m[choice[a]]
            elif a == last:
                vec = vec + m[:, choice[b]]
            else:
                fixed += float(m[choice[a], choice[b]])
        k = int(np.argmin(vec))
        if fixed + vec[k] < best:
            best, best_choice = fixed + float(vec[k]), {**choice, last: k}
    return best_choice


def propagate(problem: Problem, lam: float = 0.0) -> dict[int, int]:
    """``sharding_propagation``: greedy, from the fixed ops outwards."""
    nbrs: dict[int, list[tuple[int, np.ndarray]]] = {n: [] for n in problem.nodes}
    for (a, b), m in problem.pairs.items():
        nbrs[a].append((b, m))
        nbrs[b].append((a, m.T))
    choice: dict[int, int] = {n: 0 for n in problem.nodes if len(problem.cands[n]) == 1}
    own = {n: problem.unary[n] + lam * problem.memory[n] for n in problem.nodes}
    model = problem.model
    fed = {n.id for n in model.forward if any(v in model.input_layouts for v in n.inputs)}
    weight = {n: float(np.min(own[n])) for n in problem.nodes}
    while len(choice) < len(problem.nodes):
        free = [n for n in problem.nodes if n not in choice]
        n = max(free, key=lambda v: (sum(u in choice for u, _ in nbrs[v]) + (v in fed), weight[v]))
        vec = own[n]
        for u, m in nbrs[n]:
            # fixed neighbours: the edge to their choice; free ones: their best reply
            vec = vec + (m[:, choice[u]] if u in choice else np.min(m + own[u][None, :], axis=1))
        choice[n] = int(np.argmin(vec))
    return choice

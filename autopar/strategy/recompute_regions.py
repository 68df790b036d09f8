"""Recompute regions: which forward nodes run again for backward, and which values stop being kept.

One rule, read by the cost model (to price a graph's marks) and by the runtime's recompute
pass (to rewrite the graph), so prediction and run agree.

Marks. A node is recomputed when its ``recompute`` flag is set. The tracer resolves the
user's marks into it: the op's own (``op.recompute()`` / ``op.recompute(False)``) when it
has one, else the innermost enclosing cell's explicit mark (``cell.recompute()`` /
``cell.recompute(False)``), else none.

Regions. A region is a maximal run of consecutive recomputed forward nodes, cut between
cell calls: a run whose nodes' common scope holds no node of the run itself (a container,
such as a ``CellList`` of marked blocks) is cut between that scope's children, again inside
each piece. So every marked block is its own region, and the attention core of a block --
its scores, mask add, softmax and context ops in ``blocks.3.attention`` and the dropout in
``blocks.3.attention.prob_dropout`` -- is one::

    whole blocks:    [blocks.0.*] [blocks.1.*] [blocks.2.*]         (common scope 'blocks': cut)
    attention core:  q, kT ─▶ [BatchMatMul ─▶ Add ─▶ Softmax ─▶ Dropout ─▶ BatchMatMul] ─▶ ctx

Values. A region keeps its inputs (values from outside it that its nodes read) and its
exits (values it makes that a forward node outside it reads, or a requested output); the
other values it makes are *internal*: they die in the forward pass, and the region's nodes
that make the internal values backward reads (with the region nodes those depend on) run
again before the backward reaches them -- their *rebuild set*.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import groupby

from ..ir.graph import FORWARD, Graph, Node


def _common_scope(scopes: Sequence[str]) -> tuple[str, ...]:
    """The longest dotted prefix every scope starts with, as parts."""
    split = [s.split(".") for s in scopes]
    common: list[str] = []
    for parts in zip(*split):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return tuple(common)


def _cut(run: list[Node]) -> list[list[Node]]:
    """A run of recomputed nodes cut into cell calls (module doc)."""
    common = _common_scope([n.scope for n in run])
    if any(tuple(n.scope.split(".")) == common for n in run):
        return [run]                                  # its common scope holds ops of its own
    depth = len(common)
    pieces = []
    for _, seg in groupby(run, key=lambda n: n.scope.split(".")[depth]):
        pieces += _cut(list(seg))
    return pieces


def recompute_regions(forward: Sequence[Node], marked: Sequence[bool]) -> dict[int, int]:
    """Forward node id -> region number, for the ``forward`` nodes (in order) that are
    ``marked`` recomputed (aligned with ``forward``)."""
    runs, run = [], []
    for node, mark in zip(forward, marked):
        if mark:
            run.append(node)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    out: dict[int, int] = {}
    for piece in (p for r in runs for p in _cut(r)):
        rid = len(set(out.values()))
        out.update((n.id, rid) for n in piece)
    return out


def internal_values(nodes: Iterable[Node], region: dict[int, int], outputs: Iterable[int]) -> dict[int, int]:
    """Value -> region, for the values a region makes that nothing outside it reads in the
    forward pass and that are no requested ``outputs``: the values it stops keeping."""
    nodes = list(nodes)
    made_in = {o: region[n.id] for n in nodes if n.id in region for o in n.outputs}
    kept = set(outputs)
    for n in nodes:
        if n.phase == FORWARD:
            kept.update(v for v in n.inputs if v in made_in and made_in[v] != region.get(n.id))
    return {v: r for v, r in made_in.items() if v not in kept}


def rebuild_set(graph: Graph, internal: dict[int, int], read_back: Iterable[int]) -> list[int]:
    """Node ids, in graph order, that re-make the internal values in ``read_back`` (all of
    one region): their producers and, through internal values, the producers those read."""
    todo, picked = list(read_back), set()
    region = internal[todo[0]] if todo else None
    while todo:
        node = graph.node_of(todo.pop())
        if node.id in picked:
            continue
        picked.add(node.id)
        todo.extend(v for v in node.inputs if internal.get(v) == region)
    return sorted(picked)

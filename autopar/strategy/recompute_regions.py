"""Recompute regions: which forward nodes run again for backward, and which values stop being kept.

One rule, read by the cost model (to price a graph's marks) and by the runtime's recompute
pass (to rewrite the graph), so prediction and run agree.

Marks. A node is recomputed when its ``recompute`` flag is set. The tracer resolves the
user's marks into it: the op's own (``op.recompute()`` / ``op.recompute(False)``) when it
has one, else the innermost enclosing cell's explicit mark (``cell.recompute()`` /
``cell.recompute(False)``), else none. Two kinds of node follow others
(:func:`resolve_marks`): a view (a reshape) that is the only reader of a recomputed op's
output is recomputed with it -- keeping the view would keep the buffer, so a GeLU marked
alone would save nothing behind the ``Dense`` reshape that reads it -- and a redistribution
lowering inserted takes the mark of the op it feeds.

Regions. A region is a maximal run of consecutive recomputed forward nodes, cut between
calls of whole recomputed cells: a run whose nodes' common scope holds no node of the run
itself (a container, such as a ``CellList`` of marked blocks) is cut between that scope's
children, again inside each piece, where the pieces on both sides are *whole cells* (no
forward node under the piece's common scope is left unmarked). So every marked block is
its own region, and the attention core of a block --
its scores, mask add, softmax and context ops in ``blocks.3.attention`` and the dropout in
``blocks.3.attention.prob_dropout`` -- is one::

    whole blocks:    [blocks.0.*] [blocks.1.*] [blocks.2.*]         (common scope 'blocks': cut)
    attention core:  q, kT ─▶ [BatchMatMul ─▶ Add ─▶ Softmax ─▶ Dropout ─▶ BatchMatMul] ─▶ ctx

Values. A region keeps its inputs (values from outside it that its nodes read), the values
it hands to another region (so rebuilding one region never re-runs an earlier one) and the
requested outputs. A *whole cell* region -- every forward op under its common scope is
recomputed -- also keeps whatever it hands to the ops after it, as MindSpore keeps a
recomputed cell's output. A region of marked ops inside an unmarked cell (the attention
core; an ``op.recompute()`` on a GeLU) does not: its outputs are rebuilt from its inputs
like its insides, so recomputing a GeLU drops its (B, S, F) output and keeps only its input.
The values a region does not keep are *internal*: they die in the forward pass after their
last forward reader, and the region's nodes that make the internal values backward reads
(with the region nodes those depend on) run again before the backward reaches them -- their
*rebuild set*.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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


def _is_whole(piece: list[Node], unmarked: list[tuple[str, ...]]) -> bool:
    """Whether no unmarked forward node lies under the piece's common scope."""
    common = _common_scope([n.scope for n in piece])
    return not any(parts[:len(common)] == common for parts in unmarked)


def _cut(run: list[Node], unmarked: list[tuple[str, ...]]) -> list[list[Node]]:
    """A run of recomputed nodes cut into cell calls (module doc): between the children of
    a common scope holding no op of the run, where the pieces on both sides are whole cells."""
    common = _common_scope([n.scope for n in run])
    if any(tuple(n.scope.split(".")) == common for n in run):
        return [run]                                  # its common scope holds ops of its own
    depth = len(common)
    pieces: list[list[Node]] = []
    for _, seg in groupby(run, key=lambda n: n.scope.split(".")[depth]):
        for piece in _cut(list(seg), unmarked):
            if pieces and not (_is_whole(pieces[-1], unmarked) and _is_whole(piece, unmarked)):
                pieces[-1] = pieces[-1] + piece
            else:
                pieces.append(piece)
    return pieces


def resolve_marks(forward: Sequence[Node], inserted: Callable[[Node], bool] = lambda n: False) -> list[bool]:
    """Per ``forward`` node (in order), whether it is recomputed: its flag; or, unmarked, a
    view (``prim.view == "alias"``) that is the only reader of a recomputed node's output;
    or, for a node ``inserted`` by lowering, the mark of the next node not inserted when
    that one has its scope (the op it feeds) and lets its communication be recomputed
    (``Cell.recompute(mp_comm_recompute=False)`` keeps a redistribution's output saved)."""
    readers: dict[int, int] = {}
    for n in forward:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    marks, made_by_marked = [], set()
    for n in forward:
        mark = n.recompute or (n.prim.view == "alias" and len(n.inputs) == 1 and n.inputs[0] in made_by_marked
                               and readers[n.inputs[0]] == 1)
        marks.append(mark)
        if mark:
            made_by_marked.update(n.outputs)
    feeds = None                                   # position of the next node not inserted
    for k in range(len(forward) - 1, -1, -1):
        if inserted(forward[k]):
            marks[k] = feeds is not None and forward[feeds].scope == forward[k].scope and marks[feeds] \
                and forward[feeds].recompute_comm
        else:
            feeds = k
    return marks


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
    unmarked = [tuple(n.scope.split(".")) for n, mark in zip(forward, marked) if not mark]
    out: dict[int, int] = {}
    for piece in (p for r in runs for p in _cut(r, unmarked)):
        rid = len(set(out.values()))
        out.update((n.id, rid) for n in piece)
    return out


def whole_cells(forward: Sequence[Node], marked: Sequence[bool], region: dict[int, int]) -> set[int]:
    """The regions that are whole cells: every forward node under the region's common scope
    is ``marked``."""
    pieces: dict[int, list[Node]] = {}
    for n in forward:
        if n.id in region:
            pieces.setdefault(region[n.id], []).append(n)
    unmarked = [tuple(n.scope.split(".")) for n, mark in zip(forward, marked) if not mark]
    return {r for r, members in pieces.items() if _is_whole(members, unmarked)}


def internal_values(nodes: Iterable[Node], region: dict[int, int], outputs: Iterable[int],
                    cells: set[int]) -> dict[int, int]:
    """Value -> region, for the values a region stops keeping (module doc): all it makes
    but the requested ``outputs``, what a forward node of another region reads and, for
    the whole-cell regions ``cells``, what any forward node outside it reads."""
    nodes = list(nodes)
    made_in = {o: region[n.id] for n in nodes if n.id in region for o in n.outputs}
    kept = set(outputs)
    for n in nodes:
        if n.phase != FORWARD:
            continue
        reader = region.get(n.id)
        kept.update(v for v in n.inputs if v in made_in and made_in[v] != reader
                    and (reader is not None or made_in[v] in cells))
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

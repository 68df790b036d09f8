"""Recompute: recomputed ops' activations die after forward and are rebuilt before their backward.

A graph pass, run by :class:`~autopar.runtime.program.Program` when a node is marked
``recompute`` (``Cell.recompute()``, ``Primitive.recompute()``), on the serial training
graph or a rank's local graph.

Regions. The rule is :mod:`autopar.strategy.recompute_regions` (the cost model prices
with the same one): a region is a maximal run of consecutive recomputed forward nodes, cut
between cell calls -- a whole marked block, or only the attention core of a block whose
core ops are marked. A ``Redistribute`` node lowering inserted takes the mark of the op it
feeds (it carries that op's scope and comes right before it), so a recomputed op's input
redistribution runs again with it; a reshape that alone reads a recomputed output goes
with it (:func:`~autopar.strategy.recompute_regions.resolve_marks`).

Values. Inputs of a region (activations from outside, parameters, constants) stay saved, as
do the values a region hands to another region and, for a whole recomputed cell, every
value it produces for a forward node outside it (the cell's output, which the next cell
consumes): MindSpore keeps the cell's boundary and recomputes its inside. A region of
marked ops inside an unmarked cell (the attention core, a GeLU) rebuilds its outputs too.
The other values of a region are *internal*. A backward node that reads an internal value reads
a *clone* instead: the region's forward nodes needed for those values are copied and placed
right before the first backward node that reads one, so the originals' last use falls in the
forward pass and the program's liveness frees them there. Clones run the same (local)
primitives, collectives included -- every rank repeats them in the same order -- and take
their random keys from the original node, so dropout masks replay exactly.

    forward:  x ─▶ [LN ─▶ dense ─▶ softmax ─▶ ... ─▶ add] ─▶ y        (internals freed)
    backward:        ... dy ─▶ [LN' ─▶ dense' ─▶ ...] ─▶ vjps read the clones
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..ir.graph import FORWARD, Graph, Node, Value
from ..strategy.recompute_regions import internal_values, rebuild_set, recompute_regions, resolve_marks, whole_cells
from .memory import guess_buffers
from .spmd import Redistribute

CLONE_SUFFIX = "#recompute"


def live_nodes(graph: Graph, outputs: Sequence[int]) -> list[Node]:
    """Nodes the outputs depend on, in graph order."""
    wanted, keep = set(outputs), []
    for node in reversed(graph.nodes):
        if any(o in wanted for o in node.outputs):
            keep.append(node)
            wanted.update(node.inputs)
    keep.reverse()
    return keep


def regions(graph: Graph, nodes: Sequence[Node] | None = None) -> tuple[dict[int, int], set[int]]:
    """(forward node id -> region number, for the recomputed forward nodes; the regions
    that are whole cells)."""
    forward = [n for n in (graph.nodes if nodes is None else nodes) if n.phase == FORWARD]
    if not any(n.recompute for n in forward):
        return {}, set()
    marks = resolve_marks(forward, inserted=lambda n: isinstance(n.prim, Redistribute))
    region = recompute_regions(forward, marks)
    return region, whole_cells(forward, marks, region)


@dataclasses.dataclass(frozen=True)
class RegionValues:
    """What recompute does to a graph's values, before any rewriting."""

    region: dict[int, int]          # forward node id -> region
    internal: dict[int, int]        # value -> region: produced inside, not kept
    read_back: dict[int, set[int]]  # region -> internal values backward nodes read
    first_reader: dict[int, int]    # region -> position (in the node list) of its first such reader


def classify(graph: Graph, outputs: Sequence[int], nodes: Sequence[Node] | None = None) -> RegionValues:
    nodes = live_nodes(graph, outputs) if nodes is None else list(nodes)
    region, cells = regions(graph, nodes)
    internal = internal_values(nodes, region, outputs, cells)
    read_back: dict[int, set[int]] = {}
    first: dict[int, int] = {}
    for k, n in enumerate(nodes):
        if n.phase == FORWARD:
            continue
        for v in n.inputs:
            if v in internal:
                r = internal[v]
                read_back.setdefault(r, set()).add(v)
                first.setdefault(r, k)
    return RegionValues(region, internal, read_back, first)


def _clone_set(graph: Graph, rv: RegionValues, r: int) -> list[int]:
    """Node ids of region ``r`` to re-run for the values its backward reads, in order."""
    return rebuild_set(graph, rv.internal, rv.read_back[r])


def with_recompute(graph: Graph, outputs: Sequence[int]) -> tuple[Graph, dict[int, int]]:
    """The graph with recompute applied, and {clone node id: original node id}.

    Node ids stay positions in the new node list (clones are inserted, so ids shift);
    original values keep their ids, clones' outputs are new values at the end.
    """
    nodes = live_nodes(graph, outputs)
    rv = classify(graph, outputs, nodes)
    if not rv.read_back:
        return graph, {}
    before: dict[int, list[int]] = {}             # original node id -> regions whose clones precede it
    for r, k in sorted(rv.first_reader.items()):
        before.setdefault(nodes[k].id, []).append(r)

    values = list(graph.values)
    clone_value: dict[int, int] = {}              # internal value -> its clone
    order: list[tuple[Node, int | None]] = []     # (node, original id for clones / None)
    for node in graph.nodes:
        for r in before.get(node.id, ()):
            for nid in _clone_set(graph, rv, r):
                orig = graph.nodes[nid]
                outs = []
                for o in orig.outputs:
                    clone_value[o] = len(values)
                    outs.append(len(values))
                    values.append(Value(len(values), graph.spec(o), None))
                ins = tuple(clone_value.get(v, v) if rv.internal.get(v) == r else v for v in orig.inputs)
                clone = dataclasses.replace(orig, inputs=ins, outputs=tuple(outs),
                                            name=orig.name + CLONE_SUFFIX, forward_of=None)
                order.append((clone, orig.id))
        if node.phase != FORWARD:
            node = dataclasses.replace(node, inputs=tuple(clone_value.get(v, v) for v in node.inputs))
        order.append((node, None))

    new_id = {node.id: k for k, (node, orig) in enumerate(order) if orig is None}
    rebuilt, origin = [], {}
    for k, (node, orig) in enumerate(order):
        fo = None if node.forward_of is None else new_id[node.forward_of]
        rebuilt.append(dataclasses.replace(node, id=k, forward_of=fo))
        if orig is not None:
            origin[k] = new_id[orig]
    for node in rebuilt:
        for o in node.outputs:
            values[o] = dataclasses.replace(values[o], producer=node.id)
    new = Graph(tuple(values), tuple(rebuilt), graph.inputs, graph.params, graph.param_objs,
                dict(graph.consts), graph.outputs, dict(graph.grad_of))
    return new, origin


def recompute_savings(graph: Graph, outputs: Sequence[int]) -> dict[int, int]:
    """Region -> bytes of activations recompute stops keeping from forward to backward:
    the buffers of the region's internal values its backward reads (local bytes on a
    rank's graph; see :func:`~autopar.runtime.memory.saved_for_backward`, which gives the
    same figure per forward node). The activation peak falls by their sum when it lies
    outside the recomputed cells' backward (at the loss, the usual case); a cell's
    rebuilt activations are alive again during its own backward, so a peak there falls
    by less -- ``memory.predicted_activations`` follows the program step by step."""
    rv = classify(graph, outputs)
    buffers = guess_buffers(graph)
    out = {}
    for r, values in sorted(rv.read_back.items()):
        held = set().union(*(buffers.get(v, frozenset()) for v in values))
        out[r] = sum(graph.spec(b).nbytes for b in held if rv.internal.get(b) == r)
    return out

"""A stage's local training graph cut into the forward half and the backward half.

Under a pipeline schedule a micro-batch's forward and backward run at different clocks,
with other micro-batches in between, so each stage runs two programs per micro-batch:

    forward half   inputs: fed arrays, received activations
                   outputs: activations to send, the loss (last stage), and *saved* values
    backward half  inputs: the saved values, the cotangents received from later stages
                   outputs: parameter gradients, gradients of the received activations

A node is in the backward half when it is a gradient op (a VJP, or a gradient sum) or
reads a value that is (a cotangent, a gradient); everything else -- a redistribution of a
forward value, even one lowering made for a backward consumer -- runs in the forward half.
Saved values are what the backward half reads and does not make itself: the live
micro-batch activations a schedule's in-flight count is about.

Recompute: forward ops of a cell marked ``.recompute()`` whose outputs the forward half does
not deliver run again in the backward half, so their outputs are not saved; only the values
entering them are. (The halves are handed to :class:`~autopar.runtime.program.Program`
with the marks cleared: this split already decided what is recomputed.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ...ir.graph import BACKWARD, FORWARD, Graph
from ...strategy.recompute_regions import resolve_marks
from ..spmd import Redistribute


@dataclass(frozen=True, eq=False)
class Halves:
    forward: Graph         # outputs: the ``n_delivered`` forward outputs, then ``saved``
    backward: Graph        # inputs: ``saved`` then the cotangents; outputs: the gradients
    n_delivered: int
    saved: tuple[int, ...]
    recomputed: int        # forward ops the backward half runs again


def _backward_nodes(graph: Graph, cotangents: set[int]) -> set[int]:
    """Ids of the nodes in the backward half (see the module doc)."""
    late = set(cotangents)
    ids = set()
    for n in graph.nodes:
        gradient_op = n.phase == BACKWARD and not isinstance(n.prim, Redistribute)
        if gradient_op or any(v in late for v in n.inputs):
            ids.add(n.id)
            late.update(n.outputs)
    return ids


def split_halves(graph: Graph, n_delivered: int, cotangents: Sequence[int]) -> Halves:
    """Cut ``graph`` (a lowered local graph whose outputs are ``n_delivered`` forward outputs
    then gradients) into its two halves; ``cotangents`` are its cotangent inputs."""
    delivered, grads = graph.outputs[:n_delivered], graph.outputs[n_delivered:]
    backward = _backward_nodes(graph, set(cotangents))
    late = {o for n in graph.nodes if n.id in backward for o in n.outputs}
    assert not late & set(delivered), "a forward output depends on a gradient"
    needed = set(grads) | {v for n in graph.nodes if n.id in backward for v in n.inputs}
    forward = [n for n in graph.nodes if n.phase == FORWARD and n.id not in backward]
    # the marks as the serial pass and the cost model read them (a view alone reading a
    # recomputed output goes with it; an inserted redistribution takes its reader's mark)
    marked = {n.id for n, m in zip(forward, resolve_marks(forward, lambda n: isinstance(n.prim, Redistribute))) if m}
    rerun = set()
    for n in reversed(graph.nodes):           # recomputed ops, nearest the backward first
        if (n.id in marked and not isinstance(n.prim, Redistribute)
                and set(n.outputs) & needed and not set(n.outputs) & set(delivered)):
            rerun.add(n.id)
            needed.update(n.inputs)
    made_late = {o for n in graph.nodes if n.id in backward | rerun for o in n.outputs}
    static = set(graph.params) | set(graph.consts) | set(cotangents)
    saved = tuple(sorted(v for v in needed if v not in made_late and v not in static))

    plain = tuple(dataclasses.replace(n, recompute=False) if n.recompute else n for n in graph.nodes)
    fwd = Graph(graph.values, plain, tuple(v for v in graph.inputs if v is not None and v not in cotangents),
                graph.params, graph.param_objs, graph.consts, tuple(delivered) + saved, graph.grad_of)
    late_nodes = tuple(n if n.id in backward | rerun else dataclasses.replace(n, outputs=()) for n in plain)
    bwd = Graph(graph.values, late_nodes, saved + tuple(cotangents), graph.params, graph.param_objs,
                graph.consts, tuple(grads), graph.grad_of)
    return Halves(fwd, bwd, n_delivered, saved, len(rerun))

"""Reverse-mode autodiff over a traced graph.

For every forward node on a path from a differentiated value to the loss, one backward
node is appended, in reverse topological order. A backward node reuses the forward
node's primitive and runs its ``vjp``; its inputs are ``(dy, saved inputs..., [y])``,
exactly what the primitive declares it reads (``save_inputs``, ``save_output``), so
autodiff keeps nothing else alive. Its outputs are the gradients of the inputs that need
one. A value used by several nodes gets its contributions summed by one ``AddN`` node.
Which values need a gradient, and which inputs of a node get one, is
:func:`~autopar.ir.graph.differentiable_values` and :func:`~autopar.ir.graph.gradient_inputs`:
the rule the cost model prices backward passes with.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ir.graph import (
    BACKWARD,
    Graph,
    GraphBuilder,
    Node,
    differentiable_values,
    gradient_inputs,
)
from ..ops import AddN  # the accumulation op lives with the elementwise family


def _reaches(graph: Graph, target: int) -> set[int]:
    """Node ids whose outputs the target depends on."""
    wanted, nodes = {target}, set()
    for node in reversed(graph.nodes):
        if any(o in wanted for o in node.outputs):
            nodes.add(node.id)
            wanted.update(node.inputs)
    return nodes


def differentiate(graph: Graph, loss: int, wrt: Sequence[int],
                  sens: float = 1.0) -> tuple[Graph, tuple[int, ...]]:
    """Append the backward pass of ``loss`` (times ``sens``); return the new graph and d loss / d wrt."""
    req = differentiable_values(graph, wrt)
    on_path = _reaches(graph, loss)
    b = GraphBuilder(graph)
    loss_spec = graph.spec(loss)
    seed = b.const(np.full(loss_spec.shape, sens, dtype=loss_spec.dtype))
    contribs: dict[int, list[int]] = {loss: [seed]}
    grad_of: dict[int, int] = {seed: loss}
    add_n = AddN()

    def total(vid: int, near: Node | None) -> int | None:
        parts = contribs.get(vid)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        scope = near.scope if near is not None else ""
        node = b.add_node(add_n, tuple(parts), (graph.spec(vid),), scope, phase=BACKWARD,
                          stage=near.stage if near else None, recompute=False)
        contribs[vid] = [node.outputs[0]]
        grad_of[node.outputs[0]] = vid
        return node.outputs[0]

    for node in reversed(graph.nodes):
        if node.id not in on_path or not any(o in req for o in node.outputs):
            continue
        dy = total(node.outputs[0], node)
        if dy is None:
            continue
        prim = node.prim
        needs = gradient_inputs(node, req)
        if not any(needs):
            continue
        saved = tuple(node.inputs[i] for i in prim.saved_input_indices(len(node.inputs)))
        if prim.save_output:
            saved += (node.outputs[0],)
        out_specs = tuple(graph.spec(v) for v, n in zip(node.inputs, needs) if n)
        grad_node = b.add_node(prim, (dy,) + saved, out_specs, node.scope, phase=BACKWARD,
                               forward_of=node.id, needs=needs, stage=node.stage, recompute=node.recompute)
        grads = iter(grad_node.outputs)
        for v, n in zip(node.inputs, needs):
            if n:
                g = next(grads)
                grad_of[g] = v
                contribs.setdefault(v, []).append(g)

    grads = []
    for v in wrt:
        g = total(v, None)
        if g is None:  # the loss does not depend on it
            spec = graph.spec(v)
            g = b.const(np.zeros(spec.shape, dtype=spec.dtype))
            grad_of[g] = v
        grads.append(g)
    new = b.build(graph.inputs, graph.params, graph.param_objs, graph.outputs, grad_of)
    return new, tuple(grads)

"""Where a value's gradient is reduced: the lowering's rule, priced.

The runtime's lowering (``autopar/runtime/spmd.py``) builds the backward pass by two rules
this module states for the cost model:

* **alike parts add first.** A value read by k ops that need its gradient gets k parts,
  one per reader, in that reader's gradient layout. Parts alike (the same layout, e.g. the
  three partial sums of Q, K and V's input) are added and redistributed once; parts
  unlike are each settled into the value's layout, then added.
* **a partial dy passes through.** Every VJP is linear in dy, so a dy that is a partial sum
  over mesh axes its op's sharding does not use gives input gradients partial over the
  same axes (:func:`passable_partial`): the reduction moves to the op's inputs and merges
  with theirs. The column-parallel matmuls' partial input gradients so cross the reshape
  of ``Dense`` and meet at the LayerNorm output: one all-reduce for Q, K and V, or, when
  that output is split along the sequence (sequence parallel), one reduce-scatter. Not
  done when the input gradients are bigger than dy (a lookup table's), where reducing dy
  first is cheaper.

Walking the ops in reverse gives each value's parts, what its producer takes as it is, and
the redistribution left to pay.
"""
from __future__ import annotations

from ..ir.graph import gradient_inputs
from ..ir.layout import Layout
from ..ops.sharding import OpSharding


def passable_partial(have: Layout, sh: OpSharding, dy_size: int, grads_size: int) -> tuple[int, ...]:
    """Partial axes of a gradient ``have`` that a VJP under ``sh`` may take as they are: all
    of them when ``have`` is split as the op's dy, on the same device grid, partial only
    over axes the op does not use, and the op's input gradients (``grads_size`` elements)
    are no bigger than dy (``dy_size``); none otherwise."""
    want = sh.dy_layout()
    same_grid = have.mesh.shape == want.mesh.shape and have.mesh.ranks == want.mesh.ranks
    if not have.partial or not same_grid or have.dims != want.dims:
        return ()
    used = {a for _, axes in sh.axes for a in axes}
    if used & set(have.partial):
        return ()
    return have.partial if grads_size <= dy_size else ()


def _with_partial(layout: Layout, extra: tuple[int, ...]) -> Layout:
    return Layout(layout.mesh, layout.dims, tuple(sorted(layout.partial + extra))) if extra else layout


def _grads_size(model, node) -> int:
    needs = gradient_inputs(node, model.needs_grad)
    return sum(model.graph.spec(v).size for v, need in zip(node.inputs, needs) if need)


def gradient_costs(model, plan) -> dict[int, tuple[float, float]]:
    """First reader's node id -> (activation-gradient seconds per micro-batch, weight-
    gradient seconds per step) of the values it reads first, under ``model`` (a
    ``CostModel``): each value's gradient parts, alike ones added first, redistributed
    into what its producer's VJP reads (its dy layout, with the partial axes it passes
    on), or into the value's settled layout when it has no producer (a weight)."""
    sh, graph, out = plan.shardings, model.graph, {}
    passed: dict[int, tuple[int, ...]] = {}        # forward node -> partial axes its VJP takes with dy
    values = [n.outputs[0] for n in reversed(model.forward)] + \
        [v for v in model.consumers if graph.node_of(v) is None]
    for v in values:
        readers = model.consumers.get(v, ())
        parts = [_with_partial(sh[n].grad_layout(i), passed.get(n, ())) for n, i in readers
                 if gradient_inputs(model.nodes[n], model.needs_grad)[i]]
        src = model.producer_layout(v, sh) if parts else None
        if src is None:
            continue
        target = Layout(src.mesh, src.dims)
        producer = graph.node_of(v)
        if all(p == parts[0] for p in parts):      # the runtime's test (spmd.Lowering.accumulate)
            if producer is not None:
                take = passable_partial(parts[0], sh[producer.id], graph.spec(v).size, _grads_size(model, producer))
                passed[producer.id] = take
                target = _with_partial(sh[producer.id].dy_layout(), take)
            moved = model.redistribution_seconds(parts[0], target, v)
        else:
            moved = sum(model.redistribution_seconds(p, target, v) for p in parts)
        weight = v in model.weight_values
        a, g = out.get(readers[0][0], (0.0, 0.0))
        out[readers[0][0]] = (a + (0.0 if weight else moved), g + (moved if weight else 0.0))
    return out

"""The forward graph of one pipeline stage, cut out of the whole traced graph.

Inputs, in order: the fed arrays the stage reads (``batch_inputs``: positions among the
network's array arguments), the values it receives from earlier stages, then one
*cotangent* per value it sends that has a gradient and per stage reading it (the gradient
that stage sends back). The stage's parameters are the ones its ops read; a parameter
read on two stages (PanGu-α's tied word table) is in both.

The differentiated *objective* is a scalar whose gradient is exactly what backpropagation
through the stage needs: the loss on the last stage; on the others

    objective = sum_j ReduceSum(sent_j * cotangent_j)        d objective / d sent_j = cotangent_j

(the product's gradient is ``1 * cotangent_j``, exact), so one call of
:func:`~autopar.runtime.autodiff.differentiate` gives the stage's backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir.graph import FORWARD, Graph, GraphBuilder
from ...ops import Add, Mul, ReduceSum
from .assignment import Crossing, StageAssignment

OBJECTIVE_SCOPE = "pipeline.objective"


@dataclass(frozen=True, eq=False)
class StageGraph:
    stage: int
    graph: Graph                            # forward ops of the stage + the objective; micro-batch shapes
    origin: tuple[int, ...]                 # stage node id -> global node id (traced ops only)
    batch_inputs: tuple[int, ...]           # which of the network's array arguments it reads
    received: tuple[Crossing, ...]
    sent: tuple[Crossing, ...]
    cotangents: tuple[tuple[Crossing, int], ...]   # (crossing sent, stage sending its gradient back)
    objective: int                          # the scalar differentiated
    loss: int | None                        # the loss (last stage only)
    local_of: dict[int, int]                # global value id -> stage value id
    cotangent_inputs: tuple[int, ...]       # stage value ids of the cotangents

    def value(self, crossing: Crossing) -> int:
        return self.local_of[crossing.value]


def stage_graph(graph: Graph, assign: StageAssignment, stage: int) -> StageGraph:
    """Cut stage ``stage``'s ops out of the forward graph ``graph`` (see the module doc)."""
    nodes = assign.nodes(graph, stage)
    read = {v for n in nodes for v in n.inputs}
    b = GraphBuilder()
    local: dict[int, int] = {}
    arrays = [v for v in graph.inputs if v is not None]
    batch = tuple(i for i, v in enumerate(arrays) if v in read)
    inputs = []
    for i in batch:
        local[arrays[i]] = b.new_value(graph.spec(arrays[i]))
        inputs.append(local[arrays[i]])
    received, sent = assign.received_by(stage), assign.sent_by(stage)
    for c in received:
        local[c.value] = b.new_value(graph.spec(c.value))
        inputs.append(local[c.value])
    cotangents = tuple((c, d) for c in sent if c.needs_grad for d in c.dsts)
    cot_inputs = tuple(b.new_value(graph.spec(c.value)) for c, _ in cotangents)
    inputs += cot_inputs
    params, param_objs = [], []
    for v, p in zip(graph.params, graph.param_objs):
        if v in read:
            local[v] = b.new_value(graph.spec(v))
            params.append(local[v])
            param_objs.append(p)
    for v in sorted(read & set(graph.consts)):
        local[v] = b.const(graph.consts[v])

    origin = []
    for n in nodes:
        new = b.add_node(n.prim, tuple(local[v] for v in n.inputs), tuple(graph.spec(o) for o in n.outputs),
                         n.scope, phase=FORWARD, stage=stage, recompute=n.recompute,
                         recompute_comm=n.recompute_comm)
        local.update(zip(n.outputs, new.outputs))
        origin.append(n.id)

    loss = local[graph.outputs[0]] if stage == assign.stages - 1 else None
    objective = loss if loss is not None else _objective(b, [local[c.value] for c, _ in cotangents], cot_inputs,
                                                         stage)
    built = b.build(inputs, params, param_objs, (objective,))
    return StageGraph(stage, built, tuple(origin), batch, received, sent, cotangents, objective, loss, local,
                      cot_inputs)


def _objective(b: GraphBuilder, sent: list[int], cotangents: tuple[int, ...], stage: int) -> int:
    """sum_j ReduceSum(sent_j * cotangent_j): a scalar, or 0.0 when nothing sent has a gradient."""
    terms = []
    for x, g in zip(sent, cotangents):
        mul, total = Mul(), ReduceSum().with_attrs(axis=())
        spec = mul.infer(b.values[x].spec, b.values[g].spec)
        prod = b.add_node(mul, (x, g), (spec,), OBJECTIVE_SCOPE, phase=FORWARD, stage=stage)
        red = b.add_node(total, prod.outputs, (total.infer(spec),), OBJECTIVE_SCOPE, phase=FORWARD, stage=stage)
        terms.append(red.outputs[0])
    if not terms:
        return b.const(np.zeros((), np.float32))
    acc = terms[0]
    for t in terms[1:]:
        add = Add()
        spec = add.infer(b.values[acc].spec, b.values[t].spec)
        acc = b.add_node(add, (acc, t), (spec,), OBJECTIVE_SCOPE, phase=FORWARD, stage=stage).outputs[0]
    return acc

"""The traced graph: values (SSA, shape + dtype) and nodes in topological order.

A :class:`Graph` is built once by the tracer (and extended by autodiff into a new graph)
and is not changed afterwards. Values are numbered; every value is either a graph input
(data), a parameter, a constant, or the output of exactly one node.

    Graph  inputs: (v0 int32[2, 9],)  params: (v1 float32[64, 32] 'embedding.weight', ...)
    n3  blocks.0.attention.dense1/MatMul  (v7, v8) -> (v9,)

Which values need a gradient is a question about the graph alone
(:func:`differentiable_values`, and per node :func:`gradient_inputs`), asked by autodiff
when it builds the backward pass and by the cost model when it prices one, so both
answer it with the same rule.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from ..dtype import is_float
from .spec import HasSpec, TensorSpec

FORWARD, BACKWARD = "forward", "backward"


@dataclass(frozen=True)
class Value(HasSpec):
    id: int
    spec: TensorSpec
    producer: int | None = None   # node id, None for inputs, parameters and constants


@dataclass(frozen=True, eq=False)
class Node:
    id: int
    prim: Any                  # the op: an autopar.ops Primitive
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    scope: str                      # cell path, e.g. 'blocks.3.attention.dense1'
    name: str                       # unique: scope + '/' + kind (+ '-k' when repeated)
    phase: str = FORWARD
    forward_of: int | None = None   # for a backward node: the forward node it differentiates
    needs: tuple[bool, ...] = ()    # for a backward node: which forward inputs get a gradient
    stage: int | None = None        # pipeline stage of the enclosing cell, if annotated
    recompute: bool = False         # inside a cell marked .recompute()
    recompute_comm: bool = True     # recomputed: its input redistributions run again too (mp_comm_recompute)

    def __str__(self) -> str:
        ins = ", ".join(f"v{i}" for i in self.inputs)
        outs = ", ".join(f"v{o}" for o in self.outputs)
        tag = "" if self.phase == FORWARD else " (grad)"
        return f"n{self.id} {self.name}{tag} ({ins}) -> ({outs})"


@dataclass(frozen=True, eq=False)
class Graph:
    values: tuple[Value, ...]
    nodes: tuple[Node, ...]
    inputs: tuple[int | None, ...]          # data inputs in call order (None for a None argument)
    params: tuple[int, ...]                 # one value per parameter used
    param_objs: tuple[Any, ...]             # the Parameter objects, aligned with params
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    outputs: tuple[int, ...] = ()
    grad_of: dict[int, int] = field(default_factory=dict)   # gradient value -> the value it differentiates

    def spec(self, vid: int) -> TensorSpec:
        return self.values[vid].spec

    def node_of(self, vid: int) -> Node | None:
        """The node producing a value (node ids are their positions in ``nodes``)."""
        producer = self.values[vid].producer
        return None if producer is None else self.nodes[producer]

    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.param_objs)

    def to_networkx(self) -> nx.DiGraph:
        """Nodes as graph vertices, values as edges (for graph algorithms and drawing)."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.id, name=n.name, kind=n.prim.kind, phase=n.phase)
        for n in self.nodes:
            for vid in n.inputs:
                src = self.values[vid].producer
                if src is not None:
                    g.add_edge(src, n.id, value=vid, spec=str(self.values[vid].spec))
        return g

    def __str__(self) -> str:
        lines = [f"Graph: {len(self.nodes)} nodes, {len(self.values)} values"]
        lines += [f"  input v{v}: {self.values[v].spec}" for v in self.inputs if v is not None]
        lines += [f"  param v{v}: {self.values[v].spec} {p.name}" for v, p in zip(self.params, self.param_objs)]
        lines += [f"  {n}" for n in self.nodes]
        lines.append("  outputs: " + ", ".join(f"v{o}" for o in self.outputs))
        return "\n".join(lines)


def with_node_changes(graph: Graph, changes: Callable[[Node], dict]) -> Graph:
    """``graph`` with each node replaced by ``dataclasses.replace(node, **changes(node))``
    (an empty dict keeps the node as it is): stage and recompute marks, renames, ..."""
    nodes = []
    for node in graph.nodes:
        change = changes(node)
        nodes.append(dataclasses.replace(node, **change) if change else node)
    return dataclasses.replace(graph, nodes=tuple(nodes))


def differentiable_values(graph: Graph, wrt: Iterable[int]) -> set[int]:
    """The values that get a gradient when ``wrt`` is differentiated: ``wrt`` itself and
    every float output of a node that reads one of them through an input its op
    differentiates (not one of ``prim.nondiff_inputs``: labels, masks, indices). An integer
    or bool value (token ids, a comparison) never gets one, so nothing downstream of it
    through that value does either. Per node, :func:`gradient_inputs` says which inputs
    get one: autodiff builds those gradients, the cost model charges their backward
    compute, kept activations and redistributions."""
    out = set(wrt)
    for node in graph.nodes:
        if any(v in out and i not in node.prim.nondiff_inputs for i, v in enumerate(node.inputs)):
            out.update(o for o in node.outputs if is_float(graph.spec(o).dtype))
    return out


def gradient_inputs(node: Node, differentiable: set[int]) -> tuple[bool, ...]:
    """Per input of ``node``, whether its backward makes that input's gradient, given the
    :func:`differentiable_values` set: an input in the set that its op differentiates,
    and only when an output of ``node`` is in the set (a cast to an integer carries no
    gradient back, whatever it reads)."""
    if not any(o in differentiable for o in node.outputs):
        return (False,) * len(node.inputs)
    return tuple(v in differentiable and i not in node.prim.nondiff_inputs for i, v in enumerate(node.inputs))


class GraphBuilder:
    """Appends values and nodes; :meth:`build` freezes them into a :class:`Graph`."""

    def __init__(self, base: Graph | None = None):
        self.values: list[Value] = list(base.values) if base else []
        self.nodes: list[Node] = list(base.nodes) if base else []
        self.consts: dict[int, np.ndarray] = dict(base.consts) if base else {}
        self._names: dict[str, int] = {}
        for n in self.nodes:
            self._names[n.name] = 1

    def new_value(self, spec: TensorSpec, producer: int | None = None) -> int:
        vid = len(self.values)
        self.values.append(Value(vid, spec, producer))
        return vid

    def const(self, array: np.ndarray) -> int:
        array = np.asarray(array)
        vid = self.new_value(TensorSpec(array.shape, array.dtype))
        self.consts[vid] = array
        return vid

    def unique_name(self, base: str) -> str:
        k = self._names.get(base, 0)
        self._names[base] = k + 1
        return base if k == 0 else f"{base}-{k}"

    def add_node(self, prim, inputs: tuple[int, ...], out_specs: tuple[TensorSpec, ...],
                 scope: str, **fields) -> Node:
        nid = len(self.nodes)
        outputs = tuple(self.new_value(s, nid) for s in out_specs)
        label = scope if scope else "<root>"
        name = self.unique_name(f"{label}/{prim.kind}" + ("#grad" if fields.get("phase") == BACKWARD else ""))
        node = Node(nid, prim, tuple(inputs), outputs, scope, name, **fields)
        self.nodes.append(node)
        return node

    def build(self, inputs, params, param_objs, outputs, grad_of=None) -> Graph:
        return Graph(tuple(self.values), tuple(self.nodes), tuple(inputs), tuple(params),
                     tuple(param_objs), dict(self.consts), tuple(outputs), dict(grad_of or {}))

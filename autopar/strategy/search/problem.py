"""The search problem: pick one sharding per forward op to minimise a sum of op costs and
edge costs -- a pairwise labelling problem every search mode solves.

Variables are the forward ops; the labels of an op are its candidate shardings (every
strategy dividing its shapes on the stage, or only the user's when it has one). Costs come
from :class:`~autopar.strategy.costmodel.CostModel`:

* ``unary[op][k]``: seconds of the op under candidate k (compute, in-kernel collectives,
  its parameters' gradient reduction and update, reading a data input);
* ``memory[op][k]``: bytes per rank it holds (parameters, gradients, states, activations)
  and its output's gradient in flight during backward;
* ``pairs[(a, b)][ka, kb]``: seconds moving a value between ops a and b (a before b) in
  forward and its gradient back.

Identical layers make identical tables, so tables are cached by what they depend on
(shapes, op attributes, candidate layouts) and a 64-layer model costs about one layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import OpArgError, OpTypeError, at_scope
from ...ir.graph import Node, gradient_inputs
from ...ir.layout import Layout
from ...ops.sharding import OpSharding, candidates, from_strategy, user_sharding
from ..costmodel import CostModel, canonical
from ..sharding_plan import ShardingPlan, replicated_sharding


@dataclass
class Problem:
    model: CostModel
    nodes: list[int]                                   # forward node ids, in graph order
    cands: dict[int, list[OpSharding]]
    unary: dict[int, np.ndarray]                       # seconds per candidate
    memory: dict[int, np.ndarray]                      # bytes per candidate
    pairs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)   # a < b

    def sizes(self) -> dict[int, int]:
        return {n: len(self.cands[n]) for n in self.nodes}

    def cost(self, choice: dict[int, int], lam: float = 0.0) -> float:
        """Seconds of an assignment (+ ``lam`` x bytes, the memory penalty)."""
        total = sum(float(self.unary[n][choice[n]] + lam * self.memory[n][choice[n]]) for n in self.nodes)
        return total + sum(float(m[choice[a], choice[b]]) for (a, b), m in self.pairs.items())

    def memory_of(self, choice: dict[int, int]) -> float:
        return float(sum(self.memory[n][choice[n]] for n in self.nodes))

    def restricted(self, keep: dict[int, list[int]]) -> "Problem":
        """The same problem with only the candidates ``keep[op]`` (indices) of some ops."""
        idx = {n: np.asarray(keep.get(n, range(len(self.cands[n])))) for n in self.nodes}
        return Problem(self.model, self.nodes, {n: [self.cands[n][k] for k in idx[n]] for n in self.nodes},
                       {n: self.unary[n][idx[n]] for n in self.nodes},
                       {n: self.memory[n][idx[n]] for n in self.nodes},
                       {(a, b): m[np.ix_(idx[a], idx[b])] for (a, b), m in self.pairs.items()})

    def plan(self, choice: dict[int, int]) -> ShardingPlan:
        return plan_of(self.model, {n: self.cands[n][choice[n]] for n in self.nodes})


def plan_of(model: CostModel, shardings: dict[int, OpSharding]) -> ShardingPlan:
    """A ShardingPlan from a sharding per forward op, with every value's home layout as the
    rules of :func:`autopar.strategy.sharding_plan.plan_shardings` give it."""
    g, stage = model.graph, model.stage
    layouts: dict[int, Layout] = dict(model.input_layouts)
    for v in g.consts:
        layouts[v] = Layout.replicated(stage, len(g.spec(v).shape))
    for v, (n, i) in model.home.items():
        layouts[v] = shardings[n].input_layout(i)
    for n in model.forward:
        layouts[n.outputs[0]] = shardings[n.id].home_layout()    # an out_strategy's layout, else the kernel's
    return ShardingPlan(stage, dict(shardings), layouts)


def node_candidates(model: CostModel, node: Node, cache: dict | None = None) -> list[OpSharding]:
    """Every sharding the op may take on the stage: the user's strategy alone when it has
    one (see :func:`user_strategy`), else one per strategy from :func:`~autopar.ops.sharding.candidates`;
    replicated when the op has no sharding rule."""
    g, stage = model.graph, model.stage
    specs = [g.spec(v) for v in node.inputs]
    out = g.spec(node.outputs[0])
    where = f"{node.scope} ({node.prim.kind})"
    indexing = node.prim.indexing(specs, out)
    if indexing is None:
        return [replicated_sharding(len(specs), specs, out, stage)]
    shapes = [s.shape for s in specs]
    user = user_strategy(node)
    if user is not None:
        try:
            sh = user_sharding(indexing, user, shapes, out.shape, stage, node.prim.takes_out_strategy, where)
            sh.output_layout().check_shape(out.shape, where, "output")
        except (OpArgError, OpTypeError) as err:
            raise at_scope(err, where) from None
        return [sh]
    key = (indexing, tuple(shapes), out.shape, stage)
    if cache is not None and key in cache:
        return cache[key]
    found = []
    for strategy in candidates(indexing, shapes, stage.size, out.shape):
        sh = from_strategy(indexing, strategy, shapes, stage)
        try:
            sh.output_layout().check_shape(out.shape)
        except (OpArgError, ValueError):
            continue
        found.append(sh)
    if cache is not None:
        cache[key] = found
    return found


def user_strategy(node: Node):
    """The op's ``.shard()`` strategy as a search constraint, or None. A strategy splitting
    nothing (all ones: what a model written for configurable parallelism sets when its
    degrees are 1) states no preference and leaves the op to the search."""
    user = node.prim.strategy
    if user is None or (user.layout is None and user.outputs is None
                        and all(k == 1 for split in user.inputs for k in split)):
        return None
    return user


def _prim_key(node: Node) -> tuple:
    attrs = tuple(sorted((k, repr(v)) for k, v in node.prim.attrs.items()))
    return type(node.prim), attrs


def _layout_index(layouts: list[Layout]) -> tuple[list[Layout], np.ndarray]:
    """Distinct layouts (canonical) and, per entry, the index of its distinct layout."""
    distinct: dict[Layout, int] = {}
    idx = [distinct.setdefault(canonical(lay), len(distinct)) for lay in layouts]
    return list(distinct), np.asarray(idx, dtype=np.intp)


def _reads_index(dst: list[OpSharding], i: int, grads: bool):
    """Distinct (input layout, input-gradient layout) pairs of the consumer's candidates."""
    keys: dict[tuple, int] = {}
    idx = [keys.setdefault((canonical(sh.input_layout(i)), canonical(sh.grad_layout(i)) if grads else None),
                           len(keys)) for sh in dst]
    return keys, np.asarray(idx, dtype=np.intp)


def _memo(cache: dict, key, make):
    """Per-candidate-list results, keyed by the list's identity (identical layers share
    one list, kept alive by the candidate cache)."""
    if key not in cache:
        cache[key] = make()
    return cache[key]


def build(model: CostModel, restrict: dict[int, list[OpSharding]] | None = None) -> Problem:
    """Candidates and cost tables of every forward op of ``model``'s graph; ``restrict``
    gives some ops a fixed candidate list instead (recursive cuts, tests)."""
    cand_cache: dict = {}
    unary_cache: dict = {}
    pair_cache: dict = {}
    cands: dict[int, list[OpSharding]] = {}
    for n in model.forward:
        cands[n.id] = list(restrict[n.id]) if restrict and n.id in restrict else \
            node_candidates(model, n, cand_cache)
    unary, memory, pairs = {}, {}, {}
    for n in model.forward:
        home = tuple(model.home.get(v) == (n.id, i) for i, v in enumerate(n.inputs))
        needs = tuple(v in model.needs_grad for v in n.inputs)
        key = (_prim_key(n), tuple(model.graph.spec(v) for v in n.inputs), needs, home,
               tuple(cands[n.id]))
        if key not in unary_cache:
            costs = [model.node_cost(n, sh) for sh in cands[n.id]]
            # memory: what it holds, and its output's gradient (a partial sum's is whole on every rank)
            unary_cache[key] = (np.array([c.seconds for c in costs]),
                                np.array([float(c.bytes + c.flight_bytes) for c in costs]))
        u, m = unary_cache[key]
        unary[n.id], memory[n.id] = u.copy(), m
    for n in model.forward:
        for i, v in enumerate(n.inputs):
            producer = model.graph.node_of(v)
            if producer is not None:
                src_node, pc = producer.id, cands[producer.id]
                src = _memo(pair_cache, ("out", id(pc)), lambda: _layout_index([sh.output_layout() for sh in pc]))
            elif v in model.home:
                h, j = model.home[v]
                if (h, j) == (n.id, i):
                    continue
                src_node, hc = h, cands[h]
                src = _memo(pair_cache, ("in", id(hc), j), lambda: _layout_index([sh.input_layout(j) for sh in hc]))
            elif v in model.input_layouts:
                src_node, src = None, _layout_index([model.input_layouts[v]])
            else:
                continue   # a constant: replicated, read by slicing
            m = _edge_matrix(model, v, src, n, i, cands[n.id], pair_cache)
            if src_node is None:
                unary[n.id] += m[0]
            elif src_node == n.id:
                unary[n.id] += np.diag(m)
            else:
                a, b = sorted((src_node, n.id))
                m = m if a == src_node else m.T
                pairs[(a, b)] = pairs[(a, b)] + m if (a, b) in pairs else m
    return Problem(model, [n.id for n in model.forward], cands, unary, memory, pairs)


def _edge_matrix(model: CostModel, v: int, src, consumer: Node, i: int,
                 dst: list[OpSharding], cache: dict) -> np.ndarray:
    """(len(src), len(dst)) seconds of ``edge_seconds`` for every pair, computed once per
    distinct (source layout, consumer layouts) pair and cached across identical layers.
    ``src``: (distinct canonical source layouts, index of each candidate's)."""
    spec = model.graph.spec(v)
    grads = gradient_inputs(consumer, model.needs_grad)[i]   # the rule edge_parts and autodiff use
    s_lays, s_idx = src
    d_keys, d_idx = _memo(cache, ("dst", id(dst), i, grads), lambda: _reads_index(dst, i, grads))
    key = (spec, grads, tuple(s_lays), tuple(d_keys))
    small = cache.get(key)
    if small is None:
        small = np.zeros((len(s_lays), len(d_keys)))
        for a, s in enumerate(s_lays):
            settled = Layout(s.mesh, s.dims)
            for (r, g), b in d_keys.items():
                t = model.redistribution_seconds(s, r, v)
                if g is not None:
                    t += model.redistribution_seconds(g, settled, v)
                small[a, b] = t
        cache[key] = small
    return small[np.ix_(s_idx, d_idx)]

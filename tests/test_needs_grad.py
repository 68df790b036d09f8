"""One rule for "does this value need a gradient" (``ir.graph.differentiable_values``, and per
node ``gradient_inputs``): autodiff builds gradients with it, the cost model prices backward
passes with it, so the two agree on every (node, input) pair; integer values (token ids, a
cast to int) and values read only where an op does not differentiate (a mask) never need one.

Before the rule was shared, the cost model had its own closure: every value depending on a
parameter, whatever its dtype or the input it is read through. On PanGu-α that closure and
its predicates give the same answers as the shared rule, so the prediction is unchanged; on a
gated cell it kept, for a backward autodiff never builds, 204 bytes more (396 instead of the
192 autodiff's backward reads) and charged backward compute for the gated branch."""
import numpy as np
import pytest

from autopar import nn, ops
from autopar.ir.graph import (
    BACKWARD,
    FORWARD,
    Graph,
    differentiable_values,
    gradient_inputs,
)
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.autodiff import differentiate
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.sharding_plan import plan_shardings
from autopar.strategy.profile import load_profile

PROFILE = load_profile("cpu-2core")
ONE = Mesh((1,), ("devices",))


def old_cost_model_rule(graph: Graph) -> tuple[set[int], set[tuple[int, int]], set[int]]:
    """What the cost model read before it shared autodiff's rule: its set (parameters and every
    output of a forward node reading one, no dtype or nondiff filter), the (node, input) pairs
    it charged a backward for, and the nodes whose saved values it counted."""
    out = set(graph.params)
    for n in graph.nodes:
        if n.phase == FORWARD and any(v in out for v in n.inputs):
            out.update(n.outputs)
    forward = [n for n in graph.nodes if n.phase == FORWARD]
    pairs = {(n.id, i) for n in forward for i, v in enumerate(n.inputs) if v in out and i not in n.prim.nondiff_inputs}
    keeping = {n.id for n in forward if any(v in out for v in n.inputs)}
    return out, pairs, keeping


def cost_model_rule(model: CostModel) -> tuple[set[int], set[tuple[int, int]], set[int]]:
    """The same three, as the cost model reads them now (node_cost, edge_parts, kept_for_backward)."""
    pairs = {(n.id, i) for n in model.forward for i, needs in enumerate(gradient_inputs(n, model.needs_grad)) if needs}
    keeping = {n.id for n in model.forward if any(gradient_inputs(n, model.needs_grad))}
    return model.needs_grad, pairs, keeping


def autodiff_pairs(graph: Graph) -> set[tuple[int, int]]:
    """(forward node, input index) pairs autodiff builds a gradient for."""
    full, _ = differentiate(graph, graph.outputs[0], graph.params)
    return {(b.forward_of, i) for b in full.nodes if b.forward_of is not None for i, n in enumerate(b.needs) if n}


def read_by_backward(graph: Graph) -> set[int]:
    """Forward values (not parameters or constants) that autodiff's backward nodes read."""
    full, _ = differentiate(graph, graph.outputs[0], graph.params)
    return {v for b in full.nodes if b.phase == BACKWARD for v in b.inputs
            if v < len(graph.values) and v not in graph.params and v not in graph.consts}


@pytest.fixture(scope="module")
def pangu():
    cfg = PanguAlphaConfig.preset("tiny", hidden_size=32, ffn_hidden_size=64, num_heads=4, num_layers=2,
                                  seq_length=16, vocab_size=64)
    spec = TensorSpec((4, cfg.seq_length + 1), np.dtype(np.int32))   # token ids
    return trace(PanguAlphaWithLoss(cfg), (spec,), {}).graph


def test_cost_model_and_autodiff_agree_on_pangu_and_token_ids_never_need_a_gradient(pangu):
    g = pangu
    model = CostModel(g, ONE, PROFILE, True)
    needs, pairs, _ = cost_model_rule(model)
    assert needs == differentiable_values(g, g.params)
    assert pairs == autodiff_pairs(g) and len(pairs) > 50
    (ids,) = g.inputs
    assert g.spec(ids).dtype == np.int32 and ids not in needs
    assert all(g.spec(v).dtype.kind == "f" for v in needs)


def test_pangu_prediction_is_unchanged_by_the_shared_rule(pangu):
    """The cost model's figures depend on the rule only through these three; on PanGu-α the old
    closure gives the same three, so every figure of every plan is what it was."""
    model = CostModel(pangu, Mesh((4,), ("devices",)), PROFILE, True)
    assert cost_model_rule(model) == old_cost_model_rule(pangu)
    plan = plan_shardings(pangu, "semi_auto_parallel", model.stage, True)
    assert model.evaluate(plan).activation_bytes > 0


class Gated(nn.Cell):
    """loss = sum(h * h) + sum(where(h > 0, x, 0) * x) + sum(float(int(h)) * x), h = x @ w: the
    second term depends on ``w`` only through a bool mask (read where Select does not
    differentiate), the third only through an integer (read where Cast does): neither has
    a gradient."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.ones((4, 4)), name="w")
        self.mm, self.gt, self.select, self.mul, self.sum = (ops.MatMul(), ops.Greater(), ops.Select(),
                                                             ops.Mul(), ops.ReduceSum())
        self.to_int, self.to_float = ops.Cast(), ops.Cast()

    def construct(self, x):
        h = self.mm(x, self.w)
        kept = self.select(self.gt(h, np.zeros(())), x, np.zeros(()))
        rounded = self.to_float(self.to_int(h, np.int32), np.float64)
        return self.sum(self.mul(h, h), ()) + self.sum(self.mul(kept, x), ()) + self.sum(self.mul(rounded, x), ())


def test_values_reached_through_a_mask_or_an_integer_carry_no_gradient_and_are_not_priced():
    g = trace(Gated(), (TensorSpec((3, 4), np.dtype(np.float64)),), {}).graph
    by_kind = {}
    for n in g.nodes:
        by_kind.setdefault(n.prim.kind, []).append(n)
    mask, kept = by_kind["Greater"][0].outputs[0], by_kind["Select"][0].outputs[0]
    as_int, rounded = by_kind["Cast"][0].outputs[0], by_kind["Cast"][1].outputs[0]
    assert g.spec(as_int).dtype == np.int32     # read through Cast's differentiable input: the dtype filter
    model = CostModel(g, ONE, PROFILE, True)
    needs, pairs, keeping = cost_model_rule(model)
    assert not {mask, kept, as_int, rounded} & needs
    assert pairs == autodiff_pairs(g)
    h_h, first_sum = by_kind["Mul"][0], by_kind["ReduceSum"][0]
    assert {node for node, _ in pairs} == {by_kind["MatMul"][0].id, h_h.id, first_sum.id} | {
        n.id for n in by_kind["Add"]}
    # the old closure put all four in its set, charged the Cast to int a backward, and counted
    # the saved values of the Select (the mask) and of both gated products (kept, rounded)
    old_needs, old_pairs, old_keeping = old_cost_model_rule(g)
    assert {mask, kept, as_int, rounded} <= old_needs
    assert (by_kind["Cast"][0].id, 0) in old_pairs - pairs
    assert old_keeping - keeping == {by_kind["Greater"][0].id, by_kind["Select"][0].id, by_kind["Cast"][0].id,
                                     by_kind["Cast"][1].id, by_kind["Mul"][1].id, by_kind["Mul"][2].id,
                                     by_kind["ReduceSum"][1].id, by_kind["ReduceSum"][2].id}
    # now the activations priced are exactly what autodiff's backward reads: x (for dw) and h
    now = model.evaluate(plan_shardings(g, "stand_alone", ONE, True))
    saved = read_by_backward(g)
    assert saved == {g.inputs[0], by_kind["MatMul"][0].outputs[0]}
    assert now.activation_bytes == sum(g.spec(v).nbytes for v in saved) == 96 + 96

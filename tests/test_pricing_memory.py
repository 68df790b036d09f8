"""Memory peak as the larger of the step's phases, not their sum (issue 13: the measured
peak comes before gradients exist; adding every gradient to the end-of-forward
activations over-predicted by about 20%).

    peak = weights + states + max(activations at the end of forward,
                                  max over backward of gradients made + activations still kept
                                                       + activation gradients in flight)
"""
from dataclasses import replace

import numpy as np

from autopar import nn, ops
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.pipeline.stage_search import Part, stage_memory
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings


class TwoMatMuls(nn.Cell):
    """mean(x @ w1 @ w2): backward makes w2's gradient first (after the mean and the second
    matmul), w1's last."""

    def __init__(self, h):
        super().__init__()
        self.w1 = nn.Parameter(np.zeros((h, h), np.float32), name="w1")
        self.w2 = nn.Parameter(np.zeros((h, h), np.float32), name="w2")
        self.mm1, self.mm2, self.mean = ops.MatMul(), ops.MatMul(), ops.ReduceMean()

    def construct(self, x):
        return self.mean(self.mm2(self.mm1(x, self.w1), self.w2))


def test_one_stage_peak_is_the_backward_walk_not_the_sum():
    g = trace(TwoMatMuls(64), (TensorSpec((128, 64), np.dtype(np.float32)),), {}).graph
    stage = Mesh((1,), ("devices",))
    cost = CostModel(g, stage, load_profile("cpu-2core")).evaluate(plan_shardings(g, "stand_alone", stage, True))
    x = h1 = h2 = 128 * 64 * 4                  # kept: mm1 keeps x, mm2 keeps h1 (the weights are weights)
    w = 64 * 64 * 4                             # each weight, and each gradient
    # backward, in reverse: the mean makes dh2 while x and h1 are kept; mm2 reads dh2 and
    # makes dW2 and dh1 while x and h1 are still kept (the peak), then frees h1 and dh2;
    # mm1 reads dh1 and makes dW1 while x is kept
    mean, mm2, mm1 = x + h1 + h2, w + x + h1 + h2 + h1, 2 * w + x + h1
    assert cost.backward_peak_bytes == max(mean, mm2, mm1) == 147456
    assert cost.memory_bytes == 2 * w + 2 * 2 * w + 147456          # weights + Adam's two states + peak


FIRST = Part(model_bytes=300, grad_bytes=100, activation_bytes=50)
LAYER = Part(model_bytes=30, grad_bytes=10, activation_bytes=1000, boundary_bytes=100)
LAST = Part(model_bytes=600, grad_bytes=200, activation_bytes=400)


def test_stage_memory_takes_the_larger_phase():
    static = (300 - 100) + 4 * (30 - 10) + (600 - 200)           # weights + states: 680
    per_mb = 50 + 4 * 1000 + 400                                 # one micro-batch's activations: 4450
    # pp 1, one micro-batch: no gradient exists while its activations are all kept, and the
    # backward frees faster than it makes gradients: the end of forward is the peak
    assert stage_memory(FIRST, LAYER, LAST, 1, 0, 4, 1, False) == static + per_mb == 5130
    # two micro-batches: the second's backward runs beside the step's gradients (the first's)
    # and makes its own, added in after it: bounded by both sets whole beside its activations
    # (auto._stage_memory's rule, measured on PanGu-α pipelines within 2%)
    assert stage_memory(FIRST, LAYER, LAST, 1, 0, 4, 2, False) == static + 2 * 340 + per_mb == 5810


def test_stage_memory_with_recompute_peaks_while_a_layer_is_rebuilt_in_backward():
    # first of 2 stages, 2 micro-batches, both in flight before the first backward (m == k)
    static = (300 - 100) + 4 * (30 - 10)                         # 280
    per_mb = 50 + 4 * 100                                        # each layer keeps its input: 450
    # the first backward: the other micro-batch's 450 kept, this one's 450, and the top
    # layer's 1000 rebuilt before any gradient is made: 1900. The second's: the same beside
    # both gradient sets (2 x 140, the step's and its own) -- the larger
    grads = 100 + 4 * 10
    assert stage_memory(FIRST, LAYER, LAST, 2, 0, 4, 2, True) == static + 2 * grads + per_mb + per_mb + 1000 == 2460


class MatMulReshapeMean(nn.Cell):
    """mean(reshape(x @ w)): the reshape's VJP hands dy back as a view, so the matmul
    output's gradient lives in the reshape output's gradient buffer."""

    def __init__(self, h):
        super().__init__()
        self.w = nn.Parameter(np.zeros((h, h), np.float32), name="w")
        self.mm, self.reshape, self.mean = ops.MatMul(), ops.Reshape(), ops.ReduceMean()

    def construct(self, x):
        y = self.mm(x, self.w)
        return self.mean(self.reshape(y, (-1,)))


def test_a_gradient_that_views_another_is_counted_once(monkeypatch):
    from autopar.strategy.backward_memory import gradients_in_flight
    g = trace(MatMulReshapeMean(64), (TensorSpec((128, 64), np.dtype(np.float32)),), {}).graph
    model = CostModel(g, Mesh((1,), ("devices",)), load_profile("cpu-2core"))
    flight = model.gradients_in_flight(plan_shardings(g, "stand_alone", model.stage, True).shardings)
    y = 128 * 64 * 4
    # forward order mm, reshape, mean: dy of the reshape output is made by the mean and read by
    # the reshape, whose dx (the matmul output's gradient) is a view of it: one buffer throughout
    assert [n.prim.kind for n in model.forward] == ["MatMul", "Reshape", "ReduceMean"]
    assert flight == [y, y, y]
    # were the reshape's input gradient a fresh array, its step would hold both: dy and dx
    reshape = model.forward[1].prim
    monkeypatch.setattr(reshape, "grads_are_fresh", lambda: True)
    assert gradients_in_flight(model.forward, model.needs_grad, model.params, lambda v: y) == [y, 2 * y, y]


def test_stage_memory_holds_level1_gradients_whole_while_micro_batches_accumulate():
    """Level-1 optimizer parallel reduce-scatters the step's gradient after the last micro-
    batch: with one micro-batch the slice is all there is, with several the whole gradient
    (``accumulated_bytes``) is what the phases hold -- the tied table's once on a stage
    holding both ends."""
    sliced = [replace(p, accumulated_bytes=4 * p.grad_bytes) for p in (FIRST, LAYER, LAST)]
    assert stage_memory(*sliced, 1, 0, 4, 1, False) == stage_memory(FIRST, LAYER, LAST, 1, 0, 4, 1, False)
    static, per_mb = 680, 4450
    whole = 4 * (100 + 4 * 10 + 200)                                # 1360
    assert stage_memory(*sliced, 1, 0, 4, 2, False) == static + 2 * whole + per_mb == 7850
    tied = replace(sliced[2], shared_bytes=120, shared_grad_bytes=40, shared_accumulated=160)
    assert stage_memory(sliced[0], sliced[1], tied, 1, 0, 4, 2, False) == (static - 80) + 2 * (whole - 160) + per_mb

"""Memory accounting: the meter counts the arrays alive at the peak, by hand, on a small MLP."""
import numpy as np
import pytest

from autopar import nn, ops
from autopar.runtime.compiled import GradProgram
from autopar.runtime.memory import MemoryMeter, predicted_activations, saved_for_backward
from autopar.runtime.program import Program
from autopar.runtime.trace import trace
from autopar.train import AdamWeightDecay

B, IN, HID, OUT = 4, 16, 32, 8
F32 = 4   # bytes


class MLP(nn.Cell):
    """(B, IN) -> Dense -> ReLU -> Dense -> (B, OUT); loss = sum(y * y)."""

    def __init__(self):
        super().__init__()
        self.d1 = nn.Dense(IN, HID, has_bias=False)
        self.relu = ops.ReLU()
        self.d2 = nn.Dense(HID, OUT, has_bias=False)

    def construct(self, x):
        y = self.d2(self.relu(self.d1(x)))
        return (y * y).sum()


X = np.random.default_rng(0).standard_normal((B, IN)).astype(np.float32)


def mlp_program():
    net = MLP()
    return net, GradProgram(net, (X,), {}, net.trainable_params())


def test_meter_equals_the_arrays_alive_at_the_peak():
    """Instructions: h = x W1^T, r = relu(h) (h dies), y = r W2^T, s = y*y, loss = sum(s) (s dies);
    backward: ds = broadcast of the seed (a view of a constant), dy1, dy2 = ds*y, y*ds (y dies),
    dy = dy1 + dy2, dr, dW2 = matmul grads (dy dies), dh = relu grad (r, dr die), dW1.
    The activation peak is at the ReLU gradient: r, dr and dh, each (B, HID)."""
    _, prog = mlp_program()
    prog.program.meter = MemoryMeter()
    loss, grads = prog((X,), {})
    usage = prog.program.meter.last
    assert usage.activations_peak == 3 * B * HID * F32
    assert usage.parameters == (HID * IN + OUT * HID) * F32
    assert usage.inputs == B * IN * F32 + F32                     # x and the loss seed (a scalar)
    assert usage.output_bytes == (F32, HID * IN * F32, OUT * HID * F32)     # loss, dW1, dW2
    # the dynamic peak comes at the end: dh with dW2, dW1 and the loss alive
    assert usage.dynamic_peak == B * HID * F32 + F32 + OUT * HID * F32 + HID * IN * F32
    assert usage.total_peak == usage.parameters + usage.inputs + usage.dynamic_peak
    assert max(predicted_activations(prog.program)) == usage.activations_peak
    # the meter changes nothing
    prog.program.meter = None
    loss2, grads2 = prog((X,), {})
    assert loss2 == loss and all(np.array_equal(a, b) for a, b in zip(grads, grads2))


def test_views_count_once_by_their_base():
    class Views(nn.Cell):
        def construct(self, x):
            y = x * 2.0                          # (6, 4) fresh
            z = y.reshape(-1)                    # (24,) a view of y
            t = y.transpose(1, 0)                # (4, 6) a view of y
            return z.reshape(4, 6) + t           # (4, 6) fresh
    x = np.arange(24.0).reshape(6, 4)
    graph = trace(Views(), (x,), {}).graph
    prog = Program(graph, graph.outputs, measure_memory=True)
    out = prog.run([x])[0]
    np.testing.assert_array_equal(out, (2 * x).reshape(4, 6) + 2 * x.T)
    usage = prog.meter.last
    assert usage.activations_peak == 24 * 8            # y once, however many views of it live
    assert usage.dynamic_peak == 2 * 24 * 8            # y and the output, during the Add


def test_saved_for_backward_charges_the_node_that_made_the_buffer():
    _, prog = mlp_program()
    saved = {prog.graph.nodes[n].name: b for n, b in saved_for_backward(prog.graph).items()}
    # ReLU saves its output r (also d2's saved input: counted once); Mul saves y; the
    # matmuls' other saved inputs are x and the weights, not activations
    assert saved == {"MLP/ReLU": B * HID * F32, "d2/MatMul": B * OUT * F32}


def test_train_one_step_memory_report():
    net = MLP()
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-3)
    train = nn.TrainOneStepCell(net, opt)
    with pytest.raises(ValueError, match="measure_memory"):
        train.memory_report()
    train(X)
    assert train.build(X).program.meter is None           # off by default
    train.measure_memory()
    train(X)
    report = train.memory_report()
    weights = (HID * IN + OUT * HID) * F32
    assert report == {"parameters": weights, "gradients": weights, "optimizer_states": 2 * weights,
                      "inputs": B * IN * F32 + F32, "activations_peak": 3 * B * HID * F32,
                      "total_peak": weights + 2 * weights + B * IN * F32 + F32
                      + B * HID * F32 + F32 + weights}
    train.measure_memory(False)
    assert train.build(X).program.meter is None

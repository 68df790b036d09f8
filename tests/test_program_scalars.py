"""Program on 0-d values: numpy hands back arithmetic on 0-d arrays as immutable scalars,
so an op that would overwrite a 0-d input in place (buffer donation) must not be given one;
the same graph on 1-d values still donates."""
import numpy as np

import autopar
from autopar import nn
from autopar.runtime.program import Program
from autopar.runtime.trace import trace


class Chain(nn.Cell):
    """((x*2) + (y*3)) + (x*2)*0 + 1: every Add's left input is a fresh, dead temporary."""

    def construct(self, x, y):
        a = x * 2.0
        b = y * 3.0
        c = a + b
        return c + a * 0.0 + 1.0


class Scaled(nn.Cell):
    """loss = (w*x + w*y) + 1 with a 0-d weight w: its gradient is x + y."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.array(0.5, np.float32), name="w")

    def construct(self, x, y):
        return (self.w * x + self.w * y) + 1.0


def test_in_place_add_on_zero_d_values_runs_and_is_exact():
    x, y = np.array(1.5, np.float32), np.array(2.0, np.float32)
    graph = trace(Chain(), (x, y), {}).graph
    prog = Program(graph, graph.outputs)
    assert prog.donations == 0                       # nothing 0-d is overwritten
    (out,) = prog.run([x, y])
    assert float(out) == 1.5 * 2 + 2.0 * 3 + 1.0
    assert float(x) == 1.5 and float(y) == 2.0       # the caller's arrays untouched


def test_the_same_graph_on_vectors_still_donates():
    x, y = np.array([1.5, -1.0], np.float32), np.array([2.0, 4.0], np.float32)
    graph = trace(Chain(), (x, y), {}).graph
    prog = Program(graph, graph.outputs)
    assert prog.donations >= 2                       # c = a + b and c + ... overwrite temporaries
    np.testing.assert_array_equal(prog.run([x, y])[0], x * 2 + y * 3 + 1)


def test_gradients_through_zero_d_adds():
    x, y = np.array(1.5, np.float32), np.array(-4.0, np.float32)
    loss, grads = autopar.value_and_grad(Scaled())(x, y)
    assert float(loss) == 0.5 * 1.5 + 0.5 * -4.0 + 1.0
    assert float(grads["w"]) == 1.5 - 4.0

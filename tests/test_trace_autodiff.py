"""Tracing, autodiff and the compiled program, on small cells built from basic ops."""
import functools

import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.runtime.autodiff import differentiate
from autopar.runtime.program import Program
from autopar.runtime.trace import trace


class MLP(nn.Cell):
    """Two matmuls sharing one weight (so its gradient has two contributions)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(nn.Normal(0.5), (4, 4), "float64", name="w")
        self.b = nn.Parameter(nn.Normal(0.5), (4,), "float64", name="b")
        self.mm = ops.MatMul()
        self.tanh = ops.Tanh()

    def construct(self, x):
        h = self.tanh(self.mm(x, self.w) + self.b)
        y = self.mm(h, self.w)
        return ops.ReduceSum()(y * y, ()) * 0.5


def numeric_grad(cell, param, x, eps=1e-6):
    base = param.asnumpy()
    g = np.zeros_like(base)
    for i in range(base.size):
        for sign in (1, -1):
            v = base.copy()
            v.reshape(-1)[i] += sign * eps
            param.set_data(v)
            g.reshape(-1)[i] += sign * float(cell(x)) / (2 * eps)
    param.set_data(base)
    return g


def test_value_and_grad_matches_finite_differences():
    net = MLP()
    x = np.random.default_rng(0).standard_normal((3, 4))
    loss, grads = autopar.value_and_grad(net)(x)
    assert list(grads) == ["w", "b"]
    want = 0.5 * np.sum(np.square(np.tanh(x @ net.w.asnumpy() + net.b.asnumpy()) @ net.w.asnumpy()))
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    for p in (net.w, net.b):
        np.testing.assert_allclose(grads[p.name], numeric_grad(net, p, x), rtol=1e-6, atol=1e-9)


def test_shared_weight_gradient_is_accumulated_once():
    net = MLP()
    t = trace(net, (np.zeros((3, 4)),), {})
    g, (dw, db) = differentiate(t.graph, t.graph.outputs[0], t.graph.params)
    producer = g.nodes[g.values[dw].producer]
    assert producer.prim.kind == "AddN" and len(producer.inputs) == 2


def test_trace_is_cached_per_signature():
    net = MLP()
    net(np.zeros((3, 4)))
    net(np.ones((3, 4)))
    assert len(net._compiled) == 1
    net(np.zeros((5, 4)))
    assert len(net._compiled) == 2


def test_program_frees_dead_values():
    net = MLP()
    t = trace(net, (np.zeros((3, 4)),), {})
    prog = Program(t.graph, t.graph.outputs)
    freed = {v for ins in prog.instructions for v in ins.frees}
    produced = {v for ins in prog.instructions for v in ins.outs}
    # every intermediate dies except the output
    assert produced - freed == set(t.graph.outputs)


def test_value_dependent_control_flow_is_a_clear_error():
    class Bad(nn.Cell):
        def construct(self, x):
            if ops.ReduceSum()(x, ()) > 0:
                return x
            return -x
    with pytest.raises(TypeError, match="truth value of a traced Tensor.*shapes only"):
        Bad()(np.ones(3))


def test_python_scalars_keep_tensor_dtype():
    class Half(nn.Cell):
        def construct(self, x):
            return x * 0.5 + 1
    y = Half()(np.ones(3, np.float32))
    assert y.dtype == np.float32 and np.allclose(y, 1.5)


def test_gradient_of_unused_parameter_is_zero():
    class Partial(nn.Cell):
        def __init__(self):
            super().__init__()
            self.used = nn.Parameter(np.ones(2), name="used")
            self.unused = nn.Parameter(np.ones(2), name="unused")

        def construct(self, x):
            return ops.ReduceSum()(x * self.used, ())
    x = np.array([2.0, 3.0])
    _, grads = autopar.value_and_grad(Partial())(x)
    np.testing.assert_array_equal(grads["used"], x)
    np.testing.assert_array_equal(grads["unused"], np.zeros(2))


def test_graph_converts_to_networkx():
    t = trace(MLP(), (np.zeros((3, 4)),), {})
    g = t.graph.to_networkx()
    import networkx as nx
    assert nx.is_directed_acyclic_graph(g) and g.number_of_nodes() == len(t.graph.nodes)


class NoDonation(Program):
    @staticmethod
    def _plan_donations(graph, nodes, last_use, pinned):
        return {}


def test_buffer_donation_keeps_pangu_loss_and_gradients_exact():
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    from autopar.runtime.compiled import GradProgram
    net = PanguAlphaWithLoss(PanguAlphaConfig.preset("tiny", dropout_rate=0.1))
    net.set_train(True)
    ids = np.random.default_rng(0).integers(0, 96, (2, 17)).astype(np.int32)
    gp = GradProgram(net, (ids,), {}, net.trainable_params())
    assert gp.program.donations >= 10
    plain = NoDonation(gp.graph, gp.program.outputs)
    assert plain.donations == 0
    for got, want in zip(gp.program.run([ids], step=3), plain.run([ids], step=3)):
        np.testing.assert_array_equal(got, want)


def test_no_donation_while_a_view_of_the_buffer_is_alive():
    class ViewHazard(nn.Cell):
        def construct(self, x):
            y = x * 2.0                    # fresh buffer
            z = y.reshape(-1)              # a view of y, still needed below
            w = y + 1.0                    # y's last direct use: must not be overwritten
            return w + z.reshape(w.shape)
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(ViewHazard()(x), 4 * x + 1)
    t = trace(ViewHazard(), (x,), {})
    prog = Program(t.graph, t.graph.outputs)
    donated = {ins.node.name: isinstance(ins.fn, functools.partial) for ins in prog.instructions}
    assert donated == {"ViewHazard/Mul": False,     # x is the caller's array: never overwritten
                       "ViewHazard/Reshape": False, "ViewHazard/Add": False,  # y + 1 keeps y: z views it
                       "ViewHazard/Reshape-1": False, "ViewHazard/Add-1": True}  # w + z reuses w

"""One program interface (issue 12 item 2): the serial, sharded (dp and mp on two in-process
ranks) and pipeline (two stages) training programs are all a TrainingProgram, and behave
alike for a parameter the loss does not use (zero gradients, an update like serial) and for
a loss that is not a scalar (the same error)."""
from __future__ import annotations

import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.runtime.protocol import ForwardStep, TrainingProgram
from autopar.runtime.sharded_forward import forward_program
from autopar.train import SGD

X = np.arange(32, dtype=np.float64).reshape(4, 8) / 32.0
LR = 0.1


class Layer(nn.Cell):
    """x @ w, then tanh: its MatMul split by ``strategy`` (mp: the weight's columns, then rows)."""

    def __init__(self, seed: int, strategy):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = nn.Parameter(rng.standard_normal((8, 8)) / 4, name="w")
        self.mm = ops.MatMul().shard(strategy)
        self.tanh = ops.Tanh()

    def construct(self, x):
        return self.tanh(self.mm(x, self.w))


class Net(nn.Cell):
    """Two layers (stage 0 and stage 1 under a 2-stage pipeline) and ``spare``, a parameter
    the loss never reads. ``scalar=False`` returns the squares unreduced: not a loss."""

    def __init__(self, dp: int = 1, mp: int = 1, scalar: bool = True):
        super().__init__()
        self.first = Layer(0, ((dp, 1), (1, mp)))
        self.second = Layer(1, ((dp, mp), (mp, 1)))
        self.spare = nn.Parameter(np.full((3, 2), 7.0), name="spare")
        self.first.pipeline_stage, self.second.pipeline_stage = 0, 1
        self.square = ops.Mul()
        self.mean = ops.ReduceMean()
        self.scalar = scalar

    def construct(self, x):
        y = self.second(self.first(x))
        sq = self.square(y, y)
        return self.mean(sq) if self.scalar else sq


def one_run(make, x):
    """(loss, full gradients by name, the program, weights after one SGD step)."""
    net = make()
    loss, grads = autopar.value_and_grad(net)(x)
    train = nn.TrainOneStepCell(net, SGD(net.trainable_params(), LR))
    prog = train.build(x)
    train(x)
    return float(loss), dict(grads), prog, {p.name: p.asnumpy() for p in net.trainable_params()}


LAYOUTS = {   # name: (context, per-rank input, network)
    "dp": (dict(parallel_mode="data_parallel"), lambda r: np.split(X, 2)[r], lambda: Net()),
    "mp": (dict(parallel_mode="semi_auto_parallel", full_batch=True), lambda r: X, lambda: Net(mp=2)),
    "pipeline": (dict(parallel_mode="semi_auto_parallel", full_batch=True, pipeline_stages=2), lambda r: X,
                 lambda: Net()),
}


def on_two_ranks(layout: str, make=None):
    ctx, feed, net = LAYOUTS[layout]

    def body(comm):
        with bound_world(comm):
            return one_run(make or net, feed(comm.rank))
    with parallel_context(device_num=2, **ctx):
        return run_in_process(2, body)


@pytest.fixture(scope="module")
def serial():
    return one_run(Net, X)


@pytest.mark.parametrize("layout", ["dp", "mp", "pipeline"])
def test_unused_parameter_gets_zero_gradients_everywhere(serial, layout):
    loss, grads, _, weights = serial
    assert np.array_equal(grads["spare"], np.zeros((3, 2)))
    assert np.array_equal(weights["spare"], np.full((3, 2), 7.0))   # no update from a zero gradient
    for got_loss, got_grads, got_prog, got_weights in on_two_ranks(layout):
        assert type(got_prog).__name__ == ("PipelineGradProgram" if layout == "pipeline" else "ShardedGradProgram")
        np.testing.assert_allclose(got_loss, loss, rtol=1e-12)
        assert sorted(got_grads) == sorted(grads)
        assert np.array_equal(got_grads["spare"], np.zeros((3, 2)))
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-10, atol=1e-14, err_msg=name)
        for name, w in weights.items():
            np.testing.assert_allclose(got_weights[name], w, rtol=1e-10, atol=1e-14, err_msg=name)


NOT_SCALAR = (r"^Net: output 0 \(the loss\): expected a scalar, got shape \(4, 8\); "
              r"reduce it with ops\.ReduceMean$")


def test_non_scalar_loss_is_the_same_error_serially():
    with pytest.raises(ValueError, match=NOT_SCALAR):
        autopar.value_and_grad(Net(scalar=False))(X)


@pytest.mark.parametrize("layout", ["mp", "pipeline"])
def test_non_scalar_loss_is_the_same_error_sharded_and_pipelined(layout):
    with pytest.raises(ValueError, match=NOT_SCALAR.replace("^", r"^\[rank \d of 2\] ")):
        on_two_ranks(layout, lambda: Net(scalar=False))


def test_every_program_is_a_training_program(serial):
    programs = [serial[2]] + [on_two_ranks(layout)[1][2] for layout in LAYOUTS]
    assert [type(p).__name__ for p in programs] == [
        "GradProgram", "ShardedGradProgram", "ShardedGradProgram", "PipelineGradProgram"]
    for prog in programs:
        assert isinstance(prog, TrainingProgram)
        assert len(prog.shards) == len(prog.param_shards) == 3
        assert prog.comm_clock[0] >= 0.0


def test_every_forward_program_is_a_forward_step():
    """Serial and sharded forward programs answer the same calls, with the serial result."""
    expected = Net(scalar=False)(X)

    def body(comm):
        with bound_world(comm):
            net = Net(mp=2, scalar=False)
            return forward_program(net, (X,), {}), net(X)
    serial = forward_program(Net(scalar=False), (X,), {})
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        sharded = run_in_process(2, body)
    assert [type(p).__name__ for p in [serial] + [r[0] for r in sharded]] == [
        "ForwardProgram", "ShardedForwardProgram", "ShardedForwardProgram"]
    for prog, out in [(serial, serial((X,), {}))] + sharded:
        assert isinstance(prog, ForwardStep)
        np.testing.assert_allclose(out, expected, rtol=1e-12)

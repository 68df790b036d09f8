"""Sharded execution on in-process ranks: sharded loss and gradients equal serial ones,
with exactly the collectives the plan calls for."""
import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.runtime.sharded_program import ShardedGradProgram


class MLP(nn.Cell):
    """A residual Megatron MLP: column-parallel then row-parallel, added back to its input."""

    def __init__(self, h=8, f=16, dp=1, mp=1):
        super().__init__()
        self.scale = nn.Parameter(nn.Normal(0.5), (h,), "float64", name="scale")
        self.mul = ops.Mul().shard(((dp, 1), (1,)))   # gives the MLP's input a gradient
        self.w1 = nn.Parameter(nn.Normal(0.5), (h, f), "float64", name="w1")
        self.b1 = nn.Parameter(nn.Normal(0.5), (f,), "float64", name="b1")
        self.w2 = nn.Parameter(nn.Normal(0.5), (f, h), "float64", name="w2")
        self.mm1 = ops.MatMul().shard(((dp, 1), (1, mp)))
        self.add = ops.Add().shard(((dp, mp), (mp,)))
        self.gelu = ops.GeLU()
        self.mm2 = ops.MatMul().shard(((dp, mp), (mp, 1)))
        self.residual = ops.Add().shard(((dp, 1), (dp, 1)))

    def construct(self, x):
        x = self.mul(x, self.scale)
        h = self.gelu(self.add(self.mm1(x, self.w1), self.b1))
        y = self.residual(x, self.mm2(h, self.w2))
        return (y * y).sum() * 0.5


def run_sharded(n, make_net, x, mode, full_batch=False):
    def body(comm):
        net = make_net()
        xs = x if full_batch else np.split(x, n)[comm.rank]
        prog = ShardedGradProgram(net, (xs,), net.trainable_params(), mode, comm, full_batch=full_batch)
        comm.stats.reset()
        loss, grads = prog((xs,))
        return loss, grads, prog.layouts, comm.stats.snapshot(), comm.stats.log
    return run_in_process(n, body)


def gathered(results, k, shape):
    layout = results[0][2][k]
    return layout.assemble({r: res[1][k] for r, res in enumerate(results)}, shape)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_data_parallel_equals_serial(n):
    x = np.random.default_rng(0).standard_normal((8, 8))
    serial = MLP()
    loss, grads = autopar.value_and_grad(serial)(x)
    res = run_sharded(n, MLP, x, "data_parallel")
    for r in res:
        np.testing.assert_allclose(r[0], loss, rtol=1e-12, err_msg=str([q[0] for q in res]) + str(res[0][4]))
    for k, p in enumerate(serial.trainable_params()):
        np.testing.assert_allclose(gathered(res, k, p.shape), grads[p.name], rtol=1e-10, atol=1e-12)
    counts = res[0][3]["count"]
    # pure data parallel: one all-reduce per gradient (scale, w1, b1, w2) and one for the loss
    assert counts == ({"allreduce": 5} if n > 1 else {})


@pytest.mark.parametrize("dp, mp", [(1, 2), (2, 2), (1, 4)])
def test_megatron_mlp_equals_serial_with_one_allreduce_each_way(dp, mp):
    x = np.random.default_rng(1).standard_normal((8, 8))
    serial = MLP()
    loss, grads = autopar.value_and_grad(serial)(x)
    res = run_sharded(dp * mp, lambda: MLP(dp=dp, mp=mp), x, "semi_auto_parallel", full_batch=True)
    for r in res:
        np.testing.assert_allclose(r[0], loss, rtol=1e-12)
    for k, p in enumerate(serial.trainable_params()):
        np.testing.assert_allclose(gathered(res, k, p.shape), grads[p.name], rtol=1e-10, atol=1e-12)
    # rank 0: mp group (0, 1, ...), dp group (0, mp, ...); 8 rows split dp ways, 16 columns mp ways
    calls = sorted((rec.kind, rec.ranks, rec.shape) for rec in res[0][4])
    mp_group, dp_group = tuple(range(mp)), tuple(range(0, dp * mp, mp))
    rows = 8 // dp
    want = [("allreduce", mp_group, (rows, 8)),     # forward: the row-parallel output y
            ("allreduce", mp_group, (rows, 8))]     # backward: the column-parallel input's gradient
    if dp > 1:                                      # the loss and the data-parallel gradients
        want += [("allreduce", dp_group, ()), ("allreduce", dp_group, (8,)), ("allreduce", dp_group, (8, 16 // mp)),
                 ("allreduce", dp_group, (16 // mp,)), ("allreduce", dp_group, (16 // mp, 8))]
    assert calls == sorted(want)

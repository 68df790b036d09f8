"""comm_fusion under real MPI (``mpiexec -n 2``, run by tests/test_comm_mpi_launch.py):
MPI's non-blocking all-reduce and reduce-scatter equal the blocking ones, and bucketed
gradients (and, under optimizer parallel, bucketed reduce-scatters and all-gathers) equal the
unbucketed ones bit for bit (on 2 ranks each element is one sum, whatever the buffer)."""
import numpy as np
import pytest

from autopar import nn
from autopar.comm import world
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.dtype import bfloat16
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.train import AdamWeightDecay

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)       # float32, as users train
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
AUTO = {"allreduce": {"mode": "auto"}}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, bfloat16])
def test_iallreduce_equals_allreduce_waited_out_of_order(dtype):
    x = (np.random.default_rng(WORLD.rank).standard_normal((5, 7)) * 3).astype(dtype)
    first, second = WORLD.iallreduce(x), WORLD.iallreduce(x, op="max")
    blocking = WORLD.allreduce(x)
    assert np.array_equal(second.wait(), WORLD.allreduce(x, op="max"))
    got = first.wait()
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, blocking)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, bfloat16])
def test_a_donated_iallreduce_equals_allreduce_and_reduces_into_the_buffer_it_can(dtype):
    x = (np.random.default_rng(WORLD.rank).standard_normal((5, 7)) * 3).astype(dtype)
    want = WORLD.allreduce(x)
    donated = x.copy()
    got = WORLD.iallreduce(donated, donate=True).wait()
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, want)
    # MPI_IN_PLACE where the buffer already has the reduction's dtype; bfloat16 sums in float32
    assert np.shares_memory(got, donated) == (dtype != bfloat16)


@pytest.mark.parametrize("axis", [0, 1])
def test_ireduce_scatter_equals_reduce_scatter(axis):
    x = np.random.default_rng(WORLD.rank).standard_normal((4, 6)).astype(np.float32)
    request = WORLD.ireduce_scatter(x, axis=axis)
    assert np.array_equal(request.wait(), WORLD.reduce_scatter(x, axis=axis))


def grads(dp, mp, fusion):
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp)
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True, comm_fusion=fusion)
    net = PanguAlphaWithLoss(cfg)
    prog = ShardedGradProgram(net, (IDS,), net.trainable_params(), "semi_auto_parallel", WORLD, full_batch=True,
                              ctx=ctx)
    WORLD.stats.reset()
    loss, got = prog((IDS,))
    return loss, got, WORLD.stats.snapshot()["count"], prog.fusion


@pytest.mark.parametrize("dp, mp", [(2, 1), (1, 2)])
def test_fused_gradients_equal_unfused_bit_for_bit(dp, mp):
    loss, want, count, _ = grads(dp, mp, {})
    for fusion in (AUTO, {"allreduce": {"mode": "size", "config": 0.01}}):
        got_loss, got, got_count, done = grads(dp, mp, fusion)
        assert got_loss == loss
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), fusion
        reductions = sum(len(b) for b in done.buckets)
        assert got_count["allreduce"] == count["allreduce"] - reductions + len(done.buckets)
    if dp == 2:
        assert count["allreduce"] == 53 and grads(dp, mp, AUTO)[2]["allreduce"] == 3


@pytest.mark.parametrize("optimizer_parallel", [False, True])
def test_three_training_steps_fused_equal_unfused_bit_for_bit(optimizer_parallel):
    every = {"allreduce": {"mode": "auto"}, "reducescatter": {"mode": "auto"}, "allgather": {"mode": "auto"}}

    def train(fusion):
        with bound_world(WORLD), parallel_context(parallel_mode="data_parallel", device_num=2, comm_fusion=fusion,
                                                  enable_parallel_optimizer=optimizer_parallel,
                                                  parallel_optimizer_threshold=0):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=2))
            step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=0.01),
                                       clip_norm=1.0)
            ids = np.split(IDS, 2)[WORLD.rank]
            return [float(step(ids)) for _ in range(3)], {p.name: p.asnumpy() for p in net.trainable_params()}
    (losses, weights), (got_losses, got_weights) = train({}), train(every)
    assert got_losses == losses
    for name, w in weights.items():
        assert np.array_equal(got_weights[name], w), name

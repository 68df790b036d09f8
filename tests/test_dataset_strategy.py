"""MindSpore's ``dataset_strategy`` tuples: each rank is fed its block of each input on the
device matrix (s0, s1, ..., R) of its stage (data-parallel blocks outer, the R repeats
consecutive ranks), and loss and gradients equal serial. Tuples autopar cannot feed raise
the stated error naming the input, at set or compile time."""
import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.ir.graph import FORWARD
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.strategy.sharding_plan import fed_layout, fed_splits, input_layout
from autopar.train.dataset import rank_block

N = 4
RNG = np.random.default_rng(7)
X = RNG.standard_normal((8, 12))            # (B, H)
T = RNG.standard_normal((8, 8))             # (B, out): a target
W1 = RNG.standard_normal((12, 16))
W2 = RNG.standard_normal((16, 8))
DP_MP = (((2, 1), (1, 2)), ((2, 2), (2, 1)))   # dp2 x mp2: column- then row-parallel


class Net(nn.Cell):
    """x (B, 12) -> (B, 16) -> (B, 8); the loss sums over the batch, so a rank fed the
    wrong rows (or the same rows twice) gives another loss."""

    def __init__(self, strategies=DP_MP, target=False):
        super().__init__()
        self.w1 = nn.Parameter(W1, name="w1")
        self.w2 = nn.Parameter(W2, name="w2")
        self.mm1 = ops.MatMul().shard(strategies[0]) if strategies else ops.MatMul()
        self.mm2 = ops.MatMul().shard(strategies[1]) if strategies else ops.MatMul()
        self.target = target

    def construct(self, x, t=None):
        y = self.mm2(ops.Tanh()(self.mm1(x, self.w1)), self.w2)
        if self.target:
            y = y - t
        return (y * y).sum()


def serial(target=False):
    net = Net(None, target)
    return autopar.value_and_grad(net)(*((X, T) if target else (X,)))


def fed(strategy, target=False, mode="semi_auto_parallel", strategies=DP_MP):
    """value_and_grad through the public API on 4 in-process ranks, each fed
    ``rank_block`` of the global batch under the context: (loss, grads, fed blocks) per rank."""
    def body(comm):
        with bound_world(comm):
            ctx = autopar.context.current_context()
            batch = rank_block((X, T) if target else (X,), ctx, comm.rank)
            loss, grads = autopar.value_and_grad(Net(strategies, target))(*batch)
            return loss, grads, batch
    with parallel_context(parallel_mode=mode, device_num=N, dataset_strategy=strategy):
        return run_in_process(N, body)


def assert_serial(results, target=False):
    loss, grads = serial(target)
    for r_loss, r_grads, _ in results:
        np.testing.assert_allclose(r_loss, loss, rtol=1e-12)
        for name, g in grads.items():
            np.testing.assert_allclose(r_grads[name], g, rtol=1e-10, atol=1e-12, err_msg=name)


# ---- which block each rank is fed ---------------------------------------------------------

@pytest.mark.parametrize("splits, blocks", [
    ((2, 1), [(0, 0), (0, 0), (1, 0), (1, 0)]),     # data-parallel outer: ranks 0,1 share rows 0:B/2
    ((4, 1), [(0, 0), (1, 0), (2, 0), (3, 0)]),     # = "data_parallel"
    ((1, 1), [(0, 0)] * 4),                         # = "full_batch"
    ((1, 2), [(0, 0), (0, 0), (0, 1), (0, 1)]),     # the columns split, repeated by consecutive ranks
    ((2, 2), [(0, 0), (0, 1), (1, 0), (1, 1)]),     # rank 2*i + j: rows block i, columns block j
])
def test_rank_to_block_on_the_device_matrix_s_then_repeat(splits, blocks):
    lay = fed_layout(splits, Mesh((N,), ("devices",)))
    assert [lay.block_index(r) for r in range(N)] == blocks


def test_data_parallel_tuple_is_the_data_parallel_layout():
    stage = Mesh((N,), ("devices",))
    assert fed_layout((4, 1), stage) == input_layout(TensorSpec((8, 12), "float64"), stage, False)


def test_rank_block_cuts_what_the_tuple_says():
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=((2, 1), (1, 2)))
    blocks = [rank_block((X, T), ctx, r) for r in range(N)]
    for r in (0, 1):
        np.testing.assert_array_equal(blocks[r][0], X[:4])
        np.testing.assert_array_equal(blocks[r][1], T[:, :4])
    for r in (2, 3):
        np.testing.assert_array_equal(blocks[r][0], X[4:])
        np.testing.assert_array_equal(blocks[r][1], T[:, 4:])
    dp = ParallelContext(parallel_mode="semi_auto_parallel", device_num=N)
    np.testing.assert_array_equal(rank_block((X,), dp, 3)[0], X[6:])
    piped = ParallelContext(parallel_mode="semi_auto_parallel", device_num=8, pipeline_stages=2)
    np.testing.assert_array_equal(rank_block((X,), piped, 5)[0], X[2:4])     # position 1 of stage 1
    whole = ParallelContext(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy="full_batch")
    np.testing.assert_array_equal(rank_block((X,), whole, 2)[0], X)


# ---- loss and gradients equal serial ------------------------------------------------------

@pytest.mark.parametrize("strategy", [((2, 1),), ((4, 1),), ((1, 1),), ((1, 2),), ((2, 2),), ((1, 4),)])
def test_fed_blocks_give_the_serial_loss_and_gradients(strategy):
    results = fed(strategy)
    assert_serial(results)
    lay = fed_layout(strategy[0], Mesh((N,), ("devices",)))
    for rank, (_, _, batch) in enumerate(results):    # each rank was fed its block, not the rows of rank r
        np.testing.assert_array_equal(batch[0], X[lay.slices(rank, X.shape)])


def forward_collectives(strategy):
    """The forward pass's redistribution steps on rank 0 of the dp2 x mp2 model."""
    def body(comm):
        with bound_world(comm):
            ctx = autopar.context.current_context()
            net = Net()
            prog = ShardedGradProgram(net, rank_block((X,), ctx, comm.rank), net.trainable_params(),
                                      "semi_auto_parallel", comm, ctx.loads_full_batch, ctx=ctx)
            return [str(step.kind) for n in prog.local_graph.nodes if n.prim.kind == "Redistribute"
                    and n.phase == FORWARD for step in n.prim.attrs["redist"].steps]
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=strategy):
        return run_in_process(N, body)[0]


def test_a_feed_matching_the_models_data_parallel_split_needs_no_gather():
    # mm1 reads x split 2 ways over dp: fed 4 ways, the mp pairs all-gather it; fed ((2, 1),)
    # each rank holds what mm1 reads already (the all-reduce is mm2's row-parallel sum)
    assert forward_collectives("data_parallel") == ["allgather", "allreduce"]
    assert forward_collectives(((2, 1),)) == ["allreduce"]


def test_two_inputs_with_their_own_tuples():
    assert_serial(fed(((2, 1), (2, 2)), target=True), target=True)


def test_forward_delivers_the_rows_each_rank_was_fed():
    net_out = np.tanh(X @ W1) @ W2

    class Fwd(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(W1, name="w1"), nn.Parameter(W2, name="w2")
            self.mm1, self.mm2 = ops.MatMul().shard(DP_MP[0]), ops.MatMul().shard(DP_MP[1])

        def construct(self, x):
            return self.mm2(ops.Tanh()(self.mm1(x, self.w1)), self.w2)

    def body(comm):
        with bound_world(comm):
            (x,) = rank_block((X,), autopar.context.current_context(), comm.rank)
            return np.asarray(Fwd()(x))
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=((2, 1),)):
        outs = run_in_process(N, body)
    for rank, out in enumerate(outs):
        np.testing.assert_allclose(out, net_out[:4] if rank < 2 else net_out[4:], rtol=1e-12)


# ---- errors -------------------------------------------------------------------------------

def test_a_feed_with_the_repeats_outer_is_caught_by_the_consistency_check():
    # MindSpore's VirtualDataset without repeat_dim_direct="right" repeats outer: ranks 0 and 2
    # share rows 0:B/2. autopar's ranks 0 and 1 share them, so such a feed is not trained on
    # silently: the ranks meant to hold the same block disagree at the first call
    def body(comm):
        with bound_world(comm):
            return autopar.value_and_grad(Net())(np.split(X, 2)[comm.rank % 2])
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=((2, 1),)):
        with pytest.raises(ValueError, match=r"input 0: expected the same data on the ranks that are fed the same "
                                             r"batch .* digest (\w+) on rank 0, digest (?!\1)\w+ on rank 1"):
            run_in_process(N, body)


def test_product_not_dividing_the_stage_is_refused_when_set():
    with pytest.raises(ValueError, match=r"ParallelContext: dataset_strategy: expected per input, split counts whose "
                                         r"product divides the 4 devices.*input 1 is \(3, 1\)"):
        ParallelContext(device_num=N, dataset_strategy=((2, 1), (3, 1)))
    with pytest.raises(ValueError, match=r"divides the 2 devices of a stage.*input 0 is \(4, 1\)"):
        ParallelContext(device_num=N, pipeline_stages=2, dataset_strategy=((4, 1),))


def test_product_not_dividing_the_ranks_running_is_refused_at_compile():
    def body(comm):
        with bound_world(comm):
            autopar.value_and_grad(Net())(X[:2])
    # device_num=1 means "as many as run": the 4 ranks are known at compile time
    with parallel_context(parallel_mode="semi_auto_parallel", dataset_strategy=((8, 1),)):
        with pytest.raises(ValueError, match=r"dataset_strategy: input 0: expected split counts whose product divides "
                                             r"the 4 devices of a stage, got \(8, 1\) \(product 8\)"):
            run_in_process(N, body)


@pytest.mark.parametrize("strategy, message", [
    (((2, 1), (2, 1)), r"dataset_strategy: number of inputs: expected one tuple per array input \(1: shapes "
                       r"\[\(4, 12\)\]\), got 2 tuples"),
    (((2, 1, 1),), r"dataset_strategy: input 0: expected 2 split counts \(one per dim of its shape \(4, 12\)\), "
                   r"got \(2, 1, 1\)"),
])
def test_tuple_not_matching_the_inputs_is_refused_at_compile(strategy, message):
    def body(comm):
        with bound_world(comm):
            autopar.value_and_grad(Net())(X[:4])
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=strategy):
        with pytest.raises(ValueError, match=message):
            run_in_process(N, body)


def test_tuple_under_data_parallel_mode_is_refused():
    with pytest.raises(ValueError, match=r"dataset_strategy: parallel_mode: expected 'semi_auto_parallel' or "
                                         r"'auto_parallel' for a tuple \(\(\(2, 1\),\)\), got 'data_parallel'"):
        fed(((2, 1),), mode="data_parallel", strategies=None)


def test_fed_splits_data_parallel_and_whole():
    assert fed_splits([(4, 12), ()], 4, False, "data_parallel") == ((4, 1), ())
    assert fed_splits([(4, 12)], 4, True, ((2, 1),)) == ((1, 1),)


# ---- pipelines and the joint auto plan: what is simple is fed, the rest refused -----------

def piped(strategy):
    """A one-stage PipelineCell (2 micro-batches) on 4 ranks fed ``rank_block``."""
    def body(comm):
        with bound_world(comm):
            batch = rank_block((X,), autopar.context.current_context(), comm.rank)
            net = Net()
            return autopar.value_and_grad(nn.PipelineCell(net, 2), net.trainable_params())(*batch) + (batch,)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=strategy):
        return run_in_process(N, body)


def test_pipeline_takes_the_data_parallel_tuple():
    # a PipelineCell averages its micro-batches' losses: compared with "data_parallel", which
    # tests/test_pipeline.py compares with serial
    for (loss, grads, _), (ref_loss, ref_grads, _) in zip(piped(((4, 1),)), piped("data_parallel")):
        assert loss == ref_loss
        for name, g in ref_grads.items():
            np.testing.assert_array_equal(grads[name], g, err_msg=name)


def test_pipeline_refuses_other_tuples_at_compile():
    with pytest.raises(ValueError, match=r"PipelineCell: dataset_strategy input 0: expected \(4, 1\) \(dim 0 split "
                                         r"over the 4 devices of a stage\) or all 1s under pipeline stages / "
                                         r"micro-batches, got \(2, 1\)"):
        piped(((2, 1),))


PANGU = PanguAlphaConfig.preset("tiny", num_layers=4, param_dtype="float64", compute_dtype="float64")
IDS = np.random.default_rng(0).integers(1, PANGU.vocab_size, (8, PANGU.seq_length + 1)).astype(np.int32)


def auto_run(**ctx):
    def body(comm):
        with bound_world(comm):
            (ids,) = rank_block((IDS,), autopar.context.current_context(), comm.rank)
            return autopar.value_and_grad(PanguAlphaWithLoss(PANGU))(ids)
    with parallel_context(parallel_mode="auto_parallel", device_num=N, **ctx):
        return run_in_process(N, body)


def test_joint_auto_plan_of_one_sharded_program_is_fed_the_tuple():
    loss, grads = autopar.value_and_grad(PanguAlphaWithLoss(PANGU))(IDS)
    for r_loss, r_grads in auto_run(dataset_strategy=((2, 1),), pipeline_stages=1):
        np.testing.assert_allclose(r_loss, loss, rtol=1e-12)
        for name, g in grads.items():
            np.testing.assert_allclose(r_grads[name], g, rtol=1e-9, atol=1e-13, err_msg=name)


def test_joint_auto_plan_that_pipelines_refuses_other_tuples():
    with pytest.raises(ValueError, match=r"auto_parallel: dataset_strategy input 0: expected \(4, 1\) \(dim 0 split "
                                         r"over all 4 devices\) or all 1s when the joint plan pipelines or "
                                         r"micro-batches \(chosen: 2 stages, \d+ micro-batches\), got \(2, 1\)"):
        auto_run(dataset_strategy=((2, 1),), pipeline_stages=2)


def test_all_ones_tuple_must_still_match_the_inputs():
    def body(comm):
        with bound_world(comm):
            autopar.value_and_grad(Net())(X)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=((1, 1), (1, 1))):
        with pytest.raises(ValueError, match=r"dataset_strategy: number of inputs: expected one tuple per array "
                                             r"input \(1: shapes \[\(8, 12\)\]\), got 2 tuples"):
            run_in_process(N, body)

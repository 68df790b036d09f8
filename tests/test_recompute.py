"""Recompute (``Cell.recompute()``): the loss, gradients and updates of keeping activations,
serially and sharded, with dropout on; fewer bytes alive, by the predicted amount."""
import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.ir.graph import BACKWARD
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.compiled import GradProgram
from autopar.runtime.memory import MemoryMeter, predicted_activations
from autopar.runtime.recompute import classify, recompute_savings
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.spmd import Redistribute
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=5, dropout_rate=0.1,   # 4 blocks + query layer
                                 param_dtype="float64", compute_dtype="float64")
RECOMPUTED = (0, 1, 2)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
STEP = 3   # dropout's key depends on the step


def pangu(recompute: bool, cfg=CONFIG):
    net = PanguAlphaWithLoss(cfg)
    net.set_train(True)
    if recompute:
        for i in RECOMPUTED:
            net.backbone.blocks[i].recompute()
    return net


def measured(prog, args):
    prog.program.meter = MemoryMeter()
    loss, grads = prog(args, {}, STEP)
    return loss, grads, prog.program.meter.last


@pytest.fixture(scope="module")
def serial():
    """(loss, grads, usage, program) without and with recompute."""
    out = {}
    for rc in (False, True):
        net = pangu(rc)
        prog = GradProgram(net, (IDS,), {}, net.trainable_params())
        out[rc] = measured(prog, (IDS,)) + (prog,)
    return out


def test_serial_recompute_gives_the_same_loss_and_gradients(serial):
    loss, grads, _, _ = serial[False]
    loss_rc, grads_rc, _, prog = serial[True]
    assert loss_rc == loss
    for g, g_rc in zip(grads, grads_rc):
        np.testing.assert_array_equal(g_rc, g)
    # dropout is on and is replayed: recomputed Dropout nodes run again, under the original's key
    clones = [prog.program.graph.nodes[c] for c in prog.program.recomputed_from]
    assert sum(n.prim.kind == "Dropout" for n in clones) == 2 * len(RECOMPUTED)   # attention probs, FFN output
    net = pangu(False, CONFIG.replace(dropout_rate=0.0))
    no_dropout = GradProgram(net, (IDS,), {}, net.trainable_params())
    assert abs(float(no_dropout((IDS,), {}, STEP)[0]) - float(loss)) > 1e-3


def test_recomputed_activations_die_in_the_forward_pass(serial):
    prog = serial[True][3]
    program = prog.program
    rv = classify(prog.graph, program.outputs)
    assert sorted(set(rv.region.values())) == [0, 1, 2]           # one region per recomputed block
    internal = set(rv.internal)
    first_backward = next(k for k, ins in enumerate(program.instructions) if ins.node.phase == BACKWARD)
    freed_at = {v: k for k, ins in enumerate(program.instructions) for v in ins.frees}
    for k, ins in enumerate(program.instructions):
        if ins.node.phase == BACKWARD:
            assert not internal & set(ins.ins), ins.node.name       # backward reads clones only
    assert all(freed_at[v] < first_backward for v in internal if v in freed_at)
    # a block's output (its second residual add) stays saved for the next block; the first
    # residual add, read only inside the block, is rebuilt
    made_by = {n.name: n.outputs[0] for n in prog.graph.nodes}
    for i in RECOMPUTED:
        assert made_by[f"blocks.{i}/Add-1"] not in internal and made_by[f"blocks.{i}/Add"] in internal


def test_activation_peak_falls_by_the_predicted_amount(serial):
    """3 of 4 blocks recomputed: the peak (at the loss) falls by what those blocks save for backward."""
    _, _, usage, prog = serial[False]
    _, _, usage_rc, prog_rc = serial[True]
    cut = usage.activations_peak - usage_rc.activations_peak
    per_block = recompute_savings(prog_rc.graph, prog_rc.program.outputs)
    assert len(per_block) == 3 and len(set(per_block.values())) == 1       # identical blocks
    assert cut == pytest.approx(sum(per_block.values()), rel=0.15)
    assert cut > 0.4 * usage.activations_peak
    for u, p in ((usage, prog), (usage_rc, prog_rc)):              # step-by-step prediction
        assert max(predicted_activations(p.program)) == pytest.approx(u.activations_peak, rel=0.02)


def sharded_run(dp, mp, recompute):
    mode = "data_parallel" if mp == 1 else "semi_auto_parallel"
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp)

    def body(comm):
        net = pangu(recompute, cfg)
        ids = np.split(IDS, dp * mp)[comm.rank] if mode == "data_parallel" else IDS
        prog = ShardedGradProgram(net, (ids,), net.trainable_params(), mode, comm,
                                  full_batch=mode != "data_parallel")
        comm.stats.reset()
        loss, grads, usage = measured(prog, (ids,))
        clones = [prog.program.graph.nodes[c] for c in prog.program.recomputed_from]
        repeated = sum(step.kind != "slice" for n in clones if isinstance(n.prim, Redistribute)
                       for step in n.prim.attrs["redist"].steps)
        return (loss, grads, prog.layouts, sum(comm.stats.snapshot()["count"].values()), repeated,
                usage.activations_peak, max(predicted_activations(prog.program)))
    return run_in_process(dp * mp, body)


@pytest.mark.parametrize("dp, mp", [(2, 1), (1, 2)])
def test_sharded_recompute_equals_serial(serial, dp, mp):
    loss, grads, _, _ = serial[False]
    plain, rc = sharded_run(dp, mp, False), sharded_run(dp, mp, True)
    for r, (a, b) in enumerate(zip(plain, rc)):
        np.testing.assert_allclose(b[0], loss, rtol=1e-12)
        assert b[0] == a[0]
        for g, g_rc in zip(a[1], b[1]):
            np.testing.assert_array_equal(g_rc, g)
        # collectives inside recomputed blocks run again, and nothing else does
        assert b[3] - a[3] == b[4]
        assert b[5] < a[5]
        # the step-by-step prediction of the cut
        assert a[5] - b[5] == pytest.approx(a[6] - b[6], rel=0.15)
    if mp > 1:
        assert rc[0][4] == len(RECOMPUTED)    # the attention output's all-reduce (LayerNorm2 reads its sum)
    for k, (name, g) in enumerate(zip([p.name for p in pangu(False).trainable_params()], grads)):
        got = rc[0][2][k].assemble({r: x[1][k] for r, x in enumerate(rc)}, g.shape)
        np.testing.assert_allclose(got, g, rtol=1e-9, atol=1e-12, err_msg=name)


def train_three_steps(net, ids):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=0.5)
    losses = [float(train(ids)) for _ in range(3)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


def test_three_adamweightdecay_steps_give_the_same_weights():
    want_losses, want = train_three_steps(pangu(False), IDS)
    losses, weights = train_three_steps(pangu(True), IDS)
    assert losses == want_losses
    for name, w in want.items():
        np.testing.assert_array_equal(weights[name], w, err_msg=name)


def test_three_sharded_steps_through_the_public_api_equal_serial():
    from autopar.context import bound_world, parallel_context
    want_losses, want = train_three_steps(pangu(False), IDS)

    def body(comm):
        with bound_world(comm):
            return train_three_steps(pangu(True, CONFIG.replace(model_parallel=2)), IDS)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        res = run_in_process(2, body)
    for losses, weights in res:
        np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
        for name, w in want.items():
            np.testing.assert_allclose(weights[name], w, rtol=1e-8, atol=1e-12, err_msg=name)


class Block(nn.Cell):
    def __init__(self, h):
        super().__init__()
        self.dense = nn.Dense(h, h, param_dtype="float64")
        self.gelu = ops.GeLU()

    def construct(self, x):
        return x + self.gelu(self.dense(x))


class Stack(nn.Cell):
    def __init__(self, h=6, n=3):
        super().__init__()
        self.blocks = nn.CellList([Block(h) for _ in range(n)])

    def construct(self, x):
        for b in self.blocks:
            x = b(x)
        return (x * x).sum()


def test_a_list_of_recomputed_cells_is_one_region_per_cell():
    x = np.random.default_rng(1).standard_normal((5, 6))
    net = Stack()
    want_loss, want = autopar.value_and_grad(net)(x)
    for b in net.blocks:
        b.recompute()
    prog = GradProgram(net, (x,), {}, net.trainable_params())
    rv = classify(prog.graph, prog.program.outputs)
    assert sorted(set(rv.region.values())) == [0, 1, 2]
    # block outputs (the residual adds) stay saved; the dense and GeLU outputs are rebuilt
    kept = {prog.graph.nodes[v.producer].name for v in prog.graph.values
            if v.producer in rv.region and v.id not in rv.internal}
    assert kept == {"blocks.0/Add", "blocks.1/Add", "blocks.2/Add"}
    cloned = sorted(prog.program.graph.nodes[c].name for c in prog.program.recomputed_from)
    assert cloned == [f"blocks.{i}.dense/{k}#recompute" for i in range(3) for k in ("Add", "MatMul")]
    loss, grads = prog((x,), {})
    assert loss == want_loss
    for g, name in zip(grads, want):
        np.testing.assert_array_equal(g, want[name])

"""Pipeline parallelism equals serial training: PanGu-α tiny (float32, dropout on) on
in-process ranks under GPipe and 1F1B -- loss, gradients, three AdamWeightDecay steps --
with the tied word table's two copies identical, live micro-batches as the table says,
a non-uniform 8-stage split, clear errors, and real mpiexec -n 4."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from test_comm_mpi_launch import MPIEXEC, launch

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.comm.mpi import launched_under_mpi
from autopar.context import bound_world, parallel_context
from autopar.ir.graph import differentiable_values
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.pipeline.program import StageShard
from autopar.runtime.trace import trace
from autopar.strategy.pipeline.assignment import assign_stages
from autopar.strategy.pipeline.schedule import gpipe, one_f_one_b
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, dropout_rate=0.1)   # 3 blocks + the query layer
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss
TABLE = "word_embedding.embedding_table"


def pangu(cfg: PanguAlphaConfig, stages: int, layers_per_stage=None) -> PanguAlphaWithLoss:
    """PanGu-α with its layers (blocks, then the query layer) on ``stages`` stages; the
    embeddings, final LayerNorm and head follow their data."""
    net = PanguAlphaWithLoss(cfg)
    layers = list(net.backbone.blocks) + [net.backbone.query_layer]
    nn.set_pipeline_stages(layers, layers_per_stage, None if layers_per_stage else stages)
    return net


def train_three_steps(net, cell, ids):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
    train = nn.TrainOneStepCell(cell, opt, clip_norm=1.0)
    losses = [float(train(ids)) for _ in range(3)]
    return train, losses, {p.name: p.asnumpy() for p in net.trainable_params()}


@pytest.fixture(scope="module")
def serial():
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    loss, grads = autopar.value_and_grad(net)(IDS)
    net = PanguAlphaWithLoss(CONFIG)
    _, losses, weights = train_three_steps(net, net, IDS)
    return loss, grads, losses, weights


def run_pipeline(stages, dp, mp, micro, schedule, mode="semi_auto_parallel", full_batch=True, recompute=False):
    """Per rank: loss and full gradients, three steps' losses and weights, the rank's block
    of the tied table, the measured live micro-batches per clock."""
    n = stages * dp * mp
    per_stage = n // stages

    def body(comm):
        with bound_world(comm):
            net = pangu(CONFIG.replace(data_parallel=dp, model_parallel=mp), stages).set_train(True)
            if recompute:
                for layer in list(net.backbone.blocks) + [net.backbone.query_layer]:
                    layer.recompute()
            cell = nn.PipelineCell(net, micro, schedule)
            ids = IDS if full_batch else np.split(IDS, per_stage)[comm.rank % per_stage]
            loss, grads = autopar.value_and_grad(cell, net.trainable_params())(ids)
            train, losses, weights = train_three_steps(net, cell, ids)
            prog = train.build(ids)
            table = next(s for s in prog.shards if s.name == TABLE)
            held = table.data.copy() if isinstance(table, StageShard) else None
            return loss, grads, losses, weights, held, prog.stage, list(prog.last_step.live)
    with parallel_context(parallel_mode=mode, device_num=n, pipeline_stages=stages, full_batch=full_batch):
        return run_in_process(n, body)


def assert_equals_serial(results, serial):
    loss, grads, losses, weights = serial
    for got_loss, got_grads, got_losses, got_weights, *_ in results:
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for name, g in grads.items():   # atol: the key biases' gradients are 0 up to rounding (~1e-12)
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
        for name, w in weights.items():
            # Adam's m/sqrt(v) amplifies float32 rounding where gradients are ~0: atol is 1e-3 of a step
            np.testing.assert_allclose(got_weights[name], w, rtol=1e-5, atol=1e-6, err_msg=name)


def live_by_clock(schedule, stage):
    """Micro-batches between their forward and backward after each clock, from the table."""
    live, out = 0, []
    for item in schedule.table[stage]:
        live += 0 if item is None else (1 if item[0] == "F" else -1)
        out.append(live)
    return out


CASES = [   # (stages, dp, mp, micro, schedule, mode, full_batch)
    (2, 1, 1, 2, "gpipe", "semi_auto_parallel", True),
    (2, 1, 1, 4, "1f1b", "semi_auto_parallel", True),
    (2, 2, 1, 2, "1f1b", "semi_auto_parallel", False),     # each rank fed its half of the batch
    (2, 2, 1, 4, "gpipe", "data_parallel", False),
    (2, 1, 2, 2, "1f1b", "semi_auto_parallel", True),
    (2, 1, 2, 4, "gpipe", "semi_auto_parallel", True),
    (4, 1, 1, 4, "1f1b", "semi_auto_parallel", True),
    (4, 1, 1, 2, "gpipe", "semi_auto_parallel", True),     # fewer micro-batches than stages
    (2, 2, 2, 4, "gpipe", "semi_auto_parallel", True),
    (2, 2, 2, 2, "1f1b", "semi_auto_parallel", False),     # 2 rows a rank, 1 a micro-batch
]


@pytest.mark.parametrize("stages, dp, mp, micro, schedule, mode, full_batch", CASES,
                         ids=[f"pp{c[0]}-dp{c[1]}-mp{c[2]}-m{c[3]}-{c[4]}-{c[5][:4]}" for c in CASES])
def test_pipeline_equals_serial(serial, stages, dp, mp, micro, schedule, mode, full_batch):
    res = run_pipeline(stages, dp, mp, micro, schedule, mode, full_batch)
    assert_equals_serial(res, serial)
    # the tied table: a copy on the first and on the last stage, block for block identical
    per_stage = dp * mp
    for pos in range(per_stage):
        first, last = res[pos], res[(stages - 1) * per_stage + pos]
        assert first[5] == 0 and last[5] == stages - 1
        np.testing.assert_array_equal(first[4], last[4])
    for r in res[per_stage:(stages - 1) * per_stage]:
        assert r[4] is None                          # middle stages hold no copy
    # the runner's live micro-batches follow the table, clock by clock
    table = (gpipe if schedule == "gpipe" else one_f_one_b)(stages, micro)
    for r in res:
        assert r[6] == live_by_clock(table, r[5])
        assert max(r[6]) == table.in_flight(r[5])


def test_one_f_one_b_table_bounds_in_flight_micro_batches():
    for p in (2, 4, 8):
        for m in (p, 2 * p, 3 * p + 1):
            table = one_f_one_b(p, m)
            for s in range(p):
                assert table.in_flight(s) == p - s <= m
                assert max(live_by_clock(table, s)) == p - s
            assert all(gpipe(p, m).in_flight(s) == m for s in range(p))


def test_tied_table_lives_on_first_and_last_stage_only():
    """Stage of every op: the layers as annotated, the embeddings on stage 0, final
    LayerNorm and head on the last stage; the table crosses nowhere, it is read on both."""
    net = pangu(CONFIG, 2).set_train(True)
    graph = trace(net, (IDS[:4],)).graph
    assign = assign_stages(graph, 2)
    stage_of = {}
    for n in graph.nodes:
        stage_of.setdefault(n.scope, set()).add(assign.of_node[n.id])
    assert stage_of["word_embedding"] == {0}
    assert stage_of["blocks.0.attention.dense1"] == {0}
    assert stage_of["blocks.2.output.mapping"] == {1}
    assert stage_of["final_layernorm"] == {1}
    readers = {assign.of_node[n.id] for n in graph.nodes for v in n.inputs
               if v in graph.params and graph.param_objs[graph.params.index(v)].name == TABLE}
    assert readers == {0, 1}
    assert all(graph.spec(c.value).shape in ((4, 16, 32), (4, 16)) for c in assign.crossings)


def test_non_uniform_split_of_24_layers_on_8_stages_equals_serial():
    """Yuan 2.0's [2, 2, 3, 3, 4, 4, 4, 2]: 23 blocks and the query layer on 8 stages."""
    cfg = CONFIG.replace(num_layers=24)
    counts = [2, 2, 3, 3, 4, 4, 4, 2]
    net = PanguAlphaWithLoss(cfg).set_train(True)
    loss, grads = autopar.value_and_grad(net)(IDS)

    def body(comm):
        with bound_world(comm):
            net = pangu(cfg, 8, counts).set_train(True)
            got = autopar.value_and_grad(nn.PipelineCell(net, 4), net.trainable_params())(IDS)
            return got, [net.backbone.blocks[i].pipeline_stage for i in range(23)]
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=8, pipeline_stages=8, full_batch=True):
        res = run_in_process(8, body)
    assert res[0][1] == [s for s, c in enumerate(counts) for _ in range(c)][:23]
    for (got_loss, got_grads), _ in res:
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_one_stage_pipeline_cell_accumulates_micro_batches_serially():
    """No ranks: PipelineCell on one process is gradient accumulation, equal to the whole batch."""
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    loss, grads = autopar.value_and_grad(net)(IDS)
    cell = nn.PipelineCell(net, 4, "gpipe")
    got_loss, got_grads = autopar.value_and_grad(cell, net.trainable_params())(IDS)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    eval_net = PanguAlphaWithLoss(CONFIG)               # forward: the mean of micro-batch losses
    np.testing.assert_allclose(nn.PipelineCell(eval_net, 2)(IDS), eval_net(IDS), rtol=1e-5)


def run_grads(make_net, stages, micro, n=None):
    """Per rank: loss, full gradients, and the values saved per micro-batch on its stage."""
    n = n or stages

    def body(comm):
        with bound_world(comm):
            net = make_net().set_train(True)
            cell = nn.PipelineCell(net, micro)
            loss, grads = autopar.value_and_grad(cell, net.trainable_params())(IDS)
            return loss, grads, next(iter(cell._compiled.values())).saved_per_micro
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, pipeline_stages=stages, full_batch=True):
        return run_in_process(n, body)


RECOMPUTE_CASES = [c for c in CASES if c[0] * c[1] * c[2] >= 4]   # every 4- and 8-rank layout


@pytest.mark.parametrize("stages, dp, mp, micro, schedule, mode, full_batch", RECOMPUTE_CASES,
                         ids=[f"pp{c[0]}-dp{c[1]}-mp{c[2]}-m{c[3]}-{c[4]}" for c in RECOMPUTE_CASES])
def test_pipeline_with_every_layer_recomputed_equals_serial(serial, stages, dp, mp, micro, schedule, mode,
                                                            full_batch):
    assert_equals_serial(run_pipeline(stages, dp, mp, micro, schedule, mode, full_batch, recompute=True), serial)


def test_recomputed_blocks_save_only_their_inputs_and_equal_serial(serial):
    """Blocks marked .recompute(): their forward ops run again in the backward half, so a
    micro-batch in flight keeps only what enters them, and the gradients stay serial's."""
    def recomputed():
        net = pangu(CONFIG, 2)
        for block in net.backbone.blocks:
            block.recompute()
        return net
    plain, rec = run_grads(lambda: pangu(CONFIG, 2), 2, 2), run_grads(recomputed, 2, 2)
    loss, grads = serial[:2]
    for got_loss, got_grads, _ in rec:
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    assert rec[0][2] * 4 < plain[0][2]          # stage 0: embeddings and two blocks, all recomputed
    assert rec[1][2] < plain[1][2]              # stage 1: one recomputed block, the query layer is not


def test_document_masks_cross_stages_without_gradients():
    """eod_reset: the attention mask and position ids are made on stage 0 from the tokens
    and sent to every later stage; no gradient goes back for them."""
    cfg = CONFIG.replace(eod_reset=True, eod_id=5)
    net = PanguAlphaWithLoss(cfg).set_train(True)
    loss, grads = autopar.value_and_grad(net)(IDS)
    graph = trace(pangu(cfg, 4).set_train(True), (IDS[:2],)).graph
    crossings = assign_stages(graph, 4, differentiable_values(graph, graph.params)).crossings
    assert [(graph.spec(c.value).shape, c.src, c.dsts, c.needs_grad) for c in crossings] == [
        ((2, 16), 0, (3,), False),                  # position ids, to the query layer
        ((2, 1, 16, 16), 0, (1, 2, 3), False),      # the additive attention mask, to every block
        ((2, 16, 32), 0, (1,), True), ((2, 16, 32), 1, (2,), True), ((2, 16, 32), 2, (3,), True)]
    for got_loss, got_grads, _ in run_grads(lambda: pangu(cfg, 4), 4, 4):
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


# ---- bad input ------------------------------------------------------------------------------

def test_stages_that_decrease_along_the_data_flow_are_an_error():
    net = PanguAlphaWithLoss(CONFIG)
    net.backbone.blocks[0].pipeline_stage = 1
    net.backbone.blocks[1].pipeline_stage = 0
    graph = trace(net, (IDS,)).graph
    with pytest.raises(ValueError, match=r"blocks\.1\.layernorm1 \(LayerNorm\): pipeline_stage: "
                                         r"expected a stage >= 1.*got 0; stages must not decrease"):
        assign_stages(graph, 2)


def test_stage_without_layers_is_an_error():
    net = pangu(CONFIG, 3)          # stages 0, 1, 2 annotated; the context asks for 4
    with pytest.raises(ValueError, match=r"stage 3: expected at least one layer on every one of the "
                                         r"pipeline_stages=4 stages"):
        assign_stages(trace(net, (IDS,)).graph, 4)
    with pytest.raises(ValueError, match=r"layers_per_stage\[1\]: expected an int >= 1"):
        nn.set_pipeline_stages(list(net.backbone.blocks), [2, 0, 1])
    with pytest.raises(ValueError, match=r"layers_per_stage: expected counts summing to the 3 layers"):
        nn.set_pipeline_stages(list(net.backbone.blocks), [2, 2])
    net.backbone.blocks[0].pipeline_stage = 5
    with pytest.raises(ValueError, match=r"pipeline_stage: expected a stage below pipeline_stages=4, got 5"):
        assign_stages(trace(net, (IDS,)).graph, 4)


def test_pipeline_stages_must_divide_device_num():
    with pytest.raises(ValueError, match=r"pipeline_stages: expected a divisor of device_num = 4, got 3"), \
            parallel_context(device_num=4, pipeline_stages=3):
        pass


def test_micro_size_must_divide_the_batch():
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    with pytest.raises(ValueError, match=r"micro_size: expected a divisor of the batch \(8 rows .*got 3"):
        autopar.value_and_grad(nn.PipelineCell(net, 3), net.trainable_params())(IDS)
    with pytest.raises(ValueError, match=r"PipelineCell: micro_size: expected an int >= 1, got 0"):
        nn.PipelineCell(net, 0)
    with pytest.raises(ValueError, match=r"pipeline_schedule: expected one of \['1f1b', 'gpipe'\]"):
        nn.PipelineCell(net, 2, "zb-v")


def test_errors_reach_the_user_through_training_on_ranks():
    def body(comm):
        with bound_world(comm):
            net = pangu(CONFIG, 2).set_train(True)
            net.backbone.query_layer.pipeline_stage = 0      # after blocks on stage 1: decreasing
            train = nn.TrainOneStepCell(nn.PipelineCell(net, 2), AdamWeightDecay(net.trainable_params(), 1e-3))
            train(IDS)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True), \
            pytest.raises(ValueError, match=r"query_layer.*stages must not decrease"):
        run_in_process(2, body)


# ---- real MPI -------------------------------------------------------------------------------

@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: pip install mpich (or install an MPI)")
@pytest.mark.skipif(launched_under_mpi(), reason="already running under an MPI launcher")
def test_pipeline_on_four_mpi_ranks_equals_serial():
    """pp2 x dp2 (also with optimizer parallel) and pp4 over real MPI (tests/mpi/test_pipeline_mpi.py),
    every sum through the shared-memory window."""
    rc, out, err, _ = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/mpi/test_pipeline_mpi.py"], timeout=120, n=4, AUTOPAR_TEST_SHM_EVERY_SUM="1")
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    passed = [int(k) for k in re.findall(r"(\d+) passed", out)]
    assert len(passed) == 4 and min(passed) == 3, f"expected 3 tests passed on each of 4 ranks:\n{out}"
    assert "skipped" not in out and "failed" not in out, out

"""Yuan 2.0 under a pipeline with its own non-uniform split (``YuanConfig.layers_per_stage``):
the blocks land on the stages the counts say, and in-process training equals serial
(loss, gradients, three AdamWeightDecay steps); a serial run ignores the stages."""
import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.yuan import YuanConfig, YuanWithLoss
from autopar.strategy.pipeline.assignment import assign_stages
from autopar.runtime.trace import trace
from autopar.train import AdamWeightDecay

# float64: pipeline and serial differ only in summation order, so the tolerance can be tight
CONFIG = YuanConfig.preset("tiny", num_layers=3, layers_per_stage=(1, 2), param_dtype="float64",
                           compute_dtype="float64")
IDS = np.random.default_rng(0).integers(1, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
RTOL = 1e-9        # no padding (pad_id 0 is never drawn): the micro-batch mean is the batch loss


def three_steps(net, cell, ids):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    train = nn.TrainOneStepCell(cell, opt, clip_norm=1.0)
    losses = [float(train(ids)) for _ in range(3)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


@pytest.fixture(scope="module")
def serial():
    net = YuanWithLoss(CONFIG)
    loss, grads = autopar.value_and_grad(net)(IDS)
    net = YuanWithLoss(CONFIG)
    return (loss, grads) + three_steps(net, net, IDS)


def test_blocks_sit_on_the_stages_the_counts_give():
    net = YuanWithLoss(CONFIG)
    assert [b.pipeline_stage for b in net.backbone.blocks] == [0, 1, 1]
    graph = trace(net.set_train(True), (IDS[:2],)).graph
    assign = assign_stages(graph, 2)
    stage_of = {}                   # "blocks.i" or a cell's scope -> stages of its ops
    for n in graph.nodes:
        key = ".".join(n.scope.split(".")[:2]) if n.scope.startswith("blocks.") else n.scope
        stage_of.setdefault(key, set()).add(assign.of_node[n.id])
    assert (stage_of["blocks.0"], stage_of["blocks.1"], stage_of["blocks.2"]) == ({0}, {1}, {1})
    assert stage_of["word_embedding"] == {0} and stage_of["final_norm"] == {1}
    assert YuanWithLoss(CONFIG.replace(layers_per_stage=None)).backbone.blocks[2].pipeline_stage is None


def test_serial_runs_ignore_the_stages(serial):
    """The plain network and a one-process PipelineCell (gradient accumulation) give serial's
    loss and gradients: the script written for the pipeline runs with ``python train.py``."""
    loss, grads = serial[:2]
    plain = YuanWithLoss(CONFIG.replace(layers_per_stage=None))
    want_loss, want = autopar.value_and_grad(plain)(IDS)
    np.testing.assert_array_equal(loss, want_loss)
    net = YuanWithLoss(CONFIG).set_train(True)
    got_loss, got = autopar.value_and_grad(nn.PipelineCell(net, 2), net.trainable_params())(IDS)
    np.testing.assert_allclose(got_loss, loss, rtol=RTOL)
    for name, g in grads.items():
        np.testing.assert_array_equal(want[name], g, err_msg=name)
        np.testing.assert_allclose(got[name], g, rtol=RTOL, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("dp, micro, schedule", [(1, 2, "1f1b"), (2, 2, "gpipe")])
def test_non_uniform_yuan_pipeline_trains_like_serial(serial, dp, micro, schedule):
    loss, grads, losses, weights = serial
    n = 2 * dp

    def body(comm):
        with bound_world(comm):
            net = YuanWithLoss(CONFIG.replace(data_parallel=dp)).set_train(True)
            cell = nn.PipelineCell(net, micro, schedule)
            got = autopar.value_and_grad(cell, net.trainable_params())(IDS)
            return got + three_steps(net, cell, IDS)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, pipeline_stages=2, full_batch=True):
        res = run_in_process(n, body)
    for got_loss, got_grads, got_losses, got_weights in res:
        np.testing.assert_allclose(got_loss, loss, rtol=RTOL)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=RTOL, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(got_losses, losses, rtol=RTOL)
        for name, w in weights.items():
            np.testing.assert_allclose(got_weights[name], w, rtol=RTOL, atol=1e-12, err_msg=name)


def test_a_split_for_other_stage_counts_is_a_clear_error():
    def body(comm):
        with bound_world(comm):
            net = YuanWithLoss(CONFIG.replace(num_layers=4, layers_per_stage=(1, 1, 2))).set_train(True)
            autopar.value_and_grad(nn.PipelineCell(net, 2), net.trainable_params())(IDS)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True), \
            pytest.raises(ValueError, match=r"pipeline_stage: expected a stage below pipeline_stages=2, got 2"):
        run_in_process(2, body)

"""Interleaved 1F1B under real MPI equals serial: run by tests/test_comm_mpi_launch.py's
``mpiexec -n 2`` suite (pp2, two chunks a rank: activations go 0 -> 1 -> 0 -> 1, back across
the wrap) -- loss, gradients and three AdamWeightDecay steps, dropout on; skipped when not
under mpiexec."""
import numpy as np
import pytest
from test_pipeline_mpi import assert_like_serial

import autopar
from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, dropout_rate=0.1)    # 3 blocks + the query layer
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss


def train(net, cell, steps=3):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
    step = nn.TrainOneStepCell(cell, opt, clip_norm=1.0)
    return [float(step(IDS)) for _ in range(steps)], {p.name: p.asnumpy() for p in net.trainable_params()}


def test_two_stages_two_chunks_equal_serial():
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    loss, grads = autopar.value_and_grad(net)(IDS)
    serial_net = PanguAlphaWithLoss(CONFIG)
    losses, weights = train(serial_net, serial_net)
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2,
                                              full_batch=True):
        net = PanguAlphaWithLoss(CONFIG).set_train(True)
        nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=4)
        cell = nn.PipelineCell(net, 4, virtual_stages=2)
        got_loss, got_grads = autopar.value_and_grad(cell, net.trainable_params())(IDS)
        assert next(iter(cell._compiled.values())).chunks == (WORLD.rank, WORLD.rank + 2)
        got_losses, got_weights = train(net, cell)
    assert_like_serial((got_loss, got_grads, got_losses, got_weights), (loss, grads, losses, weights))

"""Pipeline parallelism under real MPI equals serial: run by tests/test_pipeline.py as
``mpiexec -n 4`` (pp2 x dp2, with and without optimizer parallel, and pp4) and by tests/test_comm_mpi_launch.py's ``mpiexec -n 2``
suite run (pp2); skipped when not under mpiexec."""
import numpy as np
import pytest
from steps import train

import autopar
from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, dropout_rate=0.1)    # float32, dropout on
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss

CASES = {2: [(2, 1, 2, "1f1b", False)],           # (stages, dp, micro, schedule, optimizer parallel)
         4: [(2, 2, 4, "1f1b", False), (2, 2, 2, "gpipe", True), (4, 1, 4, "gpipe", False)]}


def assert_like_serial(got, serial) -> None:
    """(loss, gradients, losses of the training steps, trained weights) equal serial's to float32 rounding."""
    (got_loss, got_grads, got_losses, got_weights), (loss, grads, losses, weights) = got, serial
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for name, g in grads.items():     # atol: the key biases' gradients are 0 up to rounding
        np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
    for name, w in weights.items():
        np.testing.assert_allclose(got_weights[name], w, rtol=1e-5, atol=1e-6, err_msg=name)


def pangu(cfg, stages):
    net = PanguAlphaWithLoss(cfg)
    nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=stages)
    return net



@pytest.fixture(scope="module")
def serial():
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    loss, grads = autopar.value_and_grad(net)(IDS)
    net = PanguAlphaWithLoss(CONFIG)
    return loss, grads, train(net, net, IDS)


@pytest.mark.parametrize("stages, dp, micro, schedule, zero", CASES.get(WORLD.size, []))
def test_pipeline_equals_serial(serial, stages, dp, micro, schedule, zero):
    loss, grads, (losses, weights) = serial
    full = dp == 1                                 # dp > 1: each rank is fed its slice of the batch
    ids = IDS if full else np.split(IDS, dp)[WORLD.rank % dp]
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=WORLD.size,
                                              pipeline_stages=stages, full_batch=full,
                                              enable_parallel_optimizer=zero, parallel_optimizer_threshold=0):
        net = pangu(CONFIG.replace(data_parallel=dp), stages).set_train(True)
        cell = nn.PipelineCell(net, micro, schedule)
        got_loss, got_grads = autopar.value_and_grad(cell, net.trainable_params())(ids)
        got_losses, got_weights = train(net, cell, ids)
    assert_like_serial((got_loss, got_grads, got_losses, got_weights), (loss, grads, losses, weights))

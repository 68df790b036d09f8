"""PanGu-α tiny with sequence parallel under real MPI equals serial (mp2 on 2 ranks; dp2 x mp2
and mp4 on 4): loss, gradients and three AdamW steps. Run by tests/test_comm_mpi_launch.py's
whole-suite launch on 2 ranks; skipped when not under mpiexec."""
import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")
CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)    # float32, as users train
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
LAYOUTS = {2: [(1, 2)], 4: [(2, 2), (1, 4)]}


def train(net, steps=3):
    step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01),
                               clip_norm=1.0)
    losses = [float(step(IDS)) for _ in range(steps)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


@pytest.fixture(scope="module")
def serial():
    loss, grads = autopar.value_and_grad(PanguAlphaWithLoss(CONFIG))(IDS)
    return loss, grads, train(PanguAlphaWithLoss(CONFIG))


@pytest.mark.parametrize("dp, mp", LAYOUTS.get(WORLD.size, []))
def test_sequence_parallel_equals_serial(serial, dp, mp):
    loss, grads, (losses, weights) = serial
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp, sequence_parallel=True)
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=WORLD.size,
                                              full_batch=True):
        got_loss, got_grads = autopar.value_and_grad(PanguAlphaWithLoss(cfg))(IDS)
        got_losses, got_weights = train(PanguAlphaWithLoss(cfg))
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(got_grads[name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
    for name, w in weights.items():
        np.testing.assert_allclose(got_weights[name], w, rtol=1e-5, atol=1e-6, err_msg=name)

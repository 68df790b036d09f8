"""PanGu-α tiny under real MPI equals serial, with and without sequence parallel: run by
tests/test_comm_mpi_launch.py as ``mpiexec -n 2`` and ``mpiexec -n 4``; skipped when not
under mpiexec."""
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

LAYOUTS = {2: [(2, 1, True, "data_parallel"), (1, 2, True, "semi_auto_parallel"),
               (1, 2, False, "semi_auto_parallel")],
           4: [(2, 2, True, "semi_auto_parallel"), (4, 1, True, "data_parallel"),
               (1, 4, False, "semi_auto_parallel"), (2, 2, False, "semi_auto_parallel")]}
SEQUENCE_PARALLEL = {2: [(1, 2)], 4: [(2, 2), (1, 4)]}      # dp, mp with sequence_parallel=True


def train(net, ids, steps=3):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
    step = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
    losses = [float(step(ids)) for _ in range(steps)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


@pytest.fixture(scope="module")
def serial():
    net = PanguAlphaWithLoss(CONFIG)
    loss, grads = autopar.value_and_grad(net)(IDS)
    return loss, grads, train(PanguAlphaWithLoss(CONFIG), IDS)


@pytest.mark.parametrize("dp, mp, vocab_emb_dp, mode", LAYOUTS.get(WORLD.size, []))
def test_loss_gradients_and_three_steps_equal_serial(serial, dp, mp, vocab_emb_dp, mode):
    check_equals_serial(serial, CONFIG.replace(data_parallel=dp, model_parallel=mp, vocab_emb_dp=vocab_emb_dp), mode)


@pytest.mark.parametrize("dp, mp", SEQUENCE_PARALLEL.get(WORLD.size, []))
def test_sequence_parallel_equals_serial(serial, dp, mp):
    check_equals_serial(serial, CONFIG.replace(data_parallel=dp, model_parallel=mp, sequence_parallel=True),
                        "semi_auto_parallel")


def check_equals_serial(serial, cfg, mode):
    """Loss, gradients and three AdamW steps of ``cfg`` under ``mode`` on the world equal serial."""
    loss, grads, (losses, weights) = serial
    full = mode == "semi_auto_parallel"
    ids = IDS if full else np.split(IDS, WORLD.size)[WORLD.rank]
    with bound_world(WORLD), parallel_context(parallel_mode=mode, device_num=WORLD.size, full_batch=full):
        got_loss, got_grads = autopar.value_and_grad(PanguAlphaWithLoss(cfg))(ids)
        got_losses, got_weights = train(PanguAlphaWithLoss(cfg), ids)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(got_grads[name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5)
    for name, w in weights.items():
        # Adam's m/sqrt(v) amplifies float32 rounding where gradients are ~0: atol is 1e-3 of a step
        np.testing.assert_allclose(got_weights[name], w, rtol=1e-5, atol=1e-6, err_msg=name)

"""The same programs on a GPU (CuPy) as on the CPU: run on a machine with CuPy and a GPU,
skipped cleanly elsewhere (``pytest tests/test_backend_gpu.py`` on the device machine).

float64 throughout, where CPU BLAS and cuBLAS differ only in summation order: results must
agree to 1e-9 relative (any wrong kernel is off by O(1)); dropout masks bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from gpu import cupy_or_skip

cupy = cupy_or_skip()

from test_spmd_ops import CASES, OneOp, serial  # noqa: E402

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.backend import to_host  # noqa: E402
from autopar.ir.random import derive_key  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402
from autopar.ops.dropout import dropout_mask  # noqa: E402
from autopar.train import AdamWeightDecay, clip_by_global_norm  # noqa: E402

RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture
def on_gpu():
    autopar.set_context(device_target="GPU")
    yield
    autopar.set_context(device_target="CPU")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_op_forward_and_vjp_on_gpu_equal_cpu(case):
    """Every op kind (test_spmd_ops' cases): d loss/d probe is the forward output, the other
    gradients the VJPs; GPU equals CPU."""
    want_loss, want, names = serial(case)        # on the CPU (cached)
    autopar.set_context(device_target="GPU")
    try:
        loss, grads = autopar.value_and_grad(OneOp(case))()
    finally:
        autopar.set_context(device_target="CPU")
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=RTOL, atol=ATOL)
    for name in names:        # value_and_grad hands gradients back on the host, as numpy arrays
        np.testing.assert_allclose(to_host(grads[name]), want[name], rtol=RTOL, atol=ATOL, err_msg=name)


def tiny():
    return PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", dropout_rate=0.1)


def ids_of(config):
    return np.random.default_rng(0).integers(0, config.vocab_size, (2, config.seq_length + 1)).astype(np.int32)


def test_pangu_alpha_loss_and_gradients_on_gpu_equal_cpu():
    config = tiny()
    ids = ids_of(config)
    loss, grads = autopar.value_and_grad(PanguAlphaWithLoss(config))(ids)
    autopar.set_context(device_target="GPU")
    try:
        gpu_loss, gpu_grads = autopar.value_and_grad(PanguAlphaWithLoss(config))(ids)
    finally:
        autopar.set_context(device_target="CPU")
    assert type(gpu_loss) is np.ndarray
    np.testing.assert_allclose(gpu_loss, loss, rtol=RTOL)
    for name, g in grads.items():
        np.testing.assert_allclose(to_host(gpu_grads[name]), g, rtol=RTOL, atol=ATOL, err_msg=name)


def adamw(config, ids, steps):
    net = PanguAlphaWithLoss(config)
    params = net.trainable_params()
    opt = AdamWeightDecay(params, learning_rate=1e-2, weight_decay=0.1)
    fn = autopar.value_and_grad(net)
    for _ in range(steps):
        _, grads = fn(ids)
        opt.step(clip_by_global_norm([grads[p.name] for p in params], 1.0)[0])
    return {p.name: p.asnumpy() for p in params}, opt.state_dict()


def test_three_adamw_steps_on_gpu_equal_cpu():
    config = tiny()
    ids = ids_of(config)
    weights, state = adamw(config, ids, 3)
    autopar.set_context(device_target="GPU")
    try:
        gpu_weights, gpu_state = adamw(config, ids, 3)
    finally:
        autopar.set_context(device_target="CPU")
    for name, w in weights.items():
        assert type(gpu_weights[name]) is np.ndarray
        np.testing.assert_allclose(gpu_weights[name], w, rtol=RTOL, atol=ATOL, err_msg=name)
    for k, a in state.items():
        assert type(gpu_state[k]) is np.ndarray
        np.testing.assert_allclose(gpu_state[k], a, rtol=RTOL, atol=ATOL, err_msg=k)


def test_train_one_step_cell_on_gpu_equals_cpu(on_gpu):
    config = tiny()
    ids = ids_of(config)
    net = PanguAlphaWithLoss(config)
    step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2), clip_norm=1.0)
    losses = [float(step(ids)) for _ in range(3)]
    autopar.set_context(device_target="CPU")
    cpu = PanguAlphaWithLoss(config)
    cpu_step = nn.TrainOneStepCell(cpu, AdamWeightDecay(cpu.trainable_params(), 1e-2), clip_norm=1.0)
    np.testing.assert_allclose(losses, [float(cpu_step(ids)) for _ in range(3)], rtol=RTOL)


@pytest.mark.parametrize("shape, region, keep", [
    ((8, 128, 1024), None, 0.9),
    ((4, 64, 4096), (slice(1, 3), slice(None), slice(1024, 2048)), 0.9),
    ((1 << 21, 1 << 12), (slice((1 << 21) - 3, None), slice(None)), 0.5),    # flat indices >= 2**32
])
def test_dropout_masks_on_gpu_equal_cpu_bit_for_bit(shape, region, keep):
    key = derive_key(5, "blocks.3.attention.dropout", 11)
    host = dropout_mask(key, keep, shape, region)
    dev = dropout_mask(key, keep, shape, region, xp=cupy)
    assert isinstance(dev, cupy.ndarray)
    np.testing.assert_array_equal(dev.get(), host)


def test_parameters_move_once_and_read_back_on_the_host(on_gpu):
    config = tiny()
    net = PanguAlphaWithLoss(config)
    fn = autopar.value_and_grad(net)
    fn(ids_of(config))
    placed = {p.name: p.data for p in net.trainable_params()}
    fn(ids_of(config))
    for p in net.trainable_params():
        assert p.data is placed[p.name] and isinstance(p.data, cupy.ndarray)
        assert type(p.asnumpy()) is np.ndarray and type(np.asarray(p)) is np.ndarray

"""Two MPI ranks sharing one GPU equal the serial CPU run (issue 14, item 3): on the device
machine ``mpiexec -n 2 python -m pytest -q tests/mpi/test_gpu_mpi.py``; skipped outside mpiexec.

Both ranks compute on GPU 0 with CuPy arrays; their collectives and pipeline messages go
through MPI on host copies (autopar/comm/staging.py). A tiny PanGu-alpha in float64 with
dropout 0.1 under dp2 (data_parallel; with comm_fusion buckets, optimizer parallel, ZeRO-3),
mp2 (semi_auto_parallel, the model's own shard strategies; the vocabulary split too) and pp2
(PipelineCell, 2 micro-batches): loss and gradients, then three AdamWeightDecay steps
(clip 1.0), equal the serial CPU run's to 1e-9 relative. float64 leaves only summation order
between the runs (cuBLAS vs CPU BLAS, 2 ranks vs 1), so any wrong shard, message or
reduction is off by far more.

Without CuPy or a GPU (CI, the 2-rank suite of tests/test_comm_mpi_launch.py) the same tests
run on the CPU with the strict CuPy stand-in of tests/test_comm_device_staging.py (numpy
cannot read its arrays, its functions refuse numpy arrays): every host/device mix-up on
these paths fails there too. The test ids name the device: ``[cupy-...]`` or ``[stand-in-...]``.
"""
import sys

import numpy as np
import pytest

try:
    import cupy
    _DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:     # no CuPy, no driver or no device
    _DEVICES = 0
if not _DEVICES:
    from test_comm_device_staging import StandInCupy
    cupy = StandInCupy()
DEVICE = "cupy" if _DEVICES else "stand-in"

from steps import assert_like_serial as like_serial  # noqa: E402
from steps import serial_run, train  # noqa: E402

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.comm import world  # noqa: E402
from autopar.context import bound_world, parallel_context  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
RTOL, ATOL = 1e-9, 1e-12
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, param_dtype="float64", compute_dtype="float64",
                                 dropout_rate=0.1)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss


@pytest.fixture(scope="module", autouse=True)
def on_gpu_0():
    """Both ranks on GPU 0 (one GPU lent), or on the stand-in as ``cupy``; the CPU target
    (and the modules) restored afterwards."""
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = cupy
    cupy.cuda.Device(0).use()
    autopar.set_context(device_target="GPU")
    yield
    autopar.set_context(device_target="CPU")
    if saved is None:
        del sys.modules["cupy"]
    else:
        sys.modules["cupy"] = saved



@pytest.fixture(scope="module")
def serial(on_gpu_0):
    """The serial run on the CPU: loss, gradients, three steps' losses and weights."""
    return serial_run(lambda: PanguAlphaWithLoss(CONFIG), IDS)


def assert_like_serial(got, serial) -> None:
    got_loss, got_grads, _ = got
    assert type(got_loss) is np.ndarray                        # the loss comes back to the host
    for name, g in got_grads.items():
        assert type(g) is np.ndarray, name                     # users get host arrays
    like_serial(got, serial, RTOL, ATOL)


def on_device(net) -> bool:
    """Whether every weight this rank holds lives on the GPU (a pipeline rank holds nothing,
    an empty array, of another stage's weights)."""
    held = [p._shard[0] for p in net.trainable_params()]
    return all(isinstance(s.data, cupy.ndarray) for s in held if s.size)


EVERY = {"allreduce": {"mode": "auto"}, "reducescatter": {"mode": "auto"}, "allgather": {"mode": "auto"}}
DP2 = {   # name -> extra parallel context: buckets (iallreduce) and optimizer parallel's levels
    "dp2": {},
    "dp2 comm_fusion": {"comm_fusion": EVERY},
    "dp2 optimizer parallel fused": {"enable_parallel_optimizer": True, "parallel_optimizer_threshold": 0,
                                     "comm_fusion": EVERY},
    "dp2 optimizer level3": {"enable_parallel_optimizer": True, "parallel_optimizer_config": {
        "optimizer_level": "level3", "parallel_optimizer_threshold": 0}},
}


@pytest.mark.parametrize("name", DP2, ids=lambda n: f"{DEVICE}-{n}")
def test_dp2_on_one_gpu_equals_serial(serial, name):
    ids = np.split(IDS, 2)[WORLD.rank]
    with bound_world(WORLD), parallel_context(parallel_mode="data_parallel", device_num=2, **DP2[name]):
        got = autopar.value_and_grad(PanguAlphaWithLoss(CONFIG).set_train(True))(ids)
        net = PanguAlphaWithLoss(CONFIG)
        assert_like_serial(got + (train(net, net, ids),), serial)
        assert on_device(net)


@pytest.mark.parametrize("device", [DEVICE])
def test_weights_placed_by_a_serial_gpu_run_then_sharded_equal_serial(serial, device):
    """A network whose weights a serial program already moved to the GPU: its dp2 shards are
    cut from the device values (through the host), then placed on the GPU again."""
    loss, grads, _ = serial
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    autopar.value_and_grad(net)(IDS)                                  # serial, on the GPU
    assert all(isinstance(p._data, cupy.ndarray) for p in net.trainable_params())
    with bound_world(WORLD), parallel_context(parallel_mode="data_parallel", device_num=2):
        got_loss, got_grads = autopar.value_and_grad(net)(np.split(IDS, 2)[WORLD.rank])
        assert on_device(net)
    np.testing.assert_allclose(got_loss, loss, rtol=RTOL)
    for name, g in grads.items():
        np.testing.assert_allclose(got_grads[name], g, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("vocab_emb_dp", [True, False], ids=lambda v: f"{DEVICE}-vocab_emb_dp={v}")
def test_mp2_semi_auto_on_one_gpu_equals_serial(serial, vocab_emb_dp):
    """The model's own shard strategies over 2 ranks; vocab_emb_dp=False splits the word
    table and the cross-entropy's softmax over the vocabulary (its all-reduces on the GPU)."""
    cfg = CONFIG.replace(model_parallel=2, vocab_emb_dp=vocab_emb_dp)
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        got = autopar.value_and_grad(PanguAlphaWithLoss(cfg).set_train(True))(IDS)
        net = PanguAlphaWithLoss(cfg)
        assert_like_serial(got + (train(net, net, IDS),), serial)
        assert on_device(net)


def pipelined(stages):
    net = PanguAlphaWithLoss(CONFIG)
    nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=stages)
    return net.set_train(True)


@pytest.mark.parametrize("device", [DEVICE])
def test_pp2_two_micro_batches_on_one_gpu_equals_serial(serial, device):
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2,
                                              full_batch=True):
        net = pipelined(2)
        got = autopar.value_and_grad(nn.PipelineCell(net, 2), net.trainable_params())(IDS)
        net = pipelined(2)
        assert_like_serial(got + (train(net, nn.PipelineCell(net, 2), IDS),), serial)
        assert on_device(net)

"""PanGu-α trained on 2 ranks over the NCCL communicator equals the serial CPU run (issue 17).

The programs run on the GPU target with the world ``nccl_world`` makes: gradients all-reduced
(and, with comm_fusion, bucketed through ``iallreduce`` on the communicator's collective
stream: test_nccl_overlap_mpi.py checks the buckets' streams), optimizer parallel's reduce-scatter
and all-gather, the model-parallel split's collectives (the vocabulary-split cross-entropy's
included) go through NCCL calls; a 2-stage pipeline's messages (1F1B, GPipe, interleaved 1F1B) go
through NCCL channels (comm/nccl_channels.py). A tiny PanGu-α in
float64 with dropout 0.1: loss and gradients, then three AdamWeightDecay steps (clip 1.0),
equal the serial CPU run's to 1e-9 relative (float64 leaves only summation order), so a
wrong shard, message or reduction is off by far more.

On 2 GPUs with CuPy and NCCL this is the real thing
(``NCCL_NVLS_ENABLE=0 mpiexec -n 2 python -m pytest -q tests/mpi/test_nccl_pangu_mpi.py``);
elsewhere it runs on the stand-in device and fake NCCL of tests/mpi/fake_nccl.py.
"""
import numpy as np
import pytest

from autopar.comm import world

if world().size != 2:   # before test_nccl_mpi imports mpi4py (see there)
    pytest.skip("run under mpiexec -n 2", allow_module_level=True)

from steps import assert_like_serial as like_serial  # noqa: E402
from steps import serial_run, train  # noqa: E402
from test_nccl_mpi import DEVICE, REAL, WORLD, install_fake  # noqa: E402

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.comm.nccl import NCCLCommunicator, nccl_world  # noqa: E402
from autopar.context import bound_world, parallel_context  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402

pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
RTOL, ATOL = 1e-9, 1e-12
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=2, param_dtype="float64", compute_dtype="float64",
                                 dropout_rate=0.1)
IDS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss


@pytest.fixture(scope="module")
def nccl():
    """The NCCL world on the GPU target (real GPUs, or the fake with 2 GPUs); CPU restored after."""
    if REAL:
        import cupy as xp
        undo = None
    else:
        xp, undo = install_fake(2)
    comm = nccl_world(WORLD)
    autopar.set_context(device_target="GPU")
    yield comm, xp
    autopar.set_context(device_target="CPU")
    if undo is not None:
        undo()


@pytest.fixture(scope="module")
def serial(nccl):
    """The serial run on the CPU: loss, gradients, three steps' losses and weights."""
    return serial_run(lambda: PanguAlphaWithLoss(CONFIG), IDS)


def assert_like_serial(got, serial) -> None:
    like_serial(got, serial, RTOL, ATOL)


def nccl_calls(xp) -> int:
    """NCCL calls made so far (the fake counts them; on real GPUs: not counted, -1)."""
    return -1 if REAL else len(xp.cuda.nccl.calls)


EVERY = {"allreduce": {"mode": "auto"}, "reducescatter": {"mode": "auto"}, "allgather": {"mode": "auto"}}
CASES = {   # name -> (extra parallel context, the batch this rank reads, the network)
    "dp2": ({"parallel_mode": "data_parallel"}, "split", lambda: PanguAlphaWithLoss(CONFIG)),
    "dp2 comm_fusion": ({"parallel_mode": "data_parallel", "comm_fusion": EVERY}, "split",
                        lambda: PanguAlphaWithLoss(CONFIG)),
    "dp2 optimizer parallel": ({"parallel_mode": "data_parallel", "enable_parallel_optimizer": True,
                                "parallel_optimizer_threshold": 0}, "split", lambda: PanguAlphaWithLoss(CONFIG)),
    "mp2 vocabulary split": ({"parallel_mode": "semi_auto_parallel", "full_batch": True}, "all",
                             lambda: PanguAlphaWithLoss(CONFIG.replace(model_parallel=2, vocab_emb_dp=False))),
}


@pytest.mark.parametrize("name", CASES, ids=lambda n: f"{DEVICE}-{n}")
def test_sharded_training_over_nccl_equals_serial(nccl, serial, name):
    comm, xp = nccl
    extra, batch, make = CASES[name]
    ids = np.split(IDS, 2)[comm.rank] if batch == "split" else IDS
    before = nccl_calls(xp)
    with bound_world(comm), parallel_context(device_num=2, **extra):
        got = autopar.value_and_grad(make().set_train(True))(ids)
        net = make()
        assert_like_serial(got + (train(net, net, ids),), serial)
    assert type(comm) is NCCLCommunicator and (REAL or nccl_calls(xp) > before)


def pipelined(config, pieces):
    net = PanguAlphaWithLoss(config)
    nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=pieces)
    return net.set_train(True)


def messages(comm, xp) -> tuple[int, int]:
    """(sends, receives) through NCCL calls minus those the communicator counted: (0, 0) when
    every message went through one NCCL call (on real GPUs: not logged, (0, 0))."""
    count = comm.stats.snapshot()["count"]
    if REAL:
        return 0, 0
    logged = [c[0] for c in xp.cuda.nccl.calls]
    return logged.count("send") - count.get("send", 0), logged.count("recv") - count.get("recv", 0)


PIPELINES = {   # name -> (layers, pieces, micro-batches, schedule, virtual stages)
    "1f1b": (2, 2, 2, "1f1b", 1),
    "gpipe": (2, 2, 2, "gpipe", 1),
    "interleaved 1f1b": (4, 4, 4, "1f1b", 2),    # activations 0 -> 1 -> 0 -> 1: back across the wrap
}


@pytest.mark.parametrize("name", PIPELINES, ids=lambda n: f"{DEVICE}-{n}")
def test_two_stage_pipeline_over_nccl_channels_equals_serial(nccl, serial, name):
    """Activations and gradients go through NCCL channels (comm/nccl_channels.py): every
    message the communicator counts is one NCCL send or receive."""
    comm, xp = nccl
    layers, pieces, micro, schedule, virtual = PIPELINES[name]
    config = CONFIG.replace(num_layers=layers)
    want = serial if layers == CONFIG.num_layers else serial_run(lambda: PanguAlphaWithLoss(config), IDS)
    comm.stats.reset()
    before = messages(comm, xp)
    with bound_world(comm), parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2,
                                             full_batch=True):
        net = pipelined(config, pieces)
        cell = nn.PipelineCell(net, micro, schedule, virtual_stages=virtual)
        got = autopar.value_and_grad(cell, net.trainable_params())(IDS)
        net = pipelined(config, pieces)
        assert_like_serial(got + (train(net, nn.PipelineCell(net, micro, schedule, virtual_stages=virtual), IDS),),
                           want)
    count = comm.stats.snapshot()["count"]
    assert count.get("send", 0) > 0 and count.get("recv", 0) > 0, count
    assert messages(comm, xp) == before, "a message went around NCCL"

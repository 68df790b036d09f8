"""Checkpoints across pipeline and non-pipeline plans under real MPI: run by
tests/test_checkpoint_pipeline.py as ``mpiexec -n 4`` (pp2 x dp2 with optimizer parallel
<-> dp4) and by tests/test_comm_mpi_launch.py's ``mpiexec -n 2`` suite run (pp2 <-> dp2);
skipped when not under mpiexec. A run resumed from a checkpoint of the other plan gives
the losses of an uninterrupted serial run. Every rank runs every test in the same order:
saving and loading are collective."""
import contextlib
import os
import shutil
import tempfile

import numpy as np
import pytest

from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")
CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)    # 2 blocks + the query layer, float32
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(4)]
for _b in BATCHES:
    _b[_b == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the batch loss
RTOL = 1e-5
PATH_BYTES = 4096


def trainer(stages: int, dp: int):
    net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=dp))
    cell = net
    if stages > 1:
        nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=stages)
        cell = nn.PipelineCell(net, 2)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(cell, opt, clip_norm=1.0)


@contextlib.contextmanager
def pipeline():
    """pp2 x dp(n/2), optimizer parallel on, every rank fed the whole batch."""
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=WORLD.size,
                                              pipeline_stages=2, full_batch=True, enable_parallel_optimizer=True,
                                              parallel_optimizer_threshold=0):
        yield trainer(2, WORLD.size // 2), lambda k: BATCHES[k]


@contextlib.contextmanager
def data_parallel():
    """dp n, each rank fed its slice of the batch."""
    with bound_world(WORLD), parallel_context(parallel_mode="data_parallel", device_num=WORLD.size):
        yield trainer(1, WORLD.size), lambda k: np.split(BATCHES[k], WORLD.size)[WORLD.rank]


PLANS = {"pipeline": pipeline, "data_parallel": data_parallel}


@pytest.fixture(scope="module")
def uninterrupted():
    train = trainer(1, 1)
    return [float(train(b)) for b in BATCHES]


@pytest.fixture(scope="module")
def directory():
    buf = np.zeros(PATH_BYTES, dtype=np.uint8)
    if WORLD.rank == 0:
        name = tempfile.mkdtemp(prefix="autopar-ckpt-pp-mpi-").encode()
        buf[:len(name)] = np.frombuffer(name, dtype=np.uint8)
    path = bytes(WORLD.broadcast(buf, root=0)).rstrip(b"\0").decode()
    yield path
    WORLD.barrier()
    if WORLD.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("saver, loader", [("pipeline", "data_parallel"), ("data_parallel", "pipeline")])
def test_resume_on_the_other_plan_equals_the_uninterrupted_run(uninterrupted, directory, saver, loader):
    path = os.path.join(directory, saver)
    with PLANS[saver]() as (train, batch):
        losses = [float(train(batch(k))) for k in range(2)]
        ckpt.save_checkpoint(train, path, extra={"next_batch": 2})
    np.testing.assert_allclose(losses, uninterrupted[:2], rtol=RTOL)
    with PLANS[loader]() as (train, batch):
        assert ckpt.load_distributed_checkpoint(train, path, inputs=(batch(2),)) == {"next_batch": 2}
        losses = [float(train(batch(k))) for k in range(2, 4)]
    np.testing.assert_allclose(losses, uninterrupted[2:], rtol=RTOL)

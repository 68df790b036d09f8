"""Optimizer parallel under real MPI: PanGu-α tiny with ``enable_parallel_optimizer`` on
dp2 x mp2 (``mpiexec -n 4``, run by tests/test_comm_mpi_launch.py) or dp2 (``-n 2``, part
of the tests/mpi suite) trains like serial, keeps 1/replicas of the optimizer state per
rank, reduce-scatters gradients and all-gathers weights, and its checkpoint of sliced
states loads serially and resumes; skipped when not under mpiexec.

Every rank runs every test in the same order (the collectives must match)."""
import os
import shutil
import tempfile

import numpy as np
import pytest

from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.shards import gather
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")
CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)    # float32, as users train
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(3)]
CLIP = 0.5
PATH_BYTES = 4096   # the broadcast checkpoint path, NUL-padded
# (dp, mp, mode) by world size; AdamWeightDecay state bytes per rank (serial: 338176)
PLAN = {2: (2, 1, "data_parallel"), 4: (2, 2, "semi_auto_parallel")}
STATE_BYTES = {2: 169088, 4: 84544}


def trainer(cfg):
    net = PanguAlphaWithLoss(cfg)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(net, opt, clip_norm=CLIP)


def shared_tmpdir() -> str:
    """A temp dir made by rank 0; its name reaches the others as a fixed-length uint8 array."""
    buf = np.zeros(PATH_BYTES, dtype=np.uint8)
    if WORLD.rank == 0:
        name = tempfile.mkdtemp(prefix="autopar-zero-mpi-").encode()
        buf[:len(name)] = np.frombuffer(name, dtype=np.uint8)
    return bytes(WORLD.broadcast(buf, root=0)).rstrip(b"\0").decode()


@pytest.fixture(scope="module")
def serial():
    train = trainer(CONFIG)
    losses = [float(train(b)) for b in BATCHES]
    return losses, {p.name: p.asnumpy() for p in train.network.trainable_params()}


@pytest.fixture(scope="module")
def sharded():
    """Two steps under optimizer parallel, a checkpoint, a third step (stats of step 2)."""
    dp, mp, mode = PLAN[WORLD.size]
    full = mode == "semi_auto_parallel"
    directory = shared_tmpdir()
    path = os.path.join(directory, "ck")
    batch = (lambda k: BATCHES[k]) if full else (lambda k: np.split(BATCHES[k], WORLD.size)[WORLD.rank])
    with bound_world(WORLD), parallel_context(parallel_mode=mode, device_num=WORLD.size, full_batch=full,
                                              enable_parallel_optimizer=True, parallel_optimizer_threshold=0):
        train = trainer(CONFIG.replace(data_parallel=dp, model_parallel=mp))
        losses = [float(train(batch(0)))]
        WORLD.stats.reset()
        losses.append(float(train(batch(1))))
        stats = WORLD.stats.snapshot()
        ckpt.save_checkpoint(train, path)
        opt = train.optimizer
        states = {f"{s}.{t.name}": gather(a, t.layout, t.param.shape, WORLD)
                  for t, st in zip(opt.params, opt.states) for s, a in st.items()}
        at2 = {p.name: p.asnumpy() for p in train.network.trainable_params()} | states
        losses.append(float(train(batch(2))))
        weights = {p.name: p.asnumpy() for p in train.network.trainable_params()}
        nbytes = sum(a.nbytes for st in opt.states for a in st.values())
        sliced = sum(t is not t.param._shard[0] for t in opt.params)
    yield {"losses": losses, "weights": weights, "stats": stats, "bytes": nbytes, "sliced": sliced,
           "path": path, "at2": at2}
    WORLD.barrier()
    if WORLD.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)


def test_three_steps_equal_serial(serial, sharded):
    losses, weights = serial
    np.testing.assert_allclose(sharded["losses"], losses, rtol=1e-5)
    for name, w in weights.items():
        # Adam's m/sqrt(v) amplifies float32 rounding where gradients are ~0 (as without
        # optimizer parallel): atol is 5e-3 of a step
        np.testing.assert_allclose(sharded["weights"][name], w, rtol=1e-5, atol=5e-5, err_msg=name)


def test_state_bytes_and_collectives(sharded):
    assert sharded["bytes"] == STATE_BYTES[WORLD.size]
    assert sharded["sliced"] == 53                         # threshold 0: every weight
    count = sharded["stats"]["count"]
    if WORLD.size == 2:    # dp2: every gradient reduce-scattered, every weight all-gathered
        assert count == {"allreduce": 3, "reduce_scatter": 53, "allgather": 53}
    else:                  # dp2 x mp2: see tests/test_optimizer_parallel.py for the three tables
        assert count["reduce_scatter"] == 50 and count["allgather"] == 53 + 3   # + 3 of activations


def test_checkpoint_of_sliced_states_loads_serially_and_resumes(sharded):
    loaded = ckpt.load_checkpoint(sharded["path"])
    assert set(loaded) == set(sharded["at2"])
    for name, want in sharded["at2"].items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    train = trainer(CONFIG)
    ckpt.load_distributed_checkpoint(train, sharded["path"])
    assert train.optimizer.step_count == 2
    np.testing.assert_allclose(float(train(BATCHES[2])), sharded["losses"][2], rtol=1e-5)

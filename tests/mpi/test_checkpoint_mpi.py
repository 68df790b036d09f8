"""Checkpoints under real MPI: save under dp2 x mp2, resume under mp4 and under dp4, and the
resumed steps equal the uninterrupted run; run by tests/test_comm_mpi_launch.py as
``mpiexec -n 4`` (and, with the dp1 x mp2 -> dp2 plans, as part of ``mpiexec -n 2 ... tests/mpi``);
skipped when not under mpiexec.

Every rank runs every test in the same order, so each test makes the same collective calls
on every rank: ``p.asnumpy()`` of a sharded parameter, ``save_checkpoint`` and
``load_distributed_checkpoint`` are collective.
"""
import contextlib
import os
import shutil
import tempfile

import numpy as np
import pytest

from autopar import nn
from autopar.comm import world
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.shards import gather
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")
CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)    # float32, as users train
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(4)]
RTOL = 1e-5
PATH_BYTES = 4096   # the broadcast checkpoint path, NUL-padded

# (dp, mp, parallel_mode): the plan that saves after 2 steps, and the plans that resume
SAVE = {2: (1, 2, "semi_auto_parallel"), 4: (2, 2, "semi_auto_parallel")}
RESUME = {2: [(2, 1, "data_parallel")],
          4: [(1, 4, "semi_auto_parallel"), (4, 1, "data_parallel")]}


class Plan:
    """A layout of the 4 (or 2) ranks: its config, its context, and what each rank is fed."""

    def __init__(self, dp, mp, mode):
        self.cfg, self.mode = CONFIG.replace(data_parallel=dp, model_parallel=mp), mode
        self.full = mode == "semi_auto_parallel"

    def batch(self, k):   # the full batch on every rank, or (data parallel) this rank's slice
        return BATCHES[k] if self.full else np.split(BATCHES[k], WORLD.size)[WORLD.rank]

    @contextlib.contextmanager
    def context(self):
        from autopar.context import bound_world, parallel_context
        with bound_world(WORLD), parallel_context(parallel_mode=self.mode, device_num=WORLD.size,
                                                  full_batch=self.full):
            yield


def trainer(cfg):
    net = PanguAlphaWithLoss(cfg)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(net, opt, clip_norm=1.0)


def run_steps(train, p, first, last):
    return [float(train(p.batch(k))) for k in range(first, last)]


def gathered(train):
    """{name: full array} of parameters and optimizer states (collective under sharding)."""
    out = {p.name: p.asnumpy() for p in train.network.get_parameters()}
    for t, states in zip(train.optimizer.params, train.optimizer.states):
        for s, a in states.items():
            out[f"{s}.{t.name}"] = (gather(a, t.layout, t.param.shape, WORLD) if hasattr(t, "layout")
                                    else np.array(a, copy=True))
    return out


def shared_tmpdir() -> str:
    """A temp dir made by rank 0; its name reaches the others as a fixed-length uint8 array."""
    buf = np.zeros(PATH_BYTES, dtype=np.uint8)
    if WORLD.rank == 0:
        name = tempfile.mkdtemp(prefix="autopar-ckpt-mpi-").encode()
        assert len(name) < PATH_BYTES, name
        buf[:len(name)] = np.frombuffer(name, dtype=np.uint8)
    buf = WORLD.broadcast(buf, root=0)
    return bytes(buf).rstrip(b"\0").decode()


@pytest.fixture(scope="module")
def saved():
    """2 steps under the saving plan, checkpoint, 2 more steps (the uninterrupted run)."""
    directory = shared_tmpdir()
    path = os.path.join(directory, "ck")
    p = Plan(*SAVE[WORLD.size])
    with p.context():
        train = trainer(p.cfg)
        first = run_steps(train, p, 0, 2)
        assert ckpt.save_checkpoint(train, path, extra={"next_batch": 2}) == path
        at2 = gathered(train)
        rest = run_steps(train, p, 2, 4)
    yield path, first, rest, at2
    WORLD.barrier()
    if WORLD.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)


def test_checkpoint_is_the_same_directory_on_every_rank(saved):
    path = saved[0]
    name = np.zeros(PATH_BYTES, dtype=np.uint8)
    name[:len(path.encode())] = np.frombuffer(path.encode(), dtype=np.uint8)
    everyone = WORLD.allgather(name[None, :])
    assert (everyone == everyone[0]).all()
    assert ckpt.is_checkpoint(path)
    _, manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 2 and manifest["world_size"] == WORLD.size


def test_serial_load_on_every_rank_equals_the_gathered_trained_values(saved):
    path, _, _, at2 = saved
    loaded = ckpt.load_checkpoint(path)
    assert set(loaded) == set(at2)           # parameters, moment1.*, moment2.*
    for name, want in at2.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


@pytest.mark.parametrize("dp, mp, mode", RESUME.get(WORLD.size, []))
def test_resume_under_another_plan_equals_the_uninterrupted_run(saved, dp, mp, mode):
    path, _, rest, _ = saved
    p = Plan(dp, mp, mode)
    with p.context():
        train = trainer(p.cfg)
        extra = ckpt.load_distributed_checkpoint(train, path, inputs=(p.batch(2),))
        assert extra == {"next_batch": 2} and train.optimizer.step_count == 2
        losses = run_steps(train, p, 2, 4)
    np.testing.assert_allclose(losses, rest, rtol=RTOL)

"""Checkpoint safety under real MPI (the in-process cases are in tests/test_checkpoint_safety.py):
a sharded load into a model of another shape fails on every rank with the serial error and
changes nothing, and a NaN held by one rank only is refused by every rank (none is left
waiting in a collective). Run as part of ``mpiexec -n 2 python -m pytest tests/mpi``;
skipped when not under mpiexec.
"""
import os
import shutil
import tempfile

import numpy as np
import pytest
from lm_harness import held

from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size not in (2, 4), reason="run under mpiexec -n 2 (or 4)")
CONFIG = PanguAlphaConfig.preset("tiny", model_parallel=WORLD.size)
BATCH = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
SPLIT = "blocks.0.attention.dense1.weight"    # split over mp: each rank holds its own block
PATH_BYTES = 4096


def trainer(cfg):
    net = PanguAlphaWithLoss(cfg)
    return nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))


def context():
    return parallel_context(parallel_mode="semi_auto_parallel", device_num=WORLD.size, full_batch=True)


@pytest.fixture(scope="module")
def saved():
    """The tiny model, mp over every rank, one step, saved in a directory rank 0 made."""
    buf = np.zeros(PATH_BYTES, dtype=np.uint8)
    if WORLD.rank == 0:
        name = tempfile.mkdtemp(prefix="autopar-safety-mpi-").encode()
        buf[:len(name)] = np.frombuffer(name, dtype=np.uint8)
    directory = bytes(WORLD.broadcast(buf, root=0)).rstrip(b"\0").decode()
    path = os.path.join(directory, "ck")
    with bound_world(WORLD), context():
        train = trainer(CONFIG)
        train(BATCH)
        ckpt.save_checkpoint(train, path)
    yield path
    WORLD.barrier()
    if WORLD.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("change, name, want, got", [
    ({"hidden_size": 64}, "word_embedding.embedding_table", "(96, 64) float32", "(96, 32) float32"),
    ({"seq_length": 8}, "position_embedding.embedding_table", "(8, 32) float32", "(16, 32) float32"),
])
def test_a_sharded_load_into_another_shape_changes_nothing(saved, change, name, want, got):
    cfg = CONFIG.replace(**change)
    with bound_world(WORLD), context():
        train = trainer(cfg)
        train(BATCH[:, :cfg.seq_length + 1])     # shards bound, states allocated
        before = held(train)
        with pytest.raises(ValueError) as info:
            ckpt.load_distributed_checkpoint(train, saved)
        after = held(train)
    assert str(info.value).startswith(f"load checkpoint {saved!r}: tensor {name!r}: expected {want} (the model's), "
                                      f"got {got} in the checkpoint (and ")
    serial = PanguAlphaWithLoss(PanguAlphaConfig.preset("tiny", **change))
    with pytest.raises(ValueError, match="tensor") as serial_info:
        ckpt.load_param_into_net(serial, saved)
    assert str(serial_info.value).split(" (and ")[0] == str(info.value).split(" (and ")[0]
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_a_nan_on_one_rank_is_refused_by_every_rank(saved):
    previous = ckpt.load_checkpoint(saved)
    with bound_world(WORLD), context():
        train = trainer(CONFIG)
        train(BATCH)
        shard = next(t for t in train.optimizer.params if t.name == SPLIT)
        if WORLD.rank == WORLD.size - 1:
            shard.data.flat[3] = np.nan
        with pytest.raises(ValueError, match=rf"values: expected finite parameters and optimizer states, "
                                             rf"got NaN or inf in \['{SPLIT}'\]"):
            ckpt.save_checkpoint(train, saved)
    WORLD.barrier()
    now = ckpt.load_checkpoint(saved)
    assert now.keys() == previous.keys()
    for key in now:
        np.testing.assert_array_equal(now[key], previous[key], err_msg=key)
    assert sorted(os.listdir(os.path.dirname(saved))) == ["ck"]

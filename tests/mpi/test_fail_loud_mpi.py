"""The cross-rank consistency check over real MPI: ranks that must agree but do not (inputs
under model parallelism, step counters, model sizes) all raise the same RankDivergenceError
naming the ranks and what differs, before any of the program's own collectives -- so the
world is still in step afterwards. Run under mpiexec with N > 1 (tests/test_comm_mpi_launch.py
runs tests/mpi on 2 ranks); skipped otherwise."""
import numpy as np
import pytest

from autopar import nn
from autopar.comm import world
from autopar.comm.consistency import Fact, RankDivergenceError, agree
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import SGD

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")
LAST = WORLD.size - 1
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


def first_step(config, ids, step_count=0):
    """One model-parallel step (every rank reads the whole batch); the error's text if it fails."""
    with bound_world(WORLD), parallel_context(parallel_mode="semi_auto_parallel", device_num=WORLD.size,
                                              full_batch=True):
        net = PanguAlphaWithLoss(config)
        train = nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))
        train.optimizer.step_count = step_count
        try:
            return float(train(ids))
        except RankDivergenceError as err:
            return str(err)


def all_texts(text: str) -> list[str]:
    """Every rank's text, gathered (through the communicator: the world must still be in step)."""
    raw = np.zeros(512, dtype=np.uint8)
    raw[:len(text.encode()[:512])] = np.frombuffer(text.encode()[:512], dtype=np.uint8)
    rows = WORLD.allgather(raw[None], axis=0)
    return [bytes(r).rstrip(b"\0").decode() for r in rows]


def test_ranks_fed_different_input_ids_under_model_parallelism_all_raise_naming_them():
    ids = IDS.copy()
    if WORLD.rank == LAST:
        ids[1, 2] += 1
    texts = all_texts(first_step(CONFIG.replace(model_parallel=WORLD.size), ids))
    assert len(set(texts)) == 1, texts
    assert texts[0].startswith("ShardedGradProgram (consistency check at call 0): input 0: expected the same data"), \
        texts[0]
    assert f"on rank {LAST}; feed each rank its data from the same source" in texts[0], texts[0]


def test_a_rank_with_another_model_size_names_the_parameter_and_the_world_stays_usable():
    config = CONFIG.replace(model_parallel=WORLD.size)
    if WORLD.rank == LAST:
        config = config.replace(hidden_size=2 * config.hidden_size, num_heads=2 * config.num_heads)
    texts = all_texts(first_step(config, IDS))
    assert len(set(texts)) == 1, texts
    assert texts[0].startswith("ShardedGradProgram (consistency check at compile): model: expected the same "
                               "parameters (names, shapes, dtypes) on every rank, got parameter "), texts[0]
    assert " 32) float32 on rank" in texts[0] and f" 64) float32 on rank {LAST}" in texts[0], texts[0]


def test_a_rank_a_step_ahead_is_named_with_its_step():
    texts = all_texts(first_step(CONFIG.replace(model_parallel=WORLD.size), IDS, step_count=int(WORLD.rank == LAST)))
    assert len(set(texts)) == 1, texts
    assert "step counter: expected the same step on every rank, got 0 on " in texts[0], texts[0]
    assert f"1 on rank {LAST}; every rank must run the same steps" in texts[0], texts[0]


def test_facts_agree_only_within_their_groups():
    """Group = this rank's parity: ranks 0 and 2 compare, 1 and 3 compare, never across."""
    agree(WORLD, [Fact("parity", WORLD.rank % 2, "-", "-", group=WORLD.rank % 2)], "test")
    facts = [Fact("rank", WORLD.rank, "the same on every rank", "none", literal=True)]
    with pytest.raises(RankDivergenceError, match=r"^test: rank: expected the same on every rank, got 0 on rank 0, "
                                                  r"1 on rank 1"):
        agree(WORLD, facts, "test")

"""ZeRO-3 weight prefetch under real MPI (part of the tests/mpi suite, ``mpiexec -n 2``, run
by tests/test_comm_mpi_launch.py): ``iallgather`` equals ``allgather`` bit for bit, and
PanGu-α tiny at ``level3`` dp2 trains the same with each weight's all-gather started a
layer ahead (``MPI_Iallgather``, progressed, waited before use) as with the blocking
gathers, and like serial; skipped when not under mpiexec.

Every rank runs every test in the same order (the collectives must match)."""
import numpy as np
import pytest

from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.prefetch import GatherStart
from autopar.train import AdamWeightDecay

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(3)]


def test_iallgather_equals_allgather():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * WORLD.rank     # rank-valued: a misplaced block shows
    request = WORLD.iallgather(x, axis=1)
    request.test()
    want = WORLD.allgather(x, axis=1)
    got = request.wait()
    assert got.shape == (3, 8)
    np.testing.assert_array_equal(got, want)


def trainer(cfg):
    net = PanguAlphaWithLoss(cfg)
    return nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.01), clip_norm=0.5)


def train(ahead: int | None) -> tuple[list[float], dict, int]:
    """Three steps: serially (``ahead`` None) or at level3 on dp2 with ``prefetch_layers``
    ``ahead``; the losses, the weights and the prefetched gathers of the program."""
    if ahead is None:
        step = trainer(CONFIG)
        losses = [float(step(b)) for b in BATCHES]
        return losses, {p.name: p.asnumpy() for p in step.network.trainable_params()}, 0
    config = {"optimizer_level": "level3", "parallel_optimizer_threshold": 0, "prefetch_layers": ahead}
    mine = [np.split(b, 2)[WORLD.rank] for b in BATCHES]
    with bound_world(WORLD), parallel_context(parallel_mode="data_parallel", device_num=2,
                                              enable_parallel_optimizer=True, parallel_optimizer_config=config):
        step = trainer(CONFIG.replace(data_parallel=2))
        losses = [float(step(b)) for b in mine]
        starts = sum(isinstance(n.prim, GatherStart) for n in step.build(mine[0]).local_graph.nodes)
        return losses, {p.name: p.asnumpy() for p in step.network.trainable_params()}, starts


def test_level3_dp2_prefetched_equals_blocking_and_serial():
    (serial, want, _), (off, blocking, none), (on, weights, starts) = train(None), train(0), train(1)
    assert none == 0 and starts == 79           # every weight gather of tiny (53 forward, 26 backward) prefetched
    assert on == off                            # the same Allgather bits, issued earlier
    for name, w in weights.items():
        np.testing.assert_array_equal(w, blocking[name], err_msg=name)
        np.testing.assert_allclose(w, want[name], rtol=1e-5, atol=5e-5, err_msg=name)
    np.testing.assert_allclose(on, serial, rtol=1e-5)

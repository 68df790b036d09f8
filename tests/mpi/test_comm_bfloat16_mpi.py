"""bfloat16 collectives, and a bfloat16 PanGu-α split over ranks, under real MPI give the
in-process backend's bits.

MPI has no bfloat16 datatype: moved data travels as uint16 (bit for bit, NaN payloads
included) and sums are float32 sums rounded once, which is exactly what the in-process
backend computes. Every rank makes the calls of tests/test_comm_bfloat16.py through MPI, runs
the same calls on in-process ranks (threads of this process), and compares. Run by
tests/test_comm_mpi_launch.py as ``mpiexec -n 2 ... tests/mpi``; skipped when not under mpiexec.
On more than 2 ranks MPI adds in its own order (as for float32), so there the sums are
checked against the exact sum instead of bit for bit.
"""
import os
import sys

import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import CommChecks, CommStats, run_in_process, world
from autopar.comm.mpi import MPICommunicator
from autopar.context import bound_world, parallel_context
from autopar.dtype import bfloat16
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the shared calls
from test_comm_bfloat16 import bfloat16_results, values

REDUCED = ("allreduce sum", "reduce_scatter")


def blocking_world():
    """The world without the watchdog: the blocking MPI calls instead of the polled I-calls."""
    return MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks(watchdog_s=None))


@pytest.mark.parametrize("make", [lambda: WORLD, blocking_world], ids=["watchdog", "blocking"])
def test_bfloat16_collectives_equal_in_process_bit_for_bit(make):
    comm = make()
    got = bfloat16_results(comm)
    want = run_in_process(comm.size, bfloat16_results)[comm.rank]
    assert sorted(got) == sorted(want)
    for what, expect in want.items():
        assert got[what].dtype == bfloat16 and got[what].shape == expect.shape, what
        if what in REDUCED and comm.size > 2:
            summed = [values(r, (2 * comm.size, 5)).astype(np.float64) for r in comm.ranks]
            exact, scale = np.sum(summed, axis=0), np.sum(np.abs(summed), axis=0)
            if what == "reduce_scatter":
                exact, scale = np.split(exact, comm.size)[comm.rank], np.split(scale, comm.size)[comm.rank]
            assert np.all(np.abs(got[what].astype(np.float64) - exact) <= 2 ** -8 * scale), what
            continue
        np.testing.assert_array_equal(got[what].view(np.uint16), expect.view(np.uint16), err_msg=what)


# ---- a bfloat16 PanGu-α under MPI: the in-process run's bits --------------------------------

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, compute_dtype="bfloat16", init_std=0.2)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
PLANS = {2: [(2, 1), (1, 2)]}   # (pipeline stages, model parallel); 2 ranks: a sum of two has one order


def loss_and_grads(comm, stages: int, mp: int):
    """Loss and gradients of a bfloat16 PanGu-α, its layers on ``stages`` stages, mp-way split."""
    with bound_world(comm):
        net = PanguAlphaWithLoss(CONFIG.replace(model_parallel=mp))
        if stages == 1:
            return autopar.value_and_grad(net)(IDS)
        nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], None, stages)
        return autopar.value_and_grad(nn.PipelineCell(net, 2, "1f1b"), net.trainable_params())(IDS)


@pytest.mark.parametrize("stages, mp", PLANS.get(WORLD.size, []))
def test_a_bfloat16_model_gives_the_in_process_bits(stages, mp):
    """Every activation, gradient and sum that crosses ranks is bfloat16 (sends and receives
    between stages, all-reduces inside a stage): MPI and the in-process backend agree bit
    for bit on the loss and every gradient."""
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=WORLD.size, pipeline_stages=stages,
                          full_batch=True):
        want_loss, want = run_in_process(WORLD.size, loss_and_grads, stages, mp)[WORLD.rank]
        loss, grads = loss_and_grads(WORLD, stages, mp)
    assert np.asarray(loss).tobytes() == np.asarray(want_loss).tobytes()
    assert sorted(grads) == sorted(want)
    for name, g in want.items():
        assert grads[name].dtype == g.dtype and grads[name].tobytes() == g.tobytes(), name

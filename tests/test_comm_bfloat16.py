"""bfloat16 collectives (in-process backend): data moves bit for bit, sums are float32 sums
rounded to bfloat16 once, and bfloat16 PanGu-α runs under model parallel and pipelines.

``bfloat16_results(comm)`` makes one fixed set of bfloat16 calls and returns what came back;
tests/mpi/test_comm_bfloat16_mpi.py runs it under real MPI and asserts the same bits as here.
Inputs are random bit patterns (NaN payloads, infinities, -0 and subnormals included) for
moves, and random finite values of mixed magnitude for reductions.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.dtype import bfloat16, float32
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss

NS = (1, 2, 3, 4)
SPECIAL = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFF81, 0x7F81, 0x0001, 0x807F], np.uint16)
#                    +0      -0      +inf    -inf    qNaN/payload, sNaN   subnormals


def bits(world_rank: int, shape) -> np.ndarray:
    """Arbitrary bfloat16 bit patterns, different on every rank, the specials first."""
    raw = np.random.default_rng(world_rank).integers(0, 2**16, shape, dtype=np.uint16).reshape(-1)
    raw[:SPECIAL.size] = SPECIAL[:raw.size]
    return raw.reshape(shape).view(bfloat16)


def values(world_rank: int, shape) -> np.ndarray:
    """Finite bfloat16 values of mixed sign and magnitude (2^-8 .. 2^8), different per rank."""
    rng = np.random.default_rng(1000 + world_rank)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-8, 9, shape))
    return x.astype(float32).astype(bfloat16)


def float32_sum_rounded_once(xs) -> np.ndarray:
    """The reference bfloat16 sum: widen, add in member order, round once."""
    acc = xs[0].astype(float32)
    for x in xs[1:]:
        acc = acc + x.astype(float32)
    return acc.astype(bfloat16)


def bfloat16_results(comm) -> dict[str, np.ndarray]:
    """Every collective on bfloat16 buffers, keyed by call; the same calls on every member."""
    n, i, me = comm.size, comm.rank, comm.ranks[comm.rank]
    moved, summed = bits(me, (2 * n, 3)), values(me, (2 * n, 5))
    out = {"allgather": comm.allgather(moved, axis=1),
           "alltoall": comm.alltoall(moved, 0, 1),
           "broadcast": comm.broadcast(moved, root=n - 1),
           "allreduce sum": comm.allreduce(summed, "sum"),
           "allreduce max": comm.allreduce(summed, "max"),
           "allreduce min": comm.allreduce(summed, "min"),
           "reduce_scatter": comm.reduce_scatter(summed, axis=0)}
    if n > 1:   # a ring, even members sending first
        if i % 2 == 0:
            comm.send(moved, (i + 1) % n, tag=3)
            out["recv"] = comm.recv(moved.shape, bfloat16, (i - 1) % n, tag=3)
        else:
            out["recv"] = comm.recv(moved.shape, bfloat16, (i - 1) % n, tag=3)
            comm.send(moved, (i + 1) % n, tag=3)
    return out


def assert_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == bfloat16 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=what)


@pytest.mark.parametrize("n", NS)
def test_bfloat16_collectives_equal_their_references_bit_for_bit(n):
    results = run_in_process(n, bfloat16_results)
    moved = [bits(r, (2 * n, 3)) for r in range(n)]
    summed = [values(r, (2 * n, 5)) for r in range(n)]
    total = float32_sum_rounded_once(summed)
    for i, got in enumerate(results):
        assert_bits(got["allgather"], np.concatenate(moved, axis=1), f"allgather on rank {i}")
        assert_bits(got["alltoall"], np.concatenate([m[2 * i:2 * i + 2] for m in moved], axis=1), "alltoall")
        assert_bits(got["broadcast"], moved[n - 1], f"broadcast on rank {i}")
        assert_bits(got["allreduce sum"], total, f"allreduce sum on rank {i}")
        assert_bits(got["allreduce max"], np.max(np.stack(summed), axis=0), "allreduce max")
        assert_bits(got["allreduce min"], np.min(np.stack(summed), axis=0), "allreduce min")
        assert_bits(got["reduce_scatter"], total[2 * i:2 * i + 2], f"reduce_scatter on rank {i}")
        if n > 1:
            assert_bits(got["recv"], moved[(i - 1) % n], f"recv on rank {i}")


def test_bfloat16_sum_rounds_once_not_at_every_member():
    """256 + 1 + 1: bfloat16 holds 256 and 258 but not 257, so adding member by member in
    bfloat16 stays at 256; the float32 sum is 258, exact in bfloat16."""
    def body(comm):
        x = np.full(3, 256.0 if comm.rank == 0 else 1.0, float32).astype(bfloat16)
        return comm.allreduce(x), comm.reduce_scatter(x)
    for total, block in run_in_process(3, body):
        assert total.dtype == bfloat16 and block.dtype == bfloat16
        np.testing.assert_array_equal(total.astype(float32), [258.0] * 3)
        np.testing.assert_array_equal(block.astype(float32), [258.0])
    stepwise = np.array(256.0, float32).astype(bfloat16)
    for _ in range(2):
        stepwise = stepwise + np.array(1.0, float32).astype(bfloat16)
    assert stepwise.dtype == bfloat16 and float(stepwise) == 256.0   # what summing in bfloat16 gives


def test_bfloat16_stats_count_bfloat16_bytes():
    """The cost model prices bfloat16 traffic at 2 bytes an element: the widened float32 copy
    a reduction makes is the backend's business, not the collective's size."""
    def body(comm):
        x = values(comm.rank, (4, 6))
        comm.allreduce(x)
        comm.reduce_scatter(x, axis=0)
        comm.allgather(x)
        return comm.stats.snapshot()["bytes"], [str(r) for r in comm.stats.log]
    for nbytes, log in run_in_process(2, body):
        assert nbytes == {"allreduce": 48, "reduce_scatter": 48, "allgather": 48}
        assert log[0] == "allreduce[0, 1] (4, 6) bfloat16"


def test_other_void_dtypes_are_still_refused_with_the_dtype_named():
    """float8 (another ml_dtypes type of kind 'V') has no MPI datatype and no reduction rule here."""
    x = np.zeros(4, ml_dtypes.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"allgather \(rank 0 of \[0, 1\]\): x: expected a numeric, bool or "
                                        r"bfloat16 array .*got dtype float8_e4m3fn"):
        run_in_process(2, lambda c: c.allgather(x))
    with pytest.raises(TypeError, match=r"allreduce.*dtype bool"):
        run_in_process(2, lambda c: c.allreduce(np.ones(2, bool)))


# ---- bfloat16 PanGu-α under model parallel and pipelines ------------------------------------

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, compute_dtype="bfloat16", init_std=0.2)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss
EPS = float(ml_dtypes.finfo(bfloat16).eps)   # numpy's finfo knows bfloat16 only with ml_dtypes >= 0.7


def pipeline_loss_and_grads(comm, dp: int, mp: int):
    with bound_world(comm):
        net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=dp, model_parallel=mp))
        nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], None, 2)
        cell = nn.PipelineCell(net, 2, "1f1b")
        return autopar.value_and_grad(cell, net.trainable_params())(IDS)


@pytest.mark.parametrize("dp, mp", [(1, 1), (1, 2)])
def test_bfloat16_pipeline_tracks_serial(dp, mp):
    """Two stages (sends and receives of bfloat16 activations and their gradients), and with
    mp2 the all-reduces inside each stage: loss within 1 eps, gradients within 2 eps (relative
    L2) of serial bfloat16, the tolerances of test_mixed_precision's sharded test. pp2 alone
    only moves data, so its loss is the serial loss exactly."""
    want_loss, want = autopar.value_and_grad(PanguAlphaWithLoss(CONFIG))(IDS)
    n = 2 * dp * mp
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, pipeline_stages=2, full_batch=True):
        results = run_in_process(n, pipeline_loss_and_grads, dp, mp)
    for loss, grads in results:
        if mp == 1:
            assert float(loss) == float(want_loss)
        assert abs(float(loss) - float(want_loss)) <= EPS * float(want_loss)
        diff = np.sqrt(sum(np.sum((grads[k] - g).astype(np.float64) ** 2) for k, g in want.items()))
        total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in want.values()))
        assert diff <= 2 * EPS * total, (diff / total) / EPS

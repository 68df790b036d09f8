"""NCCL's non-blocking collectives on a collective stream, and the NCCL watchdog (issue 17).

``iallreduce`` and ``ireduce_scatter`` over the NCCL communicator (comm/nccl_streams.py) give
the MPI backend's bits (float32, bfloat16, float64; device arrays, and host arrays staged),
through one NCCL call queued on the communicator's collective stream, not the compute
stream; while that stream is held (the fake's stream waits for an event the test reaches)
the request's ``test()`` is False and the host is free, after it True; the request holds its
buffers until the wait (memory freed and reused meanwhile does not change the sum); a
blocking collective issued while a non-blocking one is held runs after it, as NCCL orders one
communicator's calls. Gradient buckets (comm_fusion, all-reduce and reduce-scatter) of a
dp2 PanGu-α over NCCL equal the serial run, their calls on collective streams. The watchdog:
a member that skips a collective makes the other's wait raise TimeoutError within the
deadline naming the collective, the rank and the group, and the NCCL communicator is
aborted and refuses later calls; ``barrier`` is bounded the same way; NCCL's asynchronous
error aborts and raises at once, naming it.

On 2 GPUs with CuPy and NCCL this runs the real thing (the tests that hold a stream, inject
an error or need a late member stay on the fake):

    NCCL_NVLS_ENABLE=0 mpiexec -n 2 python -m pytest -q tests/mpi/test_nccl_overlap_mpi.py

elsewhere the stand-in device and fake NCCL of tests/mpi/fake_nccl.py.
"""
import gc
import threading
import time

import numpy as np
import pytest

from autopar.comm import world

if world().size != 2:   # before test_nccl_mpi imports mpi4py (see there)
    pytest.skip("run under mpiexec -n 2", allow_module_level=True)

from steps import assert_like_serial, serial_run, train  # noqa: E402
from test_nccl_mpi import DEVICE, REAL, WORLD, bits, streamed_device, values  # noqa: E402
from test_nccl_pangu_mpi import ATOL, CONFIG, EVERY, IDS, RTOL  # noqa: E402

import autopar  # noqa: E402
from autopar.backend import to_host  # noqa: E402
from autopar.comm import CommChecks, CommStats  # noqa: E402
from autopar.comm.mpi import MPICommunicator  # noqa: E402
from autopar.comm.nccl import nccl_world  # noqa: E402
from autopar.context import bound_world, parallel_context  # noqa: E402
from autopar.dtype import bfloat16  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaWithLoss  # noqa: E402

pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
DEADLOCK_S = 8.0          # the fake's longest wait: a deadlock fails the test after this
FAKE_ONLY = pytest.mark.skipif(REAL, reason="holds a stream / injects an error: the fake's")
F32 = np.float32


@pytest.fixture(scope="module")
def xp():
    """CuPy on real GPUs, else the stand-in with 2 fake GPUs (its stream threads call MPI)."""
    yield from streamed_device(DEADLOCK_S)


@pytest.fixture(scope="module")
def comm(xp):
    return nccl_world(WORLD)


def watched(seconds: float):
    """A new NCCL communicator of the world with the watchdog at ``seconds`` (collective)."""
    return nccl_world(MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks(watchdog_s=seconds)))


def streams(xp, since: int) -> list:
    """(call, stream handle) of the NCCL calls the fake logged since ``since`` ([] on GPUs)."""
    return [] if REAL else xp.cuda.nccl.on_stream[since:]


def logged(xp) -> int:
    return 0 if REAL else len(xp.cuda.nccl.on_stream)


CASES = {   # name -> (start the call, shape, dtype, the NCCL call)
    "iallreduce float32": (lambda c, x: c.iallreduce(x), (3, 4), F32, "allReduce"),
    "iallreduce bfloat16": (lambda c, x: c.iallreduce(x), (4, 8), bfloat16, "allReduce"),
    "iallreduce float64 max": (lambda c, x: c.iallreduce(x, op="max"), (5,), np.float64, "allReduce"),
    "ireduce_scatter axis 0 float32": (lambda c, x: c.ireduce_scatter(x, axis=0), (4, 3), F32, "reduceScatter"),
    "ireduce_scatter axis 1 bfloat16": (lambda c, x: c.ireduce_scatter(x, axis=1), (3, 8), bfloat16,
                                        "reduceScatter"),
    "ireduce_scatter axis 1 float64": (lambda c, x: c.ireduce_scatter(x, axis=1), (2, 6), np.float64,
                                       "reduceScatter"),
}


@pytest.mark.parametrize("name", CASES, ids=lambda n: f"{DEVICE}-{n}")
def test_nonblocking_collectives_equal_the_mpi_backend_on_the_collective_stream(xp, comm, name):
    """Device in, device out, with the MPI backend's bits, through one NCCL call queued on the
    communicator's collective stream (not the compute stream, handle 0)."""
    start, shape, dtype, call = CASES[name]
    x = values(comm.rank, shape, dtype)
    want = start(WORLD, x).wait()
    before = logged(xp)
    got = start(comm, xp.asarray(x)).wait()
    assert type(got) is xp.ndarray, f"{name}: the result left the device ({type(got).__name__})"
    host = to_host(got)
    assert host.dtype == want.dtype and host.shape == want.shape, (host.dtype, host.shape, want.dtype, want.shape)
    np.testing.assert_array_equal(bits(host), bits(want), err_msg=name)
    if not REAL:
        side = comm.collective_stream.ptr
        assert side != 0 and streams(xp, before) == [(call, side)], (side, streams(xp, before))


@pytest.mark.parametrize("device", [DEVICE])
def test_a_host_array_is_staged_numpy_in_numpy_out(xp, comm, device):
    x = values(comm.rank, (4, 2), bfloat16)
    for start in (lambda c: c.iallreduce(x), lambda c: c.ireduce_scatter(x, axis=0)):
        got, want = start(comm).wait(), start(WORLD).wait()
        assert type(got) is np.ndarray and got.dtype == bfloat16
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("device", [DEVICE])
def test_without_the_watchdog_the_same_calls_give_the_same_bits(xp, device):
    """Watchdog off (CommChecks()): nothing polled, no events tracked; the same results."""
    off = nccl_world(MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks()))
    assert off.checks.watchdog_s is None
    x = values(off.rank, (4, 6), bfloat16)
    got = [off.iallreduce(xp.asarray(x)), off.ireduce_scatter(xp.asarray(x), axis=1)]
    blocking = off.allreduce(x)                                  # a host array, staged
    off.barrier()
    want = [WORLD.iallreduce(x).wait(), WORLD.ireduce_scatter(x, axis=1).wait()]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(bits(to_host(g.wait())), bits(w))
    np.testing.assert_array_equal(bits(blocking), bits(WORLD.allreduce(x)))


@FAKE_ONLY
def test_a_request_is_unfinished_while_the_collective_stream_is_held(xp, comm):
    """Both members hold their collective stream (it waits for an event the test reaches):
    iallreduce returns at once, test() stays False, and after the gate opens the request
    completes with the sum."""
    x = values(comm.rank, (4, 8), F32)
    gate = xp.cuda.gate()
    comm.collective_stream.wait_event(gate)
    request = comm.iallreduce(xp.asarray(x))            # returned: the host is free while it waits
    time.sleep(0.3)
    assert request.test() is False
    gate.open()
    got = request.wait()
    assert request.test() is True
    np.testing.assert_array_equal(to_host(got), WORLD.allreduce(x))


COPIES = {   # name -> (start the call, what makes the only copy the NCCL call reads)
    "iallreduce bfloat16": (lambda c, x: c.iallreduce(x), bfloat16),                 # widened to float32
    "ireduce_scatter axis 1": (lambda c, x: c.ireduce_scatter(x, axis=1), F32),      # axis 1 moved to the front
}


@FAKE_ONLY
@pytest.mark.parametrize("name", COPIES)
def test_the_request_holds_its_buffers_until_the_wait(xp, comm, name):
    """The copy the NCCL call reads (bfloat16 widened; an axis moved to the front) has no
    owner but the request: while the stream is held, memory freed and allocated again
    (numpy hands freed small blocks back from its cache, here filled with 9s) does not change
    what the call reads. (Checked: with the request not holding its buffers, both fail.)"""
    start, dtype = COPIES[name]
    shape = (4, 8)                                       # 128 bytes as float32
    gate = xp.cuda.gate()
    comm.collective_stream.wait_event(gate)
    request = start(comm, xp.asarray(values(comm.rank, shape, dtype)))
    gc.collect()
    junk = [np.full(shape, 9, np.float32) for _ in range(64)]    # every cached 128-byte block, filled
    gate.open()
    got = to_host(request.wait())
    want = start(WORLD, values(comm.rank, shape, dtype)).wait()
    np.testing.assert_array_equal(bits(got), bits(want))
    assert len(junk) == 64


@FAKE_ONLY
def test_a_blocking_collective_issued_after_a_held_one_runs_after_it(xp, comm):
    """Member 0's collective stream is held for 0.3 s (a timer opens it); its blocking
    allreduce of b, issued after iallreduce(a), still pairs with member 1's b: one
    communicator's calls run in issue order, whatever their streams (NCCL's rule; the
    fake's host waits for the held call, as NCCL makes the compute stream wait)."""
    a, b = values(comm.rank, (6,), F32), values(comm.rank + 5, (6,), F32)
    if comm.rank == 0:
        gate = xp.cuda.gate()
        comm.collective_stream.wait_event(gate)
        threading.Timer(0.3, gate.open).start()
    first = comm.iallreduce(xp.asarray(a))
    second = comm.allreduce(xp.asarray(b))
    np.testing.assert_array_equal(to_host(first.wait()), WORLD.allreduce(a))
    np.testing.assert_array_equal(to_host(second), WORLD.allreduce(b))


# ---- gradient buckets: PanGu-α dp2 over NCCL with comm_fusion ------------------------------

@pytest.fixture(scope="module")
def gpu(comm):
    """The GPU target (CPU restored after) and the serial CPU run."""
    serial = serial_run(lambda: PanguAlphaWithLoss(CONFIG), IDS)
    autopar.set_context(device_target="GPU")
    yield serial
    autopar.set_context(device_target="CPU")


FUSED = {   # name -> (extra parallel context, the bucketed NCCL call)
    "all-reduce buckets": ({"comm_fusion": EVERY}, "allReduce"),
    "reduce-scatter buckets": ({"comm_fusion": EVERY, "enable_parallel_optimizer": True,
                                "parallel_optimizer_threshold": 0}, "reduceScatter"),
}


@pytest.mark.parametrize("name", FUSED, ids=lambda n: f"{DEVICE}-{n}")
def test_gradient_buckets_over_nccl_equal_serial_on_collective_streams(xp, comm, gpu, name):
    extra, call = FUSED[name]
    ids = np.split(IDS, 2)[comm.rank]
    before = logged(xp)
    with bound_world(comm), parallel_context(parallel_mode="data_parallel", device_num=2, **extra):
        got = autopar.value_and_grad(PanguAlphaWithLoss(CONFIG).set_train(True))(ids)
        net = PanguAlphaWithLoss(CONFIG)
        assert_like_serial(got + (train(net, net, ids),), gpu, RTOL, ATOL)
    if not REAL:
        side = [c for c, stream in streams(xp, before) if stream != 0]
        assert side.count(call) >= 4, f"the buckets' {call}s on collective streams: {side}"


# ---- the watchdog ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", [DEVICE])
def test_a_member_that_skips_a_collective_times_out_the_other_naming_it(xp, device):
    """With the watchdog at 1 s, member 1 skips allreduces #2 and #3: member 0's wait for #3
    raises TimeoutError after about 1 s naming #2 (NCCL runs the calls in issue order: the
    oldest one not done is the culprit), its rank and the group, and aborts the NCCL
    communicator, which refuses the wait for #2 and any later call. (On the fake member 1
    then joins both late, so the fake's MPI collectives complete; real NCCL's abort ends
    member 0's kernels.)"""
    short = watched(1.0)
    x = xp.asarray(values(short.rank, (6,), F32))
    short.iallreduce(x).wait()                                   # allreduce #1: both
    WORLD.barrier()
    if short.rank == 0:
        first, second = short.iallreduce(x), short.iallreduce(x)    # #2, #3: member 1 skips them
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=r"NCCLCommunicator\.iallreduce \(rank 0 of \[0, 1\]\): collective: "
                                               r"expected allreduce #2 on group \(0, 1\) done within the watchdog's "
                                               r"1 s \(AUTOPAR_COMM_WATCHDOG\), got not done after 1\.\d s: a member "
                                               r"has not joined it.*every rank reaches the same collective "
                                               r"\(AUTOPAR_COMM_DEBUG=1 names the diverging one\)"):
            second.wait()
        assert 1.0 <= time.monotonic() - began < 2.5
        for call in (first.wait, lambda: short.allreduce(x)):
            with pytest.raises(RuntimeError, match=r"\(rank 0 of \[0, 1\]\): NCCL communicator: expected one still "
                                                   r"usable, got one aborted by the watchdog \(allreduce #2"):
                call()
        if not REAL:
            assert xp.cuda.nccl.aborted[-1] == [0, 1]
    WORLD.barrier()
    if not REAL:                                                 # the late member: the fake's collectives end
        if short.rank == 1:
            short.iallreduce(x).wait()
            short.iallreduce(x).wait()
        else:
            short.collective_stream.synchronize()
    WORLD.barrier()


@FAKE_ONLY
def test_barrier_waits_for_the_collective_stream_bounded_by_the_watchdog(xp):
    """Both members' collective streams are held: barrier does not return before the
    iallreduce queued there is done -- after 1 s it raises TimeoutError naming it."""
    short = watched(1.0)
    gate = xp.cuda.gate()
    short.collective_stream.wait_event(gate)
    request = short.iallreduce(xp.asarray(values(short.rank, (6,), F32)))
    with pytest.raises(TimeoutError, match=rf"barrier \(rank {short.rank} of \[0, 1\]\): collective: expected "
                                           r"allreduce #1 on group \(0, 1\) done within the watchdog's 1 s"):
        short.barrier()
    gate.open()
    short.collective_stream.synchronize()
    assert request.test() is True
    WORLD.barrier()


@FAKE_ONLY
def test_an_asynchronous_nccl_error_aborts_and_raises_naming_it(xp):
    """NCCL reports an asynchronous error on member 0 while its call waits: the wait raises
    at once (well before the 5 s deadline) naming NCCL's error and the collective."""
    short = watched(5.0)
    gate = xp.cuda.gate()
    short.collective_stream.wait_event(gate)
    request = short.iallreduce(xp.asarray(values(short.rank, (6,), F32)))
    if short.rank == 0:
        short.nccl_comm.async_error = "NCCL_ERROR_REMOTE_ERROR: remote process exited or there was a network error"
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=r"iallreduce \(rank 0 of \[0, 1\]\): collective: expected allreduce #1 "
                                               r"on group \(0, 1\) done .* got NCCL reported an asynchronous error: "
                                               r"NCCL_ERROR_REMOTE_ERROR"):
            request.wait()
        assert time.monotonic() - began < 1.0
        assert xp.cuda.nccl.aborted[-1] == [0, 1]
    WORLD.barrier()
    gate.open()
    if short.rank == 1:
        request.wait()
    short.collective_stream.synchronize()
    WORLD.barrier()

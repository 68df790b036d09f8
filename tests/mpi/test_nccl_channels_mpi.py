"""NCCL messages on channels of their own (autopar/comm/nccl_channels.py) on 2 ranks (issue 17).

Every message -- float32, bfloat16, bool, 0-d, a transposed view, a strided slice, an empty
array, both directions, blocking and not -- arrives as a device array with the bits the MPI
backend delivers for the same values on the host, through one NCCL send and one NCCL
receive of its bytes. Messages match by tag as MPI's do (a receive posted first for tag 6
is not taken by an earlier-sent tag-5 message). The 1F1B pattern of comm/nccl.py's
"Messages" -- stage 0 posts its receive of g0 before it sends x1, stage 1 posts both
receives before it sends g0 -- completes, while the same messages queued on the compute
stream deadlock (the fake models it: a stream is a thread, a receive on the compute stream
blocks the host; a wait past the fake's timeout raises instead of hanging), and so do
channels made in either order by the two members. A receive whose sender never comes
raises TimeoutError after the watchdog's seconds, naming the member and tag; in debug mode
a receive of another size than the send raises on both members; an MPI without
MPI_THREAD_MULTIPLE is refused at the first message.

On 2 GPUs with CuPy and NCCL this runs the real thing (the deadlock control and the
thread-level test stay on the fake):

    NCCL_NVLS_ENABLE=0 mpiexec -n 2 python -m pytest -q tests/mpi/test_nccl_channels_mpi.py

elsewhere the stand-in device and fake NCCL of tests/mpi/fake_nccl.py.
"""
import numpy as np
import pytest

from autopar.comm import world

if world().size != 2:   # before test_nccl_mpi imports mpi4py (see there)
    pytest.skip("run under mpiexec -n 2", allow_module_level=True)

from mpi4py import MPI  # noqa: E402
from test_nccl_mpi import DEVICE, REAL, WORLD, bits, streamed_device, values  # noqa: E402

from autopar.backend import to_host  # noqa: E402
from autopar.comm import CommChecks, CommStats  # noqa: E402
from autopar.comm.mpi import MPICommunicator  # noqa: E402
from autopar.comm.nccl import nccl_world  # noqa: E402
from autopar.dtype import bfloat16  # noqa: E402

pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")
DEADLOCK_S = 8.0        # the fake's longest wait in these tests: a deadlock fails the test after this
BYTES = 1               # the NCCL datatype messages travel as (uint8)


@pytest.fixture(scope="module")
def xp():
    """The device module: CuPy on real GPUs, else the stand-in with 2 fake GPUs; the fake's
    stream threads call MPI, so MPI must run with MPI_THREAD_MULTIPLE."""
    yield from streamed_device(DEADLOCK_S)


@pytest.fixture(scope="module")
def comm(xp):
    return nccl_world(WORLD)


def calls(xp) -> list:
    """The NCCL calls the fake has logged so far (on real GPUs: not logged, [])."""
    return [] if REAL else list(xp.cuda.nccl.calls)


CASES = {   # name -> (shape, dtype, the view sent of the rank-valued array)
    "float32": ((3, 4), np.float32, lambda a: a),
    "bfloat16": ((2, 5), bfloat16, lambda a: a),
    "bool": ((4, 3), np.bool_, lambda a: a),
    "int64 0-d": ((), np.int64, lambda a: a),
    "float64 transposed view": ((4, 6), np.float64, lambda a: a.T),
    "float16 strided slice": ((6, 4), np.float16, lambda a: a[::2, 1:]),
    "empty": ((0, 3), np.float32, lambda a: a),
}


@pytest.mark.parametrize("name", CASES, ids=lambda n: f"{DEVICE}-{n}")
def test_messages_equal_the_mpi_backend_bit_for_bit(xp, comm, name):
    """Member 0 sends (non-blocking) to member 1, then member 1 sends back (blocking): each
    receive is a device array with the MPI backend's bits, through one NCCL send and one
    NCCL receive of the message's bytes (none for an empty message)."""
    shape, dtype, view = CASES[name]
    mine = view(values(comm.rank, shape, dtype))          # what this rank sends
    theirs = view(values(1 - comm.rank, shape, dtype))     # what the other sends
    before = calls(xp)
    if comm.rank == 0:
        comm.isend(xp.asarray(mine), dest=1, tag=3).wait()
        got = comm.recv(theirs.shape, dtype, source=1, tag=4)
        WORLD.send(mine, dest=1, tag=3)
        want = WORLD.recv(theirs.shape, dtype, source=1, tag=4)
    else:
        request = comm.irecv(theirs.shape, dtype, source=0, tag=3)
        got = request.wait()
        comm.send(xp.asarray(mine), dest=0, tag=4)
        want = WORLD.recv(theirs.shape, dtype, source=0, tag=3)
        WORLD.send(mine, dest=0, tag=4)
    assert type(got) is xp.ndarray, f"{name}: the message left the device ({type(got).__name__})"
    host = to_host(got)
    assert host.dtype == want.dtype and host.shape == want.shape, (host.dtype, host.shape, want.dtype, want.shape)
    np.testing.assert_array_equal(bits(host), bits(want), err_msg=name)
    if not REAL:
        made = sorted(c for c in calls(xp)[len(before):])
        assert made == ([] if not mine.nbytes else [("recv", mine.nbytes, BYTES), ("send", mine.nbytes, BYTES)])


@pytest.mark.parametrize("device", [DEVICE])
def test_a_host_array_is_sent_from_the_device_and_counted_as_mpi_counts_it(xp, comm, device):
    x = values(0, (2, 3), np.float32)
    comm.stats.reset()
    if comm.rank == 0:
        comm.send(x, dest=1, tag=8)                        # numpy: copied to the GPU, sent on the channel
    else:
        got = comm.recv((2, 3), np.float32, source=0, tag=8)
        assert type(got) is xp.ndarray
        np.testing.assert_array_equal(to_host(got), x)
    kind = "send" if comm.rank == 0 else "recv"
    assert comm.stats.snapshot() == {"count": {kind: 1}, "bytes": {kind: x.nbytes}}


@pytest.mark.parametrize("device", [DEVICE])
def test_messages_match_by_tag_as_mpi_does(xp, comm, device):
    """Member 1 posts its receive of tag 6 before it receives tag 5; member 0 sends tag 5,
    then two of tag 6 (blocking). One NCCL communicator per direction would pair the tag-6
    receive with the tag-5 message; a channel per tag pairs them as MPI does, and keeps
    the two tag-6 messages in order."""
    a, b, c = (values(k, (3, 4), np.float32) for k in (5, 6, 7))
    if comm.rank == 0:
        for x, tag in ((a, 5), (b, 6), (c, 6)):
            comm.send(xp.asarray(x), dest=1, tag=tag)
        return
    second = comm.irecv((3, 4), np.float32, source=0, tag=6)
    first = comm.recv((3, 4), np.float32, source=0, tag=5)
    third = comm.recv((3, 4), np.float32, source=0, tag=6)
    for got, want in ((first, a), (second.wait(), b), (third, c)):
        np.testing.assert_array_equal(to_host(got), want)


def one_f_one_b(comm, xp):
    """The messages of comm/nccl.py's 1F1B example, posted as the pipeline runner posts them
    (receives early, sends right after the item that makes them); F and B are host-side
    stand-ins: x1 = x0 + 1 (F1), g0 = 2 * x0 (F0, B0). Returns what this rank received."""
    x0 = values(0, (4, 8), np.float32)
    if comm.rank == 0:
        sends = [comm.isend(xp.asarray(x0), dest=1, tag=1)]     # F0 -> x0
        g0 = comm.irecv((4, 8), np.float32, source=1, tag=2)     # posted for clock 2
        sends.append(comm.isend(xp.asarray(x0) + 1, dest=1, tag=1))   # F1 -> x1
        got = [g0.wait()]
    else:
        r0 = comm.irecv((4, 8), np.float32, source=0, tag=1)
        r1 = comm.irecv((4, 8), np.float32, source=0, tag=1)     # posted for clock 1
        got = [r0.wait()]
        sends = [comm.isend(got[0] * 2, dest=0, tag=2)]          # F0, B0 -> g0
        got.append(r1.wait())
    for request in sends:
        request.wait()
    return [to_host(g) for g in got]


@pytest.mark.parametrize("device", [DEVICE])
def test_an_early_posted_receive_does_not_hold_the_sends_behind_it(xp, comm, device):
    """A deadlock here fails after DEADLOCK_S on the fake (TimeoutError) instead of hanging."""
    x0 = values(0, (4, 8), np.float32)
    got = one_f_one_b(comm, xp)
    want = [2 * x0] if comm.rank == 0 else [x0, x0 + 1]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("device", [DEVICE])
def test_channels_made_in_either_order_do_not_wait_for_each_other(xp, comm, device):
    """Both members send first (a halo exchange: 0 -> 1 and 1 -> 0, new channels each), then
    receive, then send again on a third new channel the other receives first. Making a
    channel waits for both members (ncclCommInitRank), so made on the caller's thread the
    two first sends would wait for each other forever (the fake: TimeoutError)."""
    me, other = comm.rank, 1 - comm.rank
    x = values(me, (3, 5), np.float32)
    out = comm.isend(xp.asarray(x), dest=other, tag=21)
    got = comm.recv((3, 5), np.float32, source=other, tag=21)
    out.wait()
    np.testing.assert_array_equal(to_host(got), values(other, (3, 5), np.float32))
    if me == 0:                                             # member 1 receives on tag 22 before it sends on 23
        later = comm.irecv((3, 5), np.float32, source=1, tag=23)
        comm.send(xp.asarray(x), dest=1, tag=22)
        np.testing.assert_array_equal(to_host(later.wait()), values(1, (3, 5), np.float32))
    else:
        first = comm.irecv((3, 5), np.float32, source=0, tag=22)
        comm.send(xp.asarray(x), dest=0, tag=23)
        np.testing.assert_array_equal(to_host(first.wait()), values(0, (3, 5), np.float32))


@pytest.mark.skipif(REAL, reason="on real GPUs this would deadlock: the control runs on the fake")
def test_the_same_messages_on_the_compute_stream_deadlock(xp):
    """The control: with every NCCL call queued on the compute stream (handle 0), stage 0's
    early receive of g0 holds its send of x1, which stage 1 waits for before it sends g0.
    Both stages time out (the fake's compute stream runs on the host) -- what channels avoid."""
    nccl, timeout = xp.cuda.nccl, xp.cuda.timeout_s
    made = np.array(nccl.get_unique_id() if WORLD.rank == 0 else [0] * 128, np.int64)
    uid = tuple(int(b) for b in WORLD.broadcast(made, root=0))
    pair = nccl.NcclCommunicator(2, uid, WORLD.rank)
    x0 = xp.asarray(values(0, (4, 8), np.float32))
    buf, n, compute = xp.empty((4, 8), np.float32), x0.nbytes, 0
    address = lambda a: a.data.ptr  # noqa: E731
    xp.cuda.timeout_s = 2.0
    try:
        with pytest.raises(TimeoutError, match="not matched"):
            if WORLD.rank == 0:
                pair.send(address(x0), n, BYTES, 1, compute)       # x0
                pair.recv(address(buf), n, BYTES, 1, compute)      # g0, posted early: the host stops here
                pair.send(address(x0 + 1), n, BYTES, 1, compute)   # x1, never sent
            else:
                pair.recv(address(buf), n, BYTES, 0, compute)      # x0
                pair.recv(address(buf), n, BYTES, 0, compute)      # x1, posted early: never comes
                pair.send(address(buf), n, BYTES, 0, compute)      # g0, never sent
    finally:
        xp.cuda.timeout_s = timeout
    WORLD.barrier()


@pytest.mark.parametrize("device", [DEVICE])
def test_a_receive_whose_sender_never_comes_times_out_naming_it_then_completes(xp, device):
    """With the watchdog at 1 s, member 0's wait for a tag-9 message member 1 has not sent
    raises TimeoutError naming the member and tag; once member 1 sends, the same request
    gives the message."""
    short = nccl_world(MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks(watchdog_s=1.0)))
    x = values(1, (5,), np.float32)
    if short.rank == 0:
        request = short.irecv((5,), np.float32, source=1, tag=9)
        with pytest.raises(TimeoutError, match=r"irecv \(rank 0 of \[0, 1\]\).*receive from member 1 \(tag 9\)"):
            request.wait()
        WORLD.barrier()
        WORLD.barrier()                                    # member 1 has sent: the receive is done
        np.testing.assert_array_equal(to_host(request.wait()), x)
    else:
        WORLD.barrier()                                    # member 0 has timed out
        short.send(xp.asarray(x), dest=0, tag=9)
        WORLD.barrier()


@pytest.mark.parametrize("device", [DEVICE])
def test_debug_mode_refuses_a_message_of_another_size_on_both_members_naming_them(xp, device):
    """Member 0 sends (2, 3) float32 on tag 31, member 1 receives (3, 3): in debug mode both
    raise, naming the other's world rank and both sizes, and nothing is transferred -- the
    channel stays in step: the next message on it arrives whole."""
    debug = nccl_world(MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks(debug=True)))
    x = values(0, (2, 3), np.float32)
    if debug.rank == 0:
        with pytest.raises(ValueError, match=r"send \(rank 0 of \[0, 1\]\): message: expected 24 bytes "
                                             r"\(\(2, 3\), float32\), the size world rank 1 receives on tag 31, "
                                             r"got 36 bytes \(\(3, 3\), float32\) there; neither was transferred"):
            debug.send(xp.asarray(x), dest=1, tag=31)
        debug.send(xp.asarray(x), dest=1, tag=31)
    else:
        with pytest.raises(ValueError, match=r"recv \(rank 1 of \[0, 1\]\): message: expected 36 bytes "
                                             r"\(\(3, 3\), float32\), the size world rank 0 sends on tag 31, "
                                             r"got 24 bytes"):
            debug.recv((3, 3), np.float32, source=0, tag=31)
        np.testing.assert_array_equal(to_host(debug.recv((2, 3), np.float32, source=0, tag=31)), x)


@pytest.mark.skipif(REAL, reason="sets the thread level the fake's MPI reports")
def test_an_mpi_without_thread_multiple_is_refused_at_the_first_message(xp, comm, monkeypatch):
    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    with pytest.raises(RuntimeError, match=r"send \(rank \d of \[0, 1\]\): MPI thread support: expected "
                                           r"MPI_THREAD_MULTIPLE.*AUTOPAR_COMM=mpi"):
        comm.isend(xp.asarray(values(0, (2,), np.float32)), dest=1 - comm.rank, tag=77)

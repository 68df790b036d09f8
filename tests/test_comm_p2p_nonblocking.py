"""Non-blocking point to point (``isend`` / ``irecv``) on the in-process backend: the blocking
calls' bits, matching by tag and by posting order whatever order the requests are waited in,
and clear errors for mismatched messages. ``p2p_results`` is shared with
tests/mpi/test_comm_p2p_nonblocking_mpi.py, which makes the same calls over MPI."""
import numpy as np
import pytest

from autopar.comm import DeadlockError, SelfCommunicator, run_in_process
from autopar.dtype import bfloat16


def messages() -> dict:
    """What member 0 sends (tag, array), in sending order: two tag-1 messages around a tag-2 one."""
    bf = np.array([1.5, -0.0, np.inf, 3.25, 1e-3, 7.0], np.float32).astype(bfloat16).reshape(2, 3)
    bf.view(np.uint16)[0, 1] = 0x7FC3    # a NaN payload must survive bit for bit
    return {"a": (1, np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
            "b": (2, bf),
            "c": (1, np.array([[-3, 2 ** 40]], dtype=np.int64))}


def p2p_results(comm, nonblocking: bool) -> dict:
    """Member 0 sends ``messages()`` to member 1 and receives one reply (tag 3); member 1
    receives them -- non-blocking: all started first, waited in reverse order -- and replies."""
    sent, reply = messages(), np.linspace(-1, 1, 5).astype(np.float64)
    if comm.rank == 0:
        if not nonblocking:
            for tag, x in sent.values():
                comm.send(x, 1, tag)
            return {"reply": comm.recv(reply.shape, reply.dtype, 1, 3)}
        sends = [comm.isend(x, 1, tag) for tag, x in sent.values()]
        back = comm.irecv(reply.shape, reply.dtype, 1, 3)
        out = {"reply": back.wait()}
        assert all(s.wait() is None for s in reversed(sends))
        return out
    if not nonblocking:
        out = {k: comm.recv(x.shape, x.dtype, 0, tag) for k, (tag, x) in sent.items()}
        comm.send(reply, 0, 3)
        return out
    reqs = {k: comm.irecv(x.shape, x.dtype, 0, tag) for k, (tag, x) in sent.items()}
    answer = comm.isend(reply, 0, 3)
    out = {k: reqs[k].wait() for k in reversed(list(reqs))}
    answer.wait()
    return out


def assert_same_bits(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        np.testing.assert_array_equal(got[k].view(np.uint8), w.view(np.uint8), err_msg=k)


def test_nonblocking_equals_blocking_and_the_sent_bits():
    got = run_in_process(2, p2p_results, True)
    assert_same_bits(got[0], run_in_process(2, p2p_results, False)[0])
    assert_same_bits(got[1], run_in_process(2, p2p_results, False)[1])
    assert_same_bits(got[1], {k: x for k, (_, x) in messages().items()})
    assert got[1]["b"].view(np.uint16)[0, 1] == 0x7FC3


def test_same_tag_matches_in_posting_order_and_tags_apart_whatever_the_wait_order():
    def body(comm):
        if comm.rank == 0:
            reqs = [comm.isend(np.full(2, i, np.int32), 1, 5) for i in range(3)]
            reqs += [comm.isend(np.full(2, 60, np.int32), 1, 6), comm.isend(np.full(2, 70, np.int32), 1, 7)]
            for r in reqs:
                r.wait()
            return None
        seven = comm.irecv(2, np.int32, 0, 7)           # posted before tag 6, sent after it
        fives = [comm.irecv(2, np.int32, 0, 5) for _ in range(3)]
        six = comm.irecv(2, np.int32, 0, 6)
        got = [r.wait()[0] for r in reversed(fives)][::-1]
        return got, int(six.wait()[0]), int(seven.wait()[0])

    assert run_in_process(2, body)[1] == ([0, 1, 2], 60, 70)


def test_blocking_recv_after_an_irecv_gets_the_later_message():
    def body(comm):
        if comm.rank == 0:
            sends = [comm.isend(np.array([x]), 1, 0) for x in (1.0, 2.0)]
            for s in sends:
                s.wait()
            return None
        first = comm.irecv(1, np.float64, 0, 0)
        second = comm.recv(1, np.float64, 0, 0)
        return float(first.wait()[0]), float(second[0])

    assert run_in_process(2, body)[1] == (1.0, 2.0)


def test_test_reports_completion_without_blocking():
    def body(comm):
        if comm.rank == 0:
            comm.barrier()
            send = comm.isend(np.arange(3.0), 1, 4)
            before = send.test()          # the receiver has not waited yet (second barrier)
            comm.barrier()
            send.wait()
            return before, send.test()
        recv = comm.irecv(3, np.float64, 0, 4)
        before = recv.test()              # nothing sent yet (first barrier)
        comm.barrier()
        comm.barrier()
        return before, recv.wait().tolist(), recv.test()

    assert run_in_process(2, body) == [(False, True), (False, [0.0, 1.0, 2.0], True)]


def test_stats_count_nonblocking_calls_as_send_and_recv():
    def body(comm):
        if comm.rank == 0:
            comm.isend(np.zeros((4, 2), np.float32), 1, 1).wait()
        else:
            comm.irecv((4, 2), np.float32, 0, 1).wait()
        return comm.stats.snapshot()

    assert run_in_process(2, body) == [{"count": {"send": 1}, "bytes": {"send": 32}},
                                       {"count": {"recv": 1}, "bytes": {"recv": 32}}]


def test_irecv_of_the_wrong_shape_names_both_and_frees_the_sender():
    def body(comm):
        if comm.rank == 0:
            comm.isend(np.zeros((2, 3), np.float32), 1, 9).wait()
            return "sent"
        with pytest.raises(ValueError, match=r"\(3, 2\), float32.*a message of \(2, 3\), float32 "
                                             r"from member 0 \(tag 9\)"):
            comm.irecv((3, 2), np.float32, 0, 9).wait()
        return "refused"

    assert run_in_process(2, body) == ["sent", "refused"]


def test_a_receive_on_another_tag_is_a_deadlock_naming_both_waits():
    def body(comm):
        if comm.rank == 0:
            comm.isend(np.zeros(2), 1, 1).wait()
        else:
            comm.irecv(2, np.float64, 0, 2).wait()

    with pytest.raises(DeadlockError, match=r"rank 0: waits in send to member 1 \(tag 1\).*"
                                            r"rank 1: waits in recv from member 0 \(tag 2\)"):
        run_in_process(2, body, timeout=20)


def test_bad_arguments_raise_at_the_call():
    comm = SelfCommunicator()
    with pytest.raises(ValueError, match=r"SelfCommunicator.isend .*dest.*not this rank"):
        comm.isend(np.zeros(2), 0)
    with pytest.raises(ValueError, match=r"SelfCommunicator.irecv .*source.*not this rank"):
        comm.irecv(2, np.float32, 0)
    with pytest.raises(ValueError, match=r"irecv .*tag: expected an int in 0..32767, got -1"):
        run_in_process(2, lambda c: c.irecv(2, np.float32, 1 - c.rank, tag=-1))
    with pytest.raises(TypeError, match=r"isend .*x.*dtype object"):
        comm.isend(np.array([None]), 0)

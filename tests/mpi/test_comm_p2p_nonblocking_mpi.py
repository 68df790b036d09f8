"""isend / irecv over real MPI (Isend / Irecv) give the blocking calls' bits and the
in-process backend's, with the watchdog (polled waits) and without (MPI's Wait); messages
of one tag match in posting order whatever the wait order. Run by
tests/test_comm_mpi_launch.py as ``mpiexec -n 2 ... tests/mpi``; skipped when not under mpiexec."""
import os
import sys

import numpy as np
import pytest

from autopar.comm import CommChecks, CommStats, run_in_process, world
from autopar.comm.mpi import MPICommunicator

WORLD = world()
pytestmark = pytest.mark.skipif(WORLD.size == 1, reason="run under mpiexec")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the shared calls
from test_comm_p2p_nonblocking import assert_same_bits, p2p_results


def blocking_world():
    """The world without the watchdog: MPI's own Wait instead of the polled one."""
    return MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks(watchdog_s=None))


def pair(comm):
    """Members 0 and 1 of the world (the rest of a larger job sits out)."""
    return comm.split([[0, 1]] + [[r] for r in range(2, comm.size)])


@pytest.mark.parametrize("make", [lambda: WORLD, blocking_world], ids=["watchdog", "blocking"])
def test_nonblocking_equals_blocking_and_in_process_bit_for_bit(make):
    comm = pair(make())
    if comm.size == 1:
        return
    got = p2p_results(comm, True)
    assert_same_bits(got, p2p_results(comm, False))
    assert_same_bits(got, run_in_process(2, p2p_results, False)[comm.rank])


@pytest.mark.parametrize("make", [lambda: WORLD, blocking_world], ids=["watchdog", "blocking"])
def test_same_tag_matches_in_posting_order_whatever_the_wait_order(make):
    comm = pair(make())
    if comm.size == 1:
        return
    if comm.rank == 0:
        sends = [comm.isend(np.full(3, i, np.int32), 1, 5) for i in range(4)]
        for s in reversed(sends):
            s.wait()
        return
    recvs = [comm.irecv(3, np.int32, 0, 5) for _ in range(4)]
    got = [int(r.wait()[0]) for r in reversed(recvs)][::-1]
    assert got == [0, 1, 2, 3]
    assert all(r.test() for r in recvs)

"""The MPI backend on real processes: the same value checks as the in-process backend.

Run with ``mpiexec -n 4 python -m pytest -q tests/mpi`` (any N > 1). In a plain ``pytest``
run this module skips without importing mpi4py. Every rank runs every test in the same order,
so each test makes the same collective calls on every rank.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from autopar.comm import world
from autopar.comm.mpi import MPICommunicator

COMM = world()
if COMM.size == 1:
    pytest.skip("needs an MPI launch with more than one rank: mpiexec -n 4 python -m pytest tests/mpi",
                allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the shared checks
from test_comm_inprocess import (check_adjoints, check_allgather, check_allreduce, check_alltoall,
                                 check_broadcast, check_p2p, check_reduce_scatter, check_split_grid, check_stats)


def test_world_is_mpi():
    assert isinstance(COMM, MPICommunicator)
    assert COMM.ranks == tuple(range(COMM.size))
    assert COMM.rank == COMM.mpi_comm.Get_rank() and COMM.size == COMM.mpi_comm.Get_size()


def test_allreduce():
    check_allreduce(COMM)


def test_allgather():
    check_allgather(COMM)


def test_reduce_scatter():
    check_reduce_scatter(COMM)


def test_alltoall():
    check_alltoall(COMM)


def test_broadcast():
    check_broadcast(COMM)
    COMM.barrier()


def test_point_to_point_ring():
    check_p2p(COMM)


def test_split_rows_and_columns():
    rows, cols = (COMM.size // 2, 2) if COMM.size % 2 == 0 else (1, COMM.size)
    check_split_grid(COMM, rows, cols)


def test_conjugate_pairs_are_adjoint():
    check_adjoints(COMM)


def test_stats_count_calls_and_bytes():
    check_stats(COMM)


def test_split_with_different_groups_on_different_ranks_raises():
    groups = [COMM.ranks] if COMM.rank == 0 else [COMM.ranks[::-1]]
    with pytest.raises(ValueError, match="the same groups on every member"):
        COMM.split(groups)


def test_recv_of_a_shorter_message_raises():
    if COMM.rank == 0:
        COMM.send(np.arange(2.0), 1, tag=3)
    elif COMM.rank == 1:
        with pytest.raises(ValueError, match=r"recv.*\(4,\), float64 \(32 bytes\).*16 bytes from member 0"):
            COMM.recv((4,), np.float64, 0, tag=3)

"""The MPI backend with the run-time checks on (watchdog and debug mode): every collective
still equals its numpy reference, and ranks that diverge all raise the same report.

Run under mpiexec with any N > 1 (tests/test_comm_mpi_launch.py runs tests/mpi on 2 ranks);
skipped otherwise. Every rank runs every test in the same order.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from autopar.comm import CollectiveMismatchError, CommChecks, world

PLAIN = world(CommChecks())
if PLAIN.size == 1:
    pytest.skip("needs an MPI launch with more than one rank: mpiexec -n 2 python -m pytest tests/mpi",
                allow_module_level=True)
CHECKED = world(CommChecks(watchdog_s=60.0, debug=True))   # collective: the watchdog's Dup

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the shared checks
from test_comm_inprocess import check_adjoints, check_collectives, check_p2p, check_split_grid, check_stats


def test_collectives_equal_the_references_with_the_checks_on():
    check_collectives(CHECKED)
    check_p2p(CHECKED)
    rows, cols = (CHECKED.size // 2, 2) if CHECKED.size % 2 == 0 else (1, CHECKED.size)
    check_split_grid(CHECKED, rows, cols)
    check_adjoints(CHECKED)
    check_stats(CHECKED)


def test_the_checks_reach_split_communicators():
    sub = CHECKED.split([CHECKED.ranks])
    assert sub.checks == CHECKED.checks and PLAIN.split([PLAIN.ranks]).checks == CommChecks()


@pytest.mark.parametrize("case", ["kind", "shape", "root"])
def test_every_rank_raises_on_a_divergent_collective(case):
    x = np.arange(4.0)
    last = CHECKED.size - 1
    with pytest.raises(CollectiveMismatchError, match=r"collective #\d+ on group \(0, 1.*\) \(comm debug mode\)"):
        if case == "kind":
            CHECKED.allgather(x) if CHECKED.rank == last else CHECKED.allreduce(x)
        elif case == "shape":
            CHECKED.allreduce(x[:2] if CHECKED.rank == last else x)
        else:
            CHECKED.broadcast(x, root=last if CHECKED.rank == last else 0)
    # nothing was issued: the communicator is still in step
    total = CHECKED.allreduce(np.full(2, CHECKED.rank + 1.0))
    assert total.tolist() == [CHECKED.size * (CHECKED.size + 1) / 2] * 2

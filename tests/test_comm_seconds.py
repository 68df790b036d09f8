"""CommStats.seconds: the wall time a member spends inside its blocking collectives, waiting for
the others included -- what a step's communication costs a rank, the in-kernel collectives (a
vocabulary-split loss's all-reduces) as well as the redistributions between ops."""
import time

import numpy as np

from autopar.comm import run_in_process

LATE = 0.2    # seconds member 1 arrives late


def test_a_member_that_waits_for_a_late_one_is_charged_the_wait():
    def body(comm):
        if comm.rank == 1:
            time.sleep(LATE)
        comm.allreduce(np.ones(4))
        comm.allgather(np.ones(4))             # back to back: nobody waits long
        return comm.stats.seconds(), comm.stats.snapshot()["count"]
    (early, counts0), (late, _) = run_in_process(2, body)
    assert counts0 == {"allreduce": 1, "allgather": 1} and set(early) == {"allreduce", "allgather"}
    assert early["allreduce"] >= 0.8 * LATE > late["allreduce"]        # member 0 waited for member 1
    assert early["allgather"] < 0.5 * LATE and late["allgather"] < 0.5 * LATE


def test_reset_clears_the_seconds_and_kinds_never_called_are_left_out():
    def body(comm):
        comm.broadcast(np.ones(3), root=0)
        comm.stats.reset()
        comm.allreduce(np.ones(3))
        return comm.stats.seconds()
    for seconds in run_in_process(2, body):
        assert set(seconds) == {"allreduce"} and seconds["allreduce"] >= 0.0

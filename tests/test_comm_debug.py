"""Comm debug mode: before each collective the members compare fingerprints (kind, arguments,
shape, dtype, call site); on the first divergence every member raises CollectiveMismatchError
naming the collective's number and what each rank issued -- instead of a hang or a garbage
result -- and the communicator stays usable. Off, it costs nothing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_comm_inprocess import check_collectives, check_split_grid
from test_comm_mpi_launch import MPIEXEC

import autopar.comm.base
from autopar.comm import CollectiveMismatchError, CommChecks, run_in_process
from autopar.comm.mpi import launched_under_mpi

ROOT = Path(__file__).resolve().parent.parent
DEBUG = CommChecks(debug=True)
X = np.arange(6.0).reshape(2, 3)


def diverge(comm, case):
    """Collective #1 agrees; #2 differs on rank 1 as ``case`` says; #3 agrees again."""
    first = comm.allreduce(np.ones(2))
    try:
        if case == "kind":
            comm.allgather(X) if comm.rank == 1 else comm.allreduce(X)
        elif case == "shape":
            comm.allreduce(X[:, :2] if comm.rank == 1 else X)
        elif case == "dtype":
            comm.allreduce(X.astype(np.float32) if comm.rank == 1 else X)
        elif case == "op":
            comm.allreduce(X, op="max" if comm.rank == 1 else "sum")
        elif case == "root":
            comm.broadcast(X, root=1 if comm.rank == 1 else 0)
        elif case == "site":
            if comm.rank == 1:
                comm.allreduce(X)
            else:
                comm.allreduce(X)
        else:
            raise AssertionError(case)
        message = None
    except CollectiveMismatchError as err:
        message = str(err)
    third = comm.allreduce(np.full(2, comm.rank + 1.0))
    return first.tolist(), message, third.tolist()


LINE = r"test_comm_debug\.py:\d+ in diverge"
CASES = {
    "kind": (rf"ranks 0, 2: allreduce\(op='sum'\) \(2, 3\) float64 at {LINE}; "
             rf"rank 1: allgather\(axis=0\) \(2, 3\) float64 at {LINE}"),
    "shape": r"ranks 0, 2: allreduce\(op='sum'\) \(2, 3\) float64 .*; rank 1: allreduce\(op='sum'\) \(2, 2\) float64",
    "dtype": r"ranks 0, 2: allreduce\(op='sum'\) \(2, 3\) float64 .*; rank 1: allreduce\(op='sum'\) \(2, 3\) float32",
    "op": r"ranks 0, 2: allreduce\(op='sum'\) .*; rank 1: allreduce\(op='max'\)",
    "root": r"ranks 0, 2: broadcast\(root=0\) .*; rank 1: broadcast\(root=1\)",
    "site": r"ranks 0, 2: allreduce\(op='sum'\) \(2, 3\) float64 at test_comm_debug\.py:(\d+) in diverge; "
            r"rank 1: allreduce\(op='sum'\) \(2, 3\) float64 at test_comm_debug\.py:(?!\1)\d+ in diverge",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_reports_the_first_divergence(case):
    results = run_in_process(3, diverge, case, checks=DEBUG)
    messages = {message for _, message, _ in results}
    assert len(messages) == 1, messages   # every rank raised, with the same report
    message = messages.pop()
    assert message.startswith("collective #2 on group (0, 1, 2) (comm debug mode): calls: expected the same "
                              "collective on every member"), message
    assert re.search(CASES[case], message), message
    # the divergent collective was not issued: #1 and #3 are right on every rank
    assert all(first == [3.0, 3.0] and third == [6.0, 6.0] for first, _, third in results), results


def test_a_divergence_on_a_subgroup_names_the_subgroup_and_its_count():
    def body(comm):
        sub = comm.split([(0, 2), (1, 3)])
        sub.allreduce(np.ones(2))
        if sub.ranks == (0, 2):
            sub.allreduce(np.ones(3 if comm.rank == 2 else 2))
        return sub.allgather(np.ones(1))
    with pytest.raises(CollectiveMismatchError, match=r"collective #2 on group \(0, 2\) .*rank 0: allreduce\(op='sum'\) "
                                                      r"\(2,\) float64 .*; rank 2: allreduce\(op='sum'\) \(3,\) float64"):
        run_in_process(4, body, checks=DEBUG)


def test_without_debug_mode_a_divergence_is_left_to_the_backend():
    """Off, no fingerprint: the in-process backend's own comparison reports it instead."""
    with pytest.raises(CollectiveMismatchError, match=r"in-process group \(0, 1, 2\): collective calls"):
        run_in_process(3, lambda comm: comm.allgather(X) if comm.rank == 1 else comm.allreduce(X))


def test_debug_mode_off_computes_no_fingerprint(monkeypatch):
    def forbidden(*args):
        raise AssertionError("a fingerprint was computed with debug mode off")
    monkeypatch.setattr(autopar.comm.base, "fingerprint", forbidden)

    def body(comm):
        check_collectives(comm)
        check_split_grid(comm, 2, 2)
    run_in_process(4, body)
    with pytest.raises(AssertionError, match="debug mode off"):
        run_in_process(2, lambda comm: comm.allreduce(X), checks=DEBUG)


def test_debug_mode_counts_and_logs_only_the_users_calls():
    def body(comm):
        check_collectives(comm)
        comm.barrier()
        return comm.stats.snapshot(), comm.stats.log
    assert run_in_process(3, body, checks=DEBUG) == run_in_process(3, body)


# ---- under mpiexec --------------------------------------------------------------------------

SCRIPT = """
    import os, sys
    import numpy as np
    from autopar.comm import CollectiveMismatchError, world

    comm = world()                     # AUTOPAR_COMM_DEBUG=1 from the environment
    comm.allreduce(np.ones(2))
    try:
        if comm.rank == 1:
            comm.allgather(np.ones(3))   # where the others all-reduce
        else:
            comm.allreduce(np.ones(3))
    except CollectiveMismatchError as err:
        with open(os.path.join(sys.argv[1], str(comm.rank)), "w") as f:
            f.write(str(err))
        raise                            # every rank ends with the error, none hangs
    print("passed a divergent collective", flush=True)
"""


@pytest.mark.skipif(MPIEXEC is None or launched_under_mpi(), reason="needs mpiexec, not under it")
def test_mpi_ranks_that_diverge_all_raise_the_same_report(tmp_path):
    script, out = tmp_path / "diverge.py", tmp_path / "reports"
    script.write_text(textwrap.dedent(SCRIPT))
    out.mkdir()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT), AUTOPAR_COMM_DEBUG="1")
    job = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(script), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert job.returncode != 0 and "passed a divergent collective" not in job.stdout, job.stdout + job.stderr
    reports = {int(f.name): f.read_text() for f in out.iterdir()}
    assert sorted(reports) == [0, 1, 2], (reports, job.stderr)
    assert len(set(reports.values())) == 1, reports
    assert re.fullmatch(r"collective #2 on group \(0, 1, 2\) \(comm debug mode\): calls: .*got ranks 0, 2: "
                        r"allreduce\(op='sum'\) \(3,\) float64 at diverge\.py:\d+ in <module>; rank 1: "
                        r"allgather\(axis=0\) \(3,\) float64 at diverge\.py:\d+ in <module>; make every member .*",
                        reports[0]), reports[0]

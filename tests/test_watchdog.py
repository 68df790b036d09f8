"""The collective watchdog: a rank missing from a collective is named, with the collective's
kind, number and group, within the timeout -- in-process (CollectiveTimeoutError) and under
real mpiexec (a report on stderr, then the job aborts). With the watchdog on, every
collective still equals its numpy reference."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_comm_inprocess import check_collectives, check_p2p, check_split_grid
from test_comm_mpi_launch import MPIEXEC

from autopar.comm import CollectiveTimeoutError, CommChecks, SelfCommunicator, run_in_process, world
from autopar.comm.mpi import launched_under_mpi

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG_S = 2.0


# ---- the CommChecks value -------------------------------------------------------------------

def test_an_mpi_job_is_watched_by_default_and_off_only_when_asked():
    assert CommChecks.from_env({}) == CommChecks(watchdog_s=300.0, debug=False, check_every=100)
    assert CommChecks.from_env({"AUTOPAR_COMM_WATCHDOG": "0"}) == CommChecks() == CommChecks(watchdog_s=None)
    assert SelfCommunicator().checks == CommChecks()
    assert str(CommChecks()) == "CommChecks(watchdog=off, debug=off, consistency=every 100 calls)"
    env = {"AUTOPAR_COMM_WATCHDOG": "2.5", "AUTOPAR_COMM_DEBUG": "1", "AUTOPAR_CHECK_EVERY": "0"}
    assert CommChecks.from_env(env) == CommChecks(watchdog_s=2.5, debug=True, check_every=0)
    assert CommChecks.from_env(env).check_interval == 1   # debug mode checks every call
    assert CommChecks(check_every=0).check_interval == 0 and CommChecks(check_every=7).check_interval == 7


@pytest.mark.parametrize("env, match", [
    ({"AUTOPAR_COMM_WATCHDOG": "soon"}, r"AUTOPAR_COMM_WATCHDOG: expected a number of seconds.*got 'soon'"),
    ({"AUTOPAR_COMM_WATCHDOG": "-3"}, r"AUTOPAR_COMM_WATCHDOG: expected a number of seconds.*got '-3'"),
    ({"AUTOPAR_COMM_WATCHDOG": "inf"}, "AUTOPAR_COMM_WATCHDOG"),
    ({"AUTOPAR_COMM_DEBUG": "yes"}, r"AUTOPAR_COMM_DEBUG: expected '1' \(on\) or '0' \(off\), got 'yes'"),
    ({"AUTOPAR_CHECK_EVERY": "2.5"}, r"AUTOPAR_CHECK_EVERY: expected a whole number of calls \(0: off\), got '2.5'"),
    ({"AUTOPAR_CHECK_EVERY": "-1"}, r"AUTOPAR_CHECK_EVERY: expected a whole number of calls \(0: off\), got '-1'"),
])
def test_bad_environment_values_are_named(env, match):
    with pytest.raises(ValueError, match=match):
        CommChecks.from_env(env)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_bad_timeouts_are_rejected(value):
    with pytest.raises(ValueError, match=r"CommChecks: watchdog_s: expected None or a finite number of seconds > 0"):
        CommChecks(watchdog_s=value)


def test_wrongly_typed_checks_are_rejected():
    for bad in (True, "5"):
        with pytest.raises(TypeError, match="CommChecks: watchdog_s: expected None or a number of seconds"):
            CommChecks(watchdog_s=bad)
    with pytest.raises(TypeError, match="CommChecks: debug: expected True or False, got 1"):
        CommChecks(debug=1)
    with pytest.raises(TypeError, match="run_in_process: checks: expected a CommChecks or None"):
        run_in_process(2, lambda comm: None, checks={"debug": True})


def test_world_reads_the_environment(monkeypatch):
    monkeypatch.setenv("AUTOPAR_COMM_WATCHDOG", "7")
    assert world().checks == CommChecks(watchdog_s=7.0)
    assert world(CommChecks(debug=True)).checks == CommChecks(debug=True)   # an explicit value wins


# ---- in-process -----------------------------------------------------------------------------

def test_split_communicators_inherit_the_checks():
    checks = CommChecks(watchdog_s=30.0, debug=True)

    def body(comm):
        sub = comm.split([(0, 2), (1, 3)])
        return comm.checks, sub.checks, sub.split([sub.ranks]).checks
    assert run_in_process(4, body, checks=checks) == [(checks,) * 3] * 4


def test_collectives_are_unchanged_with_the_checks_on():
    def body(comm):
        check_collectives(comm)
        check_p2p(comm)
        check_split_grid(comm, 2, 2)
        return comm.stats.snapshot()
    checked = run_in_process(4, body, checks=CommChecks(watchdog_s=30.0, debug=True))
    assert checked == run_in_process(4, body)   # the same calls counted: the checks' own are not


def sleeper(comm, where):
    """Every rank: one allreduce; then rank 2 sleeps where the others call a second one."""
    comm.allreduce(np.ones(3))
    group = comm.split([(0, 2), (1,)]) if where == "subgroup" else comm
    if comm.rank == 2:
        time.sleep(WATCHDOG_S + 1.5)
        return None
    if where == "recv":
        return comm.recv((2,), np.float32, 2, tag=5) if comm.rank == 0 else None
    return group.allgather(np.ones(2)) if comm.rank == 0 or where == "world" else None


@pytest.mark.parametrize("where, what, missing, arrived", [
    ("world", r"allgather #2 on group \(0, 1, 2\)", r"rank 2 \(running\)", "ranks 0, 1"),
    ("subgroup", r"allgather #1 on group \(0, 2\)", r"rank 2 \(running\)", "rank 0"),
    ("recv", r"recv from member 2 \(tag 5\) on group \(0, 1, 2\)", r"rank 2 \(running\)", "rank 0"),
], ids=["world", "subgroup", "recv"])
def test_in_process_watchdog_names_the_missing_rank(where, what, missing, arrived):
    began = time.monotonic()
    with pytest.raises(CollectiveTimeoutError) as info:
        run_in_process(3, sleeper, where, checks=CommChecks(watchdog_s=WATCHDOG_S))
    message = str(info.value)
    assert re.search(rf"collective watchdog: rank [01] waited 2\.\d s in {what}; missing: {missing}; "
                     rf"arrived: {arrived}$", message), message
    assert time.monotonic() - began < WATCHDOG_S + 4   # + the sleeper's end (threads cannot be killed)


# ---- under mpiexec --------------------------------------------------------------------------

SCRIPT = """
    import sys, time
    import numpy as np
    from autopar.comm import world

    where = sys.argv[1]
    comm = world()                                   # AUTOPAR_COMM_WATCHDOG from the environment
    k = 100_000 if where == "shared" else 3          # shared: large enough for the shared window (shm.py)
    ok = comm.allreduce(np.arange(float(k)) + comm.rank)   # collective #1 completes on every rank
    assert ok.tolist() == (comm.size * np.arange(float(k)) + sum(range(comm.size))).tolist()
    sub = comm.split([(0, 2), (1,)] if comm.size == 3 else [(0,), (1,)])   # collective #2
    group = sub if where == "subgroup" else comm
    if comm.rank == 0:                               # (one writer: mpiexec may interleave lines)
        print("armed", time.time(), flush=True)
    if comm.rank == 2 or (where == "recv" and comm.rank == 1):
        time.sleep(60)                               # skips the next call
    elif where == "recv":
        comm.recv((2,), np.float32, 1, tag=5)
    elif where == "subgroup":
        if comm.rank == 0:
            group.allgather(np.ones(2))
    else:
        comm.allreduce(np.ones(k))                   # shared: waits in the window's barrier
    if comm.rank == 0:
        print("finished", flush=True)
"""


@pytest.mark.skipif(MPIEXEC is None or launched_under_mpi(), reason="needs mpiexec, not under it")
@pytest.mark.parametrize("where, n, what, missing", [
    ("world", 3, r"allreduce #3 on group \(0, 1, 2\)",
     r"rank 2 \(never entered it; its last collective on this group was #2\); arrived: ranks 0, 1"),
    ("subgroup", 3, r"allgather #1 on group \(0, 2\)",
     r"rank 2 \(never entered it; it has issued no collective on this group\); arrived: rank 0"),
    ("recv", 2, r"recv from member 1 \(tag 5\) on group \(0, 1\)",
     r"rank 1 \(has not made the matching call\); arrived: rank 0"),
    ("shared", 3, r"allreduce #3 on group \(0, 1, 2\)",
     r"rank 2 \(never entered it; its last collective on this group was #2\); arrived: ranks 0, 1"),
], ids=["world", "subgroup", "recv", "shared"])
def test_mpi_watchdog_reports_the_missing_rank_and_aborts(tmp_path, where, n, what, missing):
    script = tmp_path / "skip.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT), AUTOPAR_COMM_WATCHDOG=str(WATCHDOG_S))
    job = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, str(script), where], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=50, check=False)
    ended = time.time()
    assert job.returncode != 0, f"the job exited 0\nstdout:\n{job.stdout}\nstderr:\n{job.stderr}"
    armed = re.findall(r"^armed (\S+)$", job.stdout, re.MULTILINE)
    assert len(armed) == 1, job.stdout
    assert ended - float(armed[0]) < WATCHDOG_S + 5, f"took {ended - float(armed[0]):.1f} s after the skip"
    assert "finished" not in job.stdout, job.stdout   # rank 0 waits in every case
    report = rf"autopar: collective watchdog: rank [01] waited 2\.\d s in {what}; missing: {missing}; " \
             "aborting the MPI job"
    assert re.search(report, job.stderr), job.stderr

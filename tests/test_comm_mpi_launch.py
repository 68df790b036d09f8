"""Launch real MPI jobs from the normal suite: tests/mpi on 2 ranks, and a failing rank's abort."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autopar.comm.mpi import launched_under_mpi

ROOT = Path(__file__).resolve().parent.parent


def find_mpiexec() -> str | None:
    """mpiexec next to this Python (a venv's bin, the mpich wheel), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
pytestmark = [
    pytest.mark.skipif(MPIEXEC is None, reason=f"no mpiexec next to {sys.executable} or on PATH; "
                                               "pip install mpich (or install an MPI) to run MPI tests"),
    pytest.mark.skipif(launched_under_mpi(), reason="already running under an MPI launcher"),
]


def launch(args: list[str], timeout: float, n: int = 2, **env_extra: str) -> tuple[int, str, str, float]:
    """Run ``mpiexec -n <n> <args>`` in its own session (``env_extra`` added to its
    environment); kill that session if it overruns."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **env_extra)
    start = time.monotonic()
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec {' '.join(args)} did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err, time.monotonic() - start


def test_mpi_suite_passes_on_two_ranks():
    rc, out, err, _ = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/mpi"],
                             timeout=120)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    passed = [int(k) for k in re.findall(r"(\d+) passed", out)]
    assert passed and min(passed) > 0, f"no passed tests reported:\n{out}"
    assert "skipped" not in out and "no tests ran" not in out, out


def test_pangu_alpha_on_four_mpi_ranks_equals_serial():
    """dp2 x mp2, dp4, mp4 and dp2 x mp2 with the vocabulary-split table, and sequence parallel
    under dp2 x mp2 and mp4, over real MPI, every sum through the shared-memory window."""
    rc, out, err, _ = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/mpi/test_pangu_mpi.py"], timeout=240, n=4, AUTOPAR_TEST_SHM_EVERY_SUM="1")
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    passed = [int(k) for k in re.findall(r"(\d+) passed", out)]
    assert len(passed) == 4 and min(passed) == 6, f"expected 6 tests passed on each of 4 ranks:\n{out}"


ABORT_SCRIPT = """
    import time
    import numpy as np
    from autopar.comm import install_abort_handler, world

    install_abort_handler()
    comm = world()
    assert comm.size == 2, comm
    comm.barrier()
    if comm.rank == 1:
        raise RuntimeError("deliberate failure on this rank")
    comm.allreduce(np.ones(3))  # rank 0 would wait here forever without the abort
    time.sleep(60)
"""


def test_auto_parallel_joint_plan_on_four_mpi_ranks_equals_serial():
    """The pipelined joint plan (memory pressure) on four ranks; the one-stage plan runs on two
    (the tests/mpi suite) and in process on four and eight (tests/test_auto_plan.py)."""
    rc, out, err, _ = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/mpi/test_auto_plan_mpi.py", "-k", "True"], timeout=240, n=4)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "1 passed" in out, out


def test_failing_rank_aborts_the_job(tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(textwrap.dedent(ABORT_SCRIPT))
    rc, out, err, elapsed = launch([sys.executable, str(script)], timeout=30)
    assert rc != 0, f"job exited 0\nstdout:\n{out}\nstderr:\n{err}"
    assert elapsed < 30
    assert "on rank 1 of 2" in err and "[rank 1] RuntimeError: deliberate failure on this rank" in err, err


MID_STEP_SCRIPT = """
import numpy as np
from autopar import nn, ops
from autopar.comm import install_abort_handler, world
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import SGD

install_abort_handler()
comm = world()
gelu = ops.GeLU.forward

def failing_gelu(self, x):  # rank 2 fails inside the forward pass of its second step
    if comm.rank == 2 and failing_gelu.calls == 1:
        raise RuntimeError("deliberate failure inside a training step")
    return gelu(self, x)
failing_gelu.calls = 0

cfg = PanguAlphaConfig.preset("tiny")
ids = np.random.default_rng(0).integers(0, 96, (4, 17)).astype(np.int32)
with bound_world(comm), parallel_context(parallel_mode="data_parallel", device_num=comm.size):
    net = PanguAlphaWithLoss(cfg)
    train = nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))
    ops.GeLU.forward = failing_gelu
    for step in range(3):
        train(np.split(ids, comm.size)[comm.rank])
        failing_gelu.calls += 1
print("rank", comm.rank, "finished", flush=True)
"""


def test_exception_on_rank_2_mid_step_ends_all_four_ranks(tmp_path):
    """The others are blocked in the step's all-reduces when rank 2 raises: the abort
    handler must end them, not leave them waiting."""
    script = tmp_path / "fail_mid_step.py"
    script.write_text(textwrap.dedent(MID_STEP_SCRIPT))
    rc, out, err, elapsed = launch([sys.executable, str(script)], timeout=60, n=4)
    assert rc != 0, f"job exited 0\nstdout:\n{out}\nstderr:\n{err}"
    assert elapsed < 30, elapsed
    assert "RuntimeError: deliberate failure inside a training step" in err and "[rank 2]" in err, err
    assert "finished" not in out, out


def test_checkpoint_saved_on_dp2_mp2_resumes_on_mp4_and_dp4_over_four_mpi_ranks():
    """Save after 2 steps under dp2 x mp2, resume under mp4 and dp4: the same losses as the
    uninterrupted run, and a serial load on every rank equals the gathered values."""
    rc, out, err, _ = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/mpi/test_checkpoint_mpi.py"], timeout=240, n=4)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    passed = [int(k) for k in re.findall(r"(\d+) passed", out)]
    assert len(passed) == 4 and min(passed) == 4, f"expected 4 tests passed on each of 4 ranks:\n{out}"
    assert "skipped" not in out and "failed" not in out, out


def test_optimizer_parallel_on_four_mpi_ranks_equals_serial():
    """dp2 x mp2 with optimizer parallel over real MPI: serial losses and weights, state
    bytes cut, reduce-scatter + all-gather, and a checkpoint of sliced states that loads."""
    rc, out, err, elapsed = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    "tests/mpi/test_optimizer_parallel_mpi.py"], timeout=60, n=4)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    passed = [int(k) for k in re.findall(r"(\d+) passed", out)]
    assert len(passed) == 4 and min(passed) == 3, f"expected 3 tests passed on each of 4 ranks:\n{out}"
    assert "skipped" not in out and "failed" not in out, out
    assert elapsed < 60

"""examples/auto_parallel.py, the README's auto-parallel example: a user's model gives the
serial losses under ``mpiexec -n 2`` whatever the joint search plans (a pipeline on slow
links, the sharded plan otherwise)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_comm_mpi_launch import MPIEXEC, ROOT

SCRIPT = str(ROOT / "examples" / "auto_parallel.py")


def losses(cmd: list[str]) -> tuple[list[float], str]:
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    line = re.search(r"^losses: (.*)$", proc.stdout, re.M)
    return [float(v) for v in line.group(1).split()], proc.stdout


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
@pytest.mark.parametrize("flags, plan", [(["--slow-links"], "pp2 x 1 devices per stage"),
                                         ([], "pp1 x 2 devices per stage")])
def test_the_example_trains_like_serial_whatever_the_plan(flags, plan):
    serial, _ = losses([sys.executable, SCRIPT])
    parallel, out = losses([MPIEXEC, "-n", "2", sys.executable, SCRIPT, *flags])
    assert re.search(r"^->.*" + re.escape(plan), out, re.M), out
    np.testing.assert_allclose(parallel, serial, rtol=1e-5)

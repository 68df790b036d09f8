"""The main job gives the same losses serially and under mpiexec -n 2 (dp2 and mp2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_comm_mpi_launch import MPIEXEC, ROOT

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
SCRIPT = str(ROOT / "examples" / "pangu_alpha" / "train.py")


def run(tmp: Path, name: str, launcher: list[str], extra: list[str]) -> dict:
    out = tmp / f"{name}.json"
    cmd = launcher + [sys.executable, SCRIPT, "--data", str(tmp / "data"), "--vocab-size", "4000",
                      "--max-docs", "1500", "--steps", "3", "--batch", "4", "--eval-every", "100",
                      "--eval-batches", "1", "--out", str(tmp / name), "--losses-out", str(out), *extra]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "->" in proc.stdout  # the generated continuation is printed
    return json.loads(out.read_text())


def test_job_losses_equal_serially_and_over_two_ranks(tmp_path):
    serial = run(tmp_path, "serial", [], [])          # also prepares the corpus, once
    dp2 = run(tmp_path, "dp2", [MPIEXEC, "-n", "2"], [])
    mp2 = run(tmp_path, "mp2", [MPIEXEC, "-n", "2"], ["--mp", "2"])
    assert len(serial["losses"]) == 3 and serial["losses"][0] > 5.0
    for other in (dp2, mp2):
        np.testing.assert_allclose(other["losses"], serial["losses"], rtol=1e-5)
        np.testing.assert_allclose([v for _, v in other["evals"]], [v for _, v in serial["evals"]], rtol=1e-5)

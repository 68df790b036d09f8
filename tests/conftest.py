"""Test-session setup: the tests' helpers on the path, and one BLAS thread per process.

Sharded results are compared with serial ones to ~1e-10; a multi-threaded BLAS sums a
GEMM in an order that depends on the thread count and the matrix shape, so a test's
tolerance would have to hold under every threading. We pin BLAS to one thread instead
(environment and threadpoolctl, so it holds even when numpy was loaded first or the
environment asked for more), which also keeps in-process ranks (threads) from
oversubscribing the cores. Subprocesses (mpiexec tests) inherit the variables.

Property tests (Hypothesis) draw the same examples on every run (``derandomize``, no example
database, no deadline), so ``python -m pytest tests`` is deterministic as it is, and
``.ci/run`` runs exactly that command.
"""
import os
import sys

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
_BLAS_LIMIT = threadpool_limits(limits=1)   # held for the whole session


import pytest  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("autopar", derandomize=True, database=None, deadline=None)
_hypothesis_settings.load_profile("autopar")

from autopar import context as _context  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_parallel_context():
    """Each test starts from the parallel context the previous one started from: a test that
    enters ``parallel_context`` inside in-process ranks (threads) can leave the value of the
    last rank to leave, which would change the next test's programs."""
    before = _context.current_context()
    yield
    with _context._STATE.lock:
        _context._STATE.context = before


@pytest.fixture
def ufunc_kernels(monkeypatch):
    """numpy's ufunc paths for Softmax, LayerNorm and GeLU instead of the fused CPU kernels
    (``backend.hostkernels``): for tests that compare another path with them bit for bit."""
    from autopar.backend import hostkernels
    monkeypatch.setattr(hostkernels, "library", lambda: None)

"""Helpers the benchmark scripts share: launching MPI workers, tracing PanGu-α on abstract
inputs, and printing tables."""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def default_mpiexec() -> str | None:
    """The ``mpiexec`` beside this Python (a virtual environment's), else the one on PATH."""
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


ROOT = Path(__file__).resolve().parents[1]


def worker_env() -> dict[str, str]:
    """The environment of a worker: one BLAS thread per rank, as every rank owns one core,
    and this checkout on the path (a worker script's own folder is benchmarks/, so without
    an install -- a machine that cannot build one offline -- autopar would not import)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, **ONE_BLAS_THREAD, PYTHONPATH=path)


def pangu_graph(cfg, batch: int):
    """The traced forward graph of ``PanguAlphaWithLoss(cfg)`` on a (batch, S + 1) int32
    TensorSpec: shapes only, so no parameter data is ever allocated."""
    from autopar.ir.spec import TensorSpec
    from autopar.models.pangu_alpha import PanguAlphaWithLoss
    from autopar.runtime.trace import trace
    spec = TensorSpec((batch, cfg.seq_length + 1), np.dtype(np.int32))
    return trace(PanguAlphaWithLoss(cfg), (spec,), {}).graph


def table(headers: list[str], rows: list[list], aligns: str | None = None) -> str:
    """A plain-text table: columns as wide as their widest cell; ``aligns`` one 'l' or 'r'
    per column (default: first left, the rest right)."""
    aligns = aligns or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, width, aligns)).rstrip()
    return "\n".join([line(cells[0]), line(["-" * w for w in width])] + [line(r) for r in cells[1:]])


def mib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 20:.1f}"


def unique_nbytes(arrays) -> int:
    """Bytes of the distinct base buffers under ``arrays`` (views count once)."""
    seen: dict[int, int] = {}
    for a in arrays:
        a = np.asarray(a)
        while isinstance(a.base, np.ndarray):
            a = a.base
        seen[id(a)] = a.nbytes
    return sum(seen.values())


@contextlib.contextmanager
def gc_watch():
    """Python's garbage collections while the block runs: yields a dict filled on exit with
    ``collections`` per generation and their total ``seconds``. CuPy arrays are objects the
    collector tracks (numpy's are not), so a GPU step that makes thousands of them can pay
    for collections a CPU step never sees -- one suspect for a step's spread."""
    seen = {"collections": [0, 0, 0], "seconds": 0.0}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            seen["seconds"] += time.perf_counter() - started.pop()
            seen["collections"][info["generation"]] += 1
    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def blas_line() -> str:
    """Which kernels numpy's BLAS runs here, and the fix when they are narrower than the CPU's
    (autopar/backend/blas.py): printed beside every CPU figure, so runs stay comparable."""
    from autopar.backend.blas import openblas_advice, openblas_architecture
    arch = openblas_architecture()
    chosen = os.environ.get("OPENBLAS_CORETYPE")
    line = (f"numpy's BLAS kernels: {arch or 'not OpenBLAS'}"
            + (f" (OPENBLAS_CORETYPE={chosen})" if chosen else " (OpenBLAS's own choice)" if arch else ""))
    from autopar.backend import mkl
    if mkl.library() is not None:       # raises when AUTOPAR_BLAS=mkl finds no library: a figure is never mislabelled
        line += "; autopar's 2-D GEMMs: oneMKL, one thread (AUTOPAR_BLAS=mkl)"
    advice = openblas_advice()
    return line + (f"\nWARNING: {advice}" if advice else "")

"""An optional host GEMM through Intel oneMKL, for float32 and float64 2-D products.

numpy's GEMM is OpenBLAS's. On the lent 16-core hosts' Sapphire Rapids cores (session 14) it ran
the GEMMs of a PanGu-alpha step in 1227 ms against PyTorch's 1042 (PyTorch multiplies with
oneMKL there), while autopar's other ops took 177 ms against PyTorch's 309: the GEMM library
was the whole gap between the two frameworks. This module calls oneMKL's ``cblas_sgemm`` /
``cblas_dgemm`` through ctypes instead, where the user asks for it:

    AUTOPAR_BLAS=mkl          opt in (``pip install mkl`` puts libmkl_rt beside this Python)
    AUTOPAR_MKL_LIB=PATH      a libmkl_rt elsewhere (a copy carried to a machine without pip)

    matmul(a, b) -> a @ b as a new C-contiguous array, or None when not served: not opted in,
                    not two numpy matrices of one dtype (float32 or float64), an empty
                    dimension, or a layout BLAS cannot read without a copy (numpy then runs)

oneMKL runs on one thread (its sequential layer), as numpy's BLAS does here
(``OPENBLAS_NUM_THREADS=1``): each MPI rank owns one core. Results equal numpy's to
rounding, not to the bit (the two libraries block the sums differently). An opt-in that cannot
be honoured -- no library where it was looked for -- raises :class:`MKLNotFoundError` at the
first product, naming what was tried, instead of quietly running OpenBLAS.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys

import numpy as np

from ..errors import format_error

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112          # CBLAS_LAYOUT / CBLAS_TRANSPOSE
SEQUENTIAL, LP64 = 1, 0                              # MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64


class MKLNotFoundError(RuntimeError):
    """AUTOPAR_BLAS=mkl was set, but no oneMKL runtime library could be loaded."""


def requested() -> bool:
    return os.environ.get("AUTOPAR_BLAS", "").strip().lower() == "mkl"


def candidates() -> list[str]:
    """Where libmkl_rt is looked for: ``$AUTOPAR_MKL_LIB`` alone when set, else the
    library pip's ``mkl`` wheel installs under this Python's prefix, else the linker's."""
    chosen = os.environ.get("AUTOPAR_MKL_LIB")
    if chosen:
        return [chosen]
    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    system = ctypes.util.find_library("mkl_rt")
    return found + ([system] if system else [])


@functools.cache
def library():
    """The loaded oneMKL runtime with ``cblas_sgemm``/``cblas_dgemm`` typed, or None when
    AUTOPAR_BLAS does not ask for it. Raises MKLNotFoundError when asked but not found."""
    if not requested():
        return None
    tried = candidates()
    errors = []
    for path in tried:
        try:
            lib = ctypes.CDLL(path)     # RTLD_LOCAL: its cblas_* symbols stay out of other libraries
            break
        except OSError as err:
            errors.append(str(err))
    else:
        raise MKLNotFoundError(format_error(
            "AUTOPAR_BLAS=mkl", "oneMKL runtime library (libmkl_rt)", "a library that loads",
            f"tried {tried or 'nothing (none under ' + sys.prefix + '/lib)'}"
            + (f": {'; '.join(errors)}" if errors else ""),
            "pip install mkl, or set AUTOPAR_MKL_LIB to a libmkl_rt.so, or unset AUTOPAR_BLAS"))
    lib.MKL_Set_Interface_Layer(LP64)           # before any other call: 32-bit integers, as typed below
    lib.MKL_Set_Threading_Layer(SEQUENTIAL)     # one thread per rank
    i, p = ctypes.c_int, ctypes.c_void_p
    for name, real in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
        fn = getattr(lib, name)
        fn.argtypes = (i, i, i, i, i, i, real, p, i, p, i, real, p, i)
        fn.restype = None
    return lib


def _operand(x: np.ndarray) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) under which BLAS reads the 2-D ``x`` in place:
    rows of unit stride (``x`` as stored) or columns of unit stride (``x`` a transposed view)."""
    item = x.itemsize
    rows, cols = x.shape
    s0, s1 = x.strides
    if s1 == item and s0 % item == 0 and s0 // item >= max(cols, 1) and s0 > 0:
        return NO_TRANS, s0 // item
    if s0 == item and s1 % item == 0 and s1 // item >= max(rows, 1) and s1 > 0:
        return TRANS, s1 // item
    return None


_INT_MAX = 2 ** 31 - 1
_GEMMS = {np.dtype(np.float32): "cblas_sgemm", np.dtype(np.float64): "cblas_dgemm"}


def matmul(a, b) -> np.ndarray | None:
    """``a @ b`` by oneMKL for two numpy matrices of one float dtype, else None (see the module)."""
    if type(a) is not np.ndarray or type(b) is not np.ndarray or a.ndim != 2 or b.ndim != 2:
        return None
    name = _GEMMS.get(a.dtype)
    if name is None or b.dtype != a.dtype or 0 in a.shape or 0 in b.shape or a.shape[1] != b.shape[0]:
        return None
    lib = library()
    if lib is None:
        return None
    (m, k), n = a.shape, b.shape[1]
    layout_a, layout_b = _operand(a), _operand(b)
    if layout_a is None or layout_b is None or max(m, n, k, layout_a[1], layout_b[1]) > _INT_MAX:
        return None
    c = np.empty((m, n), a.dtype)
    # row-major C (m, n) = op(A) (m, k) @ op(B) (k, n); A, B read in place through their strides
    getattr(lib, name)(ROW_MAJOR, layout_a[0], layout_b[0], m, n, k, 1.0, a.ctypes.data, layout_a[1],
                       b.ctypes.data, layout_b[1], 0.0, c.ctypes.data, n)
    return c

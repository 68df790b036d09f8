"""The one place autopar imports CuPy: only when a CuPy array is seen or the GPU target is
chosen, so numpy stays the only hard dependency (CuPy is the ``gpu`` extra)."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from ..errors import format_error

INSTALL_FIX = 'pip install -e ".[gpu]" (CuPy for CUDA 13; on CUDA 12 install cupy-cuda12x instead)'


def import_cupy(where: str = "device_target"):
    """The ``cupy`` module, or an ImportError saying how to install it. ``where`` names
    what asked for the GPU (the setting, or the array that was seen).

    Kernels ask for it at every call: once imported, CuPy is read from ``sys.modules``
    (a dict look-up, where ``importlib.import_module`` cost a few microseconds of import
    machinery each time; it returns that same entry)."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return cupy
    try:
        return importlib.import_module("cupy")
    except ImportError as err:
        raise ImportError(format_error(where, "device_target", "'GPU' with CuPy installed",
                                       f"CuPy is not importable ({err})", INSTALL_FIX)) from None


def device_erf():
    """CuPy's elementwise ``erf`` (``cupyx.scipy.special.erf``: CUDA's erf, exact to the
    dtype), or None where cupyx is missing."""
    try:
        return importlib.import_module("cupyx.scipy.special").erf
    except ImportError:
        return None


def gpu_problem(import_module: Callable[[str], object] = importlib.import_module) -> str:
    """Why this machine cannot run on a GPU ('' when it can): CuPy missing, or CuPy seeing no
    device. ``import_module`` is injectable so the answer can be tested."""
    try:
        cupy = import_module("cupy")
    except ImportError as err:
        return (f"CuPy is not importable ({err}); install it with pip install -e \".[gpu]\" "
                f"(cupy-cuda12x on CUDA 12)")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:                   # no driver, no device: CUDARuntimeError and kin
        return f"CuPy sees no GPU ({type(err).__name__}: {err}); run on a machine with an NVIDIA GPU and its driver"
    return "" if count else "CuPy sees no GPU (0 devices); run on a machine with an NVIDIA GPU and its driver"

"""The one gate of the GPU tests: CuPy and a device, else the module is skipped."""
import pytest


def cupy_or_skip(module_level: bool = True):
    """CuPy, when it is installed and sees a GPU; otherwise skip the calling test module (or,
    with ``module_level=False``, the calling test: a fixture's)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]')")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception:     # no driver or no device
        devices = 0
    if not devices:
        pytest.skip("CuPy sees no GPU", allow_module_level=module_level)
    return cupy

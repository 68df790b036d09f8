"""The one gate of the GPU tests: CuPy and a device, else the module is skipped."""
import pytest


def cupy_or_skip():
    """CuPy, when it is installed and sees a GPU; otherwise skip the calling test module."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install -e '.[gpu]')")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception:     # no driver or no device
        devices = 0
    if not devices:
        pytest.skip("CuPy sees no GPU", allow_module_level=True)
    return cupy

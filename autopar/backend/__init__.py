"""The array backend: numpy on CPU cores, CuPy on an NVIDIA GPU, reached through this
package only (``tests/test_backend.py`` checks that kernels call no numpy math directly).

``array_module(*arrays)`` picks the module a kernel computes with from its inputs;
``to_host``/``to_device`` move arrays; ``Backend`` is the device target as a value and
``set_context(device_target=...)`` MindSpore's setter of it.
"""
from .arrays import ARRAY_MODULES, array_module, base_buffer, cache_blocked, is_array, on_host, to_host, writable
from .cupy_import import device_erf, gpu_problem, import_cupy
from .gemm import half_matmul
from .mkl import matmul as host_matmul
from .target import CPU, DEVICE_TARGETS, GPU, Backend, as_backend, current_backend, get_context, set_context, to_device

__all__ = ["ARRAY_MODULES", "array_module", "base_buffer", "cache_blocked", "is_array", "on_host", "to_host",
           "writable", "device_erf", "gpu_problem", "import_cupy", "half_matmul", "host_matmul", "CPU", "GPU",
           "DEVICE_TARGETS", "Backend",
           "as_backend", "current_backend",
           "get_context", "set_context", "to_device"]

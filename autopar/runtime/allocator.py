"""Keep freed memory in the process, as a caching allocator does.

numpy allocates every large array with ``mmap`` and returns it with ``munmap`` when it is
freed. A training step allocates and frees the same few hundred arrays every step, so
each step pays page faults on fresh memory again; on a virtual machine that hands freed
pages back to its host this was a third of a PanGu-α step (benchmarks/serial_step.py:
0.63 -> 0.79 of the GEMM rate). Serving large blocks from the heap and never trimming it
lets the next step reuse the same pages, which is what PyTorch's caching allocator does
for GPU memory. Applied once per process by the first compiled program; glibc only (a
no-op elsewhere). ``AUTOPAR_KEEP_FREED_MEMORY=0`` turns it off.

On a GPU, CuPy's memory pool is that caching allocator already (freed device blocks are
kept for the next step); :func:`device_pool_bytes` says how much it holds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from ..backend import Backend

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def retain_freed_memory() -> bool:
    """Tell glibc malloc to serve big blocks from the heap and keep freed memory. Returns
    whether the setting took effect. Idempotent."""
    if os.environ.get("AUTOPAR_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0)                      # no per-array mmap/munmap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)     # never give the heap's top back
    ok &= mallopt(_M_TOP_PAD, 64 << 20)               # grow the heap in 64 MiB steps
    return bool(ok)


def device_pool_bytes(backend: Backend) -> tuple[int, int]:
    """(bytes in live device arrays, bytes the pool holds) of ``backend``'s caching
    allocator: CuPy's default memory pool on a GPU; (0, 0) on the CPU (host arrays are
    metered by ``MemoryMeter``)."""
    if backend.is_host:
        return 0, 0
    pool = backend.xp.get_default_memory_pool()
    return int(pool.used_bytes()), int(pool.total_bytes())

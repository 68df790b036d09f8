"""Which kernels numpy's OpenBLAS runs, and whether this CPU could run faster ones.

numpy's wheels ship OpenBLAS built for every x86 generation (``DYNAMIC_ARCH``); at load it
picks one kernel set from the CPU it sees. Under some virtual machines that choice falls a
generation short. On the lent 16-core host (an H100 host's Xeon with AVX-512, session 11)
numpy 2.5.2's OpenBLAS 0.3.34 picked its Haswell (AVX2) kernels: a 2048^3 float32 GEMM ran
at 76.7 GFLOP/s on one thread, and at 124-125 GFLOP/s with ``OPENBLAS_CORETYPE=SkylakeX``
set before Python started (PyTorch's MKL on the same core: 129-132). Every step autopar
runs on such a CPU pays that difference: its serial PanGu-alpha step was 1.59x PyTorch's
with the Haswell kernels and 1.09x with the SkylakeX ones.

OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when numpy loads it, so the fix is the
environment of the process (and of every MPI rank): :func:`openblas_advice` says when and
what to set. It only reads; nothing here changes a running process.
"""
from __future__ import annotations

import os

import numpy  # noqa: F401  (loads numpy's BLAS, which threadpoolctl then describes)
from threadpoolctl import threadpool_info

# OpenBLAS kernel sets (threadpoolctl's ``architecture``, case-folded) by the widest vector
# instructions they use: 0 SSE, 1 AVX, 2 AVX2 + FMA, 3 AVX-512.
TIERS = {
    **dict.fromkeys(("prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "opteron",
                     "barcelona", "bobcat", "nano"), 0),
    **dict.fromkeys(("sandybridge", "bulldozer", "piledriver", "steamroller"), 1),
    **dict.fromkeys(("haswell", "zen", "excavator"), 2),
    **dict.fromkeys(("skylakex", "cooperlake", "sapphirerapids"), 3),
}
AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})   # what SkylakeX's kernels use
AVX2_FLAGS = frozenset({"avx2", "fma"})


class SlowBLASWarning(UserWarning):
    """numpy's OpenBLAS runs narrower kernels than the CPU has (:func:`openblas_advice`)."""


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``path`` (empty where there is no such
    file, as on macOS or Windows)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def suggested_coretype(architecture: str | None, flags: frozenset[str]) -> str | None:
    """The ``OPENBLAS_CORETYPE`` whose kernels this CPU runs and OpenBLAS did not pick, or
    None: OpenBLAS already uses the CPU's widest vectors, or its choice is one this table
    does not rank (then there is nothing safe to say)."""
    tier = TIERS.get((architecture or "").lower())
    if tier is None:
        return None
    if tier < 3 and AVX512_FLAGS <= flags:
        return "SkylakeX"
    if tier < 2 and AVX2_FLAGS <= flags:
        return "Haswell"
    return None


def openblas_architecture() -> str | None:
    """The kernel set numpy's OpenBLAS runs (threadpoolctl's ``architecture``), or None where
    numpy is not on OpenBLAS."""
    for info in threadpool_info():
        if info.get("internal_api") == "openblas":
            return info.get("architecture")
    return None


def openblas_advice(architecture: str | None = None, flags: frozenset[str] | None = None,
                    environ=os.environ) -> str | None:
    """One line naming the fix when numpy's OpenBLAS runs narrower kernels than this CPU has,
    None otherwise (also when ``OPENBLAS_CORETYPE`` is already set: the user chose)."""
    if environ.get("OPENBLAS_CORETYPE"):
        return None
    architecture = openblas_architecture() if architecture is None else architecture
    suggestion = suggested_coretype(architecture, cpu_flags() if flags is None else flags)
    if suggestion is None:
        return None
    return (f"numpy's OpenBLAS runs its {architecture} kernels on a CPU with "
            f"{'AVX-512' if suggestion == 'SkylakeX' else 'AVX2'}: GEMMs may run well below this CPU's "
            f"rate (on one such host 76.7 against 124.5 GFLOP/s); set OPENBLAS_CORETYPE={suggestion} in the "
            f"environment before Python starts (for mpiexec, in the launching shell); "
            f"`python benchmarks/serial_step.py --quick --no-torch` prints the GEMM rate to compare")

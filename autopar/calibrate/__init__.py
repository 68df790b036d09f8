"""Measure the running machine and write its profile: ``python -m autopar.calibrate``.

    OPENBLAS_NUM_THREADS=1 mpiexec -n 2 python -m autopar.calibrate --out my.json --name my-box
    python -m autopar.calibrate --device-target GPU --like h100-8 --out h100-1.json --name h100-1
    autopar.strategy.profile.load_profile("my.json")   # what the cost model reads

:mod:`.cpu` measures CPU cores and MPI links on every rank (figures and methods in its
docstring), :mod:`.gpu` one NVIDIA GPU through CuPy, :mod:`.cli` is the command line.
"""
from ..backend import gpu_problem
from .cli import build_parser, main, write_profile
from .cpu import (
    FULL,
    GEMM_DTYPES,
    QUICK,
    Sizes,
    best_seconds_together,
    calibrate,
    cross_host_groups,
    gather_hosts,
    host_groups,
    measure_allreduce,
    measure_collective_wait_s,
    measure_elementwise_bytes_per_s,
    measure_gemm_efficiency,
    measure_gemm_flops,
    measure_op_overhead_s,
    memtotal_bytes,
)
from .gpu import GPU_FULL, GPU_GEMM_DTYPES, GPU_QUICK, GpuDevice, GpuProbe, GpuSizes, calibrate_gpu

__all__ = ["build_parser", "main", "write_profile", "FULL", "GEMM_DTYPES", "QUICK", "Sizes", "best_seconds_together",
           "calibrate", "cross_host_groups", "gather_hosts", "host_groups", "measure_allreduce",
           "measure_collective_wait_s", "measure_elementwise_bytes_per_s", "measure_gemm_efficiency",
           "measure_gemm_flops", "measure_op_overhead_s", "memtotal_bytes", "GPU_FULL", "GPU_GEMM_DTYPES", "GPU_QUICK",
           "GpuDevice", "GpuProbe", "GpuSizes", "calibrate_gpu", "gpu_problem"]

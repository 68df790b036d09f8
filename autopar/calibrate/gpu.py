"""Measure one NVIDIA GPU through CuPy: ``python -m autopar.calibrate --device-target GPU``.

    python -m autopar.calibrate --device-target GPU --like h100-8 --name h100-1 \\
        --out autopar/strategy/profiles/h100-1.json

One rank, one GPU. Every figure is timed on the wall clock with the device synchronised
before and after (:func:`synced_clock`): a GPU kernel returns to Python at launch, so a host
clock alone would time the launch, and thread CPU time (the CPU target's clock) would time
nothing at all. Each timing runs its kernel ``calls`` times back to back (one
synchronisation per timing, not per call) and the figure is the best of ``repeats``.

| figure                  | method                                                                |
|-------------------------|-----------------------------------------------------------------------|
| gemm_flops.<dtype>      | 2·n³ / time of ``ops.MatMul().forward`` on (n, n) @ (n, n) CuPy arrays |
|                         | (n = 8192): what a program's MatMul runs -- float16 / bfloat16        |
|                         | through cuBLAS GemmEx (``backend.half_matmul``), float32 cupy.matmul  |
| gemm_efficiency.<dtype> | per d: the rate of a (n, d) @ (d, n) MatMul over gemm_flops.<dtype>   |
| elementwise_bytes_per_s | cupy.add of two 256 MiB float32 arrays into a fresh one: 3·bytes / t  |
| op_overhead_s           | an autopar Program of tiny (4, 4) float32 ops (Add, Mul, Tanh) run on |
|                         | the GPU: time of one run / its instruction count (launch + dispatch:  |
|                         | the kernels are too small to be what the GPU waits for)               |
| op_host_s.<kind>        | ``autopar.models.op_rates`` on ``GPU_WORKLOAD`` (its docstring says   |
|                         | why not the CPU's): the host's issue time of each instruction as a    |
|                         | free-running step issues it, per instruction of the kind              |
| op_bytes_per_s.<kind>   | each instruction's DEVICE time: a spin kernel holds the stream while  |
| op_device_s.<kind>      | the host issues it, CUDA events around it (:func:`device_timer`), so  |
|                         | no host time and no launch gap enters; per kind, t = n x fixed +      |
|                         | bytes / rate fitted through the workload at two widths (H and 2H)     |
| memory_bytes            | the GPU's total memory (cudaGetDeviceProperties totalGlobalMem)       |
| devices_per_node        | 1: a profile of one GPU                                               |

A GPU runs what the host queued while the host goes on, so a step takes, op by op, the
longer of the host's issue and the device's work (``MachineProfile.op_seconds``): the two are
measured apart: the host's as a step issues each op, the device's with the host's issue hidden.

The collective figures cannot be timed on one rank: as the CPU target's one-rank path does,
they are copied from ``--like`` and their sources say so. What measures is a
:class:`GpuProbe`, a value of functions: :data:`CUPY_PROBE` times the GPU, tests hand
:func:`calibrate_gpu` fakes to check the profile it assembles on a machine without one.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..backend import GPU, get_context, half_matmul, import_cupy, set_context
from ..dtype import as_dtype
from ..errors import format_error
from ..models.op_rates import (
    GPU_BATCH,
    GPU_QUICK_WIDE_WORKLOAD,
    GPU_QUICK_WORKLOAD,
    GPU_WIDE_WORKLOAD,
    GPU_WORKLOAD,
    measure_op_fits,
    measure_op_host_seconds,
)
from ..runtime.program import Program
from ..runtime.trace import trace
from ..strategy.profile import MachineProfile
from .cpu import TinyOpChain, copied_collectives, provisional_profile

GPU_GEMM_DTYPES = ("float32", "float16", "bfloat16")   # what programs multiply on a GPU (O2 computes in half)
MiB = 2 ** 20
WHERE = "calibrate --device-target GPU"


@dataclass(frozen=True)
class GpuSizes:
    """How much to measure on a GPU: problem sizes, calls per timing, best of ``*_repeats``."""

    gemm_n: int                    # GEMM operands are (gemm_n, gemm_n)
    gemm_calls: int                # back-to-back calls per timing
    gemm_repeats: int
    elementwise_bytes: int         # bytes of each cupy.add operand
    elementwise_calls: int
    elementwise_repeats: int
    chain_links: int               # tiny-op chain: 3 ops per link
    chain_runs: int                # program runs per timing
    chain_repeats: int
    op_rate_repeats: int           # timed training steps of the op-rate workload
    op_rate_workload: tuple[tuple[str, object], ...]   # PanguAlphaConfig fields of that workload
    op_rate_batch: int
    efficiency_dims: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    op_rate_wide: tuple[tuple[str, object], ...] = tuple(GPU_WIDE_WORKLOAD.items())   # its second width

    @property
    def workload(self) -> dict:
        return dict(self.op_rate_workload)

    @property
    def wide_workload(self) -> dict:
        return dict(self.op_rate_wide)


GPU_FULL = GpuSizes(gemm_n=8192, gemm_calls=10, gemm_repeats=5, elementwise_bytes=256 * MiB, elementwise_calls=20,
                    elementwise_repeats=5, chain_links=70, chain_runs=20, chain_repeats=5, op_rate_repeats=5,
                    op_rate_workload=tuple(GPU_WORKLOAD.items()), op_rate_batch=GPU_BATCH)
GPU_QUICK = GpuSizes(gemm_n=4096, gemm_calls=5, gemm_repeats=3, elementwise_bytes=64 * MiB, elementwise_calls=10,
                     elementwise_repeats=3, chain_links=70, chain_runs=5, chain_repeats=3, op_rate_repeats=2,
                     op_rate_workload=tuple(GPU_QUICK_WORKLOAD.items()), op_rate_batch=GPU_BATCH,
                     efficiency_dims=(16, 64, 256, 1024), op_rate_wide=tuple(GPU_QUICK_WIDE_WORKLOAD.items()))


@dataclass(frozen=True)
class GpuDevice:
    """The GPU measured: its name (for the sources), total memory, and the software that ran."""
    name: str
    memory_bytes: int
    software: str                  # e.g. 'CuPy 14.2.0, CUDA runtime 13020'


@dataclass(frozen=True)
class GpuProbe:
    """The measurements :func:`calibrate_gpu` assembles a profile from. Each returns its
    figure and a few words on how it ran (what enters the figure's source)."""
    device: Callable[[], GpuDevice]
    gemm_flops: Callable[[str, GpuSizes], tuple[float, str]]                # (FLOP/s, path)
    gemm_efficiency: Callable[[str, float, GpuSizes], tuple[tuple[float, float], ...]]
    elementwise_bytes_per_s: Callable[[GpuSizes], float]
    op_overhead_s: Callable[[GpuSizes], tuple[float, int]]                  # (s per op, instructions)
    # ({kind: (bytes/s, device s per instruction, how)}, {kind: (host s per instruction, how)})
    op_costs: Callable[[MachineProfile, GpuSizes], tuple[dict[str, tuple[float, float, str]],
                                                          dict[str, tuple[float, str]]]]


# ---------------------------------------------------------------- is there a GPU

# ---------------------------------------------------------------- timing

def synced_clock(cupy) -> Callable[[], float]:
    """A wall clock that first waits for the device's queued work: ``t1 - t0`` of two reads
    around launched kernels is the time they ran."""
    device = cupy.cuda.Device()

    def clock() -> float:
        device.synchronize()
        return time.perf_counter()
    return clock


def best_seconds(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    """Best-of-``repeats`` seconds of ``fn()`` on ``clock``."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


# ---------------------------------------------------------------- CuPy measurements

def _describe_device() -> GpuDevice:
    cupy = import_cupy(WHERE)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return GpuDevice(name, int(props["totalGlobalMem"]),
                     f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")


def _operands(cupy, a_shape: tuple[int, int], b_shape: tuple[int, int], dtype: str):
    rng = cupy.random.default_rng(0)
    dt = as_dtype(dtype)
    return (rng.standard_normal(a_shape, dtype=cupy.float32).astype(dt),
            rng.standard_normal(b_shape, dtype=cupy.float32).astype(dt))


def _gemm_path(a, b, dtype: str) -> str:
    if dtype == "float32":
        return "cupy.matmul (cuBLAS, float32; TF32 only under CUPY_TF32=1)"
    if half_matmul(a, b) is not None:
        return f"{dtype} operands through cuBLAS GemmEx on the tensor cores, float32 accumulation (backend.half_matmul)"
    return f"{dtype} operands cast to float32 and multiplied by cupy.matmul (backend.half_matmul declined them)"


def _timed_matmul(a, b, sizes: GpuSizes, clock) -> float:
    """Seconds of one MatMul forward of ``a @ b``, as a program's MatMul runs it."""
    matmul = ops.MatMul()
    matmul.forward(a, b)                       # warm-up: cuBLAS handle, the path's self-check, the pool

    def calls():
        for _ in range(sizes.gemm_calls):
            matmul.forward(a, b)
    return best_seconds(calls, sizes.gemm_repeats, clock) / sizes.gemm_calls


def measure_gemm_flops(dtype: str, sizes: GpuSizes) -> tuple[float, str]:
    """(FLOP/s of an (n, n) @ (n, n) MatMul in ``dtype`` on the GPU, the path it took)."""
    cupy = import_cupy(WHERE)
    n = sizes.gemm_n
    a, b = _operands(cupy, (n, n), (n, n), dtype)
    return 2.0 * n ** 3 / _timed_matmul(a, b, sizes, synced_clock(cupy)), _gemm_path(a, b, dtype)


def measure_gemm_efficiency(dtype: str, peak: float, sizes: GpuSizes) -> tuple[tuple[float, float], ...]:
    """Per d of ``sizes.efficiency_dims``: the rate of an (n, d) @ (d, n) MatMul over ``peak``."""
    cupy = import_cupy(WHERE)
    clock, n = synced_clock(cupy), sizes.gemm_n
    points = []
    for d in sorted(sizes.efficiency_dims):
        a, w = _operands(cupy, (n, d), (d, n), dtype)      # (n, d), (d, n)
        rate = 2.0 * n * d * n / _timed_matmul(a, w, sizes, clock)
        points.append((float(d), min(1.0, rate / peak)))
    return tuple(points)


def measure_elementwise_bytes_per_s(sizes: GpuSizes) -> float:
    """Bytes/s of cupy.add of two float32 arrays into a fresh one: 3·nbytes / time."""
    cupy = import_cupy(WHERE)
    x = cupy.ones(sizes.elementwise_bytes // 4, cupy.float32)
    y = cupy.ones(sizes.elementwise_bytes // 4, cupy.float32)
    cupy.add(x, y)

    def calls():
        for _ in range(sizes.elementwise_calls):
            cupy.add(x, y)
    seconds = best_seconds(calls, sizes.elementwise_repeats, synced_clock(cupy)) / sizes.elementwise_calls
    return 3.0 * x.nbytes / seconds


def measure_op_overhead_s(sizes: GpuSizes) -> tuple[float, int]:
    """(seconds per executed instruction, instruction count) of a Program of tiny (4, 4)
    float32 ops run on the GPU: best time of ``chain_runs`` runs / runs / instructions."""
    cupy = import_cupy(WHERE)
    x = np.ones((4, 4), np.float32)            # (4, 4): the launch dominates the kernel
    traced = trace(TinyOpChain(sizes.chain_links), (x,), {})
    program = Program(traced.graph, traced.graph.outputs, backend=GPU)
    count = len(program.instructions)
    program.run([x])

    def runs():
        for _ in range(sizes.chain_runs):
            program.run([x])
    return best_seconds(runs, sizes.chain_repeats, synced_clock(cupy)) / sizes.chain_runs / count, count


SPIN_SOURCE = r"""
extern "C" __global__ void autopar_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""
SPIN_FLOOR_S = 2e-4      # the stream is held at least this long before an instruction's kernels


def host_timer(issued: dict[int, float]):
    """``timed(k, run)`` for :func:`~autopar.runtime.op_timer.time_ops`: the host seconds of
    ``run()`` as a step issues it, the device running what came before (synchronising first
    would time each instruction from a cold start: 1.6x the issue a free-running step showed
    on the H100); the longest seen per instruction goes to ``issued``."""
    def timed(k: int, run):
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        issued[k] = max(issued.get(k, 0.0), seconds)
        return out, seconds
    return timed


def device_timer(cupy, issued: dict[int, float]):
    """``timed(k, run)``: the device seconds of the kernels ``run()`` queues. A one-thread
    spin kernel holds the stream for twice the instruction's host issue (``issued``, from a
    :func:`host_timer` run) so every kernel is queued before the first starts; CUDA events
    recorded after the spin and after the instruction time the kernels back to back."""
    spin = cupy.RawKernel(SPIN_SOURCE, "autopar_spin")
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    device = cupy.cuda.Device()

    def timed(k: int, run):
        device.synchronize()
        spin((1,), (1,), (np.uint64(int((2.0 * issued.get(k, 1e-3) + SPIN_FLOOR_S) * 1e9)),))
        start.record()
        out = run()
        end.record()
        end.synchronize()
        return out, cupy.cuda.get_elapsed_time(start, end) / 1e3
    return timed


def measure_gpu_op_costs(profile: MachineProfile, sizes: GpuSizes) -> tuple[dict, dict]:
    """({kind: (bytes/s, device s per instruction, how)}, {kind: (host s, how)}) measured on
    the GPU: programs built under device_target GPU; the host's issue of each instruction
    first, then each one's device time at the workload's two widths (``measure_op_fits``).
    Each width's spin holds the stream for that width's own host issue: a wide instruction
    whose issue outlasted a spin sized on the narrow one would count host time as device time."""
    cupy = import_cupy(WHERE)
    before = get_context("device_target")
    set_context(device_target="GPU")
    workloads = (sizes.workload, sizes.wide_workload)
    issued: tuple[dict[int, float], ...] = ({}, {})
    clock = synced_clock(cupy)
    try:
        host, _ = (measure_op_host_seconds(sizes.op_rate_repeats, clock, host_timer(seen), workload=w,
                                           batch=sizes.op_rate_batch) for w, seen in zip(workloads, issued))
        fits = measure_op_fits(profile, sizes.op_rate_repeats, clock, [device_timer(cupy, seen) for seen in issued],
                               workloads, sizes.op_rate_batch)
        return fits, host
    finally:
        set_context(device_target=before)


CUPY_PROBE = GpuProbe(device=_describe_device, gemm_flops=measure_gemm_flops,
                      gemm_efficiency=measure_gemm_efficiency, elementwise_bytes_per_s=measure_elementwise_bytes_per_s,
                      op_overhead_s=measure_op_overhead_s, op_costs=measure_gpu_op_costs)


# ---------------------------------------------------------------- the profile

def calibrate_gpu(name: str, like: MachineProfile | None, sizes: GpuSizes = GPU_FULL,
                  dtypes: Sequence[str] = GPU_GEMM_DTYPES, probe: GpuProbe = CUPY_PROBE,
                  date: str | None = None) -> MachineProfile:
    """The profile of this process's GPU, measured by ``probe``; the collective figures
    copied from ``like`` (one GPU, one rank: nothing to time them with)."""
    unknown = [d for d in dtypes if d not in GPU_GEMM_DTYPES]
    if unknown or not dtypes:
        raise ValueError(format_error(WHERE, "dtypes", f"names from {list(GPU_GEMM_DTYPES)}", repr(list(dtypes)),
                                      "drop the others"))
    if like is None:
        raise ValueError(format_error(WHERE, "like", "a profile to copy the collective figures from",
                                      "None", "pass like=load_profile('h100-8') (--like h100-8): one rank cannot "
                                              "time a collective"))
    device = probe.device()
    said = f"by autopar.calibrate on {device.name} {date or datetime.date.today().isoformat()}"
    wall = "wall clock, device synchronised before and after"
    figures: dict = {"gemm_flops": {}, "gemm_efficiency": {}}
    sources: dict = {}
    n = sizes.gemm_n
    for dtype in dtypes:
        rate, path = probe.gemm_flops(dtype, sizes)
        figures["gemm_flops"][dtype] = rate
        sources[f"gemm_flops.{dtype}"] = (
            f"measured {said}: {device.software}; ops.MatMul forward of ({n}, {n}) @ ({n}, {n}) {dtype} CuPy arrays, "
            f"{path}; {sizes.gemm_calls} calls per timing, best of {sizes.gemm_repeats}: 2*n^3 / {wall}")
        figures["gemm_efficiency"][dtype] = probe.gemm_efficiency(dtype, rate, sizes)
        sources[f"gemm_efficiency.{dtype}"] = (
            f"measured {said}: ({n}, d) @ (d, {n}) {dtype} MatMul forwards for d in {list(sizes.efficiency_dims)}, "
            f"best of {sizes.gemm_repeats}, {wall}: their rate over gemm_flops.{dtype}")
    figures["elementwise_bytes_per_s"] = probe.elementwise_bytes_per_s(sizes)
    sources["elementwise_bytes_per_s"] = (
        f"measured {said}: cupy.add of two {sizes.elementwise_bytes // MiB} MiB float32 arrays into a fresh one, "
        f"{sizes.elementwise_calls} calls per timing, best of {sizes.elementwise_repeats}: 3 * bytes / {wall}")
    figures["op_overhead_s"], count = probe.op_overhead_s(sizes)
    sources["op_overhead_s"] = (
        f"measured {said}: autopar Program.run under device_target GPU of a chain of {count} tiny (4, 4) float32 "
        f"ops (Add, Mul, Tanh), {sizes.chain_runs} runs per timing, best of {sizes.chain_repeats}: "
        f"{wall} / runs / {count} (Python dispatch + kernel launch)")
    fits, host = probe.op_costs(provisional_profile(figures), sizes)
    figures["op_bytes_per_s"] = {kind: rate for kind, (rate, _, _) in fits.items()}
    figures["op_device_s"] = {kind: fixed for kind, (_, fixed, _) in fits.items()}
    figures["op_host_s"] = {kind: seconds for kind, (seconds, _) in host.items()}
    for kind, (_, _, how) in fits.items():
        for key in (f"op_bytes_per_s.{kind}", f"op_device_s.{kind}"):
            sources[key] = (f"measured {said}: {how}; each instruction's device time (CUDA events, the stream "
                            f"held by a spin kernel while the host issued it)")
    for kind, (_, how) in host.items():
        sources[f"op_host_s.{kind}"] = f"measured {said}: {how}; host clock around each, the device running"
    collective, collective_sources = copied_collectives(like, said)
    figures.update(collective)
    sources.update(collective_sources)
    figures["devices_per_node"] = 1
    sources["devices_per_node"] = f"measured {said}: one rank on one GPU (a one-GPU profile)"
    figures["kernel_overlap"] = 1.0
    sources["kernel_overlap"] = ("assumed: a GPU kernel streams its operands while it computes, so it takes the "
                                 "longer of its FLOPs and bytes times (a roofline); not measured")
    figures["memory_bytes"] = device.memory_bytes
    sources["memory_bytes"] = f"measured {said}: the GPU's total memory, cudaGetDeviceProperties totalGlobalMem"
    return MachineProfile(name=name, sources=sources, **figures)

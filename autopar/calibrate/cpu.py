"""Measure a machine's CPU cores and MPI links (``python -m autopar.calibrate``, the default target).

    OPENBLAS_NUM_THREADS=1 mpiexec -n 2 python -m autopar.calibrate --out my.json --name my-box
    autopar.strategy.profile.load_profile("my.json")   # what the cost model reads

Every rank measures at once, as the ranks of a training job run at once, and a figure is the
slowest rank's (a synchronous step waits for it). Timings are the best of k repeats; compute is
timed on the rank's thread CPU time, collectives on the wall clock. Both keep the figures of a
machine shared with other work close to what the machine does when it is not.

| figure                          | method                                                           |
|---------------------------------|------------------------------------------------------------------|
| gemm_flops.<dtype>              | 2·n³ / time of an (n, n) @ (n, n) ``ops.MatMul`` (numpy's BLAS, |
|                                 | or oneMKL under AUTOPAR_BLAS=mkl), 1 BLAS thread per rank        |
| elementwise_bytes_per_s         | np.add of two arrays into a fresh one: 3·nbytes / time           |
| gemm_efficiency.<dtype>         | per d: 2·b·d·b / time of a (b, d) @ (d, b) matmul over the       |
|                                 | gemm_flops rate (skinny GEMMs run below peak; b = gemm_n)        |
| collective_wait_s               | mean over ranks of (time of a 1-element all-reduce right after  |
|                                 | identical GEMM work) - latency: what ranks arriving apart add    |
| op_overhead_s                   | autopar Program of a chain of tiny (4, 4) elementwise ops:       |
|                                 | time of one run / its instruction count                          |
| intra_node_latency_s            | mean time of a 1-element float32 all-reduce among one host's     |
|                                 | ranks                                                            |
| intra_node_bandwidth_bytes_per_s| 2(n-1)/n · bytes / (t - latency), t the time of a large          |
|                                 | all-reduce among one host's ranks                                |
| inter_node_latency_s, _bandwidth| the same among ranks on different hosts (the k-th rank of every  |
|                                 | host; all such groups at once, as data-parallel groups run)      |
| devices_per_node                | ranks on rank 0's host, as launched                              |
| memory_bytes                    | MemTotal of /proc/meminfo / ranks on the host                    |

Collectives go through ``autopar.comm`` with freed memory retained, the path the runtime takes,
so their latency includes autopar's own per-call cost. Hosts are told apart by
``MPI.Get_processor_name()``. With one host, the inter-node figures are assumed equal to the
intra-node ones; with one rank per host, the intra-node ones equal the inter-node ones.

One rank cannot measure a collective. Rather than invent figures, a one-rank run stops with an
error unless ``--like PROFILE`` is given; then it copies the four collective figures from that
profile, and their sources say so. Rank 0 writes the file atomically (a temporary name, then
a rename); every source says ``measured by autopar.calibrate on <host> <date>: <method>``.
"""
from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from .. import nn, ops
from ..comm import Communicator
from ..models.op_rates import QUICK_WORKLOAD, measure_op_rates
from ..runtime.allocator import retain_freed_memory
from ..runtime.program import Program
from ..runtime.trace import trace
from ..strategy.formulas import collective_factor
from ..strategy.profile import MachineProfile

GEMM_DTYPES = ("float32", "float64")      # the dtypes numpy multiplies through BLAS
HOST_NAME_BYTES = 256                     # MPI_MAX_PROCESSOR_NAME is 256 in MPICH and Open MPI
MiB = 2 ** 20
# Compute is timed on the rank's own CPU time, so that time the OS gives other processes of a
# shared machine does not count; collectives on the wall clock, as they wait for every member.
COMPUTE_CLOCK = time.thread_time
COLLECTIVE_FIELDS = ("intra_node_latency_s", "intra_node_bandwidth_bytes_per_s",
                     "inter_node_latency_s", "inter_node_bandwidth_bytes_per_s")


@dataclass(frozen=True)
class Sizes:
    """How much to measure: problem sizes and repeat counts (best of ``*_repeats``)."""

    gemm_n: int                    # GEMM operands are (gemm_n, gemm_n)
    gemm_repeats: int
    elementwise_bytes: int         # bytes of each np.add operand
    elementwise_repeats: int
    chain_links: int               # tiny-op chain: 3 ops per link
    chain_runs: int                # program runs per timed repeat
    chain_repeats: int
    latency_calls: int             # small all-reduces per timed round
    latency_rounds: int
    allreduce_bytes: int           # the large all-reduce's buffer
    allreduce_repeats: int
    efficiency_dims: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)   # min(m, n, k) of the skinny GEMMs
    wait_repeats: int = 20         # all-reduces after identical work (collective_wait_s)


FULL = Sizes(gemm_n=2048, gemm_repeats=5, elementwise_bytes=64 * MiB, elementwise_repeats=10,
             chain_links=70, chain_runs=20, chain_repeats=5, latency_calls=1000, latency_rounds=5,
             allreduce_bytes=16 * MiB, allreduce_repeats=20)
# Quick: smaller GEMM (about 90% of peak here) and fewer repeats. The elementwise arrays stay
# at 64 MiB: three 16 MiB arrays fit in this machine's 32 MiB L3 well enough to read 2-3x fast.
QUICK = Sizes(gemm_n=512, gemm_repeats=3, elementwise_bytes=64 * MiB, elementwise_repeats=5,
              chain_links=70, chain_runs=5, chain_repeats=3, latency_calls=200, latency_rounds=5,
              allreduce_bytes=4 * MiB, allreduce_repeats=20)


# ---------------------------------------------------------------- timing

def best_seconds_together(comm: Communicator, fn: Callable[[], object], repeats: int,
                          clock: Callable[[], float] = time.perf_counter) -> float:
    """Best-of-``repeats`` seconds of ``fn()`` on ``clock``, every rank starting each repeat
    together (a barrier); the slowest rank's best."""
    best = math.inf
    for _ in range(repeats):
        comm.barrier()
        start = clock()
        fn()
        best = min(best, clock() - start)
    return float(comm.allreduce(np.array([best]), op="max")[0])


# ---------------------------------------------------------------- compute

def measure_gemm_flops(comm: Communicator, dtype: str, n: int, repeats: int) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in ``dtype``: 2·n³ / best time, slowest rank.
    The caller limits BLAS to one thread (see :func:`calibrate`)."""
    if dtype not in GEMM_DTYPES:
        raise ValueError(f"measure_gemm_flops: dtype: expected one of {list(GEMM_DTYPES)}, got {dtype!r}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)      # (n, n)
    b = rng.standard_normal((n, n)).astype(dtype)      # (n, n)
    product = ops.MatMul().forward                     # the GEMM a program's MatMul runs here
    product(a, b)                                      # warm-up: BLAS buffers, pages
    return 2.0 * n ** 3 / best_seconds_together(comm, lambda: product(a, b), repeats, COMPUTE_CLOCK)


def measure_gemm_efficiency(comm: Communicator, dtype: str, peak: float, b: int, dims: Sequence[int],
                            repeats: int) -> tuple[tuple[float, float], ...]:
    """Per d of ``dims``: the rate of a (b, d) @ (d, b) matmul (its smallest dimension d) as a
    fraction of ``peak`` (the square GEMM's rate, so the largest d reads about 1), slowest rank."""
    rng = np.random.default_rng(0)
    product = ops.MatMul().forward
    points = []
    for d in sorted(dims):
        a = rng.standard_normal((b, d)).astype(dtype)      # (b, d)
        w = rng.standard_normal((d, b)).astype(dtype)      # (d, b)
        product(a, w)
        rate = 2.0 * b * d * b / best_seconds_together(comm, lambda: product(a, w), repeats, COMPUTE_CLOCK)
        points.append((float(d), min(1.0, rate / peak)))
    return tuple(points)


def measure_collective_wait_s(comm: Communicator, latency_s: float, repeats: int,
                              work: Callable[[], object] | None = None) -> float:
    """Seconds a collective costs beyond ``latency_s`` because ranks reach it apart: every rank
    runs the same ``work`` (default: a few small GEMMs, as a step's ops), then a 1-element
    all-reduce, timed; the mean over ranks of (that time - latency) -- the rank that came
    last waits for no one, the others for it -- median over ``repeats``, at least 0."""
    if work is None:
        rng = np.random.default_rng(comm.rank)
        x = rng.standard_normal((256, 256)).astype(np.float32)      # (256, 256)

        def work():
            for _ in range(4):
                x @ x
    small = np.ones(1, np.float32)
    waits = []
    for _ in range(repeats):
        comm.barrier()
        work()
        start = time.perf_counter()
        comm.allreduce(small)
        waits.append(time.perf_counter() - start)
    mean = comm.allreduce(np.array(waits, np.float64)) / comm.size                # (repeats,) over ranks
    return max(0.0, float(np.median(mean)) - latency_s)


def measure_elementwise_bytes_per_s(comm: Communicator, nbytes: int, repeats: int) -> float:
    """Bytes/s of ``np.add(x, y)`` into a fresh array, as an elementwise kernel runs:
    3·nbytes (two read, one written) / best time, slowest rank."""
    x = np.ones(nbytes // 4, np.float32)
    y = np.ones(nbytes // 4, np.float32)
    np.add(x, y)
    return 3.0 * x.nbytes / best_seconds_together(comm, lambda: np.add(x, y), repeats, COMPUTE_CLOCK)


class TinyOpChain(nn.Cell):
    """``x -> tanh((x + x) * 0.5)``, ``links`` times: three tiny elementwise ops per link."""

    def __init__(self, links: int):
        super().__init__()
        self.links = links
        self.add, self.mul, self.tanh = ops.Add(), ops.Mul(), ops.Tanh()

    def construct(self, x):
        for _ in range(self.links):
            x = self.tanh(self.mul(self.add(x, x), 0.5))
        return x


def compile_forward(cell: nn.Cell, x: np.ndarray) -> Program:
    """The forward Program of ``cell`` on input ``x``, as ``cell(x)`` runs it."""
    traced = trace(cell, (x,), {})
    return Program(traced.graph, traced.graph.outputs)


def measure_op_overhead_s(comm: Communicator, sizes: Sizes) -> tuple[float, int]:
    """(seconds per executed instruction, instruction count) of autopar's executor on a chain
    of tiny (4, 4) float32 ops: best time of ``chain_runs`` runs / runs / instructions."""
    x = np.ones((4, 4), np.float32)                     # (4, 4): dispatch dominates the kernel
    program = compile_forward(TinyOpChain(sizes.chain_links), x)
    count = len(program.instructions)
    program.run([x])

    def runs():
        for _ in range(sizes.chain_runs):
            program.run([x])
    seconds = best_seconds_together(comm, runs, sizes.chain_repeats, COMPUTE_CLOCK)
    return seconds / sizes.chain_runs / count, count


# ---------------------------------------------------------------- collectives

def host_groups(hosts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Ranks grouped by host, hosts in order of their first rank: ["a", "b", "a"] -> ((0, 2), (1,))."""
    groups: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        groups.setdefault(host, []).append(rank)
    return tuple(tuple(g) for g in groups.values())


def cross_host_groups(groups: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Group k = the k-th rank of every host that has one: ((0, 2), (1, 3)) -> ((0, 1), (2, 3)).
    A partition of the ranks; group 0 holds rank 0 and spans every host."""
    depth = max(len(g) for g in groups)
    return tuple(tuple(g[k] for g in groups if k < len(g)) for k in range(depth))


def gather_hosts(comm: Communicator, host: str) -> tuple[str, ...]:
    """Every rank's host name, in rank order (a collective)."""
    raw = host.encode()
    if len(raw) > HOST_NAME_BYTES:
        raise ValueError(f"gather_hosts: host: expected at most {HOST_NAME_BYTES} bytes, got {len(raw)} ({host!r})")
    mine = np.zeros((1, HOST_NAME_BYTES), np.uint8)     # (1, 256)
    mine[0, :len(raw)] = np.frombuffer(raw, np.uint8)
    every = comm.allgather(mine, axis=0)                # (ranks, 256)
    return tuple(bytes(row).rstrip(b"\0").decode() for row in every)


def measure_allreduce(comm: Communicator, sizes: Sizes) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of all-reduce on ``comm``, slowest rank:
    latency = best over rounds of the mean time of ``latency_calls`` 1-element float32 calls;
    bandwidth = 2(n-1)/n · bytes / (t - latency), t the best time of an all-reduce of
    ``allreduce_bytes``."""
    small = np.ones(1, np.float32)
    best = math.inf
    for _ in range(sizes.latency_rounds):
        comm.barrier()
        start = time.perf_counter()
        for _ in range(sizes.latency_calls):
            comm.allreduce(small)
        best = min(best, (time.perf_counter() - start) / sizes.latency_calls)
    latency_s = float(comm.allreduce(np.array([best]), op="max")[0])
    big = np.ones(sizes.allreduce_bytes // 4, np.float32)
    comm.allreduce(big)
    seconds = best_seconds_together(comm, lambda: comm.allreduce(big), sizes.allreduce_repeats)
    if seconds <= latency_s:
        raise RuntimeError(f"measure_allreduce: a {big.nbytes}-byte all-reduce took {seconds:.3g} s, no more "
                           f"than the {latency_s:.3g} s latency; raise Sizes.allreduce_bytes")
    factor = collective_factor("all_reduce", comm.size)
    return latency_s, factor * big.nbytes / (seconds - latency_s)


# ---------------------------------------------------------------- the machine

def memtotal_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal of this host in bytes, from /proc/meminfo (kB lines)."""
    try:
        text = meminfo.read_text()
    except OSError as err:
        raise RuntimeError(f"memtotal_bytes: cannot read {meminfo} ({err}); "
                           "autopar.calibrate reads host memory from /proc/meminfo (Linux)") from None
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"memtotal_bytes: no MemTotal line in {meminfo}")


def blas_description() -> str:
    """numpy's version and its BLAS libraries', e.g. 'numpy 2.4.6 (openblas 0.3.31)'."""
    libs = [f"{i.get('internal_api')} {i.get('version')}" for i in threadpool_info() if i.get("user_api") == "blas"]
    return f"numpy {np.__version__} ({', '.join(libs) or 'BLAS unknown'})"


def calibrate(comm: Communicator, host: str, name: str, sizes: Sizes = FULL,
              dtypes: Sequence[str] = GEMM_DTYPES, like: MachineProfile | None = None) -> MachineProfile:
    """Measure this machine on every rank of ``comm`` (a collective); ``host`` is this rank's
    host name. Returns the profile on every rank; rank 0's holds rank 0's groups' figures."""
    unknown = [d for d in dtypes if d not in GEMM_DTYPES]
    if unknown:
        raise ValueError(f"calibrate: dtypes: expected names from {list(GEMM_DTYPES)}, got {list(dtypes)}")
    if comm.size == 1 and like is None:
        raise ValueError("calibrate: ranks: expected 2 or more to measure collectives, got 1; launch under "
                         "mpiexec -n 2 (or more), or pass like=<a profile> to copy its collective figures")
    retain_freed_memory()                              # as the runtime's programs do
    hosts = gather_hosts(comm, host)
    by_host = host_groups(hosts)
    on_my_host = next(g for g in by_host if comm.rank in g)
    date = datetime.date.today().isoformat()
    said = f"by autopar.calibrate on {hosts[0]} {date}"
    ranks = f"{comm.size} rank{'s' if comm.size > 1 else ''} at once, best of"
    figures: dict = {}
    sources: dict = {}

    with threadpool_limits(limits=1, user_api="blas"):
        blas = blas_description()
        gemm = {}
        for dtype in dtypes:
            gemm[dtype] = measure_gemm_flops(comm, dtype, sizes.gemm_n, sizes.gemm_repeats)
            sources[f"gemm_flops.{dtype}"] = (
                f"measured {said}: {blas}, 1 BLAS thread per rank, ({sizes.gemm_n}, {sizes.gemm_n}) @ "
                f"({sizes.gemm_n}, {sizes.gemm_n}) {dtype} matmul, {ranks} {sizes.gemm_repeats}, slowest rank: "
                f"2*n^3 / thread CPU time")
        figures["gemm_flops"] = gemm
        figures["gemm_efficiency"] = {
            dtype: measure_gemm_efficiency(comm, dtype, gemm[dtype], sizes.gemm_n, sizes.efficiency_dims,
                                           sizes.gemm_repeats) for dtype in dtypes}
        for dtype in dtypes:
            sources[f"gemm_efficiency.{dtype}"] = (
                f"measured {said}: ({sizes.gemm_n}, d) @ (d, {sizes.gemm_n}) {dtype} matmuls for d in "
                f"{list(sizes.efficiency_dims)}, {ranks} {sizes.gemm_repeats}, slowest rank: their rate over "
                f"gemm_flops.{dtype}")
    figures["elementwise_bytes_per_s"] = measure_elementwise_bytes_per_s(
        comm, sizes.elementwise_bytes, sizes.elementwise_repeats)
    sources["elementwise_bytes_per_s"] = (
        f"measured {said}: np.add of two {sizes.elementwise_bytes // MiB} MiB float32 arrays into a fresh one, "
        f"{ranks} {sizes.elementwise_repeats}, slowest rank: 3 * bytes / thread CPU time")
    figures["op_overhead_s"], count = measure_op_overhead_s(comm, sizes)
    sources["op_overhead_s"] = (
        f"measured {said}: autopar Program.run of a chain of {count} tiny (4, 4) float32 ops (Add, Mul, Tanh), "
        f"{sizes.chain_runs} runs, {ranks} {sizes.chain_repeats}, slowest rank: thread CPU time / runs / {count}")

    collective, collective_sources = _collective_figures(comm, by_host, sizes, said, like)
    figures.update(collective)
    sources.update(collective_sources)
    if comm.size > 1:
        with threadpool_limits(limits=1, user_api="blas"):
            figures["collective_wait_s"] = measure_collective_wait_s(
                comm, collective["intra_node_latency_s"], sizes.wait_repeats)
        sources["collective_wait_s"] = (
            f"measured {said}: 4 (256, 256) float32 matmuls on every rank, then a 1-element all-reduce, "
            f"{sizes.wait_repeats} times; median of the ranks' mean call time minus intra_node_latency_s")

    with threadpool_limits(limits=1, user_api="blas"):
        rates = _op_rates(comm, figures, sources, sizes)
    figures["op_bytes_per_s"] = {k: r for k, (r, _) in rates.items()}
    for kind, (_, how) in rates.items():
        sources[f"op_bytes_per_s.{kind}"] = f"measured {said}: {how}; {ranks} and the slowest rank's time"

    figures["devices_per_node"] = len(on_my_host)
    per_host = {hosts[g[0]]: len(g) for g in by_host}
    sources["devices_per_node"] = f"measured {said}: ranks per host as launched: {per_host}"
    figures["memory_bytes"] = memtotal_bytes() // len(on_my_host)
    sources["memory_bytes"] = (f"measured {said}: /proc/meminfo MemTotal / {len(on_my_host)} "
                               f"rank{'s' if len(on_my_host) > 1 else ''} on the host")
    return MachineProfile(name=name, sources=sources, **figures)


def _op_rates(comm: Communicator, figures: dict, sources: dict, sizes: Sizes) -> dict:
    """Per-op-kind throughputs (autopar.models.op_rates), every rank at once, the slowest
    rank's time per kind."""
    quick = sizes is QUICK
    return measure_op_rates(provisional_profile(figures), repeats=2 if quick else 5,
                            workload=QUICK_WORKLOAD if quick else None,
                            agree=lambda secs: comm.allreduce(secs, op="max"))


def provisional_profile(figures: dict) -> MachineProfile:
    """A profile holding the compute figures measured so far (``gemm_flops``,
    ``elementwise_bytes_per_s``, ``op_overhead_s``), the rest placeholders: what the op-rate
    workload reads (the per-op overhead it subtracts) before the real profile exists."""
    placeholders = {"intra_node_latency_s": 1e-6, "intra_node_bandwidth_bytes_per_s": 1e9,
                    "inter_node_latency_s": 1e-6, "inter_node_bandwidth_bytes_per_s": 1e9}
    compute = {k: figures[k] for k in ("gemm_flops", "elementwise_bytes_per_s", "op_overhead_s")}
    named = list(placeholders) + ["devices_per_node", "memory_bytes", "elementwise_bytes_per_s", "op_overhead_s"] + \
        [f"gemm_flops.{d}" for d in compute["gemm_flops"]]
    return MachineProfile(name="provisional", devices_per_node=1, memory_bytes=1,
                          sources={k: "provisional" for k in named}, **placeholders, **compute)


def copied_collectives(like: MachineProfile, said: str) -> tuple[dict, dict]:
    """(figures, sources) of the four collective figures, copied from ``like``: one rank has
    no collective to time."""
    return ({f: getattr(like, f) for f in COLLECTIVE_FIELDS},
            {f: f"not measured {said} (1 rank, no collective to time): copied from profile {like.name!r}, "
                f"whose source says: {like.sources[f]}" for f in COLLECTIVE_FIELDS})


def _collective_figures(comm: Communicator, by_host: tuple[tuple[int, ...], ...], sizes: Sizes, said: str,
                        like: MachineProfile | None) -> tuple[dict, dict]:
    """(figures, sources) of the four collective figures, measured where there is a link to
    time, else assumed equal to the other link (or, on one rank, copied from ``like``)."""
    if comm.size == 1:
        return copied_collectives(like, said)
    method = (f"through autopar.comm, freed memory retained, wall clock; latency: mean of {sizes.latency_calls} "
              f"1-element float32 all-reduces, best of {sizes.latency_rounds} rounds; bandwidth: "
              f"2(n-1)/n * bytes / (time - latency), {sizes.allreduce_bytes // MiB} MiB float32 all-reduce, "
              f"best of {sizes.allreduce_repeats}; slowest rank")
    across = cross_host_groups(by_host)
    inside = next(g for g in by_host if 0 in g)
    measured: dict[str, tuple[float, float, str]] = {}   # link -> (latency s, bandwidth bytes/s, who)
    if len(inside) > 1:                                  # every host's ranks at once
        measured["intra"] = measure_allreduce(comm.split(by_host), sizes) + (f"{len(inside)} ranks on one host",)
    if len(by_host) > 1:                                 # every cross-host group at once
        measured["inter"] = measure_allreduce(comm.split(across), sizes) + (
            f"{len(across[0])} ranks on as many hosts, {len(across)} such groups at once",)
    figures, sources = {}, {}
    for link, other in (("intra", "inter"), ("inter", "intra")):
        if link in measured:
            latency, bandwidth, who = measured[link]
            text = f"measured {said}: all-reduce among {who}, {method}"
        else:
            latency, bandwidth, _ = measured[other]
            why = ("all ranks ran on one host, there is no inter-node link to time" if link == "inter"
                   else "one rank per host, there is no intra-node link to time")
            text = f"assumed equal to {other}-node {said}: {why}"
        figures[f"{link}_node_latency_s"], figures[f"{link}_node_bandwidth_bytes_per_s"] = latency, bandwidth
        sources[f"{link}_node_latency_s"] = sources[f"{link}_node_bandwidth_bytes_per_s"] = text
    return figures, sources


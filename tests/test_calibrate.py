"""autopar.calibrate: a quick 2-rank run writes a profile whose figures predict other sizes
within 2x; one-rank runs, bad arguments and the op_overhead_s field."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_comm_mpi_launch import MPIEXEC

from autopar.calibrate import (
    QUICK,
    Sizes,
    calibrate,
    cross_host_groups,
    host_groups,
    main,
    measure_collective_wait_s,
    measure_gemm_efficiency,
    measure_gemm_flops,
    memtotal_bytes,
)
from autopar.comm import SelfCommunicator, run_in_process
from autopar.comm.mpi import launched_under_mpi
from autopar.strategy import formulas as cost
from autopar.strategy.profile import (
    DEFAULTED_SOURCE,
    SOURCED_FIELDS,
    MachineProfile,
    load_profile,
)

ROOT = Path(__file__).resolve().parent.parent
MiB = 2 ** 20
TOLERANCE = 2.0                    # a prediction within 2x of the measured time
BUSY_LIMIT = 0.5                   # share of the CPUs other processes may take while we time

QUICK_RUN = """
    import json, sys, time
    import numpy as np
    from threadpoolctl import threadpool_limits
    from autopar import nn, ops
    from autopar.calibrate import main
    from autopar.comm import world
    from autopar.runtime.program import Program
    from autopar.runtime.trace import trace

    class SubNegChain(nn.Cell):           # ops other than the calibration chain's, on another shape
        def __init__(self):
            super().__init__()
            self.sub, self.neg = ops.Sub(), ops.Neg()
        def construct(self, x):
            for _ in range(60):
                x = self.neg(self.sub(x, 1.0))
            return x

    rc = main(["--quick", "--out", sys.argv[1], "--name", "quick-test"])
    comm = world()

    def slowest_best(fn, clock, repeats=7):   # timed apart from calibrate, on the clocks it uses
        fn()
        best = float("inf")
        for _ in range(repeats):
            comm.barrier()
            start = clock()
            fn()
            best = min(best, clock() - start)
        return float(comm.allreduce(np.array([best]), op="max")[0])

    probe = {{"rc": rc}}
    a32, b32 = np.ones((640, 384), np.float32), np.ones((384, 768), np.float32)
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        probe["matmul_float32_s"] = slowest_best(lambda: a32 @ b32, time.thread_time)
        probe["matmul_float64_s"] = slowest_best(lambda: a64 @ b64, time.thread_time)
    x, y = np.ones({add_bytes} // 4, np.float32), np.full({add_bytes} // 4, 2.0, np.float32)
    probe["add_s"] = slowest_best(lambda: np.add(x, y), time.thread_time)
    tiny = np.zeros((8, 8), np.float32)
    traced = trace(SubNegChain(), (tiny,), {{}})
    program = Program(traced.graph, traced.graph.outputs)
    probe["chain_instructions"] = len(program.instructions)
    probe["chain_s"] = slowest_best(lambda: program.run([tiny]), time.thread_time, repeats=20)
    buf = np.ones({allreduce_bytes} // 4, np.float32)
    probe["allreduce_s"] = slowest_best(lambda: comm.allreduce(buf), time.perf_counter, repeats=25)
    if comm.rank == 0:
        print("PROBE", json.dumps(probe))
"""
MATMUL = (640, 384, 768)                   # (m, k, n); calibration used (512, 512) @ (512, 512)
PROBE_ADD_BYTES = 40 * MiB                 # calibration added 64 MiB arrays
PROBE_ALLREDUCE_BYTES = 1 * MiB            # calibration timed 4 bytes and 4 MiB


def assert_within(predicted: float, measured: float, what: str) -> None:
    ratio = predicted / measured
    assert 1 / TOLERANCE <= ratio <= TOLERANCE, (
        f"{what}: predicted {predicted:.3g} s, measured {measured:.3g} s (ratio {ratio:.2f})")


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of this machine have used since boot (/proc/stat, with steal)."""
    first_line = Path("/proc/stat").read_text().split("\n", 1)[0]              # cpu user nice system idle ...
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first_line.split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(profile, probe timings, share of the CPUs other processes used meanwhile) of
    `mpiexec -n 2`: calibrate --quick, then time other sizes and ops on both ranks at once,
    as calibrate does (best of k, slowest rank)."""
    if MPIEXEC is None or launched_under_mpi():
        pytest.skip("needs mpiexec, not already under an MPI launcher")
    folder = tmp_path_factory.mktemp("calibrate")
    script, out = folder / "quick_run.py", folder / "quick.json"
    script.write_text(textwrap.dedent(QUICK_RUN.format(add_bytes=PROBE_ADD_BYTES,
                                                       allreduce_bytes=PROBE_ALLREDUCE_BYTES)))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=path)
    busy, ours, start = busy_cpu_seconds(), children_cpu_seconds(), time.monotonic()
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), str(out)], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=120)
    others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - ours)
    others_share = others / ((os.cpu_count() or 1) * (time.monotonic() - start))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    probe = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")))
    assert probe["rc"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["quick.json", "quick_run.py"]   # no temporary left
    return load_profile(out), probe, others_share


@pytest.fixture
def timings(quick_run):
    """(profile, probe) when the machine was quiet enough for timings to compare. Timings are
    benchmark material, not unit-test material: they run only with AUTOPAR_TIMING_TESTS=1
    (a CI run on a shared machine measured a 2.3x op-overhead ratio once)."""
    if os.environ.get("AUTOPAR_TIMING_TESTS") != "1":
        pytest.skip("timing comparison: set AUTOPAR_TIMING_TESTS=1 on a quiet machine to run it")
    profile, probe, others_share = quick_run
    if others_share > BUSY_LIMIT:
        pytest.skip(f"other processes used {others_share:.0%} of the CPUs while calibrate and the probes ran "
                    f"(limit {BUSY_LIMIT:.0%}); their timings say nothing about the model")
    return profile, probe


# ---------------------------------------------------------------- the 2-rank quick run

def test_quick_two_rank_run_writes_a_loadable_profile(quick_run):
    profile, _, _ = quick_run
    assert profile.name == "quick-test"
    assert profile.devices_per_node == 2
    assert profile.memory_bytes == memtotal_bytes() // 2
    assert set(profile.gemm_flops) == {"float32", "float64"}
    assert profile.op_overhead_s > 0
    assert profile.inter_node_latency_s == profile.intra_node_latency_s
    assert profile.inter_node_bandwidth_bytes_per_s == profile.intra_node_bandwidth_bytes_per_s
    for key in [*SOURCED_FIELDS, "op_overhead_s", "gemm_flops.float32", "gemm_flops.float64"]:
        text = profile.sources[key]
        if key.startswith("inter_node"):
            assert text.startswith("assumed equal to intra-node by autopar.calibrate on "), text
        else:
            assert text.startswith("measured by autopar.calibrate on "), text
    assert "2 ranks on one host" in profile.sources["intra_node_bandwidth_bytes_per_s"]
    for dtype in ("float32", "float64"):            # a curve per dtype, sourced, d increasing
        ds = [d for d, _ in profile.gemm_efficiency[dtype]]
        assert ds == sorted(ds) and all(0 < f <= 1 for _, f in profile.gemm_efficiency[dtype])
        assert profile.sources[f"gemm_efficiency.{dtype}"].startswith("measured by autopar.calibrate on ")
    assert profile.collective_wait_s >= 0 and profile.sources["collective_wait_s"].startswith("measured")


def test_allreduce_prediction_at_another_size_is_within_2x(timings):
    profile, probe = timings
    predicted = cost.collective_seconds("all_reduce", PROBE_ALLREDUCE_BYTES, 2, profile, inter_node=False)
    assert_within(predicted, probe["allreduce_s"], f"{PROBE_ALLREDUCE_BYTES}-byte all-reduce on 2 ranks")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_rate_predicts_a_matmul_of_other_shapes_within_2x(timings, dtype):
    profile, probe = timings
    m, k, n = MATMUL
    predicted = cost.compute_seconds(2.0 * m * k * n, 0.0, dtype, profile)
    assert_within(predicted, probe[f"matmul_{dtype}_s"], f"({m}, {k}) @ ({k}, {n}) {dtype}")


def test_elementwise_rate_predicts_an_add_of_another_size_within_2x(timings):
    profile, probe = timings
    predicted = cost.compute_seconds(0.0, 3.0 * PROBE_ADD_BYTES, "float32", profile)
    assert_within(predicted, probe["add_s"], f"np.add of {PROBE_ADD_BYTES // MiB} MiB float32 arrays")


def test_op_overhead_predicts_another_tiny_op_chain_within_2x(timings):
    profile, probe = timings
    assert probe["chain_instructions"] == 120
    predicted = probe["chain_instructions"] * profile.op_overhead_s
    assert_within(predicted, probe["chain_s"], "120 tiny Sub/Neg instructions on (8, 8)")


# ---------------------------------------------------------------- one rank, bad arguments

def test_one_rank_without_like_stops_and_says_how_to_launch(tmp_path, capsys):
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ranks: expected 2 or more MPI ranks" in err and "got 1" in err, err
    assert "mpiexec -n 2" in err and "--like" in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="ranks: expected 2 or more"):
        calibrate(SelfCommunicator(), "h", "x", QUICK)


def test_one_rank_with_like_copies_the_collective_figures_and_says_so(tmp_path):
    out = tmp_path / "one.json"
    assert main(["--quick", "--dtypes", "float32", "--like", "cpu-2core", "--out", str(out), "--name", "one"]) == 0
    profile, like = load_profile(out), load_profile("cpu-2core")
    assert set(profile.gemm_flops) == {"float32"} and profile.devices_per_node == 1
    assert profile.memory_bytes == memtotal_bytes()
    for field in ("intra_node_latency_s", "intra_node_bandwidth_bytes_per_s",
                  "inter_node_latency_s", "inter_node_bandwidth_bytes_per_s"):
        assert getattr(profile, field) == getattr(like, field)
        assert profile.sources[field].startswith("not measured by autopar.calibrate on ")
        assert "copied from profile 'cpu-2core'" in profile.sources[field]
    assert profile.sources["gemm_flops.float32"].startswith("measured by autopar.calibrate on ")


@pytest.mark.parametrize("args,needle", [
    (["--out", "{tmp}/no/such/folder/p.json"],
     "argument --out: expected a writable file path, got '{tmp}/no/such/folder/p.json': its folder"),
    (["--out", "{tmp}"], "argument --out: expected a writable file path, got '{tmp}': it is a directory"),
    (["--dtypes", "float16"], ("argument --dtypes: expected a comma-separated list of float32, float64, "
                               "got 'float16' (float16 unknown)")),
    (["--like", "tpu-v9", "--out", "{tmp}/p.json"], "argument --like: load_profile: no profile named 'tpu-v9'"),
])
def test_bad_arguments_name_the_argument_expected_and_actual(tmp_path, capsys, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", *args])
    assert exit_info.value.code == 2
    assert needle.format(tmp=tmp_path) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gemm_of_an_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match=r"dtype: expected one of \['float32', 'float64'\], got 'int8'"):
        measure_gemm_flops(SelfCommunicator(), "int8", 8, 1)


# ---------------------------------------------------------------- hosts

def test_ranks_are_grouped_by_host_and_across_hosts():
    assert host_groups(["a", "b", "a", "b"]) == ((0, 2), (1, 3))
    assert cross_host_groups(((0, 2), (1, 3))) == ((0, 1), (2, 3))
    assert host_groups(["a", "a", "a", "b"]) == ((0, 1, 2), (3,))
    assert cross_host_groups(((0, 1, 2), (3,))) == ((0, 3), (1,), (2,))


TINY = Sizes(gemm_n=32, gemm_repeats=1, elementwise_bytes=MiB, elementwise_repeats=1, chain_links=2,
             chain_runs=1, chain_repeats=1, latency_calls=20, latency_rounds=3, allreduce_bytes=8 * MiB,
             allreduce_repeats=3)   # best of several: one call stalled by a busy machine is not the latency


@pytest.mark.parametrize("hosts,intra,inter", [
    (("a", "a", "b", "b"), "measured by autopar.calibrate on a ", "measured by autopar.calibrate on a "),
    (("a", "b", "c", "d"), "assumed equal to inter-node", "measured by autopar.calibrate on a "),
])
def test_hosts_decide_which_link_is_measured(hosts, intra, inter):
    """Four in-process ranks told they sit on two hosts (or four): rank 0's profile measures
    the intra-node link among its host's ranks and the inter-node link across hosts."""
    profiles = run_in_process(4, lambda comm: calibrate(comm, hosts[comm.rank], "fake", TINY, ("float32",)))
    profile = profiles[0]
    per_host = 4 // len(set(hosts))
    assert profile.devices_per_node == per_host
    assert profile.memory_bytes == memtotal_bytes() // per_host
    assert profile.sources["intra_node_latency_s"].startswith(intra)
    assert profile.sources["inter_node_bandwidth_bytes_per_s"].startswith(inter)
    if per_host == 2:
        assert "among 2 ranks on one host" in profile.sources["intra_node_latency_s"]
        assert "among 2 ranks on as many hosts, 2 such groups at once" in profile.sources["inter_node_latency_s"]
    else:
        assert profile.intra_node_latency_s == profile.inter_node_latency_s


# ---------------------------------------------------------------- the op_overhead_s field

def _profile_dict(**overrides) -> dict:
    data = load_profile("cpu-2core").to_dict()
    data.update(overrides)
    return data


def test_a_profile_without_op_overhead_still_loads_with_zero(tmp_path):
    data = _profile_dict()
    del data["op_overhead_s"]
    del data["sources"]["op_overhead_s"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    profile = load_profile(path)
    assert profile.op_overhead_s == 0.0
    assert profile.sources["op_overhead_s"] == DEFAULTED_SOURCE
    assert MachineProfile.from_dict(profile.to_dict()) == profile


@pytest.mark.parametrize("value", [-1e-6, float("nan"), float("inf"), "fast", True])
def test_bad_op_overhead_is_rejected_naming_the_field(value):
    with pytest.raises(ValueError, match="op_overhead_s"):
        MachineProfile.from_dict(_profile_dict(op_overhead_s=value))


def test_op_overhead_needs_a_source_when_given():
    data = _profile_dict(op_overhead_s=3e-6)
    del data["sources"]["op_overhead_s"]
    with pytest.raises(ValueError, match=r"names no source for \['op_overhead_s'\]"):
        MachineProfile.from_dict(data)


def test_every_shipped_profile_sources_its_op_overhead():
    for name in ("cpu-2core", "ascend910-2048", "a100-8", "h100-8"):
        profile = load_profile(name)
        assert profile.op_overhead_s > 0, name
        assert profile.sources["op_overhead_s"] != DEFAULTED_SOURCE, name


def test_collective_wait_is_the_mean_skew_of_arrival():
    """Rank 1 works 40 ms longer before every all-reduce: rank 0 waits ~40 ms, rank 1 ~0, so
    the measured wait is ~20 ms per call (the method, with the skew known)."""
    def body(comm):
        def work():
            if comm.rank == 1:
                time.sleep(0.04)
        return measure_collective_wait_s(comm, 0.0, 5, work)
    waits = run_in_process(2, body)
    assert waits[0] == waits[1]                                # every rank reports the same figure
    assert 0.015 < waits[0] < 0.035, waits


def test_skinny_gemms_reach_a_smaller_fraction_of_the_rate():
    """A (512, 4) @ (4, 512) matmul does 4 multiply-adds per output it writes: far below the
    square GEMM's rate; the widest point is near it (numpy's BLAS, one thread)."""
    comm = SelfCommunicator()
    peak = measure_gemm_flops(comm, "float32", 512, 3)
    curve = dict(measure_gemm_efficiency(comm, "float32", peak, 512, (4, 512), 3))
    assert curve[4.0] < 0.5 * curve[512.0]

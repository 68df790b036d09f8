"""Sums through the host's shared window (autopar/comm/shm.py) under real mpiexec: every
result is the members' arrays summed in member order -- bit for bit what the in-process
backend gives -- for each dtype, layout and call, with sums split into several pieces; MPI's
own path (shared_memory=False) agrees to rounding; a subgroup gets its own window."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_comm_mpi_launch import MPIEXEC

from autopar.comm import run_in_process, shm
from autopar.comm.mpi import launched_under_mpi

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
    import time
    import numpy as np
    import autopar.comm.shm as shm
    shm.SLOT_BYTES = 96 * 1024       # every sum below spans several pieces, the last one partial
    shm.HAND_OVER_BYTES = 512 * 1024  # sums from 512 KB on run on the helper thread, smaller ones on the caller
    from autopar.comm import world
    from autopar.comm.base import CommStats
    from autopar.comm.mpi import MPICommunicator, _mpi
    from autopar.dtype import bfloat16

    comm = world()
    plain = MPICommunicator(_mpi().COMM_WORLD.Dup(), CommStats(), checks=comm.checks, shared_memory=False)
    n, me = comm.size, comm.rank

    def members(shape, dtype, salt):
        "every member's array (each member can make all of them: seeded by member)"
        out = []
        for k in range(n):
            x = np.random.default_rng(1000 * salt + k).standard_normal(shape)
            out.append((x * 1000).astype(dtype) if np.dtype(dtype).kind == "i" else x.astype(dtype))
        return out

    def in_order(xs, dtype):
        "member 0 + member 1 + ..., in the wide dtype, rounded back once (the in-process backend's sum)"
        wide = np.float32 if dtype == bfloat16 else dtype
        acc = xs[0].astype(wide)
        for x in xs[1:]:
            acc = acc + x.astype(wide)
        return acc.astype(dtype)

    def same(a, b):
        return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()

    for salt, dtype in enumerate([np.float32, np.float64, bfloat16, np.int64]):
        xs = members((6, 30_003), dtype, salt)                 # 180 018 elements: >= shm.MIN_BYTES for each dtype
        x, before = xs[me], xs[me].copy()
        want = in_order(xs, dtype)
        assert same(comm.allreduce(x), want), dtype
        assert same(x, before), "the input was modified"
        assert same(comm.allreduce(np.asfortranarray(x)), want), dtype            # a layout MPI cannot take as is
        assert same(comm.iallreduce(x).wait(), want), dtype
        donated = x.copy()
        assert same(comm.iallreduce(donated, donate=True).wait(), want), dtype
        sizes = [0, 7, 30_000, 1, 0, 150_010]                  # parts across piece boundaries, empty ones too
        cuts = np.cumsum([0] + sizes)
        parts = [x.reshape(-1)[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        joined = comm.iallreduce_joined(parts).wait()
        assert same(joined, want.reshape(-1)[:cuts[-1]]), dtype
        assert same(x, before), "a part was modified"
        mpi = plain.allreduce(x)
        np.testing.assert_allclose(mpi.astype(np.float64), want.astype(np.float64), rtol=1e-2 if dtype == bfloat16
                                   else 1e-5, atol=1e-2 if dtype == bfloat16 else 1e-4)
        ys = members((4, 3 * n * 20_001), dtype, salt + 10)         # blocks along axis 1
        block = ys[0].shape[1] // n
        total = in_order(ys, dtype)
        for got in (comm.reduce_scatter(ys[me], axis=1), comm.ireduce_scatter(ys[me], axis=1).wait()):
            assert same(got, np.ascontiguousarray(total[:, me * block:(me + 1) * block])), dtype
        np.testing.assert_allclose(plain.reduce_scatter(ys[me], axis=1).astype(np.float64),
                                   got.astype(np.float64), rtol=1e-2, atol=1e-2)
    assert type(comm._shm).__name__ == "SharedSum" and plain._shm is None

    pair = comm.split([(0, 2), (1,)])                          # a subgroup: its own window
    xs = members((100_003,), np.float32, 42)
    got = pair.allreduce(xs[me])
    if me != 1:
        assert same(got, in_order([xs[0], xs[2]], np.float32))
        assert type(pair._shm).__name__ == "SharedSum"
    else:                                                      # a group of one: its own array back
        assert same(got, xs[1])
    MPI = _mpi()
    threaded = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
    assert (comm._shm._jobs is not None) == threaded            # the sums run on the window's helper thread

    # several sums in flight at once (each more pieces than the window has sets), a blocking
    # one issued among them, waited for out of order
    xs, ys, zs = members((250_007,), np.float32, 7), members((3, n * 40_000), np.float64, 8), \
        members((60_001,), np.float32, 9)
    first = comm.iallreduce_joined([xs[me][:100], xs[me][100:]])
    second = comm.ireduce_scatter(ys[me], axis=1)
    third = comm.allreduce(zs[me])
    assert same(third, in_order(zs, np.float32))
    assert same(second.wait(), np.ascontiguousarray(in_order(ys, np.float64)[:, me * 40_000:(me + 1) * 40_000]))
    assert same(first.wait(), in_order(xs, np.float32))

    if threaded:   # a non-blocking sum (of shm.HAND_OVER_BYTES or more) returns at once: the last member comes late
        bigs = members((shm.HAND_OVER_BYTES // 4 + 1,), np.float32, 11)
        if me == n - 1:
            time.sleep(1.0)
        began = time.perf_counter()
        late = comm.iallreduce(bigs[me])
        started, done_early = time.perf_counter() - began, late.test()
        assert same(late.wait(), in_order(bigs, np.float32))
        if me == 0:
            assert started < 0.5 and not done_early, (started, done_early)

    # one member slow to sum its share or to copy a piece out: the others, one set of slots
    # ahead, must not overwrite what it still reads
    window = comm._shm
    for step in ("_sum", "_drain"):
        if me == 0:
            fast = getattr(window, step)
            setattr(window, step, lambda *args, fast=fast: (time.sleep(0.005), fast(*args)))
        assert same(comm.allreduce(xs[me]), in_order(xs, np.float32)), step          # 11 pieces
        assert same(comm.iallreduce(ys[me].copy(), donate=True).wait(), in_order(ys, np.float64)), step
        got = comm.reduce_scatter(ys[me], axis=1)                                     # 5 pieces
        assert same(got, np.ascontiguousarray(in_order(ys, np.float64)[:, me * 40_000:(me + 1) * 40_000])), step
        if me == 0:
            delattr(window, step)

    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=me)   # on the caller, no helper thread
    inline = shm.SharedSum(MPI, node, tuple(range(n)), 30.0, None, slot_bytes=64 * 1024, threaded=False)
    assert inline._jobs is None
    for k in range(2):
        got = inline.allreduce([xs[me]], np.empty_like(xs[me]), ("allreduce", k + 1, ""))
        assert same(got, in_order(xs, np.float32))
    got = inline.reduce_scatter(ys[me].reshape(n, -1), np.empty(ys[me].size // n), ("reduce_scatter", 3, ""))
    assert same(got, np.ascontiguousarray(in_order([y.reshape(n, -1) for y in ys], np.float64)[me]))

    small = comm.allreduce(np.arange(4.0) + me)                 # below MIN_BYTES: MPI's call
    assert small.tolist() == (n * np.arange(4.0) + sum(range(n))).tolist()
    if me == 0:
        print("shared sums ok", flush=True)
"""


@pytest.mark.skipif(MPIEXEC is None or launched_under_mpi(), reason="needs mpiexec, not under it")
def test_shared_sums_are_the_member_order_sums_on_three_ranks(tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT), AUTOPAR_COMM_WATCHDOG="30")
    env.pop(shm.ENV, None)
    job = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert job.returncode == 0 and "shared sums ok" in job.stdout, f"stdout:\n{job.stdout}\nstderr:\n{job.stderr}"


def test_member_order_is_what_the_in_process_backend_sums():
    """The reference the MPI test holds the shared window to: run_in_process sums in member order."""
    xs = [np.random.default_rng(k).standard_normal(1000).astype(np.float32) for k in range(3)]
    got = run_in_process(3, lambda comm: comm.allreduce(xs[comm.rank]))
    want = (xs[0] + xs[1]) + xs[2]
    assert all(g.tobytes() == want.tobytes() for g in got)


def test_a_joined_allreduce_is_the_allreduce_of_the_joined_arrays():
    """The default (every backend but MPI's window): the parts concatenated, then all-reduced."""
    shapes = [(3, 4), (0,), (5,), (2, 2, 2)]

    def body(comm):
        parts = [np.random.default_rng(10 * comm.rank + k).standard_normal(s) for k, s in enumerate(shapes)]
        joined = np.concatenate([p.reshape(-1) for p in parts])
        return comm.iallreduce_joined(parts).wait(), comm.allreduce(joined), parts, joined

    for got, want, parts, joined in run_in_process(3, body):
        assert got.shape == (sum(int(np.prod(s)) for s in shapes),) and got.tobytes() == want.tobytes()
        np.testing.assert_array_equal(np.concatenate([p.reshape(-1) for p in parts]), joined)   # inputs untouched


def test_the_window_is_on_unless_switched_off():
    assert shm.wanted({}) and shm.wanted({shm.ENV: "1"}) and not shm.wanted({shm.ENV: "0"})
    assert not shm.room(1 << 62)            # no host has 8 EiB of shared memory: MPI's path


def test_a_bad_switch_value_is_named():
    with pytest.raises(ValueError, match=r"AUTOPAR_COMM_SHM: value: expected '1' \(on, the default\) or '0' "
                                         r"\(off\), got 'off'"):
        shm.wanted({shm.ENV: "off"})

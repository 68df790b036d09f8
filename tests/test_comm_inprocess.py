"""The in-process backend: every collective equals its numpy reference, on 1 to 8 virtual ranks.

The ``check_*`` functions take any Communicator and are shared with tests/mpi (real MPI).
Inputs are rank-valued (element k of world rank r is 1000*r + k), so a block from the wrong
member or the wrong place shows.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from autopar.comm import (CollectiveMismatchError, CommRecord, CommStats, DeadlockError, RankAborted,
                          SelfCommunicator, run_in_process, world)
from autopar.comm.mpi import launched_under_mpi

NS = (1, 2, 3, 4, 8)
NUMERIC = (np.float64, np.float32, np.int32, np.int64)
MOVABLE = NUMERIC + (np.float16, np.bool_)  # dtypes for collectives that only move data


def rank_input(rank: int, shape, dtype) -> np.ndarray:
    """Element k of world rank r is 1000*r + k (bool: a rank-dependent pattern)."""
    values = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) + 1000 * rank
    if np.dtype(dtype) == np.bool_:
        return (values + rank) % 3 == 0
    return values.astype(dtype)


def me(comm) -> int:
    return comm.ranks[comm.rank]


def assert_same(got: np.ndarray, expect: np.ndarray, what: str) -> None:
    assert isinstance(got, np.ndarray), what
    assert got.shape == expect.shape and got.dtype == expect.dtype, (what, got.shape, got.dtype, expect.shape)
    np.testing.assert_array_equal(got, expect, err_msg=what)


def assert_fresh(out: np.ndarray, x: np.ndarray, kept: np.ndarray, what: str) -> None:
    """The result is a new array and the input is unchanged."""
    assert not np.shares_memory(out, x), f"{what}: result aliases the input"
    np.testing.assert_array_equal(x, kept, err_msg=f"{what}: input modified")


# ---- checks shared with tests/mpi -----------------------------------------------------------


def check_allreduce(comm) -> None:
    refs = {"sum": np.sum, "max": np.max, "min": np.min}
    for dtype in NUMERIC:
        for shape in [(), (5,), (3, 4)]:
            xs = [rank_input(r, shape, dtype) for r in comm.ranks]
            x = rank_input(me(comm), shape, dtype)
            kept = x.copy()
            for op, ref in refs.items():
                out = comm.allreduce(x, op)
                what = f"allreduce {op} {shape} {np.dtype(dtype)}"
                assert_same(out, ref(np.stack(xs), axis=0).astype(dtype), what)
                assert_fresh(out, x, kept, what)


def check_allgather(comm) -> None:
    for dtype in MOVABLE:
        xs = [rank_input(r, (2, 3, 4), dtype) for r in comm.ranks]
        x = rank_input(me(comm), (2, 3, 4), dtype)
        kept = x.copy()
        for axis in (0, 1, 2, -1):
            out = comm.allgather(x, axis=axis)
            what = f"allgather axis={axis} {np.dtype(dtype)}"
            assert_same(out, np.concatenate(xs, axis=axis), what)
            assert_fresh(out, x, kept, what)


def check_reduce_scatter(comm) -> None:
    n = comm.size
    shape = (2 * n, 3, n)
    for dtype in NUMERIC:
        total = np.sum([rank_input(r, shape, dtype) for r in comm.ranks], axis=0).astype(dtype)
        x = rank_input(me(comm), shape, dtype)
        kept = x.copy()
        for axis in (0, 2, -1):
            out = comm.reduce_scatter(x, axis=axis)
            what = f"reduce_scatter axis={axis} {np.dtype(dtype)}"
            assert_same(out, np.split(total, n, axis=axis)[comm.rank], what)
            assert_fresh(out, x, kept, what)


def check_alltoall(comm) -> None:
    n = comm.size
    shape = (2 * n, 3, n)
    for dtype in MOVABLE:
        xs = [rank_input(r, shape, dtype) for r in comm.ranks]
        x = rank_input(me(comm), shape, dtype)
        kept = x.copy()
        for split_axis, concat_axis in [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (-1, -3)]:
            out = comm.alltoall(x, split_axis, concat_axis)
            expect = np.concatenate([np.split(xj, n, axis=split_axis)[comm.rank] for xj in xs], axis=concat_axis)
            what = f"alltoall split={split_axis} concat={concat_axis} {np.dtype(dtype)}"
            assert_same(out, expect, what)
            assert_fresh(out, x, kept, what)


def check_broadcast(comm) -> None:
    for dtype in MOVABLE:
        for root in sorted({0, comm.size - 1}):
            x = rank_input(me(comm), (3, 2), dtype)  # non-roots' values must be replaced
            kept = x.copy()
            out = comm.broadcast(x, root=root)
            what = f"broadcast root={root} {np.dtype(dtype)}"
            assert_same(out, rank_input(comm.ranks[root], (3, 2), dtype), what)
            assert_fresh(out, x, kept, what)


def check_collectives(comm) -> None:
    check_allreduce(comm)
    check_allgather(comm)
    check_reduce_scatter(comm)
    check_alltoall(comm)
    check_broadcast(comm)
    comm.barrier()


def check_p2p(comm) -> None:
    """A ring: member i sends to i+1 and receives from i-1 (even members send first)."""
    n, i = comm.size, comm.rank
    nxt, prv = (i + 1) % n, (i - 1) % n
    for shape, dtype, tag in [((3, 4), np.float64, 7), ((5,), np.int32, 0)]:
        x = rank_input(me(comm), shape, dtype)
        kept = x.copy()
        if i % 2 == 0:
            comm.send(x, nxt, tag=tag)
            got = comm.recv(shape, dtype, prv, tag=tag)
        else:
            got = comm.recv(shape, dtype, prv, tag=tag)
            comm.send(x, nxt, tag=tag)
        assert_same(got, rank_input(comm.ranks[prv], shape, dtype), f"recv from {prv} tag {tag}")
        np.testing.assert_array_equal(x, kept)


def check_split_grid(comm, rows: int, cols: int) -> None:
    """Split a rows x cols grid (row-major over comm.ranks) into rows and columns."""
    grid = np.array(comm.ranks).reshape(rows, cols)
    row_groups = [tuple(int(r) for r in g) for g in grid]
    col_groups = [tuple(int(r) for r in g) for g in grid.T]
    ri, ci = divmod(comm.rank, cols)
    row, col = comm.split(row_groups), comm.split(col_groups)
    assert (row.ranks, row.rank, row.size) == (row_groups[ri], ci, cols)
    assert (col.ranks, col.rank, col.size) == (col_groups[ci], ri, rows)
    assert row.stats is comm.stats and col.stats is comm.stats

    for sub, members in ((row, row_groups[ri]), (col, col_groups[ci])):
        x = rank_input(me(comm), (2, 2), np.int64)
        xs = [rank_input(r, (2, 2), np.int64) for r in members]
        assert_same(sub.allgather(x, axis=1), np.concatenate(xs, axis=1), f"allgather in {members}")
        assert_same(sub.allreduce(x), np.sum(xs, axis=0), f"allreduce in {members}")
        y = rank_input(me(comm), (len(members), 3), np.float64)
        total = np.sum([rank_input(r, y.shape, np.float64) for r in members], axis=0)
        assert_same(sub.reduce_scatter(y), total[sub.rank:sub.rank + 1], f"reduce_scatter in {members}")
        root = len(members) - 1
        assert_same(sub.broadcast(x, root=root), xs[root], f"broadcast in {members}")

    backwards = comm.split([g[::-1] for g in row_groups])  # member order = order given
    assert (backwards.ranks, backwards.rank) == (row_groups[ri][::-1], cols - 1 - ci)
    got = backwards.allgather(np.array([me(comm)]))
    assert_same(got, np.array(row_groups[ri][::-1]), "allgather in reversed order")

    if cols % 2 == 0:  # split again: halves of my row, given as world ranks
        halves = [row_groups[ri][:cols // 2], row_groups[ri][cols // 2:]]
        half = row.split(halves)
        mine = halves[ci // (cols // 2)]
        assert half.ranks == mine
        assert_same(half.allgather(np.array([me(comm)])), np.array(mine), "allgather in a nested split")


def check_adjoints(comm) -> None:
    """Sum over ranks of <C(x), y> == sum over ranks of <x, C*(y)> for each conjugate pair C, C*."""
    n = comm.size
    rng = np.random.default_rng(100 + me(comm))

    def draw(shape):  # integer-valued floats: every sum below is exact
        return rng.integers(-9, 10, size=shape).astype(np.float64)

    pairs = []
    for axis in (0, 1):
        x = draw((2, 3))
        y = draw((2 * n, 3) if axis == 0 else (2, 3 * n))
        pairs.append((np.vdot(comm.allgather(x, axis), y), np.vdot(x, comm.reduce_scatter(y, axis))))
    for s, c in [(0, 1), (2, 0), (0, 0)]:
        x = draw((2 * n, 3, n))
        y = draw(comm.alltoall(x, s, c).shape)
        pairs.append((np.vdot(comm.alltoall(x, s, c), y), np.vdot(x, comm.alltoall(y, c, s))))
    root = n - 1
    x, y = draw((4,)), draw((4,))
    y_to_root = comm.allreduce(y)  # the reduction to root, read only on root
    pairs.append((np.vdot(comm.broadcast(x, root), y), np.vdot(x, y_to_root) if comm.rank == root else 0.0))

    totals = comm.allreduce(np.array(pairs, dtype=np.float64))  # (pairs, 2): summed over ranks
    for k, (lhs, rhs) in enumerate(totals):
        assert lhs == rhs, f"adjoint pair {k}: {lhs} != {rhs}"
    assert np.any(totals != 0), "degenerate inputs"


def stats_sequence(comm):
    """A known call sequence; returns this rank's snapshot and log, then resets."""
    comm.stats.reset()
    comm.allreduce(np.zeros((3, 4), np.float32))  # 48 bytes
    comm.allreduce(np.zeros(2, np.float64), op="max")  # 16
    comm.allgather(np.zeros(2, np.int64))  # 16
    comm.reduce_scatter(np.zeros((comm.size, 2), np.float64))  # 16 n
    comm.alltoall(np.zeros((comm.size, 4), np.float32), 0, 1)  # 16 n
    comm.broadcast(np.zeros(5, np.int32), root=comm.size - 1)  # 20
    comm.barrier()  # not counted
    half = comm.size // 2
    sub = comm.split([comm.ranks[:half], comm.ranks[half:]])
    sub.allreduce(np.zeros(3, np.int32))  # 12
    if comm.rank == 0:
        comm.send(np.zeros(3), 1, tag=5)  # 24
    elif comm.rank == 1:
        comm.recv((3,), np.float64, 0, tag=5)  # 24
    result = comm.stats.snapshot(), comm.stats.log, sub.ranks
    comm.stats.reset()
    assert comm.stats.snapshot() == {"count": {}, "bytes": {}} and comm.stats.log == ()
    return result


def check_stats(comm) -> None:
    snap, log, sub_ranks = stats_sequence(comm)
    n = comm.size
    count = {"allreduce": 3, "allgather": 1, "reduce_scatter": 1, "alltoall": 1, "broadcast": 1}
    nbytes = {"allreduce": 48 + 16 + 12, "allgather": 16, "reduce_scatter": 16 * n, "alltoall": 16 * n,
              "broadcast": 20}
    p2p = {0: "send", 1: "recv"}.get(comm.rank)
    if p2p:
        count[p2p], nbytes[p2p] = 1, 24
    assert snap == {"count": count, "bytes": nbytes}
    world = comm.ranks
    f32, f64, i32, i64 = (np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64))
    expect = [CommRecord("allreduce", world, (3, 4), f32), CommRecord("allreduce", world, (2,), f64),
              CommRecord("allgather", world, (2,), i64), CommRecord("reduce_scatter", world, (n, 2), f64),
              CommRecord("alltoall", world, (n, 4), f32), CommRecord("broadcast", world, (5,), i32),
              CommRecord("allreduce", sub_ranks, (3,), i32)]
    if p2p:
        expect.append(CommRecord(p2p, world, (3,), f64))
    assert list(log) == expect


# ---- in-process tests -------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
def test_collectives_equal_numpy_reference(n):
    run_in_process(n, check_collectives)


def test_self_communicator_is_identity():
    check_collectives(SelfCommunicator())
    check_adjoints(SelfCommunicator())


def test_world_outside_mpi_is_one_rank():
    if launched_under_mpi():
        pytest.skip("this process runs under an MPI launcher")
    comm = world()
    assert isinstance(comm, SelfCommunicator) and (comm.rank, comm.size, comm.ranks) == (0, 1, (0,))


def test_import_does_not_load_mpi4py():
    code = "import sys, autopar, autopar.comm; assert 'mpi4py' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_point_to_point_ring(n):
    run_in_process(n, check_p2p)


@pytest.mark.parametrize("rows, cols", [(2, 4), (4, 2), (1, 3)])
def test_split_rows_and_columns(rows, cols):
    run_in_process(rows * cols, check_split_grid, rows, cols)


@pytest.mark.parametrize("n", NS)
def test_conjugate_pairs_are_adjoint(n):
    run_in_process(n, check_adjoints)


@pytest.mark.parametrize("n", [2, 4])
def test_stats_count_calls_and_bytes(n):
    run_in_process(n, check_stats)


def test_results_are_private_to_each_rank():
    """No result shares memory with any rank's input or with another rank's result."""
    def fn(comm):
        x = np.arange(4.0) + comm.rank
        outs = [comm.allreduce(x), comm.allgather(x), comm.reduce_scatter(x), comm.alltoall(x, 0, 0),
                comm.broadcast(x, root=0)]
        if comm.rank == 0:
            comm.send(x, 1)
        elif comm.rank == 1:
            outs.append(comm.recv((4,), np.float64, 0))
        return x, outs

    arrays = [a for x, outs in run_in_process(4, fn) for a in [x] + outs]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)


def test_stats_are_per_rank():
    def fn(comm):
        comm.allgather(np.zeros(3))
        return comm.stats
    stats = run_in_process(3, fn)
    assert len({id(s) for s in stats}) == 3
    assert all(s.snapshot() == {"count": {"allgather": 1}, "bytes": {"allgather": 24}} for s in stats)


def test_exception_on_one_rank_is_reraised_without_hang():
    aborted = []

    def fn(comm):
        try:
            for step in range(6):
                comm.allreduce(np.full(3, float(comm.rank)))
                if comm.rank == 2 and step == 2:
                    raise ValueError(f"boom at step {step}")
                comm.allgather(np.arange(4))
        except RankAborted:
            aborted.append(comm.rank)
            raise

    start = time.monotonic()
    with pytest.raises(ValueError, match=r"\[rank 2 of 4\] boom at step 2"):
        run_in_process(4, fn)
    assert time.monotonic() - start < 3.0
    assert sorted(aborted) == [0, 1, 3]  # the others were stopped in a collective, not left hanging


def test_exception_while_others_wait_in_recv_and_subgroup():
    def fn(comm):
        sub = comm.split([[0, 1], [2, 3]])
        if comm.rank == 3:
            raise KeyError("rank three fails")
        if comm.rank == 2:
            sub.allreduce(np.ones(2))  # waits for rank 3
        elif comm.rank == 1:
            comm.recv((2,), np.float64, source=3)
        else:
            comm.barrier()

    start = time.monotonic()
    with pytest.raises(KeyError, match=r"rank 3 of 4"):
        run_in_process(4, fn)
    assert time.monotonic() - start < 3.0


def test_mismatched_collectives_raise():
    def kinds(comm):
        return comm.allreduce(np.ones(4)) if comm.rank == 0 else comm.allgather(np.ones(4))

    with pytest.raises(CollectiveMismatchError, match=r"rank 0: allreduce.*rank 1: allgather"):
        run_in_process(3, kinds)

    def axes(comm):
        comm.allgather(np.ones((2, 2)), axis=comm.rank)

    with pytest.raises(CollectiveMismatchError, match=r"axis=0.*axis=1"):
        run_in_process(2, axes)

    def shapes(comm):
        comm.allreduce(np.ones(3 + comm.rank))

    with pytest.raises(CollectiveMismatchError, match=r"shape=\(3,\).*shape=\(4,\)"):
        run_in_process(2, shapes)

    def groups(comm):
        comm.split([[0, 1], [2, 3]] if comm.rank == 0 else [[0, 2], [1, 3]])

    with pytest.raises(CollectiveMismatchError, match="split"):
        run_in_process(4, groups)


def test_deadlocks_are_reported():
    def early_return(comm):
        if comm.rank == 1:
            return None
        return comm.allreduce(np.ones(2))

    start = time.monotonic()
    with pytest.raises(DeadlockError, match=r"rank 0: waits in allreduce.*rank 1: finished"):
        run_in_process(2, early_return)

    def both_send(comm):  # works under MPI only while messages fit in its eager buffers
        comm.send(np.ones(2), 1 - comm.rank)
        comm.recv((2,), np.float64, 1 - comm.rank)

    with pytest.raises(DeadlockError, match=r"rank 0: waits in send.*rank 1: waits in send"):
        run_in_process(2, both_send)
    assert time.monotonic() - start < 3.0


def test_timeout():
    def fn(comm):
        if comm.rank == 0:
            time.sleep(0.6)  # still computing when the time is up
        comm.barrier()

    with pytest.raises(TimeoutError, match=r"rank 0: running.*rank 1: waits in barrier"):
        run_in_process(2, fn, timeout=0.2)


def test_bad_arguments_name_the_call_and_the_fix():
    cases = [
        (lambda c: c.reduce_scatter(np.ones(3)), ValueError, r"reduce_scatter.*divisible by the group size 2"),
        (lambda c: c.alltoall(np.ones((2, 3)), 1, 0), ValueError, r"alltoall.*split_axis.*divisible"),
        (lambda c: c.allgather(np.ones((2, 2)), axis=2), ValueError, r"allgather.*axis.*2-d array"),
        (lambda c: c.allreduce(np.ones(2), op="prod"), ValueError, r"allreduce.*op.*'sum', 'max', 'min'"),
        (lambda c: c.allreduce(np.ones(2, bool)), TypeError, r"allreduce.*dtype bool"),
        (lambda c: c.allgather(np.array([None, 1])), TypeError, r"allgather.*dtype object"),
        (lambda c: c.broadcast(np.ones(2), root=2), ValueError, r"broadcast.*root.*0\.\.1"),
        (lambda c: c.send(np.ones(2), dest=c.rank), ValueError, r"send.*dest.*not this rank"),
        (lambda c: c.allgather(np.ones(2), axis=0.0), TypeError, r"allgather.*axis.*an int.*0\.0"),
        (lambda c: c.send(np.ones(2), dest=1 - c.rank, tag=-1), ValueError, r"send.*tag.*0\.\.32767"),
        (lambda c: c.split([[0], [0, 1]]), ValueError, r"split.*partitioning the members \[0, 1\]"),
        (lambda c: c.split([[0, 1, 2]]), ValueError, r"split.*partitioning"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            run_in_process(2, call)


def test_recv_of_the_wrong_shape_raises():
    def fn(comm):
        if comm.rank == 0:
            comm.send(np.ones((2, 3)), 1)
        else:
            comm.recv((3, 2), np.float64, 0)

    with pytest.raises(ValueError, match=r"rank 1 of 2.*recv.*\(3, 2\).*\(2, 3\)"):
        run_in_process(2, fn)


def test_stats_log_limit():
    stats = CommStats(log_limit=2)
    comm = SelfCommunicator(stats)
    for k in range(3):
        comm.allreduce(np.zeros(k + 1))
    assert stats.snapshot() == {"count": {"allreduce": 3}, "bytes": {"allreduce": 48}}
    assert [r.shape for r in stats.log] == [(2,), (3,)]

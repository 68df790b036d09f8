"""Redistribution: every (source, target) layout pair on 2x2 and 2x4 meshes preserves the
value, and the planner picks the structured step DESIGN.md's table names."""
import numpy as np
import pytest

from autopar.comm import redistribution as rd
from autopar.comm import run_in_process
from autopar.ir.layout import Layout, all_layouts
from autopar.ir.mesh import Mesh

SHAPE = (8, 16)


def local_value(layout: Layout, x: np.ndarray, rank: int) -> np.ndarray:
    """A rank's local value; partial ranks get distinct shares that sum to the block."""
    block = x[layout.slices(rank, x.shape)]
    if not layout.partial:
        return block.copy()
    coord = layout.mesh.coord(rank)
    sizes = [layout.mesh.shape[a] for a in layout.partial]
    idx = 0
    for a, n in zip(layout.partial, sizes):
        idx = idx * n + coord[a]
    weights = np.arange(1, np.prod(sizes) + 1, dtype=np.float64)
    return block * (weights[idx] / weights.sum())


def role(layout: Layout, axis: int):
    if axis in layout.partial:
        return "P"
    d = layout.dim_of(axis)
    return None if d is None else (d, layout.dims[d].index(axis))


@pytest.mark.parametrize("mesh", [Mesh((2, 2)), Mesh((2, 4))], ids=str)
def test_every_layout_pair_preserves_values(mesh):
    layouts = list(all_layouts(mesh, 2))
    pairs = [(a, b) for a in layouts for b in layouts if not b.partial or a.partial == b.partial]
    x = np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE) * 0.5 - 7

    def body(comm):
        out = []
        for src, dst in pairs:
            plan = rd.plan(src, dst, SHAPE, 8)
            comms = {a: comm.split(plan.src.mesh.groups([a])) for a in {s.axis for s in plan.steps if s.axis is not None}}
            got = rd.run(plan, local_value(src, x, comm.rank), comm.rank, comms.__getitem__, comm)
            out.append(got)
        return out
    results = run_in_process(mesh.size, body)
    for k, (src, dst) in enumerate(pairs):
        plan = rd.plan(src, dst, SHAPE, 8)
        locals_ = {r: results[r][k] for r in range(mesh.size)}
        for r in range(mesh.size):
            assert locals_[r].shape == dst.local_shape(SHAPE), (str(src), str(dst))
        np.testing.assert_allclose(dst.assemble(locals_, SHAPE), x, err_msg=f"{src} -> {dst}: {plan}")
        # structured, and each mesh axis changes role with at most one communication
        assert all(s.kind != rd.GENERAL for s in plan.steps), plan
        changed = sum(role(plan.src, a) != role(plan.dst, a) for a in range(plan.src.mesh.ndim))
        assert sum(s.kind != rd.SLICE for s in plan.steps) <= changed, plan


M = Mesh((2, 4), ("dp", "mp"))
R, S0, S1 = (), (0,), (1,)


@pytest.mark.parametrize("src, dst, kinds", [
    (Layout(M, (R, R)), Layout(M, ((1,), R)), ["slice"]),
    (Layout(M, ((1,), R)), Layout(M, (R, R)), ["allgather"]),
    (Layout(M, (R, R), (1,)), Layout(M, (R, R)), ["allreduce"]),
    (Layout(M, (R, R), (1,)), Layout(M, (R, (1,))), ["reduce_scatter"]),
    (Layout(M, ((1,), R)), Layout(M, (R, (1,))), ["alltoall"]),
    (Layout(M, ((0,), R), (1,)), Layout(M, (R, (0, 1))), ["alltoall", "reduce_scatter"]),
], ids=lambda v: str(v) if isinstance(v, Layout) else None)
def test_planner_picks_the_table_step(src, dst, kinds):
    plan = rd.plan(src, dst, SHAPE, 4)
    assert [s.kind for s in plan.steps] == kinds


def test_slice_first_shrinks_the_reduction():
    # partial over mp and the target splits rows over dp: slice rows first, then reduce
    src, dst = Layout(M, (R, R), (1,)), Layout(M, ((0,), R))
    plan = rd.plan(src, dst, SHAPE, 4)
    assert [s.kind for s in plan.steps] == ["slice", "allreduce"]
    assert plan.steps[1].bytes == 8 * 16 * 4 // 2


def test_different_device_matrices_meet_on_a_common_refinement():
    a = Layout(Mesh((2, 4)), ((0,), (1,)))           # rows over 2, columns over 4
    b = Layout(Mesh((4, 2)), ((0,), (1,)))           # rows over 4, columns over 2
    plan = rd.plan(a, b, SHAPE, 4)
    assert plan.src.mesh.shape == (2, 2, 2)
    # columns' major axis becomes the rows' minor one: gather the minor column axis, move
    # the major one across, slice the minor one back (no general fallback)
    assert [s.kind for s in plan.steps] == ["allgather", "alltoall", "slice"]
    x = np.arange(128.0).reshape(SHAPE)
    res = run_in_process(8, lambda comm: rd.run(
        plan, a.shard(x, comm.rank), comm.rank,
        {k: comm.split(plan.src.mesh.groups([k])) for k in range(3)}.__getitem__, comm))
    np.testing.assert_array_equal(b.assemble(dict(enumerate(res)), SHAPE), x)


def test_no_common_refinement_falls_back_to_general():
    a = Layout(Mesh((2, 3)), ((0,), (1,)))
    b = Layout(Mesh((3, 2)), ((0,), (1,)))
    plan = rd.plan(a, b, (6, 6), 4)
    assert [s.kind for s in plan.steps] == ["general"]
    x = np.arange(36.0).reshape(6, 6)

    def body(comm):
        return rd.run(plan, a.shard(x, comm.rank), comm.rank, None, comm)
    res = run_in_process(6, body)
    np.testing.assert_array_equal(b.assemble(dict(enumerate(res)), (6, 6)), x)

"""Mesh and Layout: coordinates, groups, conversions, shards, refinement."""
import numpy as np
import pytest

from autopar.ir.layout import Layout, all_layouts
from autopar.ir.mesh import Mesh, common_refinement

MESH = Mesh((2, 4), ("dp", "mp"))


def test_mesh_is_row_major_with_groups():
    assert MESH.coord(6) == (1, 2) and MESH.rank_at((1, 2)) == 6
    assert MESH.group(6, ["mp"]) == (4, 5, 6, 7)
    assert MESH.group(6, ["dp"]) == (2, 6)
    assert MESH.groups(["dp"]) == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert MESH.group(6, ["dp", "mp"]) == tuple(range(8))
    stage = Mesh((2, 2), ("dp", "mp"), ranks=(4, 5, 6, 7))
    assert stage.coord(6) == (1, 0) and stage.group(5, ["dp"]) == (5, 7)
    assert str(MESH) == "Mesh(dp=2, mp=4)"
    with pytest.raises(ValueError, match=r"ranks: expected 8 distinct ranks"):
        Mesh((2, 4), ranks=(0, 1))


def test_layout_slices_follow_the_docstring_example():
    lay = Layout(MESH, ((0,), (), (1,)))
    assert str(lay) == "[S(dp), R, S(mp)]"
    assert lay.slices(6, (8, 6, 12)) == (slice(4, 8), slice(0, 6), slice(6, 9))
    two = Layout(MESH, ((0, 1),))
    assert [two.block_index(r)[0] for r in range(8)] == list(range(8))
    swapped = Layout(MESH, ((1, 0),))
    assert [swapped.block_index(r)[0] for r in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_mindspore_round_trip():
    lay = Layout(MESH, ((0,), (), (1,)))
    assert lay.to_mindspore() == ((2, 4), (1, -1, 0))
    assert Layout.from_mindspore((2, 4), (1, -1, 0)) == Layout(Mesh((2, 4)), ((0,), (), (1,)))
    multi = Layout(MESH, ((0, 1), ()))
    assert multi.to_mindspore() == ((2, 4), ((1, 0), -1))
    assert Layout.from_mindspore(*multi.to_mindspore()).dims == multi.dims


def test_uneven_split_is_a_clear_error():
    lay = Layout(MESH, ((), (1,)))
    with pytest.raises(ValueError, match=r"tensor dim 1: expected a size divisible by its split 4.*got 6"):
        lay.local_shape((3, 6))


def test_each_mesh_axis_is_used_once():
    with pytest.raises(ValueError, match="each mesh axis may split one dim or be partial"):
        Layout(MESH, ((0,), (0,)))
    with pytest.raises(ValueError, match="each mesh axis may split one dim or be partial"):
        Layout(MESH, ((1,),), partial=(1,))


def test_all_layouts_counts():
    # per axis: R, P, dim 0, dim 1 -> 16 assignments; both axes on one dim: 2 orders
    assert len(list(all_layouts(MESH, 2))) == 16 + 2
    assert len(list(all_layouts(MESH, 1, with_partial=False))) == 4 + 1


@pytest.mark.parametrize("lay", list(all_layouts(Mesh((2, 2, 2)), 2)), ids=str)
def test_shard_then_assemble_is_identity(lay):
    x = np.arange(8 * 16, dtype=np.float64).reshape(8, 16)
    locals_ = {r: lay.shard(x, r) for r in lay.mesh.ranks}
    np.testing.assert_array_equal(lay.assemble(locals_, x.shape), x)


@pytest.mark.parametrize("lay", list(all_layouts(MESH, 2)), ids=str)
def test_refined_layout_holds_the_same_blocks(lay):
    fine = lay.refine(((2,), (2, 2)))
    assert fine.mesh.shape == (2, 2, 2) and fine.mesh.ranks == lay.mesh.ranks
    for r in MESH.ranks:
        assert lay.slices(r, (8, 8)) == fine.slices(r, (8, 8))
        assert lay.is_partial_root(r) == fine.is_partial_root(r)


def test_common_refinement():
    assert common_refinement((2, 4), (4, 2)) == (((2,), (2, 2)), ((2, 2), (2,)))
    assert common_refinement((8,), (2, 4)) == (((2, 4),), ((2,), (4,)))
    assert common_refinement((2, 3), (3, 2)) is None
    assert common_refinement((2, 2), (8,)) is None

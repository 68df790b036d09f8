"""MatMul and BatchMatMul: forward against numpy, VJPs against finite differences."""
import numpy as np
import pytest

from autopar import ops
from gradcheck import check_op

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_matmul_transpose_flags(ta, tb):
    a = r(4, 3) if ta else r(3, 4)
    b = r(5, 4) if tb else r(4, 5)
    y = check_op(ops.MatMul(transpose_a=ta, transpose_b=tb), [a, b])
    np.testing.assert_allclose(y, (a.T if ta else a) @ (b.T if tb else b), rtol=1e-12)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((2, 3), (3,)), ((2, 1), (1, 3)), ((2, 3), ())])
def test_batch_matmul_flags_and_broadcast_batch(ta, tb, shapes):
    ba, bb = shapes
    a = r(*ba, 4, 3) if ta else r(*ba, 3, 4)
    b = r(*bb, 5, 4) if tb else r(*bb, 4, 5)
    y = check_op(ops.BatchMatMul(transpose_a=ta, transpose_b=tb), [a, b])
    want = np.matmul(np.swapaxes(a, -1, -2) if ta else a, np.swapaxes(b, -1, -2) if tb else b)
    np.testing.assert_allclose(y, want, rtol=1e-12)


def test_attention_shaped_batch_matmul():
    q, k = r(2, 4, 6, 3), r(2, 4, 3, 6)     # (B, N, S, D) @ (B, N, D, S)
    y = check_op(ops.BatchMatMul(), [q, k])
    assert y.shape == (2, 4, 6, 6)


def test_weight_gradient_is_contiguous_in_stored_layout():
    """The tied head's table gradient ((V, H) from x @ table^T) must not come out as a
    transposed view: it is accumulated with the embedding's gradient in place."""
    x, table = r(6, 4).astype(np.float32), r(10, 4).astype(np.float32)
    mm = ops.MatMul(transpose_b=True)
    spec = [ops.TensorSpec(x.shape, x.dtype), ops.TensorSpec(table.shape, table.dtype)]
    _, dtable = mm.vjp(np.ones((6, 10), np.float32), [x, table], None, spec, (False, True))
    assert dtable.flags.c_contiguous and dtable.shape == (10, 4)


def test_flops_count_multiply_adds_twice():
    mm = ops.MatMul()
    a, b = ops.TensorSpec((3, 4), np.dtype(np.float32)), ops.TensorSpec((4, 5), np.dtype(np.float32))
    assert mm.flops([a, b], mm.infer(a, b)) == 2 * 3 * 4 * 5


def test_mismatched_dims_name_both_shapes():
    with pytest.raises(ValueError, match=r"MatMul: input shapes: expected contraction dims equal .*\(3, 4\) and \(5, 6\)"):
        ops.MatMul()(np.zeros((3, 4)), np.zeros((5, 6)))
    with pytest.raises(ValueError, match=r"BatchMatMul: batch dims: expected broadcastable"):
        ops.BatchMatMul()(np.zeros((2, 3, 4)), np.zeros((3, 4, 5)))

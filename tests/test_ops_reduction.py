import numpy as np
import pytest

import autopar
from autopar import nn, ops
from gradcheck import check_op

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


AXES = [(), 0, -1, 1, (0, 2), (-1, 0), (0, 1, 2)]
REDUCE = [(ops.ReduceSum, np.sum), (ops.ReduceMean, np.mean), (ops.ReduceMax, np.max), (ops.ReduceMin, np.min)]


def _np_axes(axis):
    return None if axis == () else axis


@pytest.mark.parametrize("keep_dims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=repr)
@pytest.mark.parametrize("op, ref", REDUCE, ids=lambda v: getattr(v, "__name__", ""))
def test_reduce_forward_and_vjp(op, ref, axis, keep_dims):
    x = r(2, 3, 4)
    y = check_op(op(keep_dims=keep_dims), [x], static={"axis": axis})
    np.testing.assert_allclose(y, ref(x, axis=_np_axes(axis), keepdims=keep_dims), rtol=1e-12)


def test_reduce_default_axis_is_all_axes():
    x = r(3, 4)
    np.testing.assert_allclose(ops.ReduceSum()(x), x.sum())
    np.testing.assert_allclose(ops.ReduceMean(keep_dims=True)(x), x.mean(keepdims=True))


def test_reduce_sum_int_keeps_dtype_and_has_no_grad_input():
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    y = check_op(ops.ReduceSum(), [x], static={"axis": 1})  # int input: nothing to differentiate
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, [6, 22, 38])


def test_reduce_max_min_gradient_split_among_ties():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0], [5.0, 4.0, 4.0]])
    dy = np.array([6.0, 4.0, 2.0])
    specs = [ops.TensorSpec(x.shape, x.dtype)]
    mx = ops.ReduceMax().with_attrs(axis=1)
    (g,) = mx.vjp(dy, [x], mx.forward(x), specs, (True,))
    np.testing.assert_allclose(g, [[0, 3, 3], [2, 0, 2], [2, 0, 0]])
    mn = ops.ReduceMin(keep_dims=True).with_attrs(axis=1)
    (g,) = mn.vjp(dy.reshape(3, 1), [x], mn.forward(x), specs, (True,))
    np.testing.assert_allclose(g, [[6, 0, 0], [0, 4, 0], [0, 1, 1]])


CUMSUM_REF = {  # along [1, 2, 3, 4]
    (False, False): [1, 3, 6, 10],
    (True, False): [0, 1, 3, 6],
    (False, True): [10, 9, 7, 4],
    (True, True): [9, 7, 4, 0],
}


@pytest.mark.parametrize("exclusive, reverse", list(CUMSUM_REF))
def test_cumsum_values(exclusive, reverse):
    x = np.array([1, 2, 3, 4], dtype=np.int32)
    y = ops.Cumsum(exclusive=exclusive, reverse=reverse)(x, 0)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, CUMSUM_REF[(exclusive, reverse)])


def _cumsum_ref(x, axis, exclusive, reverse):
    if reverse:
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis)
    if exclusive:
        y = y - x
    return np.flip(y, axis) if reverse else y


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("exclusive, reverse", list(CUMSUM_REF))
def test_cumsum_forward_and_vjp(axis, exclusive, reverse):
    x = r(3, 4, 2)
    y = check_op(ops.Cumsum(exclusive=exclusive, reverse=reverse), [x], static={"axis": axis})
    np.testing.assert_allclose(y, _cumsum_ref(x, axis, exclusive, reverse), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argmax(axis):
    x = r(3, 4, 5)
    y = ops.ArgMax(axis=axis)(x)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, np.argmax(x, axis=axis))
    y64 = ops.ArgMax(axis=axis, output_type=autopar.int64)(x)
    assert y64.dtype == np.int64


def test_argmax_picks_first_of_ties():
    np.testing.assert_array_equal(ops.ArgMax()(np.array([[1.0, 7.0, 7.0], [2.0, 2.0, 0.0]])), [1, 0])


class MeanMaxLoss(nn.Cell):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, name="w")

    def construct(self, x):
        return (self.w * x).mean() + self.w.max(axis=1).sum()


def test_reductions_in_value_and_grad():
    w = np.array([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0]])
    x = np.arange(6.0).reshape(2, 3)
    loss, grads = autopar.value_and_grad(MeanMaxLoss(w))(x)
    np.testing.assert_allclose(loss, (w * x).mean() + 5.0 + 4.0)
    want = x / 6 + np.array([[0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(grads["w"], want)


@pytest.mark.parametrize("call, pattern", [
    (lambda: ops.ReduceSum()(np.zeros((2, 3)), 2), r"ReduceSum.*axis.*\[-2, 2\).*got 2"),
    (lambda: ops.ReduceMax()(np.zeros((2, 3)), (0, -2)), r"ReduceMax.*axis.*distinct.*\(0, -2\)"),
    (lambda: ops.ReduceMean()(np.zeros((2, 3), np.int32), 0), r"ReduceMean.*dtype.*float.*int32"),
    (lambda: ops.ReduceMax()(np.zeros((2, 0)), 1), r"ReduceMax.*axis 1 of size 0"),
    (lambda: ops.ReduceSum()(np.zeros((2, 3), bool), 0), r"ReduceSum.*dtype.*bool"),
    (lambda: ops.Cumsum()(np.zeros((2, 3)), -3), r"Cumsum.*axis.*got -3"),
    (lambda: ops.ArgMax(axis=2)(np.zeros((2, 3))), r"ArgMax.*axis.*got 2"),
    (lambda: ops.ArgMax(output_type=autopar.float32)(np.zeros(3)), r"ArgMax.*output_type.*float32"),
])
def test_bad_input_names_op_and_values(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()

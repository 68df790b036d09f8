import numpy as np
import pytest

import autopar
from autopar import nn, ops
from gradcheck import check_op

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


# ---- shape-only ops ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 4), (2, -1), (-1,), (4, 1, 3, 2), (24,)], ids=repr)
def test_reshape(shape):
    x = r(2, 3, 4)
    y = check_op(ops.Reshape(), [x], static={"shape": shape})
    np.testing.assert_array_equal(y, x.reshape(shape))
    assert np.shares_memory(y, x)  # a view, not a copy


@pytest.mark.parametrize("perm", [(0, 1, 2), (1, 0, 2), (2, 0, 1), (0, 2, 1)], ids=repr)
def test_transpose(perm):
    x = r(2, 3, 4)
    y = check_op(ops.Transpose(), [x], static={"perm": perm})
    np.testing.assert_array_equal(y, np.transpose(x, perm))
    assert np.shares_memory(y, x)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_expand_dims(axis):
    x = r(2, 3)
    y = check_op(ops.ExpandDims(), [x], static={"axis": axis})
    np.testing.assert_array_equal(y, np.expand_dims(x, axis))


@pytest.mark.parametrize("axis", [(), 0, -2, (3, 0), (0, 2, 3)], ids=repr)
def test_squeeze(axis):
    x = r(1, 3, 1, 1)
    y = check_op(ops.Squeeze(axis=axis), [x])
    np.testing.assert_array_equal(y, np.squeeze(x, axis=None if axis == () else axis))


@pytest.mark.parametrize("shape, target", [((3, 1), (2, 3, 4)), ((4,), (3, 4)), ((2, 1), (-1, 5)),
                                           ((1, 3), (2, 1, -1)), ((3,), (3,))], ids=repr)
def test_broadcast_to(shape, target):
    x = r(*shape)
    y = check_op(ops.BroadcastTo(target), [x])
    want = tuple(shape[i - len(target) + len(shape)] if d == -1 else d for i, d in enumerate(target))
    np.testing.assert_array_equal(y, np.broadcast_to(x, want))


@pytest.mark.parametrize("shape, multiples", [((2, 3), (2, 3)), ((3, 2), (2, 1, 2)), ((2, 3), (1, 1)),
                                              ((4,), (3, 2))], ids=repr)
def test_tile(shape, multiples):
    x = r(*shape)
    y = check_op(ops.Tile(), [x], static={"multiples": multiples})
    np.testing.assert_array_equal(y, np.tile(x, multiples))


# ---- concat --------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis):
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for k, shape in enumerate(shapes):
        shape[axis] += k  # different sizes along the joined axis
    xs = [r(*s) for s in shapes]
    y = check_op(ops.Concat(axis=axis), xs)
    np.testing.assert_array_equal(y, np.concatenate(xs, axis=axis))
    np.testing.assert_array_equal(ops.Concat(axis=axis)(tuple(xs)), y)  # MindSpore's call: one tuple


def test_concat_vjp_only_needed_inputs():
    specs = [ops.TensorSpec((2, 2), np.dtype(np.float64)), ops.TensorSpec((3, 2), np.dtype(np.float64))]
    dy = np.arange(10.0).reshape(5, 2)
    da, db = ops.Concat().vjp(dy, [None, None], None, specs, (False, True))
    assert da is None
    np.testing.assert_array_equal(db, dy[2:])


# ---- slicing -------------------------------------------------------------------------------

STRIDED = [
    ((0, 1, 0), (3, 6, 5), (1, 1, 1)),
    ((1, 0, 1), (3, 6, 5), (2, 4, 3)),
    ((-2, -5, 0), (-1, 100, 4), (1, 2, 2)),   # negative bounds count from the end; 100 clamps
    ((0, 2), (2, 5), (1, 2)),                 # shorter than rank: last dim kept whole
    ((-100, 4, 0), (100, 2, 5), (1, 1, 1)),   # empty along dim 1
]


@pytest.mark.parametrize("begin, end, strides", STRIDED, ids=repr)
def test_strided_slice(begin, end, strides):
    x = r(3, 6, 5)
    y = check_op(ops.StridedSlice(), [x], static={"begin": begin, "end": end, "strides": strides})
    box = tuple(slice(b, e, s) for b, e, s in zip(begin, end, strides))
    np.testing.assert_array_equal(y, x[box])


@pytest.mark.parametrize("begin, size", [((0, 0), (-1, -1)), ((1, 2), (2, -1)), ((2, 0), (1, 3)),
                                         ((3, 5), (0, 0))], ids=repr)
def test_slice(begin, size):
    x = r(3, 5)
    y = check_op(ops.Slice(), [x], static={"begin": begin, "size": size})
    box = tuple(slice(b, None if n == -1 else b + n) for b, n in zip(begin, size))
    np.testing.assert_array_equal(y, x[box])


def test_slice_vjp_scatters_into_zeros():
    spec = [ops.TensorSpec((3, 4), np.dtype(np.float64))]
    prim = ops.StridedSlice().with_attrs(begin=(1, 0), end=(3, 4), strides=(1, 2))
    (g,) = prim.vjp(np.full((2, 2), 7.0), [None], None, spec, (True,))
    np.testing.assert_array_equal(g, [[0, 0, 0, 0], [7, 0, 7, 0], [7, 0, 7, 0]])


# ---- getitem -------------------------------------------------------------------------------

INDICES = [
    1, -1, (slice(None), slice(1, -1)), (Ellipsis, None), (None, 0, Ellipsis, slice(None, None, 2)),
    slice(1, 100), slice(-100, 2), (slice(None), -2), Ellipsis, (0, 0, 0), (-1, -1, -1),
    (slice(None), None, slice(1, None), None), (slice(None, None, 2), Ellipsis, slice(3, 1)),
    (np.int64(1), slice(None, None, 3)), (),
]


@pytest.mark.parametrize("index", INDICES, ids=repr)
def test_getitem_eager_matches_numpy(index):
    x = np.arange(60.0).reshape(3, 4, 5)
    np.testing.assert_array_equal(ops.getitem(x, index), x[index])


class Indexing(nn.Cell):
    def construct(self, x):
        return x[:, 1:-1], x[0], x[..., None], x[-1, ::2]


def test_getitem_traced_in_cell():
    x = np.arange(20.0).reshape(4, 5)
    outs = Indexing()(x)
    for got, want in zip(outs, (x[:, 1:-1], x[0], x[..., None], x[-1, ::2])):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


class SliceSum(nn.Cell):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, name="w")

    def construct(self, x):
        return (self.w[1:, ::2] * x).sum()


def test_getitem_gradient_is_one_in_slice_and_zero_elsewhere():
    w = np.arange(15.0).reshape(3, 5)
    loss, grads = autopar.value_and_grad(SliceSum(w))(np.ones((2, 3)))
    np.testing.assert_allclose(loss, w[1:, ::2].sum())
    want = np.zeros((3, 5))
    want[1:, ::2] = 1.0
    np.testing.assert_array_equal(grads["w"], want)


# ---- bad input -----------------------------------------------------------------------------

X = np.zeros((2, 3))


@pytest.mark.parametrize("call, pattern", [
    (lambda: ops.Reshape()(X, (4, 2)), r"Reshape.*6 elements.*\(2, 3\).*\(4, 2\)"),
    (lambda: ops.Reshape()(X, (4, -1)), r"Reshape.*\(2, 3\).*\(4, -1\)"),
    (lambda: ops.Reshape()(X, (-1, -1)), r"Reshape.*at most one -1.*\(-1, -1\)"),
    (lambda: ops.Transpose()(X, (0, 0)), r"Transpose.*perm.*\(0, 1\).*\(2, 3\).*got \(0, 0\)"),
    (lambda: ops.Transpose()(X, (1, 0, 2)), r"Transpose.*perm.*got \(1, 0, 2\)"),
    (lambda: ops.ExpandDims()(X, 3), r"ExpandDims.*axis.*\[-3, 3\).*got 3"),
    (lambda: ops.Squeeze(axis=1)(np.zeros((1, 3))), r"Squeeze.*size 1.*\(1, 3\).*dim 1 has size 3"),
    (lambda: ops.Concat(axis=0)((X, np.zeros((2, 4)))), r"Concat.*input 1 shape.*\(2, 3\).*axis 0.*\(2, 4\)"),
    (lambda: ops.Concat(axis=2)((X, X)), r"Concat.*axis.*got 2"),
    (lambda: ops.Concat()((X, X.astype(np.float32))), r"Concat.*input 1 dtype.*float64.*float32"),
    (lambda: ops.Concat()(X, X), r"Concat.*one tuple of tensors.*2 argument"),
    (lambda: ops.StridedSlice()(X, (0, 0), (2, 3), (1, 0)), r"StridedSlice.*strides.*\(1, 0\)"),
    (lambda: ops.Slice()(X, (1, 1), (2, -1)), r"Slice.*inside input shape \(2, 3\).*\(1, 1\), \(2, -1\)"),
    (lambda: ops.BroadcastTo((4, 3, 4))(np.zeros((3, 2))), r"BroadcastTo.*\(3, 2\).*\(4, 3, 4\)"),
    (lambda: ops.Tile()(X, (2,)), r"Tile.*multiples.*\(2, 3\).*\(2,\)"),
    (lambda: ops.getitem(X, (0, 0, 0)), r"getitem.*at most 2.*\(0, 0, 0\)"),
    (lambda: ops.getitem(X, (slice(None), 3)), r"getitem.*\[-3, 3\).*dim 1.*got 3"),
    (lambda: ops.getitem(X, slice(None, None, -1)), r"getitem.*steps >= 1"),
    (lambda: ops.getitem(X, (Ellipsis, 0, Ellipsis)), r"getitem.*at most one \.\.\."),
])
def test_bad_input_names_op_and_values(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_bad_index_in_cell_names_scope():
    class Outer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.body = Indexing()

        def construct(self, x):
            return self.body(x[5])

    with pytest.raises(ValueError, match=r"^Outer \(getitem\): index.*\[-4, 4\).*dim 0.*got 5"):
        Outer()(np.zeros((4, 5, 6)))


def test_bad_index_types_are_type_errors():
    with pytest.raises(TypeError, match=r"getitem.*ops\.Gather"):
        ops.getitem(X, np.array([0, 1]))
    with pytest.raises(TypeError, match=r"Reshape.*shape.*ints.*2\.0"):
        ops.Reshape()(X, (2.0, 3))


def test_bad_reshape_in_cell_names_scope():
    class Bad(nn.Cell):
        def construct(self, x):
            return x.reshape(5, -1)

    class Outer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.body = Bad()

        def construct(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match=r"body \(Reshape\).*\(2, 3\).*\(5, -1\)"):
        Outer()(X)

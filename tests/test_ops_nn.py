"""Composite ops (softmax family, norms, embedding, one-hot, dropout, cross-entropies): forward values against plain numpy formulas, every VJP against finite differences,
dropout's counter-based mask, and the errors bad inputs give."""
import numpy as np
import pytest
from gradcheck import check_op

import autopar
from autopar import nn, ops
from autopar.ir import random
from autopar.ir.random import region_indices
from autopar.ir.spec import TensorSpec
from autopar.ops import dropout as dropout_ops
from autopar.ops import rowwise

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


def ref_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Row blocks of 7 elements, so every blocked kernel runs many blocks and a ragged last one."""
    monkeypatch.setattr(rowwise, "BLOCK_ELEMS", 7)


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(dropout_ops, "_DROPOUT_CHUNK", 5)


# ---- softmax family ----------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 0, 1, (0, 2)])
def test_softmax_forward_and_vjp(axis, tiny_blocks):
    x = r(2, 3, 4)
    e = np.exp(x - x.max())
    np.testing.assert_allclose(ops.Softmax(axis)(x), e / e.sum(axis=axis, keepdims=True), rtol=1e-12)
    check_op(ops.Softmax(axis), [x])


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax_forward_and_vjp(axis, tiny_blocks):
    x = r(3, 4, 5)
    want = np.log(np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True))
    np.testing.assert_allclose(ops.LogSoftmax(axis)(x), want, rtol=1e-12, atol=1e-12)
    check_op(ops.LogSoftmax(axis), [x])


def test_softmax_family_is_stable_for_large_logits():
    x = r(3, 5)
    np.testing.assert_allclose(ops.Softmax()(x + 1e4), ops.Softmax()(x), rtol=1e-9)
    np.testing.assert_allclose(ops.LogSoftmax()(x + 1e4), ref_log_softmax(x), rtol=1e-9, atol=1e-9)


# ---- normalization -----------------------------------------------------------------------------

def ref_layer_norm(x, gamma, beta, bna, eps):
    axes = tuple(range(bna % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


# (begin_norm_axis, begin_params_axis) on x of shape (2, 3, 4): last axis only, two trailing
# axes, normalize over (3, 4) with per-feature (4,) params, normalize over 4 with (3, 4) params
LN_AXES = [(-1, -1), (1, 1), (1, -1), (2, 1)]


@pytest.mark.parametrize("bna,bpa", LN_AXES)
def test_layer_norm_forward_and_vjp(bna, bpa):
    x = r(2, 3, 4) * 3 + 1
    gamma, beta = r(*x.shape[bpa:]), r(*x.shape[bpa:])
    prim = ops.LayerNorm(begin_norm_axis=bna, begin_params_axis=bpa, epsilon=1e-3)
    np.testing.assert_allclose(prim(x, gamma, beta), ref_layer_norm(x, gamma, beta, bna, 1e-3), rtol=1e-10)
    check_op(prim, [x, gamma, beta], rtol=1e-5, atol=1e-8)


def test_rms_norm_forward_and_vjp():
    x, gamma = r(2, 3, 5), r(5)
    want = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6) * gamma
    np.testing.assert_allclose(ops.RMSNorm()(x, gamma), want, rtol=1e-10)
    check_op(ops.RMSNorm(epsilon=1e-2), [x, gamma], rtol=1e-5, atol=1e-8)


def test_layer_norm_float32_stays_float32_and_matches_float64():
    x = (r(4, 64) * 5 + 100).astype(np.float32)
    gamma, beta = r(64).astype(np.float32), r(64).astype(np.float32)
    prim = ops.LayerNorm()
    y = prim(x, gamma, beta)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref_layer_norm(x.astype(np.float64), gamma, beta, -1, 1e-5), atol=2e-4)
    specs = [TensorSpec(a.shape, a.dtype) for a in (x, gamma, beta)]
    grads = prim.vjp(np.ones_like(y), [x, gamma, None], None, specs, (True, True, True))
    assert [g.dtype for g in grads] == [np.float32] * 3


# ---- gather and one-hot ------------------------------------------------------------------------

def test_gather_forward_axis0_and_axis1():
    table = r(10, 3)
    ids = np.array([[1, 4, 4], [9, 0, 1]])
    np.testing.assert_array_equal(ops.Gather()(table, ids, 0), table[ids])
    np.testing.assert_array_equal(ops.Gather()(table, np.array([2, 0, 2]), 1), table[:, [2, 0, 2]])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_vjp_with_repeated_indices(axis):
    params = r(4, 5, 3)
    idx = np.array([[1, 0, 1], [2, 1, 1]])
    check_op(ops.Gather(), [params, idx], static={"axis": axis})


def test_gather_grad_sums_repeated_rows():
    table = r(6, 2)
    ids = np.array([3, 1, 3, 3, 5])
    dy = np.arange(10.0).reshape(5, 2)       # rows 0, 2, 3 go to 3; row 1 to 1; row 4 to 5
    (g, none) = ops.Gather().with_attrs(axis=0).vjp(dy, [None, ids], None,
                                                    [TensorSpec(table.shape, table.dtype),
                                                     TensorSpec(ids.shape, ids.dtype)], (True, False))
    want = np.zeros((6, 2))
    want[3] = dy[0] + dy[2] + dy[3]
    want[1] = dy[1]
    want[5] = dy[4]
    np.testing.assert_array_equal(g, want)
    assert none is None


def test_gather_grad_matches_add_at_on_embedding_sized_table():
    v, h = 5000, 16
    ids = np.r_[rng.integers(0, v, 300), np.full(200, 6), np.minimum(rng.zipf(1.5, 500), v - 1)]
    dy = rng.standard_normal((ids.size, h)).astype(np.float32)
    want = np.zeros((v, h), np.float32)
    np.add.at(want, ids, dy)
    spec = TensorSpec((v, h), np.dtype(np.float32))
    (g, _) = ops.Gather().with_attrs(axis=0).vjp(dy, [None, ids], None, [spec, None], (True, False))
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_one_hot_matches_eye(axis):
    ids = np.array([[0, 3], [2, 7]])          # 7 is out of range: an all-off row
    y = ops.OneHot(axis)(ids, 4, 5.0, -1.0)
    assert y.dtype == np.float32
    eye = np.vstack([np.eye(4), np.zeros((4, 4))])   # row 7 of the padded eye is zeros
    want = np.moveaxis(eye[ids], -1, axis if axis != -1 else 2) * 6.0 - 1.0
    np.testing.assert_array_equal(y, want)


def test_one_hot_value_dtype_and_no_gradient():
    y = ops.OneHot()(np.array([1, 0]), 3, np.float64(1.0), np.float64(0.0))
    assert y.dtype == np.float64
    assert ops.OneHot.nondiff_inputs == (0,)
    check_op(ops.OneHot(), [np.array([2, 1])], static={"depth": 3, "on_value": 1.0, "off_value": 0.0})


# ---- dropout -----------------------------------------------------------------------------------

def keep_mask(prim, x, key):
    """The mask a forward pass applied, read off its output on all-ones input."""
    return prim.forward(np.ones_like(x), key=key) != 0


def test_dropout_same_key_same_mask_in_forward_and_vjp(tiny_chunks):
    prim = ops.Dropout(keep_prob=0.7)
    x = r(6, 9) + 3.0
    y = prim.forward(x, key=11)
    mask = y != 0
    np.testing.assert_allclose(y, np.where(mask, x / 0.7, 0.0), rtol=1e-15)
    (dx,) = prim.vjp(np.ones_like(x), [None], None, [TensorSpec(x.shape, x.dtype)], (True,), key=11)
    np.testing.assert_array_equal(dx != 0, mask)
    np.testing.assert_array_equal(prim.forward(x, key=11), y)
    assert not np.array_equal(keep_mask(prim, x, 12), mask)
    check_op(prim, [x], key=11)


def test_dropout_mask_is_uniform_of_logical_index(tiny_chunks):
    prim = ops.Dropout(keep_prob=0.6)
    shape = (4, 5, 6)
    want = random.keep_mask(99, region_indices(shape), 0.6)
    np.testing.assert_array_equal(keep_mask(prim, np.ones(shape), 99), want)


def test_dropout_mask_region_equals_slice_of_full_mask():
    shape = (6, 8, 10)
    full = dropout_ops.dropout_mask(5, 0.5, shape)
    region = (slice(2, 5), slice(None), slice(4, 10, 2))
    np.testing.assert_array_equal(dropout_ops.dropout_mask(5, 0.5, shape, region), full[region])
    np.testing.assert_array_equal(keep_mask(ops.Dropout(0.5), np.ones(shape), 5)[region], full[region])


def test_dropout_keeps_about_keep_prob_and_float32():
    x = np.ones((1000, 1000), np.float32)
    y = ops.Dropout(keep_prob=0.9).forward(x, key=3)
    assert y.dtype == np.float32
    assert abs((y != 0).mean() - 0.9) < 0.002          # 1e6 Bernoulli(0.9): sd 3e-4
    np.testing.assert_allclose(y[y != 0], np.float32(1 / 0.9))


def test_dropout_keep_prob_one_is_identity_and_seeds_change_mask():
    x = r(5, 7)
    np.testing.assert_array_equal(ops.Dropout(keep_prob=1.0).forward(x, key=1), x)
    base = keep_mask(ops.Dropout(0.5), x, 1)
    np.testing.assert_array_equal(keep_mask(ops.Dropout(0.5, seed0=0, seed1=0), x, 1), base)
    assert not np.array_equal(keep_mask(ops.Dropout(0.5, seed0=3, seed1=4), x, 1), base)
    with pytest.raises(ValueError, match=r"Dropout: keep_prob"):
        ops.Dropout(keep_prob=0.0)


class _DropoutLoss(nn.Cell):
    """loss = sparse cross-entropy of dropout(w), one row of V logits, label 2."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, name="w")
        self.drop = ops.Dropout(keep_prob=0.5)
        self.ce = ops.SparseSoftmaxCrossEntropyWithLogits()

    def construct(self, label):
        return self.ce(self.drop(self.w), label)


def test_dropout_masks_agree_through_the_runtime():
    w = r(40)
    loss, grads = autopar.value_and_grad(_DropoutLoss(w))(np.array(2))
    g = grads["w"]
    kept = g != 0                             # d loss/d w = mask / p * (softmax(z) - onehot)
    z = np.where(kept, w / 0.5, 0.0)
    np.testing.assert_allclose(loss, -ref_log_softmax(z)[2], rtol=1e-12)
    p = np.exp(ref_log_softmax(z))
    np.testing.assert_allclose(g, np.where(kept, (p - np.eye(40)[2]) / 0.5, 0.0), rtol=1e-10)
    assert 5 < kept.sum() < 35


# ---- cross-entropies ---------------------------------------------------------------------------

def test_softmax_cross_entropy_dense_forward_and_vjp(tiny_blocks):
    logits = r(2, 3, 5)
    labels = rng.dirichlet(np.ones(5), (2, 3))
    loss = ops.SoftmaxCrossEntropyWithLogits()(logits, labels)
    np.testing.assert_allclose(loss, -(labels * ref_log_softmax(logits)).sum(-1), rtol=1e-12)
    check_op(ops.SoftmaxCrossEntropyWithLogits(), [logits, labels])
    check_op(ops.SoftmaxCrossEntropyWithLogits(), [logits, r(2, 3, 5)])   # sum(labels) != 1


def test_dense_with_one_hot_labels_equals_sparse():
    logits, ids = r(6, 7), rng.integers(0, 7, 6)
    dense = ops.SoftmaxCrossEntropyWithLogits()(logits, np.eye(7)[ids])
    np.testing.assert_allclose(dense, ops.SparseSoftmaxCrossEntropyWithLogits()(logits, ids), rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4), (6,)])
def test_sparse_cross_entropy_picks_log_softmax_at_label(shape, tiny_blocks):
    logits = r(*shape) * 4
    labels = rng.integers(0, shape[-1], shape[:-1])
    loss = ops.SparseSoftmaxCrossEntropyWithLogits()(logits, labels)
    want = -np.take_along_axis(ref_log_softmax(logits), labels[..., None], -1)[..., 0]
    assert loss.shape == shape[:-1]
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    check_op(ops.SparseSoftmaxCrossEntropyWithLogits(), [logits, labels])


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float16, 2e-3)])
def test_sparse_cross_entropy_low_precision(dtype, tol):
    logits64 = r(13, 3000) * 3
    labels = rng.integers(0, 3000, 13)
    logits = logits64.astype(dtype)
    prim = ops.SparseSoftmaxCrossEntropyWithLogits()
    loss = prim(logits, labels)
    assert loss.dtype == dtype
    ref = -ref_log_softmax(logits.astype(np.float64))[np.arange(13), labels]
    np.testing.assert_allclose(loss, ref, rtol=tol * 4)
    dy = r(13).astype(dtype)
    specs = [TensorSpec(logits.shape, logits.dtype), TensorSpec(labels.shape, labels.dtype)]
    (g, none) = prim.vjp(dy, [logits, labels], loss, specs, (True, False))
    assert g.dtype == dtype and none is None
    p = np.exp(ref_log_softmax(logits.astype(np.float64)))
    p[np.arange(13), labels] -= 1
    np.testing.assert_allclose(g, p * dy[:, None].astype(np.float64), atol=tol)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 3e-3)])
def test_low_precision_in_low_precision_out(dtype, tol, tiny_blocks):
    x = r(3, 6).astype(dtype)
    ones, zeros, idx = np.ones(6, dtype), np.zeros(6, dtype), np.array([2, 0])
    for prim, args in [(ops.Softmax(), [x]), (ops.LogSoftmax(), [x]),
                       (ops.LayerNorm(), [x, ones, zeros]), (ops.RMSNorm(), [x, ones]),
                       (ops.Gather().with_attrs(axis=0), [x, idx]),
                       (ops.SoftmaxCrossEntropyWithLogits(), [x, np.abs(x)])]:
        specs = [TensorSpec(a.shape, a.dtype) for a in args]
        y = prim.forward(*args)
        assert y.dtype == dtype and prim.infer(*specs).dtype == dtype, prim
        want = prim.forward(*[a.astype(np.float64) if a.dtype == dtype else a for a in args])  # same values
        np.testing.assert_allclose(y, want, rtol=tol, atol=tol, err_msg=repr(prim))
        needs = tuple(a.dtype == dtype and i not in prim.nondiff_inputs for i, a in enumerate(args))
        grads = prim.vjp(np.ones(y.shape, dtype), args, y, specs, needs)
        assert all(g.dtype == dtype for g in grads if g is not None), prim


# ---- errors ------------------------------------------------------------------------------------

def test_sparse_labels_shape_mismatch_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"SparseSoftmaxCrossEntropyWithLogits: labels shape: "
                                         r"expected \(4,\).*\(4, 5\).*got \(3,\)"):
        ops.SparseSoftmaxCrossEntropyWithLogits()(np.zeros((4, 5)), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"SparseSoftmaxCrossEntropyWithLogits: labels dtype.*float64"):
        ops.SparseSoftmaxCrossEntropyWithLogits()(np.zeros((4, 5)), np.zeros(4))
    with pytest.raises(ValueError, match=r"SparseSoftmaxCrossEntropyWithLogits: labels values: "
                                         r"expected in \[0, 5\), got min 0, max 5"):
        ops.SparseSoftmaxCrossEntropyWithLogits()(np.zeros((2, 5)), np.array([0, 5]))


def test_dense_labels_shape_mismatch():
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropyWithLogits: labels shape: "
                                         r"expected \(4, 5\).*got \(4, 6\)"):
        ops.SoftmaxCrossEntropyWithLogits()(np.zeros((4, 5)), np.zeros((4, 6)))


def test_norm_gamma_wrong_shape():
    with pytest.raises(ValueError, match=r"LayerNorm: gamma shape: expected \(3, 4\).*\(2, 3, 4\).*got \(4,\)"):
        ops.LayerNorm(1, 1)(np.zeros((2, 3, 4)), np.ones(4), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"LayerNorm: beta shape: expected \(4,\).*got \(3,\)"):
        ops.LayerNorm()(np.zeros((2, 4)), np.ones(4), np.zeros(3))
    with pytest.raises(ValueError, match=r"RMSNorm: gamma shape: expected \(6,\).*\(2, 6\).*got \(5,\)"):
        ops.RMSNorm()(np.zeros((2, 6)), np.ones(5))


def test_gather_bad_indices():
    with pytest.raises(ValueError, match=r"Gather: indices dtype: expected an integer dtype, "
                                         r"got float64 \(2,\)"):
        ops.Gather()(np.zeros((5, 3)), np.array([1.0, 2.0]), 0)
    with pytest.raises(ValueError, match=r"Gather: axis: expected an axis in \[-2, 2\), got 2"):
        ops.Gather()(np.zeros((5, 3)), np.array([1, 2]), 2)
    with pytest.raises(ValueError, match=r"Gather: indices values: expected in \[0, 5\), got min -1"):
        ops.Gather()(np.zeros((5, 3)), np.array([-1, 2]), 0)


def test_one_hot_and_softmax_bad_args():
    with pytest.raises(ValueError, match=r"OneHot: indices dtype"):
        ops.OneHot()(np.array([0.5]), 3, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"OneHot: depth: expected an int >= 0, got 2.5"):
        ops.OneHot()(np.array([0]), 2.5, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"Softmax: axis"):
        ops.Softmax(axis=3)(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"LogSoftmax: input 0 dtype"):
        ops.LogSoftmax()(np.zeros((2, 3), np.int32))


class _DeviceIndex:
    """A uint64 index as a device array looks to keep_mask: not a numpy array, and reading
    its max back to the host (which would make the host wait for the device) is refused."""

    def __init__(self, a):
        self._a, self.dtype, self.size = a, a.dtype, a.size

    def astype(self, dtype):
        return self._a.astype(dtype)

    def __rshift__(self, other):
        return self._a >> other

    def max(self):
        raise AssertionError("keep_mask read a device index's max back to the host")


def test_keep_mask_on_a_device_index_has_the_hosts_bits_without_reading_it_back():
    """Indices below 2**32 (the high half's xor does nothing) and above it (it does): the same
    mask as the host's, where a max decides whether to run that pass."""
    for start in (0, 2**32 - 500, 3 * 2**32):
        idx = np.arange(start, start + 1000, dtype=np.uint64)
        np.testing.assert_array_equal(random.keep_mask(2**40 + 7, _DeviceIndex(idx), 0.7),
                                      random.keep_mask(2**40 + 7, idx, 0.7))
    assert random.keep_mask(5, np.arange(2**32, 2**32 + 64, dtype=np.uint64), 0.5).tolist() != \
        random.keep_mask(5, np.arange(64, dtype=np.uint64), 0.5).tolist()       # the high half counts


def test_micro_batch_flat_index_is_the_row_major_index_of_the_coordinates():
    from autopar.runtime.pipeline.dropout import flat_index
    shape = (4, 3, 5)
    coords = (np.array([1, 3]), np.array([0, 2]), np.array([4]))
    want = np.ravel_multi_index(np.meshgrid(*coords, indexing="ij"), shape)
    got = flat_index(coords, shape)
    assert got.dtype == np.uint64 and got.shape == (2, 2, 1)
    np.testing.assert_array_equal(got, want)

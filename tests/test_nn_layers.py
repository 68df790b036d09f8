"""Layers, the loss cell and the training wrappers against plain numpy."""
import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.train import SGD


def test_dense_matches_numpy_on_3d_input_and_casts_for_compute_dtype():
    d = nn.Dense(4, 3, param_dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 5, 4))
    w, b = d.weight.asnumpy(), d.bias.asnumpy()
    np.testing.assert_allclose(d(x), x @ w.T + b, rtol=1e-12)
    half = nn.Dense(4, 3, param_dtype="float32", compute_dtype="float16")
    y = half(x.astype(np.float32))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x @ half.weight.asnumpy().T, rtol=2e-2, atol=2e-2)


def test_layernorm_and_embedding_cells():
    ln = nn.LayerNorm(6)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln(x), want, rtol=1e-5, atol=1e-6)
    emb = nn.Embedding(10, 4)
    ids = np.array([[1, 7], [7, 0]], np.int32)
    np.testing.assert_array_equal(emb(ids), emb.embedding_table.asnumpy()[ids])


def test_masked_mean_cross_entropy_ignores_masked_rows():
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    logits = np.random.default_rng(2).standard_normal((4, 5))
    labels = np.array([0, 3, 1, 4], np.int32)
    mask = np.array([1.0, 0.0, 1.0, 1.0])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_row = -logp[np.arange(4), labels]
    np.testing.assert_allclose(loss(logits, labels, mask), (per_row * mask).sum() / 3, rtol=1e-12)
    np.testing.assert_allclose(nn.SoftmaxCrossEntropyWithLogits(reduction="sum")(logits, labels), per_row.sum())
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum' or 'none', got 'avg'"):
        nn.SoftmaxCrossEntropyWithLogits(reduction="avg")


def test_train_one_step_with_sgd_equals_manual_update():
    net = nn.WithLossCell(nn.Dense(3, 2, param_dtype="float64"), nn.SoftmaxCrossEntropyWithLogits())
    x = np.random.default_rng(3).standard_normal((4, 3))
    y = np.array([0, 1, 1, 0], np.int32)
    params = net.trainable_params()
    before = {p.name: p.asnumpy() for p in params}
    loss0, grads = autopar.value_and_grad(net)(x, y)
    train = nn.TrainOneStepCell(net, SGD(params, learning_rate=0.5))
    loss = train(x, y)
    np.testing.assert_allclose(loss, loss0)
    for p in params:
        np.testing.assert_allclose(p.asnumpy(), before[p.name] - 0.5 * grads[p.name], rtol=1e-12)


def test_dropout_cell_is_identity_in_eval_mode():
    d = nn.Dropout(0.5)
    x = np.ones((4, 4), np.float32)
    np.testing.assert_array_equal(d(x), x)
    with pytest.raises(ValueError, match=r"keep_prob: expected a value in \(0, 1\], got 0"):
        nn.Dropout(0.0)

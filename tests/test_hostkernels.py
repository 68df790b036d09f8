"""The fused CPU kernels (autopar/backend/hostkernels.py): each against a float64 numpy
reference, at the edges (masked, huge, NaN and empty inputs), through the ops against the
ufunc paths, and the build's fallback when no compiler is there."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from autopar import ops
from autopar.backend import hostkernels
from autopar.ir.spec import spec_of

pytestmark = pytest.mark.skipif(hostkernels.library() is None, reason="no C compiler: the ufunc paths serve")

SHAPES = [(37, 100), (1, 1), (5, 1), (0, 8), (3, 513)]


def f32(r, shape, scale=1.0, shift=0.0):
    return (r.standard_normal(shape) * scale + shift).astype(np.float32)


def softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gelu64(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_grad64(x, dy):
    x = x.astype(np.float64)
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x))


def layer_norm64(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xh = (x - mean) * rstd
    return xh * gamma + beta, xh, rstd


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_and_its_vjp_match_float64(shape):
    r = np.random.default_rng(0)
    x, dy = f32(r, shape, 4.0), f32(r, shape)
    y = hostkernels.softmax(x)
    np.testing.assert_allclose(y, softmax64(x), rtol=2e-6, atol=1e-7)
    y64 = softmax64(x)
    want = (dy - (dy * y64).sum(axis=1, keepdims=True)) * y64
    np.testing.assert_allclose(hostkernels.softmax_grad(dy, y64.astype(np.float32)), want, rtol=1e-5, atol=2e-7)


def test_exp_is_within_two_ulp_over_the_float32_range():
    """Each row (v, 0) gives sigmoid(v) = e^v / (e^v + 1): the kernel's exp over [-85, 85]."""
    v = np.linspace(-85, 85, 200_001).astype(np.float32)
    p = hostkernels.softmax(np.stack([v, np.zeros_like(v)], axis=1))[:, 0]
    want = 1 / (1 + np.exp(-v.astype(np.float64)))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(p - want) / ulp) <= 3.0


def test_softmax_edges_behave_as_numpy():
    big = np.float32(3e38)
    x = np.array([[0.0, -np.inf, 1.0, -1e9],          # masked entries give exactly 0
                  [1e4, 1e4 - 1, -1e4, 0.0],           # no overflow
                  [1.0, np.nan, 2.0, 3.0],             # a NaN spoils its row only
                  [-np.inf] * 4,                       # all masked: NaN, as numpy
                  [big, big, -big, 0.0]], np.float32)
    y = hostkernels.softmax(x)
    with np.errstate(invalid="ignore"):
        want = softmax64(x)
    assert y[0, 1] == 0 and y[0, 3] == 0
    np.testing.assert_allclose(y[[0, 1, 4]], want[[0, 1, 4]], rtol=2e-6, atol=1e-30)
    assert np.isnan(y[2]).all() and np.isnan(y[3]).all()


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 1024)])
def test_gelu_and_its_vjp_match_float64(shape):
    r = np.random.default_rng(1)
    x, dy = f32(r, shape, 3.0), f32(r, shape)
    np.testing.assert_allclose(hostkernels.gelu_tanh(x), gelu64(x), rtol=1e-5, atol=2e-7)
    np.testing.assert_allclose(hostkernels.gelu_tanh_grad(x, dy), gelu_grad64(x, dy), rtol=1e-5, atol=1e-6)


def test_gelu_edges_and_in_place():
    x = np.array([-100.0, -10.0, -1e-30, 0.0, 1e-30, 10.0, 100.0, 1e30, -1e30, np.nan], np.float32)
    y = hostkernels.gelu_tanh(x)
    np.testing.assert_allclose(y[:-1], gelu64(x[:-1]).astype(np.float32), rtol=1e-6, atol=1e-30)
    assert np.isnan(y[-1])
    dx = hostkernels.gelu_tanh_grad(x, np.ones_like(x))
    np.testing.assert_allclose(dx[[0, 3, 6]], [0.0, 0.5, 1.0], atol=1e-6)
    assert np.isnan(dx[-1])
    z = f32(np.random.default_rng(2), (4, 77))
    want = hostkernels.gelu_tanh(z)
    assert hostkernels.gelu_tanh(z, out=z) is z
    np.testing.assert_array_equal(z, want)


@pytest.mark.parametrize("shape", [(37, 100), (1, 1), (6, 1), (0, 8), (3, 2049)])
def test_layer_norm_and_its_vjp_match_float64(shape):
    r = np.random.default_rng(3)
    x, dy = f32(r, shape, 2.0, 5.0), f32(r, shape)
    gamma, beta = f32(r, shape[1:]), f32(r, shape[1:])
    want, xh, rstd = layer_norm64(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(hostkernels.layer_norm(x, gamma, beta, 1e-5), want, rtol=1e-5, atol=2e-5)
    g = dy.astype(np.float64) * gamma
    dx_want = rstd * (g - g.mean(axis=1, keepdims=True) - xh * (g * xh).mean(axis=1, keepdims=True))
    dx, dgamma, dbeta = hostkernels.layer_norm_grad(dy, x, gamma, 1e-5)
    np.testing.assert_allclose(dx, dx_want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dgamma, (dy * xh).sum(axis=0), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dbeta, dy.astype(np.float64).sum(axis=0), rtol=1e-6, atol=1e-5)
    only_dx = hostkernels.layer_norm_grad(dy, x, gamma, 1e-5, need_dgamma=False, need_dbeta=False)
    assert only_dx[1] is None and only_dx[2] is None
    np.testing.assert_array_equal(only_dx[0], dx)
    no_dx = hostkernels.layer_norm_grad(dy, x, gamma, 1e-5, need_dx=False)
    assert no_dx[0] is None
    np.testing.assert_array_equal(no_dx[1], dgamma)


OP_CASES = [   # (op, inputs): float32, the last axis
    (ops.Softmax(), lambda r: (f32(r, (2, 3, 5, 7), 3.0),)),
    (ops.GeLU(), lambda r: (f32(r, (3, 4, 40), 2.0),)),
    (ops.LayerNorm(), lambda r: (f32(r, (2, 6, 24), 2.0, 1.0), f32(r, (24,)), f32(r, (24,)))),
]


@pytest.mark.parametrize("prim, make", OP_CASES, ids=lambda c: type(c).__name__ if isinstance(c, ops.Primitive) else "")
def test_ops_take_the_kernels_and_agree_with_the_ufunc_paths(monkeypatch, prim, make):
    """The ops' forward and VJP call the kernels on float32 numpy arrays, and give the
    ufunc paths' values to float32 rounding."""
    xs = make(np.random.default_rng(4))
    specs = tuple(spec_of(x) for x in xs)
    needs = [True] * len(xs)
    calls = []
    for name in ("softmax", "softmax_grad", "gelu_tanh", "gelu_tanh_grad", "layer_norm", "layer_norm_grad"):
        fn = getattr(hostkernels, name)
        monkeypatch.setattr(hostkernels, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    y = prim.forward(*xs)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    dx = prim.vjp(dy, xs, y, specs, needs)
    assert len(calls) == 2, calls
    monkeypatch.setattr(hostkernels, "library", lambda: None)      # the ufunc paths
    y_ref = prim.forward(*xs)
    dx_ref = prim.vjp(dy, xs, y_ref, specs, needs)
    assert len(calls) == 2
    assert y.dtype == y_ref.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(dx, dx_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_other_arrays_take_the_ufunc_paths():
    x = np.ones((4, 6), np.float32)
    assert hostkernels.serves(x, x)
    assert not hostkernels.serves(x.astype(np.float64))
    assert not hostkernels.serves(x.T)                      # not C-contiguous
    assert not hostkernels.serves(x, x.astype(np.float16))
    assert not ops.Softmax(axis=0)._host_fused(x)          # over another axis than the last


def test_the_build_is_cached_and_a_missing_compiler_warns_once(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path))
    path = hostkernels.build()
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    stamp = os.stat(path).st_mtime_ns
    assert hostkernels.build() == path and os.stat(path).st_mtime_ns == stamp     # not rebuilt
    assert hostkernels.build(flags=hostkernels.CFLAGS + ("-DAUTOPAR_VARIANT",)) != path
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path / "fresh"))
    with pytest.warns(hostkernels.HostKernelWarning, match="fused CPU kernels are not used"):
        assert hostkernels.library.__wrapped__() is None
    monkeypatch.setenv("AUTOPAR_HOST_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hostkernels.library.__wrapped__() is None       # turned off: no build, no warning
    monkeypatch.setenv("AUTOPAR_HOST_KERNELS", "1")
    monkeypatch.setenv("AUTOPAR_HOST_KERNELS_LIB", path)         # built beforehand: loaded, not built
    lib = hostkernels.library.__wrapped__()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.empty_like(x)
    lib.ap_softmax(x.ctypes.data, y.ctypes.data, 3, 4)
    np.testing.assert_allclose(y, softmax64(x), rtol=2e-6)
    monkeypatch.setenv("AUTOPAR_HOST_KERNELS_LIB", str(tmp_path / "missing.so"))
    with pytest.warns(hostkernels.HostKernelWarning, match="missing.so"):
        assert hostkernels.library.__wrapped__() is None


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_weight_decay_gives_the_numpy_paths_bits(monkeypatch, weight_decay):
    """The fused update rounds every operation as the ufunc path does (no FMA): the same bits
    after three steps, whatever the block the optimizer cuts the parameter into."""
    from autopar.nn import Parameter
    from autopar.train import AdamWeightDecay
    r = np.random.default_rng(6)
    p0 = r.standard_normal((257, 129)).astype(np.float32)
    grads = [r.standard_normal(p0.shape).astype(np.float32) * 10.0 ** -k for k in range(3)]
    calls = []
    fused = hostkernels.adam_weight_decay
    monkeypatch.setattr(hostkernels, "adam_weight_decay", lambda *a, **k: calls.append(1) or fused(*a, **k))

    def run():
        opt = AdamWeightDecay([Parameter(p0.copy(), name="w")], learning_rate=3e-3, eps=1e-8,
                              weight_decay=weight_decay)
        for g in grads:
            opt.step([g])
        return opt.params[0].data, opt.states[0]["moment1"], opt.states[0]["moment2"]

    got = run()
    assert calls
    monkeypatch.setattr(hostkernels, "library", lambda: None)
    want = run()
    assert not np.array_equal(got[0], p0)
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_sum_of_squares_is_a_float64_sum():
    from autopar.ops.norm import sum_of_squares
    r = np.random.default_rng(7)
    xs = [f32(r, (1000, 37), 1e3), f32(r, (5,)), np.zeros((0, 3), np.float32), f32(r, (3, 4)).T]   # .T: strided
    want = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in xs)
    assert sum_of_squares(xs) == pytest.approx(want, rel=1e-14)
    assert hostkernels.sum_of_squares(np.array([3.0, 4.0], np.float32)) == 25.0
    big = np.full(1 << 20, 1.0 + 2.0 ** -20, np.float32)       # a float32 running sum would lose the tail
    assert hostkernels.sum_of_squares(big) == pytest.approx((1 << 20) * (1.0 + 2.0 ** -20) ** 2, rel=1e-12)

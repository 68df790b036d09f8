"""The fused GPU kernels (autopar/backend/kernels.py) equal the CPU ops: run on a machine with
CuPy and a GPU (``pytest tests/test_gpu_kernels.py``), skipped cleanly elsewhere.

Tolerances: dropout bit for bit (mask and values); AdamWeightDecay float64 1e-12 relative and
float32 within 4 ulps (the kernel rounds each operation as numpy does, so both are expected
to be exact); GeLU float64 1e-12 relative with 1e-14 absolute (CUDA's tanh/erf are not
numpy's: an ulp apart, which 1 + tanh(z) or 1 + erf(z) turns into a larger relative error
only where GeLU is nearly 0), float32 and float16 within a few of their ulps. Every test
also checks that the fused kernel, not the CuPy-ufunc path, computed.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
from gpu import cupy_or_skip

cupy = cupy_or_skip()

import autopar  # noqa: E402
from autopar import ops  # noqa: E402
from autopar.backend import kernels  # noqa: E402
from autopar.ir.random import derive_key  # noqa: E402
from autopar.ir.spec import TensorSpec  # noqa: E402
from autopar.nn import Parameter  # noqa: E402
from autopar.ops.dropout import dropout_mask  # noqa: E402
from autopar.train import AdamWeightDecay  # noqa: E402


@pytest.fixture
def fused(monkeypatch):
    """Counts of calls to each fused kernel (which still computes)."""
    counts = collections.Counter()
    for name in ("dropout", "gelu", "gelu_grad", "adam_weight_decay", "softmax", "softmax_grad", "layer_norm",
                 "layer_norm_grad"):
        def spy(*args, _real=getattr(kernels, name), _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernels, name, spy)
    return counts


def assert_same_bits(got, want):
    assert isinstance(got, cupy.ndarray)
    got = got.get()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), \
        f"{np.count_nonzero(got != want)} of {got.size} differ"


# ---- dropout -------------------------------------------------------------------------------------

DROPOUT_CASES = [   # (global shape, region of this shard or None, dtype, keep_prob)
    ((8, 128, 1024), None, "float32", 0.9),
    ((4, 64, 4096), (slice(1, 3), slice(None), slice(1024, 2048)), "float32", 0.9),
    ((1 << 21, 1 << 12), (slice((1 << 21) - 3, None), slice(None)), "float32", 0.5),   # flat indices >= 2**32
    ((3, 1 << 31), (slice(1, 3), slice((1 << 31) - 5, None, 2)), "float64", 0.5),      # >= 2**32, strided
    ((6, 8, 10), (slice(2, 5), slice(None), slice(4, 10, 2)), "float64", 0.7),
    ((6, 8, 10), (slice(5, 6), slice(7, 8), slice(9, 10)), "float64", 0.7),           # one element
    ((64, 1000), None, "float16", 0.7),
]


def local_shape(shape, region):
    if region is None:
        return shape
    return tuple(len(range(*s.indices(n))) for s, n in zip(region, shape))


@pytest.mark.parametrize("shape, region, dtype, keep", DROPOUT_CASES)
def test_fused_dropout_equals_cpu_bit_for_bit(fused, shape, region, dtype, keep):
    key = derive_key(5, "blocks.3.attention.dropout", 11)
    prim = ops.Dropout(keep) if region is None else ops.Dropout(keep).with_attrs(region=region, global_shape=shape)
    local = local_shape(shape, region)
    x = (np.random.default_rng(0).standard_normal(local) * 3).astype(dtype)
    want = prim.forward(x, key=key)
    assert_same_bits(prim.forward(cupy.asarray(x), key=key), want)
    mask = prim.forward(cupy.ones(local, dtype), key=key).get() != 0
    np.testing.assert_array_equal(mask, dropout_mask(key, keep, shape, region))
    (dx,) = prim.vjp(cupy.asarray(x), [None], None, [TensorSpec(local, np.dtype(dtype))], (True,), key=key)
    assert_same_bits(dx, want)                     # the VJP regenerates the forward's mask
    assert fused["dropout"] == 3


def test_fused_dropout_of_a_strided_input(fused):
    x = np.random.default_rng(1).standard_normal((96, 40)).astype(np.float32)
    prim = ops.Dropout(0.8)
    assert_same_bits(prim.forward(cupy.asarray(x).T, key=9), prim.forward(x.T, key=9))
    assert fused["dropout"] == 1


# ---- GeLU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", [True, False])
def test_fused_gelu_forward_and_vjp_float64(fused, approximate):
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((64, 257)) * 2, rng.standard_normal((64, 257))
    prim = ops.GeLU(approximate=approximate)
    y = prim.fn(cupy.asarray(x))
    dx = prim.dfn(cupy.asarray(x), None, cupy.asarray(dy))
    assert fused["gelu"] == 1 and fused["gelu_grad"] == 1
    np.testing.assert_allclose(y.get(), prim.fn(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx.get(), prim.dfn(x, None, dy), rtol=1e-12, atol=1e-14)


def test_fused_gelu_in_place_equals_out_of_place(fused):
    x = cupy.asarray(np.random.default_rng(3).standard_normal((8, 300)).astype(np.float32))
    want = ops.GeLU().fn(x).get()
    got = ops.GeLU().forward_inplace(0, x)
    assert got.data.ptr == x.data.ptr                # written into x's buffer
    assert_same_bits(x, want)
    assert fused["gelu"] == 2


# float32 atol: in the tails (|x| up to ~8) the gradient is x * (1 - tanh^2) / 2 + ..., and
# CUDA's tanhf and numpy's differ by an ulp there, so 1 - tanh^2 moves by ~2 ulp(1) = 2.4e-7
# times |x|: up to ~4e-6 (the H100 run, session 6, measured 4.1e-6 on 5 of 4096 elements)
@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 1e-5, 1e-5), ("float16", 2e-3, 1e-3),
                                               ("bfloat16", 2e-2, 1e-2)])
def test_fused_tanh_gelu_in_lower_precision_tracks_the_cpu(fused, dtype, rtol, atol):
    rng = np.random.default_rng(4)
    x, dy = (rng.standard_normal(4096) * 2).astype(dtype), rng.standard_normal(4096).astype(dtype)
    prim = ops.GeLU()
    y, dx = prim.fn(cupy.asarray(x)), prim.dfn(cupy.asarray(x), None, cupy.asarray(dy))
    assert y.dtype == dx.dtype == np.dtype(dtype) and fused["gelu"] == fused["gelu_grad"] == 1
    np.testing.assert_allclose(y.get().astype(np.float64), prim.fn(x), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dx.get().astype(np.float64), prim.dfn(x, None, dy), rtol=rtol, atol=atol)


# ---- AdamWeightDecay -----------------------------------------------------------------------------

def adamw_three_steps(dtype, on_device: bool):
    """A decayed matrix and an undecayed bias after three updates, and the optimizer state."""
    rng = np.random.default_rng(5)
    params = [Parameter(rng.standard_normal((64, 33)).astype(dtype), name="w"),
              Parameter(rng.standard_normal(33).astype(dtype), name="b")]
    if on_device:
        for p in params:
            p.device_data(autopar.backend.GPU)
    opt = AdamWeightDecay(params, 1e-2, weight_decay=0.1)
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        opt.step([cupy.asarray(g) for g in grads] if on_device else grads)
    return {p.name: p.asnumpy() for p in params}, opt.state_dict()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_adam_weight_decay_three_steps_equal_cpu(fused, dtype):
    weights, state = adamw_three_steps(dtype, on_device=False)
    assert fused["adam_weight_decay"] == 0
    gpu_weights, gpu_state = adamw_three_steps(dtype, on_device=True)
    assert fused["adam_weight_decay"] == 6            # 2 parameters x 3 steps
    for name, want in list(weights.items()) + [(k, v) for k, v in state.items() if k != "step"]:
        got = gpu_weights.get(name, gpu_state.get(name))
        assert got.dtype == want.dtype
        if dtype == "float64":
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)
        else:
            np.testing.assert_array_max_ulp(got, want, maxulp=4)


# ---- Softmax and LayerNorm -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (5, 1000)])
def test_fused_softmax_forward_and_vjp_float64(fused, shape):
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal(shape) * 3, rng.standard_normal(shape)
    prim, spec = ops.Softmax(), [TensorSpec(shape, np.dtype(np.float64))]
    y = prim.forward(cupy.asarray(x))
    (dx,) = prim.vjp(cupy.asarray(dy), [None], y, spec, (True,))
    assert fused["softmax"] == fused["softmax_grad"] == 1 and isinstance(dx, cupy.ndarray)
    want = prim.forward(x)
    np.testing.assert_allclose(y.get(), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx.get(), prim.vjp(dy, [None], want, spec, (True,))[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype, rtol, atol", [("float32", 1e-5, 1e-7), ("float16", 2e-3, 1e-4),
                                               ("bfloat16", 2e-2, 1e-3)])
def test_fused_softmax_in_lower_precision_tracks_the_cpu(fused, dtype, rtol, atol):
    x = (np.random.default_rng(7).standard_normal((64, 512)) * 3).astype(dtype)
    y = ops.Softmax().forward(cupy.asarray(x))
    assert y.dtype == np.dtype(dtype) and fused["softmax"] == 1
    np.testing.assert_allclose(y.get().astype(np.float64), ops.Softmax().forward(x), rtol=rtol, atol=atol)


def test_softmax_over_another_axis_keeps_the_ufunc_path(fused):
    x = np.random.default_rng(8).standard_normal((6, 5, 4))
    y = ops.Softmax(axis=1).forward(cupy.asarray(x))
    assert fused["softmax"] == 0
    np.testing.assert_allclose(y.get(), ops.Softmax(axis=1).forward(x), rtol=1e-12)


# bfloat16: 8 significant bits, so one rounding of a value near 4 is 2**-6; the row sums
# are float32 on both sides, and the results differ by a rounding or two of the output
# float32 parameters under bfloat16 activations: mixed precision's LayerNorm (PanGu-α bf16)
@pytest.mark.parametrize("dtype, pdtype, rtol, atol", [("float64", "float64", 1e-12, 1e-12),
                                                       ("float32", "float32", 1e-5, 1e-5),
                                                       ("bfloat16", "bfloat16", 2e-2, 5e-2),
                                                       ("bfloat16", "float32", 2e-2, 5e-2)])
def test_fused_layer_norm_forward_and_vjp(fused, dtype, pdtype, rtol, atol):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((2, 48, 96)) * 3 + 1).astype(dtype)
    gamma, beta = rng.standard_normal(96).astype(pdtype), rng.standard_normal(96).astype(pdtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    prim = ops.LayerNorm()
    specs = [TensorSpec(a.shape, a.dtype) for a in (x, gamma, beta)]
    y = prim.forward(*map(cupy.asarray, (x, gamma, beta)))
    grads = prim.vjp(cupy.asarray(dy), [cupy.asarray(x), cupy.asarray(gamma), None], None, specs, (True,) * 3)
    assert fused["layer_norm"] == fused["layer_norm_grad"] == 1
    np.testing.assert_allclose(y.get().astype(np.float64), prim.forward(x, gamma, beta).astype(np.float64),
                               rtol=rtol, atol=atol)
    wants = prim.vjp(dy, [x, gamma, None], None, specs, (True,) * 3)
    for name, got, want in zip(("dx", "dgamma", "dbeta"), grads, wants):
        assert isinstance(got, cupy.ndarray) and got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got.get().astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=name)


# ---- one-pass row kernels (backend/rowkernels.py) ------------------------------------------------

ROW_CASES = [("float32", "float32", 1e-5, 1e-6), ("bfloat16", "float32", 2.0 ** -6, 2e-2), ("bfloat16", "bfloat16", 2.0 ** -6, 2e-2)]


@pytest.mark.parametrize("t, p, rtol, atol", ROW_CASES)
@pytest.mark.parametrize("shape", [(8, 1024), (37, 100), (3, 5, 4097)])
def test_row_kernels_serve_and_equal_the_fused_path_and_the_cpu(t, p, rtol, atol, shape):
    """Softmax, its VJP, LayerNorm and its VJP through a warp per row equal the reduction-based
    fused kernels and the CPU (rows of 100 and 4097: not multiples of the warp)."""
    from autopar.backend import rowkernels
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 3).astype(t)
    dy = rng.standard_normal(shape).astype(t)
    gamma, beta = rng.standard_normal(shape[-1]).astype(p), rng.standard_normal(shape[-1]).astype(p)
    gx, gdy, gg, gb = map(cupy.asarray, (x, dy, gamma, beta))
    x2 = gx.reshape(-1, shape[-1])
    assert rowkernels.serves("softmax", x2) and rowkernels.serves("layer_norm", x2, params=(gg, gb))

    def close(got, want, name):
        got = got.get() if isinstance(got, cupy.ndarray) else got
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol,
                                   err_msg=name)
    y = kernels.softmax(gx)
    close(y, kernels.fused_softmax(gx).get(), "softmax vs fused")
    close(y, ops.Softmax().forward(x), "softmax vs CPU")
    close(kernels.softmax_grad(gdy, y), kernels.fused_softmax_grad(gdy, y).get(), "softmax grad vs fused")
    ln = kernels.layer_norm(gx, gg, gb, 1e-5)
    close(ln, kernels.fused_layer_norm(gx, gg, gb, 1e-5).get(), "layer norm vs fused")
    close(ln, ops.LayerNorm().forward(x, gamma, beta), "layer norm vs CPU")
    dx, dgamma = kernels.layer_norm_grad(gdy, gx, gg, 1e-5)
    want_dx, want_dgamma = kernels.fused_layer_norm_grad(gdy, gx, gg, 1e-5)
    close(dx, want_dx.get(), "layer norm dx vs fused")
    np.testing.assert_allclose(dgamma.get(), want_dgamma.get(), rtol=1e-4, atol=1e-3 * np.sqrt(x.size / shape[-1]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_the_global_norm_on_device_is_the_hosts_float64_sum(dtype):
    """One reduction per gradient, float64 as it reads, one sync for the total: the CPU's
    blocked float64 sum to float64 rounding (the summation orders differ)."""
    from autopar.ops.norm import sum_of_squares
    rng = np.random.default_rng(12)
    grads = [rng.standard_normal(shape).astype(dtype) for shape in ((1000, 33), (7,), (3, 4, 5), (0,), (1 << 17,))]
    want = sum_of_squares(grads)
    got = sum_of_squares([cupy.asarray(g) for g in grads])
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 2.0 ** -7), ("float64", 1e-12)])
def test_a_bias_gradient_on_device_is_one_gemv_equal_to_the_cpus_sum(dtype, rtol):
    """sum_to of (B, S, C) onto (C,) -- Add's VJP for a bias -- equals the CPU's float32 (or
    float64) sum, half dtypes accumulated in float32 and rounded once."""
    from autopar.ops.elementwise import sum_to
    g = np.random.default_rng(13).standard_normal((4, 33, 96)).astype(dtype)
    got = sum_to(cupy.asarray(g), (96,))
    want = sum_to(g, (96,))
    assert isinstance(got, cupy.ndarray) and got.dtype == want.dtype and got.shape == (96,)
    np.testing.assert_allclose(got.get().astype(np.float64), want.astype(np.float64), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape, region", [((8, 16, 128, 128), None), ((4, 64, 4096), (slice(1, 3),)),
                                           ((3, 1001), None)])
def test_the_vectorised_dropout_gives_the_cpus_bits(dtype, shape, region):
    """A whole tensor, a shard that is one run of it, an odd length (the scalar tail): the
    vectorised kernel serves and equals the CPU's Dropout bit for bit."""
    from autopar.backend import veckernels
    region = None if region is None else region + (slice(None),) * (len(shape) - len(region))
    local = tuple(len(range(*s.indices(n))) for s, n in zip(region, shape)) if region else shape
    x = (np.random.default_rng(14).standard_normal(local) * 3).astype(dtype)
    assert veckernels.serves(cupy.asarray(x).reshape(-1))
    key, keep = derive_key(5, "blocks.0.attention.prob_dropout", 3), 0.9
    prim = ops.Dropout(keep) if region is None else ops.Dropout(keep).with_attrs(region=region, global_shape=shape)
    assert_same_bits(prim.forward(cupy.asarray(x), key=key), prim.forward(x, key=key))


@pytest.mark.parametrize("dtype, other", [("float32", "bfloat16"), ("bfloat16", "float32"),
                                          ("float32", "float16"), ("float16", "float32")])
def test_the_vectorised_add_and_casts_give_the_cpus_bits(dtype, other):
    """Add (fresh and in place, an odd length for the tail) and Cast float32 <-> bfloat16 /
    float16 on device arrays take veckernels and equal the CPU ops bit for bit."""
    from autopar.backend import veckernels
    rng = np.random.default_rng(15)
    a, b = (rng.standard_normal(10007) * 3).astype(dtype), (rng.standard_normal(10007) * 3).astype(dtype)
    ga, gb = cupy.asarray(a), cupy.asarray(b)
    assert veckernels.add_serves(ga, gb)
    assert_same_bits(ops.Add().forward(ga, gb), ops.Add().forward(a, b))
    assert_same_bits(ops.Add().forward_inplace(0, ga, gb), ops.Add().forward(a, b))
    assert_same_bits(ga, ops.Add().forward(a, b))                        # written into a's buffer
    assert veckernels.cast_serves(gb, other)
    cast = ops.Cast().with_attrs(dtype=np.dtype(other))
    assert_same_bits(cast.forward(gb), cast.forward(b))

"""The optional oneMKL GEMM (autopar/backend/mkl.py): every layout BLAS reads in place against a
float64 reference, the layouts it leaves to numpy, the opt-in and its error, and a PanGu-alpha
training step with oneMKL's GEMMs against the same step on numpy's."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from autopar import nn, ops
from autopar.backend import mkl
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.ops import contraction
from autopar.train import AdamWeightDecay


def _installed() -> bool:
    for path in mkl.candidates():
        try:
            ctypes.CDLL(path)
            return True
        except OSError:
            pass
    return False


@pytest.fixture
def use_mkl(monkeypatch):
    monkeypatch.setenv("AUTOPAR_BLAS", "mkl")
    monkeypatch.delenv("AUTOPAR_MKL_LIB", raising=False)
    mkl.library.cache_clear()
    yield
    monkeypatch.delenv("AUTOPAR_BLAS")
    mkl.library.cache_clear()


def count_served(monkeypatch) -> list[bool]:
    """Route the ops' host products through a counter: one entry per product, True where
    oneMKL computed it (False: left to numpy)."""
    served = []

    def counted(a, b):
        product = mkl.matmul(a, b)
        served.append(product is not None)
        return product
    monkeypatch.setattr(contraction, "host_matmul", counted)
    return served


needs_mkl = pytest.mark.skipif(not _installed(), reason="oneMKL not installed (pip install mkl)")


def layouts(r, rows: int, cols: int, dtype):
    """The same (rows, cols) values stored four ways BLAS reads in place: C order, a transposed
    view, a row-strided window of a wider matrix, and a transposed window of a taller one."""
    x = r.standard_normal((rows, cols)).astype(dtype)
    wide = np.zeros((rows, cols + 7), dtype)
    wide[:, 3:3 + cols] = x
    tall = np.zeros((cols + 5, rows), dtype)
    tall[2:2 + cols] = x.T
    return {"C": x, "T": np.ascontiguousarray(x.T).T, "window": wide[:, 3:3 + cols], "T-window": tall[2:2 + cols].T}


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(37, 29, 41), (64, 128, 1), (1, 300, 17)])
def test_every_in_place_layout_equals_the_float64_product(use_mkl, dtype, m, k, n):
    r = np.random.default_rng(0)
    a_ways, b_ways = layouts(r, m, k, dtype), layouts(r, k, n, dtype)
    want = a_ways["C"].astype(np.float64) @ b_ways["C"].astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for la, a in a_ways.items():
        for lb, b in b_ways.items():
            got = mkl.matmul(a, b)
            assert got is not None, (la, lb)
            assert got.dtype == dtype and got.flags.c_contiguous and got.shape == (m, n)
            assert not np.shares_memory(got, a) and not np.shares_memory(got, b)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(k), err_msg=f"{la} @ {lb}")


@needs_mkl
def test_what_blas_cannot_read_in_place_is_left_to_numpy_and_stays_right(use_mkl):
    r = np.random.default_rng(1)
    a, b = r.standard_normal((2, 20, 20)).astype(np.float32)
    assert mkl.matmul(a[:, ::2], b[::2]) is None                  # no unit stride either way
    assert mkl.matmul(a, b.astype(np.float64)) is None             # mixed dtypes
    assert mkl.matmul(a[:, :0], b[:0]) is None                     # an empty contraction
    assert mkl.matmul(a.astype(np.int32), b.astype(np.int32)) is None
    y = ops.MatMul()(a[:, ::2], b[::2])                            # through the op: numpy's product
    np.testing.assert_allclose(y, a[:, ::2].astype(np.float64) @ b[::2], rtol=1e-5, atol=1e-5)


def test_nothing_changes_unless_asked(monkeypatch):
    monkeypatch.delenv("AUTOPAR_BLAS", raising=False)
    mkl.library.cache_clear()
    try:
        assert mkl.library() is None
        assert mkl.matmul(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32)) is None
    finally:
        mkl.library.cache_clear()


def test_an_opt_in_without_the_library_names_what_was_tried(monkeypatch, tmp_path):
    missing = str(tmp_path / "libmkl_rt.so.3")
    monkeypatch.setenv("AUTOPAR_BLAS", "mkl")
    monkeypatch.setenv("AUTOPAR_MKL_LIB", missing)
    mkl.library.cache_clear()
    try:
        with pytest.raises(mkl.MKLNotFoundError) as err:
            ops.MatMul()(np.ones((3, 4), np.float32), np.ones((4, 2), np.float32))
    finally:
        mkl.library.cache_clear()
    assert "AUTOPAR_BLAS=mkl" in str(err.value) and missing in str(err.value) and "pip install mkl" in str(err.value)


def _two_steps(config, ids):
    """Loss of two AdamWeightDecay steps (with the clip) and the weights after them."""
    net = PanguAlphaWithLoss(config)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-3), clip_norm=1.0)
    losses = [float(train(ids)) for _ in range(2)]
    return losses, {p.name: np.array(p.data) for p in net.trainable_params()}


@needs_mkl
def test_a_pangu_step_on_onemkl_equals_the_step_on_numpy(monkeypatch):
    config = PanguAlphaConfig(vocab_size=96, seq_length=16, hidden_size=32, num_layers=2, num_heads=4,
                              ffn_hidden_size=64, dropout_rate=0.0)
    ids = np.random.default_rng(2).integers(0, 96, (4, 17)).astype(np.int32)
    monkeypatch.delenv("AUTOPAR_BLAS", raising=False)
    mkl.library.cache_clear()
    losses, weights = _two_steps(config, ids)
    monkeypatch.setenv("AUTOPAR_BLAS", "mkl")
    mkl.library.cache_clear()
    served = count_served(monkeypatch)
    try:
        losses_mkl, weights_mkl = _two_steps(config, ids)
    finally:
        mkl.library.cache_clear()
    assert sum(served) >= 20, f"oneMKL multiplied {sum(served)} of the step's {len(served)} products"
    np.testing.assert_allclose(losses_mkl, losses, rtol=1e-5)
    for name, w in weights.items():
        np.testing.assert_allclose(weights_mkl[name], w, rtol=1e-4, atol=1e-6, err_msg=name)


@needs_mkl
def test_calibration_times_the_gemm_programs_run(use_mkl, monkeypatch):
    """The CPU profile's GEMM rates come from the product a program's MatMul runs: oneMKL's
    when asked for, so the cost model prices the GEMMs the step will take."""
    from autopar.calibrate.cpu import measure_gemm_efficiency, measure_gemm_flops
    from autopar.comm import SelfCommunicator
    served = count_served(monkeypatch)
    comm = SelfCommunicator()
    assert measure_gemm_flops(comm, "float32", 64, 2) > 0
    assert measure_gemm_efficiency(comm, "float64", 1e9, 64, (8, 32), 2)
    assert served and all(served), served

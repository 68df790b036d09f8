"""The host's share of a GPU step (issue 14): on an H100 the 350M bf16 step was host-bound,
so the Python around each kernel counts. Checked here without a GPU:

* an embedding's ids and a loss's labels are range-checked on a device without waiting for
  it: the check's values stay on the device and the Program reads them all in one copy
  after its last instruction, raising the same named error before any output is handed
  back; on the host, and in an eager call, the check still raises at once;
* a CuPy array's module is found without the import machinery at every call;
* the memoised dtype predicates of the fused-kernel and cuBLAS paths answer as before for
  float16, bfloat16, float32, float64 and int32;
* the cuBLAS call gets the same shapes, strides and alpha/beta without numpy work per call,
  and column sums make their ones row once.

Device arrays here are stand-ins: ``test_backend``'s FakeDeviceArray (a numpy subclass with
a counting numpy as ``cupy``) for whole programs, and :class:`ndarray` below -- a numpy
subclass named as CuPy's array type -- for the kernels' predicates.
"""
from __future__ import annotations

import ctypes
import importlib
import sys
import types

import ml_dtypes
import numpy as np
import pytest
from gpu import cupy_or_skip
from test_backend import FakeDeviceArray, FakeDeviceModule, on_device

import autopar
from autopar import backend, nn, ops
from autopar.backend import ARRAY_MODULES, array_module, gemm, import_cupy, kernels, rowkernels, veckernels
from autopar.backend.arrays import dtype_name, read_scalars
from autopar.runtime.program import Program
from autopar.runtime.trace import trace

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32)]
VOCAB, HIDDEN = 7, 4


# ---- the deferred range check --------------------------------------------------------------

class Lookup(nn.Cell):
    """ids (B, S) -> table rows (B, S, H) -> logits (B*S, V) -> mean cross-entropy vs labels."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.table = nn.Parameter(rng.standard_normal((VOCAB, HIDDEN)), name="table")
        self.w = nn.Parameter(rng.standard_normal((HIDDEN, VOCAB)), name="w")
        self.gather = ops.Gather()
        self.matmul = ops.MatMul()
        self.loss = nn.SoftmaxCrossEntropyWithLogits()

    def construct(self, ids, labels):
        x = self.gather(self.table, ids, 0)                         # (B, S, H)
        logits = self.matmul(x.reshape((-1, HIDDEN)), self.w)       # (B*S, V)
        return self.loss(logits, labels.reshape((-1,)))


IDS = np.array([[0, 3, 6], [2, 2, 5]], np.int32)
LABELS = np.array([[1, 0, 6], [3, 4, 5]], np.int32)


class WrappingDevice(FakeDeviceModule):
    """test_backend's fake device, taking out-of-range indices as CuPy does: they wrap
    around (no error, garbage rows) -- which is why a device must check them at all."""

    def take(self, a, indices, axis=None):
        self.calls["take"] += 1
        return np.take(a, indices, axis=axis, mode="wrap")


@pytest.fixture
def fake_gpu(monkeypatch):
    """The wrapping fake device as 'cupy', registered for FakeDeviceArray."""
    module = WrappingDevice()
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(ARRAY_MODULES, FakeDeviceArray, lambda: module)
    return module


def program(target: str, measure_memory: bool = False):
    """The forward program of Lookup on ``target`` ('CPU' or 'GPU': the fake device)."""
    graph = trace(Lookup(), (IDS, LABELS), {}).graph
    return Program(graph, graph.outputs, measure_memory=measure_memory, backend=backend.as_backend(target))


@pytest.fixture
def deferred(monkeypatch):
    """Every (instruction, checks) list a Program run handed to raise_failed_checks."""
    seen: list = []
    real = Program.raise_failed_checks

    def spy(self, lists):
        seen.append([(self.instructions[k].node.prim.kind, list(checks)) for k, checks in lists])
        return real(self, lists)
    monkeypatch.setattr(Program, "raise_failed_checks", spy)
    return seen


def error_of(run) -> ValueError:
    with pytest.raises(ValueError) as info:
        run()
    return info.value


@pytest.mark.parametrize("measure_memory", [False, True])
def test_a_device_program_raises_the_named_error_after_its_last_instruction(fake_gpu, deferred, measure_memory):
    """Bad ids on the device: the Gather does not stop the run (the loss op after it leaves
    its own check too); the check's values are still device arrays; the run then raises
    the host's error, naming the Gather's node, and hands back nothing."""
    bad = IDS.copy()
    bad[1, 2] = VOCAB                                              # one id past the table
    host_err = error_of(lambda: program("CPU").run([bad, LABELS]))
    fake_gpu.calls.clear()
    err = error_of(lambda: program("GPU", measure_memory).run([bad, LABELS]))
    assert str(err) == str(host_err) == f"Gather: indices values: expected in [0, {VOCAB}), got min 0, max {VOCAB}"
    assert err.__notes__ == host_err.__notes__ == ["autopar: raised by Lookup/Gather"]
    (lists,) = deferred
    assert [kind for kind, _ in lists] == ["Gather", "SparseSoftmaxCrossEntropyWithLogits"]
    assert all(type(v) is FakeDeviceArray and v.ndim == 0 for _, checks in lists for c in checks for v in c.values)
    assert fake_gpu.calls["stack"] == 1                            # one copy to the host for every check


def test_bad_labels_on_the_device_name_the_loss(fake_gpu, deferred):
    bad = LABELS.copy()
    bad[0, 0] = -2
    err = error_of(lambda: program("GPU").run([IDS, bad]))
    assert str(err) == (f"SparseSoftmaxCrossEntropyWithLogits: labels values: expected in [0, {VOCAB}), "
                        f"got min -2, max 6")
    assert err.__notes__ == ["autopar: raised by loss/SparseSoftmaxCrossEntropyWithLogits"]


def test_a_good_batch_on_the_device_gives_the_host_loss(fake_gpu, deferred):
    (want,) = program("CPU").run([IDS, LABELS])
    assert deferred == [[("Gather", []), ("SparseSoftmaxCrossEntropyWithLogits", [])]]   # host: checked at once
    (got,) = program("GPU").run([IDS, LABELS])
    assert type(got) is np.ndarray and got == want
    assert [len(checks) for _, checks in deferred[1]] == [1, 1]


def test_the_host_raises_at_the_lookup_before_later_ops_run(monkeypatch, deferred):
    ran = []
    real = ops.SparseSoftmaxCrossEntropyWithLogits.forward
    monkeypatch.setattr(ops.SparseSoftmaxCrossEntropyWithLogits, "forward",
                        lambda self, *a, **kw: ran.append(1) or real(self, *a, **kw))
    bad = IDS.copy()
    bad[0, 0] = -1
    err = error_of(lambda: program("CPU").run([bad, LABELS]))
    assert str(err) == f"Gather: indices values: expected in [0, {VOCAB}), got min -1, max 6"
    assert err.__notes__ == ["autopar: raised by Lookup/Gather"]
    assert ran == [] and deferred == []                            # stopped at the Gather


def test_training_on_the_device_skips_the_update_of_a_bad_batch(fake_gpu):
    """TrainOneStepCell on the device, bad labels (negative: numpy's indexing wraps them as
    CuPy's does, so forward and backward run through): the error comes out of the step and
    the parameters are as they were (the optimizer never ran)."""
    autopar.set_context(device_target="GPU")
    try:
        net = Lookup()
        step = nn.TrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9))
        step(IDS, LABELS)
        before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
        bad = LABELS.copy()
        bad[0, 1] = -3
        err = error_of(lambda: step(IDS, bad))
        assert str(err) == "SparseSoftmaxCrossEntropyWithLogits: labels values: expected in [0, 7), got min -3, max 6"
        for p in net.trainable_params():
            np.testing.assert_array_equal(p.asnumpy(), before[p.name], err_msg=p.name)
        step(IDS, LABELS)                                          # a good batch updates again
        assert any((p.asnumpy() != before[p.name]).any() for p in net.trainable_params())
    finally:
        autopar.set_context(device_target="CPU")


def test_an_eager_call_on_device_arrays_checks_at_once(fake_gpu):
    table = on_device(np.zeros((VOCAB, 2)))
    with pytest.raises(ValueError, match=r"^Gather: indices values: expected in \[0, 7\), got min 3, max 9$"):
        ops.Gather()(table, on_device(np.array([3, 9])), 0)
    with pytest.raises(ValueError, match=r"^SparseSoftmaxCrossEntropyWithLogits: labels values: "
                                         r"expected in \[0, 7\), got min -1, max 2$"):
        ops.SparseSoftmaxCrossEntropyWithLogits()(on_device(np.zeros((2, VOCAB))), on_device(np.array([-1, 2])))


def test_read_scalars_copies_once_per_dtype(fake_gpu):
    values = [on_device(np.int32(3)), on_device(np.int64(2 ** 40)), on_device(np.int32(-1))]
    fake_gpu.calls.clear()
    got = read_scalars(values)
    assert got == [3, 2 ** 40, -1] and [type(g) for g in got] == [np.int32, np.int64, np.int32]
    assert fake_gpu.calls["stack"] == 2


# ---- the array module of a CuPy-like type ----------------------------------------------------

def cupy_like_type() -> type:
    return type("ndarray", (), {"__module__": "cupy._core.core"})


def test_a_cupy_array_type_reaches_the_import_machinery_once(monkeypatch):
    """First sight imports CuPy (here a stand-in, put in sys.modules as an import would);
    every later call -- array_module and the kernels' import_cupy -- is a look-up."""
    stand_in = types.ModuleType("cupy")
    imports = []
    real = importlib.import_module

    def counting(name, package=None):
        if name != "cupy":
            return real(name, package)
        imports.append(name)
        monkeypatch.setitem(sys.modules, "cupy", stand_in)        # as an import would; undone after the test
        return stand_in
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(importlib, "import_module", counting)
    x = cupy_like_type()()
    assert all(array_module(2.0, x) is stand_in for _ in range(1000))
    assert import_cupy("test") is stand_in and backend.is_array(x) and not backend.on_host(x)
    assert imports == ["cupy"]
    other = types.ModuleType("cupy")                               # a test's fresh stand-in: found, as importlib would
    monkeypatch.setitem(sys.modules, "cupy", other)
    assert array_module(x) is other and imports == ["cupy"]


def test_without_cupy_a_cupy_array_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)                 # what importlib reads as "not importable"
    with pytest.raises(ImportError, match=r"a CuPy array \(cupy._core.core.ndarray\): device_target: .*"
                                          r"CuPy is not importable.*pip install"):
        array_module(cupy_like_type()())


# ---- the dtype predicates answer as before -----------------------------------------------------

class ndarray(np.ndarray):  # noqa: N801 - CuPy's class name: what the kernels' predicates recognise
    """A host array the kernels' predicates take for a CuPy array (``data.ptr`` as CuPy's)."""

    __module__ = "cupy._core.core"

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def dev(shape, dtype) -> ndarray:
    """A 16-byte-aligned C-contiguous stand-in device array."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.zeros(n * dtype.itemsize + 16, np.uint8)
    start = -raw.ctypes.data % 16
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape).view(ndarray)


@pytest.fixture
def kernel_cupy(monkeypatch):
    """A 'cupy' with kernels and cuBLAS bindings; each path's once-per-process device check passes."""
    module = types.ModuleType("cupy")
    module.ElementwiseKernel = object
    module.cuda = types.SimpleNamespace(cublas=types.SimpleNamespace(gemmEx=None, gemmStridedBatchedEx=None))
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(kernels, "_bfloat16_compiles", lambda: True)
    monkeypatch.setattr(gemm, "_checked", lambda *a: True)
    monkeypatch.setattr(veckernels, "_checked_op", lambda *a: True)
    monkeypatch.setattr(veckernels, "_checked", lambda *a: True)
    monkeypatch.setattr(rowkernels, "_checked", lambda *a: True)
    return module


def names(dtypes) -> set[str]:
    return {np.dtype(d).name for d in dtypes}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_predicates_answer_as_before(kernel_cupy, dtype):
    """The truth table of each predicate, as the code before the memo gave it (float16 joined
    the vectorised kernels since)."""
    a, b = dev((4, 8), dtype), dev((4, 8), dtype)
    name = dtype.name
    assert kernels.fusable(a, b) is (name in {"float16", "bfloat16", "float32", "float64"})
    assert kernels.fusable(a, b, dtypes=kernels.EXACT_DTYPES) is (name in {"float32", "float64"})
    assert kernels.fusable(a, dev((4, 8), np.float64 if name != "float64" else np.float32)) is False
    assert kernels.fusable(a, np.zeros((4, 8), dtype)) is False                 # a host array among them
    assert gemm._served(a, dev((8, 3), dtype)) is (name in {"float16", "bfloat16"})
    assert gemm._out_name(a, dtype) == name                                    # the operands' own dtype
    assert gemm._out_name(a, np.float32) == gemm._out_name(a, None) == "float32"
    vectorised = {"float32", "bfloat16", "float16"}      # float16 since session 9's casts and adds
    assert veckernels.add_serves(a, b) is (name in vectorised)
    assert veckernels.add_serves(a, b, out=dev((4, 8), dtype)) is (name in vectorised)
    assert veckernels.serves(dev((32,), dtype)) is (name in vectorised)
    for target in DTYPES:
        assert veckernels.cast_serves(a, target) is ((name, target.name) in veckernels.CASTS)
    for params in DTYPES:
        p = (dev((8,), params), dev((8,), params))
        want = name in {"float32", "bfloat16"} and params.name in {"float32", "bfloat16"}
        assert rowkernels.serves("layer_norm", a, params=p) is want
        wide = {"float16": "float32", "bfloat16": "float32"}.get
        want_ln = (name in names(kernels.FUSED_DTYPES) and params.name in names(kernels.FUSED_DTYPES)
                   and wide(params.name, params.name) == wide(name, name))
        assert kernels.layer_norm_fusable(a, p) is want_ln
    assert rowkernels.serves("softmax", a) is (name in {"float32", "bfloat16"})


@pytest.mark.parametrize("dtype", DTYPES + [np.dtype(">f4"), np.dtype("<i8"), np.dtype(bool)], ids=str)
def test_dtype_name_is_numpys(dtype):
    assert dtype_name(dtype) == dtype.name and dtype_name(np.dtype(dtype.str)) == np.dtype(dtype.str).name


# ---- the cuBLAS call's Python ----------------------------------------------------------------------

@pytest.fixture
def recording_cublas(kernel_cupy):
    """cuBLAS calls recorded, with alpha and beta read from the host pointers passed."""
    calls, modes = [], []

    def record(name):
        def call(handle, op_b, op_a, n, m, k, alpha, *rest):
            beta = rest[6] if name == "gemmEx" else rest[8]
            calls.append((name, op_b, op_a, n, m, k, ctypes.c_float.from_address(alpha).value,
                          ctypes.c_float.from_address(beta).value) + tuple(r for r in rest if isinstance(r, int)
                                                                            and r < 2 ** 20))
        return call
    kernel_cupy.cuda = types.SimpleNamespace(
        cublas=types.SimpleNamespace(gemmEx=record("gemmEx"), gemmStridedBatchedEx=record("batched"),
                                     getPointerMode=lambda h: kernel_cupy.mode,
                                     setPointerMode=lambda h, m: modes.append(m)),
        device=types.SimpleNamespace(get_cublas_handle=lambda: 7))
    kernel_cupy.mode = gemm.CUBLAS_POINTER_MODE_HOST
    kernel_cupy.empty = lambda shape, dtype: dev(shape, dtype)
    kernel_cupy.broadcast_to = lambda x, shape: np.broadcast_to(x, shape).view(ndarray)
    kernel_cupy.ascontiguousarray = lambda x: dev(x.shape, x.dtype)
    return calls, modes


N, T = gemm.CUBLAS_OP_N, gemm.CUBLAS_OP_T
BF = gemm.CUDA_DATA_TYPES["bfloat16"]


@pytest.mark.parametrize("sa, sb, want", [
    # (a shape, b shape): (call, op_b, op_a, n, m, k, alpha, beta, then ints <2**20 after alpha:
    #   ldb, [stride_b], lda, [stride_a], c's ld, [c's stride, count] with the dtypes in between)
    ((6, 8), (8, 5), ("gemmEx", N, N, 5, 6, 8, 1.0, 0.0, BF, 5, BF, 8, 0, 5, 68, -1)),
    ((2, 6, 8), (8, 5), ("gemmEx", N, N, 5, 12, 8, 1.0, 0.0, BF, 5, BF, 8, 0, 5, 68, -1)),      # batch folded into rows
    ((3, 6, 8), (3, 8, 5), ("batched", N, N, 5, 6, 8, 1.0, 0.0, BF, 5, 40, BF, 8, 48, 0, 5, 30, 3, 68, -1)),
    ((6, 8), (2, 8, 5), ("batched", N, N, 5, 6, 8, 1.0, 0.0, BF, 5, 40, BF, 8, 0, 0, 5, 30, 2, 68, -1)),  # a repeats
])
def test_the_cublas_call_is_as_before(recording_cublas, sa, sb, want):
    calls, modes = recording_cublas
    c = gemm.half_matmul(dev(sa, BF16), dev(sb, BF16))
    assert c.shape == np.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1]) and c.dtype == np.float32
    assert calls == [want] and modes == []                          # host pointer mode already: not touched


def test_a_transposed_view_and_another_pointer_mode(recording_cublas, kernel_cupy):
    calls, modes = recording_cublas
    kernel_cupy.mode = 1                                           # CUBLAS_POINTER_MODE_DEVICE, set by someone else
    b = dev((5, 8), BF16).swapaxes(-1, -2)                         # (8, 5), read through CUBLAS_OP_T
    gemm.half_matmul(dev((6, 8), BF16), b)
    assert calls[0][:8] == ("gemmEx", T, N, 5, 6, 8, 1.0, 0.0)
    assert modes == [gemm.CUBLAS_POINTER_MODE_HOST, 1]             # set for the call, then restored


@pytest.mark.parametrize("a, b", [((), ()), ((3,), ()), ((), (2, 4)), ((2, 1), (2, 3)), ((1,), (5,)), ((4, 3), (3,))])
def test_batch_shapes_broadcast_as_numpy(a, b):
    assert gemm._batch_shape(a, b) == np.broadcast_shapes(a, b)


def test_column_sums_make_their_ones_row_once(kernel_cupy, monkeypatch):
    made = []
    kernel_cupy.ones = lambda shape, dtype: made.append((shape, np.dtype(dtype))) or np.ones(shape, dtype).view(ndarray)
    kernel_cupy.matmul = np.matmul
    device = [0]
    kernel_cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: device[0]))
    kernels._ones_row.cache_clear()
    try:
        rows = np.arange(18, dtype=np.float32).reshape(6, 3)
        for _ in range(3):
            np.testing.assert_array_equal(kernels.column_sum(rows.view(ndarray), "float32"), rows.sum(axis=0))
        kernels.column_sum(rows[:4].view(ndarray), np.float32)
        device[0] = 1
        kernels.column_sum(rows.view(ndarray), "float32")
        assert made == [((1, 6), np.float32), ((1, 4), np.float32), ((1, 6), np.float32)]
    finally:
        kernels._ones_row.cache_clear()


# ---- on a real GPU (skipped without CuPy and a device) -------------------------------------------

@pytest.fixture
def cupy():
    return cupy_or_skip(module_level=False)


def test_on_a_gpu_the_range_check_is_deferred_and_named(cupy, deferred):
    bad = IDS.copy()
    bad[0, 2] = VOCAB + 5                                          # CuPy wraps it: no fault, garbage rows
    host_err = error_of(lambda: program("CPU").run([bad, LABELS]))
    err = error_of(lambda: program("GPU").run([bad, LABELS]))
    assert str(err) == str(host_err) and err.__notes__ == host_err.__notes__ == ["autopar: raised by Lookup/Gather"]
    assert all(isinstance(v, cupy.ndarray) for _, checks in deferred[0] for c in checks for v in c.values)
    (want,) = program("CPU").run([IDS, LABELS])
    (got,) = program("GPU").run([IDS, LABELS])
    assert type(got) is np.ndarray and np.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_a_gpu_column_sums_reuse_their_ones_row(cupy, dtype):
    rows = np.random.default_rng(0).integers(-4, 5, (300, 24)).astype(np.float32)   # exact in bfloat16 too
    dev_rows = cupy.asarray(rows).astype(dtype)
    kernels._ones_row.cache_clear()
    first = kernels.column_sum(dev_rows, "float32")
    made = kernels._ones_row.cache_info().misses
    again = kernels.column_sum(dev_rows, "float32")
    assert kernels._ones_row.cache_info().misses == made           # the second call made no ones row
    for got in (first, again):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(cupy.asnumpy(got), rows.sum(axis=0))

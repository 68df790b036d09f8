"""The array backend (autopar/backend): kernels reach their array module only through it,
dispatch on their inputs' type, and a GPU program keeps its weights on the device.

No GPU here: a numpy subclass plays the device array (``FakeDeviceArray``) and a counting
wrapper of numpy plays CuPy (installed as ``cupy`` in ``sys.modules`` and registered in
``ARRAY_MODULES``). Programs, kernels and optimizers then take the device path (arrays
moved once, no cache blocking, atomic-add scatter), with numpy's arithmetic underneath,
so the device path's results can be compared with the CPU path's exactly.
"""
from __future__ import annotations

import ast
import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import autopar
from autopar import backend, nn, ops
from autopar.backend import ARRAY_MODULES, array_module, to_device, to_host
from autopar.ir.random import derive_key
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.ops.dropout import dropout_mask
from autopar.train import AdamWeightDecay

ROOT = Path(autopar.__file__).parent


# ---- the AST check: no numpy array math outside the backend -------------------------------

# numpy names a kernel may use: dtypes and scalar types, type checks, dtype and shape
# arithmetic on Python values. Anything else (np.exp, np.empty, np.asarray, ...) would run
# on the host whatever the inputs are.
ALLOWED = {"dtype", "result_type", "promote_types", "broadcast_shapes", "ndarray", "generic", "integer",
           "floating", "number", "bool_", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "iinfo", "finfo", "errstate", "shape", "ndim"}
# file -> (extra names, why they are host-side by design)
EXTRA = {
    "ops/call.py": ({"asarray"}, "user values (lists, scalars, Parameters) enter eager calls as host arrays"),
    "ops/norm.py": ({"asarray"}, "a gradient that is not an array (a Parameter) is read on the host"),
    "ops/activation.py": ({"frompyfunc"}, "the exact float64 erf is a ufunc of math.erf, used for numpy inputs only"),
    "nn/optimizers.py": ({"array", "asarray"}, "state_dict / load_state_dict exchange host arrays"),
    "nn/parameter.py": ({"array", "asarray"}, "values enter and leave a Parameter as host arrays"),
}
CONVERTED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ops").glob("*.py")) + [
    "nn/optimizers.py", "nn/parameter.py", "train/clip.py", "runtime/program.py", "runtime/allocator.py"]
HASH_FUNCTIONS = ("keep_mask", "_lowbias32")   # ir/random.py: dropout's hash, run on the device


def numpy_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every ``np.NAME`` and ``numpy.NAME`` in ``tree``."""
    return [(n.lineno, n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("np", "numpy")]


def forbidden_uses(tree: ast.AST, allowed: set[str]) -> list[tuple[int, str]]:
    bad = [(line, name) for line, name in numpy_uses(tree) if name not in allowed]
    for n in ast.walk(tree):     # from numpy import exp would dodge the attribute check
        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "numpy":
            bad.append((n.lineno, f"from {n.module} import ..."))
    return bad


@pytest.mark.parametrize("rel", CONVERTED)
def test_converted_modules_call_no_numpy_array_math(rel):
    tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
    allowed = ALLOWED | EXTRA.get(rel, (set(), ""))[0]
    assert not forbidden_uses(tree, allowed), f"{rel}: compute with xp = array_module(...) instead"


def test_dropout_hash_calls_no_numpy_array_math():
    tree = ast.parse((ROOT / "ir" / "random.py").read_text(encoding="utf-8"))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in HASH_FUNCTIONS]
    assert len(funcs) == len(HASH_FUNCTIONS)
    assert not [bad for f in funcs for bad in forbidden_uses(f, ALLOWED)]


@pytest.mark.parametrize("line, caught", [
    ("y = np.exp(x)", True),
    ("y = np.empty((2, 3), np.float32)", True),
    ("from numpy import exp", True),
    ("ufunc = staticmethod(np.add)", True),          # a reference, not only a call
    ("t = np.promote_types(x.dtype, np.float32)", False),
    ("y = xp.exp(x)", False),
])
def test_the_check_sees_numpy_math(line, caught):
    assert bool(forbidden_uses(ast.parse(line), ALLOWED)) is caught


def test_only_the_backend_imports_cupy():
    """CuPy is named (imported, or recognised by its module name) in autopar/backend only."""
    found = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for n in ast.walk(tree):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                names = [n.module or ""]
            elif isinstance(n, ast.Constant) and n.value == "cupy":
                names = ["cupy"]
            if any(x.split(".")[0] in ("cupy", "cupyx") for x in names):
                found.append(str(path.relative_to(ROOT)))
    assert "backend/cupy_import.py" in found
    assert not [f for f in found if not f.startswith("backend/")]


# ---- a fake device: dispatch by input type ------------------------------------------------

class FakeDeviceArray(np.ndarray):
    """A 'device' array: a numpy subclass that numpy's own functions would accept, so a
    kernel that bypassed the array module would still run -- only the counts show it."""

    def get(self) -> np.ndarray:
        """To the host, as CuPy's ``ndarray.get()``: a plain numpy copy."""
        return np.array(self.view(np.ndarray))


class FakeDeviceModule:
    """numpy with every attribute read counted; arrays it makes are FakeDeviceArrays."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()

    def asarray(self, a, dtype=None):
        self.calls["asarray"] += 1
        if isinstance(a, FakeDeviceArray) and dtype in (None, a.dtype):
            return a
        return np.array(a, dtype=dtype).view(FakeDeviceArray)     # a copy "to the device"

    def __getattr__(self, name):
        attr = getattr(np, name)
        self.calls[name] += 1
        if isinstance(attr, type) or not callable(attr) or isinstance(attr, np.ufunc):
            return attr       # ufuncs keep the subclass of their inputs (and carry .at)

        def made_on_device(*args, **kwargs):
            out = attr(*args, **kwargs)
            return out.view(FakeDeviceArray) if type(out) is np.ndarray else out
        return made_on_device


@pytest.fixture
def fake_gpu(monkeypatch):
    """The fake device as 'cupy', registered for FakeDeviceArray; CPU restored afterwards."""
    module = FakeDeviceModule()
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(ARRAY_MODULES, FakeDeviceArray, lambda: module)
    yield module
    autopar.set_context(device_target="CPU")


def on_device(a):
    return np.array(a).view(FakeDeviceArray)


OP_CASES = [   # (op, inputs, kwargs of forward): one or more per family
    (ops.MatMul(transpose_b=True), lambda r: (r.standard_normal((4, 6)), r.standard_normal((5, 6))), {}),
    (ops.Add(), lambda r: (r.standard_normal((3, 4)), r.standard_normal((4,))), {}),
    (ops.GeLU(), lambda r: (r.standard_normal((3, 8)).astype(np.float32),), {}),
    (ops.GeLU(approximate=False), lambda r: (r.standard_normal((3, 8)).astype(np.float32),), {}),
    (ops.Softmax(), lambda r: (r.standard_normal((3, 7)),), {}),
    (ops.LayerNorm(), lambda r: (r.standard_normal((3, 8)), r.standard_normal(8), r.standard_normal(8)), {}),
    (ops.SparseSoftmaxCrossEntropyWithLogits(), lambda r: (r.standard_normal((5, 9)), r.integers(0, 9, 5)), {}),
    (ops.Gather().with_attrs(axis=0), lambda r: (r.standard_normal((10, 4)), r.integers(0, 10, (2, 3))), {}),
    (ops.ReduceMean().with_attrs(axis=1), lambda r: (r.standard_normal((3, 5)),), {}),
    (ops.ReduceMax().with_attrs(axis=(0,)), lambda r: (r.standard_normal((3, 5)),), {}),
    (ops.ExpandDims().with_attrs(axis=1), lambda r: (r.standard_normal((2, 3)),), {}),
    (ops.Concat(axis=1), lambda r: (r.standard_normal((2, 3)), r.standard_normal((2, 2))), {}),
    (ops.Select(), lambda r: (r.random((3, 4)) > 0.5, r.standard_normal((3, 4)), r.standard_normal((3, 4))), {}),
    (ops.Dropout(0.7), lambda r: (r.standard_normal((4, 6)),), {"key": 7}),
]


def case_id(c) -> str:
    return type(c).__name__ if isinstance(c, ops.Primitive) else ""


@pytest.mark.parametrize("prim, make, kw", OP_CASES, ids=case_id)
def test_kernels_compute_with_the_module_of_their_inputs(fake_gpu, ufunc_kernels, prim, make, kw):
    """Forward and VJP on 'device' arrays go through the device module (array methods
    dispatch by type by themselves), return device arrays, and equal the numpy (ufunc)
    results bit for bit."""
    xs = make(np.random.default_rng(0))
    y = prim.forward(*xs, **kw)
    n = len(xs)
    needs = [i not in prim.nondiff_inputs for i in range(n)]
    specs = tuple(autopar.ir.spec.spec_of(x) for x in xs)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
    dx = prim.vjp(dy, xs, y, specs, needs, **kw)
    fake_gpu.calls.clear()
    y_dev = prim.forward(*map(on_device, xs), **kw)
    dx_dev = prim.vjp(on_device(dy), tuple(map(on_device, xs)), on_device(y), specs, needs, **kw)
    assert fake_gpu.calls, "the kernels never reached the inputs' array module"
    assert isinstance(y_dev, FakeDeviceArray)
    np.testing.assert_array_equal(to_host(y_dev), y)
    for a, b in zip(dx_dev, dx):
        assert (a is None) == (b is None)
        if a is not None:
            assert isinstance(a, FakeDeviceArray)
            np.testing.assert_array_equal(to_host(a), b)


def test_array_module_follows_the_first_array():
    assert array_module(1.0, np.ones(2)) is np
    assert array_module() is np
    assert array_module(None, "x") is np


def test_array_module_of_a_registered_type(fake_gpu):
    assert array_module(2.0, on_device([1.0])) is fake_gpu
    assert type(to_host(on_device([1.0, 2.0]))) is np.ndarray
    assert type(to_device(np.ones(2), "GPU")) is FakeDeviceArray


def test_dropout_masks_are_the_same_on_both_sides(fake_gpu):
    key = derive_key(0, "blocks.0.dropout", 3)
    region = (slice(1, 3), slice(2, 9, 2))
    host = dropout_mask(key, 0.9, (4, 10), region)
    dev = dropout_mask(key, 0.9, (4, 10), region, xp=fake_gpu)
    assert isinstance(dev, FakeDeviceArray) and fake_gpu.calls["arange"]
    np.testing.assert_array_equal(to_host(dev), host)
    assert 0 < host.sum() < host.size


# ---- set_context ---------------------------------------------------------------------------

def test_set_context_validates_the_target_and_its_keys():
    assert autopar.get_context("device_target") == "CPU"
    with pytest.raises(ValueError, match=r"set_context: device_target: expected one of \('CPU', 'GPU'\), "
                                         r"got 'Ascend'; autopar runs on CPU cores"):
        autopar.set_context(device_target="Ascend")
    with pytest.raises(TypeError, match=r"device_target: expected one of .* got 1 \(int\)"):
        autopar.set_context(device_target=1)
    with pytest.raises(ValueError, match=r"set_context: name: expected one of \('device_target',\), got 'mode'"):
        autopar.set_context(mode=0)
    assert autopar.get_context("device_target") == "CPU"


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_gpu_without_cupy_says_how_to_install_it():
    with pytest.raises(ImportError, match=r'device_target.*CuPy is not importable.*pip install -e "\.\[gpu\]"'):
        autopar.set_context(device_target="GPU")
    assert autopar.get_context("device_target") == "CPU"


# ---- a training run on the fake device equals the CPU run -----------------------------------

def trainer(config):
    """A PanGu-alpha, its AdamWeightDecay and the training step."""
    net = PanguAlphaWithLoss(config)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.1)
    return net, opt, nn.TrainOneStepCell(net, opt)


def test_pangu_alpha_trains_on_the_device_as_on_the_cpu(fake_gpu):
    """float64 tiny PanGu-alpha with dropout 0.1, three steps: the same losses and weights bit
    for bit; the weights moved to the device once and stayed there; users read host arrays."""
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", dropout_rate=0.1)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.seq_length + 1)).astype(np.int32)
    cpu_net, cpu_opt, cpu_step = trainer(config)
    cpu_losses = [float(cpu_step(ids)) for _ in range(3)]

    autopar.set_context(device_target="GPU")
    assert autopar.get_context("device_target") == "GPU" and backend.current_backend().xp is fake_gpu
    net, opt, step = trainer(config)
    losses = [float(step(ids))]
    placed = {p.name: p._data for p in net.trainable_params()}
    assert all(type(a) is FakeDeviceArray for a in placed.values())
    losses += [float(step(ids)) for _ in range(2)]
    assert all(p._data is placed[p.name] for p in net.trainable_params())   # moved once, updated in place
    assert losses == cpu_losses
    assert fake_gpu.calls["matmul"] and fake_gpu.calls["einsum"]             # kernels ran on the device module
    for p, q in zip(net.trainable_params(), cpu_net.trainable_params()):
        host = p.asnumpy()
        assert type(host) is np.ndarray
        np.testing.assert_array_equal(host, q.asnumpy(), err_msg=p.name)
    state = opt.state_dict()
    assert all(type(a) is np.ndarray for a in state.values())
    for k, a in cpu_opt.state_dict().items():
        np.testing.assert_array_equal(state[k], a, err_msg=k)
    loss, grads = autopar.value_and_grad(net)(ids)
    assert type(loss) is np.ndarray                                          # the loss comes back to the host
    assert all(type(g) is np.ndarray for g in grads.values())                # value_and_grad gives the user host arrays


def test_set_data_keeps_a_placed_parameter_on_the_device(fake_gpu):
    p = nn.Parameter(np.zeros((2, 3), np.float32), name="w")
    dev = p.device_data(backend.as_backend("GPU"))
    assert type(dev) is FakeDeviceArray and p.data is dev
    p.set_data(np.ones((2, 3)))
    assert type(p.data) is FakeDeviceArray and p.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(p), np.ones((2, 3), np.float32))
    assert type(p.asnumpy()) is np.ndarray


def test_base_buffer_and_writable_for_numpy_and_flagless_arrays():
    x = np.zeros((4, 3))
    assert backend.base_buffer(x[1:].T) is x and backend.base_buffer(3.0) == 3.0
    assert backend.writable(x[1:]) and not backend.writable(np.broadcast_to(x[0], (5, 3)))

    class Flags:        # CuPy's flags carry no 'writeable'
        pass

    class DeviceLike:
        flags, size = Flags(), 12

        def __init__(self, strides):
            self.strides = strides
    assert backend.writable(DeviceLike((24, 8))) and not backend.writable(DeviceLike((0, 8)))

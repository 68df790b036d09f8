"""The fused GPU kernels (autopar/backend/kernels.py), checked without a GPU.

The kernels' CUDA C bodies are run here as numpy: :func:`python_of` turns their small C
subset (declarations, casts, compound assignments, one ``if``, one ternary) into Python,
each cast an operator (``(float)x`` -> ``F32 ** x``: ``**`` binds as tightly as a cast).
numpy rounds each operation once, as the kernels compiled with ``--fmad=false`` do, so a
body run here must give the CPU op's bits: dropout's index walk and hash, GeLU's operation
order and casts, AdamWeightDecay's update. What is left for the GPU (tests/test_gpu_kernels.py):
that NVRTC compiles the bodies and that CUDA's tanh/erf/exp are within ulps of numpy's.

Also here: the CPU path is the one it was (outputs against the old formulas), and the ops
take the fused path only when ``kernels.fusable`` says so (CuPy arrays only).
"""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from autopar import ops
from autopar.backend import kernels, rowkernels
from autopar.ir import random
from autopar.ir.random import derive_key, keep_mask, region_indices
from autopar.ir.spec import TensorSpec
from autopar.nn import Parameter
from autopar.ops import activation, normalization
from autopar.train import AdamWeightDecay

# the GPU kernels follow the CPU's numpy (ufunc) formulas operation by operation, so those
# are what they are compared with, not the fused CPU kernels (tests/test_hostkernels.py)
pytestmark = pytest.mark.usefixtures("ufunc_kernels")

# ---- the C subset, as Python ----------------------------------------------------------------


class Cast:
    """A C cast: ``Cast(np.float32) ** x`` is ``(float)x`` (a numpy scalar for a scalar)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def __pow__(self, x):
        return np.asarray(x).astype(self.dtype)[()]


C_TYPES = {"unsigned long long": "U64", "long long": "I64", "unsigned int": "U32", "float": "F32",
           "double": "F64", "T": "T", "W": "W"}
CASTS = {"U64": Cast(np.uint64), "I64": Cast(np.int64), "U32": Cast(np.uint32), "F32": Cast(np.float32),
         "F64": Cast(np.float64)}
_TYPE = "|".join(sorted(map(re.escape, C_TYPES), key=len, reverse=True))


def python_of(c_source: str) -> str:
    """The kernel body ``c_source`` as Python statements (one per C statement)."""
    out, indent = [], ""
    for line in c_source.splitlines():
        for stmt in (s.strip() for s in line.split(";")):
            if not stmt:
                continue
            if stmt == "}":
                indent = indent[:-4]
                continue
            if m := re.fullmatch(r"if \((\w+)\) \{", stmt):
                out.append(f"{indent}if {m[1]}:")
                indent += "    "
                continue
            if m := re.fullmatch(rf"typedef ({_TYPE}) (\w+)", stmt):
                out.append(f"{indent}{m[2]} = {C_TYPES[m[1]]}")
                continue
            stmt = re.sub(rf"^(?:{_TYPE}) (?=\w+ = )", "", stmt)                       # a declaration
            stmt = re.sub(rf"\(({_TYPE})\)", lambda m: C_TYPES[m[1]] + "**", stmt)      # a cast
            stmt = re.sub(r"\b(0x[0-9a-fA-F]+)u\b", r"\1", stmt).replace("/=", "//=")
            if m := re.fullmatch(r"(\w+) = (.+) \? (.+) : (.+)", stmt):
                stmt = f"{m[1]} = where({m[2]}, {m[3]}, {m[4]})"
            out.append(indent + stmt)
    return "\n".join(out)


def lowbias32_of_source(x):
    """kernels.LOWBIAS32 (a __device__ function of x) run on a uint32 array."""
    body = [ln for ln in kernels.LOWBIAS32.splitlines() if ln.strip().startswith("x ")]
    ns = {"x": np.array(x, dtype=np.uint32)}
    exec(python_of("\n".join(body)), ns)
    return ns["x"]


def run_body(spec: kernels.KernelSpec, arrays: dict, scalars: list, dtype) -> dict:
    """Run ``spec.body`` as numpy: ``arrays`` (copied) binds the leading in_params, the
    outputs and ``i``; ``scalars`` the remaining in_params in order, as the kernel's wrapper
    passes them; T is ``dtype``. Returns the final namespace."""
    names = [p.split()[-1] for p in spec.in_params.split(",")]
    n_arrays = sum(n in arrays for n in names)
    assert set(names[:n_arrays]) <= set(arrays) and len(names) == n_arrays + len(scalars), (names, scalars)
    ns = dict(CASTS, T=Cast(dtype), where=np.where, tanh=np.tanh, exp=np.exp, sqrt=np.sqrt, erf=activation.erf,
              autopar_lowbias32=lowbias32_of_source)
    ns.update({k: np.array(v, copy=True) for k, v in arrays.items()})
    ns.update(zip(names[n_arrays:], scalars))
    with np.errstate(over="ignore"):
        exec(python_of(spec.body), ns)
    return ns


def assert_same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), \
        f"{np.count_nonzero(got != want)} of {got.size} differ"


def test_the_c_subset_translation():
    src = ("W t = (W)(T)(xw * xw);\n"
           "idx += (long long)(r % (unsigned long long)n1) * g1; r /= (unsigned long long)n1;\n"
           "x *= 0x7feb352du;\nfloat keep = h < threshold ? (float)1 : (float)0;\nif (decay) {\n    T d = p * wd;\n}")
    assert python_of(src).splitlines() == [
        "t = W**T**(xw * xw)", "idx += I64**(r % U64**n1) * g1", "r //= U64**n1", "x *= 0x7feb352d",
        "keep = where(h < threshold, F32**1, F32**0)", "if decay:", "    d = p * wd"]


# ---- dropout: the hash, the index walk, the value ----------------------------------------------

def test_lowbias32_source_is_keep_masks_hash():
    assert kernels.LOWBIAS32_MULTIPLIERS == (int(random._H1), int(random._H2))
    x = np.concatenate([np.array([0, 1, 2 ** 31, 2 ** 32 - 1], np.uint32),
                        np.random.default_rng(0).integers(0, 2 ** 32, 1000, dtype=np.uint32)])
    assert_same_bits(lowbias32_of_source(x), random._lowbias32(x.copy()))


REGIONS = [
    ((6, 8, 10), None),
    ((6, 8, 10), (slice(2, 5), slice(None), slice(4, 10, 2))),
    ((6, 8, 10), (slice(1, 2), slice(3, 7), slice(None))),            # an extent-1 dim folds into the base
    ((6, 8, 10), (slice(5, 6), slice(7, 8), slice(9, 10))),           # one element: no dims left
    ((4, 64, 96), (slice(None), slice(None), slice(48, 96))),         # an mp shard of the last dim
    ((1 << 21, 1 << 12), (slice((1 << 21) - 3, None), slice(None))),  # flat indices >= 2**32
    ((3, 1 << 31), (slice(1, 3), slice((1 << 31) - 5, None, 2))),     # >= 2**32, strided, two dims
]
DTYPES_P = [("float32", 0.9), ("float64", 0.5), ("float16", 0.7)]


@pytest.mark.parametrize("dtype, p", DTYPES_P)
@pytest.mark.parametrize("shape, region", REGIONS)
def test_dropout_kernel_body_gives_the_cpu_bits(shape, region, dtype, p):
    """The kernel's walk gives region_indices, its hash keep_mask, its value the CPU op's."""
    key = derive_key(5, "blocks.3.attention.dropout", 11)       # a 64-bit key: both halves matter
    want_index = region_indices(shape, region).reshape(-1)
    local = region_indices(shape, region).shape
    x = (np.random.default_rng(1).standard_normal(local) * 3).astype(dtype)
    prim = ops.Dropout(p) if region is None else ops.Dropout(p).with_attrs(region=region, global_shape=shape)
    want = prim.forward(x, key=key)                              # the CPU path
    base, dims = kernels.region_walk(shape, region)
    spec = kernels.dropout_spec(len(dims), np.promote_types(dtype, np.float32).name)
    scalars = kernels.dropout_args(key, p, np.dtype(dtype), base, dims)
    ns = run_body(spec, {"x": x.reshape(-1), "i": np.arange(x.size, dtype=np.uint64)}, scalars, dtype)
    np.testing.assert_array_equal(np.asarray(ns["idx"]).reshape(-1).astype(np.uint64), want_index)
    np.testing.assert_array_equal(np.asarray(ns["h"] < scalars[2]).reshape(-1),
                                  keep_mask(key, want_index, p))
    assert_same_bits(np.asarray(ns["y"]).reshape(-1), want.reshape(-1))


def test_region_walk_merges_and_folds():
    assert kernels.region_walk((4, 6), (slice(1, 3), slice(2, 6, 2))) == (8, ((2, 6), (2, 2)))
    assert kernels.region_walk((4, 5, 6)) == (0, ((120, 1),))
    assert kernels.region_walk((4, 5, 6), (slice(1, 3), slice(None), slice(None))) == (30, ((60, 1),))
    assert kernels.region_walk((4, 5, 6), (slice(2, 3), slice(1, 2), slice(3, 4))) == (69, ())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_dropout_is_the_old_formula(dtype):
    """(x * keep) * dtype(1 / p), the mask keep_mask of the global flat index: as before."""
    shape, region = (6, 8, 10), (slice(2, 5), slice(None), slice(4, 10, 2))
    x = np.random.default_rng(2).standard_normal((3, 8, 3)).astype(dtype)
    got = ops.Dropout(0.8).with_attrs(region=region, global_shape=shape).forward(x, key=77)
    want = x * keep_mask(77, region_indices(shape, region), 0.8)
    want *= want.dtype.type(1.0 / 0.8)
    assert_same_bits(got, want)


# ---- GeLU ----------------------------------------------------------------------------------------

GELU_CASES = [(True, "float16"), (True, "float32"), (True, "float64"), (False, "float32"), (False, "float64")]


@pytest.mark.parametrize("approximate, dtype", GELU_CASES)
def test_gelu_kernel_bodies_give_the_cpu_bits(approximate, dtype):
    """Run with numpy's tanh/erf/exp, the bodies equal the CPU op bit for bit: the same
    operations, in the same order and precision (on the GPU only tanh/erf/exp differ)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(301) * 3).astype(dtype)
    dy = rng.standard_normal(301).astype(dtype)
    prim = ops.GeLU(approximate=approximate)
    wide = np.promote_types(dtype, np.float32).name
    fwd = run_body(kernels.gelu_spec(approximate, False, wide), {"x": x},
                   kernels.gelu_constants(approximate, False, np.dtype(dtype)), dtype)
    assert_same_bits(fwd["y"], prim.fn(x))
    grad = run_body(kernels.gelu_spec(approximate, True, wide), {"x": x, "dy": dy},
                    kernels.gelu_constants(approximate, True, np.dtype(dtype)), dtype)
    assert_same_bits(grad["dx"], prim.dfn(x, None, dy))


def test_gelu_constants_are_activations():
    assert (kernels.SQRT_2_OVER_PI, kernels.INV_SQRT_2, kernels.INV_SQRT_2PI) == \
        (activation._SQRT_2_OVER_PI, activation._INV_SQRT_2, activation._INV_SQRT_2PI)


# ---- AdamWeightDecay -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_weight_decay_kernel_body_gives_the_cpu_bits(dtype):
    """Three steps, a decayed matrix and an undecayed bias: the body's p, m, v are the CPU
    optimizer's bit for bit."""
    rng = np.random.default_rng(4)
    values = {"w": rng.standard_normal((3, 5)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    params = [Parameter(v.copy(), name=k) for k, v in values.items()]
    opt = AdamWeightDecay(params, 1e-2, weight_decay=0.1)
    mine = {k: {"p": v.copy(), "m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in values.items()}
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        opt.step(grads)
        for (k, state), g, decays in zip(mine.items(), grads, opt.decay_flags):
            args = kernels.adam_weight_decay_args(np.dtype(dtype), 1e-2, opt.beta1, opt.beta2, opt.eps,
                                                  opt.weight_decay if decays else 0.0)
            ns = run_body(kernels.ADAM_WEIGHT_DECAY_SPEC, {"g": g, **state}, args, dtype)
            state.update(p=ns["p"], m=ns["m"], v=ns["v"])
    assert opt.decay_flags == (True, False)
    for p, st, (k, state) in zip(params, opt.states, mine.items()):
        assert_same_bits(state["p"], p.data)
        assert_same_bits(state["m"], st["moment1"])
        assert_same_bits(state["v"], st["moment2"])


# ---- dispatch: fused only for CuPy arrays --------------------------------------------------------

class ndarray:  # noqa: N801 -- named and placed as CuPy's array type is, so fusable takes it for one
    __module__ = "cupy"

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class HostSubclass(np.ndarray):
    """A numpy subclass (test_backend.py's stand-in device array is one): not CuPy."""


@pytest.fixture(autouse=True)
def compiling_cupy(monkeypatch, request):
    """A ``cupy`` module that compiles kernels, as far as ``fusable`` asks (the dispatch tests);
    the bodies-as-numpy tests never reach ``fusable``."""
    import types
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ElementwiseKernel=object))


def test_a_stand_in_cupy_that_compiles_no_kernels_takes_the_ordinary_path(monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace())     # tests/mpi/test_gpu_mpi.py's
    assert not kernels.fusable(ndarray("float32"))


def test_fusable_only_for_cupy_arrays_of_one_float_dtype():
    assert kernels.fusable(ndarray("float32")) and kernels.fusable(ndarray("float16"), ndarray("float16"))
    assert not kernels.fusable(ndarray("float16"), dtypes=kernels.EXACT_DTYPES)
    assert not kernels.fusable(ndarray("float32"), ndarray("float64"))
    assert not kernels.fusable(ndarray("int32"))
    assert not kernels.fusable(np.ones(3, np.float32))
    assert not kernels.fusable(np.ones(3, np.float32).view(HostSubclass))
    assert not kernels.fusable(ndarray("float32"), np.ones(3, np.float32))
    assert ops.GeLU(approximate=True)._fused(ndarray("float16"))
    assert not ops.GeLU(approximate=False)._fused(ndarray("float16"))


@pytest.fixture
def calls(monkeypatch):
    """Every fused kernel replaced by a recorder returning 7s; ``fusable`` left as it is."""
    seen = []

    def recorder(name):
        def kernel(*args, **kwargs):
            seen.append((name, args, kwargs))
            return np.full(np.shape(args[0]), 7.0, np.float32)
        return kernel
    for name in ("dropout", "gelu", "gelu_grad", "adam_weight_decay"):
        monkeypatch.setattr(kernels, name, recorder(name))
    return seen


def run_every_dispatching_op():
    """Dropout forward/VJP (whole and a shard), GeLU forward/in place/VJP (both forms), AdamW."""
    x, dy = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    spec = TensorSpec(x.shape, x.dtype)
    shard = ops.Dropout(0.8, seed0=1, seed1=2).with_attrs(region=(slice(0, 2), slice(3, 6)), global_shape=(4, 6))
    out = [ops.Dropout(0.8).forward(x, key=5), ops.Dropout(0.8).vjp(dy, [None], None, [spec], (True,), key=5)[0],
           shard.forward(x, key=5), ops.Dropout(1.0).forward(x, key=5)]
    for approximate in (True, False):
        gelu = ops.GeLU(approximate=approximate)
        out += [gelu.fn(x), gelu.dfn(x, None, dy)]
    out.append(ops.GeLU().forward_inplace(0, x.copy()))
    w, b = Parameter(np.ones((2, 3), np.float32), name="w"), Parameter(np.ones(3, np.float32), name="b")
    AdamWeightDecay([w, b], 1e-2, weight_decay=0.1).step([dy, dy[0]])
    return out, (w.data, b.data)


def test_numpy_arrays_never_take_the_fused_path(calls):
    out, (w, b) = run_every_dispatching_op()
    assert calls == []
    assert not any(np.array_equal(o, np.full(o.shape, 7.0)) for o in out)
    assert (w < 1).all() and (b < 1).all()           # the CPU update ran


def test_the_ops_take_the_fused_path_when_fusable(monkeypatch, calls):
    monkeypatch.setattr(kernels, "fusable", lambda *arrays, dtypes=kernels.FUSED_DTYPES: True)
    out, (w, b) = run_every_dispatching_op()
    names = [c[0] for c in calls]
    assert names == ["dropout"] * 3 + ["gelu", "gelu_grad"] * 2 + ["gelu"] + ["adam_weight_decay"] * 2
    drop = [c[1][1:] for c in calls[:3]]
    assert drop[0] == drop[1] == (5, 0.8, None, None)
    assert drop[2] == (derive_key(5, 1, 2), 0.8, (4, 6), (slice(0, 2), slice(3, 6)))   # the op's key, the shard
    assert [c[1][-1] for c in calls[3:8]] == [True, True, False, False, True]          # approximate
    assert calls[7][2]["out"] is calls[7][1][0]                                     # in place: out is x
    assert [c[2]["weight_decay"] for c in calls[8:]] == [0.1, 0.0]                  # the bias is not decayed
    assert calls[8][2] == {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.1}
    assert all(np.array_equal(o, np.full(o.shape, 7.0)) for o in out[:3] + out[4:])
    np.testing.assert_array_equal(out[3], np.ones((2, 3)))                         # keep_prob 1: no kernel
    assert (w == 1).all() and (b == 1).all()                                        # only the kernel updates


def test_importing_the_kernels_imports_no_cupy():
    code = ("import sys, autopar, autopar.backend.kernels as k; k.dropout_spec(2, 'float32'); "
            "k.gelu_spec(True, True, 'float32'); k.region_walk((4, 6), None); print('cupy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ---- Softmax and LayerNorm over the last axis ----------------------------------------------------

def row_sum(spec: kernels.ReductionSpec, arrays: dict, axis: int = 1):
    """The reduction of ``spec`` as numpy: its map expression summed (numpy's order) over ``axis``."""
    ns = dict(CASTS, exp=np.exp, **{k: np.asarray(v) for k, v in arrays.items()})
    mapped = eval(python_of(spec.map_expr), ns)
    return mapped.sum(axis=axis, keepdims=axis == 1, dtype=spec.wide)


def rows(dtype, seed, shape=(7, 33)):
    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_softmax_kernels_give_the_cpu_bits(dtype):
    """With numpy's row sums (the CPU's), the map and output bodies give the CPU's bits:
    on the GPU only the order of the row sums differs."""
    x, dy = rows(dtype, 5), rows(dtype, 6)
    wide = np.promote_types(dtype, np.float32).name
    total, out = kernels.softmax_specs(wide)
    m = x.max(axis=1, keepdims=True)
    s = row_sum(total, {"x": x, "m": m})
    y = run_body(out, {"x": x, "m": m, "s": s}, [], dtype)["y"]
    prim = ops.Softmax()
    assert_same_bits(y, prim.forward(x))
    total, out = kernels.softmax_grad_specs(wide)
    s = row_sum(total, {"dy": dy, "y": y})
    dx = run_body(out, {"dy": dy, "y": y, "s": s}, [], dtype)["dx"]
    spec = TensorSpec(x.shape, np.dtype(dtype))
    assert_same_bits(dx, prim.vjp(dy, [x], y, [spec], (True,))[0])


@pytest.mark.parametrize("dtype, pdtype", [("float16", "float16"), ("float32", "float32"), ("float64", "float64"),
                                           ("float16", "float32")])      # mixed precision: float32 gamma, beta
def test_layer_norm_kernels_follow_the_cpu(dtype, pdtype):
    """Given the CPU's row statistics, the output and dx bodies give the CPU's bits; the maps
    summed are the CPU's products bit for bit (the CPU sums them by einsum, in another order)."""
    x, dy = rows(dtype, 7), rows(dtype, 8)
    gamma, beta = rows(pdtype, 9, (33,)), rows(pdtype, 10, (33,))
    eps, wide, prim = 1e-5, np.promote_types(dtype, np.float32).name, ops.LayerNorm()
    specs = kernels.layer_norm_specs(wide)
    mean = x.mean(axis=1, dtype=wide, keepdims=True)                         # the CPU's mean
    xh, rstd = normalization._standardize(x, eps, np.dtype(wide), True)      # the CPU's xhat and rstd
    rstd = rstd[:, None]
    y = run_body(specs["y"], {"x": x, "mean": mean, "rstd": rstd, "gamma": gamma, "beta": beta}, [], dtype)["y"]
    assert_same_bits(y, prim.forward(x, gamma, beta))
    var = row_sum(specs["var"], {"x": x, "mean": mean})
    np.testing.assert_allclose(1.0 / np.sqrt(var / 33 + eps), rstd, rtol=4 * np.finfo(wide).eps)
    g = np.multiply(dy, gamma, dtype=wide)
    stats = {"x": x, "mean": mean, "rstd": rstd}
    gmean = row_sum(specs["g"], {"dy": dy, "gamma": gamma}) / 33
    assert_same_bits(gmean, g.mean(axis=1, keepdims=True))
    ns = dict(CASTS, **stats, dy=dy, gamma=gamma)
    assert_same_bits(eval(python_of(specs["gx"].map_expr), ns), g * xh)
    p = run_body(specs["dgamma"], {"dy": dy, **stats}, [], dtype)["p"]         # summed by column_sum's GEMV
    assert_same_bits(p, dy.astype(wide) * xh)
    proj = np.einsum("ij,ij->i", g, xh)[:, None] / 33                        # the CPU's projection
    dx = run_body(specs["dx"], {"dy": dy, "gamma": gamma, **stats, "gmean": gmean, "proj": proj}, [], dtype)["dx"]
    specs_in = [TensorSpec(a.shape, a.dtype) for a in (x, gamma, beta)]
    want_dx, want_dgamma, _ = prim.vjp(dy, [x, gamma, None], None, specs_in, (True, True, True))
    assert_same_bits(dx, want_dx)
    np.testing.assert_allclose(p.sum(axis=0).astype(pdtype), want_dgamma, rtol=50 * np.finfo(dtype).eps)


def test_softmax_and_layer_norm_take_the_fused_path_only_when_fusable(monkeypatch):
    """numpy arrays: the CPU kernels; ``fusable`` true: the fused ones, last axis only."""
    seen = []

    def record(name, result):
        return lambda *args, **kwargs: seen.append((name, args[-2:] if name == "layer_norm_grad" else ())) or result
    x, g = np.ones((2, 3)), np.ones(3)
    specs = [TensorSpec(a.shape, a.dtype) for a in (x, g, g)]
    for name, result in (("softmax", x), ("softmax_grad", x), ("layer_norm", x), ("layer_norm_grad", (x, g)),
                         ("column_sum", g)):
        monkeypatch.setattr(kernels, name, record(name, result))

    def run():
        ops.Softmax().forward(x)
        ops.Softmax().vjp(x, [None], x, specs[:1], (True,))
        ops.Softmax(axis=0).forward(x)                                   # another axis: never fused
        ops.LayerNorm().forward(x, g, g)
        ops.LayerNorm().vjp(x, [x, g, None], None, specs, (True, False, True))
        ops.LayerNorm(begin_norm_axis=0, begin_params_axis=1).forward(x, g, g)   # rows of 6: never fused
    run()
    assert seen == []
    monkeypatch.setattr(kernels, "fusable", lambda *arrays, dtypes=kernels.FUSED_DTYPES: True)
    run()
    assert seen == [("softmax", ()), ("softmax_grad", ()), ("layer_norm", ()), ("column_sum", ()),
                    ("layer_norm_grad", (True, False))]


def test_the_cublas_half_matmul_serves_only_device_arrays():
    """Host arrays (and a stand-in device module, which has no cuBLAS) keep the cast path."""
    from autopar.backend import half_matmul
    a = np.ones((4, 4), np.float16)
    assert half_matmul(a, a) is None
    assert half_matmul(a.astype("bfloat16"), a.astype("bfloat16")) is None


# ---- the one-pass row kernels (backend/rowkernels.py): their CUDA C, checked as text -------------

@pytest.mark.parametrize("kind", sorted(rowkernels.KERNELS))
@pytest.mark.parametrize("t, p", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")])
def test_row_kernel_sources_name_their_entry_and_leave_no_placeholder(kind, t, p):
    """The source has the entry point ``_kernel`` asks CuPy for, every {T}/{P} filled with
    the dtypes' storage (bfloat16 as its 16 bits), and widens parameters as it widens
    activations. (tests/test_gpu_kernels.py runs them; NVRTC compiled all 12 in session 8.)"""
    src = rowkernels.source(kind, t, p)
    assert f'extern "C" __global__ void autopar_row_{kind}(' in src
    assert "{T}" not in src and "{P}" not in src
    takes_params = kind.startswith("layer_norm")
    assert ("const unsigned short*" in src) == (t == "bfloat16" or (takes_params and p == "bfloat16"))
    assert "#define LP(v) " + ("__uint_as_float" if p == "bfloat16" else "(v)") in src


def test_a_bfloat16_row_kernel_rounds_to_nearest_even_as_ml_dtypes():
    """autopar_to_bf16 in numpy: u + 0x7fff + ((u >> 16) & 1), the high half; NaN kept."""
    f = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.4e38, 1e-40, np.inf, -np.inf], np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    assert bits.tobytes() == f.astype("bfloat16").view(np.uint16).tobytes()
    assert "u += 0x7fffu + ((u >> 16) & 1u);" in rowkernels.PRELUDE


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_vectorised_dropout_source_carries_keep_masks_hash(dtype):
    """veckernels' CUDA C holds the same hash rounds as kernels' element kernel (csource's one
    copy), reads 16-byte vectors of the dtype's width, and takes its scalar tail."""
    from autopar.backend import csource, veckernels
    src = veckernels.source(dtype)
    assert csource.KEEP_HASH in src and csource.LOWBIAS32 in src
    vector, width = veckernels.VEC_DTYPES[dtype]
    assert f"{vector} in = ((const {vector}*)x)[v];" in src and width * np.dtype(dtype).itemsize == 16
    assert "{" + "S}" not in src and "{V}" not in src and "{VT}" not in src
    assert kernels.keep_threshold is csource.keep_threshold


def _from_f16(h):
    """csource.F16's autopar_from_f16, step by step in numpy (uint32 arithmetic)."""
    h = h.astype(np.uint32)
    sign, e, m = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    sub, inf = e == 0, e == 31
    v = m.astype(np.float32) * np.float32(5.9604644775390625e-08)
    normal = (sign | ((e + 112) << 23) | (m << 13)).astype(np.uint32).view(np.float32)
    special = (sign | 0x7F800000 | (m << 13)).astype(np.uint32).view(np.float32)
    return np.where(sub, np.where(sign != 0, -v, v), np.where(inf, special, normal))


def _to_f16(f):
    """csource.F16's autopar_to_f16 in numpy: NaN, overflow past 65520, subnormals through
    a scale by 2**24 rounded to nearest even (__float2uint_rn), normals rebiased and rounded."""
    x = f.view(np.uint32).astype(np.uint64)
    sign, ax = (x >> 16) & 0x8000, x & 0x7FFFFFFF
    scaled = ax.astype(np.uint32).view(np.float32) * np.float32(16777216.0)
    r = ax - 0x38000000
    normal = sign | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)
    out = np.where(ax > 0x7F800000, sign | 0x7E00, np.where(ax >= 0x477FF000, sign | 0x7C00,
                   np.where(ax < 0x38800000, sign | np.rint(np.minimum(scaled, 2048)).astype(np.uint64), normal)))
    return out.astype(np.uint16)


def test_the_float16_conversions_of_the_vectorised_kernels_give_numpys_bits():
    """Every one of the 65,536 halves widens to numpy's float32; floats around every half,
    the midpoints between halves (ties to even), subnormals, 65504..65535 and infinities
    narrow to numpy's half -- by csource.F16's own steps, whose C lines are checked here."""
    from autopar.backend import csource
    halves = np.arange(65536, dtype=np.uint16)
    want = halves.view(np.float16).astype(np.float32)
    got = _from_f16(halves)
    assert ((got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))).all()
    finite = want[np.isfinite(want)]
    with np.errstate(all="ignore"):
        f = np.concatenate([finite, np.nextafter(finite, np.float32(np.inf)), np.nextafter(finite, np.float32(-np.inf)),
                            ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32),
                            np.float32([65504, 65519.99, 65520, 65535, 1e6, np.inf, -np.inf, 0.0, -0.0, 1e-8, -3e-8]),
                            np.random.default_rng(0).standard_normal(200_000).astype(np.float32) * 1e-5])
        want16 = f.astype(np.float16).view(np.uint16)
    assert (_to_f16(f) == want16).all()
    assert "r += 0xfffu + ((r >> 13) & 1u);" in csource.F16 and "ax >= 0x477ff000u" in csource.F16
    assert "__float2uint_rn(__uint_as_float(ax) * 16777216.0f)" in csource.F16
    assert "((e + 112u) << 23) | (m << 13)" in csource.F16

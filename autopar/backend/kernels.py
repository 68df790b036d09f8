"""Fused GPU kernels for the hottest elementwise paths: one memory pass where CuPy's ufuncs
take one pass per operator.

    dropout(x, key, keep_prob, global_shape, region)   Dropout's forward and VJP
    gelu(x, approximate, out=None) / gelu_grad(x, dy, approximate)   GeLU and its VJP
    adam_weight_decay(p, g, m, v, ...)                  AdamWeightDecay's update, in place
    softmax(x) / softmax_grad(dy, y)                    Softmax over the last axis and its VJP
    layer_norm(x, gamma, beta, eps) / layer_norm_grad(dy, x, gamma, eps)   LayerNorm, last axis
    column_sum(a2, wide)                                 sums over rows, as a ones-row GEMV
    sum_of_squares(x)                                    float64 sum of squares, left on the device

An op calls them behind one check, ``fusable(*arrays)``: only real CuPy arrays (of one
float dtype) take a fused kernel, so the numpy path, and the test suite's stand-in device
arrays, run exactly the code they ran before. Each kernel is a ``cupy.ElementwiseKernel``
(row sums: ``cupy.ReductionKernel``) built from plain-string specs on first use
(``functools.cache``; CuPy compiles it on the first call and caches the binary on disk);
importing this module imports nothing of CuPy.

Same results as the CPU: every kernel performs the CPU formula's float operations in the
CPU's order and precision, and is compiled with ``--fmad=false`` so the CUDA compiler
does not contract a multiply and an add into one FMA (a different rounding). Sums, products,
quotients and square roots are then correctly rounded on both sides: dropout and the AdamW
update give the CPU's bits; GeLU differs only by the device's tanh/erf/exp (a few ulps);
Softmax and LayerNorm by that and the order of their row sums (a reduction kernel's, not
numpy's pairwise order), so their results agree to rounding, not to the bit. The row-wise
kernels read their input two or three times (max, sum, output) where the ufunc chain makes
and re-reads temporaries the size of the input at every step.
Dropout's keep bit is :func:`autopar.ir.random.keep_mask`'s hash written in CUDA C (the
constants in ``csource``; ``tests/test_gpu_kernels_cpu.py`` checks they are ``ir/random.py``'s).
"""
from __future__ import annotations

import functools
import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from . import rowkernels, veckernels
from .arrays import dtype_name, is_cupy_type
from .csource import KEEP_HASH, LOWBIAS32, LOWBIAS32_MULTIPLIERS, keep_threshold  # noqa: F401  (re-exported)
from .cupy_import import import_cupy
from .gemm import half_matmul

FUSED_DTYPES = ("float16", "bfloat16", "float32", "float64")
EXACT_DTYPES = ("float32", "float64")   # kernels with no half variant (erf GeLU, AdamW)
HALF_DTYPES = ("float16", "bfloat16")
NVRTC_OPTIONS = ("--fmad=false",)        # no multiply-add contraction: the CPU's rounding



def fusable(*arrays, dtypes: tuple[str, ...] = FUSED_DTYPES) -> bool:
    """Whether a fused kernel serves these arrays: all CuPy arrays (recognised by type, as
    ``arrays.array_module`` does, without importing CuPy) of one dtype among ``dtypes``,
    from a CuPy that compiles kernels (a stand-in device module, as the CPU tests of the
    device paths use, takes the ordinary path). Every elementwise op asks, so it is written
    as plain loops over memoised look-ups (no generators, no ``dtype.name``)."""
    for a in arrays:
        if not is_cupy_type(type(a)):
            return False
    if not hasattr(sys.modules.get("cupy"), "ElementwiseKernel"):
        return False
    dtype = arrays[0].dtype
    for a in arrays:
        if a.dtype != dtype:
            return False
    name = dtype_name(dtype)
    if name not in dtypes:
        return False
    return name != "bfloat16" or _bfloat16_compiles()


def _wide(dtype) -> np.dtype:
    """The dtype a kernel computes in: float32 for float16 (as the CPU's ``blocked``), else ``dtype``."""
    return np.promote_types(dtype, np.float32)


_C_TYPES = {"float32": "float", "float64": "double"}


@dataclass(frozen=True)
class KernelSpec:
    """A ``cupy.ElementwiseKernel``'s source, as plain strings: built and tested without
    CuPy (``tests/test_gpu_kernels_cpu.py`` runs the bodies as numpy); its arguments are
    passed in ``in_params`` order, then the outputs."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str = ""


@dataclass(frozen=True)
class ReductionSpec:
    """A ``cupy.ReductionKernel`` summing ``map_expr`` (in the concrete ``wide`` dtype) into
    ``s``, as plain strings like :class:`KernelSpec`."""

    name: str
    in_params: str
    map_expr: str
    wide: str

    @property
    def out_params(self) -> str:
        return f"{self.wide} s"


@functools.cache
def _compiled_sum(spec: ReductionSpec):
    """The reduction of ``spec`` (called with ``axis=`` and ``keepdims=``)."""
    cupy = import_cupy("autopar.backend.kernels")
    return cupy.ReductionKernel(spec.in_params, spec.out_params, spec.map_expr, "a + b", "s = a", "0",
                                name=spec.name, reduce_type=_C_TYPES[spec.wide], options=NVRTC_OPTIONS)


@functools.cache
def _compiled(spec: KernelSpec):
    """The kernel of ``spec`` (CuPy compiles it on its first call, per dtype)."""
    cupy = import_cupy("autopar.backend.kernels")
    return cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.body, name=spec.name,
                                  preamble=spec.preamble, options=NVRTC_OPTIONS)


BFLOAT16_PROBE = KernelSpec("autopar_bfloat16_probe", "T x, float s", "T y", "y = (T)((float)x * s);")


@functools.cache
def _bfloat16_compiles() -> bool:
    """Whether this CuPy compiles and runs kernels on bfloat16 arrays (CuPy 14 maps them to
    CUDA's ``__nv_bfloat16``; its support is marked experimental): the casts every fused
    kernel makes, checked once per process on a few exact values. If not, bfloat16 takes
    the ufunc path, with a warning saying why."""
    cupy = import_cupy("autopar.backend.kernels")
    try:
        x = cupy.asarray(np.asarray([1.0, -2.5, 0.125, 3.0], np.float32)).astype("bfloat16")
        y = _compiled(BFLOAT16_PROBE)(x, np.float32(2.0))
        if y.dtype != x.dtype or not bool((y.astype(np.float32) == x.astype(np.float32) * 2).all()):
            raise ValueError(f"the probe kernel returned {y.astype(np.float32).get()} for 2 x {x.astype(np.float32).get()}")
    except Exception as err:        # a CuPy without bfloat16 kernels: the ufunc path serves
        warnings.warn(f"autopar: no fused bfloat16 kernels here ({type(err).__name__}: {err}); "
                      "bfloat16 elementwise ops take CuPy's ufuncs", RuntimeWarning, stacklevel=3)
        return False
    return True


# ---- dropout ---------------------------------------------------------------------------------

def region_walk(shape: tuple[int, ...], region=None) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(base, ((extent, stride), ...)): the flat row-major index in ``shape`` of the element
    at local position (j0, j1, ...) of ``region`` (a tuple of slices; None: all of it) is
    ``base + sum(j_d * stride_d)``. Dims of extent 1 fold into ``base``; a dim contiguous
    with the next one in ``shape`` merges with it, so a full array is one dim of stride 1.

        region_walk((4, 6), (slice(1, 3), slice(2, 6, 2)))   # (8, ((2, 6), (2, 2)))
    """
    region = tuple(region) if region is not None else (slice(None),) * len(shape)
    base, stride, dims = 0, 1, []
    for d in reversed(range(len(shape))):
        start, stop, step = region[d].indices(shape[d])
        base += start * stride
        dims.append((len(range(start, stop, step)), step * stride))
        stride *= shape[d]
    merged: list[tuple[int, int]] = []
    for extent, step in reversed(dims):           # outermost first
        if extent == 1:
            continue
        if merged and merged[-1][1] == extent * step:
            merged[-1] = (merged[-1][0] * extent, step)
        else:
            merged.append((extent, step))
    return base, tuple(merged)


@functools.lru_cache(maxsize=64)
def _whole_walk(shape: tuple[int, ...]) -> tuple[int, tuple[tuple[int, int], ...]]:
    """:func:`region_walk` of a whole array, once per shape (a region's slices do not hash
    on every Python this runs on)."""
    return region_walk(shape)


def walk_source(ndim: int) -> str:
    """CUDA C: ``idx``, the global flat index of local element ``i`` (see :func:`region_walk`)."""
    lines = ["unsigned long long r = i;", "long long idx = (long long)base;"]
    for d in reversed(range(1, ndim)):
        lines.append(f"idx += (long long)(r % (unsigned long long)n{d}) * g{d}; r /= (unsigned long long)n{d};")
    if ndim:
        lines.append("idx += (long long)r * g0;")
    return "\n".join(lines)



@functools.cache
def dropout_spec(ndim: int, wide: str) -> KernelSpec:
    """y = x * keep * scale over a region walked in ``ndim`` dims, computed in ``wide``."""
    walk = "".join(f", int64 n{d}" for d in range(1, ndim)) + "".join(f", int64 g{d}" for d in range(ndim))
    c = _C_TYPES[wide]
    body = walk_source(ndim) + KEEP_HASH + f"""{c} keep = h < threshold ? ({c})1 : ({c})0;
y = (T)((({c})x * keep) * scale);
"""
    return KernelSpec(f"autopar_dropout_{ndim}d",
                      f"T x, uint32 key_lo, uint32 key_hi, uint32 threshold, {wide} scale, uint64 base{walk}",
                      "T y", body, LOWBIAS32)


def dropout_args(key: int, keep_prob: float, dtype, base: int, dims) -> list:
    """:func:`dropout_spec`'s scalar arguments, in order (the scale rounded to ``dtype``
    first, as the CPU's ``out.dtype.type(1.0 / p)``)."""
    args = [np.uint32(key & 0xFFFFFFFF), np.uint32((key >> 32) & 0xFFFFFFFF), np.uint32(keep_threshold(keep_prob)),
            _wide(dtype).type(dtype.type(1.0 / keep_prob)), np.uint64(base)]
    return args + [np.int64(n) for n, _ in dims[1:]] + [np.int64(g) for _, g in dims]


def dropout(x, key: int, keep_prob: float, global_shape=None, region=None):
    """``x * keep_mask(key, index, keep_prob) * (1 / keep_prob)`` in one pass, ``index`` the
    element's flat index in ``global_shape`` (``x`` is its ``region``; None: ``x`` is all of
    it), computed in the kernel: no index array, no host sync. Same bits as the CPU's
    ``Dropout._apply``: (x * keep) * scale, scale rounded to x's dtype. A run of consecutive
    elements in float32 or bfloat16 takes the vectorised kernel (``veckernels``)."""
    flat = x.reshape(-1)         # (copies a strided x, as the CPU's reshape does)
    base, dims = _whole_walk(tuple(x.shape)) if region is None else region_walk(tuple(global_shape), region)
    assert math.prod(n for n, _ in dims) == flat.size or flat.size == 0, (dims, x.shape)
    if flat.size and len(dims) == 1 and dims[0][1] == 1 and veckernels.serves(flat):   # one run of the tensor
        return veckernels.dropout(flat, key, keep_prob, base).reshape(x.shape)
    out = import_cupy("autopar.backend.kernels").empty_like(flat)
    if flat.size:
        spec = dropout_spec(len(dims), dtype_name(_wide(x.dtype)))
        _compiled(spec)(flat, *dropout_args(key, keep_prob, x.dtype, base, dims), out)
    return out.reshape(x.shape)


# ---- GeLU ------------------------------------------------------------------------------------
# activation.py's constants (Python floats); a kernel takes them as arguments.

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_CUBIC = 0.044715

# tanh form, computed in W (float32 for float16 inputs): x*x is a T product, as numpy's
# multiply of two T arrays into a W buffer; every later step is in W (activation.py's
# _gelu_tanh / _gelu_tanh_grad, operation by operation).
GELU_TANH = """
W xw = (W)x;
W t = (W)(T)(xw * xw);
t = t * k;
t = t + (W)1;
t = t * xw;
t = t * c;
t = tanh(t);
t = t + (W)1;
W o = t * xw;
o = o * (W)0.5;
y = (T)o;
"""
GELU_TANH_GRAD = """
W xw = (W)x;
W u = (W)(T)(xw * xw);
W t = u * k;
t = t + (W)1;
t = t * xw;
t = t * c;
t = tanh(t);
u = u * k3;
u = u + (W)1;
u = u * xw;
u = u * hc;
W o = t * t;
o = (W)1 - o;
o = o * u;
t = t * (W)0.5;
t = t + (W)0.5;
o = o + t;
o = o * (W)dy;
dx = (T)o;
"""
# erf form, in T (float32/float64 only): 0.5 * x * (1.0 + erf(x * INV_SQRT_2)) and
# dy * (cdf + x * pdf), in the order Python evaluates those expressions.
GELU_ERF = """
T a = (T)0.5 * x;
T b = x * r2;
T s = (T)1 + erf(b);
y = a * s;
"""
GELU_ERF_GRAD = """
T b = x * r2;
T s = (T)1 + erf(b);
T cdf = (T)0.5 * s;
T n = (T)(-0.5) * x;
n = n * x;
T pdf = r2pi * exp(n);
T slope = x * pdf;
T total = cdf + slope;
dx = dy * total;
"""


@functools.cache
def gelu_spec(approximate: bool, grad: bool, wide: str) -> KernelSpec:
    """GeLU (``grad``: its VJP), the tanh form computed in ``wide``, the erf form in T."""
    name = f"autopar_gelu_{'tanh' if approximate else 'erf'}{'_grad' if grad else ''}"
    ins, out = ("T x, T dy", "T dx") if grad else ("T x", "T y")
    if approximate:
        consts = f", {wide} k, {wide} c" + (f", {wide} k3, {wide} hc" if grad else "")
        body = f"typedef {_C_TYPES[wide]} W;\n" + (GELU_TANH_GRAD if grad else GELU_TANH)
    else:
        consts = ", T r2" + (", T r2pi" if grad else "")
        body = GELU_ERF_GRAD if grad else GELU_ERF
    return KernelSpec(name, ins + consts, out, body)


@functools.lru_cache(maxsize=32)
def gelu_constants(approximate: bool, grad: bool, dtype) -> tuple:
    """:func:`gelu_spec`'s constant arguments, in order, in its dtype (the wide one for the
    tanh form): activation.py's Python floats, rounded as numpy rounds a Python scalar
    (made once per form and dtype: every GeLU launch passes them)."""
    if approximate:
        w = _wide(dtype).type
        values = [GELU_CUBIC, SQRT_2_OVER_PI] + ([3 * GELU_CUBIC, 0.5 * SQRT_2_OVER_PI] if grad else [])
        return tuple(w(v) for v in values)
    return tuple(dtype.type(v) for v in ([INV_SQRT_2] + ([INV_SQRT_2PI] if grad else [])))


def gelu(x, approximate: bool, out=None):
    """GeLU of ``x`` in one pass (into ``out``, which may be ``x``). The erf form needs
    float32/float64 (``fusable(x, dtypes=EXACT_DTYPES)``)."""
    kernel = _compiled(gelu_spec(bool(approximate), False, dtype_name(_wide(x.dtype))))
    consts = gelu_constants(approximate, False, x.dtype)
    return kernel(x, *consts) if out is None else kernel(x, *consts, out)


def gelu_grad(x, dy, approximate: bool):
    """dy * GeLU'(x) in one pass (x and dy of one dtype)."""
    kernel = _compiled(gelu_spec(bool(approximate), True, dtype_name(_wide(x.dtype))))
    return kernel(x, dy, *gelu_constants(approximate, True, x.dtype))


# ---- AdamWeightDecay -------------------------------------------------------------------------
# nn/optimizers.py's AdamWeightDecay._update (with _AdamBase._moments), operation by
# operation; p, m and v are read and written in place.
ADAM_WEIGHT_DECAY = """
T s = g * c1;
T m1 = m * b1;
m1 = m1 + s;
T g2 = g * g;
g2 = g2 * c2;
T v1 = v * b2;
v1 = v1 + g2;
T u = sqrt(v1);
u = u + eps;
u = m1 / u;
if (decay) {
    T d = p * wd;
    u = u + d;
}
u = u * lr;
m = m1;
v = v1;
p = p - u;
"""


ADAM_WEIGHT_DECAY_SPEC = KernelSpec("autopar_adam_weight_decay",
                                    "T g, T b1, T c1, T b2, T c2, T eps, T wd, T lr, bool decay", "T p, T m, T v",
                                    ADAM_WEIGHT_DECAY)


@functools.lru_cache(maxsize=16)
def adam_weight_decay_args(dtype, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """The kernel's scalar arguments, in order, each rounded to ``dtype`` as numpy rounds
    the Python float the CPU code multiplies or adds (made once per step and decay setting:
    the ~390 updates of a 350M PanGu-α step share two sets)."""
    t = dtype.type
    return (t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(eps), t(weight_decay), t(lr),
            np.bool_(bool(weight_decay)))


def adam_weight_decay(p, g, m, v, *, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    """One AdamWeightDecay update of ``p``, ``m``, ``v`` in place from ``g`` (all of one
    dtype, float32 or float64): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr * (m / (sqrt(v) + eps) + wd * p), each Python scalar rounded to the dtype as
    numpy rounds it, each operation rounded as the CPU's (no FMA)."""
    args = adam_weight_decay_args(p.dtype, lr, beta1, beta2, eps, weight_decay)
    _compiled(ADAM_WEIGHT_DECAY_SPEC)(g, *args, p, m, v)


# ---- the gradients' sum of squares ----------------------------------------------------------------

# a half value reaches double through float (CUDA's half types convert to float only)
SUM_OF_SQUARES = {half: ReductionSpec(f"autopar_sum_of_squares{suffix}", "T x", f"(double){w}x * (double){w}x",
                                      "float64")
                  for half, w, suffix in ((False, "", ""), (True, "(float)", "_half"))}


def sum_of_squares(x):
    """The float64 sum of the squares of every element of ``x``, as a 0-d device array: one
    reduction kernel reading ``x`` once (no float64 copy), and no host sync -- the caller adds
    the partial sums of many arrays on the device and reads the total once."""
    spec = SUM_OF_SQUARES[dtype_name(x.dtype) in HALF_DTYPES]
    return _compiled_sum(spec)(x.reshape(-1), axis=0)


# ---- Softmax and LayerNorm over the last axis (rows of (R, C)) -----------------------------------
# Row statistics are ReductionKernels (one read of the input each); the output is one
# ElementwiseKernel, so no (R, C) temporary is made. The operations follow rowwise's CPU
# kernels (softmax.py, normalization.py) in order and precision; only the summation order
# of a row differs.

@functools.cache
def softmax_specs(wide: str) -> tuple[ReductionSpec, KernelSpec]:
    """s = sum(exp(x - m)) per row; y = exp(x - m) * (1 / s), in ``wide``, rounded to T."""
    c = _C_TYPES[wide]
    body = f"y = (T)(exp(({c})x - ({c})m) * (({c})1 / s));"
    return (ReductionSpec("autopar_softmax_sum", "T x, T m", f"exp(({c})x - ({c})m)", wide),
            KernelSpec("autopar_softmax", f"T x, T m, {wide} s", "T y", body))


@functools.cache
def softmax_grad_specs(wide: str) -> tuple[ReductionSpec, KernelSpec]:
    """s = sum(dy * y) per row; dx = (dy - s) * y."""
    c = _C_TYPES[wide]
    body = f"dx = (T)((({c})dy - s) * ({c})y);"
    return (ReductionSpec("autopar_softmax_grad_sum", "T dy, T y", f"({c})dy * ({c})y", wide),
            KernelSpec("autopar_softmax_grad", f"T dy, T y, {wide} s", "T dx", body))


def softmax(x):
    """Softmax over the last axis of ``x`` (at least 1-D, not empty): a warp per row
    (``rowkernels``) where it serves, else :func:`fused_softmax`."""
    x2 = x.reshape(-1, x.shape[-1])                     # (R, C)
    if rowkernels.serves("softmax", x2):
        return rowkernels.softmax(x2).reshape(x.shape)
    return fused_softmax(x)


def fused_softmax(x):
    """Softmax over the last axis of ``x``: max (CuPy's), one sum kernel, one output kernel."""
    x2 = x.reshape(-1, x.shape[-1])                     # (R, C)
    total, out = softmax_specs(dtype_name(_wide(x.dtype)))
    m = x2.max(axis=1, keepdims=True)                   # (R, 1), in T
    s = _compiled_sum(total)(x2, m, axis=1, keepdims=True)
    return _compiled(out)(x2, m, s).reshape(x.shape)


def softmax_grad(dy, y):
    """dy * d softmax: y * (dy - sum(dy * y)) over the last axis (dy, y of one dtype): a
    warp per row where it serves, else :func:`fused_softmax_grad`."""
    dy2, y2 = dy.reshape(-1, dy.shape[-1]), y.reshape(-1, y.shape[-1])
    if rowkernels.serves("softmax_grad", dy2, y2):
        return rowkernels.softmax_grad(dy2, y2).reshape(y.shape)
    return fused_softmax_grad(dy, y)


def fused_softmax_grad(dy, y):
    """:func:`softmax_grad` as a sum kernel and an output kernel."""
    dy2, y2 = dy.reshape(-1, dy.shape[-1]), y.reshape(-1, y.shape[-1])
    total, out = softmax_grad_specs(dtype_name(_wide(y.dtype)))
    s = _compiled_sum(total)(dy2, y2, axis=1, keepdims=True)
    return _compiled(out)(dy2, y2, s).reshape(y.shape)


LAYER_NORM = """
W xh = (W)x - mean;
xh = xh * rstd;
W o = xh * (W)gamma;
o = o + (W)beta;
y = (T)o;
"""
LAYER_NORM_GRAD = """
W g = (W)dy * (W)gamma;
g = g - gmean;
W xh = (W)x - mean;
xh = xh * rstd;
xh = xh * proj;
g = g - xh;
g = g * rstd;
dx = (T)g;
"""


@functools.cache
def layer_norm_specs(wide: str) -> dict:
    """The LayerNorm kernels in ``wide``: row variance sum, output, and for the VJP the row
    sums of g = dy * gamma and of g * xhat, the map dy * xhat whose column sums are dgamma,
    and dx. ``T`` is the activations' dtype, ``P`` the parameters' (a float32 gamma under
    bfloat16 activations, as mixed precision keeps it): both are widened before use."""
    c, w = _C_TYPES[wide], wide
    xhat = f"((({c})x - mean) * rstd)"
    stats = f"T x, {w} mean, {w} rstd"
    return {
        "var": ReductionSpec("autopar_layer_norm_var", f"T x, {w} mean", f"(({c})x - mean) * (({c})x - mean)", w),
        "y": KernelSpec("autopar_layer_norm", f"{stats}, P gamma, P beta", "T y", f"typedef {c} W;\n" + LAYER_NORM),
        "g": ReductionSpec("autopar_layer_norm_g", "T dy, P gamma", f"({c})dy * ({c})gamma", w),
        "gx": ReductionSpec("autopar_layer_norm_gx", f"T dy, P gamma, {stats}", f"(({c})dy * ({c})gamma) * {xhat}", w),
        "dgamma": KernelSpec("autopar_layer_norm_dgamma", f"T dy, {stats}", f"{w} p", f"p = ({c})dy * {xhat};"),
        "dx": KernelSpec("autopar_layer_norm_grad", f"T dy, P gamma, {stats}, {w} gmean, {w} proj", "T dx",
                         f"typedef {c} W;\n" + LAYER_NORM_GRAD),
    }


def layer_norm_fusable(x, params, activations=()) -> bool:
    """Whether the fused LayerNorm serves ``x`` (and ``activations`` such as dy, of x's
    dtype) with ``params`` (gamma, beta: one float dtype that widens as x's does -- float32
    parameters under float16/bfloat16 activations, or x's own dtype)."""
    if not (fusable(x, *activations) and fusable(*params)):
        return False
    return _wide(params[0].dtype) == _wide(x.dtype)


def column_sum(a2, wide):
    """Sums over the rows of the (R, C) array ``a2`` as a (C,) array in ``wide``: a
    ones-row matrix product (cuBLAS reads the rows coalesced, where a reduction over axis 0
    strides through memory), float32 without TF32 as CuPy multiplies by default. Half rows
    go to cuBLAS as they are (exact ones, float32 accumulation: ``half_matmul``), with no
    float32 copy of ``a2``. The ones row is made once per (rows, dtype, device)
    (:func:`_ones_row`): every bias gradient of a step sums the same number of rows."""
    cupy = import_cupy("autopar.backend.kernels")
    wide = np.dtype(wide)
    device = cupy.cuda.runtime.getDevice()
    if dtype_name(a2.dtype) in HALF_DTYPES and wide == np.float32:
        total = half_matmul(_ones_row(a2.shape[0], a2.dtype, device), a2)       # (1, R) @ (R, C) -> (1, C)
        if total is not None:
            return total.reshape(a2.shape[1])
    ones = _ones_row(a2.shape[0], wide, device)                      # (1, R)
    return cupy.matmul(ones, a2.astype(wide, copy=False)).reshape(a2.shape[1])   # (1, R) @ (R, C) -> (C,)


@functools.lru_cache(maxsize=16)
def _ones_row(rows: int, dtype: np.dtype, device: int):
    """A (1, rows) array of ones of ``dtype`` on CUDA device ``device`` (the current one,
    where ``cupy.ones`` makes it), made once and only read afterwards."""
    return import_cupy("autopar.backend.kernels").ones((1, rows), dtype)


def _row_stats(x2, eps: float, specs: dict):
    """(mean, rstd), each (R, 1) in the wide dtype, as normalization.py's _standardize
    computes them: mean = sum / C, rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)."""
    cols = x2.shape[1]
    mean = x2.mean(axis=1, dtype=specs["var"].wide, keepdims=True)
    var = _compiled_sum(specs["var"])(x2, mean, axis=1, keepdims=True)
    return mean, 1.0 / import_cupy("autopar.backend.kernels").sqrt(var / cols + eps)


def layer_norm(x, gamma, beta, eps: float):
    """LayerNorm over the last axis, gamma and beta of shape (C,) (see ``layer_norm_fusable``):
    a warp per row where it serves, else :func:`fused_layer_norm`."""
    x2 = x.reshape(-1, x.shape[-1])                     # (R, C)
    if rowkernels.serves("layer_norm", x2, params=(gamma, beta)):
        return rowkernels.layer_norm(x2, gamma, beta, eps).reshape(x.shape)
    return fused_layer_norm(x, gamma, beta, eps)


def fused_layer_norm(x, gamma, beta, eps: float):
    """LayerNorm over the last axis as row-statistic reductions and an output kernel."""
    x2 = x.reshape(-1, x.shape[-1])                     # (R, C)
    specs = layer_norm_specs(dtype_name(_wide(x.dtype)))
    mean, rstd = _row_stats(x2, eps, specs)
    return _compiled(specs["y"])(x2, mean, rstd, gamma, beta).reshape(x.shape)


def layer_norm_grad(dy, x, gamma, eps: float, need_dx: bool = True, need_dgamma: bool = True):
    """(dx, dgamma) of LayerNorm over the last axis (None where not needed): dgamma =
    sum over rows of dy * xhat (in the wide dtype, as the CPU's einsum gives it); dx =
    rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma. A warp per row where it
    serves (dgamma: the column sums of its dy * xhat), else :func:`fused_layer_norm_grad`."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])     # (R, C)
    if rowkernels.serves("layer_norm_grad", dy2, x2, params=(gamma,)):
        dx, prod = rowkernels.layer_norm_grad(dy2, x2, gamma, eps, need_dx, need_dgamma)
        return (None if dx is None else dx.reshape(x.shape),
                None if prod is None else column_sum(prod, "float32"))
    return fused_layer_norm_grad(dy, x, gamma, eps, need_dx, need_dgamma)


def fused_layer_norm_grad(dy, x, gamma, eps: float, need_dx: bool = True, need_dgamma: bool = True):
    """:func:`layer_norm_grad` as row-statistic reductions, a GEMV and an output kernel."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    cols = x2.shape[1]
    wide = dtype_name(_wide(x.dtype))
    specs = layer_norm_specs(wide)
    mean, rstd = _row_stats(x2, eps, specs)
    dgamma = column_sum(_compiled(specs["dgamma"])(dy2, x2, mean, rstd), wide) if need_dgamma else None
    dx = None
    if need_dx:
        gmean = _compiled_sum(specs["g"])(dy2, gamma, axis=1, keepdims=True) / cols
        proj = _compiled_sum(specs["gx"])(dy2, gamma, x2, mean, rstd, axis=1, keepdims=True) / cols
        dx = _compiled(specs["dx"])(dy2, gamma, x2, mean, rstd, gmean, proj).reshape(x.shape)
    return dx, dgamma

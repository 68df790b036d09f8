"""Fused CPU kernels for the row-wise and elementwise hot spots: Softmax, LayerNorm and the
tanh GeLU, forward and VJP, on float32 numpy arrays -- one pass over the data where numpy
makes one pass per ufunc.

numpy runs a formula one operator at a time: the softmax of (B, heads, S, S) scores is a
max, a subtract, an exp, a sum and a scale, each a full sweep with its own loop overhead.
On one Xeon core (session 11) numpy's Softmax, LayerNorm and GeLU cost 41 / 46 / 55 ms of
a PanGu-alpha step against PyTorch's 10 / 19 / 41, and that difference was the whole gap
between the two frameworks' serial steps: their GEMMs take the same time. These kernels
are the CPU counterpart of ``kernels`` (CUDA C compiled at run time by NVRTC): C source
compiled at run time by the system C compiler (``cc``, or ``$CC``) for the CPU it runs on
(``-march=native``), cached on disk by the hash of source, flags and CPU, and called
through ctypes.

    softmax(x2) / softmax_grad(dy2, y2)                     rows of (R, C) -> (R, C)
    layer_norm(x2, gamma, beta, eps)                        (R, C) -> (R, C)
    layer_norm_grad(dy2, x2, gamma, eps, need_dx, need_dgamma, need_dbeta) -> (dx, dgamma, dbeta)
    gelu_tanh(x, out=None) / gelu_tanh_grad(x, dy)          elementwise, any shape
    adam_weight_decay(p, g, m, v, lr=..., ...)              AdamWeightDecay in place, numpy's bits
    sum_of_squares(x) -> float                              in float64, one pass
    serves(*arrays) -> bool                                  float32, C-contiguous numpy, compiled

The formulas are those of the numpy paths (ops/softmax.py, ops/normalization.py,
ops/activation.py), in float32, with the row statistics and the LayerNorm parameter
gradients accumulated in float64 (more exact than numpy's float32 sums). exp is this
module's own (Cody-Waite range reduction and a degree-6 polynomial, within 2 ulp of the
exact value; overflow gives inf, underflow 0, NaN stays NaN), so the compiler vectorises
every loop without -ffast-math; results agree with numpy's to rounding, not to the bit.
The tanh GeLU is written with 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)).

Where no C compiler is found or the build fails, :func:`serves` is False and the numpy
paths run, after one warning that says why. ``AUTOPAR_HOST_KERNELS=0`` in the environment
turns the kernels off (to compare the two paths); ``AUTOPAR_HOST_KERNELS_LIB=PATH`` loads a
library built beforehand (``build()`` on a machine with a compiler, with ``-march=`` set for
the target) on one without a compiler.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np

from .kernels import GELU_CUBIC, SQRT_2_OVER_PI  # the GPU kernels' constants: one GeLU everywhere

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) in float32: x = n ln2 + r, |r| <= ln2/2; exp(r) = 1 + r + r^2 P(r); times 2^n. */
static inline float ap_expf(float x) {
    const float hi = 88.72283f, lo = -86.5f;          /* 2^(n-1) stays a normal float */
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;                       /* NaN passes both tests unchanged */
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 126) << 23;         /* 2^(n-1): n + 127 may reach 255 at the top */
    float s;
    memcpy(&s, &e, sizeof s);
    float v = p * s * 2.0f;
    v = x > hi ? INFINITY : v;
    v = x < lo ? 0.0f : v;
    return v;
}

void ap_softmax(const float* x, float* y, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; i++) {
        const float* xr = x + i * cols;
        float* yr = y + i * cols;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t c = 0; c < cols; c++) m = xr[c] > m ? xr[c] : m;
        if (isnan(m) || m == -INFINITY) m = 0.0f;  /* NaN rows stay NaN, all--inf rows give NaN as numpy */
        double s = 0.0;
        #pragma omp simd reduction(+:s)
        for (int64_t c = 0; c < cols; c++) {
            float e = ap_expf(xr[c] - m);
            yr[c] = e;
            s += e;
        }
        float inv = (float)(1.0 / s);
        #pragma omp simd
        for (int64_t c = 0; c < cols; c++) yr[c] *= inv;
    }
}

void ap_softmax_grad(const float* dy, const float* y, float* dx, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; i++) {
        const float* dr = dy + i * cols;
        const float* yr = y + i * cols;
        float* o = dx + i * cols;
        double s = 0.0;
        #pragma omp simd reduction(+:s)
        for (int64_t c = 0; c < cols; c++) s += dr[c] * yr[c];
        float sf = (float)s;
        #pragma omp simd
        for (int64_t c = 0; c < cols; c++) o[c] = (dr[c] - sf) * yr[c];
    }
}

/* mean and 1 / sqrt(var + eps) of one row, summed in double */
static inline void ap_row_stats(const float* xr, int64_t cols, float eps, float* mean, float* rstd) {
    double s = 0.0;
    #pragma omp simd reduction(+:s)
    for (int64_t c = 0; c < cols; c++) s += xr[c];
    float m = (float)(s / (double)cols);
    double v = 0.0;
    #pragma omp simd reduction(+:v)
    for (int64_t c = 0; c < cols; c++) { float d = xr[c] - m; v += d * d; }
    *mean = m;
    *rstd = 1.0f / sqrtf((float)(v / (double)cols) + eps);
}

void ap_layer_norm(const float* x, const float* gamma, const float* beta, float* y,
                   int64_t rows, int64_t cols, float eps) {
    for (int64_t i = 0; i < rows; i++) {
        const float* xr = x + i * cols;
        float* yr = y + i * cols;
        float m, r;
        ap_row_stats(xr, cols, eps, &m, &r);
        #pragma omp simd
        for (int64_t c = 0; c < cols; c++) yr[c] = (xr[c] - m) * r * gamma[c] + beta[c];
    }
}

/* dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma; dgamma += dy xhat and
   dbeta += dy (double accumulators of cols values, or NULL); dx may be NULL. */
void ap_layer_norm_grad(const float* dy, const float* x, const float* gamma, float* dx,
                        double* dgamma, double* dbeta, int64_t rows, int64_t cols, float eps) {
    for (int64_t i = 0; i < rows; i++) {
        const float* dr = dy + i * cols;
        const float* xr = x + i * cols;
        float m, r;
        ap_row_stats(xr, cols, eps, &m, &r);
        if (dgamma) {
            #pragma omp simd
            for (int64_t c = 0; c < cols; c++) dgamma[c] += (double)(dr[c] * ((xr[c] - m) * r));
        }
        if (dbeta) {
            #pragma omp simd
            for (int64_t c = 0; c < cols; c++) dbeta[c] += (double)dr[c];
        }
        if (!dx) continue;
        double sg = 0.0, sgx = 0.0;
        #pragma omp simd reduction(+:sg, sgx)
        for (int64_t c = 0; c < cols; c++) {
            float g = dr[c] * gamma[c];
            sg += g;
            sgx += g * ((xr[c] - m) * r);
        }
        float gmean = (float)(sg / (double)cols), proj = (float)(sgx / (double)cols);
        float* o = dx + i * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; c++) {
            float xh = (xr[c] - m) * r;
            o[c] = ((dr[c] * gamma[c] - gmean) - xh * proj) * r;
        }
    }
}

/* sum of x^2 in double (each square exact in double), for the gradients' global norm */
double ap_sum_of_squares(const float* x, int64_t n) {
    double s = 0.0;
    #pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) { double d = (double)x[i]; s += d * d; }
    return s;
}

/* MindSpore's AdamWeightDecay in place, operation by operation as nn/optimizers.py's numpy
   path (each product and sum rounded to float32, no FMA contraction): the same bits. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void ap_adam_weight_decay(float* p, const float* g, float* m, float* v, int64_t n, float b1, float c1,
                          float b2, float c2, float eps, float wd, float lr, int decay) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float s = g[i] * c1;
        float m1 = m[i] * b1;
        m1 = m1 + s;
        float g2 = g[i] * g[i];
        g2 = g2 * c2;
        float v1 = v[i] * b2;
        v1 = v1 + g2;
        float u = sqrtf(v1);
        u = u + eps;
        u = m1 / u;
        if (decay) {
            float d = p[i] * wd;
            u = u + d;
        }
        u = u * lr;
        m[i] = m1;
        v[i] = v1;
        p[i] = p[i] - u;
    }
}
#pragma GCC pop_options

/* GeLU, tanh form: u = c (x + k x^3); y = x s, s = 0.5 (1 + tanh u) = 1 / (1 + exp(-2u)) */
void ap_gelu_tanh(const float* x, float* y, int64_t n, float k, float c) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i];
        float u = (xi * xi * k + 1.0f) * xi * c;
        y[i] = xi / (1.0f + ap_expf(-2.0f * u));
    }
}

/* dx = dy (s + x (1 - tanh^2 u) du/dx / 2), 1 - tanh^2 u = 4 s (1 - s), du/dx = c (1 + 3 k x^2) */
void ap_gelu_tanh_grad(const float* x, const float* dy, float* dx, int64_t n, float k, float c) {
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i];
        float x2 = xi * xi;
        float u = (x2 * k + 1.0f) * xi * c;
        float s = 1.0f / (1.0f + ap_expf(-2.0f * u));
        float du = (x2 * (3.0f * k) + 1.0f) * c;
        dx[i] = dy[i] * (s + 2.0f * xi * s * (1.0f - s) * du);
    }
}
"""

# -fno-trapping-math: comparisons may be if-converted and floorf inlined (no FP trap is
# observed); without it no loop with exp vectorises. No -ffast-math: no reassociation.
# -mprefer-vector-width=512 (x86 only): gcc tunes Sapphire Rapids and its kin for 256-bit
# vectors, which on the lent 16-core host (session 14) left the softmax at 2.76 ms against
# PyTorch's 1.49 (8192 x 256 rows); full AVX-512 width gives 1.61, and the GeLU 1.54 -> 1.18.
# On a CPU without AVX-512 the flag changes nothing.
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared") + \
    (("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
SIGNATURES = {
    "ap_softmax": (_P, _P, _I, _I),
    "ap_softmax_grad": (_P, _P, _P, _I, _I),
    "ap_layer_norm": (_P, _P, _P, _P, _I, _I, _F),
    "ap_layer_norm_grad": (_P, _P, _P, _P, _P, _P, _I, _I, _F),
    "ap_gelu_tanh": (_P, _P, _I, _F, _F),
    "ap_gelu_tanh_grad": (_P, _P, _P, _I, _F, _F),
    "ap_sum_of_squares": (_P, _I),
    "ap_adam_weight_decay": (_P, _P, _P, _P, _I, _F, _F, _F, _F, _F, _F, _F, ctypes.c_int),
}

RESULTS = {"ap_sum_of_squares": ctypes.c_double}    # the others return nothing


class HostKernelWarning(UserWarning):
    """The fused CPU kernels could not be built here; numpy's ufunc paths run instead."""


def _cpu_id() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags (a cache shared by
    different machines must not hand one a library built for another)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
    except OSError:
        lines = []
    return platform.machine() + "".join(sorted(set(lines)))


def cache_dir() -> str:
    """Where built libraries are kept: ``$AUTOPAR_CACHE`` or ``~/.cache/autopar``."""
    root = os.environ.get("AUTOPAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autopar")
    return os.path.join(root, "hostkernels")


def build(source: str = C_SOURCE, flags: tuple[str, ...] = CFLAGS) -> str:
    """The path of the shared library built from ``source`` with ``flags``: compiled once
    per (source, flags, compiler, CPU) and kept; concurrent builders (MPI ranks starting
    together) each write a private file and rename it into place. Raises OSError or
    subprocess.CalledProcessError when no compiler is found or compiling fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    key = hashlib.sha256("\0".join((source, " ".join(flags), cc, _cpu_id())).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = os.path.join(folder, f"autopar_hostkernels_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = os.path.join(tmp, "k.c")
        with open(src, "w") as f:
            f.write(source)
        lib = os.path.join(tmp, "k.so")
        subprocess.run([cc, *flags, src, "-o", lib, "-lm"], check=True, capture_output=True, text=True)
        os.replace(lib, path)
    return path


@functools.cache
def library():
    """The loaded kernels (a ctypes CDLL with argument types set), or None -- with one
    :class:`HostKernelWarning` saying why -- when they cannot be built or are turned off."""
    if os.environ.get("AUTOPAR_HOST_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if sys.platform == "win32":
        return None
    try:
        lib = ctypes.CDLL(os.environ.get("AUTOPAR_HOST_KERNELS_LIB") or build())
    except (OSError, subprocess.CalledProcessError) as err:    # no compiler, a failed build, a bad library
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"autopar: the fused CPU kernels are not used ({detail.strip()[:300]}); "
                      "Softmax, LayerNorm and GeLU take numpy's slower ufunc paths", HostKernelWarning, stacklevel=2)
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, RESULTS.get(name)
    return lib


_F32 = np.dtype(np.float32)


def serves(*arrays) -> bool:
    """Whether the kernels compute on ``arrays``: all float32, C-contiguous numpy arrays, and
    the library is built (checked on every call, so written as a plain loop)."""
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != _F32 or not a.flags.c_contiguous:
            return False
    return library() is not None


def softmax(x2: np.ndarray) -> np.ndarray:
    """Softmax over the rows of (R, C) ``x2``."""
    y = np.empty_like(x2)
    library().ap_softmax(x2.ctypes.data, y.ctypes.data, x2.shape[0], x2.shape[1])
    return y


def softmax_grad(dy2: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """(dy - sum(dy * y)) * y over the rows of (R, C) ``dy2``, ``y2``."""
    dx = np.empty_like(y2)
    library().ap_softmax_grad(dy2.ctypes.data, y2.ctypes.data, dx.ctypes.data, y2.shape[0], y2.shape[1])
    return dx


def layer_norm(x2: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * gamma + beta over the rows of (R, C) ``x2``; gamma,
    beta: (C,)."""
    y = np.empty_like(x2)
    library().ap_layer_norm(x2.ctypes.data, gamma.ctypes.data, beta.ctypes.data, y.ctypes.data,
                            x2.shape[0], x2.shape[1], eps)
    return y


def layer_norm_grad(dy2: np.ndarray, x2: np.ndarray, gamma: np.ndarray, eps: float, need_dx: bool = True,
                    need_dgamma: bool = True, need_dbeta: bool = True):
    """(dx (R, C), dgamma (C,), dbeta (C,)) of :func:`layer_norm`, each None where not
    needed; the parameter gradients summed over rows in float64, returned in float32."""
    rows, cols = x2.shape
    dx = np.empty_like(x2) if need_dx else None
    dgamma = np.zeros(cols, np.float64) if need_dgamma else None
    dbeta = np.zeros(cols, np.float64) if need_dbeta else None
    library().ap_layer_norm_grad(dy2.ctypes.data, x2.ctypes.data, gamma.ctypes.data,
                                 None if dx is None else dx.ctypes.data,
                                 None if dgamma is None else dgamma.ctypes.data,
                                 None if dbeta is None else dbeta.ctypes.data, rows, cols, eps)
    return (dx, None if dgamma is None else dgamma.astype(np.float32),
            None if dbeta is None else dbeta.astype(np.float32))


def gelu_tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) into ``out`` (new if None; may be ``x``)."""
    y = np.empty_like(x) if out is None else out
    library().ap_gelu_tanh(x.ctypes.data, y.ctypes.data, x.size, GELU_CUBIC, SQRT_2_OVER_PI)
    return y


def gelu_tanh_grad(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dy * GeLU'(x), tanh form."""
    dx = np.empty_like(x)
    library().ap_gelu_tanh_grad(x.ctypes.data, dy.ctypes.data, dx.ctypes.data, x.size, GELU_CUBIC, SQRT_2_OVER_PI)
    return dx


def adam_weight_decay(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamWeightDecay update of ``p``, ``m``, ``v`` in place from ``g`` (float32, one
    size): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr (m / (sqrt(v) + eps) +
    wd p), every Python scalar rounded to float32 as numpy rounds it and every operation
    rounded as the numpy path's: the same bits in one pass instead of thirteen."""
    f = np.float32
    library().ap_adam_weight_decay(p.ctypes.data, g.ctypes.data, m.ctypes.data, v.ctypes.data, p.size, f(beta1),
                                   f(1.0 - beta1), f(beta2), f(1.0 - beta2), f(eps), f(weight_decay), f(lr),
                                   int(bool(weight_decay)))


def sum_of_squares(x: np.ndarray) -> float:
    """The sum of the squares of ``x``'s elements, each squared and summed in float64."""
    return float(library().ap_sum_of_squares(x.ctypes.data, x.size))

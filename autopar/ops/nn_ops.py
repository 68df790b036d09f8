"""The composite ops PanGu-α (and Yuan 2.0) need: softmax family, norms, embedding lookup,
one-hot, dropout and the two softmax cross-entropies.

=====================================  =====================================================
``Softmax(axis)(x)``                   stable; vjp from the saved output
``LogSoftmax(axis)(x)``                stable; vjp from the saved output
``LayerNorm(bna, bpa, eps)(x, g, b)``  normalize ``x.shape[bna:]``; ``g, b: x.shape[bpa:]``
``RMSNorm(eps)(x, g)``                 over the last axis (Yuan 2.0); ``g: (H,)``
``Gather()(params, indices, axis)``    embedding lookup; gradient for ``params`` only
``OneHot(axis)(ids, depth, on, off)``  no gradient
``Dropout(keep_prob)(x)``              mask = pure function of (key, logical element index)
``SoftmaxCrossEntropyWithLogits()``    dense labels; loss per row
``SparseSoftmaxCrossEntropyWithLogits()``  integer labels; loss per row
=====================================  =====================================================

Dimension names: N rows (B*S), V vocabulary (classes), H hidden. Every kernel computes in
at least float32 (``_compute_dtype``) and returns the input's dtype. Row-wise softmax over
a long last axis (the (N, V) logits) is done in blocks of rows that fit in cache
(``_BLOCK_ELEMS``), so no (N, V)-sized temporary is made when the result is per row.
"""
from __future__ import annotations

import numpy as np

from ..errors import OpArgError
from ..runtime.random import derive_key, keep_mask, region_indices
from .primitive import Primitive, TensorSpec, check_float, normalize_axes, normalize_axis
from .registry import register

_BLOCK_ELEMS = 1 << 18   # elements per row block (1 MiB of float32); 2^14..2^19 all measured
                         # alike, 1.3-2x faster than whole-array passes on (N, 40000)
_DROPOUT_CHUNK = 1 << 14  # elements per random-number chunk: its uint64 temporaries (128 KiB
                          # each) stay in L2; 1 << 15 and up measured 3x slower

# ---- shared helpers -------------------------------------------------------------------------


def _compute_dtype(dtype) -> np.dtype:
    """float16 -> float32; float32 and float64 stay."""
    return np.promote_types(dtype, np.float32)


def _check_int(spec: TensorSpec, arg: str, fix: str = "") -> None:
    if np.dtype(spec.dtype).kind not in "iu":
        raise OpArgError(f"{arg} dtype", "an integer dtype", f"{np.dtype(spec.dtype).name} {spec.shape}",
                         fix or "cast it first with ops.Cast()(x, autopar.int32)")


def _check_range(idx: np.ndarray, n: int, arg: str, where: str) -> None:
    """Index values must lie in [0, n); checked on the (small) index array at run time."""
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise OpArgError(f"{arg} values", f"in [0, {n})", f"min {idx.min()}, max {idx.max()}", where=where)


def _rows_per_block(row_len: int) -> int:
    return max(1, _BLOCK_ELEMS // max(row_len, 1))


def _row_blocks(n_rows: int, row_len: int):
    """Slices of about ``_BLOCK_ELEMS`` elements over the rows of an (n_rows, row_len) array."""
    step = _rows_per_block(row_len)
    for a in range(0, n_rows, step):
        yield slice(a, min(a + step, n_rows))


def _rowwise(kernel, axes: tuple[int, ...], ct: np.dtype, *arrays: np.ndarray) -> np.ndarray:
    """A new array shaped like ``arrays[0]``, in dtype ``ct``, filled by
    ``kernel(out, *arrays, axis=...)``. When ``axes`` is the last axis alone the kernel runs on
    cache-sized blocks of rows (every array viewed as (rows, its last dim); per-row values
    are passed as (..., 1)), so its temporaries stay in cache; otherwise it runs once."""
    x = arrays[0]
    out = np.empty(x.shape, ct)
    if x.ndim == 0 or axes != (x.ndim - 1,):
        kernel(out, *arrays, axis=axes)
        return out
    views = [a.reshape(-1, a.shape[-1]) for a in arrays]
    out2 = out.reshape(views[0].shape)
    for rows in _row_blocks(*out2.shape):
        kernel(out2[rows], *(v[rows] for v in views), axis=1)
    return out


def _logsumexp(x2: np.ndarray, ct: np.dtype) -> np.ndarray:
    """log(sum(exp(x2), 1)) of an (N, V) array, stable, as (N,) in dtype ``ct``: one read of
    x2 in row blocks, no (N, V) temporary."""
    out = np.empty(x2.shape[0], ct)                     # (N,)
    buf = np.empty((min(_rows_per_block(x2.shape[1]), x2.shape[0]), x2.shape[1]), ct)
    for rows in _row_blocks(*x2.shape):
        xb = x2[rows]
        t = buf[:xb.shape[0]]
        m = xb.max(axis=1, keepdims=True)
        np.subtract(xb, m, out=t, dtype=ct)
        np.exp(t, out=t)
        s = t.sum(axis=1)
        np.log(s, out=s)
        out[rows] = s + m[:, 0]
    return out


def _check_class_axis(x: TensorSpec, arg: str = "logits") -> None:
    if x.ndim < 1 or x.shape[-1] == 0:
        raise OpArgError(f"{arg} shape", "at least 1 dim with a non-empty last (class) axis", str(x.shape))


# ---- softmax family -------------------------------------------------------------------------

# Kernels write into ``out`` (allocated in the compute dtype); ``dtype=out.dtype`` makes
# float16 inputs compute in float32 rather than be rounded first.

def _softmax_kernel(out, x, axis):
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out, dtype=out.dtype)
    np.exp(out, out=out)
    out *= np.reciprocal(out.sum(axis=axis, keepdims=True))


def _softmax_vjp_kernel(out, dy, y, axis):
    """dx = y * (dy - sum(dy * y))"""
    np.multiply(dy, y, out=out, dtype=out.dtype)
    s = out.sum(axis=axis, keepdims=True)
    np.subtract(dy, s, out=out, dtype=out.dtype)
    out *= y


def _log_softmax_kernel(out, x, axis):
    np.subtract(x, x.max(axis=axis, keepdims=True), out=out, dtype=out.dtype)
    out -= np.log(np.exp(out).sum(axis=axis, keepdims=True))


def _log_softmax_vjp_kernel(out, dy, y, axis):
    """dx = dy - exp(y) * sum(dy)"""
    np.exp(y, out=out, dtype=out.dtype)
    out *= -dy.sum(axis=axis, keepdims=True, dtype=out.dtype)
    out += dy


@register
class Softmax(Primitive):
    """exp(x - max) / sum, over ``axis`` (an int or a tuple of ints); attention probabilities
    ``(B, heads, S, S)`` over the last axis."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    save_inputs, save_output = "none", True

    def __init__(self, axis=-1):
        super().__init__(axis=axis)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return normalize_axes(self.attrs["axis"], ndim)

    def infer(self, x):
        check_float(x, "input 0")
        self._axes(x.ndim)
        return x

    def forward(self, x):
        y = _rowwise(_softmax_kernel, self._axes(x.ndim), _compute_dtype(x.dtype), x)
        return y.astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        dx = _rowwise(_softmax_vjp_kernel, self._axes(y.ndim), _compute_dtype(y.dtype), dy, y)
        return (dx.astype(specs[0].dtype, copy=False),)

    def flops(self, specs, out):
        return 5 * out.size


@register
class LogSoftmax(Primitive):
    """x - logsumexp(x) over one ``axis``."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    save_inputs, save_output = "none", True

    def __init__(self, axis: int = -1):
        super().__init__(axis=axis)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return (normalize_axis(self.attrs["axis"], ndim),)

    def infer(self, x):
        check_float(x, "input 0")
        self._axes(x.ndim)
        return x

    def forward(self, x):
        y = _rowwise(_log_softmax_kernel, self._axes(x.ndim), _compute_dtype(x.dtype), x)
        return y.astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        dx = _rowwise(_log_softmax_vjp_kernel, self._axes(y.ndim), _compute_dtype(y.dtype), dy, y)
        return (dx.astype(specs[0].dtype, copy=False),)

    def flops(self, specs, out):
        return 5 * out.size


# ---- normalization --------------------------------------------------------------------------

def _standardize(x2: np.ndarray, eps: float, ct: np.dtype, center: bool):
    """Rows of (R, C) ``x2`` -> (xhat, rstd): xhat = (x - mean) * rstd, or x * rstd when not
    ``center`` (RMS); rstd = 1 / sqrt(var + eps) per row. xhat is a new (R, C) array."""
    c = x2.shape[1]
    if center:
        xh = np.subtract(x2, x2.mean(axis=1, dtype=ct)[:, None], dtype=ct)
        rstd = 1.0 / np.sqrt(np.einsum("ij,ij->i", xh, xh) / c + eps)
        xh *= rstd[:, None]
    else:
        rstd = 1.0 / np.sqrt(np.einsum("ij,ij->i", x2, x2, dtype=ct) / c + eps)
        xh = np.multiply(x2, rstd[:, None], dtype=ct)
    return xh, rstd


def _standardize_vjp(g: np.ndarray, xh: np.ndarray, rstd: np.ndarray, center: bool) -> np.ndarray:
    """dx for rows of xhat given g = dy * gamma (both (R, C), ours to overwrite):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), without the mean(g) term for RMS."""
    c = g.shape[1]
    proj = np.einsum("ij,ij->i", g, xh) / c
    if center:
        g -= g.mean(axis=1, keepdims=True)
    xh *= proj[:, None]
    g -= xh
    g *= rstd[:, None]
    return g


def _param_grad(dy: np.ndarray, xh: np.ndarray | None, n_param: int) -> np.ndarray:
    """Sum over the leading dims of dy (* xh): (P, n_param) -> (n_param,)."""
    dy2 = dy.reshape(-1, n_param)
    if xh is None:
        return dy2.sum(axis=0)
    return np.einsum("pq,pq->q", dy2, xh.reshape(-1, n_param))


@register
class LayerNorm(Primitive):
    """``y = (x - mean) / sqrt(var + eps) * gamma + beta``, statistics over
    ``x.shape[begin_norm_axis:]``, ``gamma, beta: x.shape[begin_params_axis:]``.

    MindSpore returns (y, mean, rstd); this returns y only, and the vjp recomputes mean and
    rstd from x (one extra pass) instead of keeping two more tensors alive."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 3
    save_inputs = (0, 1)

    def __init__(self, begin_norm_axis: int = -1, begin_params_axis: int = -1, epsilon: float = 1e-5):
        super().__init__(begin_norm_axis=begin_norm_axis, begin_params_axis=begin_params_axis,
                         epsilon=epsilon)

    def _axes(self, ndim: int) -> tuple[int, int]:
        return (normalize_axis(self.attrs["begin_norm_axis"], ndim, "begin_norm_axis"),
                normalize_axis(self.attrs["begin_params_axis"], ndim, "begin_params_axis"))

    def infer(self, x, gamma, beta):
        for s, arg in ((x, "input x"), (gamma, "gamma"), (beta, "beta")):
            check_float(s, arg)
        if x.ndim < 1:
            raise OpArgError("input x shape", "at least 1 dim", str(x.shape))
        _, bpa = self._axes(x.ndim)
        want = x.shape[bpa:]
        for s, arg in ((gamma, "gamma"), (beta, "beta")):
            if s.shape != want:
                raise OpArgError(f"{arg} shape", f"{want} (x.shape[begin_params_axis:] of x {x.shape})",
                                 str(s.shape), "make gamma and beta match the normalized dims of x")
        return x

    def _xhat(self, x):
        """(xhat (R, C), rstd (R,)) with R * C = x.size, C = prod(x.shape[bna:])."""
        bna, _ = self._axes(x.ndim)
        c = int(np.prod(x.shape[bna:], dtype=np.int64))
        return _standardize(x.reshape(-1, c), self.attrs["epsilon"], _compute_dtype(x.dtype), True)

    def forward(self, x, gamma, beta):
        xh, _ = self._xhat(x)
        y = xh.reshape(x.shape)          # gamma, beta: x.shape[bpa:] broadcast from the right
        y *= gamma
        y += beta
        return y.astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        x, gamma = xs[0], xs[1]
        xh, rstd = self._xhat(x)          # (R, C), (R,)
        n_param = gamma.size
        dgamma = _param_grad(dy, xh, n_param).reshape(gamma.shape).astype(gamma.dtype) if needs[1] else None
        dbeta = _param_grad(dy, None, n_param).reshape(gamma.shape).astype(specs[2].dtype) if needs[2] else None
        dx = None
        if needs[0]:
            g = np.multiply(dy, gamma, dtype=xh.dtype).reshape(xh.shape)
            dx = _standardize_vjp(g, xh, rstd, True).reshape(x.shape).astype(x.dtype, copy=False)
        return dx, dgamma, dbeta

    def flops(self, specs, out):
        return 8 * out.size


@register
class RMSNorm(Primitive):
    """``y = x / sqrt(mean(x^2) + eps) * gamma`` over the last axis (Yuan 2.0), gamma: (H,)."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 2
    save_inputs = (0, 1)

    def __init__(self, epsilon: float = 1e-6):
        super().__init__(epsilon=epsilon)

    def infer(self, x, gamma):
        check_float(x, "input x")
        check_float(gamma, "gamma")
        if x.ndim < 1 or gamma.shape != x.shape[-1:]:
            raise OpArgError("gamma shape", f"{x.shape[-1:]} (the last dim of x {x.shape})",
                             str(gamma.shape), "gamma has one entry per hidden unit")
        return x

    def _xhat(self, x):
        return _standardize(x.reshape(-1, x.shape[-1]), self.attrs["epsilon"], _compute_dtype(x.dtype), False)

    def forward(self, x, gamma):
        xh, _ = self._xhat(x)             # (N, H)
        xh *= gamma
        return xh.reshape(x.shape).astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        x, gamma = xs
        xh, rstd = self._xhat(x)
        dgamma = _param_grad(dy, xh, gamma.size).astype(gamma.dtype) if needs[1] else None
        dx = None
        if needs[0]:
            g = np.multiply(dy, gamma, dtype=xh.dtype).reshape(xh.shape)
            dx = _standardize_vjp(g, xh, rstd, False).reshape(x.shape).astype(x.dtype, copy=False)
        return dx, dgamma

    def flops(self, specs, out):
        return 5 * out.size


# ---- embedding lookup and one-hot -----------------------------------------------------------

def _scatter_add_rows(n_rows: int, idx: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """(n_rows, K) array whose row i is the sum of the rows g2[j] with idx[j] == i.

    Sort the indices; rows hit once are written in one fancy assignment, each row hit several
    times gets one sum over its rows. Measured for (V=40000, K=1024) float32 and 1024 indices
    (uniform, Zipf, padding-heavy, pairs, all-equal): the accumulation takes 0.4-3 ms, against
    11-21 ms for ``np.add.at`` and 6-15 ms for sort + ``np.add.reduceat``; the Python loop
    runs at most N/2 times. Zeroing the (V, K) result (about 20 ms) is the larger cost."""
    out = np.zeros((n_rows, g2.shape[1]), g2.dtype)
    if idx.size == 0:
        return out
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    counts = np.diff(np.r_[starts, s.size])
    once = order[starts[counts == 1]]
    out[idx[once]] = g2[once]
    for a, c in zip(starts[counts > 1].tolist(), counts[counts > 1].tolist()):
        out[s[a]] = g2[order[a:a + c]].sum(axis=0)
    return out


@register
class Gather(Primitive):
    """``Gather()(params, indices, axis)``: ``params.take(indices, axis)``, shape
    ``params.shape[:axis] + indices.shape + params.shape[axis+1:]``; word embedding:
    ``(V, H)[(B, S)] -> (B, S, H)``. Indices must lie in [0, params.shape[axis])."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 2
    static_args = ("axis",)
    save_inputs = (1,)
    nondiff_inputs = (1,)

    def _axis(self, ndim: int) -> int:
        return normalize_axis(self.attrs["axis"], ndim)

    def infer(self, params, indices):
        if params.ndim < 1:
            raise OpArgError("params shape", "at least 1 dim", str(params.shape))
        _check_int(indices, "indices")
        axis = self._axis(params.ndim)
        return TensorSpec(params.shape[:axis] + indices.shape + params.shape[axis + 1:], params.dtype)

    def forward(self, params, indices):
        axis = self._axis(params.ndim)
        _check_range(indices, params.shape[axis], "indices", self.kind)
        return np.take(params, indices, axis=axis)

    def vjp(self, dy, xs, y, specs, needs):
        if not needs[0]:
            return None, None
        idx = xs[1]
        shape, dtype = specs[0].shape, specs[0].dtype
        axis = self._axis(len(shape))
        if axis == 0:                     # (n_idx, K) rows summed into (V, K)
            k = int(np.prod(shape[1:], dtype=np.int64))
            g = _scatter_add_rows(shape[0], idx.reshape(-1), dy.reshape(idx.size, k).astype(dtype, copy=False))
            return g.reshape(shape), None
        g = np.zeros(shape, dtype)
        np.add.at(g, (slice(None),) * axis + (idx,), dy)
        return g, None

    def flops(self, specs, out):
        return 0

    def bytes_accessed(self, specs, out):
        return specs[1].nbytes + 2 * out.nbytes   # reads only the gathered rows


def _scalar_dtype(v, arg: str) -> np.dtype:
    """dtype of an on/off value: a numpy scalar keeps its own, a Python number gives float32."""
    if isinstance(v, (np.ndarray, np.generic)) and np.ndim(v) == 0 and v.dtype.kind in "iuf":
        return v.dtype
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return np.dtype(np.float32)
    raise OpArgError(arg, "a number or a 0-d numpy array", repr(v), "pass e.g. 1.0 or np.float32(1.0)")


@register
class OneHot(Primitive):
    """``OneHot(axis)(indices, depth, on_value, off_value)``: a new dim of size depth at axis
    (-1: last). Indices outside [0, depth) give an all-off row (MindSpore's rule)."""

    fresh_output = True

    static_args = ("depth", "on_value", "off_value")
    save_inputs = "none"
    nondiff_inputs = (0,)

    def __init__(self, axis: int = -1):
        super().__init__(axis=axis)

    def _axis(self, ndim: int) -> int:
        axis = self.attrs["axis"]
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -1 <= axis <= ndim:
            raise OpArgError("axis", f"an int in [-1, {ndim}]", repr(axis))
        return ndim if axis == -1 else int(axis)

    def infer(self, indices):
        _check_int(indices, "indices")
        depth = self.attrs["depth"]
        if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or depth < 0:
            raise OpArgError("depth", "an int >= 0", repr(depth))
        dtype = np.result_type(_scalar_dtype(self.attrs["on_value"], "on_value"),
                               _scalar_dtype(self.attrs["off_value"], "off_value"))
        axis = self._axis(indices.ndim)
        return TensorSpec(indices.shape[:axis] + (int(depth),) + indices.shape[axis:], dtype)

    def forward(self, indices):
        out = self.infer(TensorSpec(indices.shape, indices.dtype))
        axis = self._axis(indices.ndim)
        classes = np.arange(self.attrs["depth"]).reshape((-1,) + (1,) * (indices.ndim - axis))
        hit = np.expand_dims(indices, axis) == classes
        on, off = out.dtype.type(self.attrs["on_value"]), out.dtype.type(self.attrs["off_value"])
        return np.where(hit, on, off)

    def flops(self, specs, out):
        return 0


# ---- dropout --------------------------------------------------------------------------------

def dropout_mask(key: int, keep_prob: float, shape: tuple[int, ...], region=None) -> np.ndarray:
    """The keep mask of ``shape`` (or of its sub-``region``, a tuple of slices): element i
    is kept iff keep_mask(key, i) (a hash of i below keep_prob * 2**32), i its flat row-major index in the full shape.
    A shard generates its slice with the region and gets the serial model's values."""
    return keep_mask(key, region_indices(shape, region), keep_prob)


@register
class Dropout(Primitive):
    """``x * mask / keep_prob``. The mask is a pure function of (key, element index), so the
    vjp regenerates it from the key instead of saving it; keep_prob == 1 is the identity."""

    save_inputs = "none"
    needs_rng = True

    def __init__(self, keep_prob: float = 0.9, seed0: int = 0, seed1: int = 0):
        if not isinstance(keep_prob, (int, float)) or not 0.0 < keep_prob <= 1.0:
            raise OpArgError("keep_prob", "a number in (0, 1]", repr(keep_prob),
                             "keep_prob is 1 - dropout rate, e.g. 0.9", where="Dropout")
        super().__init__(keep_prob=float(keep_prob), seed0=seed0, seed1=seed1)

    def infer(self, x):
        check_float(x, "input 0")
        return x

    def output_is_fresh(self) -> bool:
        return self.attrs["keep_prob"] < 1.0   # keep_prob 1 hands back its input

    grads_are_fresh = output_is_fresh

    def _key(self, key: int) -> int:
        """The runtime's per-node, per-step key, specialized by the op's seeds if set."""
        seeds = (self.attrs["seed0"], self.attrs["seed1"])
        return key if seeds == (0, 0) else derive_key(key, *seeds)

    def _apply(self, a: np.ndarray, key: int) -> np.ndarray:
        """a * mask / keep_prob, the mask made in flat chunks (flat index = region_indices)."""
        p = self.attrs["keep_prob"]
        if p == 1.0:
            return a
        key = self._key(key)
        flat = a.reshape(-1)
        out = np.empty_like(flat)
        scale = out.dtype.type(1.0 / p)
        for s in range(0, flat.size, _DROPOUT_CHUNK):
            e = min(s + _DROPOUT_CHUNK, flat.size)
            keep = keep_mask(key, np.arange(s, e, dtype=np.uint32 if flat.size < 2 ** 32 else np.uint64), p)
            o = out[s:e]
            np.multiply(flat[s:e], keep, out=o)
            o *= scale
        return out.reshape(a.shape)

    def forward(self, x, key):
        return self._apply(x, key)

    def vjp(self, dy, xs, y, specs, needs, key):
        return (self._apply(dy, key).astype(specs[0].dtype, copy=False),)

    def flops(self, specs, out):
        return 2 * out.size


# ---- cross-entropies ------------------------------------------------------------------------

@register
class SoftmaxCrossEntropyWithLogits(Primitive):
    """``loss = -sum(labels * log_softmax(logits), -1)``: (..., V), (..., V) -> (...).

    MindSpore also returns d loss/d logits; here that is the vjp. Both inputs are
    differentiable (d labels = -log_softmax(logits))."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 2

    def infer(self, logits, labels):
        check_float(logits, "logits")
        check_float(labels, "labels")
        _check_class_axis(logits)
        if labels.shape != logits.shape:
            raise OpArgError("labels shape", f"{logits.shape} (same as logits)", str(labels.shape),
                             "dense labels are one distribution per row; use "
                             "SparseSoftmaxCrossEntropyWithLogits for class ids")
        return TensorSpec(logits.shape[:-1], logits.dtype)

    def forward(self, logits, labels):
        # loss = lse * sum(labels) - sum(labels * logits), per row; (N, V) -> (N,)
        ct = _compute_dtype(logits.dtype)
        v = logits.shape[-1]
        x2, l2 = logits.reshape(-1, v), labels.reshape(-1, v)
        lse = _logsumexp(x2, ct)
        loss = lse * l2.sum(axis=1, dtype=ct) - np.einsum("ij,ij->i", l2, x2, dtype=ct)
        return loss.reshape(logits.shape[:-1]).astype(logits.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        logits, labels = xs
        ct = _compute_dtype(logits.dtype)
        v = logits.shape[-1]
        x2, l2, dy1 = logits.reshape(-1, v), labels.reshape(-1, v), dy.reshape(-1, 1)
        ls = np.subtract(x2, _logsumexp(x2, ct)[:, None], dtype=ct)       # log_softmax, (N, V)
        dlabels = None
        if needs[1]:
            dlabels = np.multiply(ls, -dy1).reshape(labels.shape).astype(labels.dtype, copy=False)
        dlogits = None
        if needs[0]:                      # (softmax * sum(labels) - labels) * dy, in place
            np.exp(ls, out=ls)
            ls *= l2.sum(axis=1, keepdims=True, dtype=ct)
            ls -= l2
            ls *= dy1
            dlogits = ls.reshape(logits.shape).astype(logits.dtype, copy=False)
        return dlogits, dlabels

    def flops(self, specs, out):
        return 6 * specs[0].size


def _softmax_times_dy_kernel(out, x, lse, dy, axis):
    """out = exp(x - lse) * dy: the softmax part of d loss/d logits."""
    np.subtract(x, lse, out=out, dtype=out.dtype)
    np.exp(out, out=out)
    out *= dy


@register
class SparseSoftmaxCrossEntropyWithLogits(Primitive):
    """``loss = logsumexp(logits) - logits[label]`` per row: (..., V), int (...) -> (...).

    The hot path of LM training (V = 40000). Forward: one read of the logits, in cache-sized
    row blocks, no (N, V) temporary. Backward needs one (N, V) array kept from forward:
    the softmax (a second output, costing a write pass in forward) or the logits. Saving
    the logits (the input) and the (N,) loss is cheaper: forward writes nothing
    (N, V)-sized, and the vjp recovers ``lse = loss + logits[label]`` with no max/sum pass,
    then writes ``(exp(logits - lse) - onehot) * dy`` block by block: one read and one
    write of (N, V). Below float32 the rounded loss is too coarse to recover lse from, so
    lse is recomputed (one more read)."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 2
    save_output = True
    nondiff_inputs = (1,)

    def infer(self, logits, labels):
        check_float(logits, "logits")
        _check_class_axis(logits)
        _check_int(labels, "labels", "labels are integer class ids; cast them to int32")
        if labels.shape != logits.shape[:-1]:
            raise OpArgError("labels shape", f"{logits.shape[:-1]} (logits.shape[:-1] of logits {logits.shape})",
                             str(labels.shape), "pass one class id per row of logits")
        return TensorSpec(labels.shape, logits.dtype)

    def forward(self, logits, labels):
        v = logits.shape[-1]
        _check_range(labels, v, "labels", self.kind)
        x2, lab = logits.reshape(-1, v), labels.reshape(-1)          # (N, V), (N,)
        lse = _logsumexp(x2, _compute_dtype(logits.dtype))
        loss = lse - x2[np.arange(lab.size), lab]
        return loss.reshape(labels.shape).astype(logits.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        logits, labels = xs
        ct = _compute_dtype(logits.dtype)
        v = logits.shape[-1]
        x2, lab, dy1 = logits.reshape(-1, v), labels.reshape(-1), dy.reshape(-1)
        rows = np.arange(lab.size)
        picked = x2[rows, lab]
        if y.dtype == ct:
            lse = y.reshape(-1) + picked                 # (N,)
        else:
            lse = _logsumexp(x2, ct)
        d = _rowwise(_softmax_times_dy_kernel, (1,), ct, x2, lse[:, None], dy1[:, None])  # (N, V)
        d[rows, lab] -= dy1
        return d.reshape(logits.shape).astype(logits.dtype, copy=False), None

    def flops(self, specs, out):
        return 4 * specs[0].size

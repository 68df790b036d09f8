"""Softmax, LogSoftmax and the two softmax cross-entropies (dense and sparse labels).

Dimension names: N rows (B*S), V classes (vocabulary).
"""
from __future__ import annotations

from ..backend import array_module, hostkernels, kernels
from ..errors import OpArgError
from ..ir.spec import TensorSpec
from .primitive import Primitive, check_float, normalize_axes, normalize_axis
from .registry import register
from .rowwise import check_class_axis, check_int, check_range, compute_dtype, logsumexp, rowwise
from .sharding import Indexing, same_letters

# Kernels (``rowwise``'s) compute with the array module ``xp`` of their arrays and write
# into ``out`` (allocated in the compute dtype); ``dtype=out.dtype`` makes float16 inputs
# compute in float32 rather than be rounded first.

def _softmax_kernel(xp, out, x, axis):
    xp.subtract(x, x.max(axis=axis, keepdims=True), out=out, dtype=out.dtype)
    xp.exp(out, out=out)
    out *= xp.reciprocal(out.sum(axis=axis, keepdims=True))


def _softmax_vjp_kernel(xp, out, dy, y, axis):
    """dx = y * (dy - sum(dy * y))"""
    xp.multiply(dy, y, out=out, dtype=out.dtype)
    s = out.sum(axis=axis, keepdims=True)
    xp.subtract(dy, s, out=out, dtype=out.dtype)
    out *= y


def _log_softmax_kernel(xp, out, x, axis):
    xp.subtract(x, x.max(axis=axis, keepdims=True), out=out, dtype=out.dtype)
    out -= xp.log(xp.exp(out).sum(axis=axis, keepdims=True))


def _log_softmax_vjp_kernel(xp, out, dy, y, axis):
    """dx = dy - exp(y) * sum(dy)"""
    xp.exp(y, out=out, dtype=out.dtype)
    out *= -dy.sum(axis=axis, keepdims=True, dtype=out.dtype)
    out += dy


class _RowNormalized(Primitive):
    """Softmax and LogSoftmax: a kernel pair over the normalized axes, which stay whole."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs
    save_inputs, save_output = "none", True
    kernel = vjp_kernel = None  # set by the subclass

    def __init__(self, axis=-1):
        super().__init__(axis=axis)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def indexing(self, specs, out):
        letters, fixed = same_letters(specs[0].ndim, self._axes(specs[0].ndim))
        return Indexing((letters,), letters, fixed)

    def infer(self, x):
        check_float(x, "input 0")
        self._axes(x.ndim)
        return x

    def forward(self, x):
        y = rowwise(type(self).kernel, self._axes(x.ndim), compute_dtype(x.dtype), x)
        return y.astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        dx = rowwise(type(self).vjp_kernel, self._axes(y.ndim), compute_dtype(y.dtype), dy, y)
        return (dx.astype(specs[0].dtype, copy=False),)

    def flops(self, specs, out):
        return 5 * out.size


@register
class Softmax(_RowNormalized):
    """exp(x - max) / sum, over ``axis`` (an int or a tuple of ints); attention probabilities
    ``(B, heads, S, S)`` over the last axis."""

    kernel, vjp_kernel = staticmethod(_softmax_kernel), staticmethod(_softmax_vjp_kernel)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return normalize_axes(self.attrs["axis"], ndim)

    def _fused(self, *arrays) -> bool:
        """Whether the fused GPU kernels compute: CuPy arrays, softmax over the last axis."""
        x = arrays[0]
        return kernels.fusable(*arrays) and x.size > 0 and self._axes(x.ndim) == (x.ndim - 1,)

    def _host_fused(self, *arrays) -> bool:
        """Whether the fused CPU kernels compute: float32 C-contiguous numpy arrays, softmax
        over the last axis."""
        x = arrays[0]
        return x.ndim > 0 and self._axes(x.ndim) == (x.ndim - 1,) and hostkernels.serves(*arrays)

    def forward(self, x):
        if self._fused(x):
            return kernels.softmax(x)
        if self._host_fused(x):
            return hostkernels.softmax(x.reshape(-1, x.shape[-1])).reshape(x.shape)   # (..., C) -> (R, C) -> back
        return super().forward(x)

    def vjp(self, dy, xs, y, specs, needs):
        if self._fused(dy, y):
            return (kernels.softmax_grad(dy, y).astype(specs[0].dtype, copy=False),)
        if self._host_fused(dy, y):
            rows = (-1, y.shape[-1])                      # (..., C) -> (R, C)
            return (hostkernels.softmax_grad(dy.reshape(rows), y.reshape(rows)).reshape(y.shape),)
        return super().vjp(dy, xs, y, specs, needs)


@register
class LogSoftmax(_RowNormalized):
    """x - logsumexp(x) over one ``axis``."""

    kernel, vjp_kernel = staticmethod(_log_softmax_kernel), staticmethod(_log_softmax_vjp_kernel)

    def __init__(self, axis: int = -1):
        super().__init__(axis=axis)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return (normalize_axis(self.attrs["axis"], ndim),)


@register
class SoftmaxCrossEntropyWithLogits(Primitive):
    """``loss = -sum(labels * log_softmax(logits), -1)``: (..., V), (..., V) -> (...).

    MindSpore also returns d loss/d logits; here that is the vjp. Both inputs are
    differentiable (d labels = -log_softmax(logits))."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 2


    def indexing(self, specs, out):
        letters, fixed = same_letters(specs[0].ndim, (specs[0].ndim - 1,))
        return Indexing((letters, letters), letters[:-1], fixed)

    def infer(self, logits, labels):
        check_float(logits, "logits")
        check_float(labels, "labels")
        check_class_axis(logits)
        if labels.shape != logits.shape:
            raise OpArgError("labels shape", f"{logits.shape} (same as logits)", str(labels.shape),
                             "dense labels are one distribution per row; use "
                             "SparseSoftmaxCrossEntropyWithLogits for class ids")
        return TensorSpec(logits.shape[:-1], logits.dtype)

    def forward(self, logits, labels):
        # loss = lse * sum(labels) - sum(labels * logits), per row; (N, V) -> (N,)
        ct = compute_dtype(logits.dtype)
        v = logits.shape[-1]
        x2, l2 = logits.reshape(-1, v), labels.reshape(-1, v)
        lse = logsumexp(x2, ct)
        loss = lse * l2.sum(axis=1, dtype=ct) - array_module(l2, x2).einsum("ij,ij->i", l2, x2, dtype=ct)
        return loss.reshape(logits.shape[:-1]).astype(logits.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        logits, labels = xs
        ct = compute_dtype(logits.dtype)
        v = logits.shape[-1]
        xp = array_module(logits, labels, dy)
        x2, l2, dy1 = logits.reshape(-1, v), labels.reshape(-1, v), dy.reshape(-1, 1)
        ls = xp.subtract(x2, logsumexp(x2, ct)[:, None], dtype=ct)       # log_softmax, (N, V)
        dlabels = None
        if needs[1]:
            dlabels = xp.multiply(ls, -dy1).reshape(labels.shape).astype(labels.dtype, copy=False)
        dlogits = None
        if needs[0]:                      # (softmax * sum(labels) - labels) * dy, in place
            xp.exp(ls, out=ls)
            ls *= l2.sum(axis=1, keepdims=True, dtype=ct)
            ls -= l2
            ls *= dy1
            dlogits = ls.reshape(logits.shape).astype(logits.dtype, copy=False)
        return dlogits, dlabels

    def flops(self, specs, out):
        return 6 * specs[0].size


def _exp_shifted_sum_kernel(xp, out, x, m, axis):
    """out[:, :1] = sum(exp(x - m)) per row (the rest of out is scratch)."""
    xp.subtract(x, m, out=out, dtype=out.dtype)
    xp.exp(out, out=out)
    out[:, 0] = out.sum(axis=1)


def _softmax_times_dy_kernel(xp, out, x, lse, dy, axis):
    """out = exp(x - lse) * dy: the softmax part of d loss/d logits."""
    xp.subtract(x, lse, out=out, dtype=out.dtype)
    xp.exp(out, out=out)
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
    internal_allreduces = (3, 1)   # vocabulary-parallel: max, sum, picked logit; picked again in vjp
    checks_values = True           # the labels' range, deferred on a device (rowwise.check_range)


    def indexing(self, specs, out):
        """``nv,n->n``; splitting the vocabulary v runs the vocabulary-parallel kernel."""
        letters, _ = same_letters(specs[0].ndim)
        return Indexing((letters, letters[:-1]), letters[:-1], internal=frozenset(letters[-1]))

    def local(self, sharding, rank, specs, out, comm_for=None):
        lay = sharding.input_layout(0)
        axes = lay.dims[-1]
        if not axes:
            return self
        v_local = lay.local_shape(specs[0].shape)[-1]
        return self.with_attrs(vocab_comm=comm_for(lay.mesh, axes), vocab_offset=lay.block_index(rank)[-1] * v_local)

    def _picked(self, x2, lab):
        """logits[row, label] of every row, summed over the vocabulary shards."""
        xp = array_module(x2, lab)
        rows = xp.arange(lab.size)
        if "vocab_comm" not in self.attrs:
            return x2[rows, lab], rows, lab, None
        local = lab - self.attrs["vocab_offset"]
        inside = (local >= 0) & (local < x2.shape[1])
        local = xp.where(inside, local, 0)
        picked = xp.where(inside, x2[rows, local], 0).astype(x2.dtype)
        return self.attrs["vocab_comm"].allreduce(picked), rows[inside], local[inside], inside

    def infer(self, logits, labels):
        check_float(logits, "logits")
        check_class_axis(logits)
        check_int(labels, "labels", "labels are integer class ids; cast them to int32")
        if labels.shape != logits.shape[:-1]:
            raise OpArgError("labels shape", f"{logits.shape[:-1]} (logits.shape[:-1] of logits {logits.shape})",
                             str(labels.shape), "pass one class id per row of logits")
        return TensorSpec(labels.shape, logits.dtype)

    def forward(self, logits, labels, checks=None):
        v = logits.shape[-1]
        x2, lab = logits.reshape(-1, v), labels.reshape(-1)          # (N, V) or local (N, V/mp), (N,)
        ct = compute_dtype(logits.dtype)
        if "vocab_comm" in self.attrs:   # vocabulary-parallel: max, sum and picked all-reduced over mp
            comm = self.attrs["vocab_comm"]
            m = comm.allreduce(x2.max(axis=1).astype(ct), op="max")[:, None]               # (N, 1)
            s = comm.allreduce(rowwise(_exp_shifted_sum_kernel, (1,), ct, x2, m)[:, 0])    # (N,)
            lse = array_module(s).log(s) + m[:, 0]
        else:
            check_range(labels, v, "labels", self.kind, checks)
            lse = logsumexp(x2, ct)
        loss = lse - self._picked(x2, lab)[0]
        return loss.reshape(labels.shape).astype(logits.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        logits, labels = xs
        ct = compute_dtype(logits.dtype)
        v = logits.shape[-1]
        x2, lab, dy1 = logits.reshape(-1, v), labels.reshape(-1), dy.reshape(-1)
        picked, rows, cols, inside = self._picked(x2, lab)
        if y.dtype == ct or inside is not None:
            lse = y.reshape(-1).astype(ct) + picked      # (N,)
        else:
            lse = logsumexp(x2, ct)
        d = rowwise(_softmax_times_dy_kernel, (1,), ct, x2, lse[:, None], dy1[:, None])  # (N, V)
        d[rows, cols] -= dy1 if inside is None else dy1[inside]
        return d.reshape(logits.shape).astype(logits.dtype, copy=False), None

    def flops(self, specs, out):
        return 4 * specs[0].size

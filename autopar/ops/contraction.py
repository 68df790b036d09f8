"""Contractions: MatMul and BatchMatMul, one einsum-style family.

Each op is described by a subscript string (``"ik,kj->ij"``, batch dims ``b...``); the
sharding rules (issue: sharded execution) read the letters: a letter in both inputs and
not in the output is contracted, so splitting it leaves a partial sum.

``out_strategy`` (MindSpore's): with the contracted index split, the output is a partial
sum; ``out_strategy=((a_i, b_j),)`` lays it out whole over that split (an all-reduce, the
default) and ``((a_i * a_k, b_j),)`` split by it too (a reduce-scatter), see
:func:`autopar.ops.sharding.with_out_strategy`.

Gradients of ``C = op(A) @ op(B)`` (``op`` transposes the last two dims when the flag is
set) are written so that each result comes out contiguous in its input's own layout:

    dA = dC @ op(B)^T   (or op(B) @ dC^T when transpose_a)
    dB = op(A)^T @ dC   (or dC^T @ op(A) when transpose_b)

A 2-D B broadcast over A's batch dims (a weight applied to (B, S, in), as the
sequence-parallel row-parallel Dense does) folds A's leading dims into rows: one GEMM
each way, and dB made once instead of one per batch entry summed after.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module, half_matmul, host_matmul
from ..dtype import is_half
from ..errors import OpArgError
from ..ir.spec import TensorSpec
from .elementwise import result_dtype, sum_to
from .primitive import Primitive, check_float
from .registry import register
from .sharding import Indexing, broadcast_indexing


def _t(x):
    return x.swapaxes(-1, -2)


def _matmul(a, b, out_dtype=None):
    """``a @ b``, half-precision operands multiplied in float32 (BLAS) and left in float32
    for the caller to round once, as tensor cores accumulate: numpy's own float16 matmul
    has no BLAS path (about 150x slower than float32) and its bfloat16 matmul returns
    float32 anyway; on a GPU cuBLAS computes exactly that on the tensor cores, without the
    casts (``backend.half_matmul``). float32 and float64 operands go straight to the array
    module's matmul (2-D host products through oneMKL under ``AUTOPAR_BLAS=mkl``, backend/mkl.py).
    ``out_dtype``: the dtype the caller rounds the product to, if it does so
    at once; cuBLAS then writes that dtype itself (the float32 sum rounded once, as the cast
    does) instead of a float32 array the caller reads again -- the host ignores it."""
    if is_half(a.dtype) or is_half(b.dtype):
        product = half_matmul(a, b, out_dtype)
        if product is not None:
            return product
        a, b = a.astype(np.promote_types(a.dtype, np.float32)), b.astype(np.promote_types(b.dtype, np.float32))
    product = host_matmul(a, b)    # oneMKL where AUTOPAR_BLAS=mkl asks for it, else None
    return product if product is not None else array_module(a, b).matmul(a, b)


class Contraction(Primitive):
    n_inputs = 2
    fresh_output = fresh_grads = True
    takes_out_strategy = True   # a contracted split's partial output: all-reduced or reduce-scattered

    def __init__(self, transpose_a: bool = False, transpose_b: bool = False):
        super().__init__(transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))

    def _mk_kn(self, a: TensorSpec, b: TensorSpec):
        ta, tb = self.attrs["transpose_a"], self.attrs["transpose_b"]
        m, k = (a.shape[-1], a.shape[-2]) if ta else (a.shape[-2], a.shape[-1])
        k2, n = (b.shape[-1], b.shape[-2]) if tb else (b.shape[-2], b.shape[-1])
        if k != k2:
            raise OpArgError("input shapes", f"contraction dims equal (input 0 gives {k}"
                             f"{', transposed' if ta else ''})",
                             f"{a.shape} and {b.shape} (input 1 gives {k2}{', transposed' if tb else ''})",
                             "check the weight's shape or the transpose_a/transpose_b flags")
        return m, k, n

    def indexing(self, specs, out):
        a, b = specs
        ta, tb = self.attrs["transpose_a"], self.attrs["transpose_b"]
        batch = broadcast_indexing([a.shape[:-2], b.shape[:-2]], len(out.shape) - 2)
        mk = "xz" if not ta else "zx"   # x: rows, z: contracted, y: columns
        kn = "zy" if not tb else "yz"
        return Indexing((batch.inputs[0] + mk, batch.inputs[1] + kn), batch.output + "xy", batch.fixed)

    def _folds(self, a, b) -> bool:
        """A weight (2-D B) applied to every batch entry of A: fold A's leading dims into rows."""
        return b.ndim == 2 and a.ndim > 2 and not self.attrs["transpose_a"]

    def forward(self, a, b):
        ta, tb = self.attrs["transpose_a"], self.attrs["transpose_b"]
        out = np.result_type(a.dtype, b.dtype)
        if self._folds(a, b):
            y = _matmul(a.reshape(-1, a.shape[-1]), _t(b) if tb else b, out)  # (..., m, k) -> (rows, k) @ op(B)
            y = y.reshape(a.shape[:-1] + y.shape[-1:])                      # (rows, n) -> (..., m, n)
        else:
            y = _matmul(_t(a) if ta else a, _t(b) if tb else b, out)
        return y.astype(out, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        a, b = xs
        ta, tb = self.attrs["transpose_a"], self.attrs["transpose_b"]
        if self._folds(a, b):
            return self._folded_vjp(dy, a, b, specs, needs)
        da = db = None
        batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))

        def rounded(spec):   # the product's dtype when no broadcast batch is summed before rounding
            return spec.dtype if tuple(spec.shape[:-2]) == batch else None
        if needs[0]:
            if ta:
                da = _matmul(_t(b) if tb else b, _t(dy), rounded(specs[0]))
            else:
                da = _matmul(dy, b if tb else _t(b), rounded(specs[0]))
            da = sum_to(da, specs[0].shape).astype(specs[0].dtype, copy=False)
        if needs[1]:
            if tb:
                db = _matmul(_t(dy), _t(a) if ta else a, rounded(specs[1]))
            else:
                db = _matmul(a if ta else _t(a), dy, rounded(specs[1]))
            db = sum_to(db, specs[1].shape).astype(specs[1].dtype, copy=False)
        return da, db

    def _folded_vjp(self, dy, a, b, specs, needs):
        """The VJP on (rows, k) @ op(B): dA reshaped back to A's shape, dB one GEMM."""
        tb = self.attrs["transpose_b"]
        a2, dy2 = a.reshape(-1, a.shape[-1]), dy.reshape(-1, dy.shape[-1])   # (rows, k), (rows, n)
        da = db = None
        if needs[0]:
            da = _matmul(dy2, b if tb else _t(b), specs[0].dtype).reshape(a.shape).astype(specs[0].dtype, copy=False)
        if needs[1]:
            db = (_matmul(_t(dy2), a2, specs[1].dtype) if tb else
                  _matmul(_t(a2), dy2, specs[1].dtype)).astype(specs[1].dtype, copy=False)
        return da, db

    def flops(self, specs, out):
        m, k, n = self._mk_kn(*specs)
        return 2 * k * out.size


@register
class MatMul(Contraction):
    """``MatMul(transpose_a, transpose_b)(A, B)`` on 2-D tensors: ``"ik,kj->ij"``."""

    subscripts = "ik,kj->ij"

    def infer(self, a, b):
        for i, s in enumerate((a, b)):
            if s.ndim != 2:
                raise OpArgError(f"input {i} rank", "2 (use BatchMatMul for batches)", f"shape {s.shape}")
            check_float(s, f"input {i}")
        m, _, n = self._mk_kn(a, b)
        return TensorSpec((m, n), result_dtype([a, b]))


@register
class BatchMatMul(Contraction):
    """Batched matmul over leading dims (broadcast), e.g. attention scores
    ``(B, heads, S, D) @ (B, heads, D, S)``: ``"...ik,...kj->...ij"``."""

    subscripts = "...ik,...kj->...ij"

    def infer(self, a, b):
        for i, s in enumerate((a, b)):
            if s.ndim < 2:
                raise OpArgError(f"input {i} rank", ">= 2", f"shape {s.shape}")
            check_float(s, f"input {i}")
        m, _, n = self._mk_kn(a, b)
        try:
            batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise OpArgError("batch dims", "broadcastable leading dims", f"{a.shape} and {b.shape}") from None
        return TensorSpec(tuple(batch) + (m, n), result_dtype([a, b]))

"""Shared helpers of the row-wise composite ops (softmax family, norms, cross-entropies).

Every kernel computes in at least float32 (``compute_dtype``) and returns the input's
dtype. Row-wise work over a long last axis (the (N, V) logits) runs on blocks of rows that
fit in cache (``BLOCK_ELEMS``), so no (N, V)-sized temporary is made when the result is
per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import array_module, cache_blocked, on_host
from ..errors import OpArgError
from ..ir.spec import TensorSpec

BLOCK_ELEMS = 1 << 18   # elements per row block (1 MiB of float32); 2^14..2^19 all measured
                         # alike, 1.3-2x faster than whole-array passes on (N, 40000)


def compute_dtype(dtype) -> np.dtype:
    """float16 -> float32; float32 and float64 stay."""
    return np.promote_types(dtype, np.float32)


def check_int(spec: TensorSpec, arg: str, fix: str = "") -> None:
    if np.dtype(spec.dtype).kind not in "iu":
        raise OpArgError(f"{arg} dtype", "an integer dtype", f"{np.dtype(spec.dtype).name} {spec.shape}",
                         fix or "cast it first with ops.Cast()(x, autopar.int32)")


def check_range(idx, n: int, arg: str, where: str, checks: list | None = None) -> None:
    """Index values must lie in [0, n); checked on the (small) index array at run time.

    On the host, and wherever no ``checks`` list is given (an eager call), the check is
    made at once. On a device, reading the min and max would make the host wait until the
    device has run everything queued before (31 ms of an H100 training step, for four
    lookups): with ``checks`` given -- a Program passes one to every op whose
    ``checks_values`` is set -- the min and max stay on the device, queued as two
    reductions, and a :class:`RangeCheck` is appended for the Program to read after its
    last instruction (CuPy wraps an out-of-range index instead of faulting, so the outputs
    hold garbage until then, and the Program raises before anyone reads them)."""
    if not idx.size:
        return
    if checks is None or on_host(idx):
        if idx.min() < 0 or idx.max() >= n:
            raise range_error(idx.min(), idx.max(), n, arg, where)
        return
    checks.append(RangeCheck((idx.min(), idx.max()), n, arg, where))


def range_error(low, high, n: int, arg: str, where: str) -> OpArgError:
    """The error of index values from ``low`` to ``high`` outside [0, n)."""
    return OpArgError(f"{arg} values", f"in [0, {n})", f"min {low}, max {high}", where=where)


@dataclass(frozen=True)
class RangeCheck:
    """:func:`check_range` deferred on a device: ``values`` are the index array's (min, max)
    as 0-d device arrays; :meth:`error` judges them once they are on the host."""

    values: tuple
    n: int
    arg: str
    where: str

    def error(self, low, high) -> OpArgError | None:
        """The error check_range raises for this min and max, or None when they lie in [0, n)."""
        return range_error(low, high, self.n, self.arg, self.where) if low < 0 or high >= self.n else None


def rows_per_block(row_len: int, n_rows: int, blocked: bool = True) -> int:
    """Rows of about ``BLOCK_ELEMS`` elements (all ``n_rows`` when not ``blocked``: on a
    GPU one pass over the whole array beats a launch per block)."""
    return max(1, BLOCK_ELEMS // max(row_len, 1)) if blocked else max(n_rows, 1)


def row_blocks(n_rows: int, row_len: int, blocked: bool = True):
    """Slices of about ``BLOCK_ELEMS`` elements over the rows of an (n_rows, row_len) array
    (one slice of every row when not ``blocked``)."""
    step = rows_per_block(row_len, n_rows, blocked)
    for a in range(0, n_rows, step):
        yield slice(a, min(a + step, n_rows))


def rowwise(kernel, axes: tuple[int, ...], ct: np.dtype, *arrays):
    """A new array shaped like ``arrays[0]``, in dtype ``ct``, filled by
    ``kernel(xp, out, *arrays, axis=...)``. When ``axes`` is the last axis alone the kernel
    runs on cache-sized blocks of rows (every array viewed as (rows, its last dim); per-row
    values are passed as (..., 1)), so its temporaries stay in cache; otherwise, and on a
    GPU, it runs once."""
    x = arrays[0]
    xp = array_module(*arrays)
    out = xp.empty(x.shape, ct)
    if x.ndim == 0 or axes != (x.ndim - 1,):
        kernel(xp, out, *arrays, axis=axes)
        return out
    views = [a.reshape(-1, a.shape[-1]) for a in arrays]
    out2 = out.reshape(views[0].shape)
    for rows in row_blocks(*out2.shape, cache_blocked(x)):
        kernel(xp, out2[rows], *(v[rows] for v in views), axis=1)
    return out


def logsumexp(x2, ct: np.dtype):
    """log(sum(exp(x2), 1)) of an (N, V) array, stable, as (N,) in dtype ``ct``: one read of
    x2 in row blocks, no (N, V) temporary (on a GPU: one block, an (N, V) temporary)."""
    xp = array_module(x2)
    blocked = cache_blocked(x2)
    out = xp.empty(x2.shape[0], ct)                     # (N,)
    buf = xp.empty((min(rows_per_block(x2.shape[1], x2.shape[0], blocked), x2.shape[0]), x2.shape[1]), ct)
    for rows in row_blocks(*x2.shape, blocked):
        xb = x2[rows]
        t = buf[:xb.shape[0]]
        m = xb.max(axis=1, keepdims=True)
        xp.subtract(xb, m, out=t, dtype=ct)
        xp.exp(t, out=t)
        s = t.sum(axis=1)
        xp.log(s, out=s)
        out[rows] = s + m[:, 0]
    return out


def check_class_axis(x: TensorSpec, arg: str = "logits") -> None:
    if x.ndim < 1 or x.shape[-1] == 0:
        raise OpArgError(f"{arg} shape", "at least 1 dim with a non-empty last (class) axis", str(x.shape))

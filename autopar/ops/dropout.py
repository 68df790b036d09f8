"""Dropout whose mask is a pure function of (key, logical element index)."""
from __future__ import annotations

import numpy as np

from ..backend import array_module, cache_blocked, kernels
from ..errors import OpArgError
from ..ir.random import derive_key, keep_mask, region_indices
from .elementwise import elementwise_indexing
from .primitive import Primitive, check_float
from .registry import register

_DROPOUT_CHUNK = 1 << 14  # elements per random-number chunk: its uint64 temporaries (128 KiB
                          # each) stay in L2; 1 << 15 and up measured 3x slower


def dropout_mask(key: int, keep_prob: float, shape: tuple[int, ...], region=None, xp=np):
    """The keep mask of ``shape`` (or of its sub-``region``, a tuple of slices): element i
    is kept iff keep_mask(key, i) (a hash of i below keep_prob * 2**32), i its flat row-major index in the full shape.
    A shard generates its slice with the region and gets the serial model's values; the
    mask is an array of the array module ``xp`` (numpy, or CuPy: the same bits)."""
    return keep_mask(key, region_indices(shape, region, xp), keep_prob)


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

    def _apply(self, a, key: int):
        """a * mask / keep_prob, the mask made in flat chunks (flat index = region_indices;
        one chunk on a GPU), with the array module of ``a``; a CuPy array of a float dtype
        takes the fused kernel (``backend.kernels.dropout``: the same bits)."""
        p = self.attrs["keep_prob"]
        if p == 1.0:
            return a
        key = self._key(key)
        if kernels.fusable(a):   # a CuPy array: one fused pass, the index computed in the kernel
            return kernels.dropout(a, key, p, self.attrs.get("global_shape"), self.attrs.get("region"))
        xp = array_module(a)
        flat = a.reshape(-1)
        out = xp.empty_like(flat)
        scale = out.dtype.type(1.0 / p)
        region = self.attrs.get("region")  # a shard: its elements' indices in the logical tensor
        index = None if region is None else region_indices(self.attrs["global_shape"], region, xp).reshape(-1)
        chunk = _DROPOUT_CHUNK if cache_blocked(a) else max(flat.size, 1)
        for s in range(0, flat.size, chunk):
            e = min(s + chunk, flat.size)
            if index is not None:
                idx = index[s:e]
            else:
                idx = xp.arange(s, e, dtype=np.uint32 if flat.size < 2 ** 32 else np.uint64)
            keep = keep_mask(key, idx, p)
            o = out[s:e]
            xp.multiply(flat[s:e], keep, out=o)
            o *= scale
        return out.reshape(a.shape)

    def indexing(self, specs, out):
        return elementwise_indexing(specs, out)

    def local(self, sharding, rank, specs, out, comm_for=None):
        """A shard masks with the logical tensor's element indices, so every plan drops the
        units the serial model drops."""
        layout = sharding.output_layout()
        if not any(layout.dims):
            return self
        return self.with_attrs(region=layout.slices(rank, out.shape), global_shape=tuple(out.shape))

    def forward(self, x, key):
        return self._apply(x, key)

    def vjp(self, dy, xs, y, specs, needs, key):
        return (self._apply(dy, key).astype(specs[0].dtype, copy=False),)

    def flops(self, specs, out):
        return 2 * out.size

"""Dropout on a micro-batch with the whole batch's mask.

A dropout mask is a pure function of (key, element index in the logical tensor). A stage
program is traced on one micro-batch, so its logical tensors are the micro-batch's; to drop
exactly the units the whole-batch (serial) run drops, every local element takes the index
it has in the whole batch. The batch runs along the one dim whose size differs between
the whole-batch trace and the micro-batch trace, as that dim's outermost factor: ``(B, S,
H)``, or ``(B*S, H)`` after a reshape.

Which whole-batch rows micro-batch k holds depends on the feed (:class:`MicroFeed`)::

    whole batch on every rank (B rows):      micro-batch row j -> k*B/m + j
    data-parallel feed, n ranks x L rows:    micro-batch row j -> i*L + k*L/m + j % (L/m),
                                             i = j // (L/m) the rank position feeding it
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...backend import array_module
from ...errors import format_error
from ...ir.random import keep_mask
from ...ops.dropout import Dropout


@dataclass(frozen=True)
class MicroFeed:
    micro: int      # m, micro-batches per step
    block: int      # rows of one fed block: B (whole batch on every rank) or L (a rank's slice)
    rows: int       # rows of a micro-batch (logical, over the whole stage)

    def whole_rows(self, k: int) -> np.ndarray:
        """The whole-batch row of each row of micro-batch ``k``."""
        per = self.block // self.micro                      # rows of one fed block in a micro-batch
        j = np.arange(self.rows, dtype=np.int64)
        return (j // per) * self.block + k * per + j % per


def whole_batch_coords(micro_shape: Sequence[int], whole_shape: Sequence[int], region, feed: MicroFeed,
                       k: int, where: str) -> tuple[np.ndarray, ...]:
    """Per dim, the whole-batch coordinates of the local block ``region`` (slices of the
    micro-batch tensor; None: all of it) in micro-batch ``k``."""
    region = region or tuple(slice(0, n) for n in micro_shape)
    coords = [np.arange(*r.indices(n), dtype=np.int64) for r, n in zip(region, micro_shape)]
    dims = [d for d, (a, b) in enumerate(zip(micro_shape, whole_shape)) if a != b]
    if not dims:                # no batch dim: every micro-batch uses the same mask, as serial does once
        return tuple(coords)
    d = dims[0]
    if len(dims) > 1 or whole_shape[d] != feed.micro * micro_shape[d] or micro_shape[d] % feed.rows:
        raise ValueError(format_error(
            where, "shape", f"the micro-batch shape with one dim {feed.micro} times larger in the whole batch, "
            f"the batch its outermost factor", f"{tuple(micro_shape)} per micro-batch, {tuple(whole_shape)} whole",
            "keep the batch as one leading factor of one dim before dropout"))
    inner = micro_shape[d] // feed.rows                     # (rows * inner) along d
    c = coords[d]
    coords[d] = feed.whole_rows(k)[c // inner] * inner + c % inner
    return tuple(coords)


def flat_index(coords: Sequence[np.ndarray], shape: Sequence[int], xp=np):
    """Row-major flat indices into ``shape`` of the block with these per-dim coordinates, as
    a uint64 array of the array module ``xp``: made there from the per-dim coordinates (a few
    small arrays), so a GPU's block index is neither computed on the host nor copied over."""
    n = len(shape)
    index = xp.zeros((1,) * n, dtype=np.uint64)
    stride = 1
    for d in reversed(range(n)):
        axis = xp.asarray(coords[d].astype(np.uint64)) * np.uint64(stride)
        index = index + axis.reshape((-1,) + (1,) * (n - d - 1))
        stride *= int(shape[d])
    return index


class MicroBatchDropout(Dropout):
    """Dropout of one rank's block of one micro-batch, masked with whole-batch indices."""

    @classmethod
    def of(cls, prim: Dropout, whole_shape: tuple[int, ...], coords: tuple[np.ndarray, ...]) -> MicroBatchDropout:
        new = object.__new__(cls)
        new.attrs = {**prim.attrs, "whole_shape": tuple(whole_shape), "coords": coords}
        new.strategy = prim.strategy
        return new

    def _apply(self, a: np.ndarray, key: int) -> np.ndarray:
        """a * mask / keep_prob, element for element what Dropout computes on the whole batch."""
        p = self.attrs["keep_prob"]
        if p == 1.0:
            return a
        xp = array_module(a)
        index = flat_index(self.attrs["coords"], self.attrs["whole_shape"], xp)   # on a's device
        out = xp.multiply(a, keep_mask(self._key(key), index, p))
        out *= out.dtype.type(1.0 / p)
        return out

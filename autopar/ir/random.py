"""Counter-based random numbers: a value depends only on (key, logical index).

Any slice of a random tensor can be generated without generating the rest, so a rank
materializes exactly its shard of a parameter, and a dropout mask, with the values the
serial model would have. The generator is SplitMix64 applied to ``key + index``; keys are
derived from strings (parameter names, op names) with BLAKE2b, which is stable across
processes and Python versions (unlike ``hash``).

Dropout's hash (:func:`keep_mask`) is written with array operators only (``^ >> * <``
and ``astype``), so it runs on whatever array module holds the indices -- numpy on the
host, CuPy on a GPU -- and, being integer arithmetic, gives the same bits on both: a GPU
run drops the units a CPU run drops. (This layer sits below the array backend, so the
caller chooses the module: it passes indices made by it, or ``xp`` to
:func:`region_indices`.) Initializers run on the host.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive_key(*parts) -> int:
    """A 64-bit key from any printable parts, e.g. ``derive_key(seed, 'blocks.0.dense.weight')``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def region_indices(shape: tuple[int, ...], region: tuple[slice, ...] | None = None, xp=np):
    """Flat row-major indices into ``shape`` of the elements in ``region`` (all if None),
    as a uint64 array of the array module ``xp`` (numpy by default)."""
    if region is None:
        return xp.arange(math.prod(shape), dtype=np.uint64).reshape(shape)
    idx = xp.zeros((1,) * len(shape), dtype=np.uint64)
    stride = 1
    for d in reversed(range(len(shape))):
        start, stop, step = region[d].indices(shape[d])
        ax = xp.arange(start, stop, step, dtype=np.uint64) * np.uint64(stride)
        idx = idx + ax.reshape((-1,) + (1,) * (len(shape) - d - 1))
        stride *= shape[d]
    return idx


def uniform(key: int, index: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) for each logical index."""
    with np.errstate(over="ignore"):
        z = _mix(index.astype(np.uint64) * _GOLDEN + np.uint64(key))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(key: int, index: np.ndarray) -> np.ndarray:
    """Standard normal float64 per logical index (Box-Muller on two independent streams)."""
    u1 = uniform(key, index)
    u2 = uniform(derive_key(key, "box-muller"), index)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def truncated_normal(key: int, index: np.ndarray, bound: float = 2.0, rounds: int = 12) -> np.ndarray:
    """Standard normal conditioned on |x| <= bound, by per-element rejection over fixed rounds."""
    out = normal(key, index)
    bad = np.abs(out) > bound
    r = 0
    while bad.any() and r < rounds:
        r += 1
        fresh = normal(derive_key(key, "retry", r), index[bad])
        out[bad] = fresh
        bad[bad] = np.abs(fresh) > bound
    np.clip(out, -bound, bound, out=out)
    return out


_U32 = np.uint32
_H1, _H2 = _U32(0x7FEB352D), _U32(0x846CA68B)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """Chris Wellons' lowbias32 integer hash, in place on a uint32 array."""
    x ^= x >> _U32(16)
    x *= _H1
    x ^= x >> _U32(15)
    x *= _H2
    x ^= x >> _U32(16)
    return x


def keep_mask(key: int, index, keep_prob: float):
    """Bernoulli(keep_prob) per logical index, on 32-bit lanes (dropout's hot path: about a
    third of the cost of :func:`uniform`). Two hash rounds mix in the 64-bit key and the
    high half of the index, so any index below 2**64 has a defined value. ``index`` is an
    unsigned integer array of any array module; the mask (bool) is of the same module.
    Indices below 2**32 have a high half of 0, which the xor leaves alone: on the host a
    max skips that pass when it does nothing; on a device the pass runs always, since reading
    the max back would make the host wait for the device at every dropout."""
    k_lo, k_hi = _U32(key & 0xFFFFFFFF), _U32((key >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        x = _lowbias32(index.astype(_U32) ^ k_lo)
        x ^= k_hi
        wide = index.dtype.itemsize > 4 and index.size
        if wide and (not isinstance(index, np.ndarray) or int(index.max()) >> 32):
            x ^= (index >> np.uint64(32)).astype(_U32)
        _lowbias32(x)
    threshold = min(int(keep_prob * 2.0 ** 32), 2 ** 32 - 1)
    return x < _U32(threshold)

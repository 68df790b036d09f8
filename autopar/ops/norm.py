"""The float64 sum of squares of many arrays, on the host or a device: the gradients'
global norm (clipping, the overflow check) is ``sqrt(sum_of_squares(grads))``.

On the host a float32 array is reduced by one fused pass in float64 (``backend.hostkernels``);
other arrays are walked in blocks converted to float64 and reduced with ``dot`` (BLAS). Either
way the sum is as accurate as a float64 sum without a float64 copy of the model (a float32
``dot`` over 10^8 elements would be off by about 0.3%). On a GPU each array is
reduced by one kernel squaring and summing in float64 as it reads (``backend.kernels``), the
partial sums stay on the device, and only their total comes back to the host: one sync per
norm, not one per parameter (a 350M PanGu-α has 389 of them).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..backend import array_module, cache_blocked, hostkernels, is_array, kernels
from ..dtype import is_float
from ..errors import format_error

BLOCK_ELEMENTS = 1 << 16  # elements converted to float64 at a time on the host (512 KiB)


def sum_of_squares(arrays: Iterable) -> float:
    """The sum of the squares of every element of ``arrays``, accumulated in float64."""
    block = None
    total = 0.0
    on_device = []                   # 0-d float64 partial sums left on the device
    for i, g in enumerate(arrays):
        g = g if is_array(g) else np.asarray(g)
        if not (g.dtype.kind in "fiu" or is_float(g.dtype)):       # bfloat16 has kind 'V'
            raise ValueError(format_error("global_norm", f"grads[{i}] dtype", "a numeric array", str(g.dtype)))
        if g.size and kernels.fusable(g, dtypes=kernels.FUSED_DTYPES):
            on_device.append(kernels.sum_of_squares(g))
            continue
        if hostkernels.serves(g):                                   # on CPU cores: one pass in C
            total += hostkernels.sum_of_squares(g)
            continue
        xp = array_module(g)
        flat = g.ravel()
        if flat.dtype == np.float64 or not cache_blocked(g):
            wide = flat.astype(np.float64, copy=False)
            total += float(xp.dot(wide, wide))
            continue
        if block is None:
            block = xp.empty(BLOCK_ELEMENTS, np.float64)
        for start in range(0, flat.size, block.size):
            part = flat[start:start + block.size]
            b = block[:part.size]
            b[...] = part
            total += float(xp.dot(b, b))
    if on_device:
        total += float(array_module(on_device[0]).stack(on_device).sum())
    return total

"""Dtypes are numpy dtypes; these names spell them the MindSpore way (``autopar.float32``).

``bfloat16`` is ``ml_dtypes.bfloat16`` (numpy has none): a numpy dtype of kind ``'V'``, so
"is this a float" is asked through :func:`is_float`, never through ``dtype.kind == 'f'``.
Importing this module registers it, so ``np.dtype('bfloat16')`` works from then on.
"""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from .errors import format_error

float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
bool_ = np.dtype(np.bool_)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")   # what parameters and ops compute in
HALF_DTYPES = ("float16", "bfloat16")   # mixed-precision compute dtypes (float32 master weights)


def as_dtype(x) -> np.dtype:
    """Normalize 'float32', np.float32, np.dtype('float32') to one np.dtype."""
    try:
        return np.dtype(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"dtype: expected a numpy dtype or its name, got {x!r}") from exc


def float_dtype(value, where: str = "dtype", arg: str = "dtype") -> np.dtype:
    """``value`` (a name such as 'float32', or a numpy dtype or type) as one of
    :data:`FLOAT_DTYPES`; otherwise an error naming ``where`` and ``arg`` -- numpy's own
    ("data type 'flaot32' not understood") names neither, and ``np.dtype(None)`` is float64."""
    expected = f"one of {', '.join(FLOAT_DTYPES)} (a name or a numpy dtype)"
    dt = None
    if value is not None and not isinstance(value, (bool, int, float)):
        try:
            dt = np.dtype(value)
        except (TypeError, ValueError):
            dt = None
    if dt is None or dt.name not in FLOAT_DTYPES or not dt.isnative:
        err = ValueError if isinstance(value, (str, np.dtype)) else TypeError
        raise err(format_error(where, arg, expected, repr(value)))
    return dt


def is_float(dtype) -> bool:
    """A floating-point dtype: numpy's (kind 'f') or bfloat16."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt == bfloat16


def is_half(dtype) -> bool:
    """float16 or bfloat16: a dtype whose sums and statistics are accumulated in float32."""
    try:
        return _is_half_dtype(dtype)        # a dtype object: one cache look-up (~800 calls a GPU step)
    except TypeError:                       # unhashable (a list, an array): asked afresh
        return np.dtype(dtype).name in HALF_DTYPES


@functools.cache
def _is_half_dtype(dtype) -> bool:
    return np.dtype(dtype).name in HALF_DTYPES   # numpy builds .name in Python: ~2 us


def accumulate_dtype(dtype) -> np.dtype:
    """The dtype a sum, a norm or a row statistic of ``dtype`` values is computed in: float32
    for the half dtypes (float16 sums past 65504 overflow and bfloat16 keeps 8 bits), the
    dtype itself otherwise (float32, float64, ints)."""
    dt = np.dtype(dtype)
    return float32 if is_half(dt) else dt


def weak_scalar_dtype(ref, value) -> np.dtype:
    """The dtype a Python ``bool``/``int``/``float`` takes beside a tensor of dtype ``ref``:
    NEP 50's "weak scalar" rule, spelled out so that it holds on every numpy and for
    bfloat16 (``np.result_type(bfloat16, 0.5)`` depends on the numpy and ml_dtypes versions;
    legacy value-based casting makes it float32). The tensor's dtype wins within its kind
    (``x * 0.5`` stays bfloat16; ``i + 1`` stays int32); a float beside an integer or bool
    tensor is float64, an int beside a bool tensor int64, as numpy 2 gives."""
    ref = np.dtype(ref)
    if isinstance(value, bool) or (isinstance(value, int) and ref.kind in "iuc") or is_float(ref) \
            or ref.kind == "c":
        return ref
    return np.dtype(np.float64) if isinstance(value, float) else np.dtype(np.int64)

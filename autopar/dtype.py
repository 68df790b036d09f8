"""Dtypes are numpy dtypes; these names spell them the MindSpore way (``autopar.float32``)."""
from __future__ import annotations

import numpy as np

from .errors import format_error

float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
bool_ = np.dtype(np.bool_)

FLOAT_DTYPES = ("float16", "float32", "float64")   # what parameters and ops compute in


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


def is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind == "f"

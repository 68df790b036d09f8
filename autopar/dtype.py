"""Dtypes are numpy dtypes; these names spell them the MindSpore way (``autopar.float32``)."""
from __future__ import annotations

import numpy as np

float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
bool_ = np.dtype(np.bool_)


def as_dtype(x) -> np.dtype:
    """Normalize 'float32', np.float32, np.dtype('float32') to one np.dtype."""
    try:
        return np.dtype(x)
    except TypeError as exc:
        raise TypeError(f"dtype: expected a numpy dtype or its name, got {x!r}") from exc


def is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind == "f"

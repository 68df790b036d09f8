"""Field checks shared by the model configs' ``__post_init__``.

Every check names the config class and the field: ``PanguAlphaConfig: init_std: expected a
finite float > 0, got nan``. A value of the wrong type raises TypeError, a value of the
right type out of range ValueError. Numpy scalars are accepted and stored as Python
numbers, so a config built from parsed or computed values prints, compares and hashes
like one written by hand.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..dtype import float_dtype
from ..errors import check_int as _check_int, format_error


def fail(config, field: str, expected: str, fix: str = "", error: type = ValueError):
    """Raise ``error`` naming the config class and ``field`` (its current value as got)."""
    raise error(format_error(type(config).__name__, field, expected, repr(getattr(config, field)), fix))


def check_int(config, field: str, lo: int = 1, expected: str = "") -> int:
    """The field as a Python int >= ``lo`` (bools and floats are not ints)."""
    expected = expected or ("a positive int" if lo == 1 else f"an int >= {lo}")
    v = _check_int(type(config).__name__, field, getattr(config, field), lo, expected=expected,
                   type_error=TypeError)
    object.__setattr__(config, field, v)
    return v


def check_float(config, field: str, lo: float, hi: float = math.inf, lo_open: bool = False,
                hi_open: bool = True, expected: str = "") -> float:
    """The field as a finite Python float in the interval from ``lo`` to ``hi``."""
    v = getattr(config, field)
    expected = expected or (f"a finite float in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                            if math.isfinite(hi) else f"a finite float {'>' if lo_open else '>='} {lo:g}")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        fail(config, field, expected, error=TypeError)
    v = float(v)
    above = v > lo if lo_open else v >= lo
    below = v < hi if hi_open else v <= hi
    if not (math.isfinite(v) and above and below):
        fail(config, field, expected)
    object.__setattr__(config, field, v)
    return v


def check_bool(config, field: str) -> bool:
    if not isinstance(getattr(config, field), bool):
        fail(config, field, "True or False", error=TypeError)
    return getattr(config, field)


def check_choice(config, field: str, choices: tuple) -> None:
    v = getattr(config, field)
    if not isinstance(v, str) or v not in choices:
        fail(config, field, f"one of {choices}", error=ValueError if isinstance(v, str) else TypeError)


def check_float_dtype(config, field: str) -> None:
    """A float dtype name or numpy dtype, kept as given (models read it with np.dtype)."""
    float_dtype(getattr(config, field), type(config).__name__, field)


def check_norm_epsilon(config, field: str) -> None:
    """A normalization epsilon stays positive and finite in the dtype the statistics are
    computed in (``param_dtype``, at least float32): 1e-50 is 0 in float32 (a constant row
    then divides by 0) and 1e39 is inf."""
    dt = np.promote_types(float_dtype(config.param_dtype), np.float32)
    info = np.finfo(dt)
    if not float(info.smallest_subnormal) <= getattr(config, field) <= float(info.max):
        fail(config, field, f"a float in [{info.smallest_subnormal:g}, {info.max:g}] (positive and finite in "
             f"{dt.name}, the dtype of the normalization statistics)")


def check_model_parallel(config, sizes: dict[str, int]) -> None:
    """``model_parallel`` divides each of ``sizes`` (field name -> size): the Megatron split
    of heads, hidden and FFN columns (and the vocabulary where it is split)."""
    mp = config.model_parallel
    if any(n % mp for n in sizes.values()):
        listed = ", ".join(f"{k}={n}" for k, n in sizes.items())
        fail(config, "model_parallel", f"a divisor of {listed}",
             f"pick model_parallel among the common divisors, or resize the {'/'.join(sizes)}")

"""One helper formats every user-facing error.

A message names the place (an op scope such as ``blocks.3.attention.dense1`` and the op
kind), the argument, what was expected, what was given, and a fix::

    blocks.3.attention.dense1 (MatMul): input 1 shape: expected dim 0 == 64 (the
    contraction size of input 0), got (32, 256); pass a weight of shape (64, N)

Op rules raise :class:`OpArgError` without knowing where they are; the tracer, which knows
the scope, re-raises it with :func:`at_scope`. Integer arguments are checked by one
predicate, :func:`is_int`, and one validator, :func:`check_int`, so a count rejects
``True`` and ``2.0`` the same way everywhere.

This module imports nothing from autopar: every layer may use it.
"""
from __future__ import annotations

import numpy as np


def format_error(where: str, arg: str, expected: str, actual: str, fix: str = "") -> str:
    msg = f"{where}: {arg}: expected {expected}, got {actual}"
    return f"{msg}; {fix}" if fix else msg


class OpArgError(ValueError):
    """A bad argument to an op, raised by its rules before the scope is known."""

    def __init__(self, arg: str, expected: str, actual: str, fix: str = "", where: str = ""):
        self.arg, self.expected, self.actual, self.fix, self.where = arg, expected, actual, fix, where
        super().__init__(format_error(where or "<op>", arg, expected, actual, fix))


class OpTypeError(TypeError):
    """A wrongly typed argument (e.g. a float where a split count must be an int)."""

    def __init__(self, arg: str, expected: str, actual: str, fix: str = "", where: str = ""):
        self.arg, self.expected, self.actual, self.fix, self.where = arg, expected, actual, fix, where
        super().__init__(format_error(where or "<op>", arg, expected, actual, fix))


def at_scope(err: OpArgError | OpTypeError, where: str) -> Exception:
    """The same error, now naming where it happened."""
    return type(err)(err.arg, err.expected, err.actual, err.fix, where)


def is_int(value) -> bool:
    """An int or a numpy integer, never a bool: ``True`` is an int to Python but a mistake
    in a count, a rank or an axis."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def int_range(minimum: int | None = None, maximum: int | None = None) -> str:
    """The expected text of :func:`check_int`: ``an int >= 1``, ``an int in [0, 8]``."""
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an int >= {minimum}"
    return f"an int <= {maximum}" if maximum is not None else "an int"


def check_int(where: str, arg: str, value, minimum: int | None = None, maximum: int | None = None, *,
              expected: str = "", fix: str = "", error: type = ValueError,
              type_error: type | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]`` (either bound optional), or
    ``error`` built by :func:`format_error`; the expected text defaults to
    :func:`int_range`. ``type_error`` (e.g. ``TypeError``), when given, is raised instead for
    a value that is not an int at all, so callers that tell wrong types from wrong values
    keep doing so."""
    expected = expected or int_range(minimum, maximum)
    if not is_int(value):
        raise (type_error or error)(format_error(where, arg, expected, repr(value), fix))
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(format_error(where, arg, expected, repr(value), fix))
    return int(value)

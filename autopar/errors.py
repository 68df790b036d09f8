"""One helper formats every user-facing error.

A message names the place (an op scope such as ``blocks.3.attention.dense1`` and the op
kind), the argument, what was expected, what was given, and a fix::

    blocks.3.attention.dense1 (MatMul): input 1 shape: expected dim 0 == 64 (the
    contraction size of input 0), got (32, 256); pass a weight of shape (64, N)

Op rules raise :class:`OpArgError` without knowing where they are; the tracer, which knows
the scope, re-raises it with :func:`at_scope`.
"""
from __future__ import annotations


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

"""The arguments of a compiled call: checked once, numpy scalars made 0-d arrays, and the
arrays among them in the order the tracer numbered them."""
from __future__ import annotations

import numpy as np

from ..errors import format_error


def tensor_args(args: tuple, kwargs: dict) -> list[np.ndarray]:
    """The array arguments in the order the tracer numbered them."""
    every = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return [a for a in every if isinstance(a, np.ndarray)]


def normalize(args: tuple, kwargs: dict, where: str = "call") -> tuple[tuple, dict]:
    """The call's arguments checked and with numpy scalars as 0-d arrays. An argument is an
    array (a tensor input) or a static value the program is specialised on (None, a bool,
    a number, a string); a list of ids or an empty batch is refused here, naming the
    argument, rather than failing deep inside an op."""
    named = [(f"argument {k}", a) for k, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for name, a in named:
        _check_argument(where, name, a)
    conv = lambda a: np.asarray(a) if isinstance(a, np.generic) else a
    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def _check_argument(where: str, name: str, a) -> None:
    if isinstance(a, (list, tuple)):
        raise TypeError(format_error(where, name, "a numpy array (or a static None/bool/number/str)",
                                     f"a {type(a).__name__} of length {len(a)}",
                                     "convert it first, e.g. np.asarray(ids, dtype=np.int32)"))
    if isinstance(a, np.ndarray) and a.ndim and a.shape[0] == 0:
        raise ValueError(format_error(where, name, "a batch of at least one row", f"shape {a.shape}",
                                      "skip empty batches before calling the network"))

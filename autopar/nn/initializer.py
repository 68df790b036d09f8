"""Initializers: lazy descriptions of a parameter's initial value (MindSpore's names).

An initializer is a frozen value; ``generate(shape, dtype, key, region)`` produces the
elements in ``region`` (a tuple of slices; None = everything) from a counter-based
generator, so a shard is generated without the rest of the tensor and equals the same
slice of the full tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import random as rnd


@dataclass(frozen=True)
class Initializer:
    def generate(self, shape, dtype, key: int, region=None) -> np.ndarray:
        idx = rnd.region_indices(tuple(shape), region)
        return self._values(key, idx).astype(dtype, copy=False)

    def _values(self, key: int, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Normal(Initializer):
    sigma: float = 0.01
    mean: float = 0.0

    def _values(self, key, idx):
        return self.mean + self.sigma * rnd.normal(key, idx)


@dataclass(frozen=True)
class TruncatedNormal(Initializer):
    """Normal(0, sigma) truncated at two standard deviations (as TensorFlow and MindSpore)."""
    sigma: float = 0.01

    def _values(self, key, idx):
        return self.sigma * rnd.truncated_normal(key, idx, bound=2.0)


@dataclass(frozen=True)
class Uniform(Initializer):
    scale: float = 0.07

    def _values(self, key, idx):
        return (2.0 * rnd.uniform(key, idx) - 1.0) * self.scale


@dataclass(frozen=True)
class Constant(Initializer):
    value: float = 0.0

    def _values(self, key, idx):
        return np.full(idx.shape, self.value)


def Zero() -> Constant:  # noqa: N802 - MindSpore's name
    return Constant(0.0)


def One() -> Constant:  # noqa: N802
    return Constant(1.0)


_BY_NAME = {"zeros": Zero, "zero": Zero, "ones": One, "one": One, "normal": Normal,
            "truncatednormal": TruncatedNormal, "uniform": Uniform}


def as_initializer(init) -> Initializer:
    """Accept an Initializer, a name ('normal', 'zeros', ...) or a number."""
    if isinstance(init, Initializer):
        return init
    if isinstance(init, str):
        key = init.lower().replace("_", "")
        if key not in _BY_NAME:
            raise ValueError(f"initializer: expected one of {sorted(_BY_NAME)}, got {init!r}")
        return _BY_NAME[key]()
    if isinstance(init, (int, float)) and not isinstance(init, bool):
        return Constant(float(init))
    raise TypeError(f"initializer: expected an Initializer, a name or a number, got {type(init).__name__}")

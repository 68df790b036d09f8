"""TensorSpec: the shape and dtype of a value, without data -- what tracing runs on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class HasSpec:
    """Shape and dtype read through a ``spec`` attribute (a graph value, a traced tensor)."""

    __slots__ = ()
    spec: TensorSpec

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def dtype(self) -> np.dtype:
        return self.spec.dtype


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a value, no data."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def __str__(self) -> str:
        return f"{np.dtype(self.dtype).name}{list(self.shape)}"


def spec_of(x) -> TensorSpec:
    return TensorSpec(tuple(int(d) for d in np.shape(x)), np.asarray(x).dtype)

"""The abstract tensor seen inside ``construct``: shape and dtype, no data.

Python operators and a few MindSpore-style methods record ops. Anything that needs a value
(``if x > 0:``, ``float(x)``, ``np.asarray(x)``) is an error at trace time: the graph must
not depend on data.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..ir.spec import HasSpec, TensorSpec


class TensorOps:
    """Operator overloads shared by traced tensors and parameters."""

    __array_priority__ = 100  # numpy defers to our operators: ndarray + Tensor -> Tensor

    def __add__(self, other):
        return ops.Add()(self, other)

    def __radd__(self, other):
        return ops.Add()(other, self)

    def __sub__(self, other):
        return ops.Sub()(self, other)

    def __rsub__(self, other):
        return ops.Sub()(other, self)

    def __mul__(self, other):
        return ops.Mul()(self, other)

    def __rmul__(self, other):
        return ops.Mul()(other, self)

    def __truediv__(self, other):
        return ops.RealDiv()(self, other)

    def __rtruediv__(self, other):
        return ops.RealDiv()(other, self)

    def __neg__(self):
        return ops.Neg()(self)

    def __pow__(self, other):
        return ops.Pow()(self, other)

    def __matmul__(self, other):
        ndim = len(self.shape)
        op = ops.MatMul() if ndim == 2 else ops.BatchMatMul()
        return op(self, other)


    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return ops.Reshape()(self, tuple(shape))

    def transpose(self, *perm):
        perm = perm[0] if len(perm) == 1 and isinstance(perm[0], (tuple, list)) else perm
        return ops.Transpose()(self, tuple(perm) if perm else tuple(reversed(range(len(self.shape)))))

    def astype(self, dtype):
        return ops.Cast()(self, np.dtype(dtype))

    def sum(self, axis=(), keepdims=False):
        return ops.ReduceSum(keep_dims=keepdims)(self, axis)

    def mean(self, axis=(), keepdims=False):
        return ops.ReduceMean(keep_dims=keepdims)(self, axis)

    def max(self, axis=(), keepdims=False):
        return ops.ReduceMax(keep_dims=keepdims)(self, axis)

    def min(self, axis=(), keepdims=False):
        return ops.ReduceMin(keep_dims=keepdims)(self, axis)

    def __getitem__(self, index):
        return ops.getitem(self, index)


class Weight(TensorOps):
    """What the tracer lifts into the graph as a parameter: an array with a ``shape``, a
    ``dtype`` and a ``name`` that the graph does not compute (``nn.Parameter`` is the one
    implementation). Defined here, below nn, so the runtime never asks nn what it is."""

    __slots__ = ()


class Tensor(TensorOps, HasSpec):
    """A value of the graph being traced."""

    __slots__ = ("vid", "spec", "tracer")

    def __init__(self, vid: int, spec: TensorSpec, tracer):
        self.vid, self.spec, self.tracer = vid, spec, tracer

    @property
    def ndim(self) -> int:
        return len(self.spec.shape)

    @property
    def size(self) -> int:
        return self.spec.size

    def __repr__(self) -> str:
        return f"Tensor(v{self.vid}: {self.spec})"

    def __eq__(self, other):  # elementwise, as in numpy and MindSpore
        return ops.Equal()(self, other)

    def __ne__(self, other):
        return ops.NotEqual()(self, other)

    def __lt__(self, other):
        return ops.Less()(self, other)

    def __gt__(self, other):
        return ops.Greater()(self, other)

    __hash__ = object.__hash__

    def _no_value(self, what: str):
        raise TypeError(
            f"{what} of a traced Tensor {self.spec}: the value is not known while tracing; "
            "control flow may depend on shapes only. Use ops.Select for data-dependent choices")

    def __bool__(self):
        self._no_value("truth value")

    def __float__(self):
        self._no_value("float()")

    def __int__(self):
        self._no_value("int()")

    def __index__(self):
        self._no_value("use as an index")

    def __array__(self, dtype=None, copy=None):
        self._no_value("conversion to a numpy array")

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d Tensor")
        return self.shape[0]

    def __iter__(self):
        raise TypeError(f"iteration over a traced Tensor {self.spec}; slice it or use ops.Split")

"""autopar.ops: the primitives. Importing this package registers every op kind.

    from autopar import ops
    y = ops.MatMul(transpose_b=True).shard(((dp, 1), (mp, 1)))(x, w)

Families (one module each): elementwise (one broadcasting rule), contraction (einsum-style),
reduction, movement (reshape/transpose/slice/concat), nn_ops (the composites PanGu-α needs).
"""
from .primitive import Primitive, TensorSpec
from .registry import all_ops, lookup, register
from .elementwise import (Add, AddN, Cast, Equal, Exp, FastGeLU, GeLU, Greater, Less, Log, LogicalAnd,
                          Maximum, Mul, Neg, NotEqual, Pow, RealDiv, ReLU, Rsqrt, Select, Sigmoid, SiLU,
                          Sqrt, Square, Sub, Tanh)
from .contraction import BatchMatMul, MatMul
from .reduction import ArgMax, Cumsum, ReduceMax, ReduceMean, ReduceMin, ReduceSum
from .movement import (BroadcastTo, Concat, ExpandDims, Reshape, Slice, Squeeze, StridedSlice, Tile,
                       Transpose, getitem)
from .nn_ops import (Dropout, Gather, LayerNorm, LogSoftmax, OneHot, RMSNorm, Softmax,
                     SoftmaxCrossEntropyWithLogits, SparseSoftmaxCrossEntropyWithLogits)

__all__ = [name for name in dir() if not name.startswith("_")]

"""autopar.ops: the primitives. Importing this package registers every op kind.

    from autopar import ops
    y = ops.MatMul(transpose_b=True).shard(((dp, 1), (mp, 1)))(x, w)

Families (one module each): elementwise (one broadcasting rule), contraction (einsum-style),
reduction, movement (reshape/transpose/slice/concat); the composites PanGu-α needs: softmax
(with the cross-entropies), normalization, embedding, dropout.
"""
from ..ir.spec import TensorSpec
from .activation import FastGeLU, GeLU, ReLU, Sigmoid, SiLU
from .contraction import BatchMatMul, MatMul
from .dropout import Dropout
from .elementwise import (
                          Add,
                          AddN,
                          Cast,
                          Equal,
                          Exp,
                          Greater,
                          Less,
                          Log,
                          LogicalAnd,
                          Maximum,
                          Mul,
                          Neg,
                          NotEqual,
                          Pow,
                          RealDiv,
                          Rsqrt,
                          Select,
                          Sqrt,
                          Square,
                          Sub,
                          Tanh,
)
from .embedding import Gather, OneHot
from .movement import BroadcastTo, ExpandDims, Reshape, Squeeze, Tile, Transpose
from .normalization import LayerNorm, RMSNorm
from .primitive import Primitive
from .reduction import ArgMax, Cumsum, ReduceMax, ReduceMean, ReduceMin, ReduceSum
from .registry import all_ops, lookup, register
from .slicing import Concat, Slice, StridedSlice, getitem
from .softmax import LogSoftmax, Softmax, SoftmaxCrossEntropyWithLogits, SparseSoftmaxCrossEntropyWithLogits

__all__ = [name for name in dir() if not name.startswith("_")]

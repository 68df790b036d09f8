"""Basic layers with MindSpore's names, parameters and defaults.

Each layer keeps its primitives as attributes (``dense.matmul``, ``dense.bias_add``) so a
user shards them in place: ``dense.matmul.shard(((dp, 1), (mp, 1)))``.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..dtype import as_dtype
from ..errors import OpArgError
from .cell import Cell
from .initializer import Normal, One, Zero
from .parameter import Parameter


def as_compute(value, dtype):
    """``value`` in ``dtype``: a Cast node when the dtypes differ, the value itself otherwise
    (so a float32 model's graph has no cast at all). Parameters stay float32 (master weights);
    the cast's gradient comes back to them in float32."""
    return value if dtype is None or value.dtype == dtype else value.astype(dtype)


def loss_precision(logits):
    """Logits in at least float32, for the cross-entropy: a float16 or bfloat16 model's loss
    is computed and returned in float32, as MindSpore's losses cast their logits (float32 and
    float64 logits pass through with no cast)."""
    return as_compute(logits, np.promote_types(logits.dtype, np.float32))


class Dense(Cell):
    """y = x @ W^T + b with W stored (out, in), as MindSpore's nn.Dense.

    ``compute_dtype`` (MindSpore's ``to_float``, O2): x, W and b are cast to it (e.g.
    float16) and the matmul and bias add run in it; the result is cast back to the input's
    dtype, so a model whose activations already flow in the compute dtype (PanGu-α, Yuan
    under mixed precision) casts only the weights.
    """

    def __init__(self, in_channels: int, out_channels: int, weight_init="normal", bias_init="zeros",
                 has_bias: bool = True, activation=None, param_dtype="float32", compute_dtype=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = Parameter(weight_init, (out_channels, in_channels), param_dtype, name="weight")
        self.has_bias = has_bias
        if has_bias:
            self.bias = Parameter(bias_init, (out_channels,), param_dtype, name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()
        self.activation = activation
        self.compute_dtype = None if compute_dtype is None else as_dtype(compute_dtype)

    def construct(self, x):
        if x.shape[-1] != self.in_channels:
            raise OpArgError("input shape", f"last dim {self.in_channels} (in_channels)", str(x.shape),
                             "pass features in the last dim")
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_channels) if x.ndim != 2 else x  # (..., in) -> (N, in)
        cdt = self.compute_dtype
        h, w = as_compute(h, cdt), as_compute(self.weight, cdt)
        y = self.matmul(h, w)                                        # (N, in) @ (out, in)^T -> (N, out)
        if self.has_bias:
            y = self.bias_add(y, as_compute(self.bias, y.dtype))
        y = as_compute(y, x.dtype)
        if self.activation is not None:
            y = self.activation(y)
        return y.reshape(lead + (self.out_channels,)) if x.ndim != 2 else y  # (N, out) -> (..., out)


class LayerNorm(Cell):
    """LayerNorm over the last axis; parameters ``gamma`` (ones) and ``beta`` (zeros)."""

    def __init__(self, normalized_shape, epsilon: float = 1e-5, param_dtype="float32"):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.gamma = Parameter(One(), shape, param_dtype, name="gamma")
        self.beta = Parameter(Zero(), shape, param_dtype, name="beta")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=epsilon)

    def construct(self, x):
        return self.layer_norm(x, self.gamma, self.beta)


class RMSNorm(Cell):
    def __init__(self, hidden_size: int, epsilon: float = 1e-6, param_dtype="float32"):
        super().__init__()
        self.weight = Parameter(One(), (hidden_size,), param_dtype, name="weight")
        self.rms_norm = ops.RMSNorm(epsilon=epsilon)

    def construct(self, x):
        return self.rms_norm(x, self.weight)


class Embedding(Cell):
    """Lookup table ``embedding_table`` (vocab_size, embedding_size). ``compute_dtype``: the
    looked-up rows are cast to it (the table stays in ``param_dtype``, its gradient too), so
    the activations start in the compute dtype."""

    def __init__(self, vocab_size: int, embedding_size: int, embedding_table=None, param_dtype="float32",
                 compute_dtype=None):
        super().__init__()
        self.vocab_size, self.embedding_size = int(vocab_size), int(embedding_size)
        init = Normal(0.01) if embedding_table is None else embedding_table
        self.embedding_table = Parameter(init, (vocab_size, embedding_size), param_dtype, name="embedding_table")
        self.gather = ops.Gather()
        self.compute_dtype = None if compute_dtype is None else as_dtype(compute_dtype)

    def construct(self, ids):
        return as_compute(self.gather(self.embedding_table, ids, 0), self.compute_dtype)  # (B, S) -> (B, S, E)


class Dropout(Cell):
    """Drops with probability 1 - keep_prob in training mode; identity otherwise."""

    def __init__(self, keep_prob: float = 0.9):
        super().__init__()
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"Dropout: keep_prob: expected a value in (0, 1], got {keep_prob}")
        self.keep_prob = float(keep_prob)
        self.dropout = ops.Dropout(keep_prob=self.keep_prob)

    def construct(self, x):
        if not self.training or self.keep_prob == 1.0:
            return x
        return self.dropout(x)


class GELU(Cell):
    def __init__(self, approximate: bool = True):
        super().__init__()
        self.gelu = ops.GeLU(approximate=approximate)

    def construct(self, x):
        return self.gelu(x)


def causal_mask(seq_length: int) -> np.ndarray:
    """(S, S) bool, True where query i may attend to key j (j <= i)."""
    return np.tril(np.ones((seq_length, seq_length), dtype=bool))

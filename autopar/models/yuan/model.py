"""Yuan 2.0 as serial Cells, following REFERENCE.md ("Yuan 2.0").

Dimension names: B batch, S sequence, H hidden, N heads, D = H / N, F FFN hidden, V vocab.

    input_ids (B, S) -> word embedding (B, S, H)
    -> blocks: x = x + Attn(RMSNorm1(x)); x = x + SwiGLU(RMSNorm2(x))      (num_layers blocks)
    -> final RMSNorm -> logits = hidden @ word_embedding^T (tied head)      (B, S, V)

Attention is LFA: Q and K come from ``RMSNorm(conv2(conv1(h)) + h)``, where conv1 (H -> H/2)
and conv2 (H/2 -> H) are causal kernel-2 convolutions along S; V comes from ``h`` itself.
Q and K get rotary position embeddings; the mask is causal.

Mixed precision (``config.compute_dtype`` float16 or bfloat16) as in PanGu-α: float32
parameters cast at use, activations in the compute dtype from the embedding on, RMSNorm and
softmax statistics in float32 inside their kernels, float32 logits into the loss.
"""
from __future__ import annotations

import math

import numpy as np

from ... import ops
from ...errors import OpArgError, format_error
from ...nn import (
    Cell,
    CellList,
    Dense,
    Embedding,
    Normal,
    RMSNorm,
    causal_mask,
    set_pipeline_stages,
)
from ...nn.layers import as_compute, loss_precision
from ...nn.lm_loss import NextTokenLoss
from ..megatron import attention_core, batch_only, column_parallel, row_parallel
from .config import RECOMPUTE_GRANULARITIES, YuanConfig

MASK_VALUE = -10000.0  # added to masked attention scores


def _dense(config: YuanConfig, n_in: int, n_out: int, std: float) -> Dense:
    return Dense(n_in, n_out, weight_init=Normal(std), has_bias=False, param_dtype=config.param_dtype,
                 compute_dtype=config.compute_dtype)


def shift_right(x):
    """x_{t-1} along S with a zero row at t = 0: (B, S, C) -> (B, S, C).

    The zero row is ``x[:, :1] * 0`` so that it is laid out like x (S must not be split)."""
    zeros = x[:, :1] * 0.0                                          # (B, 1, C)
    return ops.Concat(axis=1)((zeros, x[:, :-1]))                   # (B, 1, C) + (B, S-1, C)


class CausalConv(Cell):
    """Kernel-2 causal convolution along S: ``y_t = x_t @ W1 + x_{t-1} @ W0``, no bias.

    ``current`` holds W1 (out, in) and ``previous`` W0 (out, in); both run as matmuls."""

    def __init__(self, config: YuanConfig, n_in: int, n_out: int):
        super().__init__()
        std = config.init_std
        self.current = _dense(config, n_in, n_out, std)
        self.previous = _dense(config, n_in, n_out, std)
        for d in (self.current, self.previous):
            batch_only(d, config.data_parallel)

    def construct(self, x):
        return self.current(x) + self.previous(shift_right(x))       # (B, S, in) -> (B, S, out)


class LocalizedFiltering(Cell):
    """LFA's filter: ``RMSNorm(conv2(conv1(x)) + x)``, H -> H/2 -> H, no activation between."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        h = config.hidden_size
        self.conv1 = CausalConv(config, h, h // 2)
        self.conv2 = CausalConv(config, h // 2, h)
        self.norm = RMSNorm(h, config.rms_eps, config.param_dtype)
        self.norm.rms_norm.shard(((config.data_parallel, 1, 1), (1,)))

    def construct(self, x):
        return self.norm(self.conv2(self.conv1(x)) + x)               # (B, S, H)


def rotary_tables(seq_length: int, head_dim: int, base: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (1, 1, S, D) each, for rotate-half rotary embeddings (pairs i, i + D/2)."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)    # (D/2,)
    angles = np.outer(np.arange(seq_length, dtype=np.float64), inv_freq)            # (S, D/2)
    angles = np.concatenate([angles, angles], axis=-1)[None, None]                  # (1, 1, S, D)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rotary(x, cos, sin):
    """x (B, N, S, D) -> x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = ops.Concat(axis=-1)((-x[..., half:], x[..., :half]))  # (B, N, S, D)
    return x * cos + rotated * sin


class Attention(Cell):
    """LFA attention: Q, K from the filtered input, V from the input, rotary on Q and K."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        h, std = config.hidden_size, config.init_std
        self.n_heads, self.head_dim = config.num_heads, config.head_dim
        self.lfa = LocalizedFiltering(config)
        self.query = _dense(config, h, h, std)
        self.key = _dense(config, h, h, std)
        self.value = _dense(config, h, h, std)
        self.projection = _dense(config, h, h, std / math.sqrt(2.0 * config.num_layers))
        self.scores = ops.BatchMatMul()
        self.mask_add = ops.Add()
        self.context = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        dp, mp = config.data_parallel, config.model_parallel
        for d in (self.query, self.key, self.value):
            column_parallel(d, dp, mp)
        row_parallel(self.projection, dp, mp)
        attention_core(self.scores, self.softmax, self.context, dp, mp)

    def _heads(self, x):
        b, s, _ = x.shape
        return x.reshape(b, s, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, S, H) -> (B, N, S, D)

    def recompute_core(self, mode: bool = True) -> "Attention":
        """Megatron's selective recompute: scores ``q k^T``, the mask add, softmax and
        ``probs v`` are rebuilt for backward instead of keeping their (B, N, S, S)
        tensors (per-op ``recompute()``); ``mode=False`` unmarks them."""
        for op in (self.scores, self.mask_add, self.softmax, self.context):
            op.recompute(mode)
        return self

    def construct(self, x, mask_add, cos, sin):
        b, s, h = x.shape
        filtered = self.lfa(x)                                         # (B, S, H)
        q = apply_rotary(self._heads(self.query(filtered)), cos, sin)  # (B, N, S, D)
        k = apply_rotary(self._heads(self.key(filtered)), cos, sin)    # (B, N, S, D)
        v = self._heads(self.value(x))                                 # (B, N, S, D), unfiltered
        k = k.transpose(0, 1, 3, 2)                                    # (B, N, D, S)
        scores = self.mask_add(self.scores(q * self.scale, k), mask_add)  # (B, N, S, S)
        ctx = self.context(self.softmax(scores), v)                    # (B, N, S, D)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, h)               # (B, S, N, D) -> (B, S, H)
        return self.projection(ctx)


class FeedForward(Cell):
    """SwiGLU: down(SiLU(gate(x)) * up(x)), no biases."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        h, f, std = config.hidden_size, config.ffn_hidden_size, config.init_std
        self.gate = _dense(config, h, f, std)                          # (B, S, H) -> (B, S, F)
        self.up = _dense(config, h, f, std)                            # (B, S, H) -> (B, S, F)
        self.down = _dense(config, f, h, std / math.sqrt(2.0 * config.num_layers))  # (B, S, F) -> (B, S, H)
        self.silu = ops.SiLU()
        self.mul = ops.Mul()
        dp, mp = config.data_parallel, config.model_parallel
        column_parallel(self.gate, dp, mp)
        column_parallel(self.up, dp, mp)
        self.silu.shard(((dp, 1, mp),))
        self.mul.shard(((dp, 1, mp), (dp, 1, mp)))
        row_parallel(self.down, dp, mp)

    def construct(self, x):
        return self.down(self.mul(self.silu(self.gate(x)), self.up(x)))


class Block(Cell):
    """Pre-norm decoder block: x + Attn(RMSNorm1(x)), then x + FFN(RMSNorm2(x))."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        h, eps, dt, dp = config.hidden_size, config.rms_eps, config.param_dtype, config.data_parallel
        self.norm1 = RMSNorm(h, eps, dt)
        self.attention = Attention(config)
        self.norm2 = RMSNorm(h, eps, dt)
        self.ffn = FeedForward(config)
        for n in (self.norm1, self.norm2):
            n.rms_norm.shard(((dp, 1, 1), (1,)))

    def construct(self, x, mask_add, cos, sin):
        x = x + self.attention(self.norm1(x), mask_add, cos, sin)
        return x + self.ffn(self.norm2(x))


class Yuan(Cell):
    """``Yuan(config)(input_ids (B, S))`` -> logits (B, S, V); causal, rotary positions 0..S-1.

    With ``config.layers_per_stage`` the blocks carry their ``pipeline_stage`` (block i on the
    stage whose count covers it); the embedding follows its readers onto stage 0, the final
    norm, the tied head and the loss follow the data onto the last stage. Train it under
    ``pipeline_stages = len(layers_per_stage)`` with ``nn.PipelineCell``; serially the
    stages are ignored."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.config = config
        h, dt = config.hidden_size, config.param_dtype
        self.word_embedding = Embedding(config.vocab_size, h, Normal(config.init_std), dt, config.compute_dtype)
        self.blocks = CellList([Block(config) for _ in range(config.num_layers)])
        if config.layers_per_stage is not None:   # Yuan 2.0's non-uniform split, e.g. (2, 2, 3, 3, ...)
            set_pipeline_stages(list(self.blocks), config.layers_per_stage)
        self.final_norm = RMSNorm(h, config.rms_eps, dt)
        self.head = ops.MatMul(transpose_b=True)
        dp, mp = config.data_parallel, config.model_parallel
        self.word_embedding.gather.shard(((1, 1), (dp, 1)))          # table replicated
        self.final_norm.rms_norm.shard(((dp, 1, 1), (1,)))
        self.head.shard(((dp, 1), (mp, 1)))  # logits (B*S, V/mp): vocabulary-parallel cross-entropy
        if config.recompute_granularity is not None:
            self.recompute_layers(config.recompute_granularity)

    def recompute_layers(self, granularity: str = "full") -> "Yuan":
        """Megatron's ``--recompute-granularity`` on every block: ``"full"`` (whole blocks,
        ``Cell.recompute()``) or ``"selective"`` (the attention core only,
        :meth:`Attention.recompute_core`)."""
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(format_error("Yuan.recompute_layers", "granularity", f"one of {RECOMPUTE_GRANULARITIES}",
                                          repr(granularity), "use 'full' (whole blocks) or 'selective' (the core)"))
        for block in self.blocks:
            if granularity == "full":
                block.recompute()
            else:
                block.attention.recompute_core()
        return self

    def _check_ids(self, input_ids):
        s = self.config.seq_length
        if input_ids.ndim != 2 or input_ids.shape[1] > s:
            raise OpArgError("input_ids shape", f"(batch, seq) with seq <= seq_length={s}", str(input_ids.shape),
                             "YuanWithLoss takes (batch, seq_length + 1) and shifts by one", where="Yuan")
        if input_ids.dtype.kind not in "iu":
            raise OpArgError("input_ids dtype", "an integer dtype", input_ids.dtype.name, where="Yuan")

    def construct(self, input_ids):
        self._check_ids(input_ids)
        b, s = input_ids.shape
        cdt = np.dtype(self.config.compute_dtype)
        mask_add = np.where(causal_mask(s), 0.0, MASK_VALUE).astype(cdt)[None, None]  # (1, 1, S, S)
        cos, sin = rotary_tables(s, self.config.head_dim, self.config.rotary_base, cdt)  # (1, 1, S, D)
        x = self.word_embedding(input_ids)                                 # (B, S) -> (B, S, H)
        for block in self.blocks:
            x = block(x, mask_add, cos, sin)
        x = self.final_norm(x)
        table = as_compute(self.word_embedding.embedding_table, cdt)       # (V, H)
        logits = self.head(x.reshape(b * s, -1), table)                    # (B*S, H) @ (V, H)^T
        return loss_precision(logits.reshape(b, s, -1))                    # (B, S, V)


class YuanWithLoss(NextTokenLoss):
    """Masked next-token cross-entropy of Yuan 2.0. ``input_ids`` is (B, seq_length + 1)."""

    def __init__(self, config: YuanConfig):
        super().__init__(Yuan(config), config.pad_id)
        self.config = config

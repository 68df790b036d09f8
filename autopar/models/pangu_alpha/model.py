"""PanGu-α as serial Cells, following REFERENCE.md.

Dimension names: B batch, S sequence, H hidden, N heads, D = H / N, F FFN hidden, V vocab.

    input_ids (B, S) -> word + position embedding (B, S, H) -> dropout
    -> blocks: x = x + Attn(LN1(x)); x = x + FFN(LN2(x))                 (num_layers - 1 blocks)
    -> final LN and the query layer, in ``config.layer_order``
    -> logits = hidden @ word_embedding^T (tied head)                      (B, S, V)

The query layer's attention query comes from ``top_query_embedding[position_ids]`` (not
layer-normed); keys and values from LN1(x); its residual adds to the un-normed x.

Sequence parallel (``config.sequence_parallel`` with ``model_parallel`` > 1, Megatron's
``--sequence-parallel``): between the model-parallel matmuls, the LayerNorms, dropouts and
residual adds are ``.shard()``ed ``(dp, mp, 1)``, (B, S, H) -> local (B/dp, S/mp, H). Nothing
else is special: the column-parallel Dense's reshape cannot split S, so its input is
all-gathered along S; the row-parallel projections (:class:`SequenceDense`) take an
``out_strategy`` that reduce-scatters their partial sums along S instead of all-reducing
them; the backward pass gets the conjugates (reduce-scatter, all-gather). Same bytes moved
as the all-reduces, activations of those ops divided by mp. The column-parallel matmuls
keep their all-gathered inputs for backward unless ``config.sequence_parallel_regather``:
then their input is folded to (B*S, H) by a Reshape marked ``recompute()``, so the
all-gather feeding it runs again before the matmuls' backward and only the shard is kept.

Mixed precision (``config.compute_dtype`` float16 or bfloat16, MindSpore's O2): the
parameters stay in ``param_dtype`` (float32 master weights) and are cast at use; the
looked-up embeddings start the activations in the compute dtype and every op after them
(matmuls, attention, GeLU, dropout, residual adds) runs in it. LayerNorm and softmax keep
their statistics in float32 inside their kernels, and the logits are cast to float32 for
the cross-entropy, so the loss is float32.
"""
from __future__ import annotations

import math

import numpy as np

from ... import ops
from ...errors import OpArgError, format_error
from ...nn import Cell, CellList, Dense, Dropout, Embedding, LayerNorm, Normal, TruncatedNormal, causal_mask
from ...nn.layers import as_compute, loss_precision
from ...nn.lm_loss import NextTokenLoss
from ..megatron import attention_core, column_parallel, row_parallel
from .config import RECOMPUTE_GRANULARITIES, PanguAlphaConfig

MASK_VALUE = -10000.0  # added to masked attention scores, as PanGu-α does


def sequence_parallel(config: PanguAlphaConfig) -> bool:
    """Whether the blocks run Megatron's sequence parallel: asked for, and mp > 1."""
    return config.sequence_parallel and config.model_parallel > 1


def token_strategy(config: PanguAlphaConfig) -> tuple[int, int, int]:
    """The (B, S, H) split of the LayerNorms, dropouts and residual adds: the sequence over
    mp under sequence parallel, else the batch alone (repeated over mp)."""
    mp = config.model_parallel if sequence_parallel(config) else 1
    return (config.data_parallel, mp, 1)


class SequenceDense(Dense):
    """``Dense`` kept on (B, S, in): a BatchMatMul broadcasting the (out, in) weight over the
    batch, then the bias add, on (B, S, out). ``Dense`` folds (B, S) into rows, and a split of
    those rows over dp x mp is a split of S only when B/dp = 1; here S stays a dim of its own,
    so the row-parallel matmul's ``out_strategy`` can reduce-scatter its partial sums along
    S (:func:`sequence_row_parallel`). Same parameters, names and initialisation as ``Dense``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        cdt = self.compute_dtype
        h, w = as_compute(x, cdt), as_compute(self.weight, cdt)
        y = self.matmul(h, w)                               # (B, S, in) @ (out, in)^T -> (B, S, out)
        if self.has_bias:
            y = self.bias_add(y, as_compute(self.bias, y.dtype))
        return as_compute(y, x.dtype)


def sequence_row_parallel(dense: SequenceDense, dp: int, mp: int) -> None:
    """Row-parallel under sequence parallel: (B, S, in/mp) @ (out, in/mp)^T gives partial
    sums over mp, reduce-scattered along S (forward: reduce-scatter / backward: all-gather),
    (B, S, out) -> local (B/dp, S/mp, out); the bias added on those shards."""
    dense.matmul.shard(((dp, 1, mp), (1, mp)), out_strategy=((dp, mp, 1),))
    if dense.has_bias:
        dense.bias_add.shard(((dp, mp, 1), (1,)))


def row_fold(config: PanguAlphaConfig):
    """Under ``sequence_parallel_regather``, the (B, S, H) -> (B*S, H) Reshape of a
    column-parallel input, marked recompute: the all-gather lowering inserts before it takes
    its mark (``recompute_regions.resolve_marks``), so both run again before the matmuls'
    backward instead of the gathered rows being kept. None otherwise."""
    if not (config.sequence_parallel_regather and sequence_parallel(config)):
        return None
    return ops.Reshape().recompute()


def output_projection(config: PanguAlphaConfig, in_channels: int, std: float) -> Dense:
    """The row-parallel Dense closing attention or the FFN, sharded for ``config``."""
    dense = dict(weight_init=Normal(std), param_dtype=config.param_dtype, compute_dtype=config.compute_dtype)
    dp, mp = config.data_parallel, config.model_parallel
    if sequence_parallel(config):
        proj = SequenceDense(in_channels, config.hidden_size, **dense)
        sequence_row_parallel(proj, dp, mp)
    else:
        proj = Dense(in_channels, config.hidden_size, **dense)
        row_parallel(proj, dp, mp)
    return proj


class Attention(Cell):
    """Multi-head attention with separate Q, K, V dense layers (weights stored (out, in))."""

    def __init__(self, config: PanguAlphaConfig):
        super().__init__()
        h, std = config.hidden_size, config.init_std
        out_std = std / math.sqrt(2.0 * config.num_layers)
        dense = dict(param_dtype=config.param_dtype, compute_dtype=config.compute_dtype)
        self.n_heads, self.head_dim = config.num_heads, config.head_dim
        self.dense1 = Dense(h, h, weight_init=Normal(std), **dense)     # query
        self.dense2 = Dense(h, h, weight_init=Normal(std), **dense)     # key
        self.dense3 = Dense(h, h, weight_init=Normal(std), **dense)     # value
        self.projection = output_projection(config, h, out_std)
        self.scores = ops.BatchMatMul()
        self.mask_add = ops.Add()
        self.context = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)
        self.prob_dropout = Dropout(1.0 - config.dropout_rate)
        self.dropout = Dropout(1.0 - config.dropout_rate)
        self.fold = row_fold(config)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        dp, mp = config.data_parallel, config.model_parallel
        for d in (self.dense1, self.dense2, self.dense3):
            column_parallel(d, dp, mp)
        attention_core(self.scores, self.softmax, self.context, dp, mp)
        if sequence_parallel(config):   # otherwise it follows its input
            self.dropout.dropout.shard((token_strategy(config),))

    def _heads(self, x, b, s):
        return x.reshape(b, s, self.n_heads, self.head_dim)            # (B, S, H) or (B*S, H) -> (B, S, N, D)

    def recompute_core(self, mode: bool = True) -> "Attention":
        """Megatron's selective recompute: the attention core -- scores ``q k^T``, the mask add,
        softmax, the dropout on the probabilities, ``probs v`` -- is rebuilt for backward
        instead of keeping its (B, N, S, S) tensors; Q, K, V and the context stay saved
        (MindSpore's per-op ``recompute()`` on these five ops). ``mode=False`` unmarks them."""
        for op in (self.scores, self.mask_add, self.softmax, self.prob_dropout.dropout, self.context):
            op.recompute(mode)
        return self

    def construct(self, x_query, x_kv, mask_add, cache=None):
        """Full sequence; or, with ``cache = (k, v, at)``, one new token per row (S = 1): its
        key and value go into the (B, N, S_max, D) caches at the slots ``at`` marks
        ((B, 1, S_max, 1) bool) and the updated caches are returned with the output
        (MindSpore's ``use_past``)."""
        b, s, h = x_query.shape
        if self.fold is not None:   # one re-gathered (B*S, H) for K, V (and Q when it is the same input)
            same = x_query is x_kv
            x_kv = self.fold(x_kv, (b * s, h))
            x_query = x_kv if same else x_query
        q = self._heads(self.dense1(x_query), b, s).transpose(0, 2, 1, 3)   # (B, N, S, D)
        k = self._heads(self.dense2(x_kv), b, s).transpose(0, 2, 1, 3)      # (B, N, S, D)
        v = self._heads(self.dense3(x_kv), b, s).transpose(0, 2, 1, 3)      # (B, N, S, D)
        if cache is not None:
            k_cache, v_cache, at = cache
            k = ops.Select()(at, k, k_cache)                           # (B, N, 1, D) into (B, N, S_max, D)
            v = ops.Select()(at, v, v_cache)
            cache = (k, v)
        scores = self.mask_add(self.scores(q * self.scale, k.transpose(0, 1, 3, 2)), mask_add)  # (B, N, S, S_kv)
        probs = self.prob_dropout(self.softmax(scores))
        ctx = self.context(probs, v)                                   # (B, N, S, D)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, h)               # (B, S, N, D) -> (B, S, H)
        out = self.dropout(self.projection(ctx))
        return out if cache is None else (out, cache)


class FeedForward(Cell):
    def __init__(self, config: PanguAlphaConfig):
        super().__init__()
        h, f, std = config.hidden_size, config.ffn_hidden_size, config.init_std
        dense = dict(param_dtype=config.param_dtype, compute_dtype=config.compute_dtype)
        self.mapping = Dense(h, f, weight_init=Normal(std), **dense)                     # (B, S, H) -> (B, S, F)
        self.gelu = ops.GeLU(approximate=True)
        out_std = std / math.sqrt(2.0 * config.num_layers)
        self.projection = output_projection(config, f, out_std)                           # (B, S, F) -> (B, S, H)
        self.dropout = Dropout(1.0 - config.dropout_rate)
        self.fold = row_fold(config)
        dp, mp = config.data_parallel, config.model_parallel
        column_parallel(self.mapping, dp, mp)
        self.gelu.shard(((dp, 1, mp),))
        if sequence_parallel(config):   # otherwise it follows its input
            self.dropout.dropout.shard((token_strategy(config),))

    def construct(self, x):
        if self.fold is None:
            return self.dropout(self.projection(self.gelu(self.mapping(x))))
        b, s, h = x.shape                                     # the input re-gathered in backward:
        rows = self.mapping(self.fold(x, (b * s, h)))         # (B, S, H) -> (B*S, H) -> (B*S, F)
        return self.dropout(self.projection(self.gelu(rows.reshape(b, s, -1))))   # (B*S, F) -> (B, S, F)


class Block(Cell):
    """Pre-LN decoder block: x + Attn(LN1(x)), then x + FFN(LN2(x))."""

    def __init__(self, config: PanguAlphaConfig):
        super().__init__()
        eps, dt = config.layernorm_epsilon, config.param_dtype
        self.layernorm1 = LayerNorm(config.hidden_size, eps, dt)
        self.attention = Attention(config)
        self.layernorm2 = LayerNorm(config.hidden_size, eps, dt)
        self.output = FeedForward(config)
        self.residual1, self.residual2 = ops.Add(), ops.Add()
        tokens = token_strategy(config)
        for ln in (self.layernorm1, self.layernorm2):
            ln.layer_norm.shard((tokens, (1,), (1,)))
        if sequence_parallel(config):   # otherwise they follow their inputs, as `x + a` does
            for add in (self.residual1, self.residual2):
                add.shard((tokens, tokens))

    def construct(self, x, mask_add, cache=None):
        h = self.layernorm1(x)
        a = self.attention(h, h, mask_add, cache)
        a, cache = a if cache is not None else (a, None)
        x = self.residual1(x, a)
        x = self.residual2(x, self.output(self.layernorm2(x)))
        return x if cache is None else (x, cache)


class QueryLayer(Block):
    """The top layer: the attention query is a learned embedding of the position."""

    def __init__(self, config: PanguAlphaConfig):
        super().__init__(config)
        self.top_query_embedding = Embedding(config.seq_length, config.hidden_size,
                                             TruncatedNormal(config.init_std), config.param_dtype,
                                             config.compute_dtype)

    def construct(self, x, mask_add, position_ids, cache=None):
        query = self.top_query_embedding(position_ids)                # (B, S) -> (B, S, H)
        a = self.attention(query, self.layernorm1(x), mask_add, cache)
        a, cache = a if cache is not None else (a, None)
        x = self.residual1(x, a)
        x = self.residual2(x, self.output(self.layernorm2(x)))
        return x if cache is None else (x, cache)


class PanguAlpha(Cell):
    """``PanguAlpha(config)(input_ids, position_ids=None, attention_mask=None)`` -> logits (B, S, V).

    Without ``position_ids``/``attention_mask`` they are computed in the graph from
    ``input_ids``: causal, and with ``config.eod_reset`` restarted at each EOD token (the
    EOD belongs to the document it ends). ``attention_mask`` is (B, S, S), 1 = may attend.
    """

    def __init__(self, config: PanguAlphaConfig):
        super().__init__()
        self.config = config
        h, dt = config.hidden_size, config.param_dtype
        cdt = config.compute_dtype
        self.word_embedding = Embedding(config.vocab_size, h, Normal(config.init_std), dt, cdt)
        self.position_embedding = Embedding(config.seq_length, h, TruncatedNormal(config.init_std), dt, cdt)
        self.embedding_dropout = Dropout(1.0 - config.dropout_rate)
        self.blocks = CellList([Block(config) for _ in range(config.num_blocks)])
        self.final_layernorm = LayerNorm(h, config.layernorm_epsilon, dt)
        self.query_layer = QueryLayer(config)
        self.head = ops.MatMul(transpose_b=True)
        self.fold = row_fold(config)
        dp, mp = config.data_parallel, config.model_parallel
        if config.vocab_emb_dp:
            self.word_embedding.gather.shard(((1, 1), (dp, 1)))
        else:  # vocabulary-split table: masked lookup, partial sums all-reduced over mp
            self.word_embedding.gather.shard(((mp, 1), (dp, 1)))
        tokens = token_strategy(config)
        self.final_layernorm.layer_norm.shard((tokens, (1,), (1,)))
        if sequence_parallel(config):   # the blocks' input on sequence shards: a slice (its
            # gradient all-gathered once, as Megatron's scatter to the sequence-parallel region)
            self.embedding_dropout.dropout.shard((tokens,))
        self.head.shard(((dp, 1), (mp, 1)))  # logits (B*S, V/mp): vocabulary-parallel cross-entropy
        if config.recompute_granularity is not None:
            self.recompute_layers(config.recompute_granularity)

    def layers(self) -> list[Block]:
        """The decoder layers: the blocks, then the query layer."""
        return list(self.blocks) + [self.query_layer]

    def recompute_layers(self, granularity: str = "full") -> "PanguAlpha":
        """Mark every layer for recompute, as Megatron's ``--recompute-granularity``:
        ``"full"`` recomputes whole layers (``Cell.recompute()``: each keeps only its input);
        ``"selective"`` only each layer's attention core (:meth:`Attention.recompute_core`:
        the (B, N, S, S) scores, probabilities and dropout output are rebuilt, everything
        else is kept). The same as ``PanguAlphaConfig(recompute_granularity=...)``."""
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(format_error("PanguAlpha.recompute_layers", "granularity",
                                          f"one of {RECOMPUTE_GRANULARITIES}", repr(granularity),
                                          "use 'full' (whole layers) or 'selective' (the attention core)"))
        for layer in self.layers():
            if granularity == "full":
                layer.recompute()
            else:
                layer.attention.recompute_core()
        return self

    def _check_ids(self, input_ids):
        s = self.config.seq_length
        if input_ids.ndim != 2 or input_ids.shape[1] > s:
            raise OpArgError("input_ids shape", f"(batch, seq) with seq <= seq_length={s}", str(input_ids.shape),
                             "PanguAlphaWithLoss takes (batch, seq_length + 1) and shifts by one",
                             where="PanguAlpha")
        if input_ids.dtype.kind not in "iu":
            raise OpArgError("input_ids dtype", "an integer dtype", input_ids.dtype.name, where="PanguAlpha")

    def masks(self, input_ids):
        """Attention mask (B, S, S) bool and position ids (B, S) computed from the tokens."""
        b, s = input_ids.shape
        causal = causal_mask(s)                                                     # (S, S)
        is_eod = (input_ids == self.config.eod_id).astype(np.int32)                # (B, S)
        doc = ops.Cumsum(exclusive=True)(is_eod, 1)                                 # document index per token
        same_doc = ops.ExpandDims()(doc, 2) == ops.ExpandDims()(doc, 1)             # (B, S, S)
        mask = ops.LogicalAnd()(same_doc, causal)
        position_ids = mask.astype(np.int32).sum(-1) - 1                            # tokens before, same doc
        return mask, position_ids

    def construct(self, input_ids, position_ids=None, attention_mask=None, query_position_ids=None):
        """``query_position_ids`` (B, S): which query-embedding row each position uses (row i:
        "predict the token after position i"); by default the position ids. Random-order
        training (``random_order``) feeds a permutation and asks for the next position in it."""
        self._check_ids(input_ids)
        b, s = input_ids.shape
        cdt = np.dtype(self.config.compute_dtype)
        mask, pos = None, None
        if self.config.eod_reset and (attention_mask is None or position_ids is None):
            mask, pos = self.masks(input_ids)
        if attention_mask is not None:
            mask = attention_mask != 0
        if mask is None:  # plain causal: one constant, broadcast over batch and heads
            mask_add = np.where(causal_mask(s), 0.0, MASK_VALUE).astype(cdt)[None, None]  # (1, 1, S, S)
        else:
            mask_add = ops.Select()(mask, np.zeros((), cdt), np.full((), MASK_VALUE, cdt))  # (B, S, S)
            mask_add = ops.ExpandDims()(mask_add, 1)                                    # (B, 1, S, S)
        if position_ids is None:
            # 0..S-1 per row, computed from the tokens so that it is laid out like them
            position_ids = pos if pos is not None else ops.Cumsum(exclusive=True)(input_ids * 0 + 1, 1)

        x = self.word_embedding(input_ids) + self.position_embedding(position_ids)  # (B, S, H)
        x = self.embedding_dropout(x)
        for block in self.blocks:
            x = block(x, mask_add)
        query_ids = position_ids if query_position_ids is None else query_position_ids
        if self.config.layer_order == "final_ln_then_query":
            x = self.query_layer(self.final_layernorm(x), mask_add, query_ids)
        else:
            x = self.final_layernorm(self.query_layer(x, mask_add, query_ids))
        table = as_compute(self.word_embedding.embedding_table, cdt)                 # (V, H)
        rows = x.reshape(b * s, -1) if self.fold is None else self.fold(x, (b * s, x.shape[-1]))  # (B*S, H)
        logits = self.head(rows, table)                                              # (B*S, H) @ (V, H)^T
        return loss_precision(logits.reshape(b, s, -1))                              # (B, S, V)


class PanguAlphaWithLoss(NextTokenLoss):
    """Masked next-token cross-entropy of PanGu-α. ``input_ids`` is (B, seq_length + 1): the
    model reads ``[:, :-1]`` and predicts ``[:, 1:]``; labels equal to ``pad_id`` carry no loss."""

    def __init__(self, config: PanguAlphaConfig):
        super().__init__(PanguAlpha(config), config.pad_id)
        self.config = config

    def construct(self, input_ids, position_ids=None, attention_mask=None, query_position_ids=None):
        return super().construct(input_ids, position_ids, attention_mask, query_position_ids)


def random_order(input_ids: np.ndarray, rng: np.random.Generator | None = None, order: np.ndarray | None = None):
    """A random-order training sample (the PanGu-α articles' permuted pretraining): each row's
    tokens after the first are fed in a random order with their original position ids, and the
    query layer asks for the position of the token to predict next, so the model learns to
    fill in any order. Returns ``(ids (B, S+1), position_ids (B, S), query_position_ids
    (B, S))`` for ``PanguAlphaWithLoss``. ``order`` (B, S+1), a permutation per row keeping
    position 0 first and position S last (so fed positions fit the S-row position table and
    every target has a query row), may be given instead of ``rng``; the identity is standard
    training."""
    b, n = input_ids.shape                                                    # (B, S+1)
    if order is None:
        rng = rng or np.random.default_rng()
        middle = 1 + np.argsort(rng.random((b, n - 2)), axis=1)              # positions 1..S-1 shuffled
        order = np.concatenate([np.zeros((b, 1), np.int64), middle, np.full((b, 1), n - 1)], axis=1)
    order = np.asarray(order)
    if order.shape != (b, n) or (order[:, 0] != 0).any() or (order[:, -1] != n - 1).any() or \
            (np.sort(order, axis=1) != np.arange(n)).any():
        raise ValueError(f"random_order: order: expected a permutation of 0..{n - 1} per row starting "
                         f"at 0 and ending at {n - 1}, shape {(b, n)}, got shape {order.shape}")
    ids = np.take_along_axis(input_ids, order, axis=1).astype(np.int32)     # fed order
    position_ids = order[:, :-1].astype(np.int32)                            # where each fed token sits
    query_position_ids = (order[:, 1:] - 1).astype(np.int32)                 # the row for "predict next"
    return ids, position_ids, query_position_ids

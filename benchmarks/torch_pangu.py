"""PanGu-α in PyTorch eager: the anchor autopar's step times are compared against.

The same architecture as ``autopar.models.pangu_alpha.PanguAlphaWithLoss``, op for op, so
that a timing ratio compares kernels and not models:

    ids (B, S+1) -> tokens [:, :-1], labels [:, 1:]
    word + position embedding (B, S, H) -> dropout
    -> blocks: x = x + drop(proj(attn(LN1(x)))); x = x + drop(proj(gelu_tanh(map(LN2(x)))))   (L - 1 blocks)
    -> final LN, then the query layer (query = top_query_embedding[position], keys and values
       from LN1(x)), or the other order for ``layer_order="query_then_final_ln"``
    -> logits = x @ word_embedding^T (tied head) -> cross-entropy, mean over non-pad labels

Attention as autopar computes it: ``(q / sqrt(D)) k^T`` plus -10000 on masked scores (not
-inf), softmax, dropout on the probabilities. Parameters carry autopar's names
(``blocks.0.attention.dense1.weight``, ``final_layernorm.gamma``, ...), so
:func:`copy_weights` copies by name and the two frameworks start from the same weights.
Dropout follows ``config.dropout_rate`` in training mode (``model.train()``); with rate 0 (or
``model.eval()``) the model is deterministic and its loss equals autopar's to float32
rounding (:func:`compare_loss`). Plain causal attention only (``eod_reset`` is refused).

Benchmark-only: torch is not a dependency of autopar.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from autopar.errors import format_error

MASK_VALUE = -10000.0   # autopar's (and PanGu-α's) additive mask for disallowed scores


class LayerNorm(torch.nn.Module):
    """LayerNorm over the last axis with autopar's parameter names ``gamma`` and ``beta``."""

    def __init__(self, h: int, eps: float):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(h))
        self.beta = torch.nn.Parameter(torch.zeros(h))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, self.eps)


class Embedding(torch.nn.Module):
    """A lookup table named ``embedding_table`` (vocab, H), as autopar's Embedding."""

    def __init__(self, n: int, h: int, std: float):
        super().__init__()
        self.embedding_table = torch.nn.Parameter(torch.randn(n, h) * std)

    def forward(self, ids):
        return F.embedding(ids, self.embedding_table)


def dense(n_in: int, n_out: int, std: float) -> torch.nn.Linear:
    """y = x W^T + b, W (out, in) drawn N(0, std), b zero: autopar's Dense."""
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.normal_(0.0, std)
        lin.bias.zero_()
    return lin


class Attention(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        h, std = config.hidden_size, config.init_std
        out_std = std / math.sqrt(2.0 * config.num_layers)
        self.n_heads, self.head_dim, self.p = config.num_heads, config.head_dim, config.dropout_rate
        self.dense1, self.dense2, self.dense3 = dense(h, h, std), dense(h, h, std), dense(h, h, std)
        self.projection = dense(h, h, out_std)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def _heads(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)          # (B, N, S, D)

    def forward(self, x_query, x_kv, mask_add):
        b, s, h = x_query.shape
        q, k, v = self._heads(self.dense1(x_query)), self._heads(self.dense2(x_kv)), self._heads(self.dense3(x_kv))
        scores = (q * self.scale) @ k.transpose(-1, -2) + mask_add               # (B, N, S, S)
        probs = F.dropout(scores.softmax(-1), self.p, self.training)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, h)                       # (B, S, H)
        return F.dropout(self.projection(ctx), self.p, self.training)


class FeedForward(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f, std = config.hidden_size, config.ffn_hidden_size, config.init_std
        self.mapping = dense(h, f, std)
        self.projection = dense(f, h, std / math.sqrt(2.0 * config.num_layers))
        self.p = config.dropout_rate

    def forward(self, x):
        return F.dropout(self.projection(F.gelu(self.mapping(x), approximate="tanh")), self.p, self.training)


class Block(torch.nn.Module):
    """Pre-LN block: x + Attn(LN1(x)), then x + FFN(LN2(x))."""

    def __init__(self, config):
        super().__init__()
        self.layernorm1 = LayerNorm(config.hidden_size, config.layernorm_epsilon)
        self.attention = Attention(config)
        self.layernorm2 = LayerNorm(config.hidden_size, config.layernorm_epsilon)
        self.output = FeedForward(config)

    def forward(self, x, mask_add):
        h = self.layernorm1(x)
        x = x + self.attention(h, h, mask_add)
        return x + self.output(self.layernorm2(x))


class QueryLayer(Block):
    """The top layer: the query is a learned embedding of the position, keys and values LN1(x)."""

    def __init__(self, config):
        super().__init__(config)
        self.top_query_embedding = Embedding(config.seq_length, config.hidden_size, config.init_std)

    def forward(self, x, mask_add, position_ids):
        x = x + self.attention(self.top_query_embedding(position_ids), self.layernorm1(x), mask_add)
        return x + self.output(self.layernorm2(x))


class PanguAlphaTorch(torch.nn.Module):
    """``PanguAlphaTorch(config)(ids)`` -> the scalar loss of ids (B, S+1), as autopar's
    ``PanguAlphaWithLoss(config)(ids)``."""

    def __init__(self, config):
        super().__init__()
        if config.eod_reset:
            raise ValueError(format_error("PanguAlphaTorch", "config.eod_reset", "False (plain causal attention)",
                                          "True", "compare with eod_reset=False"))
        if np.dtype(config.compute_dtype) != np.float32 or np.dtype(config.param_dtype) != np.float32:
            raise ValueError(format_error("PanguAlphaTorch", "config.compute_dtype/param_dtype", "float32",
                                          f"{config.compute_dtype}/{config.param_dtype}", "compare in float32"))
        self.config = config
        h, std = config.hidden_size, config.init_std
        self.word_embedding = Embedding(config.vocab_size, h, std)
        self.position_embedding = Embedding(config.seq_length, h, std)
        self.blocks = torch.nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.final_layernorm = LayerNorm(h, config.layernorm_epsilon)
        self.query_layer = QueryLayer(config)
        causal = torch.ones(config.seq_length, config.seq_length, dtype=torch.bool).tril()
        self.register_buffer("mask_add", torch.zeros(config.seq_length, config.seq_length)
                             .masked_fill(~causal, MASK_VALUE), persistent=False)   # (S, S)

    def forward(self, ids):
        tokens, labels = ids[:, :-1], ids[:, 1:]                                  # (B, S) each
        b, s = tokens.shape
        cfg = self.config
        position_ids = torch.arange(s, device=ids.device).expand(b, s)
        mask_add = self.mask_add[:s, :s]
        x = F.dropout(self.word_embedding(tokens) + self.position_embedding(position_ids), cfg.dropout_rate,
                      self.training)
        for block in self.blocks:
            x = block(x, mask_add)
        if cfg.layer_order == "final_ln_then_query":
            x = self.query_layer(self.final_layernorm(x), mask_add, position_ids)
        else:
            x = self.final_layernorm(self.query_layer(x, mask_add, position_ids))
        logits = x.reshape(b * s, -1) @ self.word_embedding.embedding_table.T      # (B*S, V), tied head
        per_token = F.cross_entropy(logits, labels.reshape(b * s).long(), reduction="none")
        keep = (labels.reshape(b * s) != cfg.pad_id).to(per_token.dtype)
        return (per_token * keep).sum() / keep.sum().clamp(min=1.0)


def copy_weights(model: PanguAlphaTorch, net) -> None:
    """Copy every trainable parameter of autopar's ``net`` into ``model`` by name, so both
    start from the same weights. Names and shapes must match one for one."""
    ours = {p.name: p for p in net.trainable_params()}
    theirs = dict(model.named_parameters())
    if set(ours) != set(theirs):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise ValueError(format_error("copy_weights", "parameter names", "the same names in both models",
                                      f"only in autopar: {missing[:3]}, only in torch: {extra[:3]}",
                                      "build both from the same PanguAlphaConfig"))
    with torch.no_grad():
        for name, p in ours.items():
            data = np.asarray(p.asnumpy(), np.float32)
            if tuple(data.shape) != tuple(theirs[name].shape):
                raise ValueError(format_error("copy_weights", name, f"shape {tuple(theirs[name].shape)}",
                                              f"shape {data.shape}", "build both from the same PanguAlphaConfig"))
            theirs[name].copy_(torch.from_numpy(data))


def build(config, net=None, device: str = "cpu") -> PanguAlphaTorch:
    """The torch model on ``device`` ("cpu" or "cuda"), with ``net``'s weights when given.
    In training mode; dropout is active only when ``config.dropout_rate > 0``."""
    model = PanguAlphaTorch(config)
    if net is not None:
        copy_weights(model, net)
    return model.to(torch.device(device)).train()


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW with autopar's AdamWeightDecay hyperparameters and decay filter (matrices and
    tables decay, 1-D biases and LayerNorm parameters do not). PyTorch's AdamW corrects the
    moments' bias and MindSpore's does not: the same work per step, slightly different values."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), eps=eps)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor,
               clip_norm: float | None = 1.0) -> float:
    """One step: forward, backward, global-norm clip (as TrainOneStepCell's ``clip_norm``), update."""
    loss = model(ids)
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def compare_loss(config, net, ids: np.ndarray) -> tuple[float, float]:
    """(autopar's loss, PyTorch's loss) of ``ids`` with ``net``'s current weights, dropout off
    on the torch side (``config.dropout_rate`` should be 0 for autopar's to match)."""
    ours = float(net(ids))
    model = build(config, net).eval()
    with torch.no_grad():
        theirs = float(model(torch.from_numpy(np.asarray(ids))))
    return ours, theirs

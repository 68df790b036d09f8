"""Text generation from a PanGu-α model: greedy, top-k, top-p and temperature sampling.

``generate`` recomputes: each step runs the model on the prompt right-padded to
``seq_length`` (one compiled program for every length; causal attention makes the padding
invisible). ``generate_cached`` decodes incrementally with a key/value cache (MindSpore's
``use_past``): each step feeds one token per row and attends to the cached keys and values
of the earlier ones, O(S) per token instead of O(S^2); it must give the same tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...nn import Cell
from .model import MASK_VALUE, PanguAlpha


def sample(logits: np.ndarray, rng: np.random.Generator, top_k: int = 0, top_p: float = 1.0,
           temperature: float = 1.0) -> int:
    """One token id from a row of logits (V,). ``temperature == 0`` or ``top_k == 1``: greedy."""
    if temperature == 0 or top_k == 1:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p     # the smallest set reaching top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def _no_early_eod(logits: np.ndarray, eod_id: int | None, produced: int, minimum: int) -> np.ndarray:
    """The row's logits with EOD ruled out until ``minimum`` new tokens exist."""
    if eod_id is None or produced >= minimum:
        return logits
    logits = logits.copy()
    logits[eod_id] = -np.inf
    return logits


def generate(model: PanguAlpha, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0, eod_id: int | None = None,
             seed: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens, stopping
    a row at ``eod_id``. Returns the new tokens of each prompt."""
    s = model.config.seq_length
    for i, p in enumerate(prompts):
        if not 0 < len(p) < s:
            raise ValueError(f"generate: prompt {i}: expected 1 to {s - 1} tokens (seq_length={s}), "
                             f"got {len(p)}; shorten the prompt")
    rngs = [np.random.default_rng((seed, i)) for i in range(len(prompts))]  # a row's draws are its own
    rows = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    pad = model.config.pad_id
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d and len(rows[i]) < s]
        if not live:
            break
        ids = np.full((len(prompts), s), pad, dtype=np.int32)       # (B, S), right-padded
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r[:s]
        logits = model(ids)                                          # (B, S, V)
        for i in live:
            tok = sample(_no_early_eod(logits[i, len(rows[i]) - 1], eod_id, len(out[i]), min_new_tokens),
                         rngs[i], top_k, top_p, temperature)
            rows[i].append(tok)
            out[i].append(tok)
            if eod_id is not None and tok == eod_id:
                done[i] = True
    return out


class PanguAlphaDecoder(Cell):
    """One incremental step of a PanguAlpha (sharing its parameters): ``(token_ids (B, 1),
    position_ids (B, 1), mask_add (B, 1, 1, S), at (B, 1, S, 1), *caches) -> (logits (B, V),
    *updated caches)``, two caches (key, value) of (B, N, S, D) per layer, query layer last."""

    auto_prefix = False

    def __init__(self, model: PanguAlpha):
        super().__init__()
        self.model = model

    def construct(self, token_ids, position_ids, mask_add, at, *caches):
        m = self.model
        x = m.word_embedding(token_ids) + m.position_embedding(position_ids)   # (B, 1, H)
        new = []
        for i, block in enumerate(m.blocks):
            x, kv = block(x, mask_add, (caches[2 * i], caches[2 * i + 1], at))
            new += kv
        last = (caches[-2], caches[-1], at)
        if m.config.layer_order == "final_ln_then_query":
            x, kv = m.query_layer(m.final_layernorm(x), mask_add, position_ids, last)
        else:
            x, kv = m.query_layer(x, mask_add, position_ids, last)
            x = m.final_layernorm(x)
        new += kv
        b = x.shape[0]
        logits = m.head(x.reshape(b, -1), m.word_embedding.embedding_table)    # (B, H) @ (V, H)^T
        return (logits,) + tuple(new)


def generate_cached(model: PanguAlpha, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, eod_id: int | None = None,
                    seed: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Like :func:`generate`, with a key/value cache. Rows advance in lockstep: at time t
    each row feeds its token t (from its prompt, or the one it generated) and, once past its
    prompt, samples token t + 1."""
    cfg = model.config
    s = cfg.seq_length
    for i, p in enumerate(prompts):
        if not 0 < len(p) < s:
            raise ValueError(f"generate: prompt {i}: expected 1 to {s - 1} tokens (seq_length={s}), "
                             f"got {len(p)}; shorten the prompt")
    b, dt = len(prompts), np.dtype(cfg.compute_dtype)
    decoder = PanguAlphaDecoder(model)
    caches = [np.zeros((b, cfg.num_heads, s, cfg.head_dim), dt) for _ in range(2 * cfg.num_layers)]
    rngs = [np.random.default_rng((seed, i)) for i in range(len(prompts))]  # a row's draws are its own
    rows = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * b
    for t in range(s - 1):
        if all(done[i] or (len(rows[i]) <= t) for i in range(b)):
            break
        ids = np.array([[r[t] if t < len(r) else cfg.pad_id] for r in rows], np.int32)       # (B, 1)
        pos = np.full((b, 1), t, np.int32)                                                      # (B, 1)
        mask = np.where(np.arange(s) <= t, 0.0, MASK_VALUE).astype(dt)[None, None, None, :]     # (1,1,1,S)
        at = (np.arange(s) == t)[None, None, :, None]                                          # (1,1,S,1)
        res = decoder(ids, pos, np.broadcast_to(mask, (b, 1, 1, s)).copy(),
                      np.broadcast_to(at, (b, 1, s, 1)).copy(), *caches)
        logits, caches = res[0], list(res[1:])
        for i in range(b):
            if done[i] or t + 1 < len(rows[i]) or len(out[i]) >= max_new_tokens:
                done[i] = done[i] or len(out[i]) >= max_new_tokens
                continue
            tok = sample(_no_early_eod(logits[i], eod_id, len(out[i]), min_new_tokens), rngs[i], top_k, top_p,
                         temperature)
            rows[i].append(tok)
            out[i].append(tok)
            if (eod_id is not None and tok == eod_id) or len(out[i]) >= max_new_tokens:
                done[i] = True
    return out

"""Text generation from a PanGu-α model: greedy, top-k, top-p and temperature sampling.

Each step runs the model on the prompt right-padded to ``seq_length`` (one compiled
program for every length; causal attention makes the padding invisible) and samples the
token after the last real one. Incremental decoding with a key/value cache is a separate,
faster path still to come; this one is the reference it must match.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .model import PanguAlpha


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


def generate(model: PanguAlpha, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0, eod_id: int | None = None,
             seed: int = 0) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens, stopping
    a row at ``eod_id``. Returns the new tokens of each prompt."""
    s = model.config.seq_length
    for i, p in enumerate(prompts):
        if not 0 < len(p) < s:
            raise ValueError(f"generate: prompt {i}: expected 1 to {s - 1} tokens (seq_length={s}), "
                             f"got {len(p)}; shorten the prompt")
    rng = np.random.default_rng(seed)
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
            tok = sample(logits[i, len(rows[i]) - 1], rng, top_k, top_p, temperature)
            rows[i].append(tok)
            out[i].append(tok)
            if eod_id is not None and tok == eod_id:
                done[i] = True
    return out

"""Evaluation as PanGu-α did it: perplexity, and classification by comparing perplexities.

A multiple-choice task fills each candidate into a template; the candidate whose filled
text the model finds least surprising (lowest perplexity) is the answer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .model import PanguAlpha


def token_nll(model: PanguAlpha, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Negative log-likelihood of every token after the first, per row (rows may differ in
    length; each is right-padded to ``seq_length`` so one program serves them all)."""
    s = model.config.seq_length
    for i, r in enumerate(rows):
        if not 1 < len(r) <= s:
            raise ValueError(f"token_nll: row {i}: expected 2 to {s} tokens (seq_length={s}), got {len(r)}")
    ids = np.full((len(rows), s), model.config.pad_id, dtype=np.int32)        # (B, S)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    logits = model(ids).astype(np.float64)                                     # (B, S, V)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))      # log-softmax
    out = []
    for i, r in enumerate(rows):
        n = len(r) - 1
        out.append(-logp[i, np.arange(n), np.asarray(r[1:])])                  # (n,)
    return out


def perplexity(model: PanguAlpha, rows: Sequence[Sequence[int]], score_from: Sequence[int] | None = None) -> np.ndarray:
    """exp(mean NLL) per row, over tokens at positions >= ``score_from[i]`` (default 1)."""
    nll = token_nll(model, rows)
    starts = score_from or [1] * len(rows)
    return np.array([np.exp(n[max(st - 1, 0):].mean()) for n, st in zip(nll, starts)])


def choose(model: PanguAlpha, context: Sequence[int], candidates: Sequence[Sequence[int]],
           score_candidate_only: bool = True) -> tuple[int, np.ndarray]:
    """Index of the candidate whose filled text (context + candidate) has the lowest
    perplexity, and every candidate's perplexity. ``score_candidate_only``: average over the
    candidate's tokens (else over the whole filled text)."""
    rows = [list(context) + list(c) for c in candidates]
    start = [len(context) if score_candidate_only else 1] * len(rows)
    ppl = perplexity(model, rows, start)
    return int(np.argmin(ppl)), ppl

"""Text generation from a PanGu-α model: greedy, top-k, top-p and temperature sampling.

``generate`` recomputes: each step runs the model on the prompt right-padded to
``seq_length`` (one compiled program for every length; causal attention makes the padding
invisible). ``generate_cached`` decodes incrementally with a key/value cache (MindSpore's
``use_past``): each step feeds one token per row and attends to the cached keys and values
of the earlier ones, O(S) per token instead of O(S^2); it must give the same tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ...backend import to_host
from ...errors import check_int, format_error
from ...ir.spec import TensorSpec
from ...nn import Cell
from ...runtime.sharded_forward import forward_program
from .model import MASK_VALUE, PanguAlpha


def sample(logits: np.ndarray, rng: np.random.Generator, top_k: int = 0, top_p: float = 1.0,
           temperature: float = 1.0) -> int:
    """One token id from a row of logits (V,), on the host or a device (it is brought to the
    host: the draw is numpy's, the same on both). ``temperature == 0`` or ``top_k == 1``: greedy."""
    logits = to_host(logits)
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


def check_sampling(where: str, vocab_size: int, top_k, top_p, temperature, min_new_tokens,
                   max_new_tokens=None) -> None:
    """The sampling arguments of one call, checked once (not per token): ``top_k`` an int in
    [0, vocab_size] (0: no cut), ``top_p`` in (0, 1] (1: no cut), ``temperature`` finite and
    >= 0 (0: greedy), token counts ints >= 0. Out of range, they used to fail deep in numpy
    (top_k > V) or pass silently (top_p = 2, max_new_tokens = -1)."""
    def count(arg, value, low, high=None):
        check_int(where, arg, value, low, high)

    def real(arg, value, ok, expected):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or \
                not math.isfinite(value) or not ok(value):
            raise ValueError(format_error(where, arg, expected, repr(value)))

    count("top_k", top_k, 0, vocab_size)
    real("top_p", top_p, lambda v: 0 < v <= 1, "a number in (0, 1] (1: no nucleus cut)")
    real("temperature", temperature, lambda v: v >= 0, "a finite number >= 0 (0: greedy)")
    count("min_new_tokens", min_new_tokens, 0)
    if max_new_tokens is not None:
        count("max_new_tokens", max_new_tokens, 0)


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
    check_sampling("generate", model.config.vocab_size, top_k, top_p, temperature, min_new_tokens, max_new_tokens)
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
    position_ids (B, 1), query_ids (B, 1), mask_add (B, 1, 1, S), at (B, 1, S, 1), *caches)
    -> (logits (B, V), *updated caches)``, two caches (key, value) of (B, N, S, D) per layer,
    query layer last. ``query_ids`` picks the query layer's row: the position to predict,
    minus one (``position_ids`` in left-to-right decoding).

    The caches are indexed by feeding time, not by position: slot t holds the key and value
    of the t-th token fed (``at`` marks it), and ``mask_add`` lets the new token see slots
    0..t. ``CACHE_ARG`` is the index of the first cache argument; output ``1 + j`` is the
    next value of argument ``CACHE_ARG + j`` (:meth:`carry`)."""

    auto_prefix = False
    CACHE_ARG = 5

    def __init__(self, model: PanguAlpha):
        super().__init__()
        cfg = model.config
        if cfg.sequence_parallel and cfg.model_parallel > 1:    # one token a step: no sequence to split
            raise ValueError(format_error("PanguAlphaDecoder", "model.config.sequence_parallel",
                                          "False for incremental decoding (one token a step)", "True",
                                          "decode with PanguAlpha(config.replace(sequence_parallel=False)): the "
                                          "same parameters and names, so the weights load as they are"))
        self.model = model

    def carry(self) -> dict[int, int]:
        """Output index -> the argument it feeds at the next step (the caches)."""
        n = 2 * self.model.config.num_layers
        return {1 + j: self.CACHE_ARG + j for j in range(n)}

    def construct(self, token_ids, position_ids, query_ids, mask_add, at, *caches):
        m = self.model
        x = m.word_embedding(token_ids) + m.position_embedding(position_ids)   # (B, 1, H)
        new = []
        for i, block in enumerate(m.blocks):
            x, kv = block(x, mask_add, (caches[2 * i], caches[2 * i + 1], at))
            new += kv
        last = (caches[-2], caches[-1], at)
        if m.config.layer_order == "final_ln_then_query":
            x, kv = m.query_layer(m.final_layernorm(x), mask_add, query_ids, last)
        else:
            x, kv = m.query_layer(x, mask_add, query_ids, last)
            x = m.final_layernorm(x)
        new += kv
        b = x.shape[0]
        logits = m.head(x.reshape(b, -1), m.word_embedding.embedding_table)    # (B, 1, H) -> (B, H) @ (V, H)^T
        return (logits,) + tuple(new)


class _Row:
    """One row's decoding schedule: the known tokens, then the targets, each at its position.

    ``order[t]`` is the position of the t-th token fed; the token fed at time t is known
    (t < len(tokens)) or was generated; at time t the model is asked for position
    ``order[t + 1]`` (query row ``order[t + 1] - 1``) and, once the known tokens are used
    up, samples it."""

    def __init__(self, tokens: Sequence[int], order: Sequence[int]):
        self.tokens = [int(x) for x in tokens]
        self.order = [int(p) for p in order]
        self.new: list[int] = []
        self.done = len(self.order) == len(self.tokens)

    def fed(self, t: int) -> int:
        return self.tokens[t] if t < len(self.tokens) else self.new[t - len(self.tokens)]

    def live(self, t: int) -> bool:
        return not self.done and t + 1 < len(self.order)


def _check_rows(where: str, s: int, tokens, order) -> None:
    """The positions of a row: distinct, in [0, seq_length), position 0 fed first, known
    tokens for the first ones."""
    for i, (toks, pos) in enumerate(zip(tokens, order)):
        if not 0 < len(toks) < len(pos) or pos[0] != 0:
            raise ValueError(f"{where}: row {i}: expected 1 or more known tokens, the first at position 0, and "
                             f"at least one position to generate; got {len(toks)} tokens, positions starting "
                             f"{list(pos[:3])}, {len(pos) - len(toks)} to generate")
        bad = sorted(p for p in pos if not 0 <= p < s)
        if bad or len(set(pos)) != len(pos):
            raise ValueError(f"{where}: row {i}: expected distinct positions in [0, {s}) (seq_length={s}), got "
                             f"{'out of range ' + str(bad[:5]) if bad else 'repeated positions'}; "
                             "shorten the prompt or the span to generate")


def decode_in_order(model: PanguAlpha, tokens: Sequence[Sequence[int]], order: Sequence[Sequence[int]], *,
                    top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, eod_id: int | None = None,
                    seed: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Key/value-cached decoding in any order of positions (the random-order model's use).

    Row i feeds its known ``tokens[i]`` at positions ``order[i][:len(tokens[i])]``, then
    generates the tokens of the remaining positions of ``order[i]``, in that order, each fed
    back at its position once sampled; a row stops early at ``eod_id``. Returns the generated
    tokens of each row in generation order. The identity order (``order = 0, 1, 2, ...``) is
    ordinary left-to-right decoding.

    Rows advance in lockstep, one fed token per row per step. Under operator-level model
    parallelism the decoder runs sharded (collective: every rank calls this with the same
    arguments) and each rank keeps only its heads' share of the caches.
    """
    cfg = model.config
    s, b, dt = cfg.seq_length, len(tokens), np.dtype(cfg.compute_dtype)
    check_sampling("decode_in_order", cfg.vocab_size, top_k, top_p, temperature, min_new_tokens)
    if len(order) != b:
        raise ValueError(f"decode_in_order: order: expected one position list per row ({b}), got {len(order)}")
    _check_rows("decode_in_order", s, tokens, order)
    rows = [_Row(t, o) for t, o in zip(tokens, order)]
    rngs = [np.random.default_rng((seed, i)) for i in range(b)]  # a row's draws are its own
    decoder = PanguAlphaDecoder(model)
    steps = max(len(r.order) for r in rows) - 1
    for t in range(steps):
        if not any(r.live(t) for r in rows):
            break
        ids = np.array([[r.fed(t) if r.live(t) else cfg.pad_id] for r in rows], np.int32)            # (B, 1)
        pos = np.array([[r.order[t] if r.live(t) else 0] for r in rows], np.int32)                  # (B, 1)
        query = np.array([[r.order[t + 1] - 1 if r.live(t) else 0] for r in rows], np.int32)        # (B, 1)
        mask = np.where(np.arange(s) <= t, 0.0, MASK_VALUE).astype(dt)                               # (S,)
        mask = np.ascontiguousarray(np.broadcast_to(mask, (b, 1, 1, s)))                             # (B, 1, 1, S)
        at = np.ascontiguousarray(np.broadcast_to((np.arange(s) == t)[:, None], (b, 1, s, 1)))     # (B, 1, S, 1)
        if t == 0:
            prog = forward_program(decoder, (ids, pos, query, mask, at) + _global_caches(cfg, b, dt), {},
                                   decoder.carry())
            caches = [prog.local_zeros(decoder.CACHE_ARG + j) for j in range(2 * cfg.num_layers)]
        logits, *caches = prog.run([ids, pos, query, mask, at, *caches])                       # (B, V), caches
        for i, r in enumerate(rows):
            if not r.live(t) or t + 1 < len(r.tokens):
                continue
            tok = sample(_no_early_eod(logits[i], eod_id, len(r.new), min_new_tokens), rngs[i], top_k, top_p,
                         temperature)
            r.new.append(tok)
            r.done = len(r.tokens) + len(r.new) == len(r.order) or (eod_id is not None and tok == eod_id)
    return [r.new for r in rows]


def _global_caches(cfg, b: int, dt: np.dtype) -> tuple:
    """Shapes of the whole caches, to compile the decoder for: 2 per layer, (B, N, S, D)."""
    spec = TensorSpec((b, cfg.num_heads, cfg.seq_length, cfg.head_dim), dt)
    return (spec,) * (2 * cfg.num_layers)


def generate_cached(model: PanguAlpha, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, eod_id: int | None = None,
                    seed: int = 0, min_new_tokens: int = 0) -> list[list[int]]:
    """Like :func:`generate`, with a key/value cache (:func:`decode_in_order` left to right):
    at time t each row feeds its token t (from its prompt, or the one it generated) and, once
    past its prompt, samples token t + 1."""
    s = model.config.seq_length
    check_sampling("generate", model.config.vocab_size, top_k, top_p, temperature, min_new_tokens, max_new_tokens)
    for i, p in enumerate(prompts):
        if not 0 < len(p) < s:
            raise ValueError(f"generate: prompt {i}: expected 1 to {s - 1} tokens (seq_length={s}), "
                             f"got {len(p)}; shorten the prompt")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    order = [list(range(min(len(p) + max_new_tokens, s))) for p in prompts]
    return decode_in_order(model, prompts, order, top_k=top_k, top_p=top_p, temperature=temperature,
                           eod_id=eod_id, seed=seed, min_new_tokens=min_new_tokens)


def fill_middle(model: PanguAlpha, prefix: Sequence[int], suffix: Sequence[int], middle_length: int,
                order: Sequence[int] | None = None, **sampling) -> list[int]:
    """The ``middle_length`` tokens between ``prefix`` and ``suffix`` of one document, from a
    model trained in random order (:func:`~autopar.models.pangu_alpha.random_order`).

    The prefix is fed at positions 0..P-1, then the suffix at its positions after the gap
    (P + M ..), then the middle is generated in ``order``: offsets 0..M-1 into the gap
    (default left to right; ``order=[M-1, ..., 0]`` fills it right to left). Returns the
    middle in position order. ``sampling``: as :func:`decode_in_order` (greedy by default).
    """
    p, m = len(prefix), int(middle_length)
    if p == 0:
        raise ValueError("fill_middle: prefix: expected at least one token (position 0 is always fed first), got none")
    order = list(range(m)) if order is None else [int(k) for k in order]
    if m < 1 or sorted(order) != list(range(m)):
        raise ValueError(f"fill_middle: order: expected a permutation of the gap offsets 0..{m - 1} "
                         f"(middle_length={middle_length}), got {order}")
    positions = list(range(p)) + [p + m + k for k in range(len(suffix))] + [p + k for k in order]
    sampling = {"temperature": 0.0, **sampling}
    new = decode_in_order(model, [list(prefix) + list(suffix)], [positions], **sampling)[0]
    middle = [0] * m
    for k, tok in zip(order, new):
        middle[k] = tok
    return middle

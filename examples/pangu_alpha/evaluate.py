"""Evaluate a trained PanGu-α: validation perplexity and a multiple-choice task scored by
perplexity comparison, as PanGu-α evaluated classification.

    python examples/pangu_alpha/train.py            # writes runs/pangu/checkpoint
    python examples/pangu_alpha/evaluate.py         # reads it

The task is built from the held-out corpus: a context of ``--context`` tokens from a
validation document, its real next ``--span`` tokens, and three spans taken from other
documents; the model must pick the real continuation (chance: 25%). Unless given, the
context and span shrink to fit the checkpoint's ``seq_length``.

A NaN or inf perplexity (a diverged checkpoint) ends the run with one line and exit status 1;
a bad flag, data folder or checkpoint (one without its config) with one line and status 2.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import autopar  # noqa: E402
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig  # noqa: E402
from autopar.models.pangu_alpha.evaluate import choose, perplexity  # noqa: E402
from cli import ArgumentParser, NonFiniteResult, checkpoint_config, integer  # noqa: E402

CONTEXT, SPAN = 24, 8      # defaults, shrunk to fit the checkpoint's seq_length unless given


def documents(tokens: np.ndarray, eod_id: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(tokens == eod_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokens[a:b] for a, b in zip(starts, cuts)]


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/pangu/checkpoint")
    p.add_argument("--data", default="data/pangu")
    p.add_argument("--context", type=integer(1), default=None,
                   help=f"tokens before the span (default {CONTEXT}, fewer if the model's sequence is shorter)")
    p.add_argument("--span", type=integer(1), default=None,
                   help=f"tokens to choose among (default {SPAN}, fewer if the model's sequence is shorter)")
    p.add_argument("--questions", type=integer(1), default=100)
    p.add_argument("--seed", type=integer(0), default=0)
    return p.parse_args(argv)


def window(args: argparse.Namespace, config: PanguAlphaConfig) -> tuple[int, int]:
    """(context, span) tokens: as given, defaults shrunk to fit the model's seq_length; a
    ValueError naming the flags when the given ones do not fit."""
    s = config.seq_length
    span = args.span if args.span is not None else max(1, min(SPAN, s // 3))
    context = args.context if args.context is not None else max(1, min(CONTEXT, s - span))
    if context + span > s:
        given = " + ".join(f for f, v in (("--context", args.context), ("--span", args.span)) if v is not None) \
            or "--context/--span"
        raise ValueError(f"argument {given}: --context + --span: expected at most the seq_length {s} of the model "
                         f"in checkpoint {args.checkpoint}, got {context} + {span} = {context + span}; "
                         f"lower {given}")
    return context, span


def check_finite(what: str, values, args: argparse.Namespace, weights: dict) -> None:
    """A NaN or inf result ends the run (exit 1), naming the first non-finite weight if any:
    printing "perplexity nan" and exiting 0 would pass a diverged model off as evaluated."""
    values = np.asarray(values, dtype=np.float64).ravel()
    bad_values = values[~np.isfinite(values)]
    if not bad_values.size:
        return
    bad = next((name for name, w in weights.items() if not np.isfinite(w).all()), None)
    cause = f"its weight {bad!r} holds NaN or inf" if bad else "its weights are finite but overflow"
    raise NonFiniteResult(f"{what} is {bad_values[0]} for checkpoint {args.checkpoint}: {cause} (diverged "
                          "training); evaluate an earlier checkpoint, or retrain with a lower learning rate")


def validation_documents(args: argparse.Namespace, config: PanguAlphaConfig, need: int) -> list[np.ndarray]:
    """Validation documents of at least ``need`` tokens: at least 4 (a question and its 3
    wrong answers), with ids the model's vocabulary holds."""
    from prepare_data import load_tokens
    valid = np.asarray(load_tokens(args.data, "valid", verify_checksum=True), dtype=np.int64)
    if valid.size and valid.max() >= config.vocab_size:
        raise ValueError(f"argument --data: {args.data}/valid.bin: expected token ids below the vocab_size "
                         f"{config.vocab_size} of the model in checkpoint {args.checkpoint}, got up to {valid.max()}; "
                         "use the --data folder the checkpoint was trained on")
    docs = [d for d in documents(valid, config.eod_id) if len(d) >= need]
    if len(docs) < 4:
        raise ValueError(f"argument --data: {args.data}/valid.bin: expected at least 4 validation documents of "
                         f">= --context + --span = {need} tokens, got {len(docs)}; lower --context or --span")
    return docs


def main(argv=None) -> None:
    args = parse_args(argv)
    config = checkpoint_config(args.checkpoint, data_parallel=1, model_parallel=1, dropout_rate=0.0)
    n_context, n_span = window(args, config)
    need = n_context + n_span
    docs = validation_documents(args, config, need)
    weights = autopar.load_checkpoint(args.checkpoint)
    model = PanguAlpha(config)
    autopar.load_param_into_net(model, weights, strict=False)

    with np.errstate(over="ignore", invalid="ignore"):    # a non-finite result is reported once, below
        score(args, model, docs, weights, n_context, need)


def score(args: argparse.Namespace, model: PanguAlpha, docs: list, weights: dict, n_context: int, need: int) -> None:
    """Validation perplexity, then the multiple-choice questions; stops at a non-finite score."""
    rng = np.random.default_rng(args.seed)
    windows = [list(d[:need]) for d in docs]
    ppl = perplexity(model, windows[: min(len(windows), 64)])
    check_finite("validation perplexity", ppl, args, weights)
    print(f"validation perplexity over {len(ppl)} windows of {need} tokens: {np.exp(np.log(ppl).mean()):.1f}")
    right, asked = 0, 0
    for i in rng.permutation(len(docs))[: args.questions]:
        doc = docs[i]
        context, real = list(doc[:n_context]), list(doc[n_context:need])
        others = rng.choice([j for j in range(len(docs)) if j != i], 3, replace=False)
        spans = [list(docs[j][n_context:need]) for j in others]
        position = int(rng.integers(4))
        candidates = spans[:position] + [real] + spans[position:]
        best, scores = choose(model, context, candidates)
        check_finite("a candidate's perplexity", scores, args, weights)
        right += best == position
        asked += 1
    print(f"multiple choice (real continuation among 4): {right}/{asked} = {right / asked:.0%} (chance 25%)")

if __name__ == "__main__":
    from cli import run
    run(main, __file__)

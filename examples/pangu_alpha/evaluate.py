"""Evaluate a trained PanGu-α: validation perplexity and a multiple-choice task scored by
perplexity comparison, as PanGu-α evaluated classification.

    python examples/pangu_alpha/train.py            # writes runs/pangu/checkpoint
    python examples/pangu_alpha/evaluate.py         # reads it

The task is built from the held-out corpus: a context of ``--context`` tokens from a
validation document, its real next ``--span`` tokens, and three spans taken from other
documents; the model must pick the real continuation (chance: 25%).
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


def documents(tokens: np.ndarray, eod_id: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(tokens == eod_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokens[a:b] for a, b in zip(starts, cuts)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/pangu/checkpoint")
    p.add_argument("--data", default="data/pangu")
    p.add_argument("--context", type=int, default=24)
    p.add_argument("--span", type=int, default=8)
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from prepare_data import load_tokens
    weights = autopar.load_checkpoint(args.checkpoint)
    manifest_cfg = autopar.train.checkpoint.read_manifest(args.checkpoint)[1]["extra"]["config"]
    config = PanguAlphaConfig(**{**manifest_cfg, "data_parallel": 1, "model_parallel": 1, "dropout_rate": 0.0})
    model = PanguAlpha(config)
    autopar.load_param_into_net(model, weights, strict=False)

    valid = np.asarray(load_tokens(args.data, "valid", verify_checksum=True), dtype=np.int64)
    docs = [d for d in documents(valid, config.eod_id) if len(d) >= args.context + args.span]
    rng = np.random.default_rng(args.seed)
    need = args.context + args.span
    windows = [list(d[:need]) for d in docs]
    ppl = perplexity(model, windows[: min(len(windows), 64)])
    print(f"validation perplexity over {len(ppl)} windows of {need} tokens: {np.exp(np.log(ppl).mean()):.1f}")
    right, asked = 0, 0
    for i in rng.permutation(len(docs))[: args.questions]:
        doc = docs[i]
        context, real = list(doc[:args.context]), list(doc[args.context:need])
        others = rng.choice([j for j in range(len(docs)) if j != i], 3, replace=False)
        spans = [list(docs[j][args.context:need]) for j in others]
        position = int(rng.integers(4))
        candidates = spans[:position] + [real] + spans[position:]
        best, _ = choose(model, context, candidates)
        right += best == position
        asked += 1
    print(f"multiple choice (real continuation among 4): {right}/{asked} = {right / asked:.0%} (chance 25%)")


if __name__ == "__main__":
    from cli import run
    run(main, __file__)

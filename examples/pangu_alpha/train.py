"""Train a small PanGu-α serially.

Until the end-to-end data pipeline (jieba + SentencePiece on a real corpus) lands, this
trains on a synthetic learnable stream: documents that repeat a random motif, separated by
EOD, so the loss visibly falls towards the motif's entropy.

    python examples/pangu_alpha/train.py --steps 300
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from tqdm import tqdm

from autopar import nn
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay, WarmUpCosineDecayLR

log = logging.getLogger("pangu_alpha.train")


def motif_batches(config: PanguAlphaConfig, batch: int, seed: int):
    """Endless batches (batch, seq_length + 1): each row repeats a random motif of 3-6 tokens."""
    rng = np.random.default_rng(seed)
    n = config.seq_length + 1
    low = 10  # keep clear of the special ids
    while True:
        rows = []
        for _ in range(batch):
            motif = rng.integers(low, config.vocab_size, rng.integers(3, 7))
            rows.append(np.resize(motif, n))
        yield np.stack(rows).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    config = PanguAlphaConfig.preset(args.preset, seq_length=32, vocab_size=64, hidden_size=64,
                                     num_heads=4, ffn_hidden_size=256, dropout_rate=0.0) \
        if args.preset == "tiny" else PanguAlphaConfig.preset(args.preset)
    net = PanguAlphaWithLoss(config)
    log.info("PanGu-α %s: %.2fM parameters", args.preset, config.parameter_count() / 1e6)
    lr = WarmUpCosineDecayLR(args.lr, args.lr / 10, warmup_steps=max(1, args.steps // 10),
                             decay_steps=args.steps)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=lr, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
    data = motif_batches(config, args.batch, args.seed)
    tokens_per_step = args.batch * config.seq_length
    first = last = None
    with tqdm(range(args.steps), desc="train", unit="step") as bar:
        for step in bar:
            t0 = time.perf_counter()
            loss = float(train(next(data)))
            dt = time.perf_counter() - t0
            first = loss if first is None else first
            last = loss
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
    log.info("loss %.3f -> %.3f over %d steps", first, last, args.steps)


if __name__ == "__main__":
    main()

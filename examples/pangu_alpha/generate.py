"""Generate Chinese text from a trained PanGu-α checkpoint (written by train.py).

    python examples/pangu_alpha/generate.py --prompt 中国的经济 --prompt 今天的天气
    python examples/pangu_alpha/generate.py --greedy --no-cache   # recompute each step instead

Incremental decoding with a key/value cache by default; greedy, top-k, top-p, temperature.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import autopar  # noqa: E402
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig  # noqa: E402
from autopar.models.pangu_alpha.generate import generate, generate_cached  # noqa: E402
from autopar.models.pangu_alpha.tokenizer import PanguTokenizer  # noqa: E402
from autopar.train.checkpoint import read_manifest  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/pangu/checkpoint")
    p.add_argument("--data", default="data/pangu", help="folder with tokenizer.model")
    p.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--min-new-tokens", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok = PanguTokenizer(Path(args.data) / "tokenizer.model")
    saved = read_manifest(args.checkpoint)[1]["extra"]["config"]
    config = PanguAlphaConfig(**{**saved, "data_parallel": 1, "model_parallel": 1, "dropout_rate": 0.0})
    model = PanguAlpha(config)
    autopar.load_param_into_net(model, autopar.load_checkpoint(args.checkpoint), strict=False)
    prompts = args.prompt or ["中国的经济"]
    decode = generate if args.no_cache else generate_cached
    outs = decode(model, [tok.encode(t) for t in prompts], args.max_new_tokens, top_k=args.top_k,
                  top_p=args.top_p, temperature=0.0 if args.greedy else args.temperature, eod_id=tok.eod_id,
                  seed=args.seed, min_new_tokens=args.min_new_tokens)
    for prompt, new in zip(prompts, outs):
        print(f"{prompt} -> {prompt}{tok.decode(new)}")


if __name__ == "__main__":
    main()

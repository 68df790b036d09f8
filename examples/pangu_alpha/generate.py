"""Generate Chinese text from a trained PanGu-α checkpoint (written by train.py).

    python examples/pangu_alpha/generate.py --prompt 中国的经济 --prompt 今天的天气
    python examples/pangu_alpha/generate.py --greedy --no-cache   # recompute each step instead
    mpiexec -n 2 python examples/pangu_alpha/generate.py --mp 2   # model-parallel decoding

Incremental decoding with a key/value cache by default; greedy, top-k, top-p, temperature.

Filling a middle span, from a model trained with ``train.py --random-order``: the prefix
and the suffix of a document are fed first (each token at its position), then the middle
is generated in the order ``--order`` names: ``left`` (left to right), ``right`` (right to
left), ``random``, or the gap offsets themselves (``3,0,2,1``)::

    python examples/pangu_alpha/train.py --random-order --out runs/pangu-ro
    python examples/pangu_alpha/generate.py --checkpoint runs/pangu-ro/checkpoint --order right
    python examples/pangu_alpha/generate.py --checkpoint runs/pangu-ro/checkpoint --order 0,7,1,6 \\
        --middle 8 --prefix 中国的经济 --suffix 发展很快。

Without ``--prefix``/``--suffix`` the span is cut from a validation document (``--doc``)
and the real middle is printed beside the generated one.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import autopar  # noqa: E402
from autopar.comm import install_abort_handler  # noqa: E402
from autopar.context import current_world  # noqa: E402
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig  # noqa: E402
from autopar.models.pangu_alpha.generate import fill_middle, generate, generate_cached  # noqa: E402
from autopar.models.pangu_alpha.tokenizer import PanguTokenizer  # noqa: E402
from autopar.train.checkpoint import read_manifest  # noqa: E402

log = logging.getLogger("pangu_alpha.generate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/pangu/checkpoint")
    p.add_argument("--data", default="data/pangu", help="folder with tokenizer.model (and valid.bin for --order)")
    p.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--min-new-tokens", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step")
    p.add_argument("--mp", type=int, default=1, help="model-parallel degree (under mpiexec)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default=None, help="fill a middle span in this order: left, right, random, or gap "
                   "offsets such as 3,0,2,1 (a model trained with train.py --random-order)")
    p.add_argument("--middle", type=int, default=8, help="--order: tokens to fill")
    p.add_argument("--prefix", default=None, help="--order: the text before the span")
    p.add_argument("--suffix", default=None, help="--order: the text after the span")
    p.add_argument("--doc", type=int, default=0, help="--order without --prefix/--suffix: validation document")
    p.add_argument("--context", type=int, default=12, help="--order with --doc: prefix and suffix tokens")
    return p.parse_args(argv)


def load_model(args, world) -> tuple[PanguAlpha, dict]:
    """The checkpoint's model, split --mp ways (the weights are read whole, each rank keeps its shards)."""
    extra = read_manifest(args.checkpoint)[1]["extra"]
    if args.mp > 1 or world.size > 1:
        if args.mp != world.size:
            raise ValueError(f"--mp: expected {world.size} (the ranks running), got {args.mp}")
        autopar.set_auto_parallel_context(parallel_mode="semi_auto_parallel", full_batch=True)
    config = PanguAlphaConfig(**{**extra["config"], "data_parallel": 1, "model_parallel": args.mp,
                                 "dropout_rate": 0.0})
    model = PanguAlpha(config)
    autopar.load_param_into_net(model, autopar.load_checkpoint(args.checkpoint), strict=False)
    return model, extra


def middle_order(spec: str, m: int, seed: int) -> list[int]:
    """``--order`` as gap offsets 0..m-1 in generation order."""
    named = {"left": list(range(m)), "right": list(range(m - 1, -1, -1)),
             "random": [int(k) for k in np.random.default_rng(seed).permutation(m)]}
    if spec in named:
        return named[spec]
    try:
        order = [int(k) for k in spec.split(",")]
    except ValueError:
        order = None
    if order is None or sorted(order) != list(range(m)):
        raise ValueError(f"--order: expected left, right, random or a permutation of 0..{m - 1} (--middle {m}) "
                         f"such as {','.join(map(str, named['right']))}, got {spec!r}")
    return order


def span_from_doc(args, tok: PanguTokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prefix, real middle, suffix) cut from validation document ``--doc``."""
    from evaluate import documents
    from prepare_data import load_tokens
    valid = np.asarray(load_tokens(args.data, "valid", verify_checksum=True), dtype=np.int64)
    need = 2 * args.context + args.middle
    docs = [d for d in documents(valid, tok.eod_id) if len(d) >= need]
    if not 0 <= args.doc < len(docs):
        raise ValueError(f"--doc: expected an index below {len(docs)} (validation documents of >= {need} tokens), "
                         f"got {args.doc}")
    d = [int(x) for x in docs[args.doc][:need]]
    c, m = args.context, args.middle
    return d[:c], d[c:c + m], d[c + m:]


def fill(args, model: PanguAlpha, tok: PanguTokenizer, extra: dict, is_root: bool) -> None:
    if not extra.get("random_order"):
        log.warning("%s was trained left to right (no --random-order): expect a poor fill", args.checkpoint)
    if args.prefix is not None or args.suffix is not None:
        prefix, real, suffix = tok.encode(args.prefix or ""), None, tok.encode(args.suffix or "")
    else:
        prefix, real, suffix = span_from_doc(args, tok)
    order = middle_order(args.order, args.middle, args.seed)
    middle = fill_middle(model, prefix, suffix, args.middle, order, temperature=0.0 if args.greedy else
                         args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if is_root:
        print(f"prefix: {tok.decode(prefix)}")
        print(f"middle, filled in order {order}: [{tok.decode(middle)}]")
        if real is not None:
            print(f"real middle: [{tok.decode(real)}]")
        print(f"suffix: {tok.decode(suffix)}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    install_abort_handler()
    autopar.init()
    world = current_world()
    tok = PanguTokenizer(Path(args.data) / "tokenizer.model")
    model, extra = load_model(args, world)
    is_root = world.rank == 0
    if args.order is not None:
        fill(args, model, tok, extra, is_root)
        return
    prompts = args.prompt or ["中国的经济"]
    decode = generate if args.no_cache else generate_cached
    outs = decode(model, [tok.encode(t) for t in prompts], args.max_new_tokens, top_k=args.top_k,
                  top_p=args.top_p, temperature=0.0 if args.greedy else args.temperature, eod_id=tok.eod_id,
                  seed=args.seed, min_new_tokens=args.min_new_tokens)    # collective under --mp
    if is_root:
        for prompt, new in zip(prompts, outs):
            print(f"{prompt} -> {prompt}{tok.decode(new)}", flush=True)


if __name__ == "__main__":
    from cli import run
    run(main, __file__)

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
from cli import ArgumentParser, checkpoint_config, integer, number, text  # noqa: E402

log = logging.getLogger("pangu_alpha.generate")

# Flags of --order mode (filling a middle span) and their defaults; None in the parsed
# arguments means "not given", so that giving one without --order is an error, not ignored.
ORDER_DEFAULTS = {"middle": 8, "doc": 0, "context": 12}
ORDER_FLAGS = ("middle", "prefix", "suffix", "doc", "context")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every flag checked alone and against the others (exit 2, one line)."""
    p = ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/pangu/checkpoint")
    p.add_argument("--data", default="data/pangu", help="folder with tokenizer.model (and valid.bin for --order)")
    p.add_argument("--prompt", action="append", type=text, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=integer(1), default=40)
    p.add_argument("--min-new-tokens", type=integer(0), default=8)
    p.add_argument("--top-k", type=integer(0), default=0, help="0: no top-k cut")
    p.add_argument("--top-p", type=number(0, 1), default=0.8, help="in (0, 1]; 1: no nucleus cut")
    p.add_argument("--temperature", type=number(0), default=0.9, help="> 0 (--greedy for the argmax)")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step")
    p.add_argument("--mp", type=integer(1), default=1, help="model-parallel degree (under mpiexec)")
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument("--order", default=None, help="fill a middle span in this order: left, right, random, or gap "
                   "offsets such as 3,0,2,1 (a model trained with train.py --random-order)")
    p.add_argument("--middle", type=integer(1), default=None, help="--order: tokens to fill (default 8)")
    p.add_argument("--prefix", type=text, default=None, help="--order: the text before the span")
    p.add_argument("--suffix", default=None, help="--order: the text after the span")
    p.add_argument("--doc", type=integer(0), default=None,
                   help="--order without --prefix/--suffix: validation document (default 0)")
    p.add_argument("--context", type=integer(1), default=None,
                   help="--order with --doc: prefix and suffix tokens (default 12)")
    args = p.parse_args(argv)
    _check_combinations(p, args)
    for name, default in ORDER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.order is not None:
        try:
            middle_order(args.order, args.middle, args.seed)
        except ValueError as err:
            p.error(str(err))
    return args


def _check_combinations(p: ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that the chosen mode would silently ignore, or that contradict each other."""
    if args.min_new_tokens > args.max_new_tokens:
        p.error(f"argument --min-new-tokens: expected at most --max-new-tokens {args.max_new_tokens}, "
                f"got {args.min_new_tokens}")
    if args.order is None:
        given = [f"--{name}" for name in ORDER_FLAGS if getattr(args, name) is not None]
        if given:
            p.error(f"argument {given[0]}: applies only to filling a middle span; give --order too")
        return
    if args.prompt:
        p.error("argument --prompt: --order fills a span between --prefix and --suffix (or of --doc); "
                "drop --prompt or --order")
    if args.no_cache:
        p.error("argument --no-cache: --order always decodes with the key/value cache; drop --no-cache")
    if args.prefix is None and args.suffix is None:
        return
    if args.prefix is None:
        p.error("argument --suffix: needs --prefix too (the model is always fed position 0 first)")
    doc_flags = [f"--{name}" for name in ("doc", "context") if getattr(args, name) is not None]
    if doc_flags:
        p.error(f"argument {doc_flags[0]}: cuts the span from a validation document, which --prefix/--suffix "
                "replace; drop one of them")


def check_against_model(args: argparse.Namespace, config: PanguAlphaConfig) -> None:
    """Flags that must fit the checkpoint's model: --mp dividing its heads, --top-k within the
    vocabulary, a --doc span within the sequence."""
    model = f"the model in checkpoint {args.checkpoint}"
    try:
        config.replace(model_parallel=args.mp)
    except ValueError as err:
        raise ValueError(f"argument --mp: {err}") from None
    if args.top_k > config.vocab_size:
        raise ValueError(f"argument --top-k: expected at most the vocab_size {config.vocab_size} of {model}, "
                         f"got {args.top_k}")
    if args.order is not None and args.prefix is None and args.suffix is None:
        need = 2 * args.context + args.middle
        if need > config.seq_length:
            raise ValueError(f"argument --context/--middle: 2 x --context + --middle: expected at most the "
                             f"seq_length {config.seq_length} of {model}, got 2 x {args.context} + {args.middle} "
                             f"= {need}; lower --context or --middle")


def check_tokenizer(args: argparse.Namespace, tok: PanguTokenizer, config: PanguAlphaConfig) -> None:
    """The tokenizer's ids must index the model's embedding table."""
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"argument --data: {Path(args.data) / 'tokenizer.model'}: expected at most "
                         f"{config.vocab_size} pieces (the vocab_size of the model in checkpoint {args.checkpoint}), "
                         f"got {tok.vocab_size}; use the --data folder the checkpoint was trained on")


def check_ranks(args: argparse.Namespace, world) -> None:
    """--mp splits the model over the ranks running: it must count them."""
    if args.mp != world.size:
        raise ValueError(f"argument --mp: expected {world.size} (the ranks running), got {args.mp}; "
                         f"run under mpiexec -n {args.mp}")


def load_model(args, config: PanguAlphaConfig) -> tuple[PanguAlpha, dict]:
    """The checkpoint's model, split --mp ways (the weights are read whole, each rank keeps its shards)."""
    if args.mp > 1:
        autopar.set_auto_parallel_context(parallel_mode="semi_auto_parallel", full_batch=True)
    model = PanguAlpha(config.replace(data_parallel=1, model_parallel=args.mp, dropout_rate=0.0))
    autopar.load_param_into_net(model, autopar.load_checkpoint(args.checkpoint), strict=False)
    return model, read_manifest(args.checkpoint)[1]["extra"]


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
        raise ValueError(f"argument --order: expected left, right, random or a permutation of 0..{m - 1} "
                         f"(--middle {m}) such as {','.join(map(str, named['right']))}, got {spec!r}")
    return order


def span_from_doc(args, tok: PanguTokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prefix, real middle, suffix) cut from validation document ``--doc``."""
    from evaluate import documents
    from prepare_data import load_tokens
    valid = np.asarray(load_tokens(args.data, "valid", verify_checksum=True), dtype=np.int64)
    need = 2 * args.context + args.middle
    docs = [d for d in documents(valid, tok.eod_id) if len(d) >= need]
    if not 0 <= args.doc < len(docs):
        raise ValueError(f"argument --doc: expected an index below {len(docs)} (validation documents of >= {need} "
                         f"tokens), got {args.doc}")
    d = [int(x) for x in docs[args.doc][:need]]
    c, m = args.context, args.middle
    return d[:c], d[c:c + m], d[c + m:]


def fill(args, model: PanguAlpha, tok: PanguTokenizer, extra: dict, is_root: bool) -> None:
    if not extra.get("random_order"):
        log.warning("%s was trained left to right (no --random-order): expect a poor fill", args.checkpoint)
    if args.prefix is not None or args.suffix is not None:
        prefix, real, suffix = tok.encode(args.prefix), None, tok.encode(args.suffix or "")
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
    config = checkpoint_config(args.checkpoint)      # a checkpoint without one fails here, before any work
    check_against_model(args, config)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    install_abort_handler()
    autopar.init()
    world = current_world()
    check_ranks(args, world)
    tok = PanguTokenizer(Path(args.data) / "tokenizer.model")
    check_tokenizer(args, tok, config)
    model, extra = load_model(args, config)
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

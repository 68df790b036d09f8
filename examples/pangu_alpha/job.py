"""The training job's pieces that are not the loop: data, model size, resumption, FLOPs.

    load_data(args, world)          prepared corpus (made if missing, else checked), tokenizer
    model_config(args, tok, dp, mp) the PanGu-α config of --preset, sized to the tokenizer
    parallel_plan(args, ranks)      how the run is split: auto, a hand plan, or a --plan file
    step_inputs(batch, step, ...)   the trainer's inputs of one step (random order if asked)
    Resume.read(path, config)       what a checkpoint holds to continue a run (checked)
    model_flops(config, batch)      model FLOPs of one training step (no recompute)
    check_out(out, resume, overwrite)   --out holds no checkpoint this run would replace
    measure_peak(world, shapes)     the per-rank GEMM rate MFU divides by, measured now
    mfu_report(mfu, ranks, peak)    the MFU figure with its source; loud when above 100%

A checkpoint's ``extra`` (JSON, in its manifest) holds everything that is not a tensor and
that continuing needs: the model config, the data loader's position, the learning-rate
schedule, the random-order flag. Parameters, optimizer states and the step count are the
checkpoint's tensors and step.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

from autopar import ops
from autopar.backend import as_backend, to_device
from autopar.errors import format_error
from autopar.models.pangu_alpha import PanguAlphaConfig, random_order
from autopar.models.pangu_alpha.config import PRESETS
from autopar.models.pangu_alpha.tokenizer import PanguTokenizer
from autopar.strategy.formulas import transformer_training_flops
from autopar.strategy.profile import MachineProfile
from autopar.train import WarmUpCosineDecayLR
from autopar.train.checkpoint import read_manifest

CHECKPOINT = "checkpoint"     # the checkpoint's folder inside --out

# The main job's model, sized to its budget (about 4 minutes on two cores). With a vocabulary
# of 8000 the logits GEMM (6·H·V FLOPs a token) outweighs the layers (72·L·H²) at this width,
# so a narrow model sees the most tokens: at an equal time budget, validation perplexity
# fell from H 256 (431) through 192 (363) and 128 (298) to 96 (273), measured on 2-rank-
# equivalent runs of 170 s. Dropout is off: the job sees under one epoch of its corpus.
DEMO = {"seq_length": 128, "hidden_size": 96, "num_layers": 4, "num_heads": 8, "ffn_hidden_size": 384,
        "dropout_rate": 0.0}
# The GPU job's model: as large as the prepared corpus (about 2.7M tokens) can feed for a few
# minutes without memorising it -- 14M parameters with the 8000-token vocabulary.
GPU_JOB = {"seq_length": 256, "hidden_size": 384, "num_layers": 6, "num_heads": 6, "ffn_hidden_size": 1536,
           "dropout_rate": 0.1}
SHAPES = {"demo": DEMO, "gpu": GPU_JOB}
# Steps, global batch and peak learning rate when not given. The GPU job's were chosen on
# the lent H100 (session 8, four settings run side by side): 8e-3 -- the demo's -- sent the
# 14M model's loss to 41 at step 60 and left validation perplexity at 444 after 1500 steps;
# 2e-3 with batch 64 (about 7 epochs of the corpus in 1200 steps) reached 97.4 in 366 s.
RUN_DEFAULTS = {"demo": {"steps": 1500, "batch": 16, "lr": 8e-3},
                "gpu": {"steps": 1200, "batch": 64, "lr": 2e-3}}     # the example's own model shapes, beside PanGu-α's presets
PRESET_NAMES = (*SHAPES, *PRESETS)
# What a --plan file's model must share with the run's.
SHAPE_FIELDS = ("vocab_size", "seq_length", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size")
# Config fields a resumed run may change: how the model is split, not what it computes.
SHARDING_FIELDS = ("data_parallel", "model_parallel", "vocab_emb_dp")


def load_data(args, world, log) -> PanguTokenizer:
    """Rank 0 prepares the corpus when ``--data`` has none; then every rank checks the folder
    against its meta.json (files present, checksums, --vocab-size/--max-docs if given): a
    corrupt or half-replaced folder is an error naming the file, never silently rebuilt."""
    from prepare_data import META, check_prepared, prepare
    if world.rank == 0 and not (Path(args.data) / META).is_file():
        prepare(args.data, vocab_size=args.vocab_size or 8000, max_docs=args.max_docs, log=log)
    world.barrier()
    meta = check_prepared(args.data, args.vocab_size, args.max_docs)
    return PanguTokenizer(Path(args.data) / meta["tokenizer"])


def model_config(args, tok: PanguTokenizer, dp: int, mp: int) -> PanguAlphaConfig:
    shape = SHAPES[args.preset] if args.preset in SHAPES else PanguAlphaConfig.preset(args.preset).__dict__
    keep = {k: v for k, v in shape.items() if k in PanguAlphaConfig.__dataclass_fields__
            and k not in ("vocab_size", "eod_id", "pad_id", "data_parallel", "model_parallel")}
    if args.dropout is not None:
        keep["dropout_rate"] = args.dropout
    return PanguAlphaConfig(vocab_size=tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id,
                            data_parallel=dp, model_parallel=mp, **keep)


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """How the job splits the model: ``auto`` (the joint search picks what is None here) or a
    hand plan (every field set; from flags or a ``--plan`` file)."""

    auto: bool
    dp: int
    mp: int
    pp: int | None
    micro: int | None
    layers_per_stage: tuple[int, ...] | None
    recompute: bool
    optimizer_parallel: bool
    compute_dtype: str | None
    model: PanguAlphaConfig | None = None       # the model a --plan file was made for

    def check_model(self, config: PanguAlphaConfig, where: str) -> None:
        """A ``--plan`` made for another model shape is an error naming the fields."""
        if self.model is None:
            return
        differ = [f"{k}={getattr(self.model, k)} (this run: {getattr(config, k)})" for k in SHAPE_FIELDS
                  if getattr(self.model, k) != getattr(config, k)]
        if differ:
            raise ValueError(format_error(where, "model shape", "this run's model", ", ".join(differ),
                                          "plan this model: python -m autopar.plan --hidden ... --vocab ... --json"))

    def describe(self) -> str:
        if self.auto:
            fixed = [f"{k} {v}" for k, v in (("pp", self.pp), ("micro-batches", self.micro)) if v]
            fixed += [k for k in ("recompute", "optimizer_parallel") if getattr(self, k)]
            return "auto_parallel (the joint search chooses" + (f"; fixed: {', '.join(fixed)})" if fixed else ")")
        split = f", layers {list(self.layers_per_stage)}" if self.layers_per_stage else ""
        return (f"dp {self.dp} x mp {self.mp} x pp {self.pp or 1}, {self.micro or 1} micro-batches{split}, recompute "
                f"{'on' if self.recompute else 'off'}, optimizer parallel {'on' if self.optimizer_parallel else 'off'}")

    @property
    def whole_batch(self) -> bool:
        """Whether every rank reads the whole batch (hand model or pipeline parallel)."""
        return not self.auto and (self.mp > 1 or (self.pp or 1) > 1)


def parallel_plan(args, ranks: int) -> ParallelPlan:
    """The run's split from ``--parallel``, the hand flags or ``--plan`` (checked against the
    ranks running)."""
    if args.plan:
        from autopar.strategy.pipeline.plan_file import load_stage_plan
        p = load_stage_plan(args.plan)
        if p.devices != ranks:
            raise ValueError(format_error(f"--plan {args.plan}", "devices", f"{ranks} (the ranks running)",
                                          str(p.devices), f"launch mpiexec -n {p.devices}, or plan for {ranks}"))
        if p.family != "pangu_alpha":
            raise ValueError(format_error(f"--plan {args.plan}", "model family", "pangu_alpha", p.family))
        model = PanguAlphaConfig.preset(p.preset, **p.config_overrides())
        return ParallelPlan(False, p.dp, p.mp, p.pp, p.micro_batches if p.pp > 1 else None, p.layers_per_stage,
                            p.recompute, p.optimizer_parallel, args.compute_dtype or p.compute_dtype, model)
    auto = args.parallel == "auto" or (args.parallel is None and ranks > 1 and not args.dp and args.mp == 1)
    if auto:
        return ParallelPlan(True, 1, 1, args.pp, args.micro, None, args.recompute, args.optimizer_parallel,
                            args.compute_dtype)
    pp, mp = args.pp or 1, args.mp
    dp = args.dp or ranks // (mp * pp)
    if dp * mp * pp != ranks:
        raise ValueError(format_error("--dp x --mp x --pp", "product", f"{ranks} (the ranks running)",
                                      f"{dp} x {mp} x {pp}", "choose degrees whose product is the rank count"))
    return ParallelPlan(False, dp, mp, args.pp, args.micro or (pp if pp > 1 else None), None, args.recompute,
                        args.optimizer_parallel, args.compute_dtype)


def fixed_context(split: ParallelPlan) -> dict:
    """The context keys an auto run fixes (the joint search chooses the rest)."""
    return {k: v for k, v in (("pipeline_stages", split.pp), ("enable_parallel_optimizer",
                                                                 split.optimizer_parallel or None)) if v}


def split_model(net, split: ParallelPlan):
    """The cell the trainer steps: ``net`` with its blocks on their stages (hand pipelines)
    and recomputed if asked, wrapped in a PipelineCell for micro-batches."""
    from autopar import nn
    blocks = list(net.backbone.blocks)
    if not split.auto and (split.pp or 1) > 1:          # the query layer follows the last block
        nn.set_pipeline_stages(blocks, split.layers_per_stage, stages=split.pp)
    if split.recompute:
        for block in blocks:
            block.recompute()
    return nn.PipelineCell(net, split.micro) if split.micro else net


def step_inputs(batch, step: int, seed: int, global_batch: int, rows: slice, permute: bool) -> tuple:
    """The trainer's inputs at ``step``. With ``permute`` (random-order training) each row of
    the global batch gets a permutation drawn from ``(seed, step)`` (position 0 first and the
    last position last, as :func:`random_order` needs) and this rank takes its rows' ones,
    so any data-parallel split sees the orders a serial run sees."""
    if not permute:
        return batch.inputs()
    n = batch.input_ids.shape[1]                                                   # S + 1
    rng = np.random.default_rng((seed, step))
    middle = 1 + np.argsort(rng.random((global_batch, n - 2)), axis=1)            # (B, S-1)
    order = np.concatenate([np.zeros((global_batch, 1), np.int64), middle,
                            np.full((global_batch, 1), n - 1)], axis=1)[rows]      # (b, S+1)
    ids, pos, query = random_order(batch.input_ids, order=order)
    return ids, pos, None, query


def model_flops(config: PanguAlphaConfig, batch: int) -> float:
    """Model FLOPs of one training step of ``batch`` sequences (forward + backward, no
    recompute: the MFU convention), num_layers counting the query layer."""
    return transformer_training_flops(batch, config.seq_length, config.num_layers, config.hidden_size,
                                      config.vocab_size, recompute=False)


def schedule(lr: float, steps: int, decay_steps: int | None) -> WarmUpCosineDecayLR:
    decay = decay_steps or steps
    return WarmUpCosineDecayLR(lr, lr / 10, warmup_steps=max(1, decay // 20), decay_steps=decay)


def extra(config: PanguAlphaConfig, loader, lr: WarmUpCosineDecayLR, random: bool, train) -> dict:
    """The checkpoint's JSON ``extra``: what continuing needs besides tensors, and the
    trainer's counts of steps that updated nothing (so the run's position, the loader's
    step, is the updates applied plus those)."""
    return {"config": dict(config.__dict__), "loader": loader.state_dict(),
            "schedule": dataclasses.asdict(lr), "random_order": bool(random),
            "skipped_steps": train.skipped_steps, "empty_steps": train.empty_steps}


@dataclasses.dataclass(frozen=True)
class Resume:
    """A checkpoint to continue from: its path, step (batches consumed), updates applied
    (fewer by the steps the trainer skipped), schedule and random-order flag."""

    path: Path
    step: int
    updates: int
    schedule: WarmUpCosineDecayLR
    random_order: bool
    skipped_steps: int = 0
    empty_steps: int = 0

    @classmethod
    def read(cls, path, config: PanguAlphaConfig) -> Resume:
        """Check that ``path`` is a checkpoint of this job with the model ``config`` (sharding
        aside) and return what it holds; errors name the checkpoint and the mismatch."""
        where = f"--resume {path}"
        try:
            _, manifest = read_manifest(path)
        except FileNotFoundError:
            raise FileNotFoundError(format_error(where, "checkpoint", "a checkpoint directory with manifest.json",
                                                 "nothing there", "train without --resume first, or name the "
                                                 "checkpoint: --resume runs/pangu/checkpoint")) from None
        saved = manifest.get("extra", {})
        missing = [k for k in ("config", "loader", "schedule") if k not in saved]
        if missing:
            raise ValueError(format_error(where, "manifest extra", "the config, loader and schedule train.py saves",
                                          f"missing {missing}", "resume from a checkpoint train.py wrote"))
        mine = {k: v for k, v in config.__dict__.items() if k not in SHARDING_FIELDS}
        theirs = {k: v for k, v in saved["config"].items() if k not in SHARDING_FIELDS}
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            pairs = ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in differ)
            raise ValueError(format_error(where, "model config", "the checkpoint's", pairs,
                                          "resume with the --preset and --data the checkpoint was trained with"))
        return cls(Path(path), int(saved["loader"]["step"]), int(manifest["step"]),
                   WarmUpCosineDecayLR(**saved["schedule"]), bool(saved.get("random_order", False)),
                   int(saved.get("skipped_steps", 0)), int(saved.get("empty_steps", 0)))


def check_out(out, resume: str | None, overwrite: bool) -> str | None:
    """Why this run may not write ``<out>/checkpoint``, or None when it may: a checkpoint is
    there and the run neither continues it (``--resume``, its default path or the same one
    named) nor was told to replace it (``--overwrite``). Saving would replace it."""
    ckpt = Path(out) / CHECKPOINT
    if overwrite or not ckpt.exists():
        return None
    if resume is not None and Path(resume or ckpt).resolve() == ckpt.resolve():
        return None
    held = f"one at {ckpt}" + (f" (this run resumes {resume})" if resume else "")
    return format_error(f"--out {out}", "checkpoint", "no checkpoint in it (this run would save over it)", held,
                        "pass --resume to continue it or --overwrite to replace it, or choose another --out")


# ---------------------------------------------------------------- MFU

PROBE_SQUARE = 2048     # an (n, n) @ (n, n) GEMM: the shape calibrate.py times, near the BLAS peak
PROBE_REPEATS = 3       # best of: a peak is the fastest a GEMM has run, not a typical run


@dataclasses.dataclass(frozen=True)
class Peak:
    """The GEMM rate of one rank (FLOP/s) that MFU divides by, and where it comes from."""

    flops: float
    source: str


def probe_shapes(config: PanguAlphaConfig, batch: int, dp: int) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of the GEMMs the peak is the best of: the model's FFN and logits GEMMs on one
    data-parallel rank's tokens, and a large square one. Model parallelism makes a rank's
    GEMMs narrower, never faster, so the unsplit shapes are an upper bound."""
    tokens = batch // dp * config.seq_length                        # B/dp * S
    h = config.hidden_size
    return ((tokens, h, config.ffn_hidden_size),                    # (B/dp*S, H) @ (H, F)
            (tokens, h, config.vocab_size),                         # (B/dp*S, H) @ (H, V)
            (PROBE_SQUARE, PROBE_SQUARE, PROBE_SQUARE))


def blas_threads() -> int:
    return max([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"], default=1)


def measure_peak(world, shapes, dtype: str = "float32", repeats: int = PROBE_REPEATS, clock=None,
                 device_target: str = "CPU") -> Peak:
    """The GEMM rate of a rank on this machine now: for each (m, k, n) of ``shapes`` an
    (m, k) @ (k, n) matmul in ``dtype``, 2·m·k·n / time, the best over shapes and repeats.
    Every rank runs each repeat at once (a barrier first), as the ranks of a step run, and
    the peak is the mean of the ranks' (their sum is the machine's, as MFU's denominator
    needs). With one BLAS thread, time is the thread's CPU time, so another process taking
    the core during the probe does not lower the peak (and so cannot lift MFU over 100%).
    On a GPU (``device_target="GPU"``) the product is ``ops.MatMul``'s on device arrays --
    what the step runs, half dtypes on the tensor cores -- timed on the wall clock with the
    device synchronised before and after."""
    device = as_backend(device_target)
    threads = blas_threads()
    if not device.is_host:
        clock, sync = time.perf_counter, device.xp.cuda.Device().synchronize
    else:
        clock = clock or (time.thread_time if threads == 1 else time.perf_counter)
        sync = None
    matmul = ops.MatMul().forward
    rng = np.random.default_rng(0)
    best = 0.0
    for m, k, n in shapes:
        a = to_device(rng.standard_normal((m, k)).astype(dtype), device)      # (m, k)
        b = to_device(rng.standard_normal((k, n)).astype(dtype), device)      # (k, n)
        matmul(a, b)                                                          # warm-up: buffers, pages, handles
        for _ in range(repeats):
            world.barrier()
            if sync:
                sync()
            start = clock()
            matmul(a, b)
            if sync:
                sync()
            best = max(best, 2.0 * m * k * n / max(clock() - start, 1e-9))
    rates = world.allgather(np.array([best]))               # (ranks,)
    dims = ", ".join("x".join(map(str, s)) for s in shapes)
    how = (f"time.{clock.__name__}, {threads} BLAS thread(s)" if device.is_host else
           "the wall clock, device synchronised")
    return Peak(float(rates.mean()), f"{dtype} GEMM measured at start on {device_target}: {dims}, best of {repeats} "
                f"on {how}, {len(rates)} rank(s) at once; mean of ranks "
                f"(min {rates.min() / 1e9:.3g}, max {rates.max() / 1e9:.3g} GFLOP/s)")


def profile_peak(profile: MachineProfile, dtype: str) -> Peak:
    """The GEMM rate of a calibrated machine profile (``python -m autopar.calibrate``)."""
    return Peak(profile.gemm_rate(dtype), f"machine profile {profile.name}: "
                f"{profile.sources.get(f'gemm_flops.{dtype}', 'no source recorded')}")


def mfu_report(mfu: float, ranks: int, peak: Peak) -> tuple[str, bool]:
    """The MFU figure as printed, and whether it can be true. Above 100% the run did more
    GEMM work per second than the peak allows: the peak was mis-measured (the probe ran
    slow), so the figure is marked invalid rather than printed as a utilisation."""
    of = f"{ranks} x {peak.flops / 1e9:.3g} GFLOP/s ({peak.source})"
    if mfu > 1.0:
        return (f"MFU INVALID: {100 * mfu:.1f}% of {of} is above 100%, so that peak is too low; "
                "calibrate this machine (python -m autopar.calibrate) and pass --profile"), False
    return f"MFU {100 * mfu:.1f}% of {of}", True

"""The training job's pieces that are not the loop: data, model size, resumption, FLOPs.

    load_data(args, world)          prepared corpus (made if missing, else checked), tokenizer
    model_config(args, tok, dp, mp) the PanGu-α config of --preset, sized to the tokenizer
    step_inputs(batch, step, ...)   the trainer's inputs of one step (random order if asked)
    Resume.read(path, config)       what a checkpoint holds to continue a run (checked)
    model_flops(config, batch)      model FLOPs of one training step (no recompute)

A checkpoint's ``extra`` (JSON, in its manifest) holds everything that is not a tensor and
that continuing needs: the model config, the data loader's position, the learning-rate
schedule, the random-order flag. Parameters, optimizer states and the step count are the
checkpoint's tensors and step.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from autopar.errors import format_error
from autopar.models.pangu_alpha import PanguAlphaConfig, random_order
from autopar.models.pangu_alpha.config import PRESETS
from autopar.models.pangu_alpha.tokenizer import PanguTokenizer
from autopar.strategy.cost import transformer_training_flops
from autopar.train import WarmUpCosineDecayLR
from autopar.train.checkpoint import read_manifest

# Small enough to learn visibly in a few minutes on two cores.
DEMO = {"seq_length": 128, "hidden_size": 256, "num_layers": 4, "num_heads": 8, "ffn_hidden_size": 1024,
        "dropout_rate": 0.1}
PRESET_NAMES = ("demo", *PRESETS)
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
    shape = DEMO if args.preset == "demo" else PanguAlphaConfig.preset(args.preset).__dict__
    keep = {k: v for k, v in shape.items() if k in PanguAlphaConfig.__dataclass_fields__
            and k not in ("vocab_size", "eod_id", "pad_id", "data_parallel", "model_parallel")}
    return PanguAlphaConfig(vocab_size=tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id,
                            data_parallel=dp, model_parallel=mp, **keep)


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


def extra(config: PanguAlphaConfig, loader, lr: WarmUpCosineDecayLR, random: bool) -> dict:
    """The checkpoint's JSON ``extra``: what continuing needs besides tensors."""
    return {"config": dict(config.__dict__), "loader": loader.state_dict(),
            "schedule": dataclasses.asdict(lr), "random_order": bool(random)}


@dataclasses.dataclass(frozen=True)
class Resume:
    """A checkpoint to continue from: its path, step, schedule and random-order flag."""

    path: Path
    step: int
    schedule: WarmUpCosineDecayLR
    random_order: bool

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
        return cls(Path(path), int(manifest["step"]), WarmUpCosineDecayLR(**saved["schedule"]),
                   bool(saved.get("random_order", False)))

"""autopar.train: learning-rate schedules, gradient clipping, datasets and checkpoints; the
optimizers (autopar.nn.optimizers, where MindSpore keeps them and where the trainer that
steps them lives) are re-exported here."""
from ..nn.optimizers import SGD, Adam, AdamWeightDecay, Optimizer, default_decay_filter
from .checkpoint import (
    ModelCheckpoint,
    NoSpaceError,
    load_checkpoint,
    load_distributed_checkpoint,
    load_param_into_net,
    merge,
    read_config,
    save_checkpoint,
)
from .clip import clip_by_global_norm, global_norm
from .dataset import Batch, LMDataset, LMLoader, TokenFile, eod_reset_masks
from .lr_schedule import CosineDecayLR, PolynomialDecayLR, WarmUpCosineDecayLR, WarmUpLR

__all__ = ["Optimizer", "SGD", "Adam", "AdamWeightDecay", "default_decay_filter",
           "WarmUpLR", "CosineDecayLR", "PolynomialDecayLR", "WarmUpCosineDecayLR",
           "global_norm", "clip_by_global_norm", "TokenFile", "LMDataset", "LMLoader", "Batch", "eod_reset_masks",
           "save_checkpoint", "load_checkpoint", "load_param_into_net", "load_distributed_checkpoint", "merge",
           "ModelCheckpoint", "read_config", "NoSpaceError"]

"""Checkpoints: one safetensors file per rank, a JSON manifest, resharding at load time.

One idea per module, lowest first:

    format.py     the on-disk format: manifest, pieces, checksums; reading and validating a
                  checkpoint directory (read_manifest, read_config)
    reader.py     reading regions of tensors from their pieces, every piece checked
    safe_save.py  publishing a new checkpoint without losing the old: lock, temporary
                  directory, free space, swap by renames, NoSpaceError
    holdings.py   what a model holds: its tensors by name, global shapes, this rank's blocks
    agreement.py  the ranks of a save or load take the same branch at every step
    save.py       save_checkpoint, serial or sharded
    load.py       load_checkpoint, load_param_into_net, load_distributed_checkpoint, merge
    callback.py   ModelCheckpoint: save every few steps, keep the last few
    mindspore_ckpt.py  MindSpore .ckpt files (protobuf, no MindSpore needed): read, write, and
                  PanGu-α's MindSpore names <-> autopar's, converting both ways
    offline.py    MindSpore's offline tools: build_searched_strategy, merge_sliced_parameter,
                  transform_checkpoints
"""
from .callback import ModelCheckpoint
from .format import FORMAT, VERSION, is_checkpoint, read_config, read_manifest, validate_manifest
from .load import load_checkpoint, load_distributed_checkpoint, load_param_into_net, merge
from .mindspore_ckpt import (
    convert_mindspore_ckpt,
    export_mindspore_ckpt,
    load_mindspore_ckpt,
    pangu_from_mindspore,
    pangu_to_mindspore,
    save_mindspore_ckpt,
)
from .offline import ParameterLayout, build_searched_strategy, merge_sliced_parameter, transform_checkpoints
from .safe_save import NoSpaceError
from .save import BLOCK_OVERHEAD_BYTES, MANIFEST_BASE_BYTES, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "load_param_into_net", "load_distributed_checkpoint", "merge",
           "ModelCheckpoint", "read_config", "read_manifest", "is_checkpoint", "validate_manifest", "NoSpaceError",
           "FORMAT", "VERSION", "BLOCK_OVERHEAD_BYTES", "MANIFEST_BASE_BYTES",
           "load_mindspore_ckpt", "save_mindspore_ckpt", "pangu_from_mindspore", "pangu_to_mindspore",
           "convert_mindspore_ckpt", "export_mindspore_ckpt",
           "build_searched_strategy", "merge_sliced_parameter", "transform_checkpoints", "ParameterLayout"]

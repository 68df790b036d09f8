"""The on-disk format of a checkpoint: its manifest, its pieces and their checksums, and
reading a checkpoint directory back with every field checked (``read_manifest``,
``read_config``).

A checkpoint is a directory::

    ckpt/
        rank0.safetensors    the blocks rank 0 writes (key = tensor name)
        rank1.safetensors    ...
        manifest.json        written last: its presence means the directory is complete

The manifest names, for every tensor -- parameters by name, optimizer states as
``f"{state}.{param name}"`` ("moment1.blocks.0.attention.dense1.weight") -- its global
shape, dtype, layout (MindSpore's device matrix and tensor map, for reading only) and its
pieces: ``{"file", "key", "region": [[start, stop] per dim], "sha256"}``. A block of a
sharded tensor is written once, by the rank at coordinate 0 on the layout's replicated
axes; an unsharded tensor is one piece written by world rank 0. Worked example, a
(V, H) = (96, 32) weight split on dim 1 over mp=2 of Mesh(dp=2, mp=2)::

    ranks 0 (dp=0, mp=0) and 1 (dp=0, mp=1) write [[0, 96], [0, 16]] and [[0, 96], [16, 32]];
    ranks 2 and 3 hold replicas of those blocks and write nothing for this tensor.

Under optimizer parallel a state's holder is the slice of the weight its rank updates (a
``SliceShard``, whose layout splits the replicated axes too), so every rank writes its own
slice of each sliced state and a state tensor has one piece per slice; loading reads
whatever region the loading rank holds, sliced or not, so either side may use it or not.

Under a pipeline a rank holds the parameters of its stage only: another stage's parameter
is an ``AbsentShard`` (an empty array), which it neither writes nor reads. A parameter read
on two stages (PanGu-α's tied word table) has a copy, with its own optimizer states, on
each; the copies are identical, so only the first stage's (the ``owner``) is written and
the tensor is saved once, as one logical value. Layouts name world ranks, so a stage's
blocks are written by that stage's ranks; loading reads regions, so a pipeline checkpoint
loads serially or onto any plan, and any checkpoint onto a pipeline (every copy of a
shared parameter reads the same value).

Dtypes: those of DTYPES, bfloat16 (``ml_dtypes``) among them, stored under safetensors'
own name "BF16" (safetensors' numpy loaders read it back once ``ml_dtypes`` is imported,
as importing autopar does; ``safetensors.numpy.load`` of bytes has no BF16 entry).

A trainer with a loss scale (TrainOneStepWithLossScaleCell) also saves the scale's state,
``"loss_scale": {"cell": "DynamicLossScaleUpdateCell", "state": {"loss_scale": 65536.0,
"cur_iter": 9, "last_overflow_iter": 6}}`` (null without one; absent in older checkpoints),
restored on load so a resumed float16 run continues with the same scale and window.

Reading: a manifest is data from disk, so every field is checked before it is used (a
crafted one is rejected with a clear error instead of reading outside the directory or
allocating absurd shapes), its tensors' names, global shapes and dtypes are checked against
the model's before anything is loaded, and every piece read is checked against its checksum.

A save moves the previous checkpoint to ``<path>.old`` (BACKUP_SUFFIX) while the new one
is renamed in (safe_save.py), so loading takes the backup when ``path`` has none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from ...errors import check_int, format_error, is_int

FORMAT = "autopar-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
BACKUP_SUFFIX = ".old"
DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8", "uint16", "bool")
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")   # a piece file, a ModelCheckpoint prefix

Region = tuple[tuple[int, int], ...]   # [start, stop) per dim, in global coordinates


def value_error(where: str, arg: str, expected: str, actual: str, fix: str = "") -> ValueError:
    """The ValueError for a bad checkpoint or a bad argument of a checkpoint call; every
    checkpoint module raises through it, so all messages take one shape."""
    return ValueError(format_error(where, arg, expected, actual, fix))


def full_region(shape: Sequence[int]) -> Region:
    """The region of a whole tensor of global ``shape``."""
    return tuple((0, int(n)) for n in shape)


def region_of(slices: Sequence[slice]) -> Region:
    """A shard's global slices as a region (what the manifest records)."""
    return tuple((int(s.start), int(s.stop)) for s in slices)


def sha256(array: np.ndarray) -> str:
    """The checksum of a piece, as the manifest records it."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a complete checkpoint directory (it has its manifest)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


# ---- manifest validation ------------------------------------------------------------------

def _check_file(directory: str, name: str, file) -> None:
    where = f"{os.path.join(directory, MANIFEST)}: tensor {name!r}"
    if (not isinstance(file, str) or not FILE_NAME.match(file) or os.path.isabs(file)
            or os.path.basename(file) != file):
        raise value_error(where, "piece file", "a file name inside the checkpoint directory", repr(file),
                          "the manifest may be corrupt or crafted")
    real_dir = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(os.path.join(directory, file))) != real_dir:
        raise value_error(where, "piece file", "a file inside the checkpoint directory", f"{file!r} (a link out of it)")


def _check_region(where: str, region, shape: list[int]) -> Region:
    ok = isinstance(region, list) and len(region) == len(shape)
    ok = ok and all(isinstance(r, list) and len(r) == 2 and all(is_int(v) for v in r) for r in region)
    if not ok:
        raise value_error(where, "region", f"[[start, stop]] for each of {len(shape)} dims", repr(region))
    for d, ((a, b), n) in enumerate(zip(region, shape)):
        if not 0 <= a <= b <= n:
            raise value_error(where, f"region dim {d}", f"0 <= start <= stop <= {n} (global shape {shape})",
                              f"[{a}, {b}]", "the piece lies outside the tensor")
    return tuple((a, b) for a, b in region)


def overlap(r: Region, s: Region) -> Region | None:
    """The intersection of two regions, or None when they share no element."""
    out = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(r, s))
    return out if all(a < b for a, b in out) else None


def _volume(r: Region) -> int:
    return math.prod(b - a for a, b in r)


def _check_tensor(directory: str, name: str, entry) -> None:
    where = f"{os.path.join(directory, MANIFEST)}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise value_error(where, "entry", "an object", type(entry).__name__)
    shape, dtype, pieces = entry.get("shape"), entry.get("dtype"), entry.get("pieces")
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
        raise value_error(where, "shape", "a list of ints >= 0", repr(shape))
    if dtype not in DTYPES:
        raise value_error(where, "dtype", f"one of {DTYPES}", repr(dtype))
    if not isinstance(pieces, list) or not pieces:
        raise value_error(where, "pieces", "a non-empty list", repr(pieces))
    regions = []
    for i, piece in enumerate(pieces):
        if not isinstance(piece, dict) or not isinstance(piece.get("key"), str):
            raise value_error(where, f"piece {i}", "an object with file, key, region, sha256", repr(piece))
        _check_file(directory, name, piece.get("file"))
        sha = piece.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise value_error(where, f"piece {i} sha256", "64 hex digits", repr(sha))
        regions.append(_check_region(f"{where} piece {i} ({piece['file']})", piece.get("region"), shape))
    for i, r in enumerate(regions):
        for j in range(i):
            if overlap(r, regions[j]):
                raise value_error(where, "pieces", "regions covering the tensor exactly once",
                                  f"pieces {j} and {i} overlap ({list(regions[j])} and {list(r)})")
    covered, total = sum(_volume(r) for r in regions), math.prod(shape)
    if covered != total:
        raise value_error(where, "pieces", f"regions covering all {total} elements", f"{covered} covered")


def validate_manifest(manifest, directory: str) -> None:
    """Check every field of a manifest read from disk (or about to be written) before
    any is used: a crafted one is rejected instead of reading outside the directory."""
    where = os.path.join(directory, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise value_error(where, "format", repr(FORMAT), repr(found))
    if manifest.get("version") != VERSION:
        raise value_error(where, "version", f"{VERSION} (the versions this autopar reads)",
                          repr(manifest.get("version")),
                          "load it with the autopar that wrote it")
    check_int(where, "step", manifest.get("step"), 0)
    if not isinstance(manifest.get("extra"), dict):
        raise value_error(where, "extra", "an object", repr(manifest.get("extra")))
    config = manifest.get("config")
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("class"), str)
                                   and isinstance(config.get("fields"), dict)):
        raise value_error(where, "config", 'null or {"class": name, "fields": {...}}', repr(config)[:80])
    _check_loss_scale(where, manifest.get("loss_scale"))
    if not isinstance(manifest.get("writer", {}), dict):
        raise value_error(where, "writer", "an object", repr(manifest.get("writer"))[:80])
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise value_error(where, "tensors", "an object", type(tensors).__name__)
    for name, entry in tensors.items():
        _check_tensor(directory, name, entry)


def _check_loss_scale(where: str, saved) -> None:
    """The loss-scale entry's shape (its values are checked by the trainer's cell on load)."""
    ok = saved is None or (isinstance(saved, dict) and sorted(saved) == ["cell", "state"]
                           and isinstance(saved["cell"], str) and isinstance(saved["state"], dict))
    if not ok:
        raise value_error(where, "loss_scale", 'null or {"cell": name, "state": {...}}', repr(saved)[:80])


def _resolve(path) -> str:
    """The complete checkpoint at ``path``, or at its backup after an interrupted save."""
    path = os.path.abspath(os.fspath(path))
    for candidate in (path, path + BACKUP_SUFFIX):
        if is_checkpoint(candidate):
            return candidate
    if os.path.exists(path):
        raise value_error("load checkpoint", "path", f"a checkpoint directory with {MANIFEST}",
                          f"{path!r} without one", "it is incomplete (an interrupted save?) or not a checkpoint")
    raise FileNotFoundError(f"load checkpoint: path: expected a checkpoint directory, got {path!r}, "
                            "which does not exist")


def read_manifest(path) -> tuple[str, dict]:
    """(the checkpoint directory actually used, its validated manifest)."""
    directory = _resolve(path)
    file = os.path.join(directory, MANIFEST)
    try:
        with open(file, "rb") as f:
            manifest = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as err:
        raise value_error(file, "contents", "JSON", f"unreadable text ({err})") from None
    validate_manifest(manifest, directory)
    return directory, manifest


def _writer(manifest: dict) -> str:
    """Who wrote a checkpoint, for errors about what it lacks."""
    w = manifest.get("writer")
    if not w:
        return "an autopar older than 0.1.0's model configs in checkpoints"
    return (f"autopar {w.get('autopar', '?')} ({w.get('program', '?')}) from a {w.get('network', '?')}, "
            "which has no `config` dataclass attribute")


def _tuples(value):
    """JSON lists back to tuples: configs are frozen, hashable values."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_config(path, cls=None, *, fix: str = "build the model's config by hand"):
    """The model config saved in the checkpoint at ``path``: with ``cls`` (a dataclass such
    as PanguAlphaConfig) an instance of it, else ``{"class": name, "fields": {...}}``.

    Raises ValueError when the checkpoint has none (naming what wrote it; ``fix`` says
    what the caller's user should do instead, e.g. "pass --config FILE"), when it holds
    another class, or when its fields do not make a valid ``cls``.
    """
    directory, manifest = read_manifest(path)
    where, saved = f"checkpoint {directory!r}", manifest.get("config")
    if saved is None:
        raise value_error(where, "model config", "one saved with the weights",
                          f"none (it was written by {_writer(manifest)})", fix)
    if cls is None:
        return {"class": saved["class"], "fields": dict(saved["fields"])}
    if saved["class"] != cls.__name__:
        raise value_error(where, "model config", f"a {cls.__name__}", f"a {saved['class']}",
                          "load it with the model it was saved from")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved["fields"]) - known)
    if unknown:
        raise value_error(where, "model config fields", f"fields of {cls.__name__}", f"unknown {unknown}",
                          "load it with the autopar that wrote it")
    try:
        return cls(**{k: _tuples(v) for k, v in saved["fields"].items()})
    except (TypeError, ValueError) as err:
        raise value_error(where, "model config", f"valid {cls.__name__} fields", str(err)) from None

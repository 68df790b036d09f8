"""Saving a network and its optimizer: serial or sharded, one file per rank.

Saving (collective) never replaces good data with bad, and every rank reaches the same
decision at each step (one small allgather each), so a failure raises on every rank instead
of leaving the others waiting:

    1. check   every rank checks its values are finite (unless allow_non_finite) and
               counts the bytes it will write
    2. prepare rank 0 locks ``<path>.lock`` (a second saver gets an error naming the holder),
               removes temporaries a killed save left, checks the free space, makes
               ``<path>.tmp-<step>``
    3. write   every rank writes its file into it
    4. publish rank 0 writes the manifest and swaps the directory in by renames -- ``path ->
               <path>.old``, ``tmp -> path``, delete ``<path>.old`` (safe_save.py)

A failure after step 2 removes the temporary directory. The manifest also records the
model's config (a ``config`` dataclass on the network or a cell inside it: ``read_config``
gives it back) and what wrote it.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sys

import numpy as np
from safetensors.numpy import save as _st_bytes

from ...dtype import is_float
from ...errors import format_error
from .agreement import agree, context_world
from .format import FORMAT, VERSION, sha256, validate_manifest, value_error
from .holdings import held_tensors, loss_scale_of, split_model
from .safe_save import (
    DISK_FULL,
    NoSpaceError,
    abandon,
    no_space_error,
    prepare_save,
    publish,
    release_lock,
    temp_dir,
    write_file,
)

BLOCK_OVERHEAD_BYTES = 1024     # a block's safetensors header and manifest entry, at most (estimate)
MANIFEST_BASE_BYTES = 64 * 1024  # the manifest's other fields and the directory entries (estimate)


def attempt(path: str, needed: int, step, *args):
    """(step(*args), None), or (None, the exception): a full disk becomes an error naming
    the path and the space needed."""
    try:
        return step(*args), None
    except NoSpaceError as err:
        return None, err
    except OSError as err:
        return None, no_space_error(path, needed, err) if err.errno in DISK_FULL else err
    except Exception as err:   # noqa: BLE001 - every rank must hear of any failure
        return None, err


def _listed(names: list[str], first: int = 5) -> str:
    return f"{names[:first]}{f' and {len(names) - first} more' if len(names) > first else ''}"


def _non_finite(held: list[dict]) -> list[str]:
    return [h["name"] for h in held if is_float(h["array"].dtype) and not np.isfinite(h["array"]).all()]


def _check_values(world, where: str, held: list[dict], allow_non_finite: bool) -> int:
    """Collective: refuse NaN/inf held on any rank (every rank decides alike, so none is
    left waiting); returns the bytes the save will write, all ranks together."""
    mine = {"non_finite": [] if allow_non_finite else _non_finite(held),
            "bytes": sum(h["array"].nbytes + BLOCK_OVERHEAD_BYTES for h in held if h["writer"])}
    everyone = agree(world, where, None, mine)
    bad = sorted({name for r in everyone for name in r["non_finite"]})
    if bad:
        raise value_error(where, "values", "finite parameters and optimizer states", f"NaN or inf in {_listed(bad)}",
                          "resume from an earlier checkpoint, or pass allow_non_finite=True to save them anyway")
    return MANIFEST_BASE_BYTES + sum(r["bytes"] for r in everyone)


def write_rank(tmp: str, rank: int, held: list[dict]) -> dict:
    """Write this rank's blocks; return {name: tensor entry with this rank's pieces}."""
    file = f"rank{rank}.safetensors"
    mine = [h for h in held if h["writer"]]
    if mine:
        write_file(tmp, file, _st_bytes({h["name"]: h["array"] for h in mine}))
    return {h["name"]: {"kind": h["kind"], "shape": list(h["shape"]), "dtype": h["dtype"], "layout": h["layout"],
                        "pieces": [{"file": file, "key": h["name"], "region": [list(r) for r in h["region"]],
                                    "sha256": sha256(h["array"])}]}
            for h in mine}


def merge_entries(per_rank: list[dict]) -> dict:
    tensors: dict[str, dict] = {}
    for entries in per_rank:
        for name, e in entries.items():
            if name not in tensors:
                tensors[name] = e
                continue
            assert (tensors[name]["shape"], tensors[name]["dtype"]) == (e["shape"], e["dtype"]), name
            tensors[name]["pieces"] += e["pieces"]
    return dict(sorted(tensors.items()))


def _config_of(network) -> dict | None:
    """The first ``config`` dataclass on the network or a cell inside it (PanguAlpha's),
    stored generically -- class name and fields -- so that this layer imports no model."""
    for _, cell in network.named_cells():
        config = getattr(cell, "config", None)   # the attribute models agree on; most cells lack it
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            fields = dataclasses.asdict(config)
            try:
                json.dumps(fields)
            except TypeError as err:
                raise TypeError(format_error("save_checkpoint", f"{type(cell).__name__}.config",
                                             "a dataclass of JSON-able fields (it is saved in the manifest)",
                                             str(err), "give the config plain fields: numbers, strings, "
                                             "lists, dicts")) from None
            return {"class": type(config).__name__, "fields": fields}
    return None


def _loss_scale_entry(scale) -> dict | None:
    """The loss scale's state (the same on every rank: the overflow check is collective)."""
    return None if scale is None else {"cell": type(scale).__name__, "state": scale.state()}


def _manifest_head(network, optimizer, step: int, world, extra: dict, scale) -> dict:
    return {"format": FORMAT, "version": VERSION, "step": int(step), "world_size": world.size,
            "optimizer": None if optimizer is None else
            {"type": type(optimizer).__name__, "state_names": list(optimizer.state_names)},
            "loss_scale": _loss_scale_entry(scale), "extra": extra, "config": _config_of(network),
            "writer": {"autopar": _version(),
                       "program": _program(), "network": type(network).__name__}}


def _version() -> str:
    try:
        return importlib.metadata.version("autopar")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree
        return "(not installed)"


def _program() -> str:
    """The script that saved ("train.py"; "pytest" for ``python -m pytest``)."""
    path = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "__main__.py" else name


def _checked_extra(extra: dict | None) -> dict:
    extra = {} if extra is None else extra
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(format_error("save_checkpoint", "extra", "a JSON-able dict", f"{err}")) from None
    return extra


def save_checkpoint(obj, path, *, extra: dict | None = None, world=None, allow_non_finite: bool = False) -> str:
    """Save parameters (and, for a TrainOneStepCell, optimizer states and step; for a
    TrainOneStepWithLossScaleCell, the loss scale's state) to the directory ``path``;
    collective when the network is sharded: every rank calls it.

    ``extra``: small JSON-able data (data-loader position, seeds) returned by
    :func:`load_distributed_checkpoint`. Refuses NaN/inf values unless
    ``allow_non_finite``; raises FileExistsError while another process saves to ``path``,
    NoSpaceError when the disk cannot hold it. On any failure the previous checkpoint at
    ``path`` is kept and nothing new is left behind. Returns ``path``.
    """
    world = world if world is not None else context_world("save_checkpoint")
    network, optimizer = split_model(obj)
    step = optimizer.step_count if optimizer is not None else 0
    path = os.path.abspath(os.fspath(path))
    where = f"save_checkpoint({path!r})"
    head = _manifest_head(network, optimizer, step, world, _checked_extra(extra), loss_scale_of(obj))
    held = held_tensors(network, optimizer, world.rank)
    needed = _check_values(world, where, held, allow_non_finite)
    tmp, lock, error = temp_dir(path, step), None, None
    if world.rank == 0:
        lock, error = attempt(path, needed, prepare_save, path, step, needed)
    agree(world, where, error)
    try:
        entries, error = attempt(path, needed, write_rank, tmp, world.rank, held)
        per_rank = agree(world, where, error, entries)   # collective: all files written
        if world.rank == 0:
            manifest = head | {"tensors": merge_entries(per_rank)}
            _, error = attempt(path, needed, publish_checked, tmp, path, manifest)
        agree(world, where, error)
    except BaseException:
        if world.rank == 0:
            abandon(tmp)
        raise
    finally:
        if lock is not None:
            release_lock(path, lock)
    return path


def publish_checked(tmp: str, path: str, manifest: dict) -> None:
    validate_manifest(manifest, tmp)   # the manifest we are about to publish covers every tensor once
    publish(tmp, path, manifest)

"""Checkpoints: one safetensors file per rank, a JSON manifest, resharding at load time.

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

Saving (collective): every rank writes its file into ``<path>.tmp-<step>``, rank 0 writes
the manifest and swaps the directory in by renames -- ``path -> <path>.old``, ``tmp ->
path``, delete ``<path>.old`` -- so at every instant a complete checkpoint sits at
``path`` or at ``<path>.old``; loading looks at the backup when ``path`` is missing or has
no manifest. Loading validates the manifest before reading a byte of data (file names
inside the directory, dtype allowlist, regions inside the shape covering it exactly once),
and checks every piece's shape, dtype and checksum. No pickle: loading executes nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import save as _st_bytes

from ..errors import format_error
from ..runtime.pipeline_shards import AbsentShard
from ..runtime.shards import ParamShard
from .checkpoint_format import (
    _FILE_NAME,
    BACKUP_SUFFIX,
    DTYPES,
    FORMAT,
    MANIFEST,
    VERSION,
    Region,
    _fail,
    _full,
    _is_int,
    _Reader,
    _region,
    _sha256,
    _validate,
    is_checkpoint,
    read_manifest,
)

# ---- what this rank holds -------------------------------------------------------------------

def _split_obj(obj):
    """(network, optimizer or None) of a TrainOneStepCell or a Cell."""
    from ..nn.cell import Cell
    if hasattr(obj, "network") and hasattr(obj, "optimizer"):
        return obj.network, obj.optimizer
    if isinstance(obj, Cell):
        return obj, None
    raise TypeError(format_error("checkpoint", "obj", "a Cell or a TrainOneStepCell", type(obj).__name__))


def _layout_json(layout) -> dict:
    matrix, tensor_map = layout.to_mindspore()
    tensor_map = [list(e) if isinstance(e, tuple) else e for e in tensor_map]
    return {"device_matrix": list(matrix), "tensor_map": tensor_map, "ranks": list(layout.mesh.ranks)}


def _first_copy(holder) -> bool:
    """False for the copy of a shared parameter on a later pipeline stage (a StageShard
    that is not the owner, or a SliceShard of one): the first stage's copy is saved."""
    return getattr(getattr(holder, "base", holder), "owner", True)


def _block(name: str, holder, array: np.ndarray, world_rank: int) -> dict:
    """One tensor as this rank holds it; ``holder`` is a Parameter or a ParamShard."""
    sharded = isinstance(holder, ParamShard)
    shape = tuple(holder.param.shape) if sharded else tuple(holder.shape)
    dtype = np.dtype(array.dtype).name
    if dtype not in DTYPES:
        raise _fail("save_checkpoint", f"tensor {name!r} dtype", f"one of {DTYPES}", dtype)
    entry = {"name": name, "array": np.ascontiguousarray(array), "shape": shape, "dtype": dtype}
    if sharded:
        layout = holder.layout
        if layout.partial:
            raise _fail("save_checkpoint", f"tensor {name!r} layout", "no partial sums", str(layout),
                        "reduce the value before saving")
        coord = layout.mesh.coord(holder.rank)   # one writer per block: coordinate 0 on the replicas
        entry.update(region=_region(holder.region), layout=_layout_json(layout),
                     writer=_first_copy(holder) and all(coord[a] == 0 for a in layout.replicated_axes()))
    else:
        entry.update(region=_full(shape), layout=None, writer=world_rank == 0)
    return entry


def _held(network, optimizer, world_rank: int) -> list[dict]:
    """Every tensor this rank holds: parameters, then optimizer states (none of another
    pipeline stage's parameters)."""
    out = []
    for name, p in network.parameters_dict().items():
        holder = p._shard[0] if p._shard is not None else p
        if not isinstance(holder, AbsentShard):
            out.append(_block(name, holder, holder.data, world_rank) | {"kind": "parameter"})
    if optimizer is not None:
        for target, states in zip(optimizer.params, optimizer.states):
            if isinstance(target, AbsentShard):
                continue
            for s, array in states.items():
                out.append(_block(f"{s}.{target.name}", target, array, world_rank) | {"kind": "state"})
    return out


# ---- filesystem steps (each a crash point; tests break them one at a time) ----------------

def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def _remove_tree(path: str) -> None:
    """Delete a checkpoint directory manifest first, so a crash mid-delete never leaves a
    directory that still claims to be complete while missing shard files."""
    manifest = os.path.join(path, MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)
        _fsync_dir(path)
    shutil.rmtree(path)


def _make_dir(path: str) -> None:
    os.makedirs(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save ---------------------------------------------------------------------------------

def _write_rank(tmp: str, rank: int, held: list[dict]) -> dict:
    """Write this rank's blocks; return {name: tensor entry with this rank's pieces}."""
    file = f"rank{rank}.safetensors"
    mine = [h for h in held if h["writer"]]
    if mine:
        _write_bytes(os.path.join(tmp, file), _st_bytes({h["name"]: h["array"] for h in mine}))
    return {h["name"]: {"kind": h["kind"], "shape": list(h["shape"]), "dtype": h["dtype"], "layout": h["layout"],
                        "pieces": [{"file": file, "key": h["name"], "region": [list(r) for r in h["region"]],
                                    "sha256": _sha256(h["array"])}]}
            for h in mine}


def _exchange(world, entries: dict) -> list[dict]:
    """Every rank's piece lists, on every rank (JSON through an allgather of bytes)."""
    if world.size == 1:
        return [entries]
    data = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)
    lengths = world.allgather(np.array([data.size], dtype=np.int64))
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[:data.size] = data
    gathered = world.allgather(padded[None, :])
    return [json.loads(gathered[r, :int(n)].tobytes()) for r, n in enumerate(lengths)]


def _merge_entries(per_rank: list[dict]) -> dict:
    tensors: dict[str, dict] = {}
    for entries in per_rank:
        for name, e in entries.items():
            if name not in tensors:
                tensors[name] = e
                continue
            assert (tensors[name]["shape"], tensors[name]["dtype"]) == (e["shape"], e["dtype"]), name
            tensors[name]["pieces"] += e["pieces"]
    return dict(sorted(tensors.items()))


def _swap_in(tmp: str, path: str) -> None:
    """Move the complete ``tmp`` to ``path``; a complete checkpoint exists throughout at
    ``path`` or its backup."""
    backup = path + BACKUP_SUFFIX
    if is_checkpoint(path):
        if os.path.exists(backup):
            _remove_tree(backup)
        _rename(path, backup)
    _rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if os.path.exists(backup):
        _remove_tree(backup)


def save_checkpoint(obj, path, *, extra: dict | None = None, world=None) -> str:
    """Save parameters (and, for a TrainOneStepCell, optimizer states and step) to the
    directory ``path``; collective when the network is sharded: every rank calls it.

    ``extra``: small JSON-able data (data-loader position, seeds) returned by
    :func:`load_distributed_checkpoint`. Returns ``path``.
    """
    from ..context import current_world
    world = world if world is not None else current_world()
    network, optimizer = _split_obj(obj)
    step = optimizer.step_count if optimizer is not None else 0
    extra = {} if extra is None else extra
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(format_error("save_checkpoint", "extra", "a JSON-able dict", f"{err}")) from None
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not is_checkpoint(path):
        raise _fail("save_checkpoint", "path", "a new path or an existing checkpoint",
                    f"{path!r}, which exists without a {MANIFEST}", "remove it or save elsewhere")
    tmp = f"{path}.tmp-{step}"
    held = _held(network, optimizer, world.rank)
    if world.rank == 0:
        if os.path.exists(tmp):   # left by an interrupted save
            _remove_tree(tmp)
        _make_dir(tmp)
    world.barrier()
    per_rank = _exchange(world, _write_rank(tmp, world.rank, held))   # collective: all files written
    if world.rank == 0:
        manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "world_size": world.size,
                    "optimizer": None if optimizer is None else
                    {"type": type(optimizer).__name__, "state_names": list(optimizer.state_names)},
                    "extra": extra, "tensors": _merge_entries(per_rank)}
        _validate(manifest, tmp)   # the manifest we are about to publish covers every tensor once
        # the manifest appears whole or not at all: a kill mid-write must not leave a
        # directory with a truncated manifest (it would claim to be complete)
        part = os.path.join(tmp, MANIFEST + ".part")
        _write_bytes(part, json.dumps(manifest, indent=1).encode())
        _rename(part, os.path.join(tmp, MANIFEST))
        _swap_in(tmp, path)
    world.barrier()
    return path


# ---- load ---------------------------------------------------------------------------------

def load_checkpoint(path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (parameters and optimizer states), assembled whole,
    every piece's checksum verified."""
    directory, manifest = read_manifest(path)
    reader = _Reader(directory, manifest)
    try:
        return {name: reader.read(name) for name in manifest["tensors"]}
    finally:
        reader.close()


def _check_names(where: str, expected: set[str], given: set[str], strict: bool) -> list[str]:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if strict and (missing or unexpected):
        raise _fail(where, "parameter names", "the network's parameters exactly",
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
                    "load a checkpoint of the same network, or pass strict=False")
    return missing


def load_param_into_net(net, path_or_dict, strict: bool = True) -> list[str]:
    """Set every parameter of ``net`` from a checkpoint path or a ``{name: array}`` dict
    (optimizer states, ``"{state}.{param}"``, are skipped). Returns the names of parameters
    not found (only possible with ``strict=False``)."""
    network, _ = _split_obj(net)
    values = path_or_dict if isinstance(path_or_dict, dict) else load_checkpoint(path_or_dict)
    params = network.parameters_dict()
    states = {k for k in values if k not in params and k.partition(".")[2] in params}
    missing = _check_names("load_param_into_net", set(params), set(values) - states, strict)
    for name, p in params.items():
        if name in values:
            p.set_data(np.asarray(values[name]))
    return missing


def _bind(trainer, inputs: tuple) -> None:
    """Compile the training program for ``inputs`` and hand the optimizer its shards, as the
    first ``trainer(*inputs)`` would (MindSpore's ``model.build``): afterwards loading knows
    which slices this rank holds."""
    trainer.build(*inputs)


def _holder_region(holder) -> Region:
    """The global region a holder keeps: a shard's (empty for another pipeline stage's
    parameter), else all of the tensor."""
    return _region(holder.region) if isinstance(holder, (ParamShard, AbsentShard)) else _full(holder.shape)


def load_distributed_checkpoint(obj, path, *, inputs: tuple | None = None, strict: bool = True,
                                verify: bool = True) -> dict:
    """Load ``path`` onto ``obj`` (a Cell or TrainOneStepCell) under the current plan: each
    rank reads only the regions it holds (a ParamShard's ``region``, else whole tensors),
    so any device count or strategy (or serial) loads any checkpoint. For a trainer, the
    optimizer states are read the same way and ``step_count`` restored. Returns ``extra``.

    ``inputs``: example inputs of a sharded trainer not yet run, to build its program first
    (its optimizer must hold its shards before states can be placed). ``verify=False``
    reads pieces partly where only part is needed, skipping their checksums; by default
    every piece touched is read whole and verified.
    """
    network, optimizer = _split_obj(obj)
    directory, manifest = read_manifest(path)
    tensors = manifest["tensors"]
    if inputs is not None and optimizer is not None:
        _bind(obj, inputs)
    params = network.parameters_dict()
    stored = {n for n, e in tensors.items() if e.get("kind", "parameter") == "parameter"}
    _check_names(f"load_distributed_checkpoint({directory!r})", set(params), stored, strict)
    reader = _Reader(directory, manifest, verify)
    try:
        for name, p in params.items():
            if name not in tensors:
                continue
            if p._shard is not None:
                shard = p._shard[0]
                if not isinstance(shard, AbsentShard):   # another pipeline stage's: nothing to read
                    shard._data = reader.read(name, _holder_region(shard)).astype(p.dtype, copy=False)
            else:
                p.set_data(reader.read(name))
        if optimizer is not None:
            _load_states(optimizer, network, reader, manifest, directory, strict)
    finally:
        reader.close()
    return dict(manifest["extra"])


def _load_states(optimizer, network, reader: _Reader, manifest: dict, directory: str, strict: bool) -> None:
    from ..runtime.compiled import parallel_setting
    from ..runtime.pipeline_program import pipelined
    tensors = manifest["tensors"]
    stored = {n for n, e in tensors.items() if e.get("kind") == "state"}
    where = f"load_distributed_checkpoint({directory!r})"
    if stored:
        expected = {f"{s}.{t.name}" for t in optimizer.params for s in optimizer.state_names}
        _check_names(where, expected, stored, strict)
        bound = any(isinstance(t, ParamShard) for t in optimizer.params)
        setting = parallel_setting()
        if not bound and (setting is not None or pipelined(network, setting)):   # a PipelineCell binds shards
            raise _fail(where, "optimizer", "bound to this rank's shards before its states load",
                        "an optimizer over whole parameters", "pass inputs=(example batch,) to build the program")
    states = []
    for t in optimizer.params:   # a parameter with any state missing (strict=False) starts afresh
        names = [f"{s}.{t.name}" for s in optimizer.state_names]
        have = stored and all(n in tensors for n in names)
        states.append({s: reader.read(n, _holder_region(t)).astype(t.dtype)
                       for s, n in zip(optimizer.state_names, names)} if have else {})
    optimizer.states, optimizer.step_count = states, manifest["step"]


def merge(path, out_file) -> str:
    """Write every full tensor of the checkpoint to one safetensors file (for export)."""
    directory, manifest = read_manifest(path)
    tensors = load_checkpoint(directory)
    out_file = os.fspath(out_file)
    part = out_file + ".part"
    _write_bytes(part, _st_bytes(tensors, metadata={"step": str(manifest["step"]), "format": FORMAT}))
    os.replace(part, out_file)
    return out_file


class ModelCheckpoint:
    """Save a trainer every ``every`` steps to ``directory/{prefix}_{step}``, keeping the
    last ``keep`` checkpoints (MindSpore's ``ModelCheckpoint`` with ``keep_checkpoint_max``).
    Call it after each step on every rank: ``ckpt_cb(train, extra={...})``."""

    def __init__(self, directory, prefix: str = "ckpt", every: int = 1, keep: int = 5):
        for arg, value in (("every", every), ("keep", keep)):
            if not _is_int(value) or value < 1:
                raise _fail("ModelCheckpoint", arg, "an int >= 1", repr(value))
        if not isinstance(prefix, str) or not _FILE_NAME.match(prefix):
            raise _fail("ModelCheckpoint", "prefix", "a plain file name", repr(prefix))
        self.directory, self.prefix, self.every, self.keep = os.fspath(directory), prefix, every, keep

    def saved(self) -> list[tuple[int, str]]:
        """(step, path) of the complete checkpoints in the directory, oldest first."""
        found = []
        for entry in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
            m = re.fullmatch(re.escape(self.prefix) + r"_(\d+)", entry)
            if m and is_checkpoint(os.path.join(self.directory, entry)):
                found.append((int(m.group(1)), os.path.join(self.directory, entry)))
        return sorted(found)

    def latest(self) -> str | None:
        """The newest complete checkpoint, to resume from (None if there is none)."""
        saved = self.saved()
        return saved[-1][1] if saved else None

    def __call__(self, trainer, extra: dict | None = None, world=None) -> str | None:
        from ..context import current_world
        world = world if world is not None else current_world()
        step = trainer.optimizer.step_count
        if step % self.every:
            return None
        if world.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
        world.barrier()
        path = save_checkpoint(trainer, os.path.join(self.directory, f"{self.prefix}_{step}"),
                               extra=extra, world=world)
        if world.rank == 0:   # the new one is complete: drop the oldest beyond keep
            for _, old in self.saved()[:-self.keep]:
                _remove_tree(old)
        return path

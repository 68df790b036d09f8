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
               <path>.old``, ``tmp -> path``, delete ``<path>.old`` (checkpoint_format.py)

A failure after step 2 removes the temporary directory. The manifest also records the
model's config (a ``config`` dataclass on the network or a cell inside it: ``read_config``
gives it back) and what wrote it.

Loading validates the manifest before reading a byte of data (file names inside the
directory, dtype allowlist, regions inside the shape covering it exactly once), checks
every tensor's global shape and dtype against the model before touching it, reads
everything this rank needs (every piece's shape, dtype and checksum checked) and only then
assigns: a failed load leaves the model as it was. No pickle: loading executes nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import sys

import numpy as np
from safetensors.numpy import save as _st_bytes

from ..errors import check_int, format_error
from ..runtime.pipeline.shards import AbsentShard
from ..runtime.pipeline.program import pipelined
from ..runtime.setting import parallel_setting
from ..runtime.shards import ParamShard
from .checkpoint_format import (
    _FILE_NAME,
    DISK_FULL,
    DTYPES,
    FORMAT,
    VERSION,
    NoSpaceError,
    Region,
    _check_names,
    _check_shapes,
    _fail,
    _full,
    _listed,
    _Reader,
    _region,
    _remove_tree,
    _sha256,
    _validate,
    _write_bytes,
    abandon,
    is_checkpoint,
    no_space_error,
    prepare_save,
    publish,
    read_config,
    read_manifest,
    release_lock,
    temp_dir,
    write_file,
)

BLOCK_OVERHEAD_BYTES = 1024     # a block's safetensors header and manifest entry, at most (estimate)
MANIFEST_BASE_BYTES = 64 * 1024  # the manifest's other fields and the directory entries (estimate)

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


# ---- agreeing across ranks ------------------------------------------------------------------

def _exchange(world, entries) -> list:
    """Every rank's JSON-able value, on every rank (JSON through an allgather of bytes)."""
    if world is None or world.size == 1:
        return [entries]
    data = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)
    lengths = world.allgather(np.array([data.size], dtype=np.int64))
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[:data.size] = data
    gathered = world.allgather(padded[None, :])
    return [json.loads(gathered[r, :int(n)].tobytes()) for r, n in enumerate(lengths)]


_AGREED_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, OSError, FileExistsError,
                                                 FileNotFoundError, PermissionError, NoSpaceError)}


def _agree(world, where: str, error: Exception | None, payload=None) -> list:
    """Every rank's payload, on every rank; or, when any rank failed, an error on every rank
    (its own on the failing rank; on the others one of the same kind naming that rank), so
    that all ranks take the same branch and none waits for the others in a collective."""
    everyone = _exchange(world, {"error": None if error is None else [type(error).__name__, str(error)],
                                 "payload": payload})
    if error is not None:
        raise error
    for rank, report in enumerate(everyone):
        if report["error"] is not None:
            kind, message = report["error"]
            raise _AGREED_ERRORS.get(kind, RuntimeError)(f"{where}: rank {rank} failed: {kind}: {message}")
    return [report["payload"] for report in everyone]


def _attempt(path: str, needed: int, step, *args):
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


# ---- save ---------------------------------------------------------------------------------

def _non_finite(held: list[dict]) -> list[str]:
    return [h["name"] for h in held if h["array"].dtype.kind == "f" and not np.isfinite(h["array"]).all()]


def _check_values(world, where: str, held: list[dict], allow_non_finite: bool) -> int:
    """Collective: refuse NaN/inf held on any rank (every rank decides alike, so none is
    left waiting); returns the bytes the save will write, all ranks together."""
    mine = {"non_finite": [] if allow_non_finite else _non_finite(held),
            "bytes": sum(h["array"].nbytes + BLOCK_OVERHEAD_BYTES for h in held if h["writer"])}
    everyone = _agree(world, where, None, mine)
    bad = sorted({name for r in everyone for name in r["non_finite"]})
    if bad:
        raise _fail(where, "values", "finite parameters and optimizer states", f"NaN or inf in {_listed(bad)}",
                    "resume from an earlier checkpoint, or pass allow_non_finite=True to save them anyway")
    return MANIFEST_BASE_BYTES + sum(r["bytes"] for r in everyone)


def _write_rank(tmp: str, rank: int, held: list[dict]) -> dict:
    """Write this rank's blocks; return {name: tensor entry with this rank's pieces}."""
    file = f"rank{rank}.safetensors"
    mine = [h for h in held if h["writer"]]
    if mine:
        write_file(tmp, file, _st_bytes({h["name"]: h["array"] for h in mine}))
    return {h["name"]: {"kind": h["kind"], "shape": list(h["shape"]), "dtype": h["dtype"], "layout": h["layout"],
                        "pieces": [{"file": file, "key": h["name"], "region": [list(r) for r in h["region"]],
                                    "sha256": _sha256(h["array"])}]}
            for h in mine}


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


def _manifest_head(network, optimizer, step: int, world, extra: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "step": int(step), "world_size": world.size,
            "optimizer": None if optimizer is None else
            {"type": type(optimizer).__name__, "state_names": list(optimizer.state_names)},
            "extra": extra, "config": _config_of(network),
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
    """Save parameters (and, for a TrainOneStepCell, optimizer states and step) to the
    directory ``path``; collective when the network is sharded: every rank calls it.

    ``extra``: small JSON-able data (data-loader position, seeds) returned by
    :func:`load_distributed_checkpoint`. Refuses NaN/inf values unless
    ``allow_non_finite``; raises FileExistsError while another process saves to ``path``,
    NoSpaceError when the disk cannot hold it. On any failure the previous checkpoint at
    ``path`` is kept and nothing new is left behind. Returns ``path``.
    """
    world = world if world is not None else _context_world("save_checkpoint")
    network, optimizer = _split_obj(obj)
    step = optimizer.step_count if optimizer is not None else 0
    path = os.path.abspath(os.fspath(path))
    where = f"save_checkpoint({path!r})"
    head = _manifest_head(network, optimizer, step, world, _checked_extra(extra))
    held = _held(network, optimizer, world.rank)
    needed = _check_values(world, where, held, allow_non_finite)
    tmp, lock, error = temp_dir(path, step), None, None
    if world.rank == 0:
        lock, error = _attempt(path, needed, prepare_save, path, step, needed)
    _agree(world, where, error)
    try:
        entries, error = _attempt(path, needed, _write_rank, tmp, world.rank, held)
        per_rank = _agree(world, where, error, entries)   # collective: all files written
        if world.rank == 0:
            manifest = head | {"tensors": _merge_entries(per_rank)}
            _, error = _attempt(path, needed, _publish_checked, tmp, path, manifest)
        _agree(world, where, error)
    except BaseException:
        if world.rank == 0:
            abandon(tmp)
        raise
    finally:
        if lock is not None:
            release_lock(path, lock)
    return path


def _context_world(where: str):
    """The world of the parallel context; under an MPI launcher, only after autopar.init():
    without it every rank would save alone as rank 0, all to the same files."""
    from ..context import current_world, require_init
    require_init(where)
    return current_world()


def _publish_checked(tmp: str, path: str, manifest: dict) -> None:
    _validate(manifest, tmp)   # the manifest we are about to publish covers every tensor once
    publish(tmp, path, manifest)


# ---- load ---------------------------------------------------------------------------------

def load_checkpoint(path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (parameters and optimizer states), assembled whole,
    every piece's checksum verified."""
    directory, manifest = read_manifest(path)
    return _read_all(directory, manifest)


def _read_all(directory: str, manifest: dict) -> dict[str, np.ndarray]:
    reader = _Reader(directory, manifest)
    try:
        return {name: reader.read(name) for name in manifest["tensors"]}
    finally:
        reader.close()


def _global_param(target):
    """The Parameter behind an optimizer target (itself, or the parameter of a shard)."""
    return target.param if isinstance(target, (ParamShard, AbsentShard)) else target


def _model_tensors(network, optimizer) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (global shape, dtype)} of every tensor the model would load: parameters and,
    for a trainer, ``"{state}.{param}"`` optimizer states (in the parameter's dtype)."""
    out = {name: (tuple(p.shape), np.dtype(p.dtype).name) for name, p in network.parameters_dict().items()}
    if optimizer is not None:
        for t in optimizer.params:
            p = _global_param(t)
            out |= {f"{s}.{p.name}": (tuple(p.shape), np.dtype(p.dtype).name) for s in optimizer.state_names}
    return out


def _check_manifest_shapes(directory: str, manifest: dict, model: dict) -> None:
    given = {n: (tuple(e["shape"]), e["dtype"]) for n, e in manifest["tensors"].items()}
    _check_shapes(f"load checkpoint {directory!r}", "the checkpoint", model, given)


def load_param_into_net(net, path_or_dict, strict: bool = True) -> list[str]:
    """Set every parameter of ``net`` from a checkpoint path or a ``{name: array}`` dict
    (optimizer states, ``"{state}.{param}"``, are skipped). Every shape is checked before
    any parameter is set. Returns the names of parameters not found (only possible with
    ``strict=False``)."""
    network, _ = _split_obj(net)
    params = network.parameters_dict()
    model = _model_tensors(network, None)
    if isinstance(path_or_dict, dict):
        values = path_or_dict
        _check_shapes("load_param_into_net", "the given dict", model,
                      {n: (tuple(np.shape(v)), None) for n, v in values.items()})
    else:
        directory, manifest = read_manifest(path_or_dict)
        _check_manifest_shapes(directory, manifest, model)
        values = _read_all(directory, manifest)
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


def _shard_world(params: dict):
    """The communicator of a sharded network's shards (its ranks load together), else None."""
    return next((p._shard[1] for p in params.values() if p._shard is not None), None)


def load_distributed_checkpoint(obj, path, *, inputs: tuple | None = None, strict: bool = True,
                                verify: bool = True) -> dict:
    """Load ``path`` onto ``obj`` (a Cell or TrainOneStepCell) under the current plan: each
    rank reads only the regions it holds (a ParamShard's ``region``, else whole tensors),
    so any device count or strategy (or serial) loads any checkpoint. For a trainer, the
    optimizer states are read the same way and ``step_count`` restored. Returns ``extra``.

    Every tensor's global shape and dtype is checked against the model first, and nothing
    is assigned until everything this rank needs has been read: a failed load leaves the
    model as it was (on a sharded network, on every rank: they agree before assigning).

    ``inputs``: example inputs of a sharded trainer not yet run, to build its program first
    (its optimizer must hold its shards before states can be placed). ``verify=False``
    reads pieces partly where only part is needed, skipping their checksums; by default
    every piece touched is read whole and verified.
    """
    network, optimizer = _split_obj(obj)
    directory, manifest = read_manifest(path)
    where = f"load_distributed_checkpoint({directory!r})"
    tensors = manifest["tensors"]
    params = network.parameters_dict()
    stored = {n for n, e in tensors.items() if e.get("kind", "parameter") == "parameter"}
    _check_names(where, set(params), stored, strict)
    _check_manifest_shapes(directory, manifest, _model_tensors(network, optimizer))
    if optimizer is not None:
        _check_state_names(where, optimizer, tensors, strict)
    if inputs is not None and optimizer is not None:
        _bind(obj, inputs)
    if optimizer is not None:
        _check_bound(where, optimizer, network, tensors)
    reader = _Reader(directory, manifest, verify)
    try:
        read, error = _read_mine(reader, tensors, params, optimizer), None
    except Exception as err:   # noqa: BLE001 - the ranks agree before any assigns
        read, error = None, err
    finally:
        reader.close()
    _agree(_shard_world(params), where, error)
    values, states = read
    for p, shard, value in values:
        if shard is None:
            p.set_data(value)
        else:
            shard._data = value
    if optimizer is not None:
        optimizer.states, optimizer.step_count = states, manifest["step"]
    return dict(manifest["extra"])


def _check_state_names(where: str, optimizer, tensors: dict, strict: bool) -> None:
    stored = {n for n, e in tensors.items() if e.get("kind") == "state"}
    if stored:
        expected = {f"{s}.{t.name}" for t in optimizer.params for s in optimizer.state_names}
        _check_names(where, expected, stored, strict)


def _check_bound(where: str, optimizer, network, tensors: dict) -> None:
    """States are placed by the shards the optimizer holds: a sharded or pipelined trainer
    must have built its program first."""
    if not any(e.get("kind") == "state" for e in tensors.values()):
        return
    bound = any(isinstance(t, ParamShard) for t in optimizer.params)
    setting = parallel_setting()
    if not bound and (setting is not None or pipelined(network, setting)):   # a PipelineCell binds shards
        raise _fail(where, "optimizer", "bound to this rank's shards before its states load",
                    "an optimizer over whole parameters", "pass inputs=(example batch,) to build the program")


def _read_mine(reader: _Reader, tensors: dict, params: dict, optimizer):
    """Everything this rank loads, read and verified but not yet assigned:
    [(parameter, its shard or None, value)] and the optimizer's new states (or None)."""
    values = []
    for name, p in params.items():
        shard = p._shard[0] if p._shard is not None else None
        if name not in tensors or isinstance(shard, AbsentShard):   # another pipeline stage's: nothing to read
            continue
        if shard is None:
            values.append((p, None, reader.read(name)))
        else:
            values.append((p, shard, reader.read(name, _holder_region(shard)).astype(p.dtype, copy=False)))
    return values, None if optimizer is None else _read_states(optimizer, reader, tensors)


def _read_states(optimizer, reader: _Reader, tensors: dict) -> list[dict]:
    stored = any(e.get("kind") == "state" for e in tensors.values())
    states = []
    for t in optimizer.params:   # a parameter with any state missing (strict=False) starts afresh
        names = [f"{s}.{t.name}" for s in optimizer.state_names]
        have = stored and all(n in tensors for n in names)
        states.append({s: reader.read(n, _holder_region(t)).astype(t.dtype)
                       for s, n in zip(optimizer.state_names, names)} if have else {})
    return states


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
        every, keep = (check_int("ModelCheckpoint", arg, value, 1) for arg, value in (("every", every), ("keep", keep)))
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
        world = world if world is not None else _context_world("ModelCheckpoint")
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

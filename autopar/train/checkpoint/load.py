"""Loading a checkpoint onto a network and its optimizer under any plan, and exporting it.

Loading validates the manifest before reading a byte of data (file names inside the
directory, dtype allowlist, regions inside the shape covering it exactly once), checks
every tensor's global shape and dtype against the model before touching it, reads
everything this rank needs (every piece's shape, dtype and checksum checked) and only then
assigns: a failed load leaves the model as it was. No pickle: loading executes nothing.
"""
from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save as _st_bytes

from ...runtime.pipeline.program import pipelined
from ...runtime.pipeline.shards import AbsentShard
from ...runtime.setting import parallel_setting
from ...runtime.shards import ParamShard
from .agreement import agree
from .format import FORMAT, read_manifest, value_error
from .holdings import holder_region, loss_scale_of, model_tensors, shard_world, split_model
from .reader import PieceReader, read_all
from .safe_save import write_bytes


def _check_names(where: str, expected: set[str], given: set[str], strict: bool) -> list[str]:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if strict and (missing or unexpected):
        raise value_error(where, "parameter names", "the network's parameters exactly",
                          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
                          "load a checkpoint of the same network, or pass strict=False")
    return missing


def _check_shapes(where: str, source: str, model: dict, given: dict) -> None:
    """Every tensor found in both agrees in global shape (and dtype, where ``given`` has
    one) -- checked for all before any is loaded, on every load path alike."""
    def spec(shape, dtype):
        return f"{shape} {dtype}" if dtype else str(shape)

    def agrees(name):
        (shape, dtype), (want_shape, want_dtype) = given[name], model[name]
        return shape == want_shape and dtype in (None, want_dtype)
    wrong = [n for n in model if n in given and not agrees(n)]   # in the model's order
    if wrong:
        (shape, dtype), (want_shape, want_dtype) = given[wrong[0]], model[wrong[0]]
        more = f" (and {len(wrong) - 1} more tensors, e.g. {wrong[1:4]})" if len(wrong) > 1 else ""
        raise value_error(where, f"tensor {wrong[0]!r}", f"{spec(want_shape, dtype and want_dtype)} (the model's)",
                          f"{spec(shape, dtype)} in {source}{more}",
                          "build the model with the checkpoint's config (autopar.train.checkpoint.read_config) "
                          "or load the checkpoint of this model")


def load_checkpoint(path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (parameters and optimizer states), assembled whole,
    every piece's checksum verified."""
    directory, manifest = read_manifest(path)
    return read_all(directory, manifest)


def _check_manifest_shapes(directory: str, manifest: dict, model: dict) -> None:
    given = {n: (tuple(e["shape"]), e["dtype"]) for n, e in manifest["tensors"].items()}
    _check_shapes(f"load checkpoint {directory!r}", "the checkpoint", model, given)


def load_param_into_net(net, path_or_dict, strict: bool = True) -> list[str]:
    """Set every parameter of ``net`` from a checkpoint path or a ``{name: array}`` dict
    (optimizer states, ``"{state}.{param}"``, are skipped). Every shape is checked before
    any parameter is set. Returns the names of parameters not found (only possible with
    ``strict=False``)."""
    network, _ = split_model(net)
    params = network.parameters_dict()
    model = model_tensors(network, None)
    if isinstance(path_or_dict, dict):
        values = path_or_dict
        _check_shapes("load_param_into_net", "the given dict", model,
                      {n: (tuple(np.shape(v)), None) for n, v in values.items()})
    else:
        directory, manifest = read_manifest(path_or_dict)
        _check_manifest_shapes(directory, manifest, model)
        values = read_all(directory, manifest)
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


def load_distributed_checkpoint(obj, path, *, inputs: tuple | None = None, strict: bool = True,
                                verify: bool = True) -> dict:
    """Load ``path`` onto ``obj`` (a Cell or TrainOneStepCell) under the current plan: each
    rank reads only the regions it holds (a ParamShard's ``region``, else whole tensors),
    so any device count or strategy (or serial) loads any checkpoint. For a trainer, the
    optimizer states are read the same way and ``step_count`` restored; for a
    TrainOneStepWithLossScaleCell, the loss scale's state too. Returns ``extra``.

    Every tensor's global shape and dtype is checked against the model first, and nothing
    is assigned until everything this rank needs has been read: a failed load leaves the
    model as it was (on a sharded network, on every rank: they agree before assigning).

    ``inputs``: example inputs of a sharded trainer not yet run, to build its program first
    (its optimizer must hold its shards before states can be placed). ``verify=False``
    reads pieces partly where only part is needed, skipping their checksums; by default
    every piece touched is read whole and verified.
    """
    network, optimizer = split_model(obj)
    directory, manifest = read_manifest(path)
    where = f"load_distributed_checkpoint({directory!r})"
    tensors = manifest["tensors"]
    params = network.parameters_dict()
    stored = {n for n, e in tensors.items() if e.get("kind", "parameter") == "parameter"}
    _check_names(where, set(params), stored, strict)
    _check_manifest_shapes(directory, manifest, model_tensors(network, optimizer))
    if optimizer is not None:
        _check_state_names(where, optimizer, tensors, strict)
    scale = _checked_loss_scale(where, loss_scale_of(obj), manifest.get("loss_scale"), strict)
    if inputs is not None and optimizer is not None:
        _bind(obj, inputs)
    if optimizer is not None:
        _check_bound(where, optimizer, network, tensors)
    reader = PieceReader(directory, manifest, verify)
    try:
        read, error = _read_mine(reader, tensors, params, optimizer), None
    except Exception as err:   # noqa: BLE001 - the ranks agree before any assigns
        read, error = None, err
    finally:
        reader.close()
    agree(shard_world(params), where, error)
    values, states = read
    for p, shard, value in values:
        if shard is None:
            p.set_data(value)
        else:
            shard._data = value
    if optimizer is not None:
        optimizer.states, optimizer.step_count = states, manifest["step"]
    if scale is not None:
        cell, state = scale
        cell.set_state(state)
    return dict(manifest["extra"])


def _checked_loss_scale(where: str, cell, saved: dict | None, strict: bool):
    """(the trainer's loss-scale cell, the saved state checked for it), or None when there is
    nothing to restore: no loss scale in the trainer (a float32 fine-tune of a float16 run)
    or none saved (a run without one: the trainer keeps its own). A scale of another kind
    than the trainer's is refused (``strict=False``: the trainer keeps its own)."""
    if cell is None or saved is None:
        return None
    mine = type(cell).__name__
    if saved["cell"] != mine:
        if not strict:
            return None
        raise value_error(where, "loss_scale", f"the state of a {mine} (this trainer's)",
                          f"a {saved['cell']}'s state {saved['state']}",
                          f"build the trainer with a {saved['cell']}, as the run that saved it, or pass "
                          f"strict=False to keep this trainer's {cell!r}")
    return cell, cell.checked_state(saved["state"], f"{where}: loss_scale")


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
        raise value_error(where, "optimizer", "bound to this rank's shards before its states load",
                          "an optimizer over whole parameters", "pass inputs=(example batch,) to build the program")


def _read_mine(reader: PieceReader, tensors: dict, params: dict, optimizer):
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
            values.append((p, shard, reader.read(name, holder_region(shard)).astype(p.dtype, copy=False)))
    return values, None if optimizer is None else _read_states(optimizer, reader, tensors)


def _read_states(optimizer, reader: PieceReader, tensors: dict) -> list[dict]:
    stored = any(e.get("kind") == "state" for e in tensors.values())
    states = []
    for t in optimizer.params:   # a parameter with any state missing (strict=False) starts afresh
        names = [f"{s}.{t.name}" for s in optimizer.state_names]
        have = stored and all(n in tensors for n in names)
        states.append({s: reader.read(n, holder_region(t)).astype(t.dtype)
                       for s, n in zip(optimizer.state_names, names)} if have else {})
    return states


def merge(path, out_file) -> str:
    """Write every full tensor of the checkpoint to one safetensors file (for export)."""
    directory, manifest = read_manifest(path)
    tensors = load_checkpoint(directory)
    out_file = os.fspath(out_file)
    part = out_file + ".part"
    write_bytes(part, _st_bytes(tensors, metadata={"step": str(manifest["step"]), "format": FORMAT}))
    os.replace(part, out_file)
    return out_file

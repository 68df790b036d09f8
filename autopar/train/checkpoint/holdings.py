"""What a model holds, as checkpoint tensors: its parameters and optimizer states by
name, their global shapes, and the block (region) of each this rank holds and whether it
writes it -- the model's side of both saving and loading."""
from __future__ import annotations

import numpy as np

from ...backend import to_host
from ...errors import format_error
from ...nn.cell import Cell
from ...nn.loss_scale import LossScaleUpdateCell, TrainOneStepWithLossScaleCell
from ...runtime.pipeline.shards import AbsentShard
from ...runtime.shards import ParamShard
from .format import DTYPES, Region, full_region, region_of, value_error


def split_model(obj):
    """(network, optimizer or None) of a TrainOneStepCell or a Cell."""
    if hasattr(obj, "network") and hasattr(obj, "optimizer"):
        return obj.network, obj.optimizer
    if isinstance(obj, Cell):
        return obj, None
    raise TypeError(format_error("checkpoint", "obj", "a Cell or a TrainOneStepCell", type(obj).__name__))


def loss_scale_of(obj) -> LossScaleUpdateCell | None:
    """The loss scale of a TrainOneStepWithLossScaleCell (its state is saved and restored
    with the checkpoint), else None."""
    return obj.scale_sense if isinstance(obj, TrainOneStepWithLossScaleCell) else None


def layout_json(layout) -> dict:
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
        raise value_error("save_checkpoint", f"tensor {name!r} dtype", f"one of {DTYPES}", dtype)
    entry = {"name": name, "array": np.ascontiguousarray(array), "shape": shape, "dtype": dtype}
    if sharded:
        layout = holder.layout
        if layout.partial:
            raise value_error("save_checkpoint", f"tensor {name!r} layout", "no partial sums", str(layout),
                              "reduce the value before saving")
        coord = layout.mesh.coord(holder.rank)   # one writer per block: coordinate 0 on the replicas
        entry.update(region=region_of(holder.region), layout=layout_json(layout),
                     writer=_first_copy(holder) and all(coord[a] == 0 for a in layout.replicated_axes()))
    else:
        entry.update(region=full_region(shape), layout=None, writer=world_rank == 0)
    return entry


def held_tensors(network, optimizer, world_rank: int) -> list[dict]:
    """Every tensor this rank holds: parameters, then optimizer states (none of another
    pipeline stage's parameters)."""
    out = []
    for name, p in network.parameters_dict().items():
        holder = p._shard[0] if p._shard is not None else p
        if not isinstance(holder, AbsentShard):
            out.append(_block(name, holder, to_host(holder.data), world_rank) | {"kind": "parameter"})
    if optimizer is not None:
        for target, states in zip(optimizer.params, optimizer.states):
            if isinstance(target, AbsentShard):
                continue
            for s, array in states.items():
                out.append(_block(f"{s}.{target.name}", target, to_host(array), world_rank) | {"kind": "state"})
    return out


def _global_param(target):
    """The Parameter behind an optimizer target (itself, or the parameter of a shard)."""
    return target.param if isinstance(target, (ParamShard, AbsentShard)) else target


def model_tensors(network, optimizer) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (global shape, dtype)} of every tensor the model would load: parameters and,
    for a trainer, ``"{state}.{param}"`` optimizer states (in the parameter's dtype)."""
    out = {name: (tuple(p.shape), np.dtype(p.dtype).name) for name, p in network.parameters_dict().items()}
    if optimizer is not None:
        for t in optimizer.params:
            p = _global_param(t)
            out |= {f"{s}.{p.name}": (tuple(p.shape), np.dtype(p.dtype).name) for s in optimizer.state_names}
    return out


def holder_region(holder) -> Region:
    """The global region a holder keeps: a shard's (empty for another pipeline stage's
    parameter), else all of the tensor."""
    return region_of(holder.region) if isinstance(holder, (ParamShard, AbsentShard)) else full_region(holder.shape)


def shard_world(params: dict):
    """The communicator of a sharded network's shards (its ranks load together), else None."""
    return next((p._shard[1] for p in params.values() if p._shard is not None), None)

"""Strategy files: a :class:`ShardingPlan` as versioned, human-readable JSON.

MindSpore's ``strategy_ckpt_save_file`` writes the plan a compile used;
``strategy_ckpt_load_file`` makes a later compile use exactly that plan, whatever the
network's ``.shard()`` annotations say (an unannotated network included). Version 1, on a
4-device stage (``...`` elides entries)::

    {
      "format": "autopar-strategy",
      "version": 1,
      "device_num": 4,
      "stage": {"shape": [4], "names": ["devices"], "ranks": [0, 1, 2, 3]},
      "inputs": [{"shape": [4, 17], "layout": {...}}],       # one per graph input, null for None
      "parameters": {
        "blocks.0.attention.dense1.weight": {"shape": [32, 32], "layout": {
          "device_matrix": {"shape": [2, 2], "names": ["x", "y"]}, "dims": [[1], []], "partial": [],
          "mindspore": {"device_matrix": [2, 2], "tensor_map": [0, -1]}}}, ...},
      "constants": [{"shape": [1, 1, 16, 16], "used_by": "blocks.0.attention/Add", "layout": {...}}, ...],
      "ops": {
        "blocks.0.attention.dense1/MatMul": {
          "scope": "blocks.0.attention.dense1", "kind": "MatMul",
          "strategy": [[2, 1], [2, 1]],                         # MindSpore's in_strategy
          "device_matrix": {"shape": [2, 2], "names": ["x", "y"]},
          "axes": {"x": [0], "y": [1]},                         # index letter -> mesh axes
          "output_layout": {...}}, ...},
      "predicted": {"step_seconds": 0.12, "memory_bytes_per_rank": 1.5e9, "breakdown": {...}}
    }

Version 2 holds a pipeline: one such plan per stage, each planned on its stage's ranks
(stage-major: stage k holds ranks ``k*n .. k*n + n - 1``) for the graph of that stage's
ops (:mod:`autopar.strategy.pipeline.stage_graph`)::

    {
      "format": "autopar-strategy",
      "version": 2,
      "device_num": 8,                      # all ranks
      "pipeline_stages": 2,
      "stages": [
        {"device_num": 4, "stage": {..., "ranks": [0, 1, 2, 3]}, "inputs": [...], "parameters": {...},
         "constants": [...], "ops": {...}, "predicted": {...}},     # stage 0: version 1's keys
        {"device_num": 4, "stage": {..., "ranks": [4, 5, 6, 7]}, ...}
      ]
    }

A plan without a pipeline is still written as version 1; both versions load (a version-1
file as a one-stage pipeline, a one-stage version-2 file as a plain plan).

Ops are keyed by their unique node name (``scope/Kind``, ``-k`` when repeated), parameters
by name, inputs and constants by position. The op's letters are those of its rule
(``node.prim.indexing``), recomputed on load; a device matrix carries ``ranks`` only when
they differ from the stage's. Layouts of op outputs follow from the shardings and are
written to be read and checked, not trusted. Loading re-validates everything against the
graph: a bad file, or one saved for another model or device count, is a ``ValueError``
naming the file and the entry (the reading: :mod:`autopar.strategy.strategy_load`).
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from ..errors import format_error
from ..ir.graph import Graph
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from .sharding_plan import ShardingPlan
from .strategy_load import (  # noqa: F401  (load_strategy, load_pipeline_strategy: re-exported beside the saves)
    FORMAT,
    JOINT_PLAN,
    PIPELINE_VERSION,
    VERSION,
    StrategyReader,
    check_args,
    file_version,
    forward_nodes,
    load_pipeline_strategy,
    load_strategy,
    mindspore_json,
    read_strategy_json,
)

# ---- save ---------------------------------------------------------------------------------

def save_strategy(path, graph: Graph, plan: ShardingPlan, predicted: dict | None = None,
                  only_trainable: bool = False) -> None:
    """Write ``plan`` for ``graph`` to ``path`` atomically (every rank may write the same file).
    ``only_trainable`` (MindSpore's ``only_trainable_params``): list the layouts of trainable
    parameters only; a frozen one then takes, at load, the layout its first reader reads it in."""
    path = check_args(path, graph)
    _check_plan_args(plan, predicted)
    _write_atomic(path, _dumps(plan_to_json(graph, plan, predicted, only_trainable)) + "\n")


def save_pipeline_strategy(path, graphs, plans, predicted=None, only_trainable: bool = False) -> None:
    """Write a pipeline's plans, ``plans[k]`` for the stage graph ``graphs[k]``, to ``path``
    as one version-2 file, atomically. ``predicted``: one dict (or None) per stage."""
    graphs, plans = list(graphs), list(plans)
    predicted = list(predicted) if predicted is not None else [None] * len(plans)
    if not graphs or not len(graphs) == len(plans) == len(predicted):
        raise ValueError(format_error("save_pipeline_strategy", "graphs, plans, predicted",
                                      "one of each per stage (at least one stage)",
                                      f"{len(graphs)}, {len(plans)}, {len(predicted)}"))
    stages = []
    for graph, plan, pred in zip(graphs, plans, predicted):
        path = check_args(path, graph)
        _check_plan_args(plan, pred)
        stages.append(_plan_body(graph, plan, pred, only_trainable))
    doc = {"format": FORMAT, "version": PIPELINE_VERSION, "device_num": sum(p.stage.size for p in plans),
           "pipeline_stages": len(plans), "stages": stages}
    _write_atomic(path, _dumps(doc) + "\n")


def add_joint_plan(path, record: dict) -> None:
    """Add the ``auto_parallel`` joint plan ``record`` (stages, micro-batches, recompute, ...)
    to the strategy file ``path`` a run just saved, so loading the file replays that plan."""
    doc, _ = read_strategy_json(os.fspath(path))
    doc[JOINT_PLAN] = record
    _write_atomic(os.fspath(path), _dumps(doc) + "\n")


def read_joint_plan(path) -> dict | None:
    """The joint plan saved in the strategy file ``path``, or None (a hand-planned run's file)."""
    doc, where = read_strategy_json(os.fspath(path))
    r = StrategyReader(where)
    file_version(r, doc)
    return None if JOINT_PLAN not in doc else r.as_dict(doc[JOINT_PLAN], JOINT_PLAN)


def _check_plan_args(plan, predicted) -> None:
    if not isinstance(plan, ShardingPlan):
        raise TypeError(format_error("save_strategy", "plan", "a ShardingPlan", type(plan).__name__))
    if predicted is not None:
        if not isinstance(predicted, dict):
            raise TypeError(format_error("save_strategy", "predicted", "a dict or None", type(predicted).__name__))
        try:
            json.dumps(predicted, default=_plain, allow_nan=False)
        except ValueError as err:
            raise ValueError(format_error("save_strategy", "predicted", "finite numbers", str(err))) from None


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plan_to_json(graph: Graph, plan: ShardingPlan, predicted: dict | None = None, only_trainable: bool = False) -> dict:
    """The file's content as a JSON-ready dict (version 1)."""
    return {"format": FORMAT, "version": VERSION} | _plan_body(graph, plan, predicted, only_trainable)


def _plan_body(graph: Graph, plan: ShardingPlan, predicted: dict | None, only_trainable: bool = False) -> dict:
    """One plan's entries: version 1 without its format and version (a version-2 stage)."""
    stage = plan.stage
    names = graph.param_names()
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(format_error("save_strategy", "parameters", "unique parameter names",
                                      f"duplicates {dup}", "give every Parameter its own name"))
    forward = forward_nodes(graph)
    homes = set(graph.inputs) | set(graph.params) | set(graph.consts) | {n.outputs[0] for n in forward}
    stray = sorted(set(plan.layouts) - homes)
    if stray:
        raise ValueError(format_error("save_strategy", "plan.layouts", "layouts of inputs, parameters, constants "
                                      "and first op outputs only", f"value v{stray[0]} too"))
    first_use = {}
    for node in graph.nodes:
        for v in node.inputs:
            first_use.setdefault(v, node.name)
    ops = {}
    for node in forward:
        sharding = plan.shardings.get(node.id)
        if sharding is None:
            raise ValueError(format_error("save_strategy", f"plan.shardings[{node.name}]",
                                          "a sharding for every forward op", "none"))
        out = plan.layouts.get(node.outputs[0])
        if out is not None and out != sharding.home_layout():
            raise ValueError(format_error("save_strategy", f"{node.name} output layout",
                                          f"its sharding's {sharding.home_layout()} (what lowering uses)",
                                          str(out)))
        ops[node.name] = {
            "scope": node.scope, "kind": node.prim.kind,
            "strategy": [list(s) for s in sharding.splits()],
            "device_matrix": _mesh_json(sharding.mesh, stage),
            "axes": {ch: list(axes) for ch, axes in sharding.axes},
            "output_layout": _maybe_layout(out, stage),
        }
        if sharding.out_dims is not None:      # an out_strategy: the output's home dims (mesh axes per dim)
            ops[node.name]["out_dims"] = [list(d) for d in sharding.out_dims]
        if sharding.interleave is not None:    # a Layout's interleaved_parallel: the op runs as k copies
            ops[node.name]["interleave"] = list(sharding.interleave)
    doc = {
        "device_num": stage.size,
        "stage": {"shape": list(stage.shape), "names": list(stage.names), "ranks": list(stage.ranks)},
        "inputs": [None if v is None else {"shape": list(graph.spec(v).shape),
                                           "layout": _maybe_layout(plan.layouts.get(v), stage)}
                   for v in graph.inputs],
        "parameters": {p.name: {"shape": list(graph.spec(v).shape),
                                "layout": _maybe_layout(plan.layouts.get(v), stage)}
                       for v, p in zip(graph.params, graph.param_objs) if p.requires_grad or not only_trainable},
        "constants": [{"shape": list(graph.spec(v).shape), "used_by": first_use.get(v),
                       "layout": _maybe_layout(plan.layouts.get(v), stage)} for v in graph.consts],
        "ops": ops,
    }
    if predicted is not None:
        doc["predicted"] = predicted
    return doc


def _mesh_json(mesh: Mesh, stage: Mesh) -> dict:
    out = {"shape": list(mesh.shape), "names": list(mesh.names)}
    if mesh.ranks != stage.ranks:
        out["ranks"] = list(mesh.ranks)
    return out


def _maybe_layout(layout: Layout | None, stage: Mesh) -> dict | None:
    if layout is None:
        return None
    return {"device_matrix": _mesh_json(layout.mesh, stage), "dims": [list(d) for d in layout.dims],
            "partial": list(layout.partial), "mindspore": mindspore_json(layout)}


def _plain(x):
    """numpy scalars and arrays (in ``predicted``) as JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(format_error("save_strategy", "predicted", "JSON values (numbers, strings, lists, dicts)",
                                 type(x).__name__))


def _dumps(obj, depth: int = 0, width: int = 96) -> str:
    """JSON with one entry per line down to what fits on a line (split tuples stay inline)."""
    flat = json.dumps(obj, default=_plain, allow_nan=False)
    nested = isinstance(obj, (dict, list)) and any(isinstance(x, (dict, list))
                                                   for x in (obj.values() if isinstance(obj, dict) else obj))
    if len(flat) + 2 * depth <= width or not obj or not nested:
        return flat
    pad, end = "  " * (depth + 1), "  " * depth
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1, width)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    items = [pad + _dumps(v, depth + 1, width) for v in obj]
    return "[\n" + ",\n".join(items) + f"\n{end}]"



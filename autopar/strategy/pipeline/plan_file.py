"""The stage-plan file: what ``python -m autopar.plan --json`` writes and a run loads.

The planner's joint choice (stages, layer split, data x model degrees, micro-batches,
schedule, recompute, optimizer parallel, compute dtype) for one model shape, as JSON a run
can replay without importing the planner. Layout, version 1::

    {"version": 1, "kind": "autopar.stage_plan",
     "model": {"family": "pangu_alpha", "preset": "tiny",     # the config the plan is for:
               "overrides": {"hidden_size": 64, ...},         #   Config.preset(preset, **overrides)
               "pipelined_layers": 3},
     "devices": 8, "profile": "a100-8", "global_batch": 16,
     "chosen": "searched",                                    # the plan a run takes by default
     "plans": {"searched": {"pp": 2, "dp": 2, "mp": 2, "micro_batches": 4,
                            "micro_batch_size": 4,            # sequences in one micro-batch, all dp ranks
                            "layers_per_stage": [2, 1], "recompute": false,
                            "optimizer_parallel": true, "schedule": "1f1b",
                            "compute_dtype": "float16",
                            "predicted": {"step_seconds": 0.8, ...}},
               "hand-given": {...}}}                          # optional: plans priced beside it

:func:`load_stage_plan` checks every key (type, range, and the degrees against each other:
``pp x dp x mp = devices``, ``micro_batches x micro_batch_size = global_batch``, the layer
split against the pipelined layers) and names the key path in its error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ...dtype import FLOAT_DTYPES
from ...errors import format_error, is_int
from .stage_search import StagePlan, StageSetting

VERSION = 1
KIND = "autopar.stage_plan"
SCHEDULES = ("1f1b", "gpipe")       # what the pipeline runner executes
PLAN_KEYS = ("pp", "dp", "mp", "micro_batches", "micro_batch_size", "layers_per_stage", "recompute",
             "optimizer_parallel", "schedule", "compute_dtype")


@dataclass(frozen=True)
class LoadedStagePlan:
    """One plan of a stage-plan file, checked: the model it is for and its parallel settings.

    ``overrides`` holds the config fields over ``preset`` as sorted (field, value) pairs (JSON
    lists as tuples), so the value stays hashable; :meth:`config_overrides` gives them as a
    dict for ``Config.preset(preset, **overrides)``."""
    family: str
    preset: str
    overrides: tuple[tuple[str, object], ...]
    pipelined_layers: int
    devices: int
    profile: str
    global_batch: int
    name: str                       # which entry of "plans"
    pp: int
    dp: int
    mp: int
    micro_batches: int
    micro_batch_size: int           # sequences per micro-batch over all data-parallel ranks
    layers_per_stage: tuple[int, ...]
    recompute: bool
    optimizer_parallel: bool
    schedule: str
    compute_dtype: str
    predicted_step_seconds: float | None = None

    def config_overrides(self) -> dict:
        return dict(self.overrides)

    def setting(self) -> StageSetting:
        """The stage search's setting of this plan (for pricing it again)."""
        return StageSetting(self.pp, self.dp, self.mp, self.micro_batches, self.recompute,
                            self.optimizer_parallel, self.layers_per_stage)


def plan_entry(plan: StagePlan, schedule: str, compute_dtype: str) -> dict:
    """One entry of "plans": the settings a run needs and the prediction it was chosen by."""
    return {"pp": plan.pp, "dp": plan.dp, "mp": plan.mp, "micro_batches": plan.micro_batches,
            "micro_batch_size": plan.micro_batch_size, "layers_per_stage": list(plan.layers_per_stage),
            "recompute": plan.recompute, "optimizer_parallel": plan.optimizer_parallel,
            "schedule": schedule, "compute_dtype": compute_dtype,
            "predicted": {"step_seconds": plan.step_seconds, "compute_s": plan.compute_s, "comm_s": plan.comm_s,
                          "bubble_s": plan.bubble_s, "update_s": plan.update_s,
                          "memory_bytes_per_stage": list(plan.memory_bytes)}}


def stage_plan_document(family: str, preset: str, overrides: dict, pipelined_layers: int, devices: int,
                        profile: str, global_batch: int, plans: dict, chosen: str = "searched") -> dict:
    """The whole file as a dict; ``plans`` maps a name to a :func:`plan_entry`."""
    return {"version": VERSION, "kind": KIND,
            "model": {"family": family, "preset": preset, "overrides": dict(overrides),
                      "pipelined_layers": pipelined_layers},
            "devices": devices, "profile": profile, "global_batch": global_batch,
            "chosen": chosen, "plans": dict(plans)}


def save_stage_plan(path: str, document: dict) -> None:
    """Write ``document`` after checking it loads, so a file written is a file a run accepts."""
    _check_document(str(path), document, document["chosen"])
    with open(path, "w") as f:
        json.dump(document, f, indent=1)


def load_stage_plan(path, which: str | None = None) -> LoadedStagePlan:
    """The plan ``which`` (default: the file's "chosen") of the stage-plan file ``path``;
    ValueError/TypeError naming the path and the key for anything a run could not use."""
    where = str(path)
    with open(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(format_error(where, "contents", "a JSON stage-plan file (python -m autopar.plan --json)",
                                      f"invalid JSON ({err})")) from None
    return _check_document(where, doc, which)


# ---------------------------------------------------------------------------- checks

class _Reader:
    """Reads keys of nested JSON objects, each check naming the key path (``plans.searched.pp``)."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, expected: str, actual, error=ValueError, fix: str = ""):
        raise error(format_error(self.where, key, expected, actual, fix))

    def get(self, obj: dict, path: str, key: str, expected: str):
        full = f"{path}.{key}" if path else key
        if key not in obj:
            self.fail(full, expected, "no such key", fix="write the file with python -m autopar.plan --json")
        return full, obj[key]

    def obj(self, obj: dict, path: str, key: str) -> dict:
        full, v = self.get(obj, path, key, "a JSON object")
        if not isinstance(v, dict):
            self.fail(full, "a JSON object", repr(v), TypeError)
        return v

    def int(self, obj: dict, path: str, key: str, low: int = 1) -> int:
        full, v = self.get(obj, path, key, f"an int >= {low}")
        if not is_int(v):
            self.fail(full, f"an int >= {low}", repr(v), TypeError)
        if v < low:
            self.fail(full, f"an int >= {low}", repr(v))
        return int(v)

    def bool(self, obj: dict, path: str, key: str) -> bool:
        full, v = self.get(obj, path, key, "true or false")
        if not isinstance(v, bool):
            self.fail(full, "true or false", repr(v), TypeError)
        return v

    def str(self, obj: dict, path: str, key: str, choices: tuple[str, ...] | None = None) -> str:
        expected = f"one of {list(choices)}" if choices else "a non-empty string"
        full, v = self.get(obj, path, key, expected)
        if not isinstance(v, str) or not v:
            self.fail(full, expected, repr(v), TypeError if not isinstance(v, str) else ValueError)
        if choices and v not in choices:
            self.fail(full, expected, repr(v))
        return v


def _check_document(where: str, doc, which: str | None) -> LoadedStagePlan:
    r = _Reader(where)
    if not isinstance(doc, dict):
        r.fail("contents", "a JSON object (a stage-plan file)", type(doc).__name__, TypeError)
    version = r.int(doc, "", "version")
    if version != VERSION:
        r.fail("version", f"{VERSION} (the layout this autopar reads)", repr(version),
               fix="write the plan again with this autopar's python -m autopar.plan --json")
    r.str(doc, "", "kind", (KIND,))
    model = r.obj(doc, "", "model")
    family, preset = r.str(model, "model", "family"), r.str(model, "model", "preset")
    overrides = r.obj(model, "model", "overrides")
    for key, value in overrides.items():
        if not _scalar(value) and not (isinstance(value, list) and all(_scalar(v) for v in value)):
            r.fail(f"model.overrides.{key}", "a config field's value: a number, string, true/false, null or a "
                   "list of those", repr(value), TypeError)
    layers = r.int(model, "model", "pipelined_layers")
    devices, batch = r.int(doc, "", "devices"), r.int(doc, "", "global_batch")
    profile = r.str(doc, "", "profile")
    plans = r.obj(doc, "", "plans")
    name = which if which is not None else r.str(doc, "", "chosen")
    if name not in plans:
        r.fail("chosen" if which is None else "which", f"one of the plans in the file {sorted(plans)}", repr(name))
    entry = r.obj(plans, "plans", name)
    path = f"plans.{name}"
    pp, dp, mp = (r.int(entry, path, k) for k in ("pp", "dp", "mp"))
    m, mbs = r.int(entry, path, "micro_batches"), r.int(entry, path, "micro_batch_size")
    if pp * dp * mp != devices:
        r.fail(f"{path}.pp x dp x mp", f"devices = {devices}", f"{pp} x {dp} x {mp} = {pp * dp * mp}")
    if m * mbs != batch:
        r.fail(f"{path}.micro_batches x micro_batch_size", f"global_batch = {batch}", f"{m} x {mbs} = {m * mbs}")
    if mbs % dp:
        r.fail(f"{path}.micro_batch_size", f"a multiple of dp = {dp} (every data-parallel rank takes a share)",
               str(mbs))
    split = _layer_split(r, entry, path, pp, layers)
    predicted = entry.get("predicted", {})
    step = predicted.get("step_seconds") if isinstance(predicted, dict) else None
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step)):
        r.fail(f"{path}.predicted.step_seconds", "a finite number of seconds", repr(step), TypeError)
    return LoadedStagePlan(
        family, preset, tuple(sorted((k, _frozen(v)) for k, v in overrides.items())), layers, devices, profile,
        batch, name, pp, dp, mp, m, mbs, split, r.bool(entry, path, "recompute"),
        r.bool(entry, path, "optimizer_parallel"), r.str(entry, path, "schedule", SCHEDULES),
        r.str(entry, path, "compute_dtype", FLOAT_DTYPES), None if step is None else float(step))


def _layer_split(r: _Reader, entry: dict, path: str, pp: int, layers: int) -> tuple[int, ...]:
    full, split = r.get(entry, path, "layers_per_stage", f"a list of {pp} layer counts")
    expected = f"a list of {pp} ints >= 1 (one per stage) summing to {layers} (model.pipelined_layers)"
    if not isinstance(split, list) or not all(is_int(n) for n in split):
        r.fail(full, expected, repr(split), TypeError)
    if len(split) != pp or min(split, default=0) < 1 or sum(split) != layers:
        r.fail(full, expected, repr(split))
    return tuple(int(n) for n in split)


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _frozen(value):
    """A JSON value made hashable: lists become tuples (a config's tuple fields, e.g. Yuan's
    layers_per_stage, are tuples)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


__all__ = ["LoadedStagePlan", "load_stage_plan", "save_stage_plan", "stage_plan_document", "plan_entry",
           "SCHEDULES", "VERSION"]

"""``auto_parallel`` runs the joint plan: whatever the user left open is searched, then run.

Under ``parallel_mode="auto_parallel"`` the training program of a cell is built from
:func:`~autopar.strategy.pipeline.auto.search_auto`'s choice of pipeline stages, layer
split, micro-batches, recompute and optimizer parallel, with every stage's ops searched on
its ranks. The user fixes any of them as usual and the search keeps it:

* ``pipeline_stages`` set (or cells annotated with ``pipeline_stage``): the stages are
  fixed (``auto_pipeline=True`` makes ``pipeline_stages`` an upper bound instead);
* a ``PipelineCell``: its micro-batches and schedule (``grad_accumulation_step`` set: the
  micro-batches);
* ``parallel_optimizer_config`` at ``level3``: one stage, one micro-batch;
* any cell marked ``recompute()``: the marks stand and the search adds none;
* ``enable_parallel_optimizer`` set: on or off as set.

With nothing left open the program is built as before. Rank 0 searches and broadcasts the
choice (every rank runs the same plan), prints it once beside the next-best plans, and
writes it into ``strategy_ckpt_save_file`` beside the stage plans (:func:`choice_record`).

Feeding: the script feeds each rank its data-parallel slice of the global batch (or the
whole batch, or its blocks under a ``dataset_strategy`` tuple, which only a plan of one
sharded program takes: :func:`_check_feed`), not knowing the plan. A pipeline wants the ranks at one position of every
stage fed the same rows, so when the plan has several stages each step all-gathers the
inputs (token ids: a few KiB) and every rank keeps its position's rows.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from ..errors import format_error
from ..ir.graph import Graph
from ..ir.spec import TensorSpec
from ..strategy.pipeline.auto import AutoFixed, AutoPlan, annotate, find_layer_stack, plan_table, search_auto
from ..strategy.sharding_plan import fed_splits, global_inputs
from ..strategy.strategy_file import add_joint_plan, read_joint_plan
from .pipeline.program import Pipelined, PipelineGradProgram
from .protocol import TrainingProgram
from .setting import CompileSetting, setting_key
from .sharded_program import ShardedGradProgram, fed_program_splits
from .trace import signature_key, trace


def open_choices(cell, graph: Graph, setting: CompileSetting) -> AutoFixed | None:
    """What the user fixed of the joint plan, or None when nothing is left to search (or the
    mode is not ``auto_parallel``)."""
    ctx = setting.ctx
    if setting.mode != "auto_parallel":
        return None
    marked_stages = any(n.stage is not None for n in graph.nodes)
    if ctx.auto_pipeline:
        pp, max_pp = None, ctx.pipeline_stages if ctx.is_set("pipeline_stages") else None
    elif ctx.is_set("pipeline_stages") or marked_stages:
        pp, max_pp = ctx.pipeline_stages, None
    else:
        pp, max_pp = None, None
    piped = isinstance(cell, Pipelined)
    zero3 = ctx.parallel_optimizer_config.shards_weights and (ctx.enable_parallel_optimizer
                                                              or not ctx.is_set("enable_parallel_optimizer"))
    if zero3 and not piped and pp is None:      # level3 runs without stages and micro-batches
        pp, max_pp = 1, None
    if piped:
        micro = cell.micro_size
    elif ctx.is_set("grad_accumulation_step"):
        micro = ctx.grad_accumulation_step
    else:
        micro = 1 if zero3 and pp == 1 else None
    fixed = AutoFixed(pp=pp, max_pp=max_pp, micro_batches=micro,
                      recompute=False if any(n.recompute for n in graph.nodes) else None,
                      optimizer_parallel=(ctx.enable_parallel_optimizer if ctx.is_set("enable_parallel_optimizer")
                                          else None),
                      schedule=cell.pipeline_schedule if piped else None,
                      keep_stages=marked_stages and not ctx.auto_pipeline,
                      virtual_stages=cell.virtual_stages if piped else (1 if marked_stages else None))   # None: 1 or 2
    if None not in (fixed.pp, fixed.micro_batches, fixed.recompute, fixed.optimizer_parallel):
        return None
    return fixed


def choice_record(plan: AutoPlan) -> dict:
    """The joint plan as a JSON object (what a strategy file keeps and a run replays)."""
    return asdict(plan)


def _broadcast_json(world, obj) -> object:
    """``obj`` of rank 0 on every rank (a small JSON value)."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if world.rank == 0 else None
    n = int(world.broadcast(np.array([0 if data is None else data.size], np.int64))[0])
    raw = world.broadcast(data if data is not None else np.zeros(n, np.uint8))
    return json.loads(bytes(np.asarray(raw, np.uint8)).decode())


def _rows_spec(a, rows: int):
    if not isinstance(a, (np.ndarray, TensorSpec)) or len(a.shape) == 0:
        return a
    return TensorSpec((rows,) + tuple(a.shape[1:]), a.dtype)


def _run_feed(choice: AutoPlan, cell, splits: tuple, args: tuple, devices: int, ctx):
    """The ``dataset_strategy`` the joint plan's program runs with. A tuple is fed as it says
    when the plan runs one sharded program; a pipeline or micro-batches regroup
    data-parallel rows, so there a tuple is taken only when it is ``"data_parallel"`` over
    every device (dim 0 split ``devices`` ways: run as that) or all 1s; any other is
    refused here rather than fed wrongly."""
    strategy = ctx.dataset_strategy
    if not isinstance(strategy, tuple) or ctx.loads_full_batch:
        return strategy
    if choice.pp == 1 and choice.micro_batches == 1 and not isinstance(cell, Pipelined):
        return strategy
    rows = fed_splits([tuple(a.shape) for a in args if isinstance(a, np.ndarray)], devices, False, "data_parallel")
    for k, (mine, want) in enumerate(zip(splits, rows)):
        if mine != want:
            raise ValueError(format_error(
                "auto_parallel", f"dataset_strategy input {k}",
                f"{want} (dim 0 split over all {devices} devices) or all 1s when the joint plan pipelines or "
                f"micro-batches (chosen: {choice.pp} stages, {choice.micro_batches} micro-batches)", str(mine),
                "set pipeline_stages=1 (and no PipelineCell) to keep one sharded program, or feed "
                "dataset_strategy='data_parallel' / 'full_batch'"))
    return "data_parallel"


class AutoGradProgram(TrainingProgram):
    """The program of the joint plan :attr:`choice` (a sharded program, or a pipeline one
    for several stages or micro-batches), fed what the script feeds (see the module doc)."""

    def __init__(self, inner: TrainingProgram, choice: AutoPlan, table: str, world, regroup: bool):
        self.inner, self.choice, self.table, self.world, self.regroup = inner, choice, table, world, regroup
        self.shards, self.param_shards = inner.shards, inner.param_shards
        self.program, self.comm_clock = inner.program, inner.comm_clock

    def __getattr__(self, name):          # layouts, plan, last_step, ...: the inner program's
        return getattr(self.inner, name)

    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0):
        return self.inner(_regrouped(args, self.world, self.choice.stage_devices) if self.regroup else args,
                          kwargs, step)

    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        return self.inner.global_norm(grads)

    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.inner.gathered(grads)

    def sync_weights(self) -> None:
        self.inner.sync_weights()

    def measure(self, meter) -> None:
        self.inner.measure(meter)


def _regrouped(args: tuple, world, n: int) -> tuple:
    """This rank's pipeline feed from every rank's data-parallel slice: the whole batch
    (all-gathered) cut into ``n`` position slices, this rank's position's slice."""
    pos = world.rank % n
    out = []
    for a in args:
        if isinstance(a, np.ndarray) and a.ndim:
            whole = world.allgather(np.ascontiguousarray(a), axis=0)       # (B/W, ...) -> (B, ...)
            per = whole.shape[0] // n
            out.append(whole[pos * per:(pos + 1) * per])                    # -> (B/n, ...)
        else:
            out.append(a)
    return tuple(out)


def auto_grad_program(cell, args: tuple, params: Sequence, sens: float,
                      setting: CompileSetting) -> AutoGradProgram | None:
    """The joint plan's training program for ``cell`` on ``args`` (this rank's feed), or
    None when the context leaves nothing to search."""
    network = cell.network if isinstance(cell, Pipelined) else cell
    world, ctx, whole = setting.world, setting.ctx, setting.full_batch
    splits = fed_program_splits(args, world.size, whole, ctx, setting.mode)     # the script's feed, checked
    global_args = global_inputs(args, splits)
    arrays = [a for a in global_args if isinstance(a, (np.ndarray, TensorSpec)) and len(a.shape)]
    batch = arrays[0].shape[0] if arrays else 1

    def graph_at(rows: int) -> Graph:
        return trace(network, tuple(_rows_spec(a, rows) for a in global_args), {}).graph

    graph = graph_at(batch)
    fixed = open_choices(cell, graph, setting)
    if fixed is None:
        return None
    # one search per cell, setting and input signature: a program compiled again for another
    # loss scale (a new sens) or the evaluation mode runs the plan already chosen
    key = ("auto-choice", setting_key(setting)) + signature_key(args, {})
    if key not in cell._compiled:
        cell._compiled[key] = _choose(graph_at, batch, fixed, setting)
        if world.rank == 0:                      # printed once, as the CLI prints it
            print(f"auto_parallel plan on {world.size} devices:\n{cell._compiled[key][1]}", flush=True)
    choice, table = cell._compiled[key]
    stack = find_layer_stack(graph)

    def marks(g: Graph) -> Graph:
        return annotate(g, stack, choice.layers_per_stage, choice.recompute, stages=not fixed.keep_stages,
                        selective=choice.selective)

    run_ctx = ctx.replace(enable_parallel_optimizer=choice.optimizer_parallel, pipeline_stages=choice.pp,
                          dataset_strategy=_run_feed(choice, cell, splits, args, world.size, ctx))
    options = dataclasses.replace(run_ctx.plan_options, memory_cap=math.inf)     # as the joint search planned
    if choice.pp == 1 and choice.micro_batches == 1 and not isinstance(cell, Pipelined):
        inner = ShardedGradProgram(network, args, params, setting.mode, world, whole, sens, ctx=run_ctx,
                                   annotate=marks, plan_options=options)
        regroup = False
    else:
        regroup = choice.pp > 1 and not whole
        fed = _regrouped(args, world, choice.stage_devices) if regroup else args
        inner = PipelineGradProgram(network, fed, params, world, stages=choice.pp, micro=choice.micro_batches,
                                    schedule=choice.schedule, mode=setting.mode, full_batch=whole, sens=sens,
                                    ctx=run_ctx, annotate=marks, plan_options=options,
                                    virtual=choice.virtual_stages)
    if ctx.strategy_ckpt_save_file:              # the stage plans are written: add the joint plan to them
        world.barrier()
        if world.rank == 0:
            add_joint_plan(ctx.strategy_ckpt_save_file, choice_record(choice))
        world.barrier()
    return AutoGradProgram(inner, choice, table, world, regroup)


def _choose(graph_at, batch: int, fixed: AutoFixed, setting: CompileSetting) -> tuple[AutoPlan, str]:
    """The joint plan every rank runs, and its table: the one saved in the strategy file
    being loaded, else rank 0's search, broadcast."""
    world, ctx = setting.world, setting.ctx
    load = ctx.strategy_ckpt_load_file
    saved = read_joint_plan(load) if load else None
    if saved is not None:
        choice = _from_record(saved, f"strategy file {load!r}: joint_plan")
        return choice, f"->  replayed from {load}: {choice.describe()}"
    record = None
    if world.rank == 0:
        best, tried = search_auto(graph_at, batch, world.size, ctx.plan_options, fixed, setting.full_batch)
        record = {"plan": choice_record(best) if best else None, "table": plan_table(best, tried)}
    record = _broadcast_json(world, record)
    if record["plan"] is None:
        cap = ctx.plan_options.profile().memory_bytes / 2**20
        raise ValueError(format_error(
            "auto_parallel", "memory per device", f"a joint plan within {cap:.1f} MiB (the cost profile's memory)",
            f"none on {world.size} devices; the fastest plans priced:\n{record['table']}",
            "use a profile with more memory (cost_profile), fewer parameters, or more devices"))
    return _from_record(record["plan"], "joint plan"), record["table"]


def _from_record(record: dict, where: str) -> AutoPlan:
    try:
        return AutoPlan(**{**record, "layers_per_stage": tuple(record["layers_per_stage"]),
                           "memory_bytes": tuple(record["memory_bytes"])})
    except (TypeError, KeyError) as err:
        raise ValueError(format_error(where, "fields", f"the fields of AutoPlan {sorted(AutoPlan.__annotations__)}",
                                      f"{sorted(record)} ({err})", "re-save it with strategy_ckpt_save_file")) from None


__all__ = ["AutoGradProgram", "auto_grad_program", "choice_record", "open_choices"]

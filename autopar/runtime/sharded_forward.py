"""Forward-only programs: serial, or one rank's share of a sharded forward pass.

:func:`forward_program` is what ``cell(*inputs)`` runs (``compiled.run_forward``): under
``semi_auto_parallel`` / ``auto_parallel`` on more than one rank, the traced forward graph
is planned (``make_plan``, the same rules and strategies as training) and lowered for this
rank (``spmd.lower``), so a model-parallel model runs model-parallel at inference too: each
rank computes with its weight shards, and collectives appear only where layouts change.
Otherwise (one rank, ``stand_alone``, ``data_parallel``: weights replicated) the graph runs
as it is.

What a call returns is what the serial call returns: every output whole on every rank
with ``full_batch`` (every rank fed the whole batch); without it, each rank feeds its rows
and gets its rows of every output whose leading dim is the batch (the others whole). Under
a ``dataset_strategy`` tuple each rank feeds its block of every input, and gets the rows
of such outputs that it was fed (the first input's dim-0 split, ranks repeating as fed).

**Carried state.** An incremental decoder threads state through calls: output ``o`` of
call t is input ``i`` of call t + 1 (a key/value cache). ``carry={o: i}`` keeps that state
in the layout the plan gives output ``o`` (the cache split over heads, as the attention
that writes it is): input ``i`` is *fed* in that layout and output ``o`` *delivered* in
it, so the state never crosses ranks between steps. :meth:`ShardedForwardProgram.run`
takes and returns the local shards (allocate them with :meth:`local_zeros`); calling a
program without carried state (``prog(args, kwargs)``) returns what ``cell(...)`` does::

    carry={1: 4}   input 4 (B, N, S, D)  ->  local (B, N/mp, S, D)  ->  output 1, the same shard
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backend import current_backend
from ..comm.consistency import NO_GROUP
from ..context import ParallelContext
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.spec import TensorSpec
from ..strategy.plan_source import make_plan
from ..strategy.sharding_plan import ShardingPlan, fed_layout, global_inputs, with_fed_inputs
from .arguments import tensor_args
from .consistency import ConsistencyCheck, feed_group
from .prefetch import held_weights, prefetch_weight_gathers
from .program import Program
from .protocol import ForwardStep
from .setting import DEFAULT_CONTEXT, parallel_setting, setting_key
from .sharded_program import fed_program_splits
from .spmd import lower, settled
from .trace import Traced, signature_key, trace

SHARDED_MODES = ("semi_auto_parallel", "auto_parallel")


def _input_slots(traced: Traced) -> list[int | None]:
    """Per argument (positional, then keywords by name): its index in ``graph.inputs`` if it
    is an array, else None (a None or static argument)."""
    slots, k = [], 0
    for kind in traced.arg_kinds:
        slots.append(k if kind == "tensor" else None)
        k += kind != "static"            # a None argument holds a (None) place in graph.inputs
    return slots


class ForwardProgram(ForwardStep):
    """The serial forward program of one signature (also the interface of the sharded one:
    there, local values are whole)."""

    def __init__(self, cell, args: tuple, kwargs: dict):
        self.traced = trace(cell, args, kwargs)
        self.program = Program(self.traced.graph, self.traced.graph.outputs)

    def __call__(self, args: tuple, kwargs: dict):
        outs = self.program.run(tensor_args(args, kwargs))
        return tuple(outs) if self.traced.out_tuple else outs[0]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.program.run(list(arrays))

    def local_zeros(self, arg: int) -> np.ndarray:
        graph = self.traced.graph
        spec = graph.spec(graph.inputs[_input_slots(self.traced)[arg]])
        return np.zeros(spec.shape, spec.dtype)


class ShardedForwardProgram(ForwardStep):
    """One rank's forward program of ``cell`` for one signature; see the module docstring.

    ``args``/``kwargs`` are what this rank is fed: the whole batch (``full_batch``) or its
    rows. ``carry`` maps an output index to the argument index (positional) it feeds next
    call; those two are kept in the output's planned layout. ``ctx`` None plans under the
    default :class:`~autopar.context.ParallelContext`."""

    def __init__(self, cell, args: tuple, kwargs: dict, mode: str, world, full_batch: bool,
                 ctx: ParallelContext | None = None, carry: dict[int, int] | None = None):
        if mode not in SHARDED_MODES:
            raise ValueError(f"ShardedForwardProgram: mode: expected one of {SHARDED_MODES}, got {mode!r}")
        self.world, self.rank = world, world.rank
        self.full_batch = full_batch
        # before any collective: a rank with another model or batch shape would pair them wrongly
        self.check = ConsistencyCheck(type(self).__name__, world, cell.trainable_params(),
                                      tensor_args(args, kwargs))
        n = world.size
        stage = Mesh((n,), ("devices",), tuple(range(n)))
        ctx = ctx or DEFAULT_CONTEXT
        names = sorted(kwargs)                  # the tracer's order: positional, then keywords by name
        every = tuple(args) + tuple(kwargs[k] for k in names)
        splits = fed_program_splits(every, n, full_batch, ctx, mode)     # this rank's blocks -> the whole batch
        g_every = global_inputs(every, splits)
        g_args, g_kwargs = g_every[:len(args)], dict(zip(names, g_every[len(args):]))
        self.traced = trace(cell, g_args, g_kwargs)
        graph = self.traced.graph
        # The forward graph is not the training graph a strategy file describes: plan it by
        # the rules (the ops' strategies), without reading or overwriting that file.
        plan = with_fed_inputs(make_plan(graph, mode, stage, full_batch, ctx.plan_options.without_files()),
                               graph, splits)
        row_splits = next((s[0] for s in splits if s), 1)     # how the batch's rows are fed, and delivered
        slots = _input_slots(self.traced)
        self.carry = dict(carry or {})
        into = {k: self._carried_slot(k, slots, graph) for k in self.carry}   # output -> graph input index
        self.carried_inputs: dict[int, Layout] = {}       # graph input index -> layout it is fed in
        layouts, delivered = dict(plan.layouts), {}
        batch = self._global_batch(g_args, g_kwargs)
        for k, v in enumerate(graph.outputs):
            spec = graph.spec(v)
            if k in into:
                lay = settled(plan.layouts[v]) if v in plan.layouts else Layout.replicated(stage, spec.ndim)
                layouts[graph.inputs[into[k]]] = lay
                self.carried_inputs[into[k]] = lay
                delivered[v] = lay
            elif spec.ndim and spec.shape[0] == batch:
                delivered[v] = fed_layout((row_splits,) + (1,) * (spec.ndim - 1), stage)    # this rank's rows
            else:
                delivered[v] = Layout.replicated(stage, spec.ndim)
        self.plan = ShardingPlan(plan.stage, plan.shardings, layouts)
        self.local_graph, _, self.out_layouts, self.comm_clock = lower(
            graph, graph.outputs, self.plan, self.rank, world, delivered)
        self.local_graph, self.prefetch = prefetch_weight_gathers(      # ZeRO-3 slices: gathered ahead of use
            self.local_graph, held_weights(self.local_graph), ctx.parallel_optimizer_config.prefetch_layers)
        self.delivered = [self.out_layouts[v] for v in graph.outputs]
        self.program = Program(self.local_graph, self.local_graph.outputs)
        # carried state (a KV cache) is this rank's own shard; every other input is compared
        # among the ranks fed the same block of it (e.g. the prompt under model parallelism)
        self.input_groups = [NO_GROUP if k in self.carried_inputs else feed_group(layouts.get(v), self.rank)
                             for k, v in enumerate(graph.inputs) if v is not None]
        for s in self.local_graph.param_objs:   # the Parameter reads through its shard, as in training
            if s.param._shard is None or s.param._shard[0] is not s:
                s.param.attach_shard(s, world)

    @staticmethod
    def _global_batch(args: tuple, kwargs: dict) -> int | None:
        for a in list(args) + [kwargs[k] for k in sorted(kwargs)]:
            if isinstance(a, (np.ndarray, TensorSpec)) and len(a.shape):
                return a.shape[0]
        return None

    def _carried_slot(self, out: int, slots: list, graph) -> int:
        """The index in ``graph.inputs`` of the argument output ``out`` is carried into, checked."""
        arg = self.carry[out]
        where = "ShardedForwardProgram: carry"
        if not 0 <= out < len(graph.outputs):
            raise ValueError(f"{where}: output {out}: expected an index below {len(graph.outputs)} (the outputs)")
        if not 0 <= arg < len(slots) or slots[arg] is None:
            raise ValueError(f"{where}: output {out} -> argument {arg}: expected the index of an array argument")
        o_spec, i_spec = graph.spec(graph.outputs[out]), graph.spec(graph.inputs[slots[arg]])
        if (o_spec.shape, o_spec.dtype) != (i_spec.shape, i_spec.dtype):
            raise ValueError(f"{where}: output {out} -> argument {arg}: expected the same shape and dtype, got "
                             f"{o_spec.shape} {o_spec.dtype} and {i_spec.shape} {i_spec.dtype}")
        return slots[arg]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs from the array inputs as this rank holds them: carried ones as local shards.
        Checked across ranks at the first call and every few (``ConsistencyCheck``)."""
        self.check(arrays, self.input_groups, 0)
        return self.program.run(list(arrays))

    def local_zeros(self, arg: int) -> np.ndarray:
        """Zeros in the local shape argument ``arg`` is fed in (a carried cache's shard)."""
        slot = _input_slots(self.traced)[arg]
        spec = self.traced.graph.spec(self.traced.graph.inputs[slot])
        lay = self.carried_inputs.get(slot)
        shape = lay.local_shape(spec.shape) if lay is not None else spec.shape
        return np.zeros(shape, spec.dtype)

    def __call__(self, args: tuple, kwargs: dict):
        """The serial call's results (``cell(*args)``): whole values, or this rank's rows."""
        if self.carry:
            raise ValueError("ShardedForwardProgram: a program with carried state takes local shards: "
                             "call run(arrays) with inputs from local_zeros()")
        outs = self.run(tensor_args(args, kwargs))
        return tuple(outs) if self.traced.out_tuple else outs[0]


def forward_program(cell, args: tuple, kwargs: dict, carry: dict[int, int] | None = None):
    """The compiled forward program of ``cell`` for this signature (cached on the cell):
    :class:`ShardedForwardProgram` when the parallel context asks for operator-level
    sharding on more than one rank, else :class:`ForwardProgram`."""
    setting = parallel_setting()
    sharded = setting is not None and setting.mode in SHARDED_MODES
    carry_key = tuple(sorted((carry or {}).items()))
    key = ("forward", cell.training, sharded and setting_key(setting), current_backend(),
           carry_key) + signature_key(args, kwargs)
    prog = cell._compiled.get(key)
    if prog is None:
        if sharded:
            prog = ShardedForwardProgram(cell, args, kwargs, setting.mode, setting.world, setting.full_batch,
                                         setting.ctx, carry)
        else:
            prog = ForwardProgram(cell, args, kwargs)
        cell._compiled[key] = prog
    return prog

"""Compiled calls of a cell: forward only, and loss + gradients.

Each is traced and lowered once per input signature and cached on the cell; later calls
with the same shapes only run the program.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..comm.consistency import MAX_FACTS, NO_GROUP, Fact, agree, digest
from ..context import current_context, current_world, require_init
from ..errors import format_error
from ..strategy.mesh import Mesh
from ..strategy.plan import ShardingPlan, plan_shardings
from .autodiff import differentiate
from .program import Program
from .protocol import TrainingProgram, loss_targets, with_zeros
from .shards import local_norm
from .trace import Traced, signature_key, trace


def tensor_args(args: tuple, kwargs: dict) -> list[np.ndarray]:
    """The array arguments in the order the tracer numbered them."""
    every = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return [a for a in every if isinstance(a, np.ndarray)]


def _normalize(args: tuple, kwargs: dict, where: str = "call") -> tuple[tuple, dict]:
    """The call's arguments checked and with numpy scalars as 0-d arrays. An argument is an
    array (a tensor input) or a static value the program is specialised on (None, a bool,
    a number, a string); a list of ids or an empty batch is refused here, naming the
    argument, rather than failing deep inside an op."""
    named = [(f"argument {k}", a) for k, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for name, a in named:
        _check_argument(where, name, a)
    conv = lambda a: np.asarray(a) if isinstance(a, np.generic) else a  # noqa: E731
    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def _check_argument(where: str, name: str, a) -> None:
    if isinstance(a, (list, tuple)):
        raise TypeError(format_error(where, name, "a numpy array (or a static None/bool/number/str)",
                                     f"a {type(a).__name__} of length {len(a)}",
                                     "convert it first, e.g. np.asarray(ids, dtype=np.int32)"))
    if isinstance(a, np.ndarray) and a.ndim and a.shape[0] == 0:
        raise ValueError(format_error(where, name, "a batch of at least one row", f"shape {a.shape}",
                                      "skip empty batches before calling the network"))


def run_forward(cell, args: tuple, kwargs: dict):
    """``cell(*args, **kwargs)`` outside tracing: the compiled forward program of this
    signature, sharded by the plan under operator-level parallelism (see
    :mod:`autopar.runtime.sharded_forward`; collective then: every rank calls it)."""
    from .sharded_forward import forward_program
    args, kwargs = _normalize(args, kwargs, type(cell).__name__)
    return forward_program(cell, args, kwargs)(args, kwargs)


class GradProgram(TrainingProgram):
    """Loss and gradients of ``params`` for one input signature: the one-rank
    :class:`~autopar.runtime.protocol.TrainingProgram` (its shards are the Parameters)."""

    def __init__(self, cell, args: tuple, kwargs: dict, params: Sequence, sens: float = 1.0, seed: int = 0):
        self.traced: Traced = trace(cell, args, kwargs)
        graph = self.traced.graph
        self.params = self.shards = self.param_shards = list(params)
        self.targets = loss_targets(graph, self.params, type(cell).__name__)
        self.graph, grads = differentiate(graph, self.targets.loss, self.targets.used, sens)
        self.program = Program(self.graph, (self.targets.loss,) + grads, seed=seed)
        self.comm_clock = [0.0]        # one rank: no redistributions

    @functools.cached_property
    def plan(self) -> ShardingPlan:
        """The one-device stand-alone plan of :attr:`graph` (what the serial program runs),
        as a sharded program's ``plan``, for cost-model reports."""
        return plan_shardings(self.graph, "stand_alone", Mesh((1,), ("devices",), (0,)), True)

    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0) -> tuple[np.ndarray, list]:
        outs = self.program.run(tensor_args(args, kwargs or {}), step)
        return outs[0], with_zeros(outs[1:], self.targets, self.shards)

    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        """The gradients' L2 norm (float64 sum)."""
        return local_norm(grads)

    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The gradients: already whole."""
        return list(grads)


def parallel_setting():
    """(mode, world, full_batch, context) when the context asks for sharded execution, else
    None. Read once per compile, never in the step loop.

    Under an MPI launcher without ``autopar.init()`` any program is an error, stand-alone
    too (each process would train alone, silently; a script that means it binds a one-rank
    world: ``bound_world(SelfCommunicator())``). A parallel mode is checked against the
    ranks running: a ``device_num`` other than the number of ranks is an error too (one
    process planning 4 devices would train serially). Planning on paper needs no program (``python -m autopar.plan``)."""
    ctx = current_context()
    require_init(f"compiling a {ctx.parallel_mode} program")
    if ctx.parallel_mode == "stand_alone":
        return None
    world = current_world()
    if ctx.device_num not in (1, world.size):
        n = ctx.device_num
        raise ValueError(format_error(
            "ParallelContext", "device_num", f"the number of ranks running ({world.size}, or 1 for 'as many as run')",
            f"{n} with parallel_mode={ctx.parallel_mode!r}",
            f"launch {n} processes (mpiexec -n {n} python script.py, calling autopar.init()), run {n} in-process "
            f"ranks (autopar.comm.run_in_process({n}, fn) with autopar.context.bound_world), or set "
            "parallel_mode='stand_alone' to train on one process; to plan without running, use "
            "python -m autopar.plan"))
    if world.size == 1:
        return None
    return ctx.parallel_mode, world, ctx.loads_full_batch, ctx


def setting_key(setting) -> tuple | None:
    """What of the parallel setting a compiled program depends on, as a hashable value for
    the compile cache: the whole context (every field may change the plan: search mode,
    optimizer parallel, dataset strategy, strategy files, ...), the world it runs on, and
    the loaded strategy file's size and modification time (a file rewritten under the same
    name is another plan). None for a serial program."""
    if setting is None:
        return None
    _, world, _, ctx = setting
    return ctx, id(world), _file_stamp(ctx.strategy_ckpt_load_file)


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except FileNotFoundError:
        return None
    return st and (st.st_size, st.st_mtime_ns)


def feed_group(layout, rank: int) -> int:
    """Ranks fed the same block of an input (the same group) must hold the same data; an
    input the plan gives no layout (None) is compared with no other rank."""
    return NO_GROUP if layout is None else digest(layout.block_index(rank))


class ConsistencyCheck:
    """The cross-rank agreement checks of one sharded or pipeline program
    (:mod:`autopar.comm.consistency`), on every rank of ``world``.

    At compile (construction): the model -- parameter names, shapes, dtypes -- and the
    shapes of the fed arrays, on every rank. Then, at the first call and every
    ``world.checks.check_interval``-th (every call in debug mode, never at 0): the step
    counter on every rank, and each input among the ranks fed the same data of it
    (``groups[k]``: ranks with the same group >= 0 must hold the same input k). Calls are
    counted, not steps, so that every rank checks at the same call even when the step
    counters differ. One all-gather of a few int64 per check."""

    def __init__(self, program: str, world, params: Sequence, arrays: Sequence[np.ndarray]):
        self.program, self.world = program, world
        self.interval = world.checks.check_interval if world.size > 1 else 0
        self.calls = 0
        if not self.interval:
            return
        model = tuple(f"parameter {p.name} shape {tuple(p.shape)} {np.dtype(p.dtype)}" for p in params)
        shapes = tuple(f"input {k} shape {a.shape} {a.dtype}" for k, a in enumerate(arrays))
        agree(world, [
            Fact("model", digest(*model), "the same parameters (names, shapes, dtypes) on every rank",
                 "build the same network with the same config on every rank", items=model),
            Fact("inputs", digest(*shapes), "the same number of arrays, shapes and dtypes fed to every rank",
                 "feed every rank a batch of the same shape (its slice under data parallelism)", items=shapes),
        ], f"{program} (consistency check at compile)")

    def __call__(self, arrays: Sequence[np.ndarray], groups: Sequence[int], step: int) -> None:
        calls, self.calls = self.calls, self.calls + 1
        if not self.interval or calls % self.interval:
            return
        facts = [Fact("step counter", int(step), "the same step on every rank",
                      "every rank must run the same steps: one ran more, or resumed from another checkpoint",
                      literal=True)]
        for k, (a, group) in enumerate(zip(arrays, groups)):
            if len(facts) == MAX_FACTS:
                break
            facts.append(Fact(f"input {k}", digest(a), "the same data on the ranks that are fed the same batch "
                              "(model-parallel peers, full_batch, pipeline stages of one replica)",
                              "feed each rank its data from the same source, order and seed", group=group))
        agree(self.world, facts, f"{self.program} (consistency check at call {calls})")


def grad_program(cell, args: tuple, kwargs: dict, params: Sequence, sens: float = 1.0):
    """The compiled loss-and-gradients program for this signature: serial, this rank's
    sharded program when the parallel context says so, or its pipeline program for a
    PipelineCell or ``pipeline_stages > 1``."""
    from .pipeline.program import pipeline_grad_program, pipelined
    setting = parallel_setting()
    key = ("grad", cell.training, sens, tuple(id(p) for p in params), setting_key(setting)) + signature_key(args, kwargs)
    prog = cell._compiled.get(key)
    if prog is None:
        if pipelined(cell, setting):   # micro-batches, stages: see autopar/runtime/pipeline_program.py
            prog = pipeline_grad_program(cell, args, kwargs, params, sens, setting)
        elif setting is None:
            prog = GradProgram(cell, args, kwargs, params, sens)
        else:
            from .sharded_program import ShardedGradProgram
            if kwargs:
                raise ValueError(f"{type(cell).__name__}: sharded programs take positional inputs only")
            mode, world, full_batch, ctx = setting
            prog = ShardedGradProgram(cell, args, params, mode, world, full_batch, sens, ctx=ctx)
        cell._compiled[key] = prog
    return prog


def value_and_grad(cell, weights: Sequence | None = None, sens: float = 1.0):
    """``value_and_grad(net)(*inputs)`` -> ``(loss, {parameter name: gradient})``.

    Gradients are full logical numpy arrays. ``weights`` defaults to the trainable
    parameters of ``cell``.
    """
    def fn(*args, **kwargs):
        args, kwargs = _normalize(args, kwargs, type(cell).__name__)
        params = list(weights) if weights is not None else cell.trainable_params()
        prog = grad_program(cell, args, kwargs, params, sens)
        loss, grads = prog(args, kwargs)
        grads = prog.gathered(grads)          # full gradients on every rank
        return loss, OrderedDict((p.name, g) for p, g in zip(params, grads))
    return fn

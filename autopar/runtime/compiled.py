"""Compiled calls of a cell: forward only, and loss + gradients.

Each is traced and lowered once per input signature and cached on the cell; later calls
with the same shapes only run the program.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from .autodiff import differentiate
from .program import Program
from .trace import Traced, signature_key, trace


def tensor_args(args: tuple, kwargs: dict) -> list[np.ndarray]:
    """The array arguments in the order the tracer numbered them."""
    every = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return [a for a in every if isinstance(a, np.ndarray)]


def _normalize(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    conv = lambda a: np.asarray(a) if isinstance(a, np.generic) else a  # noqa: E731
    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def run_forward(cell, args: tuple, kwargs: dict):
    """``cell(*args, **kwargs)`` outside tracing: the compiled forward program of this
    signature, sharded by the plan under operator-level parallelism (see
    :mod:`autopar.runtime.sharded_forward`; collective then: every rank calls it)."""
    from .sharded_forward import forward_program
    args, kwargs = _normalize(args, kwargs)
    return forward_program(cell, args, kwargs)(args, kwargs)


class GradProgram:
    """Loss and gradients of ``params`` for one input signature."""

    def __init__(self, cell, args: tuple, kwargs: dict, params: Sequence, sens: float = 1.0, seed: int = 0):
        self.traced: Traced = trace(cell, args, kwargs)
        graph = self.traced.graph
        loss = graph.outputs[0]
        if graph.spec(loss).size != 1:
            raise ValueError(f"{type(cell).__name__}: output 0 (the loss): expected a scalar, "
                             f"got shape {graph.spec(loss).shape}; reduce it with ops.ReduceMean")
        self.params = list(params)
        by_id = {id(p): v for v, p in zip(graph.params, graph.param_objs)}
        wrt, unused = [], []
        for p in self.params:
            if id(p) in by_id:
                wrt.append(by_id[id(p)])
            else:
                unused.append(p)
        self.graph, grads = differentiate(graph, loss, wrt, sens)
        self.unused = unused
        self.program = Program(self.graph, (loss,) + grads, seed=seed)

    def __call__(self, args: tuple, kwargs: dict, step: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        outs = self.program.run(tensor_args(args, kwargs), step)
        loss, grads = outs[0], iter(outs[1:])
        unused = {id(p) for p in self.unused}
        full = [np.zeros(p.shape, p.dtype) if id(p) in unused else next(grads) for p in self.params]
        return loss, full


def parallel_setting():
    """(mode, world, full_batch, context) when the context asks for sharded execution, else
    None. Read once per compile, never in the step loop."""
    from ..context import current_context, current_world
    ctx, world = current_context(), current_world()
    if ctx.parallel_mode == "stand_alone" or world.size == 1:
        return None
    if ctx.device_num not in (1, world.size):
        raise ValueError(f"device_num: expected {world.size} (the ranks running), got {ctx.device_num}; "
                         "call autopar.init() under mpiexec, or leave device_num unset")
    return ctx.parallel_mode, world, ctx.loads_full_batch, ctx


def grad_program(cell, args: tuple, kwargs: dict, params: Sequence, sens: float = 1.0):
    """The compiled loss-and-gradients program for this signature: serial, this rank's
    sharded program when the parallel context says so, or its pipeline program for a
    PipelineCell or ``pipeline_stages > 1``."""
    from .pipeline_program import pipeline_grad_program, pipelined
    setting = parallel_setting()
    key = ("grad", cell.training, sens, tuple(id(p) for p in params), setting and setting[0],
           setting and id(setting[1]), setting and setting[3].pipeline_stages) + signature_key(args, kwargs)
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
        args, kwargs = _normalize(args, kwargs)
        params = list(weights) if weights is not None else cell.trainable_params()
        prog = grad_program(cell, args, kwargs, params, sens)
        if hasattr(prog, "gathered"):  # sharded: full gradients on every rank
            loss, grads = prog(args)
            grads = prog.gathered(grads)
        else:
            loss, grads = prog(args, kwargs)
        return loss, OrderedDict((p.name, g) for p, g in zip(params, grads))
    return fn

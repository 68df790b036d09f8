"""Compiled calls of a cell: forward only, and loss + gradients.

Each is traced and lowered once per input signature and cached on the cell; later calls
with the same shapes only run the program.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..backend import current_backend, to_host
from ..ir.mesh import Mesh
from ..strategy.sharding_plan import ShardingPlan, plan_shardings
from .arguments import normalize, tensor_args
from .auto import auto_grad_program
from .autodiff import differentiate
from .pipeline.program import pipeline_grad_program, pipelined
from .program import Program
from .protocol import TrainingProgram, loss_targets, with_zeros
from .setting import parallel_setting, setting_key
from .sharded_forward import forward_program
from .sharded_program import ShardedGradProgram
from .shards import local_norm
from .trace import Traced, signature_key, trace


def run_forward(cell, args: tuple, kwargs: dict):
    """``cell(*args, **kwargs)`` outside tracing: the compiled forward program of this
    signature, sharded by the plan under operator-level parallelism (see
    :mod:`autopar.runtime.sharded_forward`; collective then: every rank calls it)."""
    args, kwargs = normalize(args, kwargs, type(cell).__name__)
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


def grad_program(cell, args: tuple, kwargs: dict, params: Sequence, sens: float = 1.0):
    """The compiled loss-and-gradients program for this signature (cached on the cell)."""
    setting = parallel_setting()
    key = ("grad", cell.training, sens, tuple(id(p) for p in params), setting_key(setting),
           current_backend()) + signature_key(args, kwargs)        # a program keeps the device it was built for
    prog = cell._compiled.get(key)
    if prog is None:
        prog = cell._compiled[key] = _build_grad_program(cell, args, kwargs, params, sens, setting)
    return prog


def _build_grad_program(cell, args, kwargs, params, sens, setting) -> TrainingProgram:
    """Serial; under ``auto_parallel`` the joint plan's program (when anything is left to
    search: autopar/runtime/auto.py); the pipeline program for a PipelineCell or
    ``pipeline_stages > 1``; else this rank's sharded program."""
    if setting is not None and setting.mode == "auto_parallel" and not kwargs:
        prog = auto_grad_program(cell, args, params, sens, setting)
        if prog is not None:
            return prog
    if pipelined(cell, setting):   # micro-batches, stages: see autopar/runtime/pipeline/program.py
        return pipeline_grad_program(cell, args, kwargs, params, sens, setting)
    if setting is None:
        return GradProgram(cell, args, kwargs, params, sens)
    if kwargs:
        raise ValueError(f"{type(cell).__name__}: sharded programs take positional inputs only")
    return ShardedGradProgram(cell, args, params, setting.mode, setting.world, setting.full_batch, sens,
                              ctx=setting.ctx)


def value_and_grad(cell, weights: Sequence | None = None, sens: float = 1.0):
    """``value_and_grad(net)(*inputs)`` -> ``(loss, {parameter name: gradient})``.

    Gradients are full logical numpy arrays. ``weights`` defaults to the trainable
    parameters of ``cell``.
    """
    def fn(*args, **kwargs):
        args, kwargs = normalize(args, kwargs, type(cell).__name__)
        params = list(weights) if weights is not None else cell.trainable_params()
        prog = grad_program(cell, args, kwargs, params, sens)
        loss, grads = prog(args, kwargs)
        grads = prog.gathered(grads)          # full gradients on every rank
        return loss, OrderedDict((p.name, to_host(g)) for p, g in zip(params, grads))
    return fn

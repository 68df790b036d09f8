"""One interface for a compiled training step of a cell on this rank.

The serial (:class:`~autopar.runtime.compiled.GradProgram`), sharded
(:class:`~autopar.runtime.sharded_program.ShardedGradProgram`) and pipeline
(:class:`~autopar.runtime.pipeline.program.PipelineGradProgram`) programs are all a
:class:`TrainingProgram`, so a caller (``TrainOneStepCell``, ``value_and_grad``) runs any of
them the same way and never asks which one it holds::

    loss, grads = prog(args, kwargs, step)   # grads[i]: this rank's gradient of prog.shards[i]
    norm = prog.global_norm(grads)           # every element counted once across ranks
    optimizer.step(grads)                    # the optimizer updates prog.shards
    prog.sync_weights()                      # bring updated slices back (no-op when none)
    full = prog.gathered(grads)              # whole gradients on every rank

A forward pass (``cell(*inputs)``, generation) is a :class:`ForwardStep`, serial or sharded.

The serial program is the one-rank case: its shards are the Parameters, its norm is local,
``gathered`` returns the gradients as they are and ``sync_weights`` does nothing.

What every program does alike at compile time lives here (:func:`loss_targets`): the loss
(output 0) must be a scalar, and a parameter the loss does not use gets zero gradients
(:func:`with_zeros`), never an error.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..backend import array_module
from ..errors import format_error
from ..ir.graph import Graph


class TrainingProgram(ABC):
    """A compiled training step (loss and gradients) of a cell for one input signature on
    this rank.

    ``shards``: what the optimizer updates, one entry per parameter, in the order of the
    parameters it was compiled for (the Parameters themselves serially; this rank's shard,
    slice or absent shard otherwise). ``param_shards``: what this rank holds of each parameter
    (the Parameters serially; its shard, whole block under optimizer parallel, or absent
    shard otherwise). ``program``: the compiled program whose ``meter``
    measures memory (:meth:`measure`). ``comm_clock[0]``: seconds this rank spent in the
    program's redistributions so far (0 serially)."""

    shards: list
    param_shards: list
    program: object
    comm_clock: list[float]

    @abstractmethod
    def __call__(self, args: tuple, kwargs: dict | None = None, step: int = 0) -> tuple[np.ndarray, list]:
        """(loss, gradients aligned with :attr:`shards`): the loss whole on every rank."""

    @abstractmethod
    def global_norm(self, grads: Sequence[np.ndarray]) -> float:
        """The gradients' global L2 norm, each element counted once (collective when sharded)."""

    @abstractmethod
    def gathered(self, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Full gradients on every rank (collective when sharded)."""

    def sync_weights(self) -> None:
        """After the optimizer updated :attr:`shards`: make the weights whole again where the
        optimizer updated slices (collective then); nothing to do by default."""

    def measure(self, meter) -> None:
        """Measure live bytes of the steps from now on into ``meter`` (None: off)."""
        self.program.meter = meter


class ForwardStep(ABC):
    """A compiled forward pass of a cell for one input signature on this rank: the serial
    :class:`~autopar.runtime.sharded_forward.ForwardProgram` and its sharded counterpart
    answer the same three calls (serially, local values are whole)."""

    @abstractmethod
    def __call__(self, args: tuple, kwargs: dict):
        """What ``cell(*args, **kwargs)`` returns (sharded: whole values, or this rank's rows)."""

    @abstractmethod
    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs from the array inputs as this rank holds them (carried state: local shards)."""

    @abstractmethod
    def local_zeros(self, arg: int) -> np.ndarray:
        """Zeros in the local shape argument ``arg`` is fed in (a carried cache's shard)."""


@dataclass(frozen=True)
class LossTargets:
    """What a training program differentiates: ``loss``, the graph value of output 0, and per
    parameter its graph value (``wrt[i]``), None when the loss does not use it."""

    loss: int
    wrt: tuple[int | None, ...]

    @property
    def used(self) -> list[int]:
        """The graph values of the parameters the loss uses, in parameter order."""
        return [v for v in self.wrt if v is not None]


def loss_targets(graph: Graph, params: Sequence, where: str) -> LossTargets:
    """The loss and the parameters' values in ``graph``, the loss checked to be a scalar
    (``where``: the network's name, for the error)."""
    loss = graph.outputs[0]
    spec = graph.spec(loss)
    if spec.size != 1:
        raise ValueError(format_error(where, "output 0 (the loss)", "a scalar", f"shape {spec.shape}",
                                      "reduce it with ops.ReduceMean"))
    by_id = {id(p): v for v, p in zip(graph.params, graph.param_objs)}
    return LossTargets(loss, tuple(by_id.get(id(p)) for p in params))


def with_zeros(used_grads: Iterable[np.ndarray], targets: LossTargets, shards: Sequence) -> list[np.ndarray]:
    """One gradient per shard: the next of ``used_grads`` for a parameter the loss uses,
    zeros of the shard's shape for one it does not (fresh: the caller may scale in place), where
    the shard's value lives (host or device: the optimizer updates the two together)."""
    it = iter(used_grads)
    return [next(it) if v is not None else array_module(s.data).zeros(s.shape, s.dtype)
            for v, s in zip(targets.wrt, shards)]


def gradient_factors(mode: str, gradients_mean: bool | None, layouts: Sequence, world_size: int) -> list[float]:
    """Per parameter, what MindSpore's ``gradients_mean`` makes of the gradient of the
    loss autopar differentiates (the global batch's; ``layouts``: each parameter's home
    layout, None where absent). ``None`` (the user left it unset): that gradient, in every
    mode -- the serial program's.

    ``data_parallel``: MindSpore sums the ranks' gradients of their own mean losses, N times
    the global batch's gradient, and ``gradients_mean=True`` divides by N: factor N, or 1.
    ``semi_auto_parallel`` / ``auto_parallel``: the loss is the global batch's already and
    ``gradients_mean=True`` divides each weight's gradient by its mirror group (the ranks
    holding the same block): factor 1, or 1 / replicas. ``stand_alone``: 1."""
    if gradients_mean is not None and mode == "data_parallel":
        return [1.0 if gradients_mean else float(world_size)] * len(layouts)
    if mode == "stand_alone" or not gradients_mean:
        return [1.0] * len(layouts)
    return [1.0 / math.prod(lay.mesh.shape[a] for a in lay.replicated_axes()) if lay is not None else 1.0
            for lay in layouts]


def scaled(grads: Sequence[np.ndarray], factors: Sequence[float]) -> list[np.ndarray]:
    """``grads`` times ``factors`` (new arrays where a factor is not 1: outputs may alias)."""
    return [g if f == 1.0 else g * g.dtype.type(f) for g, f in zip(grads, factors)]

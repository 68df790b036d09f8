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

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

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
    zeros of the shard's shape for one it does not (fresh: the caller may scale in place)."""
    it = iter(used_grads)
    return [next(it) if v is not None else np.zeros(s.shape, s.dtype) for v, s in zip(targets.wrt, shards)]

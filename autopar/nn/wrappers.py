"""Training wrappers: a network with its loss, and one training step with an optimizer."""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..errors import format_error
from ..runtime.arguments import normalize
from ..runtime.compiled import grad_program
from ..runtime.memory import MemoryMeter, training_memory
from .cell import Cell
from .optimizers import Optimizer


class WithLossCell(Cell):
    """``loss_fn(backbone(data), label)``; parameter names stay the backbone's."""

    auto_prefix = False

    def __init__(self, backbone: Cell, loss_fn: Cell):
        super().__init__()
        self._backbone = backbone
        self._loss_fn = loss_fn

    def construct(self, data, label):
        return self._loss_fn(self._backbone(data), label)


ON_NON_FINITE = ("skip", "raise")


class TrainingDivergedError(FloatingPointError):
    """Training cannot go on: the loss or the gradient norm was not finite for
    ``max_consecutive_skips`` steps in a row (or once, with ``on_non_finite="raise"``)."""


def overflow(loss, grad_norm: float) -> bool:
    """True when the loss or the gradients' global norm is NaN or infinite: the step must
    not update. One test for divergence and for the mixed-precision loss scale (a NaN or an
    inf in any gradient makes the global norm non-finite)."""
    return not (math.isfinite(float(loss)) and math.isfinite(float(grad_norm)))


def _scale(grads, factor: float) -> None:
    """Multiply every gradient by ``factor`` in place (clipping)."""
    for g in grads:
        array_module(g).multiply(g, factor, out=g)


def _check_args(optimizer, sens, clip_norm, on_non_finite, max_consecutive_skips) -> None:
    where = "TrainOneStepCell"
    if not isinstance(optimizer, Optimizer):
        raise TypeError(format_error(where, "optimizer", "an autopar Optimizer (SGD, Adam, AdamWeightDecay, ...)",
                                     type(optimizer).__name__,
                                     "pass e.g. AdamWeightDecay(net.trainable_params(), 1e-4)"))
    if isinstance(sens, bool) or not isinstance(sens, (int, float)) or not (math.isfinite(sens) and sens > 0):
        raise ValueError(format_error(where, "sens", "a finite float > 0 (the loss gradient's seed)", repr(sens)))
    if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                  or not (math.isfinite(clip_norm) and clip_norm > 0)):
        raise ValueError(format_error(where, "clip_norm", "None or a finite float > 0", repr(clip_norm),
                                      "PanGu-alpha clips at 1.0"))
    if on_non_finite not in ON_NON_FINITE:
        raise ValueError(format_error(where, "on_non_finite", f"one of {ON_NON_FINITE}", repr(on_non_finite)))
    if (isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int)
            or max_consecutive_skips < 1):
        raise ValueError(format_error(where, "max_consecutive_skips", "an int >= 1", repr(max_consecutive_skips)))


def _check_params_of(network: Cell, params) -> None:
    """Every parameter the optimizer updates must be a trainable parameter of ``network``
    (the same object): the gradients are taken of the network's loss, so an optimizer built
    over another network (even one with the same names) would train nothing."""
    own = {id(p) for p in network.trainable_params()}
    foreign = [p.name for p in params if id(p) not in own]
    if foreign:
        names = {p.name for p in network.trainable_params()}
        same = " (same names, other Parameter objects: another instance of the model)" if all(
            n in names for n in foreign) else ""
        raise ValueError(format_error(
            "TrainOneStepCell", "optimizer.params",
            f"trainable parameters of the network ({type(network).__name__})",
            f"{len(foreign)} that are not{same}: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}",
            "build the optimizer from this network: Optimizer(network.trainable_params(), ...)"))


class TrainOneStepCell(Cell):
    """Calling it runs forward, backward and the optimizer; returns the loss.

    Forward and backward are one compiled program per input signature; the optimizer then
    updates the parameters in place. ``clip_norm`` clips gradients by their global norm
    (PanGu-α uses 1.0) before the update. The optimizer's ``step_count`` (updates applied,
    restored with its state) also seeds dropout, so a given step drops the same units on
    every run and after a resume. Under optimizer parallel the optimizer updates this
    rank's slices and the program then all-gathers them back into the weights.

    Divergence (MindSpore's overflow check): every step computes the gradients' global norm
    (collective and identical on every rank under a sharded or pipeline program, as is the
    loss, which every rank receives whole). When the loss or the norm is NaN or infinite
    (:func:`overflow`), the update is skipped: parameters, optimizer states and
    ``step_count`` stay bit-for-bit as they were, as when MindSpore's loss-scale cell skips
    the optimizer on overflow -- the learning-rate schedule and the dropout seed count
    updates applied, so the next step retries the same step number on the next batch.
    ``skipped_steps`` counts such steps, ``consecutive_skips`` those since the last update;
    after ``max_consecutive_skips`` in a row (or at the first, with
    ``on_non_finite="raise"``) a :class:`TrainingDivergedError` stops the job. A step whose
    gradients are all exactly zero (a batch where every label is padding: loss 0) updates
    nothing either (weight decay and momentum would otherwise move the weights on no data);
    ``empty_steps`` counts those. ``last_step_skipped`` says whether the last call updated,
    ``last_overflow`` whether it was for a non-finite value.
    """

    auto_prefix = False
    _memory_meter = None   # a MemoryMeter while measure_memory() is on

    def __init__(self, network: Cell, optimizer, sens: float = 1.0, clip_norm: float | None = None,
                 on_non_finite: str = "skip", max_consecutive_skips: int = 10):
        super().__init__()
        _check_args(optimizer, sens, clip_norm, on_non_finite, max_consecutive_skips)
        _check_params_of(network, optimizer.params)
        self.network = network
        self.optimizer = optimizer
        self.sens = float(sens)
        self.clip_norm = clip_norm
        self.on_non_finite = on_non_finite
        self.max_consecutive_skips = max_consecutive_skips
        self.params = list(optimizer.params)   # the Parameters (the optimizer may hold shards)
        self.last_grad_norm: float | None = None
        self.last_step_skipped = False
        self.last_overflow = False
        self.skipped_steps = 0       # non-finite steps skipped, in all
        self.consecutive_skips = 0   # non-finite steps skipped since the last update
        self.empty_steps = 0         # steps with all-zero gradients (no update)
        network.set_train(True)

    def build(self, *args, **kwargs):
        """Compile the training program for these inputs and give the optimizer this rank's
        shards, without taking a step (MindSpore's ``model.build``); returns the program."""
        args, kwargs = normalize(args, kwargs, type(self.network).__name__)
        prog = grad_program(self.network, args, kwargs, self.params, self.sens)
        prog.measure(self._memory_meter)
        if self.optimizer.params != prog.shards:   # a sharded program's: this rank's shards or slices
            self.optimizer.bind_shards(prog.shards)
        return prog

    def __call__(self, *args, **kwargs):
        args, kwargs = normalize(args, kwargs, type(self.network).__name__)
        prog = self.build(*args, **kwargs)
        loss, grads = prog(args, kwargs, self.optimizer.step_count)
        norm = float(prog.global_norm(grads))   # over every rank's shards (collective when sharded)
        self.last_grad_norm = norm
        self.last_overflow = overflow(loss, norm)
        self.last_step_skipped = self.last_overflow or norm == 0.0
        if self.last_overflow:
            self._skip(float(loss), norm)
        elif norm == 0.0:
            self.empty_steps += 1
        else:
            self._update(prog, grads, norm)
        return np.asarray(loss)

    def _update(self, prog, grads, norm: float) -> None:
        """Clip to ``clip_norm`` (the global norm ``norm``), step the optimizer, bring updated
        slices back (optimizer parallel: all-gather) and end a run of skipped steps."""
        if self.clip_norm is not None and norm > self.clip_norm:
            _scale(grads, self.clip_norm / norm)
        self.optimizer.step(grads)
        prog.sync_weights()
        self.consecutive_skips = 0

    def _skip(self, loss: float, norm: float) -> None:
        """Count a non-finite step (no update); stop the job when the limit is reached."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.on_non_finite == "skip" and self.consecutive_skips < self.max_consecutive_skips:
            return
        step = self.optimizer.step_count
        bad = [p.name for p in self.optimizer.params if not bool(array_module(p.data).isfinite(p.data).all())]
        weights = (f"non-finite weights on this rank: {bad[:5]}{' ...' if len(bad) > 5 else ''}" if bad
                   else "every weight of this rank is finite")
        if self.on_non_finite == "raise":
            actual = f"loss {loss} and gradient norm {norm} (updates applied so far: {step}; {weights})"
        else:
            actual = (f"{self.consecutive_skips} consecutive steps with a non-finite loss or gradient norm, "
                      f"updates skipped (last: loss {loss}, gradient norm {norm}; updates applied so far: {step}; "
                      f"{weights})")
        raise TrainingDivergedError(format_error(
            "TrainOneStepCell", "loss and gradient norm", "finite values", actual,
            "lower the learning rate, check the data (and the weights you loaded), or resume from the "
            "last checkpoint"))

    def measure_memory(self, on: bool = True) -> TrainOneStepCell:
        """Measure live bytes in the steps from now on (off, the default, costs nothing)."""
        self._memory_meter = MemoryMeter() if on else None
        return self

    def memory_report(self) -> dict[str, int]:
        """Bytes of the last measured step on this rank: parameters, gradients,
        optimizer_states, inputs, activations_peak, total_peak (see
        :func:`autopar.runtime.memory.training_memory`). Under a pipeline: this rank's
        stage over the whole step -- every forward and backward half, with the saved values
        of every micro-batch in flight (:mod:`autopar.runtime.pipeline.memory`)."""
        if self._memory_meter is None or self._memory_meter.last is None:
            raise ValueError("TrainOneStepCell.memory_report: expected a step measured after measure_memory(), "
                             "got none; call train.measure_memory() and run a step first")
        return training_memory(self._memory_meter.last, self.optimizer)

"""Training wrappers: a network with its loss, and one training step with an optimizer."""
from __future__ import annotations

import numpy as np

from ..runtime.compiled import _normalize, grad_program
from ..runtime.memory import MemoryMeter, training_memory
from .cell import Cell


class WithLossCell(Cell):
    """``loss_fn(backbone(data), label)``; parameter names stay the backbone's."""

    auto_prefix = False

    def __init__(self, backbone: Cell, loss_fn: Cell):
        super().__init__()
        self._backbone = backbone
        self._loss_fn = loss_fn

    def construct(self, data, label):
        return self._loss_fn(self._backbone(data), label)


class TrainOneStepCell(Cell):
    """Calling it runs forward, backward and the optimizer; returns the loss.

    Forward and backward are one compiled program per input signature; the optimizer then
    updates the parameters in place. ``clip_norm`` clips gradients by their global norm
    (PanGu-α uses 1.0) before the update. The optimizer's ``step_count`` (updates applied,
    restored with its state) also seeds dropout, so a given step drops the same units on
    every run and after a resume. Under optimizer parallel the optimizer updates this
    rank's slices and the program then all-gathers them back into the weights.
    """

    auto_prefix = False
    _memory_meter = None   # a MemoryMeter while measure_memory() is on

    def __init__(self, network: Cell, optimizer, sens: float = 1.0, clip_norm: float | None = None):
        super().__init__()
        self.network = network
        self.optimizer = optimizer
        self.sens = float(sens)
        self.clip_norm = clip_norm
        self.params = list(optimizer.params)   # the Parameters (the optimizer may hold shards)
        self.last_grad_norm: float | None = None
        network.set_train(True)

    def build(self, *args, **kwargs):
        """Compile the training program for these inputs and give the optimizer this rank's
        shards, without taking a step (MindSpore's ``model.build``); returns the program."""
        args, kwargs = _normalize(args, kwargs)
        prog = grad_program(self.network, args, kwargs, self.params, self.sens)
        prog.program.meter = self._memory_meter
        if hasattr(prog, "shards") and self.optimizer.params != prog.shards:
            self.optimizer.bind_shards(prog.shards)
        return prog

    def __call__(self, *args, **kwargs):
        from ..train.clip import clip_by_global_norm, scale_
        args, kwargs = _normalize(args, kwargs)
        prog = self.build(*args, **kwargs)
        if hasattr(prog, "shards"):   # sharded: this rank updates its shards
            loss, grads = prog(args, kwargs, self.optimizer.step_count)
            if self.clip_norm is not None:
                norm = prog.global_norm(grads)
                if norm > self.clip_norm:
                    scale_(grads, self.clip_norm / norm)
                self.last_grad_norm = norm
        else:
            loss, grads = prog(args, kwargs, self.optimizer.step_count)
            if self.clip_norm is not None:
                grads, norm = clip_by_global_norm(grads, self.clip_norm)
                self.last_grad_norm = float(norm)
        self.optimizer.step(grads)
        if hasattr(prog, "sync_weights"):   # optimizer parallel: all-gather the updated slices
            prog.sync_weights()
        return np.asarray(loss)

    def measure_memory(self, on: bool = True) -> TrainOneStepCell:
        """Measure live bytes in the steps from now on (off, the default, costs nothing)."""
        self._memory_meter = MemoryMeter() if on else None
        return self

    def memory_report(self) -> dict[str, int]:
        """Bytes of the last measured step on this rank: parameters, gradients,
        optimizer_states, inputs, activations_peak, total_peak (see
        :func:`autopar.runtime.memory.training_memory`). Under a pipeline: this rank's
        stage over the whole step -- every forward and backward half, with the saved values
        of every micro-batch in flight (:mod:`autopar.runtime.pipeline_memory`)."""
        if self._memory_meter is None or self._memory_meter.last is None:
            raise ValueError("TrainOneStepCell.memory_report: expected a step measured after measure_memory(), "
                             "got none; call train.measure_memory() and run a step first")
        return training_memory(self._memory_meter.last, self.optimizer)

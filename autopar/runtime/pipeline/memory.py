"""Live bytes of one pipeline step on one rank: every half it runs, every micro-batch in flight.

A stage runs a forward and a backward half per micro-batch (:mod:`autopar.runtime.pipeline.split`),
and between them the runner holds arrays no program sees: the *saved* values of every
micro-batch in flight, activations and gradients received or waiting to be sent, and the
gradients accumulated so far. Each half runs with a
:class:`~autopar.runtime.memory.MemoryMeter` told what is held around it, so its samples
are live bytes of the whole rank:

    activations  =  held: saved values of all micro-batches in flight (the running one's
                    included), received and unsent activations and their gradients
                 +  the run's intermediates and the activations it outputs
    gradients    =  the accumulated parameter gradients (+ this micro-batch's, while the
                    backward half makes them)

Arrays are counted once by base buffer, and never when they are (views of) parameters,
fed data or constants. :meth:`StepMemory.usage` gives the step as one
:class:`~autopar.runtime.memory.MemoryUsage`: its ``activations_peak`` is the most
activation bytes alive at once over the step, which is where a schedule's in-flight count
shows (GPipe keeps all m micro-batches' saved values at its peak, 1F1B at most p - s).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ...backend import base_buffer
from ..memory import MemoryMeter, MemoryUsage


def _bytes(arrays: Iterable, skip: set[int]) -> tuple[int, set[int]]:
    """Bytes of the distinct base buffers of ``arrays``, leaving out those in ``skip``."""
    roots = {}
    for a in arrays:
        r = base_buffer(a)
        if r is not None and id(r) not in skip:
            roots[id(r)] = r
    return sum(int(getattr(r, "nbytes", 0)) for r in roots.values()), set(roots)


class StepMemory:
    """Measures one step: :meth:`run` runs a half under a meter; :meth:`usage` sums up."""

    def __init__(self, fed: Sequence[Sequence[np.ndarray]]):
        flat = [a for batch in fed for a in batch]
        self._inputs, self._fixed = _bytes(flat, set())      # the fed batch (and constants, as seen)
        self._params: dict[int, int] = {}                     # id(base) -> bytes
        self.activations_peak = self.dynamic_peak = 0
        self.saved_bytes: dict[int, int] = {}                 # micro-batch -> bytes it keeps in flight

    def _see_fixed(self, program) -> None:
        """Parameters and constants of ``program``: never activations."""
        for p in program.graph.param_objs:
            r = base_buffer(p.data)
            self._params[id(r)] = int(r.nbytes)
        for a in program.graph.consts.values():
            r = base_buffer(a)
            if id(r) not in self._fixed and id(r) not in self._params:
                self._fixed.add(id(r))
                self._inputs += int(getattr(r, "nbytes", 0))

    def run(self, program, inputs: list, step: int, held: Iterable, grads: Sequence, activation_outputs) -> list:
        """``program.run(inputs, step)`` measured: ``held`` are the activation arrays alive
        around it (the runner's, and the activations among ``inputs``), ``grads`` the
        accumulated gradients (None where none yet), ``activation_outputs`` the output
        slots that are activations."""
        self._see_fixed(program)
        skip = self._fixed | set(self._params)
        held_act, _ = _bytes(held, skip)
        held_grads, _ = _bytes((g for g in grads if g is not None), skip)
        meter = MemoryMeter(held_act, held_grads, activation_outputs)
        program.meter = meter
        try:
            outs = program.run(inputs, step)
        finally:
            program.meter = None
        self.activations_peak = max(self.activations_peak, meter.last.activations_peak)
        self.dynamic_peak = max(self.dynamic_peak, meter.last.dynamic_peak)
        return outs

    def saved(self, k: int, arrays: Sequence) -> None:
        """Micro-batch ``k``'s saved values, as its forward half left them."""
        self.saved_bytes[k], _ = _bytes(arrays, self._fixed | set(self._params))

    def usage(self, loss, grads: Sequence) -> MemoryUsage:
        """The step as one run: outputs are the loss (last stage) and the summed gradients."""
        each = (int(np.asarray(loss).nbytes) if loss is not None else 0,) + tuple(
            int(g.nbytes) if g is not None else 0 for g in grads)
        return MemoryUsage(sum(self._params.values()), self._inputs, self.activations_peak, sum(each), each,
                           self.dynamic_peak)

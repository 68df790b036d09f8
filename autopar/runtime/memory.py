"""Memory accounting: live bytes of a program run, measured, and saved activations, predicted.

Measured. A :class:`MemoryMeter` attached to a :class:`~autopar.runtime.program.Program`
(``program.meter = MemoryMeter()``) watches every slot the run writes and frees. Arrays are
counted by their base buffer, so a view (a reshape, a transpose, an in-place result) costs
nothing more than what it views. After each instruction -- its inputs and outputs both
alive, before the dead are freed -- it samples:

* activations: live arrays that are neither parameters, data inputs, constants nor
  requested outputs (intermediates of forward and backward alike);
* outputs: requested outputs alive so far (the loss and the gradients).

Temporaries inside a kernel are not seen; the copies ``Program.run`` makes to hand outputs
back are not counted. A program without a meter pays one ``is None`` test per run.

A run that is one part of a larger step (a pipeline stage's forward or backward half of
one micro-batch) tells its meter what stays alive around it: ``held_activations`` and
``held_other`` bytes are added to every sample, and ``activation_outputs`` are output slots
counted as activations (a forward half's outputs are activations saved for, or sent to,
a later half). :mod:`autopar.runtime.pipeline.memory` builds such meters.

Predicted, from shapes alone (a rank's local graph gives local bytes):

* :func:`saved_for_backward` -- per forward node, the bytes of the buffers it made that
  backward nodes read (a view is charged to the node that made the buffer it views): what
  a cost model sums for activation memory, and what recompute removes
  (``recompute.recompute_savings``);
* :func:`predicted_activations` -- the meter's activation count after every instruction of
  a lowered program, for where the peak lies and how high it is.

Both guess which outputs are views (:func:`guess_buffers`): the guess is exact on the ops
PanGu-α uses, except a reshape that has to copy (a transposed tensor), counted as a view.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..backend import base_buffer
from ..comm import redistribution as rd
from ..ir.graph import FORWARD, Graph, Node
from ..ops.slicing import Slicing
from .spmd import Redistribute


@dataclass(frozen=True)
class MemoryUsage:
    """Bytes of one program run on one rank."""

    parameters: int          # parameter arrays (this rank's shards)
    inputs: int              # data inputs and constants
    activations_peak: int    # most intermediate bytes alive at once
    outputs: int             # requested outputs at the end (loss and gradients)
    output_bytes: tuple[int, ...]   # each requested output
    dynamic_peak: int        # most (intermediates + outputs) bytes alive at once

    @property
    def total_peak(self) -> int:
        return self.parameters + self.inputs + self.dynamic_peak

    def __str__(self) -> str:
        mib = 2.0 ** 20
        return (f"MemoryUsage(MiB: parameters {self.parameters / mib:.2f}, inputs {self.inputs / mib:.2f}, "
                f"activations peak {self.activations_peak / mib:.2f}, outputs {self.outputs / mib:.2f}, "
                f"total peak {self.total_peak / mib:.2f})")


def _unique_bytes(arrays) -> tuple[int, set[int]]:
    roots = {id(r): r for r in map(base_buffer, arrays) if r is not None}
    return sum(int(getattr(r, "nbytes", 0)) for r in roots.values()), set(roots)


class MemoryMeter:
    """Live bytes of program runs; :attr:`last` is the latest run's :class:`MemoryUsage`.

    ``held_activations`` / ``held_other``: bytes alive outside the run throughout it,
    counted in every sample as activations / as outputs (gradients); ``activation_outputs``:
    output slots counted as activations, not outputs."""

    def __init__(self, held_activations: int = 0, held_other: int = 0, activation_outputs=frozenset()):
        self.last: MemoryUsage | None = None
        self.held_activations, self.held_other = held_activations, held_other
        self.activation_outputs = frozenset(activation_outputs)

    # ---- one run ------------------------------------------------------------------------
    def begin(self, slots: list, params: Sequence[int], fixed: Sequence[int], outputs: Sequence[int]) -> None:
        """Called once the program's slots hold its parameters, inputs and constants."""
        self._params, param_ids = _unique_bytes(slots[v] for v in params)
        self._inputs, input_ids = _unique_bytes(slots[v] for v in fixed if id(base_buffer(slots[v])) not in param_ids)
        self._fixed = param_ids | input_ids
        self._is_output = set(outputs) - self.activation_outputs
        self._outputs = tuple(v for v in outputs if v in self._is_output)
        self._live: dict[int, list] = {}      # id(base) -> [base, slot refs, output-slot refs]
        self.activations = self.outputs = 0
        self._peak_act = self._peak_dyn = 0
        self.sample()                         # what is held around the run, before it starts

    def _charge(self, entry: list, sign: int) -> None:
        """Add (+1) or remove (-1) a buffer's bytes from the category it is in now."""
        if entry[1] == 0:
            return
        nbytes = int(getattr(entry[0], "nbytes", 0))
        if entry[2]:
            self.outputs += sign * nbytes
        else:
            self.activations += sign * nbytes

    def wrote(self, slot: int, array) -> None:
        base = base_buffer(array)
        if base is None or id(base) in self._fixed:
            return
        entry = self._live.get(id(base))
        if entry is None:
            entry = self._live[id(base)] = [base, 0, 0]
        self._charge(entry, -1)
        entry[1] += 1
        entry[2] += slot in self._is_output
        self._charge(entry, +1)

    def freed(self, slot: int, array) -> None:
        base = base_buffer(array)
        if base is None or id(base) in self._fixed:
            return
        entry = self._live[id(base)]
        self._charge(entry, -1)
        entry[1] -= 1
        entry[2] -= slot in self._is_output
        self._charge(entry, +1)
        if entry[1] == 0:
            del self._live[id(base)]

    def sample(self) -> None:
        activations = self.held_activations + self.activations
        self._peak_act = max(self._peak_act, activations)
        self._peak_dyn = max(self._peak_dyn, activations + self.held_other + self.outputs)

    def end(self, slots: list) -> MemoryUsage:
        each = tuple(int(getattr(slots[v], "nbytes", 0)) for v in self._outputs)
        self.last = MemoryUsage(self._params, self._inputs, self._peak_act, self.outputs, each, self._peak_dyn)
        del self._live
        return self.last


# ---- prediction --------------------------------------------------------------------------

def _makes_buffer(node: Node, graph: Graph) -> bool:
    """Whether a node's outputs are new buffers, as declared: fresh, or a redistribution
    that communicates (a slice alone is a view)."""
    if node.forward_of is not None:
        return graph.nodes[node.forward_of].prim.grads_are_fresh()
    if node.prim.output_is_fresh():
        return True
    if not isinstance(node.prim, Redistribute):
        return False
    return any(step.kind != rd.SLICE for step in node.prim.attrs["redist"].steps)


def _views(node: Node, graph: Graph, out: int) -> tuple[int, ...]:
    """Inputs an output not declared fresh is guessed to view: a slice views its input; a
    vjp views dy if it has dy's size (``Add`` hands dy back; ``sum_to`` of a bias gradient
    is new); any other op the inputs of its size (a reshape, a transpose, an input handed
    back) -- a reduction is new."""
    if node.forward_of is None and isinstance(node.prim, Slicing):
        return node.inputs[:1]
    candidates = node.inputs[:1] if node.forward_of is not None else node.inputs
    size = graph.spec(out).nbytes
    return tuple(v for v in candidates if graph.spec(v).nbytes == size)


def guess_buffers(graph: Graph, nodes: Sequence[Node] | None = None,
                  donated: dict[int, int] | None = None) -> dict[int, frozenset[int]]:
    """Value -> the values that made the buffers it lives in (itself for a new buffer),
    following ``nodes`` (default: the graph's) in order; ``donated`` (position in ``nodes``
    -> input) puts an in-place output in its input's buffer. Parameters, inputs and
    constants are left out of every set: they are not activations. A best guess for
    prediction; donation planning uses the safe, larger sets of ``Program``."""
    fixed = set(graph.params) | {v for v in graph.inputs if v is not None} | set(graph.consts)
    donated = donated or {}
    found: dict[int, frozenset[int]] = {}

    def of(v: int) -> frozenset[int]:
        return found.get(v, frozenset() if v in fixed else frozenset((v,)))

    for k, node in enumerate(graph.nodes if nodes is None else nodes):
        fresh = _makes_buffer(node, graph)
        for o in node.outputs:
            if k in donated:
                found[o] = of(node.inputs[donated[k]])
            elif fresh:
                found[o] = frozenset((o,))
            else:
                views = _views(node, graph, o)
                found[o] = frozenset().union(*map(of, views)) if views else frozenset((o,))
    return found


def saved_for_backward(graph: Graph, values: Iterable[int] | None = None) -> dict[int, int]:
    """Forward node id -> bytes of the buffers it made that backward nodes read (on the
    graph's shapes: a rank's local graph gives local bytes). With ``values``, the buffers
    those values keep alive instead. A view is charged to the node that made its buffer,
    once however many views are read."""
    if values is None:
        values = {v for n in graph.nodes if n.phase != FORWARD for v in n.inputs
                  if graph.values[v].producer is not None and graph.node_of(v).phase == FORWARD}
    buffers = guess_buffers(graph)
    held = set().union(*(buffers.get(v, frozenset()) for v in values))
    out: dict[int, int] = {}
    for b in held:
        node = graph.node_of(b)
        if node.phase == FORWARD:
            out[node.id] = out.get(node.id, 0) + graph.spec(b).nbytes
    return out


def predicted_activations(program) -> list[int]:
    """Intermediate bytes alive after each instruction of ``program`` (a ``Program``), from
    shapes alone, as :class:`MemoryMeter` counts them: buffers once, in-place outputs in
    their input's buffer, requested outputs apart. Its max predicts
    ``MemoryUsage.activations_peak``."""
    graph = program.graph
    buffers = guess_buffers(graph, [ins.node for ins in program.instructions], program.donated)
    wanted = set(program.outputs)
    live: dict[int, list[int]] = {}          # buffer -> [value refs, output refs]
    total = 0

    def touch(v: int, step: int) -> None:
        nonlocal total
        for buf in buffers.get(v, ()):
            entry = live.setdefault(buf, [0, 0])
            counted = entry[0] > 0 and entry[1] == 0
            entry[0] += step
            entry[1] += step * (v in wanted)
            now = entry[0] > 0 and entry[1] == 0
            total += (now - counted) * graph.spec(buf).nbytes

    timeline = []
    for ins in program.instructions:
        for o in ins.outs:
            touch(o, +1)
        timeline.append(total)
        for f in ins.frees:
            touch(f, -1)
    return timeline


def training_memory(usage: MemoryUsage, optimizer) -> dict[str, int]:
    """Bytes of one training step on this rank: ``usage`` of its loss-and-gradients program
    (outputs: the loss, then the gradients) and the optimizer's state arrays. ``total_peak``
    counts the states as alive through the step (true from the second step on)."""
    states = sum(int(np.asarray(a).nbytes) for k, a in optimizer.state_dict().items() if k != "step")
    return {"parameters": usage.parameters,
            "gradients": sum(usage.output_bytes[1:]),
            "optimizer_states": states,
            "inputs": usage.inputs,
            "activations_peak": usage.activations_peak,
            "total_peak": usage.total_peak + states}

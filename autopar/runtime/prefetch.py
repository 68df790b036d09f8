"""ZeRO-3 weight prefetch: a pass over one rank's local graph.

Under ``optimizer_level`` ``level3`` a rank holds its slices of the weights, and lowering
gathers each weight where it is used (autopar/runtime/spmd.py, ``param_layouts``): a
blocking ``Redistribute`` all-gather right before its first reader, in the forward pass and
again in the backward pass. This pass starts each of those all-gathers ahead of its use,
non-blocking, and waits for it where the blocking call was::

    before   [layer k: AG(Wk) op op AG(Wk') op ...] [layer k+1: AG(W) op ...]
    after    [start Wk+1, Wk+1' | layer k: wait Wk op op wait Wk' op ...] [layer k+1: wait W op ...]

* ``GatherStart`` at the start of the layer ``prefetch_layers`` before the one that uses
  the weight (``Communicator.iallgather`` of the held slice; the handle holds the buffer the
  gather fills, so the memory meter counts the gathered bytes from the start);
* ``Progress`` after every instruction while gathers (or gradient buckets) are in flight,
  the one mechanism of autopar/runtime/fusion.py (:func:`~.fusion.with_progress`);
* ``GatherWait`` right before the first reader: wait, and hand on the gathered weight (the
  very value the ``Redistribute`` made, so every reader is unchanged).

A *layer* is a run of consecutive instructions whose scopes share a layer name: the scope
up to its first numeric part (``blocks.3.attention.dense1`` -> ``blocks.3``), else its first
part (``final_layernorm``). The first layer's gathers start at the program's start. Only a
``Redistribute`` of a held weight that is one all-gather is moved (a weight sliced over two
mesh axes gathers in two steps and stays where it is). When the graph has recompute marks,
only the backward pass's gathers are moved: a forward gather is recomputed with the op it
feeds (``resolve_marks``), which needs it next to that op. The result is the same bits as
the blocking order: the same all-gather of the same slices, issued earlier.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection

from ..comm import redistribution as rd
from ..ir.graph import FORWARD, Graph, Node, Value
from ..ir.spec import TensorSpec
from .fusion import FlightStart, FlightWait, InFlight, renumbered, with_progress
from .spmd import Redistribute

SCOPE = "<weight-prefetch>"


class GatherStart(FlightStart):
    """forward: start the all-gather of a held weight slice, non-blocking / (inserted after
    lowering; never differentiated)."""

    def __init__(self, comm, dim: int, nbytes: int, clock: list):
        super().__init__(dim=dim)
        self.comm, self.nbytes, self.clock = comm, nbytes, clock

    def forward(self, x):
        return self._timed(lambda: InFlight(self.comm.iallgather(x, axis=self.attrs["dim"]), self.nbytes))


class GatherWait(FlightWait):
    """forward: wait for a weight's all-gather, hand on the gathered weight."""

    save_inputs = "none"
    fresh_output = True

    def __init__(self, clock: list):
        super().__init__()
        self.clock = clock

    def forward(self, flight: InFlight):
        t0 = time.perf_counter()
        out = flight.request.wait()
        self.clock[0] += time.perf_counter() - t0
        return out

    def flops(self, specs, out):
        return 0


@dataclasses.dataclass(frozen=True)
class Prefetch:
    """What the pass did: per moved gather, (weight's local value, start position, wait
    position) in the new program, and how many layers ahead it starts them."""

    layers_ahead: int
    gathers: tuple[tuple[int, int, int], ...]

    def __str__(self) -> str:
        return f"Prefetch({len(self.gathers)} weight gathers, {self.layers_ahead} layer(s) ahead)"


def layer_of(scope: str) -> str:
    """The layer a scope belongs to: up to its first numeric part, else its first part."""
    parts = scope.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:k + 1])
    return parts[0]


def held_weights(local: Graph) -> set[int]:
    """The local values of the parameters ``local`` holds as ZeRO-3 slices (gathered per use)."""
    return {v for v, shard in zip(local.params, local.param_objs) if shard.per_use}


def prefetchable(node: Node, weights: Collection[int]) -> bool:
    """Whether ``node`` gathers a held weight (one of the local values ``weights``) in one
    all-gather: what this pass moves."""
    if not isinstance(node.prim, Redistribute) or node.inputs[0] not in weights:
        return False
    steps = node.prim.attrs["redist"].steps
    return len(steps) == 1 and steps[0].kind == rd.ALLGATHER


def prefetch_weight_gathers(local: Graph, weights: Collection[int], layers_ahead: int) -> tuple[Graph, Prefetch]:
    """``local`` with the all-gathers of the held weights ``weights`` (local values) started
    ``layers_ahead`` layers before the layer of their first reader and waited for right
    before it (module docstring); ``layers_ahead`` 0 leaves the graph as it is."""
    forward_too = not any(n.recompute for n in local.nodes)
    moved = [n for n in local.nodes if prefetchable(n, weights) and (forward_too or n.phase != FORWARD)]
    if layers_ahead == 0 or not moved:
        return local, Prefetch(layers_ahead, ())
    taken = {n.id for n in moved}
    rest = [n for n in local.nodes if n.id not in taken]
    layer, first_of = [], []          # per kept node: its layer number; per layer: its first node's position
    for k, n in enumerate(rest):
        if not layer or layer_of(n.scope) != layer_of(rest[k - 1].scope):
            first_of.append(k)
        layer.append(len(first_of) - 1)
    first_backward = next((k for k, n in enumerate(rest) if n.phase != FORWARD), len(rest))
    first_read: dict[int, int] = {}        # value -> position of its first reader among the kept nodes
    for k, n in enumerate(rest):
        for v in n.inputs:
            first_read.setdefault(v, k)
    values = list(local.values)
    starts: dict[int, list[Node]] = {}     # kept position -> the starts placed before it
    waits: dict[int, list[Node]] = {}      # kept position -> the waits placed before it
    pairs = []
    for node in moved:
        use = first_read[node.outputs[0]]
        at = first_of[max(0, layer[use] - layers_ahead)]
        if not forward_too:                # backward gathers only: started in the backward pass
            at = max(at, first_backward)
        start, wait = _gather_nodes(local, node, values)
        starts.setdefault(at, []).append(start)
        waits.setdefault(use, []).append(wait)
        pairs.append((start, wait))
    order = []
    for k, n in enumerate(rest):
        order += starts.get(k, []) + waits.get(k, []) + [n]
    graph = renumbered(local, with_progress(order, values), values)
    placed = {id(n.prim): n.id for n in graph.nodes if isinstance(n.prim, (GatherStart, GatherWait))}
    gathers = sorted((s.inputs[0], placed[id(s.prim)], placed[id(w.prim)]) for s, w in pairs)
    return graph, Prefetch(layers_ahead, tuple(sorted(gathers, key=lambda g: g[1])))


def _gather_nodes(local: Graph, node: Node, values: list[Value]) -> tuple[Node, Node]:
    """The start and wait replacing the gather ``node`` (ids and producers set by renumbered);
    the wait makes the very value the gather made. The handle's spec is the gathered one."""
    redist, prim = node.prim.attrs["redist"], node.prim
    step = redist.steps[0]
    spec = local.spec(node.outputs[0])
    flight = len(values)
    values.append(Value(flight, TensorSpec(spec.shape, spec.dtype), None))
    tag = f"{SCOPE}/{node.name}"
    fields = dict(phase=node.phase, stage=node.stage)
    start = Node(-1, GatherStart(prim.comms[step.axis], step.dim, spec.nbytes, prim.clock), node.inputs, (flight,),
                 node.scope, f"{tag}/GatherStart", **fields)
    wait = Node(-1, GatherWait(prim.clock), (flight,), node.outputs, node.scope, f"{tag}/GatherWait", **fields)
    return start, wait

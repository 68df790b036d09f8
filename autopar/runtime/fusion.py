"""Gradient fusion and overlap: a pass over one rank's local graph.

Lowering ends each weight's gradient in the weight's layout; for a weight replicated over
data-parallel ranks that is a ``Redistribute`` all-reducing a partial sum (under optimizer
parallel, reduce-scattering it into the weight's slice), placed among the outputs, after the
whole backward pass (autopar/runtime/spmd.py). This pass takes those reductions out and puts
buckets in their place (which gradients share one: the ``comm_fusion`` rule of their kind,
autopar/comm/fusion.py)::

    before   ... dW3 ... dW2 ... dW1 | AR(dW3) AR(dW2) AR(dW1)            one blocking call each
    after    ... dW3 ... dW2 [start A: dW3,dW2] ... dW1 [start B: dW1] | wait A, wait B

* ``BucketStart`` right after the node making the bucket's last gradient (in program
  order, so the same instruction on every member of the group): copy the bucket's partial
  gradients into one buffer it owns and start a non-blocking all-reduce of it, in place
  (``Communicator.iallreduce(donate=True)``), then let the backward pass go on. A reduce-scatter bucket
  packs member i's blocks of every gradient into row i of an (n, m) buffer and starts
  ``ireduce_scatter`` along rows, which leaves each member its own blocks;
* ``Progress`` after every instruction while buckets are in flight: test them, since MPI
  moves a non-blocking collective only inside MPI calls;
* ``BucketWait`` at the end of the program, before the optimizer's update: wait, and cut
  the reduced buffer into the gradients (windows on it, the values the Redistributes made).

Equal to the unfused program bit for bit wherever the all-reduce sums each element in
the same order whatever the buffer (the in-process backend always, MPI on 2 ranks): an
element's sum does not depend on its neighbours. Only single all-reduce or reduce-scatter steps of gradients
are taken; any other redistribution stays where it is.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np

from ..backend import array_module, on_host
from ..comm import redistribution as rd
from ..comm.fusion import Fusible, FusionRule, plan_buckets
from ..ir.graph import BACKWARD, Graph, Node, Value
from ..ir.spec import TensorSpec
from ..ops.primitive import Primitive
from .spmd import Redistribute

SCOPE = "<grad-fusion>"
PROGRESS_SCOPE = "<comm-progress>"   # the Progress nodes of any pass's collectives in flight


class InFlight:
    """A bucket's all-reduce in flight: its request, and the bytes it holds (for the meter)."""

    def __init__(self, request, nbytes: int):
        self.request, self.nbytes = request, nbytes


class FlightStart(Primitive):
    """An instruction that starts a non-blocking collective and outputs its :class:`InFlight`
    handle (a gradient bucket's, a ZeRO-3 weight's prefetched all-gather), which
    :func:`with_progress` threads through :class:`Progress` nodes to its :class:`FlightWait`.
    A subclass keeps ``self.clock`` (the program's comm clock, a one-element list)."""

    save_inputs = "none"
    fresh_output = True

    def _timed(self, start):
        """``start()``, its host time added to the comm clock."""
        t0 = time.perf_counter()
        flight = start()
        self.clock[0] += time.perf_counter() - t0
        return flight

    def flops(self, specs, out):
        return 0


class FlightWait(Primitive):
    """An instruction that reads an :class:`InFlight` handle (input 0) and waits for it."""


class BucketStart(FlightStart):
    """forward: pack the bucket's gradients into one new buffer, start its collective /
    (inserted after lowering; never differentiated)."""

    n_inputs = None

    def __init__(self, kind: str, comm, dims: tuple[int, ...], clock: list):
        super().__init__(collective=kind, dims=dims)
        self.comm, self.clock = comm, clock

    def forward(self, *grads):
        return self._timed(lambda: start_bucket(self.comm, grads, self.attrs["collective"], self.attrs["dims"]))


class BucketWait(FlightWait):
    """forward: wait for the bucket's collective, cut it into the gradients (no copy). Its
    inputs after the handle are the bucket's gradients, unread: a collective in flight may
    read them where they are (MPI's shared window does), so they live -- and no later
    instruction may overwrite their memory -- until the wait."""

    n_inputs = None

    save_inputs = "none"
    fresh_output = True

    def __init__(self, shapes: tuple[tuple[int, ...], ...], clock: list):
        super().__init__(shapes=shapes)
        self.clock = clock

    def forward(self, flight: InFlight, *held):
        t0 = time.perf_counter()
        out = finish_bucket(flight, self.attrs["shapes"])
        self.clock[0] += time.perf_counter() - t0
        return tuple(out)

    def flops(self, specs, out):
        return 0


def start_bucket(comm, arrays: Sequence[np.ndarray], kind: str = rd.ALLREDUCE, dims: Sequence[int] = ()) -> InFlight:
    """Start the bucket's collective on ``comm``: an all-reduce of ``arrays`` flattened and
    joined (``Communicator.iallreduce_joined``: into one new buffer the bucket owns until the
    wait, or read in place), or a reduce-scatter of (n, m) rows, row i holding block i (along
    ``dims``) of each array, flattened."""
    if kind == rd.ALLREDUCE:    # joined into one buffer, or read in place (MPI's shared window)
        return InFlight(comm.iallreduce_joined(arrays), sum(a.nbytes for a in arrays))
    xp = array_module(*arrays)            # the buffer is made where the gradients live
    blocks = [xp.split(a, comm.size, axis=d) for a, d in zip(arrays, dims)]
    rows = xp.empty((comm.size, sum(a.size for a in arrays) // comm.size), arrays[0].dtype)   # (n, m)
    for i, row in enumerate(rows):        # row i: block i of every array, flattened, copied once
        at = 0
        for b in blocks:
            row[at:at + b[i].size].reshape(b[i].shape)[...] = b[i]
            at += b[i].size
    return InFlight(comm.ireduce_scatter(rows, axis=0), rows.nbytes)


def finish_bucket(flight: InFlight, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Wait for a bucket and cut its result into arrays of ``shapes``: windows on the
    result's memory, no copy. Each is its own numpy buffer (``np.frombuffer``), so nothing
    downstream takes two gradients for one array (a program copies outputs that share a
    base array, for an optimizer updating them in place); they never overlap. A device
    result is cut into views of its buffer (the program copies all but one of them)."""
    result = flight.request.wait()
    if not on_host(result):
        return _windows(result.reshape(-1), shapes)
    flat = np.ascontiguousarray(result).reshape(-1)
    memory = memoryview(flat.view(np.uint8))
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape)) * flat.itemsize
        out.append(np.frombuffer(memory[at:at + size], flat.dtype).reshape(shape))
        at += size
    return out


def _windows(flat, shapes: Sequence[tuple[int, ...]]) -> list:
    """Consecutive pieces of the 1-d ``flat`` shaped as ``shapes`` (views)."""
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return out


class Progress(Primitive):
    """forward: test the buckets in flight, hand their handles on. MPI moves a non-blocking
    collective only while the process calls MPI (measured with MPICH: a 64 MB Iallreduce
    left alone for 0.5 s still took its whole time in Wait; tested every millisecond, none),
    so one follows every instruction while a bucket is in flight (a test costs microseconds)."""

    n_inputs = None
    save_inputs = "none"

    def forward(self, *flights: InFlight):
        for flight in flights:
            flight.request.test()
        return flights

    def flops(self, specs, out):
        return 0


@dataclasses.dataclass(frozen=True)
class Fusion:
    """What the pass did: buckets as the gradient outputs they reduce (positions among the
    program's outputs), in start order."""

    buckets: tuple[tuple[int, ...], ...]

    def __str__(self) -> str:
        return f"Fusion({len(self.buckets)} buckets of {[len(b) for b in self.buckets]} reductions)"


@dataclasses.dataclass(frozen=True)
class _Reduction:
    """One all-reduce the pass takes: its node, the gradient output it is (part of), and
    where its result is first read (None: only as an output, at the end)."""

    node: Node
    output: int
    needed_at: int | None


def bucketable(prim) -> tuple[str, object, int | None] | None:
    """(kind, communicator, tensor dim) of a Redistribute that is one all-reduce or one
    reduce-scatter, else None."""
    if not isinstance(prim, Redistribute):
        return None
    steps = prim.attrs["redist"].steps
    if len(steps) != 1 or steps[0].kind not in (rd.ALLREDUCE, rd.REDUCE_SCATTER):
        return None
    return steps[0].kind, prim.comms[steps[0].axis], steps[0].dim


def _gradient_outputs(local: Graph, first: int, count: int) -> dict[int, int]:
    """Value -> the gradient output (position) it is, or is a part of: the outputs
    ``first .. first+count-1`` and, backwards, every value only summed into one of them
    (read by gradient accumulations alone: AddN nodes lowering added)."""
    readers: dict[int, list[Node]] = {}
    for n in local.nodes:
        for v in n.inputs:
            readers.setdefault(v, []).append(n)
    part_of = {local.outputs[j]: j for j in range(first, first + count) if not readers.get(local.outputs[j])}
    for n in reversed(local.nodes):
        accumulates = n.phase == BACKWARD and n.forward_of is None and not isinstance(n.prim, Redistribute)
        if not accumulates or n.outputs[0] not in part_of:
            continue
        for v in n.inputs:
            if v not in local.outputs and all(r.id == n.id for r in readers[v]):
                part_of[v] = part_of[n.outputs[0]]
    return part_of


def _reductions(local: Graph, first: int, count: int, kinds) -> list[_Reduction]:
    """Every all-reduce or reduce-scatter (of ``kinds``) making a gradient output or a part
    of one, in the order their inputs are made."""
    part_of = _gradient_outputs(local, first, count)
    first_reader: dict[int, int] = {}
    for n in local.nodes:
        for v in n.inputs:
            first_reader.setdefault(v, n.id)
    found = []
    for v, j in part_of.items():
        node = local.node_of(v)
        how = None if node is None else bucketable(node.prim)
        if how is not None and how[0] in kinds and local.outputs.count(v) <= 1:
            found.append(_Reduction(node, j, first_reader.get(v)))
    return sorted(found, key=lambda r: (_ready_at(local, r.node), r.output))


def _ready_at(local: Graph, node: Node) -> int:
    """Position of the node making a reduction's input (-1: it exists before the program)."""
    producer = local.values[node.inputs[0]].producer
    return -1 if producer is None else producer


def fuse_gradient_reductions(local: Graph, first: int, params: Sequence[int], rules: Mapping[str, FusionRule],
                             n_params: int) -> tuple[Graph, Fusion]:
    """``local`` with the reductions of the gradient outputs ``first .. first+len(params)-1``
    (of parameters ``params``, indices in the trained list of ``n_params``; and of their
    parts summed later) bucketed by ``rules`` (redistribution step kind -> rule; a kind
    left out is not touched). Only reductions of one kind, over one communicator, in one
    dtype and first read at the same place share a bucket: the outputs' (waited for at the
    end), or the parts of one sum (waited for right before it)."""
    found = _reductions(local, first, len(params), rules)
    buckets = []
    for kind, rule in rules.items():
        mine = [r for r in found if bucketable(r.node.prim)[0] == kind]
        items = [Fusible(params[r.output - first], local.spec(r.node.inputs[0]).nbytes,
                         (bucketable(r.node.prim)[1], local.spec(r.node.inputs[0]).dtype.str, r.needed_at))
                 for r in mine]
        buckets += [[mine[k] for k in b] for b in plan_buckets(items, rule, n_params)]
    if not buckets:
        return local, Fusion(())
    buckets.sort(key=lambda b: max(_ready_at(local, r.node) for r in b))
    values = list(local.values)
    after: dict[int, list[Node]] = {}          # old node id -> the starts placed right after it
    before: dict[int | None, list[Node]] = {}  # old node id -> the waits placed right before it (None: at the end)
    for b in buckets:
        start, wait = _bucket_nodes(local, [r.node for r in b], values)
        after.setdefault(max(_ready_at(local, r.node) for r in b), []).append(start)
        before.setdefault(b[0].needed_at, []).append(wait)
    removed = {r.node.id for b in buckets for r in b}
    order = list(after.get(-1, ()))
    for node in local.nodes:
        if node.id not in removed:
            order.extend(before.get(node.id, ()))
            order.append(node)
            order.extend(after.get(node.id, ()))
    order.extend(before.get(None, ()))
    graph = renumbered(local, with_progress(order, values), values)
    return graph, Fusion(tuple(tuple(r.output for r in b) for b in buckets))


def with_progress(order: list[Node], values: list[Value]) -> list[Node]:
    """``order`` with a :class:`Progress` node after every node run while collectives are
    in flight (any :class:`FlightStart`'s: buckets, prefetched gathers), threading their
    handles through it to their :class:`FlightWait`. Progress nodes already in ``order``
    (an earlier pass's) are taken out first, so passes may each call it: one chain results."""
    order = _without_progress(order, values)
    current: dict[int, int] = {}          # a start's handle value -> its latest pass-through
    out = []
    for node in order:
        if isinstance(node.prim, FlightWait):
            node = dataclasses.replace(node, inputs=(current.pop(node.inputs[0]),) + node.inputs[1:])
        out.append(node)
        if isinstance(node.prim, FlightStart):
            current[node.outputs[0]] = node.outputs[0]
        elif current and not isinstance(node.prim, FlightWait):
            outs = []
            for v in current.values():
                outs.append(len(values))
                values.append(Value(len(values), values[v].spec, None))
            out.append(Node(-1, Progress(), tuple(current.values()), tuple(outs), PROGRESS_SCOPE,
                            f"{PROGRESS_SCOPE}/progress{outs[0]}/Progress", phase=node.phase))
            current = dict(zip(current, outs))
    return out


def _without_progress(order: list[Node], values: list[Value]) -> list[Node]:
    """``order`` without its :class:`Progress` nodes: each reader of a pass-through reads
    the handle it passed (their values are left unproduced)."""
    passed: dict[int, int] = {}            # a Progress output -> the start's handle it carries
    out = []
    for node in order:
        if isinstance(node.prim, Progress):
            for i, o in zip(node.inputs, node.outputs):
                passed[o] = passed.get(i, i)
                values[o] = dataclasses.replace(values[o], producer=None)
            continue
        if any(v in passed for v in node.inputs):
            node = dataclasses.replace(node, inputs=tuple(passed.get(v, v) for v in node.inputs))
        out.append(node)
    return out


def _bucket_nodes(local: Graph, nodes: list[Node], values: list[Value]) -> tuple[Node, Node]:
    """The start and wait nodes of one bucket (ids and producers set by _renumbered); the
    wait makes the very values the bucket's Redistributes made."""
    specs = [local.spec(n.inputs[0]) for n in nodes]
    kind, comm, _ = bucketable(nodes[0].prim)
    size = sum(s.size for s in specs)
    clock = nodes[0].prim.clock
    flight = len(values)
    values.append(Value(flight, TensorSpec((size,), specs[0].dtype), None))
    tag = f"{SCOPE}/bucket{flight}"
    dims = tuple(bucketable(n.prim)[2] for n in nodes)
    start = Node(-1, BucketStart(kind, comm, dims, clock), tuple(n.inputs[0] for n in nodes),
                 (flight,), SCOPE, f"{tag}/BucketStart", phase=BACKWARD)
    wait = Node(-1, BucketWait(tuple(local.spec(n.outputs[0]).shape for n in nodes), clock),
                (flight,) + tuple(n.inputs[0] for n in nodes), tuple(n.outputs[0] for n in nodes), SCOPE,
                f"{tag}/BucketWait", phase=BACKWARD)
    return start, wait


def renumbered(local: Graph, order: list[Node], values: list[Value]) -> Graph:
    """A graph of ``order`` with node ids their positions (forward_of and producers follow)."""
    new_id = {id(node): k for k, node in enumerate(order)}
    old_to_new = {node.id: new_id[id(node)] for node in order if node.id >= 0}
    nodes = []
    for k, node in enumerate(order):
        fo = None if node.forward_of is None else old_to_new[node.forward_of]
        nodes.append(dataclasses.replace(node, id=k, forward_of=fo))
        for o in node.outputs:
            values[o] = dataclasses.replace(values[o], producer=k)
    return dataclasses.replace(local, values=tuple(values), nodes=tuple(nodes))

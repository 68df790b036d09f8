"""Walking a pipeline schedule on one rank: forward and backward halves per micro-batch,
activations and their gradients sent between stages, gradients accumulated.

Order. Every rank walks the same clock x stage table (:mod:`autopar.strategy.pipeline.schedule`)
phase by phase, clock by clock, running its stage's item of each clock. The *transfers* --
every activation made by a forward at clock t and every gradient made by a backward at t --
have one global order (clock, stage, value, destination) and go between the ranks at the
same position of the two stage meshes. They are non-blocking (``isend`` / ``irecv``):

    send      posted as soon as the item that makes the value ends (in the global order)
    receive   posted (all receives in the global order) at the latest when the item before
              its consumer starts, waited just before the consumer's item
    sends     tested after every item (their arrays freed once delivered), all waited at the
              end of the step

so a transfer overlaps the next item's compute, and a rank waits only for a value an item
needs now. Both sides start the messages between two ranks with one tag in the same (global)
order, so they match whatever the timing; an item at clock t waits only for values made at
clocks before t, so no order of arrivals deadlocks.

    clock      0     1     2     3   ...
    stage 0    F0 -> isend x(0)  F1 -> isend x(1) ...
    stage 1    .     wait x(0) F0    wait x(1) F1 ...

Virtual stages (interleaved 1F1B). A rank holds one :class:`ChunkStep` per chunk of the
layers it runs (virtual stages ``stage, stage + p, ...``); an item names its chunk, and a
transfer goes between virtual stages -- from rank p - 1 back to rank 0 where chunk c hands
over to chunk c + 1 across the wrap. A transfer between two chunks of the same rank (a
value made on virtual stage 0 and read on virtual stage p) is a local hand-over, no message.

Memory. ``saved[(virtual stage, k)]`` holds micro-batch k's saved values of a chunk from its
forward to its backward; ``live`` counts them after every clock, so the measured in-flight
micro-batches (chunks) can be checked against :meth:`Schedule.in_flight`. Given a
:class:`~autopar.runtime.pipeline.memory.StepMemory`, every half runs under a meter told
what the runner holds around it (received values, and made ones until their sends complete),
so the step's peak live bytes are measured.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from ...backend import array_module
from ...strategy.pipeline.schedule import Schedule, chunk_of

ACTIVATION, GRADIENT = "activation", "gradient"
TAGS = {ACTIVATION: 1, GRADIENT: 2}


@dataclass(frozen=True)
class Transfer:
    clock: int
    kind: str               # ACTIVATION (forward, src < dst) or GRADIENT (backward, src > dst)
    micro: int
    value: int              # global value id of the activation
    src: int                # sending (virtual) stage
    dst: int                # receiving (virtual) stage


def transfers(schedule: Schedule, sent_by, grads_back_by) -> tuple[Transfer, ...]:
    """Every transfer of one step in the global order. ``sent_by(c)``: (value, dsts) that
    virtual stage c sends after a forward; ``grads_back_by(c)``: (value, src) whose gradients
    it sends back after a backward. Without virtual stages c is the stage."""
    out = []
    for t in range(schedule.clocks):
        for s in range(schedule.stages):
            item = schedule.table[s][t]
            if item is None:
                continue
            kind, k, c = item[0], item[1], schedule.virtual_stage(s, item)
            if kind == "F":
                out += [Transfer(t, ACTIVATION, k, v, c, d) for v, dsts in sent_by(c) for d in dsts]
            else:
                out += [Transfer(t, GRADIENT, k, v, c, src) for v, src in grads_back_by(c)]
    return tuple(out)


@dataclass(frozen=True, eq=False)
class ChunkStep:
    """One virtual stage's halves on this rank and how their inputs and outputs map (without
    virtual stages, the rank's one stage)."""

    virtual_stage: int
    forward: tuple                                  # Program per micro-batch (one shared if equal)
    backward: tuple
    batch_inputs: tuple[int, ...]                   # fed arrays the forward half reads
    received: tuple[int, ...]                       # values the forward half receives, in input order
    sent: tuple[tuple[int, tuple[int, ...]], ...]   # (value, virtual stages reading it): delivered first
    has_loss: bool
    cotangents: tuple[tuple[int, int], ...]         # (value, virtual stage it comes from), backward inputs
    grads_back: tuple[int, ...]                     # values whose gradients the backward half ends with
    grad_slots: tuple[int, ...]                     # the rank's gradient slot of each parameter gradient made


@dataclass(frozen=True, eq=False)
class StageStep:
    """What one rank runs: its stage's chunks (one without virtual stages), the schedule,
    the wire shapes and its transfers."""

    stage: int
    ranks_per_stage: int
    position: int                                   # index in the stage mesh
    schedule: Schedule
    chunks: tuple[ChunkStep, ...]                   # [chunk index]: virtual stage ``index * p + stage``
    n_param_grads: int                              # gradient slots of the rank (its parameters)
    wire: dict[int, tuple[tuple[int, ...], np.dtype]]   # value -> local (shape, dtype) on the wire
    transfers: tuple[Transfer, ...]                 # this rank's, in the global order

    @property
    def forward(self) -> tuple:
        """Every chunk's forward programs."""
        return tuple(p for c in self.chunks for p in c.forward)

    @property
    def backward(self) -> tuple:
        return tuple(p for c in self.chunks for p in c.backward)

    @property
    def batch_inputs(self) -> tuple[int, ...]:
        """The fed arrays any chunk reads, ascending."""
        return tuple(sorted({i for c in self.chunks for i in c.batch_inputs}))

    def rank_of(self, virtual_stage: int) -> int:
        """The stage running ``virtual_stage``."""
        return virtual_stage % self.schedule.stages

    def peer(self, virtual_stage: int) -> int:
        """The rank at this rank's position of the stage running ``virtual_stage``."""
        return self.rank_of(virtual_stage) * self.ranks_per_stage + self.position


class StepResult:
    """One step on one rank: micro-batch losses (last stage), summed gradients, live counts."""

    def __init__(self, losses: list, grads: list, live: list[int]):
        self.losses, self.grads, self.live = losses, grads, live

    @property
    def peak_in_flight(self) -> int:
        return max(self.live, default=0)


def run_step(plan: StageStep, world, micro_batches: Sequence[Sequence[np.ndarray]], step: int,
             memory=None) -> StepResult:
    """Walk the schedule once: ``micro_batches[k]`` are micro-batch k's fed arrays;
    ``memory`` (a StepMemory, or None) measures live bytes."""
    wire = _Wire(plan, world)
    inbox: dict[tuple, np.ndarray] = {}     # (kind, value, virtual stage, k) -> array received
    outbox: dict[tuple, list] = {}          # (kind, value, virtual stage, k) -> [array, sends to post, requests]
    saved: dict[tuple[int, int], list] = {}  # (virtual stage, k) -> the forward's saved values
    losses, grads, live = [], [None] * plan.n_param_grads, []
    row = plan.schedule.table[plan.stage]
    busy = [t for t, item in enumerate(row) if item is not None]
    following = dict(zip(busy, busy[1:] + [plan.schedule.clocks]))   # clock -> this rank's next item's
    one_chunk = len(plan.chunks) == 1
    for phase in plan.schedule.phases(plan.stage):
        for t in phase.clocks:
            item = row[t]
            if item is not None:
                chunk, k = plan.chunks[chunk_of(item)], item[1]
                c = chunk.virtual_stage
                wire.post_receives(following[t])
                if item[0] == "F":
                    wire.collect([(ACTIVATION, v, c, k) for v in chunk.received], inbox)
                    _forward(chunk, k, micro_batches, step, memory, inbox, outbox, saved, grads, losses,
                             k if one_chunk else (c, k))
                else:
                    wire.collect([(GRADIENT, v, src, k) for v, src in chunk.cotangents], inbox)
                    _backward(chunk, k, step, memory, inbox, outbox, saved, grads)
                wire.send(t, inbox, outbox)
            live.append(len(saved))
    wire.finish(outbox)
    assert not saved and not inbox and not outbox, "pipeline: the schedule left work undone"
    return StepResult(losses, grads, live)


def _forward(chunk: ChunkStep, k: int, micro_batches, step: int, memory, inbox: dict, outbox: dict,
             saved: dict, grads: list, losses: list, memory_key) -> None:
    """Micro-batch k's forward half of ``chunk``: its activations go to the outbox, its
    saved values stay until the backward."""
    c = chunk.virtual_stage
    received = [inbox.pop((ACTIVATION, v, c, k)) for v in chunk.received]
    ins = [micro_batches[k][i] for i in chunk.batch_inputs] + received
    prog = chunk.forward[k % len(chunk.forward)]
    if memory is None:
        outs = prog.run(ins, step)
    else:   # every output of a forward half is an activation
        outs = memory.run(prog, ins, step, _held(saved, inbox, outbox, received), grads, prog.outputs)
    for j, (v, dsts) in enumerate(chunk.sent):
        outbox[(ACTIVATION, v, c, k)] = [outs[j], len(dsts), []]
    n = len(chunk.sent)
    if chunk.has_loss:
        losses.append(outs[n])
        n += 1
    saved[(c, k)] = outs[n:]
    if memory is not None:
        memory.saved(memory_key, saved[(c, k)])


def _backward(chunk: ChunkStep, k: int, step: int, memory, inbox: dict, outbox: dict, saved: dict,
              grads: list) -> None:
    """Micro-batch k's backward half of ``chunk``: parameter gradients added into the rank's
    slots, the received activations' gradients to the outbox."""
    c = chunk.virtual_stage
    ins = saved.pop((c, k)) + [inbox.pop((GRADIENT, v, src, k)) for v, src in chunk.cotangents]
    prog = chunk.backward[k % len(chunk.backward)]
    n = len(chunk.grad_slots)
    if memory is None:
        outs = prog.run(ins, step)
    else:   # the gradients it sends back are activations' too
        outs = memory.run(prog, ins, step, _held(saved, inbox, outbox, ins), grads, prog.outputs[n:])
    for j, slot in enumerate(chunk.grad_slots):
        g = outs[j]          # the program's own output (Program.run hands back arrays the caller may modify)
        grads[slot] = g if grads[slot] is None else array_module(g).add(grads[slot], g, out=grads[slot])
    for v, g in zip(chunk.grads_back, outs[n:]):
        outbox[(GRADIENT, v, c, k)] = [g, 1, []]


def _held(saved: dict, inbox: dict, outbox: dict, running: list):
    """The activation arrays the runner holds (and ``running``, the half's activation inputs)."""
    return chain(chain.from_iterable(saved.values()), inbox.values(), (e[0] for e in outbox.values()), running)


def _in_key(tr: Transfer) -> tuple:
    """Where a transfer is filed on arrival: an activation under its receiving virtual stage,
    a gradient under its sending one (the value's maker takes it)."""
    return tr.kind, tr.value, tr.dst if tr.kind == ACTIVATION else tr.src, tr.micro


class _Wire:
    """This rank's transfers of one step, non-blocking (see the module's docstring). Between
    two chunks of this rank a value is handed over, not sent."""

    def __init__(self, plan: StageStep, world):
        self._plan, self._world = plan, world
        self._sends: dict[int, list[Transfer]] = {}   # clock -> transfers this rank's item of that clock makes
        self._receives: list[Transfer] = []           # the others', to this rank, in the global order
        for tr in plan.transfers:
            if plan.rank_of(tr.src) == plan.stage:
                self._sends.setdefault(tr.clock, []).append(tr)
            else:
                self._receives.append(tr)
        self._posted = 0                              # receives posted so far (a prefix of the list)
        self._pending: dict[tuple, object] = {}       # in key -> its receive's request

    def post_receives(self, before: int) -> None:
        """Post, in the global order, every receive of a value made before clock ``before``."""
        plan, todo = self._plan, self._receives
        while self._posted < len(todo) and todo[self._posted].clock < before:
            tr = todo[self._posted]
            shape, dtype = plan.wire[tr.value]
            self._pending[_in_key(tr)] = self._world.irecv(shape, dtype, plan.peer(tr.src), TAGS[tr.kind])
            self._posted += 1

    def collect(self, keys: Sequence[tuple], inbox: dict) -> None:
        """Wait for the receives an item reads (those handed over locally are already in)."""
        for key in keys:
            request = self._pending.pop(key, None)
            if request is not None:
                inbox[key] = request.wait()

    def send(self, t: int, inbox: dict, outbox: dict) -> None:
        """Post the sends (or hand-overs) of the values clock t's item made, then free the
        arrays whose sends have all completed."""
        plan = self._plan
        for tr in self._sends.get(t, ()):
            entry = outbox[(tr.kind, tr.value, tr.src, tr.micro)]
            if plan.rank_of(tr.dst) == plan.stage:
                inbox[_in_key(tr)] = entry[0]          # programs never overwrite their inputs
            else:
                entry[2].append(self._world.isend(entry[0], plan.peer(tr.dst), TAGS[tr.kind]))
            entry[1] -= 1
        for key in [key for key, (_, left, reqs) in outbox.items() if not left and all(r.test() for r in reqs)]:
            del outbox[key]

    def finish(self, outbox: dict) -> None:
        """Wait for every send still in flight (the step's end)."""
        assert self._posted == len(self._receives) and not self._pending, "pipeline: a receive was never read"
        for key in [key for key, (_, left, _) in outbox.items() if not left]:
            for request in outbox.pop(key)[2]:
                request.wait()

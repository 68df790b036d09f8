"""Walking a pipeline schedule on one rank: forward and backward halves per micro-batch,
activations and their gradients sent between stages, gradients accumulated.

Order. Every rank walks the same clock x stage table (:mod:`autopar.runtime.pipeline.schedule`)
phase by phase, clock by clock: at clock t it runs its stage's item, if any, then takes
part in the *transfers* of clock t -- every activation made by a forward at t and every
gradient made by a backward at t, in one global order (clock, stage, value, destination).
Each transfer goes between the ranks at the same position of the two stage meshes. Each
rank meets its sends, receives and its stage's collectives in the order of that one global
sequence, so the first unfinished event always has all its parties present: no deadlock,
whatever the MPI implementation buffers (the in-process backend's sends wait for their
receive, the strictest case). A value is received at the end of the clock that made it and
held until its consumer's item.

    clock      0     1     2     3   ...
    stage 0    F0 -> send x(0)      F1 -> send x(1) ...
    stage 1    .     recv x(0) F0  ...

Memory. ``saved[k]`` holds micro-batch k's saved values from its forward to its backward;
``live`` counts them after every clock, so the measured in-flight micro-batches can be
checked against :meth:`Schedule.in_flight`. Given a
:class:`~autopar.runtime.pipeline.memory.StepMemory`, every half runs under a meter told
what the runner holds around it, so the step's peak live bytes are measured.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .schedule import Schedule

ACTIVATION, GRADIENT = "activation", "gradient"
TAGS = {ACTIVATION: 1, GRADIENT: 2}


@dataclass(frozen=True)
class Transfer:
    clock: int
    kind: str               # ACTIVATION (forward, src < dst) or GRADIENT (backward, src > dst)
    micro: int
    value: int              # global value id of the activation
    src: int                # sending stage
    dst: int                # receiving stage


def transfers(schedule: Schedule, sent_by, grads_back_by) -> tuple[Transfer, ...]:
    """Every transfer of one step in the global order. ``sent_by(s)``: (value, dsts) that
    stage s sends after a forward; ``grads_back_by(s)``: (value, src) whose gradients it
    sends back after a backward."""
    out = []
    for t in range(schedule.clocks):
        for s in range(schedule.stages):
            item = schedule.table[s][t]
            if item is None:
                continue
            kind, k = item
            if kind == "F":
                out += [Transfer(t, ACTIVATION, k, v, s, d) for v, dsts in sent_by(s) for d in dsts]
            else:
                out += [Transfer(t, GRADIENT, k, v, s, src) for v, src in grads_back_by(s)]
    return tuple(out)


@dataclass(frozen=True, eq=False)
class StageStep:
    """What one rank runs: its stage's halves and how their inputs and outputs map."""

    stage: int
    ranks_per_stage: int
    position: int                                   # index in the stage mesh
    schedule: Schedule
    forward: tuple                                  # Program per micro-batch (one shared if equal)
    backward: tuple
    batch_inputs: tuple[int, ...]                   # fed arrays the forward half reads
    received: tuple[int, ...]                       # values the forward half receives, in input order
    sent: tuple[tuple[int, tuple[int, ...]], ...]   # (value, stages reading it): delivered first, in order
    has_loss: bool
    cotangents: tuple[tuple[int, int], ...]         # (value, stage it comes from), backward inputs
    grads_back: tuple[int, ...]                     # values whose gradients the backward half ends with
    n_param_grads: int
    wire: dict[int, tuple[tuple[int, ...], np.dtype]]   # value -> local (shape, dtype) on the wire
    transfers: tuple[Transfer, ...]                 # this rank's, in the global order

    def peer(self, stage: int) -> int:
        return stage * self.ranks_per_stage + self.position


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
    by_clock: dict[int, list[Transfer]] = {}
    for tr in plan.transfers:
        by_clock.setdefault(tr.clock, []).append(tr)
    inbox: dict[tuple, np.ndarray] = {}     # (ACTIVATION, value, k) / (GRADIENT, value, src, k) -> array
    outbox: dict[tuple, list] = {}          # (kind, value, k) -> [array made here, sends still to do]
    saved: dict[int, list] = {}
    losses, grads, live = [], [None] * plan.n_param_grads, []
    row = plan.schedule.table[plan.stage]
    for phase in plan.schedule.phases(plan.stage):
        for t in phase.clocks:
            item = row[t]
            if item is not None and item[0] == "F":
                k = item[1]
                received = [inbox.pop((ACTIVATION, v, k)) for v in plan.received]
                ins = [micro_batches[k][i] for i in plan.batch_inputs] + received
                prog = plan.forward[k % len(plan.forward)]
                if memory is None:
                    outs = prog.run(ins, step)
                else:   # every output of a forward half is an activation
                    outs = memory.run(prog, ins, step, _held(saved, inbox, outbox, received), grads, prog.outputs)
                for j, (v, dsts) in enumerate(plan.sent):
                    outbox[(ACTIVATION, v, k)] = [outs[j], len(dsts)]
                n = len(plan.sent)
                if plan.has_loss:
                    losses.append(outs[n])
                    n += 1
                saved[k] = outs[n:]
                if memory is not None:
                    memory.saved(k, saved[k])
            elif item is not None:
                k = item[1]
                ins = saved.pop(k) + [inbox.pop((GRADIENT, v, src, k)) for v, src in plan.cotangents]
                prog = plan.backward[k % len(plan.backward)]
                if memory is None:
                    outs = prog.run(ins, step)
                else:   # the gradients it sends back are activations' too
                    outs = memory.run(prog, ins, step, _held(saved, inbox, outbox, ins), grads,
                                      prog.outputs[plan.n_param_grads:])
                for j in range(plan.n_param_grads):
                    grads[j] = outs[j].copy() if grads[j] is None else np.add(grads[j], outs[j], out=grads[j])
                for v, g in zip(plan.grads_back, outs[plan.n_param_grads:]):
                    outbox[(GRADIENT, v, k)] = [g, 1]
            _exchange(plan, world, by_clock.get(t, ()), inbox, outbox)
            live.append(len(saved))
    assert not saved and not inbox and not outbox, "pipeline: the schedule left work undone"
    return StepResult(losses, grads, live)


def _held(saved: dict, inbox: dict, outbox: dict, running: list):
    """The activation arrays the runner holds (and ``running``, the half's activation inputs)."""
    return chain(chain.from_iterable(saved.values()), inbox.values(), (e[0] for e in outbox.values()), running)


def _exchange(plan: StageStep, world, todo: Sequence[Transfer], inbox: dict, outbox: dict) -> None:
    """This rank's sends and receives of one clock, in the global order."""
    for tr in todo:
        tag = TAGS[tr.kind]
        if tr.src == plan.stage:
            key = (tr.kind, tr.value, tr.micro)
            entry = outbox[key]
            world.send(entry[0], plan.peer(tr.dst), tag)
            entry[1] -= 1
            if not entry[1]:
                del outbox[key]
        else:
            shape, dtype = plan.wire[tr.value]
            got = world.recv(shape, dtype, plan.peer(tr.src), tag)
            key = (ACTIVATION, tr.value, tr.micro) if tr.kind == ACTIVATION else (GRADIENT, tr.value, tr.src, tr.micro)
            inbox[key] = got


"""Pipeline schedules as data: a pure function returns the clock x stage table.

Each stage owns an ordered list of work items -- ``("F", m)`` forward or ``("B", m)``
backward of micro-batch m -- and the table is what a clock-by-clock simulation with unit-time
items gives: a stage runs its next item as soon as its input is ready (a forward needs the
previous stage's forward of the same micro-batch one clock earlier, a backward the next
stage's backward, or on the last stage its own forward). The runner walks the table in its
phases (warm-up, steady 1F1B, cool-down); here it is the value to check and print::

    >>> print(one_f_one_b(stages=2, micro=3))
    clock  0  1  2  3  4  5  6  7
    s0     F0 F1 .  B0 F2 B1 .  B2
    s1     .  F0 B0 F1 B1 F2 B2 .

GPipe runs every forward then every backward (flush): stage s holds all m micro-batches'
activations at its peak. 1F1B (PipeDream-flush) starts ``p - s - 1`` forwards, then
alternates one forward and one backward, so stage s holds at most ``p - s``. Both idle
(p - 1) / (m + p - 1) of the step, i.e. (p - 1) / m of the ideal time (REFERENCE.md).

**Interleaved 1F1B** (Megatron-LM's virtual pipeline stages, MindSpore's
``pipeline_interleave``): the layers are cut into ``p * v`` chunks (virtual stages), chunk c
on stage ``c % p`` -- rank r holds chunks r, r + p, r + 2p, ... An item is then
``("F" | "B", m, chunk)`` with ``chunk`` the rank's own index 0..v-1 (virtual stage
``chunk * p + r``) and takes 1/v of a stage's time. Megatron's order: the k-th forward of a
rank runs chunk ``(k mod pv) // p`` of micro-batch ``(k // pv) * p + k mod p`` (groups of p
micro-batches go through one chunk, then the next), backwards the chunks in reverse;
rank r warms up with ``(p - r - 1) * 2 + (v - 1) * p`` forwards (all ``m * v`` when m == p),
then alternates, then cools down. It needs m % p == 0, as Megatron does. The bubble falls
to (p - 1) / (v m) of the ideal time; rank r holds up to ``(p - r - 1) * 2 + (v - 1) * p + 1``
micro-batch chunks (all ``m * v`` when m == p), each about 1/v of a stage's activations::

    >>> print(interleaved_one_f_one_b(stages=2, micro=2, virtual=2))   # item F<m>.<chunk>
    clock  0    1    2    3    4    5    6    7    8    9
    s0     F0.0 F1.0 F0.1 F1.1 .    .    B0.1 B1.1 B0.0 B1.0
    s1     .    F0.0 F1.0 F0.1 F1.1 B0.1 B1.1 B0.0 B1.0 .

A stage's row splits into named phases (:meth:`Schedule.phases`): *warm-up* (the clocks
before its first backward), *steady* (from its first backward to its last forward: one
forward, one backward) and *cool-down* (the backwards after its last forward). GPipe has
no steady phase; ``make_schedule(name, stages, micro, virtual)`` builds a table by name
(``virtual`` > 1: the interleaved form of either).
"""
from __future__ import annotations

from dataclasses import dataclass

Item = tuple  # ("F" | "B", micro-batch), or interleaved ("F" | "B", micro-batch, chunk)


def chunk_of(item: Item) -> int:
    """The rank's chunk (0..v-1) an item runs; 0 in a schedule without virtual stages."""
    return item[2] if len(item) > 2 else 0


@dataclass(frozen=True)
class Phase:
    name: str                  # "warm-up" | "steady" | "cool-down"
    clocks: tuple[int, ...]    # consecutive clocks of the table


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int
    micro: int
    table: tuple[tuple[Item | None, ...], ...]   # [stage][clock]
    virtual: int = 1                             # chunks per stage (v): p * v virtual stages

    @property
    def clocks(self) -> int:
        return len(self.table[0]) if self.table else 0

    def virtual_stage(self, stage: int, item: Item) -> int:
        """The virtual stage (chunk of the layers, 0..p*v-1) ``item`` on ``stage`` runs."""
        return chunk_of(item) * self.stages + stage

    def in_flight(self, stage: int) -> int:
        """Most micro-batches (interleaved: micro-batch chunks) whose forward ran and
        backward did not yet, on ``stage``."""
        live = peak = 0
        for item in self.table[stage]:
            if item is not None:
                live += 1 if item[0] == "F" else -1
                peak = max(peak, live)
        return peak

    def phases(self, stage: int) -> tuple[Phase, ...]:
        """The clocks of ``stage``'s row as warm-up, steady and cool-down (empty ones left
        out); together they cover every clock once, in order."""
        row = self.table[stage]
        firsts_b = [t for t, i in enumerate(row) if i is not None and i[0] == "B"]
        lasts_f = [t for t, i in enumerate(row) if i is not None and i[0] == "F"]
        first_b = firsts_b[0] if firsts_b else self.clocks
        last_f = lasts_f[-1] if lasts_f else -1
        steady_end = max(first_b, last_f + 1)
        spans = (("warm-up", 0, first_b), ("steady", first_b, steady_end), ("cool-down", steady_end, self.clocks))
        return tuple(Phase(name, tuple(range(a, b))) for name, a, b in spans if b > a)

    def bubble(self) -> float:
        """Idle stage-clocks over all stage-clocks."""
        idle = sum(item is None for row in self.table for item in row)
        return idle / (self.stages * self.clocks)

    def bubble_of_ideal(self) -> float:
        """Idle stage-clocks over busy ones: the bubble as a share of the ideal time, with
        every item taking one clock -- (p - 1) / m for GPipe and 1F1B, (p - 1) / (v m)
        interleaved, read off the table."""
        idle = sum(item is None for row in self.table for item in row)
        return idle / (self.stages * self.clocks - idle)

    def makespan(self, forward_s=1.0, backward_s=1.0) -> float:
        """Seconds of a replay of the table's per-stage orders with every forward taking
        ``forward_s`` and every backward ``backward_s`` (a chunk's: 1/v of each; either may
        be a sequence, one per stage), an item starting once its stage is free and its input
        is made, transfers free and non-blocking: the ideal the order allows when a backward
        costs more than a forward. The idle share of it is still (p - 1) / (v m) of the busy
        time for these schedules when the stages are alike."""
        p, v = self.stages, self.virtual
        fwd = list(forward_s) if hasattr(forward_s, "__len__") else [forward_s] * p
        bwd = list(backward_s) if hasattr(backward_s, "__len__") else [backward_s] * p
        if len(fwd) != p or len(bwd) != p:
            raise ValueError(f"pipeline schedule {self.name}: makespan: expected one forward and one backward time "
                             f"per stage ({p}), got {len(fwd)} and {len(bwd)}")
        return self.replay(lambda s, item: (fwd[s] if item[0] == "F" else bwd[s]) / v)

    def replay(self, seconds) -> float:
        """Seconds of a replay of the table's per-stage orders where ``seconds(stage, item)``
        is each item's time (a chunk's own: a measured one, or :meth:`makespan`'s share),
        an item starting once its stage is free and its input is made, transfers free and
        non-blocking, as the runner posts them."""
        p, v = self.stages, self.virtual
        rows = [[i for i in row if i is not None] for row in self.table]
        finish: dict[tuple, float] = {}            # (virtual stage, kind, micro) -> when it ended
        free, pos = [0.0] * p, [0] * p
        while any(pos[s] < len(rows[s]) for s in range(p)):
            moved = False
            for s in range(p):
                while pos[s] < len(rows[s]):
                    item = rows[s][pos[s]]
                    need = _needs(item, s, p, v)
                    if need is not None and need not in finish:
                        break
                    start = max(free[s], finish[need] if need is not None else 0.0)
                    free[s] = start + seconds(s, item)
                    finish[(self.virtual_stage(s, item), item[0], item[1])] = free[s]
                    pos[s] += 1
                    moved = True
            assert moved, f"pipeline schedule {self.name}: the orders wait on each other"
        return max(free)

    def label(self, item: Item | None) -> str:
        """``F3`` (interleaved ``F3.1``: micro-batch 3, chunk 1), or ``.`` for an idle clock."""
        if item is None:
            return "."
        return f"{item[0]}{item[1]}" + (f".{item[2]}" if len(item) > 2 else "")

    def __str__(self) -> str:
        width = max(3, len(str(self.micro)) + 2 + (len(str(self.virtual - 1)) + 1 if self.virtual > 1 else 0))
        head = "clock  " + "".join(f"{t:<{width}}" for t in range(self.clocks)).rstrip()
        rows = [f"s{s:<5} " + "".join(f"{self.label(i):<{width}}" for i in row).rstrip()
                for s, row in enumerate(self.table)]
        return "\n".join([head] + rows)


def _check(stages: int, micro: int, virtual: int = 1) -> None:
    for name, v in (("stages", stages), ("micro", micro), ("virtual", virtual)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"pipeline schedule: {name}: expected an int >= 1, got {v!r}")


def _needs(item: Item, stage: int, p: int, v: int) -> tuple | None:
    """(virtual stage, kind, micro-batch) that must have run before ``item`` on ``stage``:
    a forward needs the previous virtual stage's forward, a backward the next one's
    backward, or on the last virtual stage its own forward."""
    kind, m, c = item[0], item[1], chunk_of(item) * p + stage
    if kind == "F":
        return (c - 1, "F", m) if c > 0 else None
    return (c + 1, "B", m) if c < p * v - 1 else (c, "F", m)


def _simulate(name: str, orders: list[list[Item]], micro: int, virtual: int = 1) -> Schedule:
    """Place each stage's items at the earliest clock their inputs allow."""
    p = len(orders)
    done: dict[tuple, int] = {}                     # (virtual stage, kind, micro) -> clock it ran
    nxt = [0] * p
    rows: list[list[Item | None]] = [[] for _ in range(p)]
    t = 0
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        ran = []
        for s in range(p):
            if nxt[s] == len(orders[s]):
                rows[s].append(None)
                continue
            item = orders[s][nxt[s]]
            need = _needs(item, s, p, virtual)
            ready = need is None or (need in done and done[need] < t)
            rows[s].append(item if ready else None)
            if ready:
                ran.append((s, item))
        assert ran, f"pipeline schedule {name}: the orders wait on each other at clock {t}"
        for s, item in ran:
            done[(chunk_of(item) * p + s, item[0], item[1])] = t
            nxt[s] += 1
        t += 1
    return Schedule(name, p, micro, tuple(tuple(r) for r in rows), virtual)


def gpipe(stages: int, micro: int) -> Schedule:
    """All forwards, then all backwards."""
    _check(stages, micro)
    order = [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]
    return _simulate("gpipe", [list(order) for _ in range(stages)], micro)


def one_f_one_b(stages: int, micro: int) -> Schedule:
    """Warm-up ``p - s - 1`` forwards, steady one forward one backward, cool-down backwards."""
    _check(stages, micro)
    orders = []
    for s in range(stages):
        warm = min(stages - s - 1, micro)
        order: list[Item] = [("F", m) for m in range(warm)]
        f, b = warm, 0
        while f < micro:              # steady state
            order += [("F", f), ("B", b)]
            f, b = f + 1, b + 1
        order += [("B", m) for m in range(b, micro)]   # cool-down
        orders.append(order)
    return _simulate("1f1b", orders, micro)


def _check_interleaved(stages: int, micro: int, virtual: int) -> None:
    _check(stages, micro, virtual)
    if micro % stages:
        raise ValueError(f"pipeline schedule: micro: expected a multiple of the {stages} stages under virtual "
                         f"stages (interleaved 1F1B sends groups of {stages} micro-batches through each chunk, "
                         f"as Megatron-LM requires), got {micro}; use micro_size = {stages * -(-micro // stages)}")


def _interleaved_item(kind: str, k: int, stages: int, virtual: int) -> Item:
    """A rank's k-th forward (or backward) in Megatron's order: micro-batch ``(k // pv) * p
    + k % p`` through chunk ``(k % pv) // p`` (backwards: the chunks in reverse)."""
    group = stages * virtual
    chunk = (k % group) // stages
    return (kind, (k // group) * stages + k % stages, chunk if kind == "F" else virtual - 1 - chunk)


def interleaved_orders(stages: int, micro: int, virtual: int, warmup) -> list[list[Item]]:
    """Each rank's items: ``warmup(r)`` forwards, then one forward one backward, then the
    remaining backwards, over the ``micro * virtual`` micro-batch chunks in Megatron's order."""
    total = micro * virtual
    orders = []
    for r in range(stages):
        warm = min(warmup(r), total)
        order = [_interleaved_item("F", k, stages, virtual) for k in range(warm)]
        for k in range(total - warm):                          # steady state
            order += [_interleaved_item("F", warm + k, stages, virtual), _interleaved_item("B", k, stages, virtual)]
        order += [_interleaved_item("B", k, stages, virtual) for k in range(total - warm, total)]   # cool-down
        orders.append(order)
    return orders


def interleaved_one_f_one_b(stages: int, micro: int, virtual: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B on ``stages`` ranks with ``virtual`` chunks each (the
    module doc): warm-up ``(p - r - 1) * 2 + (v - 1) * p`` forwards on rank r (every one when
    m == p, as Megatron does), steady one forward one backward, cool-down backwards."""
    _check_interleaved(stages, micro, virtual)
    everything = micro == stages
    orders = interleaved_orders(stages, micro, virtual,
                                lambda r: micro * virtual if everything else (stages - r - 1) * 2 + (virtual - 1) * stages)
    return _simulate("1f1b", orders, micro, virtual)


def interleaved_gpipe(stages: int, micro: int, virtual: int) -> Schedule:
    """GPipe over virtual stages: every micro-batch chunk's forward (Megatron's order), then
    every backward."""
    _check_interleaved(stages, micro, virtual)
    return _simulate("gpipe", interleaved_orders(stages, micro, virtual, lambda r: micro * virtual), micro, virtual)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}
INTERLEAVED = {"gpipe": interleaved_gpipe, "1f1b": interleaved_one_f_one_b}


def make_schedule(name: str, stages: int, micro: int, virtual: int = 1) -> Schedule:
    """The table of the schedule called ``name`` (one of :data:`SCHEDULES`), interleaved over
    ``virtual`` chunks per stage when ``virtual`` > 1 (on one stage there is nothing to
    interleave: the plain table)."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule: name: expected one of {sorted(SCHEDULES)}, got {name!r}")
    if virtual == 1 or stages == 1:
        return SCHEDULES[name](stages, micro)
    return INTERLEAVED[name](stages, micro, virtual)

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
alternates one forward and one backward, so stage s holds at most ``p - s``. Both have the
bubble (p - 1) / (m + p - 1) of the ideal time (REFERENCE.md).

A stage's row splits into named phases (:meth:`Schedule.phases`): *warm-up* (the clocks
before its first backward), *steady* (from its first backward to its last forward: one
forward, one backward) and *cool-down* (the backwards after its last forward). GPipe has
no steady phase; ``make_schedule(name, stages, micro)`` builds a table by name.
"""
from __future__ import annotations

from dataclasses import dataclass

Item = tuple[str, int]  # ("F" | "B", micro-batch)


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

    @property
    def clocks(self) -> int:
        return len(self.table[0]) if self.table else 0

    def in_flight(self, stage: int) -> int:
        """Most micro-batches whose forward ran and backward did not yet, on ``stage``."""
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

    def __str__(self) -> str:
        width = max(3, len(str(self.micro)) + 2)
        head = "clock  " + "".join(f"{t:<{width}}" for t in range(self.clocks)).rstrip()
        rows = [f"s{s:<5} " + "".join(f"{(i[0] + str(i[1])) if i else '.':<{width}}" for i in row).rstrip()
                for s, row in enumerate(self.table)]
        return "\n".join([head] + rows)


def _check(stages: int, micro: int) -> None:
    for name, v in (("stages", stages), ("micro", micro)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"pipeline schedule: {name}: expected an int >= 1, got {v!r}")


def _simulate(name: str, orders: list[list[Item]], micro: int) -> Schedule:
    """Place each stage's items at the earliest clock their inputs allow."""
    p = len(orders)
    done: dict[tuple[int, Item], int] = {}         # (stage, item) -> clock it ran
    nxt = [0] * p
    rows: list[list[Item | None]] = [[] for _ in range(p)]
    t = 0
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        ran = []
        for s in range(p):
            if nxt[s] == len(orders[s]):
                rows[s].append(None)
                continue
            kind, m = orders[s][nxt[s]]
            if kind == "F":
                need = (s - 1, ("F", m)) if s > 0 else None
            else:
                need = (s + 1, ("B", m)) if s < p - 1 else (s, ("F", m))
            ready = need is None or (need in done and done[need] < t)
            rows[s].append((kind, m) if ready else None)
            if ready:
                ran.append((s, (kind, m)))
        for s, item in ran:
            done[(s, item)] = t
            nxt[s] += 1
        t += 1
    return Schedule(name, p, micro, tuple(tuple(r) for r in rows))


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


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, stages: int, micro: int) -> Schedule:
    """The table of the schedule called ``name`` (one of :data:`SCHEDULES`)."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule: name: expected one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](stages, micro)

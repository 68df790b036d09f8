"""Do the ranks agree? Cheap comparisons, across ranks, of what must be the same on them.

A rank fed other data than its model-parallel peers, a rank one step ahead of the others,
or a rank built with another model size does not fail by itself: its collectives pair with
the wrong ones, and the job computes a loss that matches nothing, hangs, or dies in MPI
("Message truncated"). The programs (:mod:`autopar.runtime`) state *facts* -- one int64
value each, and the group of ranks that must agree on it -- and :func:`agree` compares
them in one all-gather of a fixed-size record (``RECORD_LEN`` int64, ``Communicator.compare``):

| fact (name)        | value                                          | ranks that must agree (group)      |
|--------------------|------------------------------------------------|------------------------------------|
| model              | digest of parameter names, shapes, dtypes      | every rank                         |
| input shapes       | digest of the fed arrays' shapes and dtypes    | every rank                         |
| step counter       | the step number itself                         | every rank                         |
| input k            | digest of input k's shape, dtype and bytes     | ranks fed the same shard of input k|

A fact with group < 0 is compared with no other rank (a rank that does not read that
input). When facts differ, every rank raises the same :class:`RankDivergenceError` naming
the fact, the ranks and their values; a fact given ``items`` (the model's parameters, one
line each) is narrowed down to the first item that differs, in three more small
all-gathers (counts, item digests, that item's text), so the message names the parameter.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import format_error

MAX_FACTS = 16
RECORD_LEN = 2 + 2 * MAX_FACTS      # [RECORD_TAG, number of facts, (group, value) x MAX_FACTS]
RECORD_TAG = 0x6175746F706172       # "autopar": marks a consistency record
TEXT_BYTES = 256                    # an item's text, as compared when narrowing down
NO_GROUP = -1


class RankDivergenceError(ValueError):
    """Ranks that must agree (inputs, step counter, model) do not."""


@dataclass(frozen=True)
class Fact:
    """One value ranks compare. ``group``: ranks with the same group >= 0 must have the same
    ``value``; ``literal``: the value means itself (a step number) rather than a digest;
    ``items``: the lines the value digests (to name the first that differs)."""

    name: str
    value: int
    expected: str
    fix: str
    group: int = 0
    literal: bool = False
    items: tuple[str, ...] = field(default=(), compare=False)


def digest(*parts) -> int:
    """A crc32 chained over ``parts``: strings, or arrays (their shape, dtype and bytes)."""
    crc = 0
    for part in parts:
        if isinstance(part, np.ndarray):
            crc = zlib.crc32(f"{part.shape} {part.dtype}".encode(), crc)
            crc = zlib.crc32(memoryview(np.ascontiguousarray(part)).cast("B"), crc)
        else:
            crc = zlib.crc32(str(part).encode(), crc)
    return crc


def agree(comm, facts: Sequence[Fact], where: str) -> None:
    """Compare ``facts`` across the members of ``comm`` (collective: every member calls it
    with facts of the same names); raise RankDivergenceError on every member if any differ."""
    if comm.size == 1:
        return
    if len(facts) > MAX_FACTS:
        raise AssertionError(f"consistency: {len(facts)} facts, more than MAX_FACTS = {MAX_FACTS}")
    record = np.zeros(RECORD_LEN, dtype=np.int64)
    record[:2] = RECORD_TAG, len(facts)
    for i, fact in enumerate(facts):
        record[2 + 2 * i:4 + 2 * i] = fact.group, fact.value
    table = comm.compare(record)                      # (members, RECORD_LEN)
    ranks = comm.ranks
    counts = table[:, 1]
    if (table[:, 0] != RECORD_TAG).any() or (counts != len(facts)).any():
        raise RankDivergenceError(format_error(
            where, "consistency check", "the same check on every rank", _spread(counts.tolist(), ranks, "facts"),
            "every rank must run the same program: the same model, inputs and steps"))
    differ = [i for i, fact in enumerate(facts) if _split(table, i, ranks)]
    if not differ:
        return
    first = facts[differ[0]]
    actual = _describe(comm, table, differ[0], first)
    also = [facts[i].name for i in differ[1:]]
    fix = first.fix + (f" (also different: {', '.join(also)})" if also else "")
    raise RankDivergenceError(format_error(where, first.name, first.expected, actual, fix))


def _split(table: np.ndarray, i: int, ranks: Sequence[int]) -> dict[int, dict[int, list[int]]]:
    """For fact i: group -> value -> world ranks, only for groups whose members differ."""
    groups: dict[int, dict[int, list[int]]] = {}
    for member, row in enumerate(table):
        group, value = int(row[2 + 2 * i]), int(row[3 + 2 * i])
        if group >= 0:
            groups.setdefault(group, {}).setdefault(value, []).append(ranks[member])
    return {g: values for g, values in groups.items() if len(values) > 1}


def _describe(comm, table: np.ndarray, i: int, fact: Fact) -> str:
    """What the ranks hold for a fact that differs, per group of ranks that must agree."""
    if fact.items:
        return _first_different_item(comm, fact.items)
    parts = []
    for values in _split(table, i, comm.ranks).values():
        shown = [(f"{v}" if fact.literal else f"digest {v & 0xFFFFFFFF:08x}", rs) for v, rs in values.items()]
        parts.append(", ".join(f"{text} on {_ranks(rs)}" for text, rs in shown))
    return "; ".join(parts)


def _first_different_item(comm, items: Sequence[str]) -> str:
    """The first item (by index) whose text differs across members, and each member's text
    of it (three all-gathers; every member takes the same path, decided on shared tables)."""
    counts = comm.compare(np.array([len(items)], dtype=np.int64))[:, 0]
    longest = int(counts.max())
    crcs = np.full(longest, -1, dtype=np.int64)
    crcs[:len(items)] = [digest(item) for item in items]
    table = comm.compare(crcs)                       # (members, longest)
    index = next(j for j in range(longest) if len(set(table[:, j].tolist())) > 1)
    mine = items[index] if index < len(items) else f"(none: {len(items)} in all)"
    text = np.zeros(TEXT_BYTES, dtype=np.uint8)
    raw = mine.encode()[:TEXT_BYTES]
    text[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    texts = comm.compare(text.view(np.int64)).view(np.uint8)   # (members, TEXT_BYTES)
    by_text: dict[str, list[int]] = {}
    for rank, row in zip(comm.ranks, texts):
        by_text.setdefault(bytes(row).rstrip(b"\0").decode(errors="replace"), []).append(rank)
    return "; ".join(f"{t} on {_ranks(rs)}" for t, rs in by_text.items())


def _spread(values: list, ranks: Sequence[int], unit: str) -> str:
    by_value: dict = {}
    for rank, value in zip(ranks, values):
        by_value.setdefault(value, []).append(rank)
    return "; ".join(f"{v} {unit} on {_ranks(rs)}" for v, rs in by_value.items())


def _ranks(ranks: Sequence[int]) -> str:
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}"

"""Mesh: the ranks of a stage arranged as a device matrix.

Ranks fill the matrix row-major, the last axis fastest, as MindSpore's device matrix does::

    Mesh((2, 4), ("dp", "mp"))        rank = 4 * dp + mp
        mp:  0  1  2  3
    dp=0     0  1  2  3
    dp=1     4  5  6  7

``group(rank, ("mp",))`` is the row of ``rank`` (its model-parallel group), ``group(rank,
("dp",))`` its column. A mesh can be *refined*: one axis of size 4 becomes two axes of
size 2 (major first) over the same ranks in the same order; two layouts on differently
shaped meshes of the same ranks are compared on a common refinement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence


@dataclass(frozen=True)
class Mesh:
    shape: tuple[int, ...]
    names: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"Mesh: shape: expected sizes >= 1, got {shape}")
        names = tuple(self.names) or tuple(f"d{i}" for i in range(len(shape)))
        if len(names) != len(shape) or len(set(names)) != len(names):
            raise ValueError(f"Mesh: names: expected {len(shape)} distinct names, got {names}")
        ranks = tuple(int(r) for r in self.ranks) or tuple(range(math.prod(shape)))
        if len(ranks) != math.prod(shape) or len(set(ranks)) != len(ranks):
            raise ValueError(f"Mesh: ranks: expected {math.prod(shape)} distinct ranks for shape {shape}, "
                             f"got {len(ranks)}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "ranks", ranks)

    def reshaped(self, shape: Sequence[int], names: Sequence[str] = ()) -> "Mesh":
        """The same ranks in the same order as another device matrix (its product must be
        the size). The ranks are not re-validated: planning makes thousands of these."""
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != self.size or any(s < 1 for s in shape):
            raise ValueError(f"{self}: reshaped: expected sizes >= 1 multiplying to {self.size}, got {shape}")
        names = tuple(names) or tuple(f"d{i}" for i in range(len(shape)))
        if len(names) != len(shape) or len(set(names)) != len(names):
            raise ValueError(f"Mesh: names: expected {len(shape)} distinct names, got {names}")
        new = object.__new__(Mesh)
        object.__setattr__(new, "shape", shape)
        object.__setattr__(new, "names", names)
        object.__setattr__(new, "ranks", self.ranks)
        return new

    def __hash__(self) -> int:   # cached: a mesh of 2048 ranks is hashed often while planning
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.shape, self.names, self.ranks))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        body = ", ".join(f"{n}={s}" for n, s in zip(self.names, self.shape))
        first = "" if self.ranks == tuple(range(self.size)) else f" @{self.ranks[0]}"
        return f"Mesh({body}){first}"

    def axis(self, a: int | str) -> int:
        if isinstance(a, str):
            if a not in self.names:
                raise ValueError(f"{self}: axis: expected one of {self.names}, got {a!r}")
            return self.names.index(a)
        if not -self.ndim <= a < self.ndim:
            raise ValueError(f"{self}: axis: expected an index in [{-self.ndim}, {self.ndim}), got {a}")
        return a % self.ndim

    @cached_property
    def _position(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.ranks)}

    def coord(self, rank: int) -> tuple[int, ...]:
        """Coordinates of a rank (a world rank in ``ranks``)."""
        pos = self._position.get(rank)
        if pos is None:
            raise ValueError(f"{self}: rank: expected one of the mesh's ranks, got {rank}")
        coord = []
        for s in reversed(self.shape):
            coord.append(pos % s)
            pos //= s
        return tuple(reversed(coord))

    def rank_at(self, coord: Sequence[int]) -> int:
        pos = 0
        for c, s in zip(coord, self.shape):
            pos = pos * s + c
        return self.ranks[pos]

    def group(self, rank: int, axes: Sequence[int | str]) -> tuple[int, ...]:
        """Ranks sharing ``rank``'s coordinates off ``axes``, ordered row-major over ``axes``
        (a rank's position in its group is its linear index over those axes)."""
        axes = [self.axis(a) for a in axes]
        base = list(self.coord(rank))
        members = []
        for sub in _row_major([self.shape[a] for a in axes]):
            for a, c in zip(axes, sub):
                base[a] = c
            members.append(self.rank_at(base))
        return tuple(members)

    def groups(self, axes: Sequence[int | str]) -> tuple[tuple[int, ...], ...]:
        """Every group along ``axes`` (they partition the mesh), in order of first member."""
        seen, out = set(), []
        for r in self.ranks:
            if r not in seen:
                g = self.group(r, axes)
                seen.update(g)
                out.append(g)
        return tuple(out)

    def refine(self, factors: Sequence[Sequence[int]]) -> "Mesh":
        """Split axis i into ``factors[i]`` (major first, product = its size); same ranks."""
        if len(factors) != self.ndim:
            raise ValueError(f"{self}: refine: expected {self.ndim} factor lists, got {len(factors)}")
        shape, names = [], []
        for i, fs in enumerate(factors):
            fs = tuple(fs)
            if math.prod(fs) != self.shape[i]:
                raise ValueError(f"{self}: refine: factors {fs} of axis {self.names[i]} do not multiply to "
                                 f"{self.shape[i]}")
            shape += fs
            names += [self.names[i]] if len(fs) == 1 else [f"{self.names[i]}.{k}" for k in range(len(fs))]
        return self.reshaped(shape, names)


def _row_major(sizes: Sequence[int]):
    """All coordinates of a box of ``sizes``, last index fastest."""
    if not sizes:
        yield ()
        return
    for head in range(sizes[0]):
        for tail in _row_major(sizes[1:]):
            yield (head,) + tail


def common_refinement(a: Sequence[int], b: Sequence[int]) -> tuple[tuple[tuple[int, ...], ...],
                                                                   tuple[tuple[int, ...], ...]] | None:
    """Factor lists refining two device matrices of the same size onto one, or None.

    Row-major rank order is kept by splitting axes, so a common refinement exists when every
    cumulative product (axis boundary) of one matrix divides or is divided by the boundaries
    of the other in a chain: ``(2, 4)`` and ``(4, 2)`` meet at ``(2, 2, 2)``; ``(2, 3)`` and
    ``(3, 2)`` do not (a general all-to-all-v is needed).
    """
    if math.prod(a) != math.prod(b):
        return None
    cuts_a = _cuts(a)
    cuts_b = _cuts(b)
    cuts = sorted(set(cuts_a) | set(cuts_b))
    for lo, hi in zip(cuts, cuts[1:]):
        if hi % lo:
            return None
    return _factors_at(a, cuts), _factors_at(b, cuts)


def _cuts(shape: Sequence[int]) -> list[int]:
    out, p = [1], 1
    for s in shape:
        p *= s
        out.append(p)
    return out


def _factors_at(shape: Sequence[int], cuts: list[int]) -> tuple[tuple[int, ...], ...]:
    factors, p = [], 1
    for s in shape:
        inner = [c for c in cuts if p < c <= p * s]
        fs, prev = [], p
        for c in inner:
            fs.append(c // prev)
            prev = c
        factors.append(tuple(fs) if fs else (1,))
        p *= s
    return tuple(factors)

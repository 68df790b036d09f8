"""Layout: how one logical tensor lives on a mesh.

For each tensor dimension, the mesh axes it is split over (major first); the mesh axes
along which local values are *partial sums* still owed a reduction; every other mesh axis
replicates. Printed DTensor-style, one entry per tensor dim::

    Layout(Mesh(dp=2, mp=4), dims=((0,), (), (1,)))    ->  [S(dp), R, S(mp)]
    ... with partial=(1,)                                ->  [S(dp), R, R] P(mp)

Index conventions, worked on ``Mesh((2, 4), ("dp", "mp"))`` and a (8, 6, 12) tensor with
``dims=((0,), (), (1,))``: rank 6 has coordinate (dp=1, mp=2), so it holds rows 4:8 (block 1
of 2), all of dim 1, and columns 6:9 (block 2 of 4). A dim split over two axes ``(0, 1)``
numbers its 8 blocks ``4 * dp + mp``.

MindSpore's spelling is a device matrix plus a tensor map whose entries index device-matrix
axes *counted from the right*, -1 meaning not split: the layout above is
``device_matrix=(2, 4), tensor_map=(1, -1, 0)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations, product
from typing import Sequence

import numpy as np

from ..errors import OpArgError
from .mesh import Mesh


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    dims: tuple[tuple[int, ...], ...]
    partial: tuple[int, ...] = ()

    def __post_init__(self):
        dims = tuple(tuple(int(a) for a in d) for d in self.dims)
        partial = tuple(sorted(int(a) for a in self.partial))
        used = [a for d in dims for a in d] + list(partial)
        for a in used:
            if not 0 <= a < self.mesh.ndim:
                raise ValueError(f"Layout: mesh axis {a}: expected an axis of {self.mesh}")
        if len(set(used)) != len(used):
            raise ValueError(f"Layout: each mesh axis may split one dim or be partial, got dims={dims} "
                             f"partial={partial}")
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "partial", partial)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def derived(cls, mesh: Mesh, dims: tuple[tuple[int, ...], ...], partial: tuple[int, ...] = ()) -> "Layout":
        """A layout computed from valid ones (int tuples, each axis used once, ``partial``
        sorted): built without re-validation, as planning makes them by the thousand."""
        new = object.__new__(cls)
        object.__setattr__(new, "mesh", mesh)
        object.__setattr__(new, "dims", dims)
        object.__setattr__(new, "partial", partial)
        return new

    @classmethod
    def replicated(cls, mesh: Mesh, ndim: int) -> "Layout":
        return cls(mesh, ((),) * ndim)

    @classmethod
    def from_mindspore(cls, device_matrix: Sequence[int], tensor_map: Sequence, ranks=(), names=()) -> "Layout":
        mesh = Mesh(tuple(device_matrix), tuple(names), tuple(ranks))
        n = mesh.ndim

        def axes(entry) -> tuple[int, ...]:
            entry = entry if isinstance(entry, (tuple, list)) else (entry,)
            return tuple(n - 1 - e for e in entry if e != -1)
        return cls(mesh, tuple(axes(e) for e in tensor_map))

    def to_mindspore(self) -> tuple[tuple[int, ...], tuple]:
        """(device_matrix, tensor_map); a dim split over several axes maps to a tuple."""
        n = self.mesh.ndim

        def entry(d: tuple[int, ...]):
            if not d:
                return -1
            return n - 1 - d[0] if len(d) == 1 else tuple(n - 1 - a for a in d)
        return self.mesh.shape, tuple(entry(d) for d in self.dims)

    # ---- queries ------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.dims)

    def splits(self) -> tuple[int, ...]:
        """How many ways each dim is split: the ``.shard()`` spelling of this layout."""
        return tuple(math.prod(self.mesh.shape[a] for a in d) for d in self.dims)

    def replicated_axes(self) -> tuple[int, ...]:
        used = {a for d in self.dims for a in d} | set(self.partial)
        return tuple(a for a in range(self.mesh.ndim) if a not in used)

    def dim_of(self, axis: int) -> int | None:
        """The tensor dim a mesh axis splits, if any."""
        for d, axes in enumerate(self.dims):
            if axis in axes:
                return d
        return None

    def __str__(self) -> str:
        names = self.mesh.names
        body = ", ".join(f"S({','.join(names[a] for a in d)})" if d else "R" for d in self.dims)
        tail = f" P({','.join(names[a] for a in self.partial)})" if self.partial else ""
        return f"[{body}]{tail}"

    def check_shape(self, shape: Sequence[int], where: str = "", arg: str = "tensor") -> None:
        """Every split divides its dim (uneven splits are a plan-time error)."""
        if len(shape) != self.ndim:
            raise OpArgError(f"{arg} layout", f"{self.ndim} dims like its layout {self}", f"shape {tuple(shape)}",
                             where=where)
        for d, (n, k) in enumerate(zip(shape, self.splits())):
            if n % k:
                raise OpArgError(f"{arg} dim {d}", f"a size divisible by its split {k} ({self})", f"{n}",
                                 f"use a split that divides {n}", where=where)

    def local_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        self.check_shape(shape)
        return tuple(n // k for n, k in zip(shape, self.splits()))

    def block_index(self, rank: int) -> tuple[int, ...]:
        """Per dim, which block of the dim ``rank`` holds."""
        coord = self.mesh.coord(rank)
        out = []
        for d in self.dims:
            idx = 0
            for a in d:
                idx = idx * self.mesh.shape[a] + coord[a]
            out.append(idx)
        return tuple(out)

    def slices(self, rank: int, shape: Sequence[int]) -> tuple[slice, ...]:
        """The global region ``rank`` holds."""
        local = self.local_shape(shape)
        return tuple(slice(b * n, (b + 1) * n) for b, n in zip(self.block_index(rank), local))

    def is_partial_root(self, rank: int) -> bool:
        """Coordinate 0 on every partial axis: the rank that holds the value in :meth:`shard`."""
        coord = self.mesh.coord(rank)
        return all(coord[a] == 0 for a in self.partial)

    # ---- moving whole tensors (tests, checkpoints, gathering for users) -----------------
    def shard(self, array: np.ndarray, rank: int) -> np.ndarray:
        """The local value of ``rank`` for the logical value ``array`` (a copy). For a partial
        layout the partial root holds the block and the other ranks zeros, so the sum over
        the partial axes is the logical value."""
        block = np.array(array[self.slices(rank, array.shape)])
        if self.partial and not self.is_partial_root(rank):
            block[...] = 0
        return block

    def assemble(self, locals_by_rank: dict[int, np.ndarray], shape: Sequence[int]) -> np.ndarray:
        """The logical value from every rank's local value: blocks placed, partials summed
        (over one representative per replica)."""
        first = next(iter(locals_by_rank.values()))
        out = np.zeros(tuple(shape), dtype=first.dtype)
        rep = set(self.replicated_axes())
        for rank in self.mesh.ranks:
            coord = self.mesh.coord(rank)
            if any(coord[a] for a in rep):
                continue  # a replica of a block already counted
            out[self.slices(rank, shape)] += locals_by_rank[rank]
        return out

    # ---- refinement -----------------------------------------------------------------------
    def refine(self, factors: Sequence[Sequence[int]]) -> "Layout":
        """The same layout on ``self.mesh.refine(factors)``: axis i becomes its sub-axes."""
        new_axes, k = [], 0
        for fs in factors:
            new_axes.append(tuple(range(k, k + len(fs))))
            k += len(fs)
        dims = tuple(tuple(b for a in d for b in new_axes[a]) for d in self.dims)
        partial = tuple(b for a in self.partial for b in new_axes[a])
        return Layout.derived(self.mesh.refine(factors), dims, partial)

    def without_unit_axes(self) -> "Layout":
        """Drop size-1 mesh axes (they split nothing); same ranks."""
        keep = [a for a, s in enumerate(self.mesh.shape) if s > 1]
        if len(keep) == self.mesh.ndim:
            return self
        index = {a: i for i, a in enumerate(keep)}
        mesh = self.mesh.reshaped(tuple(self.mesh.shape[a] for a in keep),
                                  tuple(self.mesh.names[a] for a in keep))
        dims = tuple(tuple(index[a] for a in d if a in index) for d in self.dims)
        return Layout.derived(mesh, dims, tuple(index[a] for a in self.partial if a in index))


def all_layouts(mesh: Mesh, ndim: int, with_partial: bool = True):
    """Every layout of an ``ndim``-d tensor on ``mesh``: each mesh axis splits a dim (in
    every order), is partial, or replicates. For exhaustive tests and small searches."""
    roles = (["R", "P"] if with_partial else ["R"]) + list(range(ndim))
    for assign in product(roles, repeat=mesh.ndim):
        per_dim = [[a for a in range(mesh.ndim) if assign[a] == d] for d in range(ndim)]
        partial = tuple(a for a in range(mesh.ndim) if assign[a] == "P")
        for orders in product(*[permutations(p) for p in per_dim]):
            yield Layout(mesh, tuple(orders), partial)

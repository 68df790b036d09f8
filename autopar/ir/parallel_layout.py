"""MindSpore 2.x's ``Layout``: a named device matrix, called with one alias per tensor dim.

::

    layout = Layout((2, 4), ("dp", "mp"))     # 8 devices, rank = 4 * dp + mp
    x_layout = layout("dp", "None")            # dim 0 split over dp, dim 1 whole
    w_layout = layout("None", "mp")
    MatMul().shard(in_strategy=(x_layout, w_layout))   # same plan as ((2, 1), (1, 4))

The device matrix is listed from its highest (slowest) axis, as MindSpore's is and as
:class:`~autopar.ir.mesh.Mesh` fills ranks. A dim may be split over several axes,
``layout(("dp", "mp"), "None")``: the first alias is the major one (the dim's 8 blocks are
numbered ``4 * dp + mp``). :meth:`TensorLayout.to_dict` gives MindSpore's spelling, whose
tensor map counts axes from the right (``-1``: not split): ``layout("dp", "None")`` is
``device_matrix=(2, 4), tensor_map=(1, -1)``.

MindSpore's rules kept: every alias is a distinct non-empty string other than ``"None"``;
the device matrix multiplies to the devices of one pipeline stage (checked at plan time,
when the stage is known); one tensor uses an alias at most once. Not supported, and an
error saying so: ``rank_list``.

The ``"interleaved_parallel"`` alias is no device axis: it cuts a dim into copies *inside*
each device, and the op runs once per copy (MindSpore's interleaving, which lets one copy's
communication overlap the next copy's compute)::

    layout = Layout((2, 2, 2), ("dp", "sp", "interleaved_parallel"))   # 4 devices, 2 copies
    x = layout(("dp", "interleaved_parallel"), "sp")   # dim 0 split over dp, then 2 copies

The device matrix proper is the other axes (``(2, 2)``, ``("dp", "sp")``: :meth:`Layout.mesh`),
so ``x`` lives on the devices exactly as ``Layout((2, 2), ("dp", "sp"))("dp", "sp")`` does;
:attr:`TensorLayout.dims` indexes those device axes and :attr:`TensorLayout.interleaved` is
the dim carrying the copies. The alias must be the minor (last) one of its dim -- a device's
block cut in k pieces, so the device layout is unchanged -- and a tensor interleaves one dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OpArgError, OpTypeError, is_int
from .layout import Layout as MeshLayout
from .mesh import Mesh

NONE_ALIAS = "None"
INTERLEAVED = "interleaved_parallel"


@dataclass(frozen=True, repr=False)
class Layout:
    """A device matrix with a name (alias) per axis; call it to lay out one tensor."""

    device_matrix: tuple[int, ...]
    alias_name: tuple[str, ...]
    rank_list: None = None

    def __post_init__(self):
        where = f"Layout({self.device_matrix!r}, {self.alias_name!r})"
        if not isinstance(self.device_matrix, tuple) or not self.device_matrix:
            raise OpTypeError("device_matrix", "a non-empty tuple of ints", repr(self.device_matrix), where=where)
        if not isinstance(self.alias_name, tuple):
            raise OpTypeError("alias_name", "a tuple of str, one per device_matrix axis", repr(self.alias_name),
                              where=where)
        for k, n in enumerate(self.device_matrix):
            if not is_int(n) or n < 1:
                raise OpTypeError(f"device_matrix[{k}]", "an int >= 1", repr(n), where=where)
        if len(self.alias_name) != len(self.device_matrix):
            raise OpArgError("alias_name", f"{len(self.device_matrix)} names, one per device_matrix axis",
                             f"{len(self.alias_name)}", where=where)
        for k, name in enumerate(self.alias_name):
            if not isinstance(name, str):
                raise OpTypeError(f"alias_name[{k}]", "a str", repr(name), where=where)
            if not name or name == NONE_ALIAS:
                raise OpArgError(f"alias_name[{k}]", "a non-empty name other than 'None' ('None' means not split)",
                                 repr(name), where=where)
        if len(set(self.alias_name)) != len(self.alias_name):
            raise OpArgError("alias_name", "distinct names", repr(self.alias_name), where=where)
        if not self.device_axes:
            raise OpArgError("alias_name", f"at least one device axis besides {INTERLEAVED!r}",
                             repr(self.alias_name), "add the devices' axes, e.g. ('dp', 'interleaved_parallel')",
                             where=where)
        if self.rank_list is not None:
            raise OpArgError("rank_list", "None (ranks fill the device matrix in order)", repr(self.rank_list),
                             "rank_list is not supported; reorder the device matrix instead", where=where)
        object.__setattr__(self, "device_matrix", tuple(int(n) for n in self.device_matrix))

    @property
    def device_axes(self) -> tuple[int, ...]:
        """Positions of the device axes: every axis but ``"interleaved_parallel"``."""
        return tuple(k for k, name in enumerate(self.alias_name) if name != INTERLEAVED)

    @property
    def interleave(self) -> int:
        """Copies per device of an interleaved dim (the ``"interleaved_parallel"`` size; 1 without)."""
        return self.device_matrix[self.alias_name.index(INTERLEAVED)] if INTERLEAVED in self.alias_name else 1

    def __call__(self, *tensor_map) -> "TensorLayout":
        """One entry per tensor dim: an alias, ``"None"``, or a tuple of aliases (major first)."""
        where = f"{self}{tuple(tensor_map)!r}"
        dims, used, interleaved = [], set(), None
        for d, entry in enumerate(tensor_map):
            names = entry if isinstance(entry, tuple) else (entry,)
            axes = []
            for j, name in enumerate(names):
                if not isinstance(name, str):
                    raise OpTypeError(f"dim {d}", "an alias (str), 'None', or a tuple of aliases", repr(entry),
                                      where=where)
                if name == NONE_ALIAS and len(names) == 1:
                    continue
                if name not in self.alias_name:
                    raise OpArgError(f"dim {d} alias", f"one of {self.alias_name} or 'None'", repr(name),
                                     where=where)
                if name in used and name == INTERLEAVED:
                    raise OpArgError(f"dim {d} alias", f"{INTERLEAVED!r} on one dim of a tensor (dim {interleaved} "
                                     "has it)", repr(name), "interleave one dim per tensor", where=where)
                if name in used:
                    raise OpArgError(f"dim {d} alias", "an alias not already used by another dim of this tensor",
                                     repr(name), "each alias splits at most one dim of a tensor", where=where)
                used.add(name)
                if name == INTERLEAVED:
                    _check_interleaved_minor(d, names, j, where)
                    interleaved = d
                    continue
                axes.append(self.device_axes.index(self.alias_name.index(name)))
            dims.append(tuple(axes))
        return TensorLayout(self, tuple(dims), interleaved)

    def mesh(self, stage: Mesh) -> Mesh:
        """The device axes over the stage's ranks (their product must be the ranks' number);
        the interleaved axis is no device axis."""
        axes = self.device_axes
        return stage.reshaped(tuple(self.device_matrix[a] for a in axes), tuple(self.alias_name[a] for a in axes))

    @property
    def devices(self) -> int:
        """Devices the matrix spans: the product of its device axes."""
        return math.prod(self.device_matrix[a] for a in self.device_axes)

    def __str__(self) -> str:
        return f"Layout({self.device_matrix}, {self.alias_name})"

    __repr__ = __str__


def _check_interleaved_minor(d: int, names: tuple, j: int, where: str) -> None:
    """``"interleaved_parallel"`` must come last in its dim: each device's block is cut in
    copies, so the tensor lies on the devices as it would without the alias."""
    if j != len(names) - 1:
        raise OpArgError(f"dim {d} alias", f"{INTERLEAVED!r} as the last (minor) alias of the dim", repr(names),
                         f"write ({', '.join(repr(n) for n in names if n != INTERLEAVED)}, {INTERLEAVED!r})",
                         where=where)


@dataclass(frozen=True, repr=False)
class TensorLayout:
    """One tensor's layout on a :class:`Layout`: per dim, the device axes (indices into
    :attr:`Layout.device_axes`, major first) that split it, and the dim cut into
    ``"interleaved_parallel"`` copies inside each device (None: none)."""

    layout: Layout
    dims: tuple[tuple[int, ...], ...]
    interleaved: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def splits(self) -> tuple[int, ...]:
        """Split count per dim over the devices (copies inside a device not counted): the
        tuple ``.shard()`` spelling this layout refines."""
        sizes = tuple(self.layout.device_matrix[a] for a in self.layout.device_axes)
        return tuple(math.prod(sizes[a] for a in axes) for axes in self.dims)

    def _full_axes(self, d: int) -> tuple[int, ...]:
        """Dim ``d``'s axes as positions in the whole device matrix, the interleaved one last."""
        axes = tuple(self.layout.device_axes[a] for a in self.dims[d])
        return axes + ((self.layout.alias_name.index(INTERLEAVED),) if d == self.interleaved else ())

    def on(self, stage: Mesh) -> MeshLayout:
        """autopar's layout of the tensor on ``stage`` (device matrix of the same size)."""
        return MeshLayout(self.layout.mesh(stage), self.dims)

    def to_dict(self) -> dict:
        """MindSpore's ``to_dict``: the whole device matrix (the interleaved axis included),
        tensor map entries counting its axes from the right (-1: whole), and
        ``interleaved_parallel``: whether the matrix has that axis, as MindSpore reports it."""
        n = len(self.layout.device_matrix)

        def entry(axes):
            if not axes:
                return -1
            return n - 1 - axes[0] if len(axes) == 1 else tuple(n - 1 - a for a in axes)
        return {"device_matrix": self.layout.device_matrix,
                "tensor_map": tuple(entry(self._full_axes(d)) for d in range(self.ndim)),
                "interleaved_parallel": INTERLEAVED in self.layout.alias_name, "alias_name": self.layout.alias_name}

    def __str__(self) -> str:
        names = self.layout.alias_name

        def entry(axes):
            return "(" + ", ".join(names[a] for a in axes) + ")" if len(axes) > 1 else \
                (names[axes[0]] if axes else NONE_ALIAS)
        body = ", ".join(entry(self._full_axes(d)) for d in range(self.ndim))
        return f"{self.layout}({body})"

    __repr__ = __str__

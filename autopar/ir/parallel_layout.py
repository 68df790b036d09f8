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
error saying so: the ``"interleaved_parallel"`` alias (MindSpore splits an op into copies
inside one device to overlap communication; autopar runs one copy) and ``rank_list``.
"""
from __future__ import annotations

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
            if name == INTERLEAVED:
                raise OpArgError(f"alias_name[{k}]", "a device-matrix axis (autopar runs one copy of an op per "
                                 "device)", repr(name), "'interleaved_parallel' is not supported: drop that axis "
                                 "and its size from the device matrix", where=where)
        if len(set(self.alias_name)) != len(self.alias_name):
            raise OpArgError("alias_name", "distinct names", repr(self.alias_name), where=where)
        if self.rank_list is not None:
            raise OpArgError("rank_list", "None (ranks fill the device matrix in order)", repr(self.rank_list),
                             "rank_list is not supported; reorder the device matrix instead", where=where)
        object.__setattr__(self, "device_matrix", tuple(int(n) for n in self.device_matrix))

    def __call__(self, *tensor_map) -> "TensorLayout":
        """One entry per tensor dim: an alias, ``"None"``, or a tuple of aliases (major first)."""
        where = f"{self}{tuple(tensor_map)!r}"
        dims, used = [], set()
        for d, entry in enumerate(tensor_map):
            names = entry if isinstance(entry, tuple) else (entry,)
            axes = []
            for name in names:
                if not isinstance(name, str):
                    raise OpTypeError(f"dim {d}", "an alias (str), 'None', or a tuple of aliases", repr(entry),
                                      where=where)
                if name == NONE_ALIAS and len(names) == 1:
                    continue
                if name not in self.alias_name:
                    raise OpArgError(f"dim {d} alias", f"one of {self.alias_name} or 'None'", repr(name),
                                     where=where)
                if name in used:
                    raise OpArgError(f"dim {d} alias", "an alias not already used by another dim of this tensor",
                                     repr(name), "each alias splits at most one dim of a tensor", where=where)
                used.add(name)
                axes.append(self.alias_name.index(name))
            dims.append(tuple(axes))
        return TensorLayout(self, tuple(dims))

    def mesh(self, stage: Mesh) -> Mesh:
        """This device matrix over the stage's ranks (its product must be their number)."""
        return stage.reshaped(self.device_matrix, self.alias_name)

    def __str__(self) -> str:
        return f"Layout({self.device_matrix}, {self.alias_name})"

    __repr__ = __str__


@dataclass(frozen=True, repr=False)
class TensorLayout:
    """One tensor's layout on a :class:`Layout`: per dim, the device-matrix axes (indices
    from the left, major first) that split it."""

    layout: Layout
    dims: tuple[tuple[int, ...], ...]

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def splits(self) -> tuple[int, ...]:
        """Split count per dim: the tuple ``.shard()`` spelling this layout refines."""
        out = []
        for axes in self.dims:
            k = 1
            for a in axes:
                k *= self.layout.device_matrix[a]
            out.append(k)
        return tuple(out)

    def on(self, stage: Mesh) -> MeshLayout:
        """autopar's layout of the tensor on ``stage`` (device matrix of the same size)."""
        return MeshLayout(self.layout.mesh(stage), self.dims)

    def to_dict(self) -> dict:
        """MindSpore's ``to_dict``: tensor map entries count axes from the right, -1: whole."""
        n = len(self.layout.device_matrix)

        def entry(axes):
            if not axes:
                return -1
            return n - 1 - axes[0] if len(axes) == 1 else tuple(n - 1 - a for a in axes)
        return {"device_matrix": self.layout.device_matrix, "tensor_map": tuple(entry(a) for a in self.dims),
                "interleaved_parallel": False, "alias_name": self.layout.alias_name}

    def __str__(self) -> str:
        names = self.layout.alias_name
        body = ", ".join("(" + ", ".join(names[a] for a in axes) + ")" if len(axes) > 1
                         else (names[axes[0]] if axes else NONE_ALIAS) for axes in self.dims)
        return f"{self.layout}({body})"

    __repr__ = __str__

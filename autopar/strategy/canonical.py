"""Layouts reduced to their fewest mesh axes, so equal placements price once.

Apart from :mod:`.costmodel` (which re-exports it) so that the pricing helpers beside it
(:mod:`.grad_buckets`) can read redistribution plans of the same layouts.
"""
from __future__ import annotations

import math
from functools import lru_cache

from ..ir.layout import Layout


@lru_cache(maxsize=65536)
def canonical(layout: Layout) -> Layout:
    """The same placement of blocks on ranks with the fewest mesh axes: unit axes dropped,
    and neighbouring axes merged when they play one role (both replicating, or consecutive
    in one dim's split list). Two layouts that put the same block on every rank and owe
    the same reductions become equal, so their redistribution costs are computed once."""
    lay = layout.without_unit_axes()
    mesh = lay.mesh
    role: dict[int, tuple] = {}
    for d, axes in enumerate(lay.dims):
        for k, a in enumerate(axes):
            role[a] = ("dim", d, k)
    for a in lay.partial:
        role[a] = ("partial", a)
    groups: list[list[int]] = []
    for a in range(mesh.ndim):
        prev = groups[-1][-1] if groups else None
        r, rp = role.get(a, ("rep",)), role.get(prev, None) if prev is not None else None
        joinable = prev is not None and (
            (r == ("rep",) and rp == ("rep",))
            or (r[0] == "dim" and rp is not None and rp[0] == "dim" and rp[1] == r[1] and rp[2] + 1 == r[2]))
        if joinable:
            groups[-1].append(a)
        else:
            groups.append([a])
    new_of = {a: i for i, g in enumerate(groups) for a in g}
    shape = tuple(math.prod(mesh.shape[a] for a in g) for g in groups)
    dims = tuple(tuple(dict.fromkeys(new_of[a] for a in axes)) for axes in lay.dims)
    partial = tuple(dict.fromkeys(new_of[a] for a in lay.partial))
    return Layout.derived(mesh.reshaped(shape or (1,)), dims, tuple(sorted(partial)))

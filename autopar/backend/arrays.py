"""Which array module computes on an array, and moving arrays between host and device.

Every kernel asks :func:`array_module` of its inputs (``xp = array_module(x, w)``) and
computes with ``xp``: numpy for numpy arrays, CuPy for CuPy arrays (as
``cupy.get_array_module`` does), so one kernel runs wherever its inputs live. Which module
serves which array type is the table :data:`ARRAY_MODULES` (type -> function returning the
module), looked up along the type's MRO; a CuPy array is recognised by its type's module
name, so CuPy is imported only once such an array is seen. Python scalars and anything
else fall back to numpy.

Every kernel call asks, for every input, so the answer is cheap: whether a type is CuPy's
is worked out once per type (:func:`is_cupy_type` is memoised) and CuPy, once imported,
is read from ``sys.modules`` -- the same module ``importlib`` would return, so a stand-in
installed there by a test is found as before. :func:`dtype_name` memoises ``dtype.name``
(numpy builds that string in Python, about 2 us a call) for the kernels' dtype tables.

    array_module(np.ones(3))            # numpy
    array_module(cupy.ones(3), 2.0)     # cupy
    to_host(cupy.ones(3))               # numpy array (a copy from the device)
"""
from __future__ import annotations

import functools
import sys

import numpy as np

from .cupy_import import import_cupy

ARRAY_MODULES: dict[type, object] = {np.ndarray: lambda: np}   # array type -> () -> its module


@functools.cache
def is_cupy_type(t: type) -> bool:
    """Whether ``t`` is CuPy's ndarray, told by its module's name (CuPy is not imported);
    worked out once per type."""
    return t.__module__.split(".", 1)[0] == "cupy" and t.__name__ == "ndarray"


@functools.cache
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, worked out once per dtype (``np.dtype`` objects hash; equal dtypes
    have equal names, so the memo gives what ``dtype.name`` gives)."""
    return dtype.name


def _module_of_type(t: type):
    """The module serving arrays of type ``t``, or None for a non-array."""
    if t is np.ndarray:                      # the hot path: one comparison
        return np
    if is_cupy_type(t):                      # the device's hot path: two dict look-ups
        cupy = sys.modules.get("cupy")
        return cupy if cupy is not None else import_cupy(f"a CuPy array ({t.__module__}.{t.__name__})")
    for base in t.__mro__:
        found = ARRAY_MODULES.get(base)
        if found is not None:
            return found()
    return None


def array_module(*arrays):
    """The array module of the first array among ``arrays`` (numpy if none is an array)."""
    for a in arrays:
        xp = _module_of_type(type(a))
        if xp is not None:
            return xp
    return np


def is_array(x) -> bool:
    """Whether ``x`` is an array of a known array module (numpy, CuPy, a registered one)."""
    return _module_of_type(type(x)) is not None


def on_host(x) -> bool:
    """Whether ``x`` is a numpy array (or not an array at all): readable by numpy as it is."""
    return array_module(x) is np


def to_host(x, copy: bool = False) -> np.ndarray:
    """``x`` as a numpy array: a device array is copied to the host (``.get()``); a numpy
    array is returned as it is (a copy with ``copy=True``); anything else goes through
    ``np.asarray``."""
    if on_host(x):
        return np.array(x, copy=True) if copy else np.asarray(x)
    get = getattr(x, "get", None)
    return get() if get is not None else np.asarray(x)


def read_scalars(values) -> list:
    """The 0-d arrays ``values`` as host scalars, in order. Device values are stacked and
    copied to the host once per (array type, dtype) -- in practice one copy, where reading
    them one by one would wait for the device once per value."""
    out: list = [None] * len(values)
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault((type(v), v.dtype), []).append(i)
    for members in groups.values():
        xp = array_module(values[members[0]])
        host = to_host(xp.stack([values[i] for i in members]))     # (len(members),)
        for i, h in zip(members, host):
            out[i] = h
    return out


def base_buffer(a):
    """The array that owns the memory ``a`` views (``a`` itself when it owns it; a non-array
    as it is), for numpy and device arrays alike: live bytes count once per base buffer."""
    while True:
        base = getattr(a, "base", None)
        if base is None or not is_array(base):
            return a
        a = base


def writable(a) -> bool:
    """Whether writing into ``a`` in place is safe: numpy says so in ``flags.writeable``
    (False for broadcast views); arrays without that flag (CuPy) are unsafe when a stride
    is 0 (a broadcast view: one element seen many times)."""
    flag = getattr(a.flags, "writeable", None)
    if flag is not None:
        return bool(flag)
    return not (a.size > 1 and 0 in a.strides)


def cache_blocked(a) -> bool:
    """Whether kernels over ``a`` should walk it in cache-sized blocks: on CPU cores a
    multi-pass formula then reads main memory once; on a GPU every block is a kernel
    launch, so one pass over the whole array is faster (and the results are the same)."""
    return array_module(a) is np

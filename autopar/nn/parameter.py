"""Parameter: a named, typed, shaped weight whose data appears only when first needed.

Building a model allocates nothing: a Parameter holds its initializer. ``asnumpy()``
materializes the full logical value from ``(seed, name)`` the first time it is read, so
the value does not depend on construction order; ``set_data`` replaces it.

On a GPU (``set_context(device_target="GPU")``) a compiled program moves the value to the
device once (:meth:`Parameter.device_data`); from then on ``data`` is that device array,
which the program reads and the optimizer updates in place, and ``asnumpy()`` (and
``np.asarray(param)``) copy it back to the host for whoever reads it.
"""
from __future__ import annotations

import numpy as np

from ..backend import Backend, array_module, is_array, on_host, to_device, to_host
from ..dtype import as_dtype
from ..ir.random import derive_key
from ..ir.spec import TensorSpec
from ..runtime.tensor import Weight
from .initializer import Initializer, as_initializer


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"Parameter shape: expected non-negative ints, got {shape}")
    return tuple(int(d) for d in shape)


class Parameter(Weight):
    """``Parameter(initializer, shape, dtype, name)`` or ``Parameter(array, name=...)``."""

    def __init__(self, default_input, shape=None, dtype="float32", name: str = "",
                 requires_grad: bool = True, init_seed: int = 0):
        self.name = name
        self.requires_grad = requires_grad
        self.init_seed = init_seed
        self._data: np.ndarray | None = None
        self._shard = None    # set when a sharded program owns this rank's slice
        if isinstance(default_input, np.ndarray):
            self.shape = default_input.shape
            self.dtype = as_dtype(dtype if shape is not None else default_input.dtype)
            self.init: Initializer | None = None
            self._data = np.array(default_input, dtype=self.dtype)
        else:
            if shape is None:
                raise ValueError(f"Parameter {name!r}: shape: expected a shape with an initializer, got None")
            self.shape = _check_shape(shape)
            self.dtype = as_dtype(dtype)
            self.init = as_initializer(default_input)

    # ---- metadata --------------------------------------------------------------------
    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes

    @property
    def has_data(self) -> bool:
        return self._data is not None

    def __repr__(self) -> str:
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype.name})"

    # ---- data ------------------------------------------------------------------------
    def key(self) -> int:
        return derive_key(self.init_seed, self.name)

    def init_data(self, region=None) -> np.ndarray:
        """Generate the initial value (or the slices in ``region``) without storing it."""
        if self.init is None:
            raise ValueError(f"Parameter {self.name!r} was built from an array and has no initializer")
        return self.init.generate(self.shape, self.dtype, self.key(), region)

    @property
    def data(self):
        """The full array (materialized on first use), where it lives: a numpy array, or a
        device array once a GPU program placed it (:meth:`device_data`). Serial programs
        read this and optimizers update it in place. When a sharded program owns the
        parameter, its shards are gathered (a collective: every rank must ask) so serial
        code sees the trained value."""
        if self._shard is not None:
            shard, world = self._shard
            self._data = shard.gather(world)
        elif self._data is None:
            self._data = self.init_data()
        return self._data

    def device_data(self, backend: Backend):
        """The value on ``backend``'s device, moved there on the first call and kept there
        (the host copy is dropped: one copy of the weights, which the optimizer updates on
        the device)."""
        data = self.data
        if array_module(data) is backend.xp:
            return data
        self._data = to_device(data, backend)
        return self._data

    def attach_shard(self, shard, world) -> None:
        """Let a sharded program own this rank's slice; reads gather from it."""
        self._shard = (shard, world)

    def detach_shard(self) -> None:
        """Gather the full value once (collective) and read it locally from now on."""
        if self._shard is not None:
            shard, world = self._shard
            self._data, self._shard = shard.gather(world), None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """``np.asarray(param)``: the value (how an op called on arrays reads a Parameter)."""
        return np.asarray(self.asnumpy(), dtype=dtype)

    def asnumpy(self) -> np.ndarray:
        """A host (numpy) copy of the full logical value, wherever it lives."""
        return to_host(self.data, copy=True)

    def set_data(self, array) -> None:
        """Replace the value (numpy or device array); it stays where the current value
        lives (on the device once a GPU program placed the parameter)."""
        array = array if is_array(array) else np.asarray(array)
        if tuple(array.shape) != self.shape:
            raise ValueError(f"Parameter {self.name!r}: set_data: expected shape {self.shape}, "
                             f"got {tuple(array.shape)}")
        host = np.array(to_host(array), dtype=self.dtype)
        placed = self._data is not None and not on_host(self._data)
        self._data = array_module(self._data).asarray(host) if placed else host
        if self._shard is not None:  # the shard takes its slice of the new value
            shard = self._shard[0]
            shard._data = np.array(self._data[shard.region])

    def drop_data(self) -> None:
        """Forget the value; the next read regenerates it from the initializer."""
        if self.init is None:
            raise ValueError(f"Parameter {self.name!r} has no initializer to regenerate from")
        self._data = None

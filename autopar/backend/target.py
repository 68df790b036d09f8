"""The device target: MindSpore's ``set_context(device_target="GPU" | "CPU")``, as a value.

:class:`Backend` is a frozen value naming a target and the array module that computes on
it (numpy for "CPU", CuPy for "GPU"). The compiled programs read :func:`current_backend`
once, when they are built, and keep the value: parameters move to the target once and stay
there, inputs move at every call, and what a user reads (``Parameter.asnumpy()``,
checkpoints) comes back to the host. The graph, the plan and the results (beyond rounding)
do not depend on the target.

``set_context`` is MindSpore's process-wide setter, so this module keeps one private
holder (``_STATE``) of the target, beside the parallel context's (``autopar.context``);
nothing below the runtime reads it: kernels take their array module from their inputs
(:func:`autopar.backend.arrays.array_module`).

    autopar.set_context(device_target="GPU")   # CuPy imported now; an ImportError says how to install it
    autopar.get_context("device_target")       # 'GPU'
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..errors import format_error
from .arrays import to_host
from .cupy_import import import_cupy

DEVICE_TARGETS = ("CPU", "GPU")
CONTEXT_KEYS = ("device_target",)


@dataclass(frozen=True)
class Backend:
    """A device target ("CPU" or "GPU") and, through :attr:`xp`, its array module."""

    target: str = "CPU"

    def __post_init__(self):
        if self.target not in DEVICE_TARGETS:
            fix = ("autopar runs on CPU cores (numpy) or an NVIDIA GPU (CuPy)" if self.target == "Ascend"
                   else "pass 'CPU' (the default) or 'GPU'")
            raise ValueError(format_error("set_context", "device_target", f"one of {DEVICE_TARGETS}",
                                          repr(self.target), fix))

    def __repr__(self) -> str:
        return f"Backend({self.target})"

    @property
    def is_host(self) -> bool:
        """Whether arrays of this target are numpy arrays in host memory."""
        return self.target == "CPU"

    @property
    def xp(self):
        """The array module: numpy, or CuPy (imported on first use)."""
        return np if self.is_host else import_cupy("set_context")


CPU, GPU = Backend("CPU"), Backend("GPU")


def as_backend(target) -> Backend:
    """A :class:`Backend` from itself or its name ("CPU"/"GPU")."""
    if isinstance(target, Backend):
        return target
    if not isinstance(target, str):
        raise TypeError(format_error("set_context", "device_target", f"one of {DEVICE_TARGETS}",
                                     f"{target!r} ({type(target).__name__})", "pass 'CPU' or 'GPU'"))
    return Backend(target)


def to_device(x, target):
    """``x`` on ``target`` (a Backend or its name): on the CPU, a numpy array
    (:func:`~autopar.backend.arrays.to_host`); on the GPU, a CuPy array (``x`` itself when
    it is one already)."""
    backend = as_backend(target)
    if backend.is_host:
        return to_host(x)
    return backend.xp.asarray(x)


class _State:
    """The process's device target (MindSpore's context is process-wide)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.backend = CPU


_STATE = _State()


def _check_keys(where: str, names) -> None:
    unknown = sorted(set(names) - set(CONTEXT_KEYS))
    if unknown:
        raise ValueError(format_error(where, "name", f"one of {CONTEXT_KEYS}", ", ".join(map(repr, unknown)),
                                      "parallel settings go to set_auto_parallel_context"))


def set_context(**kwargs) -> None:
    """MindSpore's ``set_context``: ``device_target="CPU"`` (default) or ``"GPU"`` (CuPy).
    Choosing the GPU imports CuPy now, so a missing install fails here, not mid-step.
    Programs compiled afterwards run on the target."""
    _check_keys("set_context", kwargs)
    if "device_target" in kwargs:
        backend = as_backend(kwargs["device_target"])
        backend.xp   # noqa: B018 - import CuPy now: a missing install fails at the setting
        with _STATE.lock:
            _STATE.backend = backend


def get_context(name: str):
    """The current value of one key, by MindSpore's name (``"device_target"``)."""
    _check_keys("get_context", [name])
    return _STATE.backend.target


def current_backend() -> Backend:
    """The target in force now; a compiled program reads it once, when it is built."""
    return _STATE.backend

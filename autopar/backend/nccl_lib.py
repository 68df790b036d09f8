"""CuPy's NCCL binding as one value: the only CuPy names autopar/comm/nccl.py and its message
channels (nccl_channels.py) need, here in the backend, the one layer that may name CuPy.

:class:`NcclLib` holds the array module (CuPy) and ``cupy.cuda.nccl`` and answers, with plain
ints: a device array's address, the current stream's handle, the GPU count, which GPU this
process uses, the NCCL datatype and reduction op of a numpy dtype and op name, a new unique
id (a tuple of UNIQUE_ID_BYTES C chars: -128..127 where char is signed, as on x86,
0..255 where it is not, as on ARM) and a communicator made from one. NCCL's
calls take raw addresses, element counts and these codes, and run on the stream given::

    lib = NcclLib.load("nccl_world")             # ImportError: CuPy or its NCCL is missing
    comm = lib.communicator(2, uid, rank)         # cupy.cuda.nccl.NcclCommunicator
    comm.allReduce(lib.pointer(x), lib.pointer(out), x.size, lib.reduce_type(x.dtype), lib.op("sum"), lib.stream())

Datatypes. Data that is only moved (all-gather, broadcast, send/recv, all-to-all) travels as
bytes (``BYTES``, NCCL's uint8 with count = nbytes): NCCL never reads what it moves, so one
code serves every dtype -- bool, bfloat16 (no ncclBfloat16 needed, which takes NCCL >= 2.10),
complex -- bit for bit. Reductions need the element type: :data:`REDUCE_TYPES`; bfloat16 is
not among them, as the communicator widens it to float32 first (autopar.comm.base: one
rounding at the end, where NCCL's own bfloat16 sum would round at every hop).

Streams and events (the message channels of autopar/comm/nccl_channels.py): a new stream of
its own (``non_blocking``: no implicit ordering against the legacy default stream, which
would put a waiting receive back in front of the compute), a new event (no timing), an event
recorded on a stream, a stream made to wait for an event (the GPU waits, the host does not),
whether an event has been reached, and a stream's handle. ``stream=None`` is the current
stream, where the programs' kernels run::

    ready = lib.new_event(); lib.record_event(ready)          # after x's kernels on the compute stream
    lib.wait_event(ready, side); comm.send(lib.pointer(x), x.nbytes, lib.bytes_type, 1, lib.stream_handle(side))

The same serve the non-blocking collectives' stream (autopar/comm/nccl_streams.py), whose
watchdog also asks a communicator for an asynchronous error (``ncclCommGetAsyncError``: a
peer or the network failed under a call already queued) and aborts it (``ncclCommAbort``:
its kernels still waiting for a peer return, so the GPU is not left blocked)::

    problem = lib.async_error(comm)           # None, or NCCL's message
    lib.abort(comm)                           # the communicator cannot be used afterwards
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import numpy as np

from ..errors import format_error
from .cupy_import import INSTALL_FIX, import_cupy

# numpy dtype name -> the attribute of cupy.cuda.nccl naming its ncclDataType_t
REDUCE_TYPES = {"int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "uint32": "NCCL_UINT32",
                "int64": "NCCL_INT64", "uint64": "NCCL_UINT64", "float16": "NCCL_FLOAT16",
                "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}
BYTES = "NCCL_UINT8"                                   # what moved data travels as
OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}
UNIQUE_ID_BYTES = 128                                  # NCCL_UNIQUE_ID_BYTES (nccl.h)
NCCL_MODULE = "cupy.cuda.nccl"


class NcclLib:
    """CuPy (``xp``) and its NCCL binding (``nccl``), asked through plain methods."""

    def __init__(self, xp, nccl):
        self.xp, self.nccl = xp, nccl

    @classmethod
    def load(cls, where: str) -> NcclLib:
        """CuPy and ``cupy.cuda.nccl``, or an ImportError naming ``where`` and the fix."""
        xp = import_cupy(where)
        try:
            nccl = importlib.import_module(NCCL_MODULE)
        except ImportError as err:
            nccl, reason = None, f"{NCCL_MODULE} is not importable ({err})"
        else:
            reason = "" if getattr(nccl, "available", False) else f"{NCCL_MODULE} found no NCCL library"
        if reason:
            raise ImportError(format_error(where, "NCCL", "CuPy with NCCL (cupy.cuda.nccl.available)", reason,
                                           f"{INSTALL_FIX}, with NCCL (pip install nvidia-nccl-cu12 or "
                                           "the CUDA 13 one), or set AUTOPAR_COMM=mpi"))
        return cls(xp, nccl)

    def pointer(self, a) -> int:
        """The device address of ``a``'s first element (its view's offset included)."""
        return int(a.data.ptr)

    def stream(self) -> int:
        """The handle of the current stream, which NCCL's calls are queued on."""
        return int(self.xp.cuda.get_current_stream().ptr)

    def synchronize(self) -> None:
        """Wait until the work queued on the current stream (NCCL's included) has run."""
        self.xp.cuda.get_current_stream().synchronize()

    def new_stream(self):
        """A CUDA stream of its own on the current device, not ordered against the legacy
        default stream (``cupy.cuda.Stream(non_blocking=True)``)."""
        return self.xp.cuda.Stream(non_blocking=True)

    def stream_handle(self, stream) -> int:
        """The handle NCCL's calls take for ``stream``."""
        return int(stream.ptr)

    def new_event(self):
        """A CUDA event without timing (``cupy.cuda.Event(disable_timing=True)``)."""
        return self.xp.cuda.Event(disable_timing=True)

    def record_event(self, event, stream=None) -> None:
        """Record ``event`` on ``stream`` (None: the current stream): it is reached once the
        work queued there before it has run."""
        event.record(self.xp.cuda.get_current_stream() if stream is None else stream)

    def wait_event(self, event, stream=None) -> None:
        """Make ``stream`` (None: the current stream) wait, on the GPU, until ``event`` is
        reached; the host goes on at once."""
        (self.xp.cuda.get_current_stream() if stream is None else stream).wait_event(event)

    def event_done(self, event) -> bool:
        """Whether ``event`` has been reached (never blocks)."""
        return bool(event.done)

    def async_error(self, comm) -> str | None:
        """NCCL's asynchronous error of ``comm`` (``check_async_error``: ncclCommGetAsyncError),
        or None while it has none. CuPy raises its NcclError, a RuntimeError, for one."""
        try:
            comm.check_async_error()
        except RuntimeError as err:
            return str(err)
        return None

    def abort(self, comm) -> None:
        """``ncclCommAbort``: stop ``comm``'s queued and running calls (a kernel waiting for a
        member that never comes returns); the communicator is unusable afterwards."""
        comm.abort()

    def device_count(self) -> int:
        return int(self.xp.cuda.runtime.getDeviceCount())

    def use_device(self, index: int) -> None:
        """Make GPU ``index`` this process's current device (allocations and NCCL's)."""
        self.xp.cuda.Device(index).use()

    def reduce_type(self, dtype) -> int | None:
        """The ncclDataType_t of ``dtype`` for a reduction, or None where NCCL has none."""
        name = REDUCE_TYPES.get(np.dtype(dtype).name)
        return None if name is None else int(getattr(self.nccl, name))

    @property
    def bytes_type(self) -> int:
        return int(getattr(self.nccl, BYTES))

    def op(self, name: str) -> int:
        """The ncclRedOp_t of "sum", "max" or "min"."""
        return int(getattr(self.nccl, OPS[name]))

    def unique_id(self) -> tuple[int, ...]:
        """A new NCCL unique id (ncclGetUniqueId): the rendezvous a group's members share."""
        return tuple(int(b) for b in self.nccl.get_unique_id())

    def communicator(self, size: int, unique_id: tuple[int, ...], rank: int):
        """``NcclCommunicator(size, unique_id, rank)`` on the current device (ncclCommInitRank:
        collective over the ``size`` members holding the id)."""
        return self.nccl.NcclCommunicator(size, tuple(unique_id), rank)

    @contextmanager
    def group(self):
        """ncclGroupStart ... ncclGroupEnd: the sends and receives issued inside run as one
        operation, so a member's sends to and receives from several peers cannot deadlock."""
        self.nccl.groupStart()
        try:
            yield
        finally:
            self.nccl.groupEnd()

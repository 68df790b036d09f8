"""Device arrays through a host-only transport: copy to the host, communicate, copy back.

MPI (without CUDA awareness) reads and writes host memory only, so a communicator whose
transport is host-only mixes in :class:`HostStaging`, the one place device arrays are
handled. Each public call that takes an array ``x`` is routed through :func:`staged`:

    x numpy (or not an array)   the call itself, untouched: today's path, nothing added
    x on a device (CuPy)        host = to_host(x)            device -> host copy (.get())
                                out  = call(host, ...)        MPI on numpy buffers
                                out  -> xp.asarray(out)       host -> device, xp = x's module

so the result has the input's dtype and shape semantics and lives where the input lived; a
request's ``wait()`` (``iallreduce``, ``ireduce_scatter``, ``iallgather``) copies its result back the same way.
A receive has no input to follow: ``recv`` / ``irecv`` return numpy arrays, which the program
reading them places on its device (``Program.initial_slots``). The argument checks, numbering
and statistics are the Communicator's own, made on the host copy (same shape, dtype, bytes).

    comm.allreduce(cupy.ones(3))        # cupy array [n, n, n], through MPI_Allreduce on numpy
    comm.allreduce(np.ones(3))          # numpy array: exactly the unstaged call
"""
from __future__ import annotations

from ..backend import array_module, on_host, to_host
from .base import Request, Then


def staged(call, x, *args, **kwargs):
    """``call(x, *args, **kwargs)`` with a device ``x`` staged through the host (see the
    module's docstring); a numpy ``x`` is passed straight through."""
    if on_host(x):
        return call(x, *args, **kwargs)
    xp = array_module(x)
    out = call(to_host(x), *args, **kwargs)
    if out is None:                      # send: nothing comes back
        return None
    if isinstance(out, Request):         # i*: the copy back happens at the wait
        return Then(out, lambda result: None if result is None else xp.asarray(result))   # back to the device
    return xp.asarray(out)


class HostStaging:
    """Mix in before a Communicator whose transport reads host memory only: every call that
    takes an array accepts device arrays too, through :func:`staged`."""

    def allreduce(self, x, op: str = "sum"):
        return staged(super().allreduce, x, op)

    def iallreduce(self, x, op: str = "sum", *, donate: bool = False) -> Request:
        return staged(super().iallreduce, x, op, donate=donate or not on_host(x))   # a host copy is ours

    def ireduce_scatter(self, x, axis: int = 0) -> Request:
        return staged(super().ireduce_scatter, x, axis)

    def allgather(self, x, axis: int = 0):
        return staged(super().allgather, x, axis)

    def iallgather(self, x, axis: int = 0) -> Request:
        return staged(super().iallgather, x, axis)

    def reduce_scatter(self, x, axis: int = 0):
        return staged(super().reduce_scatter, x, axis)

    def alltoall(self, x, split_axis: int, concat_axis: int):
        return staged(super().alltoall, x, split_axis, concat_axis)

    def broadcast(self, x, root: int = 0):
        return staged(super().broadcast, x, root)

    def send(self, x, dest: int, tag: int = 0) -> None:
        staged(super().send, x, dest, tag)

    def isend(self, x, dest: int, tag: int = 0) -> Request:
        """The host copy is the send buffer: ``x`` may change as soon as this returns."""
        return staged(super().isend, x, dest, tag)

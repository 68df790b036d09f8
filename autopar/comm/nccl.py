"""The NCCL backend: the Communicator interface over NCCL, one GPU per rank.

Each primitive is one NCCL call (or one group of them) queued on the current CUDA stream
(the compute stream; the non-blocking collectives: the communicator's collective stream),
through CuPy's binding (autopar.backend.nccl_lib: raw addresses, counts, datatype and op
codes). A non-leading axis is moved to the front into a contiguous buffer first, as the MPI
backend does (mpi.py), and moved back after::

    primitive                NCCL, on (d, rest...) = x with `axis` moved to the front   data as
    allreduce(x, op)         allReduce                                                   reduce type
    reduce_scatter(x, axis)  reduceScatter (d, rest...) -> (d/n, rest...)                reduce type
    iallreduce, ireduce_scatter   the same calls, on the collective stream                reduce type
    allgather(x, axis)       allGather (d, rest...) -> (n*d, rest...)                    bytes
    alltoall(x, s, c)        grouped send/recv of the blocks (n, *block) along s         bytes
    broadcast(x, root)       broadcast, in place                                         bytes
    send / recv              send / recv on the (peer, direction, tag)'s own channel     bytes
                             (communicator, stream, host thread; see "Messages")
    barrier                  the streams' work done (bounded by the watchdog), then MPI's barrier
    split(groups)            MPI's Comm.Split, then one new NCCL communicator per group

Data that is only moved travels as bytes, bit for bit, whatever its dtype (bool, bfloat16
included); reductions run in base.reduction_dtype: bfloat16 is widened to float32, reduced,
and rounded back once, so its sums equal the MPI backend's (NCCL's own bfloat16 sum would
round at every hop). int16, uint16 and complex have no NCCL reduction: a TypeError says so.

Arrays. A device (CuPy) array gives a new device array, queued on the current stream: the
result is ready in stream order, the host does not wait. A host (numpy) array given to a
collective is staged, the other way round from staging.py: copied to this rank's GPU,
communicated, and the result copied back -- numpy in, numpy out -- so host-side callers
(``compare``, the debug mode's fingerprints, checkpoint agreement) work unchanged. Messages
differ: a receive has no input to follow (see "Messages").

Non-blocking collectives (``iallreduce``, ``ireduce_scatter``: gradient buckets) run on a
collective stream of this communicator's own, ordered against the compute stream by events,
so the backward kernels queued after a bucket starts overlap its NCCL call; ``test()`` is an
event query, ``wait()`` makes the compute stream wait, and the host too while the watchdog
is on (comm/nccl_streams.py); the request holds its buffers until then. They use the
same NCCL communicator as the blocking collectives: NCCL runs one communicator's calls in
the order they were issued, whatever their streams, and every member issues them in program
order, so the k-th calls match; two communicators would run concurrently, which NCCL warns
can deadlock (comm/nccl_streams.py says why, with its sources).

Messages (``send``/``recv``, ``isend``/``irecv``: pipelines) go through NCCL channels
(comm/nccl_channels.py), not the compute stream. The pipeline runner posts each receive early
and waits just before the item that reads it (runtime/pipeline/runner.py); an NCCL receive
queued early on the compute stream would hold everything queued after it, the sends
included, and 1F1B deadlocks:

    stage 0 stream:  send x0 | recv g0 (posted for clock 2) | F1 | send x1
    stage 1 stream:  recv x0 | recv x1 (posted for clock 1) | F0 | B0 | send g0

So each (peer, direction, tag) gets a channel of its own, made on first use between its two
members only: a 2-member NCCL communicator (the sender's unique id sent over MPI), a stream,
and a host thread that makes the communicator and issues the channel's calls in order, so
neither ``isend`` nor ``irecv`` blocks the host, as MPI's do not. CUDA events order a
channel against the compute stream: a send starts once the kernels making ``x`` have run,
``wait()`` makes the compute stream (not the host) wait for the message. One channel per tag
keeps MPI's matching (in order within a tag, tags independent); NCCL itself has none. A host
(numpy) array is copied to this GPU and sent the same way, and receives return device arrays
(a receiver cannot know how the sender held its array). Needs MPI_THREAD_MULTIPLE (the ids
travel from the channels' threads). The watchdog's timeout bounds a wait for the other
member to post its side of a message (TimeoutError); in debug mode each message's size is
checked on both members first (NCCL cannot tell a mis-sized receive, MPI raises).

Setup. ``nccl_world(world)`` (collective over the MPI world): every rank's device is its
local rank on its host (the ranks of a shared-memory ``Split_type`` of the world), every
host must have a GPU per rank and CuPy with NCCL, rank 0 makes the NCCL unique id and MPI
broadcasts it. NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE`` is set to 0 in this
process unless the launcher set it, before NCCL first reads it. The MPI world stays
underneath for barriers, splits and the ids of split groups, and its CommStats and
CommChecks are this communicator's. The collective watchdog watches the MPI calls (barriers,
splits) and, where the host waits for an NCCL result (a request's wait, barrier, a host
array's collective), the NCCL calls: past ``AUTOPAR_COMM_WATCHDOG`` seconds (or on NCCL's
asynchronous error) it aborts the NCCL communicator and raises TimeoutError naming the
collective, this rank and the group (comm/nccl_streams.py, "The watchdog"). A wait outside
this communicator (the host reading a device result: the loss) is not bounded.

Choosing. ``select_world(world, backend)`` is what ``autopar.init()`` gets: with
``device_target="GPU"`` and more than one rank, NCCL when every rank has its own GPU (ranks
on a host <= its GPUs) and NCCL loads, else ``world`` (MPI, device arrays staged through the
host: ranks sharing a GPU). ``AUTOPAR_COMM`` overrides: ``mpi`` keeps MPI, ``nccl`` requires
NCCL (an error where it cannot run), ``auto`` or unset chooses as above.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from ..backend import Backend, on_host, to_host
from ..backend.nccl_lib import UNIQUE_ID_BYTES, NcclLib
from ..dtype import is_float
from ..errors import format_error
from .base import Communicator, Request, reduction_dtype
from .checks import describe
from .mpi import MPICommunicator, _mpi, processor_name
from .nccl_channels import Channels
from .nccl_streams import CollectiveStream, NcclWatch

COMM_ENV = "AUTOPAR_COMM"           # "mpi", "nccl", or "auto" (the default)
COMM_CHOICES = ("auto", "mpi", "nccl")
NVLS_ENV = "NCCL_NVLS_ENABLE"       # NVLink multicast: "0" unless the launcher says otherwise


class NCCLCommunicator(Communicator):
    """A Communicator over an NCCL communicator, one GPU per member; barriers, splits and
    setup go through ``host``, the MPI communicator of the same members; messages through
    ``channels`` (comm/nccl_channels.py); non-blocking collectives on a collective stream,
    host waits bounded by the watchdog (comm/nccl_streams.py)."""

    def __init__(self, host: MPICommunicator, lib: NcclLib, nccl_comm, device: int, channels: Channels):
        super().__init__(host.stats, host.checks)
        self._host, self._lib, self._comm, self._device = host, lib, nccl_comm, device
        self._channels = channels
        self._watch = NcclWatch(lib, nccl_comm, host.checks.watchdog_s, self._where, lambda: host.stats.doing)
        self._side = CollectiveStream(lib, self._watch)

    @property
    def rank(self) -> int:
        return self._host.rank

    @property
    def size(self) -> int:
        return self._host.size

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._host.ranks

    @property
    def host(self) -> MPICommunicator:
        """The MPI communicator of the same members (barriers, splits, ids)."""
        return self._host

    @property
    def nccl_comm(self):
        """The underlying ``cupy.cuda.nccl.NcclCommunicator``."""
        return self._comm

    @property
    def device(self) -> int:
        """This member's GPU (its local rank on its host)."""
        return self._device

    @property
    def collective_stream(self):
        """The CUDA stream the non-blocking collectives run on (made at first use)."""
        return self._side.stream

    def __repr__(self) -> str:
        return f"NCCLCommunicator(rank={self.rank}, ranks={self.ranks}, device={self._device})"

    # ---- arrays: checked without reading them; staged to the GPU when on the host ------

    def _buffer(self, x, method: str):
        if on_host(x):
            return super()._buffer(x, method)
        if not (x.dtype.kind in "biufc" or is_float(x.dtype)) or not x.dtype.isnative:
            raise TypeError(format_error(self._where(method), "x",
                                         "a numeric, bool or bfloat16 array in native byte order",
                                         f"dtype {x.dtype}", "convert with x.astype('float32') or similar"))
        return x

    def _contiguous(self, x, axis: int | None = None, dtype=None):
        """``x`` on this GPU, C-contiguous, in ``dtype``, with ``axis`` (if given) moved to the
        front: (..., d at axis, ...) -> (d, rest...). A host ``x`` is copied to the GPU first."""
        xp = self._lib.xp
        y = xp.asarray(x) if on_host(x) else x
        if axis is not None:
            y = xp.moveaxis(y, axis, 0)
        if dtype is not None:
            y = y.astype(dtype, copy=False)
        return xp.ascontiguousarray(y).reshape(y.shape)   # ascontiguousarray makes a 0-d array 1-d

    def _home(self, out, like, done=None):
        """``out`` where ``like`` lives: for a host input, copied back to the host once the
        call (DONE ``done``; None: already waited for) is done -- a wait the watchdog bounds."""
        if not on_host(like):
            return out
        if done is not None:
            self._watch.wait(self._op[0], self._what(), done)
        return to_host(out)

    def _what(self) -> str:
        """The collective being issued, as the watchdog names it (``allreduce #3 on group (0, 1)``)."""
        return describe(*self._op, self.ranks)

    def _issued(self):
        """After a blocking call: its DONE event on the compute stream (None: watchdog off)."""
        return self._watch.issued(self._what())

    def _begin(self, kind, x, **args):
        self._watch.check(kind)           # an aborted communicator refuses every later call
        super()._begin(kind, x, **args)

    def _reduce_type(self, dtype, method: str) -> int:
        code = self._lib.reduce_type(dtype)
        if code is None:
            raise TypeError(format_error(self._where(method), "x", "a dtype NCCL reduces (int8, uint8, int32, "
                                         "uint32, int64, uint64, float16, bfloat16, float32, float64)",
                                         f"dtype {dtype}", "reduce int16 as int32, complex as its float view"))
        return code

    # ---- the primitives ----------------------------------------------------------------

    def _allreduce(self, x, op):
        hold, issue, result = self._allreduce_call(x, op)
        issue(self._lib.stream())
        return self._home(result(), x, self._issued())

    def _iallreduce(self, x, op, donate=False):     # NCCL writes its result without copying x first
        hold, issue, result = self._allreduce_call(x, op)
        return self._side.start(issue, hold, lambda: self._home(result(), x), "iallreduce", self._what())

    def _allreduce_call(self, x, op):
        """(buffers, issue(stream handle), result()) of an all-reduce: the buffers made on the
        compute stream now, the NCCL call, and the result read after it (see _iallreduce)."""
        lib, wide = self._lib, reduction_dtype(x.dtype)     # bfloat16: float32, rounded back once
        code = self._reduce_type(wide, "allreduce")
        send = self._contiguous(x, dtype=wide)
        out = lib.xp.empty(x.shape, wide)

        def issue(stream: int) -> None:
            if send.size:
                self._comm.allReduce(lib.pointer(send), lib.pointer(out), send.size, code, lib.op(op), stream)
        return (send, out), issue, lambda: out.astype(x.dtype, copy=False)

    def _reduce_scatter(self, x, axis):
        hold, issue, result = self._reduce_scatter_call(x, axis)
        issue(self._lib.stream())
        return self._home(result(), x, self._issued())

    def _ireduce_scatter(self, x, axis) -> Request:
        hold, issue, result = self._reduce_scatter_call(x, axis)
        return self._side.start(issue, hold, lambda: self._home(result(), x), "ireduce_scatter", self._what())

    def _reduce_scatter_call(self, x, axis):
        lib, wide = self._lib, reduction_dtype(x.dtype)
        code = self._reduce_type(wide, "reduce_scatter")
        send = self._contiguous(x, axis, wide)                                        # (d, rest...)
        out = lib.xp.empty((send.shape[0] // self.size,) + send.shape[1:], wide)      # (d/n, rest...)

        def issue(stream: int) -> None:
            if out.size:
                self._comm.reduceScatter(lib.pointer(send), lib.pointer(out), out.size, code, lib.op("sum"), stream)
        return (send, out), issue, lambda: lib.xp.moveaxis(out.astype(x.dtype, copy=False), 0, axis)

    def _allgather(self, x, axis):
        lib = self._lib
        send = self._contiguous(x, axis)                                                    # (d, rest...)
        out = lib.xp.empty((self.size * send.shape[0],) + send.shape[1:], send.dtype)      # (n*d, rest...)
        if send.size:
            self._comm.allGather(lib.pointer(send), lib.pointer(out), send.nbytes, lib.bytes_type, lib.stream())
        return self._home(lib.xp.moveaxis(out, 0, axis), x, self._issued())

    def _alltoall(self, x, split_axis, concat_axis):
        lib, xp, n, me = self._lib, self._lib.xp, self.size, self.rank
        mine = xp.asarray(x) if on_host(x) else x
        blocks = xp.ascontiguousarray(xp.stack(xp.split(mine, n, axis=split_axis)))  # (n, *block): block j to member j
        got = xp.empty_like(blocks)                                      # (n, *block): block j from member j
        got[me] = blocks[me]
        step = blocks.nbytes // n
        if step:
            send, recv, stream = lib.pointer(blocks), lib.pointer(got), lib.stream()
            with lib.group():
                for j in range(n):
                    if j != me:
                        self._comm.send(send + j * step, step, lib.bytes_type, j, stream)
                        self._comm.recv(recv + j * step, step, lib.bytes_type, j, stream)
        return self._home(_concat_leading(xp, got, concat_axis), x, self._issued())

    def _broadcast(self, x, root):
        lib = self._lib
        buf = self._contiguous(x).copy() if self.rank == root else lib.xp.empty(x.shape, x.dtype)
        if buf.size:
            ptr = lib.pointer(buf)
            self._comm.broadcast(ptr, ptr, buf.nbytes, lib.bytes_type, root, lib.stream())
        return self._home(buf, x, self._issued())

    # Messages go through a channel per (peer, direction, tag) (module docstring, "Messages").

    def _send(self, x, dest, tag):
        self._channels.isend(x, dest, tag).wait()

    def _recv(self, shape, dtype, source, tag):
        return self._channels.irecv(shape, dtype, source, tag).wait()

    def _isend(self, x, dest, tag):
        return self._channels.isend(x, dest, tag)

    def _irecv(self, shape, dtype, source, tag):
        return self._channels.irecv(shape, dtype, source, tag)

    def _barrier(self):
        self._watch.drain("barrier", "the calls and kernels queued before this barrier", *self._side.marks())
        self._side.join()                 # the compute stream waits for the collective stream's calls
        self._lib.synchronize()           # this member's queued NCCL calls and kernels have run
        self._host.barrier()

    def _split(self, groups, index):
        host = self._host.split(groups)   # MPI Comm.Split; it checks that every member passed the same groups
        return _connect(host, self._lib, self._device)


# ---- setup -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Readiness:
    """Whether the world can run NCCL: this rank's CuPy/NCCL (None if missing), its GPU,
    its reason it cannot ('' if it can), and the world ranks that cannot."""

    lib: NcclLib | None
    local_rank: int
    problem: str
    unready: tuple[int, ...]


def nccl_world(world: MPICommunicator, environ: MutableMapping[str, str] | None = None) -> NCCLCommunicator:
    """The NCCL communicator of ``world``'s members, one GPU each (collective over ``world``).
    Raises ValueError on every rank when any rank lacks its own GPU or CuPy's NCCL.
    ``environ`` (default os.environ) gets NCCL_NVLS_ENABLE=0 unless it has a value."""
    ready = _readiness(world, "nccl_world")
    if ready.unready:
        ranks = ", ".join(map(str, ready.unready))
        why = f": {ready.problem}" if ready.problem else " (their own errors say why)"
        raise ValueError(format_error("nccl_world", "world", "ranks that each have a GPU of their own and CuPy "
                                      "with NCCL", f"rank(s) {ranks} of {world.size} cannot{why}",
                                      f"start one rank per GPU on each host, or set {COMM_ENV}=mpi (MPI with "
                                      "host copies, which ranks sharing a GPU need)"))
    return _start(world, ready, environ)


def select_world(world: Communicator, backend: Backend, environ: MutableMapping[str, str] | None = None):
    """The world programs communicate through (module docstring, "Choosing"): the NCCL
    communicator of ``world`` or ``world`` itself. Collective when it looks for GPUs."""
    environ = os.environ if environ is None else environ
    choice = _choice(environ)
    if choice == "mpi" or world.size == 1:
        return world
    if backend.is_host:
        if choice == "nccl":
            raise ValueError(format_error("init", COMM_ENV, "'mpi' or 'auto' under device_target='CPU' (NCCL "
                                          "carries GPU arrays)", "'nccl'",
                                          "call autopar.set_context(device_target='GPU') before autopar.init()"))
        return world
    if choice == "nccl":
        return nccl_world(world, environ)
    ready = _readiness(world, "init")
    return world if ready.unready else _start(world, ready, environ)


def _choice(environ: Mapping[str, str]) -> str:
    choice = environ.get(COMM_ENV, "").strip().lower() or "auto"
    if choice not in COMM_CHOICES:
        raise ValueError(format_error("environment", COMM_ENV, f"one of {COMM_CHOICES} (or unset: auto)",
                                      repr(environ[COMM_ENV]), f"e.g. {COMM_ENV}=mpi"))
    return choice


def _readiness(world: MPICommunicator, where: str) -> _Readiness:
    """This rank's CuPy/NCCL and GPU, and every rank's verdict (collective over ``world``)."""
    if not isinstance(world, MPICommunicator):
        raise TypeError(format_error(where, "world", "an MPI communicator (autopar.comm.world() under mpiexec)",
                                     f"{world!r}", "launch with mpiexec -n <ranks>"))
    try:
        lib, problem = NcclLib.load(where), ""
    except ImportError as err:
        lib, problem = None, str(err)
    node = world.mpi_comm.Split_type(_mpi().COMM_TYPE_SHARED, key=world.rank)   # this host's ranks
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    if lib is not None:
        problem = _gpu_problem(lib, local_size)
    flags = np.zeros(world.size, np.int8)
    world.mpi_comm.Allgather(np.array([bool(problem)], np.int8), flags)
    return _Readiness(lib, local_rank, problem, tuple(r for r, f in zip(world.ranks, flags) if f))


def _gpu_problem(lib: NcclLib, local_size: int) -> str:
    """Why this host cannot give each of its ``local_size`` ranks a GPU ('' when it can)."""
    try:
        count = lib.device_count()
    except Exception as err:              # no driver, no device: CUDARuntimeError and kin
        return f"CuPy sees no GPU ({type(err).__name__}: {err})"
    if local_size > count:
        return (f"{local_size} ranks on host {processor_name()} share its {count} GPU(s); "
                "NCCL needs one GPU per rank")
    return ""


def _start(world: MPICommunicator, ready: _Readiness, environ) -> NCCLCommunicator:
    environ = os.environ if environ is None else environ
    environ.setdefault(NVLS_ENV, "0")     # before NCCL first reads its environment (ids, communicators)
    ready.lib.use_device(ready.local_rank)
    return _connect(world, ready.lib, ready.local_rank)


def _connect(host: MPICommunicator, lib: NcclLib, device: int) -> NCCLCommunicator:
    """A new NCCL communicator of ``host``'s members: member 0 makes the unique id, MPI
    broadcasts it, every member joins (collective over ``host``); its message channels."""
    uid = np.zeros(UNIQUE_ID_BYTES, np.int16)   # C chars: signed (x86) or not (ARM), so wider than int8
    if host.rank == 0:
        uid[:] = lib.unique_id()
    host.mpi_comm.Bcast(uid, root=0)
    nccl_comm = lib.communicator(host.size, tuple(int(b) for b in uid), host.rank)
    return NCCLCommunicator(host, lib, nccl_comm, device, Channels(lib, host, device))


def _concat_leading(xp, blocks, axis: int):
    """Concatenate blocks[0], blocks[1], ... along ``axis`` of a block: (n, *b) -> b with b[axis] * n."""
    moved = xp.moveaxis(blocks, 0, axis)  # b[:axis] + (n,) + b[axis:]
    shape = blocks.shape[1:]
    return moved.reshape(shape[:axis] + (blocks.shape[0] * shape[axis],) + shape[axis + 1:])

"""The MPI backend: the Communicator interface over an mpi4py communicator.

mpi4py is imported lazily, inside the functions here, so ``import autopar`` neither needs MPI
nor initialises it. Buffers travel as numpy arrays through mpi4py's uppercase (buffer)
methods, never pickled. An axis other than 0 is moved to the front into a contiguous buffer
before the call and moved back after::

    allgather(x (B, S/mp, H), axis=1): send (S/mp, B, H) -> recv (S, B, H) -> out (B, S, H)

``world()`` is the entry point: the world communicator under ``mpiexec -n N`` (N > 1), a
one-rank SelfCommunicator otherwise. Call it once per process and pass the result down; its
CommStats and CommChecks are shared by every communicator split from it. With a watchdog
(on by default: ``CommChecks.from_env``, ``AUTOPAR_COMM_WATCHDOG=T`` seconds, 0 for off)
each call is issued non-blocking (``Iallreduce``, ``Isend``, ...) and polled by
watchdog.MPIWatchdog; without, the blocking calls below run exactly as they are.
``iallreduce`` / ``ireduce_scatter`` are MPI's ``Iallreduce`` / ``Ireduce_scatter_block``, their
wait ``Wait`` (or the watchdog's polled finish); ``isend`` / ``irecv`` are ``Isend`` / ``Irecv``
(``send`` / ``recv`` start one and wait at once), their wait ``Wait`` or the watchdog's polled
``p2p``.

bfloat16 has no MPI datatype (and mpi4py's DLPack path refuses it): data moved travels as a
uint16 view of the same memory (bit for bit, :func:`_wire`); reductions run on a float32 copy
and round back to bfloat16 once (base.reduction_dtype), as the in-process backend does, so
both give the same bits.

Where every member runs on one host, a sum (allreduce, reduce_scatter, and their ``i``
forms) of ``shm.MIN_BYTES`` or more goes through a shared-memory window instead (shm.py),
on the window's helper thread, its waits under the watchdog's deadline; ``AUTOPAR_COMM_SHM=0`` (or
``world(shared_memory=False)``) keeps every call on MPI.

Device (CuPy) arrays travel through host copies: MPICommunicator mixes in
staging.HostStaging, which copies a device input to the host, runs the call below on numpy
and moves the result back to the input's device; numpy inputs take the path above unchanged.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Mapping

import numpy as np

from ..backend import on_host
from ..dtype import bfloat16
from ..errors import format_error
from . import shm
from .base import CommStats, Communicator, Request, Then, reduction_dtype
from .checks import CommChecks
from .single import SelfCommunicator
from .staging import HostStaging
from .watchdog import MPIWatchdog

# Variables the common launchers set in every process they start: MPICH's and Intel MPI's
# Hydra (PMI_*), Open MPI (OMPI_COMM_WORLD_*), PMIx launchers (PMIX_RANK), MVAPICH (MV2_*).
_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
ABORT_GRACE_S = 0.5   # between printing a failing rank's traceback and aborting: the launcher forwards it
ABORT_INIT_S = 10.0   # the most a failing rank that had not started MPI waits in MPI_Init to abort the job


def _mpi():
    from mpi4py import MPI  # the one import of mpi4py in autopar; initialises MPI
    return MPI


def _initialised_mpi():
    """mpi4py's MPI module if this process imported it and MPI is running, else None
    (never imports it: importing initialises MPI)."""
    mod = sys.modules.get("mpi4py.MPI")
    return mod if mod is not None and mod.Is_initialized() and not mod.Is_finalized() else None


def start_mpi_or_exit(timeout_s: float | None):
    """mpi4py's MPI module, initialising MPI. MPI_Init waits for every rank the launcher
    started (MPICH's PMI barrier), so a rank that exited before it -- before
    ``autopar.init()`` -- leaves this one waiting forever, holding the GIL. With a timeout,
    faulthandler's C-level timer ends this process if MPI_Init has not returned by then,
    dumping the stack (it ends in this function) to stderr; the launcher then ends the job."""
    if timeout_s is None or _initialised_mpi() is not None:
        return _mpi()
    try:
        faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.__stderr__)
    except (OSError, ValueError, RuntimeError):   # no real stderr to dump to: start MPI unguarded
        return _mpi()
    try:
        return _mpi()
    finally:
        faulthandler.cancel_dump_traceback_later()


def launched_under_mpi() -> bool:
    """True when an MPI launcher started this process (or MPI is already initialised)."""
    if any(v in os.environ for v in _SIZE_ENV + _RANK_ENV):
        return True
    return _initialised_mpi() is not None


def launcher_size(environ: Mapping[str, str] | None = None) -> int | None:
    """How many processes the MPI launcher started, without initialising MPI: MPI's own
    count once it runs, else the launcher's environment (``environ``, default os.environ).
    None when no launcher started this process, or it does not say."""
    if environ is None:
        running = _initialised_mpi()
        if running is not None:
            return running.COMM_WORLD.Get_size()
        environ = os.environ
    for name in _SIZE_ENV:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _launcher_rank() -> str:
    """This process's world rank as MPI or the launcher's environment says ('?' if neither)."""
    running = _initialised_mpi()
    if running is not None:
        return str(running.COMM_WORLD.Get_rank())
    return next((os.environ[v].strip() for v in _RANK_ENV if os.environ.get(v, "").strip().isdigit()), "?")


def processor_name() -> str:
    """This process's host: ``MPI.Get_processor_name()`` under a launcher, else the host name."""
    return _mpi().Get_processor_name() if launched_under_mpi() else socket.gethostname()


def world(checks: CommChecks | None = None, shared_memory: bool | None = None) -> Communicator:
    """The world communicator: MPI's when launched with more than one rank, else one rank.
    ``checks`` default: ``CommChecks.from_env()`` (the watchdog on, at DEFAULT_WATCHDOG_S
    unless ``AUTOPAR_COMM_WATCHDOG`` says otherwise). ``shared_memory``: large sums among
    members on one host go through a shared window (shm.py); default on unless
    ``AUTOPAR_COMM_SHM=0``."""
    checks = CommChecks.from_env() if checks is None else checks
    shared_memory = shm.wanted() if shared_memory is None else shared_memory
    if launched_under_mpi():
        comm = start_mpi_or_exit(checks.watchdog_s).COMM_WORLD
        if comm.Get_size() > 1:
            return MPICommunicator(comm, CommStats(), checks=checks, shared_memory=shared_memory)
    return SelfCommunicator(CommStats(), checks)


class MPICommunicator(HostStaging, Communicator):
    """A Communicator over an ``mpi4py.MPI.Comm``; device arrays are staged through the host
    (HostStaging)."""

    def __init__(self, comm, stats: CommStats, ranks: tuple[int, ...] | None = None,
                 checks: CommChecks | None = None, shared_memory: bool = False):
        super().__init__(stats, checks)
        self._shared_memory = shared_memory      # large sums through shm.SharedSum where the members share a host
        self._shm: shm.SharedSum | None | bool = None   # None: not opened yet; False: unusable here
        MPI = _mpi()
        self._comm = comm
        self._rank, self._size = comm.Get_rank(), comm.Get_size()
        if ranks is None:  # world ranks of the members, in member order
            mine, everyone = comm.Get_group(), MPI.COMM_WORLD.Get_group()
            ranks = mine.Translate_ranks(list(range(self._size)), everyone)
            mine.Free()
            everyone.Free()
        self._ranks = tuple(int(r) for r in ranks)
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._status, self._byte, self._in_place = MPI.Status, MPI.BYTE, MPI.IN_PLACE
        timeout = self.checks.watchdog_s   # None: the blocking calls, nothing added
        self._watch = None if timeout is None else MPIWatchdog(MPI, comm, self._ranks, timeout)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._ranks

    @property
    def mpi_comm(self):
        """The underlying mpi4py communicator."""
        return self._comm

    def _run(self, blocking: str, *args, **kwargs) -> None:
        """``comm.<blocking>(*args)``, or with a watchdog its non-blocking ``I<name>`` polled."""
        if self._watch is None:
            getattr(self._comm, blocking)(*args, **kwargs)
        else:
            start = getattr(self._comm, "I" + blocking.lower())
            self._watch.collective(lambda: start(*args, **kwargs), *self._op, self.stats.doing)

    def _may_share(self, nbytes: int) -> bool:
        """Whether a sum of ``nbytes`` may go through the shared window (not yet known unusable)."""
        return self._shared_memory and self._size > 1 and nbytes >= shm.MIN_BYTES and self._shm is not False

    def _shared(self, x: np.ndarray) -> shm.SharedSum | None:
        """The host's shared window for a sum of ``x`` (opened at the first one large enough:
        every member gets there at the same call), or None: MPI's own call."""
        if not self._may_share(x.nbytes):
            return None
        if self._shm is None:
            self._shm = self._open_shared() or False
        return self._shm or None

    def _open_shared(self) -> shm.SharedSum | None:
        """The members' shared window when all run on one host with room for it, else None.
        Collective; the members agree first through a watched call, so one that never comes
        stops the job (watchdog) before the unwatched Split_type and window allocation."""
        MPI = _mpi()
        host = zlib.crc32(MPI.Get_processor_name().encode())
        roomy = shm.room(shm.window_bytes(self._size))
        mine = np.array([host, -host, 0 if roomy else 1], dtype=np.int64)
        agreed = np.empty_like(mine)
        self._run("Allreduce", mine, agreed, op=self._ops["max"])
        if agreed[0] != -agreed[1] or agreed[2]:    # hosts differ, or one lacks room
            return None
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._rank)   # member order kept
        if node.Get_size() != self._size:           # two hosts of one name: every member sees it
            node.Free()
            return None
        watch = self._watch
        return shm.SharedSum(MPI, node, self._ranks, None if watch is None else self.checks.watchdog_s,
                             None if watch is None else watch.abort)

    def _what(self) -> tuple[str, int, str]:
        """(kind, seq, what this rank last started) of the current call, for a watchdog report."""
        return (*self._op, self.stats.doing)

    def _allreduce(self, x, op):
        if op == "sum" and self._shared(x) is not None:
            return self._iallreduce(x, op, blocking=True).wait()
        wide = reduction_dtype(x.dtype)   # bfloat16: float32, rounded back once
        out = np.empty(x.shape, wide)
        self._run("Allreduce", _contiguous(x.astype(wide, copy=False)), out, op=self._ops[op])
        return out.astype(x.dtype, copy=False)

    def _iallreduce(self, x, op, donate=False, blocking=False):
        """``blocking``: the caller waits at once (a shared-window sum then runs on the caller)."""
        wide = reduction_dtype(x.dtype)   # bfloat16: float32, rounded back once
        window = self._shared(x) if op == "sum" else None
        mine = donate and x.dtype == wide and x.flags.c_contiguous and x.flags.writeable
        if window is not None:
            if mine:
                flat = x.reshape(-1)    # (numel,), summed in place
                return Then(window.start_allreduce([flat], flat, self._what(), blocking), lambda _: x)
            flat = _contiguous(x.astype(wide, copy=False)).reshape(-1)   # (numel,)
            return Then(window.start_allreduce([flat], np.empty(x.size, wide), self._what(), blocking),
                         lambda out: out.reshape(x.shape).astype(x.dtype, copy=False))
        if mine:
            # in place: MPI would otherwise copy x into ``out`` at the start (a memcpy of the
            # whole bucket on the critical path: 4 ms for 25 MB on a 2-core Xeon, MPICH)
            return self._started(lambda: self._comm.Iallreduce(self._in_place, x, op=self._ops[op]), (x,),
                                 lambda: x)
        send, out = _contiguous(x.astype(wide, copy=False)), np.empty(x.shape, wide)
        return self._started(lambda: self._comm.Iallreduce(send, out, op=self._ops[op]), (send, out),
                             lambda: out.astype(x.dtype, copy=False))

    def iallreduce_joined(self, parts) -> Request:
        """As Communicator's; through the shared window the parts are read where they are (so
        they must stay untouched until the wait, as any non-blocking call's input)."""
        dtype = parts[0].dtype if parts else None
        if not (parts and self._may_share(sum(p.nbytes for p in parts)) and dtype == reduction_dtype(dtype)
                and all(on_host(p) and p.dtype == dtype for p in parts)):
            return super().iallreduce_joined(parts)
        out = np.empty(sum(p.size for p in parts), dtype)    # the joined sum, (total,)
        self._begin("allreduce", out, op="sum")
        self._stats.record("allreduce", self.ranks, out)
        window = self._shared(out)
        flat = [np.ascontiguousarray(p).reshape(-1) for p in parts]   # views where already contiguous
        if window is None:                                  # no window after all (another host, no room)
            np.concatenate(flat, out=out)
            return self._iallreduce(out, "sum", donate=True)
        return window.start_allreduce(flat, out, self._what())

    def _ireduce_scatter(self, x, axis, blocking=False):
        """``blocking`` as in :meth:`_iallreduce`."""
        wide = reduction_dtype(x.dtype)
        send = _contiguous(np.moveaxis(x, axis, 0).astype(wide, copy=False))  # (d, rest...)
        out = np.empty((send.shape[0] // self._size,) + send.shape[1:], wide)  # (d/n, rest...)
        result = lambda: np.moveaxis(out.astype(x.dtype, copy=False), 0, axis)   # noqa: E731
        window = self._shared(x)
        if window is not None:  # (d, rest...) -> (n, d/n * rest) blocks; out (d/n, rest...) -> (d/n * rest,)
            return Then(window.start_reduce_scatter(send.reshape(self._size, -1), out.reshape(-1), self._what(),
                                                    blocking), lambda _: result())
        return self._started(lambda: self._comm.Ireduce_scatter_block(send, out, op=self._ops["sum"]), (send, out),
                             result)

    def _iallgather(self, x, axis):
        send = _contiguous(np.moveaxis(x, axis, 0))  # (d, rest...)
        out = np.empty((self._size * send.shape[0],) + send.shape[1:], x.dtype)  # (n*d, rest...)
        wire_send, wire_out = _wire(send), _wire(out)
        return self._started(lambda: self._comm.Iallgather(wire_send, wire_out), (send, out, wire_send, wire_out),
                             lambda: np.moveaxis(out, 0, axis))

    def _started(self, start, buffers: tuple, result) -> Request:
        """The request of ``start()`` (watched when the watchdog is on), holding ``buffers``
        (MPI uses them until completion); ``result()`` after the wait is its result."""
        watched = None if self._watch is None else self._watch.begin(start, *self._op, self.stats.doing)
        return _MPIRequest(start() if watched is None else watched.request, watched, self._watch, buffers, result)

    def _allgather(self, x, axis):
        send = _contiguous(np.moveaxis(x, axis, 0))  # (d, rest...)
        out = np.empty((self._size * send.shape[0],) + send.shape[1:], x.dtype)  # (n*d, rest...)
        self._run("Allgather", _wire(send), _wire(out))
        return np.moveaxis(out, 0, axis)

    def _reduce_scatter(self, x, axis):
        if self._shared(x) is not None:
            return self._ireduce_scatter(x, axis, blocking=True).wait()
        wide = reduction_dtype(x.dtype)   # bfloat16: float32, rounded back once
        send = _contiguous(np.moveaxis(x, axis, 0).astype(wide, copy=False))  # (d, rest...)
        out = np.empty((send.shape[0] // self._size,) + send.shape[1:], wide)  # (d/n, rest...)
        self._run("Reduce_scatter_block", send, out, op=self._ops["sum"])
        return np.moveaxis(out.astype(x.dtype, copy=False), 0, axis)

    def _alltoall(self, x, split_axis, concat_axis):
        send = _contiguous(np.stack(np.split(x, self._size, axis=split_axis)))  # (n, *block), block j for member j
        recv = np.empty_like(send)  # (n, *block), block j from member j
        self._run("Alltoall", _wire(send), _wire(recv))
        return _concat_leading(recv, concat_axis)

    def _broadcast(self, x, root):
        buf = np.array(x, order="C") if self._rank == root else np.empty(x.shape, x.dtype)
        self._run("Bcast", _wire(buf), root=root)
        return buf

    def _send(self, x, dest, tag):
        self._isend(x, dest, tag).wait()

    def _recv(self, shape, dtype, source, tag):
        return self._irecv(shape, dtype, source, tag).wait()

    def _isend(self, x, dest, tag):
        buf = _wire(_contiguous(x))
        return _P2PRequest(self, self._comm.Isend(buf, dest=dest, tag=tag), f"send to member {dest} (tag {tag})",
                           dest, None, buf, lambda: None)

    def _irecv(self, shape, dtype, source, tag):
        out = np.empty(shape, dtype)
        status, buf = self._status(), _wire(out)

        def result():
            got = status.Get_count(self._byte)
            if got != out.nbytes:  # a longer message already failed in the wait (MPI_ERR_TRUNCATE)
                raise ValueError(format_error(self._where("recv"), "shape, dtype",
                                              f"{shape}, {dtype} ({out.nbytes} bytes)",
                                              f"a message of {got} bytes from member {source} (tag {tag})",
                                              "receive with the shape and dtype the sender sends"))
            return out
        request = self._comm.Irecv(buf, source=source, tag=tag)
        return _P2PRequest(self, request, f"recv from member {source} (tag {tag})", source, status, buf, result)

    def _barrier(self):
        self._run("Barrier")

    def _split(self, groups, index):
        self._check_same_groups(groups)
        group = groups[index]
        me = self._ranks[self._rank]
        sub = self._comm.Split(color=index, key=group.index(me))
        assert sub.Get_rank() == group.index(me) and sub.Get_size() == len(group)
        return MPICommunicator(sub, self.stats, ranks=group, checks=self.checks, shared_memory=self._shared_memory)

    def _check_same_groups(self, groups) -> None:
        """Every member passed the same groups (else Split would pair ranks silently wrong)."""
        digest = zlib.crc32(repr(groups).encode())
        both = np.array([digest, -digest], dtype=np.int64)
        agreed = np.empty_like(both)
        self._run("Allreduce", both, agreed, op=self._ops["max"])
        if agreed[0] != -agreed[1]:
            raise ValueError(format_error(self._where("split"), "groups", "the same groups on every member",
                                          f"{groups} here and other groups elsewhere",
                                          "compute the groups from the same mesh on every rank"))


class _MPIRequest(Request):
    """An MPI request (watched, when the watchdog is on) and the buffers it reads and fills."""

    def __init__(self, request, watched, watchdog, buffers: tuple, result):
        self._request, self._watched, self._watchdog = request, watched, watchdog
        self._buffers, self._result = buffers, result    # held: MPI uses them until completion

    def test(self) -> bool:
        return self._request.Test() if self._watched is None else self._watchdog.test(self._watched)

    def wait(self) -> np.ndarray:
        if self._watched is None:
            self._request.Wait()
        else:
            self._watchdog.finish(self._watched)
        return self._result()


class _P2PRequest(Request):
    """An ``Isend`` / ``Irecv`` and the buffer it reads or fills; its wait is MPI's ``Wait``, or
    the watchdog's deadline-polled one (the deadline counting from the wait)."""

    def __init__(self, comm: MPICommunicator, request, what: str, peer: int, status, buf, result):
        self._comm, self._request, self._what, self._peer = comm, request, what, peer
        self._status, self._buf, self._result = status, buf, result   # buf held: MPI uses it until completion
        self._done = False

    def test(self) -> bool:
        if not self._done:
            self._done = self._request.Test(self._status) if self._status is not None else self._request.Test()
        return self._done

    def wait(self):
        comm = self._comm
        if self._done:
            pass
        elif comm._watch is None:
            self._request.Wait(self._status)
        else:
            comm._watch.p2p(self._request, self._what, self._peer, self._status, comm.stats.doing)
        self._done = True
        return self._result()


def _concat_leading(blocks: np.ndarray, axis: int) -> np.ndarray:
    """Concatenate blocks[0], blocks[1], ... along ``axis`` of a block: (n, *b) -> b with b[axis] * n."""
    moved = np.moveaxis(blocks, 0, axis)  # b[:axis] + (n,) + b[axis:]
    shape = blocks.shape[1:]
    return moved.reshape(shape[:axis] + (blocks.shape[0] * shape[axis],) + shape[axis + 1:])


def install_abort_handler() -> None:
    """Make an uncaught exception on any rank (main or other thread) end the whole MPI job.

    ``autopar.init()`` installs it under a launcher. The hook first prints the rank and the
    traceback to stderr (the rank from the launcher's environment when MPI is not running
    yet, so nothing can stop the print), waits ABORT_GRACE_S for the launcher to forward
    it, then calls ``MPI.COMM_WORLD.Abort(1)``, initialising MPI if this rank failed before
    it did (a rank that dies without MPI leaves the others waiting in MPI_Init; if one of
    them already exited, MPI_Init cannot finish and the process ends after ABORT_INIT_S, or
    the watchdog's timeout if shorter).
    Outside MPI it prints the traceback as Python would.
    """
    sys.excepthook = _abort_hook
    threading.excepthook = _thread_abort_hook


def _abort_hook(exc_type, exc, tb) -> None:
    if not launched_under_mpi():
        sys.__excepthook__(exc_type, exc, tb)
        return
    try:
        rank, size = _launcher_rank(), launcher_size() or "?"
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        lines = [f"autopar: uncaught {exc_type.__name__} on rank {rank} of {size}; aborting the MPI job"]
        lines += [f"[rank {rank}] {line}" for line in text.rstrip("\n").split("\n")]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        start_mpi_or_exit(_abort_init_timeout()).COMM_WORLD.Abort(1)
    finally:
        os._exit(1)   # MPICH's Abort may return before the launcher ends us: never resume the program


def _abort_init_timeout() -> float:
    """ABORT_INIT_S, or the watchdog's timeout (AUTOPAR_COMM_WATCHDOG) when shorter."""
    try:
        watchdog = CommChecks.from_env().watchdog_s
    except ValueError:
        watchdog = None
    return min(ABORT_INIT_S, watchdog or ABORT_INIT_S)


def _thread_abort_hook(args) -> None:
    if args.exc_type is SystemExit:
        return
    _abort_hook(args.exc_type, args.exc_value, args.exc_traceback)


def _wire(buf: np.ndarray) -> np.ndarray:
    """What MPI is handed for ``buf``: ``buf`` itself, or for bfloat16 (no MPI datatype) the same
    memory viewed as uint16, so a receive into the view fills ``buf`` bit for bit."""
    return buf.view(np.uint16) if buf.dtype == bfloat16 else buf


def _contiguous(x: np.ndarray) -> np.ndarray:
    """``x`` with C-order strides exactly (a copy if needed). numpy calls an array with a
    size-1 dim of any stride contiguous, and ``np.ascontiguousarray`` returns it as is, but
    mpi4py's DLPack path checks the strides themselves and refuses it."""
    x = np.asarray(x)
    expected, step = [], x.itemsize
    for n in reversed(x.shape):
        expected.append(step)
        step *= n
    if x.flags.c_contiguous and tuple(reversed(expected)) == x.strides:
        return x
    return np.array(x, order="C", copy=True)

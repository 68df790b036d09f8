"""A fake CuPy with NCCL, for running the NCCL communicator on CPU ranks under mpiexec.

``FakeGPUs`` is the strict stand-in device module of tests/test_comm_device_staging.py
(numpy cannot read its arrays; its functions refuse numpy arrays) given what NCCL needs: a
GPU count, a current device per process, a current stream, and ``cuda.nccl``, a
:class:`FakeNccl` whose calls really compute. They take what NCCL takes -- raw addresses,
element counts, datatype and op codes -- read and write the memory at those addresses (the
numpy memory behind the stand-in arrays), and do the operation with mpi4py among the
processes that joined the same unique id, so a wrong address, count, datatype or member
shows up as wrong numbers. It also records what NCCL would have seen: the ids made and
joined, NCCL_NVLS_ENABLE at each join, and every call.

Rendezvous: a unique id names the world rank that made it (byte 0) and a serial (bytes 1
and 2, 0..127 each); members send (id, NCCL rank, world rank, device) to that root, which
answers with the member list, on tags of that id alone, so communicators can be made from
several threads at once (the message channels' threads). Collectives run on an MPI
communicator of exactly the members (``Create_group``, collective over the group only, made
at the first collective), as NCCL's bootstrap would; sends and receives go over the fake's
world on the id's own tag. Two members on one host using one GPU fail, as NCCL does
("Duplicate GPU detected").

Streams. The current stream (``get_current_stream()``, where the programs' kernels and the
collectives run) is synchronous: what is queued on it runs at once on the calling thread.
``Stream()`` is a stream of its own, as CUDA's: a worker thread running its operations in
order, asynchronously from the host. ``Event()`` is reached when the stream it was recorded
on gets there (at once on the current stream); ``stream.wait_event(e)`` holds that stream
until e is reached -- on the current stream, the host itself waits. An NCCL send or receive
issued on a stream runs there: on the current stream it blocks the host until matched, as a
waiting NCCL kernel holds everything queued behind it. So do collectives (non-blocking MPI
collectives, polled). One communicator's calls run in the order they were issued, whatever
their streams, as NCCL orders them (a call waits for the communicator's previous one: on the
current stream the host waits). A wait longer than ``timeout_s`` (a deadlock) raises
TimeoutError -- on the host, or, on a stream's thread, stopping that stream (nothing after it
runs, its later events are never reached), so a deadlock fails a test instead of hanging it.
Needs MPI_THREAD_MULTIPLE (the stream threads call MPI).

For the tests: ``nccl.on_stream`` logs the stream each call was queued on; ``gpus.gate()``
is an event the test reaches itself (``open()``), so a stream made to wait for it is held;
a communicator's ``async_error`` (a string) is what ``check_async_error`` raises
(NcclError), and ``abort()`` makes its later calls fail and is logged in ``nccl.aborted``.
A collective already started when its communicator is aborted keeps waiting for its members
in MPI (MPI cannot cancel a collective): a test lets the missing member join late.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import queue
import socket
import threading
import time
import types

import numpy as np
from mpi4py import MPI

UNIQUE_ID_BYTES = 128
TYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64, 6: np.float16,
         7: np.float32, 8: np.float64}
BOOT_TAG = 31001                 # an id's tags: BOOT_TAG + 2k (rendezvous), BOOT_TAG + 2k + 1 (messages)
TIMEOUT_S = 20.0                 # the longest wait before the fake calls it a deadlock


def memory(ptr: int, count: int, datatype: int) -> np.ndarray:
    """The ``count`` elements of NCCL ``datatype`` at address ``ptr``, writable in place."""
    dtype = np.dtype(TYPES[datatype])
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr))
    return raw.view(dtype)


class NcclError(RuntimeError):
    """``cupy.cuda.nccl.NcclError``."""


class FakeNccl(types.ModuleType):
    """``cupy.cuda.nccl`` on MPI (see the module docstring)."""

    available = True
    NcclError = NcclError
    NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3
    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8

    def __init__(self, gpus: FakeGPUs):
        super().__init__("cupy.cuda.nccl")
        self.gpus = gpus
        self.world = MPI.COMM_WORLD.Dup()          # the fake's own traffic, apart from autopar's (collective)
        self.made: list[tuple[int, ...]] = []     # ids this process made
        self.joined: list[dict] = []              # one per communicator this process joined
        self.calls: list[tuple] = []              # (call, count, datatype) of every collective or message
        self.on_stream: list[tuple[str, int]] = []   # (call, the handle of the stream it was queued on)
        self.aborted: list[list[int]] = []        # the world ranks of each communicator aborted
        self.group: list | None = None            # requests of the sends/receives inside groupStart/groupEnd
        self.NcclCommunicator = lambda ndev, uid, rank: FakeCommunicator(self, ndev, uid, rank)

    def get_unique_id(self) -> tuple[int, ...]:
        me, serial = self.world.Get_rank(), len(self.made)
        uid = np.random.default_rng([me, serial, os.getpid()]).integers(-128, 128, UNIQUE_ID_BYTES)
        uid[0], uid[1], uid[2] = me, serial % 128, serial // 128
        self.made.append(tuple(int(b) for b in uid))
        return self.made[-1]

    def tags(self, uid: tuple) -> tuple[int, int]:
        """The rendezvous and message tags of the communicator of ``uid`` (unique per id)."""
        k = (uid[1] + 128 * uid[2]) * self.world.Get_size() + uid[0]
        return BOOT_TAG + 2 * k, BOOT_TAG + 2 * k + 1

    def groupStart(self):  # noqa: N802 - CuPy's name
        assert self.group is None, "nested groupStart"
        self.group = []

    def groupEnd(self):  # noqa: N802 - CuPy's name
        requests, self.group = self.group, None
        MPI.Request.Waitall(requests)


class FakeCommunicator:
    """``NcclCommunicator(ndev, uid, rank)``: the members holding uid, over MPI."""

    def __init__(self, lib: FakeNccl, ndev: int, uid: tuple, rank: int):
        assert len(uid) == UNIQUE_ID_BYTES and 0 <= rank < ndev, (len(uid), rank, ndev)
        self._lib, self._rank, self._size = lib, rank, ndev
        self._boot_tag, self._p2p_tag = lib.tags(tuple(uid))
        lib.joined.append({"ndev": ndev, "uid": tuple(uid), "rank": rank,
                           "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "device": lib.gpus.current})
        members = self._rendezvous(tuple(uid))
        devices = [(host, device) for _, host, device in members]
        if len(set(devices)) != len(devices):
            raise RuntimeError(f"NCCL_ERROR_INVALID_USAGE: Duplicate GPU detected: members {members}")
        self._world_ranks = [w for w, _, _ in members]
        self._group_comm = None
        self._last = threading.Event()            # reached when this communicator's latest call has run
        self._last.set()
        self.aborted, self.async_error = False, ""

    @property
    def _mpi(self):
        """The MPI communicator of exactly the members, made at the first collective (all
        members issue their collectives in the same order)."""
        if self._group_comm is None:
            world = self._lib.world
            group = world.Get_group().Incl(self._world_ranks)
            self._group_comm = world.Create_group(group, tag=self._boot_tag)
            group.Free()
        return self._group_comm

    def _rendezvous(self, uid: tuple) -> list[tuple[int, str, int]]:
        """(world rank, host, device) of every member, in NCCL rank order."""
        world, root, tag = self._lib.world, uid[0], self._boot_tag
        mine = (world.Get_rank(), socket.gethostname(), self._lib.gpus.current)
        if self._rank != 0:
            world.send((uid, self._rank, mine), dest=root, tag=tag)
            return self._joined(root)
        assert root == world.Get_rank(), "member 0 must hold the id it made"
        members = [mine] + [None] * (self._size - 1)
        for _ in range(self._size - 1):
            their_uid, rank, theirs = self._joined(MPI.ANY_SOURCE)
            assert their_uid == uid and members[rank] is None, (rank, members)
            members[rank] = theirs
        for world_rank, _, _ in members[1:]:
            world.send(members, dest=world_rank, tag=tag)
        return members

    def _joined(self, source: int):
        """The next rendezvous message from ``source``, within the fake's timeout (ncclCommInitRank
        waits for every member: a member that never comes is a deadlock, raised, not hung)."""
        world, tag, timeout_s = self._lib.world, self._boot_tag, self._lib.gpus.timeout_s
        deadline = time.monotonic() + timeout_s
        while not world.Iprobe(source=source, tag=tag):
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake NCCL: ncclCommInitRank: a member of {self._size} did not join in "
                                   f"{timeout_s} s (a deadlock)")
            time.sleep(1e-3)
        return world.recv(source=source, tag=tag)

    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def device_id(self) -> int:
        return self._lib.joined[-1]["device"]

    def _log(self, call: str, count: int, datatype: int, stream: int) -> None:
        self._lib.calls.append((call, count, datatype))
        self._lib.on_stream.append((call, stream))
        if self.aborted:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: a call on an aborted communicator")

    def allReduce(self, send, recv, count, datatype, op, stream):  # noqa: N802 - CuPy's names
        self._log("allReduce", count, datatype, stream)
        ops = {0: MPI.SUM, 1: MPI.PROD, 2: MPI.MAX, 3: MPI.MIN}
        self._collective(lambda: self._mpi.Iallreduce(memory(send, count, datatype), memory(recv, count, datatype),
                                                      op=ops[op]), stream, "allReduce")

    def reduceScatter(self, send, recv, count, datatype, op, stream):  # noqa: N802
        self._log("reduceScatter", count, datatype, stream)
        ops = {0: MPI.SUM, 2: MPI.MAX, 3: MPI.MIN}
        self._collective(lambda: self._mpi.Ireduce_scatter_block(memory(send, count * self._size, datatype),
                                                                 memory(recv, count, datatype), op=ops[op]),
                         stream, "reduceScatter")

    def allGather(self, send, recv, count, datatype, stream):  # noqa: N802
        self._log("allGather", count, datatype, stream)
        self._collective(lambda: self._mpi.Iallgather(memory(send, count, datatype),
                                                      memory(recv, count * self._size, datatype)), stream, "allGather")

    def broadcast(self, send, recv, count, datatype, root, stream):
        self._log("broadcast", count, datatype, stream)

        def start():
            buf = memory(recv, count, datatype)
            if self._rank == root and send != recv:
                buf[...] = memory(send, count, datatype)
            return self._mpi.Ibcast(buf, root=root)
        self._collective(start, stream, "broadcast")

    def send(self, buf, count, datatype, peer, stream):
        self._log("send", count, datatype, stream)
        data, dest = memory(buf, count, datatype), self._world_ranks[peer]
        self._p2p(lambda: self._lib.world.Isend(data, dest=dest, tag=self._p2p_tag), stream,
                  f"send to NCCL rank {peer}")

    def recv(self, buf, count, datatype, peer, stream):
        self._log("recv", count, datatype, stream)
        data, source = memory(buf, count, datatype), self._world_ranks[peer]
        self._p2p(lambda: self._lib.world.Irecv(data, source=source, tag=self._p2p_tag), stream,
                  f"recv from NCCL rank {peer}")

    def _p2p(self, start, stream: int, what: str) -> None:
        """Inside groupStart/groupEnd: started now, completed at groupEnd (alltoall). Else on
        ``stream`` in its turn (see _in_order); on the current stream it blocks the host until
        it is matched."""
        if self._lib.group is not None:
            self._lib.group.append(start())
            return
        self._in_order(lambda: _complete(start(), self._lib.gpus.timeout_s, what), stream, what)

    def _collective(self, start, stream: int, what: str) -> None:
        """An MPI collective among the members, started when its turn comes and polled (a
        member that never joins times out instead of hanging; a collective cannot be cancelled)."""
        self._in_order(lambda: _complete(start(), self._lib.gpus.timeout_s, f"{what} of {self._size} members",
                                         cancel=False), stream, what)

    def _in_order(self, run, stream: int, what: str) -> None:
        """Run ``run`` once this communicator's previous call has run, whatever stream each was
        queued on -- NCCL orders one communicator's calls by events itself -- on ``stream``: a
        stream's thread in its turn, or the current stream (handle 0) now, the host waiting."""
        before, mine, timeout_s = self._last, threading.Event(), self._lib.gpus.timeout_s
        self._last = mine

        def op():
            if not before.wait(timeout_s):
                raise TimeoutError(f"fake NCCL: {what} waited {timeout_s} s for the communicator's previous call "
                                   "(a deadlock)")
            run()
            mine.set()
        if stream == _Stream.ptr:
            op()
        else:
            self._lib.gpus.streams[stream].launch(op)

    def check_async_error(self):
        """CuPy's ncclCommGetAsyncError: raises the error a test set (``async_error``)."""
        if self.async_error:
            raise NcclError(self.async_error)

    def abort(self):
        """ncclCommAbort: later calls fail. A collective already started keeps waiting for its
        members in MPI (an MPI collective cannot be cancelled: a test lets the missing member
        join it late), where NCCL's kernels would return."""
        self._lib.aborted.append(self._world_ranks)
        self.aborted = True


def _complete(request, timeout_s: float, what: str, cancel: bool = True) -> None:
    """Poll ``request`` until it completes; past ``timeout_s`` (cancel it and) raise."""
    deadline, pause = time.monotonic() + timeout_s, 1e-5
    while not request.Test():
        if time.monotonic() > deadline:
            if cancel:
                request.Cancel()
            raise TimeoutError(f"fake NCCL: {what} not matched in {timeout_s} s (a deadlock)")
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


class _Event:
    """``cupy.cuda.Event``: reached when the stream it was recorded on gets there (an event
    never recorded counts as reached, as CUDA's)."""

    def __init__(self, gpus: FakeGPUs, **_):
        self._gpus, self._reached = gpus, threading.Event()
        self._reached.set()

    def record(self, stream=None):
        stream = self._gpus.get_current_stream() if stream is None else stream
        self._reached.clear()
        stream.launch(self._reached.set)

    @property
    def done(self) -> bool:
        return self._reached.is_set()

    def synchronize(self):
        if not self._reached.wait(self._gpus.timeout_s):
            raise TimeoutError(f"fake GPU: an event not reached in {self._gpus.timeout_s} s (a deadlock)")


class Gate(_Event):
    """An event a test reaches itself (:meth:`open`): a stream made to wait for it is held
    until then."""

    def __init__(self, gpus: FakeGPUs):
        super().__init__(gpus)
        self._reached.clear()

    def open(self):
        self._reached.set()


class _Stream:
    """The current stream: synchronous, what is queued runs now on the calling thread."""

    ptr = 0

    def __init__(self, gpus: FakeGPUs):
        self._gpus = gpus

    def launch(self, op):
        op()

    def wait_event(self, event: _Event):
        event.synchronize()               # the host is this stream: it waits

    def synchronize(self):
        self._gpus.synchronized += 1


class _ThreadStream:
    """``cupy.cuda.Stream()``: a thread running its operations in order, after the host
    queued them; an operation that fails (a deadlock's timeout) stops it for good."""

    def __init__(self, gpus: FakeGPUs, **_):
        self._gpus, self.ptr = gpus, next(gpus.handles)
        gpus.streams[self.ptr] = self
        self.failure: BaseException | None = None
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True, name=f"fake-stream-{self.ptr}").start()

    def launch(self, op):
        self._ops.put(op)

    def wait_event(self, event: _Event):
        self.launch(event.synchronize)

    def synchronize(self):
        marker = _Event(self._gpus)
        marker.record(self)
        marker.synchronize()

    def _run(self):
        while True:
            op = self._ops.get()
            if self.failure is None:
                try:
                    op()
                except BaseException as err:
                    self.failure = err


class FakeGPUs(types.SimpleNamespace):
    """``cupy.cuda`` of a host with ``count`` GPUs: which one this process uses, its streams
    and events, and NCCL (``.nccl``)."""

    def __init__(self, count: int, timeout_s: float = TIMEOUT_S):
        super().__init__(current=0, synchronized=0, timeout_s=timeout_s, streams={}, handles=itertools.count(1))
        self.runtime = types.SimpleNamespace(getDeviceCount=lambda: count)
        self.nccl = FakeNccl(self)

    def Device(self, index: int = 0):  # noqa: N802 - CuPy's name
        return types.SimpleNamespace(use=lambda: setattr(self, "current", index))

    def get_current_stream(self):
        return _Stream(self)

    def Stream(self, non_blocking: bool = False, **_):  # noqa: N802 - CuPy's name
        assert non_blocking, "a channel's stream must not be ordered against the legacy default stream"
        return _ThreadStream(self)

    def Event(self, **kwargs):  # noqa: N802 - CuPy's name
        return _Event(self, **kwargs)

    def gate(self) -> Gate:
        """Not CuPy's: an event the test reaches (``gate.open()``), to hold a stream."""
        return Gate(self)


def device_pointer(a) -> types.SimpleNamespace:
    """What the stand-in array's ``.data`` gives: ``.ptr``, the address of its first element."""
    return types.SimpleNamespace(ptr=a._a.__array_interface__["data"][0])

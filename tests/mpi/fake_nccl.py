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

Rendezvous: a unique id names the world rank that made it (byte 0) and a serial (byte 1);
members send (id, NCCL rank, world rank, device) to that root, which answers with the
member list; the members then make an MPI communicator of exactly themselves
(``Create_group``, collective over the group only), as NCCL's bootstrap would. Two members
on one host using one GPU fail, as NCCL does ("Duplicate GPU detected").
"""
from __future__ import annotations

import ctypes
import os
import socket
import types

import numpy as np
from mpi4py import MPI

UNIQUE_ID_BYTES = 128
TYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64, 6: np.float16,
         7: np.float32, 8: np.float64}
BOOT_TAG, P2P_TAG = 31001, 31002


def memory(ptr: int, count: int, datatype: int) -> np.ndarray:
    """The ``count`` elements of NCCL ``datatype`` at address ``ptr``, writable in place."""
    dtype = np.dtype(TYPES[datatype])
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr))
    return raw.view(dtype)


class FakeNccl(types.ModuleType):
    """``cupy.cuda.nccl`` on MPI (see the module docstring)."""

    available = True
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
        self.group: list | None = None            # requests of the sends/receives inside groupStart/groupEnd
        self.NcclCommunicator = lambda ndev, uid, rank: FakeCommunicator(self, ndev, uid, rank)

    def get_unique_id(self) -> tuple[int, ...]:
        me = self.world.Get_rank()
        uid = np.random.default_rng([me, len(self.made), os.getpid()]).integers(-128, 128, UNIQUE_ID_BYTES)
        uid[0], uid[1] = me, len(self.made)
        self.made.append(tuple(int(b) for b in uid))
        return self.made[-1]

    def groupStart(self):  # noqa: N802 - CuPy's name
        assert self.group is None, "nested groupStart"
        self.group = []

    def groupEnd(self):  # noqa: N802 - CuPy's name
        requests, self.group = self.group, None
        MPI.Request.Waitall(requests)


class FakeCommunicator:
    """``NcclCommunicator(ndev, uid, rank)``: an MPI communicator of the members holding uid."""

    def __init__(self, lib: FakeNccl, ndev: int, uid: tuple, rank: int):
        assert len(uid) == UNIQUE_ID_BYTES and 0 <= rank < ndev, (len(uid), rank, ndev)
        self._lib, self._rank, self._size = lib, rank, ndev
        lib.joined.append({"ndev": ndev, "uid": tuple(uid), "rank": rank,
                           "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "device": lib.gpus.current})
        members = self._rendezvous(tuple(uid))
        devices = [(host, device) for _, host, device in members]
        if len(set(devices)) != len(devices):
            raise RuntimeError(f"NCCL_ERROR_INVALID_USAGE: Duplicate GPU detected: members {members}")
        world = lib.world
        group = world.Get_group().Incl([w for w, _, _ in members])
        self._mpi = world.Create_group(group, tag=BOOT_TAG)
        group.Free()

    def _rendezvous(self, uid: tuple) -> list[tuple[int, str, int]]:
        """(world rank, host, device) of every member, in NCCL rank order."""
        world, root = self._lib.world, uid[0]
        mine = (world.Get_rank(), socket.gethostname(), self._lib.gpus.current)
        if self._rank != 0:
            world.send((uid, self._rank, mine), dest=root, tag=BOOT_TAG)
            return world.recv(source=root, tag=BOOT_TAG)
        assert root == world.Get_rank(), "member 0 must hold the id it made"
        members = [mine] + [None] * (self._size - 1)
        for _ in range(self._size - 1):
            their_uid, rank, theirs = world.recv(source=MPI.ANY_SOURCE, tag=BOOT_TAG)
            assert their_uid == uid and members[rank] is None, (rank, members)
            members[rank] = theirs
        for world_rank, _, _ in members[1:]:
            world.send(members, dest=world_rank, tag=BOOT_TAG)
        return members

    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def device_id(self) -> int:
        return self._lib.joined[-1]["device"]

    def _log(self, call: str, count: int, datatype: int) -> None:
        self._lib.calls.append((call, count, datatype))

    def allReduce(self, send, recv, count, datatype, op, stream):  # noqa: N802 - CuPy's names
        self._log("allReduce", count, datatype)
        ops = {0: MPI.SUM, 1: MPI.PROD, 2: MPI.MAX, 3: MPI.MIN}
        self._mpi.Allreduce(memory(send, count, datatype), memory(recv, count, datatype), op=ops[op])

    def reduceScatter(self, send, recv, count, datatype, op, stream):  # noqa: N802
        self._log("reduceScatter", count, datatype)
        ops = {0: MPI.SUM, 2: MPI.MAX, 3: MPI.MIN}
        self._mpi.Reduce_scatter_block(memory(send, count * self._size, datatype), memory(recv, count, datatype),
                                       op=ops[op])

    def allGather(self, send, recv, count, datatype, stream):  # noqa: N802
        self._log("allGather", count, datatype)
        self._mpi.Allgather(memory(send, count, datatype), memory(recv, count * self._size, datatype))

    def broadcast(self, send, recv, count, datatype, root, stream):
        self._log("broadcast", count, datatype)
        buf = memory(recv, count, datatype)
        if self._rank == root and send != recv:
            buf[...] = memory(send, count, datatype)
        self._mpi.Bcast(buf, root=root)

    def send(self, buf, count, datatype, peer, stream):
        self._log("send", count, datatype)
        assert self._lib.group is not None, "autopar issues NCCL messages inside a group only (alltoall)"
        self._lib.group.append(self._mpi.Isend(memory(buf, count, datatype), dest=peer, tag=P2P_TAG))

    def recv(self, buf, count, datatype, peer, stream):
        self._log("recv", count, datatype)
        assert self._lib.group is not None, "autopar issues NCCL messages inside a group only (alltoall)"
        self._lib.group.append(self._mpi.Irecv(memory(buf, count, datatype), source=peer, tag=P2P_TAG))


class _Stream:
    ptr = 0

    def __init__(self, gpus: FakeGPUs):
        self._gpus = gpus

    def synchronize(self):
        self._gpus.synchronized += 1


class FakeGPUs(types.SimpleNamespace):
    """``cupy.cuda`` of a host with ``count`` GPUs: which one this process uses, its stream,
    and NCCL (``.nccl``)."""

    def __init__(self, count: int):
        super().__init__(current=0, synchronized=0)
        self.runtime = types.SimpleNamespace(getDeviceCount=lambda: count)
        self.nccl = FakeNccl(self)

    def Device(self, index: int = 0):  # noqa: N802 - CuPy's name
        return types.SimpleNamespace(use=lambda: setattr(self, "current", index))

    def get_current_stream(self):
        return _Stream(self)


def device_pointer(a) -> types.SimpleNamespace:
    """What the stand-in array's ``.data`` gives: ``.ptr``, the address of its first element."""
    return types.SimpleNamespace(ptr=a._a.__array_interface__["data"][0])

"""NCCL messages for pipelines: one channel per (peer, direction, tag), each a 2-member NCCL
communicator, a CUDA stream and a host thread of its own, ordered against the compute
stream by CUDA events.

Why not the compute stream. An NCCL receive blocks the stream it is queued on until the
matching send runs. The pipeline runner posts receives early (runtime/pipeline/runner.py), so
on the compute stream a receive posted for a later clock would hold every kernel and send
queued after it, and 1F1B deadlocks (comm/nccl.py, "Messages"). On a stream of its own, a
waiting receive holds nothing but the messages queued behind it on that channel.

What each message does, in stream order::

    isend(x, dest, tag)                          irecv(shape, dtype, source, tag)
    compute: x made contiguous, record READY     compute: out allocated, record POSTED
    channel: wait READY, ncclSend, record DONE   channel: wait POSTED, ncclRecv(out), record DONE
    wait(): compute waits for DONE, x held       wait(): compute waits for DONE, returns out
    test(): DONE reached                         test(): DONE reached

READY orders the send after the kernels that make ``x``; POSTED orders the receive after
whatever last used the memory CuPy's pool hands ``out`` (memory freed on the compute stream
is reused there at once, in stream order; the channel's stream is not in that order). Neither
wait blocks the host: the compute stream waits on the GPU. ``send`` / ``recv`` are
``isend(...).wait()`` / ``irecv(...).wait()``. Host (numpy) arrays are copied to this GPU
and sent the same way, and every receive returns a device array: a receiver cannot know how
the sender held its array, so both sides must use one transport.

Why a channel per tag. NCCL has no tags: messages on one communicator match in the order they
were issued. MPI matches per (source, tag): a receive posted for tag 2 is not taken by an
earlier-sent tag-1 message. One communicator per (sender, receiver, tag) keeps that rule
exactly -- messages of one tag in issue order, those of different tags independent -- so no
program correct over MPI can pair the wrong messages here (recording tag orders and raising
on a mismatch could only detect it, at run time, on the side that gets it wrong). The cost:
a pipeline uses 2 tags (activations, gradients), so a stage pair holds at most 4
communicators (interleaved, both directions carry both kinds), each with NCCL's buffers.

Sizes. A receive of another size than the send is undefined in NCCL (it hangs or corrupts),
where MPI raises. In debug mode (CommChecks.debug) the two channel threads first swap each
message's (bytes, shape, dtype) over MPI; on a mismatch both skip the NCCL call (the channel
stays in step) and the waits on both members raise ValueError naming both ranks, the tag and
both sizes (a send then waits for its receive to be posted). Off, nothing is checked: the
sizes are the caller's promise, as NCCL's are.

Making a channel, on first use, between its two members only. The sender makes the NCCL unique
id and sends it to the receiver over a duplicate of the host MPI communicator (made when the
NCCL communicator is, collectively), with the message's tag; both then call
ncclCommInitRank (sender NCCL rank 0, receiver 1). That call blocks until both members have
joined, so it runs on the channel's own host thread, never on the caller's: ``isend`` and
``irecv`` only queue the message to that thread and return, as MPI's do, whatever the two
members do first (A sends to B while B first sends to A on another channel, or a ring of
ranks each sending first to the next: wrap-around virtual stages). The thread makes the
communicator, then issues the channel's messages in the order they were queued (the NCCL
calls are asynchronous: it never waits for the GPU). A ``wait()`` waits on the host only
until the thread has issued the message: at first use of a channel, until the other member
has posted its side. The host MPI must run with MPI_THREAD_MULTIPLE (mpi4py's default; MPICH
and Open MPI provide it): the ids travel from these threads.

Caveats NCCL documents, not yet seen on a GPU here: kernels of several communicators on one
GPU progress concurrently only while they fit on the device together (a channel's waiting
receive occupies its blocks until the send arrives), and a device-wide synchronisation
(``cudaFree`` when CuPy's pool returns memory, ``cudaDeviceSynchronize``) waits for a pending
receive too, so one issued while a receive waits for a send this host has yet to queue would
never return.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from ..backend import on_host
from ..backend.nccl_lib import UNIQUE_ID_BYTES, NcclLib
from ..errors import format_error
from .base import Request
from .mpi import MPICommunicator, _mpi

SEND, RECV = "send", "recv"
SENDER, RECEIVER = 0, 1          # NCCL ranks in a channel's communicator


@dataclass(eq=False)
class _Message:
    """One message queued to a channel: its buffer (held until the wait), byte count, the
    compute-stream event it comes after, and the event its NCCL call reaches when done."""

    call: str                    # SEND or RECV
    buf: object                  # device array, C-contiguous
    nbytes: int
    shape: tuple[int, ...]       # as the caller gave it (named by the debug mode's errors)
    dtype: str
    after: object                # READY or POSTED, recorded on the compute stream
    done: object                 # DONE, recorded on the channel's stream
    issued: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def issue(self, lib: NcclLib, comm, stream) -> None:
        lib.wait_event(self.after, stream)
        if self.nbytes:          # both members skip an empty message: both know its size
            peer = RECEIVER if self.call == SEND else SENDER
            getattr(comm, self.call)(lib.pointer(self.buf), self.nbytes, lib.bytes_type, peer,
                                     lib.stream_handle(stream))
        lib.record_event(self.done, stream)


class _Channel:
    """The messages of one (sender, receiver, tag): a stream, and a host thread that makes the
    2-member NCCL communicator and then issues the queued messages in order."""

    def __init__(self, lib: NcclLib, boot, back, device: int, call: str, peer: int, tag: int, where: str,
                 peer_rank: int):
        self.stream = lib.new_stream()
        self._lib, self._boot, self._back, self._device = lib, boot, back, device
        self._call, self._peer, self._tag = call, peer, tag
        self._where, self._peer_rank = where, peer_rank    # for errors: this side, the peer's world rank
        self._queue: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True, name=f"autopar-nccl-{call}-{peer}-tag{tag}").start()

    def post(self, message: _Message) -> None:
        self._queue.put(message)

    def _serve(self) -> None:
        failure = None
        try:
            self._lib.use_device(self._device)        # the current device is per host thread
            comm = self._connect()
        except BaseException as err:                  # reported by every message's wait
            failure = err
        while True:
            message = self._queue.get()
            mismatch = None
            if failure is None:
                try:
                    mismatch = None if self._back is None else self._agree(message)
                    if mismatch is None:
                        message.issue(self._lib, comm, self.stream)
                except BaseException as err:          # later messages cannot keep their order: fail them too
                    failure = err
            message.error = failure or mismatch
            message.issued.set()

    def _agree(self, message: _Message) -> ValueError | None:
        """Debug mode: swap (bytes, shape, dtype) with the peer's side of this message (the
        sender's travel on ``boot``, the receiver's on ``back``); a ValueError if they differ."""
        mine = (message.nbytes, message.shape, message.dtype)
        if self._call == SEND:
            self._boot.send(mine, dest=self._peer, tag=self._tag)
            theirs = self._back.recv(source=self._peer, tag=self._tag)
        else:
            theirs = self._boot.recv(source=self._peer, tag=self._tag)
            self._back.send(mine, dest=self._peer, tag=self._tag)
        if theirs[0] == mine[0]:
            return None
        other = "receives" if self._call == SEND else "sends"
        return ValueError(format_error(self._where, "message", f"{mine[0]} bytes ({mine[1]}, {mine[2]}), the "
                                       f"size world rank {self._peer_rank} {other} on tag {self._tag}",
                                       f"{theirs[0]} bytes ({theirs[1]}, {theirs[2]}) there; neither was "
                                       "transferred", "send and receive the same shape and dtype"))

    def _connect(self):
        """The channel's NCCL communicator: the sender's id, sent over the host MPI."""
        uid = np.zeros(UNIQUE_ID_BYTES, np.int16)     # C chars: signed or not (see nccl.py's _connect)
        if self._call == SEND:
            uid[:] = self._lib.unique_id()
            self._boot.Send(uid, dest=self._peer, tag=self._tag)
        else:
            self._boot.Recv(uid, source=self._peer, tag=self._tag)
        return self._lib.communicator(2, tuple(int(b) for b in uid), SENDER if self._call == SEND else RECEIVER)


class _MessageRequest(Request):
    """A message's request: ``test`` asks whether DONE is reached; ``wait`` makes the
    compute stream wait for it (the host waits only for the channel's thread to issue it)."""

    def __init__(self, lib: NcclLib, message: _Message, result, timeout_s: float | None, where: str, what: str):
        self._lib, self._message, self._result = lib, message, result
        self._timeout_s, self._where, self._what = timeout_s, where, what

    def test(self) -> bool:
        m = self._message
        if not m.issued.is_set():
            return False
        if m.error is not None:
            raise m.error
        return self._lib.event_done(m.done)

    def wait(self):
        m = self._message
        if not m.issued.wait(self._timeout_s):
            raise TimeoutError(format_error(self._where, "message", f"the {self._what} issued within "
                                            f"{self._timeout_s} s (the channel's NCCL communicator made)",
                                            "the other member never posted its side of the channel",
                                            "check that both members send and receive the same messages "
                                            "(peer and tag)"))
        if m.error is not None:
            raise m.error
        self._lib.wait_event(m.done)                  # the compute stream waits, on the GPU
        return self._result()


class Channels:
    """This member's message channels, made on first use (see the module docstring).
    Collective over ``host`` (it duplicates the MPI communicator the ids travel on)."""

    def __init__(self, lib: NcclLib, host: MPICommunicator, device: int, owner: str = "NCCLCommunicator"):
        self._lib, self._host, self._device, self._owner = lib, host, device, owner
        self._boot = host.mpi_comm.Dup()                                  # ids; debug: the senders' sizes
        self._back = host.mpi_comm.Dup() if host.checks.debug else None   # debug: the receivers' sizes
        self._open: dict[tuple[str, int, int], _Channel] = {}

    def isend(self, x, dest: int, tag: int) -> Request:
        xp = self._lib.xp
        buf = xp.ascontiguousarray(xp.asarray(x) if on_host(x) else x)
        message = self._queue(SEND, dest, tag, buf, tuple(x.shape), x.dtype)
        return self._request(message, lambda: None, "isend", f"send to member {dest} (tag {tag})")

    def irecv(self, shape: tuple[int, ...], dtype: np.dtype, source: int, tag: int) -> Request:
        out = self._lib.xp.empty(shape, dtype)
        message = self._queue(RECV, source, tag, out, tuple(shape), dtype)
        return self._request(message, lambda: out, "irecv", f"receive from member {source} (tag {tag})")

    def _queue(self, call: str, peer: int, tag: int, buf, shape: tuple[int, ...], dtype) -> _Message:
        lib = self._lib
        after, done = lib.new_event(), lib.new_event()
        lib.record_event(after)                       # READY / POSTED, on the compute stream
        message = _Message(call, buf, int(buf.nbytes), shape, str(np.dtype(dtype)), after, done)
        self._channel(call, peer, tag).post(message)
        return message

    def _channel(self, call: str, peer: int, tag: int) -> _Channel:
        key = (call, peer, tag)
        channel = self._open.get(key)
        if channel is None:
            self._check_threads(call)
            channel = self._open[key] = _Channel(self._lib, self._boot, self._back, self._device, call, peer, tag,
                                                 self._where(call), self._host.ranks[peer])
        return channel

    def _request(self, message: _Message, result, method: str, what: str) -> Request:
        return _MessageRequest(self._lib, message, result, self._host.checks.watchdog_s, self._where(method), what)

    def _where(self, method: str) -> str:
        return f"{self._owner}.{method} (rank {self._host.rank} of {list(self._host.ranks)})"

    def _check_threads(self, call: str) -> None:
        MPI = _mpi()
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(format_error(self._where(call), "MPI thread support", "MPI_THREAD_MULTIPLE (a "
                                            "channel's NCCL id travels over MPI from its own thread)",
                                            f"level {MPI.Query_thread()}",
                                            "leave mpi4py.rc.thread_level at 'multiple' (its default) and use an "
                                            "MPI built with thread support, or set AUTOPAR_COMM=mpi"))

"""N virtual ranks as threads of one process, behind the Communicator interface.

``run_in_process(n, fn, *args)`` runs ``fn(comm, *args)`` on n threads, ``comm`` being that
virtual rank's world communicator, and returns the results in rank order. numpy releases the
GIL in its kernels, so big arrays really are processed in parallel.

Rendezvous. Every group (a tuple of world ranks, in member order) has one ``_Rendezvous``: a
``threading.Barrier`` over its members and one slot per member. A collective is

    1. deposit  member i puts (kind, arguments, input) in slot i      (no copy: inputs are read only)
    2. wait     every member has deposited
    3. check    all slots name the same call, else CollectiveMismatchError on every member
    4. compute  member i builds its own new result from all the slots (reading only)
    5. wait     nobody still reads, so inputs may change and slots be reused

Non-blocking collectives (``iallreduce``, ``ireduce_scatter``) never wait at the start: member i deposits its input
in the group's k-th non-blocking entry (k: how many it started on this group before) and goes
on; ``wait()`` waits until every member has deposited, builds member i's result from all the
inputs in member order (the same sums, in the same order, as ``allreduce``), and the last
member to read the entry removes it. Those waits are watched for deadlock like the others.

Point-to-point messages go through mailboxes keyed by (group, source, dest, tag): a send
(``isend``) deposits its message, a receive (``irecv``) posts itself, and the two queues pair
oldest with oldest, so messages match in the order both sides started them, whatever order
the requests are waited in. A send's wait (``send`` waits at once) lasts until the receiver
has copied the message (MPI's synchronous mode), so an order of sends and receives that
works here cannot deadlock under MPI, whatever its buffering.

Failure. An exception on a rank's thread marks the run failed, aborts every barrier and wakes
every mailbox waiter: the other ranks raise RankAborted from the communication they are in
(or their next one). ``run_in_process`` re-raises the first original exception, its message
prefixed with ``[rank r of n]``.

Deadlock. While it waits, the calling thread watches: when every unfinished rank has sat for
STALL_S seconds in the same wait that nothing can satisfy any more (a barrier whose generation
has not moved, an empty mailbox, a message nobody took), it aborts the run with DeadlockError
saying where each rank waits. A run longer than ``timeout`` seconds raises TimeoutError.
With ``checks=CommChecks(watchdog_s=T)``, a rank that has waited T seconds in one communication
aborts the run with CollectiveTimeoutError naming the members missing from it (the MPI
watchdog's message); with ``debug=True`` the members compare fingerprints first (see checks).
"""
from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import check_int, format_error
from .base import CommStats, Communicator, Request, block_index, reduction_dtype
from .checks import (
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CommChecks,
    describe,
    timeout_report,
)

POLL_S = 0.05  # how often the calling thread looks for a deadlock
STALL_S = 0.5  # how long every rank must sit in the same unsatisfiable wait to call it a deadlock
GRACE_S = 2.0  # how long, after an abort, the calling thread waits for the rank threads to end
_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class RankAborted(RuntimeError):
    """Raised on a rank whose communication was cut short because the run was aborted."""


class DeadlockError(RuntimeError):
    """Every unfinished rank waits for a communication that can no longer happen."""


@dataclass(frozen=True)
class _Wait:
    """Where a rank is blocked, since when, whether that wait is still unsatisfied, and the
    world ranks whose arrival it waits for (a collective: those not in a wait with the same
    ``token``, the rendezvous and its generation; a message: the peer)."""

    what: str
    stuck: Callable[[], bool]
    since: float
    peers: tuple[int, ...]
    token: tuple | None = None
    doing: str = ""          # what the rank last started (CommStats.doing)


class _Message:
    def __init__(self, buf: np.ndarray):
        self.buf = buf
        self.taken = False


class _Receive:
    """A posted receive; ``msg`` is the message matched to it (in posting order)."""

    def __init__(self):
        self.msg: _Message | None = None


def _match(u, key: tuple) -> None:
    """Pair the key's unmatched messages with its posted receives, oldest with oldest (MPI's
    non-overtaking order). The caller holds ``u.p2p``."""
    box, posted = u.mailboxes.get(key), u.posted.get(key)
    while box and posted:
        posted.popleft().msg = box.popleft()


class _Started:
    """One non-blocking collective of a group: each member's (kind, signature, input)."""

    def __init__(self, n: int):
        self.slots: list = [None] * n
        self.reads = 0


class _Rendezvous:
    """Barrier and slots of one group of world ranks; its non-blocking collectives in flight."""

    def __init__(self, ranks: tuple[int, ...]):
        self.ranks = ranks
        self.slots: list = [None] * len(ranks)
        self.started = [0] * len(ranks)              # non-blocking collectives each member started
        self.in_flight: dict[int, _Started] = {}     # k -> the group's k-th one (guarded by p2p)
        self.generation = 0  # completed barrier rounds; advanced by the last member to arrive
        self.barrier = threading.Barrier(len(ranks), action=self._advance)

    def _advance(self) -> None:
        self.generation += 1


class _Universe:
    """Everything the n rank threads of one run share."""

    def __init__(self, n: int, watchdog_s: float | None = None):
        self.n, self.watchdog_s = n, watchdog_s
        self.lock = threading.Lock()
        self.groups: dict[tuple[int, ...], _Rendezvous] = {}
        self.p2p = threading.Condition()  # guards mailboxes and Message.taken
        self.mailboxes: dict[tuple, deque[_Message]] = {}   # (group, src, dst, tag) -> sent, unmatched
        self.posted: dict[tuple, deque[_Receive]] = {}      # (group, src, dst, tag) -> receives, unmatched
        self.waits: list[_Wait | None] = [None] * n  # written by rank r's thread only
        self.finished = [False] * n
        self.failure: tuple[int | None, BaseException] | None = None
        self.aborted = False
        self.wake = threading.Event()  # set when a rank fails or the last one finishes

    def rendezvous(self, ranks: tuple[int, ...]) -> _Rendezvous:
        with self.lock:
            rv = self.groups.get(ranks)
            if rv is None:
                rv = self.groups[ranks] = _Rendezvous(ranks)
                if self.aborted:
                    rv.barrier.abort()
            return rv

    def abort(self, rank: int | None, exc: BaseException) -> None:
        """Record the first failure (rank None: the run itself) and stop every wait."""
        with self.lock:
            if self.failure is None:
                self.failure = (rank, exc)
            self.aborted = True
            for rv in self.groups.values():
                rv.barrier.abort()
        with self.p2p:
            self.p2p.notify_all()
        self.wake.set()

    def done(self, rank: int) -> None:
        with self.lock:
            self.finished[rank] = True
            if all(self.finished):
                self.wake.set()

    def stalled(self) -> tuple[_Wait | None, ...] | None:
        """Every rank's wait (None when finished) if each unfinished rank is stuck, else None."""
        waits = tuple(None if self.finished[r] else self.waits[r] for r in range(self.n))
        live = [w for r, w in enumerate(waits) if not self.finished[r]]
        if live and all(w is not None and w.stuck() for w in live):
            return waits
        return None

    def state(self, r: int) -> str:
        w = self.waits[r]
        return "finished" if self.finished[r] else (f"waits in {w.what}" if w else "running")

    def describe_waits(self) -> str:
        return "; ".join(f"rank {r}: {self.state(r)}" for r in range(self.n))

    def overdue(self, now: float) -> str | None:
        """The watchdog's report on the first rank waiting longer than watchdog_s, if any."""
        for r in range(self.n):
            w = self.waits[r]
            if self.watchdog_s is None or w is None or now - w.since < self.watchdog_s or not w.stuck():
                continue
            arrived = sorted({r} | {m for m in w.peers if w.token is not None and self.waits[m] is not None
                                    and self.waits[m].token == w.token})
            missing = [f"rank {m} ({self.state(m)})" for m in w.peers if m not in arrived]
            return timeout_report("run_in_process", r, now - w.since, w.what, missing, arrived, w.doing)
        return None


class InProcessCommunicator(Communicator):
    """One virtual rank's view of one group; built by run_in_process and split."""

    def __init__(self, universe: _Universe, rv: _Rendezvous, rank: int, stats: CommStats,
                 checks: CommChecks | None = None):
        super().__init__(stats, checks)
        self._u, self._rv, self._rank = universe, rv, rank
        self._world_rank = rv.ranks[rank]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return len(self._rv.ranks)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._rv.ranks

    # ---- collectives -------------------------------------------------------------------

    def _allreduce(self, x, op):
        return self._collective("allreduce", _sig(x, op=op), x, functools.partial(_reduce, op=op, dtype=x.dtype))

    def _iallreduce(self, x, op, donate=False):     # the result is always a new array
        return self._start("allreduce", _sig(x, op=op), x, functools.partial(_reduce, op=op, dtype=x.dtype))

    def _ireduce_scatter(self, x, axis):
        index = block_index(x.ndim, axis, self._rank, x.shape[axis] // self.size)
        return self._start("reduce_scatter", _sig(x, axis=axis), x,
                           lambda bufs: _reduce([b[index] for b in bufs], "sum", x.dtype))

    def _iallgather(self, x, axis):
        return self._start("allgather", _sig(x, axis=axis), x, lambda bufs: np.concatenate(bufs, axis))

    def _start(self, kind: str, sig: tuple, x, compute) -> Request:
        """Deposit x in the group's next non-blocking entry; the request computes at its wait."""
        u, rv, i = self._u, self._rv, self._rank
        what = describe(*self._op, rv.ranks)
        with u.p2p:
            k = rv.started[i]
            rv.started[i] += 1
            entry = rv.in_flight.setdefault(k, _Started(self.size))
            entry.slots[i] = (kind, sig, x)
            u.p2p.notify_all()
        return _InProcessRequest(self, k, entry, what, compute)

    def _allgather(self, x, axis):
        return self._collective("allgather", _sig(x, axis=axis), x, lambda bufs: np.concatenate(bufs, axis))

    def _reduce_scatter(self, x, axis):
        index = block_index(x.ndim, axis, self._rank, x.shape[axis] // self.size)
        return self._collective("reduce_scatter", _sig(x, axis=axis), x,
                                lambda bufs: _reduce([b[index] for b in bufs], "sum", x.dtype))

    def _alltoall(self, x, split_axis, concat_axis):
        index = block_index(x.ndim, split_axis, self._rank, x.shape[split_axis] // self.size)
        return self._collective("alltoall", _sig(x, split_axis=split_axis, concat_axis=concat_axis), x,
                                lambda bufs: np.concatenate([b[index] for b in bufs], concat_axis))

    def _broadcast(self, x, root):
        return self._collective("broadcast", _sig(x, root=root), x, lambda bufs: bufs[root].copy())

    def _barrier(self):
        self._collective("barrier", (), None, lambda bufs: None)

    def _split(self, groups, index):
        self._collective("split", (("groups", groups),), None, lambda bufs: None)  # all agree on groups
        group = groups[index]
        rv = self._u.rendezvous(group)
        return InProcessCommunicator(self._u, rv, group.index(self._world_rank), self.stats, self.checks)

    def _collective(self, kind: str, sig: tuple, x, compute):
        rv, i = self._rv, self._rank
        rv.slots[i] = (kind, sig, x)
        self._wait_all(kind)
        error = result = None
        try:
            if any(s[:2] != (kind, sig) for s in rv.slots):
                raise CollectiveMismatchError(self._mismatch(rv.slots))
            result = compute([s[2] for s in rv.slots])
        except Exception as exc:  # noqa: BLE001 - re-raised after the second wait: no member is left behind
            error = exc
        self._wait_all(kind)
        rv.slots[i] = None
        if error is not None:
            raise error
        return result

    def _wait_all(self, kind: str) -> None:
        rv, u = self._rv, self._u
        generation = rv.generation  # cannot advance before this member arrives
        what = describe(*self._op, rv.ranks)   # the public collective (kind may be its debug exchange)
        u.waits[self._world_rank] = _Wait(what, lambda: rv.generation == generation, time.monotonic(),
                                          rv.ranks, (id(rv), generation), self.stats.doing)
        try:
            rv.barrier.wait()
        except threading.BrokenBarrierError:
            raise self._aborted(what) from None
        finally:
            u.waits[self._world_rank] = None

    def _mismatch(self, slots) -> str:
        calls = "; ".join(f"rank {r}: {kind}({', '.join(f'{k}={v}' for k, v in sig)})"
                          for r, (kind, sig, _) in zip(self.ranks, slots))
        return format_error(f"in-process group {self.ranks}", "collective calls", "the same call on every member",
                            calls, "make every member of a group call the same collectives in the same order")

    # ---- point to point ----------------------------------------------------------------

    def _send(self, x, dest, tag):
        self._isend(x, dest, tag).wait()

    def _recv(self, shape, dtype, source, tag):
        return self._irecv(shape, dtype, source, tag).wait()

    def _isend(self, x, dest, tag):
        u, msg = self._u, _Message(x)  # no copy: the request's wait lasts until the receiver has copied it
        key = (self.ranks, self._rank, dest, tag)
        with u.p2p:
            u.mailboxes.setdefault(key, deque()).append(msg)
            _match(u, key)
            u.p2p.notify_all()
        return _SendRequest(self, msg, f"send to member {dest} (tag {tag}) on group {self.ranks}", self.ranks[dest])

    def _irecv(self, shape, dtype, source, tag):
        u, receive = self._u, _Receive()
        key = (self.ranks, source, self._rank, tag)
        with u.p2p:
            u.posted.setdefault(key, deque()).append(receive)
            _match(u, key)
        return _RecvRequest(self, receive, shape, dtype, source, tag)

    def _block_until(self, ready: Callable[[], bool], what: str, peer: int | tuple[int, ...]) -> None:
        """Wait on the p2p condition (held by the caller) until ready() or the run aborts;
        ``peer``: the world rank(s) whose action would make it ready."""
        u = self._u
        peers = peer if isinstance(peer, tuple) else (peer,)
        u.waits[self._world_rank] = _Wait(what, lambda: not ready(), time.monotonic(), peers,
                                          doing=self.stats.doing)
        try:
            while not ready():
                if u.aborted:
                    raise self._aborted(what)
                u.p2p.wait()
        finally:
            u.waits[self._world_rank] = None

    def _aborted(self, what: str) -> RankAborted:
        return RankAborted(f"rank {self._world_rank}: {what} cut short because the run was aborted")


class _InProcessRequest(Request):
    """Member i's handle on the group's k-th non-blocking collective."""

    def __init__(self, comm: InProcessCommunicator, k: int, entry: _Started, what: str, compute: Callable):
        self._comm, self._k, self._entry, self._what, self._compute = comm, k, entry, what, compute

    def test(self) -> bool:
        with self._comm._u.p2p:
            return all(s is not None for s in self._entry.slots)

    def wait(self) -> np.ndarray:
        comm, entry = self._comm, self._entry
        u, rv, mine = comm._u, comm._rv, entry.slots[comm.rank]
        with u.p2p:
            missing = tuple(r for r, s in zip(rv.ranks, entry.slots) if s is None)
            comm._block_until(lambda: all(s is not None for s in entry.slots), self._what, missing)
        try:
            if any(s[:2] != mine[:2] for s in entry.slots):
                raise CollectiveMismatchError(comm._mismatch(entry.slots))
            return self._compute([s[2] for s in entry.slots])
        finally:
            with u.p2p:
                entry.reads += 1
                if entry.reads == len(entry.slots):
                    del rv.in_flight[self._k]


class _SendRequest(Request):
    """A message deposited in its mailbox; complete once the receiver has copied it."""

    def __init__(self, comm: InProcessCommunicator, msg: _Message, what: str, peer: int):
        self._comm, self._msg, self._what, self._peer = comm, msg, what, peer

    def test(self) -> bool:
        with self._comm._u.p2p:
            return self._msg.taken

    def wait(self) -> None:
        msg = self._msg
        with self._comm._u.p2p:
            self._comm._block_until(lambda: msg.taken, self._what, self._peer)


class _RecvRequest(Request):
    """A posted receive; its wait copies the matched message out and releases the sender."""

    def __init__(self, comm: InProcessCommunicator, receive: _Receive, shape, dtype, source: int, tag: int):
        self._comm, self._receive, self._shape, self._dtype = comm, receive, shape, dtype
        self._source, self._tag, self._result = source, tag, None

    def test(self) -> bool:
        with self._comm._u.p2p:
            return self._receive.msg is not None

    def wait(self) -> np.ndarray:
        if self._result is not None:
            return self._result
        comm, receive, source = self._comm, self._receive, self._source
        u = comm._u
        with u.p2p:
            comm._block_until(lambda: receive.msg is not None,
                              f"recv from member {source} (tag {self._tag}) on group {comm.ranks}", comm.ranks[source])
        msg = receive.msg
        try:
            if msg.buf.shape != self._shape or msg.buf.dtype != self._dtype:
                raise ValueError(format_error(comm._where("recv"), "shape, dtype", f"{self._shape}, {self._dtype}",
                                              f"a message of {msg.buf.shape}, {msg.buf.dtype} from member {source} "
                                              f"(tag {self._tag})",
                                              "receive with the shape and dtype the sender sends"))
            self._result = msg.buf.copy()
            return self._result
        finally:
            with u.p2p:
                msg.taken = True
                u.p2p.notify_all()


def _reduce(bufs: list, op: str, dtype) -> np.ndarray:
    """The members' buffers reduced in member order, in reduction_dtype(dtype) (base.py),
    rounded back to dtype once."""
    wide = reduction_dtype(dtype)
    out = bufs[0].astype(wide)   # a copy
    for b in bufs[1:]:
        _REDUCE[op](out, b.astype(wide, copy=False), out=out)
    return out.astype(dtype, copy=False)


def _sig(x: np.ndarray, **args) -> tuple:
    """What every member of a collective must agree on."""
    return tuple(args.items()) + (("shape", x.shape), ("dtype", x.dtype))


def run_in_process(n: int, fn: Callable, *args, timeout: float = 60.0, checks: CommChecks | None = None) -> list:
    """Run ``fn(comm, *args)`` on n virtual ranks (threads); return their results in rank order.

    An exception on any rank aborts the others and is re-raised here, its message naming the
    rank. Raises DeadlockError when all unfinished ranks wait on each other, TimeoutError
    after ``timeout`` seconds, CollectiveTimeoutError when ``checks.watchdog_s`` is set and
    a rank waits that long in one communication.
    """
    n = check_int("run_in_process", "n", n, 1, expected="an int >= 1 (the number of ranks)")
    if checks is not None and not isinstance(checks, CommChecks):
        raise TypeError(format_error("run_in_process", "checks", "a CommChecks or None", repr(checks)))
    u = _Universe(n, checks.watchdog_s if checks is not None else None)
    world = u.rendezvous(tuple(range(n)))
    results: list = [None] * n

    def body(rank: int) -> None:
        try:
            results[rank] = fn(InProcessCommunicator(u, world, rank, CommStats(), checks), *args)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the caller
            u.abort(rank, exc)
        finally:
            u.done(rank)

    threads = [threading.Thread(target=body, args=(r,), name=f"autopar-rank-{r}", daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    try:
        _watch(u, time.monotonic() + timeout, timeout)
    except BaseException as exc:  # KeyboardInterrupt included: stop the ranks before leaving
        u.abort(None, exc)
        raise
    finally:
        end = time.monotonic() + GRACE_S
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
    if u.failure is not None:
        rank, exc = u.failure
        raise _with_rank(exc, rank, n)
    return results


def _watch(u: _Universe, deadline: float, timeout: float) -> None:
    """Wait for the ranks; abort the run on failure, deadlock or timeout."""
    previous, since = None, 0.0
    while not u.wake.wait(POLL_S):
        now = time.monotonic()
        if now > deadline:
            u.abort(None, TimeoutError(f"run_in_process: ranks still running after {timeout} s: "
                                       f"{u.describe_waits()}"))
            return
        overdue = u.overdue(now)
        if overdue is not None:
            u.abort(None, CollectiveTimeoutError(overdue))
            return
        stalled = u.stalled()
        same = stalled is not None and previous is not None and all(a is b for a, b in zip(stalled, previous))
        if not same:
            previous, since = stalled, now
        elif now - since >= STALL_S:
            u.abort(None, DeadlockError(f"run_in_process: deadlock, no rank can proceed: {u.describe_waits()}; "
                                        "every member of a group must make the same calls in the same order, "
                                        "and each send needs its recv"))
            return


def _with_rank(exc: BaseException, rank: int | None, n: int) -> BaseException:
    """The original exception, its message prefixed with the rank it came from."""
    if rank is None:
        return exc
    label = f"[rank {rank} of {n}]"
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{label} {exc.args[0]}",) + exc.args[1:]
    else:
        exc.add_note(f"raised on in-process {label}")
    return exc

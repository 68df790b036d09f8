"""The Communicator interface, its argument checks, and the statistics every backend keeps.

A backend implements the underscored primitives (``_allreduce``, ``_allgather``, ...) on
arguments already checked here: ``x`` a numpy array, axes normalised to ``0 <= axis < ndim``,
divisibility verified. The public methods check, number the collective (``allreduce #3``:
this member's third collective on this communicator), run the opt-in checks of
``self.checks`` (checks.py: in debug mode the members compare fingerprints first), record the
call in :class:`CommStats`, and delegate, so every backend validates and counts identically.

Index convention for the blocked collectives, with ``n = size`` and member ``i``::

    x (local input, shape (..., d, ...) with d at `axis`)
    allgather:      out = concat_j x_j                   along axis   -> (..., n*d, ...)
    reduce_scatter: out = (sum_j x_j)[i*d/n:(i+1)*d/n]   along axis   -> (..., d/n, ...)
    alltoall:       out = concat_j block_i(x_j)          blocks along split_axis, concat along concat_axis

e.g. n = 2, x_0 = [0, 1], x_1 = [2, 3] (axis 0): allgather -> [0, 1, 2, 3] on both;
reduce_scatter -> [2] on member 0, [4] on member 1; alltoall(0, 0) -> [0, 2] and [1, 3].

Dtypes. Numeric and bool arrays, and bfloat16 (``ml_dtypes``; numpy kind 'V', no MPI datatype):

    moved (allgather, alltoall, broadcast, send/recv)   bit for bit, in its own dtype
    reduced (allreduce, reduce_scatter)                 in reduction_dtype(dtype): bfloat16 members'
                                                        buffers are widened to float32, reduced in
                                                        member order, and rounded to bfloat16 once

so a bfloat16 sum on n members is ``bfloat16(float32(x_0) + ... + float32(x_{n-1}))``, the same
on every backend (MPI's sum order over more than 2 members is its own, as for float32).

Non-blocking. ``iallreduce(x)`` starts the all-reduce and returns a :class:`Request`;
``request.wait()`` returns what ``allreduce(x)`` would have (the same bits on the in-process
backend and on 2 MPI ranks); ``ireduce_scatter(x, axis)`` and ``iallgather(x, axis)`` likewise. Each is numbered and
counted like its blocking call when it starts, so
members must start it in the same order as their other collectives on this communicator; they
may wait in any order. ``x`` must not change until the wait (callers hand over a buffer they
own); ``iallreduce(x, donate=True)`` also gives ``x`` up for good, so a backend may reduce into
it (MPI: ``MPI_IN_PLACE``, which spares MPI copying ``x`` into a separate result at the start).
Meanwhile the caller computes: gradient buckets reduce while the backward pass goes on
(autopar/runtime/fusion.py), and ZeRO-3 weights are gathered ahead of their use
(autopar/runtime/prefetch.py). A backend without a non-blocking path runs the blocking call at
the start and hands back a finished request.

Non-blocking point to point. ``isend(x, dest, tag)`` and ``irecv(shape, dtype, source, tag)``
start a send and a receive and return requests: ``isend``'s ``wait()`` returns None once x may
be reused, ``irecv``'s returns the array (what ``recv`` would have, bit for bit). Counted as
``send`` / ``recv`` when they start. Messages between two members with one tag match in the
order they were started on each side (MPI's non-overtaking rule), whatever order the
requests are waited in; mixing blocking and non-blocking calls keeps that order. A pipeline
posts its sends right after the item that makes them and waits for a receive just before
the item that reads it (autopar/runtime/pipeline/runner.py). ``x`` must not change until
the send's wait. A backend without a non-blocking path defers the blocking call to the wait.
"""
from __future__ import annotations

import abc
import operator
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..backend import array_module
from ..dtype import bfloat16, float32, is_float
from ..errors import format_error
from .checks import CollectiveMismatchError, CommChecks, call_site, divergence, fingerprint

KINDS = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "send", "recv")
REDUCE_OPS = ("sum", "max", "min")
MAX_TAG = 32767  # the least upper bound on tags that MPI guarantees


@dataclass(frozen=True)
class CommRecord:
    """One logged call: its kind, the world ranks of the group, the local shape and dtype."""

    kind: str
    ranks: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: np.dtype

    def __str__(self) -> str:
        return f"{self.kind}{list(self.ranks)} {self.shape} {self.dtype}"


class CommStats:
    """Count, bytes and seconds, by kind, of every communication call one rank makes.

    Shared by a rank's communicator and all its sub-communicators. Bytes are the local input
    buffer's ``nbytes`` (for ``recv``, the received buffer's); seconds, the wall time inside
    the blocking calls (:meth:`seconds`). Barriers and splits are not counted. The ordered
    log keeps the last ``log_limit`` calls (``None``: all of them).
    ``doing`` is what this rank last started (a program sets ``"ShardedGradProgram at step
    3"``), which the watchdog's report names beside the collective it timed out in.
    """

    def __init__(self, log_limit: int | None = 100_000):
        self.doing = ""
        self._count = dict.fromkeys(KINDS, 0)
        self._bytes = dict.fromkeys(KINDS, 0)
        self._seconds = dict.fromkeys(KINDS, 0.0)
        self._log: deque[CommRecord] = deque(maxlen=log_limit)

    def record(self, kind: str, ranks: tuple[int, ...], x: np.ndarray) -> None:
        self._count[kind] += 1
        self._bytes[kind] += x.nbytes
        self._log.append(CommRecord(kind, ranks, x.shape, x.dtype))

    def add_seconds(self, kind: str, seconds: float) -> None:
        self._seconds[kind] += seconds

    def seconds(self) -> dict[str, float]:
        """Wall seconds this member spent inside its blocking collectives and messages, per
        kind (waiting for the other members included; the non-blocking calls' waits are not
        counted): every collective of a step, the in-kernel ones (a vocabulary-split loss's
        all-reduces) as well as the redistributions between ops."""
        return {k: v for k, v in self._seconds.items() if self._count[k]}

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{"count": {kind: calls}, "bytes": {kind: bytes}}``, kinds never called left out."""
        return {"count": {k: v for k, v in self._count.items() if v},
                "bytes": {k: self._bytes[k] for k, v in self._count.items() if v}}

    @property
    def log(self) -> tuple[CommRecord, ...]:
        return tuple(self._log)

    def reset(self) -> None:
        for kind in KINDS:
            self._count[kind] = self._bytes[kind] = 0
            self._seconds[kind] = 0.0
        self._log.clear()

    def __repr__(self) -> str:
        calls = ", ".join(f"{k}={v}/{self._bytes[k]}B" for k, v in self._count.items() if v)
        return f"CommStats({calls})"


class Request(abc.ABC):
    """A collective or message in flight; :meth:`wait` once for its result (None for a send)."""

    @abc.abstractmethod
    def test(self) -> bool:
        """Whether it has completed (lets MPI progress it; never blocks)."""

    @abc.abstractmethod
    def wait(self) -> np.ndarray:
        """Block until it completes and return its result (a new array)."""


class Done(Request):
    """A request whose result is already there (the blocking fallback)."""

    def __init__(self, result: np.ndarray):
        self._result = result

    def test(self) -> bool:
        return True

    def wait(self) -> np.ndarray:
        return self._result


class Then(Request):
    """``request``, its result passed through ``then`` at the wait."""

    def __init__(self, request: Request, then):
        self._request, self._then = request, then

    def test(self) -> bool:
        return self._request.test()

    def wait(self):
        return self._then(self._request.wait())


class Deferred(Request):
    """A request whose blocking call runs at its wait (the fallback for point to point)."""

    def __init__(self, call):
        self._call, self._done, self._result = call, False, None

    def test(self) -> bool:
        return self._done

    def wait(self):
        if not self._done:
            self._result, self._done = self._call(), True
        return self._result


def reduction_dtype(dtype) -> np.dtype:
    """The dtype members' buffers are reduced in: float32 for bfloat16 (no MPI datatype or
    reduction op exists for it, and summing in bfloat16 would round at every member),
    the dtype itself otherwise. The result is cast back to ``dtype`` once."""
    dtype = np.dtype(dtype)
    return float32 if dtype == bfloat16 else dtype


def block_index(ndim: int, axis: int, i: int, block: int) -> tuple[slice, ...]:
    """Index of block ``i`` (of length ``block``) along ``axis`` of an ``ndim``-d array."""
    return (slice(None),) * axis + (slice(i * block, (i + 1) * block),)


class Communicator(abc.ABC):
    """Collectives and point-to-point messages on numpy arrays among a group of ranks.

    Every method takes numpy arrays and returns a NEW array (never a view of an input);
    inputs are never modified. All members of a communicator make the same collective calls
    in the same order with the same shapes, dtypes and arguments.
    """

    def __init__(self, stats: CommStats, checks: CommChecks | None = None):
        self._stats = stats
        self._checks = checks if checks is not None else CommChecks()
        self._seq = 0                              # collectives this member issued here
        self._op: tuple[str, int] | None = None    # (kind, seq) of the latest one

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This member's position in the communicator."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of members."""

    @property
    @abc.abstractmethod
    def ranks(self) -> tuple[int, ...]:
        """World ranks of the members, in member order."""

    @property
    def stats(self) -> CommStats:
        return self._stats

    @property
    def checks(self) -> CommChecks:
        """The run-time checks this communicator (and those split from it) make."""
        return self._checks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, ranks={self.ranks})"

    # ---- collectives: check, record, delegate ------------------------------------------

    def allreduce(self, x, op: str = "sum") -> np.ndarray:
        """forward: sum (max, min) over members, same result on all / backward: identity."""
        x = self._buffer(x, "allreduce")
        _check_reduce_op(x, op, self._where("allreduce"))
        self._begin("allreduce", x, op=op)
        self._stats.record("allreduce", self.ranks, x)
        return self._timed("allreduce", self._allreduce, x, op)

    def iallreduce(self, x, op: str = "sum", *, donate: bool = False) -> Request:
        """allreduce, started now and completed by ``.wait()`` (see the module's docstring);
        ``donate``: the caller never reads ``x`` again, and the result may be ``x`` itself.
        As with MPI's non-blocking calls, ``x`` must not change before the wait: a backend may
        still be reading it (MPI's shared window does, on its helper thread)."""
        x = self._buffer(x, "iallreduce")
        _check_reduce_op(x, op, self._where("iallreduce"))
        self._begin("allreduce", x, op=op)
        self._stats.record("allreduce", self.ranks, x)
        return self._iallreduce(x, op, donate)

    def iallreduce_joined(self, parts: Sequence) -> Request:
        """iallreduce (sum) of ``parts`` (arrays of one dtype, on one device) flattened and
        joined end to end: a 1-d result, as ``iallreduce(concatenate(parts), donate=True)``,
        which is what this default does. A backend may read the parts where they are instead
        (the MPI backend's shared window: one pass over a gradient bucket fewer), so they too
        must not change before the wait."""
        xp = array_module(*parts)
        return self.iallreduce(xp.concatenate([p.reshape(-1) for p in parts]), donate=True)

    def ireduce_scatter(self, x, axis: int = 0) -> Request:
        """reduce_scatter, started now and completed by ``.wait()``; ``x`` must not change before it."""
        x = self._buffer(x, "ireduce_scatter")
        _check_reduce_op(x, "sum", self._where("ireduce_scatter"))
        axis = self._axis(x, axis, "ireduce_scatter", "axis", divisible=True)
        self._begin("reduce_scatter", x, axis=axis)
        self._stats.record("reduce_scatter", self.ranks, x)
        return self._ireduce_scatter(x, axis)

    def iallgather(self, x, axis: int = 0) -> Request:
        """allgather, started now and completed by ``.wait()``."""
        x = self._buffer(x, "iallgather")
        axis = self._axis(x, axis, "iallgather", "axis")
        self._begin("allgather", x, axis=axis)
        self._stats.record("allgather", self.ranks, x)
        return self._iallgather(x, axis)

    def allgather(self, x, axis: int = 0) -> np.ndarray:
        """forward: concatenate members' blocks along axis / backward: reduce-scatter along axis."""
        x = self._buffer(x, "allgather")
        axis = self._axis(x, axis, "allgather", "axis")
        self._begin("allgather", x, axis=axis)
        self._stats.record("allgather", self.ranks, x)
        return self._timed("allgather", self._allgather, x, axis)

    def reduce_scatter(self, x, axis: int = 0) -> np.ndarray:
        """forward: sum over members, keep block i along axis / backward: all-gather along axis."""
        x = self._buffer(x, "reduce_scatter")
        _check_reduce_op(x, "sum", self._where("reduce_scatter"))
        axis = self._axis(x, axis, "reduce_scatter", "axis", divisible=True)
        self._begin("reduce_scatter", x, axis=axis)
        self._stats.record("reduce_scatter", self.ranks, x)
        return self._timed("reduce_scatter", self._reduce_scatter, x, axis)

    def alltoall(self, x, split_axis: int, concat_axis: int) -> np.ndarray:
        """forward: block j along split_axis to member j, concat along concat_axis /
        backward: all-to-all with the two axes swapped."""
        x = self._buffer(x, "alltoall")
        split_axis = self._axis(x, split_axis, "alltoall", "split_axis", divisible=True)
        concat_axis = self._axis(x, concat_axis, "alltoall", "concat_axis")
        self._begin("alltoall", x, split_axis=split_axis, concat_axis=concat_axis)
        self._stats.record("alltoall", self.ranks, x)
        return self._timed("alltoall", self._alltoall, x, split_axis, concat_axis)

    def broadcast(self, x, root: int = 0) -> np.ndarray:
        """forward: root's x to every member (others pass x for shape and dtype) /
        backward: sum to root."""
        x = self._buffer(x, "broadcast")
        root = self._member(root, "broadcast", "root", allow_self=True)
        self._begin("broadcast", x, root=root)
        self._stats.record("broadcast", self.ranks, x)
        return self._timed("broadcast", self._broadcast, x, root)

    def send(self, x, dest: int, tag: int = 0) -> None:
        """Send x to member dest. May block until the matching recv starts (MPI standard
        mode); the in-process backend always does, so an order that works there is safe."""
        x = self._buffer(x, "send")
        dest, tag = self._member(dest, "send", "dest"), self._tag(tag, "send")
        self._stats.record("send", self.ranks, x)
        self._timed("send", self._send, x, dest, tag)

    def recv(self, shape, dtype, source: int, tag: int = 0) -> np.ndarray:
        """Receive a (shape, dtype) array sent by member source with this tag."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        source, tag = self._member(source, "recv", "source"), self._tag(tag, "recv")
        out = self._timed("recv", self._recv, shape, dtype, source, tag)
        self._stats.record("recv", self.ranks, out)
        return out

    def isend(self, x, dest: int, tag: int = 0) -> Request:
        """send, started now; ``.wait()`` returns None once the message has left x."""
        x = self._buffer(x, "isend")
        dest, tag = self._member(dest, "isend", "dest"), self._tag(tag, "isend")
        self._stats.record("send", self.ranks, x)
        return self._isend(x, dest, tag)

    def irecv(self, shape, dtype, source: int, tag: int = 0) -> Request:
        """recv, started now; ``.wait()`` returns the (shape, dtype) array received."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        source, tag = self._member(source, "irecv", "source"), self._tag(tag, "irecv")
        self._stats.record("recv", self.ranks, np.broadcast_to(np.zeros((), dtype), shape))   # no buffer yet
        return self._irecv(shape, dtype, source, tag)

    def barrier(self) -> None:
        """Wait until every member has called barrier (not counted in stats)."""
        self._begin("barrier", None)
        self._barrier()

    def compare(self, record) -> np.ndarray:
        """Every member's ``record`` (a 1-d int64 array, the same length on every member),
        stacked in member order: (size, len). For consistency checks: numbered (``check #k``)
        and watched like any collective, but not counted in :attr:`stats`, which count the
        program's own communication."""
        record = np.ascontiguousarray(record, dtype=np.int64)
        if record.ndim != 1:
            raise ValueError(format_error(self._where("compare"), "record", "a 1-d int64 array",
                                          f"shape {record.shape}"))
        self._begin("check", record)
        return self._allgather(record, 0).reshape(self.size, record.size)

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        """The sub-communicator of the group holding this rank; groups (of world ranks)
        partition the members, member order = order given. Collective; plan time only."""
        groups = self._check_partition(groups)
        self._begin("split", None, groups=groups)
        me = self.ranks[self.rank]
        index = next(g for g, group in enumerate(groups) if me in group)
        return self._split(groups, index)

    def _timed(self, kind: str, call, *args):
        """``call(*args)``, its wall seconds added to the stats' ``kind``."""
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._stats.add_seconds(kind, time.perf_counter() - start)

    # ---- run-time checks (CommChecks) --------------------------------------------------

    def _begin(self, kind: str, x: np.ndarray | None, **args) -> None:
        """Number the collective; in debug mode, first check every member issues the same one."""
        self._seq += 1
        self._op = (kind, self._seq)
        if self._checks.debug:
            self._agree(kind, x, args)

    def _agree(self, kind: str, x: np.ndarray | None, args: dict) -> None:
        """All-gather the members' fingerprints (through the primitive: not counted) and raise
        on every member when they differ, before the collective is issued."""
        record = fingerprint(kind, args, x, call_site())
        records = self._allgather(record, 0).reshape(self.size, record.size)   # (n, FINGERPRINT_BYTES)
        message = divergence(records, self._seq, self.ranks)
        if message is not None:
            raise CollectiveMismatchError(message)

    # ---- the primitives a backend implements ------------------------------------------

    @abc.abstractmethod
    def _allreduce(self, x: np.ndarray, op: str) -> np.ndarray: ...

    def _iallreduce(self, x: np.ndarray, op: str, donate: bool = False) -> Request:
        """Non-blocking allreduce; this default blocks at the start (backends override it).
        ``donate``: ``x`` may be overwritten with the result (a backend may ignore it)."""
        return Done(self._allreduce(x, op))

    def _ireduce_scatter(self, x: np.ndarray, axis: int) -> Request:
        """Non-blocking reduce_scatter; this default blocks at the start."""
        return Done(self._reduce_scatter(x, axis))

    def _iallgather(self, x: np.ndarray, axis: int) -> Request:
        """Non-blocking allgather; this default blocks at the start."""
        return Done(self._allgather(x, axis))

    def _isend(self, x: np.ndarray, dest: int, tag: int) -> Request:
        """Non-blocking send; this default sends (blocking) at the wait (backends override it)."""
        return Deferred(lambda: self._send(x, dest, tag))

    def _irecv(self, shape: tuple[int, ...], dtype: np.dtype, source: int, tag: int) -> Request:
        """Non-blocking recv; this default receives (blocking) at the wait."""
        return Deferred(lambda: self._recv(shape, dtype, source, tag))

    @abc.abstractmethod
    def _allgather(self, x: np.ndarray, axis: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _reduce_scatter(self, x: np.ndarray, axis: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _alltoall(self, x: np.ndarray, split_axis: int, concat_axis: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _broadcast(self, x: np.ndarray, root: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _send(self, x: np.ndarray, dest: int, tag: int) -> None: ...

    @abc.abstractmethod
    def _recv(self, shape: tuple[int, ...], dtype: np.dtype, source: int, tag: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _barrier(self) -> None: ...

    @abc.abstractmethod
    def _split(self, groups: tuple[tuple[int, ...], ...], index: int) -> Communicator:
        """This member's sub-communicator for ``groups[index]`` (already checked)."""

    # ---- argument checks ---------------------------------------------------------------

    def _where(self, method: str) -> str:
        return f"{type(self).__name__}.{method} (rank {self.rank} of {list(self.ranks)})"

    def _buffer(self, x, method: str) -> np.ndarray:
        x = np.asarray(x)
        if not (x.dtype.kind in "biufc" or is_float(x.dtype)) or not x.dtype.isnative:
            raise TypeError(format_error(self._where(method), "x",
                                         "a numeric, bool or bfloat16 array in native byte order",
                                         f"dtype {x.dtype}", "convert with x.astype(np.float32) or similar"))
        return x

    def _axis(self, x: np.ndarray, axis: int, method: str, arg: str, divisible: bool = False) -> int:
        axis = self._int(axis, method, arg)
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(format_error(self._where(method), arg, f"an axis of a {x.ndim}-d array",
                                          f"{axis} (shape {x.shape})"))
        axis %= x.ndim
        if divisible and x.shape[axis] % self.size:
            raise ValueError(format_error(self._where(method), arg, f"a dimension divisible by the group size "
                                          f"{self.size}", f"axis {axis} of shape {x.shape}",
                                          "pad the dimension or split along another axis"))
        return axis

    def _member(self, value: int, method: str, arg: str, allow_self: bool = False) -> int:
        value = self._int(value, method, arg)
        if not 0 <= value < self.size or (value == self.rank and not allow_self):
            others = "" if allow_self else f", not this rank ({self.rank})"
            raise ValueError(format_error(self._where(method), arg, f"a member in 0..{self.size - 1}{others}",
                                          repr(value)))
        return value

    def _tag(self, tag: int, method: str) -> int:
        tag = self._int(tag, method, "tag")
        if not 0 <= tag <= MAX_TAG:
            raise ValueError(format_error(self._where(method), "tag", f"an int in 0..{MAX_TAG}", repr(tag)))
        return tag

    def _int(self, value, method: str, arg: str) -> int:
        try:
            return operator.index(value)
        except TypeError:
            raise TypeError(format_error(self._where(method), arg, "an int", repr(value))) from None

    def _check_partition(self, groups) -> tuple[tuple[int, ...], ...]:
        groups = tuple(tuple(int(r) for r in g) for g in groups)
        flat = [r for g in groups for r in g]
        if any(not g for g in groups) or sorted(flat) != sorted(self.ranks):
            raise ValueError(format_error(self._where("split"), "groups",
                                          f"non-empty groups partitioning the members {list(self.ranks)} "
                                          "(world ranks, each exactly once)", repr(groups),
                                          "pass e.g. mesh.groups(axes) of this communicator's mesh"))
        return groups


def _check_reduce_op(x: np.ndarray, op: str, where: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(format_error(where, "op", f"one of {REDUCE_OPS}", repr(op)))
    kinds = "iuf" if op in ("max", "min") else "iufc"
    if x.dtype.kind not in kinds and not is_float(x.dtype):
        raise TypeError(format_error(where, "x", f"a dtype MPI can {op}-reduce (kinds {kinds!r}, or bfloat16)",
                                     f"dtype {x.dtype}", "reduce bool masks as int8"))

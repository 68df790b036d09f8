"""Sums over the ranks of one host through a shared-memory window, for the MPI backend.

When every member of an MPI communicator runs on one host, a large sum need not travel
through MPI's messages. The members map one shared window: a header of counters, one
cache line per member, and DEPTH sets of (n + 1) slots. A sum is cut into pieces of at
most a slot, numbered s = 1, 2, ... over the window's life (every member cuts its calls
alike, so every member gives a piece the same number); piece s uses set (s - 1) % DEPTH::

    member i, piece s, set k                                        waits until every member
    1. copy its piece into slot i of set k          writes P        has summed piece s - DEPTH
       (an all-reduce's input may be several arrays: read where they are, never joined)
       publish filled[i] = s
    2. sum its 1/n of the piece over slots 0..n-1   reads P         has filled piece s
       in member order (allreduce: into the result
       slot n; reduce_scatter: its block, into its output)
       publish summed[i] = s
    3. allreduce: copy the result slot out          reads P         has summed piece s

A member goes through a piece's steps before the next piece's, and step 2 waits for every
member's step 1, so no member is more than one piece ahead of another: with two sets, step
1's wait is always met already (it keeps one set correct), and when every member has filled
piece s + DEPTH all have copied piece s out, so the result slot needs no counter of its own.
Each wait reads the others' counters in the window; nothing calls MPI but ``Win_sync``,
which orders the memory on either side of a publish or a wait. Every element is summed in
member order, so all members get the same bits, and the bits the in-process backend gives.
Two sets let a member copy in its next piece while the others still sum this one.

Where MPI gives MPI_THREAD_MULTIPLE (mpi4py asks for it), the pieces run on one helper
thread per window, in the order the calls were made: a non-blocking call hands its sum
over and returns, so the sums of a gradient bucket run while the backward pass goes on (on
a core of their own where the rank has two; numpy's copies and adds release the GIL). A
blocking call runs its sum on the caller when the helper is idle, else hands it over and
waits. Without the helper (``threaded=False``) every sum runs on the caller when called.
A member that never comes to a sum is found by the waits' deadline (the watchdog's
timeout): the report names the call and the members whose counters stayed behind, and the
job is aborted.

Measured on the lent 16-core host (68 MB of float32, ``devrun/arprobe.py``, session 15,
with barriers between the steps instead of counters):

    ranks    MPI_Allreduce   MPI_Iallreduce, 3 buckets   shared window
      2          41 ms                58 ms                  19 ms
      8          69 ms               133 ms                  25 ms
     16          93 ms               181 ms                  33 ms
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import format_error
from .base import Request
from .checks import COLLECTIVES, describe, timeout_report

SLOT_BYTES = 4 * 1024 * 1024   # per member and set: the window is DEPTH * (n + 1) slots, 136 MB for 16 ranks
DEPTH = 2                      # sets of slots: a member may be one piece ahead of the slowest
MIN_BYTES = 256 * 1024         # smaller sums go through MPI
HAND_OVER_BYTES = 4 * 1024 * 1024   # smaller sums run on the caller: the hand-over (the GIL passed between
                                    # two threads) cost the 2-core main job 6-10% with 786 KB sums, overlap saves less
ENV = "AUTOPAR_COMM_SHM"       # "0": never use the window; "1" or unset: use it
SHM_DIR = "/dev/shm"           # where MPI's shared windows live on Linux
LINE = 64                      # bytes of one member's counters (a cache line: no false sharing)
FILLED, SUMMED, ENTERED, KIND = range(4)   # a member's counters; ENTERED, KIND: its latest call
MIN_PAUSE_S, MAX_PAUSE_S = 2e-5, 2e-4              # a wait's sleeps between reads of the counters,
SPIN_S = {True: 2e-5, False: 0.5}                   # after reading them this long without sleeping: on the
                                                    # helper thread (it shares the core with compute), on the
                                                    # caller (as MPI's blocking calls spin: a sleeping core of a
                                                    # VM wakes late)


def wanted(environ=None) -> bool:
    """Whether the environment lets MPI communicators sum through shared memory: ``AUTOPAR_COMM_SHM``
    unset, "" or "1" yes, "0" no; anything else is an error naming the variable."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(format_error(ENV, "value", "'1' (on, the default) or '0' (off)", repr(value)))
    return value != "0"


def window_bytes(n: int, slot_bytes: int | None = None) -> int:
    """Bytes of the window for ``n`` members: the header, then DEPTH sets of (n + 1) slots."""
    return _header_bytes(n) + DEPTH * (n + 1) * (SLOT_BYTES if slot_bytes is None else slot_bytes)


def _header_bytes(n: int) -> int:
    return -(-n * LINE // 4096) * 4096      # whole pages: the slots start page-aligned


def room(nbytes: int) -> bool:
    """Whether the host's shared-memory filesystem has twice ``nbytes`` free (a window past
    it would fail at first touch with SIGBUS, not at allocation)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= 2 * nbytes


class _Job:
    """One call's sum: ``run()`` goes through its pieces; the result, or the error, when done."""

    def __init__(self, run: Callable[[], np.ndarray], what: tuple[str, int, str]):
        self.run, self.what = run, what        # what: (kind, seq, doing) of the call, for a report
        self.done = threading.Event()
        self.result = self.error = None


class SharedRequest(Request):
    """A sum handed to the window's helper thread."""

    def __init__(self, job: _Job):
        self._job = job

    def test(self) -> bool:
        return self._job.done.is_set()

    def wait(self) -> np.ndarray:
        self._job.done.wait()
        if self._job.error is not None:
            raise self._job.error
        return self._job.result


class SharedSum:
    """Sums over the n >= 2 members of ``node`` (an MPI communicator all on one host; world
    ranks ``ranks`` in member order) through one shared window. Made collectively over
    ``node``. ``timeout_s``: how long a wait may last before ``abort(report)`` (None: no
    limit); ``threaded``: run the sums on a helper thread where MPI allows it."""

    def __init__(self, MPI, node, ranks: Sequence[int], timeout_s: float | None, abort: Callable[[str], None],
                 slot_bytes: int | None = None, threaded: bool = True):
        self._slot_bytes = SLOT_BYTES if slot_bytes is None else slot_bytes
        self._n, self._rank = node.Get_size(), node.Get_rank()
        self._ranks, self._timeout, self._abort = tuple(ranks), timeout_s, abort
        total = window_bytes(self._n, self._slot_bytes)
        self._win = MPI.Win.Allocate_shared(total if self._rank == 0 else 0, 1, comm=node)
        memory, _ = self._win.Shared_query(0)
        self._memory = np.frombuffer(memory, np.uint8, count=total)   # (total,) bytes
        head = _header_bytes(self._n)
        self._counters = self._memory[:head].view(np.int64).reshape(-1, LINE // 8)[:self._n]   # (n, 8)
        self._sets = self._memory[head:].reshape(DEPTH, -1)           # (DEPTH, (n + 1) * slot_bytes)
        self._win.Lock_all(MPI.MODE_NOCHECK)   # a passive epoch for the whole life: Sync orders memory
        node.Barrier()                         # rank 0's zeroed counters are in place before any is read
        self._pieces = 0                       # pieces begun (on the thread that runs the sums)
        self._job: _Job | None = None          # the sum running now (for a report)
        self._last: _Job | None = None         # the last sum handed to the helper thread
        self._spin = SPIN_S[False]             # how long a wait reads the counters before it sleeps
        self._jobs, self._thread = None, None
        if threaded and MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._serve, name=f"autopar-shm-{self._ranks}", daemon=True)
            self._thread.start()

    # ---- calls ---------------------------------------------------------------------------

    def allreduce(self, parts: Sequence[np.ndarray], out: np.ndarray, what: tuple[str, int, str]) -> np.ndarray:
        """out = the sum over members of ``parts`` joined end to end (see :meth:`start_allreduce`); blocking."""
        return self.start_allreduce(parts, out, what, blocking=True).wait()

    def start_allreduce(self, parts: Sequence[np.ndarray], out: np.ndarray, what: tuple[str, int, str],
                        blocking: bool = False) -> Request:
        """Start out = the sum over members of ``parts`` joined end to end: each part 1-d and
        contiguous, all of out's dtype, out (total,) (``out`` may be the only part). The
        parts are read where they are, never joined first: neither they nor ``out`` may be
        touched until the request is done. ``what``: (kind, seq, doing) of the call;
        ``blocking``: the caller waits for it at once (no point handing it over)."""
        return self._submit(lambda: self._allreduce(parts, out), what,
                            blocking=blocking or out.nbytes < HAND_OVER_BYTES)

    def reduce_scatter(self, x: np.ndarray, out: np.ndarray, what: tuple[str, int, str]) -> np.ndarray:
        """out = block i (this member's) of the sum of every member's ``x``; blocking."""
        return self.start_reduce_scatter(x, out, what, blocking=True).wait()

    def start_reduce_scatter(self, x: np.ndarray, out: np.ndarray, what: tuple[str, int, str],
                             blocking: bool = False) -> Request:
        """Start out = block i (this member's) of the sum of every member's ``x``: x (n, b),
        out (b,); neither may be touched until the request is done. ``blocking`` as in
        :meth:`start_allreduce`."""
        return self._submit(lambda: self._reduce_scatter(x, out), what,
                            blocking=blocking or x.nbytes < HAND_OVER_BYTES)

    def _submit(self, run, what, blocking: bool = False) -> Request:
        """Run a call's sum on the helper thread, after the ones before it; or here and now
        when there is no helper, or the helper is idle and the call blocks (or is small:
        ``blocking``) -- no hand-over."""
        self._counters[self._rank, KIND] = COLLECTIVES.index(what[0])
        self._counters[self._rank, ENTERED] = what[1]    # for a report: which call this member came to last
        job = _Job(run, what)
        if self._jobs is None or (blocking and (self._last is None or self._last.done.is_set())):
            self._do(job)
        else:
            self._last = job                             # the helper runs jobs in order: done, all before it are
            self._jobs.put(job)
        return SharedRequest(job)

    def _serve(self) -> None:
        while True:
            self._do(self._jobs.get())

    def _do(self, job: _Job) -> None:
        self._job = job
        self._spin = SPIN_S[threading.current_thread() is self._thread]
        try:
            job.result = job.run()
        except BaseException as exc:   # handed to the waiter
            job.error = exc
        job.done.set()

    # ---- the pieces ----------------------------------------------------------------------

    def _rows(self, k: int, dtype: np.dtype) -> np.ndarray:
        """Set k as (n + 1, slot elements) of ``dtype``: rows 0..n-1 the members' slots, row n the result."""
        width = self._slot_bytes // dtype.itemsize
        return self._sets[k, :(self._n + 1) * width * dtype.itemsize].view(dtype).reshape(self._n + 1, width)

    def _begin(self, dtype: np.dtype) -> tuple[int, np.ndarray]:
        """The next piece's number and its set's rows, once this member's slot there is free."""
        self._pieces += 1
        s = self._pieces
        self._await(SUMMED, s - DEPTH)
        return s, self._rows((s - 1) % DEPTH, dtype)

    def _publish(self, counter: int, s: int) -> None:
        self._win.Sync()                       # what this member wrote is visible before the counter
        self._counters[self._rank, counter] = s

    def _sum(self, rows: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
        """out = rows[0, lo:hi] + rows[1, lo:hi] + ... in member order."""
        np.add(rows[0, lo:hi], rows[1, lo:hi], out=out)
        for k in range(2, self._n):
            np.add(out, rows[k, lo:hi], out=out)

    def _drain(self, result: np.ndarray, out: np.ndarray) -> None:
        """Copy a piece's sum out of the result slot."""
        out[...] = result

    def _allreduce(self, parts: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
        n, i = self._n, self._rank
        width = self._slot_bytes // out.dtype.itemsize
        cursor = [0, 0]                                 # the next part to read, and where in it
        for start in range(0, out.size, width):
            m = min(width, out.size - start)
            s, rows = self._begin(out.dtype)
            _fill(rows[i, :m], parts, cursor)
            self._publish(FILLED, s)
            self._await(FILLED, s)
            lo, hi = i * m // n, (i + 1) * m // n       # this member's share of the piece
            self._sum(rows, lo, hi, rows[n, lo:hi])
            self._publish(SUMMED, s)
            self._await(SUMMED, s)
            self._drain(rows[n, :m], out[start:start + m])
        return out

    def _reduce_scatter(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        n, i = self._n, self._rank
        cols = self._slot_bytes // x.dtype.itemsize // n   # columns of every block per piece
        b = x.shape[1]
        for start in range(0, b, cols):
            m = min(cols, b - start)
            s, rows = self._begin(x.dtype)
            rows[i, :n * m].reshape(n, m)[:] = x[:, start:start + m]   # slot i: (n, m), block j in row j
            self._publish(FILLED, s)
            self._await(FILLED, s)
            self._sum(rows, i * m, (i + 1) * m, out[start:start + m])
            self._publish(SUMMED, s)
        return out

    # ---- waiting -------------------------------------------------------------------------

    def _await(self, counter: int, s: int) -> None:
        """Wait until every member's ``counter`` reached ``s``; past the timeout, report and abort."""
        column = self._counters[:, counter]
        began, pause = None, 0.0
        while column.min() < s:
            now = time.monotonic()
            began = now if began is None else began
            if self._timeout is not None and now - began > self._timeout:
                self._abort(self._report(counter, s, now - began))
            if now - began > self._spin:
                time.sleep(pause)
                pause = min(MAX_PAUSE_S, max(MIN_PAUSE_S, 2 * pause))
        self._win.Sync()                       # what the others wrote before their counters is visible now

    def _report(self, counter: int, s: int, waited: float) -> str:
        """The watchdog's report for a wait on ``counter`` reaching piece ``s``."""
        kind, seq, doing = self._job.what
        missing, arrived = [], []
        for m in range(self._n):
            entered, code = (int(v) for v in self._counters[m, [ENTERED, KIND]])
            if self._counters[m, counter] >= s:
                arrived.append(self._ranks[m])
            elif entered < seq:
                last = f"its last collective on this group was #{seq - 1}" if seq > 1 else \
                    "it has issued no collective on this group"
                missing.append(f"rank {self._ranks[m]} (never entered it; {last})")
            elif entered == seq and code != COLLECTIVES.index(kind):
                missing.append(f"rank {self._ranks[m]} (entered {COLLECTIVES[code]} #{seq} instead)")
            else:
                missing.append(f"rank {self._ranks[m]} (entered it; its part of the shared-memory sum never came)")
        return timeout_report("autopar", self._ranks[self._rank], waited, describe(kind, seq, self._ranks),
                              missing, sorted(arrived), doing)


def _fill(dst: np.ndarray, parts: Sequence[np.ndarray], cursor: list) -> None:
    """Copy the next ``dst.size`` elements of ``parts`` joined end to end into ``dst``;
    ``cursor`` ([part, offset]) says where the last fill stopped and is moved on."""
    at = 0
    while at < dst.size:
        part = parts[cursor[0]]
        take = min(dst.size - at, part.size - cursor[1])
        dst[at:at + take] = part[cursor[1]:cursor[1] + take]
        at += take
        cursor[1] += take
        if cursor[1] == part.size:
            cursor[0], cursor[1] = cursor[0] + 1, 0

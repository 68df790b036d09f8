"""NCCL collectives off the compute stream, and the NCCL watchdog (used by comm/nccl.py).

Non-blocking collectives (``iallreduce``, ``ireduce_scatter``: the gradient buckets of
runtime/fusion.py) run on a collective stream of the communicator's own, so the backward
kernels queued after a bucket starts run beside its NCCL kernel::

    compute stream:     send made (bfloat16 widened), out allocated, record READY   ...backward...  wait DONE | cast
    collective stream:  wait READY, NCCL call(send -> out), record DONE
    test():   DONE reached (an event query: never blocks)
    wait():   the host waits for DONE against the watchdog's deadline (when it is on), the compute
              stream waits for DONE on the GPU, and the result is made there (cast back, axis moved)

READY orders the call after the kernels making ``send`` and after whatever last used the
memory CuPy's pool hands ``out`` (memory freed on the compute stream is reused there at once,
in stream order; the collective stream is not in that order). The request holds ``send`` and
``out`` until its wait has made the compute stream wait for DONE, so neither returns to the
pool while the NCCL call may still read or write it.

One NCCL communicator for both streams. NCCL serialises the operations of one communicator
in the order they were issued, whatever their streams (it inserts the event dependencies
itself: NVIDIA/nccl#574, #592), so a blocking collective issued on the compute stream after
a bucket started runs after the bucket's call, and every member issues its collectives in
program order (base.Communicator numbers them): the k-th call matches the k-th call on every
member, as on one stream. Two NCCL communicators on two streams would let the calls run
concurrently, and NCCL warns that this can deadlock -- one member's GPU running comm A's
kernel while B's waits for room, another's the reverse -- as CUDA gives concurrent kernels no
forward-progress guarantee. What one communicator costs: a blocking collective issued while
a bucket is in flight waits for it (the overlap is with compute, not with other collectives
of the same group). All calls are issued from the caller's thread (NCCL communicators are
not thread-safe). What overlap does bring: other groups' communicators now run beside a
bucket's call -- under dp x mp, the mp group's blocking collectives on the compute stream
while the dp group's bucket reduces, as PyTorch's DDP with tensor parallelism does -- the
concurrency NCCL warns may deadlock when the kernels cannot be resident on the GPU together
(the pipeline's message channels already run so). Not yet seen on GPUs here: to check.

The watchdog. NCCL calls return once queued; a member that never joins one leaves the
others' kernels waiting, and the host hangs where it next waits for the GPU. Where this
communicator's host waits for an NCCL result -- a request's ``wait``, ``barrier`` (the
queued calls and kernels done), a blocking collective's host (numpy) result -- it polls the
DONE events (as the MPI watchdog polls: a spin, then pauses doubling up to a few ms) until
``CommChecks.watchdog_s`` seconds (``AUTOPAR_COMM_WATCHDOG``; default 300 s under MPI, 0:
off) have passed, asking NCCL for an asynchronous error meanwhile. On expiry, or on such an
error, it aborts the NCCL communicator (``ncclCommAbort``: the waiting kernels return, the
GPU is not left blocked) and raises TimeoutError (RuntimeError for NCCL's error) naming the
collective (``allreduce #3 on group (0, 1)``: the oldest one not done), this rank, the
group's ranks and the fix; the communicator refuses every later call (its members are out of
step: restart the job). Not bounded: a wait outside this communicator -- the host copying a
device result (the loss) while a blocking collective before it hangs -- as CuPy's copy
waits for the stream without a deadline. With the watchdog off nothing is polled: ``wait`` never blocks the
host, and a missing member hangs the job as before. With it on, each blocking collective
records one more event, and a device result's ``wait`` blocks the host until the call is
done: the host then issues the update's kernels after the all-reduce, not during it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..backend.nccl_lib import NcclLib
from ..errors import format_error
from .base import Request
from .checks import DEBUG_ENV, WATCHDOG_ENV
from .watchdog import MAX_PAUSE_S, MIN_PAUSE_S, SPIN_S

FIX = (f"check that every rank reaches the same collective ({DEBUG_ENV}=1 names the diverging one) and "
       "restart the job")


class NcclWatch:
    """The NCCL watchdog of one communicator: the DONE events of its calls not yet seen done,
    polled against the deadline where the host waits (see the module docstring).
    ``where(method)`` names the place, ``doing()`` what the rank last started."""

    def __init__(self, lib: NcclLib, comm, timeout_s: float | None, where: Callable[[str], str],
                 doing: Callable[[], str]):
        self._lib, self._comm, self.timeout_s = lib, comm, timeout_s
        self._where, self._doing = where, doing
        self._pending: deque[tuple[str, object]] = deque()   # (what, DONE) in issue order
        self.aborted = ""                                      # why the communicator was aborted

    def check(self, method: str) -> None:
        """Refuse a call on a communicator the watchdog aborted."""
        if self.aborted:
            raise RuntimeError(format_error(self._where(method), "NCCL communicator", "one still usable",
                                            f"one aborted by the watchdog ({self.aborted})", FIX))

    def issued(self, what: str) -> object | None:
        """After a call queued on the compute stream: its DONE event (None: watchdog off)."""
        if self.timeout_s is None:
            return None
        done = self._lib.new_event()
        self._lib.record_event(done)
        self.track(what, done)
        return done

    def track(self, what: str, done) -> None:
        """Remember a call's DONE event until it is seen done (barrier names the oldest left)."""
        if self.timeout_s is None:
            return
        while self._pending and self._lib.event_done(self._pending[0][1]):
            self._pending.popleft()
        self._pending.append((what, done))

    def wait(self, method: str, what: str, done) -> None:
        """The host waits for ``done`` (a call's DONE), bounded (nothing when off). NCCL runs
        this communicator's calls in issue order, so the tracked calls issued before it are
        waited for too: on expiry the oldest one not done is named, the likeliest culprit."""
        if self.timeout_s is None or done is None:
            return
        waits = []
        for item in self._pending:
            waits.append(item)
            if item[1] is done:
                break
        else:
            waits = [(what, done)]
        self._poll(method, waits)

    def drain(self, method: str, what: str, *marks) -> None:
        """The host waits, bounded, for everything queued on the compute stream so far (a
        marker recorded now) and for ``marks`` (events recorded on other streams), naming the
        oldest tracked call not done on expiry."""
        if self.timeout_s is None:
            return
        marker = self._lib.new_event()
        self._lib.record_event(marker)
        self._poll(method, [*self._pending, *((what, m) for m in marks), (what, marker)])
        self._pending.clear()

    def _poll(self, method: str, waits: list) -> None:
        lib, began = self._lib, time.monotonic()
        deadline, pause = began + self.timeout_s, 0.0
        while True:
            waits = [w for w in waits if not lib.event_done(w[1])]
            if not waits:
                return
            problem = lib.async_error(self._comm)
            if problem is not None:
                self._fail(RuntimeError, method, waits[0][0], f"NCCL reported an asynchronous error: {problem}")
            now = time.monotonic()
            if now >= deadline:
                self._fail(TimeoutError, method, waits[0][0],
                           f"not done after {now - began:.1f} s: a member has not joined it, or joined another "
                           "collective")
            if now - began > SPIN_S:
                pause = min(MAX_PAUSE_S, max(MIN_PAUSE_S, 2 * pause))
            time.sleep(pause)                  # 0 while spinning: lets the message channels' threads run

    def _fail(self, kind: type, method: str, what: str, actual: str) -> None:
        """Abort the NCCL communicator (its waiting kernels return) and raise ``kind``."""
        self.aborted = f"{what}: {actual}"
        self._lib.abort(self._comm)
        doing = self._doing()
        last = f" (this rank's last program call: {doing})" if doing else ""
        raise kind(format_error(self._where(method), "collective", f"{what} done within the watchdog's "
                                f"{self.timeout_s:g} s ({WATCHDOG_ENV})", f"{actual}{last}; the NCCL "
                                "communicator is aborted", FIX))


class CollectiveStream:
    """The stream a communicator's non-blocking collectives run on, made at first use."""

    def __init__(self, lib: NcclLib, watch: NcclWatch):
        self._lib, self._watch, self._stream = lib, watch, None

    @property
    def stream(self):
        if self._stream is None:
            self._stream = self._lib.new_stream()
        return self._stream

    def start(self, issue: Callable[[int], None], hold: tuple, result: Callable[[], object], method: str,
              what: str) -> Request:
        """Queue ``issue(stream handle)`` (the NCCL call; the buffers ``hold`` made and
        allocated on the compute stream) on this stream after READY; the request's wait
        returns ``result()``, made on the compute stream after DONE."""
        lib, stream = self._lib, self.stream
        ready, done = lib.new_event(), lib.new_event()
        lib.record_event(ready)                # READY: send made, out allocated (compute stream)
        lib.wait_event(ready, stream)
        issue(lib.stream_handle(stream))
        lib.record_event(done, stream)         # DONE
        self._watch.track(what, done)
        return CollectiveRequest(lib, self._watch, done, hold, result, method, what)

    def marks(self) -> tuple:
        """An event recorded now on this stream, reached once its queued calls are done
        (none before the stream is made)."""
        if self._stream is None:
            return ()
        mark = self._lib.new_event()
        self._lib.record_event(mark, self._stream)
        return (mark,)

    def join(self) -> None:
        """Make the compute stream wait for everything queued here so far (on the GPU)."""
        for mark in self.marks():
            self._lib.wait_event(mark)


class CollectiveRequest(Request):
    """A collective on the collective stream: ``test`` asks whether DONE is reached, ``wait``
    waits for it (the host bounded by the watchdog, the compute stream on the GPU) and
    returns the result; the buffers are held until then."""

    def __init__(self, lib: NcclLib, watch: NcclWatch, done, hold: tuple, result: Callable[[], object],
                 method: str, what: str):
        self._lib, self._watch, self._done, self._hold, self._result = lib, watch, done, hold, result
        self._method, self._what = method, what

    def test(self) -> bool:
        return self._lib.event_done(self._done)

    def wait(self):
        self._watch.check(self._method)        # aborted: the result would be garbage
        self._watch.wait(self._method, self._what, self._done)
        self._lib.wait_event(self._done)       # the compute stream waits for DONE
        out = self._result()
        self._hold = ()                        # freed on the compute stream, now ordered after DONE
        return out

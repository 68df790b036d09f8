"""The MPI collective watchdog: non-blocking calls polled against a deadline, and a side
channel through which each member learns who never arrived.

With ``CommChecks(watchdog_s=T)`` every call on an MPICommunicator goes through here::

    (made once)            an Idup of the communicator, polled like the calls below
    collective #k (kind)   1. Isend [k, kind] to every other member on that duplicate
                           2. Irecv the others' [k, kind] from them
                           3. start the non-blocking collective (Iallreduce, Ibcast, ...)
                           4. poll all of them until done, or until T seconds have passed
    send / recv            Isend / Irecv, polled the same way (no arrival messages)
    iallreduce             steps 1-3 when it starts (begin), step 4 when it is waited for (finish)

A member waits for every other member's arrival as well as for its own collective, so when
collective #k completes here, every member has entered it (even a broadcast root, which MPI
may let go early). On timeout the arrivals tell who never entered #k -- those members last
entered #k-1 on this group -- and who entered something else; the report goes to stderr and
the job is aborted (``MPI.COMM_WORLD.Abort``): the missing member may never come back.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .checks import COLLECTIVES, describe, timeout_report

ARRIVAL_TAG = 1
SPIN_S = 1.0        # poll without sleeping this long (as MPI's blocking calls do: a non-blocking collective
                    # progresses only while it is tested), then sleep between polls
MIN_PAUSE_S = 5e-5   # between polls, starting at this pause and doubling up to
MAX_PAUSE_S = 5e-3   # this one (the most latency a long watched wait may gain)


ABORT_GRACE_S = 0.5   # seconds between printing the report and aborting


@dataclass
class Watched:
    """A collective begun under the watchdog: its request and the arrival messages."""

    kind: str
    seq: int
    doing: str
    mine: np.ndarray                 # [seq, kind code] sent to every other member
    theirs: dict                     # member -> the [seq, kind code] it sends
    request: object                  # the collective's MPI request
    sends: list
    recvs: dict                      # member -> its arrival's MPI request

    def requests(self) -> list:
        return [self.request, *self.sends, *self.recvs.values()]


class MPIWatchdog:
    """Deadline-polled waits for one MPI communicator (group = world ranks, member order)."""

    def __init__(self, MPI, comm, ranks: tuple[int, ...], timeout_s: float):
        self._MPI, self._ranks, self._timeout = MPI, ranks, timeout_s
        self._rank = comm.Get_rank()
        self._others = [m for m in range(len(ranks)) if m != self._rank]
        self._side = self._duplicate(comm)

    def _duplicate(self, comm):
        """The side channel: a duplicate of ``comm``, made on every member (non-blocking and
        polled, so that a member that never gets here -- died before ``autopar.init()`` --
        stops the job instead of hanging it)."""
        side, request = comm.Idup()
        began = time.monotonic()
        if not self._poll([request], began):
            self.abort(timeout_report("autopar", self._ranks[self._rank], time.monotonic() - began,
                                      f"creating the communicator of group {self._ranks} (MPI_Comm_idup)",
                                      ["the members that never created it (exited, or stuck before "
                                       "autopar.init() or the same split)"], [self._ranks[self._rank]]))
        return side

    def collective(self, start, kind: str, seq: int, doing: str = "") -> None:
        """Run ``start()`` (which issues the non-blocking collective #seq and returns its
        request) and wait for it and for every member's arrival at it; ``doing`` (what this
        rank last started) goes into the report."""
        self.finish(self.begin(start, kind, seq, doing))

    def begin(self, start, kind: str, seq: int, doing: str = "") -> Watched:
        """Tell the other members this one entered collective #seq, listen for theirs, and
        run ``start()``; :meth:`finish` waits for all of it (a non-blocking collective's
        wait: the deadline counts from there)."""
        mine = np.array([seq, COLLECTIVES.index(kind)], dtype=np.int64)
        sends = [self._side.Isend(mine, dest=m, tag=ARRIVAL_TAG) for m in self._others]
        theirs = {m: np.empty(2, dtype=np.int64) for m in self._others}
        recvs = {m: self._side.Irecv(buf, source=m, tag=ARRIVAL_TAG) for m, buf in theirs.items()}
        return Watched(kind, seq, doing, mine, theirs, start(), sends, recvs)

    def test(self, watched: Watched) -> bool:
        """Whether the collective and the arrivals have completed (progresses them)."""
        return self._MPI.Request.Testall(watched.requests())

    def finish(self, watched: Watched) -> None:
        """Wait for a begun collective and every member's arrival at it, or report who is
        missing and abort the job after the timeout."""
        began = time.monotonic()
        if self._poll(watched.requests(), began):
            return
        kind, seq, mine = watched.kind, watched.seq, watched.mine
        arrived, missing = [self._ranks[self._rank]], []
        for m, req in watched.recvs.items():
            if not req.Test():
                last = f"its last collective on this group was #{seq - 1}" if seq > 1 else \
                    "it has issued no collective on this group"
                missing.append(f"rank {self._ranks[m]} (never entered it; {last})")
            elif tuple(watched.theirs[m]) != tuple(mine):
                k, code = (int(v) for v in watched.theirs[m])
                missing.append(f"rank {self._ranks[m]} (entered {COLLECTIVES[code]} #{k} instead)")
            else:
                arrived.append(self._ranks[m])
        self.abort(timeout_report("autopar", self._ranks[self._rank], time.monotonic() - began,
                                  describe(kind, seq, self._ranks), missing, sorted(arrived), watched.doing))

    def p2p(self, request, what: str, peer: int, status=None, doing: str = "") -> None:
        """Wait for a send or recv with member ``peer``; ``what`` names it."""
        began = time.monotonic()
        if self._poll([request], began, status):
            return
        self.abort(timeout_report("autopar", self._ranks[self._rank], time.monotonic() - began,
                                  f"{what} on group {self._ranks}",
                                  [f"rank {self._ranks[peer]} (has not made the matching call)"],
                                  [self._ranks[self._rank]], doing))

    def _poll(self, requests: list, began: float, status=None) -> bool:
        """Test until all requests complete (True) or the deadline passes (False)."""
        deadline, pause = began + self._timeout, 0.0
        while True:
            done = requests[0].Test(status) if status is not None else self._MPI.Request.Testall(requests)
            if done:
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now - began > SPIN_S:
                time.sleep(pause)
                pause = min(MAX_PAUSE_S, max(MIN_PAUSE_S, 2 * pause))

    def abort(self, report: str) -> None:
        """Print ``report`` to stderr and abort the MPI job (never returns)."""
        sys.stderr.write(f"{report}; aborting the MPI job\n")
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)   # let the launcher forward the report before Abort tears the job down
        self._MPI.COMM_WORLD.Abort(1)
        os._exit(1)   # MPICH's Abort may return before the launcher ends us: never resume the program

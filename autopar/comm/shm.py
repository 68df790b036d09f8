"""Sums over the ranks of one host through a shared-memory window, for the MPI backend.

When every member of an MPI communicator runs on one host, a large sum need not travel
through MPI's messages. The members map one shared window of (n + 1) slots and, for each
piece of the buffer (at most a slot)::

    1. member i copies its piece into slot i                       writes P bytes
       (an all-reduce's input may be several arrays: read where they are, never joined)
    2. barrier
    3. member i sums its 1/n of the piece over slots 0, 1, ..., n-1 reads P, writes P/n
       (allreduce: into the result slot n; reduce_scatter: its own block, into its output)
    4. barrier
    5. allreduce only: member i copies the whole result slot out   reads P

Every element is summed in member order, so all members get the same bits, and the bits
the in-process backend gives. A piece costs two barriers; the next piece may overwrite the
slots and the result after step 4, and member i reaches step 3 of the next piece only after
every member has copied this piece out (the barrier of step 2 waits for them).

Measured on the lent 16-core host (68 MB of float32, ``devrun/arprobe.py``, session 15):

    ranks    MPI_Allreduce   MPI_Iallreduce, 3 buckets   shared window
      2          41 ms                58 ms                  19 ms
      8          69 ms               133 ms                  25 ms
     16          93 ms               181 ms                  33 ms

The sum runs when it is called (blocking): members reach it in program order, as they
reach any collective, so it cannot reorder one member's calls against another's.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import format_error

SLOT_BYTES = 4 * 1024 * 1024   # per member; the window is (n + 1) slots: 68 MB for 16 ranks
MIN_BYTES = 256 * 1024         # smaller sums go through MPI (two barriers cost more than they save)
ENV = "AUTOPAR_COMM_SHM"       # "0": never use the window; "1" or unset: use it
SHM_DIR = "/dev/shm"           # where MPI's shared windows live on Linux


def wanted(environ=None) -> bool:
    """Whether the environment lets MPI communicators sum through shared memory: ``AUTOPAR_COMM_SHM``
    unset, "" or "1" yes, "0" no; anything else is an error naming the variable."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(format_error(ENV, "value", "'1' (on, the default) or '0' (off)", repr(value)))
    return value != "0"


def room(nbytes: int) -> bool:
    """Whether the host's shared-memory filesystem has twice ``nbytes`` free (a window past
    it would fail at first touch with SIGBUS, not at allocation)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= 2 * nbytes


class SharedSum:
    """Sums over the n >= 2 members of ``node`` (an MPI communicator all on one host) through one
    shared window of (n + 1) slots of ``slot_bytes`` (default SLOT_BYTES); ``barrier()`` is the
    node's barrier (watched, where the caller watches). Made collectively over ``node``."""

    def __init__(self, MPI, node, barrier, slot_bytes: int | None = None):
        slot_bytes = SLOT_BYTES if slot_bytes is None else slot_bytes
        self._n, self._rank = node.Get_size(), node.Get_rank()
        self._node, self._barrier, self._slot_bytes = node, barrier, slot_bytes
        total = (self._n + 1) * slot_bytes
        self._win = MPI.Win.Allocate_shared(total if self._rank == 0 else 0, 1, comm=node)
        memory, _ = self._win.Shared_query(0)
        self._memory = np.frombuffer(memory, np.uint8, count=total)   # ((n + 1) * slot_bytes,) bytes
        self._win.Lock_all(MPI.MODE_NOCHECK)   # a passive epoch for the whole life: Sync orders memory

    def _rows(self, dtype: np.dtype) -> np.ndarray:
        """The window as (n + 1, slot elements) of ``dtype``: rows 0..n-1 the members' slots, row n the result."""
        width = self._slot_bytes // dtype.itemsize
        return self._memory[:(self._n + 1) * width * dtype.itemsize].view(dtype).reshape(self._n + 1, width)

    def _fence(self) -> None:
        self._barrier()
        self._win.Sync()   # what the others wrote before the barrier is visible after it

    def _sum(self, rows: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
        """out = rows[0, lo:hi] + rows[1, lo:hi] + ... in member order."""
        np.add(rows[0, lo:hi], rows[1, lo:hi], out=out)
        for k in range(2, self._n):
            np.add(out, rows[k, lo:hi], out=out)

    def allreduce(self, parts: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
        """out = the sum over members of ``parts`` joined end to end: each part 1-d and
        contiguous, all of out's dtype, out (total,) (``out`` may be the only part). The
        parts are read where they are, never joined first."""
        rows, n, i = self._rows(out.dtype), self._n, self._rank
        width = rows.shape[1]
        cursor = [0, 0]                                 # the next part to read, and where in it
        for start in range(0, out.size, width):
            m = min(width, out.size - start)
            _fill(rows[i, :m], parts, cursor)
            self._fence()
            lo, hi = i * m // n, (i + 1) * m // n      # this member's share of the piece
            self._sum(rows, lo, hi, rows[n, lo:hi])
            self._fence()
            out[start:start + m] = rows[n, :m]
        return out

    def reduce_scatter(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = block i (this member's) of the sum of every member's ``x``: x (n, b), out (b,)."""
        rows, n, i = self._rows(x.dtype), self._n, self._rank
        cols = rows.shape[1] // n                       # columns of every block per piece
        b = x.shape[1]
        for start in range(0, b, cols):
            m = min(cols, b - start)
            rows[i, :n * m].reshape(n, m)[:] = x[:, start:start + m]   # slot i: (n, m), block j in row j
            self._fence()
            self._sum(rows, i * m, (i + 1) * m, out[start:start + m])
            self._barrier()                             # the slots are free again
        return out


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

"""Opt-in run-time checks of communication, carried by the communicator: a collective
watchdog and a debug mode that compares the collectives the members issue.

Both are off by default. A ``CommChecks`` value is given to ``world(checks=...)`` (which
otherwise reads ``AUTOPAR_COMM_WATCHDOG`` and ``AUTOPAR_COMM_DEBUG`` once) or to
``run_in_process(..., checks=...)``; every communicator split from one inherits it. Each
member numbers the collectives it issues on a communicator 1, 2, 3, ...: ``allreduce #3 on
group (0, 1, 2)`` is the third collective that member issued on the group of world ranks
0, 1, 2, and names the same call on every member as long as they agree.

| check       | cost while on, per collective                           | on failure                                |
|-------------|----------------------------------------------------------|-------------------------------------------|
| debug       | one all-gather of a FINGERPRINT_BYTES record per member: | every member raises CollectiveMismatchError|
|             | kind, arguments, local shape, dtype, call site           | naming #k and what each rank issued; the  |
|             | (file:line in function, outside autopar/comm)            | collective itself is not issued           |
| watchdog_s  | MPI: non-blocking collective polled against a deadline,  | MPI: stderr names the collective and the  |
|             | and a small "arrived at #k" message to each member on a  | members missing from it, then MPI Abort;  |
|             | duplicated communicator; in-process: a timestamp         | in-process: CollectiveTimeoutError        |

Off, a collective pays one counter increment: no extra messages, the blocking MPI calls.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import format_error

WATCHDOG_ENV = "AUTOPAR_COMM_WATCHDOG"   # seconds; unset, "" or "0": off
DEBUG_ENV = "AUTOPAR_COMM_DEBUG"         # "1": on; unset, "" or "0": off
FINGERPRINT_BYTES = 256                  # per member: DIGEST_BYTES of hash, then the text
DIGEST_BYTES = 16
COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "barrier", "split")
_HERE = os.path.dirname(os.path.abspath(__file__))


class CollectiveMismatchError(RuntimeError):
    """The members of a group called different collectives (or the same with other arguments)."""


class CollectiveTimeoutError(TimeoutError):
    """A collective did not complete within the watchdog's timeout (in-process backend)."""


@dataclass(frozen=True)
class CommChecks:
    """``watchdog_s``: seconds a collective may wait before the job is stopped (None: off);
    ``debug``: compare every collective's fingerprint across the members first."""

    watchdog_s: float | None = None
    debug: bool = False

    def __post_init__(self):
        w = self.watchdog_s
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))):
            raise TypeError(format_error("CommChecks", "watchdog_s", "None or a number of seconds", repr(w)))
        if w is not None and not (math.isfinite(w) and w > 0):
            raise ValueError(format_error("CommChecks", "watchdog_s", "None or a finite number of seconds > 0",
                                          repr(w), "pass None to turn the watchdog off"))
        if not isinstance(self.debug, bool):
            raise TypeError(format_error("CommChecks", "debug", "True or False", repr(self.debug)))
        object.__setattr__(self, "watchdog_s", None if w is None else float(w))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CommChecks:
        """The checks ``AUTOPAR_COMM_WATCHDOG`` (seconds) and ``AUTOPAR_COMM_DEBUG`` (0/1) ask for."""
        environ = os.environ if environ is None else environ
        raw = environ.get(WATCHDOG_ENV, "").strip()
        try:
            seconds = float(raw) if raw else 0.0
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(format_error("environment", WATCHDOG_ENV, "a number of seconds (0 or unset: off)",
                                          repr(raw), f"e.g. {WATCHDOG_ENV}=60"))
        flag = environ.get(DEBUG_ENV, "").strip()
        if flag not in ("", "0", "1"):
            raise ValueError(format_error("environment", DEBUG_ENV, "'1' (on) or '0' (off)", repr(flag)))
        return cls(watchdog_s=seconds or None, debug=flag == "1")

    def __str__(self) -> str:
        watchdog = "off" if self.watchdog_s is None else f"{self.watchdog_s:g} s"
        return f"CommChecks(watchdog={watchdog}, debug={'on' if self.debug else 'off'})"


def describe(kind: str, seq: int, ranks: Sequence[int]) -> str:
    """How every message names a collective: ``allreduce #3 on group (0, 1, 2)``."""
    return f"{kind} #{seq} on group {tuple(ranks)}"


def timeout_report(where: str, rank: int, waited: float, what: str, missing: Sequence[str],
                   arrived: Sequence[int]) -> str:
    """The watchdog's message, the same for both backends."""
    here = f"{'rank' if len(arrived) == 1 else 'ranks'} {', '.join(map(str, arrived))}" if arrived else "none"
    return (f"{where}: collective watchdog: rank {rank} waited {waited:.1f} s in {what}; "
            f"missing: {'; '.join(missing) or 'none'}; arrived: {here}")


# ---- debug mode: fingerprints ---------------------------------------------------------------

def call_site() -> str:
    """``file.py:line in function`` of the nearest caller outside autopar/comm."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _HERE:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def fingerprint(kind: str, args: Mapping, x: np.ndarray | None, site: str) -> np.ndarray:
    """FINGERPRINT_BYTES uint8: a digest of the whole call, then its text (cut to fit)."""
    body = ", ".join(f"{k}={v!r}" for k, v in args.items())
    data = "" if x is None else f" {x.shape} {x.dtype}"
    text = f"{kind}({body}){data} at {site}"
    digest = hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()
    record = np.zeros(FINGERPRINT_BYTES, dtype=np.uint8)
    raw = digest + text.encode()[:FINGERPRINT_BYTES - DIGEST_BYTES]
    record[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return record


def divergence(records: np.ndarray, seq: int, ranks: Sequence[int]) -> str | None:
    """None when every member's record (one row each, member order) is the same, else the
    message naming collective #seq and what each rank issued."""
    digests = [bytes(r[:DIGEST_BYTES]) for r in records]
    if len(set(digests)) == 1:
        return None
    calls: dict[bytes, list[int]] = {}
    for world_rank, d in zip(ranks, digests):
        calls.setdefault(d, []).append(world_rank)
    texts = {bytes(r[:DIGEST_BYTES]): bytes(r[DIGEST_BYTES:]).rstrip(b"\0").decode(errors="replace")
             for r in records}
    issued = "; ".join(f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))}: {texts[d]}"
                       for d, rs in calls.items())
    return format_error(f"collective #{seq} on group {tuple(ranks)} (comm debug mode)", "calls",
                        "the same collective on every member (kind, arguments, shape, dtype, call site)", issued,
                        "make every member of the group issue the same collectives in the same order, "
                        "from the same place")

"""Run-time checks of communication, carried by the communicator: a collective watchdog,
a debug mode that compares the collectives the members issue, and how often the programs
compare their inputs across ranks (:mod:`autopar.comm.consistency`).

A ``CommChecks`` value is given to ``world(checks=...)`` (which otherwise reads
``AUTOPAR_COMM_WATCHDOG``, ``AUTOPAR_COMM_DEBUG`` and ``AUTOPAR_CHECK_EVERY`` once:
:meth:`CommChecks.from_env`) or to ``run_in_process(..., checks=...)``; every communicator
split from one inherits it. An MPI job gets the watchdog by default (``DEFAULT_WATCHDOG_S``);
``CommChecks()``, what in-process runs get unless told, has it off. Each member numbers the
collectives it issues on a communicator 1, 2, 3, ...: ``allreduce #3 on group (0, 1, 2)`` is
the third collective that member issued on the group of world ranks 0, 1, 2, and names the
same call on every member as long as they agree.

| check       | cost while on, per collective                           | on failure                                |
|-------------|----------------------------------------------------------|-------------------------------------------|
| debug       | one all-gather of a FINGERPRINT_BYTES record per member: | every member raises CollectiveMismatchError|
|             | kind, arguments, local shape, dtype, call site           | naming #k and what each rank issued; the  |
|             | (file:line in function, outside autopar/comm)            | collective itself is not issued           |
| watchdog_s  | MPI: non-blocking collective polled against a deadline,  | MPI: stderr names the collective and the  |
|             | and a small "arrived at #k" message to each member on a  | members missing from it, then MPI Abort;  |
|             | duplicated communicator; in-process: a timestamp         | in-process: CollectiveTimeoutError        |
| check_every | per program call, not per collective: one all-gather of  | every member raises RankDivergenceError   |
|             | a few int64 on the first call and every check_every-th   | naming the ranks and what differs         |
|             | (every call in debug mode; 0: never, not even the first) |                                           |

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

from ..errors import check_int, format_error

WATCHDOG_ENV = "AUTOPAR_COMM_WATCHDOG"   # seconds; unset or "": DEFAULT_WATCHDOG_S; "0": off
DEBUG_ENV = "AUTOPAR_COMM_DEBUG"         # "1": on; unset, "" or "0": off
CHECK_EVERY_ENV = "AUTOPAR_CHECK_EVERY"  # calls between consistency checks; unset: DEFAULT_CHECK_EVERY; "0": off
DEFAULT_WATCHDOG_S = 300.0               # long enough for any one collective of a sane job, short enough to page
DEFAULT_CHECK_EVERY = 100
FINGERPRINT_BYTES = 256                  # per member: DIGEST_BYTES of hash, then the text
DIGEST_BYTES = 16
COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast", "barrier", "split", "check")
_HERE = os.path.dirname(os.path.abspath(__file__))


class CollectiveMismatchError(RuntimeError):
    """The members of a group called different collectives (or the same with other arguments)."""


class CollectiveTimeoutError(TimeoutError):
    """A collective did not complete within the watchdog's timeout (in-process backend)."""


@dataclass(frozen=True)
class CommChecks:
    """``watchdog_s``: seconds a collective may wait before the job is stopped (None: off);
    ``debug``: compare every collective's fingerprint across the members first, and the
    programs' inputs at every call; ``check_every``: compare the programs' inputs and step
    counters across ranks at the first call and every that many calls (0: never)."""

    watchdog_s: float | None = None
    debug: bool = False
    check_every: int = DEFAULT_CHECK_EVERY

    def __post_init__(self):
        w = self.watchdog_s
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))):
            raise TypeError(format_error("CommChecks", "watchdog_s", "None or a number of seconds", repr(w)))
        if w is not None and not (math.isfinite(w) and w > 0):
            raise ValueError(format_error("CommChecks", "watchdog_s", "None or a finite number of seconds > 0",
                                          repr(w), "pass None to turn the watchdog off"))
        if not isinstance(self.debug, bool):
            raise TypeError(format_error("CommChecks", "debug", "True or False", repr(self.debug)))
        every = self.check_every
        check_int("CommChecks", "check_every", every, 0, expected="an int >= 0 (0: no consistency check)")
        object.__setattr__(self, "watchdog_s", None if w is None else float(w))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CommChecks:
        """The checks an MPI job runs with: ``AUTOPAR_COMM_WATCHDOG`` seconds (unset:
        DEFAULT_WATCHDOG_S, 0: off), ``AUTOPAR_COMM_DEBUG`` (0/1) and ``AUTOPAR_CHECK_EVERY``
        calls (unset: DEFAULT_CHECK_EVERY, 0: off)."""
        environ = os.environ if environ is None else environ
        watchdog_s = _env_number(environ, WATCHDOG_ENV, DEFAULT_WATCHDOG_S, "a number of seconds (0: off)", "60")
        every = _env_number(environ, CHECK_EVERY_ENV, DEFAULT_CHECK_EVERY, "a whole number of calls (0: off)", "10")
        if every != int(every):
            raise ValueError(format_error("environment", CHECK_EVERY_ENV, "a whole number of calls (0: off)",
                                          repr(environ[CHECK_EVERY_ENV])))
        flag = environ.get(DEBUG_ENV, "").strip()
        if flag not in ("", "0", "1"):
            raise ValueError(format_error("environment", DEBUG_ENV, "'1' (on) or '0' (off)", repr(flag)))
        return cls(watchdog_s=watchdog_s or None, debug=flag == "1", check_every=int(every))

    @property
    def check_interval(self) -> int:
        """Calls between consistency checks: 1 in debug mode, else check_every (0: never)."""
        return 1 if self.debug else self.check_every

    def __str__(self) -> str:
        watchdog = "off" if self.watchdog_s is None else f"{self.watchdog_s:g} s"
        every = "off" if self.check_interval == 0 else f"every {self.check_interval} calls"
        return f"CommChecks(watchdog={watchdog}, debug={'on' if self.debug else 'off'}, consistency={every})"


def _env_number(environ: Mapping[str, str], name: str, default: float, expected: str, example: str) -> float:
    """A finite number >= 0 from ``environ[name]``; ``default`` when unset or blank."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(format_error("environment", name, expected, repr(raw), f"e.g. {name}={example}"))
    return value


def describe(kind: str, seq: int, ranks: Sequence[int]) -> str:
    """How every message names a collective: ``allreduce #3 on group (0, 1, 2)``."""
    return f"{kind} #{seq} on group {tuple(ranks)}"


def timeout_report(where: str, rank: int, waited: float, what: str, missing: Sequence[str],
                   arrived: Sequence[int], doing: str = "") -> str:
    """The watchdog's message, the same for both backends; ``doing``: what the waiting rank
    last started (CommStats.doing), if anything."""
    here = f"{'rank' if len(arrived) == 1 else 'ranks'} {', '.join(map(str, arrived))}" if arrived else "none"
    last = f" (its last program call: {doing})" if doing else ""
    return (f"{where}: collective watchdog: rank {rank} waited {waited:.1f} s in {what}{last}; "
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

"""Ranks that save or load together take the same branch at every step: each step ends in
one small allgather of every rank's outcome, so a failure on one rank raises on all of
them instead of leaving the others waiting in a collective. The ranks are those of the
parallel context's world (``context_world``) unless the caller names them."""
from __future__ import annotations

import json

import numpy as np

from ...context import current_world, require_init
from .safe_save import NoSpaceError


def _exchange(world, entries) -> list:
    """Every rank's JSON-able value, on every rank (JSON through an allgather of bytes)."""
    if world is None or world.size == 1:
        return [entries]
    data = np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)
    lengths = world.allgather(np.array([data.size], dtype=np.int64))
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[:data.size] = data
    gathered = world.allgather(padded[None, :])
    return [json.loads(gathered[r, :int(n)].tobytes()) for r, n in enumerate(lengths)]


_AGREED_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, OSError, FileExistsError,
                                                 FileNotFoundError, PermissionError, NoSpaceError)}


def agree(world, where: str, error: Exception | None, payload=None) -> list:
    """Every rank's payload, on every rank; or, when any rank failed, an error on every rank
    (its own on the failing rank; on the others one of the same kind naming that rank), so
    that all ranks take the same branch and none waits for the others in a collective."""
    everyone = _exchange(world, {"error": None if error is None else [type(error).__name__, str(error)],
                                 "payload": payload})
    if error is not None:
        raise error
    for rank, report in enumerate(everyone):
        if report["error"] is not None:
            kind, message = report["error"]
            raise _AGREED_ERRORS.get(kind, RuntimeError)(f"{where}: rank {rank} failed: {kind}: {message}")
    return [report["payload"] for report in everyone]


def context_world(where: str):
    """The world of the parallel context; under an MPI launcher, only after autopar.init():
    without it every rank would save alone as rank 0, all to the same files."""
    require_init(where)
    return current_world()

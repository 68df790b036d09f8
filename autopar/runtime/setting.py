"""The parallel setting a compile runs under: read once from the context per compile, never
in the step loop, and the part of it the compile cache keys on."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..context import ParallelContext, current_context, current_world, require_init
from ..errors import format_error

DEFAULT_CONTEXT = ParallelContext()   # the context's defaults, for a program built without one (frozen)


@dataclass(frozen=True)
class CompileSetting:
    """What a sharded compile runs under, read once from the parallel context: the parallel
    mode, the world of ranks, whether every rank is fed the whole batch, and the context
    itself (a frozen value). Read by name, never by position."""

    mode: str
    world: object
    full_batch: bool
    ctx: ParallelContext


def parallel_setting() -> CompileSetting | None:
    """The :class:`CompileSetting` when the context asks for sharded execution, else
    None. Read once per compile, never in the step loop.

    Under an MPI launcher without ``autopar.init()`` any program is an error, stand-alone
    too (each process would train alone, silently; a script that means it binds a one-rank
    world: ``bound_world(SelfCommunicator())``). A parallel mode is checked against the
    ranks running: a ``device_num`` other than the number of ranks is an error too (one
    process planning 4 devices would train serially). Planning on paper needs no program (``python -m autopar.plan``)."""
    ctx = current_context()
    require_init(f"compiling a {ctx.parallel_mode} program")
    if ctx.parallel_mode == "stand_alone":
        return None
    world = current_world()
    if ctx.device_num not in (1, world.size):
        n = ctx.device_num
        raise ValueError(format_error(
            "ParallelContext", "device_num", f"the number of ranks running ({world.size}, or 1 for 'as many as run')",
            f"{n} with parallel_mode={ctx.parallel_mode!r}",
            f"launch {n} processes (mpiexec -n {n} python script.py, calling autopar.init()), run {n} in-process "
            f"ranks (autopar.comm.run_in_process({n}, fn) with autopar.context.bound_world), or set "
            "parallel_mode='stand_alone' to train on one process; to plan without running, use "
            "python -m autopar.plan"))
    if world.size == 1:
        return None
    return CompileSetting(ctx.parallel_mode, world, ctx.loads_full_batch, ctx)


def setting_key(setting: CompileSetting | None) -> tuple | None:
    """What of the parallel setting a compiled program depends on, as a hashable value for
    the compile cache: the whole context (every field may change the plan: search mode,
    optimizer parallel, dataset strategy, strategy files, ...) and which fields the user set
    (the joint search chooses the others), the world it runs on, and
    the loaded strategy file's size and modification time (a file rewritten under the same
    name is another plan). None for a serial program."""
    if setting is None:
        return None
    ctx = setting.ctx
    return ctx, ctx.explicit, id(setting.world), _file_stamp(ctx.strategy_ckpt_load_file)


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except FileNotFoundError:
        return None
    return st and (st.st_size, st.st_mtime_ns)

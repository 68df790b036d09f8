"""The command line of ``python -m autopar.calibrate``: arguments, checks, the file written.

``--device-target CPU`` (the default) measures the CPU cores and MPI links of every rank
(:mod:`.cpu`); ``--device-target GPU`` measures one GPU through CuPy on one rank (:mod:`.gpu`).
Arguments are checked on rank 0 before anything is measured; a bad one stops every rank with
a usage error naming the argument, what was expected and what was given.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..backend import gpu_problem
from ..comm import world
from ..comm.mpi import processor_name
from ..strategy.profile import MachineProfile, load_profile
from .cpu import FULL, GEMM_DTYPES, QUICK, calibrate, gather_hosts
from .gpu import GPU_FULL, GPU_GEMM_DTYPES, GPU_QUICK, calibrate_gpu

TARGETS = ("CPU", "GPU")
TARGET_DTYPES = {"CPU": GEMM_DTYPES, "GPU": GPU_GEMM_DTYPES}


def _dtype_list(text: str | None, target: str) -> tuple[tuple[str, ...], str]:
    """(the GEMM dtypes ``--dtypes`` names, the target's default without it; what is wrong
    with it, '' if nothing)."""
    allowed = TARGET_DTYPES[target]
    if text is None:
        return allowed, ""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in allowed]
    if not names or bad:
        return (), (f"argument --dtypes: expected a comma-separated list of {', '.join(allowed)}, got {text!r}"
                     + (f" ({', '.join(bad)} unknown)" if bad else "")
                     + (f" on device target {target}" if target != "CPU" else ""))
    return tuple(dict.fromkeys(names)), ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autopar.calibrate",
        description="Measure this machine (GEMM, memory bandwidth, per-op overhead, all-reduce latency and "
                    "bandwidth inside and between hosts) and write a machine profile JSON that "
                    "autopar.strategy.profile.load_profile reads. Run under mpiexec -n N (N >= 2), one rank "
                    "per device, with OPENBLAS_NUM_THREADS=1.")
    parser.add_argument("--out", help="profile file to write (default: profile-<host>.json)")
    parser.add_argument("--name", help="profile name (default: <host>-<ranks>rank)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds, less exact)")
    parser.add_argument("--dtypes", help=f"GEMM dtypes to measure, comma-separated (default: CPU "
                                         f"{','.join(GEMM_DTYPES)}; GPU {','.join(GPU_GEMM_DTYPES)})")
    parser.add_argument("--device-target", type=str.upper, choices=TARGETS, default="CPU",
                        help="CPU (default): the CPU cores and MPI links of every rank; GPU: one NVIDIA GPU "
                             "through CuPy, one rank, with --like for the collective figures")
    parser.add_argument("--like", help="with one rank only: a profile (shipped name or .json path) to copy the "
                                       "collective figures from, since one rank cannot time a collective")
    return parser


def _out_problem(path: Path) -> str:
    """Why ``path`` cannot be written, or '' when it can."""
    if path.is_dir():
        return "it is a directory"
    parent = path.parent
    if not parent.is_dir():
        return f"its folder {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its folder {str(parent)!r} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return "the file exists and is not writable"
    return ""


def _check_run(out: Path, like_name: str | None, ranks: int, target: str = "CPU",
               gpu_missing: Callable[[], str] = gpu_problem) -> tuple[str, MachineProfile | None]:
    """(what is wrong with this run, '' if nothing; the --like profile, if one is used).
    ``gpu_missing`` says what the GPU target lacks here ('' if nothing)."""
    problem = _out_problem(out)
    if problem:
        return f"argument --out: expected a writable file path, got {str(out)!r}: {problem}", None
    if target == "GPU" and ranks > 1:
        return (f"argument --device-target: expected GPU on one rank (it measures one GPU), got {ranks} ranks; "
                f"run python -m autopar.calibrate --device-target GPU without mpiexec"), None
    if target == "GPU" and like_name is None:
        return ("argument --like: expected a profile to copy the collective figures from with --device-target "
                "GPU (one rank cannot time a collective), got none; pass --like h100-8 (a shipped name or a "
                ".json path)"), None
    if ranks == 1 and like_name is None:
        return ("ranks: expected 2 or more MPI ranks to measure collectives, got 1; run "
                "mpiexec -n 2 python -m autopar.calibrate ..., or pass --like PROFILE to copy the "
                "collective figures from a profile"), None
    if like_name is None:
        return "", None
    if ranks > 1:
        return (f"argument --like: expected only with one rank (it stands in for the collectives one rank "
                f"cannot time), got it with {ranks} ranks, which time them; drop --like"), None
    try:
        like = load_profile(like_name)
    except ValueError as err:
        return f"argument --like: {err}", None
    missing = gpu_missing() if target == "GPU" else ""
    if missing:
        return (f"argument --device-target: expected GPU on a machine where CuPy sees an NVIDIA GPU, got GPU "
                f"here, where {missing}"), None
    return "", like


def write_profile(profile: MachineProfile, path: Path) -> None:
    """Write ``profile`` as JSON to ``path`` atomically: a temporary file, then a rename."""
    data = profile.to_dict()
    data["sources"] = data.pop("sources")               # figures first, their sources last
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    comm = world()
    host = processor_name()
    parser = build_parser()
    quiet = io.StringIO()
    with contextlib.ExitStack() as stack:              # one copy of usage errors, from rank 0
        if comm.rank != 0:
            stack.enter_context(contextlib.redirect_stderr(quiet))
            stack.enter_context(contextlib.redirect_stdout(quiet))
        args = parser.parse_args(argv)
    dtypes, problem = _dtype_list(args.dtypes, args.device_target)
    host0 = gather_hosts(comm, host)[0]
    out = Path(args.out or f"profile-{host0}.json")
    name = args.name or f"{host0}-{comm.size}rank"
    like = None
    if comm.rank == 0 and not problem:
        problem, like = _check_run(out, args.like, comm.size, args.device_target)
    failed = comm.broadcast(np.array([bool(problem)]), root=0)[0]
    if failed:
        if comm.rank == 0:
            parser.error(problem)
        return 2
    if args.device_target == "GPU":
        profile = calibrate_gpu(name, like, GPU_QUICK if args.quick else GPU_FULL, dtypes)
    else:
        profile = calibrate(comm, host, name, QUICK if args.quick else FULL, dtypes, like)
    if comm.rank == 0:
        write_profile(profile, out)
        print(f"autopar.calibrate: wrote {out}")
        for field, value in profile.to_dict().items():
            if field != "sources":
                print(f"  {field:34s} {value}")
    comm.barrier()
    return 0


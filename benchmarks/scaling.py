"""Scaling of a PanGu-α training step over MPI ranks (data and model parallel).

The driver launches one MPI job per layout, each timing the same global batch, and prints
time per step, speedup over 1 rank and the share of the step spent redistributing
(collectives), all from this one run:

    python benchmarks/scaling.py                       # 1 and 2 ranks: dp2, mp2
    python benchmarks/scaling.py --ranks 1 2 4 8 --mpiexec-args "--bind-to core"

Where torch is installed, PyTorch is measured in the same run at the same rank counts as the
anchor: the same model (benchmarks/torch_pangu.py), global batch split the same way over
ranks, AdamW with the same hyperparameters and clip, one thread per rank; eager on 1 rank,
DistributedDataParallel over gloo on n ranks, launched by the same mpiexec command (rank and
size from MPI, the rendezvous at 127.0.0.1 on a free port). The table puts both side by
side, each framework's speedup over its own 1-rank step. ``--no-torch`` skips it.

``--paired`` (data parallel only) times both frameworks in one MPI job per rank count, taking
turns step by step, and each also without communication (every rank alone on its shard):

    python benchmarks/scaling.py --ranks 1 2 4 8 16 --batch 16 --steps 6 --fusion 25 --paired

``--ceiling 1024`` first measures the machine's ceiling: every rank running float32
GEMMs at once, per-rank GFLOP/s for each rank count (a step cannot scale past it).

Each rank uses one BLAS thread (OPENBLAS_NUM_THREADS=1). Dropout is off by default in both
(``--dropout 0.1`` turns it on). Step times are each framework's fastest of ``--steps``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import blas_line, table, worker_env

from autopar.models.pangu_alpha import PanguAlphaConfig

CONFIG = dict(vocab_size=8000, seq_length=256, hidden_size=512, num_layers=4, num_heads=8,
              ffn_hidden_size=2048)


def layouts(ranks: list[int]) -> list[tuple[int, int, str]]:
    out = []
    for n in ranks:
        if n == 1:
            out.append((1, 1, "stand_alone"))
            continue
        out.append((n, 1, "data_parallel"))
        if CONFIG["num_heads"] % n == 0:                    # model parallel splits the heads
            out.append((1, n, "semi_auto_parallel"))
        if n >= 4:
            out.append((n // 2, 2, "semi_auto_parallel"))
    return out


def global_ids(cfg, batch: int) -> np.ndarray:
    """The global batch (batch, S + 1), the same in every run and both frameworks."""
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.seq_length + 1)).astype(np.int32)


def local_batch(batch: int, comm, full: bool = False) -> np.ndarray:
    """This rank's rows of the global batch: all of it (``full``), else its 1/n share."""
    ids = global_ids(PanguAlphaConfig(**CONFIG), batch)
    return ids if full else np.split(ids, comm.size)[comm.rank]     # (batch, S+1) -> (batch/n, S+1)


@contextlib.contextmanager
def autopar_stepper(comm, dp: int, mp: int, mode: str, local_ids: np.ndarray, dropout: float,
                    bucket_mb: float | None):
    """autopar's training step on this rank's ``local_ids``, compiled and warmed up: yields
    ``step()``, which runs one step and returns (seconds, seconds in collectives)."""
    from autopar import nn
    from autopar.context import bound_world, parallel_context
    from autopar.models.pangu_alpha import PanguAlphaWithLoss
    from autopar.runtime.compiled import grad_program
    from autopar.train import AdamWeightDecay
    n = comm.size
    cfg = PanguAlphaConfig(data_parallel=dp, model_parallel=mp, dropout_rate=dropout, **CONFIG)
    full = mode != "data_parallel"
    rule = {"mode": "auto"} if bucket_mb == 0 else {"mode": "size", "config": bucket_mb}
    buckets = {"comm_fusion": {"allreduce": rule}} if bucket_mb is not None else {}

    @contextlib.contextmanager
    def scope():      # entered per step: steppers of different contexts take turns in one process
        with bound_world(comm), parallel_context(parallel_mode=mode, device_num=n, full_batch=full, **buckets):
            yield

    with scope():
        net = PanguAlphaWithLoss(cfg)
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
        train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
        train(local_ids)                                   # compile, materialize, warm up
        prog = grad_program(net, (local_ids,), {}, train.params)

    def step() -> tuple[float, float]:
        with scope():
            c0 = prog.comm_clock[0]
            t0 = time.perf_counter()
            train(local_ids)
            return time.perf_counter() - t0, prog.comm_clock[0] - c0
    yield step


@contextlib.contextmanager
def torch_stepper(comm, local_ids: np.ndarray, dropout: float, port: int, bucket_mb: float | None):
    """PyTorch's step on this rank's ``local_ids``, warmed up: eager on a one-rank ``comm``, DDP
    (gloo) on n. Yields ``step()`` -> seconds."""
    import torch
    import torch.distributed as dist
    import torch_pangu
    n, rank = comm.size, comm.rank
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = PanguAlphaConfig(dropout_rate=dropout, **CONFIG)
    ids = torch.from_numpy(local_ids)
    model = torch_pangu.build(cfg)
    if n > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
        cap = {} if bucket_mb is None else {"bucket_cap_mb": bucket_mb or 64}   # 0: autopar's 'auto', 64 MB
        model = torch.nn.parallel.DistributedDataParallel(model, **cap)
    opt = torch_pangu.adamw(model, learning_rate=1e-4, weight_decay=0.01)
    torch_pangu.train_step(model, opt, ids, clip_norm=1.0)      # warm up: buckets, optimizer states

    def step() -> float:
        t0 = time.perf_counter()
        torch_pangu.train_step(model, opt, ids, clip_norm=1.0)
        return time.perf_counter() - t0
    try:
        yield step
    finally:
        if n > 1:
            dist.destroy_process_group()


def timed(comm, step):
    """One step after a barrier, so that every rank starts it together."""
    comm.barrier() if comm.size > 1 else None
    return step()


def every_rank(comm, *per_step: list[float]) -> np.ndarray:
    """(len(per_step), ranks, steps): each rank's series, gathered on every rank. A step lasts
    as long as its slowest rank, and that rank's comm is the step's real communication (the
    others' includes waiting for it)."""
    mine = np.zeros((len(per_step), comm.size, len(per_step[0])))
    mine[:, comm.rank] = per_step
    return np.asarray(comm.allreduce(mine, op="sum")) if comm.size > 1 else mine


def worker(dp: int, mp: int, mode: str, batch: int, steps: int, dropout: float, bucket_mb: float | None) -> None:
    from autopar.comm import install_abort_handler, world
    install_abort_handler()
    comm = world()
    ids = local_batch(batch, comm, full=mode != "data_parallel")
    with autopar_stepper(comm, dp, mp, mode, ids, dropout, bucket_mb) as step:
        times, comm_s = zip(*(timed(comm, step) for _ in range(steps)))
    every = every_rank(comm, times, comm_s)
    step_s = every[0].max(axis=0)                          # per step: its slowest rank's time
    best = int(np.argmin(step_s))
    if comm.rank == 0:
        print(json.dumps(dict(n=comm.size, dp=dp, mp=mp, mode=mode, step=float(step_s[best]), comm=comm_s[best],
                              comm_critical=float(every[1, every[0, :, best].argmax(), best]))), flush=True)


def torch_worker(batch: int, steps: int, dropout: float, port: int, bucket_mb: float | None) -> None:
    """PyTorch's steps; rank 0 prints the fastest (its own) as JSON."""
    from autopar.comm import world
    comm = world()
    with torch_stepper(comm, local_batch(batch, comm), dropout, port, bucket_mb) as step:
        times = [timed(comm, step) for _ in range(steps)]
    if comm.rank == 0:
        print(json.dumps(dict(n=comm.size, dp=comm.size, mp=1, framework="torch", step=min(times))), flush=True)


def paired_worker(batch: int, steps: int, dropout: float, port: int, bucket_mb: float | None) -> None:
    """autopar's data-parallel step and PyTorch DDP's in one MPI job, taking turns step by step
    (the order rotates every round), so that both see the same host: on a shared machine whose
    cores change speed from minute to minute, separate jobs compare different machines.

    On n > 1 ranks each framework also runs its step without communication: every rank trains
    alone on its own shard (autopar on a one-rank communicator, PyTorch without DDP), started
    together by a barrier. A round's data-parallel step minus the slowest rank's lone step is
    the time communication added to it -- not the time a rank spent waiting for a slower one,
    which the lone steps pay too. Rank 0 prints each framework's fastest and median step (the
    slowest rank's, per round), the median of the per-round ratios, and the median exposed
    communication of each as a share of its step."""
    from autopar.comm import SelfCommunicator, install_abort_handler, world
    install_abort_handler()
    comm = world()
    n = comm.size
    mode = "data_parallel" if n > 1 else "stand_alone"
    ids = local_batch(batch, comm)
    alone = SelfCommunicator()
    with contextlib.ExitStack() as stack:
        steppers = {"autopar": stack.enter_context(autopar_stepper(comm, n, 1, mode, ids, dropout, bucket_mb)),
                    "torch": stack.enter_context(torch_stepper(comm, ids, dropout, port, bucket_mb))}
        if n > 1:
            steppers["autopar_alone"] = stack.enter_context(
                autopar_stepper(alone, 1, 1, "stand_alone", ids, dropout, None))
            steppers["torch_alone"] = stack.enter_context(torch_stepper(alone, ids, dropout, port, None))
        names = list(steppers)
        times = {k: [] for k in names}
        comm_s = []
        for i in range(steps):
            for k in names[i % len(names):] + names[:i % len(names)]:
                out = timed(comm, steppers[k])            # autopar's: (seconds, comm seconds)
                times[k].append(out[0] if isinstance(out, tuple) else out)
                if k == "autopar":
                    comm_s.append(out[1])
    every = every_rank(comm, comm_s, *(times[k] for k in names))
    slowest = dict(zip(names, every[1:].max(axis=1)))         # per round: the slowest rank's step
    a_s, t_s = slowest["autopar"], slowest["torch"]
    best = int(np.argmin(a_s))
    row = dict(n=n, dp=n, mp=1, mode=mode, step=float(a_s[best]), median=float(np.median(a_s)),
               comm=comm_s[best], comm_critical=float(every[0, every[1, :, best].argmax(), best]),
               torch_step=float(t_s.min()), torch_median=float(np.median(t_s)),
               ratio_per_round=float(np.median(a_s / t_s)),
               comm_median=float(np.median(every[0, 0] / a_s)),       # rank 0's share, per round
               comm_least=float(np.median(every[0].min(axis=0) / a_s)))   # the rank that waited least
    if n > 1:
        row.update(exposed=float(np.median(1 - slowest["autopar_alone"] / a_s)),
                   torch_exposed=float(np.median(1 - slowest["torch_alone"] / t_s)),
                   alone_spread=float(np.median(every[3].max(axis=0) / np.median(every[3], axis=0))))
    if comm.rank == 0:
        print(json.dumps(row), flush=True)


def ceiling_worker(size: int, seconds: float) -> None:
    """The machine's ceiling with n ranks busy: every rank multiplies float32 (size x size)
    matrices for ``seconds`` after a barrier; rank 0 prints each rank's GFLOP/s."""
    from autopar.comm import world
    comm = world()
    rng = np.random.default_rng(comm.rank)
    a, b = rng.standard_normal((2, size, size), dtype=np.float32)
    a @ b                                                   # warm up
    comm.barrier()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    rate = np.zeros(comm.size)
    rate[comm.rank] = 2 * size ** 3 * k / (time.perf_counter() - t0) / 1e9
    rates = np.asarray(comm.allreduce(rate, op="sum")) if comm.size > 1 else rate
    if comm.rank == 0:
        print(json.dumps(dict(n=comm.size, gflops=rates.tolist())), flush=True)


def print_ceiling(rows: list[dict], size: int) -> None:
    print(f"machine ceiling: float32 {size}^3 GEMM per rank with n ranks busy (one BLAS thread each), GFLOP/s")
    print(f"{'ranks':>5} {'min':>7} {'median':>7} {'max':>7} {'sum':>8}")
    for r in rows:
        g = np.asarray(r["gflops"])
        print(f"{r['n']:>5} {g.min():>7.1f} {np.median(g):>7.1f} {g.max():>7.1f} {g.sum():>8.1f}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now, for DDP's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, n: int, worker_args: list[str], env: dict) -> dict:
    """One MPI job of ``n`` ranks running this script as a worker; rank 0's JSON line."""
    cmd = [args.mpiexec, "-n", str(n), *binding(args, n), *shlex.split(args.mpiexec_args), sys.executable, __file__,
           *worker_args,
           "--batch", str(args.batch), "--steps", str(args.steps), "--dropout", str(args.dropout)] + \
        (["--fusion", str(args.fusion)] if args.fusion is not None else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def binding(args, n: int) -> list[str]:
    """Open MPI's flags binding each of ``n`` ranks to its own cores: with ``--cores-per-rank
    spread``, cores // n of them (at most 2: one for the BLAS thread, one for the
    communication threads -- autopar's shared-memory sums, gloo's -- of either framework),
    else none added. MPICH's launcher takes ``-bind-to core:k`` instead."""
    if args.cores_per_rank != "spread":
        return []
    k = max(1, min(2, (os.cpu_count() or 1) // n))
    version = subprocess.run([args.mpiexec, "--version"], capture_output=True, text=True, check=False).stdout
    if "HYDRA" in version.upper():             # MPICH's launcher
        return ["-bind-to", f"core:{k}"]
    return ["--map-by", f"slot:PE={k}", "--bind-to", "core"]


def layout_name(r: dict) -> str:
    if r["n"] == 1:
        return "serial"
    if r["dp"] > 1:
        return f"dp{r['dp']}" + (f"xmp{r['mp']}" if r["mp"] > 1 else "")
    return f"mp{r['mp']}"


def print_table(args, rows: list[dict], torch_rows: dict[int, dict]) -> None:
    """autopar's rows; beside each serial and pure-dp row, PyTorch's at the same rank count."""
    base = next((r["step"] for r in rows if r["n"] == 1), None)   # None: 1 not in --ranks, no speedups
    torch_base = torch_rows[1]["step"] if 1 in torch_rows else None
    buckets = "one per weight" if args.fusion is None else f"in buckets of {args.fusion or 64:g} MB, as DDP's"
    print(f"PanGu-α {CONFIG}, dropout {args.dropout}, global batch {args.batch}, one BLAS thread per rank, "
          f"fastest of {args.steps} steps, autopar's gradient all-reduces {buckets}")
    print("step: the slowest rank's (fastest such step); comm share: rank 0's collectives / step (waiting for "
          "slower ranks included); critical: the slowest rank's own")
    head = f"{'ranks':>5} {'layout':>8} {'step s':>8} {'speedup':>8} {'comm share':>10} {'critical':>8}"
    print(head + (f" {'PyTorch s':>10} {'speedup':>8} {'autopar/PyTorch':>16}" if torch_rows else ""))
    for r in rows:
        speedup = f"{base / r['step']:>8.2f}" if base else f"{'-':>8}"
        line = (f"{r['n']:>5} {layout_name(r):>8} {r['step']:>8.3f} {speedup} "
                f"{r['comm'] / r['step']:>10.1%} {r.get('comm_critical', r['comm']) / r['step']:>8.1%}")
        t = torch_rows.get(r["n"]) if r["mp"] == 1 else None
        if t is not None:
            speedup = f"{torch_base / t['step']:>8.2f}" if torch_base else f"{'-':>8}"
            line += f" {t['step']:>10.3f} {speedup} {r['step'] / t['step']:>16.3f}"
        print(line)


def print_paired_table(args, rows: list[dict]) -> None:
    """Data-parallel rows of paired runs: both frameworks' fastest and median steps from the
    same job, each speedup over its own 1-rank fastest step, and both ratios."""
    base = {r["n"]: r for r in rows}.get(1)
    buckets = "one per weight" if args.fusion is None else f"in buckets of {args.fusion or 64:g} MB, as DDP's"
    print(f"PanGu-α {CONFIG}, dropout {args.dropout}, global batch {args.batch}, one BLAS thread per rank, "
          f"{args.steps} alternating rounds per rank count (autopar and DDP in one job), gradient all-reduces "
          f"{buckets}")
    print("step: the slowest rank's, fastest [median] of the rounds; comm: rank 0's time in collectives as a share "
          "of autopar's fastest step [median over rounds] (waiting for slower ranks included); least: median over "
          "rounds of the least such share of any rank (the last to arrive: little waiting); critical: the slowest "
          "rank's own in the fastest step; ratio: fastest / fastest, and the "
          "median of the per-round ratios; exposed: median over rounds of 1 - (slowest rank's step without "
          "communication) / (data-parallel step), each framework against its own; spread: the lone steps' slowest "
          "rank / their median rank")
    rows_out = []
    for r in rows:
        speed = (f"{base['step'] / r['step']:.2f}", f"{base['torch_step'] / r['torch_step']:.2f}") if base \
            else ("-", "-")
        exposed = (f"{r['exposed']:.1%}", f"{r['torch_exposed']:.1%}", f"{r['alone_spread']:.2f}") if "exposed" in r \
            else ("-", "-", "-")
        comm = f"{r['comm'] / r['step']:.1%}" + (f" [{r['comm_median']:.1%}]" if "comm_median" in r else "")
        rows_out.append([r["n"], f"{r['step']:.3f} [{r['median']:.3f}]", speed[0], comm,
                         f"{r['comm_least']:.1%}" if "comm_least" in r else "-",
                         f"{r['comm_critical'] / r['step']:.1%}", exposed[0], f"{r['torch_step']:.3f} "
                         f"[{r['torch_median']:.3f}]", speed[1], exposed[1], f"{r['step'] / r['torch_step']:.3f}",
                         f"{r['ratio_per_round']:.3f}", exposed[2]])
    print(table(["ranks", "autopar s", "speedup", "comm [median]", "least", "critical", "exposed", "DDP s", "speedup",
                 "exposed",
                 "ratio", "per round", "spread"], rows_out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout rate of both frameworks' models")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch DDP anchor")
    parser.add_argument("--fusion", type=float, nargs="?", const=25.0, metavar="MB",
                        help="autopar's gradient all-reduces in buckets of MB megabytes (comm_fusion mode 'size'; "
                             "0: mode 'auto', MindSpore's 64 MB), and DDP's too (bucket_cap_mb); alone: 25, "
                             "DDP's default. Without it autopar reduces each gradient by itself")
    parser.add_argument("--mpiexec", default=shutil.which("mpiexec", path=str(Path(sys.executable).parent))
                        or shutil.which("mpiexec"))
    parser.add_argument("--mpiexec-args", default="", help="extra launcher flags, e.g. '--bind-to core'")
    parser.add_argument("--cores-per-rank", choices=["one", "spread"], default="one",
                        help="spread: bind each rank to two cores where the machine has them (Open MPI's "
                             "--map-by slot:PE=2 --bind-to core, MPICH's -bind-to core:2), one otherwise; "
                             "one: leave binding to --mpiexec-args")
    parser.add_argument("--ceiling", type=int, default=0, metavar="SIZE",
                        help="first measure the machine's ceiling: SIZE^3 float32 GEMMs on every rank at once, "
                             "for each rank count (e.g. 1024)")
    parser.add_argument("--ceiling-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("DP", "MP", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true",
                        help="data parallel only: autopar and PyTorch DDP in the same MPI job at each rank "
                             "count, alternating step by step (both see the same host)")
    parser.add_argument("--torch-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--paired-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2], args.batch, args.steps, args.dropout,
               args.fusion)
        return
    if args.ceiling_worker:
        ceiling_worker(args.ceiling_worker, 2.0)
        return
    if args.torch_worker is not None:
        torch_worker(args.batch, args.steps, args.dropout, args.torch_worker, args.fusion)
        return
    if args.paired_worker is not None:
        paired_worker(args.batch, args.steps, args.dropout, args.paired_worker, args.fusion)
        return
    print(blas_line(), flush=True)
    if args.cores_per_rank == "spread":
        print("binding: " + "; ".join(f"{n} ranks: {' '.join(binding(args, n))}" for n in sorted(set(args.ranks))),
              flush=True)
    env = worker_env()
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")     # gloo on the loopback, where the rendezvous is
    with_torch = args.torch and torch_imports()
    if args.ceiling:
        print_ceiling([launch(args, n, ["--ceiling-worker", str(args.ceiling)], env) for n in sorted(set(args.ranks))],
                      args.ceiling)
    uneven = [n for n in args.ranks if args.batch % n]
    if uneven:
        sys.exit(f"--batch {args.batch} does not split over {uneven} ranks: pass a global batch that each "
                 "rank count divides (e.g. --batch 16 for 16 ranks)")
    if args.paired:
        if not with_torch:
            sys.exit("--paired needs torch")
        rows = []
        for n in sorted(set(args.ranks)):
            rows.append(launch(args, n, ["--paired-worker", str(free_port())], env))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print_paired_table(args, rows)
        return
    rows, torch_rows = [], {}
    for n in sorted(set(args.ranks)):
        for dp, mp, mode in layouts([n]):
            rows.append(launch(args, dp * mp, ["--worker", str(dp), str(mp), mode], env))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)       # a run cut short keeps its rows
        if with_torch:
            torch_rows[n] = launch(args, n, ["--torch-worker", str(free_port())], env)
            print(json.dumps(torch_rows[n]), file=sys.stderr, flush=True)
    print_table(args, rows, torch_rows)


def torch_imports() -> bool:
    """Whether the PyTorch anchor can run here; says why not when it cannot."""
    try:
        import torch  # noqa: F401
        return True
    except ImportError as err:
        print(f"PyTorch DDP anchor skipped: torch does not import ({err})", flush=True)
        return False


if __name__ == "__main__":
    main()

"""One PanGu-α step's gradient all-reduce, alone: autopar's buckets beside PyTorch's gloo.

At each rank count one MPI job all-reduces the gradients of PanGu-α V8000 S256 H512, 4
layers (the trained weights' shapes, float32, 68 MB) in buckets of ``--fusion`` MB, filled
in reverse parameter order as a backward pass makes them:

    autopar, shared window   runtime.fusion's start_bucket / finish_bucket on world(): where
                             the ranks share a host, the gradients go straight into the window
    autopar, MPI             the same on a communicator with shared_memory=False
    PyTorch gloo             dist.all_reduce of each bucket's flat tensor, made beforehand
                             (DDP's transport; its gradients are views of the buckets)

Times are the slowest rank's, best [median] of ``--repeats``, each started together after a
barrier; the three take turns. One BLAS thread per rank::

    python benchmarks/allreduce.py --ranks 2 4 8 16 --mpiexec-args "--bind-to core"
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

import numpy as np
from _common import default_mpiexec, table, worker_env
from scaling import free_port

CONFIG = dict(vocab_size=8000, seq_length=256, hidden_size=512, num_layers=4, num_heads=8,
              ffn_hidden_size=2048)


def gradient_shapes() -> list[tuple[int, ...]]:
    """The trained weights' shapes, in the order a backward pass finishes them (reversed)."""
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    net = PanguAlphaWithLoss(PanguAlphaConfig(**CONFIG))
    return [tuple(p.shape) for p in reversed(list(net.trainable_params()))]


def buckets(shapes: list[tuple[int, ...]], cap_mb: float) -> list[list[tuple[int, ...]]]:
    """Consecutive shapes, a bucket closed before it would pass ``cap_mb`` MB (float32)."""
    out, size = [[]], 0
    for shape in shapes:
        nbytes = 4 * int(np.prod(shape))
        if out[-1] and size + nbytes > cap_mb * 2 ** 20:
            out.append([])
            size = 0
        out[-1].append(shape)
        size += nbytes
    return out


def worker(cap_mb: float, repeats: int, port: int) -> None:
    from autopar.comm import install_abort_handler, world
    from autopar.comm.base import CommStats
    from autopar.comm.mpi import MPICommunicator, _mpi
    from autopar.runtime.fusion import finish_bucket, start_bucket
    install_abort_handler()
    comm = world()
    plain = MPICommunicator(_mpi().COMM_WORLD.Dup(), CommStats(), checks=comm.checks, shared_memory=False)
    plan = buckets(gradient_shapes(), cap_mb)
    rng = np.random.default_rng(comm.rank)
    grads = [[rng.standard_normal(s, dtype=np.float32) for s in b] for b in plan]

    def autopar_step(c):
        def run():
            flights = [start_bucket(c, g) for g in grads]
            for flight, b in zip(flights, plan):
                finish_bucket(flight, b)
        return run
    runs = {"autopar, shared window": autopar_step(comm), "autopar, MPI": autopar_step(plain)}
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank, world_size=comm.size)
        flats = [torch.from_numpy(np.concatenate([x.reshape(-1) for x in g])) for g in grads]

        def gloo():
            for t in flats:
                dist.all_reduce(t)
        runs["PyTorch gloo"] = gloo
    except ImportError:
        pass
    for run in runs.values():   # warm up: windows, buffers, connections
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            comm.barrier()
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    slowest = {name: comm.allgather(np.array([ts]), 0).max(axis=0)       # (ranks, repeats) -> (repeats,)
               for name, ts in times.items()}
    if comm.rank == 0:
        nbytes = sum(x.nbytes for g in grads for x in g)
        print(json.dumps({"n": comm.size, "mb": nbytes / 1e6, "buckets": len(plan),
                          "best": {k: float(v.min()) for k, v in slowest.items()},
                          "median": {k: float(np.median(v)) for k, v in slowest.items()}}), flush=True)
    if "PyTorch gloo" in runs:   # gloo's threads must stop before the interpreter does (else: abort at exit)
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--fusion", type=float, default=25.0, help="bucket size, MB (DDP's default: 25)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--mpiexec", default=default_mpiexec())
    parser.add_argument("--mpiexec-args", default="")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)   # the rendezvous port
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.fusion, args.repeats, args.worker)
        return
    rows, names = [], None
    for n in args.ranks:
        cmd = [args.mpiexec, "-n", str(n), *shlex.split(args.mpiexec_args), sys.executable, __file__,
               "--worker", str(free_port()), "--fusion", str(args.fusion), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        names = names or list(r["best"])
        rows.append([n] + [f"{1e3 * r['best'][k]:.1f} [{1e3 * r['median'][k]:.1f}]" for k in names])
    print(f"PanGu-α {CONFIG}: {r['mb']:.0f} MB of float32 gradients in {r['buckets']} buckets of <= "
          f"{args.fusion:g} MB; the slowest rank's ms, best [median] of {args.repeats}")
    print(table(["ranks"] + names, rows))


if __name__ == "__main__":
    main()

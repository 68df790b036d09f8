"""Scaling of a PanGu-α training step over MPI ranks (data and model parallel).

The driver launches one MPI job per layout, each timing the same global batch, and prints
time per step, speedup over 1 rank and the share of the step spent redistributing
(collectives), all from this one run:

    python benchmarks/scaling.py                       # 1 and 2 ranks: dp2, mp2
    python benchmarks/scaling.py --ranks 1 2 4 8 --mpiexec-args "--bind-to core"

Each rank uses one BLAS thread (OPENBLAS_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=8000, seq_length=256, hidden_size=512, num_layers=4, num_heads=8,
              ffn_hidden_size=2048, dropout_rate=0.1)


def layouts(ranks: list[int]) -> list[tuple[int, int, str]]:
    out = []
    for n in ranks:
        if n == 1:
            out.append((1, 1, "stand_alone"))
            continue
        out.append((n, 1, "data_parallel"))
        out.append((1, n, "semi_auto_parallel"))
        if n >= 4:
            out.append((n // 2, 2, "semi_auto_parallel"))
    return out


def worker(dp: int, mp: int, mode: str, batch: int, steps: int) -> None:
    from autopar import nn
    from autopar.comm import install_abort_handler, world
    from autopar.context import bound_world, parallel_context
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    from autopar.train import AdamWeightDecay
    install_abort_handler()
    comm = world()
    n = comm.size
    cfg = PanguAlphaConfig(data_parallel=dp, model_parallel=mp, **CONFIG)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.seq_length + 1)).astype(np.int32)
    full = mode != "data_parallel"
    local_ids = ids if full else np.split(ids, n)[comm.rank]
    with bound_world(comm), parallel_context(parallel_mode=mode, device_num=n, full_batch=full):
        net = PanguAlphaWithLoss(cfg)
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
        train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
        train(local_ids)                                   # compile, materialize, warm up
        from autopar.runtime.compiled import grad_program
        prog = grad_program(net, (local_ids,), {}, train.params)
        times, comm_s = [], []
        for _ in range(steps):
            comm.barrier() if n > 1 else None
            c0 = prog.comm_clock[0]
            t0 = time.perf_counter()
            train(local_ids)
            times.append(time.perf_counter() - t0)
            comm_s.append(prog.comm_clock[0] - c0)
    best = int(np.argmin(times))
    if comm.rank == 0:
        print(json.dumps(dict(n=n, dp=dp, mp=mp, mode=mode, step=times[best], comm=comm_s[best])), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mpiexec", default=shutil.which("mpiexec", path=str(Path(sys.executable).parent))
                        or shutil.which("mpiexec"))
    parser.add_argument("--mpiexec-args", default="", help="extra launcher flags, e.g. '--bind-to core'")
    parser.add_argument("--worker", nargs=3, metavar=("DP", "MP", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2], args.batch, args.steps)
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    for dp, mp, mode in layouts(args.ranks):
        n = dp * mp
        cmd = [args.mpiexec, "-n", str(n), *shlex.split(args.mpiexec_args), sys.executable, __file__,
               "--worker", str(dp), str(mp), mode, "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next(r["step"] for r in rows if r["n"] == 1)
    print(f"PanGu-α {CONFIG}, global batch {args.batch}, one BLAS thread per rank")
    print(f"{'ranks':>5} {'layout':>8} {'step s':>8} {'speedup':>8} {'comm share':>10}")
    for r in rows:
        name = "serial" if r["n"] == 1 else f"dp{r['dp']}" + (f"xmp{r['mp']}" if r["mp"] > 1 else "") \
            if r["dp"] > 1 else f"mp{r['mp']}"
        print(f"{r['n']:>5} {name:>8} {r['step']:>8.3f} {base / r['step']:>8.2f} {r['comm'] / r['step']:>10.1%}")


if __name__ == "__main__":
    main()

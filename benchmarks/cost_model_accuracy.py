"""Cost-model accuracy: predicted vs measured step time and peak memory of PanGu-α plans.

For each PanGu-α size (``--sizes``) and rank count (``--ranks``), every plan of
:func:`accuracy_plans.plans` -- hand dp, mp and dp x mp (the model's own strategies under
``semi_auto_parallel``), pipelines of 2 and 4 stages with several micro-batch counts under
both schedules (1F1B, GPipe) and interleaved 1F1B, recompute and optimizer parallel on and
off, and the auto plan (``auto_parallel`` with nothing fixed: the joint search picks
stages, micro-batches, recompute, optimizer parallel and every stage's op strategies) --
is trained for real, one MPI job per plan (fp32, dropout 0.1, AdamWeightDecay, clip 1.0, batch 2 x ranks).

**Prediction.** One cost model for every plan: ``price()`` of
``autopar.strategy.pipeline.auto``, the function the ``auto_parallel`` joint search prices its
candidates with. The auto plan's prediction is the run's own choice
(``AutoGradProgram.choice.step_seconds`` / ``.peak_memory_bytes``); a hand plan is priced by
``price()`` on exactly the stage shardings its run compiles (``accuracy_plans.predict_hand``
says how), and the peak memory is the largest stage's.

**Measurement** (each plan in its own ``mpiexec`` job, on the job's slowest rank):

* step time: after ``--warmup`` steps, ``--repeats`` timing windows of ``--steps`` steps
  each, every step started behind a barrier; a window's figure is the median of its
  steps, the plan's is the median of its windows, and the *spread* beside it is
  max/min - 1 of the window medians. The windows follow each other in one process (the
  spread is run-to-run noise within a job, not core placement: ``--separate-processes``
  runs each repeat as its own job instead, slower). Wall clock, or (``--clock cpu``, for a
  machine shared with other work) the ranks' thread CPU time;
* communication per step (slowest rank, median step): ``meas comm``, the time in the
  redistributions between ops (the program's own clock), and ``meas coll``, the time inside
  every blocking collective and message (``CommStats.seconds``), which adds the in-kernel
  ones -- a vocabulary-split loss's all-reduces, where ranks' skew is absorbed;
* peak memory per rank: bytes alive before a step (parameter shards, optimizer states, the
  fed batch, constants) + the peak of numpy allocations during one step (``tracemalloc``,
  kernel temporaries included); the largest over the ranks.

Per (size, ranks) and over all plans it prints the mean absolute percentage error of time
and memory, the Spearman rank correlation of time, the median spread, and the auto plan's
regret (its measured step / the fastest measured step of its group); it draws predicted
vs measured (``--png``) and writes every row to ``--json`` after each plan (a run cut short
keeps what it measured). ``--confirm K`` then measures each group's auto plan and its K
fastest rivals again in alternating rounds (the regret compares medians over all their
windows, not a first pass's lucky minimum). ``--calibrate`` first measures the machine with
``mpiexec -n R python -m autopar.calibrate`` for each R and prices with that profile::

    OPENBLAS_NUM_THREADS=1 python benchmarks/cost_model_accuracy.py --quick      # 2 ranks, tiny model, 6 plans
    # the lent 16-core machine (Open MPI): H256 and H384 on 4 and 8 ranks (72 plans), calibrated
    # first, about 7 minutes; no plan starts after 430 s (those left are listed as not run)
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/cost_model_accuracy.py --ranks 4 8 --calibrate --mpiexec-args "--bind-to core" \\
        --steps 2 --deadline 430 --json accuracy.json --png accuracy.png
    python benchmarks/cost_model_accuracy.py --report accuracy.json --png accuracy.png   # print it again
    # (or the two rank counts as two jobs, --ranks 4 --json a4.json and --ranks 8 --json a8.json,
    #  then one report over both: --report a4.json a8.json)

Targets (issue 13): time error <= 10%, Spearman >= 0.9, memory error <= 10%, regret <= 1.05.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import blas_line, default_mpiexec, mib, table, unique_nbytes, worker_env
from accuracy_plans import SIZES, Plan, batch_of, build, check_plan, context, feed, plans, predict_hand, quick_plans

TARGETS = {"time_mape": 0.10, "time_spearman": 0.9, "memory_mape": 0.10, "regret": 1.05}
# "wall": the wall clock, what a user waits for; "cpu": the rank's thread CPU time, which
# leaves out time the OS gave other processes (a shared machine), not time spent waiting.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
DEADLINE_GRACE_S = 60      # a plan started before --deadline may run this long past it


# ---- one plan, on every rank of its job -------------------------------------------------------

def resident_bytes(prog, train, fed) -> int:
    """Bytes alive between steps: this rank's parameter shards, optimizer states, the fed
    batch and the programs' constants (each base buffer once)."""
    program = prog.program
    programs = getattr(program, "programs", None) or (program,)      # a pipeline stage: its halves
    consts = [a for p in programs for a in p.graph.consts.values()]
    states = [a for s in train.optimizer.states for a in s.values()]
    return (unique_nbytes([s.data for s in prog.param_shards]) + unique_nbytes(states) + fed.nbytes
            + unique_nbytes(consts))


def step_bytes(prog, train, fed, comm) -> tuple[int, int]:
    """(bytes alive before a step, numpy's allocation peak during it) on this rank: the
    measured peak memory is their sum (the runs' ranks start the step together)."""
    before = resident_bytes(prog, train, fed)
    comm.barrier()
    tracemalloc.start()
    train(fed)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return before, traced


def prediction(prog, plan: Plan, size: dict, ranks: int, profile: str) -> dict:
    """The plan's predicted step (seconds, and its parts) and peak bytes per rank."""
    p = prog.choice if plan.auto else predict_hand(plan, size, ranks, profile)
    return dict(step_s=p.step_seconds, compute_s=p.compute_s, comm_s=p.comm_s, bubble_s=p.bubble_s,
                update_s=p.update_s, memory_bytes=p.peak_memory_bytes, stage_bytes=list(p.memory_bytes),
                plan=p.describe())


def op_breakdown(prog, fed, comm, clock) -> dict | None:
    """Where one step's time goes on this one-stage plan, per op kind: measured (every
    instruction of the step program timed, ranks lined up by a barrier before each
    redistribution, whose wait is its own ``comm wait`` line; the slowest rank's figure per
    kind) and predicted (:meth:`CostModel.op_costs` of the plan the program compiled: each
    op's kernels, its in-kernel collectives and the redistributions into it as ``comm``).
    None for a pipeline (several programs)."""
    from autopar.runtime import op_timer
    from autopar.strategy.costmodel import CostModel
    inner = getattr(prog, "inner", prog)
    if not hasattr(inner, "forward_graph"):
        return None
    seconds, counts = op_timer.time_ops(inner.program, [fed], 0, clock, before_comm=comm.barrier)
    kinds = sorted(seconds)
    slowest = np.asarray(comm.allreduce(np.array([seconds[k] for k in kinds], np.float64), op="max"))
    options = inner.plan_options
    model = CostModel(inner.forward_graph, inner.stage, options.profile(), inner.feed_whole,
                      optimizer_parallel=options.optimizer_parallel, optimizer_shard=options.optimizer_shard)
    predicted: dict[str, float] = {}
    for node, cost, edges_s in model.op_costs(inner.plan):
        predicted[node.prim.kind] = predicted.get(node.prim.kind, 0.0) + cost.compute_s
        predicted["comm"] = predicted.get("comm", 0.0) + cost.comm_s + edges_s + cost.grad_s
    return dict(measured=dict(zip(kinds, slowest.tolist())), counts=counts, predicted=predicted)


def worker(args) -> None:
    from autopar.comm import install_abort_handler, world
    from autopar.context import bound_world, parallel_context
    install_abort_handler()
    comm = world()
    ranks = comm.size
    plan = Plan(**json.loads(args.worker))
    size = SIZES[args.size]
    cfg, _, train = build(plan, size)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_of(ranks), cfg.seq_length + 1)).astype(np.int32)
    fed = feed(plan, ids, comm.rank, ranks)
    clock = CLOCKS[args.clock]
    saved = Path(tempfile.mkdtemp(prefix="autopar-plan-")) / f"strategy-rank{comm.rank}.json"
    with bound_world(comm), parallel_context(**context(plan, ranks, args.profile), strategy_ckpt_save_file=str(saved)):
        t0 = time.perf_counter()
        prog = train.build(fed)
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            train(fed)
        times, comm_times, coll_times = [], [], []
        for _ in range(args.repeats * args.steps):
            comm.barrier()
            c0, k0, t0 = prog.comm_clock[0], sum(comm.stats.seconds().values()), clock()
            train(fed)
            times.append(clock() - t0)
            comm_times.append(prog.comm_clock[0] - c0)
            coll_times.append(sum(comm.stats.seconds().values()) - k0)
        before, traced = step_bytes(prog, train, fed, comm)
        ops = op_breakdown(prog, fed, comm, clock) if args.ops else None
    # the op-level plan this job ran (its strategy file's digest): two jobs of one plan must match
    strategy_sha = hashlib.sha256(saved.read_bytes()).hexdigest()[:16] if saved.exists() else None
    shutil.rmtree(saved.parent, ignore_errors=True)
    slowest = np.asarray(comm.allreduce(np.array(times, np.float64), op="max"))
    comm_s = np.asarray(comm.allreduce(np.array(comm_times, np.float64), op="max"))
    coll_s = np.asarray(comm.allreduce(np.array(coll_times, np.float64), op="max"))
    peak = float(comm.allreduce(np.array(float(before + traced)), op="max"))
    if comm.rank != 0:
        return
    windows = [float(np.median(w)) for w in slowest.reshape(args.repeats, args.steps)]
    print(json.dumps(dict(
        name=plan.name, size=args.size, ranks=ranks, batch=batch_of(ranks), plan=dataclasses.asdict(plan),
        compile_s=compile_s, strategy_sha=strategy_sha, predicted=prediction(prog, plan, size, ranks, args.profile),
        measured=dict(step_s=float(np.median(windows)), windows=windows, steps=slowest.tolist(),
                      comm_s=float(np.median(comm_s)), collectives_s=float(np.median(coll_s)), peak_bytes=peak, peak_rank0=before + traced,
                      before_bytes=before, traced_peak_bytes=traced),
        **({"ops": ops} if ops else {}))), flush=True)


# ---- the driver -------------------------------------------------------------------------------

def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        _, inverse = np.unique(x, return_inverse=True)
        return (np.bincount(inverse, weights=r) / np.bincount(inverse))[inverse]
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def mape(pred, meas) -> float:
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return float(np.mean(np.abs(pred - meas) / meas))


def spread(windows) -> float:
    """max/min - 1 of a plan's window (or process) medians."""
    return float(max(windows) / min(windows) - 1)


def _first_error(text: str) -> str:
    """The exception line of a failed worker's output (its last 'Error:' line), else its tail."""
    lines = [ln.split("] ", 1)[-1] for ln in text.splitlines()]
    errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    where = [ln for ln in lines if ln.startswith("autopar: raised by")]
    return "; ".join(errors[-1:] + where[-1:]) or " | ".join(lines[-3:])


def machine_busy_s() -> float | None:
    """CPU seconds every core of the machine has been busy since boot (/proc/stat: user,
    nice, system, irq, softirq, steal), or None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (mpiexec and, through it, the ranks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def foreign_cores(busy0: float | None, child0: float, wall: float) -> float | None:
    """Cores busy with work other than the job just run, on average over its ``wall``
    seconds: the machine's busy CPU time minus the job's own. Another tenant's jobs (session
    8's 8-rank run shared the host with four GPU jobs) show here instead of in a plan's time."""
    busy1 = None if busy0 is None or wall <= 0 else machine_busy_s()
    if busy1 is None:
        return None
    return max(0.0, ((busy1 - busy0) - (children_cpu_s() - child0)) / wall)


def launch(plan: Plan, size: str, ranks: int, profile: str, args, repeats: int, timeout: float) -> dict:
    """One MPI job training ``plan``: its JSON row, or a row with ``error``. The row's
    ``measured.foreign_cores`` lists, per job, the cores other work kept busy meanwhile."""
    me = [sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(plan)), "--size", size,
          "--steps", str(args.steps), "--repeats", str(repeats), "--warmup", str(args.warmup), "--profile", profile,
          "--clock", args.clock] + (["--ops"] if getattr(args, "ops", False) else [])
    cmd = [args.mpiexec, "-n", str(ranks), *shlex.split(args.mpiexec_args), *me]
    failed = dict(name=plan.name, size=size, ranks=ranks, command=shlex.join(cmd))
    # its own process group: on a timeout the ranks go too, not only mpiexec (left running,
    # they would take the cores of the plans after)
    busy0, child0, t0 = machine_busy_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=worker_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return dict(failed, error=f"timed out after {timeout:.0f} s")
    rows = [ln for ln in stdout.splitlines() if ln.startswith('{"name"')]     # rank 0's row
    if proc.returncode == 0 and rows:
        row = json.loads(rows[-1])
        row["measured"]["foreign_cores"] = [foreign_cores(busy0, child0, time.perf_counter() - t0)]
        return row
    return dict(failed, error=_first_error(stdout + stderr))


def measure(plan: Plan, size: str, ranks: int, profile: str, args, timeout: float) -> dict:
    """``plan`` measured: ``--repeats`` windows of one job, or with ``--separate-processes``
    one job per repeat (each one window; the row is the first job's, with every job's
    window median, and the largest memory peak)."""
    if not args.separate_processes:
        return launch(plan, size, ranks, profile, args, args.repeats, timeout)
    runs = []
    for _ in range(args.repeats):
        runs.append(launch(plan, size, ranks, profile, args, 1, timeout))
        if "error" in runs[-1]:
            return runs[-1]
    row = runs[0]
    windows = [r["measured"]["windows"][0] for r in runs]
    row["measured"].update(step_s=float(np.median(windows)), windows=windows,
                           foreign_cores=[r["measured"]["foreign_cores"][0] for r in runs],
                           peak_bytes=max(r["measured"]["peak_bytes"] for r in runs))
    return row


def calibrate(ranks: int, args) -> str:
    """Measure this machine on ``ranks`` ranks (``python -m autopar.calibrate``); the profile's path."""
    out = Path(args.profile_dir) / f"calibrated-{ranks}rank.json"
    cmd = [args.mpiexec, "-n", str(ranks), *shlex.split(args.mpiexec_args), sys.executable, "-m", "autopar.calibrate",
           "--out", str(out), "--name", f"calibrated-{ranks}rank"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=worker_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"calibration failed ({shlex.join(cmd)}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    print(f"calibrated {ranks} ranks in {time.perf_counter() - t0:.0f} s: {out}", file=sys.stderr, flush=True)
    return str(out)


def schedule(groups: dict) -> list[tuple]:
    """(size, ranks, plan) in round-robin order over the groups: a run cut short by its
    deadline leaves every group with about as many plans (each group's auto plan first)."""
    lists = list(groups.values())
    return [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]


def run_all(args) -> None:
    t_start = time.perf_counter()
    sizes = ["tiny"] if args.quick else args.sizes
    ranks = [2] if args.quick else args.ranks
    profiles = {str(r): calibrate(r, args) if args.calibrate else args.profile for r in ranks}
    groups = {}
    for s in sizes:
        for r in ranks:
            todo = quick_plans(r) if args.quick else plans(r)
            if args.only:
                todo = [p for p in todo if p.name in args.only]
            for p in todo:
                check_plan(p, r)
            groups[(s, r)] = [(s, r, p) for p in todo]
    saved = dict(sizes={s: SIZES[s] for s in sizes}, profiles=profiles, clock=args.clock, steps=args.steps,
                 repeats=args.repeats, warmup=args.warmup, separate_processes=args.separate_processes,
                 confirm=args.confirm, confirm_rounds=args.confirm_rounds,
                 rows=[], failed=[])
    order = schedule(groups)
    for k, (size, r, plan) in enumerate(order, 1):
        left = args.deadline - (time.perf_counter() - t_start) if args.deadline else args.plan_timeout
        if left <= 0:
            saved["failed"].append(dict(name=plan.name, size=size, ranks=r, error="not run: --deadline reached"))
            continue
        t0 = time.perf_counter()
        row = measure(plan, size, r, profiles[str(r)], args, min(left + DEADLINE_GRACE_S, args.plan_timeout))
        (saved["failed"] if "error" in row else saved["rows"]).append(row)
        said = (f"pred {row['predicted']['step_s']:.3f} s, meas {row['measured']['step_s']:.3f} s "
                f"(spread {spread(row['measured']['windows']):.1%})" if "error" not in row
                else f"FAILED: {row['error'][:140]}")
        print(f"[{k}/{len(order)} {time.perf_counter() - t_start:4.0f} s] {size} {r} ranks  {plan.name:30s} {said} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, saved)
    if not saved["rows"]:
        sys.exit("no plan ran")
    if args.confirm:
        confirm(saved, args, profiles, t_start)
    saved["figures"] = report(saved)
    saved["targets_met"] = targets_met(saved["figures"])
    saved["elapsed_s"] = time.perf_counter() - t_start
    print(f"{len(saved['rows'])} plans measured in {saved['elapsed_s']:.0f} s (calibration included)")
    if args.json:
        write_json(args.json, saved)
    if args.png:
        scatter_png(saved, args.png)
        print(f"\nscatter plot: {args.png}")


def contenders(group: list[dict], k: int) -> list[dict]:
    """The auto plan's row and the ``k`` fastest other measured rows of one group."""
    auto = [r for r in group if r["plan"]["auto"]]
    others = sorted((r for r in group if not r["plan"]["auto"]), key=lambda r: r["measured"]["step_s"])
    return auto[:1] + others[:k]


def confirm(saved: dict, args, profiles: dict, t_start: float) -> None:
    """Measure each group's auto plan and its ``--confirm`` fastest rivals again, in
    ``--confirm-rounds`` rounds that alternate them (A B C D A B C D ...), so that drift over
    the run falls on every contender alike; each job's windows join the row's, whose step is
    then the median of all its windows. The minimum of many noisy plans is biased low: this
    is what keeps the regret from measuring noise instead of the plan."""
    rows = [r for group in groups_of(saved["rows"]).values() for r in contenders(group, args.confirm)]
    for k in range(args.confirm_rounds):
        for row in rows:
            if args.confirm_by and time.perf_counter() - t_start > args.confirm_by:
                print(f"confirm: --confirm-by reached in round {k + 1}", file=sys.stderr, flush=True)
                return
            plan = Plan(**row["plan"])
            again = launch(plan, row["size"], row["ranks"], profiles[str(row["ranks"])], args, args.repeats,
                           args.plan_timeout)
            if "error" in again:
                print(f"confirm: {row['name']} failed: {again['error'][:140]}", file=sys.stderr, flush=True)
                continue
            if again["predicted"]["plan"] != row["predicted"]["plan"] or not same_strategies(row, again):
                sys.exit(f"confirm: {row['size']} {row['ranks']} ranks {row['name']} compiled another plan "
                         f"({again['predicted']['plan']}, strategies {again.get('strategy_sha')} vs "
                         f"{row['predicted']['plan']}, strategies {row.get('strategy_sha')})")
            m = row["measured"]
            m.setdefault("first_windows", list(m["windows"]))
            m["windows"] += again["measured"]["windows"]
            m["foreign_cores"] = m.get("foreign_cores", [None]) + again["measured"].get("foreign_cores", [None])
            m["step_s"] = float(np.median(m["windows"]))
            print(f"confirm round {k + 1}: {row['size']} {row['ranks']} ranks {row['name']:28s} "
                  f"{again['measured']['step_s']:.3f} s -> {m['step_s']:.3f} s", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, saved)


def same_strategies(row: dict, again: dict) -> bool:
    """Whether two jobs of one plan ran the same op-level strategies (their strategy files'
    digests; rows stored before digests were kept pass). The stage plan's description alone
    does not show an op that changed its split."""
    a, b = row.get("strategy_sha"), again.get("strategy_sha")
    return a is None or b is None or a == b


def write_json(path: str, saved: dict) -> None:
    """Write atomically: a run cut short mid-write leaves the previous complete file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(path)


# ---- the report -------------------------------------------------------------------------------

def group_figures(rows: list[dict]) -> dict:
    """Time and memory error, Spearman, median spread, and the auto plan's regret."""
    pt = [r["predicted"]["step_s"] for r in rows]
    mt = [r["measured"]["step_s"] for r in rows]
    pm = [r["predicted"]["memory_bytes"] for r in rows]
    mm = [r["measured"]["peak_bytes"] for r in rows]
    auto = [r["measured"]["step_s"] for r in rows if r["plan"]["auto"]]
    return dict(plans=len(rows), time_mape=mape(pt, mt), time_spearman=spearman(pt, mt) if len(rows) > 1 else None,
                memory_mape=mape(pm, mm), median_spread=float(np.median([spread(r["measured"]["windows"])
                                                                         for r in rows])),
                regret=auto[0] / min(mt) if auto else None)


def groups_of(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["size"], r["ranks"]), []).append(r)
    return out


def ops_table(row: dict) -> str:
    """A row's --ops breakdown: ms per op kind, measured (one step, instruction by
    instruction, slowest rank) beside predicted, slowest kinds first."""
    meas, pred, counts = row["ops"]["measured"], row["ops"]["predicted"], row["ops"]["counts"]
    kinds = sorted(set(meas) | set(pred), key=lambda k: -max(meas.get(k, 0.0), pred.get(k, 0.0)))
    body = [[k, str(counts.get(k, "")), f"{meas.get(k, 0.0) * 1e3:.2f}", f"{pred.get(k, 0.0) * 1e3:.2f}",
             f"{pred[k] / meas[k]:.2f}" if meas.get(k) and pred.get(k) else "-"] for k in kinds]
    body.append(["total", str(sum(counts.values())), f"{sum(meas.values()) * 1e3:.2f}",
                 f"{sum(pred.values()) * 1e3:.2f}", f"{sum(pred.values()) / sum(meas.values()):.2f}"])
    return (f"  {row['name']}: one step op kind by op kind (ms)\n"
            + table(["kind", "instr", "measured", "predicted", "pred/meas"], body, "lrrrr"))


def report(saved: dict) -> dict:
    rows, failed = saved["rows"], saved["failed"]
    clock = "wall clock" if saved["clock"] == "wall" else "thread CPU time"
    how = (f"{saved['repeats']} separate jobs" if saved.get("separate_processes")
           else f"{saved['repeats']} windows of one job")
    print(f"PanGu-α fp32, AdamWeightDecay, clip 1.0, batch 2 x ranks; measured step = median over {how} (each the "
          f"median of {saved['steps']} steps after {saved['warmup']} warm-up), slowest rank, {clock}; spread = "
          f"max/min - 1 of those medians; predicted = price() of the joint search (auto: the run's choice)")
    if saved.get("confirm"):
        print(f"  each group's auto plan and its {saved['confirm']} fastest rivals were measured again in "
              f"{saved['confirm_rounds']} alternating rounds; their step is the median over all their windows")
    for size, r in groups_of(rows):
        print(f"  {size} = {saved['sizes'][size]}; {r} ranks priced with profile {saved['profiles'][str(r)]}")
    figures = {}
    for (size, r), group in groups_of(rows).items():
        print(f"\n{size}, {r} ranks (batch {group[0]['batch']}):")
        body = []
        for k, row in enumerate(group, 1):
            p, m = row["predicted"], row["measured"]
            body.append([k, row["name"], f"{p['step_s']:.3f}", f"{m['step_s']:.3f}",
                         f"{p['step_s'] / m['step_s'] - 1:+.0%}", f"{spread(m['windows']):.1%}",
                         f"{p['compute_s']:.3f}", f"{p['comm_s']:.3f}", f"{p['bubble_s']:.3f}", f"{m['comm_s']:.3f}",
                         f"{m['collectives_s']:.3f}" if "collectives_s" in m else "-",
                         mib(p["memory_bytes"]), mib(m["peak_bytes"]), f"{p['memory_bytes'] / m['peak_bytes'] - 1:+.0%}",
                         f"{row['compile_s']:.1f}", busy_elsewhere(m)])
        print(table(["#", "plan", "pred s", "meas s", "err", "spread", "compute", "comm", "bubble", "meas comm",
                     "meas coll", "pred MiB", "meas MiB", "err", "compile s", "other load"], body, "ll" + "r" * 14))
        loaded = [row["name"] for row in group if max(known(row["measured"]), default=0.0) > FOREIGN_LOAD_WARN]
        if loaded:
            print(f"  WARNING: other work kept more than {FOREIGN_LOAD_WARN} core busy during {', '.join(loaded)}: "
                  f"their times are not this plan's alone")
        auto = [row for row in group if row["plan"]["auto"]]
        if auto:
            print(f"  auto plan: {auto[0]['predicted']['plan']}")
        f = figures[f"{size} {r} ranks"] = group_figures(group)
        print("  " + summary(f))
        for row in group:
            if "ops" in row:
                print(ops_table(row))
    for r in failed:
        print(f"FAILED  {r['size']} {r['ranks']} ranks {r['name']}: {r['error']}"
              + (f"\n        rerun: {r['command']}" if "command" in r else ""))
    overall = figures["all"] = group_figures(rows)
    overall.pop("regret")
    print(f"\nall {len(rows)} plans ({len(failed)} failed or not run): {summary(overall)}")
    met = targets_met(figures)
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return figures


FOREIGN_LOAD_WARN = 0.5     # cores busy with other work during a job, above which the report warns


def known(measured: dict) -> list[float]:
    """A row's per-job foreign loads that were measured (rows stored before have none)."""
    return [c for c in measured.get("foreign_cores", []) if c is not None]


def busy_elsewhere(measured: dict) -> str:
    """The largest foreign load over a row's jobs, in cores ("-" when not measured)."""
    loads = known(measured)
    return f"{max(loads):.2f}" if loads else "-"


def summary(f: dict) -> str:
    rho = "-" if f["time_spearman"] is None else f"{f['time_spearman']:.3f}"
    regret = "" if f.get("regret") is None else f", auto regret {f['regret']:.3f}"
    return (f"{f['plans']} plans: time error {f['time_mape']:.1%}, Spearman {rho}, memory error "
            f"{f['memory_mape']:.1%}, median spread {f['median_spread']:.1%}{regret}")


def targets_met(figures: dict) -> dict:
    """Issue 13's targets: over all plans (time, Spearman, memory) and per group (regret)."""
    f = figures["all"]
    regrets = [g["regret"] for k, g in figures.items() if k != "all"]
    return {"time error <= 10%": f["time_mape"] <= TARGETS["time_mape"],
            "Spearman >= 0.9": (f["time_spearman"] or 0) >= TARGETS["time_spearman"],
            "memory error <= 10%": f["memory_mape"] <= TARGETS["memory_mape"],
            "regret <= 1.05 in every group": bool(regrets) and all(g is not None and g <= TARGETS["regret"]
                                                                  for g in regrets)}


def scatter_png(saved: dict, path: str) -> None:
    """Predicted (y) against measured (x) step time and peak memory, one colour per (size,
    ranks), the auto plans as stars, the y = x line and a ±10% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = saved["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 6))
    f = group_figures(rows)
    panels = ((axes[0], "step time (s)", "step_s", "step_s", 1.0,
               f"step time: error {f['time_mape']:.1%}, Spearman {f['time_spearman'] or float('nan'):.2f}"),
              (axes[1], "peak memory per rank (MiB)", "memory_bytes", "peak_bytes", 2.0 ** -20,
               f"peak memory: error {f['memory_mape']:.1%}"))
    for ax, what, pkey, mkey, scale, note in panels:
        hi = max(max(r["predicted"][pkey], r["measured"][mkey]) for r in rows) * scale * 1.1
        ax.plot([0, hi], [0, hi], "k-", lw=1, label="y = x")
        ax.fill_between([0, hi], [0, hi * 0.9], [0, hi * 1.1], color="0.9", label="±10%")
        for c, ((size, r), group) in enumerate(groups_of(rows).items()):
            x = np.array([g["measured"][mkey] for g in group]) * scale
            y = np.array([g["predicted"][pkey] for g in group]) * scale
            auto = np.array([g["plan"]["auto"] for g in group])
            ax.scatter(x[~auto], y[~auto], color=f"C{c}", s=18, zorder=3, label=f"{size}, {r} ranks")
            ax.scatter(x[auto], y[auto], color=f"C{c}", marker="*", s=160, edgecolor="k", zorder=4)
        ax.set(xlim=(0, hi), ylim=(0, hi), xlabel=f"measured {what}", ylabel=f"predicted {what}", title=note)
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    profiles = ", ".join(f"{Path(str(p)).stem} ({r} ranks)" for r, p in saved["profiles"].items())
    fig.suptitle(f"autopar cost model vs measured: {len(rows)} PanGu-α plans, stars the auto plans; "
                 f"profiles {profiles}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def repriced(saved: dict, profiles: dict[str, str]) -> dict:
    """``saved`` with every hand plan's prediction made again by today's cost model, under
    the profile its run was priced with (``profiles``: rank count -> a local copy of it).
    The measurements are kept; the auto rows are left out (their prediction was the run's
    own search, and today's might choose another plan)."""
    rows = []
    for row in saved["rows"]:
        if row["plan"]["auto"]:
            continue
        plan, size = Plan(**row["plan"]), saved["sizes"][row["size"]]
        p = predict_hand(plan, size, row["ranks"], profiles[str(row["ranks"])])
        rows.append(dict(row, predicted=dict(step_s=p.step_seconds, compute_s=p.compute_s, comm_s=p.comm_s,
                                             bubble_s=p.bubble_s, update_s=p.update_s,
                                             memory_bytes=p.peak_memory_bytes, stage_bytes=list(p.memory_bytes),
                                             plan=p.describe())))
    return dict(saved, rows=rows, profiles=profiles, repriced=True)


def merged(runs: list[dict]) -> dict:
    """Several saved runs as one: their rows, failures, sizes and profiles together (the
    measurement settings of the first). A failure (or a plan a deadline left unrun) that
    another run measured is left out: the plan has its row."""
    out = dict(runs[0], rows=[], failed=[], sizes={}, profiles={})
    for run in runs:
        for key in ("rows", "failed"):
            out[key] += run[key]
        for key in ("sizes", "profiles"):
            out[key].update(run[key])
    measured = {(r["size"], r["ranks"], r["name"]) for r in out["rows"]}
    out["failed"] = [f for f in out["failed"] if (f["size"], f["ranks"], f["name"]) not in measured]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4], help="rank counts (multiples of 4; --quick: 2)")
    parser.add_argument("--sizes", nargs="+", default=["H256", "H384"], choices=sorted(SIZES),
                        help="PanGu-α sizes (accuracy_plans.SIZES; 'tiny' only checks that every plan runs)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing window (median)")
    parser.add_argument("--repeats", type=int, default=3, help="timing windows (or jobs) per plan")
    parser.add_argument("--separate-processes", action="store_true",
                        help="one MPI job per repeat instead of windows of one job (the spread then includes "
                             "process start, core placement and memory layout)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile", default="cpu-2core", help="machine profile name or .json path "
                        "(without --calibrate)")
    parser.add_argument("--calibrate", action="store_true", help="measure this machine for each rank count first "
                        "(python -m autopar.calibrate under mpiexec) and price with those profiles")
    parser.add_argument("--profile-dir", default=".", help="where --calibrate writes calibrated-<R>rank.json")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="measured step time: wall clock (default), or thread CPU time on a shared machine")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds from the start (calibration included) after which no plan starts (one "
                             f"running is stopped {DEADLINE_GRACE_S} s after it); 0: none")
    parser.add_argument("--confirm", type=int, default=0, metavar="K",
                        help="after the pass, measure each group's auto plan and its K fastest rivals again, "
                             "alternating them (see confirm())")
    parser.add_argument("--confirm-rounds", type=int, default=2)
    parser.add_argument("--confirm-by", type=float, default=0.0,
                        help="seconds from the start after which no confirming job starts; 0: none")
    parser.add_argument("--plan-timeout", type=float, default=180.0, help="seconds one plan's job may take")
    parser.add_argument("--png", default="", help="write the predicted-vs-measured scatter plot here")
    parser.add_argument("--json", default="", help="write every row here (after each plan, and at the end)")
    parser.add_argument("--quick", action="store_true", help="2 ranks, the tiny model, 6 plans taking every path")
    parser.add_argument("--only", nargs="*", default=None, help="plan names to run (default: all)")
    parser.add_argument("--ops", action="store_true", help="also time one step op kind by op kind on one-stage "
                        "plans, beside the cost model's per-kind prediction (printed by --report)")
    parser.add_argument("--mpiexec", default=default_mpiexec())
    parser.add_argument("--mpiexec-args", default="", help="extra launcher flags, e.g. '--bind-to core'")
    parser.add_argument("--report", metavar="JSON", nargs="+", help="print the report (and --png) of saved --json "
                        "files, running nothing (several: one report over all their plans, e.g. 4 and 8 ranks run "
                        "as two jobs)")
    parser.add_argument("--reprice", nargs="+", metavar="R=PROFILE",
                        help="with --report: price the saved hand plans again with today's cost model under these "
                             "profiles (rank count = the calibrated profile the run used), measurements kept")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.report:
        saved = merged([json.loads(Path(p).read_text()) for p in args.report])
        if args.reprice:
            saved = repriced(saved, dict(kv.split("=", 1) for kv in args.reprice))
            print("REPRICED: the measurements of the saved run, each hand plan predicted again by today's cost "
                  "model (auto rows left out)")
        report(saved)
        if args.json:
            write_json(args.json, saved)
        if args.png:
            scatter_png(saved, args.png)
            print(f"\nscatter plot: {args.png}")
    else:
        print(blas_line(), flush=True)
        run_all(args)


if __name__ == "__main__":
    main()

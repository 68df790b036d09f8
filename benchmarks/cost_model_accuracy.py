"""Cost-model accuracy: predicted vs measured step time and peak memory of PanGu-α strategies.

Every strategy below is trained for real, one MPI job each (the serial ones as one
process), on the same small PanGu-α (fp32, dropout 0.1, AdamWeightDecay, clip 1.0). For each,
the prediction is ``CostModel.evaluate`` of the exact plan the run compiled (the
``ShardedGradProgram``'s ``.plan`` on its ``.graph``; a one-device stand-alone plan for the
serial runs) under the profile ``--profile`` names, and the measurement is:

* step time: the median over ``--steps`` steps (after ``--warmup``) of the slowest rank's
  step, each started behind a barrier, on the wall clock or (``--clock cpu``, for a machine
  shared with other work) the ranks' thread CPU time; both are printed;
* peak memory per rank: the bytes alive before a step (parameter shards, optimizer states,
  the fed batch, constants) plus the peak of numpy allocations during one step
  (``tracemalloc``, which numpy reports its data buffers to: kernel temporaries included);
  ``TrainOneStepCell.memory_report()`` (the runtime's meter: program slots only) beside it.

It prints one row per strategy, the mean absolute percentage error of time and memory, the
Spearman rank correlation of time, where the seconds go per op family (predicted, and
measured on one step of each run with every instruction timed), the memory terms side by
side, and draws predicted vs measured. Strategies that fail are listed with their error and
left out of the figures::

    OPENBLAS_NUM_THREADS=1 python benchmarks/cost_model_accuracy.py --png /tmp/accuracy.png   # 2 ranks
    OPENBLAS_NUM_THREADS=1 python benchmarks/cost_model_accuracy.py --clock cpu              # shared machine
    python benchmarks/cost_model_accuracy.py --quick                                          # 4 strategies
    # a 16-core machine: calibrate it with as many ranks as the run uses, then measure
    mpiexec -n 4 --bind-to core python -m autopar.calibrate --out lent-4.json --name lent-4
    python benchmarks/cost_model_accuracy.py --ranks 4 --mpiexec-args "--bind-to core" \\
        --profile lent-4.json --steps 11 --json lent-4-accuracy.json --png lent-4-accuracy.png
    python benchmarks/cost_model_accuracy.py --report lent-4-accuracy.json   # print a saved run again

Targets (issue 4): mean time error <= 10%, rank correlation >= 0.9, memory error <= 10%.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import default_mpiexec, mib, table, worker_env, unique_nbytes

# One step of this takes ~0.2-1 s of one core here: long enough to time, short enough for
# a dozen strategies in a few minutes.
CONFIG = dict(vocab_size=4000, seq_length=128, hidden_size=256, num_layers=4, num_heads=8,
              ffn_hidden_size=1024, dropout_rate=0.1)
BATCH = 8                      # global batch, sequences
TARGETS = {"time_mape": 0.10, "time_spearman": 0.9, "memory_mape": 0.10}
# "wall": the wall clock, what a user waits for; "cpu": the rank's thread CPU time, which
# leaves out time the OS gave other processes (a shared machine), not time spent waiting.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass(frozen=True)
class Case:
    """One strategy: how the network is annotated and how the job is run."""
    name: str
    ranks: int
    mode: str                          # parallel_mode
    batch: int = BATCH
    dp: int = 1                        # PanguAlphaConfig.data_parallel (.shard() strategies)
    mp: int = 1                        # PanguAlphaConfig.model_parallel
    vocab_emb_dp: bool = True
    full_batch: bool = False           # every rank reads the whole batch
    search_mode: str = "dynamic_programming"
    optimizer_parallel: bool = False
    mix: str = ""                      # hand-mixed per-op strategies: see mix_strategies()


def cases(n: int) -> list[Case]:
    """The strategies run on ``n`` ranks (and the serial ones on 1)."""
    semi = "semi_auto_parallel"
    out = [
        Case("serial", 1, "stand_alone"),
        Case(f"serial B{BATCH // 2}", 1, "stand_alone", batch=BATCH // 2),
        Case(f"data_parallel {n}", n, "data_parallel"),
        Case(f"dp{n}", n, semi, dp=n),
        Case(f"dp{n} full_batch", n, semi, dp=n, full_batch=True),
        Case(f"dp{n} B{2 * BATCH}", n, semi, batch=2 * BATCH, dp=n),
        Case(f"dp{n} optimizer parallel", n, semi, dp=n, optimizer_parallel=True),
        Case(f"mp{n}", n, semi, mp=n, full_batch=True),
        Case(f"mp{n} vocab split", n, semi, mp=n, vocab_emb_dp=False, full_batch=True),
        Case(f"mp{n} B{BATCH // 2}", n, semi, batch=BATCH // 2, mp=n, full_batch=True),
        Case(f"mp{n} B{2 * BATCH}", n, semi, batch=2 * BATCH, mp=n, full_batch=True),
        Case(f"attention mp{n}, FFN dp{n}", n, semi, dp=n, mix="attention_mp"),
        Case(f"attention dp{n}, FFN mp{n}", n, semi, mp=n, full_batch=True, mix="ffn_dp"),
        Case("auto dynamic_programming", n, "auto_parallel"),
        Case("auto recursive_programming", n, "auto_parallel", search_mode="recursive_programming"),
        Case("auto sharding_propagation", n, "auto_parallel", search_mode="sharding_propagation"),
        Case("auto dynamic_programming full_batch", n, "auto_parallel", full_batch=True),
    ]
    if n >= 4 and n % 2 == 0:
        out += [Case(f"dp{n // 2} x mp2", n, semi, dp=n // 2, mp=2),
                Case(f"dp{n // 2} x mp2 vocab split", n, semi, dp=n // 2, mp=2, vocab_emb_dp=False)]
    return out


QUICK = ("serial", "dp{n}", "mp{n}", "auto dynamic_programming")


def mix_strategies(net, case: Case) -> None:
    """Hand-mixed per-op strategies on a built network (every block and the query layer).

    ``attention_mp``: the network is data parallel (config dp = n), then attention is made
    Megatron model parallel over all n ranks: Q/K/V column-parallel, the core split by
    heads, the output projection row-parallel; activations change layout at its borders.
    ``ffn_dp``: the network is model parallel (config mp = n), then the FFN is made data
    parallel: both dense layers and the GeLU split the batch rows, weights whole."""
    from autopar.models.megatron import attention_core, batch_only, column_parallel, row_parallel
    n = case.ranks
    layers = list(net.backbone.blocks) + [net.backbone.query_layer]
    for layer in layers:
        if case.mix == "attention_mp":
            att = layer.attention
            for d in (att.dense1, att.dense2, att.dense3):
                column_parallel(d, 1, n)
            row_parallel(att.projection, 1, n)
            attention_core(att.scores, att.softmax, att.context, 1, n)
        elif case.mix == "ffn_dp":
            ffn = layer.output
            batch_only(ffn.mapping, n)
            batch_only(ffn.projection, n)
            ffn.gelu.shard(((n, 1, 1),))
        else:
            raise ValueError(f"Case.mix: expected 'attention_mp' or 'ffn_dp', got {case.mix!r}")


# ---- one strategy, on every rank of its job -----------------------------------------------

def build(case: Case):
    """The network, optimizer and training cell of a case (not yet compiled)."""
    from autopar import nn
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    from autopar.train import AdamWeightDecay
    cfg = PanguAlphaConfig(data_parallel=case.dp, model_parallel=case.mp, vocab_emb_dp=case.vocab_emb_dp,
                           **CONFIG)
    net = PanguAlphaWithLoss(cfg)
    if case.mix:
        mix_strategies(net, case)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
    return cfg, nn.TrainOneStepCell(net, opt, clip_norm=1.0)


def predicted(prog, case: Case, profile):
    """CostModel.evaluate of the plan ``prog`` compiled, and the model that priced it."""
    from autopar.strategy.costmodel import CostModel
    plan = prog.plan                         # serial: a one-device stand-alone plan
    full = case.full_batch or plan.stage.size == 1
    model = CostModel(prog.graph, plan.stage, profile, full, optimizer_states=2,
                      optimizer_parallel=case.optimizer_parallel)
    return model, plan, model.evaluate(plan)


def fingerprint(model, plan, case: Case) -> str:
    """A short hash of what makes two runs the same strategy: every op's sharding on its
    shapes, how the batch is fed, and optimizer parallel. Equal for equal strategies."""
    g = model.graph
    text = ";".join(f"{n.name}{[g.spec(v).shape for v in n.inputs]}={plan.shardings[n.id]}" for n in model.forward)
    text += f";inputs={sorted((v, str(lay)) for v, lay in model.input_layouts.items())}"
    text += f";optimizer_parallel={case.optimizer_parallel}"
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def predicted_by_kind(model, plan) -> dict[str, float]:
    """Predicted seconds per op family: compute of each forward op (forward + backward) by
    its kind; collectives (redistributions, gradient reductions, in-kernel all-reduces) as
    'comm'; the optimizer update as 'update'."""
    out: dict[str, float] = {}
    for n in model.forward:
        sh = plan.shardings[n.id]
        c = model.node_cost(n, sh)
        out[n.prim.kind] = out.get(n.prim.kind, 0.0) + c.compute_s
        edges = sum(model.edge_seconds(v, src, n, i, sh) for i, v in enumerate(n.inputs)
                    if (src := model.producer_layout(v, plan.shardings)) is not None
                    and model.home.get(v) != (n.id, i))
        out["comm"] = out.get("comm", 0.0) + c.comm_s + edges
        out["update"] = out.get("update", 0.0) + c.update_s
    return out


def profiled_run(program, inputs, step: int, clock, sync) -> dict[str, float]:
    """One run of ``program`` timing every instruction (``autopar.runtime.op_timer``):
    seconds per op family, backward charged to its forward op's kind, redistributions as
    'comm', and a barrier (``sync``) before each, timed apart as 'comm wait': the time ranks
    wait for each other, which the step pays inside its collectives and no cost formula has."""
    from autopar.runtime.op_timer import time_ops
    return time_ops(program, inputs, step, clock, before_comm=sync)[0]


def _time_calls(program) -> list[float]:
    """Wrap ``program.run`` (on the instance) to add its wall and CPU seconds to the list
    returned: what a step spends outside it is clipping, the optimizer and bookkeeping."""
    spent = [0.0, 0.0]
    run = program.run

    def timed(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return run(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += time.thread_time() - c0
    program.run = timed
    return spent




def worker(name: str, ranks: int, steps: int, warmup: int, profile_name: str, clock_name: str) -> None:
    from autopar.comm import install_abort_handler, world
    from autopar.context import bound_world, parallel_context
    from autopar.strategy.profile import load_profile
    install_abort_handler()
    comm = world()
    n = comm.size
    case = next(c for c in cases(ranks) if c.name == name)
    if case.ranks != n:
        raise ValueError(f"case {name!r}: expected {case.ranks} ranks, got {n}")
    profile = load_profile(profile_name)
    cfg, train = build(case)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (case.batch, cfg.seq_length + 1)).astype(np.int32)
    whole = case.full_batch or case.mode == "stand_alone"
    feed = ids if whole else np.split(ids, n)[comm.rank]
    ctx = dict(parallel_mode=case.mode, device_num=n, full_batch=case.full_batch, search_mode=case.search_mode,
               enable_parallel_optimizer=case.optimizer_parallel, cost_profile=profile_name)
    sync = comm.barrier if n > 1 else (lambda: None)
    with bound_world(comm), parallel_context(**ctx):
        t0 = time.perf_counter()
        prog = train.build(feed)
        compile_s = time.perf_counter() - t0
        model, plan, cost = predicted(prog, case, profile)
        for _ in range(warmup):
            train(feed)
        in_comm = prog.comm_clock                       # seconds spent in redistributions (wall)
        in_program = _time_calls(prog.program)          # seconds spent running the program (wall, cpu)
        wall, cpu, comm_s, outside = [], [], [], []
        calls0 = comm.stats.snapshot()["count"]
        for _ in range(steps):
            sync()
            c0, t0, k0, p0 = in_comm[0], time.perf_counter(), time.thread_time(), list(in_program)
            train(feed)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - k0)
            comm_s.append(in_comm[0] - c0)
            k = 0 if clock_name == "wall" else 1
            outside.append((wall if k == 0 else cpu)[-1] - (in_program[k] - p0[k]))
        del prog.program.run                            # the class's run again
        calls1 = comm.stats.snapshot()["count"]
        collectives = {k: (v - calls0.get(k, 0)) / steps for k, v in calls1.items() if v > calls0.get(k, 0)}
        # memory: the runtime's meter on one step, tracemalloc on the next
        train.measure_memory(True)
        train.build(feed)                      # hands the meter to the compiled program
        sync()
        train(feed)
        meter = train.memory_report()
        train.measure_memory(False)
        train.build(feed)
        states = [a for s in train.optimizer.states for a in s.values()]
        shards = [s.data for s in prog.param_shards]     # serially: the Parameters
        program = prog.program
        before = unique_nbytes(shards) + unique_nbytes(states) + feed.nbytes \
            + unique_nbytes(program.graph.consts.values())
        sync()
        tracemalloc.start()
        train(feed)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # where the seconds go: one step with every instruction timed
        clock = CLOCKS[clock_name]
        sync()
        t0 = clock()
        by_kind = profiled_run(program, [feed], train.optimizer.step_count, clock, sync)
        run_s = clock() - t0
    gathered = [comm.allreduce(np.array(x, np.float64), op="max") if n > 1 else np.array(x)
                for x in (wall, cpu, comm_s, outside)]
    wall, cpu, comm_s, outside = (np.asarray(g) for g in gathered)
    peak = before + traced_peak
    peak_max = float(comm.allreduce(np.array(float(peak)), op="max")) if n > 1 else float(peak)
    if comm.rank != 0:
        return
    print(json.dumps(dict(
        name=case.name, ranks=n, mode=case.mode, search_mode=case.search_mode, plan=fingerprint(model, plan, case),
        compile_s=compile_s,
        predicted=dict(step_s=cost.step_seconds, compute_s=cost.compute_s, comm_s=cost.comm_s,
                       update_s=cost.update_s, memory_bytes=cost.memory_bytes, param_bytes=cost.param_bytes,
                       grad_bytes=cost.grad_bytes, state_bytes=cost.state_bytes,
                       activation_bytes=cost.activation_bytes, by_kind=predicted_by_kind(model, plan)),
        measured=dict(step_s=float(np.median(wall if clock_name == "wall" else cpu)),
                      wall_s=float(np.median(wall)), cpu_s=float(np.median(cpu)), comm_s=float(np.median(comm_s)),
                      wall=wall.tolist(), cpu=cpu.tolist(), peak_bytes=peak_max, peak_rank0=peak,
                      before_bytes=before, traced_peak_bytes=traced_peak, meter=meter,
                      outside_program_s=float(np.median(outside)), profiled_program_s=run_s, by_kind=by_kind,
                      instructions=len(program.instructions), collectives=collectives))), flush=True)


# ---- the driver -----------------------------------------------------------------------------

def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        _, inverse = np.unique(x, return_inverse=True)
        sums = np.bincount(inverse, weights=r)
        counts = np.bincount(inverse)
        return (sums / counts)[inverse]
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def mape(pred, meas) -> float:
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return float(np.mean(np.abs(pred - meas) / meas))


def launch(case: Case, args) -> dict:
    me = [sys.executable, __file__, "--worker", case.name, "--ranks", str(args.ranks), "--steps", str(args.steps),
          "--warmup", str(args.warmup), "--profile", args.profile, "--clock", args.clock]
    cmd = me if case.ranks == 1 else [args.mpiexec, "-n", str(case.ranks), *shlex.split(args.mpiexec_args), *me]
    out = subprocess.run(cmd, env=worker_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=3600)
    last = out.stdout.strip().splitlines()[-1:]
    if out.returncode == 0 and last and last[0].startswith("{"):
        return json.loads(last[0])
    return dict(name=case.name, ranks=case.ranks, error=_first_error(out.stdout + out.stderr), command=shlex.join(cmd))


def _first_error(text: str) -> str:
    """The exception line of a failed worker's output (its last 'Error:' line), else its tail."""
    lines = [ln.split("] ", 1)[-1] for ln in text.splitlines()]
    errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    where = [ln for ln in lines if ln.startswith("autopar: raised by")]
    return "; ".join(errors[-1:] + where[-1:]) or " | ".join(lines[-3:])


def scatter_png(rows: list[dict], path: str, title: str) -> None:
    """Predicted (y) against measured (x) step time and peak memory, one numbered point per
    strategy (the table's #), the y = x line and a ±10% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8))
    pt = np.array([r["predicted"]["step_s"] for r in rows])
    mt = np.array([r["measured"]["step_s"] for r in rows])
    pm = np.array([r["predicted"]["memory_bytes"] for r in rows]) / 2 ** 20
    mm = np.array([r["measured"]["peak_bytes"] for r in rows]) / 2 ** 20
    serial = np.array([r["ranks"] == 1 for r in rows])
    panels = ((axes[0], "step time (s)", pt, mt,
               f"mean abs error {mape(pt, mt):.1%}, Spearman {spearman(pt, mt):.2f}"),
              (axes[1], "peak memory per rank (MiB)", pm, mm, f"mean abs error {mape(pm, mm):.1%}"))
    for ax, what, pred, meas, note in panels:
        hi = max(pred.max(), meas.max()) * 1.1
        ax.plot([0, hi], [0, hi], "k-", lw=1, label="y = x")
        ax.fill_between([0, hi], [0, hi * 0.9], [0, hi * 1.1], color="0.9", label="±10%")
        ax.scatter(meas[serial], pred[serial], color="C0", zorder=3, label="1 rank")
        ax.scatter(meas[~serial], pred[~serial], color="C1", zorder=3,
                   label=f"{max(r['ranks'] for r in rows)} ranks")
        for k, (x, y) in enumerate(zip(meas, pred), 1):
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set(xlim=(0, hi), ylim=(0, hi), xlabel=f"measured {what}", ylabel=f"predicted {what}", title=note)
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(rows: list[dict], failed: list[dict], args) -> dict:
    clock = "wall clock" if args.clock == "wall" else "thread CPU time"
    print(f"PanGu-α {CONFIG}, fp32, AdamWeightDecay, clip 1.0; profile {args.profile}; measured step = "
          f"median of {args.steps} steps after {args.warmup} warm-up, slowest rank, {clock}\n")
    body = []
    for k, r in enumerate(rows, 1):
        p, m = r["predicted"], r["measured"]
        body.append([k, r["name"], r["ranks"], r["plan"], f"{p['step_s']:.3f}", f"{m['step_s']:.3f}",
                     f"{p['step_s'] / m['step_s'] - 1:+.0%}", f"{m['wall_s']:.3f}", f"{m['cpu_s']:.3f}",
                     f"{p['comm_s']:.3f}", f"{m['comm_s']:.3f}", mib(p["memory_bytes"]), mib(m["peak_bytes"]),
                     f"{p['memory_bytes'] / m['peak_bytes'] - 1:+.0%}", mib(m["meter"]["total_peak"])])
    print(table(["#", "strategy", "ranks", "plan", "pred s", "meas s", "err", "wall s", "cpu s", "pred comm",
                 "meas comm", "pred MiB", "meas MiB", "err", "meter MiB"], body, "llrlrrrrrrrrrrr"))
    for r in failed:
        print(f"FAILED  {r['name']} ({r['ranks']} ranks): {r['error']}\n        rerun: {r['command']}")
    pt = [r["predicted"]["step_s"] for r in rows]
    mt = [r["measured"]["step_s"] for r in rows]
    pm = [r["predicted"]["memory_bytes"] for r in rows]
    mm = [r["measured"]["peak_bytes"] for r in rows]
    me = [r["measured"]["meter"]["total_peak"] for r in rows]
    figures = dict(time_mape=mape(pt, mt), time_spearman=spearman(pt, mt), memory_mape=mape(pm, mm))
    other = "cpu" if args.clock == "wall" else "wall"
    mo = [r["measured"][f"{other}_s"] for r in rows]
    print(f"\n{len(rows)} strategies run ({len({r['plan'] for r in rows})} distinct), {len(failed)} failed:")
    print(f"  step time   mean abs error {figures['time_mape']:.1%} (target <= {TARGETS['time_mape']:.0%}), "
          f"Spearman {figures['time_spearman']:.3f} (target >= {TARGETS['time_spearman']}); "
          f"against {other} time instead: {mape(pt, mo):.1%}, {spearman(pt, mo):.3f}")
    print(f"  peak memory mean abs error {figures['memory_mape']:.1%} (target <= {TARGETS['memory_mape']:.0%}); "
          f"against the runtime's meter instead: {mape(pm, me):.1%}")
    met = [k for k, v in figures.items() if (v >= TARGETS[k] if k == "time_spearman" else v <= TARGETS[k])]
    print(f"  targets met: {', '.join(met) or 'none'} of {', '.join(TARGETS)}")
    breakdown(rows)
    memory_breakdown(rows)
    return figures


def breakdown(rows: list[dict]) -> None:
    """Predicted vs measured seconds per op family, summed over every strategy's step."""
    pred: dict[str, float] = {}
    meas: dict[str, float] = {}
    for r in rows:
        for k, v in r["predicted"]["by_kind"].items():
            pred[k] = pred.get(k, 0.0) + v
        for k, v in r["measured"]["by_kind"].items():
            meas[k] = meas.get(k, 0.0) + v
        meas["update"] = meas.get("update", 0.0) + r["measured"]["outside_program_s"]
    kinds = sorted(set(pred) | set(meas), key=lambda k: -max(pred.get(k, 0), meas.get(k, 0)))
    body = [[k, f"{pred.get(k, 0):.3f}", f"{meas.get(k, 0):.3f}",
             f"{pred.get(k, 0) / meas[k]:.2f}" if meas.get(k) else "-"] for k in kinds]
    print("\nWhere the seconds go, summed over all strategies (one step of each with every instruction timed; "
          "'comm' = redistribution instructions after a barrier, 'comm wait' = that barrier: ranks waiting for "
          "each other; 'update' measured = median step - program run: clipping, optimizer, bookkeeping)")
    print(table(["op family", "predicted s", "measured s", "pred/meas"], body))


def memory_breakdown(rows: list[dict]) -> None:
    body = []
    for k, r in enumerate(rows, 1):
        p, m = r["predicted"], r["measured"]
        meter = m["meter"]
        body.append([k, r["name"], mib(p["param_bytes"]), mib(meter["parameters"]), mib(p["state_bytes"]),
                     mib(meter["optimizer_states"]), mib(p["grad_bytes"]), mib(meter["gradients"]),
                     mib(p["activation_bytes"]), mib(meter["activations_peak"]), mib(meter["inputs"]),
                     mib(m["traced_peak_bytes"])])
    print("\nMemory per rank, MiB (predicted | meter): weights, optimizer states, gradients, activations; "
          "meter inputs (batch + constants); tracemalloc peak during the step")
    print(table(["#", "strategy", "w", "w", "states", "states", "grads", "grads", "act", "act peak", "inputs",
                 "traced"], body, "llrrrrrrrrrr"))


def _title(rows: list[dict], args) -> str:
    return (f"autopar cost model (profile {Path(args.profile).stem}) vs measured ({args.clock} clock): PanGu-α "
            f"H{CONFIG['hidden_size']} L{CONFIG['num_layers']} S{CONFIG['seq_length']} V{CONFIG['vocab_size']}, "
            f"{len(rows)} strategies on 1 and {args.ranks} ranks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the parallel strategies (serial: 1)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per strategy (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", default="cpu-2core", help="machine profile name or .json path")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="what 'measured' step time means: wall clock (default), or thread CPU time "
                             "on a machine shared with other work")
    parser.add_argument("--png", default="", help="write the predicted-vs-measured scatter plot here")
    parser.add_argument("--json", default="", help="write every row (predicted and measured) here")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", nargs="*", default=None, help="strategy names to run (default: all)")
    parser.add_argument("--mpiexec", default=default_mpiexec())
    parser.add_argument("--mpiexec-args", default="", help="extra launcher flags, e.g. '--bind-to core'")
    parser.add_argument("--report", metavar="JSON", help="print the report (and --png) of a run saved with --json, "
                        "running nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.ranks, args.steps, args.warmup, args.profile, args.clock)
        return
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        for k in ("profile", "clock", "steps", "warmup", "ranks"):
            setattr(args, k, saved.get(k, getattr(args, k)))
        report(saved["rows"], saved["failed"], args)
        if args.png:
            scatter_png(saved["rows"], args.png, _title(saved["rows"], args))
            print(f"\nscatter plot: {args.png}")
        return
    todo = cases(args.ranks)
    if args.quick:
        todo = [c for c in todo if c.name in {q.format(n=args.ranks) for q in QUICK}]
    if args.only:
        todo = [c for c in todo if c.name in args.only]
    rows, failed = [], []
    for case in todo:
        t0 = time.perf_counter()
        r = launch(case, args)
        (failed if "error" in r else rows).append(r)
        said = (f"pred {r['predicted']['step_s']:.3f} s, meas {r['measured']['step_s']:.3f} s" if "error" not in r
                else f"FAILED: {r['error'][:120]}")
        print(f"  ran {case.name:38s} {said} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if not rows:
        sys.exit("no strategy ran")
    figures = report(rows, failed, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=CONFIG, batch=BATCH, profile=args.profile, clock=args.clock, steps=args.steps,
                           warmup=args.warmup, ranks=args.ranks, figures=figures,
                           cases=[dataclasses.asdict(c) for c in todo], rows=rows, failed=failed), f, indent=1)
    if args.png:
        scatter_png(rows, args.png, _title(rows, args))
        print(f"\nscatter plot: {args.png}")


if __name__ == "__main__":
    main()

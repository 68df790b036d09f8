"""Pipeline bubble and peak memory of PanGu-α, measured, against their predictions.

One run launches one MPI job per stage count and one for memory, and prints::

    OPENBLAS_NUM_THREADS=1 python benchmarks/pipeline.py                 # p = 2 (mpiexec -n 2)
    python benchmarks/pipeline.py --ranks 2 4 --mpiexec-args "--bind-to core"   # 16 cores: p = 2, 4
    python benchmarks/pipeline.py --quick                                # a tiny model: does it run
    python benchmarks/pipeline.py --schedules 1f1b --virtual 1 2 --micro 4 8 --no-memory   # interleaved rows

Every rank uses one BLAS thread.

**Bubble.** p ranks are p pipeline stages (one rank each) of PanGu-α whose layers are split
evenly (:func:`autopar.nn.set_pipeline_stages`; with ``--virtual v`` > 1 into p·v chunks run
by interleaved 1F1B, chunk c on rank c % p, for the m divisible by p), fed ``m`` micro-batches of ``MICRO_ROWS``
sequences (the micro-batch, hence the work per item, is the same for every m). For each
schedule (GPipe, 1F1B) and m, one step is the walk of the schedule
(``autopar.runtime.pipeline.runner.run_step`` on the compiled program's ``step_plan``: every forward and
backward item and the send/recv between stages; the optimizer, the tied word table's
cross-stage all-reduce and the loss broadcast are left out). Each step starts behind a
barrier; its wall time is the slowest rank's. Two measured figures:

* *busy*: each stage's forward and backward programs are wrapped, from outside (an instance
  attribute replacing ``Program.run`` on this benchmark's programs only; nothing in autopar
  changes), to add up the wall time spent inside them -- the stage's compute, since a stage
  of one rank runs no collective. bubble = 1 − Σ_stages busy / (p × step wall), the median
  over ``--steps`` steps. Idle waiting, transfers and the runner's Python between items all
  count as bubble;
* *isolated*: after each timed step, every rank (at once, behind a barrier, as in the
  pipeline) replays one forward and one backward of each of its chunks, outside the pipeline, on
  inputs copied in the warm-up step: one micro-batch's compute with nothing to wait for.
  bubble = 1 − m Σ_stages Σ_chunks (F + B) / (p × that step's wall), the median over steps --
  the brief's definition. An item that runs slower inside the pipeline than alone (a core
  shared with other work, caches) counts here as bubble, and in *busy* as compute.

Predictions beside them: (p−1)/(v·m+p−1) of the step, i.e. (p−1)/(v·m) of the ideal time
(v = 1: ``cost.pipeline_bubble``'s (p−1)/(m+p−1); the schedules' tables idle exactly that
share of stage-clocks) assumes equal items on every stage; the *runner
model* replays the schedule's per-stage orders with each chunk's item times measured alone
(medians), an item starting once its stage is free and its input made, transfers free and
non-blocking as the runner posts them (``Schedule.replay``) -- the bubble the schedule gives
these unequal stages (the last one holds the head and the loss) and a backward about twice
a forward. Measured − model is what the transfers, the runner and a shared machine add.

Interleaved rows (v > 1): the order itself idles (p−1)/(v·m) of the ideal time whatever a
backward costs against a forward (``Schedule.makespan``, tested). Every chunk boundary is a
transfer; the runner posts them non-blocking (``isend``/``irecv``), so a forward waits only
for its own input, not for its partner's progress.

**Memory.** Data parallel on 2 ranks (``parallel_mode="data_parallel"``) with and without
recompute (every block and the query layer, as PanGu-α 200B) and optimizer parallel
(``enable_parallel_optimizer``), AdamWeightDecay, one step to create the optimizer states,
then one step measured with the runtime's meter (``TrainOneStepCell.measure_memory``:
program slots, by base buffer) and one with ``tracemalloc`` (numpy's allocations, kernel
temporaries included) on top of the bytes alive before the step. The meter's activation
peak counts every intermediate: a data-parallel rank's local gradients too, until their
all-reduce (or reduce-scatter) makes them outputs; the script prints the op at the peak.
Predictions, per rank: ``CostModel.evaluate`` of the compiled plan for parameters,
gradients, optimizer states and activations (what every op keeps for backward); recompute:
those activations less ``recompute.recompute_savings`` of the rank's local graph; for
every case also ``memory.predicted_activations`` (the meter's count replayed from shapes);
optimizer parallel: the plain state bytes / dp. Total predicted = the sum of the four.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import default_mpiexec, mib, table, unique_nbytes, worker_env

from autopar.strategy.pipeline.schedule import chunk_of, make_schedule

# A forward of one layer on one 256-token sequence takes ~0.1 s of one core here, a backward
# ~0.2 s: the runner's Python between items is under 1% of that. 7 blocks + the query layer:
# 4 layers a stage at p = 2, 2 at p = 4.
CONFIG = {"vocab_size": 1024, "seq_length": 256, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
          "ffn_hidden_size": 2048, "dropout_rate": 0.1}
QUICK = {"vocab_size": 96, "seq_length": 32, "hidden_size": 64, "num_layers": 4, "num_heads": 4,
         "ffn_hidden_size": 256, "dropout_rate": 0.1}
MICRO_ROWS = 1          # sequences per micro-batch
MEMORY_BATCH = 4        # global batch of the memory runs (2 sequences a rank on 2 ranks)
MEMORY_CASES = [(False, False), (True, False), (False, True), (True, True)]   # (recompute, optimizer parallel)


def pangu(cfg_kw: dict, **changes):
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    cfg = PanguAlphaConfig(**cfg_kw, **changes)
    net = PanguAlphaWithLoss(cfg)
    return cfg, net, list(net.backbone.blocks) + [net.backbone.query_layer]


def token_batch(cfg, rows: int) -> np.ndarray:
    """(rows, S + 1) token ids, no padding (every token carries loss)."""
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, cfg.seq_length + 1)).astype(np.int32)
    ids[ids == cfg.pad_id] = cfg.pad_id + 1
    return ids


# ---- bubble: one rank of a p-stage job -------------------------------------------------------

class ItemClock:
    """Wall seconds inside a stage's forward ("F") and backward ("B") programs, per call:
    each program's ``run`` is replaced on the instance (this benchmark's programs only).
    With ``capture`` on, the next call of each (kind, chunk) keeps a copy of its inputs for
    replay."""

    def __init__(self, step_plan):
        self.items: list[tuple[str, float]] = []
        self.capture = False
        self.captured: dict[str, tuple] = {}      # "F0" (kind, chunk) -> (unwrapped run, inputs, step)
        for c, chunk in enumerate(step_plan.chunks):
            for kind, programs in (("F", chunk.forward), ("B", chunk.backward)):
                for program in {id(p): p for p in programs}.values():
                    program.run = self._timed(f"{kind}{c}", program.run)

    def _timed(self, name: str, run):
        def timed(inputs, step=0):
            if self.capture and name not in self.captured:
                self.captured[name] = (run, [np.array(a, copy=True) for a in inputs], step)
            t0 = time.perf_counter()
            out = run(inputs, step)
            self.items.append((name, time.perf_counter() - t0))
            return out
        return timed

    def replay(self, name: str) -> float:
        """Seconds of one run of the captured item, outside the pipeline, on fresh copies
        of its inputs."""
        run, inputs, step = self.captured[name]
        fresh = [a.copy() for a in inputs]
        t0 = time.perf_counter()
        run(fresh, step)
        return time.perf_counter() - t0


def bubble_case(comm, cfg_kw: dict, stages: int, micro: int, schedule: str, virtual: int, steps: int,
                warmup: int) -> dict:
    from autopar import nn
    from autopar.context import bound_world, parallel_context
    from autopar.runtime.compiled import grad_program
    from autopar.runtime.pipeline.runner import run_step
    cfg, net, layers = pangu(cfg_kw)
    ids = token_batch(cfg, micro * MICRO_ROWS)                       # (m·rows, S + 1)
    with bound_world(comm), parallel_context(parallel_mode="semi_auto_parallel", device_num=comm.size,
                                             pipeline_stages=stages, full_batch=True):
        nn.set_pipeline_stages(layers, stages=stages * virtual)
        cell = nn.PipelineCell(net, micro, schedule, virtual_stages=virtual).set_train(True)
        prog = grad_program(cell, (ids,), {}, net.trainable_params())
    plan = prog.step_plan
    clock = ItemClock(plan)
    names = [f"{kind}{c}" for c in range(len(plan.chunks)) for kind in "FB"]
    micro_batches = [[ids[k * MICRO_ROWS:(k + 1) * MICRO_ROWS]] for k in range(micro)]   # (rows, S + 1) each
    walls, busy, alone = [], [], {name: [] for name in names}
    in_pipeline: dict[str, list] = {name: [] for name in names}
    for step in range(warmup + steps):
        clock.items.clear()
        clock.capture = step == 0                    # a warm-up step: the copies cost no timed step
        comm.barrier()
        t0 = time.perf_counter()
        run_step(plan, comm, micro_batches, step)
        wall = time.perf_counter() - t0
        if step < warmup:
            continue
        walls.append(wall)
        busy.append(sum(d for _, d in clock.items))
        for name, d in clock.items:
            in_pipeline[name].append(d)
        comm.barrier()                               # every rank replays at once, as in the pipeline
        for name in names:
            alone[name].append(clock.replay(name))
    return {"rank": comm.rank, "stage": plan.stage, "stages": stages, "micro": micro, "schedule": schedule,
            "virtual": virtual, "walls": walls, "busy": busy, "alone": alone,
            "medians": {name: float(np.median(d)) for name, d in in_pipeline.items()}}


def bubble_worker(comm, cfg_kw: dict, micros: list[int], schedules: list[str], virtuals: list[int], steps: int,
                  warmup: int, out: Path) -> None:
    rows = [bubble_case(comm, cfg_kw, comm.size, m, s, v, steps, warmup)
            for s in schedules for v in virtuals for m in micros if v == 1 or m % comm.size == 0]
    (out / f"bubble-p{comm.size}-rank{comm.rank}.json").write_text(json.dumps(rows))


# ---- memory: one rank of the data-parallel job ------------------------------------------------



def gradients_waiting(program, k: int) -> int:
    """Bytes of local gradients made by instruction ``k`` or before, not yet reduced into an output
    (their all-reduce or reduce-scatter comes later): intermediates the meter counts as
    activations."""
    made_at = {o: i for i, ins in enumerate(program.instructions) for o in ins.outs}
    total = 0
    for out in program.outputs:
        i = made_at.get(out)
        node = program.instructions[i].node if i is not None else None
        if node is None or node.prim.kind != "Redistribute":
            continue
        local = node.inputs[0]
        if made_at.get(local, -1) <= k < i:
            total += program.graph.spec(local).nbytes
    return total


def predicted_memory(prog, recompute: bool, optimizer_parallel: bool, dp: int) -> dict[str, int]:
    """Per-rank bytes: the cost model's of the compiled plan, with the recompute and
    optimizer-parallel predictions applied."""
    from autopar.runtime.memory import predicted_activations
    from autopar.runtime.recompute import recompute_savings
    from autopar.strategy.costmodel import CostModel
    from autopar.strategy.profile import load_profile
    model = CostModel(prog.graph, prog.plan.stage, load_profile("cpu-2core"), full_batch=False,
                      optimizer_states=2, optimizer_parallel=False)
    cost = model.evaluate(prog.plan)
    saved = sum(recompute_savings(prog.local_graph, prog.program.outputs).values()) if recompute else 0
    states = cost.state_bytes // dp if optimizer_parallel else cost.state_bytes
    timeline = predicted_activations(prog.program)          # intermediate bytes after each instruction
    out = {"parameters": cost.param_bytes, "gradients": cost.grad_bytes, "optimizer_states": states,
           "activations": cost.activation_bytes - saved, "recompute_saves": saved,
           "activations_step_by_step": max(timeline)}
    ins = prog.program.instructions
    peak = int(np.argmax(timeline))
    out["peak_at"] = f"{ins[peak].node.name} ({ins[peak].node.phase}, instruction {peak + 1} of {len(ins)})"
    out["gradients_waiting_at_peak"] = gradients_waiting(prog.program, peak)
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer_states"] + out["activations"]
    return out


def memory_case(comm, cfg_kw: dict, recompute: bool, optimizer_parallel: bool) -> dict:
    from autopar import nn
    from autopar.context import bound_world, parallel_context
    from autopar.train import AdamWeightDecay
    n = comm.size
    cfg, net, layers = pangu(cfg_kw)
    if recompute:
        for layer in layers:
            layer.recompute()
    feed = np.split(token_batch(cfg, MEMORY_BATCH), n)[comm.rank]              # (B/dp, S + 1)
    with bound_world(comm), parallel_context(parallel_mode="data_parallel", device_num=n,
                                             enable_parallel_optimizer=optimizer_parallel):
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
        train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
        prog = train.build(feed)
        train(feed)                                  # creates the optimizer states
        train.measure_memory(True)
        train.build(feed)                            # hands the meter to the program
        comm.barrier()
        train(feed)
        meter = train.memory_report()
        train.measure_memory(False)
        train.build(feed)
        states = [a for s in train.optimizer.states for a in s.values()]
        before = unique_nbytes([s.data for s in prog.param_shards]) + unique_nbytes(states) + feed.nbytes \
            + unique_nbytes(prog.program.graph.consts.values())
        comm.barrier()
        tracemalloc.start()
        train(feed)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"rank": comm.rank, "recompute": recompute, "optimizer_parallel": optimizer_parallel, "meter": meter,
            "traced_total": before + traced, "predicted": predicted_memory(prog, recompute, optimizer_parallel, n)}


def memory_worker(comm, cfg_kw: dict, out: Path) -> None:
    rows = [memory_case(comm, cfg_kw, rc, op) for rc, op in MEMORY_CASES]
    (out / f"memory-rank{comm.rank}.json").write_text(json.dumps(rows))


# ---- the driver ---------------------------------------------------------------------------------

def bubble_rows(ranks: list[dict]) -> tuple[list, list]:
    """Table row of one (p, v, m, schedule) from its ranks' records, and its per-stage rows."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    p, m, v = ranks[0]["stages"], ranks[0]["micro"], ranks[0]["virtual"]
    walls = np.max([r["walls"] for r in ranks], axis=0)                       # (steps,) slowest rank
    busy = np.sum([r["busy"] for r in ranks], axis=0)                         # (steps,) over stages
    alone = m * np.sum([np.sum(list(r["alone"].values()), axis=0) for r in ranks], axis=0)   # (steps,)
    measured = float(np.median(1 - busy / (p * walls)))
    isolated = float(np.median(1 - alone / (p * walls)))
    of_ideal = float(np.median(p * walls / busy - 1))
    item_s = [{name: float(np.median(d)) for name, d in r["alone"].items()} for r in ranks]
    by_stage = {r["stage"]: s for r, s in zip(ranks, item_s)}
    model_wall = make_schedule(ranks[0]["schedule"], p, m, v).replay(
        lambda stage, item: by_stage[stage][f"{item[0]}{chunk_of(item)}"])
    model = 1 - m * sum(sum(s.values()) for s in item_s) / (p * model_wall)
    formula = (p - 1) / (v * m + p - 1)            # the table's idle share of the step (v = 1: (p-1)/(m+p-1))
    row = [p, v, m, ranks[0]["schedule"], f"{formula:.3f}", f"{model:.3f}", f"{measured:.3f}", f"{isolated:.3f}",
           f"{measured - formula:+.3f}", f"{(p - 1) / (v * m):.3f}", f"{of_ideal:.3f}", f"{np.median(walls):.2f}",
           f"{model_wall:.2f}"]
    stages = []
    for r, s in zip(ranks, item_s):
        for c in range(v):
            stages.append([p, v, m, ranks[0]["schedule"], r["stage"], c, f"{s[f'F{c}'] * 1e3:.0f}",
                           f"{s[f'B{c}'] * 1e3:.0f}", f"{r['medians'][f'F{c}'] * 1e3:.0f}",
                           f"{r['medians'][f'B{c}'] * 1e3:.0f}"])
    return row, stages


def print_bubble(records: list[dict], cfg_kw: dict) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["stages"], r["schedule"], r["virtual"], r["micro"]), []).append(r)
    rows, stages = [], []
    for key in sorted(groups):
        row, per_stage = bubble_rows(groups[key])
        rows.append(row)
        stages += per_stage
    steps = len(records[0]["walls"])
    print(f"\nPipeline bubble (share of p x step wall not spent in stage compute): PanGu-α {cfg_kw}, "
          f"{MICRO_ROWS} sequence(s) a micro-batch, one rank a stage, v chunks a stage (v > 1: interleaved), "
          f"median of {steps} steps")
    print(table(["p", "v", "m", "schedule", "(p-1)/(vm+p-1)", "runner model", "measured busy", "measured isolated",
                 "busy - formula", "(p-1)/(vm)", "measured of ideal", "step s", "model step s"], rows,
                "rrrl" + "r" * 9))
    print("\nItems per stage and chunk (ms, medians): replayed alone after each step, and inside the pipeline")
    print(table(["p", "v", "m", "schedule", "stage", "chunk", "F alone", "B alone", "F in pipeline",
                 "B in pipeline"], stages, "rrrl" + "r" * 6))


def case_name(r: dict) -> str:
    on = [name for name, key in (("recompute", "recompute"), ("optimizer parallel", "optimizer_parallel")) if r[key]]
    return " + ".join(on) or "plain"


def print_memory(records: list[dict], cfg_kw: dict) -> None:
    order = {case: i for i, case in enumerate(MEMORY_CASES)}
    by_rank: dict[int, list[dict]] = {}
    for r in sorted(records, key=lambda r: order[(r["recompute"], r["optimizer_parallel"])]):
        by_rank.setdefault(r["rank"], []).append(r)
    rank0 = by_rank[0]
    spread = max(abs(o["meter"]["total_peak"] / r["meter"]["total_peak"] - 1)
                 for rs in by_rank.values() for r, o in zip(rank0, rs))
    print(f"\nPeak memory per rank (MiB, rank 0; the {len(by_rank)} ranks' meter totals differ by <= {spread:.1%}): "
          f"PanGu-α {cfg_kw}, data parallel {len(by_rank)}, batch {MEMORY_BATCH}, fp32, AdamWeightDecay")
    rows = []
    for r in rank0:
        p, m = r["predicted"], r["meter"]
        cost = "activations: cost model" + (" - recompute saves" if r["recompute"] else "")
        pairs = [("parameters", p["parameters"], m["parameters"]),
                 ("gradients (outputs)", p["gradients"], m["gradients"]),
                 ("optimizer states", p["optimizer_states"], m["optimizer_states"]),
                 (f"{cost} / meter peak", p["activations"], m["activations_peak"]),
                 ("activations: step by step / meter peak", p["activations_step_by_step"], m["activations_peak"]),
                 ("total: sum of 4 above / meter", p["total"], m["total_peak"]),
                 ("total: sum of 4 above / tracemalloc", p["total"], r["traced_total"])]
        for k, (what, pred, got) in enumerate(pairs):
            rows.append([case_name(r) if k == 0 else "", what, mib(pred), mib(got), f"{pred / got - 1:+.1%}"])
    print(table(["case", "bytes", "predicted", "measured", "error"], rows, "llrrr"))
    for r in rank0:
        print(f"meter's activation peak, {case_name(r)}: at {r['predicted']['peak_at']}; "
              f"{mib(r['predicted']['gradients_waiting_at_peak'])} MiB of it local gradients awaiting their reduction")
    plain = rank0[0]
    for r in rank0[1:]:
        if r["recompute"] and not r["optimizer_parallel"]:
            cut = plain["meter"]["activations_peak"] - r["meter"]["activations_peak"]
            waiting = [x["predicted"]["gradients_waiting_at_peak"] for x in (plain, r)]
            net_cut = cut - waiting[0] + waiting[1]
            saves = r["predicted"]["recompute_saves"]
            print(f"recompute: activation peak cut {mib(cut)} MiB measured, {mib(net_cut)} MiB leaving out the local "
                  f"gradients awaiting reduction at each peak; {mib(saves)} MiB predicted (recompute_savings): "
                  f"{saves / cut - 1:+.1%}, {saves / net_cut - 1:+.1%}")
        if r["optimizer_parallel"] and not r["recompute"]:
            ratio = plain["meter"]["optimizer_states"] / r["meter"]["optimizer_states"]
            print(f"optimizer parallel: optimizer-state bytes per rank fall {ratio:.2f}x measured "
                  f"(data parallel {len(by_rank)})")


def launch(args, n: int, worker: list[str], out: Path) -> None:
    cmd = [args.mpiexec, "-n", str(n), *shlex.split(args.mpiexec_args), sys.executable, __file__,
           "--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--schedules", *args.schedules, "--virtual", *map(str, args.virtual),
           *(["--quick"] if args.quick else []), *worker]
    if args.micro:
        cmd += ["--micro", *map(str, args.micro)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    print(f"  {shlex.join(cmd[:3])} ... {' '.join(worker)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="stage counts p (one rank a stage)")
    parser.add_argument("--micro", type=int, nargs="+", help="micro-batch counts (default p, 2p, 4p)")
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--virtual", type=int, nargs="+", default=[1, 2],
                        help="chunks per stage (v > 1: interleaved, for the micro-batch counts divisible by p)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks the script, not the figures")
    parser.add_argument("--mpiexec", default=default_mpiexec())
    parser.add_argument("--mpiexec-args", default="", help="extra launcher flags, e.g. '--bind-to core'")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["bubble", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps: expected >= 1 (the warm-up step copies the inputs to replay)")
    cfg_kw = QUICK if args.quick else CONFIG
    if args.worker:
        from autopar.comm import install_abort_handler, world
        install_abort_handler()
        comm = world()
        if args.worker == "bubble":
            micros = args.micro or [comm.size, 2 * comm.size, 4 * comm.size]
            bubble_worker(comm, cfg_kw, micros, args.schedules, args.virtual, args.steps, args.warmup, args.out)
        else:
            memory_worker(comm, cfg_kw, args.out)
        return
    if not args.mpiexec:
        sys.exit("no mpiexec found: pass --mpiexec")
    with tempfile.TemporaryDirectory(prefix="autopar-pipeline-") as tmp:
        out = Path(tmp)
        for p in args.ranks:
            launch(args, p, ["--worker", "bubble"], out)
        if not args.no_memory:
            launch(args, 2, ["--worker", "memory"], out)
        bubble = [r for f in sorted(out.glob("bubble-*.json")) for r in json.loads(f.read_text())]
        memory = [r for f in sorted(out.glob("memory-*.json")) for r in json.loads(f.read_text())]
    print_bubble(bubble, cfg_kw)
    if memory:
        print_memory(memory, cfg_kw)


if __name__ == "__main__":
    main()

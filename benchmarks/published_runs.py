"""Published large GPT runs priced by the stage planner: predicted vs published per-GPU throughput.

Each row is a GPT training run on A100 GPUs published with its own parallel plan: tensor
(t), pipeline (p) and data (d) degrees, global batch B, micro-batch size b, and the
achieved teraFLOP/s per GPU. The benchmark prices that hand plan with the stage search's
``evaluate`` on the shipped ``a100-8`` profile (fp16 compute, full recompute as the runs
used, no optimizer parallel), turns the predicted step into teraFLOP/s per GPU with the
paper's own FLOP count, and prints it beside the published figure; then it runs the search
on the same devices and batch and says whether the searched plan is predicted at least as
fast as the hand plan (within the 80 GiB memory cap)::

    python benchmarks/published_runs.py                        # every row, hand plan and search
    python benchmarks/published_runs.py --no-search            # the hand plans only (seconds)
    python benchmarks/published_runs.py --rows 1.7B 529.6B --breakdown 1.7B 529.6B

Sources (every number below is from one of them; rows whose values were not all found in
a source read are left out):

* [N21-T1] Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
  Using Megatron-LM", SC21 (arXiv:2104.04473), Table 1: heads, hidden, layers, t, p, GPUs,
  batch, achieved teraFLOP/s per GPU. Section 5.1: vocabulary 51,200, sequence 2048, the
  interleaved schedule with the scatter/gather optimization; eq. (3) is the FLOP count and
  assumes activation recomputation; peak 312 teraFLOP/s (fp16). Micro-batch sizes and full
  ("uniform") recompute: the authors' reproduction script for Table 1,
  NVIDIA/Megatron-LM ``examples/sc21/run_table_1.sh`` (MBS, ``--recompute-method uniform``,
  ``--num-layers-per-virtual-pipeline-stage`` giving the interleaving v).
* [N21-T2] the same paper, Table 2, the "PTD Parallelism" rows: 174.6B (the GPT-3
  architecture, 96 layers, hidden 12288, 96 heads, section 5.3.2) with model-parallel size
  96 and 529.6B (Table 1's shape) with model-parallel size 280, microbatch size 1. The
  table gives t x p only; t = 8 is the paper's tensor-parallel size for large models
  (section 4.1: "t = 8 in our experiments"; Table 1 has t = 8, p = 35 for 529.6B), so
  p = 12 and 35. Recompute is taken as on (eq. 3, which the table's throughput uses,
  assumes it); the schedule is not stated for Table 2.
* Not priced: Korthikanti et al. 2022 ("Reducing Activation Recomputation", arXiv:2205.05198)
  MFU 41.5 / 51.4 / 56.0 / 56.3 % for 22B / 175B / 530B / 1T (NVIDIA/Megatron-LM README);
  their runs' parallel configurations were not found in a text source read here, and they
  use sequence parallelism and selective recompute, which autopar does not plan.

How the runs are modelled: the PanGu-α family with shape overrides (hidden, heads, FFN 4h,
sequence 2048, vocabulary 51,200) and ``num_layers = l``: PanGu-α's last layer is its query
layer (an attention + FFN layer whose query comes from a position table), so the model has
l attention + FFN layers like the GPT, l - 1 of them pipelined and the query layer on the
last stage with the head (its extra S x H query table is 0.2% of the weights). Megatron
splits l layers evenly over p stages; here the split is the planner's most even one that
fits. The interleaved schedule is priced as run (bubble (sum of the stages' micro-batch times
- the slowest's) / v, sends at every chunk boundary) where the family has a layer per chunk. Not modelled: fused kernels, overlap of the data-parallel
all-reduce with the backward pass.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from _common import table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autopar import models  # noqa: E402,F401  (registers the model families)
from autopar.ir.mesh import Mesh  # noqa: E402
from autopar.strategy.costmodel import CostModel  # noqa: E402
from autopar.strategy.pipeline.registry import model_family  # noqa: E402
from autopar.strategy.pipeline.stage_search import StageCoster, StageSetting, evaluate, search_stages  # noqa: E402
from autopar.strategy.profile import load_profile  # noqa: E402
from autopar.strategy.sharding_plan import plan_shardings  # noqa: E402

VOCAB, SEQ = 51200, 2048            # [N21-T1] section 5.1, every model
PEAK_TFLOPS = 312.0                 # [N21-T1] section 5: A100 16-bit peak
BASE_PRESET = "2.6B"                # a published PanGu-α preset: its dropout 0.1 and layer order


@dataclass(frozen=True)
class Run:
    """One published run: its shape, its hand plan, what it achieved."""
    name: str
    source: str
    params_b: float                 # published parameter count, billions (checks the shape: eq. (2))
    heads: int
    hidden: int
    layers: int
    t: int
    p: int
    gpus: int
    batch: int
    micro_batch: int                # b: sequences per data-parallel rank per micro-batch
    tflops: float                   # published teraFLOP/s per GPU
    interleave: int = 1             # v: virtual stages per GPU (1: plain 1F1B)
    aggregate_pflops: float | None = None   # [N21-T1]'s last column (checks GPUs x teraFLOP/s)

    @property
    def d(self) -> int:
        return self.gpus // (self.t * self.p)

    @property
    def micro_batches(self) -> int:
        return self.batch // (self.d * self.micro_batch)

    def parameters(self) -> float:
        """[N21-T1] eq. (2): P = 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h))."""
        l, h = self.layers, self.hidden
        return 12 * l * h * h * (1 + 13 / (12 * h) + (VOCAB + SEQ) / (12 * l * h))

    def flops(self) -> float:
        """[N21-T1] eq. (3): FLOPs per iteration with recompute, B s l h^2 terms."""
        b, s, l, h, v = self.batch, SEQ, self.layers, self.hidden, VOCAB
        return 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


T1, T2 = "N21-T1", "N21-T2"
RUNS = (
    # name  source params heads hidden layers t  p  GPUs batch b  TFLOP/s; v from run_table_1.sh
    Run("1.7B", T1, 1.7, 24, 2304, 24, 1, 1, 32, 512, 16, 137, aggregate_pflops=4.4),
    Run("3.6B", T1, 3.6, 32, 3072, 30, 2, 1, 64, 512, 16, 138, aggregate_pflops=8.8),
    Run("7.5B", T1, 7.5, 32, 4096, 36, 4, 1, 128, 512, 16, 142, aggregate_pflops=18.2),
    Run("18.4B", T1, 18.4, 48, 6144, 40, 8, 1, 256, 1024, 8, 135, aggregate_pflops=34.6),
    Run("39.1B", T1, 39.1, 64, 8192, 48, 8, 2, 512, 1536, 4, 138, aggregate_pflops=70.8),
    Run("76.1B", T1, 76.1, 80, 10240, 60, 8, 4, 1024, 1792, 2, 140, 3, 143.8),     # 15 layers/stage, 5/chunk
    Run("145.6B", T1, 145.6, 96, 12288, 80, 8, 8, 1536, 2304, 2, 148, 2, 227.1),   # 10 layers/stage, 5/chunk
    Run("310.1B", T1, 310.1, 128, 16384, 96, 8, 16, 1920, 2160, 1, 155, 2, 297.4),  # 6 layers/stage, 3/chunk
    Run("529.6B", T1, 529.6, 128, 20480, 105, 8, 35, 2520, 2520, 1, 163, 3, 410.2),  # 3 layers/stage, 1/chunk
    Run("1008.0B", T1, 1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 1, 163, aggregate_pflops=502.0),
    Run("174.6B@384", T2, 174.6, 96, 12288, 96, 8, 12, 384, 1536, 1, 153),
    Run("174.6B@768", T2, 174.6, 96, 12288, 96, 8, 12, 768, 1536, 1, 149),
    Run("174.6B@1536", T2, 174.6, 96, 12288, 96, 8, 12, 1536, 1536, 1, 141),
    Run("529.6B@560", T2, 529.6, 128, 20480, 105, 8, 35, 560, 2240, 1, 171),
    Run("529.6B@1120", T2, 529.6, 128, 20480, 105, 8, 35, 1120, 2240, 1, 167),
    Run("529.6B@2240", T2, 529.6, 128, 20480, 105, 8, 35, 2240, 2240, 1, 159),
)


def family_of(run: Run):
    """The run's shape as a PanGu-α config (module docstring: the query layer is layer l)."""
    return model_family("pangu_alpha", BASE_PRESET, hidden_size=run.hidden, num_layers=run.layers,
                        num_heads=run.heads, ffn_hidden_size=4 * run.hidden, seq_length=SEQ, vocab_size=VOCAB,
                        compute_dtype="float16")


def hand_setting(run: Run, pipelined_layers: int | None = None) -> StageSetting:
    """The run's own plan, with its interleaving v where the family has a layer for each of
    the p x v chunks; else plain 1F1B (PanGu-alpha's family pipelines l - 1 blocks beside its
    query layer: 529.6B's 104 blocks cannot fill 35 x 3 chunks, and fewer chunks than the
    run used is another plan, not the run's)."""
    v = run.interleave
    if pipelined_layers is not None and pipelined_layers < run.p * v:
        v = 1
    return StageSetting(run.p, run.d, run.t, run.micro_batches, recompute=True, optimizer_parallel=False,
                        virtual_stages=v)


def tflops_per_gpu(run: Run, step_s: float) -> float:
    return run.flops() / step_s / run.gpus / 1e12


def price(run: Run, profile, search: bool) -> dict:
    """The hand plan's prediction and, with ``search``, the searched plan's."""
    coster = StageCoster(family_of(run), run.gpus, profile)
    hand = evaluate(coster, run.batch, hand_setting(run, coster.family.layers), profile.memory_bytes)
    out = {"run": run, "coster": coster, "hand": hand, "best": None, "search_s": None}
    if search:
        t0 = time.perf_counter()
        out["best"], _ = search_stages(coster, run.batch, profile.memory_bytes)
        out["search_s"] = time.perf_counter() - t0
    return out


def short(plan) -> str:
    return (f"t{plan.mp} p{plan.pp} d{plan.dp} m{plan.micro_batches} b{plan.micro_batch_size // plan.dp}"
            f"{' rc' if plan.recompute else ''}{' zero' if plan.optimizer_parallel else ''}")


def results_table(results: list[dict], cap: float) -> tuple[str, float]:
    rows, errors = [], []
    for r in results:
        run, hand, best = r["run"], r["hand"], r["best"]
        pred = tflops_per_gpu(run, hand.step_seconds)
        err = (pred - run.tflops) / run.tflops
        errors.append(abs(err))
        fits = "yes" if hand.peak_memory_bytes <= cap else "NO"
        row = [run.name, run.source, run.gpus, f"{run.t}x{run.p}x{run.d}", run.batch, run.micro_batch,
               run.micro_batches, run.interleave, f"{run.tflops:.0f}", f"{pred:.1f}", f"{100 * err:+.1f}%",
               f"{hand.peak_memory_bytes / 2 ** 30:.1f} {fits}", f"{100 * hand.bubble_s / hand.step_seconds:.1f}%"]
        if r["search_s"] is not None:
            faster = best is not None and best.step_seconds <= hand.step_seconds * (1 + 1e-9)
            row += ["-" if best is None else short(best),
                    "-" if best is None else f"{tflops_per_gpu(run, best.step_seconds):.1f}",
                    "yes" if faster else "NO", f"{r['search_s']:.1f}"]
        rows.append(row)
    headers = ["run", "source", "GPUs", "t x p x d", "B", "b", "m", "v", "published", "predicted", "error",
               "memory GiB fits", "bubble"]
    if results and results[0]["search_s"] is not None:
        headers += ["searched plan", "searched", "searched >= hand", "search s"]
    return table(headers, rows), sum(errors) / len(errors)


def breakdown(r: dict, profile) -> str:
    """Where a hand plan's predicted step goes: the step's parts, then one pipelined layer's
    compute per micro-batch by op kind and dtype against the same FLOPs at fp16 peak."""
    run, hand, coster = r["run"], r["hand"], r["coster"]
    ideal_step = run.flops() / run.gpus / (PEAK_TFLOPS * 1e12)
    lines = [f"{run.name} ({run.t}x{run.p}x{run.d}, m {run.micro_batches}, b {run.micro_batch}): predicted step "
             f"{hand.step_seconds:.2f} s = compute {hand.compute_s:.2f} + communication {hand.comm_s:.2f} + bubble "
             f"{hand.bubble_s:.2f} + optimizer {hand.update_s:.3f}; eq. (3) FLOPs at 312 TFLOP/s: {ideal_step:.2f} s; "
             f"published {run.tflops:.0f} TFLOP/s = {run.flops() / run.gpus / (run.tflops * 1e12):.2f} s; "
             f"layers per stage {','.join(map(str, hand.layers_per_stage))}"]
    mb = run.batch // run.micro_batches
    graph = coster.family.graph(mb, run.d, run.t, one_layer=True)
    stage = Mesh((run.gpus // run.p,), ("devices",))
    model = CostModel(graph, stage, profile, True)
    groups = defaultdict(lambda: [0.0, 0.0, 0.0])
    for n, c, edge in model.op_costs(plan_shardings(graph, "semi_auto_parallel", stage, True)):
        if not n.scope.startswith(coster.family.layer_scope):
            continue
        g = groups[(n.prim.kind, str(graph.spec(n.outputs[0]).dtype))]
        g[0], g[1], g[2] = g[0] + c.compute_s, g[1] + c.flops, g[2] + c.comm_s + edge
    total = sum(g[0] for g in groups.values())
    rows = [[kind, dtype, f"{1e3 * s:.2f}", f"{100 * s / total:.1f}%", f"{f / s / 1e12:.1f}" if f else "-",
             f"{1e3 * comm:.2f}"]
            for (kind, dtype), (s, f, comm) in sorted(groups.items(), key=lambda kv: -kv[1][0])]
    layer_flops = sum(g[1] for g in groups.values())
    lines.append(f"one pipelined layer, one micro-batch of {mb} on one rank (forward + backward, no recompute): "
                 f"compute {1e3 * total:.1f} ms for {layer_flops / 1e12:.2f} TFLOP = "
                 f"{layer_flops / total / 1e12:.1f} TFLOP/s; at 312 TFLOP/s {1e3 * layer_flops / 312e12:.1f} ms")
    lines.append(table(["op kind", "dtype", "compute ms", "share", "TFLOP/s", "comm ms"], rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=None, help="run names (default: every row)")
    p.add_argument("--no-search", action="store_true", help="price the hand plans only")
    p.add_argument("--breakdown", nargs="*", default=["1.7B", "529.6B"], help="runs whose step to break down")
    p.add_argument("--profile", default="a100-8")
    args = p.parse_args(argv)
    known = {r.name: r for r in RUNS}
    unknown = [n for n in (args.rows or []) + args.breakdown if n not in known]
    if unknown:
        p.error(f"argument --rows/--breakdown: expected run names among {list(known)}, got {unknown}")
    profile = load_profile(args.profile)
    runs = [known[n] for n in args.rows] if args.rows else list(RUNS)
    t0 = time.perf_counter()
    results = [price(run, profile, not args.no_search) for run in runs]
    text, mae = results_table(results, profile.memory_bytes)
    print(f"published GPT runs on A100 priced on profile {profile.name} (fp16, full recompute, hand plans as "
          f"published); TFLOP/s per GPU by eq. (3)\n")
    print(text)
    print(f"\nmean absolute error of predicted vs published TFLOP/s per GPU: {100 * mae:.1f}% over {len(results)} "
          f"runs ({time.perf_counter() - t0:.0f} s)")
    for name in args.breakdown:
        r = next((r for r in results if r["run"].name == name), None) or price(known[name], profile, False)
        print("\n" + breakdown(r, profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())

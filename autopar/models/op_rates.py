"""Per-op-kind throughputs: what each non-GEMM kernel really moves per second.

Elementwise bandwidth alone predicts a dropout (a hashed mask), a GeLU (erf), a softmax or
a LayerNorm (row reductions, exp) several times too fast. So calibration trains a small
PanGu-α serially, times every instruction (forward and backward charged to the forward
op's kind, :mod:`autopar.runtime.op_timer`), and divides the bytes the cost model counts
for that kind by the seconds measured, less the per-op overhead:

    rate(kind) = sum of bytes_moved(op) / (seconds(kind) - instructions(kind) x op_overhead_s)

The workload's shapes differ from the accuracy benchmark's on purpose, so that benchmark
tests the calibration rather than repeating it. GEMMs are priced by FLOPs and left out.
The optimizer update (AdamWeightDecay with global-norm clipping) is rated the same way as
``optimizer_update``: the bytes the cost model counts for it over the seconds it takes.

It lives in models/ because it trains a model: the planner (strategy/) only reads the
rates it writes into a machine profile; ``python -m autopar.calibrate`` runs it.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..ir.mesh import Mesh
from ..runtime import op_timer
from ..runtime.compiled import GradProgram
from ..strategy.costmodel import OPTIMIZER_BYTES_PER_ELEMENT, OPTIMIZER_KIND, CostModel
from ..strategy.profile import MachineProfile
from ..strategy.sharding_plan import plan_shardings
from ..train import AdamWeightDecay
from ..train.clip import global_norm, scale_
from .pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss

# The calibration workload: a small PanGu-α, fp32, dropout on, one serial training step.
WORKLOAD = dict(vocab_size=3000, seq_length=96, hidden_size=192, num_layers=3, num_heads=6,
                ffn_hidden_size=768, dropout_rate=0.1)
BATCH = 8
GEMM_KINDS = ("MatMul", "BatchMatMul")
MIN_SECONDS = 2e-4        # kinds cheaper than this per step are too noisy to rate


QUICK_WORKLOAD = dict(vocab_size=500, seq_length=32, hidden_size=64, num_layers=2, num_heads=4,
                      ffn_hidden_size=256, dropout_rate=0.1)

# On a GPU the CPU workload's kernels (a (8, 96, 192) activation is 0.6 MB) finish in a few
# microseconds: every kind would time the launch and the clock's synchronisation, not the
# bytes. This one has the 350M preset's width and sequence (H1024, 16 heads, S1024; its
# (B, S, H) activations are 8 MiB a row in bfloat16), five decoder blocks and the query layer
# instead of 24 (enough parameters, ~100, that the update's fixed host costs -- the norm's
# one read -- are not charged to a few), half the benchmarks' batch and a small vocabulary:
# every kind's kernels move megabytes, and one step stays a fraction of a second. Ops compute in bfloat16 with float32
# weights (O2), as the GPU runs train; the profile holds one rate per kind, so a float32
# run is priced with the bfloat16 kernels' bytes/s (its bytes are counted in float32).
GPU_WORKLOAD = dict(vocab_size=8000, seq_length=1024, hidden_size=1024, num_layers=6, num_heads=16,
                    ffn_hidden_size=4096, dropout_rate=0.1, compute_dtype="bfloat16", param_dtype="float32")
GPU_BATCH = 4
GPU_QUICK_WORKLOAD = dict(GPU_WORKLOAD, seq_length=512, hidden_size=512, num_heads=8, ffn_hidden_size=2048)
# the same layers at twice the width: the second point of each kind's fixed cost + bytes/rate fit
GPU_WIDE_WORKLOAD = dict(GPU_WORKLOAD, hidden_size=2048, ffn_hidden_size=8192)
GPU_QUICK_WIDE_WORKLOAD = dict(GPU_QUICK_WORKLOAD, hidden_size=1024, ffn_hidden_size=4096)


def _workload(workload: dict | None, batch: int):
    """(config, net in training mode, ids, compiled forward+backward) of the workload."""
    cfg = PanguAlphaConfig(**(workload or WORKLOAD))
    net = PanguAlphaWithLoss(cfg)
    net.set_train(True)                          # dropout on, as in training
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.seq_length + 1)).astype(np.int32)
    return cfg, net, ids, GradProgram(net, (ids,), {}, net.trainable_params())


def _best_seconds(net, prog, ids, repeats: int, clock, timed) -> tuple[dict[str, float], dict[str, int]]:
    """({kind: best seconds per step}, {kind: instructions}), the optimizer update included
    as OPTIMIZER_KIND with one 'instruction' per parameter."""
    prog.program.run([ids])                      # warm up: first-touch allocations
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    for step in range(repeats):
        seconds, counts = op_timer.time_ops(prog.program, [ids], step, clock, timed=timed)
        for kind, s in seconds.items():
            best[kind] = min(best.get(kind, s), s)
    best[OPTIMIZER_KIND] = _time_update(net, prog, ids, repeats, clock, timed)
    counts[OPTIMIZER_KIND] = len(net.trainable_params())
    return best, counts


def _measured_kinds(profile: MachineProfile, repeats: int, clock, workload: dict | None, batch: int, timed):
    """(config, {kind: bytes the cost model counts}, {kind: best seconds}, {kind: instructions})
    of one workload step; the update is OPTIMIZER_KIND with one instruction per parameter."""
    cfg, net, ids, prog = _workload(workload, batch)
    graph = prog.traced.graph
    stage = Mesh((1,), ("devices",))
    model = CostModel(graph, stage, replace(profile, op_bytes_per_s={}, op_host_s={}, op_device_s={}), True)
    moved: dict[str, float] = {}
    for n, c, _ in model.op_costs(plan_shardings(graph, "stand_alone", stage, True)):
        moved[n.prim.kind] = moved.get(n.prim.kind, 0.0) + c.bytes_moved
    best, counts = _best_seconds(net, prog, ids, repeats, clock, timed)
    moved[OPTIMIZER_KIND] = OPTIMIZER_BYTES_PER_ELEMENT * sum(p.data.nbytes for p in net.trainable_params())
    return cfg, moved, best, counts


def _rated(kind: str, moved: dict, seconds: dict) -> bool:
    """Whether a kind gets a rate: not a GEMM (priced by FLOPs), bytes counted, above the noise."""
    return kind not in GEMM_KINDS and moved.get(kind, 0) > 0 and seconds.get(kind, 0) >= MIN_SECONDS


def measure_op_rates(profile: MachineProfile, repeats: int = 5, clock=time.thread_time,
                     workload: dict | None = None, batch: int = BATCH,
                     agree=lambda seconds: seconds, timed=None) -> dict[str, tuple[float, str]]:
    """{kind: (bytes/s, how it was measured)} under ``profile``'s ``op_overhead_s``; the
    fastest of ``repeats`` runs per kind, then ``agree`` (e.g. the slowest rank's: a max
    all-reduce over the kinds' seconds in sorted order). ``timed`` (see
    :func:`~autopar.runtime.op_timer.time_ops`) times each instruction instead of ``clock``."""
    cfg, moved, best, counts = _measured_kinds(profile, repeats, clock, workload, batch, timed)
    counts[OPTIMIZER_KIND] = 0                   # the update's rate carries no per-op overhead
    kinds = sorted(best)
    agreed = agree(np.array([best[k] for k in kinds]))
    best = dict(zip(kinds, (float(x) for x in agreed)))
    out = {}
    for kind, s in sorted(best.items()):
        if not _rated(kind, moved, best):
            continue
        busy = s - counts[kind] * profile.op_overhead_s
        if busy <= 0:
            continue
        out[kind] = (moved[kind] / busy,
                     f"{moved[kind]:.3g} bytes the cost model counts for {counts[kind]} {kind} instructions "
                     f"(forward + backward) / {busy:.3g} s measured (best of {repeats}, per-op overhead "
                     f"subtracted) in a serial step of PanGu-α {cfg.hidden_size}h x {cfg.num_layers} layers, "
                     f"batch {batch} x {cfg.seq_length}, {cfg.compute_dtype} ops")
    return out


def fit_rate(n1: float, m1: float, t1: float, n2: float, m2: float, t2: float) -> tuple[float, float]:
    """(bytes/s, seconds per instruction) of ``t = n * fixed + m / rate`` through two points
    (n instructions moving m bytes in t seconds). Where the two do not determine a positive
    rate and fixed cost -- the same bytes, noise -- the larger point alone: (m2 / t2, 0)."""
    det = n1 * m2 - n2 * m1
    if det:
        fixed, inverse_rate = (t1 * m2 - t2 * m1) / det, (n1 * t2 - n2 * t1) / det
        if inverse_rate > 0 and fixed >= 0:
            return 1.0 / inverse_rate, fixed
    return m2 / t2, 0.0


def measure_op_fits(profile: MachineProfile, repeats: int, clock, timers: Sequence, workloads: Sequence[dict],
                    batch: int) -> dict[str, tuple[float, float, str]]:
    """{kind: (bytes/s, device seconds per instruction, how)}: each kind's seconds on two
    workloads of the same layers at two widths (``timers[i]`` times workload i's
    instructions: a GPU's device time, the stream held for that workload's own host issue),
    fitted by :func:`fit_rate` -- a kernel's fixed cost on the device (its start, its tail, a
    few thousand elements per block) is paid per instruction, its bytes at the rate, so one
    rate from one width would misprice the other (the update of 1.3B's large weights ran
    at twice the rate the 85M-parameter workload gave)."""
    (cfg1, m1, t1, n1), (cfg2, m2, t2, n2) = (_measured_kinds(profile, repeats, clock, w, batch, timed)
                                              for w, timed in zip(workloads, timers, strict=True))
    out = {}
    for kind in sorted(t2):
        if not _rated(kind, m2, t2) or kind not in t1 or n1.get(kind) != n2.get(kind):
            continue
        rate, fixed = fit_rate(n1[kind], m1.get(kind, 0.0), t1[kind], n2[kind], m2[kind], t2[kind])
        out[kind] = (rate, fixed,
                     f"t = n x fixed + bytes / rate through two serial steps of PanGu-α, {cfg1.num_layers} layers "
                     f"at {cfg1.hidden_size}h and {cfg2.hidden_size}h, batch {batch} x {cfg1.seq_length}, "
                     f"{cfg1.compute_dtype} ops: {n1[kind]} {kind} instructions moving {m1.get(kind, 0.0):.3g} and "
                     f"{m2[kind]:.3g} bytes (as the cost model counts them) in {t1[kind]:.3g} and {t2[kind]:.3g} s "
                     f"(best of {repeats})")
    return out


def measure_op_host_seconds(repeats: int, clock, timed, workload: dict | None = None,
                            batch: int = BATCH) -> dict[str, tuple[float, str]]:
    """{kind: (seconds the host takes to issue one instruction of it, how it was measured)}
    on the workload: ``timed`` times the host's part of each instruction (on a GPU, the
    host clock around it as the step issues it); the optimizer update per parameter.
    Every kind is kept, views included: each costs the host its dispatch."""
    cfg, net, ids, prog = _workload(workload, batch)
    best, counts = _best_seconds(net, prog, ids, repeats, clock, timed)
    return {kind: (s / counts[kind],
                   f"{s:.3g} s of host issue for {counts[kind]} {kind} "
                   f"{'parameter updates (clip + AdamWeightDecay)' if kind == OPTIMIZER_KIND else 'instructions'} "
                   f"(best of {repeats}) in a serial step of PanGu-α {cfg.hidden_size}h x {cfg.num_layers} layers, "
                   f"batch {batch} x {cfg.seq_length}, {cfg.compute_dtype} ops")
            for kind, s in sorted(best.items()) if counts.get(kind)}


def _time_update(net, prog, ids, repeats: int, clock, timed=None) -> float:
    """Seconds of one AdamWeightDecay update with global-norm clipping of every weight, timed
    in two parts (``timed`` instruction -2: the norm, read on the host; -1: the scaling and
    the update), so that a device timer's second part holds no host read. The gradients are
    scaled every time, as a clipped step scales them."""
    _, grads = prog((ids,), {})
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
    opt.step(grads)                              # states allocated
    if timed is None:
        def timed(_k, run):
            t0 = clock()
            out = run()
            return out, clock() - t0

    def update(norm: float) -> None:
        scale_(grads, min(1.0, 1.0 / norm) if norm > 0 else 1.0)
        opt.step(grads)
    best = float("inf")
    for _ in range(repeats):
        norm, norm_s = timed(-2, lambda: global_norm(grads))
        _, update_s = timed(-1, functools.partial(update, norm))
        best = min(best, norm_s + update_s)
    return best

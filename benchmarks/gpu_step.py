"""One PanGu-α training step on one GPU, autopar beside PyTorch eager, in one run.

    python benchmarks/gpu_step.py                                   # 350M and 1.3B, float32 and bfloat16
    python benchmarks/gpu_step.py --sizes 350M --dtypes bfloat16 --steps 5

The step is what a user runs: ``nn.TrainOneStepCell(net, AdamWeightDecay, clip_norm=1.0)``
under ``set_context(device_target="GPU")`` -- forward, backward, global-norm clipping and
the update, dropout 0.1, parameters and optimizer states in float32 and ops in the compute
dtype (MindSpore's O2). PyTorch runs benchmarks/torch_pangu.py (PanGu-α op for op) with
AdamW, the same clip and dropout, under ``torch.autocast`` at the same dtype (float32: TF32
off on both sides). Both get the same batch (``--batch`` x the preset's sequence, 1024).

Printed per size and dtype: seconds per step (the median of ``--steps`` after ``--warmup`` untimed ones,
the device synchronised before and after), tokens/s, autopar / PyTorch in tokens/s, MFU --
the model's training FLOPs (:func:`autopar.strategy.formulas.transformer_training_flops`)
per second over the device's GEMM rate measured in the same run (an 8192^3 matmul in that
dtype) -- and the peak device memory of each (the CuPy pool's size after the steps, PyTorch's allocator peak). Without
CuPy or a GPU it says so and exits 0.

``--profile PATH_OR_NAME`` (a machine profile, e.g. the measured ``h100-1``) adds the cost
model's prediction of each autopar row: the step seconds and peak bytes the planner gives
this exact run -- one device, the row's compute dtype, batch x 1024, dropout 0.1,
AdamWeightDecay with clipping -- from ``price()`` of ``autopar.strategy.pipeline.auto``, the
function the ``auto_parallel`` search and benchmarks/cost_model_accuracy.py price plans with
(one stage, one micro-batch, no recompute, no optimizer parallel: the serial plan), and
predicted / measured for both. The measured peak it is compared with is the most bytes CuPy's
pool had in use during one step (every device array, kernel temporaries included; the pool's
malloc watched for that step), printed beside the runtime's ``MemoryMeter`` peak
(``TrainOneStepCell.memory_report()["total_peak"]``: live program arrays and optimizer
states, the figure the cost model models) and the pool's size (bytes held, freed blocks
cached). ``autopar.runtime.allocator`` offers no peak of its own, only the pool's bytes now.

    python -m autopar.calibrate --device-target GPU --like h100-8 --name h100-1 --out h100-1.json
    python benchmarks/gpu_step.py --dtypes float32,bfloat16 --profile h100-1.json
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # _gpu, torch_pangu

from _common import gc_watch  # noqa: E402
from _gpu import build, describe_gpu, fast_weights, gpu_status, ids_for, sync  # noqa: E402

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.backend import as_backend  # noqa: E402
from autopar.calibrate.gpu import device_timer, host_timer  # noqa: E402
from autopar.ir.mesh import Mesh  # noqa: E402
from autopar.ir.spec import TensorSpec  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402
from autopar.runtime.allocator import device_pool_bytes  # noqa: E402
from autopar.runtime.arguments import normalize  # noqa: E402
from autopar.runtime.op_timer import time_ops  # noqa: E402
from autopar.runtime.trace import trace  # noqa: E402
from autopar.strategy.costmodel import CostModel  # noqa: E402
from autopar.strategy.formulas import transformer_training_flops  # noqa: E402
from autopar.strategy.pipeline.auto import AutoPlan, even_split, find_layer_stack, price  # noqa: E402
from autopar.strategy.plan_source import PlanOptions  # noqa: E402
from autopar.strategy.profile import load_profile  # noqa: E402
from autopar.strategy.sharding_plan import plan_shardings  # noqa: E402
from autopar.train import AdamWeightDecay  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def config_of(size: str, dtype: str) -> PanguAlphaConfig:
    """The preset with float32 parameters and ``dtype`` compute (O2), dropout 0.1."""
    return PanguAlphaConfig.preset(size, param_dtype="float32", compute_dtype=dtype, dropout_rate=0.1)


def step_flops(config: PanguAlphaConfig, batch: int) -> float:
    return transformer_training_flops(batch, config.seq_length, config.num_layers, config.hidden_size,
                                      config.vocab_size, recompute=False)


def timed_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step, spread: (slowest - fastest) / median) of ``steps`` calls of
    ``step()`` after ``warmup`` untimed ones, the device synchronised around each."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return median, (max(times) - min(times)) / median


@dataclass(frozen=True)
class Measured:
    """One autopar row on the GPU: seconds per step (median, spread) and three views of its memory."""
    step_s: float
    spread: float              # (slowest - fastest) / median of the timed steps
    pool_bytes: int            # the CuPy pool's size after the steps (held, freed blocks cached)
    peak_bytes: int            # most bytes the pool had in use during one step (every device array)
    meter_bytes: int | None    # the runtime MemoryMeter's peak: live program arrays + optimizer states


def kinds_report(train, ids, profile: str) -> list[str]:
    """Per op kind of one forward + backward of ``train``'s program: the device's time (each
    instruction's kernels timed by CUDA events behind a spin kernel, as the GPU calibration
    times them: ``autopar.calibrate.gpu.device_timer``) beside the cost model's work under
    ``profile``, and the host's issue (host clock, free-running) beside its host figure --
    which kind a step prediction is off by. Gradient sums are their own kind (AddN) here;
    the cost model charges them to the op making the value."""
    cupy = sys.modules["cupy"]
    prog = train.build(ids)
    step, issued = train.optimizer.step_count, {}
    host, counts = time_ops(prog.program, [ids], step, timed=host_timer(issued))
    device, _ = time_ops(prog.program, [ids], step, timed=device_timer(cupy, issued))
    graph, stage = prog.traced.graph, Mesh((1,), ("devices",))
    work: dict[str, float] = {}
    issue: dict[str, float] = {}
    for n, c, _ in CostModel(graph, stage, load_profile(profile), True).op_costs(
            plan_shardings(graph, "stand_alone", stage, True)):
        work[n.prim.kind] = work.get(n.prim.kind, 0.0) + c.work_s
        issue[n.prim.kind] = issue.get(n.prim.kind, 0.0) + c.host_s
    lines = [f"  {'kind':<36} {'instr':>5} {'device ms':>9} {'pred work':>9} {'ratio':>6}   {'host ms':>8} "
             f"{'pred host':>9}"]
    for kind in sorted(device, key=device.get, reverse=True):
        pred = work.get(kind, 0.0)
        ratio = f"{pred / device[kind]:>6.2f}" if device[kind] > 0 and pred > 0 else f"{'-':>6}"
        lines.append(f"  {kind:<36} {counts[kind]:>5} {device[kind] * 1e3:>9.2f} {pred * 1e3:>9.2f} {ratio}   "
                     f"{host[kind] * 1e3:>8.2f} {issue.get(kind, 0.0) * 1e3:>9.2f}")
    lines.append(f"  {'all':<36} {sum(counts.values()):>5} {sum(device.values()) * 1e3:>9.2f} "
                 f"{sum(work.values()) * 1e3:>9.2f} {'':>6}   {sum(host.values()) * 1e3:>8.2f} "
                 f"{sum(issue.values()) * 1e3:>9.2f}")
    return lines


def time_autopar(config: PanguAlphaConfig, batch: int, steps: int, warmup: int = 2,
                 ops_profile: str | None = None) -> Measured:
    """Seconds per TrainOneStepCell step on the GPU (:func:`timed_steps`; the first step
    compiles), then one more step with its memory watched (untimed: the meter and the watched
    malloc cost)."""
    autopar.set_context(device_target="GPU")
    try:
        net = build(config, fast_weights(build(config, None)))
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.1)
        train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
        ids = ids_for(config, batch)
        with gc_watch() as collected:
            elapsed, spread = timed_steps(lambda: train(ids), warmup, steps)
        phases = step_phases(train, ids)
        print(f"  autopar {config.hidden_size}h {config.compute_dtype} step taken apart: " +
              ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()) +
              f"; garbage collections over the {warmup + steps} steps (generations 0/1/2): "
              f"{'/'.join(map(str, collected['collections']))}, {collected['seconds'] * 1e3:.1f} ms", flush=True)
        if ops_profile is not None:
            print("\n".join(kinds_report(train, ids, ops_profile)), flush=True)
        pool = device_pool_bytes(as_backend("GPU"))[1]
        peak = pool_peak_bytes(lambda: train(ids))
        return Measured(elapsed, spread, pool, peak, metered_peak(train, ids))
    finally:
        autopar.set_context(device_target="CPU")


def metered_peak(train, ids) -> int | None:
    """``memory_report()["total_peak"]`` of one more step, or None (and why, on stderr) when
    the meter fails on the device: the row keeps its timing."""
    try:
        train.measure_memory()
        train(ids)
        return train.memory_report()["total_peak"]
    except Exception as err:
        print(f"MemoryMeter failed on the GPU: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        return None
    finally:
        train.measure_memory(False)


def step_phases(train, ids) -> dict[str, float]:
    """One more step taken apart, the device synchronised first: the host's issue of forward
    and backward ('issue'), how long the device ran on after it ('drain': 0 when the host is
    what the step waits for), the global norm (a device-to-host read) and the update."""
    args, kwargs = normalize((ids,), {}, "gpu_step")
    prog = train.build(ids)
    sync()
    t0 = time.perf_counter()
    _, grads = prog(args, kwargs, train.optimizer.step_count)
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    float(prog.global_norm(grads))
    t3 = time.perf_counter()
    train.optimizer.step(grads)
    sync()
    t4 = time.perf_counter()
    return {"issue": t1 - t0, "drain": t2 - t1, "norm": t3 - t2, "update": t4 - t3}


def pool_peak_bytes(fn) -> int:
    """The most bytes CuPy's default pool has in use while ``fn()`` runs: its malloc is
    wrapped for the call (CuPy keeps no peak of its own), then restored."""
    import cupy
    pool = cupy.get_default_memory_pool()
    peak = [pool.used_bytes()]

    def malloc(size):
        memory = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory
    cupy.cuda.set_allocator(malloc)
    try:
        fn()
        sync()
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    return peak[0]


def predict_step(config: PanguAlphaConfig, batch: int, profile: str) -> AutoPlan:
    """The cost model's plan of this run under ``profile`` (a shipped name or a .json path):
    ``price()`` of the joint search on one device -- one stage holding every layer, one
    micro-batch, no recompute, no optimizer parallel, the serial plan -- of PanGu-α traced
    as TrainOneStepCell runs it (training mode: dropout on) on ``batch`` x (S + 1) ids. Its
    ``step_seconds`` and ``peak_memory_bytes`` are the prediction."""
    net = PanguAlphaWithLoss(config)
    net.set_train(True)
    ids = TensorSpec((batch, config.seq_length + 1), np.dtype(np.int32))          # (B, S+1)
    graph = trace(net, (ids,), {}).graph
    stack = find_layer_stack(graph)
    split = even_split(stack.count, 1) if stack else ()
    plans = price(graph, stack, 1, 1, 1, split, False, [False], "1f1b", PlanOptions(cost_profile=profile))
    if not plans:
        raise ValueError(f"predict_step: config: expected shapes the one-device plan prices, got none for {config}")
    return plans[0]


def free_device_memory() -> None:
    """Hand every cached block of both allocators back (the other framework runs next: the
    1.3B float32 PyTorch step ran out of memory beside autopar's cached pool)."""
    import cupy
    gc.collect()                             # the step's network and optimizer states, now unreferenced
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        import torch
        torch.cuda.empty_cache()
    except ImportError:
        pass


def time_torch(config: PanguAlphaConfig, batch: int, steps: int, dtype: str,
               warmup: int = 2) -> tuple[float, float, int]:
    """(median seconds per PyTorch eager step at ``dtype`` under autocast, spread, peak
    allocated bytes), timed as :func:`time_autopar` times autopar's."""
    import torch
    import torch_pangu
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    model = torch_pangu.build(config.replace(compute_dtype="float32"), device="cuda")   # autocast casts the ops
    opt = torch_pangu.adamw(model, learning_rate=1e-4, weight_decay=0.1)
    ids = torch.from_numpy(ids_for(config, batch)).to(dev)
    cast = getattr(torch, dtype)

    def step():
        with torch.autocast("cuda", dtype=cast, enabled=dtype != "float32"):
            torch_pangu.train_step(model, opt, ids, clip_norm=1.0)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    median, spread = timed_steps(step, warmup - 1, steps)
    return median, spread, torch.cuda.max_memory_allocated()


def gemm_rate(dtype: str, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in ``dtype`` on the device (PyTorch's cuBLAS;
    CuPy's for float32 without PyTorch)."""
    try:
        import torch
        a = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device="cuda", dtype=getattr(torch, dtype))
        a @ b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
    except ImportError:
        import cupy
        a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
        a @ b
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


GiB = 2 ** 30
PREDICTION_HEAD = (f"{'size':>5} {'dtype':>9} {'pred s':>8} {'meas s':>8} {'pred/meas':>9}   {'pred GiB':>8} "
                   f"{'peak GiB':>8} {'pred/peak':>9}   {'meter GiB':>9} {'pred/meter':>10} {'pool GiB':>8}")


def prediction_row(size: str, dtype: str, plan: AutoPlan, measured: Measured | None) -> str:
    """One row of the prediction table: predicted and measured step seconds and peak bytes."""
    line = f"{size:>5} {dtype:>9} {plan.step_seconds:>8.3f} "
    if measured is None:
        return line + f"{'-':>8} {'-':>9}   {plan.peak_memory_bytes / GiB:>8.2f}   (not measured)"
    peak = plan.peak_memory_bytes
    return line + (f"{measured.step_s:>8.3f} {plan.step_seconds / measured.step_s:>9.3f}   {peak / GiB:>8.2f} "
                   f"{measured.peak_bytes / GiB:>8.2f} {peak / measured.peak_bytes:>9.3f}   "
                   + (f"{measured.meter_bytes / GiB:>9.2f} {peak / measured.meter_bytes:>10.3f} "
                      if measured.meter_bytes else f"{'-':>9} {'-':>10} ")
                   + f"{measured.pool_bytes / GiB:>8.2f}")


def predicted_row(size: str, dtype: str, batch: int, profile: str, measured: Measured | None) -> str:
    """:func:`prediction_row` of the row's config, or why the cost model could not price it."""
    try:
        return prediction_row(size, dtype, predict_step(config_of(size, dtype), batch, profile), measured)
    except Exception as err:                   # reported in its row: the other rows still print
        return f"{size:>5} {dtype:>9} prediction failed: {type(err).__name__}: {str(err)[:160]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="350M,1.3B", help="comma-separated PanGu-α presets")
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated compute dtypes of {DTYPES}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (their median is reported, and the spread)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    ap.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch anchor")
    ap.add_argument("--profile", help="a machine profile (shipped name or .json path): print the cost model's "
                                      "predicted step seconds and peak memory of each autopar row beside the measured")
    ap.add_argument("--ops", action="store_true", help="with --profile: each autopar row's op kinds, device and "
                                                        "host time measured beside the cost model's")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: expected names from {DTYPES}, got {bad}")
    if args.profile is not None:
        try:
            load_profile(args.profile)
        except ValueError as err:
            ap.error(f"--profile: expected a shipped profile name or a profile .json path, got {args.profile!r}: {err}")
    why = gpu_status()
    if why is not None:
        print(f"no GPU run: {why}")
        if args.profile is not None:           # the predictions need no GPU
            print(PREDICTION_HEAD)
            for size in args.sizes.split(","):
                for dtype in dtypes:
                    print(predicted_row(size, dtype, args.batch, args.profile, None))
        return 0
    print(describe_gpu())
    rates = {d: gemm_rate(d) for d in dtypes}
    print("device GEMM rate, 8192^3: " + ", ".join(f"{d} {r / 1e12:.0f} TFLOP/s" for d, r in rates.items()))
    head = (f"{'size':>5} {'dtype':>9} {'autopar s':>9} {'spread':>6} {'tokens/s':>9} {'MFU':>6} {'GiB':>6}   "
            f"{'PyTorch s':>9} {'spread':>6} {'tokens/s':>9} {'MFU':>6} {'GiB':>6}   {'autopar/PyTorch tokens/s':>24}")
    rows, predicted = [], []
    for size in args.sizes.split(","):
        for dtype in dtypes:
            config = config_of(size, dtype)
            tokens, flops = args.batch * config.seq_length, step_flops(config, args.batch)
            line = f"{size:>5} {dtype:>9} "
            measured = None
            try:
                measured = time_autopar(config, args.batch, args.steps, args.warmup,
                                        args.profile if args.ops else None)
                t = measured.step_s
                line += (f"{t:>9.3f} {measured.spread:>6.1%} {tokens / t:>9,.0f} {flops / t / rates[dtype]:>6.1%} "
                         f"{measured.pool_bytes / GiB:>6.1f}   ")
            except Exception as err:           # reported in its row: the other rows still run
                t = None
                line += f"failed: {type(err).__name__}: {str(err)[:160]}   "
            free_device_memory()
            if args.torch:
                try:
                    tt, spread, peak = time_torch(config, args.batch, args.steps, dtype, args.warmup)
                    line += f"{tt:>9.3f} {spread:>6.1%} {tokens / tt:>9,.0f} {flops / tt / rates[dtype]:>6.1%} {peak / GiB:>6.1f}   "
                    line += f"{tt / t:>24.3f}" if t else ""
                except ImportError as err:
                    line += f"PyTorch not installed ({err})"
                except Exception as err:
                    line += f"PyTorch failed: {type(err).__name__}: {str(err)[:160]}"
                free_device_memory()
            rows.append(line)
            print(line, flush=True)
            if args.profile is not None:
                predicted.append(predicted_row(size, dtype, args.batch, args.profile, measured))
                print(predicted[-1], flush=True)
    print(f"\nPanGu-α, batch {args.batch} x sequence 1024, dropout 0.1, AdamWeightDecay / AdamW, clip 1.0, "
          f"median of {args.steps} steps after {args.warmup} untimed (spread: slowest - fastest over the median)")
    print(head)
    print("\n".join(rows))
    if predicted:
        print(f"\ncost model (profile {args.profile}, one device, the serial plan) beside the autopar rows; peak: the "
              f"most bytes CuPy's pool had in use in one step; meter: the runtime MemoryMeter's peak (live arrays + "
              f"optimizer states); pool: bytes the pool held after the timed steps")
        print(PREDICTION_HEAD)
        print("\n".join(predicted))
    return 0


if __name__ == "__main__":
    sys.exit(main())

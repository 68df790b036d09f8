"""One PanGu-α training step on one GPU, autopar beside PyTorch eager, in one run.

    python benchmarks/gpu_step.py                                   # 350M and 1.3B, float32 and bfloat16
    python benchmarks/gpu_step.py --sizes 350M --dtypes bfloat16 --steps 5

The step is what a user runs: ``nn.TrainOneStepCell(net, AdamWeightDecay, clip_norm=1.0)``
under ``set_context(device_target="GPU")`` -- forward, backward, global-norm clipping and
the update, dropout 0.1, parameters and optimizer states in float32 and ops in the compute
dtype (MindSpore's O2). PyTorch runs benchmarks/torch_pangu.py (PanGu-α op for op) with
AdamW, the same clip and dropout, under ``torch.autocast`` at the same dtype (float32: TF32
off on both sides). Both get the same batch (``--batch`` x the preset's sequence, 1024).

Printed per size and dtype: seconds per step (the mean of ``--steps`` after a warm-up step,
the device synchronised before and after), tokens/s, autopar / PyTorch in tokens/s, MFU --
the model's training FLOPs (:func:`autopar.strategy.formulas.transformer_training_flops`)
per second over the device's GEMM rate measured in the same run (an 8192^3 matmul in that
dtype) -- and the peak device memory of each (the CuPy pool's size after the steps, PyTorch's allocator peak). Without
CuPy or a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # _gpu, torch_pangu

from _gpu import build, describe_gpu, fast_weights, gpu_status, ids_for, sync  # noqa: E402

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.backend import as_backend  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig  # noqa: E402
from autopar.runtime.allocator import device_pool_bytes  # noqa: E402
from autopar.strategy.formulas import transformer_training_flops  # noqa: E402
from autopar.train import AdamWeightDecay  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def config_of(size: str, dtype: str) -> PanguAlphaConfig:
    """The preset with float32 parameters and ``dtype`` compute (O2), dropout 0.1."""
    return PanguAlphaConfig.preset(size, param_dtype="float32", compute_dtype=dtype, dropout_rate=0.1)


def step_flops(config: PanguAlphaConfig, batch: int) -> float:
    return transformer_training_flops(batch, config.seq_length, config.num_layers, config.hidden_size,
                                      config.vocab_size, recompute=False)


def time_autopar(config: PanguAlphaConfig, batch: int, steps: int) -> tuple[float, int]:
    """(seconds per TrainOneStepCell step on the GPU, the pool's peak bytes)."""
    autopar.set_context(device_target="GPU")
    try:
        net = build(config, fast_weights(build(config, None)))
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.1)
        train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
        ids = ids_for(config, batch)
        train(ids)                                          # compile, optimizer states, warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            train(ids)
        sync()
        elapsed = (time.perf_counter() - t0) / steps
        return elapsed, device_pool_bytes(as_backend("GPU"))[1]
    finally:
        autopar.set_context(device_target="CPU")


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


def time_torch(config: PanguAlphaConfig, batch: int, steps: int, dtype: str) -> tuple[float, int]:
    """(seconds per PyTorch eager step at ``dtype`` under autocast, peak allocated bytes)."""
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
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated()


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="350M,1.3B", help="comma-separated PanGu-α presets")
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated compute dtypes of {DTYPES}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch anchor")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtypes: expected names from {DTYPES}, got {bad}")
    why = gpu_status()
    if why is not None:
        print(f"no GPU run: {why}")
        return 0
    print(describe_gpu())
    rates = {d: gemm_rate(d) for d in dtypes}
    print("device GEMM rate, 8192^3: " + ", ".join(f"{d} {r / 1e12:.0f} TFLOP/s" for d, r in rates.items()))
    head = (f"{'size':>5} {'dtype':>9} {'autopar s':>9} {'tokens/s':>9} {'MFU':>6} {'GiB':>6}   "
            f"{'PyTorch s':>9} {'tokens/s':>9} {'MFU':>6} {'GiB':>6}   {'autopar/PyTorch tokens/s':>24}")
    rows = []
    for size in args.sizes.split(","):
        for dtype in dtypes:
            config = config_of(size, dtype)
            tokens, flops = args.batch * config.seq_length, step_flops(config, args.batch)
            line = f"{size:>5} {dtype:>9} "
            try:
                t, pool = time_autopar(config, args.batch, args.steps)
                line += f"{t:>9.3f} {tokens / t:>9,.0f} {flops / t / rates[dtype]:>6.1%} {pool / 2**30:>6.1f}   "
            except Exception as err:           # reported in its row: the other rows still run
                t = None
                line += f"failed: {type(err).__name__}: {str(err)[:160]}   "
            free_device_memory()
            if args.torch:
                try:
                    tt, peak = time_torch(config, args.batch, args.steps, dtype)
                    line += f"{tt:>9.3f} {tokens / tt:>9,.0f} {flops / tt / rates[dtype]:>6.1%} {peak / 2**30:>6.1f}   "
                    line += f"{tt / t:>24.3f}" if t else ""
                except ImportError as err:
                    line += f"PyTorch not installed ({err})"
                except Exception as err:
                    line += f"PyTorch failed: {type(err).__name__}: {str(err)[:160]}"
                free_device_memory()
            rows.append(line)
            print(line, flush=True)
    print(f"\nPanGu-α, batch {args.batch} x sequence 1024, dropout 0.1, AdamWeightDecay / AdamW, clip 1.0, "
          f"mean of {args.steps} steps after a warm-up")
    print(head)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

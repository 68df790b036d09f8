"""GPU validation of the array backend: the same PanGu-α step on CPU (numpy) and GPU (CuPy).

    python benchmarks/gpu_check.py                    # tiny + 350M, then GPU timing; < 5 min on one H200
    python benchmarks/gpu_check.py --sizes tiny --no-timing

On a machine without CuPy or a GPU the GPU parts are skipped with a message and the CPU
parts still run (the script is then a smoke test). Checks, each PASS/FAIL in the summary:

* dropout masks: ``dropout_mask`` on the device equals the host's bit for bit (whole
  tensors, a shard's region, indices >= 2**32 that take the 64-bit path);
* loss and gradients of one step (dropout 0.1 on: the masks must agree for these to agree),
  tiny in float64 and float32, 350M in float32 (seq 1024, batch 1; its weights drawn with a
  fast host RNG, the same on both sides);
* three AdamWeightDecay steps with global-norm clipping, tiny float64: weights equal;
* TrainOneStepCell on the GPU (reported: it also needs the runtime's gradient norm to read
  device arrays).

Tolerances. float64: relative 1e-9 (CPU BLAS and cuBLAS sum in different orders; float64
rounding is 1e-16, so 1e-9 leaves 10^7 of margin and still flags any wrong kernel, whose
errors are O(1)). float32 (unit roundoff u = 6e-8, TF32 off): a GEMM of depth K in another
summation order differs by about sqrt(K) u (4e-6 at K = 4096) and the backward pass chains
some 50 of them, so gradients may differ by ~1e-4 relative; we require the loss within 1e-5
relative and every gradient tensor within 1e-3 (||g_gpu - g_cpu|| / ||g_cpu||), 10x above
that estimate and 1000x below a broken kernel.

Timing (``--timing``, default on with a GPU): benchmarks/gpu_step.py's float32 350M step
(TrainOneStepCell, batch ``--batch``) beside a PanGu-α-shaped PyTorch model in eager mode at
the same precision and batch (``--no-torch`` to skip; TF32 off on both sides). The PyTorch model is
benchmarks/torch_pangu.py, PanGu-α op for op (top-query layer, tied head, explicit softmax
attention, no fused kernels), with PyTorch's own initialisation and dropout.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUPY_TF32", "0")          # float32 GEMMs in float32 (before CuPy is imported)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))      # torch_pangu, the PyTorch anchor

import gpu_step  # noqa: E402
import numpy as np  # noqa: E402
from _gpu import build, describe_gpu, fast_weights, gpu_status, ids_for, sync  # noqa: E402

import autopar  # noqa: E402
from autopar import nn  # noqa: E402
from autopar.backend import to_host  # noqa: E402
from autopar.ir.random import derive_key  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig  # noqa: E402
from autopar.ops.dropout import dropout_mask  # noqa: E402
from autopar.train import AdamWeightDecay, clip_by_global_norm  # noqa: E402

F64_RTOL = 1e-9
F32_LOSS_RTOL = 1e-5
F32_GRAD_RTOL = 1e-3


class Report:
    """PASS / FAIL / SKIP / INFO lines, printed as they come and again as a summary."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.rows.append((status, name, detail))
        print(f"  [{status}] {name}{': ' + detail if detail else ''}", flush=True)

    def check(self, ok: bool, name: str, detail: str) -> None:
        self.add("PASS" if ok else "FAIL", name, detail)

    def summary(self) -> int:
        print("\n==== summary ====")
        for status, name, detail in self.rows:
            print(f"{status:5} {name}{'  (' + detail + ')' if detail else ''}")
        failed = sum(s == "FAIL" for s, _, _ in self.rows)
        print(f"{len(self.rows)} lines, {failed} failed")
        return 1 if failed else 0


def config_of(size: str, dtype: str, dropout: float = 0.1) -> PanguAlphaConfig:
    return PanguAlphaConfig.preset(size, param_dtype=dtype, compute_dtype=dtype, dropout_rate=dropout)


def loss_and_grads(config, weights, ids, target: str):
    """One forward and backward on ``target``: the host loss and host gradients by name."""
    autopar.set_context(device_target=target)
    try:
        net = build(config, weights)
        t0 = time.perf_counter()
        loss, grads = autopar.value_and_grad(net)(ids)
        grads = {k: to_host(g) for k, g in grads.items()}
        return float(loss), grads, time.perf_counter() - t0
    finally:
        autopar.set_context(device_target="CPU")


# ---- checks ---------------------------------------------------------------------------------

def check_dropout_masks(report: Report) -> None:
    import cupy
    cases = [
        ("whole (8, 1024, 1024)", (8, 1024, 1024), None, 0.9),
        ("a shard's region", (4, 64, 4096), (slice(1, 3), slice(None), slice(1024, 2048)), 0.9),
        ("indices >= 2**32 (64-bit path)", (1 << 21, 1 << 12), (slice((1 << 21) - 3, None), slice(None)), 0.5),
    ]
    for name, shape, region, keep in cases:
        key = derive_key(1234, "blocks.0.attention.dropout", 7)
        host = dropout_mask(key, keep, shape, region)
        dev = dropout_mask(key, keep, shape, region, xp=cupy)
        same = type(dev) is cupy.ndarray and np.array_equal(dev.get(), host)
        report.check(same, f"dropout mask bit-equal, {name}",
                     f"{host.size} elements, kept {host.mean():.4f} (keep_prob {keep})")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-300))


def check_step(report: Report, size: str, dtype: str, batch: int, fast: bool) -> None:
    config = config_of(size, dtype)
    weights = fast_weights(build(config, None)) if fast else None
    ids = ids_for(config, batch)
    cpu_loss, cpu_grads, cpu_s = loss_and_grads(config, weights, ids, "CPU")
    gpu_loss, gpu_grads, gpu_s = loss_and_grads(config, weights, ids, "GPU")
    loss_tol, grad_tol = (F64_RTOL, F64_RTOL) if dtype == "float64" else (F32_LOSS_RTOL, F32_GRAD_RTOL)
    loss_err = abs(gpu_loss - cpu_loss) / abs(cpu_loss)
    # each tensor's error against the whole gradient's norm: a gradient that is zero up to
    # rounding (the key bias's: softmax ignores a constant added to every key) has no scale
    # of its own, and its two roundings differ by 100%
    scale = float(np.sqrt(sum(np.linalg.norm(g.astype(np.float64)) ** 2 for g in cpu_grads.values())))
    errs = {k: float(np.linalg.norm(gpu_grads[k].astype(np.float64) - g.astype(np.float64))) / scale
            for k, g in cpu_grads.items()}
    worst = max(errs, key=errs.get)
    tag = f"{size} {dtype} (batch {batch}, seq {config.seq_length}, dropout {config.dropout_rate})"
    report.check(loss_err <= loss_tol, f"loss GPU = CPU, {tag}",
                 f"CPU {cpu_loss:.8g}, GPU {gpu_loss:.8g}, rel {loss_err:.2e} <= {loss_tol:g}; "
                 f"first call CPU {cpu_s:.1f} s, GPU {gpu_s:.1f} s (compile included)")
    report.check(errs[worst] <= grad_tol, f"gradients GPU = CPU, {tag}",
                 f"{len(errs)} tensors, worst {worst} |diff| / |whole gradient| {errs[worst]:.2e} <= {grad_tol:g}, "
                 f"median {float(np.median(list(errs.values()))):.2e}")


def adamw_steps(config, weights, ids, target: str, steps: int):
    """``steps`` steps of value_and_grad + clip 1.0 + AdamWeightDecay on ``target``: host
    weights, and the names of parameters whose first gradient is zero up to rounding."""
    autopar.set_context(device_target=target)
    try:
        net = build(config, weights)
        params = net.trainable_params()
        opt = AdamWeightDecay(params, learning_rate=1e-2, weight_decay=0.1)
        grad_fn = autopar.value_and_grad(net)
        losses, zero = [], set()
        for k in range(steps):
            loss, grads = grad_fn(ids)
            if k == 0:
                top = max(float(np.abs(g).max()) for g in grads.values())
                zero = {n for n, g in grads.items() if float(np.abs(g).max()) <= 1e-12 * top}
            grads, _ = clip_by_global_norm([grads[p.name] for p in params], 1.0)
            opt.step(grads)
            losses.append(float(loss))
        return losses, {p.name: p.asnumpy() for p in params}, zero
    finally:
        autopar.set_context(device_target="CPU")


def check_adamw(report: Report) -> None:
    config = config_of("tiny", "float64")
    ids = ids_for(config, 2)
    cpu_losses, cpu_w, zero = adamw_steps(config, None, ids, "CPU", 3)
    gpu_losses, gpu_w, _ = adamw_steps(config, None, ids, "GPU", 3)
    # Adam turns a zero-up-to-rounding gradient's rounding noise into full steps of +-lr, so
    # those parameters' trajectories differ between any two summation orders: left out, named
    worst = max(relative_error(gpu_w[k], w) for k, w in cpu_w.items() if k not in zero)
    loss_ok = np.allclose(gpu_losses, cpu_losses, rtol=F64_RTOL, atol=0)
    report.check(loss_ok and worst <= F64_RTOL, "three AdamWeightDecay steps (clip 1.0), tiny float64",
                 f"losses CPU {cpu_losses} GPU {gpu_losses}; worst weight rel {worst:.2e} "
                 f"(left out, zero gradient: {sorted(zero) or 'none'})")


def check_train_one_step_cell(report: Report) -> None:
    config = config_of("tiny", "float64")
    ids = ids_for(config, 2)
    autopar.set_context(device_target="GPU")
    try:
        net = build(config, None)
        step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2), clip_norm=1.0)
        loss = float(step(ids))
        report.add("PASS", "TrainOneStepCell on GPU", f"loss {loss:.6g}")
    except Exception as err:       # reported, not fatal: a runtime change outside the backend
        where = traceback.extract_tb(err.__traceback__)[-1]
        report.add("INFO", "TrainOneStepCell on GPU does not run yet",
                   f"{type(err).__name__}: {str(err)[:120]} at {Path(where.filename).name}:{where.lineno}")
    finally:
        autopar.set_context(device_target="CPU")


# ---- where the time goes ------------------------------------------------------------------

def op_profile(batch: int, dtype: str = "float32") -> None:
    """Where the GPU step's time goes: one forward + backward of the 350M preset run
    instruction by instruction (``autopar.runtime.op_timer``, the device synchronised
    around each), seconds and instruction count per op kind, slowest first."""
    from autopar.runtime import op_timer
    from autopar.runtime.compiled import GradProgram
    config = config_of("350M", dtype)
    autopar.set_context(device_target="GPU")
    try:
        net = build(config, fast_weights(build(config, None)))
        net.set_train(True)
        ids = ids_for(config, batch)
        prog = GradProgram(net, (ids,), {}, net.trainable_params())
        prog.program.run([ids])
        sync()
        t0 = time.perf_counter()
        prog.program.run([ids])
        sync()
        whole = time.perf_counter() - t0

        def clock() -> float:
            sync()
            return time.perf_counter()
        seconds, counts = op_timer.time_ops(prog.program, [ids], 1, clock)
    finally:
        autopar.set_context(device_target="CPU")
    total = sum(seconds.values())
    print(f"350M {dtype}, batch {batch}: forward + backward {whole * 1e3:.0f} ms unsynchronised, "
          f"{total * 1e3:.0f} ms op by op ({sum(counts.values())} instructions)")
    for kind, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:24s} {sec * 1e3:9.1f} ms  {sec / total:6.1%}  {counts.get(kind, 0):6d} instr  "
              f"{sec / max(counts.get(kind, 1), 1) * 1e6:8.1f} us each")


# ---- main -----------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,350M", help="comma-separated: tiny, 350M")
    ap.add_argument("--batch", type=int, default=8, help="batch of the timed 350M step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--no-timing", dest="timing", action="store_false")
    ap.add_argument("--ops", action="store_true", help="also print where the 350M GPU step's time goes, per op kind")
    ap.add_argument("--dtype", default="float32", help="compute dtype of the --ops profile")
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    report = Report()
    t_start = time.perf_counter()
    print(f"autopar GPU check: Python {platform.python_version()}, numpy {np.__version__}")
    why_not = gpu_status()
    if why_not is not None:
        print(f"GPU parts skipped: {why_not}")
        report.add("SKIP", "every GPU check", why_not)
        config = config_of("tiny", "float64")
        loss, grads, _ = loss_and_grads(config, None, ids_for(config, 2), "CPU")
        report.check(math.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values()),
                     "CPU step of tiny PanGu-α (smoke test)", f"loss {loss:.6g}, {len(grads)} gradients")
        return report.summary()
    print(f"GPU: {describe_gpu()}")
    print("\n-- dropout masks")
    check_dropout_masks(report)
    print("\n-- one step, loss and gradients")
    if "tiny" in sizes:
        check_step(report, "tiny", "float64", 2, fast=False)
        check_step(report, "tiny", "float32", 2, fast=False)
    if "350M" in sizes:
        check_step(report, "350M", "float32", 1, fast=True)
    print("\n-- optimizer steps")
    check_adamw(report)
    check_train_one_step_cell(report)
    if args.timing:         # the timed step is benchmarks/gpu_step.py's
        print("\n-- timing")
        gpu_step.main(["--sizes", "350M", "--dtypes", "float32", "--batch", str(args.batch), "--steps",
                       str(args.steps)] + ([] if args.torch else ["--no-torch"]))
    if args.ops and gpu_status() is None:
        print("\n-- where the time goes")
        try:
            op_profile(args.batch, args.dtype)
        except Exception:
            traceback.print_exc()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())

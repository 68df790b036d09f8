"""One serial PanGu-α training step (forward, backward, AdamWeightDecay) on one BLAS thread.

Prints step time, tokens/s, achieved GFLOP/s (FLOPs counted from the compiled program's
ops) and the ratio to this machine's numpy float32 GEMM rate, measured in the same run.

Where torch is installed, the same step in PyTorch eager is timed beside it: the same model
(benchmarks/torch_pangu.py) starting from autopar's initial weights (the two losses are
printed and must agree to float32 rounding), the same clip and AdamW hyperparameters, one
thread (torch.set_num_threads(1)). The two steps alternate, one of each per round, and
the line "autopar / PyTorch" is the ratio of their medians, with the spread of the
per-round ratios. Dropout is off by default (``--dropout 0.1`` turns it on in both; their
masks then differ, so the losses do too).

    python benchmarks/serial_step.py            # both configs
    python benchmarks/serial_step.py --quick    # the small config only
    python benchmarks/serial_step.py --no-torch # autopar alone
    python benchmarks/serial_step.py --quick --batch 16 --ops   # where each framework's time goes

``--ops`` adds, per config, where one step's time goes in each framework: autopar's
instructions timed one by one (runtime.op_timer) by op kind, forward and backward apart, and
PyTorch's operators by their own time (torch.profiler), both split into GEMMs and the rest,
with the update (AdamW and clip) apart and the minor page faults of one step of each.
``--gemms`` adds every distinct GEMM one autopar step makes (numpy.matmul's operands: shapes,
C- or F-order, the calls per step) timed with numpy and with torch.matmul on the same
operands, strides included -- which shapes the two BLAS libraries differ on.
``--ufunc`` adds a third step to every round: autopar with its fused CPU kernels
(``autopar.backend.hostkernels``) off, numpy's ufunc paths computing instead, so the two
paths are compared in the same rounds.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
from _common import blas_line
from threadpoolctl import threadpool_limits

try:  # the PyTorch anchor; a benchmark-only dependency
    import torch
    import torch_pangu
except ImportError as err:
    torch, torch_pangu, TORCH_MISSING = None, None, str(err)

from autopar import nn
from autopar.backend import hostkernels
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.compiled import grad_program
from autopar.runtime.op_timer import kind_of, time_ops
from autopar.train import AdamWeightDecay

CONFIGS = {
    "V8k-S256-H512-L4-B4": dict(vocab_size=8000, seq_length=256, hidden_size=512, num_layers=4,
                                num_heads=8, ffn_hidden_size=2048, batch=4),
    "V40k-S512-H1024-L4-B2": dict(vocab_size=40000, seq_length=512, hidden_size=1024, num_layers=4,
                                  num_heads=16, ffn_hidden_size=4096, batch=2),
}


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 GEMM rate in FLOP/s for an n x n x n product."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def torch_gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """:func:`gemm_rate` for torch.mm on the same machine: PyTorch's BLAS (MKL or oneDNN on
    x86) against numpy's (OpenBLAS), the floor under each framework's step."""
    a, b = (torch.from_numpy(np.random.default_rng(s).standard_normal((n, n), dtype=np.float32)) for s in (0, 1))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def program_flops(prog) -> int:
    """FLOPs of every instruction: forward ops and their VJPs."""
    g, total = prog.graph, 0
    for ins in prog.program.instructions:
        node = ins.node
        if node.forward_of is None:
            specs = [g.spec(v) for v in node.inputs]
            total += node.prim.flops(specs, g.spec(node.outputs[0]))
        else:
            fwd = g.nodes[node.forward_of]
            specs = [g.spec(v) for v in fwd.inputs]
            total += node.prim.vjp_flops(specs, g.spec(fwd.outputs[0]), node.needs)
    return total


GEMM_KINDS = ("MatMul", "BatchMatMul")                     # autopar's kinds that are BLAS GEMMs
TORCH_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")       # PyTorch's


def bench(name: str, spec: dict, steps: int, rate: float, dropout: float, with_torch: bool,
          batch: int | None = None, ops: bool = False, gemms: bool = False, ufunc: bool = False) -> dict:
    spec = dict(spec)
    own = spec.pop("batch")
    name = name if batch is None else f"{name.rsplit('-B', 1)[0]}-B{batch}"
    batch = own if batch is None else batch
    config = PanguAlphaConfig(dropout_rate=dropout, **spec)
    net = PanguAlphaWithLoss(config)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, config.seq_length + 1)).astype(np.int32)
    anchor = TorchStep(config, net, ids, opt) if with_torch else None   # autopar's initial weights
    loss = float(train(ids))  # compile, materialize parameters and optimizer states
    if anchor is not None:
        anchor.report_loss(name, loss)
    times, torch_times, ufunc_times = [], [], []
    fused_library = hostkernels.library
    for _ in range(steps):    # one autopar step, then one PyTorch step, per round
        t0 = time.perf_counter()
        train(ids)
        times.append(time.perf_counter() - t0)
        if ufunc:             # every op asks hostkernels.library() per call: None sends it to numpy
            hostkernels.library = lambda: None
            t0 = time.perf_counter()
            train(ids)
            ufunc_times.append(time.perf_counter() - t0)
            hostkernels.library = fused_library
        if anchor is not None:
            torch_times.append(anchor.timed_step())
    step = min(times)
    flops = program_flops(grad_program(net, (ids,), {}, opt.params))
    tokens = batch * config.seq_length
    row = dict(config=name, params=config.parameter_count(), step_s=step, tokens_per_s=tokens / step,
               gflops=flops / step / 1e9, ratio=flops / step / rate)
    print(f"{name:24s} params {row['params'] / 1e6:7.1f}M  step {step:7.3f}s  "
          f"tokens/s {row['tokens_per_s']:8.1f}  {row['gflops']:6.1f} GFLOP/s  "
          f"= {row['ratio']:.2f} x GEMM rate", flush=True)
    if anchor is not None:
        print_ratio(name, times, torch_times)
    if ufunc:
        print(f"{name:24s} fused CPU kernels off (numpy's ufunc paths), same rounds: median "
              f"{np.median(ufunc_times):.3f}s [{min(ufunc_times):.3f}-{max(ufunc_times):.3f}]; "
              f"fused / ufunc = {np.median(times) / np.median(ufunc_times):.3f}"
              + (f"; ufunc / PyTorch = {np.median(ufunc_times) / np.median(torch_times):.3f}" if torch_times else ""),
              flush=True)
    if ops:
        for line in ops_report(train, ids, anchor):
            print(f"{name:24s} {line}", flush=True)
    if gemms:
        for line in gemm_report(train, ids):
            print(f"{name:24s} {line}", flush=True)
    return row


def gemm_report(train, ids: np.ndarray, repeats: int = 3) -> list[str]:
    """Each distinct GEMM of one step (every autopar matmul goes through numpy.matmul on the
    host: ops/contraction.py), its calls per step, and the seconds per step numpy and torch
    take on operands of the same shapes and strides (best of ``repeats``)."""
    seen: dict[tuple, int] = {}
    original = np.matmul

    def recorded(a, b, *args, **kwargs):
        key = (a.shape, a.strides, b.shape, b.strides, a.dtype.str)
        seen[key] = seen.get(key, 0) + 1
        return original(a, b, *args, **kwargs)
    np.matmul = recorded
    try:
        train(ids)
    finally:
        np.matmul = original
    rows = []
    for (a_shape, a_strides, b_shape, b_strides, dtype), count in seen.items():
        a, b = (operand(shape, strides, dtype, seed) for shape, strides, seed in
                ((a_shape, a_strides, 0), (b_shape, b_strides, 1)))
        ours = best_of(lambda: original(a, b), repeats)
        theirs = best_of(lambda: torch.matmul(torch.from_numpy(a), torch.from_numpy(b)), repeats) if torch else None
        rows.append((count * ours, count, layout(a), layout(b), count * theirs if theirs else None))
    lines = [f"  {'a':>22} {'b':>22} {'calls':>5} {'numpy ms':>9} {'torch ms':>9} {'ratio':>6}"]
    for ours, count, a_desc, b_desc, theirs in sorted(rows, reverse=True):
        ratio = f"{ours / theirs:6.2f}" if theirs else f"{'-':>6}"
        lines.append(f"  {a_desc:>22} {b_desc:>22} {count:>5} {ours * 1e3:9.1f} "
                     f"{(theirs or 0.0) * 1e3:9.1f} {ratio}")
    total = sum(r[0] for r in rows)
    total_t = sum(r[4] or 0.0 for r in rows)
    lines.append(f"  {'all GEMMs of a step':>45} {sum(r[1] for r in rows):>5} {total * 1e3:9.1f} "
                 f"{total_t * 1e3:9.1f} {total / total_t if total_t else float('nan'):6.2f}")
    return lines


def operand(shape: tuple, strides: tuple, dtype: str, seed: int) -> np.ndarray:
    """A random array with ``shape`` and ``strides`` (a transposed or broadcast view, as
    the step's operand was), over a fresh buffer just large enough."""
    itemsize = np.dtype(dtype).itemsize
    span = 1 + sum((n - 1) * abs(s) // itemsize for n, s in zip(shape, strides) if n)
    base = np.random.default_rng(seed).standard_normal(span).astype(dtype)
    return np.lib.stride_tricks.as_strided(base, shape, strides)


def layout(a: np.ndarray) -> str:
    order = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "strided"
    return f"{'x'.join(map(str, a.shape))} {order}"


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ops_report(train, ids: np.ndarray, anchor: TorchStep | None) -> list[str]:
    """Where one step's time goes: autopar's forward + backward instructions by kind (the
    update is the rest of a whole step), PyTorch's operators by self time (the update is
    the optimizer's and clip's share); GEMMs apart from the rest in both; minor page faults
    of one step of each (memory the allocator handed back to the OS and takes again)."""
    prog = train.build(ids).program
    f0 = minor_faults()
    t0 = time.perf_counter()
    train(ids)
    step, faults = time.perf_counter() - t0, minor_faults() - f0
    per: dict[tuple[str, str], float] = {}
    rec: dict[int, float] = {}

    def timed(k, run):
        t = time.perf_counter()
        out = run()
        rec[k] = time.perf_counter() - t
        return out, rec[k]

    time_ops(prog, [ids], train.optimizer.step_count, timed=timed)
    for k, s in rec.items():
        node = prog.instructions[k].node
        key = (kind_of(prog, node), "fwd" if node.forward_of is None else "bwd")
        per[key] = per.get(key, 0.0) + s
    gemm = sum(s for (kind, _), s in per.items() if kind in GEMM_KINDS)
    rest = sum(per.values()) - gemm
    lines = [f"autopar step {step * 1e3:.1f} ms: GEMMs {gemm * 1e3:.1f} ms, other ops {rest * 1e3:.1f} ms, "
             f"update (the rest) {(step - gemm - rest) * 1e3:.1f} ms; {faults} minor page faults"]
    for (kind, way), s in sorted(per.items(), key=lambda kv: -kv[1])[:24]:
        lines.append(f"  autopar {kind:<36} {way} {s * 1e3:8.1f} ms")
    if anchor is not None:
        lines += torch_ops_report(anchor)
    return lines


def torch_ops_report(anchor: TorchStep) -> list[str]:
    """PyTorch's side of :func:`ops_report`, from torch.profiler's self CPU times."""
    from torch.profiler import ProfilerActivity, profile
    f0 = minor_faults()
    step = anchor.timed_step()
    faults = minor_faults() - f0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        anchor.timed_step()
    events = prof.key_averages()
    self_s = {e.key: e.self_cpu_time_total * 1e-6 for e in events}
    total = {e.key: e.cpu_time_total * 1e-6 for e in events}
    update = sum(s for key, s in total.items() if key.startswith("Optimizer.step"))
    update += total.get("aten::linalg_vector_norm", 0.0) + total.get("aten::_foreach_norm", 0.0)
    gemm = sum(self_s.get(k, 0.0) for k in TORCH_GEMMS)
    lines = [f"PyTorch step {step * 1e3:.1f} ms (unprofiled): GEMMs {gemm * 1e3:.1f} ms, "
             f"update (optimizer + clip norm) {update * 1e3:.1f} ms, profiled total "
             f"{sum(self_s.values()) * 1e3:.1f} ms; {faults} minor page faults"]
    for key, s in sorted(self_s.items(), key=lambda kv: -kv[1])[:24]:
        lines.append(f"  PyTorch {key:<44} {s * 1e3:8.1f} ms")
    return lines


class TorchStep:
    """The PyTorch eager step beside autopar's: the same weights (copied from ``net`` before
    either has stepped), the same clip and AdamW hyperparameters as ``opt``."""

    def __init__(self, config, net, ids: np.ndarray, opt: AdamWeightDecay):
        self.model = torch_pangu.build(config, net)
        self.opt = torch_pangu.adamw(self.model, opt.learning_rate, opt.weight_decay, opt.beta1, opt.beta2, opt.eps)
        self.ids = torch.from_numpy(ids)
        self.first_loss = float(torch_pangu.train_step(self.model, self.opt, self.ids))   # warm-up step

    def report_loss(self, name: str, autopar_loss: float) -> None:
        rel = abs(self.first_loss - autopar_loss) / abs(autopar_loss)
        print(f"{name:24s} loss at the same initial weights: autopar {autopar_loss:.7f}, "
              f"PyTorch {self.first_loss:.7f} (relative difference {rel:.1e})", flush=True)

    def timed_step(self) -> float:
        t0 = time.perf_counter()
        torch_pangu.train_step(self.model, self.opt, self.ids)
        return time.perf_counter() - t0


def print_ratio(name: str, ours: list[float], theirs: list[float]) -> None:
    """Medians of both, and the ratio of medians with the range and the median of the per-round
    ratios (the paired figure: both steps of a round share the machine's state of the moment)."""
    per_round = [a / b for a, b in zip(ours, theirs)]
    a, b = float(np.median(ours)), float(np.median(theirs))
    print(f"{name:24s} median of {len(ours)} alternating steps: autopar {a:.3f}s [{min(ours):.3f}-{max(ours):.3f}], "
          f"PyTorch {b:.3f}s [{min(theirs):.3f}-{max(theirs):.3f}]; autopar / PyTorch = {a / b:.3f} "
          f"(per round {min(per_round):.3f}-{max(per_round):.3f}, median {np.median(per_round):.3f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small config")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps (rounds with PyTorch); the fastest is reported, and the medians")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout rate of both models")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch anchor")
    parser.add_argument("--batch", type=int, default=None, help="batch of every config (default: each config's own)")
    parser.add_argument("--ops", action="store_true", help="where each framework's step time goes, op by op")
    parser.add_argument("--gemms", action="store_true", help="every GEMM of a step timed by numpy and by torch")
    parser.add_argument("--ufunc", action="store_true",
                        help="also time autopar with its fused CPU kernels off, in the same rounds")
    args = parser.parse_args()
    with_torch = args.torch and torch is not None
    if with_torch:
        torch.set_num_threads(1)
        print(f"PyTorch {torch.__version__} eager beside autopar, one thread each", flush=True)
    elif args.torch:
        print(f"PyTorch anchor skipped: torch does not import ({TORCH_MISSING})", flush=True)
    if hasattr(os, "sched_setaffinity"):  # one core, so the scheduler does not move us mid-GEMM
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    with threadpool_limits(limits=1, user_api="blas"):
        # The machine is shared: take the best GEMM rate seen before and after the steps, so
        # a slow moment during the GEMM probe cannot flatter the ratio.
        rate = gemm_rate()
        print(f"numpy float32 GEMM (2048^3, 1 BLAS thread): {rate / 1e9:.1f} GFLOP/s; {blas_line()}", flush=True)
        if with_torch:
            print(f"torch float32 GEMM (2048^3, 1 thread): {torch_gemm_rate() / 1e9:.1f} GFLOP/s", flush=True)
        names = list(CONFIGS)[:1] if args.quick else list(CONFIGS)
        rows = [bench(name, CONFIGS[name], args.steps, rate, args.dropout, with_torch, args.batch, args.ops,
                      args.gemms, args.ufunc) for name in names]
        after = gemm_rate()
        best = max(rate, after)
        print(f"GEMM again after the steps: {after / 1e9:.1f} GFLOP/s; ratios against the best, "
              f"{best / 1e9:.1f} GFLOP/s:")
        for row in rows:
            print(f"  {row['config']:24s} {row['gflops'] * 1e9 / best:.2f} x GEMM rate")


if __name__ == "__main__":
    main()

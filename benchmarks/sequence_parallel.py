"""Sequence parallel (Megatron's): activation memory and collective bytes, with and without.

    OPENBLAS_NUM_THREADS=1 python benchmarks/sequence_parallel.py             # mp 2 and 4, dp 1
    python benchmarks/sequence_parallel.py --mp 2 --dp 2 --batch 4 --seq 128  # other shapes

PanGu-α, one training step's loss and gradients (``ShardedGradProgram``) on the **in-process
backend** (mp x dp virtual ranks as threads of one process: memory and bytes are exact,
times are not measured), once with ``sequence_parallel=False`` and once with ``True``.
Per plan, on rank 0:

* *regions peak*: the most bytes alive at once of the buffers made by the sequence-parallel
  regions -- the LayerNorms, the dropouts after the embedding, attention and FFN, the
  residual adds and the row-parallel bias adds, forward and backward (their VJPs' outputs)
  -- measured by a :class:`RegionMeter` (the runtime's ``MemoryMeter`` counting only those
  ops' output slots). Sequence parallel should divide it by mp;
* *activations peak*: the whole program's (``MemoryMeter``), for scale: the attention and
  FFN insides are already split by mp either way, and the all-gathered inputs of the
  column-parallel matmuls are kept whole for their backward;
* *column inputs peak*: those inputs alone -- the (B*S, H) rows the column-parallel
  ``Dense`` layers fold their input into and keep for their weight gradient: views of the
  LayerNorm outputs without sequence parallel, of their all-gathers with it. The same
  bytes either way; re-gathering them in backward from the sequence shard, as Megatron
  does, would divide them by mp (the runtime keeps them today);
* *bytes per layer*: bytes each rank sends, per decoder layer, over the collectives the
  lowering inserted (``Redistribute`` steps of the local graph, scoped by layer):
  all-reduce 2(n-1)/n of the buffer, reduce-scatter (n-1)/n of its input, all-gather (n-1)/n
  of its output. Sequence parallel replaces each all-reduce by a reduce-scatter and an
  all-gather, so the per-layer figure is the same; the parameter-gradient all-reduces (the
  LayerNorms' and row-parallel biases' gradients, now partial over mp, a few KiB) and the
  embedding's gradient all-gather (Megatron's scatter into the sequence-parallel region)
  are listed apart.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autopar.comm import redistribution as rd  # noqa: E402
from autopar.comm import run_in_process  # noqa: E402
from autopar.context import ParallelContext  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402
from autopar.runtime.memory import MemoryMeter  # noqa: E402
from autopar.runtime.sharded_program import ShardedGradProgram  # noqa: E402
from autopar.runtime.spmd import Redistribute  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

_LAYER = re.compile(r"^(blocks\.\d+|query_layer)(\.|$)")
_REGION_DROPOUT = re.compile(r"(attention\.dropout|output\.dropout|embedding_dropout)$")


def layer_of(scope: str) -> str:
    """The decoder layer a scope belongs to (``blocks.3``, ``query_layer``), or ``other``."""
    m = _LAYER.match(scope)
    return m.group(1) if m else "other"


def in_region(node) -> bool:
    """A forward node of the sequence-parallel regions, named the same in both plans:
    LayerNorms, the dropouts outside the attention core, the residual adds (an Add scoped
    by a layer itself) and the row-parallel bias adds (an Add scoped ``...projection``)."""
    kind, scope = node.prim.kind, node.scope
    if kind == "LayerNorm":
        return True
    if kind == "Dropout":
        return bool(_REGION_DROPOUT.search(scope))
    if kind == "Add":
        return _LAYER.match(scope) is not None and (layer_of(scope) == scope or scope.endswith("projection"))
    return False


def region_slots(graph) -> frozenset[int]:
    """Output slots of the region's forward nodes and of their VJPs in a local graph."""
    fwd = {n.id for n in graph.nodes if n.forward_of is None and in_region(n)}
    return frozenset(v for n in graph.nodes if n.id in fwd or n.forward_of in fwd for v in n.outputs)


_COLUMN = re.compile(r"(dense[123]|mapping)$")


def column_input_slots(graph) -> frozenset[int]:
    """Output slots of the column-parallel Dense layers' (B, S, H) -> (B*S, H) reshapes."""
    return frozenset(v for n in graph.nodes if n.phase == "forward" and n.prim.kind == "Reshape"
                     and _COLUMN.search(n.scope) and len(graph.spec(n.outputs[0]).shape) == 2 for v in n.outputs)


class RegionMeter(MemoryMeter):
    """A ``MemoryMeter`` that sees only writes and frees of ``slots``: its activation peak is
    the most bytes those slots' buffers hold at once."""

    def __init__(self, slots):
        super().__init__()
        self.slots = frozenset(slots)

    def wrote(self, slot, array):
        if slot in self.slots:
            super().wrote(slot, array)

    def freed(self, slot, array):
        if slot in self.slots:
            super().freed(slot, array)


def sent_bytes(step: rd.Step, n: int) -> float:
    """Bytes one rank sends in a collective step over n ranks (``step.bytes``: its local input)."""
    factor = {rd.ALLREDUCE: 2 * (n - 1) / n, rd.REDUCE_SCATTER: (n - 1) / n, rd.ALLGATHER: n - 1,
              rd.ALLTOALL: (n - 1) / n, rd.SLICE: 0.0}
    return step.bytes * factor.get(step.kind, 2 * (n - 1) / n)


def collectives_by_layer(nodes) -> dict[str, dict]:
    """Per layer (``layer_of`` the inserted instruction's scope; ``<outputs>`` for the
    gradients delivered at the end): ``{"sent": bytes, "kinds": {kind: count}}`` over the
    ``Redistribute`` instructions among ``nodes`` (a program's, recompute clones included)."""
    out: dict[str, dict] = {}
    for node in nodes:
        if not isinstance(node.prim, Redistribute):
            continue
        redist = node.prim.attrs["redist"]
        key = node.scope if node.scope == "<outputs>" else layer_of(node.scope)
        row = out.setdefault(key, {"sent": 0.0, "kinds": {}})
        for step in redist.steps:
            if step.kind == rd.SLICE:
                continue
            row["sent"] += sent_bytes(step, redist.src.mesh.shape[step.axis] if step.axis is not None else 0)
            row["kinds"][step.kind] = row["kinds"].get(step.kind, 0) + 1
    return out


def measure(cfg: PanguAlphaConfig, ids: np.ndarray) -> dict:
    """One step's loss and gradients of ``cfg`` on dp x mp in-process ranks; rank 0's
    figures: ``loss``, ``grads`` (every rank's, with ``layouts``), ``regions_peak``,
    ``column_inputs_peak``, ``activations_peak``, ``layers`` (:func:`collectives_by_layer`),
    ``stats``."""
    n = cfg.data_parallel * cfg.model_parallel
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=n, full_batch=True)

    def body(comm):
        net = PanguAlphaWithLoss(cfg)
        prog = ShardedGradProgram(net, (ids,), net.trainable_params(), "semi_auto_parallel", comm,
                                  full_batch=True, ctx=ctx)
        prog((ids,))                                    # warm-up: buffers settle
        regions = RegionMeter(region_slots(prog.local_graph))
        whole = MemoryMeter()
        prog.program.meter = regions
        comm.stats.reset()
        loss, grads = prog((ids,))
        stats = comm.stats.snapshot()
        columns = RegionMeter(column_input_slots(prog.local_graph))
        for meter in (whole, columns):
            prog.program.meter = meter
            prog((ids,))
        return {"loss": loss, "grads": grads, "layouts": prog.layouts, "stats": stats,
                "regions_peak": regions.last.activations_peak, "column_inputs_peak": columns.last.activations_peak,
                "activations_peak": whole.last.activations_peak,
                "layers": collectives_by_layer(ins.node for ins in prog.program.instructions)}
    res = run_in_process(n, body, timeout=600)
    out = dict(res[0])
    out["grads"] = [r["grads"] for r in res]
    return out


def compare(cfg: PanguAlphaConfig, ids: np.ndarray) -> tuple[dict, dict]:
    """``measure`` without and with sequence parallel."""
    return measure(cfg.replace(sequence_parallel=False), ids), measure(cfg.replace(sequence_parallel=True), ids)


def _kib(n: float) -> str:
    return f"{n / 1024:.1f}"


_SHORT = {rd.ALLREDUCE: "AR", rd.REDUCE_SCATTER: "RS", rd.ALLGATHER: "AG", rd.ALLTOALL: "A2A"}


def _sent(row: dict | None) -> str:
    if row is None:
        return "0"
    kinds = " ".join(f"{n}{_SHORT.get(k, k)}" for k, n in sorted(row["kinds"].items()))
    return f"{_kib(row['sent'])} ({kinds})"


def report(cfg: PanguAlphaConfig, batch: int, runs: dict[str, dict]) -> str:
    """Memory and bytes sent per layer (KiB, rank 0) of each run, side by side; the last
    column: the regions' peak of the sequence-parallel run over the plain one."""
    off, on = runs["plain"], runs["sequence parallel"]
    head = (f"dp{cfg.data_parallel} x mp{cfg.model_parallel}, B {batch} S {cfg.seq_length} H {cfg.hidden_size} "
            f"layers {cfg.num_layers}, {cfg.param_dtype}; in-process backend, rank 0, KiB")
    rows = [[what] + [_kib(r[key]) for r in runs.values()]
            for what, key in (("regions peak", "regions_peak"), ("column inputs peak", "column_inputs_peak"),
                              ("activations peak", "activations_peak"))]
    rows[0][0] += f" (SP/plain {on['regions_peak'] / off['regions_peak']:.3f}, 1/mp {1 / cfg.model_parallel:.3f})"
    layers = sorted({k for r in runs.values() for k in r["layers"]})
    rows += [[f"sent: {layer}"] + [_sent(r["layers"].get(layer)) for r in runs.values()] for layer in layers]
    return head + "\n" + table([""] + list(runs), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    for mp in args.mp:
        cfg = PanguAlphaConfig(vocab_size=512, seq_length=args.seq, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=8, ffn_hidden_size=4 * args.hidden, dropout_rate=0.1,
                               data_parallel=args.dp, model_parallel=mp)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, cfg.seq_length + 1)).astype(np.int32)
        off, on = compare(cfg, ids)
        regather = measure(cfg.replace(sequence_parallel=True, sequence_parallel_regather=True), ids)
        runs = {"plain": off, "sequence parallel": on, "SP + regather": regather}
        print(report(cfg, args.batch, runs) + "\n", flush=True)


if __name__ == "__main__":
    main()

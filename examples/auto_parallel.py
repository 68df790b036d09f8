"""Auto-parallel end to end on a model of your own: write it serially, run it on any ranks.

    python examples/auto_parallel.py                  # one process: the serial model
    mpiexec -n 4 python examples/auto_parallel.py     # the joint search plans it, then it runs

Under ``parallel_mode="auto_parallel"`` nothing else needs saying: the search finds the
stack of identical layers (the ``CellList`` below), chooses pipeline stages, the layer
split, micro-batches, recompute and optimizer parallel, searches every stage's ops on its
ranks, prints the plan, and runs it. Anything set by hand stays as set (``--pp 2`` fixes
the stages; ``--slow-links`` prices a machine whose links are slow next to its GEMMs, where
the search pipelines). The losses printed are the serial model's, whatever the plan.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread per rank: set before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import autopar  # noqa: E402
from autopar import nn, ops  # noqa: E402
from autopar.context import current_world  # noqa: E402
from autopar.strategy.profile import PROFILE_DIR  # noqa: E402
from autopar.train import AdamWeightDecay  # noqa: E402


class Block(nn.Cell):
    """A residual MLP block: x + W2 relu(W1 LayerNorm(x))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm((width,))
        self.up = nn.Dense(width, 4 * width)
        self.down = nn.Dense(4 * width, width)
        self.relu, self.add = ops.ReLU(), ops.Add()

    def construct(self, x):
        return self.add(x, self.down(self.relu(self.up(self.norm(x)))))     # (B, W) -> (B, W)


class Regressor(nn.Cell):
    """A stack of blocks and a squared-error loss: the whole model, written serially."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.CellList([Block(width) for _ in range(depth)])
        self.square, self.mean, self.sub = ops.Square(), ops.ReduceMean(), ops.Sub()

    def construct(self, x, y):
        for block in self.blocks:
            x = block(x)
        return self.mean(self.square(self.sub(x, y)))


def slow_links_profile(directory: str) -> str:
    """The 2-core profile with GEMMs and links slowed to 1e8 FLOP/s and 1e6 B/s: gradient
    all-reduces then cost more than a pipeline's sends."""
    base = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    base.update(name="slow-links", gemm_flops={"float32": 1e8, "float64": 1e8},
                intra_node_bandwidth_bytes_per_s=1e6, inter_node_bandwidth_bytes_per_s=1e6)
    path = Path(directory) / "slow-links.json"
    path.write_text(json.dumps(base))
    return str(path)


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--pp", type=int, default=None, help="fix the pipeline stages (else the search chooses)")
    p.add_argument("--slow-links", action="store_true", help="plan for slow links (the search pipelines)")
    args = p.parse_args(argv)

    autopar.init()
    world = current_world()
    tmp = tempfile.mkdtemp(prefix="autopar-example-")
    if world.size > 1:
        fixed = {"pipeline_stages": args.pp} if args.pp else {}
        profile = {"cost_profile": slow_links_profile(tmp)} if args.slow_links else {}
        autopar.set_auto_parallel_context(parallel_mode="auto_parallel", **fixed, **profile)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.width)).astype(np.float32)            # (B, W)
    y = np.tanh(x @ rng.standard_normal((args.width, args.width))).astype(np.float32)
    mine = slice(world.rank * args.batch // world.size, (world.rank + 1) * args.batch // world.size)

    net = Regressor(args.width, args.depth)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-3))
    losses = [float(train(x[mine], y[mine])) for _ in range(args.steps)]          # this rank's rows: (B/n, W)
    if world.rank == 0:
        print("losses:", " ".join(f"{v:.6f}" for v in losses), flush=True)
    return losses


if __name__ == "__main__":
    main()

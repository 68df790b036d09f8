"""Shared harness for decoder-model tests: sharded loss and gradients on in-process ranks,
and the loss curve on a learnable repeated pattern."""
from __future__ import annotations

import numpy as np

from autopar import nn
from autopar.comm import run_in_process
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.train import AdamWeightDecay


def run_sharded(make_net, ids: np.ndarray, n: int, mode: str):
    """Per rank: (loss, gradient shards, their layouts, {name: shard size}, comm stats).
    ``semi_auto_parallel`` feeds every rank the whole batch; ``data_parallel`` its slice."""
    full = mode == "semi_auto_parallel"

    def body(comm):
        net = make_net()
        local = ids if full else np.split(ids, n)[comm.rank]
        prog = ShardedGradProgram(net, (local,), net.trainable_params(), mode, comm, full_batch=full)
        comm.stats.reset()
        loss, grads = prog((local,))
        return loss, grads, prog.layouts, {s.name: s.size for s in prog.shards}, comm.stats.snapshot()
    return run_in_process(n, body)


def repeated_pattern_losses(net, seq_length: int, steps: int = 40) -> list[float]:
    """Losses of ``steps`` AdamWeightDecay steps on rows that repeat one 5-token motif."""
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=3e-3, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
    pattern = np.array([11, 23, 5, 42, 17], dtype=np.int32)
    ids = np.stack([np.roll(np.resize(pattern, seq_length + 1), -k) for k in range(4)])
    return [float(train(ids)) for _ in range(steps)]


def held(train) -> dict[str, np.ndarray]:
    """Copies of what this rank holds: parameter shards (or whole values) and states."""
    out = {}
    for t, states in zip(train.optimizer.params, train.optimizer.states):
        out[t.name] = np.array(t.data, copy=True)
        out |= {f"{s}.{t.name}": np.array(a, copy=True) for s, a in states.items()}
    return out

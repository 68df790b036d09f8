"""Optimizer parallel (ZeRO-1) inside pipeline stages, and gradients reduced once per step.

PanGu-α tiny (float32, dropout on) under pp2 x dp2 with ``enable_parallel_optimizer``:
three AdamWeightDecay steps (global-norm clipping acting) equal serial; each rank keeps
optimizer state for its slice of its stage's weights only (half the bytes of the same
pipeline without it); the tied word table's copies on the first and last stage stay
identical. Gradient collectives run once per step, whatever the number of micro-batches."""
import math

import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.pipeline.shards import AbsentShard, StageShard
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, dropout_rate=0.1)   # 3 blocks + the query layer
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss
TABLE = "word_embedding.embedding_table"
CLIP = 0.5          # below the first steps' gradient norms: clipping acts


def pangu(cfg):
    net = PanguAlphaWithLoss(cfg)
    nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=2)
    return net


def trainer(net, cell):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(cell, opt, clip_norm=CLIP)


def state_bytes(opt) -> int:
    return sum(a.nbytes for states in opt.states for a in states.values())


@pytest.fixture(scope="module")
def serial():
    net = PanguAlphaWithLoss(CONFIG)
    train = trainer(net, net)
    losses = [float(train(IDS)) for _ in range(3)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


def run(enable: bool, micro: int = 2, schedule: str = "1f1b", steps: int = 3):
    """pp2 x dp2, every rank fed the whole batch. Per rank: losses, weights, state bytes,
    the kinds of its optimizer's shards, its block of the tied table, and the comm stats
    of the last step."""
    def body(comm):
        with bound_world(comm):
            net = pangu(CONFIG.replace(data_parallel=2))
            cell = nn.PipelineCell(net, micro, schedule)
            train = trainer(net, cell)
            losses = []
            for k in range(steps):
                if k == steps - 1:
                    comm.stats.reset()
                losses.append(float(train(IDS)))
            stats = comm.stats.snapshot()
            prog = train.build(IDS)
            table = prog.param_shards[[p.name for p in prog.params].index(TABLE)]
            held = table.data.copy() if isinstance(table, StageShard) else None
            kinds = [type(s).__name__ for s in train.optimizer.params]
            return {"losses": losses, "weights": {p.name: p.asnumpy() for p in net.trainable_params()},
                    "state_bytes": state_bytes(train.optimizer), "kinds": kinds, "table": held, "stats": stats,
                    "expected_bytes": expected_state_bytes(prog.param_shards, enable), "stage": prog.stage,
                    "deferred": len(prog.grads.deferred), "sliced": sum(s is not None for s in prog.grads.sliced),
                    "n_weights": sum(isinstance(s, StageShard) for s in prog.param_shards)}
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, pipeline_stages=2, full_batch=True,
                          enable_parallel_optimizer=enable, parallel_optimizer_threshold=0):
        return run_in_process(4, body)


def expected_state_bytes(param_shards, enable: bool) -> int:
    """From shapes: AdamWeightDecay's two states per element of the rank's block of each
    weight on its stage, 1/r of it when sliced over its r replicas on the stage."""
    total = 0
    for s in param_shards:
        if isinstance(s, AbsentShard):
            continue
        local = math.prod(s.shape)
        r = math.prod(s.layout.mesh.shape[a] for a in s.layout.replicated_axes())
        sliced = enable and r > 1 and any(n % r == 0 for n in s.shape)
        total += 2 * (local // r if sliced else local) * np.dtype(s.dtype).itemsize
    return total


@pytest.fixture(scope="module")
def zero():
    return run(True)


def test_pipeline_with_optimizer_parallel_equals_serial(zero, serial):
    losses, weights = serial
    for r in zero:
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
        for name, w in weights.items():
            # Adam's m/sqrt(v) amplifies float32 rounding where gradients are ~0 (see
            # test_optimizer_parallel.py): atol is a few thousandths of one step
            np.testing.assert_allclose(r["weights"][name], w, rtol=1e-5, atol=5e-5, err_msg=name)
    for pos in range(2):   # the tied table: stage 0's and stage 1's copies block for block identical
        np.testing.assert_array_equal(zero[pos]["table"], zero[2 + pos]["table"])


def test_optimizer_state_per_rank_falls_by_the_data_parallel_degree(zero):
    plain = run(False, steps=1)
    for on, off in zip(zero, plain):
        assert on["state_bytes"] == on["expected_bytes"] and off["state_bytes"] == off["expected_bytes"]
        assert on["state_bytes"] * 2 == off["state_bytes"]          # every weight of tiny slices 2 ways
        assert "SliceShard" in on["kinds"] and "AbsentShard" in on["kinds"]
        assert "SliceShard" not in off["kinds"]


@pytest.mark.parametrize("enable", [False, True])
@pytest.mark.parametrize("micro", [2, 4])
def test_gradients_are_reduced_once_per_step(enable, micro):
    """One step's collectives on each rank, counted: one gradient reduction per weight
    (all-reduce; under optimizer parallel reduce-scatter, and one all-gather of the new
    weight), whatever the number of micro-batches; plus one all-reduce over the tied
    table's copies and one for the global norm. Per micro-batch only the forward's own: an
    all-gather of the position table's dy on each stage (its gradient is computed whole,
    so its slice is a local cut, not a reduce-scatter) and the loss's all-reduce on the last."""
    for r in run(enable, micro=micro, steps=1):
        count, weights = r["stats"]["count"], r["n_weights"]
        assert weights == (34 if r["stage"] == 0 else 36)        # the weights on the rank's stage
        per_micro = micro if r["stage"] == 1 else 0
        if enable:
            assert r["sliced"] == r["deferred"] == weights
            assert count["reduce_scatter"] == weights - 1
            assert count["allgather"] == weights + micro
            assert count["allreduce"] == 2 + per_micro
        else:
            assert r["deferred"] == weights - 1                  # the position table's needs none
            assert "reduce_scatter" not in count
            assert count["allgather"] == micro
            assert count["allreduce"] == weights - 1 + 2 + per_micro

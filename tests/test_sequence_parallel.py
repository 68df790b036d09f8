"""Sequence parallel (Megatron's) as `.shard()` strategies: LayerNorm, dropout and residual
add split (dp, mp, 1) over (B, S, H); the row-parallel matmul's out_strategy reduce-scatters
along S, the column-parallel input is all-gathered along S. Sharded == serial (loss,
gradients, AdamW steps), the collectives are exactly those, the bytes per layer equal the
plain plan's, and the regions' activation peak falls by mp."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.megatron import column_parallel
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.pangu_alpha.model import SequenceDense, sequence_row_parallel
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.profile import PROFILE_DIR, load_profile
from autopar.strategy.search import search
from autopar.strategy.sharding_plan import plan_shardings
from autopar.train import AdamWeightDecay

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sequence_parallel as bench  # noqa: E402

B, S, H, F = 4, 8, 8, 16
SEARCH_PROFILE = load_profile("cpu-2core")


class TwoDense(nn.Cell):
    """x * scale -> LN -> column-parallel Dense -> GeLU -> row-parallel Dense -> dropout,
    added back to x. ``sp``: the norm, dropout and add split along S, the row-parallel
    Dense a ``SequenceDense`` whose matmul reduce-scatters along S."""

    def __init__(self, dp=1, mp=1, sp=False):
        super().__init__()
        self.scale = nn.Parameter(nn.Normal(0.5), (H,), "float64", name="scale")
        self.mul = ops.Mul()                       # gives x a gradient
        self.ln = nn.LayerNorm(H, param_dtype="float64")
        self.up = nn.Dense(H, F, weight_init=nn.Normal(0.5), param_dtype="float64")
        self.gelu = ops.GeLU().shard(((dp, 1, mp),))
        self.down = (SequenceDense if sp else nn.Dense)(F, H, weight_init=nn.Normal(0.5), param_dtype="float64")
        self.drop = nn.Dropout(0.75)
        self.residual = ops.Add()
        column_parallel(self.up, dp, mp)
        if sp:
            sequence_row_parallel(self.down, dp, mp)
        else:
            self.down.matmul.shard(((dp, mp), (1, mp)))
            self.down.bias_add.shard(((dp, 1), (1,)))
        tokens = (dp, mp if sp else 1, 1)
        self.mul.shard((tokens, (1,)))
        self.ln.layer_norm.shard((tokens, (1,), (1,)))
        self.drop.dropout.shard((tokens,))
        self.residual.shard((tokens, tokens))

    def construct(self, x):
        x = self.mul(x, self.scale)
        y = self.residual(x, self.drop(self.down(self.gelu(self.up(self.ln(x))))))
        return (y * y).sum() * 0.5


X = np.random.default_rng(0).standard_normal((B, S, H))


def run_two_dense(dp, mp, sp):
    def body(comm):
        net = TwoDense(dp, mp, sp)
        prog = ShardedGradProgram(net, (X,), net.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
        comm.stats.reset()
        loss, grads = prog((X,))
        return loss, grads, prog.layouts, comm.stats.log, bench.collectives_by_layer(prog.local_graph.nodes)
    return run_in_process(dp * mp, body)


def assert_equals_serial(res, serial_grads, params, rtol=1e-10):
    for k, p in enumerate(params):
        got = res[0][2][k].assemble({r: out[1][k] for r, out in enumerate(res)}, p.shape)
        np.testing.assert_allclose(got, serial_grads[p.name], rtol=rtol, atol=1e-12, err_msg=p.name)


@pytest.mark.parametrize("dp, mp", [(1, 2), (2, 2)])
def test_two_dense_layers_reduce_scatter_and_all_gather_along_the_sequence(dp, mp):
    serial = TwoDense()
    loss, grads = autopar.value_and_grad(serial)(X)
    res = run_two_dense(dp, mp, True)
    for r in res:
        np.testing.assert_allclose(r[0], loss, rtol=1e-12)
    assert_equals_serial(res, grads, serial.trainable_params())
    # rank 0's activation collectives, all over its mp group: forward an all-gather of the
    # LN output (B/dp, S/mp, H) along S and a reduce-scatter of the row-parallel partial
    # sums (B/dp, S, H) into S; backward their conjugates. No activation all-reduce.
    mp_group, rows = tuple(range(mp)), B // dp
    acts = sorted((rec.kind, rec.shape) for rec in res[0][3] if rec.ranks == mp_group and len(rec.shape) == 3)
    assert acts == sorted([("allgather", (rows, S // mp, H))] * 2 + [("reduce_scatter", (rows, S, H))] * 2)
    # gradients of the weights applied on sequence shards are partial over mp now
    weights = sorted((rec.kind, rec.shape) for rec in res[0][3] if rec.ranks == mp_group and len(rec.shape) == 1)
    assert weights == [("allreduce", (H,))] * 4              # scale, LN gamma and beta, the row-parallel bias
    # the plain plan: forward the row-parallel output, backward the LN output's gradient,
    # all-reduced whole; the same bytes sent
    plain = run_two_dense(dp, mp, False)
    assert sorted((rec.kind, rec.shape) for rec in plain[0][3] if rec.ranks == mp_group and rec.shape) == \
        [("allreduce", (rows, S, H)), ("allreduce", (rows * S, H))]
    def all_reduced(nbytes, n):
        return 2 * (n - 1) / n * nbytes
    sent = 2 * all_reduced(rows * S * H * 8, mp)                     # 2 float64 (B/dp, S, H)
    # + the loss all-reduced over dp, and under sequence parallel over mp too (a sum over S shards)
    assert plain[0][4]["other"]["sent"] == pytest.approx(sent + all_reduced(8, dp))
    assert res[0][4]["other"]["sent"] == pytest.approx(sent + all_reduced(8, dp) + all_reduced(8, mp))


# ---- PanGu-α ------------------------------------------------------------------------------

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", dropout_rate=0.1)
IDS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
SERIAL = autopar.value_and_grad(PanguAlphaWithLoss(CONFIG))(IDS)


@pytest.mark.parametrize("dp, mp", [(1, 2), (1, 4), (2, 2)])
def test_pangu_alpha_sequence_parallel_equals_serial_with_the_plain_plans_bytes_per_layer(dp, mp):
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp)
    off, on = bench.compare(cfg, IDS)
    loss, grads = SERIAL
    assert on["loss"] == pytest.approx(loss, rel=1e-12)
    params = PanguAlphaWithLoss(CONFIG).trainable_params()
    for k, p in enumerate(params):
        got = on["layouts"][k].assemble({r: g[k] for r, g in enumerate(on["grads"])}, p.shape)
        np.testing.assert_allclose(got, grads[p.name], rtol=1e-9, atol=1e-12, err_msg=p.name)
    for layer in ("blocks.0", "blocks.1"):
        assert off["layers"][layer]["kinds"] == {"allreduce": 4}
        assert on["layers"][layer]["kinds"] == {"allgather": 4, "reduce_scatter": 4}
        assert on["layers"][layer]["sent"] == pytest.approx(off["layers"][layer]["sent"], rel=1e-12)
    # the parameter gradients partial over mp now: 2 LayerNorms (gamma, beta) and 2
    # row-parallel biases per layer, and the final LayerNorm; H floats each
    h_bytes = CONFIG.hidden_size * 8
    extra = on["layers"]["<outputs>"]["sent"] - off["layers"]["<outputs>"]["sent"]
    assert extra == pytest.approx((6 * CONFIG.num_layers + 2) * h_bytes * 2 * (mp - 1) / mp)


@pytest.mark.parametrize("mp", [2, 4])
def test_sequence_parallel_divides_the_regions_activation_peak_by_mp(mp):
    cfg = PanguAlphaConfig(vocab_size=64, seq_length=32, hidden_size=64, num_layers=3, num_heads=4,
                           ffn_hidden_size=256, dropout_rate=0.1, model_parallel=mp)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, cfg.seq_length + 1)).astype(np.int32)
    off, on = bench.compare(cfg, ids)
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
    assert on["regions_peak"] / off["regions_peak"] == pytest.approx(1 / mp, rel=0.10)
    assert on["activations_peak"] < off["activations_peak"]
    # the column-parallel matmuls keep their whole inputs for backward, all-gathered or not
    assert on["column_inputs_peak"] == off["column_inputs_peak"] > 0


def train_three_steps(cfg, n):
    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg)
            train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2,
                                                             weight_decay=0.01), clip_norm=0.5)
            return [float(train(IDS)) for _ in range(3)], {p.name: p.asnumpy() for p in net.trainable_params()}
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, full_batch=True):
        return run_in_process(n, body)


def _serial_steps(cfg):
    net = PanguAlphaWithLoss(cfg)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01),
                                clip_norm=0.5)
    return [([float(train(IDS)) for _ in range(3)], {p.name: p.asnumpy() for p in net.trainable_params()})]


@pytest.mark.parametrize("dp, mp", [(1, 4), (2, 2)])
def test_three_adamw_steps_under_sequence_parallel_equal_serial(dp, mp):
    (want_losses, want), = _serial_steps(CONFIG)
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp, sequence_parallel=True)
    for losses, weights in train_three_steps(cfg, dp * mp):
        np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
        for name, w in want.items():
            np.testing.assert_allclose(weights[name], w, rtol=1e-8, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("dp, mp", [(1, 2), (2, 2)])
def test_regather_runs_the_all_gathers_again_in_backward_instead_of_keeping_their_outputs(dp, mp):
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp, sequence_parallel=True)
    kept = bench.measure(cfg, IDS)
    again = bench.measure(cfg.replace(sequence_parallel_regather=True), IDS)
    loss, grads = SERIAL
    assert again["loss"] == pytest.approx(loss, rel=1e-12)
    for k, p in enumerate(PanguAlphaWithLoss(CONFIG).trainable_params()):
        got = again["layouts"][k].assemble({r: g[k] for r, g in enumerate(again["grads"])}, p.shape)
        np.testing.assert_allclose(got, grads[p.name], rtol=1e-9, atol=1e-12, err_msg=p.name)
    # per layer one more all-gather in backward for each of its two column-parallel inputs
    assert again["layers"]["blocks.0"]["kinds"] == {"allgather": 6, "reduce_scatter": 4}
    assert again["layers"]["blocks.0"]["sent"] == pytest.approx(kept["layers"]["blocks.0"]["sent"] * 5 / 4)
    # what stays: the query layer's query (a lookup of the whole batch, never gathered); every
    # gathered input is rebuilt
    b, s, h = IDS.shape[0], IDS.shape[1] - 1, CONFIG.hidden_size
    assert again["column_inputs_peak"] == b * s * h * 8 < kept["column_inputs_peak"]
    assert again["activations_peak"] < kept["activations_peak"]


# ---- configuration -------------------------------------------------------------------------

def test_sequence_parallel_needs_a_sequence_mp_divides():
    with pytest.raises(ValueError, match=r"PanguAlphaConfig: sequence_parallel: expected False, or a seq_length "
                                         r"divisible by model_parallel=3 \(seq_length=16\).*got True"):
        PanguAlphaConfig.preset("tiny", hidden_size=48, num_heads=3, ffn_hidden_size=96, model_parallel=3,
                                sequence_parallel=True)
    with pytest.raises(TypeError, match=r"sequence_parallel: expected True or False, got 1"):
        PanguAlphaConfig.preset("tiny", sequence_parallel=1)
    with pytest.raises(ValueError, match=r"sequence_parallel_regather: expected False unless "
                                         r"sequence_parallel=True.*got True; set sequence_parallel=True too"):
        PanguAlphaConfig.preset("tiny", sequence_parallel_regather=True)


def test_a_sequence_shorter_than_the_split_names_the_layernorm_at_plan_time():
    cfg = CONFIG.replace(model_parallel=2, sequence_parallel=True)
    ids = IDS[:, :8]                                           # S = 7: not divisible by mp = 2

    def body(comm):
        net = PanguAlphaWithLoss(cfg)
        ShardedGradProgram(net, (ids,), net.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
    with pytest.raises(ValueError, match=r"blocks\.0\.layernorm1 \(LayerNorm\).*dim 1 of input 0 \(size 7\)"):
        run_in_process(2, body)


def test_sequence_parallel_at_mp1_is_the_plain_model():
    cfg = CONFIG.replace(data_parallel=2, sequence_parallel=True)
    net = PanguAlphaWithLoss(cfg)
    assert type(net.backbone.blocks[0].output.projection) is nn.Dense
    assert net.backbone.blocks[0].residual1.strategy is None


# ---- the cost model prices it, the op search chooses it -------------------------------------

@pytest.fixture(scope="module")
def links(tmp_path_factory):
    """No latency, 1 GB/s links, free compute: seconds x 1e9 are the bytes each rank sends."""
    base = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    base.update(name="links", gemm_flops={"float32": 1e30}, elementwise_bytes_per_s=1e30, op_overhead_s=0.0,
                intra_node_latency_s=0.0, inter_node_latency_s=0.0, intra_node_bandwidth_bytes_per_s=1e9,
                inter_node_bandwidth_bytes_per_s=1e9, devices_per_node=64,
                op_bytes_per_s={k: 1e30 for k in base["op_bytes_per_s"]})
    path = tmp_path_factory.mktemp("p") / "links.json"
    path.write_text(json.dumps(base))
    return load_profile(str(path))


@pytest.mark.parametrize("mp", [2, 4])
def test_cost_model_prices_the_bytes_the_lowering_sends_and_the_norms_shards(links, mp):
    """The predicted collective bytes of the plans differ exactly as the lowered programs'
    (sequence parallel: the weights' gradient all-reduces over mp and the gradient
    all-gather at the embedding, per layer the same; regather: the all-gathers run again),
    and the predicted activations fall by the LayerNorms' saved inputs x (1 - 1/mp), and
    further when the gathered inputs are rebuilt."""
    cfg = CONFIG.replace(param_dtype="float32", compute_dtype="float32", model_parallel=mp)
    stage = Mesh((mp,), ("devices",))
    cost, sent = {}, {}
    for run in ("plain", "sp", "regather"):
        c = cfg.replace(sequence_parallel=run != "plain", sequence_parallel_regather=run == "regather")
        g = trace(PanguAlphaWithLoss(c), (TensorSpec(IDS.shape, np.dtype(np.int32)),), {}).graph
        cost[run] = CostModel(g, stage, links, True).evaluate(plan_shardings(g, "semi_auto_parallel", stage, True))
        sent[run] = sum(row["sent"] for row in bench.measure(c, IDS)["layers"].values())
    for a, b in (("plain", "sp"), ("sp", "regather")):
        assert (cost[b].comm_s - cost[a].comm_s) * 1e9 == pytest.approx(sent[b] - sent[a], rel=1e-9)
        assert sent[b] > sent[a]
    b, s = IDS.shape[0], IDS.shape[1] - 1
    norms = 2 * CONFIG.num_layers + 1
    saved = norms * b * s * CONFIG.hidden_size * 4
    assert cost["plain"].activation_bytes - cost["sp"].activation_bytes == saved * (mp - 1) // mp
    assert cost["regather"].activation_bytes < cost["sp"].activation_bytes


class FreeBlock(nn.Cell):
    """Megatron's column- then row-parallel matmuls fixed on (B, S, H); the scale, LayerNorm,
    dropout and residual add left to the search."""

    def __init__(self, h, mp):
        super().__init__()
        self.scale = nn.Parameter(np.ones((h,), np.float32), name="scale")
        self.up = nn.Parameter(np.zeros((4 * h, h), np.float32), name="up")
        self.down = nn.Parameter(np.zeros((h, 4 * h), np.float32), name="down")
        self.mul, self.ln = ops.Mul(), nn.LayerNorm(h)
        self.mm_up = ops.BatchMatMul(transpose_b=True).shard(((1, 1, 1), (mp, 1)))
        self.gelu = ops.GeLU()
        self.mm_down = ops.BatchMatMul(transpose_b=True).shard(((1, 1, mp), (1, mp)))   # partial sums
        self.drop, self.add, self.mean = ops.Dropout(0.9), ops.Add(), ops.ReduceMean()

    def construct(self, x):
        x = self.mul(x, self.scale)
        y = self.mm_down(self.gelu(self.mm_up(self.ln(x), self.up)), self.down)
        return self.mean(self.add(x, self.drop(y)))


def _token_ops(graph, plan):
    return {graph.nodes[n].prim.kind: str(sh) for n, sh in plan.shardings.items()
            if graph.nodes[n].prim.kind in ("LayerNorm", "Dropout", "Add")}


SEQUENCE_SPLIT = {"LayerNorm": "((1,4,1),(1,),(1,))", "Dropout": "((1,4,1),)", "Add": "((1,4,1),(1,4,1))"}


def test_search_picks_sequence_parallel_when_memory_is_tight():
    """B2 S16 H64 on mp4: four more collective calls than it saves in LayerNorm and dropout
    time, so the fastest plan keeps the tokens whole (all-reduces); under a cap 10% below its
    peak the search splits the norm, dropout and add along S (reduce-scatter, all-gather).
    (5% below, splitting the block's elementwise tail along H already fits, at less cost:
    the peak counts the backward's activation gradients too.)"""
    g = trace(FreeBlock(64, 4), (TensorSpec((2, 16, 64), np.dtype(np.float32)),), {}).graph
    stage = Mesh((4,), ("devices",))
    fast = search(g, stage, profile=SEARCH_PROFILE)
    assert _token_ops(g, fast.plan) == {"LayerNorm": "((1,1,1),(1,),(1,))", "Dropout": "((1,1,1),)",
                                        "Add": "((1,1,1),(1,1,1))"}
    cap = 0.90 * fast.cost.memory_bytes
    lean = search(g, stage, profile=SEARCH_PROFILE, memory_cap=cap)
    assert _token_ops(g, lean.plan) == SEQUENCE_SPLIT
    assert lean.cost.memory_bytes <= cap and lean.cost.activation_bytes < fast.cost.activation_bytes
    assert lean.cost.step_seconds > fast.cost.step_seconds


def test_search_picks_sequence_parallel_when_it_pays_in_time():
    """S64: the norm's and dropout's work divided by 4 outweighs the extra calls."""
    g = trace(FreeBlock(64, 4), (TensorSpec((2, 64, 64), np.dtype(np.float32)),), {}).graph
    assert _token_ops(g, search(g, Mesh((4,), ("devices",)), profile=SEARCH_PROFILE).plan) == SEQUENCE_SPLIT


def test_sequence_parallel_inside_pipeline_stages_equals_serial(monkeypatch):
    """pp2 x mp2, 1F1B over 4 micro-batches (test_pipeline's run with sequence_parallel on):
    loss, gradients and three AdamW steps equal serial."""
    import test_pipeline as tp
    net = PanguAlphaWithLoss(tp.CONFIG).set_train(True)
    loss, grads = autopar.value_and_grad(net)(tp.IDS)
    net = PanguAlphaWithLoss(tp.CONFIG)
    _, losses, weights = tp.train_three_steps(net, net, tp.IDS)
    monkeypatch.setattr(tp, "CONFIG", tp.CONFIG.replace(sequence_parallel=True))
    tp.assert_equals_serial(tp.run_pipeline(2, 1, 2, 4, "1f1b"), (loss, grads, losses, weights))

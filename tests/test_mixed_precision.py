"""Mixed precision as MindSpore's O2 level: float16/bfloat16 activations, float32 masters.

A PanGu-α (and Yuan) built with ``compute_dtype`` float16 or bfloat16 runs every matmul,
attention product, GeLU, dropout and residual add in that dtype (counted in the traced
graph, which is what the cost model prices), while parameters, their gradients, optimizer
states and the loss stay float32; every array the compiled program writes, forward and
backward, has exactly its graph dtype. Loss and gradients track the float32 model within
tolerances stated in units of the dtype's machine epsilon, and a model sharded over two
in-process ranks equals the serial one in the same dtype.

Tolerances (eps: 2^-10 float16, 2^-7 bfloat16; measured errors in brackets):

* loss, relative: 1 eps [<= 0.08 eps]. The loss is a float32 mean over 64 tokens of
  float32 cross-entropies; each logit carries the roundings of the layers below it (a few
  eps/2 each, of both signs), and the mean over tokens shrinks them further.
* gradients, relative L2 over all parameters: 8 eps [<= 3.4 eps]; per parameter: 16 eps
  [<= 6.6 eps]. A gradient goes through ~30 ops rounding at eps/2 (sqrt(30) * eps/2 ~ 3
  eps for errors of random sign); twice to five times that leaves room without hiding a
  wrong op, which costs O(1).
* sharded vs serial in the same dtype: loss 1 eps, gradients 2 eps [<= 1.2 eps]: the only
  difference is where float16 partial sums are rounded (per rank before an all-reduce,
  or once serially).
"""
from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import pytest
from lm_harness import run_sharded

import autopar
from autopar import nn, ops
from autopar.dtype import bfloat16, float_dtype, is_float
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.yuan import YuanConfig, YuanWithLoss
from autopar.runtime.compiled import grad_program
from autopar.runtime.trace import trace
from autopar.train import AdamWeightDecay

HALF = ["float16", "bfloat16"]
EPS = {dt: float(ml_dtypes.finfo(np.dtype(dt)).eps) for dt in HALF}   # numpy's finfo: bfloat16 from ml_dtypes 0.7
IDS = np.random.default_rng(0).integers(0, 96, (4, 17)).astype(np.int32)   # (B, S + 1), vocab 96
MODELS = {"pangu": (PanguAlphaConfig, PanguAlphaWithLoss), "yuan": (YuanConfig, YuanWithLoss)}


def build(model: str, dtype: str, **kw):
    config_cls, net_cls = MODELS[model]
    return net_cls(config_cls.preset("tiny", compute_dtype=dtype, **kw))


class DtypeMeter:
    """A memory meter's hooks, used to see every array a program writes: each must have the
    dtype its graph value says (a kernel returning float32 for a bfloat16 value, as numpy's
    bfloat16 matmul does, shows up here)."""

    def __init__(self, graph):
        self.graph, self.checked, self.wrong = graph, 0, []

    def begin(self, *args):
        pass

    def sample(self):
        pass

    def freed(self, slot, array):
        pass

    def end(self, slots):
        pass

    def wrote(self, slot, array):
        want = np.dtype(self.graph.spec(slot).dtype)
        self.checked += 1
        if np.asarray(array).dtype != want:
            node = next(n for n in self.graph.nodes if slot in n.outputs)
            self.wrong.append(f"{node.name}: {np.asarray(array).dtype} for a {want} value")


@pytest.mark.parametrize("model", ["pangu", "yuan"])
@pytest.mark.parametrize("dtype", HALF)
def test_every_array_the_training_program_writes_has_its_graph_dtype(model, dtype):
    net = build(model, dtype, **({"dropout_rate": 0.1} if model == "pangu" else {}))
    net.set_train(True)
    prog = grad_program(net, (IDS,), {}, net.trainable_params())
    meter = DtypeMeter(prog.graph)
    prog.measure(meter)
    loss, grads = prog((IDS,), {}, 0)
    assert meter.wrong == []
    assert meter.checked > 300                         # forward and backward, every instruction
    assert loss.dtype == np.float32 and np.isfinite(loss)
    assert [g.dtype for g in grads] == [np.dtype(np.float32)] * len(grads)


def forward_census(net) -> collections.Counter:
    """(op kind, output dtype name) -> count over the traced forward graph."""
    net.set_train(True)
    graph = trace(net, (IDS,), {}).graph
    return collections.Counter((n.prim.kind, np.dtype(graph.spec(n.outputs[0]).dtype).name) for n in graph.nodes)


# The float32 values of a mixed-precision PanGu-α tiny: the three embedding lookups (their
# tables are float32 masters) and the loss tail after the logits' cast to float32.
FLOAT32_PART = collections.Counter({"Gather": 3, "Cast": 2, "Reshape": 1, "SparseSoftmaxCrossEntropyWithLogits": 1,
                                    "Mul": 1, "ReduceSum": 2, "Maximum": 1, "RealDiv": 1})


@pytest.mark.parametrize("dtype", HALF)
def test_pangu_activations_flow_in_the_compute_dtype(dtype):
    census = forward_census(build("pangu", dtype, dropout_rate=0.1))
    # 3 layers: 4 attention + 2 FFN Dense each, and the tied head; 2 attention products,
    # 1 softmax, 1 GeLU, 2 LayerNorms, 3 dropouts per layer (+ final LN, embedding dropout)
    for kind, n in {"MatMul": 19, "BatchMatMul": 6, "Softmax": 3, "GeLU": 3, "LayerNorm": 7, "Dropout": 10,
                    "Add": 28, "Transpose": 15}.items():
        assert census[(kind, dtype)] == n, kind
    float32 = collections.Counter({k: n for (k, d), n in census.items() if d == "float32"})
    assert float32 == FLOAT32_PART
    assert not any(d == "float64" for _, d in census)
    # each Dense casts its weight and bias, the head its table, each lookup its rows: 40
    assert census[("Cast", dtype)] == 40


def test_a_float32_model_has_no_float_cast():
    """The default compute dtype adds nothing to the graph (float32 runs are unchanged)."""
    census = forward_census(build("pangu", "float32", dropout_rate=0.1))
    assert census[("Cast", "float32")] == 1           # the loss mask (bool -> float32) only
    assert all(d != "float16" for _, d in census)


def test_yuan_activations_flow_in_the_compute_dtype():
    census = forward_census(build("yuan", "bfloat16"))
    # 2 layers of 4 LFA convolution, 4 attention and 3 SwiGLU Dense, and the tied head
    for kind, n in {"MatMul": 23, "BatchMatMul": 4, "Softmax": 2, "RMSNorm": 7, "SiLU": 2}.items():
        assert census[(kind, "bfloat16")] == n, kind
    assert census[("MatMul", "float32")] == census[("RMSNorm", "float32")] == 0


@pytest.mark.parametrize("dtype", HALF)
def test_parameters_gradients_and_optimizer_states_stay_float32(dtype):
    net = build("pangu", dtype, dropout_rate=0.1)
    opt = AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=0.01)
    train = nn.TrainOneStepWithLossScaleCell(net, opt, nn.FixedLossScaleUpdateCell(2.0 ** 12))
    for _ in range(2):
        loss, overflow, _ = train(IDS)
        assert loss.dtype == np.float32 and not overflow
    assert opt.step_count == 2
    assert {p.data.dtype for p in net.trainable_params()} == {np.dtype(np.float32)}
    states = [a for s in opt.states for a in s.values()]
    assert len(states) == 2 * len(net.trainable_params())
    assert {a.dtype for a in states} == {np.dtype(np.float32)}


def loss_and_grads(net):
    loss, grads = autopar.value_and_grad(net)(IDS)
    return float(loss), grads


@pytest.mark.parametrize("model", ["pangu", "yuan"])
@pytest.mark.parametrize("dtype", HALF)
def test_loss_and_gradients_track_float32(model, dtype):
    eps = EPS[dtype]
    want_loss, want = loss_and_grads(build(model, "float32", init_std=0.2))
    loss, got = loss_and_grads(build(model, dtype, init_std=0.2))
    assert want_loss > 5.0                   # init_std 0.2: a loss the weights shape (log 96 = 4.56)
    assert abs(loss - want_loss) <= eps * want_loss
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in want.values()))
    diff = np.sqrt(sum(np.sum((got[k] - want[k]).astype(np.float64) ** 2) for k in want))
    assert diff <= 8 * eps * total
    for k in want:   # a floor for gradients that are 0 in exact arithmetic (PanGu-α's key bias)
        scale = max(np.linalg.norm(want[k]), 1e-3 * total)
        assert np.linalg.norm(got[k] - want[k]) <= 16 * eps * scale, k


@pytest.mark.parametrize("dtype", HALF)
def test_ten_training_steps_track_float32(dtype):
    """AdamWeightDecay, lr 1e-3, clip 1.0: each step's loss within 2 eps (relative) of the
    float32 run's (the weights drift apart by the rounding of each step's gradients)."""
    def losses(compute_dtype):
        net = build("pangu", compute_dtype, dropout_rate=0.1)
        opt = AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=0.01)
        train = nn.TrainOneStepWithLossScaleCell(net, opt, 2.0 ** 12, clip_norm=1.0)
        rng = np.random.default_rng(1)
        return [float(train(rng.integers(0, 96, (4, 17)).astype(np.int32))[0]) for _ in range(10)]
    want, got = np.array(losses("float32")), np.array(losses(dtype))
    assert np.all(np.abs(got - want) <= 2 * EPS[dtype] * want), (got, want)
    assert not np.array_equal(got, want)     # it did run in the lower precision


@pytest.mark.parametrize("dtype, dp, mp, mode", [
    ("float16", 2, 1, "data_parallel"),
    ("float16", 1, 2, "semi_auto_parallel"),
    ("bfloat16", 2, 1, "data_parallel"),
    ("bfloat16", 1, 2, "semi_auto_parallel"),
])
def test_sharded_equals_serial_in_the_same_dtype(dtype, dp, mp, mode):
    eps = EPS[dtype]
    config = PanguAlphaConfig.preset("tiny", compute_dtype=dtype, init_std=0.2)
    want_loss, want = loss_and_grads(PanguAlphaWithLoss(config))
    sharded = config.replace(data_parallel=dp, model_parallel=mp)
    res = run_sharded(lambda: PanguAlphaWithLoss(sharded), IDS, dp * mp, mode)
    for loss, *_ in res:
        assert abs(float(loss) - want_loss) <= eps * want_loss
    sq_diff = sq_total = 0.0
    for k, name in enumerate(want):
        got = res[0][2][k].assemble({r: x[1][k] for r, x in enumerate(res)}, want[name].shape)
        assert got.dtype == np.float32, name
        sq_diff += np.sum((got - want[name]).astype(np.float64) ** 2)
        sq_total += np.sum(want[name].astype(np.float64) ** 2)
    assert np.sqrt(sq_diff) <= 2 * eps * np.sqrt(sq_total)


def test_bfloat16_is_a_float_dtype_everywhere_a_dtype_is_checked():
    assert float_dtype("bfloat16") == bfloat16 and is_float(bfloat16) and not is_float(np.int32)
    assert PanguAlphaConfig.preset("tiny", compute_dtype="bfloat16").compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"compute_dtype: expected one of float16, bfloat16, float32, float64"):
        YuanConfig.preset("tiny", compute_dtype="int32")
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(bfloat16)
    assert ops.MatMul(transpose_b=True)(a, a).dtype == bfloat16      # numpy's bfloat16 matmul gives float32
    assert ops.LayerNorm()(a, np.ones(3, np.float32), np.zeros(3, np.float32)).dtype == bfloat16


@pytest.mark.parametrize("dtype", HALF)
def test_half_sums_accumulate_in_float32(dtype):
    """numpy sums bfloat16 in bfloat16: 4096 values near 0.5 stall at 256. ReduceSum and
    the broadcast gradient of a bias (an Add's backward) sum in float32, then round once."""
    x = np.random.default_rng(0).random((4096, 2)).astype(np.float32)
    half = x.astype(dtype)
    exact = half.astype(np.float64).sum(axis=0)
    assert np.allclose(ops.ReduceSum()(half, 0).astype(np.float64), exact, rtol=EPS[dtype])
    specs = [TensorSpec((4096, 2), np.dtype(dtype)), TensorSpec((2,), np.dtype(dtype))]
    bias_grad = ops.Add().vjp(half, [None, None], None, specs, [False, True])[1]
    assert bias_grad.dtype == np.dtype(dtype)
    assert np.allclose(bias_grad.astype(np.float64), exact, rtol=EPS[dtype])


def test_bfloat16_parameters_train_and_their_norm_is_exact():
    """A model whose parameters are bfloat16 takes steps (weights stay bfloat16 and move), and
    the gradient norm of bfloat16 arrays is the float64 norm of their values."""
    from autopar.runtime.shards import local_norm
    g = np.random.default_rng(0).standard_normal(1000).astype(bfloat16)
    assert local_norm([g]) == pytest.approx(float(np.linalg.norm(g.astype(np.float64))), rel=1e-12)
    cfg = PanguAlphaConfig.preset("tiny", param_dtype="bfloat16", compute_dtype="bfloat16")
    net = PanguAlphaWithLoss(cfg)
    before = {p.name: p.asnumpy().astype(np.float32) for p in net.trainable_params()}
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, cfg.seq_length + 1)).astype(np.int32)
    step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-3))
    losses = [float(step(ids)) for _ in range(2)]
    assert np.all(np.isfinite(losses)) and step.skipped_steps == 0
    moved = [not np.array_equal(p.asnumpy().astype(np.float32), before[p.name]) for p in net.trainable_params()
             if p.name.endswith(".weight")]      # (a gain of 1 + 1e-3 rounds back to 1 in bfloat16)
    assert all(p.asnumpy().dtype == bfloat16 for p in net.trainable_params()) and all(moved)

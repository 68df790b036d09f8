"""Selective recompute (Megatron's attention core) and MindSpore's per-op / nested marks:
the loss and gradients of keeping everything, bit for bit, with dropout on -- serially, on
dp2 and mp2 in-process ranks, in a 2-stage pipeline -- while the measured activation peak
falls by exactly the (B, heads, S, S) tensors, as the cost model predicts."""
import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.graph import BACKWARD
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.yuan import YuanConfig, YuanWithLoss
from autopar.runtime.compiled import GradProgram
from autopar.runtime.memory import MemoryMeter, predicted_activations
from autopar.runtime.recompute import CLONE_SUFFIX, classify
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.profile import load_profile
from autopar.strategy.search import search_plan
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=3, dropout_rate=0.1,      # 2 blocks + the query layer
                                 param_dtype="float64", compute_dtype="float64")
B, N, S = 4, CONFIG.num_heads, CONFIG.seq_length
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, S + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1
STEP = 3                               # dropout's key depends on the step
SCORE_BYTES = B * N * S * S * 8        # one (B, N, S, S) float64 tensor


def _nested(net):
    """Whole layers recomputed, their attention kept: cell.recompute(False) inside a recomputed cell."""
    for layer in net.backbone.layers():
        layer.recompute()
        layer.attention.recompute(False)


def _per_op(net):
    """Only each FFN's GeLU: op.recompute() inside an unmarked cell."""
    for layer in net.backbone.layers():
        layer.output.gelu.recompute()


VARIANTS = {"none": lambda net: None, "selective": lambda net: net.backbone.recompute_layers("selective"),
            "full": lambda net: net.backbone.recompute_layers("full"), "nested": _nested, "per_op": _per_op}


def pangu(variant: str, cfg: PanguAlphaConfig = CONFIG) -> PanguAlphaWithLoss:
    net = PanguAlphaWithLoss(cfg)
    VARIANTS[variant](net)
    return net.set_train(True)


@pytest.fixture(scope="module")
def serial():
    """variant -> (loss, grads, measured usage, GradProgram)."""
    out = {}
    for variant in VARIANTS:
        net = pangu(variant)
        prog = GradProgram(net, (IDS,), {}, net.trainable_params())
        prog.program.meter = MemoryMeter()
        loss, grads = prog((IDS,), {}, STEP)
        out[variant] = (loss, grads, prog.program.meter.last, prog)
    return out


def _clones(prog) -> list[str]:
    return sorted(prog.program.graph.nodes[c].name.removesuffix(CLONE_SUFFIX) for c in prog.program.recomputed_from)


def _scores_kept(prog) -> int:
    """(B, N, S, S) values alive when the backward pass starts (made in forward, freed later)."""
    program = prog.program
    first = next(k for k, ins in enumerate(program.instructions) if ins.node.phase == BACKWARD)
    freed = {v: k for k, ins in enumerate(program.instructions) for v in ins.frees}
    made = [(k, o) for k, ins in enumerate(program.instructions[:first]) for o in ins.outs]
    return sum(program.graph.spec(o).shape == (B, N, S, S) and freed.get(o, len(program.instructions)) >= first
               for _, o in made)


# ---- marks ------------------------------------------------------------------------------------

class Inner(nn.Cell):
    def __init__(self):
        super().__init__()
        self.exp = ops.Exp()
        self.neg = ops.Neg()

    def construct(self, x):
        return self.neg(self.exp(x))


class Outer(nn.Cell):
    def __init__(self):
        super().__init__()
        self.kept = Inner()
        self.marked = Inner()
        self.tanh = ops.Tanh()
        self.sig = ops.Sigmoid()

    def construct(self, x):
        return self.sig(self.tanh(self.marked(self.kept(x))))


def test_an_ops_mark_beats_its_cells_and_the_innermost_cell_mark_beats_outer_ones():
    net = Outer()
    assert net.is_recompute is None                      # never marked: follows the cell around it
    net.recompute()
    net.kept.recompute(False)                            # kept inside a recomputed cell ...
    net.kept.neg.recompute()                             # ... but this op of it is recomputed
    net.sig.recompute(False)                             # an op kept in a recomputed cell
    graph = trace(net, (np.zeros((2, 3)),)).graph
    marks = {n.name: n.recompute for n in graph.nodes}
    assert marks == {"kept/Exp": False, "kept/Neg": True, "marked/Exp": True, "marked/Neg": True,
                     "Outer/Tanh": True, "Outer/Sigmoid": False}
    net.recompute(False)                                 # unmarking the outer cell: only the op's own marks stay
    marks = {n.name: n.recompute for n in trace(net, (np.zeros((2, 3)),)).graph.nodes}
    assert [k for k, v in marks.items() if v] == ["kept/Neg"]


class Kept(nn.Cell):
    """Three dense + GeLU layers, recomputed, with the middle GeLU kept by ``op.recompute(False)``."""

    def __init__(self, h=6):
        super().__init__()
        self.layers = nn.CellList([nn.Dense(h, h, param_dtype="float64") for _ in range(3)])
        self.gelus = [ops.GeLU() for _ in range(3)]

    def construct(self, x):
        for dense, gelu in zip(self.layers, self.gelus):
            x = gelu(dense(x))
        return (x * x).sum()


def test_a_kept_op_inside_a_recomputed_cell_keeps_its_output_and_the_gradients_stay():
    x = np.random.default_rng(1).standard_normal((5, 6))
    net = Kept()
    want_loss, want = autopar.value_and_grad(net)(x)
    net.recompute()
    net.gelus[1].recompute(False)
    prog = GradProgram(net, (x,), {}, net.trainable_params())
    rv = classify(prog.graph, prog.program.outputs)
    made = {n.name: n.outputs[0] for n in prog.graph.nodes}
    assert made["Kept/GeLU-1"] not in rv.internal                 # kept: op.recompute(False)
    assert made["Kept/GeLU"] in rv.internal and made["Kept/GeLU-2"] in rv.internal
    assert "Kept/GeLU-1" not in _clones(prog) and "Kept/GeLU" in _clones(prog)
    loss, grads = prog((x,), {})
    assert loss == want_loss
    for g, name in zip(grads, want):
        np.testing.assert_array_equal(g, want[name])


def test_the_attention_core_ops_carry_the_selective_marks():
    graph = trace(pangu("selective"), (IDS,)).graph
    marked = sorted(n.name for n in graph.nodes if n.recompute and n.scope.startswith("blocks.0."))
    assert marked == ["blocks.0.attention.prob_dropout/Dropout", "blocks.0.attention/Add",
                      "blocks.0.attention/BatchMatMul", "blocks.0.attention/BatchMatMul-1",
                      "blocks.0.attention/Softmax"]
    # same graph as without marks: the mask add became a named op, nothing else changed
    plain = trace(pangu("none"), (IDS,)).graph
    assert [n.name for n in plain.nodes] == [n.name for n in graph.nodes]


def test_a_bad_granularity_names_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"PanguAlphaConfig: recompute_granularity: expected one of "
                                         r"\('full', 'selective'\), got 'partial'"):
        CONFIG.replace(recompute_granularity="partial")
    with pytest.raises(ValueError, match=r"PanguAlpha.recompute_layers: granularity: .*got 'attention'.*use 'full'"):
        pangu("none").backbone.recompute_layers("attention")
    cfg = CONFIG.replace(recompute_granularity="selective")
    assert PanguAlphaWithLoss(cfg).backbone.blocks[1].attention.softmax.recompute_mode is True


# ---- serial -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["selective", "full", "nested", "per_op"])
def test_serial_recompute_gives_the_same_loss_and_gradients_bit_for_bit(serial, variant):
    loss, grads, _, _ = serial["none"]
    got_loss, got_grads, _, prog = serial[variant]
    assert got_loss == loss
    for g, got in zip(grads, got_grads):
        np.testing.assert_array_equal(got, g)
    assert prog.program.recomputed_from                   # something did run again


def test_what_each_plan_runs_again(serial):
    """Selective: per layer the scores, mask add, softmax and the dropout (its mask replayed
    from the original's key) -- not the context matmul, whose output backward never reads.
    Per-op: only the GeLUs, with the projection's reshape that alone reads each (a view:
    keeping it would keep the GeLU's buffer). Nested: the layers but not their attention."""
    layers = ["blocks.0", "blocks.1", "query_layer"]
    want = sorted(f"{p}.attention{s}" for p in layers for s in (
        ".prob_dropout/Dropout", "/Add", "/BatchMatMul", "/Softmax"))
    assert _clones(serial["selective"][3]) == want
    assert _clones(serial["per_op"][3]) == sorted(f"{p}.output{s}" for p in layers
                                                  for s in ("/GeLU", ".projection/Reshape"))
    nested = _clones(serial["nested"][3])
    # attention kept: none of its ops runs again (a reshape that alone views a rebuilt value
    # goes with it, whatever its cell says: the query embedding's, into the query layer's dense1)
    assert [name for name in nested if ".attention" in name] == ["query_layer.attention.dense1/Reshape"]
    assert any(".output" in name for name in nested) and any("layernorm2" in name for name in nested)


def test_measured_memory_orders_full_below_selective_below_none(serial):
    peak = {v: serial[v][2].activations_peak for v in VARIANTS}
    assert peak["full"] < peak["nested"] < peak["selective"] < peak["none"]
    assert peak["per_op"] < peak["none"]
    # selective drops exactly each layer's softmax output and dropout output: two (B, N, S, S) a layer
    assert peak["none"] - peak["selective"] == 2 * CONFIG.num_layers * SCORE_BYTES
    assert _scores_kept(serial["none"][3]) == 2 * CONFIG.num_layers
    assert _scores_kept(serial["selective"][3]) == 0 == _scores_kept(serial["full"][3])
    # the GeLUs' (B, S, F) outputs are rebuilt from their inputs: recomputing one op saves; the
    # last layer's is rebuilt early in backward, while the peak still stands (two of three fall)
    assert peak["none"] - peak["per_op"] == (CONFIG.num_layers - 1) * B * S * CONFIG.ffn_hidden_size * 8
    for v in VARIANTS:                    # the step-by-step prediction follows every plan exactly
        assert max(predicted_activations(serial[v][3].program)) == peak[v], v


def test_three_training_steps_equal_and_the_memory_report_shows_the_cut():
    def train(variant):
        net = pangu(variant)
        step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2), clip_norm=1.0)
        step.measure_memory()
        losses = [float(step(IDS)) for _ in range(3)]
        return losses, {p.name: p.asnumpy() for p in net.trainable_params()}, step.memory_report()
    want_losses, want, report = train("none")
    losses, weights, sel_report = train("selective")
    assert losses == want_losses
    for name, w in want.items():
        np.testing.assert_array_equal(weights[name], w, err_msg=name)
    assert report["activations_peak"] - sel_report["activations_peak"] == 2 * CONFIG.num_layers * SCORE_BYTES


def test_yuan_selective_recompute_is_bit_identical_and_drops_its_scores():
    cfg = YuanConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
    ids = IDS % cfg.vocab_size
    out = {}
    for g in (None, "selective"):
        net = YuanWithLoss(cfg.replace(recompute_granularity=g)).set_train(True)
        prog = GradProgram(net, (ids,), {}, net.trainable_params())
        prog.program.meter = MemoryMeter()
        out[g] = prog((ids,), {}) + (prog.program.meter.last.activations_peak,)
    assert out["selective"][0] == out[None][0]
    for g, got in zip(out[None][1], out["selective"][1]):
        np.testing.assert_array_equal(got, g)
    # per block the softmax output (read by the context matmul and by softmax's backward)
    assert out[None][2] - out["selective"][2] == cfg.num_layers * B * cfg.num_heads * S * S * 8


# ---- in-process ranks -------------------------------------------------------------------------

def sharded(variant, dp, mp):
    mode = "data_parallel" if mp == 1 else "semi_auto_parallel"
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp)

    def body(comm):
        net = pangu(variant, cfg)
        ids = np.split(IDS, dp)[comm.rank] if mode == "data_parallel" else IDS
        prog = ShardedGradProgram(net, (ids,), net.trainable_params(), mode, comm, full_batch=mode != "data_parallel")
        prog.program.meter = MemoryMeter()
        comm.stats.reset()
        loss, grads = prog((ids,), {}, STEP)
        return loss, grads, sum(comm.stats.snapshot()["count"].values()), prog.program.meter.last.activations_peak
    return run_in_process(dp * mp, body)


@pytest.fixture(scope="module")
def kept_all():
    """(dp, mp) -> per rank results of keeping everything."""
    return {(dp, mp): sharded("none", dp, mp) for dp, mp in ((2, 1), (1, 2))}


@pytest.mark.parametrize("variant", ["selective", "full", "nested", "per_op"])
@pytest.mark.parametrize("dp, mp", [(2, 1), (1, 2)])
def test_sharded_recompute_equals_keeping_everything_bit_for_bit(kept_all, variant, dp, mp):
    plain, got = kept_all[(dp, mp)], sharded(variant, dp, mp)
    for a, b in zip(plain, got):
        assert b[0] == a[0]
        for g, mine in zip(a[1], b[1]):
            np.testing.assert_array_equal(mine, g)
        assert b[3] < a[3]
        if variant == "selective":
            assert b[2] == a[2]        # the core is local to a rank's heads: no collective runs again
            # each rank drops its shard of the two (B, N, S, S) tensors of every layer
            assert a[3] - b[3] == 2 * CONFIG.num_layers * SCORE_BYTES // (dp * mp)


# ---- pipeline ---------------------------------------------------------------------------------

def pipelined(variant):
    """Per rank of a 2-stage pipeline (2 micro-batches): loss, gradients and its measured
    activation peak over a training step."""
    def body(comm):
        with bound_world(comm):
            net = pangu(variant)
            nn.set_pipeline_stages(net.backbone.layers(), None, 2)
            cell = nn.PipelineCell(net, 2)
            loss, grads = autopar.value_and_grad(cell, net.trainable_params())(IDS)
            step = nn.TrainOneStepCell(cell, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))
            step.measure_memory()
            step(IDS)
            return loss, grads, step.memory_report()["activations_peak"], step.build(IDS).saved_per_micro
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True):
        return run_in_process(2, body)


@pytest.fixture(scope="module")
def piped_plain():
    return pipelined("none")


@pytest.mark.parametrize("variant", ["selective", "full", "nested", "per_op"])
def test_a_two_stage_pipeline_with_recompute_equals_keeping_everything(piped_plain, variant):
    plain, got = piped_plain, pipelined(variant)
    for a, b in zip(plain, got):
        assert b[0] == a[0]
        for name, g in a[1].items():
            np.testing.assert_array_equal(b[1][name], g, err_msg=name)
        assert b[3] <= a[3]                 # values saved per micro-batch
    if variant == "selective":
        # layers split (2, 1): each layer's softmax and dropout outputs are no longer saved per
        # micro-batch (the backward half runs the core again); stage 0's peak falls by at least
        # one micro-batch's two layers of them
        assert [a[3] - b[3] for a, b in zip(plain, got)] == [2 * 2, 2 * 1]
        assert plain[0][2] - got[0][2] >= 2 * 2 * (B // 2) * N * S * S * 8
    if variant == "per_op":
        # each layer's GeLU output is rebuilt in the backward half (the reshape viewing it goes
        # with it): one value fewer saved per layer and micro-batch, as the serial pass keeps
        assert [a[3] - b[3] for a, b in zip(plain, got)] == [2, 1]


# ---- pricing ----------------------------------------------------------------------------------

def _priced(variant, cfg=CONFIG):
    prof = load_profile("cpu-2core")
    graph = trace(pangu(variant, cfg), (TensorSpec((B, cfg.seq_length + 1), np.dtype(np.int32)),)).graph
    mesh = Mesh((1,), ("devices",), (0,))
    model = CostModel(graph, mesh, prof)
    return model, model.evaluate(search_plan(graph, mesh, "dynamic_programming", False, profile=prof))


def test_the_cost_model_prices_the_marks_as_the_run_keeps_them(serial):
    """evaluate() follows the graph's marks: the activation bytes selective recompute saves,
    predicted, equal the measured cut of the activation peak (here exactly: 196608 bytes,
    two float64 (4, 4, 16, 16) tensors in each of 3 layers); the ops it runs again are the
    runtime's clones; their forward is charged once more."""
    plain_model, plain = _priced("none")
    model, sel = _priced("selective")
    measured = serial["none"][2].activations_peak - serial["selective"][2].activations_peak
    predicted = plain.activation_bytes - sel.activation_bytes
    assert predicted == pytest.approx(measured, rel=0.10)
    assert sorted(model.graph.nodes[k].name for k in model.rerun) == _clones(serial["selective"][3])
    assert sel.compute_s > plain.compute_s
    extra = sel.compute_s - plain.compute_s
    rerun = [model.graph.nodes[k] for k in model.rerun]
    assert extra < sum(c.compute_s for n, c, _ in plain_model.op_costs(search_plan(
        plain_model.graph, plain_model.stage, "dynamic_programming", False, profile=plain_model.profile))
        if n.name in {r.name for r in rerun})    # a forward again: less than forward + backward


def test_full_recompute_is_priced_below_selective_in_bytes_and_above_in_time():
    _, plain = _priced("none")
    _, sel = _priced("selective")
    _, full = _priced("full")
    assert full.activation_bytes < sel.activation_bytes < plain.activation_bytes
    assert plain.compute_s < sel.compute_s < full.compute_s
    # while a fully recomputed layer's backward runs, its rebuilt activations are alive again
    assert full.backward_peak_bytes > full.activation_bytes


def test_the_predicted_cut_at_a_longer_sequence_is_within_fifteen_percent_of_the_measured():
    """S = 64, 8 heads, float32, 4 layers: the measured activation peak falls by 3673088 bytes;
    the cost model's kept activations fall by 4194304 (the eight (4, 8, 64, 64) tensors, +14%:
    the measured peak moves into the backward, where one layer's core is alive again) and its
    peak over the step's phases by 4047880 (+10.2%)."""
    cfg = PanguAlphaConfig.preset("tiny", num_layers=4, seq_length=64, hidden_size=64, num_heads=8,
                                  ffn_hidden_size=256, dropout_rate=0.1, vocab_size=256)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, cfg.seq_length + 1)).astype(np.int32)
    measured, kept, peak = {}, {}, {}
    for g in ("none", "selective"):
        net = pangu(g, cfg)
        prog = GradProgram(net, (ids,), {}, net.trainable_params())
        prog.program.meter = MemoryMeter()
        prog((ids,), {}, STEP)
        measured[g] = prog.program.meter.last.activations_peak
        _, cost = _priced(g, cfg)
        kept[g], peak[g] = cost.activation_bytes, max(cost.activation_bytes, cost.backward_peak_bytes)
    cut = measured["none"] - measured["selective"]
    assert kept["none"] - kept["selective"] == 2 * cfg.num_layers * B * 8 * 64 * 64 * 4
    assert kept["none"] - kept["selective"] == pytest.approx(cut, rel=0.15)
    assert peak["none"] - peak["selective"] == pytest.approx(cut, rel=0.15)


def test_an_op_with_static_arguments_keeps_its_recompute_mark():
    """Reshape/Transpose are called with static arguments (a copy of the op per call): the
    copy carries the user's mark into the traced node."""
    from autopar.ops import Reshape
    op = Reshape().recompute()
    assert op.with_attrs(shape=(2, 2)).recompute_mode is True
    assert Reshape().recompute(False).with_attrs(shape=(4,)).recompute_mode is False

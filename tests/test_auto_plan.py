"""``auto_parallel`` runs the joint plan (stages, split, micro-batches, recompute, optimizer
parallel, ops searched per stage): the run equals the serial one whatever the search picks,
a pipeline included; what the user fixed stays fixed; the layer stack is found in any
model; the joint search's price of the plain sharded plan is the cost model's own."""
import json
import math

import numpy as np
import pytest

from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.yuan import YuanConfig, YuanWithLoss
from autopar.runtime.trace import trace
from autopar.strategy.pipeline.auto import (
    AutoFixed,
    LayerStack,
    attention_cores,
    even_split,
    find_layer_stack,
    search_auto,
)
from autopar.strategy.plan_source import PlanOptions
from autopar.strategy.profile import PROFILE_DIR, load_profile
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=5, param_dtype="float64", compute_dtype="float64")
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1      # no padding: the micro-batch mean is the batch mean


class Block(nn.Cell):
    def __init__(self, width):
        super().__init__()
        self.up = nn.Dense(width, 2 * width, param_dtype="float64")
        self.down = nn.Dense(2 * width, width, param_dtype="float64")
        self.relu, self.add = ops.ReLU(), ops.Add()

    def construct(self, x):
        return self.add(x, self.down(self.relu(self.up(x))))


class StackNet(nn.Cell):
    """A user's model, not a shipped one: a stack of residual MLP blocks and a squared loss."""

    def __init__(self, width=8, depth=4):
        super().__init__()
        self.layers = nn.CellList([Block(width) for _ in range(depth)])
        self.square, self.mean, self.sub = ops.Square(), ops.ReduceMean(), ops.Sub()

    def construct(self, x, y):
        for layer in self.layers:
            x = layer(x)
        return self.mean(self.square(self.sub(x, y)))


X = np.random.default_rng(1).standard_normal((16, 8))
Y = np.random.default_rng(2).standard_normal((16, 8))


def _profile(tmp_path, name, gemm=None, link_bytes_per_s=None, memory_mib=None):
    """The 2-core profile with other GEMM and link rates or memory (a test machine, in a file)."""
    base = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    base["name"] = name
    if memory_mib is not None:
        base["memory_bytes"] = int(memory_mib * 2**20)
    if link_bytes_per_s is not None:      # gradient all-reduces cost more than pipeline sends
        base["intra_node_bandwidth_bytes_per_s"] = base["inter_node_bandwidth_bytes_per_s"] = link_bytes_per_s
    if gemm is not None:
        base["gemm_flops"] = {"float32": gemm, "float64": gemm}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(base))
    return str(path)


def _train(make, batches, n=1, steps=2, **ctx):
    """Per rank: (losses, trained weights, the program) -- serial for n == 1."""
    def body(comm=None):
        net = make()
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)
        step = nn.TrainOneStepCell(net, opt)
        local = [np.split(b, n)[comm.rank if comm else 0] for b in batches]
        losses = [float(step(*local)) for _ in range(steps)]
        return losses, {p.name: p.asnumpy() for p in net.trainable_params()}, step.build(*local)
    if n == 1:
        return [body()]
    with parallel_context(parallel_mode="auto_parallel", device_num=n, **ctx):
        return run_in_process(n, lambda comm: _bound(comm, body))


def _bound(comm, body):
    with bound_world(comm):
        return body(comm)


def _assert_same(res, serial):
    losses, weights, _ = serial[0]
    for got_losses, got_weights, _ in res:
        np.testing.assert_allclose(got_losses, losses, rtol=1e-10)
        for name, w in weights.items():
            np.testing.assert_allclose(got_weights[name], w, rtol=1e-8, atol=1e-12, err_msg=name)


# ---- the layer stack --------------------------------------------------------------------------

def _graph(net, *specs):
    return trace(net, specs, {}).graph


def test_layer_stack_found_in_shipped_and_user_models():
    ids = TensorSpec((4, CONFIG.seq_length + 1), np.dtype(np.int32))
    assert find_layer_stack(_graph(PanguAlphaWithLoss(CONFIG), ids)) == LayerStack("blocks", 4)
    yuan = YuanConfig.preset("tiny")
    assert find_layer_stack(_graph(YuanWithLoss(yuan), TensorSpec((2, yuan.seq_length + 1), np.dtype(np.int32)))
                            ).count == yuan.num_layers
    x = TensorSpec((8, 8), np.dtype(np.float64))
    assert find_layer_stack(_graph(StackNet(), x, x)) == LayerStack("layers", 4)


def test_no_stack_when_the_indexed_cells_differ():
    net = StackNet(depth=2)
    net.layers[1].up = nn.Dense(8, 3 * 8, param_dtype="float64")   # another shape: not a stack
    net.layers[1].down = nn.Dense(3 * 8, 8, param_dtype="float64")
    x = TensorSpec((8, 8), np.dtype(np.float64))
    assert find_layer_stack(_graph(net, x, x)) is None


def test_even_split_puts_extra_layers_late():
    assert even_split(5, 2) == (2, 3) and even_split(4, 4) == (1, 1, 1, 1) and sum(even_split(7, 3)) == 7


# ---- the search -------------------------------------------------------------------------------

def test_the_sharded_plan_is_priced_as_the_cost_model_prices_it():
    """pp1 x 1 micro-batch, nothing recomputed: the joint search's step is the cost model's
    evaluate() of the op-searched plan on all devices (the same searched plan)."""
    from autopar.ir.mesh import Mesh
    from autopar.strategy.costmodel import CostModel
    from autopar.strategy.search import search_plan
    prof = load_profile("cpu-2core")
    net = PanguAlphaWithLoss(CONFIG)

    def graph_at(rows):
        return _graph(net, TensorSpec((rows, CONFIG.seq_length + 1), np.dtype(np.int32)))
    _, tried = search_auto(graph_at, 8, 4, PlanOptions(), AutoFixed(pp=1, micro_batches=1, recompute=False,
                                                                    optimizer_parallel=False))
    (plan,) = tried
    g = graph_at(8)
    mesh = Mesh((4,), ("devices",), (0, 1, 2, 3))
    cost = CostModel(g, mesh, prof).evaluate(search_plan(g, mesh, "dynamic_programming", False, profile=prof))
    assert plan.step_seconds == pytest.approx(cost.step_seconds, rel=1e-9)
    assert plan.peak_memory_bytes == cost.memory_bytes


def test_a_memory_cap_picks_the_fastest_plan_within_it():
    net = PanguAlphaWithLoss(CONFIG)

    def graph_at(rows):
        return _graph(net, TensorSpec((rows, CONFIG.seq_length + 1), np.dtype(np.int32)))
    free, tried = search_auto(graph_at, 8, 4)
    tight = sorted(p.peak_memory_bytes for p in tried)[2]          # room for the leanest few plans only
    capped, _ = search_auto(graph_at, 8, 4, memory_cap=tight)
    assert capped.peak_memory_bytes <= tight < free.peak_memory_bytes
    assert capped.step_seconds >= free.step_seconds
    assert min(p.step_seconds for p in tried if p.peak_memory_bytes <= tight) == capped.step_seconds


# ---- runs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pangu_serial():
    return _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS])


def test_unannotated_pangu_runs_the_searched_pipeline_like_serial(pangu_serial, tmp_path):
    """Links so slow that a data-parallel gradient all-reduce costs more than the pipeline's
    sends: the run pipelines (stages, micro-batches chosen by the search) and trains exactly
    like the serial model."""
    res = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4,
                 cost_profile=_profile(tmp_path, "slow-links", gemm=1e8, link_bytes_per_s=1e6))
    choice = res[0][2].choice
    assert choice.pp > 1 and sum(choice.layers_per_stage) == 4
    assert all(r[2].choice == choice for r in res)                     # one plan on every rank
    _assert_same(res, pangu_serial)


def test_unannotated_pangu_without_pressure_runs_the_sharded_plan(pangu_serial):
    res = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4)
    assert res[0][2].choice.pp == 1
    _assert_same(res, pangu_serial)


def test_a_user_model_pipelines_like_serial(tmp_path):
    serial = _train(StackNet, [X, Y])
    res = _train(StackNet, [X, Y], n=4, cost_profile=_profile(tmp_path, "slow", gemm=1e6, link_bytes_per_s=1e6))
    assert res[0][2].choice.pp > 1
    _assert_same(res, serial)


def test_what_the_user_fixed_stays_fixed(pangu_serial, tmp_path):
    res = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4, pipeline_stages=2,
                 enable_parallel_optimizer=False, cost_profile=_profile(tmp_path, "slow-gemm", gemm=1e6))
    choice = res[0][2].choice
    assert choice.pp == 2 and not choice.optimizer_parallel
    _assert_same(res, pangu_serial)


def test_nothing_left_open_builds_the_usual_program():
    """Stages, micro-batches (a PipelineCell), recompute marks and optimizer parallel all set:
    no search, the pipeline program as written."""
    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG)
            for b in net.backbone.blocks:
                b.recompute()
            piped = nn.PipelineCell(net, micro_size=2)
            step = nn.TrainOneStepCell(piped, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))
            return type(step.build(np.split(IDS, 2)[comm.rank])).__name__
    with parallel_context(parallel_mode="auto_parallel", device_num=2, pipeline_stages=1,
                          enable_parallel_optimizer=False):
        assert run_in_process(2, body) == ["PipelineGradProgram"] * 2


def test_eight_ranks_run_the_joint_plan_like_serial(tmp_path):
    """The 8-device joint plan (in process) trains like serial; a memory of 1.5 MiB, which no
    one-stage plan of this model meets on 8 devices, makes it a pipeline."""
    ids = np.concatenate([IDS, IDS[::-1]])                           # 16 rows: 2 per rank
    res = _train(lambda: PanguAlphaWithLoss(CONFIG), [ids], n=8,
                 cost_profile=_profile(tmp_path, "small", gemm=1e9, link_bytes_per_s=3e6, memory_mib=1.5))
    assert res[0][2].choice.pp > 1
    _assert_same(res, _train(lambda: PanguAlphaWithLoss(CONFIG), [ids]))


def test_the_joint_plan_is_saved_with_the_strategy_file_and_replayed(pangu_serial, tmp_path):
    """Saved by a pipelining run; loaded by a run whose profile would choose otherwise: the
    saved plan runs again (same choice, same losses), no search."""
    path = str(tmp_path / "joint.json")
    slow = _profile(tmp_path, "slow-links", gemm=1e8, link_bytes_per_s=1e6)
    saved = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4, cost_profile=slow, strategy_ckpt_save_file=path)
    doc = json.loads(open(path).read())
    assert doc["joint_plan"]["pp"] == saved[0][2].choice.pp > 1
    replayed = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4, strategy_ckpt_load_file=path)
    assert replayed[0][2].choice == saved[0][2].choice
    assert replayed[0][2].table.startswith("->  replayed from")
    _assert_same(replayed, pangu_serial)


def test_one_search_per_cell_and_signature_whatever_the_loss_scale(monkeypatch):
    """A dynamic loss scale compiles a program per scale: the joint plan is searched (and
    printed) once and reused, not searched again for each new sens."""
    from autopar.runtime import auto
    from autopar.runtime.compiled import grad_program
    calls = []
    real = auto._choose
    monkeypatch.setattr(auto, "_choose", lambda *a: calls.append(1) or real(*a))

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG)
            local = np.split(IDS, 2)[comm.rank]
            progs = [grad_program(net, (local,), {}, net.trainable_params(), sens) for sens in (1.0, 2.0**16, 2.0)]
            return [p.choice for p in progs], [float(p((local,), {}, 0)[0]) for p in progs]
    with parallel_context(parallel_mode="auto_parallel", device_num=2):
        res = run_in_process(2, body)
    assert len(calls) == 2                                   # once per rank, not once per scale
    for choices, losses in res:
        assert choices[0] == choices[1] == choices[2] and losses[0] == losses[1] == losses[2]


def test_no_plan_within_the_memory_cap_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as err:
        _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=2, cost_profile=_profile(tmp_path, "tiny", memory_mib=0.01))
    text = str(err.value)
    assert "auto_parallel: memory per device: expected a joint plan within 0.0 MiB" in text
    assert "none on 2 devices" in text and "pp1 x 2 devices per stage" in text and "cost_profile" in text


def test_optimizer_level3_keeps_the_joint_plan_to_one_stage_and_trains_like_serial(pangu_serial, tmp_path):
    """The links that make the search pipeline (above), with ZeRO-3 asked for: level3 runs
    without stages or micro-batches, so the search stays at one stage and keeps the slices."""
    res = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4, enable_parallel_optimizer=True,
                 parallel_optimizer_config={"optimizer_level": "level3", "parallel_optimizer_threshold": 0},
                 cost_profile=_profile(tmp_path, "slow-links", gemm=1e8, link_bytes_per_s=1e6))
    choice = res[0][2].choice
    assert (choice.pp, choice.micro_batches, choice.optimizer_parallel) == (1, 1, True)
    _assert_same(res, pangu_serial)


# ---- selective recompute as a choice of the joint search ------------------------------------

SEQ_CONFIG = CONFIG.replace(seq_length=256, num_layers=3)      # the (B, heads, S, S) scores dominate
SEQ_IDS = np.random.default_rng(1).integers(1, CONFIG.vocab_size, (4, 257)).astype(np.int32)


def test_attention_cores_are_the_models_own_selective_marks():
    """Found from the graph alone: the ops PanguAlphaConfig(recompute_granularity="selective")
    marks itself (scores, mask add, softmax, probabilities x values) in every stacked layer."""
    def graph(cfg):
        return trace(PanguAlphaWithLoss(cfg), (TensorSpec(SEQ_IDS.shape, SEQ_IDS.dtype),), {}).graph
    plain, marked = graph(SEQ_CONFIG), graph(SEQ_CONFIG.replace(recompute_granularity="selective"))
    stack = find_layer_stack(plain)
    cores = {plain.nodes[i].name for i in attention_cores(plain, stack)}
    assert cores == {n.name for n in marked.nodes if n.recompute and stack.layer_of(n.scope) is not None}
    assert len(cores) == 4 * stack.count


def test_the_joint_search_picks_selective_recompute_when_it_fits_and_full_would_be_slower(tmp_path):
    def graph_at(rows):
        return trace(PanguAlphaWithLoss(SEQ_CONFIG), (TensorSpec((rows, 257), SEQ_IDS.dtype),), {}).graph
    fixed = AutoFixed(pp=1, micro_batches=1, optimizer_parallel=False)
    _, tried = search_auto(graph_at, 4, 2, PlanOptions(), fixed, memory_cap=math.inf)
    off, sel, full = (next(p for p in tried if (p.recompute, p.selective) == key)
                      for key in ((False, False), (False, True), (True, False)))
    assert off.step_seconds < sel.step_seconds < full.step_seconds          # selective reruns less than full
    assert sel.peak_memory_bytes < off.peak_memory_bytes                     # and keeps no scores
    cap = (sel.peak_memory_bytes + off.peak_memory_bytes) / 2
    best, _ = search_auto(graph_at, 4, 2, PlanOptions(), fixed, memory_cap=cap)
    assert (best.recompute, best.selective) == (False, True) and "recompute selective" in best.describe()
    best, _ = search_auto(graph_at, 4, 2, PlanOptions(), fixed, memory_cap=off.peak_memory_bytes)
    assert not best.selective and not best.recompute


def test_a_run_under_the_selective_choice_marks_the_cores_and_trains_like_serial(tmp_path):
    """The cap of the test above through a profile's memory: the run recomputes the cores
    (marked in its graph) and trains exactly like the serial model."""
    def graph_at(rows):
        return trace(PanguAlphaWithLoss(SEQ_CONFIG), (TensorSpec((rows, 257), SEQ_IDS.dtype),), {}).graph
    fixed = AutoFixed(pp=1, micro_batches=1, optimizer_parallel=False)
    _, tried = search_auto(graph_at, 4, 2, PlanOptions(), fixed, memory_cap=math.inf)
    off, sel = (next(p for p in tried if (p.recompute, p.selective) == key) for key in ((False, False), (False, True)))
    profile = _profile(tmp_path, "tight", memory_mib=(sel.peak_memory_bytes + off.peak_memory_bytes) / 2 / 2**20)
    serial = _train(lambda: PanguAlphaWithLoss(SEQ_CONFIG), [SEQ_IDS])
    res = _train(lambda: PanguAlphaWithLoss(SEQ_CONFIG), [SEQ_IDS], n=2, cost_profile=profile, pipeline_stages=1,
                 grad_accumulation_step=1, enable_parallel_optimizer=False)
    prog = res[0][2]
    assert prog.choice.selective and not prog.choice.recompute
    marked = {n.name for n in prog.inner.graph.nodes if n.recompute and n.phase == "forward"}
    assert marked and all("attention/" in name for name in marked)
    _assert_same(res, serial)

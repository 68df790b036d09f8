"""Interleaved 1F1B (virtual pipeline stages): the schedule table -- every chunk's forward
before its backward, dependencies across the wrap, in-flight counts, the bubble
(p - 1) / (v m) read off the table -- and training on in-process ranks equal to serial and
to plain 1F1B (PanGu-α tiny, dropout on), clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from test_auto_plan import StackNet, X, Y, _profile

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.auto import AutoGradProgram
from autopar.strategy.pipeline.schedule import (
    interleaved_gpipe,
    interleaved_one_f_one_b,
    make_schedule,
    one_f_one_b,
)
from autopar.runtime.trace import trace
from autopar.strategy.pipeline.assignment import assign_stages

# ---- the table ---------------------------------------------------------------------------------

TABLES = [(p, v, m) for p in (2, 3, 4) for v in (2, 3) for m in (p, 2 * p, 3 * p)]


def clock_of(sched, stage, item):
    return sched.table[stage].index(item)


def where(sched, vs, kind, k):
    """(stage, clock) of the item of virtual stage ``vs``."""
    p = sched.stages
    stage, chunk = vs % p, vs // p
    return stage, clock_of(sched, stage, (kind, k, chunk))


@pytest.mark.parametrize("make", [interleaved_one_f_one_b, interleaved_gpipe], ids=["1f1b", "gpipe"])
@pytest.mark.parametrize("p, v, m", TABLES)
def test_every_chunk_once_forward_before_backward_and_dependencies_hold(make, p, v, m):
    s = make(p, m, v)
    for st in range(p):
        items = [i for i in s.table[st] if i is not None]
        assert sorted(items) == sorted((kind, k, c) for kind in "FB" for k in range(m) for c in range(v))
    for vs in range(p * v):
        for k in range(m):
            _, f = where(s, vs, "F", k)
            _, b = where(s, vs, "B", k)
            assert f < b
            if vs > 0:          # chunk c - 1's forward ran earlier (rank p - 1 -> rank 0 across the wrap)
                assert where(s, vs - 1, "F", k)[1] < f
            if vs < p * v - 1:
                assert where(s, vs + 1, "B", k)[1] < b


@pytest.mark.parametrize("p, v, m", TABLES)
def test_bubble_is_p_minus_1_over_v_m_of_the_ideal_time(p, v, m):
    """Idle over busy rank-clocks of the table, every item one clock: (p - 1) / (v m);
    plain 1F1B on the same p and m: (p - 1) / m -- v times more."""
    s, plain = interleaved_one_f_one_b(p, m, v), one_f_one_b(p, m)
    idle = sum(i is None for row in s.table for i in row)
    busy = sum(i is not None for row in s.table for i in row)
    assert busy == p * 2 * m * v
    assert idle / busy == pytest.approx((p - 1) / (v * m)) == s.bubble_of_ideal()
    assert plain.bubble_of_ideal() == pytest.approx((p - 1) / m)
    assert s.bubble() == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize("p, v, m", TABLES)
@pytest.mark.parametrize("backward_s", [1.0, 2.0, 3.0])
def test_replay_with_a_dearer_backward_keeps_the_bubble(p, v, m, backward_s):
    """The per-rank orders replayed with a forward of 1 s and a backward of 1-3 s (a chunk:
    1/v of them), transfers free: the step is m (F + B) (1 + (p - 1) / (v m)) -- the order
    loses nothing to unequal items (plain 1F1B: (p - 1) / m)."""
    s = interleaved_one_f_one_b(p, m, v)
    busy = m * (1.0 + backward_s)
    assert s.makespan(1.0, backward_s) / busy - 1 == pytest.approx((p - 1) / (v * m))
    assert one_f_one_b(p, m).makespan(1.0, backward_s) / busy - 1 == pytest.approx((p - 1) / m)


@pytest.mark.parametrize("p, v, m", TABLES)
def test_in_flight_chunks_per_rank(p, v, m):
    """Rank r holds Megatron's warm-up count + 1 micro-batch chunks at its peak (all m v
    when m == p, where every rank warms up fully); GPipe holds all m v."""
    s = interleaved_one_f_one_b(p, m, v)
    for r in range(p):
        expect = m * v if m == p else (p - r - 1) * 2 + (v - 1) * p + 1
        assert s.in_flight(r) == expect
        assert interleaved_gpipe(p, m, v).in_flight(r) == m * v


def test_warm_up_follows_megatrons_order():
    """Rank 0 of p = 2, v = 2, m = 4: warm-up (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards --
    micro-batches 0, 1 through chunk 0, then 0, 1 through chunk 1, then micro-batch 2 in the
    steady state; backwards start with chunk 1 (the last virtual stage)."""
    s = interleaved_one_f_one_b(2, 4, 2)
    row = [i for i in s.table[0] if i is not None]
    assert row[:6] == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1), ("F", 2, 0), ("B", 0, 1)]
    assert [ph.name for ph in s.phases(0)] == ["warm-up", "steady", "cool-down"]


def test_table_prints_micro_batch_and_chunk():
    text = str(interleaved_one_f_one_b(2, 2, 2))
    assert text.splitlines()[1].split() == ["s0", "F0.0", "F1.0", "F0.1", "F1.1", ".", ".", "B0.1", "B1.1", "B0.0",
                                            "B1.0"]
    assert text.splitlines()[2].split()[1:3] == [".", "F0.0"]


def test_make_schedule_by_name_and_micro_batches_a_multiple_of_the_stages():
    assert make_schedule("1f1b", 2, 4, 2).table == interleaved_one_f_one_b(2, 4, 2).table
    assert make_schedule("1f1b", 2, 4, 1).table == one_f_one_b(2, 4).table
    assert make_schedule("1f1b", 1, 3, 2).table == one_f_one_b(1, 3).table      # one stage: nothing to interleave
    with pytest.raises(ValueError, match=r"micro: expected a multiple of the 2 stages under virtual stages .*"
                                         r"got 3; use micro_size = 4"):
        make_schedule("1f1b", 2, 3, 2)
    with pytest.raises(ValueError, match=r"virtual: expected an int >= 1, got 0"):
        interleaved_one_f_one_b(2, 2, 0)


# ---- training equals serial ----------------------------------------------------------------------

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, dropout_rate=0.1)   # 3 blocks + the query layer
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the whole-batch loss


def layers_of(net):
    return list(net.backbone.blocks) + [net.backbone.query_layer]


def serial_grads(cfg):
    net = PanguAlphaWithLoss(cfg).set_train(True)
    return autopar.value_and_grad(net)(IDS)


def run_pipeline(cfg, stages, virtual, micro, dp=1, steps=0, mp=1):
    """Per rank: loss, full gradients, the program's chunks and live counts, and the losses
    of ``steps`` AdamWeightDecay steps (all after the gradients, from the same weights)."""
    n = stages * dp * mp

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg.replace(data_parallel=dp, model_parallel=mp)).set_train(True)
            nn.set_pipeline_stages(layers_of(net), stages=stages * virtual)
            cell = nn.PipelineCell(net, micro, virtual_stages=virtual)
            loss, grads = autopar.value_and_grad(cell, net.trainable_params())(IDS)
            prog = next(iter(cell._compiled.values()))
            out = [loss, grads, prog.chunks, list(prog.last_step.live), prog.stage]
            if steps:
                opt = autopar.train.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
                train = nn.TrainOneStepCell(cell, opt, clip_norm=1.0)
                out.append([float(train(IDS)) for _ in range(steps)])
            return out
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, pipeline_stages=stages, full_batch=True):
        return run_in_process(n, body)


def assert_grads_equal(results, loss, grads):
    for got_loss, got_grads, *_ in results:
        np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_two_stages_two_chunks_equal_serial_and_plain_1f1b():
    """pp2, v = 2, 4 micro-batches: 4 chunks of one layer, chunk c on rank c % 2; the
    activations cross 0 -> 1 -> 0 -> 1 (rank 1 back to rank 0 across the wrap)."""
    loss, grads = serial_grads(CONFIG)
    res = run_pipeline(CONFIG, 2, 2, 4, steps=3)
    assert [r[2] for r in res] == [(0, 2), (1, 3)]
    assert_grads_equal(res, loss, grads)
    table = interleaved_one_f_one_b(2, 4, 2)
    for r in res:                        # the runner holds the chunks the table says, clock by clock
        live = np.cumsum([0 if i is None else (1 if i[0] == "F" else -1) for i in table.table[r[4]]]).tolist()
        assert r[3] == live and max(live) == table.in_flight(r[4])
    # three AdamWeightDecay steps: the losses of serial training, as plain 1F1B gives them
    def plain(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG).set_train(True)
            nn.set_pipeline_stages(layers_of(net), stages=2)
            train = nn.TrainOneStepCell(nn.PipelineCell(net, 4), autopar.train.AdamWeightDecay(
                net.trainable_params(), learning_rate=1e-3, weight_decay=0.01), clip_norm=1.0)
            return [float(train(IDS)) for _ in range(3)]
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True):
        reference = run_in_process(2, plain)
    for r, ref in zip(res, reference):
        np.testing.assert_allclose(r[5], ref, rtol=1e-5)


def test_four_stages_two_chunks_equal_serial():
    """pp4, v = 2, 4 micro-batches (m == p: every rank warms up fully): 8 chunks of one
    layer (7 blocks + the query layer); the attention mask made on chunk 0 reaches chunk 4
    on the same rank by hand-over, the others by message."""
    cfg = CONFIG.replace(num_layers=8)
    loss, grads = serial_grads(cfg)
    res = run_pipeline(cfg, 4, 2, 4)
    assert [r[2] for r in res] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert_grads_equal(res, loss, grads)
    assert [max(r[3]) for r in res] == [8, 8, 8, 8]


def test_two_stages_two_chunks_with_data_parallel_equal_serial():
    """pp2 x dp2, v = 2: each stage's two ranks run both chunks; gradients reduced once."""
    loss, grads = serial_grads(CONFIG)
    assert_grads_equal(run_pipeline(CONFIG, 2, 2, 2, dp=2), loss, grads)


@pytest.mark.parametrize("stages, dp, mp, layers, micro", [(4, 2, 1, 8, 4), (2, 2, 2, 4, 4), (2, 4, 1, 4, 2)],
                         ids=["pp4xdp2", "pp2xdp2xmp2", "pp2xdp4"])
def test_eight_rank_interleaved_layouts_train_like_serial(stages, dp, mp, layers, micro):
    """Every 8-rank layout of two chunks per stage: the gradients of serial and three
    AdamWeightDecay steps with serial training's losses."""
    cfg = CONFIG.replace(num_layers=layers)
    loss, grads = serial_grads(cfg)
    res = run_pipeline(cfg, stages, 2, micro, dp=dp, mp=mp, steps=3)
    assert_grads_equal(res, loss, grads)
    net = PanguAlphaWithLoss(cfg).set_train(True)
    train = nn.TrainOneStepCell(net, autopar.train.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3,
                                                                   weight_decay=0.01), clip_norm=1.0)
    autopar.value_and_grad(net)(IDS)           # the same draws before training as the pipeline's gradient call
    want = [float(train(IDS)) for _ in range(3)]
    for r in res:
        np.testing.assert_allclose(r[5], want, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------------

def test_micro_size_must_be_a_multiple_of_the_stages():
    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG).set_train(True)
            nn.set_pipeline_stages(layers_of(net), stages=4)
            autopar.value_and_grad(nn.PipelineCell(net, 1, virtual_stages=2), net.trainable_params())(IDS)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True), \
            pytest.raises(ValueError, match=r"PipelineCell: micro_size: expected a multiple of pipeline_stages=2 "
                                            r"with virtual_stages=2 .*got 1; use micro_size=2"):
        run_in_process(2, body)
    with pytest.raises(ValueError, match=r"PipelineCell: virtual_stages: expected an int >= 1 .*got 0"):
        nn.PipelineCell(PanguAlphaWithLoss(CONFIG), 2, virtual_stages=0)


def test_annotations_must_cover_every_virtual_stage():
    """Layers annotated for 2 stages, run with 2 chunks each: virtual stages 2 and 3 are empty."""
    net = PanguAlphaWithLoss(CONFIG)
    nn.set_pipeline_stages(layers_of(net), stages=2)
    graph = trace(net, (IDS,)).graph
    with pytest.raises(ValueError, match=r"stage 2: expected at least one layer on every one of the pipeline_stages "
                                         r"x virtual_stages = 2 x 2 = 4 stages.*stages=4 for the virtual stages"):
        assign_stages(graph, 4, virtual=2)
    net.backbone.query_layer.pipeline_stage = 4
    with pytest.raises(ValueError, match=r"pipeline_stage: expected a stage below pipeline_stages x virtual_stages "
                                         r"= 2 x 2 = 4, got 4"):
        assign_stages(trace(net, (IDS,)).graph, 4, virtual=2)


def test_one_stage_ignores_virtual_stages():
    """Serial run of an interleaved script: gradient accumulation, equal to the whole batch."""
    loss, grads = serial_grads(CONFIG)
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    nn.set_pipeline_stages(layers_of(net), stages=4)
    cell = nn.PipelineCell(net, 2, virtual_stages=2)
    got_loss, got_grads = autopar.value_and_grad(cell, net.trainable_params())(IDS)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(got_grads[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


# ---- pricing: the stage search and the joint search ----------------------------------------------

@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("p, v, m", TABLES + [(2, 1, 4), (4, 1, 8)])
def test_priced_in_flight_counts_are_the_tables(schedule, p, v, m):
    from autopar.strategy.pipeline.stage_search import in_flight
    table = make_schedule(schedule, p, m, v)
    assert [in_flight(p, s, m, schedule, v) for s in range(p)] == [table.in_flight(s) for s in range(p)]


def test_chunk_boundaries_include_the_wrap_and_double_the_sends():
    from autopar.strategy.pipeline.stage_search import Part, chunk_boundaries, transfer_seconds
    from autopar.strategy.profile import load_profile
    assert chunk_boundaries(4, 0, 2) == [(0, 1), (3, 0), (0, 1)]        # chunk 3 (rank 3) -> chunk 4 (rank 0)
    assert chunk_boundaries(4, 1, 2) == [(0, 1), (1, 2), (0, 1), (1, 2)]
    prof, layer = load_profile("cpu-2core"), Part(boundary_sends=(4096,), boundary_grads=(4096,))
    assert transfer_seconds(prof, 4, 1, 1, layer, 2) == pytest.approx(2 * transfer_seconds(prof, 4, 1, 1, layer))
    assert transfer_seconds(prof, 4, 0, 1, layer, 2) == pytest.approx(3 * transfer_seconds(prof, 4, 0, 1, layer))


def test_stage_memory_holds_the_interleaved_chunks():
    """Stage 0 of p = 4, m = 8, two layers of 100 activation bytes: 1F1B holds 4 micro-batches
    (800 bytes); interleaved with v = 2, 2 * 3 + 4 + 1 = 11 chunks of one layer (1100)."""
    from autopar.strategy.pipeline.stage_search import Part, stage_memory
    layer, none = Part(activation_bytes=100, model_bytes=10), Part()
    assert stage_memory(none, layer, none, 4, 0, 2, 8, False) == 20 + 4 * 200
    assert stage_memory(none, layer, none, 4, 0, 2, 8, False, 2) == 20 + 11 * 100
    assert stage_memory(none, layer, none, 4, 3, 2, 8, False, 2) == 20 + 5 * 100      # last stage: 0 + 4 + 1


@pytest.fixture(scope="module")
def coster():
    from autopar.strategy.pipeline.registry import model_family
    from autopar.strategy.pipeline.stage_search import StageCoster
    from autopar.strategy.profile import load_profile
    fam = model_family("pangu_alpha", "tiny", hidden_size=64, ffn_hidden_size=256, num_layers=9, seq_length=32,
                       vocab_size=256)
    return StageCoster(fam, 8, load_profile("cpu-2core"))


def test_stage_search_prices_the_bubble_as_the_other_stages_over_v(coster):
    """The bubble is the other stages' micro-batch times (compute, the stage's collectives
    and its chunk boundaries' sends) over v -- (p - 1) / v times a stage's when all are
    equal -- recomputed here from the parts."""
    from autopar.strategy.pipeline.stage_search import StageSetting, evaluate, stage_time, transfer_seconds
    for pp, v, m in [(2, 2, 4), (4, 2, 8), (2, 4, 2)]:
        plan = evaluate(coster, 32, StageSetting(pp, 8 // pp, 1, m, virtual_stages=v))
        n = 8 // pp
        first = coster.parts(n, 8 // pp, 1, 32 // m, False)[0]
        last = coster.parts(n, 8 // pp, 1, 32 // m, False, (pp - 1) * n)[2]
        stages = [sum(stage_time(first, layer, last, pp, s, k, False)) +
                  transfer_seconds(coster.profile, pp, s, n, layer, v)
                  for s, k in enumerate(plan.layers_per_stage)
                  for layer in [coster.parts(n, 8 // pp, 1, 32 // m, False, s * n)[1]]]
        assert plan.virtual_stages == v and "in %d chunks a stage" % v in plan.describe()
        assert plan.bubble_s == pytest.approx((sum(stages) - max(stages)) / v, rel=1e-12)
        assert plan.bubble_s < (pp - 1) / v * max(stages)          # the first and last stages differ
        plain = evaluate(coster, 32, StageSetting(pp, 8 // pp, 1, m))
        assert plan.bubble_s < plain.bubble_s
    assert evaluate(coster, 32, StageSetting(4, 2, 1, 2, virtual_stages=2)) is None        # m % p != 0
    assert evaluate(coster, 32, StageSetting(4, 2, 1, 8, virtual_stages=4)) is None        # 16 chunks, 8 layers
    assert coster.family.layers == 8


def test_stage_search_picks_interleaving_when_it_pays(coster):
    from autopar.strategy.pipeline.stage_search import search_stages
    plain, _ = search_stages(coster, 8)
    best, tried = search_stages(coster, 8, virtual_stages=(1, 2))
    assert {p.virtual_stages for p in tried} == {1, 2}
    assert best.step_seconds <= plain.step_seconds
    assert best == min((p for p in tried if p.peak_memory_bytes <= coster.profile.memory_bytes),
                       key=lambda p: p.step_seconds)


def test_joint_search_prices_interleaving_and_picks_it_when_the_bubble_dominates(tmp_path):
    """pp2 on 2 devices, 2 micro-batches of a 4-block stack: v = 2 runs 4 chunks of one block
    (stage 0 blocks 0 and 2). The step is m slowest micro-batches + the bubble (the replay of
    the interleaved table) + the once-per-step gradient work, equal for both; with compute
    dominating, the smaller bubble of v = 2 wins and the search takes it."""
    from autopar.ir.spec import TensorSpec
    from autopar.strategy.pipeline.auto import AutoFixed, search_auto
    from autopar.strategy.plan_source import PlanOptions
    net = StackNet()

    def graph_at(rows):
        spec = TensorSpec((rows, 8), np.dtype(np.float64))
        return trace(net, (spec, spec), {}).graph
    fixed = AutoFixed(pp=2, micro_batches=2, recompute=False, optimizer_parallel=False, virtual_stages=None)
    options = PlanOptions(cost_profile=_profile(tmp_path, "slow-gemm", gemm=1e6))
    best, tried = search_auto(graph_at, 16, 2, options, fixed, full_batch=True)
    by_v = {p.virtual_stages: p for p in tried}
    assert set(by_v) == {1, 2}
    assert by_v[2].layers_per_stage == (1, 1, 1, 1) and by_v[1].layers_per_stage == (2, 2)
    once = []
    for v, plan in by_v.items():
        assert plan.step_seconds == pytest.approx(plan.compute_s + plan.comm_s + plan.bubble_s + plan.update_s)
        once.append(plan.compute_s + plan.comm_s - 2 * plan.bubble_s * v / (2 - 1))
    assert once[0] == pytest.approx(once[1], rel=1e-6, abs=1e-12)
    assert by_v[2].bubble_s < by_v[1].bubble_s
    assert best is by_v[2] and "interleaved x2" in best.describe()


def test_auto_parallel_runs_a_pipeline_cells_virtual_stages_like_serial():
    """auto_parallel with PipelineCell(..., virtual_stages=2) on 2 ranks: the joint plan keeps
    the cell's chunks (4 virtual stages of one block, set by the search's split) and the run
    gives the serial loss and gradients."""
    net = StackNet()
    loss, grads = autopar.value_and_grad(net)(X, Y)

    def body(comm):
        with bound_world(comm):
            net = StackNet()
            cell = nn.PipelineCell(net, 2, virtual_stages=2)
            got = autopar.value_and_grad(cell, net.trainable_params())(X, Y)
            prog = next(p for p in cell._compiled.values() if isinstance(p, AutoGradProgram))
            return got, prog.choice, prog.inner.chunks
    with parallel_context(parallel_mode="auto_parallel", device_num=2, pipeline_stages=2, full_batch=True):
        res = run_in_process(2, body)
    for (got_loss, got_grads), choice, chunks in res:
        assert (choice.pp, choice.virtual_stages, choice.layers_per_stage) == (2, 2, (1, 1, 1, 1))
        np.testing.assert_allclose(got_loss, loss, rtol=1e-10)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-10, atol=1e-14, err_msg=name)
    assert [r[2] for r in res] == [(0, 2), (1, 3)]


def test_an_interleaved_run_saves_its_strategy_file_and_checkpoint_and_both_load(tmp_path):
    """pp2 x v2 saves one strategy file with its 4 virtual stages' plans and a checkpoint
    with every tensor once (the tied table from rank 0, whose chunk 0 holds the first copy);
    a second interleaved run loading the file trains to the same losses, and the
    checkpoint resumes serially with the uninterrupted serial run's next loss."""
    import json

    from autopar.train import checkpoint as ckpt
    plan_file, ck = str(tmp_path / "plan.json"), str(tmp_path / "ck")

    def make_trainer(net, cell):
        opt = autopar.train.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
        return nn.TrainOneStepCell(cell, opt, clip_norm=1.0)

    def run(save: bool, **files):
        def body(comm):
            with bound_world(comm):
                net = PanguAlphaWithLoss(CONFIG).set_train(True)
                nn.set_pipeline_stages(layers_of(net), stages=4)
                train = make_trainer(net, nn.PipelineCell(net, 2, virtual_stages=2))
                losses = [float(train(IDS)) for _ in range(2)]
                if save:
                    ckpt.save_checkpoint(train, ck)
                return losses
        with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True,
                              **files):
            return run_in_process(2, body)
    saved = run(True, strategy_ckpt_save_file=plan_file)
    doc = json.loads(open(plan_file).read())
    assert (doc["pipeline_stages"], len(doc["stages"])) == (4, 4)
    loaded = run(False, strategy_ckpt_load_file=plan_file)
    assert loaded == saved
    serial_net = PanguAlphaWithLoss(CONFIG).set_train(True)
    serial = make_trainer(serial_net, serial_net)
    serial_losses = [float(serial(IDS)) for _ in range(3)]
    np.testing.assert_allclose(saved[0], serial_losses[:2], rtol=1e-5)
    _, manifest = ckpt.read_manifest(ck)
    table = manifest["tensors"]["word_embedding.embedding_table"]["pieces"]
    assert {p["file"] for p in table} == {"rank0.safetensors"}
    resumed_net = PanguAlphaWithLoss(CONFIG).set_train(True)
    resumed = make_trainer(resumed_net, resumed_net)
    ckpt.load_distributed_checkpoint(resumed, ck)
    np.testing.assert_allclose(float(resumed(IDS)), serial_losses[2], rtol=1e-5)


def test_a_weight_two_chunks_of_one_rank_share_gets_both_gradients():
    """Blocks 0 and 2 share their first Dense: under pp2 x v2 both are chunks of rank 0 (0
    and 2), which holds one copy and adds both chunks' gradients; under data parallel 2
    (the stage's gradients reduced over its replicas) the sum equals serial's."""
    def tied():
        net = StackNet()
        net.layers[2].up = net.layers[0].up
        for k, layer in enumerate(net.layers):
            layer.pipeline_stage = k
        return net
    net = tied()
    assert len(net.trainable_params()) == 14                   # 4 blocks x 4 weights, one Dense shared
    loss, grads = autopar.value_and_grad(net)(X, Y)

    def body(comm):
        with bound_world(comm):
            net = tied()
            cell = nn.PipelineCell(net, 2, virtual_stages=2)
            rows = np.split(X, 2)[comm.rank % 2], np.split(Y, 2)[comm.rank % 2]
            got = autopar.value_and_grad(cell, net.trainable_params())(*rows)
            return got, next(iter(cell._compiled.values())).chunks
    with parallel_context(parallel_mode="data_parallel", device_num=4, pipeline_stages=2):
        res = run_in_process(4, body)
    assert [r[1] for r in res] == [(0, 2), (0, 2), (1, 3), (1, 3)]
    for (got_loss, got_grads), _ in res:
        np.testing.assert_allclose(got_loss, loss, rtol=1e-10)
        for name, g in grads.items():
            np.testing.assert_allclose(got_grads[name], g, rtol=1e-10, atol=1e-14, err_msg=name)

"""Interleaved 1F1B (virtual pipeline stages): the schedule table -- every chunk's forward
before its backward, dependencies across the wrap, in-flight counts, the bubble
(p - 1) / (v m) read off the table -- and training on in-process ranks equal to serial and
to plain 1F1B (PanGu-α tiny, dropout on), clear errors."""
from __future__ import annotations

import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.pipeline.schedule import (
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


def run_pipeline(cfg, stages, virtual, micro, dp=1, steps=0):
    """Per rank: loss, full gradients, the program's chunks and live counts, and the losses
    of ``steps`` AdamWeightDecay steps (all after the gradients, from the same weights)."""
    n = stages * dp

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg.replace(data_parallel=dp)).set_train(True)
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

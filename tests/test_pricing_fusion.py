"""Gradient buckets (comm_fusion) priced as the runtime runs them.

* one collective (one latency) and one copy per bucket, the buckets the runtime makes;
* the same bytes on the wire as each weight's own all-reduce;
* buckets run one after another beside backward, each from when its last gradient is
  made; the profile's ``comm_overlap`` says how much of that hides (0 on the 2-core VM).
"""
import dataclasses
import json

import numpy as np
import pytest
from test_comm_fusion import AUTO, CONFIG, IDS
from test_pricing_memory import TwoMatMuls

from autopar.comm import run_in_process
from autopar.comm.fusion import parse_comm_fusion
from autopar.context import ParallelContext
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaWithLoss
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.pipeline.auto import _stage_cost
from autopar.strategy.plan_source import save_plan
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings

SIZE = {"allreduce": {"mode": "size", "config": 0.01}}
INDEX = {"allreduce": {"mode": "index", "config": [5, 20]}}


def profile(**figures):
    """cpu-2core with ``figures`` replaced (their sources: assumed, for the test)."""
    base = load_profile("cpu-2core")
    sources = dict(base.sources) | {k: "assumed, for this test" for k in figures}
    return dataclasses.replace(base, sources=sources, **figures)


@pytest.fixture(scope="module")
def pangu_dp2():
    """(graph, stage, plan) of PanGu-alpha tiny (float64) on dp2, as tests/test_comm_fusion.py runs it."""
    cfg = CONFIG.replace(data_parallel=2, model_parallel=1)
    net = PanguAlphaWithLoss(cfg)
    g = trace(net, (TensorSpec((4, cfg.seq_length + 1), np.dtype(np.int32)),), {}).graph
    stage = Mesh((2,), ("devices",))
    return g, stage, plan_shardings(g, "semi_auto_parallel", stage, True), [p.name for p in net.trainable_params()]


def priced(pangu, fusion, prof=None):
    g, stage, plan, order = pangu
    model = CostModel(g, stage, prof or load_profile("cpu-2core"), True, comm_fusion=parse_comm_fusion(fusion),
                      param_order=order)
    return model, model.evaluate(plan), model.gradient_buckets(plan)


def runtime_buckets(fusion):
    """(all-reduces of one fused gradient step on rank 0, its buckets as the parameter
    indices they reduce) of PanGu-alpha tiny on dp2."""
    cfg = CONFIG.replace(data_parallel=2, model_parallel=1)
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True, comm_fusion=fusion)

    def body(comm):
        net = PanguAlphaWithLoss(cfg)
        prog = ShardedGradProgram(net, (IDS,), net.trainable_params(), "semi_auto_parallel", comm,
                                  full_batch=True, ctx=ctx)
        comm.stats.reset()
        prog((IDS,))
        used = [i for i, v in enumerate(prog.targets.wrt) if v is not None]   # gradient output j: used[j - 1]
        return comm.stats.snapshot()["count"]["allreduce"], [sorted(used[j - 1] for j in b) for b in prog.fusion.buckets]
    return run_in_process(2, body)[0]


@pytest.mark.parametrize("fusion", [AUTO, SIZE, INDEX], ids=["auto", "size", "index"])
def test_priced_buckets_are_the_buckets_the_runtime_makes(pangu_dp2, fusion):
    _, _, (buckets, alone, _) = priced(pangu_dp2, fusion)
    count, runtime = runtime_buckets(fusion)
    assert [sorted(r.param for r in b.members) for b in buckets] == runtime      # in start order too
    assert all(r.seconds == 0.0 for r in alone)            # left alone: only weights needing no reduction
    # every all-reduce the fused step makes but the loss's is one priced bucket
    assert count - 1 == len(buckets)
    if fusion is AUTO:
        assert len(buckets) == 2                            # the 50 gradients, the tied table's two parts


@pytest.mark.parametrize("fusion", [AUTO, SIZE, INDEX], ids=["auto", "size", "index"])
def test_grad_comm_pays_one_latency_per_bucket_and_the_same_bytes(pangu_dp2, fusion):
    fast_copy = dict(elementwise_bytes_per_s=1e30)
    quiet, slow = profile(intra_node_latency_s=0.0, **fast_copy), profile(intra_node_latency_s=1e-3, **fast_copy)
    _, zero_lat, (buckets, _, _) = priced(pangu_dp2, fusion, quiet)
    _, one_ms, _ = priced(pangu_dp2, fusion, slow)
    assert one_ms.grad_comm_s - zero_lat.grad_comm_s == pytest.approx(len(buckets) * 1e-3, rel=1e-9)
    _, plain_zero, _ = priced(pangu_dp2, {}, quiet)
    _, plain_slow, _ = priced(pangu_dp2, {}, slow)
    assert plain_slow.grad_comm_s - plain_zero.grad_comm_s == pytest.approx(52 * 1e-3, rel=1e-9)   # one per reduction
    assert zero_lat.grad_comm_s == pytest.approx(plain_zero.grad_comm_s, rel=1e-12)     # bytes: unchanged


def test_each_bucket_pays_one_copy_of_its_bytes_at_memory_bandwidth(pangu_dp2):
    copy_free = profile(elementwise_bytes_per_s=1e30)
    _, free, (buckets, _, _) = priced(pangu_dp2, AUTO, copy_free)
    bw = 1e9
    _, paid, _ = priced(pangu_dp2, AUTO, profile(elementwise_bytes_per_s=bw))
    nbytes = sum(b.nbytes for b in buckets)
    # dp2 keeps whole weights: each reduction is its fp64 weight's whole gradient (the tied table's two parts: twice)
    g, _, _, order = pangu_dp2
    whole = {name: g.spec(v).nbytes for name, v in zip(g.param_names(), g.params)}
    reduced = [order[r.param] for b in buckets for r in b.members]
    assert len(reduced) == 52 and reduced.count("word_embedding.embedding_table") == 2
    assert nbytes == sum(whole[name] for name in reduced)
    assert paid.grad_comm_s - free.grad_comm_s == pytest.approx(nbytes / bw, rel=1e-6)


def test_without_comm_fusion_nothing_changes_and_nothing_overlaps(pangu_dp2):
    g, stage, plan, _ = pangu_dp2
    plain = CostModel(g, stage, load_profile("cpu-2core"), True).evaluate(plan)
    assert plain.grad_exposed_s == plain.grad_comm_s > 0
    # overlap 0 (the 2-core VM's figure, the default): the buckets are all exposed
    _, fused, _ = priced(pangu_dp2, AUTO)
    assert fused.grad_exposed_s == fused.grad_comm_s < plain.grad_comm_s
    other = plain.comm_s - plain.grad_comm_s                # redistributions, norm all-reduce: unchanged
    assert fused.comm_s == pytest.approx(other + fused.grad_comm_s, rel=1e-12)
    assert fused.step_seconds == pytest.approx(fused.compute_s + other + fused.grad_comm_s + fused.update_s, rel=1e-12)
    assert fused.compute_s == plain.compute_s and fused.update_s == plain.update_s


@pytest.mark.parametrize("overlap", [1.0, 0.5])
def test_a_bucket_ready_early_hides_behind_the_rest_of_backward(overlap):
    h = 256
    g = trace(TwoMatMuls(h), (TensorSpec((512, h), np.dtype(np.float32)),), {}).graph
    stage = Mesh((2,), ("devices",))
    plan = plan_shardings(g, "data_parallel", stage, False)
    prof = profile(comm_overlap=overlap, intra_node_bandwidth_bytes_per_s=1e9)
    fusion = parse_comm_fusion({"allreduce": {"mode": "index", "config": [1]}})   # {w1}, {w2}
    model = CostModel(g, stage, prof, comm_fusion=fusion)
    plain = CostModel(g, stage, prof).evaluate(plan)
    cost = model.evaluate(plan)
    (early, last), alone, backward = model.gradient_buckets(plan)
    assert not alone and [r.param for r in early.members] == [1] and [r.param for r in last.members] == [0]
    mm1, mm2, mean = (c.backward_s for _, c, _ in model.op_costs(plan))
    assert backward == pytest.approx(mean + mm2 + mm1, rel=1e-12)
    assert early.ready_s == pytest.approx(mean + mm2, rel=1e-12) and last.ready_s == pytest.approx(backward, rel=1e-12)
    one = model.collective_seconds("all_reduce", h * h * 4, stage, (0,)) + h * h * 4 / prof.elementwise_bytes_per_s
    assert early.seconds == pytest.approx(one, rel=1e-12) and last.seconds == pytest.approx(one, rel=1e-12)
    # by hand: w2's bucket ends at mean + mm2 + one, before backward ends (mm1 is longer than one),
    # so w1's starts when backward ends: the stream ends at backward + one
    assert mean + mm2 + one < backward
    total, behind = 2 * one, one
    assert cost.grad_comm_s == pytest.approx(total, rel=1e-12)
    assert cost.grad_exposed_s == pytest.approx(total - overlap * (total - behind), rel=1e-12)
    assert cost.step_seconds == pytest.approx(plain.step_seconds - plain.grad_comm_s + cost.grad_exposed_s, rel=1e-9)
    # memory: one bucket's buffer more at the end of backward, when every gradient is made
    assert cost.backward_peak_bytes == max(plain.backward_peak_bytes, 2 * h * h * 4 + h * h * 4)


def test_comm_overlap_defaults_to_none_with_its_source_and_refuses_a_non_fraction():
    prof = load_profile("cpu-2core")
    assert prof.comm_overlap == 0.0 and "2-core CPU" in prof.sources["comm_overlap"]
    with pytest.raises(ValueError, match=r"MachineProfile\.comm_overlap: expected a fraction in \[0, 1\], got 1\.5"):
        profile(comm_overlap=1.5)


def test_a_param_order_missing_a_parameter_is_refused_naming_it():
    g = trace(TwoMatMuls(8), (TensorSpec((4, 8), np.dtype(np.float32)),), {}).graph
    with pytest.raises(ValueError, match=r"CostModel: param_order: expected the names of every trained parameter "
                                         r"the graph uses \(2\), got 1 names, without \['w2'\]; pass"):
        CostModel(g, Mesh((2,), ("devices",)), load_profile("cpu-2core"), param_order=["w1"])


def test_the_context_comm_fusion_reaches_the_saved_plans_prediction(pangu_dp2, tmp_path):
    g, stage, plan, _ = pangu_dp2
    options = ParallelContext(comm_fusion=AUTO, cost_profile="cpu-2core").plan_options
    assert options.comm_fusion == parse_comm_fusion(AUTO)
    save_plan(str(tmp_path / "fused.json"), g, plan, True, options)
    save_plan(str(tmp_path / "plain.json"), g, plan, True, ParallelContext(cost_profile="cpu-2core").plan_options)
    got = [json.loads((tmp_path / f"{k}.json").read_text())["predicted"]["breakdown"] for k in ("fused", "plain")]
    want = [priced(pangu_dp2, f)[1] for f in (AUTO, {})]       # graph order = trained order for the 2 buckets of auto
    assert [b["grad_comm_s"] for b in got] == pytest.approx([c.grad_comm_s for c in want], rel=1e-12)
    assert got[0]["grad_comm_s"] < got[1]["grad_comm_s"]


def test_a_pipeline_stage_buckets_its_deferred_reductions_in_parameter_order(pangu_dp2):
    """A pipeline stage reduces its weights' gradients once per step after its micro-batches
    (runtime/pipeline/grads.py): buckets in parameter order; the tied table's two parts stay
    in the program (each alone)."""
    model, _, _ = priced(pangu_dp2, AUTO)
    buckets, alone, _ = model.gradient_buckets(pangu_dp2[2], deferred=True)
    assert [len(b.members) for b in buckets] == [50]
    assert [r.param for r in buckets[0].members] == sorted(r.param for r in buckets[0].members)
    assert sorted(pangu_dp2[3][r.param] for r in alone if r.seconds > 0) == ["word_embedding.embedding_table"] * 2
    # split indices past a stage's own parameters are the runtime's to check, not the stage pricing's
    model = CostModel(*pangu_dp2[:2], load_profile("cpu-2core"), True,
                      comm_fusion=parse_comm_fusion({"allreduce": {"mode": "index", "config": [60]}}))
    assert len(model.gradient_buckets(pangu_dp2[2], deferred=True)[0]) == 1


def test_the_joint_search_prices_a_stages_buckets_one_latency_each(pangu_dp2):
    """price() charges a stage's per-step gradient reductions as its deferred buckets."""
    g, stage, plan, _ = pangu_dp2
    quiet = dict(elementwise_bytes_per_s=1e30, collective_wait_s=0.0)
    costs = {}
    for latency in (0.0, 1e-3):
        prof = profile(intra_node_latency_s=latency, **quiet)
        costs[latency] = [_stage_cost(CostModel(g, stage, prof, True, comm_fusion=parse_comm_fusion(f)), plan, None)
                          for f in ({}, AUTO)]
    (plain0, fused0), (plain1, fused1) = costs[0.0], costs[1e-3]
    assert fused0.grad_s == pytest.approx(plain0.grad_s, rel=1e-12)                 # the same bytes
    # 52 reductions one call each; fused: one bucket of 50 and the tied table's 2 parts alone
    assert plain1.grad_s - plain0.grad_s == pytest.approx(52e-3, rel=1e-9)
    assert fused1.grad_s - fused0.grad_s == pytest.approx(3e-3, rel=1e-9)
    assert fused1.compute_s == plain1.compute_s and fused1.comm_s == plain1.comm_s

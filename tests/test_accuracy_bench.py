"""The accuracy benchmark's plans span what issue 13 asks, and a hand plan is predicted as the
joint search prices it (benchmarks/accuracy_plans.py). No timing: these run in one process."""
import sys
from pathlib import Path

import numpy as np
import pytest

from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.pipeline.auto import AutoFixed, search_auto
from autopar.strategy.plan_source import PlanOptions
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy_plans as ap  # noqa: E402

TINY = ap.SIZES["tiny"]


@pytest.mark.parametrize("ranks", [4, 8])
def test_each_group_has_15_distinct_plans_spanning_every_dimension(ranks):
    plans = ap.plans(ranks)
    settings = {(p.dp, p.mp, p.pp, p.micro, p.schedule, p.recompute, p.zero, p.auto, p.virtual) for p in plans}
    assert len(plans) >= 15 and len(settings) == len(plans) and len({p.name for p in plans}) == len(plans)
    for p in plans:
        ap.check_plan(p, ranks)                  # degrees multiply to the ranks; micro-batches split over dp
    hand = [p for p in plans if not p.auto]
    assert sum(p.auto for p in plans) == 1
    assert any(p.dp == ranks for p in hand) and any(p.mp == ranks for p in hand)
    assert any(p.dp > 1 and p.mp > 1 and p.pp == 1 for p in hand)
    for pp in (2, 4):                            # several micro-batch counts on 2 and on 4 stages
        assert len({p.micro for p in hand if p.pp == pp}) >= 2, pp
    for key in ("recompute", "zero"):            # on and off
        assert {getattr(p, key) for p in hand} == {False, True}, key
    assert {p.schedule for p in hand if p.pp > 1} == {"1f1b", "gpipe"} and any(p.virtual == 2 for p in hand)


def test_quick_plans_take_every_path_on_two_ranks():
    quick = ap.quick_plans(2)
    for p in quick:
        ap.check_plan(p, 2)
    assert [p.name for p in quick if p.auto] == ["auto"]
    assert any(p.dp == 2 and p.zero for p in quick) and any(p.mp == 2 for p in quick)
    assert {p.schedule for p in quick if p.pp == 2} == {"1f1b", "gpipe"}
    assert any(p.recompute and p.pp == 2 for p in quick) and any(p.recompute and p.pp == 1 for p in quick)
    assert any(p.virtual == 2 for p in quick)


def test_a_bad_rank_count_or_plan_names_itself():
    with pytest.raises(ValueError, match="multiple of 4"):
        ap.plans(6)
    with pytest.raises(ValueError, match="'pp2 m8' on 2 ranks.*does not split over dp2"):
        ap.check_plan(ap.Plan("pp2 m8", dp=2, pp=1, micro=8), 2)


def _graph_at(rows):
    _, net, _ = ap.build(ap.Plan("auto", auto=True), TINY)
    return trace(net, (TensorSpec((rows, TINY["seq_length"] + 1), np.dtype(np.int32)),), {}).graph


@pytest.mark.parametrize("plan", [ap.hand(pp=2, micro=2), ap.hand(pp=2, micro=4, schedule="gpipe", recompute=True),
                                  ap.hand(pp=2, micro=2, virtual=2)], ids=lambda p: p.name)
def test_a_hand_pipeline_is_predicted_as_the_joint_search_prices_it(plan):
    """One rank per stage leaves the ops one strategy, so the hand pipeline (stages from
    set_pipeline_stages, PipelineCell micro-batches and chunks, recompute marks) must cost
    exactly what the joint search's price() gives the same stages, micro-batches, schedule,
    interleaving and recompute."""
    hand = ap.predict_hand(plan, TINY, 2, "cpu-2core")
    fixed = AutoFixed(pp=2, micro_batches=plan.micro, recompute=plan.recompute, optimizer_parallel=False,
                      schedule=plan.schedule, virtual_stages=plan.virtual)
    _, (searched,) = search_auto(_graph_at, ap.batch_of(2), 2, PlanOptions(cost_profile="cpu-2core"), fixed)
    assert hand.layers_per_stage == searched.layers_per_stage == ((2, 2) if plan.virtual == 1 else (1, 1, 1, 1))
    assert (hand.micro_batches, hand.schedule, hand.recompute, hand.virtual_stages) == \
        (plan.micro, plan.schedule, plan.recompute, plan.virtual)
    assert hand.step_seconds == pytest.approx(searched.step_seconds, rel=1e-12)
    assert hand.memory_bytes == searched.memory_bytes


def test_a_hand_plan_is_priced_with_its_own_strategies_not_searched_ones():
    """mp2 on one stage: the price is CostModel.evaluate of the model's own semi_auto plan
    (the run's), which the op search would not choose here (it prices lower)."""
    plan = ap.Plan("mp2", mp=2)
    hand = ap.predict_hand(plan, TINY, 2, "cpu-2core")
    _, net, _ = ap.build(plan, TINY)
    g = trace(net, (TensorSpec((ap.batch_of(2), TINY["seq_length"] + 1), np.dtype(np.int32)),), {}).graph
    mesh = Mesh((2,), ("devices",), (0, 1))
    cost = CostModel(g, mesh, load_profile("cpu-2core"), True).evaluate(plan_shardings(g, "semi_auto_parallel",
                                                                                         mesh, True))
    assert hand.step_seconds == pytest.approx(cost.step_seconds, rel=1e-9)
    assert hand.peak_memory_bytes == cost.memory_bytes
    fixed = AutoFixed(pp=1, micro_batches=1, recompute=False, optimizer_parallel=False)
    _, (searched,) = search_auto(_graph_at, ap.batch_of(2), 2, PlanOptions(cost_profile="cpu-2core"), fixed,
                                 full_batch=True)
    assert searched.step_seconds < hand.step_seconds


def test_confirm_takes_the_auto_plan_and_its_fastest_rivals_and_pools_their_windows(monkeypatch):
    import cost_model_accuracy as cma

    def row(name, step, auto=False):
        return dict(name=name, size="H256", ranks=4, plan=dict(ap.Plan(name, dp=4, auto=auto).__dict__),
                    predicted=dict(plan=name), measured=dict(step_s=step, windows=[step]))
    rows = [row("auto", 0.30, auto=True), row("a", 0.25), row("b", 0.20), row("c", 0.40)]
    assert [r["name"] for r in cma.contenders(rows, 2)] == ["auto", "b", "a"]
    again = {"auto": [0.21, 0.22], "b": [0.26, 0.27], "a": [0.30, 0.31]}    # the first pass was luck

    def launch(plan, size, ranks, profile, args, repeats, timeout):
        return dict(predicted=dict(plan=plan.name), measured=dict(step_s=0.0, windows=[again[plan.name].pop(0)]))
    monkeypatch.setattr(cma, "launch", launch)
    args = type("A", (), dict(confirm=2, confirm_rounds=2, confirm_by=0, repeats=1, plan_timeout=60, json=""))
    saved = dict(rows=rows)
    cma.confirm(saved, args, {"4": "p.json"}, 0.0)
    steps = {r["name"]: r["measured"]["step_s"] for r in rows}
    # every window pooled: auto median(0.30, 0.21, 0.22) = 0.22 now beats b's median(0.20, 0.26, 0.27)
    assert steps == {"auto": 0.22, "a": 0.30, "b": 0.26, "c": 0.40}
    assert min(steps.values()) == steps["auto"]                # regret 1.0, not the first pass's 1.5
    assert rows[0]["measured"]["first_windows"] == [0.30]


def test_merged_runs_drop_a_failure_another_run_measured():
    import cost_model_accuracy as cma
    measured = dict(name="pp4 m4", size="H256", ranks=4, measured=dict(step_s=0.3))
    first = dict(rows=[], failed=[dict(name="pp4 m4", size="H256", ranks=4, error="not run: --deadline reached"),
                                  dict(name="mp4", size="H256", ranks=4, error="timed out")],
                 sizes={"H256": {}}, profiles={"4": "a.json"})
    second = dict(rows=[measured], failed=[], sizes={"H384": {}}, profiles={"8": "b.json"})
    out = cma.merged([first, second])
    assert out["rows"] == [measured]
    assert [f["name"] for f in out["failed"]] == ["mp4"]           # never measured: still reported
    assert set(out["sizes"]) == {"H256", "H384"} and out["profiles"] == {"4": "a.json", "8": "b.json"}


def test_foreign_load_is_the_machines_busy_time_minus_the_jobs_own(monkeypatch):
    """Over a 2 s job the machine's cores were busy 10 CPU-seconds, 4 of them the job's own
    ranks: 3 cores of other work. The report flags a plan measured beside such load."""
    import cost_model_accuracy as cma
    busy, child = iter([100.0, 110.0]), iter([9.0])
    monkeypatch.setattr(cma, "machine_busy_s", lambda: next(busy))
    monkeypatch.setattr(cma, "children_cpu_s", lambda: next(child))
    assert cma.foreign_cores(cma.machine_busy_s(), 5.0, 2.0) == 3.0
    assert cma.foreign_cores(None, 5.0, 2.0) is None                   # no /proc/stat: unknown, not 0
    assert cma.busy_elsewhere({"foreign_cores": [None, 0.2, 3.0]}) == "3.00"
    assert cma.busy_elsewhere({}) == "-"


def test_machine_busy_time_grows_while_this_process_computes():
    """/proc/stat's busy seconds grow by at least this process's own CPU seconds (a spin of
    0.2 s of CPU time), so a job's own work is not reported as foreign."""
    import time

    import cost_model_accuracy as cma
    b0 = cma.machine_busy_s()
    if b0 is None:
        pytest.skip("no /proc/stat on this system")
    c0 = time.process_time()
    while time.process_time() - c0 < 0.2:
        pass
    assert cma.machine_busy_s() - b0 >= 0.15      # clock ticks of 10 ms: a little below 0.2 at worst


def test_confirm_stops_when_a_job_ran_other_op_strategies(monkeypatch):
    """The same stage plan with another strategy file digest is another plan: pooling its
    windows would mix two plans' times, so confirm stops and names both digests."""
    import cost_model_accuracy as cma
    row = dict(name="auto", size="H256", ranks=4, plan=dict(ap.Plan("auto", auto=True).__dict__),
               strategy_sha="aaaa", predicted=dict(plan="pp1 x 4"), measured=dict(step_s=0.2, windows=[0.2]))

    def launch(plan, size, ranks, profile, args, repeats, timeout):
        return dict(strategy_sha="bbbb", predicted=dict(plan="pp1 x 4"), measured=dict(step_s=0.1, windows=[0.1]))
    monkeypatch.setattr(cma, "launch", launch)
    args = type("A", (), dict(confirm=1, confirm_rounds=1, confirm_by=0, repeats=1, plan_timeout=60, json=""))
    with pytest.raises(SystemExit, match="strategies bbbb vs pp1 x 4, strategies aaaa"):
        cma.confirm(dict(rows=[row]), args, {"4": "p.json"}, 0.0)
    assert row["measured"]["windows"] == [0.2]                   # nothing pooled

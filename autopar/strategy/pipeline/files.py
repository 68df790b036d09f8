"""Saving a pipeline plan: a separate step after :func:`~.planner.plan_pipeline`.

Planning reads a strategy file (``strategy_ckpt_load_file``) but never writes one; the
caller that wants ``strategy_ckpt_save_file`` calls :func:`save_pipeline_plan` on the plan
it got, so a plan made for a report or a test leaves no file behind.
"""
from __future__ import annotations

from ..costmodel import CostModel
from ..plan_source import PlanOptions
from ..strategy_file import save_pipeline_strategy
from .planner import PipelinePlan


def save_pipeline_plan(path, plan: PipelinePlan, full_batch: bool, options: PlanOptions = PlanOptions()) -> None:
    """Write every stage's plan of ``plan`` (all planned) to the strategy file ``path``, each
    with the cost model's prediction for one micro-batch through that stage."""
    profile, zero = options.profile(), options.optimizer_parallel
    assert all(pl is not None for pl in plan.plans), "save_pipeline_plan: plan every stage first"
    predicted = [CostModel(sg.graph, pl.stage, profile, full_batch, optimizer_parallel=zero,
                           optimizer_shard=options.optimizer_shard).evaluate(pl).summary()
                 for sg, pl in zip(plan.stages, plan.plans)]
    save_pipeline_strategy(path, [sg.graph for sg in plan.stages], plan.plans, predicted,
                           only_trainable=options.only_trainable_params)


__all__ = ["save_pipeline_plan"]

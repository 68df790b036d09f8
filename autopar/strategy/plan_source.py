"""Which plan a compile uses: the strategy file, the search, or the ops' rules.

Apart from :mod:`.sharding_plan` (the plan value and the rule-made plan) because the
strategy file and the searches build that value: this module sits above all three.
"""
from __future__ import annotations

from ..ir.graph import Graph
from ..ir.mesh import Mesh
from .search import search_plan
from .sharding_plan import ShardingPlan, plan_shardings
from .strategy_file import load_strategy


def make_plan(graph: Graph, mode: str, stage: Mesh, full_batch: bool = False, ctx=None) -> ShardingPlan:
    """The plan a compile uses: the strategy file named by ``strategy_ckpt_load_file`` if
    any, else the search (``auto_parallel``) or the rules above. Planning only: saving the
    plan to ``strategy_ckpt_save_file`` is the caller's next step. ``ctx`` None plans with
    the context's defaults (strategy sits below the context and does not build one)."""
    load = ctx.strategy_ckpt_load_file if ctx is not None else ""
    if load:
        return load_strategy(load, graph, stage)
    if mode == "auto_parallel":
        profile = (ctx.cost_profile if ctx is not None else "") or None
        zero = bool(ctx is not None and ctx.enable_parallel_optimizer)
        return search_plan(graph, stage, ctx.search_mode if ctx is not None else "dynamic_programming",
                           full_batch, profile=profile, optimizer_parallel=zero)
    return plan_shardings(graph, mode, stage, full_batch)

"""Which plan a compile uses: the strategy file, the search, or the ops' rules.

Apart from :mod:`.sharding_plan` (the plan value and the rule-made plan) because the
strategy file and the searches build that value: this module sits above all three.
Planning reads its settings from :class:`PlanOptions`, a frozen value the parallel
context (a layer above) hands down; nothing here reads the context.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..comm.fusion import DEFAULT_COMM_FUSION, CommFusion
from ..ir.graph import Graph
from ..ir.mesh import Mesh
from .costmodel import CostModel
from .optimizer_shard import DEFAULT_OPTIMIZER_SHARD, OptimizerShard
from .profile import MachineProfile, load_profile
from .search import DEFAULT_PROFILE, search_plan
from .sharding_plan import ShardingPlan, plan_shardings
from .strategy_file import save_strategy
from .strategy_load import load_strategy


@dataclass(frozen=True)
class PlanOptions:
    """What of the parallel context planning reads: the strategy file to load ('' = none),
    the ``auto_parallel`` search mode, the machine profile plans are priced with ('' = the
    default), whether optimizer parallel (ZeRO-1) is on, and the memory cap the op-level
    search keeps a plan under (None: the profile's memory; the joint search of stages
    caps memory itself and plans each stage's ops for speed alone, ``math.inf``), and the
    ``comm_fusion`` setting the gradient buckets are priced with (the cost model's
    ``PlanCost.grad_exposed_s``; the op-level search itself prices each reduction alone)."""

    strategy_file: str = ""
    search_mode: str = "dynamic_programming"
    cost_profile: str = ""
    optimizer_parallel: bool = False
    memory_cap: float | None = None
    comm_fusion: CommFusion = DEFAULT_COMM_FUSION
    only_trainable_params: bool = True     # strategy_ckpt_config's: files list trainable parameters only
    optimizer_shard: OptimizerShard = DEFAULT_OPTIMIZER_SHARD   # parallel_optimizer_config's level, shard size

    def profile(self) -> MachineProfile:
        return load_profile(self.cost_profile or DEFAULT_PROFILE)

    def without_files(self) -> PlanOptions:
        """The same options planning by search or rules, whatever file was named."""
        return dataclasses.replace(self, strategy_file="")


def make_plan(graph: Graph, mode: str, stage: Mesh, full_batch: bool = False,
              options: PlanOptions = PlanOptions()) -> ShardingPlan:
    """The plan a compile uses: the strategy file ``options.strategy_file`` if any, else the
    search (``auto_parallel``) or the rules above. Planning only: saving the plan
    (:func:`save_plan`) is the caller's next step."""
    if options.strategy_file:
        return load_strategy(options.strategy_file, graph, stage)
    if mode == "auto_parallel":
        return search_plan(graph, stage, options.search_mode, full_batch, profile=options.profile(),
                           optimizer_parallel=options.optimizer_parallel, memory_cap=options.memory_cap,
                           optimizer_shard=options.optimizer_shard)
    return plan_shardings(graph, mode, stage, full_batch)


def save_plan(path: str, graph: Graph, plan: ShardingPlan, full_batch: bool,
              options: PlanOptions = PlanOptions(), param_order: Sequence[str] | None = None) -> None:
    """Write ``plan`` of the forward ``graph`` to the strategy file ``path`` with the cost
    model's prediction under ``options``' machine profile, optimizer parallel and gradient
    buckets (``comm_fusion``; an ``index`` rule counted in ``param_order``, the trained
    parameters' names in the optimizer's order, else in the graph's)."""
    model = CostModel(graph, plan.stage, options.profile(), full_batch, optimizer_parallel=options.optimizer_parallel,
                      comm_fusion=options.comm_fusion, param_order=param_order, optimizer_shard=options.optimizer_shard)
    save_strategy(path, graph, plan, predicted=model.evaluate(plan).summary(),
                  only_trainable=options.only_trainable_params)


__all__ = ["PlanOptions", "make_plan", "save_plan"]

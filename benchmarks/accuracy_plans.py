"""The plans benchmarks/cost_model_accuracy.py trains, how each is built, and its prediction.

A :class:`Plan` is one way to train a PanGu-α size on R ranks: a hand plan (the model's own
``.shard()`` strategies from ``PanguAlphaConfig.data_parallel`` / ``model_parallel`` under
``semi_auto_parallel``, ``pipeline_stages`` set, the blocks on their stages by
:func:`autopar.nn.set_pipeline_stages`, a ``PipelineCell(net, micro, pipeline_schedule,
virtual_stages)``, blocks marked ``.recompute()``, ``enable_parallel_optimizer`` set), or
the auto plan (``auto_parallel`` with nothing fixed: the joint search chooses all of it).

Predictions come from the planner's own pricing, :func:`autopar.strategy.pipeline.auto.price`,
the function that prices every candidate of the ``auto_parallel`` joint search, so hand and
auto plans are judged by one cost model. It plans stage ops by search; a hand plan's ops
follow the model's strategies instead, so :func:`predict_hand` first plans the hand plan's
stages as the run does (``plan_pipeline`` under ``semi_auto_parallel``, the run's traced
graph with its stage and recompute marks), writes those stage plans to a strategy file, and
hands the file to ``price`` (a loaded file replaces the op search), with the user's stages
kept (``keep_stages=True``). The price is then of exactly the shardings the run compiles,
one stage or several. (The stage search's ``evaluate(StageSetting)`` prices one layer and
extrapolates; ``price`` plans the whole graph stage by stage, as the run does.) The auto
plan's prediction is the run's own ``AutoGradProgram.choice``.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# PanGu-α sizes: 5 layers are 4 blocks + the query layer, so 4 stages hold a block each.
SIZES = {
    "H256": dict(vocab_size=4000, seq_length=128, hidden_size=256, num_layers=5, num_heads=8,
                 ffn_hidden_size=1024, dropout_rate=0.1),
    "H384": dict(vocab_size=4000, seq_length=128, hidden_size=384, num_layers=5, num_heads=8,
                 ffn_hidden_size=1536, dropout_rate=0.1),
    "tiny": dict(vocab_size=1000, seq_length=32, hidden_size=64, num_layers=5, num_heads=8,       # --quick, tests
                 ffn_hidden_size=256, dropout_rate=0.1),
}
ROWS_PER_RANK = 2            # global batch = 2 x ranks: the same work per rank at 4 and 8 ranks


@dataclass(frozen=True)
class Plan:
    """A hand plan (dp x mp ranks per stage, pp stages) or the auto plan (``auto``)."""
    name: str
    dp: int = 1
    mp: int = 1
    pp: int = 1
    micro: int = 1                 # PipelineCell micro_size (pp 1 and micro 1: the bare network)
    schedule: str = "1f1b"
    recompute: bool = False
    zero: bool = False             # enable_parallel_optimizer
    auto: bool = False
    virtual: int = 1               # PipelineCell virtual_stages (interleaved 1F1B: pp x virtual chunks)

    @property
    def full_batch(self) -> bool:
        """Every rank reads the whole batch: no data parallelism inside a stage of several ranks."""
        return not self.auto and self.dp == 1 and self.mp > 1

    @property
    def pipelined(self) -> bool:
        return self.pp > 1 or self.micro > 1

    def ranks_per_stage(self, ranks: int) -> int:
        return ranks // self.pp


def batch_of(ranks: int) -> int:
    return ROWS_PER_RANK * ranks


def hand(dp: int = 1, mp: int = 1, pp: int = 1, micro: int = 1, schedule: str = "1f1b", recompute: bool = False,
         zero: bool = False, virtual: int = 1) -> Plan:
    """A hand plan named by its settings ("pp2 dp2 mp2 m4 gpipe recompute zero", degrees of 1
    left out; "v2": interleaved over 2 chunks per stage)."""
    parts = [f"pp{pp}" if pp > 1 else "", f"dp{dp}" if dp > 1 else "", f"mp{mp}" if mp > 1 else "",
             f"m{micro}" if micro > 1 else "", f"v{virtual}" if virtual > 1 else "",
             "gpipe" if schedule == "gpipe" else "", "recompute" if recompute else "", "zero" if zero else ""]
    return Plan(" ".join(p for p in parts if p) or "serial", dp, mp, pp, micro, schedule, recompute, zero,
                virtual=virtual)


def plans(ranks: int) -> list[Plan]:
    """The plans trained on ``ranks`` (4 or 8; a multiple of 4): hand dp, mp, dp x mp, pp 2
    and 4 with two micro-batch counts each, both schedules, recompute and optimizer parallel
    on and off, and the auto plan (first: it matters most for the regret); last, the ones a
    ``--deadline`` may drop: interleaved 1F1B, and on 8 ranks the slowest two."""
    if ranks < 4 or ranks % 4:
        raise ValueError(f"plans: ranks: expected a multiple of 4 (4 pipeline stages of dp x mp ranks), got {ranks}; "
                         "use --ranks 4 8 (or --quick on 2 ranks)")
    r, n2, n4 = ranks, ranks // 2, ranks // 4
    out = [Plan("auto", auto=True), hand(dp=r), hand(dp=r, zero=True), hand(dp=n4, mp=4),
           hand(dp=n2, mp=2), hand(dp=n2, mp=2, recompute=True),
           hand(dp=n2, pp=2, micro=2), hand(dp=n2, pp=2, micro=4), hand(dp=n2, pp=2, micro=4, schedule="gpipe"),
           hand(dp=n2 // 2, mp=2, pp=2, micro=2), hand(dp=n2, pp=2, micro=2, recompute=True),
           hand(dp=n2, pp=2, micro=2, zero=True),
           hand(dp=n4, pp=4, micro=4), hand(dp=n4, pp=4, micro=8), hand(dp=n4, pp=4, micro=4, schedule="gpipe"),
           hand(dp=n4, pp=4, micro=8, schedule="gpipe", recompute=True), hand(dp=n2, pp=2, micro=4, virtual=2)]
    if n4 > 1:
        out += [hand(mp=r), hand(dp=n4 // 2, mp=2, pp=4, micro=4)]
    return out


def quick_plans(ranks: int) -> list[Plan]:
    """A few plans on 2 ranks that still take every path: dp with optimizer parallel, mp
    with recompute, pp2 under both schedules (recompute on one) and interleaved, the auto plan."""
    if ranks != 2:
        raise ValueError(f"quick_plans: ranks: expected 2, got {ranks}; run --quick with --ranks 2")
    return [Plan("auto", auto=True), hand(dp=2, zero=True), hand(mp=2, recompute=True), hand(pp=2, micro=2),
            hand(pp=2, micro=4, schedule="gpipe", recompute=True), hand(pp=2, micro=2, virtual=2)]


def check_plan(plan: Plan, ranks: int) -> None:
    """A ValueError naming the plan when its degrees do not fit ``ranks`` or the batch."""
    batch = batch_of(ranks)
    rows = batch // plan.micro                       # one micro-batch, over the stage's ranks
    problems = []
    if not plan.auto and plan.dp * plan.mp * plan.pp != ranks:
        problems.append(f"dp x mp x pp = {plan.dp * plan.mp * plan.pp}, not {ranks}")
    if batch % plan.micro or rows % plan.dp:
        problems.append(f"a micro-batch of {batch} / {plan.micro} rows does not split over dp{plan.dp}")
    if plan.micro < plan.pp or (plan.virtual > 1 and plan.micro % plan.pp):
        problems.append(f"{plan.micro} micro-batches for {plan.pp} stages" + (" (interleaved: a multiple)"
                                                                               if plan.virtual > 1 else ""))
    if problems:
        raise ValueError(f"plan {plan.name!r} on {ranks} ranks (batch {batch}): {'; '.join(problems)}")


def build(plan: Plan, size: dict):
    """(config, network with loss, training cell) of ``plan``, not compiled."""
    from autopar import nn
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    from autopar.train import AdamWeightDecay
    cfg = PanguAlphaConfig(data_parallel=plan.dp, model_parallel=plan.mp, **size)
    net = PanguAlphaWithLoss(cfg)
    blocks = list(net.backbone.blocks)
    if plan.pp > 1:                                  # the query layer follows the last block
        nn.set_pipeline_stages(blocks, stages=plan.pp * plan.virtual)
    if plan.recompute:
        for block in blocks:
            block.recompute()
    cell = nn.PipelineCell(net, plan.micro, plan.schedule, plan.virtual) if plan.pipelined else net
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.01)
    return cfg, net, nn.TrainOneStepCell(cell, opt, clip_norm=1.0)


def context(plan: Plan, ranks: int, profile: str) -> dict:
    """The parallel context of ``plan``: for the auto plan only the mode and the profile (a
    key set here would be fixed for the joint search)."""
    if plan.auto:
        return dict(parallel_mode="auto_parallel", device_num=ranks, cost_profile=profile)
    return dict(parallel_mode="semi_auto_parallel", device_num=ranks, full_batch=plan.full_batch,
                pipeline_stages=plan.pp, enable_parallel_optimizer=plan.zero, cost_profile=profile)


def feed(plan: Plan, ids: np.ndarray, rank: int, ranks: int) -> np.ndarray:
    """What ``rank`` is fed: the whole batch (full_batch), else its data-parallel slice --
    of every rank for the auto plan (the script does not know the plan), of the stage's
    ranks for a hand pipeline (ranks at one position of every stage read the same rows)."""
    if plan.full_batch:
        return ids
    n = ranks if plan.auto else plan.ranks_per_stage(ranks)
    return np.split(ids, n)[rank % n]


def predict_hand(plan: Plan, size: dict, ranks: int, profile: str):
    """The AutoPlan ``price()`` gives the hand ``plan``: its stages planned as the run plans
    them (module doc), priced by the joint search's own function."""
    from autopar.ir.graph import differentiable_values
    from autopar.ir.spec import TensorSpec
    from autopar.runtime.trace import trace
    from autopar.strategy.pipeline.assignment import assign_stages
    from autopar.strategy.pipeline.auto import find_layer_stack, price
    from autopar.strategy.pipeline.files import save_pipeline_plan
    from autopar.strategy.pipeline.planner import plan_pipeline
    from autopar.strategy.plan_source import PlanOptions
    if plan.auto:
        raise ValueError("predict_hand: plan: expected a hand plan, got the auto plan (its prediction is the "
                         "run's AutoGradProgram.choice)")
    check_plan(plan, ranks)
    cfg, net, _ = build(plan, size)
    rows = batch_of(ranks) // plan.micro
    graph = trace(net, (TensorSpec((rows, cfg.seq_length + 1), np.dtype(np.int32)),), {}).graph
    stack = find_layer_stack(graph)
    n = plan.ranks_per_stage(ranks)
    options = PlanOptions(cost_profile=profile, optimizer_parallel=plan.zero)
    chunks = plan.pp * plan.virtual
    assign = assign_stages(graph, chunks, differentiable_values(graph, graph.params), plan.virtual)
    staged = plan_pipeline(graph, assign, n, "semi_auto_parallel", plan.full_batch, options, ranks_stages=plan.pp)
    split = layers_per_stage(graph, stack, assign, chunks)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "hand.json")
        save_pipeline_plan(path, staged, plan.full_batch, options)
        priced = price(graph, stack, ranks, plan.pp, plan.micro, split, plan.zero, [plan.recompute],
                       plan.schedule, dataclasses.replace(options, strategy_file=path), plan.full_batch,
                       keep_stages=True, virtual=plan.virtual)
    if not priced:
        raise ValueError(f"predict_hand: plan {plan.name!r}: price() found no plan for its shapes")
    return priced[0]


def layers_per_stage(graph, stack, assign, stages: int) -> tuple[int, ...]:
    """How many of the stack's layers each stage holds under ``assign``."""
    if stack is None:
        return ()
    stage_of = {}
    for node in graph.nodes:
        k = stack.layer_of(node.scope)
        if k is not None and node.id in assign.of_node:
            stage_of.setdefault(k, assign.of_node[node.id])
    return tuple(sum(1 for s in stage_of.values() if s == t) for t in range(stages))

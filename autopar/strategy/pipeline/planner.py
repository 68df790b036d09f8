"""The pipeline plan: every stage's graph and sharding plan, and the layouts that tie stages.

Planning touches no communicator, so any rank (or a test) plans every stage:

* stage s runs on the stage-major ranks ``s*n .. s*n + n - 1`` as a flat mesh of n; with
  virtual stages (interleaved 1F1B, ``ranks_stages`` = p below the p * v stages planned),
  virtual stage c runs on stage ``c % p``'s ranks -- two chunks of one rank share its mesh;
* each stage's forward graph is planned on its mesh exactly as the non-pipeline sharded
  path plans a whole graph (:func:`~autopar.strategy.plan_source.make_plan`);
* a value crossing from stage a to b travels in its *transfer layout*: its home layout on
  a with partial sums settled, the same layout on b's ranks (rank i of a sends its block
  to rank i of b). It is b's input layout, and the layout of its cotangent on a;
* a parameter read on several stages keeps one layout everywhere, the one the earliest of
  them plans, so the copies hold the same blocks at the same positions and their gradients
  add up block for block.

Strategy files: ``strategy_ckpt_load_file`` gives every stage its plan from one version-2
file (a list of stage plans, :mod:`autopar.strategy.strategy_file`). Planning writes no file:
``strategy_ckpt_save_file`` is written as a separate step, by
:func:`~autopar.strategy.pipeline.files.save_pipeline_plan`, with every stage's plan as used
(crossing and shared-parameter layouts set: planning them again from the file gives the
same plan).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...ir.graph import Graph
from ...ir.layout import Layout
from ...ir.mesh import Mesh
from ..plan_source import PlanOptions, make_plan
from ..sharding_plan import ShardingPlan
from ..strategy_load import load_pipeline_strategy
from .assignment import StageAssignment
from .stage_graph import StageGraph, stage_graph


def settled(layout: Layout) -> Layout:
    """A crossing's transfer layout: the value's own, with partial sums reduced (what its
    gradient ends in too, as :func:`autopar.runtime.spmd.settled` says)."""
    return Layout(layout.mesh, layout.dims) if layout.partial else layout


def stage_mesh(stage: int, ranks_per_stage: int) -> Mesh:
    """Stage ``stage``'s ranks, stage-major, as a flat mesh."""
    first = stage * ranks_per_stage
    return Mesh((ranks_per_stage,), ("devices",), tuple(range(first, first + ranks_per_stage)))


def on_mesh(layout: Layout, mesh: Mesh) -> Layout:
    """The same layout over another stage's ranks: the rank at each position replaced by
    the rank at the same position of ``mesh``."""
    src, dst = sorted(layout.mesh.ranks), sorted(mesh.ranks)
    position = {r: i for i, r in enumerate(src)}
    ranks = tuple(dst[position[r]] for r in layout.mesh.ranks)
    return Layout(Mesh(layout.mesh.shape, layout.mesh.names, ranks), layout.dims, layout.partial)


@dataclass(frozen=True, eq=False)
class PipelinePlan:
    assignment: StageAssignment
    stages: tuple[StageGraph, ...]
    plans: tuple[ShardingPlan | None, ...]    # per stage asked for (else None); crossing and shared-
                                              # parameter layouts set
    transfer: dict[int, Layout]               # crossing value -> layout on its sending stage
    param_stages: dict[int, tuple[int, ...]]  # global parameter value -> stages reading it
    param_home: dict[int, Layout]             # global parameter value -> layout on its first stage

    def table(self, graph: Graph) -> str:
        """Stages (ops, cells), crossings with their layouts, shared parameters."""
        rows = [self.assignment.table(graph)]
        rows += [f"  {c}  {self.transfer[c.value]}" for c in self.assignment.crossings if c.value in self.transfer]
        names = dict(zip(graph.params, graph.param_names()))
        rows += [f"  {names[v]} on stages {s}  {self.param_home[v]}" for v, s in self.param_stages.items()
                 if len(s) > 1 and v in self.param_home]
        return "\n".join(rows)


def plan_pipeline(graph: Graph, assign: StageAssignment, ranks_per_stage: int, mode: str, full_batch: bool,
                  options: PlanOptions = PlanOptions(), stages: Sequence[int] | None = None,
                  ranks_stages: int | None = None) -> PipelinePlan:
    """Plan ``stages`` (default: all) of ``graph``, the forward graph on micro-batch shapes.
    Only the stages those depend on are planned too: the senders of what they receive and
    the first stage of each parameter they share. ``ranks_stages``: the stages of ranks
    when ``assign`` has virtual stages (default: one per stage of ``assign``)."""
    p = assign.stages
    wanted = tuple(range(p)) if stages is None else tuple(stages)
    meshes = [stage_mesh(s % (ranks_stages or p), ranks_per_stage) for s in range(p)]
    graphs = tuple(stage_graph(graph, assign, s) for s in range(p))
    raw: dict[int, ShardingPlan] = {}
    load = options.strategy_file
    saved = load_pipeline_strategy(load, p, p * ranks_per_stage) if load else None
    options = options.without_files()          # the file is the pipeline's, not a stage's

    def raw_plan(s: int) -> ShardingPlan:
        if s not in raw:
            raw[s] = (saved.plan(s, graphs[s].graph, meshes[s]) if saved is not None
                      else make_plan(graphs[s].graph, mode, meshes[s], full_batch, options))
        return raw[s]

    param_stages: dict[int, tuple[int, ...]] = {}
    for s, sg in enumerate(graphs):
        for v in graph.params:
            if v in sg.local_of:
                param_stages[v] = param_stages.get(v, ()) + (s,)
    transfer = {c.value: settled(raw_plan(c.src).layouts[graphs[c.src].value(c)]) for c in assign.crossings
                if c.src in wanted or set(c.dsts) & set(wanted)}
    param_home = {}
    for v, owners in param_stages.items():
        if set(owners) & set(wanted):
            first = owners[0]
            lv = graphs[first].local_of[v]
            param_home[v] = raw_plan(first).layouts.get(lv) or Layout.replicated(meshes[first], len(graph.spec(v).shape))
    plans: list[ShardingPlan | None] = [None] * p
    for s in wanted:
        sg = graphs[s]
        layouts = dict(raw_plan(s).layouts)
        for c in sg.received:
            layouts[sg.value(c)] = on_mesh(transfer[c.value], meshes[s])
        for (c, _), g in zip(sg.cotangents, sg.cotangent_inputs):
            layouts[g] = transfer[c.value]
        for v in graph.params:
            if v in sg.local_of:
                layouts[sg.local_of[v]] = on_mesh(param_home[v], meshes[s])
        plans[s] = ShardingPlan(raw[s].stage, raw[s].shardings, layouts)
    return PipelinePlan(assign, graphs, tuple(plans), transfer, param_stages, param_home)

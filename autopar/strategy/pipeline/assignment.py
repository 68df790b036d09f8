"""Pipeline stages of a traced forward graph: the stage of every node, and the values that cross.

Rules, in order:

* a node inside a cell with ``pipeline_stage = k`` runs on stage k (``Node.stage``);
* an unannotated node reading a value made on some stage runs on the latest such stage
  (it follows its data: the tied head after the query layer, the loss after the head);
* an unannotated node reading only inputs, parameters and constants (PanGu-α's position
  ids, the label slice) runs on the earliest stage that reads its output, or on the last
  stage when nothing does.

Stages never decrease along the data flow, every stage gets at least one node, and the loss
is made on the last stage; anything else is a ValueError naming the ops. On one stage (a
serial run of a script written for a pipeline, or ``pipeline_stages=1``) the annotations
are ignored, as MindSpore ignores them: every node runs on stage 0. With virtual stages
(interleaved 1F1B, v chunks per stage) the stages here are the p * v virtual ones and
``pipeline_stage`` names one of them, 0..p*v-1 (``set_pipeline_stages(layers, stages=p * v)``);
virtual stage c runs on stage ``c % p``. A value made on
stage a and read on later stages b is a :class:`Crossing`: sent a -> b after each forward,
its gradient sent back b -> a after each backward (when it has one).

    x = embed(ids)        stage 0  ─┐ Crossing(x, src 0, dsts (1,))
    y = blocks.1(x)       stage 1  ◀┘
"""
from __future__ import annotations

from dataclasses import dataclass

from ...dtype import is_float
from ...errors import format_error
from ...ir.graph import FORWARD, Graph


@dataclass(frozen=True)
class Crossing:
    value: int                 # global value id
    src: int                   # stage making it
    dsts: tuple[int, ...]      # later stages reading it, ascending
    needs_grad: bool           # float and dependent on a differentiated parameter

    def __str__(self) -> str:
        return f"v{self.value}: stage {self.src} -> {', '.join(map(str, self.dsts))}"


@dataclass(frozen=True)
class StageAssignment:
    stages: int
    of_node: dict[int, int]            # forward node id -> stage
    crossings: tuple[Crossing, ...]    # ordered by value id

    def nodes(self, graph: Graph, stage: int) -> list:
        return [n for n in graph.nodes if self.of_node.get(n.id) == stage]

    def sent_by(self, stage: int) -> tuple[Crossing, ...]:
        return tuple(c for c in self.crossings if c.src == stage)

    def received_by(self, stage: int) -> tuple[Crossing, ...]:
        return tuple(c for c in self.crossings if stage in c.dsts)

    def table(self, graph: Graph) -> str:
        """One line per stage: how many ops, the cells they come from (first and last)."""
        rows = []
        for s in range(self.stages):
            nodes = self.nodes(graph, s)
            rows.append(f"stage {s}: {len(nodes)} ops, {nodes[0].scope or '<root>'} .. {nodes[-1].scope or '<root>'}")
        return "\n".join(rows)


def _where(node) -> str:
    return f"{node.scope or '<root>'} ({node.prim.kind})"


def assign_stages(graph: Graph, stages: int, differentiable: set[int] | None = None,
                  virtual: int = 1) -> StageAssignment:
    """The stage of every forward node of ``graph`` on ``stages`` stages. ``differentiable``:
    the values that get a gradient (crossings outside it send none back). ``virtual``: the
    chunks per stage when ``stages`` counts virtual stages (named in the errors)."""
    total = f"pipeline_stages={stages}" if virtual == 1 else \
        f"pipeline_stages x virtual_stages = {stages // virtual} x {virtual} = {stages}"
    forward = [n for n in graph.nodes if n.phase == FORWARD]
    if stages == 1:
        return StageAssignment(1, {n.id: 0 for n in forward}, ())
    made_by = {o: n for n in forward for o in n.outputs}
    readers: dict[int, list] = {}
    for n in forward:
        for v in n.inputs:
            readers.setdefault(v, []).append(n)

    of_node: dict[int, int] = {}
    pending = []
    for n in forward:                      # forward pass: annotations and data-following nodes
        if n.stage is not None and n.stage >= stages:
            raise ValueError(format_error(_where(n), "pipeline_stage", f"a stage below {total}",
                                          str(n.stage), f"set pipeline_stage in 0..{stages - 1} on {n.scope}, "
                                          "or raise pipeline_stages"))
        producers = [made_by[v] for v in n.inputs if v in made_by and made_by[v].id in of_node]
        latest = max(producers, key=lambda p: of_node[p.id], default=None)
        if n.stage is not None:
            if latest is not None and of_node[latest.id] > n.stage:
                raise ValueError(format_error(
                    _where(n), "pipeline_stage", f"a stage >= {of_node[latest.id]}, the stage of its input made "
                    f"by {_where(latest)}", str(n.stage),
                    "stages must not decrease along the data flow: give the later layer the higher pipeline_stage"))
            of_node[n.id] = n.stage
        elif latest is not None:
            of_node[n.id] = of_node[latest.id]
        else:
            pending.append(n)
    for n in reversed(pending):            # inputs-only nodes: the earliest stage reading them
        stages_read = [of_node[r.id] for o in n.outputs for r in readers.get(o, ()) if r.id in of_node]
        of_node[n.id] = min(stages_read, default=stages - 1)

    used = set(of_node.values())
    empty = [s for s in range(stages) if s not in used]
    if empty:
        given = sorted({n.stage for n in forward if n.stage is not None})
        raise ValueError(format_error(
            "pipeline", f"stage {empty[0]}", "at least one layer on every one of the "
            f"{total} stages", f"no op on it (stages annotated: {given})",
            f"set pipeline_stage = {empty[0]} on a cell (autopar.nn.set_pipeline_stages(blocks, layers_per_stage) "
            f"sets them from layer counts{', stages=' + str(stages) + ' for the virtual stages' if virtual > 1 else ''})"
            ", or lower pipeline_stages"))
    loss = graph.outputs[0]
    if loss in made_by and of_node[made_by[loss].id] != stages - 1:
        n = made_by[loss]
        raise ValueError(format_error(_where(n), "stage of the loss", f"the last stage {stages - 1}",
                                      str(of_node[n.id]), "put the loss and the layers before it on the last stage"))

    differentiable = differentiable if differentiable is not None else set()
    dsts: dict[int, set[int]] = {}
    for n in forward:
        for v in n.inputs:
            if v in made_by and of_node[made_by[v].id] < of_node[n.id]:
                dsts.setdefault(v, set()).add(of_node[n.id])
    crossings = tuple(Crossing(v, of_node[made_by[v].id], tuple(sorted(dsts[v])),
                               v in differentiable and is_float(graph.spec(v).dtype))
                      for v in sorted(dsts))
    return StageAssignment(stages, of_node, crossings)

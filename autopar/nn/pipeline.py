"""Pipeline parallelism, as users write it (MindSpore's names).

    set_auto_parallel_context(parallel_mode="semi_auto_parallel", pipeline_stages=2)
    set_pipeline_stages(list(net.blocks) + [net.query_layer], [2, 2])   # or cell.pipeline_stage = k
    train = nn.TrainOneStepCell(nn.PipelineCell(PanguAlphaWithLoss(cfg), micro_size=4), opt)

``PipelineCell(net_with_loss, micro_size)`` splits every array input into ``micro_size``
micro-batches along dim 0 (the batch); its loss is the mean of the micro-batch losses, and
its gradients are summed over micro-batches (those of that mean). For a loss that is a mean
over samples of equal weight (PanGu-α's next-token loss without padding) that mean is the
whole-batch loss, and training equals training on the whole batch -- dropout included:
each micro-batch drops the units the whole batch drops. ``pipeline_schedule`` is "1f1b"
(MindSpore's default: stage s holds at most ``stages - s`` micro-batches' activations) or
"gpipe" (all forwards, then all backwards).

Interleaved 1F1B (Megatron-LM's virtual pipeline stages; MindSpore's
``pipeline_config={"pipeline_interleave": True, "pipeline_scheduler": "1f1b"}``)::

    set_auto_parallel_context(parallel_mode="semi_auto_parallel", pipeline_stages=2)
    set_pipeline_stages(layers, stages=2 * 2)        # 4 chunks: pipeline_stage in 0..3
    nn.PipelineCell(net, micro_size=4, virtual_stages=2)

With p stages and ``virtual_stages=v`` the layers form p * v chunks (virtual stages) and
``pipeline_stage`` names a chunk, 0..p*v-1; chunk c runs on stage ``c % p``, so stage r
holds chunks r, r + p, r + 2p, ... (Megatron's assignment; MindSpore's ``pipeline_stage``
r with ``pipeline_segment`` k is chunk ``k * p + r``). The bubble falls from (p - 1) / m to
(p - 1) / (v m) of the ideal time for v times the sends; ``micro_size`` must be a multiple
of p, as Megatron requires. On one stage ``virtual_stages`` is ignored, as the annotations are.

Ops of cells without ``pipeline_stage`` follow their data (see
:mod:`autopar.strategy.pipeline.assignment`): PanGu-α needs only its layers annotated.
"""
from __future__ import annotations

from collections.abc import Sequence

from .. import ops
from ..errors import format_error
from ..runtime.pipeline.program import Pipelined
from ..strategy.pipeline.schedule import SCHEDULES
from .cell import Cell


class PipelineCell(Cell, Pipelined):
    """``PipelineCell(network, micro_size, pipeline_schedule="1f1b", virtual_stages=1)``:
    ``network`` returns the scalar loss; parameter names stay the network's."""

    auto_prefix = False

    def __init__(self, network: Cell, micro_size: int, pipeline_schedule: str = "1f1b", virtual_stages: int = 1):
        super().__init__()
        if not isinstance(network, Cell):
            raise TypeError(format_error("PipelineCell", "network", "a Cell returning the loss",
                                         type(network).__name__))
        if isinstance(micro_size, bool) or not isinstance(micro_size, int) or micro_size < 1:
            raise ValueError(format_error("PipelineCell", "micro_size", "an int >= 1", repr(micro_size),
                                          "MindSpore uses micro_size >= pipeline_stages"))
        if pipeline_schedule not in SCHEDULES:
            raise ValueError(format_error("PipelineCell", "pipeline_schedule", f"one of {sorted(SCHEDULES)}",
                                          repr(pipeline_schedule)))
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
            raise ValueError(format_error("PipelineCell", "virtual_stages", "an int >= 1 (chunks of the layers "
                                          "per pipeline stage; 1: no interleaving)", repr(virtual_stages)))
        self.network = network
        self.micro_size = micro_size
        self.pipeline_schedule = pipeline_schedule
        self.virtual_stages = virtual_stages

    def construct(self, *inputs):
        """The mean of the network's losses on the micro-batches (rows along dim 0). Training
        runs the pipeline program instead; without dropout both give the same loss."""
        batched = [x for x in inputs if hasattr(x, "shape") and len(x.shape) >= 1]
        rows = batched[0].shape[0] if batched else 1
        if rows % self.micro_size:
            raise ValueError(format_error("PipelineCell", "micro_size", f"a divisor of the batch ({rows} rows "
                                          "along dim 0)", str(self.micro_size)))
        per = rows // self.micro_size
        losses = []
        for k in range(self.micro_size):
            part = [x[k * per:(k + 1) * per] if hasattr(x, "shape") and len(x.shape) >= 1 else x for x in inputs]
            losses.append(self.network(*part).reshape(1))                  # () -> (1,)
        return ops.Concat(0)(tuple(losses)).mean()                          # (micro,) -> ()



class GradAccumulationCell(PipelineCell):
    """MindSpore's ``nn.GradAccumulationCell(network, micro_size)``: each step's batch runs as
    ``micro_size`` micro-batches whose gradients add up before one update -- the one-stage
    case of a :class:`PipelineCell` (so under ``pipeline_stages > 1`` it pipelines as one).
    The loss is the micro-batches' mean, the whole batch's mean loss when every micro-batch
    carries the same number of counted tokens."""

    def __init__(self, network: Cell, micro_size: int):
        super().__init__(network, micro_size)


def set_pipeline_stages(layers: Sequence[Cell], layers_per_stage: Sequence[int] | None = None,
                        stages: int | None = None) -> tuple[int, ...]:
    """Set ``pipeline_stage`` on consecutive layers and return each layer's stage.

    ``layers_per_stage`` gives the count on each stage (Yuan 2.0's non-uniform
    ``[2, 2, 3, 3, 4, 4, 4, 2]`` for 24 layers on 8 stages); else ``stages`` splits them as
    PanGu-α does, layer i on stage ``i * stages // len(layers)``. With virtual stages the
    stages counted here are the p * v chunks (``stages=p * v``, or p * v counts)."""
    layers = list(layers)
    if layers_per_stage is None:
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= len(layers):
            raise ValueError(format_error("set_pipeline_stages", "stages",
                                          f"an int in [1, {len(layers)}] (one layer per stage at least)",
                                          repr(stages), "or pass layers_per_stage"))
        assigned = tuple(i * stages // len(layers) for i in range(len(layers)))
    else:
        counts = list(layers_per_stage)
        for s, c in enumerate(counts):
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(format_error("set_pipeline_stages", f"layers_per_stage[{s}]",
                                              "an int >= 1 (every stage holds a layer)", repr(c),
                                              "drop the stage, or move a layer onto it"))
        if sum(counts) != len(layers):
            raise ValueError(format_error("set_pipeline_stages", "layers_per_stage",
                                          f"counts summing to the {len(layers)} layers", f"{counts} (sum "
                                          f"{sum(counts)})"))
        assigned = tuple(s for s, c in enumerate(counts) for _ in range(c))
    for layer, s in zip(layers, assigned):
        layer.pipeline_stage = s
    return assigned

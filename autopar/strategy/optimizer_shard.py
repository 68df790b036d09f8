"""MindSpore's ``parallel_optimizer_config``: how far optimizer parallel shards a weight.

Optimizer parallel (``enable_parallel_optimizer=True``) gives each of a weight's replicas
one slice of it to update. The level says what else is held as slices, per rank, for a
weight of Ψ elements replicated over N ranks (Adam in float32: 4 bytes of weight, 4 of
gradient and 8 of states per element; the ZeRO paper's stages in brackets):

===========  ==========================================  ===========  =========  ========
level        held as slices                               weights      gradients  states
===========  ==========================================  ===========  =========  ========
``level1``   optimizer states; the step's gradient is     4Ψ           4Ψ [#]_    8Ψ / N
(ZeRO-1)     reduce-scattered once, after the last
             micro-batch (accumulated whole)
``level2``   + each micro-batch's gradient is reduce-     4Ψ           4Ψ / N     8Ψ / N
(ZeRO-2)     scattered and the slices accumulate
             (MindSpore's ``gradient_accumulation_shard``)
``level3``   + the weights: a rank keeps its slice and    4Ψ / N       4Ψ / N     8Ψ / N
(ZeRO-3)     all-gathers the weight where it is used
             (forward, and again in the backward pass)
===========  ==========================================  ===========  =========  ========

.. [#] with one micro-batch the gradient is reduce-scattered at once, so the step holds
   only the slice (as MindSpore's and Megatron's distributed optimizers do): level1 and
   level2 differ under gradient accumulation (``GradAccumulationCell``, a ``PipelineCell``).

``optimizer_weight_shard_size`` k (default -1: all N replicas) slices a weight k ways,
over groups of k consecutive replicas: the gradient is reduce-scattered inside a group and
all-reduced across the N/k groups, so states fall by k instead of N for cheaper
collectives. ``parallel_optimizer_threshold`` (KB) lives on the context as its own key.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import format_error, is_int

WHERE = "parallel_optimizer_config"
LEVELS = ("level1", "level2", "level3")
KEYS = ("optimizer_level", "optimizer_weight_shard_size", "gradient_accumulation_shard",
        "parallel_optimizer_threshold")


@dataclass(frozen=True)
class OptimizerShard:
    """The validated ``parallel_optimizer_config`` (without the threshold, a context key)."""

    level: str = "level1"
    shard_size: int = -1                 # optimizer_weight_shard_size; -1: every replica
    accumulation_shard: bool = False     # gradient_accumulation_shard

    @property
    def shards_accumulation(self) -> bool:
        """Whether each micro-batch's gradient is reduce-scattered (slices accumulate)."""
        return self.accumulation_shard or self.level != "level1"

    @property
    def shards_weights(self) -> bool:
        """Whether ranks keep only their weight slices and gather per use (ZeRO-3)."""
        return self.level == "level3"

    def as_mindspore(self) -> dict:
        return {"optimizer_level": self.level, "optimizer_weight_shard_size": self.shard_size,
                "gradient_accumulation_shard": self.accumulation_shard}


DEFAULT_OPTIMIZER_SHARD = OptimizerShard()


def parse_optimizer_shard(value) -> tuple[OptimizerShard, int | None]:
    """(the OptimizerShard, the ``parallel_optimizer_threshold`` it carries or None) from
    MindSpore's dict form (or an OptimizerShard); ValueError naming the key that is wrong."""
    if isinstance(value, OptimizerShard):
        return value, None
    if not isinstance(value, Mapping):
        raise ValueError(format_error(WHERE, "value", "a dict like {'optimizer_level': 'level2'}", repr(value)))
    for key in value:
        if key not in KEYS:
            raise ValueError(format_error(WHERE, "key", f"one of {KEYS}", repr(key)))
    level = value.get("optimizer_level", "level1")
    if level not in LEVELS:
        raise ValueError(format_error(WHERE, "optimizer_level", f"one of {LEVELS}", repr(level)))
    size = value.get("optimizer_weight_shard_size", -1)
    if not is_int(size) or not (size == -1 or size > 1):
        raise ValueError(format_error(WHERE, "optimizer_weight_shard_size", "-1 (every replica) or an int > 1",
                                      repr(size)))
    acc = value.get("gradient_accumulation_shard", False)
    if not isinstance(acc, bool):
        raise ValueError(format_error(WHERE, "gradient_accumulation_shard", "True or False", repr(acc)))
    threshold = value.get("parallel_optimizer_threshold")
    if threshold is not None and (not is_int(threshold) or threshold < 0):
        raise ValueError(format_error(WHERE, "parallel_optimizer_threshold", "an int >= 0 (KB)", repr(threshold)))
    return OptimizerShard(level, int(size), acc), None if threshold is None else int(threshold)

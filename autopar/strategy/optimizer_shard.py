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

``prefetch_layers`` (autopar's own key, level3 only; default 1) is how many layers ahead of
its use a weight's all-gather starts, non-blocking (PyTorch FSDP's "prefetch the next
unit"); 0 gathers each weight at its use, blocking (autopar/runtime/prefetch.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import format_error, is_int
from ..ir.layout import Layout

WHERE = "parallel_optimizer_config"
LEVELS = ("level1", "level2", "level3")
KEYS = ("optimizer_level", "optimizer_weight_shard_size", "gradient_accumulation_shard",
        "parallel_optimizer_threshold", "prefetch_layers")
DEFAULT_PREFETCH_LAYERS = 1   # FSDP's default: the next layer's weights gathered while this one computes


@dataclass(frozen=True)
class OptimizerShard:
    """The validated ``parallel_optimizer_config``; ``threshold_kb`` is the context's own
    ``parallel_optimizer_threshold`` key (MindSpore's default 64), carried here for the planner."""

    level: str = "level1"
    shard_size: int = -1                 # optimizer_weight_shard_size; -1: every replica
    accumulation_shard: bool = False     # gradient_accumulation_shard
    threshold_kb: int = 64               # parallel_optimizer_threshold (the context's key): smaller weights stay whole
    prefetch_layers: int = DEFAULT_PREFETCH_LAYERS   # level3: layers ahead a weight's gather starts (0: at use)

    @property
    def shards_accumulation(self) -> bool:
        """Whether each micro-batch's gradient is reduce-scattered (slices accumulate)."""
        return self.accumulation_shard or self.level != "level1"

    @property
    def shards_weights(self) -> bool:
        """Whether ranks keep only their weight slices and gather per use (ZeRO-3)."""
        return self.level == "level3"

    @property
    def prefetches(self) -> bool:
        """Whether ZeRO-3's weight all-gathers start ahead of their use (non-blocking)."""
        return self.shards_weights and self.prefetch_layers > 0

    def as_mindspore(self) -> dict:
        """MindSpore's keys, and autopar's ``prefetch_layers`` where it is not the default."""
        out = {"optimizer_level": self.level, "optimizer_weight_shard_size": self.shard_size,
               "gradient_accumulation_shard": self.accumulation_shard}
        if self.prefetch_layers != DEFAULT_PREFETCH_LAYERS:
            out["prefetch_layers"] = self.prefetch_layers
        return out


DEFAULT_OPTIMIZER_SHARD = OptimizerShard()
DEFAULT_THRESHOLD_KB = DEFAULT_OPTIMIZER_SHARD.threshold_kb
KB = 1024  # bytes per unit of parallel_optimizer_threshold


def slice_layout(layout: Layout, shape: Sequence[int], itemsize: int, threshold_kb: int, shard_size: int = -1,
                 name: str = "weight") -> Layout | None:
    """The layout of the slice each replica updates, or None when the weight stays whole.

    ``shard_size`` k (``optimizer_weight_shard_size``; -1: every replica) slices over groups
    of k consecutive replicas: the innermost replicated axes, the last one cut (the mesh
    refined, same ranks) when only part of it is needed. A weight with fewer replicas than
    k is sliced over all of them; a replica count k does not fit is a ValueError naming it."""
    if math.prod(shape) * itemsize < threshold_kb * KB:
        return None
    axes = tuple(a for a in layout.replicated_axes() if layout.mesh.shape[a] > 1)
    count = math.prod(layout.mesh.shape[a] for a in axes)
    if count == 1:
        return None
    if 1 < shard_size < count:
        layout, axes = _inner_group(layout, axes, shard_size, name)
        count = shard_size
    local = layout.local_shape(shape)
    dim = next((d for d, n in enumerate(local) if n % count == 0), None)
    if dim is None:
        return None
    dims = tuple(d + axes if i == dim else d for i, d in enumerate(layout.dims))
    return Layout(layout.mesh, dims, layout.partial)


def _inner_group(layout: Layout, axes: tuple[int, ...], k: int, name: str) -> tuple[Layout, tuple[int, ...]]:
    """``layout`` on a refinement of its mesh and the (new) axes of its innermost replicated
    axes whose sizes multiply to ``k``: groups of k consecutive replicas."""
    sizes = layout.mesh.shape
    factors = [(s,) for s in sizes]
    taken, need = [], k
    for a in reversed(axes):
        if need == 1:
            break
        if need % sizes[a] == 0:
            taken.append((a, 0))
            need //= sizes[a]
        elif sizes[a] % need == 0:
            factors[a] = (sizes[a] // need, need)
            taken.append((a, 1))
            need = 1
        else:
            break
    if need != 1:
        replicas = "x".join(str(sizes[a]) for a in axes)
        raise ValueError(format_error("parallel_optimizer_config", "optimizer_weight_shard_size",
                                      f"a group size the replicas of {name!r} ({replicas}, innermost last) split into",
                                      k, "use a divisor of the data-parallel degree, or -1"))
    first = [0]
    for fs in factors:
        first.append(first[-1] + len(fs))
    return layout.refine(factors), tuple(sorted(first[a] + part for a, part in taken))




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
    ahead = value.get("prefetch_layers", DEFAULT_PREFETCH_LAYERS)
    if not is_int(ahead) or ahead < 0:
        raise ValueError(format_error(WHERE, "prefetch_layers", "an int >= 0 (layers ahead of its use a level3 "
                                      "weight's all-gather starts; 0: at its use)", repr(ahead),
                                      "use 1 (the default: one layer ahead) or 0 (off)"))
    return OptimizerShard(level, int(size), acc, prefetch_layers=int(ahead)), \
        None if threshold is None else int(threshold)

"""Communication fusion: which gradient reductions travel together, as MindSpore's ``comm_fusion``.

A step's gradient all-reduces are grouped into *buckets*: each bucket's gradients are
flattened into one buffer, all-reduced by one collective, and cut back into gradients
(autopar/runtime/fusion.py does it, started as soon as the bucket's last gradient exists).
Fewer, larger messages pay the per-call latency once per bucket, not once per weight.

The setting is MindSpore's ``set_auto_parallel_context(comm_fusion=...)``::

    {"openstate": True,                                   # False: nothing fused
     "allreduce": {"mode": "auto"}}                       # buckets of at most 64 MB
     "allreduce": {"mode": "size", "config": 32}}         # buckets of at most 32 MB
     "allreduce": {"mode": "index", "config": [20, 35]}}  # parameters 0-19, 20-34, 35-... (their
                                                          # indices in the trained parameter list)

=========  ==========================================================================
mode       which gradients share a bucket (only those reduced over the same ranks, in
           the same dtype, ever do)
=========  ==========================================================================
auto       ``size`` with AUTO_MB
size       in the order the backward pass makes them, until the next would take the
           bucket past ``config`` MB (a gradient larger than that is a bucket alone)
index      the parameters between consecutive split indices (MindSpore's
           ``all_reduce_fusion_config``): ``[20, 35]`` gives [0, 20), [20, 35), [35, end)
=========  ==========================================================================

Worked example (size, 1 MB): gradients made in the order g5 (0.4 MB), g4 (0.4 MB), g3
(0.5 MB), g2 (2 MB), g1 (0.1 MB) give buckets (g5, g4), (g3,), (g2,), (g1,).

``reducescatter`` and ``allgather`` (optimizer parallel: the gradients reduce-scattered into
the weights' slices, the updated slices all-gathered back) take modes ``auto`` and ``size``,
as in MindSpore. No key: nothing of that kind fused (autopar's default: see
:data:`DEFAULT_COMM_FUSION`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import format_error, is_int

MB = 1024 * 1024     # bytes per unit of a "size" config (MindSpore's MB)
AUTO_MB = 64         # the bucket size of mode "auto" (MindSpore's default fusion threshold)
MODES = ("auto", "size", "index")
KINDS = ("allreduce", "reducescatter", "allgather")                 # MindSpore's keys
KIND_MODES = {"allreduce": MODES, "reducescatter": MODES[:2], "allgather": MODES[:2]}
COLLECTIVE = {"allreduce": "allreduce", "reducescatter": "reduce_scatter", "allgather": "allgather"}
WHERE = "ParallelContext.comm_fusion"


@dataclass(frozen=True)
class FusionRule:
    """How one kind of collective is bucketed: ``mode`` and its ``config`` (MB for size,
    split indices for index, None for auto)."""

    mode: str
    config: float | tuple[int, ...] | None = None

    @property
    def bucket_bytes(self) -> float:
        """The size limit of a bucket (auto and size modes)."""
        return (AUTO_MB if self.mode == "auto" else self.config) * MB

    def as_mindspore(self) -> dict:
        if self.mode == "auto":
            return {"mode": "auto"}
        return {"mode": self.mode, "config": list(self.config) if self.mode == "index" else self.config}

    def __str__(self) -> str:
        return self.mode if self.mode == "auto" else f"{self.mode}:{self.config}"


@dataclass(frozen=True)
class CommFusion:
    """The validated ``comm_fusion`` setting: per kind its rule, None for not fused."""

    openstate: bool = True
    allreduce: FusionRule | None = None
    reducescatter: FusionRule | None = None
    allgather: FusionRule | None = None

    def rule(self, kind: str) -> FusionRule | None:
        """The rule in force for ``kind`` (MindSpore's key; None: each collective alone)."""
        return getattr(self, kind) if self.openstate else None

    def gradient_rules(self) -> dict[str, FusionRule]:
        """Collective name (``Communicator``'s: allreduce, reduce_scatter) -> the rule in force,
        for the kinds that reduce gradients and are fused."""
        kinds = ("allreduce", "reducescatter")
        return {COLLECTIVE[k]: self.rule(k) for k in kinds if self.rule(k) is not None}

    def as_mindspore(self) -> dict:
        """The dict form MindSpore's ``set_auto_parallel_context`` takes."""
        out: dict = {} if self.openstate else {"openstate": False}
        for kind in KINDS:
            rule = getattr(self, kind)
            if rule is not None:
                out[kind] = rule.as_mindspore()
        return out

    def __repr__(self) -> str:
        return repr(self.as_mindspore())


DEFAULT_COMM_FUSION = CommFusion()   # nothing fused unless asked: see parse_comm_fusion's note


def parse_comm_fusion(value) -> CommFusion:
    """A CommFusion from MindSpore's dict form (or one already parsed); ValueError naming
    the key that is wrong."""
    if isinstance(value, CommFusion):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(format_error(WHERE, "comm_fusion", "a dict like {'allreduce': {'mode': 'auto'}}",
                                      repr(value)))
    known = ("openstate",) + KINDS
    for key in value:
        if key not in known:
            raise ValueError(format_error(WHERE, "key", f"one of {known}", repr(key)))
    openstate = value.get("openstate", True)
    if not isinstance(openstate, bool):
        raise ValueError(format_error(WHERE, "'openstate'", "True or False", repr(openstate)))
    rules = {kind: _rule(kind, value[kind]) for kind in KINDS if kind in value}
    return CommFusion(openstate, **rules)


def with_allreduce_indices(fusion: CommFusion, indices) -> CommFusion:
    """``fusion`` with MindSpore's older ``all_reduce_fusion_config=[i, j, ...]`` applied: the
    all-reduces bucketed by those parameter indices (``{"allreduce": {"mode": "index",
    "config": [i, j, ...]}}``); empty leaves ``fusion`` alone. A different all-reduce rule
    in ``fusion`` is a ValueError: the two keys would say two things."""
    if isinstance(indices, (list, tuple)) and not indices:
        return fusion
    rule = _rule("allreduce", {"mode": "index", "config": indices}, "all_reduce_fusion_config")
    if fusion.allreduce is not None and fusion.allreduce != rule:
        raise ValueError(format_error("ParallelContext", "all_reduce_fusion_config", "the comm_fusion allreduce "
                                      f"rule ({fusion.allreduce}) or none", f"index:{rule.config}",
                                      "set one of the two keys"))
    return dataclasses.replace(fusion, allreduce=rule)


def _rule(kind: str, spec, where: str | None = None) -> FusionRule:
    where = where or f"{WHERE}[{kind!r}]"
    if not isinstance(spec, Mapping) or "mode" not in spec or set(spec) - {"mode", "config"}:
        raise ValueError(format_error(where, kind, "a dict with 'mode' and (for size and index) 'config'",
                                      repr(spec), "e.g. {'mode': 'size', 'config': 32}"))
    mode, config = spec["mode"], spec.get("config")
    if mode not in KIND_MODES[kind]:
        raise ValueError(format_error(where, "'mode'", f"one of {KIND_MODES[kind]}", repr(mode)))
    if mode == "auto":
        if config is not None:
            raise ValueError(format_error(where, "'config'", f"none for mode 'auto' (buckets of {AUTO_MB} MB)",
                                          repr(config), "use mode 'size' to choose the bucket size"))
        return FusionRule("auto")
    if mode == "size":
        if isinstance(config, bool) or not isinstance(config, (int, float)) or not 0 < config < math.inf:
            raise ValueError(format_error(where, "'config'", "a bucket size in MB > 0 for mode 'size'",
                                          repr(config), "e.g. {'mode': 'size', 'config': 32}"))
        return FusionRule("size", config)
    if (not isinstance(config, (list, tuple)) or not config or any(not is_int(i) or i < 1 for i in config)
            or list(config) != sorted(set(config))):
        raise ValueError(format_error(where, "'config'", "for mode 'index', increasing parameter indices >= 1 "
                                      "where buckets split", repr(config), "e.g. [20, 35]"))
    return FusionRule("index", tuple(int(i) for i in config))


@dataclass(frozen=True)
class Fusible:
    """One collective that may join a bucket: ``param`` its parameter's index in the trained
    list, ``nbytes`` its buffer, ``group`` what must be equal to share a bucket (the
    communicator and the dtype). Listed in the order the program makes them."""

    param: int
    nbytes: int
    group: object


def plan_buckets(items: Sequence[Fusible], rule: FusionRule | None, n_params: int) -> list[list[int]]:
    """Buckets as lists of positions in ``items`` (each in the order given), ordered by the
    position of their last item: the order they are ready to start. ``rule`` None: one
    bucket per item. ``n_params``: how many parameters an index config may split."""
    if rule is not None and rule.mode == "index" and rule.config[-1] >= n_params:
        raise ValueError(format_error(f"{WHERE}['allreduce']", "'config'",
                                      f"split indices below the number of trained parameters ({n_params})",
                                      repr(list(rule.config)), "drop the indices at or past the last parameter"))
    buckets: dict[tuple, list[int]] = {}
    open_bucket: dict[object, tuple] = {}            # group -> key of its bucket being filled
    filled: dict[tuple, int] = {}
    for k, item in enumerate(items):
        if rule is None:
            key = (k,)
        elif rule.mode == "index":
            key = (item.group, sum(item.param >= i for i in rule.config))
        else:
            key = open_bucket.get(item.group)
            if key is None or filled[key] + item.nbytes > rule.bucket_bytes:
                key = open_bucket[item.group] = (item.group, k)
                filled[key] = 0
            filled[key] += item.nbytes
        buckets.setdefault(key, []).append(k)
    return sorted(buckets.values(), key=lambda b: b[-1])

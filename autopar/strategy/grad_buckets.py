"""The weight gradients' reductions priced as the runtime runs them under ``comm_fusion``.

With a fusion rule (autopar/comm/fusion.py) the runtime (autopar/runtime/fusion.py) takes
each weight gradient's single all-reduce (reduce-scatter under optimizer parallel) out of
the end of the step and groups them into buckets by :func:`~autopar.comm.fusion.plan_buckets`,
in the order the backward pass makes the gradients. A bucket is copied into one buffer and
started right after its last gradient is made; all are waited for after backward. So:

* a bucket costs ONE collective of its summed bytes (one latency) plus one copy of those
  bytes at the memory bandwidth;
* the buckets run one after another on one communication stream beside backward: bucket b
  starts at ``max(ready_b, end_{b-1})``, its ready time the end of the backward of the op
  that makes its last gradient (backward walks the ops in reverse);
* what is left after backward is exposed: ``max(0, end_last - backward_end)``. The part
  hidden behind backward counts only as far as the machine overlaps (the profile's
  ``comm_overlap``, 0 on the 2-core CPU VM, 1 for a NIC/NCCL stream)::

      exposed = total - comm_overlap x (total - max(0, end_last - backward_end))

A reduction that is not one all-reduce or reduce-scatter, or of a kind without a rule, is
not bucketed and stays at the end of the step (fully exposed), priced alone as before. The
parts of a gradient summed from unlike parts are bucketed only with each other, and are
fully exposed too: the runtime waits for them right before their sum, in backward.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..comm import redistribution as rd
from ..comm.fusion import Fusible, FusionRule, plan_buckets
from ..errors import format_error

_COLLECTIVE = {rd.ALLREDUCE: "all_reduce", rd.REDUCE_SCATTER: "reduce_scatter"}   # formulas.py's names


@dataclass(frozen=True)
class GradReduction:
    """One reduction of a weight gradient (or of one part of it): ``ready_s`` the time into
    backward its input is made; ``param`` its parameter's index in the trained list;
    ``seconds`` its price alone; ``kind`` the rule key it falls under (``allreduce``,
    ``reduce_scatter``; None: not bucketable); ``group`` what must be equal to share a
    bucket; ``price`` (collective kind, mesh, axis) its collective is priced over."""

    ready_s: float
    position: int           # forward position of the op whose backward makes it (later ops: earlier in backward)
    param: int
    seconds: float
    nbytes: int
    kind: str | None = None
    group: tuple = ()
    price: tuple | None = None
    summed: bool = False    # one of unlike parts of a gradient, waited for right before their sum


@dataclass(frozen=True)
class GradBucket:
    """Reductions travelling together: started at ``ready_s`` (its last gradient made),
    costing ``seconds`` (one collective + the copy into its buffer) of ``nbytes``."""

    members: tuple[GradReduction, ...]
    ready_s: float
    seconds: float
    nbytes: int

    @property
    def hideable(self) -> bool:
        """Whether it may run beside backward (waited for after it), not right before a sum."""
        return not self.members[0].summed


def trained_order(used: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """Parameter name -> index in the trained list ``names``; ValueError naming a parameter
    the graph uses (``used``) that ``names`` lacks."""
    order = {name: k for k, name in enumerate(names)}
    missing = [n for n in used if n not in order]
    if missing:
        raise ValueError(format_error("CostModel", "param_order", f"the names of every trained parameter the graph "
                                      f"uses ({len(used)})", f"{len(order)} names, without {missing[:3]}",
                                      "pass [p.name for p in net.trainable_params()]"))
    return order


def bucketable(alone: GradReduction, steps: Sequence, mesh, copies: int, dtype: str, value: int) -> GradReduction:
    """``alone`` (a reduction priced on its own) made bucketable where its redistribution
    ``steps`` over ``mesh`` are one all-reduce or reduce-scatter, as the runtime's pass
    takes them: a reduce-scatter where the weight's gradient is split over its ``copies``
    (optimizer parallel), grouped by kind, ranks, dtype (and the sum it is a part of)."""
    if len(steps) != 1 or steps[0].kind not in _COLLECTIVE:
        return alone
    step = steps[0]
    kind = rd.REDUCE_SCATTER if copies > 1 else step.kind
    group = (kind, mesh.group(mesh.ranks[0], [step.axis]), dtype, value if alone.summed else None)
    return replace(alone, nbytes=step.bytes, kind=kind, group=group, price=(_COLLECTIVE[step.kind], mesh, step.axis))


def backward_order(items: Sequence[GradReduction]) -> list[GradReduction]:
    """The order the runtime lists them: as backward makes their inputs (ops in reverse),
    then by parameter (the gradient outputs' order)."""
    return sorted(items, key=lambda r: (-r.position, r.param))


def bucket(items: Sequence[GradReduction], rules: Mapping[str, FusionRule], n_params: int,
           priced, deferred: bool = False) -> tuple[list[GradBucket], list[GradReduction]]:
    """(buckets in start order, reductions left alone) of ``items`` under ``rules`` (kind ->
    rule), as :func:`plan_buckets` groups them. ``priced(kind, nbytes, mesh, axis)``: one
    bucket's seconds. ``deferred``: as a pipeline stage runs them once per step after its
    micro-batches (autopar/runtime/pipeline/grads.py): in parameter order, the parts of a
    sum left in the program, alone."""
    ordered = sorted(items, key=lambda r: r.param) if deferred else backward_order(items)
    fused = [r.kind in rules and not (deferred and r.summed) for r in ordered]
    alone = [r for r, f in zip(ordered, fused) if not f]
    ordered = [r for r, f in zip(ordered, fused) if f]
    buckets = []
    for kind, rule in rules.items():
        mine = [r for r in ordered if r.kind == kind]
        fusible = [Fusible(r.param, r.nbytes, r.group) for r in mine]
        for b in plan_buckets(fusible, rule, n_params):
            members = tuple(mine[k] for k in b)
            nbytes = sum(r.nbytes for r in members)
            collective, mesh, axis = members[0].price
            buckets.append(GradBucket(members, max(r.ready_s for r in members),
                                      priced(collective, nbytes, mesh, axis), nbytes))
    buckets.sort(key=lambda b: b.ready_s)
    return buckets, alone


def stream_end(buckets: Sequence[GradBucket]) -> float:
    """When the last hideable bucket ends, they run one after another from their ready times."""
    end = 0.0
    for b in buckets:
        if b.hideable:
            end = max(b.ready_s, end) + b.seconds
    return end


def exposed_seconds(buckets: Sequence[GradBucket], backward_s: float, overlap: float) -> float:
    """The buckets' seconds not hidden behind a backward pass of ``backward_s``, with the
    machine overlapping a fraction ``overlap`` of what could hide (module docstring)."""
    total = sum(b.seconds for b in buckets if b.hideable)
    waited = sum(b.seconds for b in buckets if not b.hideable)
    if total == 0.0:
        return waited
    behind = max(0.0, stream_end(buckets) - backward_s)
    return waited + total - overlap * (total - behind)

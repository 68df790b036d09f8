"""Cost formulas: one place for every closed form the cost model uses, with units.

Every function is pure. Units are in the names: ``*_seconds`` (s), ``*_bytes`` (bytes),
``*_flops`` (floating-point operations, a count, not a rate). Rates come from a
:class:`~autopar.strategy.profile.MachineProfile` (FLOP/s, bytes/s, s).

Symbols follow the one vocabulary of the project: B (global batch, sequences), b (micro-batch),
s (sequence length, tokens), l (layers), h (hidden size), V (vocabulary size), a (attention
heads), p (pipeline stages), m (micro-batches), v (interleaved chunks per stage), n (ranks in
a collective), Ψ (parameters), N (data-parallel ranks).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import check_int
from .profile import MachineProfile

# --- Collective algorithm factors (dimensionless): bytes each rank sends / buffer bytes. ---
# Ring all-reduce = reduce-scatter + all-gather: each moves (n-1)/n of the buffer.
COLLECTIVE_FACTORS: Mapping[str, str] = {
    "all_reduce": "2(n-1)/n",
    "all_gather": "(n-1)/n",
    "reduce_scatter": "(n-1)/n",
    "all_to_all": "(n-1)/n",
    "broadcast": "1",
}

# --- Transformer FLOP constants (FLOPs per B·s·l·h², dimensionless counts). ---
FORWARD_LAYER_FLOPS_PER_BSH2 = 24       # one layer's forward GEMMs: 24·B·s·h² FLOPs
PASSES_WITH_RECOMPUTE = 4               # forward + recomputed forward + backward (2 passes)
PASSES_WITHOUT_RECOMPUTE = 3            # forward + backward (2 passes)
LOGIT_PASSES = 3                        # logits are never recomputed: forward + backward


def collective_factor(kind: str, n: int) -> float:
    """Algorithm factor (dimensionless) of collective ``kind`` on ``n`` ranks: the fraction of
    the buffer each rank sends. all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all
    (n-1)/n; broadcast 1. ``n == 1`` moves nothing: 0."""
    if kind not in COLLECTIVE_FACTORS:
        raise ValueError(f"collective_factor: unknown collective kind {kind!r}; "
                         f"expected one of {sorted(COLLECTIVE_FACTORS)}")
    check_int("collective_factor", "n (ranks)", n, 1)
    if n == 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind == "broadcast":
        return 1.0
    return (n - 1) / n


def collective_seconds(kind: str, nbytes: float, n: int, profile: MachineProfile,
                       inter_node: bool, waits: bool = True) -> float:
    """Time (s) of one collective on ``n`` ranks over a buffer of ``nbytes`` bytes (the full
    buffer, per rank, as the caller holds it):

        latency_s + collective_wait_s + collective_factor(kind, n) · nbytes / bandwidth_bytes_per_s

    with the profile's inter-node or intra-node latency and bandwidth, and its per-call
    waiting term (ranks arriving at different times; 0 unless calibrated). ``waits=False``:
    a call right behind another on the same ranks, with no compute between to set them
    apart (the weight all-gathers after an optimizer step), pays no waiting. One rank: 0 s."""
    if nbytes < 0:
        raise ValueError(f"collective_seconds: nbytes must be >= 0, got {nbytes!r}")
    factor = collective_factor(kind, n)
    if factor == 0.0:
        return 0.0
    if inter_node:
        latency_s = profile.inter_node_latency_s
        bandwidth_bytes_per_s = profile.inter_node_bandwidth_bytes_per_s
    else:
        latency_s = profile.intra_node_latency_s
        bandwidth_bytes_per_s = profile.intra_node_bandwidth_bytes_per_s
    return latency_s + (profile.collective_wait_s if waits else 0.0) + factor * nbytes / bandwidth_bytes_per_s


def compute_seconds(flops: float, bytes_touched: float, dtype: str,
                    profile: MachineProfile, min_dim: float | None = None) -> float:
    """Time (s) of an op: flops / gemm_rate(dtype, min_dim) [FLOP/s] + bytes_touched /
    elementwise_bytes_per_s [bytes/s]; ``min_dim``, a GEMM's smallest dimension
    min(m, n, k), reads the profile's efficiency curve (None: the peak rate)."""
    if flops < 0 or bytes_touched < 0:
        raise ValueError(f"compute_seconds: flops and bytes_touched must be >= 0, "
                         f"got {flops!r}, {bytes_touched!r}")
    return flops / profile.gemm_rate(dtype, min_dim) + bytes_touched / profile.elementwise_bytes_per_s


def transformer_training_flops(B: int, s: int, l: int, h: int, V: int,
                               recompute: bool) -> float:
    """FLOPs (count) of one training iteration of a decoder LM (Narayanan et al. 2021).

    Forward of one layer: 24·B·s·h² + 4·B·s²·h; forward of the logits: 2·B·s·h·V.
    Backward costs two forwards; recompute adds one more forward of every layer (not the
    logits). So with recompute (4 layer passes, 3 logit passes):

        96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))

    and without it (3 layer passes × 24 = 72, 3 logit passes):

        72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))

    which is 6 × parameters (12·l·h² + V·h) × tokens (B·s) plus the attention term
    12·B·s²·l·h (a fraction s/(6h) of the layer FLOPs, ~3% for GPT-3)."""
    for name, value in (("B", B), ("s", s), ("l", l), ("h", h), ("V", V)):
        if value <= 0:
            raise ValueError(f"transformer_training_flops: {name} must be > 0, got {value!r}")
    passes = PASSES_WITH_RECOMPUTE if recompute else PASSES_WITHOUT_RECOMPUTE
    per_pass = FORWARD_LAYER_FLOPS_PER_BSH2 * B * s * l * h * h
    layers = passes * per_pass * (1 + s / (6 * h))      # 24·B·s·l·h²·s/(6h) = 4·B·s²·l·h
    logits = LOGIT_PASSES * 2 * B * s * h * V
    return float(layers + logits)


def pipeline_seconds(stage_seconds: Sequence[float], m: int, v: int = 1) -> tuple[float, float]:
    """(loop, bubble) seconds of m micro-batches through p stages, stage s taking
    ``stage_seconds[s]`` per micro-batch (forward + backward), each stage's layers in v
    interleaved chunks:

        loop   = m · max_s T_s + bubble
        bubble = (Σ_s T_s − max_s T_s) / v

    Every micro-batch passes every stage once, and the slowest stage paces the other m − 1:
    the fill and drain cost the *other* stages' times, not p − 1 times the slowest's. Equal
    stages give Narayanan et al.'s (m + p − 1) · T (v = 1) and a bubble of (p − 1) · T / v
    (:func:`pipeline_bubble`). It equals the replay of the 1F1B and GPipe tables
    (``Schedule.makespan``) when the last stage is the slowest -- PanGu-α's and a GPT's shape,
    the head being on it; pricing that stage's fill as (p − 1) · T_last over-predicted pp4
    steps by 17-34% on the 16-core machine. Where an earlier stage is the slowest its warm-up
    hides part of the fill and the replay is up to ~12% shorter (1F1B; GPipe can also be
    longer when the slowest forward and backward sit on different stages): the joint search
    replays the table; the stage planner, which prices thousands of (p, m) candidates up to
    p = 64, uses this form."""
    check_int("pipeline_seconds", "m", m, 1)
    check_int("pipeline_seconds", "v", v, 1)
    slowest = max(stage_seconds)
    bubble = (sum(stage_seconds) - slowest) / v
    return m * slowest + bubble, bubble


def pipeline_bubble(p: int, m: int, v: int = 1) -> tuple[float, float]:
    """Pipeline bubble for p stages, m micro-batches, v interleaved chunks per stage
    (Narayanan et al. 2021). Returns (fraction of the ideal time, fraction of the total time):

        bubble / ideal = (p − 1) / (v·m)
        bubble / total = (p − 1) / (v·m + p − 1)      (= (p−1)/(m+p−1) for v = 1)"""
    for name, value in (("p", p), ("m", m), ("v", v)):
        check_int("pipeline_bubble", name, value, 1)
    of_ideal = (p - 1) / (v * m)
    of_total = (p - 1) / (v * m + p - 1)
    return of_ideal, of_total

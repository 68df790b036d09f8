"""Megatron-style operator strategies shared by the decoders (PanGu-α, Yuan 2.0).

Dense weights are stored (out, in) as MindSpore's ``nn.Dense`` does:

* column-parallel: split ``out`` over mp, (B*S, H) -> (B*S, out/mp), no communication;
* row-parallel: split ``in`` over mp, partial sums, one all-reduce over mp;
* attention core: scores, softmax and context split (dp, mp, 1, 1) over (B, heads, S, S).
"""
from __future__ import annotations

from ..nn import Dense


def column_parallel(dense: Dense, dp: int, mp: int) -> None:
    dense.matmul.shard(((dp, 1), (mp, 1)))
    if dense.has_bias:
        dense.bias_add.shard(((dp, mp), (mp,)))


def row_parallel(dense: Dense, dp: int, mp: int) -> None:
    dense.matmul.shard(((dp, mp), (1, mp)))
    if dense.has_bias:
        dense.bias_add.shard(((dp, 1), (1,)))


def batch_only(dense: Dense, dp: int) -> None:
    """Weight replicated; rows (B*S) split over dp."""
    dense.matmul.shard(((dp, 1), (1, 1)))
    if dense.has_bias:
        dense.bias_add.shard(((dp, 1), (1,)))


def attention_core(scores, softmax, context, dp: int, mp: int) -> None:
    """(B, N, S, D) @ (B, N, D, S) -> softmax -> @ (B, N, S, D), heads split over mp."""
    split = (dp, mp, 1, 1)
    scores.shard((split, split))
    softmax.shard((split,))
    context.shard((split, split))

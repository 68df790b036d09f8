"""Losses."""
from __future__ import annotations

from .. import ops
from .cell import Cell


class SoftmaxCrossEntropyWithLogits(Cell):
    """Cross-entropy of logits (N, C) against labels: ints (N,) when ``sparse`` else
    probabilities (N, C). ``reduction``: 'mean', 'sum' or 'none'. An optional ``mask`` (N,)
    weights each row; 'mean' then divides by the mask's sum (padding ignored), or by 1 when
    that sum is 0 (every row masked: loss 0 and zero gradients, not 0/0 = NaN)."""

    def __init__(self, sparse: bool = True, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"SoftmaxCrossEntropyWithLogits: reduction: expected 'mean', 'sum' or 'none', "
                             f"got {reduction!r}")
        self.sparse, self.reduction = sparse, reduction
        self.cross_entropy = (ops.SparseSoftmaxCrossEntropyWithLogits() if sparse
                              else ops.SoftmaxCrossEntropyWithLogits())
        self.at_least_one = ops.Maximum()

    def construct(self, logits, labels, mask=None):
        per_row = self.cross_entropy(logits, labels)      # (N,)
        if mask is not None:
            mask = mask.astype(per_row.dtype)
            per_row = per_row * mask
        if self.reduction == "none":
            return per_row
        total = per_row.sum()
        if self.reduction == "sum":
            return total
        if mask is None:
            return total / float(per_row.size)
        return total / self.at_least_one(mask.sum(), 1.0)

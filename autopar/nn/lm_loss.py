"""The language-model loss every decoder in autopar.models shares."""
from __future__ import annotations

from .. import ops
from ..errors import OpArgError
from .cell import Cell


class NextTokenLoss(Cell):
    """Masked next-token cross-entropy around a backbone returning logits (B, S, V).
    ``input_ids`` is (B, S + 1): the backbone reads ``[:, :-1]`` (plus any extra inputs) and
    predicts ``[:, 1:]``; labels equal to ``pad_id`` carry no loss. Parameter names stay the
    backbone's.

    The loss is the mean over the labels that are not padding: ``sum(loss * keep) /
    max(sum(keep), 1)``. A batch where every label is padding has no token to learn from;
    the ``max`` makes its loss 0 with gradients exactly 0 instead of 0/0 = NaN (which would
    turn every weight NaN on the next update)."""

    auto_prefix = False

    def __init__(self, backbone: Cell, pad_id: int):
        super().__init__()
        self.backbone = backbone
        self.pad_id = pad_id
        self.cross_entropy = ops.SparseSoftmaxCrossEntropyWithLogits()
        self.at_least_one = ops.Maximum()

    def construct(self, input_ids, *extra):
        if input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise OpArgError("input_ids shape", "(batch, seq_length + 1)", str(input_ids.shape),
                             where=type(self).__name__)
        tokens, labels = input_ids[:, :-1], input_ids[:, 1:]                      # (B, S) each
        logits = self.backbone(tokens, *extra)                                    # (B, S, V)
        b, s, v = logits.shape
        per_token = self.cross_entropy(logits.reshape(b * s, v), labels.reshape(b * s))  # (B*S,)
        keep = (labels.reshape(b * s) != self.pad_id).astype(per_token.dtype)
        tokens = self.at_least_one(keep.sum(), 1.0)                               # () count, >= 1
        return (per_token * keep).sum() / tokens

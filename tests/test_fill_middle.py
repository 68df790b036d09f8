"""A PanGu-α trained briefly in random order fills a middle span from its prefix and suffix,
in any order of the gap's positions (the random-order model of the PanGu-α articles)."""
import numpy as np
import pytest

from autopar import nn
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss, random_order
from autopar.models.pangu_alpha.generate import fill_middle
from autopar.train import AdamWeightDecay

PATTERN = np.array([11, 23, 5, 42, 17], dtype=np.int32)
# One block + the query layer; a wide init breaks the attention's symmetry early.
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=2, init_std=0.3)


def document(shift: int, length: int) -> np.ndarray:
    """The motif repeated, starting at its ``shift``-th token: which one a position holds
    depends on the shift, so the gap can only be filled from the context."""
    return np.resize(np.roll(PATTERN, -shift), length)


@pytest.fixture(scope="module")
def model():
    net = PanguAlphaWithLoss(CONFIG)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=3e-3, weight_decay=0.0),
                                clip_norm=1.0)
    rows = np.stack([document(k, CONFIG.seq_length + 1) for k in range(len(PATTERN))])   # (5, S+1)
    rng = np.random.default_rng(0)
    losses = [float(train(*_permuted(rows, rng))) for _ in range(150)]
    assert np.mean(losses[-10:]) < 0.1 * losses[0]
    return net.backbone.set_train(False)


def _permuted(rows, rng):
    ids, pos, query = random_order(rows, rng)
    return ids, pos, None, query


@pytest.mark.parametrize("prefix, middle, suffix, order", [
    (2, 5, 3, [4, 3, 2, 1, 0]),        # suffix first, then the gap right to left
    (1, 6, 4, [3, 0, 5, 1, 4, 2]),     # scrambled
    (3, 4, 2, None),                   # left to right
])
def test_the_middle_is_filled_with_the_right_tokens_in_any_order(model, prefix, middle, suffix, order):
    for shift in range(len(PATTERN)):
        doc = document(shift, prefix + middle + suffix)
        got = fill_middle(model, doc[:prefix], doc[prefix + middle:], middle, order)
        assert got == list(doc[prefix:prefix + middle]), (shift, got)

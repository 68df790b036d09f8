"""Random-order pretraining: the identity order is standard training, exactly; a random
order feeds each token at its original position and asks for the next one in the order."""
import numpy as np
import pytest

import autopar
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss, random_order

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
IDS = np.random.default_rng(0).integers(10, 96, (2, CONFIG.seq_length + 1)).astype(np.int32)


def test_identity_order_equals_standard_training():
    net = PanguAlphaWithLoss(CONFIG)
    identity = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
    ids, pos, query = random_order(IDS, order=identity)
    loss, grads = autopar.value_and_grad(net)(IDS)
    loss_r, grads_r = autopar.value_and_grad(net)(ids, pos, None, query)
    assert loss_r == loss
    for name in grads:
        np.testing.assert_array_equal(grads_r[name], grads[name])


def test_random_order_feeds_tokens_at_their_positions():
    ids, pos, query = random_order(IDS, np.random.default_rng(1))
    n = IDS.shape[1]
    for r in range(IDS.shape[0]):
        assert ids[r, 0] == IDS[r, 0] and pos[r, 0] == 0
        np.testing.assert_array_equal(ids[r, :-1], IDS[r, pos[r]])          # token at its position
        np.testing.assert_array_equal(ids[r, 1:], IDS[r, query[r] + 1])      # target: the next in the order
        assert sorted(pos[r].tolist() + [query[r, -1] + 1]) == list(range(n))
    # the permuted loss differs from the standard one (the model sees another task)
    net = PanguAlphaWithLoss(CONFIG)
    assert float(net(ids, pos, None, query)) != float(net(IDS))


def test_a_bad_order_is_rejected():
    with pytest.raises(ValueError, match="random_order: order: expected a permutation"):
        random_order(IDS, order=np.zeros_like(IDS))

"""The PyTorch anchor of the benchmarks (benchmarks/torch_pangu.py) is autopar's PanGu-α: on
the same weights its loss and gradients equal autopar's to float32 rounding, so a timing ratio
between the two compares the same computation. Skipped where torch is not installed."""
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import autopar  # noqa: E402
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch_pangu as tp  # noqa: E402

# float32, unit roundoff 6e-8: sums of depth <= 128 in another order differ by ~1e-6 relative.
LOSS_RTOL = 2e-6
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-9   # the key bias's gradient is exactly 0 in exact arithmetic (softmax shift), ~1e-11 here


def ids_for(cfg, batch=2, seed=0):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.seq_length + 1)).astype(np.int32)
    ids[0, 5] = cfg.pad_id            # one padded label: the loss's non-pad mean is exercised
    return ids


@pytest.mark.parametrize("layer_order", ["final_ln_then_query", "query_then_final_ln"])
def test_torch_loss_and_gradients_equal_autopar_on_the_same_weights(layer_order):
    torch.set_num_threads(1)
    cfg = PanguAlphaConfig.preset("tiny", layer_order=layer_order)
    net = PanguAlphaWithLoss(cfg)
    ids = ids_for(cfg)
    loss, grads = autopar.value_and_grad(net)(ids)
    model = tp.build(cfg, net)
    theirs = model(torch.from_numpy(ids))
    theirs.backward()
    theirs = float(theirs.detach())
    assert abs(theirs - float(loss)) <= LOSS_RTOL * abs(float(loss))
    named = dict(model.named_parameters())
    assert set(named) == set(grads)
    for name, g in grads.items():
        diff = np.linalg.norm(named[name].grad.numpy() - g)
        assert diff <= GRAD_RTOL * np.linalg.norm(g) + GRAD_ATOL, name


def test_copy_weights_copies_every_parameter_bit_for_bit_and_refuses_another_config():
    cfg = PanguAlphaConfig.preset("tiny")
    net = PanguAlphaWithLoss(cfg)
    ours, theirs = tp.compare_loss(cfg, net, ids_for(cfg))
    assert abs(theirs - ours) <= LOSS_RTOL * abs(ours)
    named = dict(tp.build(cfg, net).named_parameters())
    for p in net.trainable_params():
        assert np.array_equal(named[p.name].detach().numpy(), p.asnumpy()), p.name
    other = PanguAlphaWithLoss(cfg.replace(num_layers=2))
    with pytest.raises(ValueError, match="copy_weights.*only in torch: \\['blocks.1"):
        tp.build(cfg, other)

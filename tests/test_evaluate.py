"""Perplexity and PanGu-α's perplexity-comparison classifier."""
import numpy as np
import pytest

from autopar import nn
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.pangu_alpha.evaluate import choose, perplexity, token_nll
from autopar.train import AdamWeightDecay


def test_token_nll_matches_the_training_loss():
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
    with_loss = PanguAlphaWithLoss(config)
    ids = np.random.default_rng(0).integers(10, 96, (2, config.seq_length + 1)).astype(np.int32)
    nll = token_nll(with_loss.backbone, [list(r[:-1]) for r in ids])
    # the training loss averages the NLL of labels ids[:, 1:] given ids[:, :-1]; token_nll
    # of rows ids[:, :-1] covers labels 1..S-1, so compare on those
    full = with_loss.backbone(ids[:, :-1])
    logp = full - np.log(np.exp(full).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], ids[:, 1:-1, None], -1)[..., 0]
    np.testing.assert_allclose(np.stack(nll), want, rtol=1e-10)
    assert perplexity(with_loss.backbone, [list(ids[0, :5])])[0] == pytest.approx(np.exp(nll[0][:4].mean()))


def test_scorer_picks_the_continuation_the_model_learned():
    config = PanguAlphaConfig.preset("tiny")
    net = PanguAlphaWithLoss(config)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 3e-3))
    pattern = [11, 23, 5, 42, 17]
    ids = np.stack([np.roll(np.resize(pattern, config.seq_length + 1), -k) for k in range(4)]).astype(np.int32)
    for _ in range(60):
        train(ids)
    context = [11, 23, 5, 42, 17, 11, 23]
    real = [5, 42, 17]
    wrong = [[42, 5, 17], [17, 17, 17], [60, 61, 62]]
    for k in range(4):  # the real continuation wins wherever it is placed among the candidates
        cands = wrong[:k] + [real] + wrong[k:]
        best, ppl = choose(net.backbone, context, cands)
        assert best == k, ppl


def test_rows_too_long_are_rejected():
    model = PanguAlpha(PanguAlphaConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"row 0: expected 2 to 16 tokens \(seq_length=16\), got 17"):
        token_nll(model, [list(range(17))])

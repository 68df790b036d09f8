"""PanGu-α serial: sizes, gradients, EOD reset, training."""
import time
import tracemalloc

import numpy as np
import pytest
from lm_harness import repeated_pattern_losses

import autopar
from autopar import nn
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay


@pytest.mark.parametrize("preset, want", [("2.6B", 2.62e9), ("13B", 1.28e10), ("200B", 2.07e11)])
def test_parameter_count_of_presets_without_allocating(preset, want):
    config = PanguAlphaConfig.preset(preset)
    tracemalloc.start()
    t0 = time.perf_counter()
    net = PanguAlphaWithLoss(config)
    total = sum(p.size for p in net.get_parameters())
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert abs(total - want) / want < 0.01
    assert total == config.parameter_count()
    assert not any(p.has_data for p in net.get_parameters())
    assert elapsed < 1.0 and peak < 20e6, (elapsed, peak)
    # the formula of REFERENCE.md agrees too
    h, layers = config.hidden_size, config.num_layers
    approx = 12 * layers * h * h + config.vocab_size * h + 2 * config.seq_length * h
    assert abs(total - approx) / approx < 0.002


def test_parameter_names_follow_the_model():
    names = list(PanguAlphaWithLoss(PanguAlphaConfig.preset("tiny")).parameters_dict())
    assert "word_embedding.embedding_table" in names
    assert "blocks.0.attention.dense1.weight" in names
    assert "blocks.1.output.projection.bias" in names
    assert "query_layer.top_query_embedding.embedding_table" in names
    assert "final_layernorm.gamma" in names


def tiny64(**kw):
    return PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", **kw)


def test_initialization_follows_the_paper():
    config = PanguAlphaConfig.preset("tiny", hidden_size=64, ffn_hidden_size=256, vocab_size=4000)
    net = PanguAlpha(config)
    w = net.blocks[0].attention.dense1.weight.asnumpy()
    out = net.blocks[0].output.projection.weight.asnumpy()
    assert abs(w.std() - 0.02) < 0.002
    assert abs(out.std() - 0.02 / np.sqrt(2 * config.num_layers)) < 0.001
    assert abs(net.position_embedding.embedding_table.asnumpy()).max() <= 0.04
    assert not net.blocks[0].attention.dense1.bias.asnumpy().any()


def test_loss_gradients_match_finite_differences():
    config = tiny64()
    net = PanguAlphaWithLoss(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (2, config.seq_length + 1)).astype(np.int32)
    ids[0, 5] = config.pad_id  # a padded label carries no loss
    loss, grads = autopar.value_and_grad(net)(ids)
    params = net.parameters_dict()
    eps = 1e-6
    for name in ["word_embedding.embedding_table", "position_embedding.embedding_table",
                 "blocks.0.attention.dense1.weight", "blocks.1.attention.dense2.bias",
                 "blocks.0.layernorm1.gamma", "blocks.1.output.mapping.weight", "final_layernorm.beta",
                 "query_layer.top_query_embedding.embedding_table", "query_layer.attention.projection.weight"]:
        p = params[name]
        base = p.asnumpy()
        flat_idx = rng.choice(base.size, 4, replace=False)
        if name == "word_embedding.embedding_table":  # make sure rows that are looked up are checked
            flat_idx[:2] = [ids[0, 0] * config.hidden_size, ids[1, 3] * config.hidden_size + 7]
        for j in flat_idx:
            vals = []
            for sign in (1, -1):
                v = base.copy()
                v.reshape(-1)[j] += sign * eps
                p.set_data(v)
                vals.append(float(net(ids)))
            p.set_data(base)
            num = (vals[0] - vals[1]) / (2 * eps)
            np.testing.assert_allclose(grads[name].reshape(-1)[j], num, rtol=1e-5, atol=1e-9, err_msg=name)


def test_eod_reset_makes_documents_independent():
    config = tiny64(eod_reset=True)
    net = PanguAlpha(config)
    rng = np.random.default_rng(1)
    a = rng.integers(10, config.vocab_size, 6)
    b = rng.integers(10, config.vocab_size, 9)
    eod = config.eod_id
    joined = np.concatenate([a, [eod], b])[None].astype(np.int32)          # (1, 16)
    alone_a = np.concatenate([a, [eod]])[None].astype(np.int32)            # (1, 7)
    alone_b = b[None].astype(np.int32)                                     # (1, 9)
    lj, la, lb = net(joined), net(alone_a), net(alone_b)
    np.testing.assert_allclose(lj[:, :7], la, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lj[:, 7:], lb, rtol=1e-10, atol=1e-12)
    # without eod_reset the second document sees the first
    plain = PanguAlpha(tiny64())
    assert not np.allclose(plain(joined)[:, 7:], plain(alone_b))


def test_training_lowers_loss_on_a_repeated_pattern():
    config = PanguAlphaConfig.preset("tiny")
    losses = repeated_pattern_losses(PanguAlphaWithLoss(config), config.seq_length)
    assert losses[0] > 4.0            # about log(96) at initialization
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 1.0, losses[::5]


def test_dropout_changes_with_step_and_is_reproducible():
    config = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)
    ids = np.random.default_rng(0).integers(0, 96, (2, 17)).astype(np.int32)

    def run():
        net = PanguAlphaWithLoss(config)
        opt = AdamWeightDecay(net.trainable_params(), learning_rate=0.0)
        train = nn.TrainOneStepCell(net, opt)
        return [float(train(ids)) for _ in range(2)]
    first, second = run(), run()
    assert first == second                 # same seed and step -> same masks
    assert first[0] != first[1]            # lr 0: only the dropout masks differ between steps


def test_bad_input_names_the_model_and_shape():
    net = PanguAlphaWithLoss(PanguAlphaConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"PanguAlpha: input_ids shape.*seq_length=16.*\(2, 40\)"):
        net(np.zeros((2, 41), np.int32))
    with pytest.raises(ValueError, match=r"PanguAlphaWithLoss: input_ids shape.*\(17,\)"):
        net(np.zeros(17, np.int32))
    with pytest.raises(ValueError, match=r"preset: name: expected one of .*got '7B'"):
        PanguAlphaConfig.preset("7B")
    with pytest.raises(ValueError, match=r"hidden_size: expected a multiple of num_heads=5, got 32"):
        PanguAlphaConfig.preset("tiny", num_heads=5)

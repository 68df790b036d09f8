"""PanGu-α tiny under data and model parallelism on in-process ranks equals serial."""
import numpy as np
import pytest
from lm_harness import run_sharded

import autopar
from autopar.comm import run_in_process
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


@pytest.fixture(scope="module")
def serial():
    net = PanguAlphaWithLoss(CONFIG)
    loss, grads = autopar.value_and_grad(net)(IDS)
    return loss, grads, {p.name: p.size for p in net.trainable_params()}


def run(dp, mp, vocab_emb_dp, mode):
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp, vocab_emb_dp=vocab_emb_dp)
    return run_sharded(lambda: PanguAlphaWithLoss(cfg), IDS, dp * mp, mode)


@pytest.mark.parametrize("dp, mp, vocab_emb_dp, mode", [
    (4, 1, True, "data_parallel"),
    (2, 2, True, "semi_auto_parallel"),
    (1, 4, True, "semi_auto_parallel"),
    (2, 2, False, "semi_auto_parallel"),
    (1, 4, False, "semi_auto_parallel"),
])
def test_sharded_pangu_equals_serial(serial, dp, mp, vocab_emb_dp, mode):
    loss, grads, sizes = serial
    res = run(dp, mp, vocab_emb_dp, mode)
    for r in res:
        np.testing.assert_allclose(r[0], loss, rtol=1e-12)
    for k, name in enumerate(grads):
        got = res[0][2][k].assemble({r: x[1][k] for r, x in enumerate(res)}, grads[name].shape)
        np.testing.assert_allclose(got, grads[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # each rank holds 1/mp of every model-parallel weight: the big ones shrink by mp
    held = res[0][3]
    for name in ("blocks.0.attention.dense1.weight", "blocks.1.output.mapping.weight",
                 "blocks.1.output.projection.weight"):
        assert held[name] * mp == sizes[name]
    if not vocab_emb_dp:
        assert held["word_embedding.embedding_table"] * mp == sizes["word_embedding.embedding_table"]
    if (dp, mp, vocab_emb_dp) == (1, 4, False):
        # vocabulary-parallel lookup and cross-entropy: nothing is gathered, logits included
        assert set(res[0][4]["count"]) == {"allreduce"}


def train_three_steps(net, ids):
    from autopar import nn
    from autopar.train import AdamWeightDecay
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=0.5)
    losses = [float(train(ids)) for _ in range(3)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


@pytest.mark.parametrize("dp, mp, mode", [(2, 2, "semi_auto_parallel"), (4, 1, "data_parallel")])
def test_three_training_steps_through_the_public_api_equal_serial(dp, mp, mode):
    from autopar.context import bound_world, parallel_context
    cfg = CONFIG.replace(dropout_rate=0.1)
    want_losses, want = train_three_steps(PanguAlphaWithLoss(cfg), IDS)
    full = mode == "semi_auto_parallel"

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg.replace(data_parallel=dp, model_parallel=mp))
            ids = IDS if full else np.split(IDS, dp * mp)[comm.rank]
            return train_three_steps(net, ids)
    with parallel_context(parallel_mode=mode, device_num=dp * mp, full_batch=full):
        res = run_in_process(dp * mp, body)
    for losses, weights in res:
        np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
        for name, w in want.items():
            np.testing.assert_allclose(weights[name], w, rtol=1e-8, atol=1e-12, err_msg=name)


def test_evaluation_program_sees_the_weights_training_updates():
    """Training and evaluation (dropout off) compile two sharded programs; they must share
    the parameter shards the optimizer updates."""
    from autopar import nn
    from autopar.context import bound_world, parallel_context
    from autopar.runtime.compiled import grad_program
    from autopar.train import SGD

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(dropout_rate=0.1, model_parallel=2))
            train = nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.5))
            net.set_train(False)
            before = float(grad_program(net, (IDS,), {}, train.params)((IDS,), {}, 0)[0])
            net.set_train(True)
            for _ in range(3):
                train(IDS)
            net.set_train(False)
            after = float(grad_program(net, (IDS,), {}, train.params)((IDS,), {}, 0)[0])
            return before, after, {p.name: p.asnumpy() for p in net.trainable_params()}
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        res = run_in_process(2, body)
    before, after, weights = res[0]
    assert after < before - 0.1                       # the evaluation program saw the updates
    # and it equals a serial evaluation with the trained weights
    net = PanguAlphaWithLoss(CONFIG)
    for p in net.trainable_params():
        p.set_data(weights[p.name])
    np.testing.assert_allclose(after, float(net(IDS)), rtol=1e-10)

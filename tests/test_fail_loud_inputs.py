"""Bad call arguments are named at the call, and a sharded forward program (generation under
model parallelism) checks that its ranks were fed the same prompt, as training does."""
from __future__ import annotations

import re

import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import CommChecks, run_in_process
from autopar.comm.consistency import RankDivergenceError
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import SGD

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


def trainer():
    net = PanguAlphaWithLoss(CONFIG)
    return nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))


@pytest.mark.parametrize("call", ["train", "value_and_grad", "forward"])
def test_a_python_list_of_ids_is_named_with_the_fix(call):
    fn = {"train": lambda: trainer(), "value_and_grad": lambda: autopar.value_and_grad(PanguAlphaWithLoss(CONFIG)),
          "forward": lambda: PanguAlpha(CONFIG)}[call]()
    with pytest.raises(TypeError, match=r"argument 0: expected a numpy array \(or a static None/bool/number/str\), "
                                        r"got a list of length 4; convert it first, e\.g\. np\.asarray\(ids"):
        fn(IDS.tolist())


def test_an_empty_batch_is_named_and_trains_nothing():
    train = trainer()
    before = [p.data.copy() for p in train.params]
    with pytest.raises(ValueError, match=r"argument 0: expected a batch of at least one row, got shape \(0, 17\)"):
        train(IDS[:0])
    assert all(np.array_equal(p.data, b) for p, b in zip(train.params, before))
    assert train.optimizer.step_count == 0
    assert np.isfinite(float(train(IDS)))     # the trainer still works on a real batch


def forward_logits(comm, other_prompt: bool):
    """Logits of a dp1 x mp2 forward (every rank reads the whole batch); rank 1 may be fed
    another prompt. Returns the logits or the divergence error's text."""
    with bound_world(comm):
        net = PanguAlpha(CONFIG.replace(model_parallel=2))
        net.set_train(False)
        ids = IDS[:, :-1].copy()
        if other_prompt and comm.rank == 1:
            ids[0, 2] += 1
        try:
            return net(ids)
        except RankDivergenceError as err:
            return str(err)


def mp2(*args, **kwargs):
    """run_in_process under a dp1 x mp2 context (set once, around all the ranks)."""
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        return run_in_process(2, forward_logits, *args, **kwargs)


def test_a_sharded_forward_fed_different_prompts_is_named_on_every_rank():
    texts = mp2(True)
    assert texts[0] == texts[1], texts
    assert re.fullmatch(r"ShardedForwardProgram \(consistency check at call 0\): input 0: expected the same data "
                        r"on the ranks that are fed the same batch .*, got digest [0-9a-f]{8} on rank 0, "
                        r"digest [0-9a-f]{8} on rank 1; .*", texts[0])


def test_a_sharded_forward_fed_the_same_prompt_equals_serial_with_the_check_on():
    serial = PanguAlpha(CONFIG)
    serial.set_train(False)
    want = serial(IDS[:, :-1])
    got = mp2(False, checks=CommChecks(check_every=1))
    for logits in got:
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)

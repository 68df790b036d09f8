"""Loss scaling (MindSpore's DynamicLossScaleUpdateCell / FixedLossScaleUpdateCell /
TrainOneStepWithLossScaleCell): the scale follows MindSpore's rule step by step; an
overflowed step changes nothing but the scale, and training then goes on as if it never
happened; an overflow on one rank skips the step on every rank; a model-parallel run whose
scale changes (one compiled program per scale, sharing the weight shards) equals serial; a
power-of-2 scale is undone exactly, so a fixed scale updates a float32 model bit for bit as
no scale does."""
from __future__ import annotations

import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.nn.wrappers import TrainingDivergedError
from autopar.train import SGD, AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", compute_dtype="float16", dropout_rate=0.1)
RNG = np.random.default_rng(3)
BATCHES = [RNG.integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32) for _ in range(4)]


def weights(net) -> dict[str, bytes]:
    return {p.name: p.asnumpy().tobytes() for p in net.trainable_params()}


def trainer(scale_sense, config=CONFIG, **kw):
    net = PanguAlphaWithLoss(config)
    opt = AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=0.01)
    return net, nn.TrainOneStepWithLossScaleCell(net, opt, scale_sense, clip_norm=1.0, **kw)


def test_dynamic_scale_follows_mindspore_step_by_step():
    """Window 3: the scale doubles on the 3rd step without overflow since the last change
    (MindSpore's cur_iter - last_overflow_iter >= window), an overflow halves it and
    restarts the window."""
    cell = nn.DynamicLossScaleUpdateCell(1024, 2, scale_window=3)
    flags = [False, False, False, False, True, False, False, False, False, False, False]
    scales = []
    for f in flags:
        assert cell.update(f) is f
        scales.append(cell.get_loss_scale())
    assert scales == [1024, 1024, 2048, 2048, 1024, 1024, 1024, 2048, 2048, 2048, 4096]


def test_dynamic_scale_never_goes_below_one():
    cell = nn.DynamicLossScaleUpdateCell(4.0, 2, 1000)
    scales = [cell.update(True) and cell.get_loss_scale() for _ in range(4)]
    assert scales == [2.0, 1.0, 1.0, 1.0]


def test_mindspore_defaults_are_pangu_alphas():
    cell = nn.DynamicLossScaleUpdateCell()
    assert (cell.get_loss_scale(), cell.scale_factor, cell.scale_window) == (2.0 ** 32, 2.0, 1000)


def test_an_overflow_skips_the_update_halves_the_scale_and_training_goes_on_as_if_it_never_happened():
    """float16 with 2^32: d loss/d logits (about 2^32 / 64 tokens) is past float16's 65504,
    so the step overflows. Nothing changes but the scale; the step count (which seeds
    dropout and the learning rate) stays, so once the scale fits, the first update equals
    that of a fresh model trained at that scale, bit for bit."""
    net, train = trainer(nn.DynamicLossScaleUpdateCell(2.0 ** 32, 2, 1000))
    before = weights(net)
    loss, overflow, scale = train(BATCHES[0])
    assert (overflow, scale, train.loss_scale) == (True, 2.0 ** 32, 2.0 ** 31)
    assert np.isfinite(loss) and loss.dtype == np.float32
    assert weights(net) == before
    assert train.optimizer.step_count == 0 and not any(train.optimizer.states)
    assert (train.skipped_steps, train.overflow_steps, train.consecutive_skips) == (1, 1, 0)
    while train.last_overflow:                      # halve until the gradients fit
        _, _, fitted = train(BATCHES[0])
    # d loss/d logits reaches scale / 64 tokens: below float16's 65504 needs scale < 2^22
    assert fitted == 2.0 ** (32 - train.overflow_steps) == train.loss_scale and 2.0 ** 8 <= fitted < 2.0 ** 22
    assert train.optimizer.step_count == 1 and train.skipped_steps == train.overflow_steps
    fresh_net, fresh = trainer(nn.FixedLossScaleUpdateCell(fitted))
    assert fresh(BATCHES[0])[1] is False
    assert weights(net) == weights(fresh_net)


def test_the_scale_grows_after_a_window_of_good_steps():
    net, train = trainer(nn.DynamicLossScaleUpdateCell(2.0 ** 10, 2, scale_window=2))
    used = []
    for b in BATCHES:
        loss, overflow, scale = train(b)
        assert not overflow
        used.append(scale)
    assert used == [2.0 ** 10, 2.0 ** 10, 2.0 ** 11, 2.0 ** 11]
    assert train.loss_scale == 2.0 ** 12 and train.optimizer.step_count == 4


@pytest.mark.parametrize("scale_sense", [nn.FixedLossScaleUpdateCell(2.0 ** 12), 2.0 ** 12, np.array(2.0 ** 12)])
def test_a_power_of_two_scale_updates_float32_bit_for_bit_as_no_scale(scale_sense):
    """Scaling d loss by 2^k scales every backward value by 2^k exactly (rounding is
    invariant under powers of 2 away from overflow and underflow), and dividing undoes it."""
    config = CONFIG.replace(compute_dtype="float32")
    plain = PanguAlphaWithLoss(config)
    base = nn.TrainOneStepCell(plain, AdamWeightDecay(plain.trainable_params(), 1e-3, weight_decay=0.01),
                               clip_norm=1.0)
    net, train = trainer(scale_sense, config)
    for b in BATCHES[:3]:
        want = base(b)
        loss, overflow, scale = train(b)
        assert (loss.tobytes(), overflow, scale) == (want.tobytes(), False, 2.0 ** 12)
    assert weights(net) == weights(plain)


def _six_steps(config):
    """(overflow, scale) and loss of six AdamWeightDecay (lr 1e-2) steps on one batch, with
    a dynamic scale from 2^19 and a window of 2."""
    net = PanguAlphaWithLoss(config)
    train = nn.TrainOneStepWithLossScaleCell(net, AdamWeightDecay(net.trainable_params(), 1e-2),
                                             nn.DynamicLossScaleUpdateCell(2.0 ** 19, 2, scale_window=2))
    steps = [train(BATCHES[0]) for _ in range(6)]
    return [(o, s) for _, o, s in steps], [float(loss) for loss, _, _ in steps], train.optimizer.step_count


def test_a_model_parallel_run_with_a_changing_scale_equals_serial():
    """Each scale compiles its own program; they share this rank's weight shards. The scales
    go 2^19 (overflow), 2^18, 2^18 (window: up), 2^19 (overflow: the program compiled at
    step 1, reused after two updates), 2^18 (overflow), 2^17: a program holding stale
    weights would give a loss off by the updates' effect (about 0.5), not by rounding."""
    want_flags, want_losses, want_steps = _six_steps(CONFIG)
    assert want_flags == [(True, 2.0 ** 19), (False, 2.0 ** 18), (False, 2.0 ** 18), (True, 2.0 ** 19),
                          (True, 2.0 ** 18), (False, 2.0 ** 17)] and want_steps == 3

    def body(comm):
        with bound_world(comm):
            return _six_steps(CONFIG.replace(model_parallel=2))
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        ranks = run_in_process(2, body)
    assert ranks[0] == ranks[1]
    flags, losses, steps = ranks[0]
    assert (flags, steps) == (want_flags, want_steps)
    eps = float(np.finfo(np.float16).eps)
    assert np.all(np.abs(np.array(losses) - want_losses) <= 2 * eps * np.array(want_losses)), (losses, want_losses)


class ColumnProbe(nn.Cell):
    """``sum(Dense(x) * C)`` with the Dense split over its 8 outputs (column parallel on 2
    ranks: rank 0 holds outputs 0-3). C is 1e4 on rank 0's outputs: scaled by 16, their
    float16 gradient (1.6e5) overflows, rank 1's (C = 1e-3) does not."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 8, weight_init=nn.Normal(0.1), compute_dtype="float16")
        self.dense.matmul.shard(((1, 1), (2, 1)))
        self.dense.bias_add.shard(((1, 2), (2,)))
        self.c = np.array([1e4] * 4 + [1e-3] * 4, np.float32)

    def construct(self, x):
        return (self.dense(x) * self.c).sum()         # x float32: Dense returns float32


def _probe_rank(comm):
    with bound_world(comm):
        net = ColumnProbe()
        train = nn.TrainOneStepWithLossScaleCell(net, SGD(net.trainable_params(), 0.1),
                                                 nn.DynamicLossScaleUpdateCell(16.0, 2, 1000))
        x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            _, local = train.build(x)((x,), {}, 0)         # this rank's scaled gradient shards
        before = weights(net)
        loss, overflow, scale = train(x)
        return (all(np.isfinite(g).all() for g in local), bool(np.isfinite(loss)), overflow, scale,
                train.loss_scale, weights(net) == before, train.optimizer.step_count)


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank():
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        rank0, rank1 = run_in_process(2, _probe_rank)
    assert (rank0[0], rank1[0]) == (False, True)          # only rank 0's gradient shards overflow
    for r in (rank0, rank1):
        assert r[1:] == (True, True, 16.0, 8.0, True, 0)


def test_a_non_finite_loss_is_divergence_not_overflow():
    """The forward pass, which no scale touches, gives NaN: the steps are skipped (and the
    scale lowered, as MindSpore does), counted as divergence, and stop the job after
    ``max_consecutive_skips`` in a row."""
    net, train = trainer(nn.DynamicLossScaleUpdateCell(2.0 ** 10, 2, 1000), max_consecutive_skips=3)
    p = net.trainable_params()[0]
    p.set_data(np.full(p.shape, np.nan, np.float32))
    for k in (1, 2):
        _, overflow, _ = train(BATCHES[0])
        assert overflow and train.consecutive_skips == k and train.overflow_steps == 0
    with pytest.raises(TrainingDivergedError, match=r"3 consecutive steps with a non-finite loss"):
        train(BATCHES[0])
    assert train.loss_scale == 2.0 ** 7


@pytest.mark.parametrize("make, error, message", [
    (lambda: nn.DynamicLossScaleUpdateCell(0.5), ValueError,
     "DynamicLossScaleUpdateCell: loss_scale_value: expected a finite float >= 1 (PanGu-alpha starts at 2**32), "
     "got 0.5"),
    (lambda: nn.DynamicLossScaleUpdateCell(2.0 ** 16, 1), ValueError,
     "DynamicLossScaleUpdateCell: scale_factor: expected a finite float > 1"),
    (lambda: nn.DynamicLossScaleUpdateCell(2.0 ** 16, 2, 0), ValueError,
     "DynamicLossScaleUpdateCell: scale_window: expected an int >= 1 (e.g. 1000), got 0"),
    (lambda: nn.DynamicLossScaleUpdateCell(2.0 ** 16, 2, 10.5), TypeError,
     "DynamicLossScaleUpdateCell: scale_window: expected an int >= 1"),
    (lambda: nn.FixedLossScaleUpdateCell(float("inf")), ValueError,
     "FixedLossScaleUpdateCell: loss_scale_value: expected a finite float > 0"),
    (lambda: trainer("2**16"), TypeError,
     "TrainOneStepWithLossScaleCell: scale_sense: expected a DynamicLossScaleUpdateCell, a "
     "FixedLossScaleUpdateCell or a number, got str"),
])
def test_bad_arguments_name_the_argument(make, error, message):
    with pytest.raises(error) as err:
        make()
    assert str(err.value).startswith(message), str(err.value)

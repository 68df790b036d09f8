"""Divergence is never silent: a step whose loss or gradient norm is NaN/inf skips the
update (weights, optimizer states and step count bit-for-bit unchanged, on every rank at
once, optimizer parallel included), the skips are counted, K in a row stop the job with a
clear error; an all-padding batch has loss 0 and updates nothing (serial, dp2, pipeline);
an optimizer over another network's parameters is an error."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from test_comm_mpi_launch import MPIEXEC, launch

from autopar import nn
from autopar.comm import run_in_process
from autopar.comm.mpi import launched_under_mpi
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.nn.wrappers import TrainingDivergedError, overflow
from autopar.runtime.compiled import value_and_grad
from autopar.train import SGD, Adam, AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)
PAD = CONFIG.pad_id
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(3)]
for _b in BATCHES:
    _b[_b == PAD] = PAD + 1          # no padding: every label counts
ALL_PAD = np.full((4, CONFIG.seq_length + 1), PAD, np.int32)
POISONED = "blocks.0.attention.dense1.weight"


def weights(net) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in net.trainable_params()}


def assert_bitwise(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert np.asarray(got[k]).tobytes() == np.asarray(want[k]).tobytes(), k


def pangu_trainer(opt=lambda ps: AdamWeightDecay(ps, 1e-2, weight_decay=0.1), cfg=CONFIG, **kw):
    net = PanguAlphaWithLoss(cfg)
    return net, nn.TrainOneStepCell(net, opt(net.trainable_params()), clip_norm=1.0, **kw)


def dense_trainer(**kw):
    net = nn.WithLossCell(nn.Dense(4, 8, param_dtype="float64"), nn.SoftmaxCrossEntropyWithLogits())
    return net, nn.TrainOneStepCell(net, Adam(net.trainable_params(), 0.1, weight_decay=0.01), **kw)


X = np.random.default_rng(0).standard_normal((4, 4))
Y = np.array([0, 3, 5, 7], np.int32)
X_NAN = X.copy()
X_NAN[0, 1] = np.nan


def test_overflow_is_true_exactly_for_a_nan_or_inf_loss_or_norm():
    assert not overflow(np.float32(2.5), 1e30)
    assert overflow(np.float32(np.nan), 1.0)
    assert overflow(np.array(1.0), np.inf)
    assert overflow(-np.inf, 0.0)
    assert not overflow(0.0, 0.0)


def test_a_skipped_step_changes_nothing_and_training_goes_on_as_if_it_never_happened():
    """[b0, b1] and [b0, <NaN weight: skipped>, b1] end bit-for-bit equal (dropout on: the
    skipped step did not advance the step count that seeds it)."""
    net_a, train_a = pangu_trainer()
    for b in BATCHES[:2]:
        train_a(b)

    net, train = pangu_trainer()
    train(BATCHES[0])
    before, states = weights(net), train.optimizer.state_dict()
    param = next(p for p in net.trainable_params() if p.name == POISONED)
    param.data[1, 2] = np.nan
    loss = train(BATCHES[1])
    assert not np.isfinite(loss) or not np.isfinite(train.last_grad_norm)
    assert (train.last_step_skipped, train.last_overflow, train.skipped_steps, train.consecutive_skips) == \
        (True, True, 1, 1)
    assert train.optimizer.step_count == 1
    param.data[1, 2] = before[POISONED][1, 2]
    assert_bitwise(weights(net), before)
    assert_bitwise(train.optimizer.state_dict(), states)

    train(BATCHES[1])
    assert (train.last_step_skipped, train.skipped_steps, train.consecutive_skips) == (False, 1, 0)
    assert_bitwise(weights(net), weights(net_a))
    assert_bitwise(train.optimizer.state_dict(), train_a.optimizer.state_dict())


def test_skips_are_counted_and_the_kth_consecutive_one_stops_the_job():
    net, train = dense_trainer(max_consecutive_skips=3)
    train(X, Y)
    for _ in range(2):
        assert np.isnan(train(X_NAN, Y))
    assert (train.skipped_steps, train.consecutive_skips, train.last_step_skipped) == (2, 2, True)
    train(X, Y)                                    # an update resets the run of skips
    assert (train.skipped_steps, train.consecutive_skips, train.last_step_skipped) == (2, 0, False)
    kept = weights(net)
    train(X_NAN, Y)
    train(X_NAN, Y)
    with pytest.raises(TrainingDivergedError) as err:
        train(X_NAN, Y)
    msg = str(err.value)
    assert isinstance(err.value, FloatingPointError)
    assert msg.startswith("TrainOneStepCell: loss and gradient norm: expected finite values, got 3 consecutive "
                          "steps with a non-finite loss or gradient norm")
    assert "last: loss nan, gradient norm nan; updates applied so far: 2" in msg
    assert "every weight of this rank is finite" in msg
    assert "lower the learning rate, check the data" in msg and "resume from the last checkpoint" in msg
    assert train.skipped_steps == 5
    assert_bitwise(weights(net), kept)


def test_on_non_finite_raise_stops_at_the_first_non_finite_step_without_updating():
    net, train = dense_trainer(on_non_finite="raise")
    train(X, Y)
    kept, states = weights(net), train.optimizer.state_dict()
    with pytest.raises(TrainingDivergedError, match=r"got loss nan and gradient norm nan \(updates applied so "
                                                    r"far: 1; every weight of this rank is finite\)"):
        train(X_NAN, Y)
    assert_bitwise(weights(net), kept)
    assert_bitwise(train.optimizer.state_dict(), states)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy's inf - inf inside the step: expected here
def test_a_nan_weight_stops_the_job_after_k_skips_naming_the_weight():
    net, train = pangu_trainer(max_consecutive_skips=4)
    param = next(p for p in net.trainable_params() if p.name == POISONED)
    param.data[0, 0] = np.inf
    before = weights(net)
    calls = 0
    with pytest.raises(TrainingDivergedError) as err:
        for b in BATCHES * 3:
            calls += 1
            train(b)
    assert calls == 4 and train.optimizer.step_count == 0
    assert f"non-finite weights on this rank: ['{POISONED}']" in str(err.value)
    assert "4 consecutive steps" in str(err.value)
    assert_bitwise(weights(net), before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy's overflow warnings: expected here
@pytest.mark.parametrize("make", [lambda ps: SGD(ps, 1e5), lambda ps: AdamWeightDecay(ps, 1e5)], ids=["sgd", "adamw"])
def test_a_huge_learning_rate_stops_the_job_instead_of_training_on_in_nan(make):
    net, train = pangu_trainer(make, max_consecutive_skips=3)
    losses = []
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps with a non-finite loss or gradient norm"):
        for _ in range(20):
            losses.append(float(train(BATCHES[0])))
    assert len(losses) <= 5 and train.optimizer.step_count <= 2     # a step or two of growth, then 3 skips
    assert all(np.isfinite(w).all() for w in weights(net).values())  # no NaN was written into a weight


def test_an_all_padding_batch_has_loss_zero_zero_gradients_and_updates_nothing():
    net = PanguAlphaWithLoss(CONFIG).set_train(True)
    loss, grads = value_and_grad(net)(ALL_PAD)
    assert float(loss) == 0.0
    assert all(not g.any() for g in grads.values())

    net, train = pangu_trainer()        # AdamWeightDecay, weight decay 0.1: a zero-gradient update would move
    train(BATCHES[0])
    before, states = weights(net), train.optimizer.state_dict()
    assert float(train(ALL_PAD)) == 0.0
    assert (train.last_step_skipped, train.last_overflow, train.empty_steps, train.skipped_steps) == \
        (True, False, 1, 0)
    assert train.optimizer.step_count == 1
    assert_bitwise(weights(net), before)
    assert_bitwise(train.optimizer.state_dict(), states)


def test_masked_mean_loss_of_all_masked_rows_is_zero_not_nan():
    loss = nn.SoftmaxCrossEntropyWithLogits()
    logits = np.random.default_rng(1).standard_normal((3, 5))
    assert float(loss(logits, np.array([1, 2, 3], np.int32), np.zeros(3))) == 0.0


def _dp2(body_fn, **ctx):
    with parallel_context(parallel_mode="data_parallel", device_num=2, **ctx):
        return run_in_process(2, lambda comm: _bound(comm, body_fn))


def _bound(comm, body_fn):
    with bound_world(comm):
        return body_fn(comm)


def test_padding_under_data_parallel_gives_the_serial_loss_and_no_update():
    """Rank 0's half all padding: the loss is the serial one (the global token mean, not a
    mean of per-rank means) and identical on both ranks; an all-padding batch: loss 0 on
    both, weights unchanged."""
    mixed = BATCHES[1].copy()
    mixed[:2] = PAD
    serial_loss, _ = value_and_grad(PanguAlphaWithLoss(CONFIG.replace(dropout_rate=0.0)))(mixed)

    def body(comm):
        net = PanguAlphaWithLoss(CONFIG.replace(dropout_rate=0.0))
        train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.1),
                                    clip_norm=1.0)
        half = slice(2 * comm.rank, 2 * comm.rank + 2)
        first = train(mixed[half])
        before = weights(net)
        empty = train(ALL_PAD[half])
        return np.asarray(first), np.asarray(empty), train.empty_steps, before, weights(net)
    results = _dp2(body)
    assert results[0][0].tobytes() == results[1][0].tobytes()
    np.testing.assert_allclose(results[0][0], serial_loss, rtol=1e-6)
    for first, empty, empties, before, after in results:
        assert float(empty) == 0.0 and empties == 1
        assert_bitwise(after, before)


def test_nan_on_one_rank_skips_the_step_on_every_rank_under_optimizer_parallel():
    """dp2 with ZeRO-1 (the Dense weight's update sliced over the ranks): a NaN in rank 0's
    rows only makes both ranks skip (same loss, same norm); training then ends bit-for-bit
    where it ends without that batch."""
    def body(comm, with_bad: bool):
        net, train = dense_trainer(clip_norm=1.0)
        rows = slice(2 * comm.rank, 2 * comm.rank + 2)
        prog = train.build(X[rows], Y[rows])
        sliced = [s.name for s, whole in zip(prog.shards, prog.param_shards) if s is not whole]
        train(X[rows], Y[rows])
        seen = None
        if with_bad:
            loss = train(X_NAN[rows], Y[rows])
            seen = (np.asarray(loss).tobytes(), train.last_grad_norm, train.last_step_skipped, train.skipped_steps)
        train(2 * X[rows], Y[rows])
        return sliced, seen, weights(net), train.optimizer.step_count

    ctx = dict(enable_parallel_optimizer=True, parallel_optimizer_threshold=0)
    clean = _dp2(lambda comm: body(comm, False), **ctx)
    bad = _dp2(lambda comm: body(comm, True), **ctx)
    assert "weight" in bad[0][0]                            # its update is split over the two ranks
    (l0, n0, s0, k0), (l1, n1, s1, k1) = bad[0][1], bad[1][1]
    assert l0 == l1 and np.isnan(n0) and np.isnan(n1) and s0 and s1 and k0 == k1 == 1
    for (_, _, w_bad, steps_bad), (_, _, w_clean, steps_clean) in zip(bad, clean):
        assert steps_bad == steps_clean == 2
        assert_bitwise(w_bad, w_clean)


def test_an_all_padding_batch_under_a_pipeline_has_loss_zero_and_updates_nothing():
    cfg = CONFIG.replace(dropout_rate=0.0)

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg)
            nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], None, 2)
            train = nn.TrainOneStepCell(nn.PipelineCell(net, 2), AdamWeightDecay(net.trainable_params(), 1e-2,
                                                                                  weight_decay=0.1))
            train(BATCHES[0])
            before = weights(net)
            loss = train(ALL_PAD)
            return float(loss), train.empty_steps, train.optimizer.step_count, before, weights(net)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True):
        results = run_in_process(2, body)
    for loss, empties, steps, before, after in results:
        assert (loss, empties, steps) == (0.0, 1, 1)
        assert_bitwise(after, before)


def test_an_optimizer_over_another_networks_parameters_is_an_error():
    net, other = PanguAlphaWithLoss(CONFIG), PanguAlphaWithLoss(CONFIG)
    with pytest.raises(ValueError, match=r"TrainOneStepCell: optimizer.params: expected trainable parameters of "
                                         r"the network \(PanguAlphaWithLoss\), got \d+ that are not \(same names, "
                                         r"other Parameter objects: another instance of the model\): "
                                         r"\['word_embedding.embedding_table', .*build the optimizer from this "
                                         r"network"):
        nn.TrainOneStepCell(net, AdamWeightDecay(other.trainable_params(), 1e-3))
    dense = nn.Dense(2, 2)
    dense.weight.name = "stray.weight"
    with pytest.raises(ValueError, match=r"got 1 that are not: \['stray.weight'\]"):
        nn.TrainOneStepCell(net, SGD(net.trainable_params() + [dense.weight], 0.1))
    nn.TrainOneStepCell(net, SGD(net.trainable_params()[:3], 0.1))     # a subset is fine (frozen rest)


@pytest.mark.parametrize("kwargs, error", [
    (dict(clip_norm=0.0), r"clip_norm: expected None or a finite float > 0, got 0.0"),
    (dict(clip_norm=float("nan")), r"clip_norm: expected None or a finite float > 0, got nan"),
    (dict(on_non_finite="ignore"), r"on_non_finite: expected one of \('skip', 'raise'\), got 'ignore'"),
    (dict(max_consecutive_skips=0), r"max_consecutive_skips: expected an int >= 1, got 0"),
    (dict(max_consecutive_skips=2.5), r"max_consecutive_skips: expected an int >= 1, got 2.5"),
    (dict(sens=0.0), r"sens: expected a finite float > 0 \(the loss gradient's seed\), got 0.0"),
])
def test_trainer_arguments_are_checked(kwargs, error):
    net = nn.WithLossCell(nn.Dense(2, 2), nn.SoftmaxCrossEntropyWithLogits())
    with pytest.raises(ValueError, match="TrainOneStepCell: " + error):
        nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1), **kwargs)


def test_the_optimizer_must_be_an_optimizer():
    net = nn.WithLossCell(nn.Dense(2, 2), nn.SoftmaxCrossEntropyWithLogits())
    with pytest.raises(TypeError, match=r"TrainOneStepCell: optimizer: expected an autopar Optimizer .*got list"):
        nn.TrainOneStepCell(net, net.trainable_params())


MPI_SCRIPT = """
import hashlib
import numpy as np
from autopar import nn
from autopar.comm import world
from autopar.context import bound_world, parallel_context
from autopar.nn.wrappers import TrainingDivergedError
from autopar.train import Adam

comm = world()
x = np.random.default_rng(0).standard_normal((4, 4))
y = np.array([0, 3, 5, 7], np.int32)
rows = slice(2 * comm.rank, 2 * comm.rank + 2)
with bound_world(comm), parallel_context(parallel_mode="data_parallel", device_num=2,
                                         enable_parallel_optimizer=True, parallel_optimizer_threshold=0):
    net = nn.WithLossCell(nn.Dense(4, 8, param_dtype="float64"), nn.SoftmaxCrossEntropyWithLogits())
    train = nn.TrainOneStepCell(net, Adam(net.trainable_params(), 0.1), max_consecutive_skips=3)
    train(x[rows], y[rows])
    bad = x[rows].copy()
    if comm.rank == 0:
        bad[0, 0] = np.nan          # rank 0's rows only
    calls = 0
    try:
        for calls in range(1, 10):
            train(bad, y[rows])
    except TrainingDivergedError as err:
        message = str(err)
    digest = hashlib.sha256(b"".join(p.asnumpy().tobytes() for p in net.trainable_params())).hexdigest()[:16]
    print(f"rank {comm.rank}: stopped at call {calls}, skipped {train.skipped_steps}, "
          f"steps {train.optimizer.step_count}, weights {digest}", flush=True)
    if comm.rank == 1:
        print(message, flush=True)
"""


@pytest.mark.skipif(MPIEXEC is None or launched_under_mpi(), reason="needs mpiexec (and not to run under it)")
def test_nan_on_one_mpi_rank_skips_on_both_and_stops_both_after_k(tmp_path):
    """Real mpiexec -n 2, dp2 with optimizer parallel: both ranks skip the same steps (no
    rank left waiting in the weight all-gather) and stop at the same call, weights equal."""
    script = tmp_path / "diverge.py"
    script.write_text(MPI_SCRIPT)
    rc, out, err, elapsed = launch([sys.executable, str(script)], timeout=60)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    lines = sorted(re.findall(r"rank (\d): (stopped at call 3, skipped 3, steps 1, weights [0-9a-f]{16})", out))
    assert [r for r, _ in lines] == ["0", "1"], out
    assert lines[0][1] == lines[1][1], out                  # the same weights on both ranks
    assert "3 consecutive steps with a non-finite loss or gradient norm" in out, out
    assert elapsed < 30, elapsed

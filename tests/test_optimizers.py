"""Optimizers, learning-rate schedules and clipping against hand-derived numbers."""
import math

import numpy as np
import pytest

from autopar.nn import Normal, Parameter, optimizers
from autopar.train import (
    SGD,
    Adam,
    AdamWeightDecay,
    CosineDecayLR,
    PolynomialDecayLR,
    WarmUpCosineDecayLR,
    WarmUpLR,
    clip_by_global_norm,
    global_norm,
)


def param(values, name):
    return Parameter(np.array(values, dtype=np.float64), name=name)


# ---- AdamWeightDecay -----------------------------------------------------------------------
def test_adam_weight_decay_two_steps_by_hand():
    # b1 = 0.5, b2 = 0.75, eps = 0.5, lr = 0.1, wd = 0.5; w is 2-D (decayed), b is 1-D (not).
    w = param([[2.0, -2.0]], "w")
    b = param([1.0], "b")
    opt = AdamWeightDecay([w, b], 0.1, beta1=0.5, beta2=0.75, eps=0.5, weight_decay=0.5)
    assert opt.decay_flags == (True, False)

    opt.step([np.array([[4.0, -4.0]]), np.array([4.0])])
    # step 1: m = 0.5 * 4 = 2; v = 0.25 * 16 = 4; m / (sqrt(v) + eps) = 2 / 2.5 = 0.8 (no bias
    # correction). w: update = 0.8 + 0.5 * 2 = 1.8, w = 2 - 0.1 * 1.8 = 1.82.  b: 1 - 0.08 = 0.92
    np.testing.assert_allclose(w.data, [[1.82, -1.82]], rtol=0, atol=1e-14)
    np.testing.assert_allclose(b.data, [0.92], rtol=0, atol=1e-14)
    np.testing.assert_allclose(opt.states[0]["moment1"], [[2.0, -2.0]], atol=1e-14)
    np.testing.assert_allclose(opt.states[0]["moment2"], [[4.0, 4.0]], atol=1e-14)

    opt.step([np.array([[2.0, -2.0]]), np.array([2.0])])
    # step 2: m = 0.5 * 2 + 0.5 * 2 = 2; v = 0.75 * 4 + 0.25 * 4 = 4; 2 / 2.5 = 0.8.
    # w: update = 0.8 + 0.5 * 1.82 = 1.71, w = 1.82 - 0.171 = 1.649.  b: 0.92 - 0.08 = 0.84
    np.testing.assert_allclose(w.data, [[1.649, -1.649]], rtol=0, atol=1e-14)
    np.testing.assert_allclose(b.data, [0.84], rtol=0, atol=1e-14)
    assert opt.step_count == 2


def test_adam_weight_decay_custom_filter_decays_the_bias():
    b = param([1.0], "b")
    opt = AdamWeightDecay([b], 0.1, beta1=0.5, beta2=0.75, eps=0.5, weight_decay=0.5,
                          decay_filter=lambda p: p.name == "b")
    opt.step([np.array([4.0])])
    # update = 0.8 + 0.5 * 1.0 = 1.3; b = 1 - 0.13
    np.testing.assert_allclose(b.data, [0.87], rtol=0, atol=1e-14)


def test_adam_weight_decay_blocks_match_textbook_expression(monkeypatch):
    # 8-element blocks over 21 elements: remainders and block edges must all be updated.
    monkeypatch.setattr(optimizers, "BLOCK_BYTES", 64)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 7))
    w = Parameter(p0.copy(), name="w")
    opt = AdamWeightDecay([w], 0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for _ in range(3):
        g = rng.standard_normal((3, 7))
        opt.step([g])
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        p = p - 0.01 * (m / (np.sqrt(v) + 1e-6) + 0.1 * p)
    np.testing.assert_allclose(w.data, p, rtol=1e-13, atol=1e-15)


# ---- Adam ----------------------------------------------------------------------------------
def test_adam_first_step_is_lr_times_sign_of_grad():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(50)
    g = rng.standard_normal(50) * 10.0 ** rng.integers(-3, 3, 50)
    w = Parameter(p0.copy(), name="w")
    # with these betas an uncorrected step would be 0.2 / sqrt(0.1) = 0.63 of lr
    Adam([w], 1e-3, beta1=0.8, beta2=0.9, eps=1e-12).step([g])
    np.testing.assert_allclose(w.data - p0, -1e-3 * np.sign(g), rtol=1e-6)


def test_adam_l2_decay_enters_the_gradient():
    # g' = g + wd * p = -0.05 + 0.1 * 1.0 = +0.05, so the first step goes down by lr
    w = param([1.0], "w")
    Adam([w], 1e-3, eps=1e-12, weight_decay=0.1).step([np.array([-0.05])])
    np.testing.assert_allclose(w.data, [1.0 - 1e-3], rtol=1e-9)


def test_adam_second_step_by_hand():
    # b1 = 0.5, b2 = 0.75, eps = 1e-300 (negligible), lr = 1, g = 4 then 0, p0 = 0.
    # step 1: m = 2, v = 4, lr_t = sqrt(0.25) / 0.5 = 1 -> p = -2 / 2 = -1
    # step 2: m = 1, v = 3, lr_t = sqrt(1 - 0.5625) / (1 - 0.25) = sqrt(0.4375) / 0.75
    #         p = -1 - lr_t * 1 / sqrt(3)
    w = param([0.0], "w")
    opt = Adam([w], 1.0, beta1=0.5, beta2=0.75, eps=1e-300)
    opt.step([np.array([4.0])])
    np.testing.assert_allclose(w.data, [-1.0], rtol=1e-14)
    opt.step([np.array([0.0])])
    np.testing.assert_allclose(w.data, [-1.0 - math.sqrt(0.4375) / 0.75 / math.sqrt(3.0)], rtol=1e-14)


# ---- SGD -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, p1, p2", [
    # no momentum: 1 - 0.1 * 1 = 0.9; 0.9 - 0.1 * 0.5 = 0.85
    (dict(), 0.9, 0.85),
    # momentum: v1 = 1, p1 = 0.9; v2 = 0.9 * 1 + 0.5 = 1.4, p2 = 0.9 - 0.14 = 0.76
    (dict(momentum=0.9), 0.9, 0.76),
    # nesterov: p1 = 1 - 0.1 * (1 + 0.9 * 1) = 0.81; p2 = 0.81 - 0.1 * (0.5 + 0.9 * 1.4) = 0.634
    (dict(momentum=0.9, nesterov=True), 0.81, 0.634),
    # wd 0.1, dampening 0.5: d1 = 1.1, v1 = d1 (first step undamped), p1 = 0.89;
    # d2 = 0.5 + 0.089 = 0.589, v2 = 0.99 + 0.2945 = 1.2845, p2 = 0.89 - 0.12845 = 0.76155
    (dict(momentum=0.9, dampening=0.5, weight_decay=0.1), 0.89, 0.76155),
])
def test_sgd_two_steps_by_hand(kwargs, p1, p2):
    w = param([1.0], "w")
    opt = SGD([w], 0.1, **kwargs)
    opt.step([np.array([1.0])])
    np.testing.assert_allclose(w.data, [p1], rtol=0, atol=1e-14)
    opt.step([np.array([0.5])])
    np.testing.assert_allclose(w.data, [p2], rtol=0, atol=1e-14)


def test_schedule_drives_the_step():
    # WarmUpLR(1, 2): the first update uses lr(0) = 0, the second lr(1) = 0.5
    w = param([1.0], "w")
    opt = SGD([w], WarmUpLR(1.0, 2))
    opt.step([np.array([1.0])])
    assert w.data[0] == 1.0
    assert opt.get_lr() == 0.5
    opt.step([np.array([1.0])])
    assert w.data[0] == 0.5


# ---- schedules -----------------------------------------------------------------------------
def test_warmup_cosine_decay_values():
    lr = WarmUpCosineDecayLR(learning_rate=1.0, end_learning_rate=0.1, warmup_steps=4, decay_steps=12)
    # warm-up: step / 4; then 0.1 + 0.45 * (1 + cos(pi * step / 12)), cosine counted from step 0
    assert lr(0) == 0.0
    assert lr(2) == pytest.approx(0.5, abs=1e-15)
    assert lr(3) == pytest.approx(0.75, abs=1e-15)
    assert lr(4) == pytest.approx(0.775, abs=1e-15)   # end of warm-up: cos(pi / 3) = 0.5
    assert lr(6) == pytest.approx(0.55, abs=1e-15)    # mid-decay: cos(pi / 2) = 0
    assert lr(8) == pytest.approx(0.325, abs=1e-15)   # cos(2 pi / 3) = -0.5
    assert lr(12) == pytest.approx(0.1, abs=1e-15)    # end
    assert lr(1000) == pytest.approx(0.1, abs=1e-15)  # after the end
    assert WarmUpCosineDecayLR(1.0, 0.1, 0, 12)(0) == 1.0  # no warm-up


def test_mindspore_schedules():
    assert WarmUpLR(0.2, 4)(1) == pytest.approx(0.05, abs=1e-15)
    assert WarmUpLR(0.2, 4)(9) == pytest.approx(0.2, abs=1e-15)
    cos = CosineDecayLR(min_lr=0.1, max_lr=1.0, decay_steps=12)
    assert [cos(0), cos(6), cos(12), cos(13)] == pytest.approx([1.0, 0.55, 0.1, 0.1], abs=1e-15)
    poly = PolynomialDecayLR(1.0, 0.0, 4, power=2.0)
    assert [poly(0), poly(2), poly(4), poly(7)] == pytest.approx([1.0, 0.25, 0.0, 0.0], abs=1e-15)
    # restart every 4 steps: step 6 is 6/8 of the way through the second period
    assert PolynomialDecayLR(1.0, 0.0, 4, 2.0, update_decay_steps=True)(6) == pytest.approx(0.0625)


@pytest.mark.parametrize("make, match", [
    (lambda: WarmUpCosineDecayLR(-1.0, 0.0, 2, 10), "learning_rate: expected a finite float >= 0, got -1.0"),
    (lambda: WarmUpCosineDecayLR(1.0, 0.0, 20, 10), "warmup_steps: expected <= decay_steps = 10, got 20"),
    (lambda: WarmUpCosineDecayLR(1.0, 2.0, 2, 10), "end_learning_rate"),
    (lambda: WarmUpLR(1.0, 0), "warmup_steps: expected an int >= 1, got 0"),
    (lambda: CosineDecayLR(1.0, 0.5, 10), "min_lr: expected <= max_lr"),
    (lambda: PolynomialDecayLR(1.0, 0.0, 10, power=0.0), "power"),
    (lambda: WarmUpLR(1.0, 4)(-1), "step: expected an int >= 0"),
])
def test_schedule_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- clipping ------------------------------------------------------------------------------
def test_global_norm_is_sqrt_of_sum_of_squares():
    assert global_norm([np.array([3.0, 4.0]), np.array([[12.0]])]) == 13.0
    rng = np.random.default_rng(2)
    # 2M float32 values of mean 1: a float32 sum would be off by far more than 1e-12
    grads = [(1.0 + rng.random(2_000_000)).astype(np.float32), rng.random((300, 7)).astype(np.float32).T]
    exact = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert global_norm(grads) == pytest.approx(exact, rel=1e-12)


def test_clip_scales_to_exactly_clip_norm():
    a, b = np.array([3.0, 4.0]), np.array([[12.0]])
    grads, norm = clip_by_global_norm([a, b], 1.0)
    assert norm == 13.0
    assert grads[0] is a and grads[1] is b                      # in place
    np.testing.assert_allclose(a, [3 / 13, 4 / 13], rtol=1e-15)
    np.testing.assert_allclose(b, [[12 / 13]], rtol=1e-15)
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-15)


def test_clip_below_the_threshold_is_a_no_op():
    a = np.array([3.0, 4.0])
    _, norm = clip_by_global_norm([a], 5.5)
    assert norm == 5.0
    np.testing.assert_array_equal(a, [3.0, 4.0])
    with pytest.raises(ValueError, match="clip_norm: expected a finite float > 0, got 0"):
        clip_by_global_norm([a], 0)


# ---- state ---------------------------------------------------------------------------------
def make_params():
    rng = np.random.default_rng(3)
    return [Parameter(rng.standard_normal((4, 3)), name="blocks.0.dense.weight"),
            Parameter(rng.standard_normal(3), name="blocks.0.dense.bias")]


@pytest.mark.parametrize("make_opt", [
    lambda ps: AdamWeightDecay(ps, WarmUpCosineDecayLR(1e-2, 1e-3, 2, 6), weight_decay=0.1),
    lambda ps: Adam(ps, 1e-2, weight_decay=0.1),
    lambda ps: SGD(ps, 1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
])
def test_state_dict_round_trip_continues_identically(make_opt):
    rng = np.random.default_rng(4)
    grads = [[rng.standard_normal((4, 3)), rng.standard_normal(3)] for _ in range(4)]

    straight = make_params()
    opt = make_opt(straight)
    for g in grads:
        opt.step(g)

    first = make_params()
    opt1 = make_opt(first)
    for g in grads[:2]:
        opt1.step(g)
    saved = opt1.state_dict()
    weights = [p.data.copy() for p in first]
    assert all(isinstance(v, np.ndarray) for v in saved.values())
    assert int(saved["step"]) == 2
    if opt1.state_names:
        assert f"{opt1.state_names[0]}.blocks.0.dense.weight" in saved
    opt1.step(grads[2])                         # the saved copy must not move with the live state

    resumed = make_params()
    for p, w in zip(resumed, weights):
        p.set_data(w)
    opt2 = make_opt(resumed)
    opt2.load_state_dict(saved)
    for g in grads[2:]:
        opt2.step(g)
    for p, q in zip(resumed, straight):
        np.testing.assert_array_equal(p.data, q.data)


def test_states_are_allocated_on_the_first_step_in_the_param_dtype():
    w = Parameter(Normal(0.02), (64, 32), "float32", name="w")
    h = Parameter(Normal(0.02), (32,), "float16", name="h")
    opt = AdamWeightDecay([w, h], 1e-3)
    assert not w.has_data and not h.has_data           # building touched no data
    assert opt.states == [{}, {}]
    assert set(opt.state_dict()) == {"step"}
    opt.step([np.ones((64, 32), np.float32), np.ones(32, np.float16)])
    assert opt.states[0]["moment1"].dtype == np.float32 and opt.states[0]["moment1"].shape == (64, 32)
    assert opt.states[1]["moment2"].dtype == np.float16
    assert set(opt.state_dict()) == {"step", "moment1.w", "moment2.w", "moment1.h", "moment2.h"}


def test_load_state_dict_rejects_a_mismatch():
    opt = Adam(make_params(), 1e-3)
    opt.step([np.ones((4, 3)), np.ones(3)])
    saved = opt.state_dict()
    other = Adam([Parameter(np.zeros(3), name="blocks.0.dense.bias")], 1e-3)
    with pytest.raises(ValueError, match="unexpected.*moment1.blocks.0.dense.weight"):
        other.load_state_dict(saved)
    del saved["moment2.blocks.0.dense.bias"]
    with pytest.raises(ValueError, match="missing.*moment2.blocks.0.dense.bias"):
        Adam(make_params(), 1e-3).load_state_dict(saved)


# ---- bad arguments -------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda ps: SGD(ps, -0.1), "SGD: learning_rate: expected a finite float >= 0, got -0.1"),
    (lambda ps: Adam(ps, 1e-3, beta1=1.0), r"Adam: beta1: expected a float in \[0, 1\), got 1.0"),
    (lambda ps: AdamWeightDecay(ps, 1e-3, beta2=-0.1), "AdamWeightDecay: beta2: expected .*, got -0.1"),
    (lambda ps: AdamWeightDecay(ps, 1e-3, eps=0.0), "eps: expected a finite float > 0"),
    (lambda ps: AdamWeightDecay(ps, 1e-3, weight_decay=-1.0), "weight_decay"),
    (lambda ps: SGD(ps, 0.1, nesterov=True), "nesterov: expected momentum > 0"),
    (lambda ps: SGD(ps + [Parameter(np.zeros(2), name="blocks.0.dense.bias")], 0.1), "unique non-empty name"),
])
def test_bad_optimizer_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_params())


def test_bad_grads():
    opt = AdamWeightDecay(make_params(), 1e-3)
    with pytest.raises(ValueError, match=r"grads: expected 2 arrays \(one per parameter\), got 1"):
        opt.step([np.ones((4, 3))])
    with pytest.raises(ValueError, match=r"gradient of 'blocks.0.dense.bias': expected shape \(3,\), got \(4,\)"):
        opt.step([np.ones((4, 3)), np.ones(4)])
    assert opt.step_count == 0 and opt.states == [{}, {}]   # a rejected step changes nothing

"""Model configs and optimizers check their arguments and name the one that is wrong.

Fuzzed: arbitrary values (ints, negatives, zeros, floats, NaN, inf, strings, None, tuples)
for any fields of PanguAlphaConfig and YuanConfig give either a config whose tiny model
builds and computes a finite loss, or a ValueError/TypeError whose message starts with the
class and a field name -- never another exception."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopar import nn
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.yuan import YuanConfig, YuanWithLoss
from autopar.train import SGD, Adam, AdamWeightDecay

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 130), st.just(10 ** 9),
                st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1e-5, 2.0]),
                st.text(max_size=4), st.sampled_from(["float16", "float32", "float64", "flaot32", "bfloat16", "int32"]),
                st.sampled_from(["final_ln_then_query", "query_then_final_ln"]),
                st.tuples(st.integers(-1, 3)), st.lists(st.integers(0, 3), max_size=2), st.just(np.int64(8)))
# values a tiny model accepts, so that a fair share of the drawn configs are valid
PLAUSIBLE = {
    "vocab_size": st.sampled_from([16, 64, 96, 128]), "seq_length": st.integers(1, 24),
    "hidden_size": st.sampled_from([8, 16, 32, 48]), "num_layers": st.integers(1, 3),
    "num_heads": st.sampled_from([1, 2, 4, 8]), "ffn_hidden_size": st.sampled_from([8, 32, 64]),
    "dropout_rate": st.floats(0, 0.99), "eod_id": st.integers(0, 20), "pad_id": st.integers(0, 20),
    "layernorm_epsilon": st.floats(1e-12, 1.0), "rms_eps": st.floats(1e-12, 1.0),
    "init_std": st.floats(1e-4, 1.0), "rotary_base": st.floats(1.5, 1e5),
    "data_parallel": st.integers(1, 4), "model_parallel": st.sampled_from([1, 2, 4]),
    "compute_dtype": st.sampled_from(["float32", "float64", np.float16]), "param_dtype": st.just("float64"),
    "layers_per_stage": st.sampled_from([None, (1, 1), (2,)]), "eod_reset": st.booleans(),
    "vocab_emb_dp": st.booleans(),
}
SMALL = {"vocab_size": 256, "seq_length": 32, "hidden_size": 64, "num_layers": 4, "ffn_hidden_size": 256}


def changes(cls):
    """Up to 4 fields changed: to anything, or (half of the examples) to plausible values."""
    fields = [f.name for f in dataclasses.fields(cls)]
    anything = {f: st.one_of(ANY, PLAUSIBLE.get(f, ANY)) for f in fields}
    plausible = {f: PLAUSIBLE.get(f, ANY) for f in fields}
    return st.tuples(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True),
                     st.sampled_from([anything, plausible])).flatmap(
        lambda drawn: st.fixed_dictionaries({n: drawn[1][n] for n in drawn[0]}))


def build_or_named_error(cls, model, kw):
    """The config from ``kw`` on the tiny preset, and when small (and initialised to values
    that cannot overflow) its model's loss on one batch; or the error, whose message must
    name the class and one of its fields."""
    try:
        cfg = cls.preset("tiny", **kw)
    except (ValueError, TypeError) as err:
        fields = "|".join(f.name for f in dataclasses.fields(cls))
        assert re.match(rf"{cls.__name__}: ({fields}): expected .*, got ", str(err)), str(err)
        return None
    if all(getattr(cfg, f) <= n for f, n in SMALL.items()) and cfg.init_std <= 1.0:   # weights ~1e18 overflow
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.seq_length + 1)).astype(np.int32)
        loss = float(model(cfg)(ids))
        assert math.isfinite(loss) and loss >= 0.0, (cfg, loss)
    return cfg


@FUZZ
@given(changes(PanguAlphaConfig))
def test_pangu_alpha_config_is_valid_and_runs_or_names_the_field(kw):
    cfg = build_or_named_error(PanguAlphaConfig, PanguAlphaWithLoss, kw)
    if cfg is not None:     # what the model assumes holds
        assert cfg.hidden_size % cfg.num_heads == 0 and 0 < cfg.layernorm_epsilon < math.inf
        assert 0 <= cfg.dropout_rate < 1 and 0 < cfg.init_std < math.inf
        assert cfg.num_heads % cfg.model_parallel == 0 and cfg.ffn_hidden_size % cfg.model_parallel == 0
        assert max(cfg.eod_id, cfg.pad_id) < cfg.vocab_size
        assert all(type(getattr(cfg, f)) is int for f in ("vocab_size", "seq_length", "hidden_size", "num_heads"))


@FUZZ
@given(changes(YuanConfig))
def test_yuan_config_is_valid_and_runs_or_names_the_field(kw):
    cfg = build_or_named_error(YuanConfig, YuanWithLoss, kw)
    if cfg is not None:
        assert cfg.head_dim % 2 == 0 and 0 < cfg.rms_eps < math.inf and 1 < cfg.rotary_base < math.inf
        assert cfg.vocab_size % cfg.model_parallel == 0 and cfg.pad_id < cfg.vocab_size


@pytest.mark.parametrize("kw, error, message", [
    (dict(compute_dtype="flaot32"), ValueError,
     "PanguAlphaConfig: compute_dtype: expected one of float16, bfloat16, float32, float64 (a name or a numpy "
     "dtype), got 'flaot32'"),
    (dict(param_dtype=None), TypeError, "PanguAlphaConfig: param_dtype: expected one of float16, bfloat16, "
                                        "float32, float64 (a name or a numpy dtype), got None"),
    (dict(layernorm_epsilon=-1), ValueError, "PanguAlphaConfig: layernorm_epsilon: expected a finite float > 0, "
                                             "got -1"),
    (dict(layernorm_epsilon=0.0), ValueError, "PanguAlphaConfig: layernorm_epsilon: expected a finite float > 0, "
                                              "got 0.0"),
    (dict(layernorm_epsilon=1e-50), ValueError, "PanguAlphaConfig: layernorm_epsilon: expected a float in "
                                                "[1.4013e-45, 3.40282e+38] (positive and finite in float32"),
    (dict(init_std=float("nan")), ValueError, "PanguAlphaConfig: init_std: expected a finite float > 0, got nan"),
    (dict(init_std=float("inf")), ValueError, "PanguAlphaConfig: init_std: expected a finite float > 0, got inf"),
    (dict(dropout_rate=1.0), ValueError, "PanguAlphaConfig: dropout_rate: expected a finite float in [0, 1), "
                                         "got 1.0"),
    (dict(dropout_rate="0.1"), TypeError, "PanguAlphaConfig: dropout_rate: expected a finite float in [0, 1), "
                                          "got '0.1'"),
    (dict(hidden_size=32.0), TypeError, "PanguAlphaConfig: hidden_size: expected a positive int, got 32.0"),
    (dict(num_layers=0), ValueError, "PanguAlphaConfig: num_layers: expected an int >= 1 (it counts the query "
                                     "layer), got 0"),
    (dict(eod_reset="yes"), TypeError, "PanguAlphaConfig: eod_reset: expected True or False, got 'yes'"),
    (dict(pad_id=96), ValueError, "PanguAlphaConfig: pad_id: expected a token id in [0, 96) (vocab_size=96), "
                                  "got 96"),
    (dict(model_parallel=8), ValueError, "PanguAlphaConfig: model_parallel: expected a divisor of num_heads=4, "
                                         "hidden_size=32, ffn_hidden_size=128, got 8"),
    (dict(vocab_emb_dp=False, model_parallel=4, vocab_size=98), ValueError,
     "PanguAlphaConfig: vocab_emb_dp: expected True, or a vocab_size divisible by model_parallel=4, got False"),
    (dict(layer_order="last"), ValueError, "PanguAlphaConfig: layer_order: expected one of ('final_ln_then_query',"
                                           " 'query_then_final_ln'), got 'last'"),
])
def test_pangu_alpha_config_errors_name_the_field(kw, error, message):
    with pytest.raises(error) as err:
        PanguAlphaConfig.preset("tiny", **kw)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("kw, error, message", [
    (dict(compute_dtype="int32"), ValueError, "YuanConfig: compute_dtype: expected one of float16, bfloat16, "
                                              "float32, float64 (a name or a numpy dtype), got 'int32'"),
    (dict(rms_eps=float("nan")), ValueError, "YuanConfig: rms_eps: expected a finite float > 0, got nan"),
    (dict(rms_eps=1e39, param_dtype="float16"), ValueError, "YuanConfig: rms_eps: expected a float in "
                                                             "[1.4013e-45, 3.40282e+38]"),
    (dict(init_std=-0.02), ValueError, "YuanConfig: init_std: expected a finite float > 0, got -0.02"),
    (dict(rotary_base=1.0), ValueError, "YuanConfig: rotary_base: expected a finite float > 1"),
    (dict(ffn_hidden_size=0), ValueError, "YuanConfig: ffn_hidden_size: expected a positive int, or None for "
                                          "4 * hidden_size, got 0"),
    (dict(hidden_size="32"), TypeError, "YuanConfig: hidden_size: expected a positive int, got '32'"),
    (dict(num_heads=32), ValueError, "YuanConfig: num_heads: expected a divisor of hidden_size=32 leaving an even "
                                     "head_dim"),
    (dict(model_parallel=3), ValueError, "YuanConfig: model_parallel: expected a divisor of num_heads=4, "
                                         "ffn_hidden_size=128, vocab_size=96, got 3"),
])
def test_yuan_config_errors_name_the_field(kw, error, message):
    with pytest.raises(error) as err:
        YuanConfig.preset("tiny", **kw)
    assert str(err.value).startswith(message), str(err.value)


def test_numpy_values_are_stored_as_python_numbers():
    cfg = PanguAlphaConfig.preset("tiny", hidden_size=np.int64(64), dropout_rate=np.float32(0.25),
                                  compute_dtype=np.float64)
    assert type(cfg.hidden_size) is int and cfg.hidden_size == 64
    assert type(cfg.dropout_rate) is float and cfg.dropout_rate == 0.25
    assert cfg == PanguAlphaConfig.preset("tiny", hidden_size=64, dropout_rate=0.25, compute_dtype=np.float64)


def _params():
    return nn.Dense(3, 2).trainable_params()


@pytest.mark.parametrize("make, error, message", [
    (lambda: SGD([], 0.1), ValueError, "SGD: params: expected at least one Parameter, got an empty list"),
    (lambda: Adam(nn.Dense(3, 2), 0.1), TypeError, "Adam: params: expected an iterable of Parameters, got Dense"),
    (lambda: Adam(nn.Dense(3, 2).trainable_params, 0.1), TypeError,
     "Adam: params: expected an iterable of Parameters, got method; pass net.trainable_params()"),
    (lambda: SGD([np.zeros(3)], 0.1), TypeError, "SGD: params[0]: expected a Parameter, got ndarray"),
    (lambda: Adam(_params(), float("nan")), ValueError, "Adam: learning_rate: expected a finite float >= 0, got nan"),
    (lambda: Adam(_params(), -1e-3), ValueError, "Adam: learning_rate: expected a finite float >= 0, got -0.001"),
    (lambda: Adam(_params(), 1e-3, beta1=1.0), ValueError, "Adam: beta1: expected a float in [0, 1), got 1.0"),
    (lambda: AdamWeightDecay(_params(), 1e-3, beta2=-0.1), ValueError,
     "AdamWeightDecay: beta2: expected a float in [0, 1), got -0.1"),
    (lambda: AdamWeightDecay(_params(), 1e-3, eps=0.0), ValueError,
     "AdamWeightDecay: eps: expected a finite float > 0, got 0.0"),
    (lambda: Adam(_params(), 1e-3, eps=float("inf")), ValueError, "Adam: eps: expected a finite float > 0, got inf"),
    (lambda: AdamWeightDecay(_params(), 1e-3, weight_decay=-0.01), ValueError,
     "AdamWeightDecay: weight_decay: expected a finite float >= 0, got -0.01"),
    (lambda: AdamWeightDecay(_params(), 1e-3, decay_filter="matrices"), TypeError,
     "AdamWeightDecay: decay_filter: expected None or a function Parameter -> bool, got str"),
    (lambda: SGD(_params(), 0.1, momentum=-0.9), ValueError, "SGD: momentum: expected a finite float >= 0, got -0.9"),
])
def test_optimizer_arguments_are_checked_with_the_argument_named(make, error, message):
    with pytest.raises(error) as err:
        make()
    assert str(err.value).startswith(message), str(err.value)

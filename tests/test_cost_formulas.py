"""Cost formulas against REFERENCE.md's closed forms and hand arithmetic; profiles load."""
import dataclasses
import json

import pytest

from autopar.strategy import formulas as cost
from autopar.strategy.profile import (
    PROFILES,
    SOURCED_FIELDS,
    MachineProfile,
    load_profile,
)
from reference_formulas import activation_bytes_per_layer, megatron_tp_comm_bytes_per_layer, zero_memory_bytes

GB = 1e9


def _profile(**overrides):
    fields = dict(
        name="test", devices_per_node=8, memory_bytes=80 * 2**30,
        gemm_flops={"float16": 100e12},
        elementwise_bytes_per_s=1e12,
        intra_node_latency_s=1e-5, intra_node_bandwidth_bytes_per_s=100e9,
        inter_node_latency_s=2e-5, inter_node_bandwidth_bytes_per_s=10e9,
        sources={**{f: "hand" for f in SOURCED_FIELDS}, "gemm_flops.float16": "hand"},
    )
    fields.update(overrides)
    return MachineProfile(**fields)


# ---------------------------------------------------------------- collectives

@pytest.mark.parametrize("kind,n,factor", [
    ("all_reduce", 8, 2 * 7 / 8), ("all_reduce", 2, 1.0), ("all_gather", 4, 3 / 4),
    ("reduce_scatter", 8, 7 / 8), ("all_to_all", 16, 15 / 16), ("broadcast", 8, 1.0),
    ("all_reduce", 1, 0.0),
])
def test_collective_factors(kind, n, factor):
    assert cost.collective_factor(kind, n) == pytest.approx(factor)


def test_ring_allreduce_1gb_8_ranks_100gbps():
    profile = _profile()
    t = cost.collective_seconds("all_reduce", 1 * GB, 8, profile, inter_node=False)
    assert t == pytest.approx(17.5e-3 + 1e-5)           # 2·7/8 · 1e9 / 1e11 s + latency
    t_inter = cost.collective_seconds("all_reduce", 1 * GB, 8, profile, inter_node=True)
    assert t_inter == pytest.approx(175e-3 + 2e-5)
    assert cost.collective_seconds("all_reduce", 1 * GB, 1, profile, inter_node=False) == 0.0


def test_collective_bad_input():
    with pytest.raises(ValueError, match="unknown collective kind"):
        cost.collective_factor("allreduce", 4)
    with pytest.raises(ValueError, match="n"):
        cost.collective_factor("all_reduce", 0)
    with pytest.raises(ValueError, match="nbytes"):
        cost.collective_seconds("all_reduce", -1, 4, _profile(), inter_node=False)


def test_megatron_tp_volume():
    # REFERENCE: one all-reduce of (b, s, h) per attention and per MLP block, forward and backward
    b, s, h = 4, 2048, 12288
    assert megatron_tp_comm_bytes_per_layer(b, s, h) == 4 * b * s * h * 2


# ---------------------------------------------------------------- compute

def test_compute_seconds():
    profile = _profile()
    assert cost.compute_seconds(100e12, 1e12, "float16", profile) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="float32"):
        cost.compute_seconds(1.0, 0.0, "float32", profile)


def test_training_flops_with_recompute_matches_reference():
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    expected = 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    assert cost.transformer_training_flops(B, s, l, h, V, recompute=True) == pytest.approx(expected)


def test_training_flops_without_recompute_is_about_6_params_tokens():
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200      # GPT-3 175B
    flops = cost.transformer_training_flops(B, s, l, h, V, recompute=False)
    assert flops == pytest.approx(72 * B * s * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h)))
    params = 12 * l * h**2 + V * h
    assert params == pytest.approx(175e9, rel=0.01)
    assert flops == pytest.approx(6 * params * B * s, rel=0.04)
    # recompute adds one forward of the layers: ratio 4/3 on the layer part
    with_rc = cost.transformer_training_flops(B, s, l, h, V, recompute=True)
    assert 1.3 < with_rc / flops < 4 / 3


def test_activation_bytes_per_layer():
    s, b, h, a = 2048, 1, 12288, 96
    assert activation_bytes_per_layer(s, b, h, a) == pytest.approx(
        s * b * h * 34 + 5 * a * s * s * b)
    assert activation_bytes_per_layer(1, 1, 1, 1) == 39


# ---------------------------------------------------------------- ZeRO and pipeline

@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_memory_7_5b_on_64(stage, expected_gb):
    # ZeRO paper, Figure 1: Ψ = 7.5e9, N = 64, K = 12
    got = zero_memory_bytes(7.5e9, 64, stage) / GB
    assert got == pytest.approx(expected_gb, abs=0.06)


def test_zero_formulas_exact():
    psi, n = 1000.0, 10
    assert zero_memory_bytes(psi, n, 0) == 16 * psi
    assert zero_memory_bytes(psi, n, 1) == 4 * psi + 12 * psi / n
    assert zero_memory_bytes(psi, n, 2) == 2 * psi + 14 * psi / n
    assert zero_memory_bytes(psi, n, 3) == 16 * psi / n
    with pytest.raises(ValueError, match="stage"):
        zero_memory_bytes(psi, n, 4)


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_pipeline_seconds_equals_a_replay_of_the_schedule_when_the_last_stage_is_slowest(name):
    """PanGu-α's shape: the last stage (head, query layer) the slowest. The closed form
    m * max + (sum - max) is the replay of the runtime's own schedule table with these
    per-stage forward and backward times."""
    from autopar.strategy.pipeline.schedule import make_schedule
    fwd, bwd = [0.010, 0.007, 0.007, 0.016], [0.021, 0.013, 0.015, 0.030]
    for m in (4, 8, 9):
        loop, bubble = cost.pipeline_seconds([f + b for f, b in zip(fwd, bwd)], m)
        assert loop == pytest.approx(make_schedule(name, 4, m).makespan(fwd, bwd), rel=1e-12)
        assert bubble == pytest.approx(0.010 + 0.007 + 0.007 + 0.021 + 0.013 + 0.015, rel=1e-12)
    equal = cost.pipeline_seconds([0.5] * 4, 8, v=2)              # alike stages: (p - 1) / (v m) of ideal
    assert equal == pytest.approx((8 * 0.5 + 3 * 0.5 / 2, 3 * 0.5 / 2))
    assert equal[1] / (8 * 0.5) == pytest.approx(cost.pipeline_bubble(4, 8, v=2)[0])
    with pytest.raises(ValueError, match="pipeline_seconds: m: expected an int >= 1"):
        cost.pipeline_seconds([1.0], 0)


def test_pipeline_bubble():
    assert cost.pipeline_bubble(4, 8) == pytest.approx((3 / 8, 3 / 11))
    assert cost.pipeline_bubble(4, 8, v=2) == pytest.approx((3 / 16, 3 / 19))
    assert cost.pipeline_bubble(1, 5) == (0.0, 0.0)
    with pytest.raises(ValueError, match="m"):
        cost.pipeline_bubble(4, 0)


# ---------------------------------------------------------------- profiles

def test_shipped_profiles_load_and_cite_every_figure():
    assert {"cpu-2core", "ascend910-2048", "a100-8", "h100-8"} <= set(PROFILES)
    for name in PROFILES:
        profile = load_profile(name)
        assert profile.name == name
        needed = set(SOURCED_FIELDS) | {f"gemm_flops.{d}" for d in profile.gemm_flops}
        assert needed <= set(profile.sources)
        assert all(text.strip() for text in profile.sources.values())


def test_shipped_profile_figures():
    ascend = load_profile("ascend910-2048")
    assert (ascend.devices_per_node, ascend.gemm_flops["float16"]) == (8, 256e12)
    assert ascend.inter_node_bandwidth_bytes_per_s == 12.5e9
    a100, h100 = load_profile("a100-8"), load_profile("h100-8")
    assert a100.gemm_flops["bfloat16"] == 312e12 and h100.gemm_flops["bfloat16"] == 989e12
    assert a100.intra_node_bandwidth_bytes_per_s == 300e9   # one direction of the 600 GB/s aggregate
    assert h100.intra_node_bandwidth_bytes_per_s == 450e9   # one direction of the 900 GB/s aggregate
    assert "float32" in load_profile("cpu-2core").gemm_flops


def test_load_profile_by_path_and_round_trip(tmp_path):
    profile = load_profile("a100-8")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(profile.to_dict()))
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile


@pytest.mark.parametrize("field,value", [
    ("devices_per_node", 0), ("memory_bytes", -1), ("elementwise_bytes_per_s", 0.0),
    ("intra_node_bandwidth_bytes_per_s", float("nan")), ("inter_node_latency_s", -1e-6),
    ("intra_node_latency_s", "fast"), ("name", ""),
])
def test_bad_profile_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _profile(**{field: value})


def test_bad_gemm_and_sources():
    with pytest.raises(ValueError, match="gemm_flops"):
        _profile(gemm_flops={"float16": -1.0})
    with pytest.raises(ValueError, match="gemm_flops"):
        _profile(gemm_flops={})
    sources = {f: "hand" for f in SOURCED_FIELDS}          # no gemm_flops.float16 entry
    with pytest.raises(ValueError, match="gemm_flops.float16"):
        _profile(sources=sources)
    with pytest.raises(ValueError, match="sources"):
        _profile(sources={**sources, "gemm_flops.float16": ""})


def test_profile_is_frozen_and_load_errors(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        _profile().memory_bytes = 1
    with pytest.raises(ValueError, match="no profile named"):
        load_profile("tpu-v9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(bad)
    data = load_profile("h100-8").to_dict()
    data["colour"] = "green"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown fields"):
        load_profile(bad)

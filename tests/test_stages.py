"""Joint stage search and ``python -m autopar.plan``: the one-layer extrapolation against
the full graph, 1F1B memory, non-uniform splits when the first stage overflows, the 200B
plan against the paper's hand plan, and the command's bad input."""
import json

import numpy as np
import pytest

from autopar import plan as cli
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.models.yuan import YuanConfig
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.pipeline.registry import model_family, register_model, registered_models
from autopar.strategy.pipeline.stage_search import StageCoster, StageSetting, evaluate, split_layers, stage_memory
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings

PROFILE = load_profile("cpu-2core")


@pytest.fixture(scope="module")
def small():
    fam = model_family("pangu_alpha", "tiny", hidden_size=64, ffn_hidden_size=256, num_layers=9, seq_length=32,
                       vocab_size=256)
    return StageCoster(fam, 8, PROFILE)


def test_one_stage_from_one_layer_equals_the_full_graph(small):
    """pp1: layers x one layer + extras is the whole model's predicted step and memory."""
    fam = small.family
    got = evaluate(small, 16, StageSetting(1, 4, 2, 1))
    g = fam.graph(16, 4, 2)
    stage = Mesh((8,), ("devices",))
    full = CostModel(g, stage, PROFILE, True).evaluate(plan_shardings(g, "semi_auto_parallel", stage, True))
    assert got.step_seconds == pytest.approx(full.step_seconds, rel=0.02)
    assert got.peak_memory_bytes == pytest.approx(full.memory_bytes, rel=0.05)
    assert got.bubble_s == 0


def test_bubble_is_the_other_stages_micro_batch_times(small):
    """The stage planner's bubble, rebuilt from the stages' own micro-batch times (compute,
    collectives, boundary sends): the sum of all but the slowest; the step is the m slowest
    micro-batches, that bubble and the once-per-step work."""
    from autopar.strategy.pipeline.stage_search import stage_time, transfer_seconds
    for pp, m in [(2, 2), (2, 8), (4, 4), (4, 16)]:
        p = evaluate(small, 32, StageSetting(pp, 8 // pp, 1, m))
        n = 8 // pp
        first = small.parts(n, n, 1, 32 // m, False)[0]
        last = small.parts(n, n, 1, 32 // m, False, (pp - 1) * n)[2]
        times = [sum(stage_time(first, layer, last, pp, s, k, False)) + transfer_seconds(small.profile, pp, s, n, layer)
                 for s, k in enumerate(p.layers_per_stage) for layer in [small.parts(n, n, 1, 32 // m, False, s * n)[1]]]
        assert p.bubble_s == pytest.approx(sum(times) - max(times), rel=1e-12)
        assert p.step_seconds == pytest.approx(p.compute_s + p.comm_s + p.bubble_s + p.update_s, rel=1e-12)
        assert p.bubble_s < (pp - 1) * max(times)            # the embedding and head stages are not the others


def test_first_stages_hold_more_micro_batches_under_1f1b(small):
    first, layer, last = small.parts(4, 4, 1, 4, False)
    mem = [stage_memory(first, layer, first.__class__(), 4, s, 2, 8, False) for s in range(4)]
    assert mem[0] > mem[1] > mem[2]          # p - s micro-batches in flight, the first holds the most
    with_rc = [stage_memory(first, layer, first.__class__(), 4, s, 2, 8, True) for s in range(4)]
    assert all(r < m for r, m in zip(with_rc, mem))


def test_split_layers_is_even_when_it_fits_and_moves_layers_back_when_the_first_stage_overflows():
    assert split_layers(8, 4, lambda s, n: True) == (2, 2, 2, 2)
    assert split_layers(10, 4, lambda s, n: True) == (2, 2, 3, 3)
    # stage 0 fits 1 layer, stage 1 fits 2: 24 layers on 8 stages like Yuan 2.0's lists
    caps = [1, 2, 3, 4, 4, 4, 4, 4]
    split = split_layers(24, 8, lambda s, n: n <= caps[s])
    assert sum(split) == 24 and all(n <= c for n, c in zip(split, caps)) and split[0] < split[-2]
    assert split_layers(24, 8, lambda s, n: n <= 2) is None


def test_the_planner_proposes_a_non_uniform_split_when_uniform_overflows_the_first_stage(small):
    uniform = evaluate(small, 32, StageSetting(4, 2, 1, 8, layers_per_stage=(2, 2, 2, 2)))
    cap = uniform.memory_bytes[0] - 1          # the first stage alone overflows the uniform split
    assert max(uniform.memory_bytes[1:]) <= cap
    planned = evaluate(small, 32, StageSetting(4, 2, 1, 8), memory_cap=cap)
    assert planned.peak_memory_bytes <= cap
    assert planned.layers_per_stage[0] < 2 and sum(planned.layers_per_stage) == 8


def test_pangu_200b_on_2048_ascend_beats_or_matches_the_paper_hand_plan(capsys, tmp_path):
    rc = cli.main(["--model", "pangu_alpha", "--preset", "200B", "--devices", "2048", "--profile", "ascend910-2048",
                   "--pp", "16", "--dp", "16", "--mp", "8", "--micro-batches", "32", "--recompute",
                   "--optimizer-parallel", "--ops", "5", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "plan.json").read_text())
    searched, hand = doc["plans"]["searched"], doc["plans"]["hand-given"]
    assert searched["predicted"]["step_seconds"] <= hand["predicted"]["step_seconds"]
    assert max(searched["predicted"]["memory_bytes_per_stage"]) <= 32 * 2 ** 30
    assert "searched / hand-given predicted step" in out and "hand-given" in out


def test_op_search_through_the_command_writes_a_loadable_strategy_file(tmp_path, capsys):
    from autopar.strategy.strategy_file import load_strategy
    path = tmp_path / "tiny.json"
    rc = cli.main(["--preset", "tiny", "--devices", "4", "--batch", "8", "--op-search", "dynamic_programming",
                   "--json", str(path), "--pp", "1", "--dp", "4", "--mp", "1", "--micro-batches", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "searched / hand-given" in out
    cfg = PanguAlphaConfig.preset("tiny", compute_dtype="float32")
    g = trace(PanguAlphaWithLoss(cfg), (TensorSpec((8, cfg.seq_length + 1), np.dtype(np.int32)),), {}).graph
    plan = load_strategy(str(path), g, Mesh((4,), ("devices",)))
    assert len(plan.shardings) == sum(1 for n in g.nodes if n.phase == "forward")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--devices", "8", "--pp", "2"], "needs all of --pp --dp --mp --micro-batches"),
    (["--preset", "tiny", "--devices", "0"], "argument --devices: expected an integer in [1, 1048576], got '0'"),
    (["--preset", "huge", "--devices", "8"], "expected one of"),
    (["--preset", "tiny", "--devices", "8", "--profile", "tpu"], "no profile named"),
])
def test_bad_command_lines_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def _user_strategies(graph):
    return [(n.name, str(n.prim.strategy)) for n in graph.nodes if n.prim.strategy is not None]


def test_a_registered_family_takes_degrees_as_values_and_traces_the_model_at_them():
    """The planner passes dp x mp as integers; the graph it gets carries the model's own
    strategies at those degrees, exactly as the model built at those degrees traces."""
    fam = model_family("pangu_alpha", "tiny", compute_dtype="float32")
    cfg = PanguAlphaConfig.preset("tiny", compute_dtype="float32", data_parallel=2, model_parallel=2)
    expected = trace(PanguAlphaWithLoss(cfg), (TensorSpec((8, cfg.seq_length + 1), np.dtype(np.int32)),), {}).graph
    got = fam.graph(8, 2, 2)
    assert _user_strategies(got) == _user_strategies(expected)
    assert _user_strategies(got) != _user_strategies(fam.graph(8))      # the degrees changed the strategies
    assert fam.layers == cfg.num_layers - 1
    one = fam.graph(8, 2, 2, one_layer=True)
    assert {n.scope.split(".")[1] for n in one.nodes if n.scope.startswith("blocks.")} == {"0"}
    with pytest.raises(ValueError, match="model_parallel"):
        fam.check_degrees(1, 3)                    # 3 does not divide the heads


def test_the_planner_knows_the_families_the_models_register_and_names_them_when_asked_for_another():
    assert {"pangu_alpha", "yuan"} <= set(registered_models())
    assert model_family("yuan", "tiny").layers == YuanConfig.preset("tiny").num_layers
    with pytest.raises(ValueError, match=r"model_family: name: expected one of \[.*'pangu_alpha'.*'yuan'.*\], "
                                         r"got 'gpt'"):
        model_family("gpt", "tiny")


def test_a_second_family_under_a_registered_name_is_refused_naming_the_first():
    with pytest.raises(ValueError, match=r"register_model: name: .*'pangu_alpha', already registered by "
                                         r"autopar.models.planning"):
        register_model("pangu_alpha", lambda preset, **overrides: None)
    assert model_family("pangu_alpha", "tiny").name == "pangu_alpha"     # the first one still answers

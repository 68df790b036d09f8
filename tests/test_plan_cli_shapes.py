"""``python -m autopar.plan`` plans any model shape (issue 13 item 2, planner side): shape
flags and ``--config`` override a preset's config fields and price exactly what the library
prices for that config; ``--micro-batch-size`` fixes the per-rank micro-batch; ``--json``
writes a stage-plan file that ``load_stage_plan`` reads back, checking every key."""
import json

import pytest
from test_plan_cli_fuzz import run_main

from autopar.strategy.pipeline.plan_file import load_stage_plan
from autopar.strategy.pipeline.registry import model_family
from autopar.strategy.pipeline.stage_search import StageCoster, evaluate, search_stages
from autopar.strategy.profile import load_profile

PROG = "python -m autopar.plan"
SHAPE = ["--hidden", "64", "--layers", "4", "--heads", "8", "--ffn", "256", "--seq", "16", "--vocab", "128"]
FIELDS = {"hidden_size": 64, "num_layers": 4, "num_heads": 8, "ffn_hidden_size": 256, "seq_length": 16,
          "vocab_size": 128}
RUN = ["--devices", "4", "--batch", "8", "--ops", "1"]


def planned(argv, tmp_path, capsys, name="plan.json") -> dict:
    path = tmp_path / name
    rc, out, err = run_main(argv + ["--json", str(path)], capsys)
    assert rc == 0, err
    return json.loads(path.read_text())


def test_shape_flags_plan_what_the_library_plans_for_that_config(tmp_path, capsys):
    doc = planned(SHAPE + RUN, tmp_path, capsys)
    assert doc["model"] == {"family": "pangu_alpha", "preset": "tiny", "overrides": FIELDS, "pipelined_layers": 3}
    fam = model_family("pangu_alpha", "tiny", compute_dtype="float32", **FIELDS)
    best, _ = search_stages(StageCoster(fam, 4, load_profile("cpu-2core")), 8)
    got = doc["plans"]["searched"]
    assert (got["pp"], got["dp"], got["mp"], got["micro_batches"], tuple(got["layers_per_stage"]),
            got["recompute"], got["optimizer_parallel"]) == (best.pp, best.dp, best.mp, best.micro_batches,
                                                             best.layers_per_stage, best.recompute,
                                                             best.optimizer_parallel)
    assert got["predicted"]["step_seconds"] == best.step_seconds


def test_a_preset_with_its_layers_overridden_is_the_preset_of_that_depth(tmp_path, capsys):
    """PanGu-α 1.3B is 2.6B with 16 layers: --preset 2.6B --layers 16 must price identically."""
    run = ["--devices", "4", "--batch", "8", "--profile", "a100-8", "--compute-dtype", "float16", "--ops", "1"]
    hand = ["--pp", "2", "--dp", "1", "--mp", "2", "--micro-batches", "4", "--recompute"]
    overridden = planned(["--preset", "2.6B", "--layers", "16"] + run + hand, tmp_path, capsys, "a.json")
    preset = planned(["--preset", "1.3B"] + run + hand, tmp_path, capsys, "b.json")
    assert overridden["plans"] == preset["plans"]
    assert overridden["model"]["overrides"] == {"num_layers": 16} and preset["model"]["overrides"] == {}


def test_a_config_file_equals_the_same_flags_and_flags_win_over_it(tmp_path, capsys):
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(FIELDS))
    from_file = planned(["--config", str(cfg)] + RUN, tmp_path, capsys, "a.json")
    from_flags = planned(SHAPE + RUN, tmp_path, capsys, "b.json")
    assert from_file == from_flags
    both = planned(["--config", str(cfg), "--hidden", "32", "--heads", "4"] + RUN, tmp_path, capsys, "c.json")
    assert both["model"]["overrides"] == {**FIELDS, "hidden_size": 32, "num_heads": 4}
    assert both["plans"] != from_flags["plans"]        # the smaller hidden size was priced


def test_micro_batch_size_fixes_each_ranks_share(tmp_path, capsys):
    doc = planned(SHAPE + ["--devices", "4", "--batch", "16", "--micro-batch-size", "2", "--ops", "1"], tmp_path,
                  capsys)
    got = doc["plans"]["searched"]
    assert got["micro_batch_size"] == 2 * got["dp"] and got["micro_batches"] == 16 // (2 * got["dp"])
    hand = planned(SHAPE + ["--devices", "4", "--batch", "16", "--micro-batch-size", "2", "--pp", "2", "--dp", "2",
                            "--mp", "1", "--ops", "1"], tmp_path, capsys, "hand.json")
    assert hand["plans"]["hand-given"]["micro_batches"] == 4       # 16 / (dp 2 x 2)


@pytest.mark.parametrize("argv, says", [
    (["--hidden", "0"], "argument --hidden: expected an integer in [1, 131072], got '0'"),
    (["--seq", "x"], "argument --seq: expected an integer in [1, 65536], got 'x'"),
    (["--layers", str(2 ** 13)], "argument --layers: expected an integer in [1, 4096], got '8192'"),
    (["--heads", "7"], "argument --heads/--preset: PanguAlphaConfig: hidden_size: expected a multiple of "
                       "num_heads=7, got 32"),
    (["--preset", "2.6B", "--ffn", "102", "--pp", "1", "--dp", "1", "--mp", "4", "--micro-batches", "1"],
     "--dp/--mp do not fit the model"),
    (["--vocab", "5"], "argument --vocab/--preset: PanguAlphaConfig: eod_id: expected a token id in [0, 5)"),
    (["--micro-batch-size", "3"], "argument --micro-batch-size: expected a divisor of --batch 8"),
    (["--micro-batch-size", "2", "--pp", "2", "--dp", "2", "--mp", "1", "--micro-batches", "4"],
     "--micro-batches: expected --batch 8 / (--dp 2 x --micro-batch-size 2) = 2, got 4"),
    (["--micro-batch-size", "1", "--op-search", "dynamic_programming"],
     "argument --micro-batch-size: applies to the stage search, not --op-search"),
    (["--schedule", "gpipe"], "argument --schedule: invalid choice: 'gpipe' (choose from '1f1b')"),
])
def test_bad_shape_values_exit_2_naming_the_flag(argv, says, capsys):
    base = [] if "--preset" in argv else ["--preset", "tiny"]
    rc, out, err = run_main(base + ["--devices", "4", "--batch", "8"] + argv, capsys)
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(f"{PROG}: error: ") and says in err, err


def test_no_preset_and_no_shape_is_refused(capsys):
    rc, out, err = run_main(["--devices", "4"], capsys)
    assert rc == 2 and err.strip() == (f"{PROG}: error: argument --preset: expected a preset name, or a model shape "
                                       "(--hidden --layers --heads --ffn --seq --vocab or --config), got neither")


@pytest.mark.parametrize("text, says", [
    ('{"hiden_size": 64}', "argument --config: PanguAlphaConfig.__init__() got an unexpected keyword argument "
                           "'hiden_size'"),
    ('{"hidden_size": 2.5}', "argument --config: PanguAlphaConfig: hidden_size: expected a positive int, got 2.5"),
    ("[64]", "expected a JSON object of config fields such as {\"hidden_size\": 2560}, got a JSON list"),
    ("{hidden", "expected a JSON object of config fields, got invalid JSON"),
])
def test_bad_config_files_exit_2_naming_the_key(text, says, tmp_path, capsys):
    cfg = tmp_path / "model.json"
    cfg.write_text(text)
    rc, out, err = run_main(["--config", str(cfg), "--devices", "4"], capsys)
    assert (rc, out) == (2, "") and says in err and err.startswith(f"{PROG}: error: argument --config: "), err


# ---------------------------------------------------------------------------- the plan file

def test_json_round_trips_through_load_stage_plan(tmp_path, capsys):
    hand = ["--pp", "2", "--dp", "2", "--mp", "1", "--micro-batches", "2", "--recompute", "--optimizer-parallel"]
    doc = planned(SHAPE + RUN + ["--profile", "a100-8", "--compute-dtype", "float16"] + hand, tmp_path, capsys)
    path = tmp_path / "plan.json"
    searched, given = load_stage_plan(path), load_stage_plan(path, "hand-given")
    entry = doc["plans"]["searched"]
    assert (searched.name, searched.family, searched.preset, searched.config_overrides()) == (
        "searched", "pangu_alpha", "tiny", FIELDS)
    assert (searched.pp, searched.dp, searched.mp, searched.micro_batches, list(searched.layers_per_stage),
            searched.schedule, searched.compute_dtype) == (entry["pp"], entry["dp"], entry["mp"],
                                                           entry["micro_batches"], entry["layers_per_stage"],
                                                           "1f1b", "float16")
    assert (given.pp, given.dp, given.mp, given.micro_batches, given.recompute, given.optimizer_parallel) == (
        2, 2, 1, 2, True, True)
    # the loaded setting, priced again, is the plan the CLI predicted
    fam = model_family(given.family, given.preset, compute_dtype=given.compute_dtype, **given.config_overrides())
    again = evaluate(StageCoster(fam, given.devices, load_profile(given.profile)), given.global_batch,
                     given.setting())
    assert again.step_seconds == given.predicted_step_seconds == doc["plans"]["hand-given"]["predicted"][
        "step_seconds"]
    assert hash(searched) == hash(load_stage_plan(path))        # a frozen, hashable value


def _written(tmp_path, capsys) -> dict:
    return planned(SHAPE + RUN + ["--pp", "2", "--dp", "2", "--mp", "1", "--micro-batches", "2"], tmp_path, capsys)


@pytest.mark.parametrize("edit, error, says", [
    (lambda d: d["plans"]["searched"].pop("pp"), ValueError, "plans.searched.pp: expected an int >= 1, got no such key"),
    (lambda d: d["plans"]["searched"].update(pp="2"), TypeError, "plans.searched.pp: expected an int >= 1, got '2'"),
    (lambda d: d["plans"]["searched"].update(dp=3), ValueError, "plans.searched.pp x dp x mp: expected devices = 4"),
    (lambda d: d["plans"]["searched"].update(micro_batches=3), ValueError,
     "plans.searched.micro_batches x micro_batch_size: expected global_batch = 8"),
    (lambda d: d["plans"]["searched"].update(layers_per_stage=[9] * d["plans"]["searched"]["pp"]), ValueError,
     "plans.searched.layers_per_stage: expected a list of"),
    (lambda d: d["plans"]["searched"].update(schedule="zigzag"), ValueError,
     "plans.searched.schedule: expected one of ['1f1b', 'gpipe'], got 'zigzag'"),
    (lambda d: d["plans"]["searched"].update(compute_dtype="int8"), ValueError, "plans.searched.compute_dtype"),
    (lambda d: d["plans"]["searched"].update(recompute=1), TypeError,
     "plans.searched.recompute: expected true or false, got 1"),
    (lambda d: d.update(version=2), ValueError, "version: expected 1 (the layout this autopar reads), got 2"),
    (lambda d: d.update(chosen="best"), ValueError, "chosen: expected one of the plans in the file"),
    (lambda d: d["model"].pop("family"), ValueError, "model.family: expected a non-empty string, got no such key"),
    (lambda d: d["model"]["overrides"].update(hidden_size={"a": 1}), TypeError, "model.overrides.hidden_size"),
])
def test_the_loader_names_the_bad_key(edit, error, says, tmp_path, capsys):
    doc = _written(tmp_path, capsys)
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(error) as caught:
        load_stage_plan(path)
    assert str(caught.value).startswith(f"{path}: ") and says in str(caught.value), str(caught.value)


def test_the_loader_refuses_what_is_not_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"plan\.json: contents: expected a JSON stage-plan file .* invalid JSON"):
        load_stage_plan(path)

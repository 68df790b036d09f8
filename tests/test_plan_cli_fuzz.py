"""``python -m autopar.plan`` on any command line: a plan (exit 0), "no plan exists" (exit 1,
one line), or a bad flag refused before any work (exit 2, one line naming the flag) --
never a traceback. Most examples call ``main(argv)`` in-process; a few run the real command."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from autopar import plan as cli

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m autopar.plan"
SCRATCH = Path(tempfile.mkdtemp(prefix="plan-cli-fuzz-"))   # one folder for every drawn example
NO_DIR = "/nonexistent-autopar-dir/out"
A_FILE = SCRATCH / "a-file"            # a path under it is under a file, not a directory
A_FILE.write_text("not a directory")

JUNK = ["", "x", "1e3", "2.5", "-0", "nan", " 3", "１", str(2 ** 70)]
CONFIGS = {"good": '{"hidden_size": 48, "num_heads": 4, "num_layers": 3}', "unknown-key": '{"hiden": 48}',
           "list": "[48]", "not-json": "{48", "bad-value": '{"num_heads": 5}', "float": '{"seq_length": 1.5}'}
for _name, _text in CONFIGS.items():
    (SCRATCH / f"{_name}.json").write_text(_text)


def ints(lo: int, hi: int) -> st.SearchStrategy:
    """Integers as text, mostly in [lo, hi], sometimes junk."""
    return st.one_of(st.integers(lo, hi).map(str), st.sampled_from(JUNK))


def outputs(ext: str) -> st.SearchStrategy:
    return st.sampled_from([f"{SCRATCH}/plan.{ext}", f"{NO_DIR}.{ext}", str(SCRATCH),
                            f"{A_FILE}/plan.{ext}", f"{SCRATCH}/plan.unknown-ext"])


DROP = object()         # a mutation that removes the flag


# Small presets and shapes and few devices keep a searching example under a second; the big presets
# appear in the fixed cases below, where validation refuses the line before any search.
VALUES = {
    "--model": st.sampled_from(["pangu_alpha", "yuan", "gpt", DROP]),
    "--preset": st.sampled_from(["tiny", "Tiny", "", "999B", DROP]),
    "--devices": st.one_of(ints(-1, 8), st.just(DROP)),
    "--profile": st.sampled_from(["cpu-2core", "a100-8", "ascend910", "tpu", "", str(A_FILE),
                                  f"{NO_DIR}.json"]),
    "--batch": st.one_of(ints(-1, 64), st.just(str(10 ** 30))),
    "--compute-dtype": st.sampled_from(["float32", "float16", "flaot32", "int8"]),
    "--memory-cap": st.sampled_from(["0", "-1", "nan", "inf", "1e-9", "16", "x"]),
    "--max-mp": ints(-1, 8),
    "--pp": ints(-1, 4), "--dp": ints(-1, 8), "--mp": ints(-1, 8), "--micro-batches": ints(-1, 16),
    "--layers-per-stage": st.sampled_from(["1,1", "2", "a,b", "1,,1", "0,2", "-1,3", "1,1,1"]),
    "--recompute": st.sampled_from([None, DROP]), "--optimizer-parallel": st.sampled_from([None, DROP]),
    "--op-search": st.sampled_from(["dynamic_programming", "sharding_propagation", "brute", DROP]),
    "--ops": ints(-1, 3),
    "--json": outputs("json"),
    "--hidden": ints(-1, 64), "--layers": ints(-1, 5), "--heads": ints(-1, 8), "--ffn": ints(-1, 128),
    "--seq": ints(-1, 32), "--vocab": st.one_of(ints(-1, 128), st.just(str(2 ** 23))),
    "--config": st.sampled_from([str(SCRATCH / f"{name}.json") for name in CONFIGS] + [f"{NO_DIR}.json"]),
    "--micro-batch-size": ints(-1, 8), "--schedule": st.sampled_from(["1f1b", "gpipe", ""]),
    "--png": st.sampled_from([f"{NO_DIR}.png", f"{A_FILE}/p.png", f"{SCRATCH}/p.unknown-ext", str(SCRATCH)]),
}
HAND_PLAN = st.fixed_dictionaries({"--pp": st.sampled_from(["1", "2"]), "--dp": st.sampled_from(["1", "2", "4"]),
                                   "--mp": st.sampled_from(["1", "2", "4"]),
                                   "--micro-batches": st.sampled_from(["1", "2", "4"])})
# A plausible command line (tiny model, a few devices, maybe a hand plan), then up to three
# flags set to values drawn from VALUES: valid, invalid, or removed.
BASE = st.fixed_dictionaries({"--preset": st.just("tiny"), "--devices": st.sampled_from(["1", "2", "4"]),
                              "--batch": st.sampled_from(["4", "8"])},
                             optional={"hand": HAND_PLAN, "--op-search": st.just("dynamic_programming")})
MUTATIONS = st.lists(st.sampled_from(sorted(VALUES)), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALUES[k] for k in keys}))


def command_line(base: dict, mutations: dict) -> dict:
    flags = {**base.pop("hand", {}), **base}
    for flag, value in mutations.items():
        flags.pop(flag, None)
        if value is not DROP:
            flags[flag] = value
    return flags


def argv_of(flags: dict) -> list[str]:
    argv = []
    for flag, value in flags.items():
        argv += [flag] if value is None else [flag, value]
    return argv


def run_main(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``main(argv)`` in this process."""
    try:
        rc = cli.main(argv)
    except SystemExit as stop:
        rc = stop.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_outcome(rc: int, out: str, err: str) -> None:
    """0 with a plan; 1 or 2 with exactly one stderr line, starting with the program name."""
    assert "Traceback" not in out + err
    if rc == 0:
        assert "predicted" in out and err == "", (out, err)
        return
    lines = err.splitlines()
    assert len(lines) == 1, err
    if rc == 2:
        assert lines[0].startswith(f"{PROG}: error: ") and "--" in lines[0], err
    else:
        assert rc == 1 and lines[0].startswith(f"{PROG}: ") and "no plan" in lines[0], (rc, err)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(BASE, MUTATIONS)
def test_every_command_line_gives_a_plan_or_one_line(capsys, base, mutations):
    flags = command_line(dict(base), mutations)
    json_path = Path(flags.get("--json", f"{SCRATCH}/plan.json"))
    if json_path.is_file():
        json_path.unlink()
    rc, out, err = run_main(argv_of(flags), capsys)
    event(f"exit {rc}")
    assert_clean_outcome(rc, out, err)
    if rc != 0:               # a refused or planless run leaves no output behind
        assert not json_path.is_file()


# ---------------------------------------------------------------------------- each reproduced case

def refused(argv, capsys) -> str:
    """The one stderr line of a command line refused before any work (nothing on stdout)."""
    rc, out, err = run_main(argv, capsys)
    assert (rc, out) == (2, ""), (rc, out, err)
    assert_clean_outcome(rc, out, err)
    return err.strip()


TINY = ["--preset", "tiny", "--devices", "4", "--batch", "8"]
HAND = ["--pp", "2", "--dp", "2", "--mp", "1", "--micro-batches", "2"]


@pytest.mark.parametrize("flag", ["--pp", "--dp", "--mp", "--micro-batches"])
def test_a_zero_degree_names_its_flag(flag, capsys):
    argv = TINY + HAND
    argv[argv.index(flag) + 1] = "0"
    assert refused(argv, capsys) == f"{PROG}: error: argument {flag}: expected an integer >= 1, got '0'"


def test_more_stages_than_layers_says_how_many_layers(capsys):
    line = refused(TINY + ["--pp", "4", "--dp", "1", "--mp", "1", "--micro-batches", "4"], capsys)
    assert "--pp: expected at most 2 (the pipelined layers of pangu_alpha tiny" in line and "got 4" in line


def test_layer_counts_with_letters_are_refused(capsys):
    line = refused(TINY + HAND + ["--layers-per-stage", "a,b"], capsys)
    assert line == (f"{PROG}: error: argument --layers-per-stage: expected layer counts >= 1 separated by "
                    "commas, one per stage, such as 2,2,3,3, got 'a,b'")


def test_layer_counts_must_match_the_stages_and_the_model(capsys):
    line = refused(TINY + HAND + ["--layers-per-stage", "1,2"], capsys)
    assert "--layers-per-stage: expected 2 counts (one per --pp stage) summing to 2" in line
    assert "got 2 counts summing to 3" in line


def test_degrees_whose_product_is_not_the_devices(capsys):
    line = refused(TINY + ["--pp", "2", "--dp", "1", "--mp", "1", "--micro-batches", "2"], capsys)
    assert "--pp x --dp x --mp: expected --devices 4, got 2 x 1 x 1 = 2" in line


def test_micro_batches_not_dividing_the_batch(capsys):
    line = refused(TINY + ["--pp", "1", "--dp", "4", "--mp", "1", "--micro-batches", "3"], capsys)
    assert "--micro-batches: expected a divisor of --batch 8, got 3" in line


def test_a_micro_batch_the_data_parallel_ranks_cannot_share(capsys):
    line = refused(TINY + ["--pp", "1", "--dp", "4", "--mp", "1", "--micro-batches", "4"], capsys)
    assert "--dp: expected a divisor of the micro-batch size --batch 8 / --micro-batches 4 = 2, got 4" in line


def test_model_parallel_not_dividing_the_heads(capsys):
    line = refused(["--preset", "tiny", "--devices", "3", "--batch", "3", "--pp", "1", "--dp", "1", "--mp", "3",
                    "--micro-batches", "1"], capsys)
    assert "--dp/--mp do not fit the model" in line and "model_parallel" in line and "num_heads=4" in line


def test_unknown_profile_and_preset_are_one_line(capsys):
    line = refused(["--preset", "tiny", "--devices", "4", "--profile", "tpu"], capsys)
    assert line.startswith(f"{PROG}: error: argument --profile: ") and "no profile named 'tpu'" in line
    line = refused(["--preset", "huge", "--devices", "4"], capsys)
    assert line.startswith(f"{PROG}: error: argument --preset: ") and "got 'huge'" in line and "'tiny'" in line


def test_flags_the_mode_would_ignore_are_refused(capsys):
    assert "argument --recompute: applies to the hand-given plan" in refused(TINY + ["--recompute"], capsys)
    line = refused(TINY + ["--op-search", "dynamic_programming", "--pp", "2", "--dp", "2", "--mp", "1",
                           "--micro-batches", "1"], capsys)
    assert "expected --pp 1 --micro-batches 1, got --pp 2 --micro-batches 1" in line


@pytest.mark.parametrize("flag, path, why", [
    ("--json", NO_DIR + ".json", "No such file or directory"),
    ("--json", str(SCRATCH), "Is a directory"),
    ("--json", f"{A_FILE}/plan.json", "Not a directory"),
    ("--png", NO_DIR + ".png", "No such file or directory"),
])
def test_unwritable_outputs_are_refused_before_the_search(flag, path, why, capsys):
    line = refused(TINY + [flag, path], capsys)     # nothing printed: the search never started
    assert line == (f"{PROG}: error: argument {flag}: {path!r}: expected a file this process can write, got "
                    f"{why}; give a path in an existing, writable directory")


def test_a_picture_name_matplotlib_cannot_write_is_refused(capsys):
    line = refused(TINY + ["--png", f"{SCRATCH}/plan.unknown-ext"], capsys)
    assert "argument --png: expected a file name ending in one of" in line and ".png" in line


def test_the_output_check_keeps_an_existing_file_and_leaves_no_new_one(tmp_path, capsys):
    kept, fresh = tmp_path / "kept.json", tmp_path / "fresh.json"
    kept.write_text("old plan")
    bad_hand = ["--pp", "4", "--dp", "1", "--mp", "1", "--micro-batches", "4"]     # refused after the check
    refused(TINY + bad_hand + ["--json", str(kept)], capsys)
    refused(TINY + bad_hand + ["--json", str(fresh)], capsys)
    assert kept.read_text() == "old plan" and not fresh.exists()


def test_a_valid_json_path_gets_the_plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    rc, out, err = run_main(TINY + HAND + ["--json", str(path)], capsys)
    assert rc == 0, err
    hand = json.loads(path.read_text())["plans"]["hand-given"]
    assert (hand["pp"], hand["dp"], hand["mp"], hand["micro_batches"]) == (2, 2, 1, 2)


def test_no_plan_for_the_memory_is_status_1_with_the_leanest_plan(capsys):
    rc, out, err = run_main(TINY + ["--memory-cap", "1e-7"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"{PROG}: no plan fits 107 B per device: the leanest needs ")


@pytest.mark.parametrize("argv, says", [
    (["--pp", "16", "--dp", "16", "--mp", "9", "--micro-batches", "32"],
     "--pp x --dp x --mp: expected --devices 2048, got 16 x 16 x 9 = 2304"),
    (["--pp", "128", "--dp", "16", "--mp", "1", "--micro-batches", "128"],
     "--pp: expected at most 63 (the pipelined layers of pangu_alpha 200B"),
    (["--pp", "16", "--dp", "16", "--mp", "8", "--micro-batches", "64"],
     "--dp: expected a divisor of the micro-batch size --batch 512 / --micro-batches 64 = 8, got 16"),
    (["--pp", "16", "--dp", "16", "--mp", "8", "--micro-batches", "32", "--layers-per-stage", "4,4"],
     "--layers-per-stage: expected 16 counts (one per --pp stage) summing to 63"),
])
def test_200b_hand_plans_are_checked_before_any_pricing(argv, says, capsys):
    base = ["--preset", "200B", "--devices", "2048", "--profile", "ascend910-2048"]
    assert says in refused(base + argv, capsys)


# ---------------------------------------------------------------------------- the real command

def command(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "autopar.plan", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, line", [
    (["--preset", "tiny", "--devices", "4", "--pp", "0", "--dp", "4", "--mp", "1", "--micro-batches", "1"],
     f"{PROG}: error: argument --pp: expected an integer >= 1, got '0'"),
    (["--preset", "tiny", "--devices", "4", "--profile", "nope"],
     f"{PROG}: error: argument --profile: load_profile: no profile named 'nope'"),
    (["--preset", "200B", "--devices", "2048", "--json", NO_DIR + ".json"],
     f"{PROG}: error: argument --json: '{NO_DIR}.json': expected a file this process can write"),
])
def test_the_command_ends_with_one_line_and_status_2(argv, line):
    proc = command(*argv)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr


def test_the_command_plans_a_valid_line():
    proc = command("--preset", "tiny", "--devices", "2", "--batch", "4", "--ops", "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "searched / hand-given" not in proc.stdout and "predicted step (s)" in proc.stdout

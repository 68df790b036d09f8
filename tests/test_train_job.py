"""The main job: the same losses serially and under mpiexec -n 2 (dp2 and mp2); a resumed
run continues exactly; bad input fails early with one clear line and leaves no files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autopar.models.pangu_alpha import PanguAlphaConfig
from test_comm_mpi_launch import MPIEXEC, ROOT

EXAMPLES = ROOT / "examples" / "pangu_alpha"
SCRIPT = str(EXAMPLES / "train.py")
DATA_FLAGS = ["--vocab-size", "4000", "--max-docs", "1500"]
DROPOUT = ["--dropout", "0.1"]          # on, so that equal losses show each step's dropout is the same
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run(out: Path, data: Path, launcher: list[str], extra: list[str]) -> dict:
    """The job's losses JSON, after 3 small steps (unless ``extra`` says otherwise)."""
    losses = out.with_suffix(".json")
    cmd = launcher + [sys.executable, SCRIPT, "--data", str(data), *DATA_FLAGS, "--steps", "3", "--batch", "4",
                      "--eval-every", "100", "--eval-batches", "1", "--out", str(out), "--losses-out", str(losses),
                      *DROPOUT, *extra]
    proc = launch(cmd)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "->" in proc.stdout  # the generated continuation is printed
    return json.loads(losses.read_text())


def fails(script: str, args: list[str]) -> str:
    """stderr of a run that must stop at once with a one-line user error (status 2)."""
    proc = launch([sys.executable, str(EXAMPLES / script), *args])
    assert proc.returncode == 2, f"{args}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    sys.path.insert(0, str(EXAMPLES))
    from prepare_data import prepare
    folder = tmp_path_factory.mktemp("job") / "data"
    prepare(folder, vocab_size=4000, max_docs=1500, log=lambda *_: None)
    return folder


@pytest.fixture(scope="module")
def serial(data) -> dict:
    return run(data.parent / "serial", data, [], [])


@needs_mpi
def test_job_losses_equal_serially_and_over_two_ranks(data, serial):
    dp2 = run(data.parent / "dp2", data, [MPIEXEC, "-n", "2"], [])
    mp2 = run(data.parent / "mp2", data, [MPIEXEC, "-n", "2"], ["--mp", "2"])
    assert len(serial["losses"]) == 3 and serial["losses"][0] > 5.0
    assert 0 < serial["mfu"] <= 1 and serial["mfu_valid"] and serial["tokens_per_s"] > 0
    assert serial["peak_source"].startswith("float32 GEMM measured at start on CPU: 512x96x384, 512x96x4000, 2048x2048x2048")
    assert serial["skipped_steps"] == serial["empty_steps"] == 0
    for other in (dp2, mp2):
        np.testing.assert_allclose(other["losses"], serial["losses"], rtol=1e-5)
        np.testing.assert_allclose([v for _, v in other["evals"]], [v for _, v in serial["evals"]], rtol=1e-5)


@needs_mpi
def test_job_runs_auto_hand_pipelines_and_cli_plans_like_serial(data, serial, tmp_path):
    """Under mpiexec the job runs auto_parallel by default (printing the plan), a hand
    pipeline with recompute, and a plan written by ``python -m autopar.plan --json``: all
    give the serial losses."""
    losses = tmp_path / "auto.json"
    cmd = [MPIEXEC, "-n", "2", sys.executable, SCRIPT, "--data", str(data), *DATA_FLAGS, "--steps", "3", "--batch",
           "4", "--eval-every", "100", "--eval-batches", "1", "--out", str(tmp_path / "auto"), "--losses-out",
           str(losses), *DROPOUT, "--pp", "2"]
    proc = launch(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "auto_parallel plan on 2 devices" in proc.stdout and "pp2 x 1 devices per stage" in proc.stdout
    auto = json.loads(losses.read_text())
    hand = run(data.parent / "pp2", data, [MPIEXEC, "-n", "2"], ["--parallel", "hand", "--pp", "2", "--micro", "2",
                                                                  "--recompute"])
    plan = tmp_path / "plan.json"
    cli = launch([sys.executable, "-m", "autopar.plan", "--model", "pangu_alpha", "--hidden", "96", "--layers", "4",
                  "--heads", "8", "--ffn", "384", "--seq", "128", "--vocab", "4000", "--devices", "2", "--batch", "4",
                  "--pp", "2", "--dp", "1", "--mp", "1", "--micro-batches", "2", "--json", str(plan)])
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(plan.read_text())
    doc["chosen"] = "hand-given"                 # run the hand plan the file priced beside the searched one
    plan.write_text(json.dumps(doc))
    planned = run(data.parent / "planned", data, [MPIEXEC, "-n", "2"], ["--plan", str(plan)])
    for other in (auto, hand, planned):
        np.testing.assert_allclose(other["losses"], serial["losses"], rtol=1e-5)


@needs_mpi
def test_a_resumed_run_continues_the_uninterrupted_one(data, serial):
    """1 serial step, then resumed to step 3 under mp2: the steps, losses (dropout on, the lr
    schedule, optimizer moments and data order restored) and final validation loss of the 3
    uninterrupted serial steps."""
    out = data.parent / "resumed"
    first = run(out, data, [], ["--steps", "1", "--decay-steps", "3"])
    rest = run(out, data, [MPIEXEC, "-n", "2"], ["--steps", "3", "--mp", "2", "--resume"])
    assert first["steps"] + rest["steps"] == serial["steps"] == [1, 2, 3]
    np.testing.assert_allclose(first["losses"] + rest["losses"], serial["losses"], rtol=1e-5)
    np.testing.assert_allclose(rest["evals"][-1], serial["evals"][-1], rtol=1e-5)
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["extra"]["loader"]["step"] == 3


def test_resume_errors_name_the_checkpoint_and_the_mismatch(data, serial, tmp_path):
    err = fails("train.py", ["--data", str(data), "--resume", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert "--resume" in err and "checkpoint" in err and "train without --resume first" in err
    ckpt = str(data.parent / "serial" / "checkpoint")
    err = fails("train.py", ["--data", str(data), "--resume", ckpt, "--steps", "3", "--out", str(tmp_path),
                             *DROPOUT])
    assert "--steps: expected more than the checkpoint's 3 steps" in err
    err = fails("train.py", ["--data", str(data), "--resume", ckpt, "--preset", "tiny", "--out", str(tmp_path)])
    assert "model config" in err and "hidden_size=96 (now 32)" in err


def test_overwrite_replaces_the_checkpoint_in_out(data, serial, tmp_path):
    """A finished run's folder (3 steps) trained again with --overwrite: the checkpoint is the
    new run's (1 step), not refused and not mixed with the old one."""
    out = tmp_path / "again"
    shutil.copytree(data.parent / "serial", out)
    run(out, data, [], ["--steps", "1", "--overwrite"])
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == 1 and manifest["extra"]["loader"]["step"] == 1


def test_a_diverging_run_stops_naming_the_skips_and_the_last_checkpoint(data, tmp_path):
    """lr 1e30: after two updates the weights are so large that every later step's loss is
    non-finite; the trainer skips 10 updates in a row and stops, and the job names the last
    checkpoint: saved at step 11, it holds the 2 updates and counts the 9 skips, so a resume
    continues at step 11 with 2 updates applied."""
    out = tmp_path / "diverged"
    proc = launch([sys.executable, SCRIPT, "--data", str(data), *DATA_FLAGS, "--steps", "30", "--batch", "4",
                   "--lr", "1e30", "--eval-every", "100", "--eval-batches", "1", "--save-every", "1",
                   "--out", str(out)])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr     # one line: the command line was fine
    assert "train.py: error: TrainOneStepCell: loss and gradient norm: expected finite values" in proc.stderr
    assert (f"training diverged (below); the last checkpoint (weights from before the skipped steps) is "
            f"{out / 'checkpoint'}") in proc.stderr
    assert "10 consecutive steps with a non-finite loss or gradient norm, updates skipped" in proc.stderr
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    from job import Resume
    resume = Resume.read(out / "checkpoint", PanguAlphaConfig(**manifest["extra"]["config"]))
    assert (resume.step, resume.updates, resume.skipped_steps, resume.empty_steps) == (11, 2, 9, 0)


def test_an_unknown_preset_is_an_error_before_anything_is_made(tmp_path):
    err = fails("train.py", ["--preset", "huge", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert "--preset: invalid choice: 'huge'" in err and "'tiny'" in err and "'200B'" in err
    assert list(tmp_path.iterdir()) == []


def test_a_prompt_longer_than_seq_length_is_an_error_before_training(data, tmp_path):
    err = fails("train.py", ["--data", str(data), *DATA_FLAGS, "--prompt", "中国" * 200, "--out", str(tmp_path / "o")])
    assert "train.py: error: --prompt: expected 1 to 127 tokens (seq_length=128 of --preset demo)" in err
    assert not (tmp_path / "o").exists()
    err = fails("generate.py", ["--data", str(data), "--checkpoint", str(data.parent / "serial" / "checkpoint"),
                                "--prompt", "中国" * 200])
    assert "generate.py: error: generate: prompt 0: expected 1 to 127 tokens (seq_length=128)" in err


def copy_of(data: Path, tmp: Path) -> Path:
    folder = tmp / "data"
    shutil.copytree(data, folder)
    return folder


def test_a_missing_tokenizer_file_is_named(data, tmp_path):
    folder = copy_of(data, tmp_path)
    (folder / "tokenizer.model").unlink()
    err = fails("train.py", ["--data", str(folder), "--out", str(tmp_path / "o")])
    assert f"no {folder / 'tokenizer.model'}" in err and "prepare_data.py --out" in err and "--force" in err
    err = fails("generate.py", ["--data", str(folder), "--checkpoint", str(data.parent / "serial" / "checkpoint")])
    assert "PanguTokenizer: model_file" in err and str(folder / "tokenizer.model") in err
    assert not (tmp_path / "o").exists() and not (folder / "tokenizer.model").exists()   # nothing rebuilt


def test_a_corrupt_token_file_is_named(data, tmp_path):
    folder = copy_of(data, tmp_path)
    tokens = bytearray((folder / "train.bin").read_bytes())
    tokens[1000:1004] = b"\xff\xff\xff\xff"                      # same size, other contents
    (folder / "train.bin").write_bytes(bytes(tokens))
    err = fails("train.py", ["--data", str(folder), "--out", str(tmp_path / "o")])
    assert str(folder / "train.bin") in err and "different contents (corrupt or from another run)" in err
    (folder / "train.bin").write_bytes((data / "train.bin").read_bytes())
    with open(folder / "valid.bin", "r+b") as f:                # truncated
        f.truncate(101)
    err = fails("evaluate.py", ["--data", str(folder), "--checkpoint", str(data.parent / "serial" / "checkpoint")])
    assert str(folder / "valid.bin") in err and "file size" in err and "101 bytes" in err
    assert not (tmp_path / "o").exists()


def test_prepare_leaves_no_partial_files_when_it_fails(data, tmp_path, monkeypatch):
    """Token files are written under temporary names and renamed together, meta.json last: a
    failure while writing them leaves no token file, no temporary file and no meta.json."""
    import prepare_data
    texts = ["中国的经济发展很快。", "今天的天气很好，我们去公园散步。"] * 20
    monkeypatch.setattr(prepare_data, "load_corpus", lambda min_chars: texts)
    monkeypatch.setattr(prepare_data, "train_tokenizer",
                        lambda texts, prefix, *a, **k: shutil.copy(data / "tokenizer.model", f"{prefix}.model"))
    real_write, calls = prepare_data.write_tokens, []

    def write_then_fail(f, segmented, tokenizer, dtype):
        calls.append(real_write(f, segmented, tokenizer, dtype))
        if len(calls) == 2:                                      # valid.bin written, not yet renamed
            raise OSError("No space left on device")
        return calls[-1]
    monkeypatch.setattr(prepare_data, "write_tokens", write_then_fail)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="No space left"):
        prepare_data.prepare(out, vocab_size=4000, log=lambda *_: None)
    assert len(calls) == 2 and calls[0][0] > 0                   # it failed with both files written
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model"]   # complete; no meta.json commits it


def test_parallel_flags_are_checked_before_any_work(data, tmp_path):
    err = fails("train.py", ["--data", str(data), "--plan", "p.json", "--dp", "2", "--out", str(tmp_path / "o")])
    assert "train.py: error: --plan: expected no hand flags beside it (the plan sets them), got --dp" in err
    err = fails("train.py", ["--data", str(data), "--parallel", "auto", "--mp", "2", "--out", str(tmp_path / "o")])
    assert "--parallel auto: expected no --plan, --dp or --mp" in err
    err = fails("train.py", ["--data", str(data), "--pp", "0", "--out", str(tmp_path / "o")])
    assert "--pp: expected an int >= 1, got 0" in err
    plan = tmp_path / "plan.json"
    cli = launch([sys.executable, "-m", "autopar.plan", "--model", "pangu_alpha", "--preset", "tiny", "--devices", "4",
                  "--batch", "8", "--json", str(plan)])
    assert cli.returncode == 0, cli.stderr
    err = fails("train.py", ["--data", str(data), *DATA_FLAGS, "--plan", str(plan), "--out", str(tmp_path / "o")])
    assert f"--plan {plan}: devices: expected 1 (the ranks running), got 4" in err
    assert not (tmp_path / "o").exists()


def test_device_gpu_is_device_target_gpu_with_the_corpus_sized_model():
    """``--device gpu`` (the issue's spelling) is ``--device-target GPU`` and picks the gpu
    shape: 14M parameters at the corpus' 8000 tokens -- 12 H^2 + 13 H per layer (the query
    layer is the last of ``num_layers``), the word, position and top-query tables, the final
    LayerNorm."""
    sys.path.insert(0, str(EXAMPLES))
    from job import GPU_JOB, model_config
    from train import parse_args
    args = parse_args(["--device", "gpu"])
    assert (args.device_target, args.preset) == ("GPU", "gpu")
    assert (parse_args([]).device_target, parse_args([]).preset) == ("CPU", "demo")
    assert parse_args(["--device", "gpu", "--preset", "demo"]).preset == "demo"
    tok = type("Tok", (), dict(vocab_size=8000, eod_id=6, pad_id=5))()
    config = model_config(args, tok, 1, 1)
    assert {k: getattr(config, k) for k in GPU_JOB} == GPU_JOB
    h, layers, v, s = 384, 6, 8000, 256
    blocks = layers * (12 * h * h + 13 * h)                  # QKV + dense, two FFN matrices, biases, two norms
    assert config.parameter_count() == blocks + v * h + 2 * s * h + 2 * h == 13_916_160
    assert 13e6 < config.parameter_count() < 15e6


def test_device_and_device_target_must_agree():
    err = fails("train.py", ["--device", "cpu", "--device-target", "GPU"])
    assert "--device cpu: expected the same device as --device-target, got GPU" in err

"""The PanGu-α ``generate.py`` and ``evaluate.py`` command lines: every bad flag, a
checkpoint without its config and a window longer than the model end with one line naming
the flag or file (status 2); a NaN result ends evaluate.py with status 1. A tiny checkpoint
and a hand-made validation file stand in for a trained run (no tokenizer needed: the checks
come before it is read)."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "pangu_alpha"
TINY = PanguAlphaConfig.preset("tiny", dropout_rate=0.0)      # seq_length 16, vocab 96, eod 8


def load(script: str):
    spec = importlib.util.spec_from_file_location(f"example_{script}", EXAMPLES / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_py, evaluate_py = load("generate"), load("evaluate")
cli = importlib.import_module("cli")        # the module the scripts import (they put their folder on sys.path)


def tiny_checkpoint(path: Path, gamma: float | None = None, **save) -> str:
    """A tiny PanGu-α (its config is saved with it); ``gamma`` fills the final LayerNorm's scale."""
    model = PanguAlpha(TINY)
    if gamma is not None:
        p = next(p for p in model.trainable_params() if p.name == "final_layernorm.gamma")
        p.set_data(np.full(p.shape, gamma, np.float32))
    return autopar.save_checkpoint(model, path, **save)


def legacy_checkpoint(path: Path) -> str:
    """A checkpoint as train.py wrote them before configs travelled in the manifest: the
    config only in ``extra["config"]``."""
    tiny_checkpoint(path, extra={"config": dict(TINY.__dict__)})
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["config"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("example-cli")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(10, TINY.vocab_size, 20), TINY.eod_id) for _ in range(8)]   # 8 docs of 20
    tokens = np.concatenate(docs).astype("<u2")
    (data / "valid.bin").write_bytes(tokens.tobytes())
    meta = {"vocab_size": TINY.vocab_size, "dtype": "<u2", "eod_id": TINY.eod_id,
            "files": {"valid.bin": {"tokens": int(tokens.size),
                                    "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}}}
    (data / "meta.json").write_text(json.dumps(meta))
    return {"data": str(data), "good": tiny_checkpoint(root / "good"),
            "overflow": tiny_checkpoint(root / "overflow", gamma=3e38),     # finite weights, NaN logits
            "nan": tiny_checkpoint(root / "nan", gamma=float("nan"), allow_non_finite=True),
            "legacy": legacy_checkpoint(root / "legacy"),
            "no_config": autopar.save_checkpoint(nn.Dense(4, 4), root / "dense")}


@pytest.fixture(scope="module")
def tokenizer_data(tmp_path_factory) -> Path:
    """A --data folder holding only a 300-piece tokenizer trained on four sentences."""
    pytest.importorskip("jieba")
    pytest.importorskip("sentencepiece")
    from autopar.models.pangu_alpha.tokenizer import train_tokenizer
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = ["中国的经济发展很快。", "今天的天气很好。", "我们一起去学校学习。", "他在北京工作了三年。"] * 20
    train_tokenizer(texts, folder / "tokenizer", 300, character_coverage=1.0, num_threads=1)
    return folder


def in_process(module, script: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``script`` run as its ``__main__`` does, in this process."""
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: module.main(argv), script)
    return stop.value.code, capsys.readouterr().err


def refused(module, script: str, argv: list[str], capsys) -> str:
    """The one line a refused command line prints (status 2)."""
    code, err = in_process(module, script, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    assert err.startswith(f"{script}: error: ")
    return err.strip()


def command(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------- generate.py flags

@pytest.mark.parametrize("argv, line", [
    (["--top-p", "2"], "argument --top-p: expected a finite number (0, 1], got '2'"),
    (["--top-p", "0"], "argument --top-p: expected a finite number (0, 1], got '0'"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: expected an integer >= 1, got '-1'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
    (["--min-new-tokens", "-2"], "argument --min-new-tokens: expected an integer >= 0, got '-2'"),
    (["--min-new-tokens", "50"], "argument --min-new-tokens: expected at most --max-new-tokens 40, got 50"),
    (["--top-k", "-1"], "argument --top-k: expected an integer >= 0, got '-1'"),
    (["--temperature", "0"], "argument --temperature: expected a finite number > 0, got '0'"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number > 0, got 'nan'"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["--mp", "0"], "argument --mp: expected an integer >= 1, got '0'"),
    (["--prompt", " "], "argument --prompt: expected non-empty text, got ' '"),
    (["--middle", "4"], "argument --middle: applies only to filling a middle span; give --order too"),
    (["--order", "left", "--middle", "0"], "argument --middle: expected an integer >= 1, got '0'"),
    (["--order", "0,0,1", "--middle", "3"],
     "argument --order: expected left, right, random or a permutation of 0..2 (--middle 3) such as 2,1,0, "
     "got '0,0,1'"),
    (["--order", "left", "--prompt", "x"], "argument --prompt: --order fills a span between --prefix and --suffix"),
    (["--order", "left", "--no-cache"], "argument --no-cache: --order always decodes with the key/value cache"),
    (["--order", "left", "--suffix", "x"], "argument --suffix: needs --prefix too"),
    (["--order", "left", "--prefix", "x", "--doc", "2"], "argument --doc: cuts the span from a validation document"),
])
def test_generate_flags_are_checked_before_anything_is_read(argv, line, capsys):
    # --checkpoint points nowhere: the flag is refused before the checkpoint is opened
    got = refused(generate_py, "generate.py", ["--checkpoint", "/nonexistent", *argv], capsys)
    assert got.startswith(f"generate.py: error: {line}"), got


def test_generate_top_k_above_the_vocabulary_names_the_checkpoint(files, capsys):
    line = refused(generate_py, "generate.py", ["--checkpoint", files["good"], "--top-k", "500"], capsys)
    assert line == (f"generate.py: error: argument --top-k: expected at most the vocab_size 96 of the model in "
                    f"checkpoint {files['good']}, got 500")


def test_generate_a_document_span_longer_than_the_model(files, capsys):
    line = refused(generate_py, "generate.py", ["--checkpoint", files["good"], "--order", "left"], capsys)
    assert ("argument --context/--middle: 2 x --context + --middle: expected at most the seq_length 16 of the model "
            f"in checkpoint {files['good']}, got 2 x 12 + 8 = 32; lower --context or --middle") in line


def test_generate_model_parallel_degrees_the_model_or_the_ranks_refuse(files, capsys):
    line = refused(generate_py, "generate.py", ["--checkpoint", files["good"], "--mp", "3"], capsys)
    assert line.startswith("generate.py: error: argument --mp: PanguAlphaConfig: model_parallel: expected a divisor "
                           "of num_heads=4"), line
    proc = command("generate.py", "--checkpoint", files["good"], "--data", "/nonexistent", "--mp", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "generate.py: error: argument --mp: expected 1 (the ranks running), got 2; run under mpiexec -n 2" in \
        proc.stderr


def test_generate_with_a_tokenizer_larger_than_the_model(files, tokenizer_data):
    proc = command("generate.py", "--checkpoint", files["good"], "--data", str(tokenizer_data))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (f"generate.py: error: argument --data: {tokenizer_data / 'tokenizer.model'}: expected at "
                           f"most 96 pieces (the vocab_size of the model in checkpoint {files['good']}), got 300; "
                           "use the --data folder the checkpoint was trained on\n")


def test_generate_passes_its_flags_to_the_decoder(tokenizer_data, tmp_path):
    """Valid flags still generate: greedy, 3 new tokens, as the library decodes them."""
    from autopar.models.pangu_alpha.generate import generate_cached
    from autopar.models.pangu_alpha.tokenizer import PanguTokenizer
    config = TINY.replace(vocab_size=300)
    model = PanguAlpha(config)
    path = autopar.save_checkpoint(model, tmp_path / "ckpt")
    tok = PanguTokenizer(tokenizer_data / "tokenizer.model")
    want = generate_cached(model, [tok.encode("中国的经济")], 3, temperature=0.0, eod_id=tok.eod_id,
                           min_new_tokens=3)[0]
    proc = command("generate.py", "--checkpoint", path, "--data", str(tokenizer_data), "--prompt", "中国的经济",
                   "--greedy", "--max-new-tokens", "3", "--min-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"中国的经济 -> 中国的经济{tok.decode(want)}\n"


def no_config_says(line: str, files: dict, script: str) -> None:
    assert line.startswith(f"{script}: error: checkpoint {files['no_config']!r}: model config: expected one saved "
                           "with the weights, got none (it was written by autopar "), line
    assert "from a Dense, which has no `config` dataclass attribute); " + cli.NO_CONFIG_FIX in line


def test_generate_on_a_checkpoint_without_its_config_is_one_line(files):
    proc = command("generate.py", "--checkpoint", files["no_config"], "--data", "/nonexistent")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    no_config_says(proc.stderr.strip(), files, "generate.py")


def test_a_checkpoint_with_the_config_in_extra_still_loads(files):
    assert cli.checkpoint_config(files["legacy"]) == TINY
    assert cli.checkpoint_config(files["good"], model_parallel=2) == TINY.replace(model_parallel=2)


# ------------------------------------------------------------------------------- evaluate.py

@pytest.mark.parametrize("argv, line", [
    (["--questions", "0"], "argument --questions: expected an integer >= 1, got '0'"),
    (["--context", "0"], "argument --context: expected an integer >= 1, got '0'"),
    (["--span", "x"], "argument --span: expected an integer >= 1, got 'x'"),
    (["--seed", "-3"], "argument --seed: expected an integer >= 0, got '-3'"),
])
def test_evaluate_flags_are_checked(argv, line, capsys):
    got = refused(evaluate_py, "evaluate.py", ["--checkpoint", "/nonexistent", *argv], capsys)
    assert got == f"evaluate.py: error: {line}"


def test_evaluate_on_a_checkpoint_without_its_config_is_one_line(files, capsys):
    line = refused(evaluate_py, "evaluate.py", ["--checkpoint", files["no_config"], "--data", files["data"]], capsys)
    no_config_says(line, files, "evaluate.py")


@pytest.mark.parametrize("argv, says", [
    (["--context", "24"], "argument --context: --context + --span: expected at most the seq_length 16 of the "
                          "model in checkpoint {good}, got 24 + 5 = 29; lower --context"),
    (["--context", "10", "--span", "10"], "argument --context + --span: --context + --span: expected at most the "
                                          "seq_length 16 of the model in checkpoint {good}, got 10 + 10 = 20"),
])
def test_evaluate_a_window_longer_than_the_model_names_the_flag(files, argv, says, capsys):
    line = refused(evaluate_py, "evaluate.py", ["--checkpoint", files["good"], "--data", files["data"], *argv],
                   capsys)
    assert says.format(good=files["good"]) in line


def test_evaluate_without_enough_long_documents(files, capsys):
    # documents of 3 tokens cannot hold the default window of 16 (11 context + 5 span)
    short = Path(files["data"]).parent / "short"
    short.mkdir(exist_ok=True)
    tokens = np.array([11, 12, 13, TINY.eod_id] * 6, "<u2")
    (short / "valid.bin").write_bytes(tokens.tobytes())
    (short / "meta.json").write_text(json.dumps({"dtype": "<u2", "files": {"valid.bin": {
        "tokens": int(tokens.size), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}}}))
    line = refused(evaluate_py, "evaluate.py", ["--checkpoint", files["good"], "--data", str(short)], capsys)
    assert "argument --data: " in line and "expected at least 4 validation documents of >= --context + --span = " \
        "16 tokens, got 0" in line


def test_evaluate_defaults_shrink_to_a_short_model(files):
    proc = command("evaluate.py", "--checkpoint", files["good"], "--data", files["data"], "--questions", "3")
    assert proc.returncode == 0, proc.stderr
    ppl = float(proc.stdout.split("validation perplexity over 8 windows of 16 tokens: ")[1].split()[0])
    assert np.isfinite(ppl) and ppl > 1          # defaults 24 + 8 shrank to 11 + 5 = seq_length 16
    assert "multiple choice (real continuation among 4): " in proc.stdout and "/3 = " in proc.stdout


def test_evaluate_a_nan_perplexity_exits_1_with_one_line(files):
    proc = command("evaluate.py", "--checkpoint", files["overflow"], "--data", files["data"])
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr == (f"evaluate.py: error: validation perplexity is nan for checkpoint {files['overflow']}: "
                           "its weights are finite but overflow (diverged training); evaluate an earlier checkpoint, "
                           "or retrain with a lower learning rate\n")


def test_evaluate_names_the_nan_weight(files, capsys):
    code, err = in_process(evaluate_py, "evaluate.py", ["--checkpoint", files["nan"], "--data", files["data"]], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "validation perplexity is nan" in err and "its weight 'final_layernorm.gamma' holds NaN or inf" in err

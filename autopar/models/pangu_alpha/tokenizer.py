"""PanGu-α tokenizer: jieba words, then a SentencePiece unigram model (REFERENCE.md, "Tokenizer").

Encoding, as PanGu-α's ``JIEBATokenizer`` does it::

    text ──NFKC──> jieba words ──inside each word ' '→'▂' (U+2582), '\\n'→'▃' (U+2583)──>
    words joined by single spaces ──SentencePiece (NFKC normaliser, unigram)──> ids

Decoding runs it backwards: SentencePiece yields the words with a space between them; all
spaces are dropped, then '▂'→' ' and '▃'→'\\n'. Worked example (the 8000-piece model that
``examples/pangu_alpha/prepare_data.py`` trains)::

    "江泽民说 好\\n"  -> jieba ['江泽民', '说', ' ', '好', '\\n']
                    -> "江泽民 说 ▂ 好 ▃"
                    -> ['▁江泽', '民', '▁说', '▁', '▂', '▁好', '▁', '▃']

jieba never keeps whitespace inside a word: each space or newline is a word of its own (only
'\\r\\n' stays together, giving '\\r▃'). So every space in the text becomes exactly one '▂'
piece (id 4) and every newline one '▃' (id 3); the word-joining spaces become SentencePiece's
'▁' and vanish again on decoding. A literal '▂' or '▃' in the input therefore decodes as a
space or newline, as in PanGu-α.

NFKC is stored in the model (``normalization_rule_name='nfkc'``) and also applied once in
Python before jieba, so that characters NFKC turns into a space (U+3000, U+00A0) become '▂'
instead of silently merging into a word boundary. Hence ``decode(encode(t)) == NFKC(t)`` for
every text without a literal '▂' or '▃'.

Special ids are those of the released vocabulary (``SPECIAL_PIECES[i]`` has id ``i``)::

    <unk>0 <s>1 </s>2 ▃3 ▂4 <sep>5 <pad>6 <mask>7 <eod>8 <eot>9

They are fixed at training time: unk/bos/eos/pad by their ids, the other six as
user-defined symbols in that order (SentencePiece fills the free ids 3, 4, 5, 7, 8, 9 in
order). Unlike the shipped 40k model, :func:`train_tokenizer` enables byte fallback by
default, so characters outside the vocabulary still round-trip instead of becoming <unk>.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jieba
import sentencepiece as spm

from autopar.errors import check_int, format_error

jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." chatter on first use

SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "\u2583", "\u2582", "<sep>", "<pad>", "<mask>",
                  "<eod>", "<eot>")
UNK_ID, BOS_ID, EOS_ID, NEWLINE_ID, SPACE_ID = 0, 1, 2, 3, 4
SEP_ID, PAD_ID, MASK_ID, EOD_ID, EOT_ID = 5, 6, 7, 8, 9

_TO_PIECES = str.maketrans(" \n", "\u2582\u2583")
_FROM_PIECES = str.maketrans("\u2582\u2583", " \n")
_HOW_TO_CREATE = ("create it with autopar.models.pangu_alpha.tokenizer.train_tokenizer(texts, "
                  "model_prefix, vocab_size) or `python examples/pangu_alpha/prepare_data.py "
                  "--out data/pangu` (writes data/pangu/tokenizer.model)")


def segment(text: str) -> str:
    """PanGu-α's pre-processing: the string SentencePiece encodes.

    >>> segment("江泽民说 好\\n")
    '江泽民 说 ▂ 好 ▃'
    """
    text = unicodedata.normalize("NFKC", text)
    return " ".join(word.translate(_TO_PIECES) for word in jieba.lcut(text))


class PanguTokenizer:
    """Encode text to PanGu-α token ids and back (see the module docstring)."""

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        if not path.is_file():
            msg = format_error("PanguTokenizer", "model_file", "an existing SentencePiece model file",
                               f"no file at {str(path)!r}", _HOW_TO_CREATE)
            raise FileNotFoundError(errno.ENOENT, msg, str(path))
        self.model_file = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(format_error("PanguTokenizer", "model_file",
                                          "a SentencePiece model", f"unreadable {str(path)!r} ({err})",
                                          _HOW_TO_CREATE)) from err
        _check_special_pieces(self._sp, path)

    def __repr__(self) -> str:
        return f"PanguTokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def eod_id(self) -> int:
        return EOD_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of one document (no <s>, </s> or <eod> added)."""
        return self._sp.EncodeAsIds(segment(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """``[encode(t) for t in texts]``, the SentencePiece half run on ``num_threads`` threads."""
        return self.encode_segmented([segment(t) for t in texts], num_threads)

    def encode_segmented(self, lines: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """The SentencePiece half of ``encode``, for strings already made by :func:`segment`."""
        return self._sp.Encode(list(lines), num_threads=num_threads)

    def tokenize(self, text: str) -> list[str]:
        """The pieces ``encode`` produces, as strings (for inspection)."""
        return self._sp.EncodeAsPieces(segment(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: word spaces dropped, '▂' -> ' ', '▃' -> '\\n'.

        <s>, </s> and <pad> decode to ''; <sep>, <mask>, <eod> and <eot> are user-defined
        pieces and decode to their own text (``decode([5, 8]) == '<sep><eod>'``).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(format_error("PanguTokenizer.decode", "ids",
                                          f"ids in [0, {self.vocab_size})", f"{bad[:5]}",
                                          "decode with the tokenizer the ids were made with"))
        text = self._sp.DecodeIds(ids)
        return text.replace(" ", "").translate(_FROM_PIECES)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.PieceToId(piece)


def _check_special_pieces(sp: spm.SentencePieceProcessor, path: Path) -> None:
    """Every special piece sits at its PanGu-α id, or the model is not a PanGu-α tokenizer."""
    for token_id, piece in enumerate(SPECIAL_PIECES):
        got = sp.IdToPiece(token_id) if token_id < sp.GetPieceSize() else "<missing>"
        if got != piece:
            raise ValueError(format_error(
                "PanguTokenizer", f"model_file {str(path)!r}",
                f"piece {piece!r} at id {token_id} (PanGu-α special ids {list(SPECIAL_PIECES)})",
                f"{got!r}", "train the model with train_tokenizer(), which fixes these ids"))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, delete it on error.

    Readers therefore see either the old file, the complete new one, or none: never a part.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def train_tokenizer(texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int, *,
                    segmented: bool = False, character_coverage: float = 0.9995,
                    byte_fallback: bool = True, num_threads: int | None = None,
                    max_sentence_length: int = 1 << 18) -> Path:
    """Train a PanGu-α SentencePiece unigram model on ``texts``; returns ``<model_prefix>.model``.

    Each text (one document) gets the same jieba pre-processing as :meth:`PanguTokenizer.encode`
    (``segmented=True``: the texts are already :func:`segment` outputs) and becomes one line of
    a temporary training file. Training happens in a temporary folder beside the output;
    ``<model_prefix>.vocab`` and then ``<model_prefix>.model`` are renamed into place only when
    training succeeded, so an interrupted run leaves no partial model.

    ``vocab_size`` counts the 10 special pieces and, with ``byte_fallback``, 256 byte pieces;
    SentencePiece also needs one piece per character covering ``character_coverage`` (at
    least 0.98) of the text, so small vocabularies need small character sets.
    """
    check_int("train_tokenizer", "vocab_size", vocab_size, len(SPECIAL_PIECES) + 1,
              expected=f"an int > {len(SPECIAL_PIECES)}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=f".{prefix.name}.train-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                line = text if segmented else segment(text)
                if line:
                    f.write(line + "\n")
                    lines += 1
        if lines == 0:
            raise ValueError(format_error("train_tokenizer", "texts", "at least one non-empty text",
                                          "none"))
        sp_prefix = Path(tmp) / "sp"
        try:
            spm.SentencePieceTrainer.Train(
                input=str(corpus), model_prefix=str(sp_prefix), vocab_size=vocab_size,
                model_type="unigram", normalization_rule_name="nfkc",
                character_coverage=character_coverage, byte_fallback=byte_fallback,
                unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                user_defined_symbols=[p for i, p in enumerate(SPECIAL_PIECES)
                                      if i not in (UNK_ID, BOS_ID, EOS_ID, PAD_ID)],
                max_sentence_length=max_sentence_length,
                num_threads=num_threads or min(os.cpu_count() or 1, 16), minloglevel=1)
        except RuntimeError as err:
            raise ValueError(_training_error(err, vocab_size, character_coverage, lines)) from err
        PanguTokenizer(f"{sp_prefix}.model")  # the special ids hold, or this raises
        os.replace(f"{sp_prefix}.vocab", f"{prefix}.vocab")
        os.replace(f"{sp_prefix}.model", f"{prefix}.model")
    return Path(f"{prefix}.model")


def _training_error(err: RuntimeError, vocab_size: int, coverage: float, lines: int) -> str:
    """SentencePiece's training failure, restated with the fix."""
    msg = str(err)
    required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if required:
        return format_error("train_tokenizer", "vocab_size",
                            f">= {required.group(2)} (special and byte pieces plus the characters "
                            f"covering character_coverage={coverage} of the text)", str(vocab_size),
                            "raise vocab_size, or train on text with fewer distinct characters")
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg)
    if too_high:
        return format_error("train_tokenizer", "vocab_size",
                            f"<= {too_high.group(1)} (all the pieces {lines} training texts yield)",
                            str(vocab_size), "lower vocab_size or train on more text")
    return format_error("train_tokenizer", "SentencePiece training", "success", msg.strip())

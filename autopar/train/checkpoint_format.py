"""The checkpoint format and its checks: manifest constants, regions, validation of a
manifest against its directory, and reading pieces with their checksums verified. A
manifest is data from disk: every field is checked before it is used, so a crafted one
is rejected with a clear error instead of reading outside the directory or allocating
absurd shapes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import format_error

FORMAT = "autopar-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
BACKUP_SUFFIX = ".old"
DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8", "uint16", "bool")
_ST_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I32": "int32", "I64": "int64",
              "U8": "uint8", "U16": "uint16", "BOOL": "bool"}   # safetensors' names
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

Region = tuple[tuple[int, int], ...]   # [start, stop) per dim, in global coordinates


def _fail(where: str, arg: str, expected: str, actual: str, fix: str = "") -> ValueError:
    return ValueError(format_error(where, arg, expected, actual, fix))


def _full(shape: Sequence[int]) -> Region:
    return tuple((0, int(n)) for n in shape)


def _region(slices: Sequence[slice]) -> Region:
    return tuple((int(s.start), int(s.stop)) for s in slices)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a complete checkpoint directory (it has its manifest)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


# ---- manifest validation ------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_file(directory: str, name: str, file) -> None:
    where = f"{os.path.join(directory, MANIFEST)}: tensor {name!r}"
    if (not isinstance(file, str) or not _FILE_NAME.match(file) or os.path.isabs(file)
            or os.path.basename(file) != file):
        raise _fail(where, "piece file", "a file name inside the checkpoint directory", repr(file),
                    "the manifest may be corrupt or crafted")
    real_dir = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(os.path.join(directory, file))) != real_dir:
        raise _fail(where, "piece file", "a file inside the checkpoint directory", f"{file!r} (a link out of it)")


def _check_region(where: str, region, shape: list[int]) -> Region:
    ok = isinstance(region, list) and len(region) == len(shape)
    ok = ok and all(isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) for r in region)
    if not ok:
        raise _fail(where, "region", f"[[start, stop]] for each of {len(shape)} dims", repr(region))
    for d, ((a, b), n) in enumerate(zip(region, shape)):
        if not 0 <= a <= b <= n:
            raise _fail(where, f"region dim {d}", f"0 <= start <= stop <= {n} (global shape {shape})",
                        f"[{a}, {b}]", "the piece lies outside the tensor")
    return tuple((a, b) for a, b in region)


def _overlap(r: Region, s: Region) -> Region | None:
    out = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(r, s))
    return out if all(a < b for a, b in out) else None


def _volume(r: Region) -> int:
    return math.prod(b - a for a, b in r)


def _check_tensor(directory: str, name: str, entry) -> None:
    where = f"{os.path.join(directory, MANIFEST)}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise _fail(where, "entry", "an object", type(entry).__name__)
    shape, dtype, pieces = entry.get("shape"), entry.get("dtype"), entry.get("pieces")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise _fail(where, "shape", "a list of ints >= 0", repr(shape))
    if dtype not in DTYPES:
        raise _fail(where, "dtype", f"one of {DTYPES}", repr(dtype))
    if not isinstance(pieces, list) or not pieces:
        raise _fail(where, "pieces", "a non-empty list", repr(pieces))
    regions = []
    for i, piece in enumerate(pieces):
        if not isinstance(piece, dict) or not isinstance(piece.get("key"), str):
            raise _fail(where, f"piece {i}", "an object with file, key, region, sha256", repr(piece))
        _check_file(directory, name, piece.get("file"))
        sha = piece.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _fail(where, f"piece {i} sha256", "64 hex digits", repr(sha))
        regions.append(_check_region(f"{where} piece {i} ({piece['file']})", piece.get("region"), shape))
    for i, r in enumerate(regions):
        for j in range(i):
            if _overlap(r, regions[j]):
                raise _fail(where, "pieces", "regions covering the tensor exactly once",
                            f"pieces {j} and {i} overlap ({list(regions[j])} and {list(r)})")
    covered, total = sum(_volume(r) for r in regions), math.prod(shape)
    if covered != total:
        raise _fail(where, "pieces", f"regions covering all {total} elements", f"{covered} covered")


def _validate(manifest, directory: str) -> None:
    where = os.path.join(directory, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(where, "format", repr(FORMAT), repr(manifest.get("format") if isinstance(manifest, dict)
                                                         else type(manifest).__name__))
    if manifest.get("version") != VERSION:
        raise _fail(where, "version", f"{VERSION} (the versions this autopar reads)", repr(manifest.get("version")),
                    "load it with the autopar that wrote it")
    if not _is_int(manifest.get("step")) or manifest["step"] < 0:
        raise _fail(where, "step", "an int >= 0", repr(manifest.get("step")))
    if not isinstance(manifest.get("extra"), dict):
        raise _fail(where, "extra", "an object", repr(manifest.get("extra")))
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise _fail(where, "tensors", "an object", type(tensors).__name__)
    for name, entry in tensors.items():
        _check_tensor(directory, name, entry)


def _resolve(path) -> str:
    """The complete checkpoint at ``path``, or at its backup after an interrupted save."""
    path = os.path.abspath(os.fspath(path))
    for candidate in (path, path + BACKUP_SUFFIX):
        if is_checkpoint(candidate):
            return candidate
    if os.path.exists(path):
        raise _fail("load checkpoint", "path", f"a checkpoint directory with {MANIFEST}",
                    f"{path!r} without one", "it is incomplete (an interrupted save?) or not a checkpoint")
    raise FileNotFoundError(f"load checkpoint: path: expected a checkpoint directory, got {path!r}, "
                            "which does not exist")


def read_manifest(path) -> tuple[str, dict]:
    """(the checkpoint directory actually used, its validated manifest)."""
    directory = _resolve(path)
    file = os.path.join(directory, MANIFEST)
    try:
        with open(file, "rb") as f:
            manifest = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(file, "contents", "JSON", f"unreadable text ({err})") from None
    _validate(manifest, directory)
    return directory, manifest


# ---- reading pieces -------------------------------------------------------------------------

class _Reader:
    """Reads regions of the tensors of one checkpoint, checking every piece it touches."""

    def __init__(self, directory: str, manifest: dict, verify: bool = True):
        self.directory, self.tensors, self.verify = directory, manifest["tensors"], verify
        self._files: dict[str, object] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()

    def _slice(self, name: str, piece: dict):
        file = piece["file"]
        where = f"{os.path.join(self.directory, file)}: tensor {name!r}"
        try:
            if file not in self._files:
                handle = safe_open(os.path.join(self.directory, file), framework="numpy")
                self._files[file] = handle.__enter__()
            f = self._files[file]
            keys = list(f.keys())   # safe_open is not a dict
            if piece["key"] not in keys:
                raise _fail(where, "key", f"{piece['key']!r} in the file", f"keys {sorted(keys)[:5]}")
            sl = f.get_slice(piece["key"])
            stored_shape, stored_dtype = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
        except (SafetensorError, OSError) as err:
            raise _fail(where, "file", "a readable safetensors file", f"{type(err).__name__}: {err}",
                        "the file is truncated or corrupt; restore it or use another checkpoint") from None
        want = tuple(b - a for a, b in piece["region"])
        if stored_shape != want:
            raise _fail(where, "stored shape", f"{want} (its region {piece['region']})", str(stored_shape))
        if stored_dtype != self.tensors[name]["dtype"]:
            raise _fail(where, "stored dtype", self.tensors[name]["dtype"], stored_dtype)
        return sl, where

    def piece(self, name: str, piece: dict) -> np.ndarray:
        """A whole piece, its checksum verified."""
        _, where = self._slice(name, piece)
        try:
            array = self._files[piece["file"]].get_tensor(piece["key"])
        except SafetensorError as err:
            raise _fail(where, "data", "a readable tensor", str(err), "the file is corrupt") from None
        if _sha256(array) != piece["sha256"]:
            raise _fail(where, "sha256", piece["sha256"], _sha256(array), "the file is corrupt")
        return array

    def read(self, name: str, region: Region | None = None) -> np.ndarray:
        """The ``region`` (default: all) of tensor ``name``, from the pieces overlapping it."""
        entry = self.tensors[name]
        region = _full(entry["shape"]) if region is None else region
        parts = []
        for piece in entry["pieces"]:
            own = tuple(tuple(r) for r in piece["region"])
            part = own if not region else _overlap(own, region)
            if part is not None:   # stored shapes checked before allocating: a crafted shape cannot
                parts.append((piece, own, part, self._slice(name, piece)[0]))   # ask for huge memory
        out = np.empty(tuple(b - a for a, b in region), dtype=entry["dtype"])
        for piece, own, part, sl in parts:
            inner = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(part, own))
            if self.verify or part == own:
                block = self.piece(name, piece)[inner]
            else:   # only the slice this rank needs
                block = sl[inner]
            out[tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(part, region))] = block
        return out

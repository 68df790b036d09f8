"""A checkpoint directory on disk: its format, reading it back with every field checked,
and the filesystem steps that publish a new one without ever losing the old.

Reading: a manifest is data from disk, so every field is checked before it is used (a
crafted one is rejected with a clear error instead of reading outside the directory or
allocating absurd shapes), its tensors' names, global shapes and dtypes are checked against
the model's before anything is loaded, and every piece read is checked against its checksum.

Writing, for a checkpoint at ``path`` (``<path>.*`` are its siblings)::

    <path>.lock          one saver at a time: an flock on this file, which also names the
                         holder (pid, host, step); the kernel drops a dead saver's lock, so a
                         lock left by a killed process is simply taken over
    <path>.tmp-<step>/   the new checkpoint being written (removed when a save fails; any
                         left by a killed saver are removed by the next save, under the lock)
    <path>.old/          the previous checkpoint while the new one is renamed in

Every step below is a crash point (tests break them one at a time); at every instant a
complete checkpoint sits at ``path`` or at ``<path>.old``, and loading takes the backup when
``path`` has none.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import check_int, format_error, is_int

FORMAT = "autopar-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
BACKUP_SUFFIX = ".old"
LOCK_SUFFIX = ".lock"
TMP_MARK = ".tmp-"
WRITE_CHUNK = 1 << 20          # bytes per write() call: a full disk is met at any of them
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
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
    ok = ok and all(isinstance(r, list) and len(r) == 2 and all(is_int(v) for v in r) for r in region)
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
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
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
    check_int(where, "step", manifest.get("step"), 0)
    if not isinstance(manifest.get("extra"), dict):
        raise _fail(where, "extra", "an object", repr(manifest.get("extra")))
    config = manifest.get("config")
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("class"), str)
                                   and isinstance(config.get("fields"), dict)):
        raise _fail(where, "config", 'null or {"class": name, "fields": {...}}', repr(config)[:80])
    if not isinstance(manifest.get("writer", {}), dict):
        raise _fail(where, "writer", "an object", repr(manifest.get("writer"))[:80])
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise _fail(where, "tensors", "an object", type(tensors).__name__)
    for name, entry in tensors.items():
        _check_tensor(directory, name, entry)


# ---- a checkpoint against a model ---------------------------------------------------------

def _listed(names: list[str], first: int = 5) -> str:
    return f"{names[:first]}{f' and {len(names) - first} more' if len(names) > first else ''}"


def _check_names(where: str, expected: set[str], given: set[str], strict: bool) -> list[str]:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if strict and (missing or unexpected):
        raise _fail(where, "parameter names", "the network's parameters exactly",
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
                    "load a checkpoint of the same network, or pass strict=False")
    return missing


def _check_shapes(where: str, source: str, model: dict, given: dict) -> None:
    """Every tensor found in both agrees in global shape (and dtype, where ``given`` has
    one) -- checked for all before any is loaded, on every load path alike."""
    def spec(shape, dtype):
        return f"{shape} {dtype}" if dtype else str(shape)

    def agrees(name):
        (shape, dtype), (want_shape, want_dtype) = given[name], model[name]
        return shape == want_shape and dtype in (None, want_dtype)
    wrong = [n for n in model if n in given and not agrees(n)]   # in the model's order
    if wrong:
        (shape, dtype), (want_shape, want_dtype) = given[wrong[0]], model[wrong[0]]
        more = f" (and {len(wrong) - 1} more tensors, e.g. {wrong[1:4]})" if len(wrong) > 1 else ""
        raise _fail(where, f"tensor {wrong[0]!r}", f"{spec(want_shape, dtype and want_dtype)} (the model's)",
                    f"{spec(shape, dtype)} in {source}{more}",
                    "build the model with the checkpoint's config (autopar.train.checkpoint.read_config) "
                    "or load the checkpoint of this model")


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


def _writer(manifest: dict) -> str:
    """Who wrote a checkpoint, for errors about what it lacks."""
    w = manifest.get("writer")
    if not w:
        return "an autopar older than 0.1.0's model configs in checkpoints"
    return (f"autopar {w.get('autopar', '?')} ({w.get('program', '?')}) from a {w.get('network', '?')}, "
            "which has no `config` dataclass attribute")


def _tuples(value):
    """JSON lists back to tuples: configs are frozen, hashable values."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_config(path, cls=None, *, fix: str = "build the model's config by hand"):
    """The model config saved in the checkpoint at ``path``: with ``cls`` (a dataclass such
    as PanguAlphaConfig) an instance of it, else ``{"class": name, "fields": {...}}``.

    Raises ValueError when the checkpoint has none (naming what wrote it; ``fix`` says
    what the caller's user should do instead, e.g. "pass --config FILE"), when it holds
    another class, or when its fields do not make a valid ``cls``.
    """
    directory, manifest = read_manifest(path)
    where, saved = f"checkpoint {directory!r}", manifest.get("config")
    if saved is None:
        raise _fail(where, "model config", "one saved with the weights", f"none (it was written by {_writer(manifest)})",
                    fix)
    if cls is None:
        return {"class": saved["class"], "fields": dict(saved["fields"])}
    if saved["class"] != cls.__name__:
        raise _fail(where, "model config", f"a {cls.__name__}", f"a {saved['class']}",
                    "load it with the model it was saved from")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved["fields"]) - known)
    if unknown:
        raise _fail(where, "model config fields", f"fields of {cls.__name__}", f"unknown {unknown}",
                    "load it with the autopar that wrote it")
    try:
        return cls(**{k: _tuples(v) for k, v in saved["fields"].items()})
    except (TypeError, ValueError) as err:
        raise _fail(where, "model config", f"valid {cls.__name__} fields", str(err)) from None


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


# ---- writing: one saver per path, a temporary directory, a swap ---------------------------

def _write_chunk(fd: int, data: memoryview) -> int:
    return os.write(fd, data)


def _write_bytes(path: str, data: bytes) -> None:
    """Write and fsync a whole file, in chunks of WRITE_CHUNK bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[_write_chunk(fd, view[:WRITE_CHUNK]):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def _remove_tree(path: str) -> None:
    """Delete a checkpoint directory manifest first, so a crash mid-delete never leaves a
    directory that still claims to be complete while missing shard files."""
    manifest = os.path.join(path, MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)
        _fsync_dir(path)
    shutil.rmtree(path)


def _make_dir(path: str) -> None:
    os.makedirs(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(path: str, step: int) -> str:
    return f"{path}{TMP_MARK}{step}"


def _holder(fd: int) -> str:
    """Who holds a lock, from its file; the holder writes it just after locking, so an
    empty file is read again for a moment."""
    for _ in range(50):
        text = os.pread(fd, 4096, 0)
        if text:
            break
        time.sleep(0.002)
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']} (saving step {h['step']} since {h['since']})"
    except (ValueError, TypeError, KeyError):
        return "a process that has not written its id"


def _still_there(fd: int, file: str) -> bool:
    """Whether ``file`` is the file ``fd`` has open (a finished saver unlinks its lock)."""
    try:
        return os.stat(file).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def acquire_lock(path: str, step: int) -> int:
    """Lock ``<path>.lock`` for this process (its open descriptor), or raise
    FileExistsError naming the holder when another process is saving to ``path``."""
    file = path + LOCK_SUFFIX
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FileExistsError(format_error(
                f"save_checkpoint({path!r})", "lock", "no other process saving to this path",
                f"{file} held by {holder}",
                "under mpiexec call autopar.init() so that the ranks save together; otherwise wait for "
                "that save or save elsewhere")) from None
        except OSError as err:   # e.g. ENOLCK: a filesystem without locks
            os.close(fd)
            raise OSError(err.errno, format_error(
                f"save_checkpoint({path!r})", "lock", "a filesystem that supports flock (one saver at a time)",
                f"{file}: {err.strerror}", "save to a local or lock-capable filesystem")) from None
        if _still_there(fd, file):
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "step": step,
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def release_lock(path: str, fd: int) -> None:
    """Remove the lock file, then unlock (a saver that opened it meanwhile sees it gone)."""
    try:
        os.unlink(path + LOCK_SUFFIX)
    finally:
        os.close(fd)


def free_bytes(path: str) -> int:
    """Bytes available to this user on the filesystem that will hold ``path``."""
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return shutil.disk_usage(parent).free


class NoSpaceError(OSError):
    """The filesystem cannot hold a new checkpoint (errno ENOSPC or EDQUOT); the message
    names the path and the space needed and available."""


def no_space_error(path: str, needed: int, err: OSError | None = None) -> NoSpaceError:
    """An error naming the path and the space needed: before writing (``err`` None) when
    the estimate does not fit, or for a full disk or quota met while writing."""
    code = errno.ENOSPC if err is None else err.errno
    detail = "" if err is None else f" ({os.strerror(code)}{f' writing {err.filename}' if err.filename else ''})"
    return NoSpaceError(code, format_error(
        f"save_checkpoint({path!r})", "free space", f"about {needed / 2**20:.2f} MiB for the new checkpoint",
        f"{free_bytes(path) / 2**20:.2f} MiB available{detail}",
        "free space on that filesystem or save elsewhere; the previous checkpoint is kept"))


def _remove_leftovers(path: str) -> None:
    """Temporary directories of earlier saves to ``path`` (a killed saver's): with the lock
    held, no live saver is writing any of them."""
    parent, base = os.path.split(path)
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(base + TMP_MARK):
            _remove_tree(os.path.join(parent, entry))


def prepare_save(path: str, step: int, needed: int) -> int:
    """Lock ``path``, clear what earlier saves left, check the free space and make the
    temporary directory; returns the lock (release it with :func:`release_lock`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = acquire_lock(path, step)
    try:
        if os.path.exists(path) and not is_checkpoint(path):
            raise _fail(f"save_checkpoint({path!r})", "path", "a new path or an existing checkpoint",
                        f"{path!r}, which exists without a {MANIFEST}", "remove it or save elsewhere")
        _remove_leftovers(path)
        if needed > free_bytes(path):
            raise no_space_error(path, needed)
        _make_dir(temp_dir(path, step))
    except BaseException:
        abandon(temp_dir(path, step))   # ours: we hold the lock
        release_lock(path, lock)
        raise
    return lock


def write_file(directory: str, file: str, data: bytes) -> None:
    """One rank's file of the new checkpoint, or an error naming it."""
    full = os.path.join(directory, file)
    try:
        _write_bytes(full, data)
    except OSError as err:
        err.filename = err.filename or full   # os.write() errors name no file
        raise


def _swap_in(tmp: str, path: str) -> None:
    """Move the complete ``tmp`` to ``path``; a complete checkpoint exists throughout at
    ``path`` or its backup."""
    backup = path + BACKUP_SUFFIX
    if is_checkpoint(path):
        if os.path.exists(backup):
            _remove_tree(backup)
        _rename(path, backup)
    _rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if os.path.exists(backup):
        _remove_tree(backup)


def publish(tmp: str, path: str, manifest: dict) -> None:
    """Write the manifest (whole or not at all: a kill mid-write must not leave a
    directory claiming to be complete) and swap the directory in."""
    part = MANIFEST + ".part"
    write_file(tmp, part, json.dumps(manifest, indent=1).encode())
    _rename(os.path.join(tmp, part), os.path.join(tmp, MANIFEST))
    _swap_in(tmp, path)


def abandon(tmp: str) -> None:
    """Remove the temporary directory of a failed save (best effort: the next save removes
    whatever is left)."""
    try:
        if os.path.exists(tmp):
            _remove_tree(tmp)
    except OSError:
        pass

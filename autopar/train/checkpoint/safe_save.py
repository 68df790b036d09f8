"""Publishing a new checkpoint without ever losing the old: one saver per path, a
temporary directory, a check of the free space, a swap by renames, and errors naming the
path and the space when the disk is full.

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

The filesystem steps are module functions (``_write_chunk``, ``write_bytes``, ``_rename``,
``remove_tree``, ``_make_dir``, ``_fsync_dir``) so that tests can break each one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time

from ...errors import format_error
from .format import BACKUP_SUFFIX, MANIFEST, is_checkpoint, value_error

LOCK_SUFFIX = ".lock"
TMP_MARK = ".tmp-"
WRITE_CHUNK = 1 << 20          # bytes per write() call: a full disk is met at any of them
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_chunk(fd: int, data: memoryview) -> int:
    return os.write(fd, data)


def write_bytes(path: str, data: bytes) -> None:
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


def remove_tree(path: str) -> None:
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
    """The temporary directory the save of ``step`` to ``path`` writes into."""
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
            remove_tree(os.path.join(parent, entry))


def prepare_save(path: str, step: int, needed: int) -> int:
    """Lock ``path``, clear what earlier saves left, check the free space and make the
    temporary directory; returns the lock (release it with :func:`release_lock`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = acquire_lock(path, step)
    try:
        if os.path.exists(path) and not is_checkpoint(path):
            raise value_error(f"save_checkpoint({path!r})", "path", "a new path or an existing checkpoint",
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
        write_bytes(full, data)
    except OSError as err:
        err.filename = err.filename or full   # os.write() errors name no file
        raise


def _swap_in(tmp: str, path: str) -> None:
    """Move the complete ``tmp`` to ``path``; a complete checkpoint exists throughout at
    ``path`` or its backup."""
    backup = path + BACKUP_SUFFIX
    if is_checkpoint(path):
        if os.path.exists(backup):
            remove_tree(backup)
        _rename(path, backup)
    _rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if os.path.exists(backup):
        remove_tree(backup)


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
            remove_tree(tmp)
    except OSError:
        pass

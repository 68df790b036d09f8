"""Saving processes killed with SIGKILL at random moments: the previous checkpoint (or the one
being saved, when the kill came after its swap) always loads and equals what was saved, and
no half-written directory is ever taken for a checkpoint.

The savers (tests/mpi/kill_saver.py) save v = 1, 2, 3, ... to one path in a loop and report
each finished save; the test waits for save 1, sleeps a seeded random fraction of a few
saves' duration, and kills: a serial saver (forked from a zygote that imported autopar once),
or one rank or all of a 2-rank mpiexec job. Nothing in autopar cooperates with the kill.
After every kill a save of another step (the savers' is 0) recovers: it takes over the
dead saver's lock, removes its temporary directory, and leaves only the checkpoint.
"""
from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from autopar import nn
from autopar.comm.mpi import launched_under_mpi
from autopar.train import SGD
from autopar.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent / "mpi"))
from kill_saver import N_TENSORS, expected, name
from test_comm_mpi_launch import MPIEXEC

ROOT = Path(__file__).resolve().parent.parent
SAVER = str(ROOT / "tests" / "mpi" / "kill_saver.py")
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
SERIAL_TRIALS, MPI_TRIALS = 20, 3   # the 2-rank trials kill rank 0, rank 1, then both
SPAN = 2.5        # kill delays: uniform in [0, SPAN x the duration of save 1]
LINE_S = 30.0     # the longest wait for one line from a saver

pytestmark = pytest.mark.skipif(launched_under_mpi(), reason="launches its own processes")


class Lines:
    """The lines a process writes on stdout, read by a thread, taken with a timeout."""

    def __init__(self, stream):
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            if line.split():   # mpiexec adds blank lines and banners when a rank is killed
                self._q.put(line.split())
        self._q.put(None)

    def take(self, what: str) -> list[str] | None:
        try:
            return self._q.get(timeout=LINE_S)
        except queue.Empty:
            pytest.fail(f"no line from the saver in {LINE_S} s while waiting for {what}")

    def until(self, first: str) -> tuple[list[str], list[list[str]]]:
        """The next line starting with ``first``, and the other lines before it."""
        others = []
        while (words := self.take(first)) is not None:
            if words[0] == first:
                return words, others
            others.append(words)
        pytest.fail(f"the saver's output ended before a {first!r} line; got {others}")


def last_saved(lines: list[list[str]]) -> int:
    """The number of the last save reported finished (saves are reported 1, 2, 3, ...)."""
    done = [int(w[1]) for w in lines if w[0] == "saved" and len(w) == 3]
    assert done == list(range(1, len(done) + 1)), done
    return len(done)


def assert_equals_save(path: str, allowed: set[int]) -> int:
    """The checkpoint at ``path`` loads, every checksum verified, and is save v (in allowed)."""
    _, manifest = ckpt.read_manifest(path)
    v = manifest["extra"]["v"]
    assert v in allowed, f"{path} holds save {v}; the saver had finished {min(allowed)}"
    tensors = ckpt.load_checkpoint(path)
    assert sorted(tensors) == [name(i) for i in range(N_TENSORS)], sorted(tensors)[:5]
    for i in range(N_TENSORS):
        np.testing.assert_array_equal(tensors[name(i)], expected(v, i), err_msg=f"{path}: {name(i)} of save {v}")
    return v


def check_after_kill(path: str, finished: int) -> str:
    """The asserts of every trial; returns what the kill left next to the checkpoint."""
    assert finished >= 1
    allowed = {finished, finished + 1}   # + 1: killed after the swap, before it was reported
    v = assert_equals_save(path, allowed)
    parent = os.path.dirname(path)
    leftovers = sorted(e for e in os.listdir(parent) if e != os.path.basename(path))
    for entry in leftovers:
        full = os.path.join(parent, entry)
        if ckpt.is_checkpoint(full):   # it claims to be complete: then it must be a whole save
            assert_equals_save(full, allowed)
        else:                          # half-written or half-removed: loading it is refused
            with pytest.raises(ValueError, match="without one"):
                ckpt.load_checkpoint(full)
    state = "new" if v == finished + 1 else "previous"
    return f"{state}+{','.join(e[len(os.path.basename(path)):] for e in leftovers) or 'clean'}"


def recover(path: str) -> None:
    """The next save, of step 7 (the killed saver's was step 0), succeeds and leaves only
    the checkpoint: no lock, no temporary directory, no backup."""
    net = _net_of(99)
    opt = SGD(net.trainable_params(), learning_rate=0.1)
    opt.step_count = 7
    ckpt.save_checkpoint(nn.TrainOneStepCell(net, opt), path, extra={"v": 99})
    assert assert_equals_save(path, {99}) == 99 and ckpt.read_manifest(path)[1]["step"] == 7
    assert sorted(os.listdir(os.path.dirname(path))) == ["ck"]


def test_serial_saver_killed_at_random_points(tmp_path):
    rng = random.Random(7)
    zygote = subprocess.Popen([sys.executable, SAVER, "zygote"], cwd=ROOT, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines, seen = Lines(zygote.stdout), []
    try:
        lines.until("ready")
        for trial in range(SERIAL_TRIALS):
            path = str(tmp_path / f"t{trial}" / "ck")
            os.makedirs(os.path.dirname(path))
            zygote.stdin.write(f"save {path}\n")
            zygote.stdin.flush()
            pid_line, got = lines.until("pid")   # the zygote answers at once; save 1 takes longer
            pid = int(pid_line[1])
            if not got:
                first, more = lines.until("saved")
                got = more + [first]
            time.sleep(rng.uniform(0, SPAN) * float(got[0][2]))
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write(f"wait {pid}\n")
            zygote.stdin.flush()
            exit_line, after = lines.until("exit")
            assert exit_line[1:] == [str(pid), str(-signal.SIGKILL)], f"the saver was not killed: {exit_line}"
            seen.append(check_after_kill(path, last_saved(got + after)))
            recover(path)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=10)
    print("serial kills left:", sorted(seen))
    assert sum(s.endswith(".tmp-0") or ".tmp-0," in s for s in seen) >= 3, \
        f"too few kills landed inside a save's writes: {seen}"


def _net_of(v: int):
    from kill_saver import Many
    net = Many()
    for i, p in enumerate(net.get_parameters()):
        p.set_data(expected(v, i))
    return net


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
def test_two_rank_saver_killed_at_random_points(tmp_path):
    rng = random.Random(11)
    seen = []
    for trial in range(MPI_TRIALS):
        path, pid_dir = str(tmp_path / f"t{trial}" / "ck"), tmp_path / f"pids{trial}"
        os.makedirs(os.path.dirname(path))
        pid_dir.mkdir()
        job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, SAVER, "mpi", path, str(pid_dir)], cwd=ROOT,
                               env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            lines = Lines(job.stdout)
            first, _ = lines.until("saved")   # both ranks wrote their pids before save 1
            pids = {int(f.name): int(f.read_text()) for f in pid_dir.iterdir()}
            assert sorted(pids) == [0, 1], pids
            victim = ("rank 0", "rank 1", "all")[trial % 3]
            time.sleep(rng.uniform(0, SPAN) * float(first[2]))
            if victim == "all":
                os.killpg(job.pid, signal.SIGKILL)
            else:
                os.kill(pids[int(victim[-1])], signal.SIGKILL)
            job.wait(timeout=20)   # mpiexec ends the other rank when one is killed
            rest = []
            while (words := lines.take("the end of output")) is not None:
                rest.append(words)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
        assert job.returncode != 0, "the job ended normally: the kill missed it"
        seen.append(f"{victim}: " + check_after_kill(path, last_saved([first] + rest)))
        recover(path)
    print("2-rank kills left:", seen)

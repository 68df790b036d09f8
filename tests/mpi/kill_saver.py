"""Processes that save checkpoints in a loop until they are killed (tests/test_checkpoint_kill.py).

    python tests/mpi/kill_saver.py zygote                 # serial savers, forked on request
    mpiexec -n 2 python tests/mpi/kill_saver.py mpi PATH PIDS  # one saver of 2 ranks

Save number v (1, 2, 3, ...) holds tensor i equal to ``expected(v, i)`` and has
``extra={"v": v}``; when save v has returned, rank 0 writes ``saved v <seconds it took>`` to
stdout. Under MPI every rank first writes its process id to the file ``PIDS/<rank>`` (only
rank 0 writes to stdout: mpiexec may interleave the lines of several ranks), and the
odd-numbered tensors are split along dim 0 over the ranks, so each rank writes its own file.

The zygote imports autopar once, then reads commands from stdin: ``save PATH`` forks a serial
saver (the zygote answers ``pid <pid>``), ``wait PID`` reaps it (``exit <pid> <code>``, the
code negative for the signal that ended it). Forking saves the second of imports per trial.
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from autopar import nn
from autopar.ir.layout import Layout
from autopar.ir.mesh import Mesh
from autopar.nn.parameter import Parameter
from autopar.runtime.shards import ParamShard
from autopar.train import checkpoint as ckpt

N_TENSORS = 96            # many tensors, so that a save lasts long enough to be hit mid-write
SHAPE = (64, 64)          # float32: 16 KiB each, 1.5 MiB a save (about 0.1 s)
MAX_SAVES = 2000          # a saver nobody kills stops by itself


def name(i: int) -> str:
    return f"w{i:03d}"


def expected(v: int, i: int) -> np.ndarray:
    """Tensor i of save v: distinct per save, tensor and element, exact in float32."""
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + np.float32(10_000 * v + 100 * i)


class Many(nn.Cell):
    def __init__(self):
        super().__init__()
        for i in range(N_TENSORS):
            setattr(self, name(i), Parameter(expected(0, i), name=name(i)))


def build(world) -> Many:
    """The net; under MPI the odd tensors are sharded (dim 0 over the ranks)."""
    net = Many()
    if world.size > 1:
        layout = Layout(Mesh((world.size,)), ((0,), ()))   # (64, 64) -> local (64/n, 64)
        for i, p in enumerate(net.get_parameters()):
            if i % 2:
                p.attach_shard(ParamShard(p, layout, world.rank), world)
    return net


def save_loop(net: Many, path: str, world) -> None:
    params = net.get_parameters()
    for v in range(1, MAX_SAVES + 1):
        for i, p in enumerate(params):
            p.set_data(expected(v, i))   # a sharded one keeps its slice
        began = time.monotonic()
        ckpt.save_checkpoint(net, path, extra={"v": v}, world=world)
        if world.rank == 0:
            os.write(1, f"saved {v} {time.monotonic() - began:.4f}\n".encode())


def zygote() -> None:
    from autopar.comm import SelfCommunicator
    print("ready", flush=True)
    for line in sys.stdin:
        command, arg = line.split()
        if command == "save":
            pid = os.fork()
            if pid == 0:   # the saver: never returns to the loop
                try:
                    save_loop(build(SelfCommunicator()), arg, SelfCommunicator())
                finally:
                    os._exit(0)
            print(f"pid {pid}", flush=True)
        elif command == "wait":
            _, status = os.waitpid(int(arg), 0)
            print(f"exit {arg} {os.waitstatus_to_exitcode(status)}", flush=True)


def main() -> None:
    if sys.argv[1] == "zygote":
        zygote()
        return
    from autopar.comm import world as make_world
    world = make_world()
    assert world.size > 1, "run under mpiexec -n 2 (or more)"
    with open(os.path.join(sys.argv[3], str(world.rank)), "w") as f:
        f.write(str(os.getpid()))
    save_loop(build(world), sys.argv[2], world)


if __name__ == "__main__":
    main()

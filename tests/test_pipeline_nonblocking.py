"""The pipeline runner's transfers are non-blocking: a send is posted right after the item
that makes the value and never holds the rank up, a receive is waited for just before the
item that reads it. Two in-process ranks walk plain 1F1B (p = 2, m = 4) with hand-made
stage programs (no compiler), through a communicator that logs every isend, irecv and wait."""
import threading

import numpy as np

from autopar.comm import run_in_process
from autopar.runtime.pipeline.runner import ChunkStep, StageStep, run_step, transfers
from autopar.strategy.pipeline.schedule import one_f_one_b

M, H = 4, 10          # micro-batches; the one activation's value id
X = [np.arange(3.0) + k for k in range(M)]


class Fake:
    """A stage half: ``fn(ins)`` logged as (name, micro-batch) when it runs."""

    def __init__(self, log, name, fn):
        self.log, self.name, self.fn, self.k = log, name, fn, 0

    def run(self, ins, step):
        k, self.k = self.k, self.k + 1
        self.log.append((self.name, k))
        return self.fn(k, ins)


class Logged:
    """A communicator whose isend / irecv (and their waits) are logged; ``sent`` is set once
    the second activation's isend has returned."""

    def __init__(self, comm, log, sent):
        self.comm, self.log, self.sent, self.sends = comm, log, sent, 0

    def isend(self, x, dest, tag):
        req = self.comm.isend(x, dest, tag)
        self.log.append(("isend", tag))
        self.sends += tag == 1
        if self.sends == 2:
            self.sent.set()
        return req

    def irecv(self, shape, dtype, source, tag):
        req, log = self.comm.irecv(shape, dtype, source, tag), self.log
        log.append(("irecv", tag))

        class Waited:
            def wait(self):
                out = req.wait()
                log.append(("wait", tag))
                return out

            def test(self):
                return req.test()
        return Waited()


def plan(stage, log, sent):
    sched = one_f_one_b(2, M)
    if stage == 0:
        chunk = ChunkStep(0, (Fake(log, "F", lambda k, ins: [2 * ins[0], ins[0]]),),
                          (Fake(log, "B", lambda k, ins: [ins[0] * ins[1]]),),
                          (0,), (), ((H, (1,)),), False, ((H, 1),), (), (0,))
    else:
        def forward(k, ins):
            if k == 0:   # rank 0 must have got past sending x(1) while this forward runs
                log.append(("x(1) posted meanwhile", sent.wait(10)))
            return [ins[0].sum(), ins[0]]
        chunk = ChunkStep(1, (Fake(log, "F", forward),), (Fake(log, "B", lambda k, ins: [ins[0] * 0 + 1, 3 * ins[0]]),),
                          (), (H,), (), True, (), (H,), (0,))
    moves = transfers(sched, lambda c: [(H, (1,))] if c == 0 else [], lambda c: [(H, 0)] if c == 1 else [])
    return StageStep(stage, 1, 0, sched, (chunk,), 1, {H: ((3,), np.dtype(np.float64))}, moves)


def body(comm, sent):
    log = []
    result = run_step(plan(comm.rank, log, sent), Logged(comm, log, sent), [[x] for x in X], 0)
    return log, result.losses, result.grads


def test_sends_never_block_and_receives_are_waited_just_before_their_item():
    (log0, _, grads0), (log1, losses, _) = run_in_process(2, body, threading.Event())
    assert ("x(1) posted meanwhile", True) in log1     # a blocking send of x(1) would wait for this forward
    items0 = [i for i, e in enumerate(log0) if e[0] in "FB"]
    for i in items0:                                    # each item's sends posted right after it
        if log0[i][0] == "F":
            assert log0[i + 1] == ("isend", 1), log0
    for i, e in enumerate(log1):                        # each forward's activation waited right before it
        if e[0] == "F":
            assert log1[i - 1] == ("wait", 1), log1
        if e[0] == "B":
            assert log1[i + 1] == ("isend", 2), log1
    forwards1 = [i for i, e in enumerate(log1) if e[0] == "F"]
    posts1 = [i for i, e in enumerate(log1) if e == ("irecv", 1)]
    items1 = [i for i, e in enumerate(log1) if e[0] in "FB"]
    for k in range(1, M):    # x(k) posted before the item ahead of forward k started
        ahead = max(i for i in items1 if i < forwards1[k])
        assert posts1[k] < ahead, log1
    assert [float(x) for x in losses] == [float((2 * x).sum()) for x in X]
    np.testing.assert_array_equal(grads0[0], sum(6 * x * x for x in X))   # (3 * 2x) * x, summed in order

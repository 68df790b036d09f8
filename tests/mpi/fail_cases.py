"""One faulty rank in a tiny 2-rank training job, as a user would write it: run by
tests/test_fail_loud.py as ``mpiexec -n 2 python tests/mpi/fail_cases.py <case>``.

Rank 1 prints ``armed <time>`` just before its fault, so the test can time how long the
job takes to end after it. Rank 0 prints ``finished`` (to stderr) if it ever gets through.
"""
import os
import sys
import time

import numpy as np

import autopar
from autopar import nn
from autopar.comm import install_abort_handler
from autopar.context import parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import SGD

CASE = sys.argv[1]
RANK = int(os.environ["PMI_RANK"])          # what the launcher says, before any MPI call
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
STEPS = 3


def trainer(config, mode):
    autopar.set_auto_parallel_context(parallel_mode=mode, full_batch=mode != "data_parallel")
    net = PanguAlphaWithLoss(config)
    return nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))


def fault(step: int) -> None:
    """Rank 1 misbehaves as CASE says, at step 1."""
    if RANK != 1 or step != 1 or CASE not in ("raise", "exit", "os_exit", "sleep"):
        return
    print("armed", time.time(), flush=True)
    if CASE == "raise":
        raise RuntimeError("deliberate failure on rank 1")
    if CASE == "exit":
        sys.exit(0)
    if CASE == "os_exit":
        os._exit(3)
    if CASE == "sleep":
        time.sleep(60)


def main():
    if CASE in ("raise_before_init", "raise_after_rank_0_left"):   # the handler first, as the examples do
        install_abort_handler()
        if RANK == 0 and CASE == "raise_after_rank_0_left":
            sys.exit(0)                 # gone before MPI started: rank 1's MPI_Init can never finish
        if RANK == 1:                   # a failure before init()
            print("armed", time.time(), flush=True)
            raise RuntimeError("deliberate failure on rank 1 before init")
    if CASE == "exit_before_init" and RANK == 1:   # no handler yet: a plain exit, MPI never started
        print("armed", time.time(), flush=True)
        sys.exit(2)
    if CASE != "no_init":
        autopar.init()                  # installs the abort handler and the watchdog
    config, ids, mode = CONFIG, np.split(IDS, 2)[RANK], "data_parallel"
    if CASE == "different_ids":         # model parallel: both ranks must read the same batch
        config, ids, mode = CONFIG.replace(model_parallel=2), IDS.copy(), "semi_auto_parallel"
        if RANK == 1:
            ids[0, 3] += 1
    if CASE == "different_model" and RANK == 1:
        config = CONFIG.replace(ffn_hidden_size=2 * CONFIG.ffn_hidden_size)
    train = trainer(config, mode)
    if CASE == "warmup_step" and RANK == 1:   # one step more, alone, before the job starts
        with parallel_context(parallel_mode="stand_alone"):
            train(ids)
    steps = STEPS + (CASE == "extra_step" and RANK == 1)
    for step in range(steps):
        first = CASE in ("different_ids", "different_model", "warmup_step", "no_init") and step == 0
        if RANK == 1 and (first or step == STEPS):
            print("armed", time.time(), flush=True)
        fault(step)
        train(ids)
    if RANK == 0:
        print("finished", file=sys.stderr, flush=True)   # stdout is rank 1's: mpiexec may cut lines


main()

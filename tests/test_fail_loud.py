"""Safe by default under MPI (issue 11, item 1): a fault on one rank ends the job quickly
with the reason and the rank named; a forgotten ``autopar.init()`` or a ``device_num``
that does not match the ranks running is an error, not a silent serial run; ranks that
must agree (inputs, step counter, model) are compared, and a difference is named.

In-process first (virtual ranks, fast), then real ``mpiexec -n 2`` jobs running
tests/mpi/fail_cases.py, each timed from the moment rank 1 misbehaves."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_comm_mpi_launch import MPIEXEC

import autopar
from autopar import context as ctx_module
from autopar import nn, ops
from autopar.comm import CollectiveTimeoutError, CommChecks, SelfCommunicator, run_in_process
from autopar.comm import mpi as mpi_module
from autopar.comm.consistency import RankDivergenceError
from autopar.context import ParallelContext, bound_world, parallel_context, require_init
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.trace import trace
from autopar.strategy.sharding_plan import plan_shardings
from autopar.train import SGD

ROOT = Path(__file__).resolve().parent.parent
CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
LAUNCHER_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK",
                "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Before init(), default settings, no launcher in the environment; nothing left behind."""
    monkeypatch.setattr(ctx_module._STATE, "world", None)
    monkeypatch.setattr(ctx_module._STATE, "context", ParallelContext())
    for name in LAUNCHER_ENV + ("AUTOPAR_COMM_WATCHDOG", "AUTOPAR_COMM_DEBUG", "AUTOPAR_CHECK_EVERY"):
        monkeypatch.delenv(name, raising=False)


def trainer(config=CONFIG):
    net = PanguAlphaWithLoss(config)
    return nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))


# ---- 1. init() installs the abort handler and the watchdog --------------------------------------

class FakeWorld:
    def __init__(self, size, checks):
        self.rank, self.size, self.checks = 1, size, checks


def fake_launch(monkeypatch, size):
    """init() under a pretend launcher of ``size`` ranks: returns (worlds made, handler installs)."""
    made, installed = [], []
    monkeypatch.setattr(ctx_module, "_world", lambda checks: made.append(FakeWorld(size, checks)) or made[-1])
    monkeypatch.setattr(ctx_module, "install_abort_handler", lambda: installed.append(True))
    return made, installed


@pytest.mark.parametrize("env, kwargs, watchdog", [
    ({}, {}, 300.0),                                          # on by default
    ({"AUTOPAR_COMM_WATCHDOG": "5"}, {}, 5.0),
    ({"AUTOPAR_COMM_WATCHDOG": "0"}, {}, None),               # off only when asked
    ({"AUTOPAR_COMM_WATCHDOG": "5"}, {"watchdog_s": 7}, 7.0),   # the argument wins
    ({}, {"watchdog_s": 0}, None),
])
def test_init_under_a_launcher_watches_collectives_and_installs_the_abort_handler(monkeypatch, env, kwargs,
                                                                                  watchdog):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    made, installed = fake_launch(monkeypatch, size=2)
    autopar.init(**kwargs)
    assert [w.checks.watchdog_s for w in made] == [watchdog] and installed == [True]
    assert made[0].checks.check_every == 100


def test_init_on_one_rank_installs_no_handler(monkeypatch):
    made, installed = fake_launch(monkeypatch, size=1)
    autopar.init()
    assert len(made) == 1 and installed == []


@pytest.mark.parametrize("bad", [-1, float("inf"), "5", True])
def test_init_rejects_a_bad_watchdog_timeout(monkeypatch, bad):
    made, _ = fake_launch(monkeypatch, size=2)
    with pytest.raises(ValueError, match=r"^init: watchdog_s: expected a finite number of seconds >= 0 \(0: off\)"):
        autopar.init(watchdog_s=bad)
    assert made == [] and ctx_module._STATE.world is None


class Aborted(Exception):
    pass


def test_abort_hook_prints_the_rank_and_traceback_before_aborting(monkeypatch, capsys):
    """Even before MPI runs (the rank from the launcher's environment), the traceback is
    printed and flushed before Abort is called."""
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(mpi_module, "_initialised_mpi", lambda: None)
    monkeypatch.setattr(mpi_module, "ABORT_GRACE_S", 0.0)
    printed_at_abort = []

    class World:
        @staticmethod
        def Abort(code):
            printed_at_abort.append((code, capsys.readouterr().err))

    monkeypatch.setattr(mpi_module, "_mpi", lambda: type("MPI", (), {"COMM_WORLD": World}))

    def fake_exit(code):
        raise Aborted(code)
    monkeypatch.setattr(mpi_module.os, "_exit", fake_exit)
    try:
        raise KeyError("deliberate")
    except KeyError as err:
        with pytest.raises(Aborted):
            mpi_module._abort_hook(type(err), err, err.__traceback__)
    (code, err), = printed_at_abort
    assert code == 1
    assert err.startswith("autopar: uncaught KeyError on rank 1 of 2; aborting the MPI job\n[rank 1] Traceback")
    assert "[rank 1] KeyError: 'deliberate'" in err and "test_fail_loud.py" in err


# ---- 2. a launcher without init() -----------------------------------------------------------------

def test_launcher_size_is_read_without_starting_mpi():
    assert mpi_module.launcher_size({}) is None
    assert mpi_module.launcher_size({"PMI_SIZE": "4"}) == 4
    assert mpi_module.launcher_size({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == 2
    assert mpi_module.launcher_size({"MV2_COMM_WORLD_SIZE": "8"}) == 8


@pytest.mark.parametrize("mode", ["stand_alone", "data_parallel", "semi_auto_parallel", "auto_parallel"])
def test_a_step_under_a_launcher_without_init_says_to_call_it(monkeypatch, mode):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    train = trainer()
    with parallel_context(parallel_mode=mode):
        with pytest.raises(RuntimeError, match=rf"^compiling a {mode} program: autopar.init\(\): expected a call "
                                               r"first \(this process is one of the 2 that an MPI launcher .*\), "
                                               r"got none: this process would run alone as rank 0 of 1 .*; "
                                               r"call autopar.init\(\) at the top of the script"):
            train(IDS)
        with pytest.raises(RuntimeError, match="call autopar.init()"):
            train.network(IDS)                      # the forward program too
    assert train.optimizer.step_count == 0


def test_require_init_names_its_caller_and_passes_where_a_world_is_known(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"^save_checkpoint: autopar.init\(\): expected a call first \(this "
                                           r"process is one of the 4 "):
        require_init("save_checkpoint")
    with bound_world(SelfCommunicator()):      # an in-process rank, or a script that binds its world
        require_init("save_checkpoint")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")   # mpiexec -n 1: nothing to sync
    require_init("save_checkpoint")


def test_get_rank_under_a_launcher_without_init_is_an_error_not_rank_0(monkeypatch):
    assert (autopar.get_rank(), autopar.get_group_size()) == (0, 1)    # no launcher: one process
    monkeypatch.setenv("PMI_SIZE", "2")
    for get in (autopar.get_rank, autopar.get_group_size):
        with pytest.raises(RuntimeError, match=rf"^{get.__name__}: autopar.init\(\): expected a call first"):
            get()


def test_a_script_that_binds_a_one_rank_world_under_a_launcher_trains_serially(monkeypatch):
    """Each rank training alone on purpose (a serial reference under mpiexec) says so."""
    monkeypatch.setenv("PMI_SIZE", "2")
    with bound_world(SelfCommunicator()):
        alone = float(trainer()(IDS))
    monkeypatch.delenv("PMI_SIZE")
    assert alone == float(trainer()(IDS))


# ---- 3. device_num and strategies checked against the ranks running --------------------------

class Dense(nn.Cell):
    """x (8, 6) @ w (6, 8) -> mean: one MatMul with the given strategy."""

    def __init__(self, strategy):
        super().__init__()
        self.w = nn.Parameter(nn.Normal(0.1), (6, 8), name="w")
        self.matmul = ops.MatMul().shard(strategy)

    def construct(self, x):
        return self.matmul(x, self.w).mean()


X = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)


@pytest.mark.parametrize("strategy", [((4, 1), (1, 4)), ((3, 1), (1, 5)), ((2, 1), (1, 2))])
def test_device_num_other_than_the_ranks_running_is_an_error_not_a_serial_run(strategy):
    net = Dense(strategy)
    train = nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))
    message = (r"^ParallelContext: device_num: expected the number of ranks running \(1, or 1 for 'as many as run'\), "
               r"got 4 with parallel_mode='semi_auto_parallel'; launch 4 processes \(mpiexec -n 4 python script.py, "
               r"calling autopar.init\(\)\), run 4 in-process ranks \(autopar.comm.run_in_process\(4, fn\) .*\), "
               r"or set parallel_mode='stand_alone'")
    before = net.w.asnumpy().copy()
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True):
        with pytest.raises(ValueError, match=message):
            train(X)
        with pytest.raises(ValueError, match=message):
            net(X)
    np.testing.assert_array_equal(net.w.asnumpy(), before)      # nothing trained
    # planning on paper in one process still works for 4 devices
    graph = trace(Dense(((2, 1), (1, 2))), (X,), {}).graph
    shardings = plan_shardings(graph, "semi_auto_parallel", Mesh((4,)), full_batch=True).shardings
    (matmul,) = [s for nid, s in shardings.items() if graph.nodes[nid].prim.kind == "MatMul"]
    assert matmul.splits() == ((2, 1), (1, 2))


@pytest.mark.parametrize("strategy, message", [
    (((4, 1), (1, 4)), r"in_strategy: expected a product of splits dividing the 4 devices of the stage, got 16"),
    (((3, 1), (1, 5)), r"in_strategy\[0\]\[0\]: expected a split that divides dim 0 of input 0 \(size 8\), got 3"),
])
def test_strategies_invalid_for_device_num_fail_at_plan_time_on_4_ranks(strategy, message):
    def body(comm):
        with bound_world(comm):
            net = Dense(strategy)
            nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.1))(X)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True):
        with pytest.raises(ValueError, match=r"^\[rank \d of 4\] .*\(MatMul\): " + message):
            run_in_process(4, body)


# ---- 4. the consistency check ------------------------------------------------------------------

def mp2_losses(comm, fault=None, steps=2, mode="semi_auto_parallel"):
    """Two steps of dp1 x mp2 (every rank reads the whole batch); ``fault(rank, call, ids,
    train)`` may change what rank feeds or holds. Returns the losses, or the error's text."""
    config = CONFIG.replace(model_parallel=2) if mode == "semi_auto_parallel" else CONFIG
    if fault is not None and fault.__name__ == "bigger_model" and comm.rank == 1:
        config = config.replace(hidden_size=2 * config.hidden_size)
    with bound_world(comm), parallel_context(parallel_mode=mode, device_num=comm.size,
                                             full_batch=mode != "data_parallel"):
        train = trainer(config)
        losses = []
        try:
            for call in range(steps):
                ids = IDS.copy() if mode != "data_parallel" else np.split(IDS, comm.size)[comm.rank].copy()
                if fault is not None:
                    fault(comm.rank, call, ids, train)
                losses.append(float(train(ids)))
        except RankDivergenceError as err:
            return str(err)
        return losses


def other_ids(rank, call, ids, train):
    if rank == 1:
        ids[0, 3] += 1


def one_step_ahead(rank, call, ids, train):
    if rank == 1 and call == 0:
        train.optimizer.step_count += 1     # as if it had run a step more, or resumed elsewhere


def bigger_model(rank, call, ids, train):
    pass


def test_ranks_that_agree_train_and_the_check_is_not_counted_as_communication():
    def body(comm):
        losses = mp2_losses(comm, steps=3)
        return losses, comm.stats.snapshot()
    on = run_in_process(2, body, checks=CommChecks(check_every=1))
    off = run_in_process(2, body, checks=CommChecks(check_every=0))
    assert on == off and on[0][0] == on[1][0]


def test_different_input_ids_under_model_parallelism_are_named_on_every_rank():
    texts = run_in_process(2, mp2_losses, other_ids)
    assert texts[0] == texts[1], texts
    assert re.fullmatch(r"ShardedGradProgram \(consistency check at call 0\): input 0: expected the same "
                        r"data on the ranks that are fed the same batch .*, got digest [0-9a-f]{8} on rank 0, "
                        r"digest [0-9a-f]{8} on rank 1; feed each rank its data from the same source.*", texts[0])


def test_data_parallel_ranks_may_read_different_rows():
    losses = run_in_process(2, mp2_losses, None, 2, "data_parallel")
    assert isinstance(losses[0], list) and losses[0] == losses[1]


def test_a_rank_a_step_ahead_is_named_with_both_step_counters():
    texts = run_in_process(2, mp2_losses, one_step_ahead)
    assert texts[0] == texts[1]
    assert "step counter: expected the same step on every rank, got 0 on rank 0, 1 on rank 1; every rank must " \
           "run the same steps" in texts[0], texts[0]


def test_a_different_model_size_is_named_by_its_first_differing_parameter():
    texts = run_in_process(2, mp2_losses, bigger_model)
    assert texts[0] == texts[1]
    assert texts[0].startswith("ShardedGradProgram (consistency check at compile): model: expected the same "
                               "parameters (names, shapes, dtypes) on every rank, got parameter "), texts[0]
    assert re.search(r"got parameter (\S+) shape \(\d+, 32\) float32 on rank 0; parameter \1 shape \(\d+, 64\) "
                     r"float32 on rank 1; build the same network", texts[0]), texts[0]


def test_a_batch_of_another_shape_is_named_at_compile_before_any_collective():
    def body(comm):
        with bound_world(comm), parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
            train = trainer(CONFIG.replace(model_parallel=2))
            try:
                train(IDS[:3] if comm.rank == 1 else IDS)
            except RankDivergenceError as err:
                return str(err), comm.stats.snapshot()
    (text, stats), other = run_in_process(2, body)
    assert other == (text, stats) and stats == {"count": {}, "bytes": {}}   # none of the program's was issued
    assert text == ("ShardedGradProgram (consistency check at compile): inputs: expected the same number of arrays, "
                    "shapes and dtypes fed to every rank, got input 0 shape (4, 17) int32 on rank 0; input 0 shape "
                    "(3, 17) int32 on rank 1; feed every rank a batch of the same shape (its slice under data "
                    "parallelism)")


@pytest.mark.parametrize("checks, caught_at", [
    (CommChecks(check_every=2), "call 2"),           # calls 0, 2, 4, ...: the change at call 1 goes unseen
    (CommChecks(check_every=2, debug=True), "call 1"),   # debug mode: every call
    (CommChecks(check_every=0), None),               # off
])
def test_the_check_runs_at_the_first_call_and_every_n_calls(checks, caught_at):
    def from_call_1(rank, call, ids, train):
        if rank == 1 and call >= 1:
            ids[1, 1] += 1
    out = run_in_process(2, mp2_losses, from_call_1, 3, checks=checks)
    if caught_at is None:
        assert all(isinstance(o, list) and len(o) == 3 for o in out), out
    else:
        assert out[0] == out[1] and f"(consistency check at {caught_at}): input 0" in out[0]


def test_pipeline_stages_of_one_replica_must_read_the_same_batch():
    def body(comm):
        with bound_world(comm), parallel_context(parallel_mode="semi_auto_parallel", device_num=2,
                                                 pipeline_stages=2, full_batch=True):
            net = PanguAlphaWithLoss(CONFIG.replace(num_layers=2))
            nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=2)
            train = nn.TrainOneStepCell(nn.PipelineCell(net, 2), SGD(net.trainable_params(), 0.1))
            ids = IDS.copy()
            ids[2, 5] += comm.rank
            try:
                train(ids)
            except RankDivergenceError as err:
                return str(err)
    texts = run_in_process(2, body)
    assert texts[0] == texts[1] and texts[0].startswith("PipelineGradProgram (consistency check at call 0): "
                                                        "input 0: expected the same data"), texts


def test_the_watchdog_names_the_step_the_waiting_rank_was_in():
    def body(comm):
        with bound_world(comm), parallel_context(parallel_mode="data_parallel", device_num=2):
            train = trainer()
            for step in range(3):
                if comm.rank == 1 and step == 1:
                    time.sleep(3)
                    return
                train(np.split(IDS, 2)[comm.rank])
    began = time.monotonic()
    with pytest.raises(CollectiveTimeoutError, match=r"collective watchdog: rank 0 waited 1\.\d s in allreduce #\d+ "
                                                     r"on group \(0, 1\) \(its last program call: ShardedGradProgram "
                                                     r"at step 1\); missing: rank 1 \(running\); arrived: rank 0$"):
        run_in_process(2, body, checks=CommChecks(watchdog_s=1.0))
    assert time.monotonic() - began < 5


# ---- 5. under mpiexec ----------------------------------------------------------------------------

WATCHDOG_S = 3
TRACEBACK = r"autopar: uncaught RuntimeError on rank 1 of 2; aborting the MPI job\n\[rank 1\] Traceback"
WATCHED = (r"autopar: collective watchdog: rank 0 waited 3\.\d s in allreduce #\d+ on group \(0, 1\) \(its last "
           r"program call: ShardedGradProgram at step 1\); missing: rank 1 \(never entered it; its last collective "
           r"on this group was #\d+\); arrived: rank 0; aborting the MPI job")
DIVERGED = r"autopar: uncaught RankDivergenceError on rank \d of 2; aborting the MPI job"
CASES = {   # case: (stderr must match, most seconds from rank 1's fault to the end of the job)
    "raise": (TRACEBACK + r"(.|\n)*\[rank 1\] RuntimeError: deliberate failure on rank 1\n", 5),
    "raise_before_init": (TRACEBACK + r"(.|\n)*\[rank 1\] RuntimeError: deliberate failure on rank 1 before init\n",
                          5),
    "raise_after_rank_0_left": (TRACEBACK + r"(.|\n)*\[rank 1\] RuntimeError: deliberate failure on rank 1 "
                                r"before init\nTimeout \(0:00:03\)!\n(.|\n)*in _abort_hook", WATCHDOG_S + 5),
    "exit": (WATCHED, WATCHDOG_S + 5),
    "sleep": (WATCHED, WATCHDOG_S + 5),
    "os_exit": (r"", 5),     # the launcher kills every rank at once: nothing can print, the status is the rank's
    "exit_before_init": (r"Timeout \(0:00:03\)!\n(.|\n)*in start_mpi_or_exit\n(.|\n)*context.py\", line \d+ in init",
                         WATCHDOG_S + 5),
    "no_init": (r"RuntimeError: compiling a data_parallel program: autopar.init\(\): expected a call first \(this "
                r"process is one of the 2 that an MPI launcher such as mpiexec started\)", 5),
    "extra_step": (r"autopar: collective watchdog: rank 1 waited 3\.\d s in allreduce #\d+ on group \(0, 1\) \(its "
                   r"last program call: ShardedGradProgram at step 3\); missing: rank 0 \(never entered it; its last "
                   r"collective on this group was #\d+\); arrived: rank 1; aborting the MPI job", WATCHDOG_S + 5),
    "warmup_step": (DIVERGED + r"(.|\n)*RankDivergenceError: ShardedGradProgram \(consistency check at call 0\): "
                    r"step counter: expected the same step on every rank, got 0 on rank 0, 1 on rank 1", 5),
    "different_ids": (DIVERGED + r"(.|\n)*RankDivergenceError: ShardedGradProgram \(consistency check at call "
                      r"0\): input 0: expected the same data .* on rank 0, digest [0-9a-f]{8} on rank 1", 5),
    "different_model": (DIVERGED + r"(.|\n)*RankDivergenceError: ShardedGradProgram \(consistency check at "
                        r"compile\): model: expected the same parameters \(names, shapes, dtypes\) on every rank, got "
                        r"parameter (\S+) shape \(128, 32\) float32 on rank 0; parameter \2 shape \(256, 32\) float32 "
                        r"on rank 1", 5),
}


@pytest.mark.skipif(MPIEXEC is None or mpi_module.launched_under_mpi(), reason="needs mpiexec, not under it")
@pytest.mark.parametrize("case", list(CASES))
def test_a_faulty_rank_ends_the_job_with_the_reason_and_the_rank(case):
    pattern, most = CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT), AUTOPAR_COMM_WATCHDOG=str(WATCHDOG_S))
    job = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(ROOT / "tests/mpi/fail_cases.py"), case],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    ended = time.time()
    report = f"exit status {job.returncode}\nstdout:\n{job.stdout}\nstderr:\n{job.stderr}"
    assert job.returncode != 0 and (case != "os_exit" or job.returncode == 3), report   # mpiexec ORs the statuses
    armed = re.findall(r"armed (\d+\.\d+)", job.stdout)   # mpiexec may join two ranks' lines
    assert len(armed) == 1, report
    assert ended - float(armed[0]) < most, f"took {ended - float(armed[0]):.1f} s after the fault\n{report}"
    assert re.search(pattern, job.stderr), report
    assert ("finished" in job.stderr) == (case == "extra_step"), report   # rank 0 got through only there

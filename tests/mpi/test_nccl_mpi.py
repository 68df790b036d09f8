"""The NCCL communicator (autopar/comm/nccl.py) on 2 ranks equals the MPI one (issue 17, item 1).

Every collective -- all-reduce (sum, max, min; bfloat16 included), all-gather and
reduce-scatter along axis 0 and a later axis, all-to-all, broadcast, their non-blocking
forms -- and split groups give, on device arrays, the bits the MPI backend gives on the
same values on the host (messages: test_nccl_channels_mpi.py); host arrays are staged (numpy in, numpy
out); the unique id made on rank 0 reaches every rank over MPI; and the runtime's choice
of world (``select_world``, what ``autopar.init()`` calls) follows its rule.

On a machine with 2+ GPUs and CuPy with NCCL this runs the real thing:

    NCCL_NVLS_ENABLE=0 mpiexec -n 2 python -m pytest -q tests/mpi/test_nccl_mpi.py

Elsewhere (CI, the 2-rank suite of tests/test_comm_mpi_launch.py) the same tests run on CPU
ranks with tests/mpi/fake_nccl.py: the strict stand-in device arrays of
tests/test_comm_device_staging.py and a fake ``cupy.cuda.nccl`` whose calls read and write
the memory at the addresses they are given and compute with MPI, so a wrong address, count,
datatype or peer gives wrong numbers. Test ids name the device: ``[gpu-...]`` or ``[fake-...]``.
The choice-of-world tests always use the fake (they set the GPU count).
"""
import os
import sys

import numpy as np
import pytest

from autopar.comm import world

WORLD = world()
if WORLD.size != 2:   # before mpi4py is imported: in a plain pytest run, importing it starts MPI,
    # and launcher detection (autopar.comm.mpi.launcher_size) then reads MPI's 1 rank, not the
    # launcher's environment the other tests of that process simulate
    pytest.skip("run under mpiexec -n 2", allow_module_level=True)

from fake_nccl import FakeGPUs, device_pointer  # noqa: E402
from mpi4py import MPI  # noqa: E402
from test_comm_device_staging import StandInCupy, ndarray  # noqa: E402

from autopar import context  # noqa: E402
from autopar.backend import CPU, GPU, set_context, to_host  # noqa: E402
from autopar.comm import CollectiveMismatchError, CommChecks, CommStats  # noqa: E402
from autopar.comm.mpi import MPICommunicator  # noqa: E402
from autopar.comm.nccl import COMM_ENV, NCCLCommunicator, nccl_world, select_world  # noqa: E402
from autopar.dtype import bfloat16  # noqa: E402


def _real_gpus() -> int:
    """GPUs CuPy sees where it has NCCL (0 without CuPy, NCCL or a driver)."""
    try:
        import cupy
        from cupy.cuda import nccl
        return cupy.cuda.runtime.getDeviceCount() if nccl.available else 0
    except Exception:
        return 0


REAL = _real_gpus() >= WORLD.size > 1
DEVICE = "gpu" if REAL else "fake"
pytestmark = pytest.mark.skipif(WORLD.size != 2, reason="run under mpiexec -n 2")


def install_fake(gpu_count: int):
    """The stand-in CuPy with ``gpu_count`` fake GPUs and FakeNccl as ``cupy`` and
    ``cupy.cuda.nccl`` (collective: the fake duplicates MPI's world); returns the undo."""
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupy.cuda.nccl")}
    module = StandInCupy()
    module.cuda = FakeGPUs(gpu_count)
    sys.modules["cupy"], sys.modules["cupy.cuda.nccl"] = module, module.cuda.nccl
    had_data = "data" in vars(ndarray)
    ndarray.data = property(device_pointer)          # CuPy's a.data.ptr: the address NCCL is handed

    def undo():
        if not had_data:
            del ndarray.data
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return module, undo


def streamed_device(timeout_s: float):
    """A module fixture's body for the tests whose fake streams are threads (channels, the
    collective stream): CuPy on real GPUs, else the stand-in with 2 fake GPUs whose waits
    time out after ``timeout_s``. The fake's stream threads call MPI: MPI_THREAD_MULTIPLE."""
    if REAL:
        import cupy
        yield cupy
        return
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        pytest.skip(f"the fake's streams need MPI_THREAD_MULTIPLE, MPI gives level {MPI.Query_thread()}")
    module, undo = install_fake(2)
    module.cuda.timeout_s = timeout_s
    yield module
    undo()


@pytest.fixture(scope="module")
def xp():
    """The device module: CuPy on real GPUs, else the stand-in with 2 fake GPUs."""
    if REAL:
        import cupy
        yield cupy
        return
    module, undo = install_fake(2)
    yield module
    undo()


@pytest.fixture(scope="module")
def comm(xp):
    return nccl_world(WORLD)


def values(rank: int, shape, dtype) -> np.ndarray:
    """Rank-valued inputs with fractions that make bfloat16 sums round (a misplaced shard shows)."""
    x = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    x = (x * 1.37 + 100 * rank + 0.3) % 251 - 60
    if np.dtype(dtype) == np.bool_:
        return (x.astype(np.int64) + rank) % 3 == 0
    return x.astype(dtype)


F32, BF16 = np.float32, bfloat16
CALLS = {   # name -> (call, shape, dtype, the NCCL call and datatype it makes: 7 float32, 1 uint8 (bytes), ...)
    "allreduce sum float32": (lambda c, x: c.allreduce(x), (3, 4), F32, ("allReduce", 7)),
    "allreduce max float32": (lambda c, x: c.allreduce(x, op="max"), (3, 4), F32, ("allReduce", 7)),
    "allreduce min int32": (lambda c, x: c.allreduce(x, op="min"), (5,), np.int32, ("allReduce", 2)),
    "allreduce sum int64": (lambda c, x: c.allreduce(x), (5,), np.int64, ("allReduce", 4)),
    "allreduce sum float64": (lambda c, x: c.allreduce(x), (2, 3), np.float64, ("allReduce", 8)),
    "allreduce sum bfloat16": (lambda c, x: c.allreduce(x), (4, 8), BF16, ("allReduce", 7)),
    "allreduce max bfloat16": (lambda c, x: c.allreduce(x, op="max"), (4, 8), BF16, ("allReduce", 7)),
    "iallreduce sum bfloat16": (lambda c, x: c.iallreduce(x).wait(), (6,), BF16, ("allReduce", 7)),
    "allgather axis 0": (lambda c, x: c.allgather(x, axis=0), (2, 3, 4), F32, ("allGather", 1)),
    "allgather axis 1": (lambda c, x: c.allgather(x, axis=1), (2, 3, 4), F32, ("allGather", 1)),
    "allgather axis -1 bfloat16": (lambda c, x: c.allgather(x, axis=-1), (2, 3), BF16, ("allGather", 1)),
    "allgather axis 1 bool": (lambda c, x: c.allgather(x, axis=1), (3, 5), np.bool_, ("allGather", 1)),
    "reduce_scatter axis 0": (lambda c, x: c.reduce_scatter(x, axis=0), (4, 3), F32, ("reduceScatter", 7)),
    "reduce_scatter axis 2": (lambda c, x: c.reduce_scatter(x, axis=2), (2, 3, 4), F32, ("reduceScatter", 7)),
    "reduce_scatter axis 1 bfloat16": (lambda c, x: c.reduce_scatter(x, axis=1), (3, 8), BF16,
                                       ("reduceScatter", 7)),
    "ireduce_scatter axis 1": (lambda c, x: c.ireduce_scatter(x, axis=1).wait(), (3, 4), np.float64,
                               ("reduceScatter", 8)),
    "alltoall 0 -> 0": (lambda c, x: c.alltoall(x, split_axis=0, concat_axis=0), (4, 3), F32, ("recv", 1)),
    "alltoall 2 -> 1": (lambda c, x: c.alltoall(x, split_axis=2, concat_axis=1), (2, 3, 4), F32, ("recv", 1)),
    "alltoall 1 -> 0 bfloat16": (lambda c, x: c.alltoall(x, split_axis=1, concat_axis=0), (3, 4), BF16,
                                 ("recv", 1)),
    "broadcast root 0": (lambda c, x: c.broadcast(x, root=0), (3, 4), F32, ("broadcast", 1)),
    "broadcast root 1 bfloat16": (lambda c, x: c.broadcast(x, root=1), (5,), BF16, ("broadcast", 1)),
    "broadcast 0-d": (lambda c, x: c.broadcast(x, root=1), (), np.float64, ("broadcast", 1)),
    "allreduce sum 0-d": (lambda c, x: c.allreduce(x), (), np.float64, ("allReduce", 8)),
}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("name", CALLS, ids=lambda n: f"{DEVICE}-{n}")
def test_device_collectives_equal_the_mpi_backend_bit_for_bit(xp, comm, name):
    call, shape, dtype, nccl_call = CALLS[name]
    x = values(comm.rank, shape, dtype)
    want = call(WORLD, x)                                        # MPI on the host
    out = call(comm, xp.asarray(x))                              # NCCL on the device
    assert type(out) is xp.ndarray, f"{name}: the result left the device ({type(out).__name__})"
    got = to_host(out)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)
    if not REAL:
        assert xp.cuda.nccl.calls[-1][0::2] == nccl_call, xp.cuda.nccl.calls[-1]


@pytest.mark.parametrize("device", [DEVICE])
def test_a_transposed_device_view_is_gathered_like_its_values(xp, comm, device):
    x = values(comm.rank, (4, 6), F32)
    out = comm.allgather(xp.asarray(x).T, axis=1)               # (6, 4) view -> (6, 8)
    np.testing.assert_array_equal(to_host(out), WORLD.allgather(x.T, axis=1))


@pytest.mark.parametrize("device", [DEVICE])
def test_split_groups_communicate_among_their_members_in_the_order_given(xp, comm, device):
    alone = comm.split([[0], [1]])
    x = values(comm.rank, (2, 3), F32)
    assert type(alone) is NCCLCommunicator and alone.ranks == (comm.rank,) and alone.size == 1
    np.testing.assert_array_equal(to_host(alone.allreduce(xp.asarray(x))), x)
    reversed_ = comm.split([[1, 0]])                              # member 0 is world rank 1
    assert reversed_.ranks == (1, 0) and reversed_.rank == 1 - comm.rank
    got = to_host(reversed_.allgather(xp.asarray(x), axis=0))
    np.testing.assert_array_equal(got, WORLD.split([[1, 0]]).allgather(x, axis=0))
    np.testing.assert_array_equal(got[:2], values(1, (2, 3), F32))    # world rank 1's block first
    if not REAL:     # the group's id was made by its member 0, world rank 1, and both joined it
        joined = np.array(xp.cuda.nccl.joined[-1]["uid"], np.int64)
        both = WORLD.allgather(joined[None], axis=0)
        assert joined[0] == 1 and np.array_equal(both[0], both[1])


@pytest.mark.parametrize("device", [DEVICE])
def test_the_unique_id_made_on_rank_0_reaches_every_rank_over_mpi(xp, comm, device):
    """Every rank joined the NCCL communicator of rank 0's id, on its own GPU (its local
    rank), with NVLink multicast off."""
    node = WORLD.mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=WORLD.rank)
    local_rank = node.Get_rank()
    node.Free()
    assert comm.device == local_rank
    assert os.environ.get("NCCL_NVLS_ENABLE") == "0"
    if REAL:
        assert (comm.nccl_comm.rank_id(), comm.nccl_comm.size(), comm.nccl_comm.device_id()) == (comm.rank, 2,
                                                                                               local_rank)
        return
    nccl = xp.cuda.nccl
    joined = nccl.joined[0]
    made = np.array(nccl.made[0] if comm.rank == 0 else [0] * 128, np.int64)
    rank0_id = WORLD.broadcast(made, root=0)
    assert joined["uid"] == tuple(int(b) for b in rank0_id)
    assert (joined["ndev"], joined["rank"], joined["device"], joined["nvls"]) == (2, comm.rank, local_rank, "0")
    assert joined["uid"][0] == 0                                  # the fake's ids name their maker: world rank 0


@pytest.mark.parametrize("device", [DEVICE])
def test_host_arrays_are_staged_numpy_in_numpy_out(xp, comm, device):
    x = values(comm.rank, (4, 2), BF16)
    for call in (lambda c: c.allreduce(x), lambda c: c.reduce_scatter(x, axis=0), lambda c: c.allgather(x, axis=1),
                 lambda c: c.broadcast(x, root=1)):
        got, want = call(comm), call(WORLD)
        assert type(got) is np.ndarray and got.dtype == BF16
        np.testing.assert_array_equal(bits(got), bits(want))
    records = comm.compare(np.array([comm.rank, 7]))            # the consistency checks' host records
    np.testing.assert_array_equal(records, [[0, 7], [1, 7]])


@pytest.mark.parametrize("device", [DEVICE])
def test_stats_count_what_the_mpi_backend_counts_and_barrier_waits_for_the_stream(xp, comm, device):
    x = values(comm.rank, (4, 6), F32)

    def calls(c, put):
        c.allreduce(put(x))
        c.iallreduce(put(x)).wait()
        c.allgather(put(x), axis=1)
        c.reduce_scatter(put(x), axis=1)
        c.alltoall(put(x), split_axis=0, concat_axis=1)
        c.barrier()
        return c.stats.snapshot()
    comm.stats.reset()
    synced = 0 if REAL else xp.cuda.synchronized
    got = calls(comm, xp.asarray)
    comm.stats.reset()
    want = calls(WORLD, lambda a: a)
    assert got == want and got["count"] == {"allreduce": 2, "allgather": 1, "reduce_scatter": 1, "alltoall": 1}
    if not REAL:
        assert xp.cuda.synchronized == synced + 1


@pytest.mark.parametrize("device", [DEVICE])
def test_a_reduction_nccl_cannot_do_is_refused_naming_the_dtype(xp, comm, device):
    with pytest.raises(TypeError, match=r"NCCLCommunicator\.allreduce .*x.*dtype int16"):
        comm.allreduce(xp.asarray(np.ones(3, np.int16)))


@pytest.mark.parametrize("device", [DEVICE])
def test_debug_mode_compares_the_members_calls_before_nccl_runs_them(xp, comm, device):
    """The fingerprints are host records, all-gathered through NCCL (staged): members that
    issue different collectives both raise, naming each one's call, and nothing is issued."""
    debug = nccl_world(MPICommunicator(WORLD.mpi_comm, CommStats(), checks=CommChecks(debug=True)))
    x = xp.asarray(values(comm.rank, (4,), F32))
    np.testing.assert_array_equal(to_host(debug.allreduce(x)), WORLD.allreduce(values(comm.rank, (4,), F32)))
    with pytest.raises(CollectiveMismatchError, match=r"collective #2 .*rank 0: allgather.*rank 1: allreduce"):
        debug.allgather(x) if comm.rank == 0 else debug.allreduce(x)
    assert debug.stats.snapshot()["count"] == {"allreduce": 1}


# ---- which world autopar.init() gets (always on the fake: it sets the GPU count) -----------

@pytest.fixture
def fake_gpus():
    """A function installing the stand-in with n fake GPUs (undone after the test)."""
    undos = []

    def install(n):
        module, undo = install_fake(n)
        undos.append(undo)
        return module
    yield install
    for undo in reversed(undos):
        undo()


def test_a_gpu_world_with_a_gpu_per_rank_runs_on_nccl(fake_gpus):
    fake_gpus(2)
    assert type(select_world(WORLD, GPU, {})) is NCCLCommunicator
    assert type(select_world(WORLD, GPU, {COMM_ENV: "auto", "NCCL_NVLS_ENABLE": "1"})) is NCCLCommunicator


def test_ranks_sharing_a_gpu_or_a_cpu_target_or_the_opt_out_keep_mpi(fake_gpus):
    fake_gpus(1)
    assert select_world(WORLD, GPU, {}) is WORLD                 # 2 ranks, 1 GPU: MPI with host copies
    assert select_world(WORLD, CPU, {}) is WORLD
    assert select_world(WORLD, GPU, {COMM_ENV: "mpi"}) is WORLD


def test_requiring_nccl_where_ranks_share_a_gpu_fails_on_every_rank_naming_them(fake_gpus):
    fake_gpus(1)
    with pytest.raises(ValueError, match=r"rank\(s\) 0, 1 of 2 cannot: 2 ranks on host .* share its 1 GPU"):
        select_world(WORLD, GPU, {COMM_ENV: "nccl"})


def test_a_bad_choice_is_refused_naming_the_variable():
    with pytest.raises(ValueError, match=f"{COMM_ENV}.*one of .*'gloo'"):
        select_world(WORLD, GPU, {COMM_ENV: "gloo"})
    with pytest.raises(ValueError, match=f"{COMM_ENV}.*device_target='CPU'"):
        select_world(WORLD, CPU, {COMM_ENV: "nccl"})


def test_init_builds_the_nccl_world_under_the_gpu_target(fake_gpus, monkeypatch):
    """autopar.init()'s world (context._world) is select_world's choice."""
    fake_gpus(2)
    monkeypatch.delenv(COMM_ENV, raising=False)
    set_context(device_target="GPU")
    try:
        built = context._world(CommChecks())
    finally:
        set_context(device_target="CPU")
    assert type(built) is NCCLCommunicator and built.ranks == (0, 1)
    np.testing.assert_array_equal(built.allreduce(np.arange(3.0)), 2 * np.arange(3.0))

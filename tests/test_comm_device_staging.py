"""Device arrays through the MPI communicator by host staging (autopar/comm/staging.py), on
the CPU: a stand-in device array that numpy cannot read (as CuPy's: ``np.asarray`` raises)
takes the staged path -- one copy out, the operation on numpy, one copy back, the result a
device array of the input's dtype -- and a numpy array takes the unstaged path untouched.
Checked on a recording two-member communicator here, and over real MPI on 2 ranks."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_comm_mpi_launch import MPIEXEC, launch, launched_under_mpi

from autopar.backend import ARRAY_MODULES
from autopar.comm.base import CommStats, Communicator, Done
from autopar.comm.mpi import MPICommunicator
from autopar.comm.staging import HostStaging, staged

TESTS = Path(__file__).resolve().parent


class DeviceArray:
    """A stand-in device array: numpy refuses to read it (CuPy's rule: no implicit copy to
    the host), ``get()`` copies it to the host and counts the copy."""

    copies_out = 0

    def __init__(self, host: np.ndarray):
        self._host = np.array(host)            # a copy 'to the device'

    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    nbytes = property(lambda self: self._host.nbytes)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (a device array)")

    def get(self) -> np.ndarray:
        DeviceArray.copies_out += 1
        return self._host.copy()


class DeviceModule:
    """The stand-in's array module: ``asarray`` copies a host array to the 'device'."""

    def __init__(self):
        self.copies_in = 0

    def asarray(self, a):
        if isinstance(a, DeviceArray):
            return a
        assert type(a) is np.ndarray, f"copied to the device from a {type(a).__name__}"
        self.copies_in += 1
        return DeviceArray(a)


def register(modules: dict) -> DeviceModule:
    """Make DeviceArray a device array type of ``autopar.backend`` (modules: ARRAY_MODULES)."""
    module = DeviceModule()
    modules[DeviceArray] = lambda: module
    return module


@pytest.fixture
def device(monkeypatch):
    module = DeviceModule()
    monkeypatch.setitem(ARRAY_MODULES, DeviceArray, lambda: module)
    DeviceArray.copies_out = 0
    return module


class Recording(HostStaging, Communicator):
    """Member 0 of two, whose primitives record the array they were handed and answer as if
    the other member held the same array: allreduce 2x, allgather [x, x], ..."""

    def __init__(self):
        super().__init__(CommStats())
        self.handed: list = []

    rank, size, ranks = property(lambda self: 0), property(lambda self: 2), property(lambda self: (0, 1))

    def _seen(self, x):
        self.handed.append(x)
        return x

    def _allreduce(self, x, op):
        return self._seen(x) * 2

    def _iallreduce(self, x, op):
        return Done(self._seen(x) * 2)

    def _ireduce_scatter(self, x, axis):
        return Done(self._reduce_scatter(x, axis))

    def _allgather(self, x, axis):
        return np.concatenate([self._seen(x), x], axis=axis)

    def _reduce_scatter(self, x, axis):
        return np.split(self._seen(x) * 2, 2, axis=axis)[0]

    def _alltoall(self, x, split_axis, concat_axis):
        mine = np.split(self._seen(x), 2, axis=split_axis)[0]
        return np.concatenate([mine, mine], axis=concat_axis)

    def _broadcast(self, x, root):
        return self._seen(x).copy()

    def _send(self, x, dest, tag):
        self._seen(x)

    def _recv(self, shape, dtype, source, tag):
        return np.zeros(shape, dtype)

    def _barrier(self):
        pass

    def _split(self, groups, index):
        raise NotImplementedError


X = np.arange(24, dtype=np.float64).reshape(2, 3, 4)   # (2, 3, 4)
CALLS = {   # name -> (call on a communicator, expected result for X held by both members)
    "allreduce": (lambda c, x: c.allreduce(x), 2 * X),
    "iallreduce": (lambda c, x: c.iallreduce(x).wait(), 2 * X),
    "allgather axis 1": (lambda c, x: c.allgather(x, axis=1), np.concatenate([X, X], axis=1)),
    "reduce_scatter axis 2": (lambda c, x: c.reduce_scatter(x, axis=2), 2 * X[:, :, :2]),
    "ireduce_scatter axis 0": (lambda c, x: c.ireduce_scatter(x, axis=0).wait(), 2 * X[:1]),
    "alltoall 2 -> 1": (lambda c, x: c.alltoall(x, split_axis=2, concat_axis=1),
                        np.concatenate([X[:, :, :2], X[:, :, :2]], axis=1)),
    "broadcast": (lambda c, x: c.broadcast(x, root=1), X),
}


@pytest.mark.parametrize("name", CALLS)
def test_a_device_array_is_copied_out_reduced_on_numpy_and_copied_back(device, name):
    call, want = CALLS[name]
    comm = Recording()
    out = call(comm, DeviceArray(X))
    assert type(out) is DeviceArray, f"{name}: the result left the device ({type(out).__name__})"
    assert out.dtype == X.dtype and out.shape == want.shape
    np.testing.assert_array_equal(out.get(), want)
    assert [type(a) for a in comm.handed] == [np.ndarray], f"{name}: MPI was handed {comm.handed}"
    assert (DeviceArray.copies_out, device.copies_in) == (2, 1)      # one out, one back (+ the .get() above)
    assert comm.stats.snapshot()["bytes"] == {name.split()[0].lstrip("i"): X.nbytes}


@pytest.mark.parametrize("name", CALLS)
def test_a_numpy_array_takes_the_unstaged_path(device, name):
    call, want = CALLS[name]
    comm = Recording()
    out = call(comm, X)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, want)
    assert comm.handed[0] is X, f"{name}: a numpy input was copied on its way to MPI"
    assert (DeviceArray.copies_out, device.copies_in) == (0, 0)


def test_sends_stage_out_and_come_back_with_nothing(device):
    comm = Recording()
    assert comm.send(DeviceArray(X), dest=1) is None
    assert comm.isend(DeviceArray(X[0]), dest=1, tag=3).wait() is None
    assert [type(a) for a in comm.handed] == [np.ndarray, np.ndarray]
    np.testing.assert_array_equal(comm.handed[1], X[0])
    assert (DeviceArray.copies_out, device.copies_in) == (2, 0)


def test_without_staging_a_device_array_is_refused_where_numpy_reads_it(device):
    """The stand-in is as strict as CuPy: the unstaged Communicator cannot read it, so the
    tests above pass only through the staging."""
    with pytest.raises(TypeError, match="Implicit conversion"):
        Communicator.allreduce(Recording(), DeviceArray(X))


def test_staged_passes_a_numpy_array_and_its_arguments_through_as_they_are():
    seen = []
    assert staged(lambda *a, **k: seen.append((a, k)) or "result", X, 1, tag=2) == "result"
    assert seen[0][0][0] is X and seen[0][0][1:] == (1,) and seen[0][1] == {"tag": 2}


def test_the_mpi_communicator_is_staged():
    for name in ("allreduce", "iallreduce", "ireduce_scatter", "allgather", "reduce_scatter", "alltoall",
                 "broadcast", "send", "isend"):
        assert getattr(MPICommunicator, name) is getattr(HostStaging, name), name


# ---- over real MPI: 2 ranks, each holding its own stand-in device arrays --------------------

MPI_SCRIPT = """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from autopar.backend import ARRAY_MODULES
    from autopar.comm import install_abort_handler, world
    from test_comm_device_staging import DeviceArray, register

    install_abort_handler()
    comm = world()
    assert comm.size == 2, comm
    device, r = register(ARRAY_MODULES), comm.rank
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * r          # (3, 4), rank-valued
    both = [np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * k for k in (0, 1)]
    got = {{
        "allreduce": comm.allreduce(DeviceArray(x)),
        "iallreduce max": comm.iallreduce(DeviceArray(x), op="max").wait(),
        "allgather 1": comm.allgather(DeviceArray(x), axis=1),
        "reduce_scatter 1": comm.reduce_scatter(DeviceArray(x), axis=1),
        "ireduce_scatter 1": comm.ireduce_scatter(DeviceArray(x), axis=1).wait(),
        "alltoall 1 0": comm.alltoall(DeviceArray(x), split_axis=1, concat_axis=0),
        "broadcast 1": comm.broadcast(DeviceArray(x), root=1),
    }}
    want = {{
        "allreduce": both[0] + both[1],
        "iallreduce max": both[1],
        "allgather 1": np.concatenate(both, axis=1),
        "reduce_scatter 1": np.split(both[0] + both[1], 2, axis=1)[r],
        "ireduce_scatter 1": np.split(both[0] + both[1], 2, axis=1)[r],
        "alltoall 1 0": np.concatenate([np.split(b, 2, axis=1)[r] for b in both], axis=0),
        "broadcast 1": both[1],
    }}
    if r == 0:
        comm.isend(DeviceArray(x), dest=1, tag=5).wait()
        comm.send(DeviceArray(x * 2), dest=1, tag=6)
    else:
        got["irecv"] = comm.irecv((3, 4), np.float32, source=0, tag=5).wait()
        got["recv"] = comm.recv((3, 4), np.float32, source=0, tag=6)
        want["irecv"], want["recv"] = both[0], both[0] * 2
    for name, out in got.items():
        device_kind = not name.endswith("recv")       # a receive has no input to follow: numpy
        assert type(out) is (DeviceArray if device_kind else np.ndarray), (name, type(out))
        host = out.get() if device_kind else out
        assert host.dtype == np.float32, (name, host.dtype)
        np.testing.assert_array_equal(host, want[name], err_msg=name)
    plain = comm.allreduce(x)
    assert type(plain) is np.ndarray and np.array_equal(plain, want["allreduce"])
    counts = comm.allgather(np.array([[len(got), device.copies_in]]))     # (2, 2): per rank
    if r == 0:
        print("staged calls, copies in:", counts.tolist(), flush=True)
"""


def test_device_arrays_over_two_real_mpi_ranks(tmp_path):
    """Every collective and both p2p kinds on stand-in device arrays over mpiexec -n 2:
    results on the 'device', equal to the numpy path's sums, gathers and blocks."""
    if MPIEXEC is None or launched_under_mpi():
        pytest.skip("needs mpiexec, and not already under an MPI launcher")
    script = tmp_path / "staged_mpi.py"
    script.write_text(textwrap.dedent(MPI_SCRIPT.format(tests=str(TESTS))))
    rc, out, err, _ = launch([sys.executable, str(script)], timeout=60)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "staged calls, copies in: [[7, 7], [9, 7]]" in out, out      # receives come back on the host

"""Device arrays through the MPI communicator by host staging (autopar/comm/staging.py), on
the CPU: a stand-in device array that numpy cannot read (as CuPy's: ``np.asarray`` raises)
takes the staged path -- one copy out, the operation on numpy, one copy back, the result a
device array of the input's dtype -- and a numpy array takes the unstaged path untouched.
Checked on a recording two-member communicator here, and over real MPI on 2 ranks."""
from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from test_comm_mpi_launch import MPIEXEC, launch, launched_under_mpi

from autopar.comm.base import CommStats, Communicator, Done
from autopar.comm.mpi import MPICommunicator
from autopar.comm.staging import HostStaging, staged

TESTS = Path(__file__).resolve().parent


class ndarray:  # noqa: N801 - CuPy's class name: autopar tells a CuPy array by it
    """A stand-in device array: numpy behind CuPy's rules. numpy cannot read it (no
    ``__array__`` conversion, no buffer: TypeError, as CuPy's "Implicit conversion to a
    NumPy array is not allowed"), arithmetic and functions refuse numpy arrays beside it,
    ``get()`` copies it to the host (counted in ``copies_out``)."""

    __module__ = "cupy"        # with the class name, what autopar.backend recognises
    __array_priority__ = 100
    copies_out = 0

    def __init__(self, a: np.ndarray):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (a device array)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):       # np.add(d, d): runs on the device
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kw)))

    def __array_function__(self, func, types, args, kwargs):        # np.concatenate([d, d]): likewise
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    T = property(lambda self: ndarray(self._a.T))
    flags = property(lambda self: _Flags(self._a.flags))
    base = property(lambda self: ndarray(self._a.base) if type(self._a.base) is np.ndarray else None)

    def get(self) -> np.ndarray:
        ndarray.copies_out += 1
        return np.array(self._a)

    def __getattr__(self, name):
        if name.startswith("__"):       # no __array_interface__: numpy must not find the memory
            raise AttributeError(name)
        attr = getattr(self._a, name)
        return _on_device(attr) if callable(attr) else _wrap(attr)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __neg__(self):
        return ndarray(-self._a)

    def __abs__(self):
        return ndarray(abs(self._a))

    def __invert__(self):
        return ndarray(~self._a)

    def __repr__(self):
        return f"device {self._a!r}"

    __hash__ = None


class _Flags:
    """CuPy's flags: no ``writeable``."""

    def __init__(self, flags):
        self.c_contiguous, self.f_contiguous, self.owndata = flags.c_contiguous, flags.f_contiguous, flags.owndata


def _unwrap(x):
    """The numpy array behind a device array; a numpy array (not 0-d) here is an error, as in CuPy."""
    if isinstance(x, ndarray):
        return x._a
    if type(x) is np.ndarray and x.ndim:
        raise TypeError(f"Unsupported type {type(x)} beside a device array (shape {x.shape})")
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(x):
    """numpy results as device arrays (a numpy scalar as a 0-d one, as CuPy's reductions give)."""
    if type(x) is np.ndarray:
        return ndarray(x)
    if isinstance(x, np.generic) and not isinstance(x, (np.str_, np.bytes_)):
        return ndarray(np.asarray(x))
    if type(x) in (list, tuple):
        return type(x)(_wrap(v) for v in x)
    return x


def _on_device(fn):
    """``fn`` (a numpy function, ufunc method or array method) on device arrays."""
    return lambda *args, **kw: _wrap(fn(*_unwrap(args), **_unwrap(kw)))


def _binary(name: str):
    def op(self, other):
        out = getattr(self._a, name)(_unwrap(other))
        return out if out is NotImplemented else _wrap(out)
    return op


def _inplace(name: str):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other))
        return self
    return op


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"):
    setattr(ndarray, f"__{_op}__", _binary(f"__{_op}__"))
    setattr(ndarray, f"__r{_op}__", _binary(f"__r{_op}__"))
    setattr(ndarray, f"__i{_op}__", _inplace(f"__i{_op}__"))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_op}__", _binary(f"__{_op}__"))


class _Ufunc:
    """A numpy ufunc on device arrays, its methods (``add.at``) too."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kw):
        return _on_device(self._ufunc)(*args, **kw)

    def __getattr__(self, name):
        attr = getattr(self._ufunc, name)
        return _on_device(attr) if callable(attr) else attr


class StandInCupy(types.ModuleType):
    """The stand-in's module, named ``cupy``: numpy's functions on device arrays (refusing
    numpy arrays beside them), ``asarray`` copying a host array to the 'device' (counted in
    ``copies_in``), one device (``cuda.runtime.getDeviceCount()`` is 1), no memory pool."""

    ndarray = ndarray

    def __init__(self):
        super().__init__("cupy")
        self.copies_in = 0
        self.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                          Device=lambda i=0: types.SimpleNamespace(use=lambda: None))

    def asarray(self, a, dtype=None):
        if isinstance(a, ndarray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else ndarray(a._a.astype(dtype))
        self.copies_in += 1
        return ndarray(np.array(a, dtype=dtype))

    def ascontiguousarray(self, a, dtype=None):
        return ndarray(np.ascontiguousarray(_unwrap(a), dtype=dtype))

    def asnumpy(self, a):
        return a.get() if isinstance(a, ndarray) else np.asarray(a)

    def get_default_memory_pool(self):
        return types.SimpleNamespace(used_bytes=lambda: 0, total_bytes=lambda: 0)

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return _Ufunc(attr)
        return attr if isinstance(attr, type) or not callable(attr) else _on_device(attr)


def DeviceArray(host) -> ndarray:  # noqa: N802 - reads as the type it makes
    """A stand-in device array holding a copy of ``host``."""
    return ndarray(np.array(host))


@pytest.fixture
def device(monkeypatch):
    """The stand-in as ``cupy`` (autopar finds a device array's module by that name)."""
    module = StandInCupy()
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(ndarray, "copies_out", 0)
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

    def _iallreduce(self, x, op, donate=False):
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
    assert type(out) is ndarray, f"{name}: the result left the device ({type(out).__name__})"
    assert out.dtype == X.dtype and out.shape == want.shape
    np.testing.assert_array_equal(out.get(), want)
    assert [type(a) for a in comm.handed] == [np.ndarray], f"{name}: MPI was handed {comm.handed}"
    assert (ndarray.copies_out, device.copies_in) == (2, 1)      # one out, one back (+ the .get() above)
    assert comm.stats.snapshot()["bytes"] == {name.split()[0].lstrip("i"): X.nbytes}


@pytest.mark.parametrize("name", CALLS)
def test_a_numpy_array_takes_the_unstaged_path(device, name):
    call, want = CALLS[name]
    comm = Recording()
    out = call(comm, X)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, want)
    assert comm.handed[0] is X, f"{name}: a numpy input was copied on its way to MPI"
    assert (ndarray.copies_out, device.copies_in) == (0, 0)


def test_sends_stage_out_and_come_back_with_nothing(device):
    comm = Recording()
    assert comm.send(DeviceArray(X), dest=1) is None
    assert comm.isend(DeviceArray(X[0]), dest=1, tag=3).wait() is None
    assert [type(a) for a in comm.handed] == [np.ndarray, np.ndarray]
    np.testing.assert_array_equal(comm.handed[1], X[0])
    assert (ndarray.copies_out, device.copies_in) == (2, 0)


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
    from autopar.comm import install_abort_handler, world
    from test_comm_device_staging import DeviceArray, StandInCupy, ndarray

    install_abort_handler()
    comm = world()
    assert comm.size == 2, comm
    device = sys.modules["cupy"] = StandInCupy()
    r = comm.rank
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
        assert type(out) is (ndarray if device_kind else np.ndarray), (name, type(out))
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

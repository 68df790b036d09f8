"""Buffers handed to MPI have exact C-order strides: mpi4py's DLPack path (Open MPI builds
with mpi4py 4) refuses arrays numpy calls contiguous whose size-1 dims carry odd strides,
which is what moving an axis next to a size-1 dim gives (a PanGu-α LayerNorm gradient
failed that way under mpiexec -n 4)."""
import numpy as np
import pytest

from autopar.comm.mpi import _contiguous


def c_strides(shape, itemsize):
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


@pytest.mark.parametrize("make", [
    lambda: np.moveaxis(np.arange(12.0).reshape(4, 1, 3), 1, 0),          # (1, 4, 3), strides (24, 24, 8)
    lambda: np.arange(6.0).reshape(2, 3).T,                                 # not contiguous at all
    lambda: np.arange(6.0).reshape(1, 6)[:, ::2],                           # strided
    lambda: np.arange(6.0).reshape(2, 3),                                   # already exact: kept
])
def test_buffers_get_exact_c_strides_and_keep_their_values(make):
    x = make()
    y = _contiguous(x)
    assert y.strides == c_strides(y.shape, y.itemsize)
    np.testing.assert_array_equal(y, x)
    if x.strides == c_strides(x.shape, x.itemsize) and x.flags.c_contiguous:
        assert y is x

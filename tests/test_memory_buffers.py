"""Memory prediction's buffer guess for inserted redistributions (``runtime.memory.guess_buffers``):
one whose planned steps communicate makes a new buffer; one that moves nothing is guessed
a view of its input -- decided by asking the op (a ``spmd.Redistribute`` and its steps),
not its name. Both keep the shape, so a wrong answer either way shows."""
import numpy as np

from autopar.comm import redistribution as rd
from autopar.ir.graph import GraphBuilder
from autopar.ir.layout import Layout
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.ops import Exp
from autopar.runtime.memory import base_buffer, guess_buffers
from autopar.runtime.spmd import Redistribute

MESH = Mesh((2,), ("devices",))
SHAPE, F64 = (4, 4), np.dtype(np.float64)


def redistribute(src: Layout, dst: Layout) -> Redistribute:
    return Redistribute(rd.plan(src, dst, SHAPE, F64.itemsize), rank=0, comms={}, world=None, clock=[0.0])


def test_a_communicating_redistribution_makes_a_new_buffer_and_one_that_moves_nothing_a_view():
    replicated, partial = Layout(MESH, ((), ())), Layout(MESH, ((), ()), (0,))
    reduce, stay = redistribute(partial, replicated), redistribute(replicated, replicated)
    assert [s.kind for s in reduce.attrs["redist"].steps] == [rd.ALLREDUCE] and stay.attrs["redist"].steps == ()
    b = GraphBuilder()
    x = b.new_value(TensorSpec(SHAPE, F64))                                       # (4, 4)
    (made,) = b.add_node(Exp(), (x,), (TensorSpec(SHAPE, F64),), "s").outputs     # a new buffer
    (summed,) = b.add_node(reduce, (made,), (TensorSpec(SHAPE, F64),), "s").outputs   # all-reduced: (4, 4)
    (same,) = b.add_node(stay, (made,), (TensorSpec(SHAPE, F64),), "s").outputs       # no step: (4, 4)
    buffers = guess_buffers(b.build((x,), (), (), (summed, same)))
    assert buffers[summed] == {summed}
    assert buffers[same] == {made}


def test_base_buffer_is_the_array_a_view_views():
    a = np.zeros((4, 4))
    assert base_buffer(a[1:].T[::2]) is a and base_buffer(a) is a and base_buffer(3.0) == 3.0

"""spmd.lower's phases one at a time, on a Megatron MLP split over two ranks (mp=2): the
parameters placed as this rank's shards, one forward all-reduce (the row-parallel matmul's
partial sum), the loss delivered replicated; and ``lower`` is exactly those phases."""
import numpy as np
from test_spmd import MLP

from autopar.comm import run_in_process
from autopar.ir.graph import FORWARD
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.spmd import Lowering, Redistribute, lower

X = np.random.default_rng(0).standard_normal((4, 8))


def phases(comm):
    net = MLP(h=8, f=16, mp=2)
    prog = ShardedGradProgram(net, (X,), net.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
    outputs = (prog.targets.loss,)
    low = Lowering(prog.graph, prog.plan, comm.rank, comm)
    low.place_inputs()
    _, shards = low.place_params()
    shard_shapes = {s.param.name: s.data.shape for s in shards}
    low.place_consts()
    for node in prog.graph.nodes:
        low.lower_node(node)
    forward_moves = [n.prim.attrs["redist"] for n in low.builder.nodes
                     if isinstance(n.prim, Redistribute) and n.phase == FORWARD]
    _, layouts = low.deliver(outputs, {})
    by_phases = [n.prim.kind for n in low.builder.nodes]
    entry, _, entry_layouts, _ = lower(prog.graph, outputs, prog.plan, comm.rank, comm)
    return (shard_shapes, [(m.src.partial, m.dst.partial) for m in forward_moves], layouts[outputs[0]],
            by_phases == [n.prim.kind for n in entry.nodes], entry_layouts == layouts)


def test_each_phase_does_its_part_and_lower_runs_them_in_order():
    for shards, moves, loss_layout, same_nodes, same_layouts in run_in_process(2, phases):
        assert shards == {"scale": (8,), "w1": (8, 8), "b1": (8,), "w2": (8, 8)}   # f=16 split in two
        assert moves == [((0,), ())]                  # one all-reduce: mm2's partial sum, nothing else
        assert not loss_layout.partial and not any(loss_layout.dims)               # the loss whole
        assert same_nodes and same_layouts

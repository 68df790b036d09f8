"""MindSpore's ``Cell.recompute(mp_comm_recompute=...)``: False keeps the model-parallel
redistributions of a recomputed block saved instead of running them again -- the same
loss and gradients, no collective repeated, a peak between plain and fully recomputed;
the flags autopar does not support are refused by name."""
import numpy as np
import pytest
from test_recompute import CONFIG, IDS, RECOMPUTED, measured, pangu

from autopar.comm import run_in_process
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.spmd import Redistribute


def mp2_run(recompute: bool, comm_recompute: bool = True):
    """(loss, grads, collectives in the step, collectives repeated by recompute, activation peak) per rank."""
    cfg = CONFIG.replace(model_parallel=2)

    def body(comm):
        net = pangu(False, cfg)
        if recompute:
            for i in RECOMPUTED:
                net.backbone.blocks[i].recompute(mp_comm_recompute=comm_recompute)
        prog = ShardedGradProgram(net, (IDS,), net.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
        comm.stats.reset()
        loss, grads, usage = measured(prog, (IDS,))
        clones = [prog.program.graph.nodes[c] for c in prog.program.recomputed_from]
        repeated = sum(step.kind != "slice" for n in clones if isinstance(n.prim, Redistribute)
                       for step in n.prim.attrs["redist"].steps)
        return loss, grads, sum(comm.stats.snapshot()["count"].values()), repeated, usage.activations_peak
    return run_in_process(2, body)


def test_mp_comm_recompute_false_saves_the_collectives_instead_of_repeating_them():
    plain, full, kept = mp2_run(False), mp2_run(True), mp2_run(True, comm_recompute=False)
    for p, f, k in zip(plain, full, kept):
        assert k[0] == p[0]
        for g_p, g_k in zip(p[1], k[1]):
            np.testing.assert_array_equal(g_k, g_p)
        assert f[3] == len(RECOMPUTED) and f[2] - p[2] == f[3]      # default: the all-reduce runs again
        assert k[3] == 0 and k[2] == p[2]                           # kept: nothing repeated
        assert f[4] < k[4] < p[4]                                    # its output saved: a peak in between


@pytest.mark.parametrize("flag, match", [
    ("parallel_optimizer_comm_recompute", r"parallel_optimizer_comm_recompute: expected False \(autopar does not"),
    ("recompute_slice_activation", r"recompute_slice_activation: expected False \(autopar does not support"),
])
def test_unsupported_recompute_flags_are_refused(flag, match):
    with pytest.raises(ValueError, match=r"Block\.recompute: " + match):
        pangu(False).backbone.blocks[0].recompute(**{flag: True})
    with pytest.raises(TypeError, match=r"mp_comm_recompute: expected True or False, got 1"):
        pangu(False).backbone.blocks[0].recompute(mp_comm_recompute=1)

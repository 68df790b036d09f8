"""Collectives counted as the runtime calls them, gradient sums and clipping priced.

* The runtime adds a value's alike gradient parts before ONE reduction (the partial sums of
  Q, K and V's common input): one all-reduce, not three.
* Autodiff's ``AddN`` of k gradient parts reads k and writes one: ``(k + 1) x bytes``.
* Global-norm clipping reads every gradient once more and writes it scaled; with optimizer
  parallel the update and clipping run on the slice, and the updated slices are
  all-gathered: one more call than the all-reduce.
* Once per step the squared gradient norm is all-reduced: one more call.
"""
import json

import numpy as np
import pytest
from test_costmodel import dense_data_parallel

from autopar import nn, ops
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.trace import trace
from autopar.strategy import formulas
from autopar.strategy.costmodel import CLIP_BYTES_PER_ELEMENT, OPTIMIZER_BYTES_PER_ELEMENT, CostModel
from autopar.strategy.optimizer_shard import OptimizerShard
from autopar.strategy.profile import PROFILE_DIR, load_profile
from autopar.strategy.sharding_plan import plan_shardings


def links(tmp_path, latency=0.0, **rates):
    """1 GB/s links with ``latency`` per call; compute free except the rates given."""
    base = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    base.update(name="links", gemm_flops={"float32": 1e30}, elementwise_bytes_per_s=1e30, op_overhead_s=0.0,
                intra_node_latency_s=latency, inter_node_latency_s=latency, intra_node_bandwidth_bytes_per_s=1e9,
                inter_node_bandwidth_bytes_per_s=1e9, devices_per_node=64,
                op_bytes_per_s={k: 1e30 for k in base["op_bytes_per_s"]} | rates)
    base["sources"] |= {f"op_bytes_per_s.{k}": "assumed, for this test" for k in rates}
    path = tmp_path / "links.json"
    path.write_text(json.dumps(base))
    return load_profile(str(path))


class ThreeReaders(nn.Cell):
    """h read by three column-parallel matmuls (attention's Q, K, V), then one row-parallel."""

    def __init__(self, h, mp):
        super().__init__()
        self.g = nn.Parameter(np.ones((h,), np.float32), name="g")
        self.ws = [nn.Parameter(np.zeros((h, h), np.float32), name=f"w{k}") for k in range(3)]
        for k, w in enumerate(self.ws):
            setattr(self, f"w{k}", w)
        self.wo = nn.Parameter(np.zeros((h, h), np.float32), name="wo")
        self.mms = [ops.MatMul().shard(((1, 1), (1, mp))) for _ in range(3)]
        for k, m in enumerate(self.mms):
            setattr(self, f"mm{k}", m)
        self.out = ops.MatMul().shard(((1, mp), (mp, 1)))
        self.scale, self.add1, self.add2, self.mean = ops.Mul(), ops.Add(), ops.Add(), ops.ReduceMean()

    def construct(self, x):
        h = self.scale(x, self.g)
        q, k, v = (m(h, w) for m, w in zip(self.mms, self.ws))
        return self.mean(self.out(self.add2(self.add1(q, k), v), self.wo))


@pytest.mark.parametrize("mp", [2, 4])
def test_alike_gradient_parts_are_summed_then_reduced_once(tmp_path, mp):
    b_s, h = 64, 32
    g = trace(ThreeReaders(h, mp), (TensorSpec((b_s, h), np.dtype(np.float32)),), {}).graph
    stage = Mesh((mp,), ("devices",))
    plan = plan_shardings(g, "semi_auto_parallel", stage, True)
    cost = CostModel(g, stage, links(tmp_path, AddN=1e9), True).evaluate(plan)
    act = b_s * h * 4
    # forward: the row-parallel output's all-reduce; backward: ONE all-reduce (three partial
    # parts added first), taken through the Mul as the runtime does (x needs no gradient, so
    # its VJP's one gradient, g's (h floats), is smaller than dy: g's gradient is reduced
    # instead of h's); once per step: the norm's 8 bytes
    assert cost.comm_s == pytest.approx((act + 4 * h + 8) * formulas.collective_factor("all_reduce", mp) / 1e9,
                                        rel=1e-12)
    # the sum of h's three gradient parts: reads 3, writes 1, h replicated: (3 + 1) x (b_s, h) float32
    assert cost.compute_s == pytest.approx(4 * act / 1e9, rel=1e-12)


@pytest.mark.parametrize("dp", [2, 4])
def test_each_collective_call_pays_its_latency_and_optimizer_parallel_makes_two(tmp_path, dp):
    h, latency = 64, 1e-3
    g, stage, plan = dense_data_parallel(dp, h)
    prof = links(tmp_path, latency, optimizer_update=1e9)
    plain = CostModel(g, stage, prof).evaluate(plan)
    zero = CostModel(g, stage, prof, optimizer_parallel=True,
                     optimizer_shard=OptimizerShard(threshold_kb=0)).evaluate(plan)   # every weight sliced
    grad = h * h * 4 * formulas.collective_factor("all_reduce", dp) / 1e9
    norm = 8 * formulas.collective_factor("all_reduce", dp) / 1e9
    assert plain.comm_s == pytest.approx(2 * latency + grad + norm, rel=1e-12)       # gradient + norm: 2 calls
    assert zero.comm_s == pytest.approx(3 * latency + grad + norm, rel=1e-12)        # reduce-scatter + all-gather
    # update + clipping copies: 8 + 3 passes over the weight, on the 1/dp slice with optimizer parallel
    assert OPTIMIZER_BYTES_PER_ELEMENT == 8 + CLIP_BYTES_PER_ELEMENT == 11
    assert plain.update_s == pytest.approx(11 * h * h * 4 / 1e9, rel=1e-12)
    assert zero.update_s == pytest.approx(11 * h * h * 4 / dp / 1e9, rel=1e-12)


def test_a_calibrated_waiting_term_is_paid_once_per_call(tmp_path):
    from autopar.strategy.profile import DEFAULTED_SOURCES, MachineProfile
    base = links(tmp_path, 1e-3)
    assert base.collective_wait_s == 0.0                             # old files: no waiting charged
    assert base.sources["collective_wait_s"] == DEFAULTED_SOURCES["collective_wait_s"]
    data = base.to_dict() | {"collective_wait_s": 5e-4}
    data["sources"] = dict(data["sources"]) | {"collective_wait_s": "assumed, for this test"}
    waits = MachineProfile.from_dict(data)
    for kind in ("all_reduce", "all_gather", "broadcast"):
        assert formulas.collective_seconds(kind, 4096, 4, waits, False) == pytest.approx(
            formulas.collective_seconds(kind, 4096, 4, base, False) + 5e-4, rel=1e-12)
    assert formulas.collective_seconds("all_reduce", 4096, 1, waits, False) == 0.0   # one rank: no call
    del data["sources"]["collective_wait_s"]
    with pytest.raises(ValueError, match=r"names no source for \['collective_wait_s'\]"):
        MachineProfile.from_dict(data)

"""The graph cost model against closed forms (REFERENCE.md): training FLOPs 6 x parameters x
tokens, Megatron's per-layer tensor-parallel all-reduce volume on a ring, ZeRO memory
(the runtime's optimizer parallel keeps gradient and state slices: stage 2's form), and the data-parallel gradient all-reduce."""
import json

import numpy as np
import pytest
from reference_formulas import megatron_tp_comm_bytes_per_layer, zero_memory_bytes

from autopar import nn, ops
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.trace import trace
from autopar.strategy import formulas as cost
from autopar.strategy.costmodel import CostModel
from autopar.strategy.optimizer_shard import OptimizerShard
from autopar.strategy.profile import PROFILE_DIR, load_profile
from autopar.strategy.sharding_plan import plan_shardings


@pytest.fixture(scope="module")
def link_only(tmp_path_factory):
    """No latency, 1 GB/s links, infinitely fast compute: seconds are bytes on the wire / 1e9."""
    base = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    base.update(name="links", gemm_flops={"float32": 1e30}, elementwise_bytes_per_s=1e30, op_overhead_s=0.0,
                intra_node_latency_s=0.0, inter_node_latency_s=0.0, intra_node_bandwidth_bytes_per_s=1e9,
                inter_node_bandwidth_bytes_per_s=1e9, devices_per_node=64)
    base["sources"].setdefault("op_overhead_s", "assumed, for this test")
    path = tmp_path_factory.mktemp("p") / "links.json"
    path.write_text(json.dumps(base))
    return load_profile(str(path))


class MegatronLayer(nn.Cell):
    """Attention-like and MLP-like halves, each column-parallel then row-parallel (weights
    [in, out]): the layer Megatron shards with one all-reduce per half per direction."""

    def __init__(self, h, mp):
        super().__init__()
        self.w = [nn.Parameter(np.zeros(s, np.float32), name=f"w{k}")
                  for k, s in enumerate([(h, 4 * h), (4 * h, h), (h, 4 * h), (4 * h, h)])]
        for k, w in enumerate(self.w):
            setattr(self, f"w{k}", w)
        col, row = ((1, 1), (1, mp)), ((1, mp), (mp, 1))
        self.mm = [ops.MatMul().shard(col), ops.MatMul().shard(row), ops.MatMul().shard(col), ops.MatMul().shard(row)]
        for k, m in enumerate(self.mm):
            setattr(self, f"mm{k}", m)
        self.gelu = ops.GeLU().shard(((1, mp),))
        self.add, self.scale = ops.Add(), ops.Mul()
        self.g = nn.Parameter(np.ones((h,), np.float32), name="g")   # so x's gradient flows, as a layer's does
        self.mean = ops.ReduceMean()

    def construct(self, x):
        x = self.scale(x, self.g)
        a = self.add(x, self.mm1(self.mm0(x, self.w0), self.w1))
        b = self.add(a, self.mm3(self.gelu(self.mm2(a, self.w2)), self.w3))
        return self.mean(b)


@pytest.mark.parametrize("mp", [2, 4, 8])
def test_megatron_layer_moves_four_ring_all_reduces_of_the_activations(link_only, mp):
    b_s, h = 64, 32                      # b*s tokens of width h
    g = trace(MegatronLayer(h, mp), (TensorSpec((b_s, h), np.dtype(np.float32)),), {}).graph
    stage = Mesh((mp,), ("devices",))
    plan = plan_shardings(g, "semi_auto_parallel", stage, True)
    got = CostModel(g, stage, link_only, True).evaluate(plan).comm_s
    volume = megatron_tp_comm_bytes_per_layer(1, b_s, h, bytes_per_element=4)   # 4 all-reduces of (b, s, h)
    volume += 8          # and, once per step, the all-reduce of the squared gradient norm (one float64)
    assert got == pytest.approx(volume * cost.collective_factor("all_reduce", mp) / 1e9, rel=1e-12)


def test_training_flops_are_six_times_parameters_times_tokens_plus_attention():
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    cfg = PanguAlphaConfig.preset("tiny", hidden_size=256, ffn_hidden_size=1024, num_heads=8, num_layers=3,
                                  seq_length=64, vocab_size=512)
    B = 4
    g = trace(PanguAlphaWithLoss(cfg), (TensorSpec((B, cfg.seq_length + 1), np.dtype(np.int32)),), {}).graph
    stage = Mesh((1,), ("devices",))
    model = CostModel(g, stage, load_profile("cpu-2core"), True)
    plan = plan_shardings(g, "stand_alone", stage, True)
    matmul_flops = sum(c.flops for n, c, _ in model.op_costs(plan) if n.prim.kind in ("MatMul", "BatchMatMul"))
    # every layer (blocks and the query layer) and the tied head; recompute off
    expected = cost.transformer_training_flops(B, cfg.seq_length, cfg.num_layers, cfg.hidden_size,
                                               cfg.vocab_size, recompute=False)
    # the head is tied, the embedding lookup is no GEMM: the 6 x params x tokens count with
    # the embedding counted once, as the closed form does
    assert matmul_flops == pytest.approx(expected, rel=0.02)


def dense_data_parallel(dp: int, h: int = 64):
    """(graph, stage, plan): the mean of one bias-free Dense (h, h) on 8 x dp rows, data
    parallel over dp devices -- one weight, one gradient all-reduce."""
    net = nn.Dense(h, h, has_bias=False)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net, self.mean = net, ops.ReduceMean()

        def construct(self, x):
            return self.mean(self.net(x))

    g = trace(Loss(), (TensorSpec((8 * dp, h), np.dtype(np.float32)),), {}).graph
    stage = Mesh((dp,), ("devices",))
    return g, stage, plan_shardings(g, "data_parallel", stage, False)


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_optimizer_parallel_splits_states_and_gradients_by_the_data_parallel_degree(dp):
    h = 64
    g, stage, plan = dense_data_parallel(dp, h)
    plain = CostModel(g, stage, load_profile("cpu-2core"), optimizer_states=3).evaluate(plan)
    zero = CostModel(g, stage, load_profile("cpu-2core"), optimizer_states=3, optimizer_parallel=True,
                     optimizer_shard=OptimizerShard(threshold_kb=0)).evaluate(plan)   # these small weights sliced too
    psi = h * h
    # Rajbhandari et al.: plain (2 + 2 + K) psi; the runtime reduce-scatters gradients and keeps
    # states for its slice, so gradients and states are split N ways: ZeRO stage 2's
    # 2 psi + (2 + K) psi / N. Here fp32 weights and gradients (4 + 4 bytes, 2 + 2 over fp16)
    # and 3 fp32 states (K = 12).
    assert plain.param_bytes + plain.grad_bytes + plain.state_bytes == \
        zero_memory_bytes(psi, dp, 0, K=12) + 4 * psi == 20 * psi
    assert zero.param_bytes + zero.grad_bytes + zero.state_bytes == \
        zero_memory_bytes(psi, dp, 2, K=12) + 2 * psi + 2 * psi / dp == 4 * psi + 16 * psi / dp


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_data_parallel_gradient_all_reduce_is_one_ring_all_reduce_per_weight(link_only, dp):
    h = 48
    g = trace(MegatronLayer(h, 1), (TensorSpec((16 * dp, h), np.dtype(np.float32)),), {}).graph
    stage = Mesh((dp,), ("devices",))
    plan = plan_shardings(g, "data_parallel", stage, False)
    got = CostModel(g, stage, link_only).evaluate(plan).comm_s
    weights = (4 * (h * 4 * h) + h) * 4
    norm = 8             # the once-per-step all-reduce of the squared gradient norm (one float64)
    assert got == pytest.approx((weights + norm) * 2 * (dp - 1) / dp / 1e9, rel=1e-12)


def test_a_reshape_is_a_view_and_a_transpose_one_copy():
    """numpy/CuPy reshape a contiguous array in place (a view) and transpose by strides; the
    head merge's reshape after a transpose is where the copy happens, once: the cost model
    charges reshapes no bytes and each transpose one pass in and out."""
    class Heads(nn.Cell):
        def __init__(self):
            super().__init__()
            self.reshape, self.transpose, self.mean = ops.Reshape(), ops.Transpose(), ops.ReduceMean()

        def construct(self, x):                                            # (B, S, H)
            y = self.transpose(self.reshape(x, (4, 8, 2, 16)), (0, 2, 1, 3))   # -> (B, heads, S, D)
            return self.mean(self.reshape(y, (4, 2, 128)))
    g = trace(Heads(), (TensorSpec((4, 8, 32), np.dtype(np.float32)),), {}).graph
    stage = Mesh((1,), ("devices",))
    model = CostModel(g, stage, load_profile("cpu-2core"))
    costs = {n.prim.kind + str(k): c for k, (n, c, _) in enumerate(model.op_costs(plan_shardings(g, "stand_alone",
                                                                                                  stage, True)))}
    moved = {k: c.bytes_moved for k, c in costs.items()}
    assert moved["Reshape0"] == moved["Reshape2"] == 0
    assert moved["Transpose1"] == 2 * 4 * 8 * 32 * 4          # in + out (no parameter: no backward)


def test_on_an_asynchronous_device_an_op_costs_the_longer_of_host_issue_and_device_work():
    """A GPU profile (``op_host_s``) prices each op at max(launches x host issue, work); a
    synchronous one (the CPU's) at work + launches x op_overhead_s. Checked op by op on
    the dense data-parallel graph: the same work either way, only the rule differs."""
    from dataclasses import replace
    g, stage, plan = dense_data_parallel(1, 64)
    base = replace(load_profile("h100-1"), op_host_s={}, op_overhead_s=1e-5)
    work = replace(base, op_overhead_s=0.0)
    slow_host = replace(base, op_host_s={"MatMul": 1.0}, sources={**base.sources, "op_host_s.MatMul": "assumed"})
    fast_host = replace(base, op_host_s={"MatMul": 1e-12}, sources={**base.sources, "op_host_s.MatMul": "assumed"})

    def compute(profile):
        return {n.prim.kind + str(k): c.compute_s
                for k, (n, c, _) in enumerate(CostModel(g, stage, profile).op_costs(plan))}
    pure, summed, slow, fast = compute(work), compute(base), compute(slow_host), compute(fast_host)
    for key, s in pure.items():
        launches = round((summed[key] - s) / 1e-5)
        assert launches in (1, 2)
        if key.startswith("MatMul"):
            assert slow[key] == pytest.approx(launches * 1.0) and fast[key] == pytest.approx(s)
        else:   # no host figure for the kind: op_overhead_s is its host issue
            assert slow[key] == pytest.approx(max(s, launches * 1e-5))


def test_a_plan_on_an_asynchronous_device_takes_the_longer_of_the_host_and_device_sums():
    """Host issue and device work overlap across ops on a GPU: the plan's compute is
    max(sum of host issue, sum of device work), never more than the per-op maxima added up
    (the op search's figure) and never less than either sum; a CPU profile adds per op."""
    from dataclasses import replace

    from autopar.strategy.plan_cost import issued_seconds
    g, stage, plan = dense_data_parallel(1, 256)
    base = load_profile("h100-1")
    gpu = replace(base, op_host_s={"MatMul": 3e-5}, sources={**base.sources, "op_host_s.MatMul": "assumed"})
    model = CostModel(g, stage, gpu)
    costs = [c for _, c, _ in model.op_costs(plan)]
    work, host = sum(c.work_s for c in costs), sum(c.host_s for c in costs)
    assert work > 0 and host > 0
    assert model.evaluate(plan).compute_s == pytest.approx(max(work, host))
    assert max(work, host) <= sum(c.compute_s for c in costs) + 1e-15
    cpu = CostModel(g, stage, load_profile("cpu-2core"))
    cpu_costs = [c for _, c, _ in cpu.op_costs(plan)]
    assert issued_seconds(cpu_costs, cpu.profile)[0] == pytest.approx(sum(c.compute_s for c in cpu_costs))
    assert cpu.evaluate(plan).compute_s == pytest.approx(sum(c.compute_s for c in cpu_costs))


def test_the_stage_planners_parts_on_a_gpu_take_the_longer_of_their_host_and_device_sums():
    """The CLI stage planner prices a model from a first part, one layer and a last part:
    under an asynchronous profile each part's compute and update are the longer of its
    ops' summed host issue and summed device work, as the joint search prices a stage."""
    from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
    from autopar.strategy.pipeline.stage_search import split_parts
    cfg = PanguAlphaConfig(vocab_size=8000, seq_length=1024, hidden_size=1024, num_layers=2, num_heads=16,
                           ffn_hidden_size=4096, compute_dtype="bfloat16", param_dtype="float32")   # 350M's width
    net = PanguAlphaWithLoss(cfg)
    net.set_train(True)
    g = trace(net, (TensorSpec((8, cfg.seq_length + 1), np.dtype(np.int32)),), {}).graph
    stage = Mesh((1,), ("devices",))
    plan = plan_shardings(g, "stand_alone", stage, True)
    gpu = load_profile("h100-1")
    assert gpu.asynchronous
    model = CostModel(g, stage, gpu, True)
    rows = model.op_costs(plan)
    parts = split_parts(model, plan, "blocks.0.", rows=rows)
    groups = [[c for n, c, _ in rows if not n.scope.startswith("blocks.")],
              [c for n, c, _ in rows if n.scope.startswith("blocks.0.") or n.scope == "blocks.0"]]
    first_and_last = parts[0].compute_s + parts[2].compute_s
    assert parts[1].compute_s == pytest.approx(max(sum(c.work_s for c in groups[1]), sum(c.host_s for c in groups[1])))
    assert parts[1].update_s == pytest.approx(max(sum(c.update_work_s for c in groups[1]),
                                                  sum(c.update_host_s for c in groups[1])))
    assert parts[1].compute_s < 0.97 * sum(c.compute_s for c in groups[1])   # per-op maxima overcount here
    assert first_and_last <= sum(c.compute_s for c in groups[0]) + 1e-15


def test_a_kinds_fixed_device_cost_is_charged_per_instruction():
    """``op_device_s`` adds its seconds to an op's device work once per instruction it runs
    (forward and backward: two), on top of its bytes at the kind's rate."""
    from dataclasses import replace
    g, stage, plan = dense_data_parallel(1, 64)
    base = replace(load_profile("h100-1"), op_device_s={})
    fixed = replace(base, op_device_s={"MatMul": 1e-3}, sources={**base.sources, "op_device_s.MatMul": "assumed"})
    plain = {n.id: c for n, c, _ in CostModel(g, stage, base).op_costs(plan)}
    more = {n.id: (n, c) for n, c, _ in CostModel(g, stage, fixed).op_costs(plan)}
    matmuls = [(plain[i], c) for i, (n, c) in more.items() if n.prim.kind == "MatMul"]
    assert matmuls
    for before, after in matmuls:
        assert after.work_s - before.work_s == pytest.approx(2e-3)
    assert all(plain[i].work_s == c.work_s for i, (n, c) in more.items() if n.prim.kind != "MatMul")


def test_a_kernel_takes_the_longer_of_its_flops_and_its_bytes_not_their_sum():
    """A roofline on a GPU (``kernel_overlap`` 1): a GEMM computes while it streams its
    operands, so its device time is max(flops / GEMM rate, bytes / bandwidth) -- the GEMM
    efficiency curves already hold skinny GEMMs' memory-bound time, and adding the bytes
    again put the H100 steps 10-11% over their measured device time. A CPU profile (0) adds
    them, as its 61 measured plans agree with; a fraction hides that share of the shorter."""
    from dataclasses import replace
    g, stage, plan = dense_data_parallel(1, 256)
    gpu = replace(load_profile("h100-1"), gemm_efficiency={}, op_device_s={})
    assert gpu.kernel_overlap == 1.0
    for prof, combine in ((gpu, max), (replace(gpu, kernel_overlap=0.0), lambda a, b: a + b),
                          (replace(gpu, kernel_overlap=0.5), lambda a, b: a + b - 0.5 * min(a, b))):
        seen = 0
        for n, c, _ in CostModel(g, stage, prof).op_costs(plan):
            if n.prim.kind != "MatMul":
                continue
            flops_s = c.flops / prof.gemm_flops[np.dtype(g.spec(n.outputs[0]).dtype).name]
            bytes_s = c.bytes_moved / prof.op_rate("MatMul")
            assert c.work_s == pytest.approx(combine(flops_s, bytes_s))
            seen += 1
        assert seen
    assert load_profile("cpu-2core").kernel_overlap == 0.0      # a CPU adds them (module doc of profile)

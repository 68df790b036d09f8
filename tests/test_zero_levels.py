"""MindSpore's ``parallel_optimizer_config`` on in-process ranks: the three optimizer levels
(ZeRO-1/2/3) and ``optimizer_weight_shard_size`` train PanGu-α tiny like serial, and the
weight / gradient / optimizer-state bytes each rank holds (measured by the memory meter
and the optimizer's arrays) are what the ZeRO formulas say; plus ``gradients_mean``."""
import dataclasses

import numpy as np
import pytest
from test_optimizer_parallel import BATCHES, CONFIG, RTOL, WEIGHT_ATOL, serial, train_steps

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaWithLoss
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.optimizer_shard import OptimizerShard
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings
from autopar.train import SGD, AdamWeightDecay

N = 4                     # data-parallel ranks
PARAMS = sum(int(np.prod(p.shape)) for p in PanguAlphaWithLoss(CONFIG).trainable_params())   # Ψ
LEVEL = {1: "level1", 2: "level2", 3: "level3"}


def zero_context(level=None, shard_size=-1, **extra):
    """dp4 with optimizer parallel at ``level`` (None: off), every weight sliced (threshold 0)."""
    extra = {"parallel_mode": "data_parallel", **extra}
    if level is None:
        return parallel_context(device_num=N, **extra)
    return parallel_context(device_num=N, enable_parallel_optimizer=True,
                            parallel_optimizer_config={"optimizer_level": LEVEL[level],
                                                       "optimizer_weight_shard_size": shard_size,
                                                       "parallel_optimizer_threshold": 0}, **extra)


def train_dp(level=None, shard_size=-1, steps=3, micro=1, batches=BATCHES):
    """Three AdamW steps on N ranks (each fed its rows); per rank: losses, whole weights,
    the memory report of the last step and the step's collective counts."""
    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=N))
            cell = net if micro == 1 else nn.GradAccumulationCell(net, micro)
            opt = AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.01)
            train = nn.TrainOneStepCell(cell, opt, clip_norm=0.5).measure_memory()
            losses = []
            for k in range(steps):
                comm.stats.reset()
                losses.append(float(train(np.split(batches[k], N)[comm.rank])))
            stats = comm.stats.snapshot()
            return {"losses": losses, "weights": {p.name: p.asnumpy() for p in net.trainable_params()},
                    "memory": train.memory_report(), "count": stats["count"], "bytes": stats["bytes"]}
    with zero_context(level, shard_size):
        return run_in_process(N, body)


@pytest.fixture(scope="module")
def runs():
    return {level: train_dp(level) for level in (None, 1, 2, 3)}


@pytest.mark.parametrize("level", [1, 2, 3])
def test_every_level_trains_like_serial(runs, level):
    want = serial("adamw")
    for r in runs[level]:
        np.testing.assert_allclose(r["losses"], want["losses"], rtol=RTOL)
        for name, w in want["weights"].items():
            np.testing.assert_allclose(r["weights"][name], w, rtol=RTOL, atol=WEIGHT_ATOL["adamw"], err_msg=name)


def test_bytes_per_rank_follow_the_zero_formulas(runs):
    """float32 AdamW: 4 bytes of weight, 4 of gradient, 8 of states per element (Ψ of them).
    Without accumulation the step's gradient is reduce-scattered at once, so level1 holds
    the slice too; level3 keeps only weight slices."""
    psi = PARAMS
    want = {None: (4 * psi, 4 * psi, 8 * psi),
            1: (4 * psi, 4 * psi // N, 8 * psi // N),
            2: (4 * psi, 4 * psi // N, 8 * psi // N),
            3: (4 * psi // N, 4 * psi // N, 8 * psi // N)}
    for level, res in runs.items():
        for r in res:
            m = r["memory"]
            assert (m["parameters"], m["gradients"], m["optimizer_states"]) == want[level], level


def test_level3_gathers_weights_where_they_are_used_instead_of_after_the_update(runs):
    """level2 all-gathers each new weight once after the update; level3 gathers before each
    use instead (forward, and the backward matmuls again), moving more bytes for less memory."""
    two, three = runs[2][0], runs[3][0]
    assert two["count"]["allgather"] > 0 and three["count"]["allgather"] > two["count"]["allgather"]
    assert three["bytes"]["allgather"] > two["bytes"]["allgather"]
    assert three["count"]["reduce_scatter"] == two["count"]["reduce_scatter"]   # gradients alike
    # and the transient gathered weights come back in the activations, not the parameters
    assert three["memory"]["activations_peak"] > two["memory"]["activations_peak"]


def test_gradient_accumulation_level1_accumulates_whole_level2_slices():
    """GradAccumulationCell(net, 2): level1 adds micro-batch gradients whole and
    reduce-scatters once per step (ZeRO-1: 4Ψ of gradients); level2 reduce-scatters each
    micro-batch's and adds the slices (ZeRO-2: 4Ψ/N), twice the reduce-scatters."""
    eights = [np.concatenate(BATCHES[k:k + 2]) for k in (0, 2)]      # 8 rows: 2 per rank, 1 per micro-batch
    want = train_steps(PanguAlphaWithLoss(CONFIG), "adamw", eights)
    one, two = (train_dp(level, steps=2, micro=2, batches=eights) for level in (1, 2))
    for r1, r2 in zip(one, two):
        np.testing.assert_allclose(r1["losses"], want["losses"], rtol=RTOL)
        np.testing.assert_allclose(r2["losses"], want["losses"], rtol=RTOL)
        for name, w in want["weights"].items():
            np.testing.assert_allclose(r2["weights"][name], w, rtol=RTOL, atol=WEIGHT_ATOL["adamw"], err_msg=name)
        assert r1["memory"]["gradients"] == 4 * PARAMS
        assert r2["memory"]["gradients"] == 4 * PARAMS // N
        assert r1["memory"]["optimizer_states"] == r2["memory"]["optimizer_states"] == 8 * PARAMS // N
        assert r2["count"]["reduce_scatter"] == 2 * r1["count"]["reduce_scatter"]


def test_level3_weights_serve_evaluation_too():
    """After level3 training (semi_auto_parallel, dp4 shards), calling the network -- a
    sharded forward program -- gathers the held slices where it uses them as well: the
    evaluation loss equals the serially trained model's, and the weights stay slices."""
    ref = PanguAlphaWithLoss(CONFIG)
    train = nn.TrainOneStepCell(ref, AdamWeightDecay(ref.trainable_params(), 1e-2, weight_decay=0.01))
    for k in range(2):
        train(BATCHES[k])
    want = float(ref.set_train(False)(BATCHES[3]))

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=N))
            train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.01))
            for k in range(2):
                train(BATCHES[k])
            loss = float(net.set_train(False)(BATCHES[3]))
            return loss, [p._shard[0].shape for p in net.trainable_params()]
    with zero_context(3, parallel_mode="semi_auto_parallel", full_batch=True):
        res = run_in_process(N, body)
    whole = sum(int(np.prod(p.shape)) for p in ref.trainable_params())
    for loss, held in res:
        np.testing.assert_allclose(loss, want, rtol=RTOL)
        assert sum(int(np.prod(h)) for h in held) * N == whole      # still slices, none gathered for good


# ---- optimizer_weight_shard_size --------------------------------------------------------------

def test_shard_size_two_slices_over_pairs_and_all_reduces_across_them():
    """dp4, shard size 2: states fall by 2, not 4; each gradient is reduce-scattered inside
    a pair of consecutive ranks and all-reduced across the two pairs; training equals serial."""
    want = serial("adamw")
    res = train_dp(2, shard_size=2)
    full = train_dp(2)
    for r, f in zip(res, full):
        np.testing.assert_allclose(r["losses"], want["losses"], rtol=RTOL)
        for name, w in want["weights"].items():
            np.testing.assert_allclose(r["weights"][name], w, rtol=RTOL, atol=WEIGHT_ATOL["adamw"], err_msg=name)
        assert r["memory"]["optimizer_states"] == 8 * PARAMS // 2
        assert r["memory"]["gradients"] == 4 * PARAMS // 2
        # each rank all-gathers a slice twice as large (over its pair) ...
        assert r["bytes"]["allgather"] == 2 * f["bytes"]["allgather"]
        # ... and every reduce-scattered gradient is also all-reduced across the pairs
        assert r["count"]["reduce_scatter"] == f["count"]["reduce_scatter"]
        assert r["count"]["allreduce"] - f["count"]["allreduce"] == f["count"]["reduce_scatter"]


def test_a_shard_size_the_replicas_do_not_split_into_names_the_weight():
    with pytest.raises(ValueError, match=r"optimizer_weight_shard_size.*replicas of '[\w.]+' \(4"):
        train_dp(2, shard_size=3, steps=1)


# ---- errors and the context value ----------------------------------------------------------------

def test_level3_under_gradient_accumulation_is_refused_at_compile():
    with pytest.raises(ValueError, match=r"optimizer_level.*'level3'.*use level2"):
        train_dp(3, steps=1, micro=2, batches=[np.concatenate(BATCHES[:2])])


@pytest.mark.parametrize("config, match", [
    ({"optimizer_level": "level4"}, r"optimizer_level: expected one of \('level1', 'level2', 'level3'\)"),
    ({"optimizer_weight_shard_size": 1}, r"optimizer_weight_shard_size: expected -1 \(every replica\) or an int > 1"),
    ({"gradient_accumulation_shard": 1}, r"gradient_accumulation_shard: expected True or False"),
    ({"optimizer_level": "level2", "shard": 2}, r"key: expected one of"),
    ("level2", r"value: expected a dict like"),
])
def test_bad_parallel_optimizer_config_is_named(config, match):
    with pytest.raises(ValueError, match="parallel_optimizer_config: " + match):
        ParallelContext(parallel_optimizer_config=config)


def test_the_threshold_in_the_dict_is_the_context_key():
    ctx = ParallelContext(parallel_optimizer_config={"parallel_optimizer_threshold": 8})
    assert ctx.parallel_optimizer_threshold == 8
    assert ctx.parallel_optimizer_config.shards_accumulation is False
    assert ctx.replace(parallel_optimizer_config={"gradient_accumulation_shard": True}) \
        .parallel_optimizer_config.shards_accumulation
    with pytest.raises(ValueError, match="a parallel_optimizer_threshold equal to the key's \\(16\\)"):
        ParallelContext(parallel_optimizer_threshold=16, explicit={"parallel_optimizer_threshold"},
                        parallel_optimizer_config={"parallel_optimizer_threshold": 8})


# ---- gradients_mean ---------------------------------------------------------------------------------

def sgd_grads(mode: str, n: int, mp: int = 1, **ctx):
    """The gradients SGD receives on rank 0 of ``n`` ranks (whole), one step."""
    full = mode != "data_parallel"

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=n // mp, model_parallel=mp))
            opt = SGD(net.trainable_params(), 0.1)
            got = []
            update = opt.step
            opt.step = lambda grads: (got.extend(g.copy() for g in grads), update(grads))
            train = nn.TrainOneStepCell(net, opt)
            prog = train.build(BATCHES[0] if full else np.split(BATCHES[0], n)[comm.rank])
            train(BATCHES[0] if full else np.split(BATCHES[0], n)[comm.rank])
            whole = prog.gathered(got)
            copies = [int(np.prod([s.layout.mesh.shape[a] for a in s.layout.replicated_axes()]))
                      for s in prog.param_shards]
            return dict(zip([p.name for p in net.trainable_params()], whole)), copies
    with parallel_context(parallel_mode=mode, device_num=n, full_batch=full, **ctx):
        return run_in_process(n, body)[0]


@pytest.fixture(scope="module")
def serial_grads():
    """The serial step's gradients (dropout on, as in the trainer)."""
    net = PanguAlphaWithLoss(CONFIG)
    opt = SGD(net.trainable_params(), 0.1)
    got = []
    update = opt.step
    opt.step = lambda grads: (got.extend(g.copy() for g in grads), update(grads))
    nn.TrainOneStepCell(net, opt)(BATCHES[0])
    return dict(zip([p.name for p in net.trainable_params()], got))


@pytest.mark.parametrize("mean, factor", [(None, 1.0), (True, 1.0), (False, 2.0)])
def test_gradients_mean_under_data_parallel(serial_grads, mean, factor):
    """MindSpore's data_parallel sums the ranks' gradients of their own mean losses (N times
    the global batch's) unless ``gradients_mean=True``; left unset, autopar gives the serial one."""
    grads, _ = sgd_grads("data_parallel", 2, **({} if mean is None else {"gradients_mean": mean}))
    scale = max(np.abs(g).max() for g in serial_grads.values())     # a bias's gradient is ~0 up to rounding
    for name, g in serial_grads.items():
        np.testing.assert_allclose(grads[name], factor * g, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def test_gradients_mean_under_semi_auto_divides_by_the_mirror_group(serial_grads):
    """semi_auto_parallel's loss is the global batch's already; ``gradients_mean=True`` divides
    each weight's gradient by the ranks holding the same block (2 for an mp-split weight on
    dp2 x mp2, 4 for a LayerNorm gain)."""
    grads, copies = sgd_grads("semi_auto_parallel", 4, mp=2, gradients_mean=True)
    assert set(copies) == {2, 4}
    scale = max(np.abs(g).max() for g in serial_grads.values())
    for (name, g), c in zip(serial_grads.items(), copies):
        np.testing.assert_allclose(grads[name], g / c, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


# ---- the cost model prices the levels ---------------------------------------------------------

@pytest.fixture(scope="module")
def priced():
    """Per level, the cost model's prediction for the dp4 plan the runs above used."""
    graph = trace(PanguAlphaWithLoss(CONFIG.replace(data_parallel=N)), (BATCHES[0],), {}).graph
    stage = Mesh((N,), ("devices",))
    plan = plan_shardings(graph, "data_parallel", stage, False)
    return {level: CostModel(graph, stage, load_profile("cpu-2core"), False, optimizer_parallel=True,
                             optimizer_shard=OptimizerShard(LEVEL[level], threshold_kb=0)).evaluate(plan)
            for level in (1, 2, 3)}


@pytest.mark.parametrize("level", [1, 2, 3])
def test_the_cost_model_predicts_the_measured_bytes_of_each_level(runs, priced, level):
    m = runs[level][0]["memory"]
    cost = priced[level]
    assert (cost.param_bytes, cost.grad_bytes, cost.state_bytes) == (m["parameters"], m["gradients"],
                                                                     m["optimizer_states"])


def test_the_cost_model_charges_level3_one_weight_all_gather_more(priced):
    assert priced[2].comm_s == priced[1].comm_s
    assert priced[3].comm_s > priced[2].comm_s


def test_the_weight_all_gathers_after_the_update_pay_latency_not_waiting():
    """Back to back after the optimizer step no rank waits for another: with a calibrated
    per-call wait, optimizer parallel costs one latency per sliced weight over plain DP --
    not a latency and a wait (what over-priced ZeRO by 70% on the 16-core run)."""
    graph = trace(PanguAlphaWithLoss(CONFIG.replace(data_parallel=N)), (BATCHES[0],), {}).graph
    stage = Mesh((N,), ("devices",))
    plan = plan_shardings(graph, "data_parallel", stage, False)
    profile = dataclasses.replace(load_profile("cpu-2core"), collective_wait_s=3e-4)
    plain = CostModel(graph, stage, profile, False).evaluate(plan)
    zero = CostModel(graph, stage, profile, False, optimizer_parallel=True,
                     optimizer_shard=OptimizerShard(threshold_kb=0)).evaluate(plan)
    weights = len(graph.params)                      # every weight of tiny is replicated over dp4, all sliced
    assert zero.comm_s - plain.comm_s == pytest.approx(weights * profile.intra_node_latency_s, rel=1e-9)

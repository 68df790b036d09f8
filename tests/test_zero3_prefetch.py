"""ZeRO-3 weight prefetch (``parallel_optimizer_config={"optimizer_level": "level3",
"prefetch_layers": k}``, autopar/runtime/prefetch.py) on in-process ranks: PanGu-α tiny
trains the same with prefetch on and off, and like serial (dp2, dp4); the local program
really starts each weight's all-gather a layer ahead and waits right before its use (and
keeps the old blocking order with prefetch off); bad values are named; the cost model
hides the prefetched gathers behind compute as far as the profile overlaps, never below
the first weight's gather."""
import dataclasses

import numpy as np
import pytest
from test_optimizer_parallel import BATCHES, CONFIG, GRAD_ATOL, RTOL, WEIGHT_ATOL, serial, train_steps

from autopar.comm import run_in_process
from autopar.context import ParallelContext, bound_world, get_auto_parallel_context, parallel_context
from autopar.ir.graph import FORWARD
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaWithLoss
from autopar.runtime.fusion import BucketStart, BucketWait, Progress
from autopar.runtime.prefetch import GatherStart, GatherWait, layer_of, prefetchable
from autopar.runtime.spmd import Redistribute
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.optimizer_shard import OptimizerShard
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings

INSERTED = (Redistribute, GatherStart, GatherWait, Progress, BucketStart, BucketWait)   # not compute


def zero3(n: int, ahead: int | None, **extra):
    config = {"optimizer_level": "level3", "parallel_optimizer_threshold": 0}
    if ahead is not None:
        config["prefetch_layers"] = ahead
    return parallel_context(parallel_mode="data_parallel", device_num=n, enable_parallel_optimizer=True,
                            parallel_optimizer_config=config, **extra)


def run(n: int, ahead: int | None, **extra):
    """Three AdamWeightDecay steps on n ranks, each fed its rows: per rank the losses,
    gradients of the last step (whole), weights, collective counts of step 1, and the
    training program (rank 0's local graph is read by the order tests)."""
    def body(comm):
        with bound_world(comm):
            out = train_steps(PanguAlphaWithLoss(CONFIG.replace(data_parallel=n)), "adamw", BATCHES[:3], comm,
                              full=False)
            out.pop("train")
            return out
    with zero3(n, ahead, **extra):
        return run_in_process(n, body)


@pytest.fixture(scope="module")
def dp2():
    return {ahead: run(2, ahead) for ahead in (0, None)}      # None: the default (1 layer ahead)


# ---- (a) the same training, prefetched or not, and serial --------------------------------------

def _check_runs(off, on):
    want = serial("adamw")
    grad_scale = max(np.abs(g).max() for g in want["grads"].values())
    for a, b in zip(off, on):
        assert b["losses"] == a["losses"]                         # bit for bit: the same gathers, earlier
        for name in want["grads"]:
            np.testing.assert_array_equal(b["grads"][name], a["grads"][name], err_msg=name)
            np.testing.assert_array_equal(b["weights"][name], a["weights"][name], err_msg=name)
        assert b["stats"]["count"] == a["stats"]["count"] and b["stats"]["bytes"] == a["stats"]["bytes"]
        np.testing.assert_allclose(b["losses"], want["losses"], rtol=RTOL)
        for name, g in want["grads"].items():
            np.testing.assert_allclose(b["grads"][name], g, rtol=RTOL, atol=GRAD_ATOL["adamw"] * grad_scale,
                                       err_msg=name)
        for name, w in want["weights"].items():
            np.testing.assert_allclose(b["weights"][name], w, rtol=RTOL, atol=WEIGHT_ATOL["adamw"], err_msg=name)
    assert len(on[0]["prog"].prefetch.gathers) > 0 and off[0]["prog"].prefetch.gathers == ()


def test_dp2_prefetched_equals_blocking_and_serial(dp2):
    _check_runs(dp2[0], dp2[None])


def test_dp4_prefetched_equals_blocking_and_serial():
    _check_runs(run(4, 0), run(4, 2))          # two layers ahead: more gathers in flight at once


# ---- (b) the order really changes ----------------------------------------------------------------

def _first_compute(nodes, prefix: str, forward: bool) -> int:
    return next(n.id for n in nodes if n.scope.startswith(prefix) and not isinstance(n.prim, INSERTED)
                and (n.phase == FORWARD) == forward)


def test_each_gather_starts_a_layer_ahead_and_is_waited_right_before_its_use(dp2):
    graph, prefetch = dp2[None][0]["prog"].local_graph, dp2[None][0]["prog"].prefetch
    nodes = graph.nodes
    blocking = [n for n in dp2[0][0]["prog"].local_graph.nodes if prefetchable(n, set(graph.params))]
    assert not any(prefetchable(n, set(graph.params)) for n in nodes)     # no blocking weight gather is left
    starts = [n for n in nodes if isinstance(n.prim, GatherStart)]
    assert len(starts) == len(prefetch.gathers) == len(blocking)        # every one of them moved
    # each weight is gathered once for forward (the word table's serves the head too), and the
    # weights a VJP reads (matmul weights, LayerNorm gains, the word table) again for backward
    assert sum(n.phase == FORWARD for n in blocking) == len(graph.params) == 53
    assert sum(n.phase != FORWARD for n in blocking) == 26
    checked = 0
    for weight, start, wait in prefetch.gathers:
        assert isinstance(nodes[start].prim, GatherStart) and isinstance(nodes[wait].prim, GatherWait)
        assert nodes[start].inputs == (weight,) and start < wait
        between = [n for n in nodes[start + 1:wait] if not isinstance(n.prim, INSERTED)]
        user = next(n for n in nodes[wait + 1:] if nodes[wait].outputs[0] in n.inputs)
        assert all(isinstance(n.prim, (GatherWait, Progress)) for n in nodes[wait + 1:user.id])   # waited right before
        layer = layer_of(user.scope)
        if layer.startswith("blocks."):
            k = int(layer.split(".")[1])
            before = f"blocks.{k - 1}." if user.phase == FORWARD else f"blocks.{k + 1}."   # backward runs k+1 first
            if (k > 0) if user.phase == FORWARD else (k + 2 < CONFIG.num_layers):     # the last layer: query_layer
                assert start < _first_compute(nodes, before, user.phase == FORWARD), (user.name, before)
                assert len(between) > 10           # the whole previous layer computes while it gathers
                checked += 1
        if weight != graph.params[0] or user.phase != FORWARD:   # the first weight has nothing before it
            assert between, user.name
    assert checked == 16 + 8       # blocks.1's 16 weights in forward, blocks.0's 8 matmul weights and gains in backward
    # a Progress node follows every instruction while a gather is in flight (MPI moves it only inside calls)
    for _, start, wait in prefetch.gathers:
        for n in nodes[start + 1:wait]:
            if not isinstance(n.prim, (Progress, GatherStart, GatherWait)):
                assert isinstance(nodes[n.id + 1].prim, Progress) or isinstance(nodes[n.id + 1].prim, GatherWait)


def test_prefetch_off_keeps_the_blocking_gathers_right_before_their_use(dp2):
    nodes = dp2[0][0]["prog"].local_graph.nodes
    params = set(dp2[0][0]["prog"].local_graph.params)
    assert not any(isinstance(n.prim, (GatherStart, GatherWait, Progress)) for n in nodes)
    gathers = [n for n in nodes if prefetchable(n, params)]
    assert len(gathers) > 60
    for g in gathers:      # only other gathers of the same reader lie between a gather and its first reader
        user = next(n for n in nodes[g.id + 1:] if g.outputs[0] in n.inputs)
        assert all(isinstance(n.prim, Redistribute) and n.scope == user.scope for n in nodes[g.id + 1:user.id])


def test_prefetch_with_gradient_buckets_threads_one_progress_chain():
    """With comm_fusion's reduce-scatter buckets in backward too, every handle in flight
    (buckets and gathers) passes through the same Progress nodes to its wait; training is
    unchanged."""
    fused = {"comm_fusion": {"reducescatter": {"mode": "size", "config": 1}}}
    on, off = run(2, 1, **fused), run(2, 0, **fused)
    assert on[0]["losses"] == off[0]["losses"]
    for name in on[0]["grads"]:
        np.testing.assert_array_equal(on[0]["grads"][name], off[0]["grads"][name], err_msg=name)
    nodes = on[0]["prog"].local_graph.nodes
    made = {o: n for n in nodes for o in n.outputs}
    waits = [n for n in nodes if isinstance(n.prim, (GatherWait, BucketWait))]
    assert any(isinstance(n.prim, BucketWait) for n in waits) and any(isinstance(n.prim, GatherWait) for n in waits)
    for w in waits:        # each wait's handle comes from a Progress right before it, or its start
        src = made[w.inputs[0]]
        assert isinstance(src.prim, (Progress, GatherStart, BucketStart))
    assert not any(isinstance(made[v].prim, Progress) and len(made[v].outputs) != len(made[v].inputs)
                   for n in nodes for v in n.inputs if v in made)


# ---- (c) bad values are named ----------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [(-1, "-1"), (1.5, "1.5"), (True, "True"), ("1", "'1'")])
def test_a_bad_prefetch_layers_names_the_key_the_expected_and_the_actual(value, shown):
    with pytest.raises(ValueError, match=r"parallel_optimizer_config: prefetch_layers: expected an int >= 0 "
                                         r"\(layers ahead .*\), got " + shown):
        ParallelContext(parallel_optimizer_config={"optimizer_level": "level3", "prefetch_layers": value})


def test_a_misspelled_prefetch_key_lists_the_keys():
    with pytest.raises(ValueError, match=r"parallel_optimizer_config: key: expected one of \(.*'prefetch_layers'\), "
                                         r"got 'prefetch'"):
        ParallelContext(parallel_optimizer_config={"optimizer_level": "level3", "prefetch": 2})


def test_the_key_defaults_to_one_layer_and_reads_back_when_set():
    assert ParallelContext().parallel_optimizer_config.prefetch_layers == 1
    with zero3(2, 3):
        assert get_auto_parallel_context("parallel_optimizer_config")["prefetch_layers"] == 3
    with zero3(2, None):
        assert "prefetch_layers" not in get_auto_parallel_context("parallel_optimizer_config")


# ---- the cost model ---------------------------------------------------------------------------------

N = 4


@pytest.fixture(scope="module")
def tiny_plan():
    graph = trace(PanguAlphaWithLoss(CONFIG.replace(data_parallel=N)), (BATCHES[0],), {}).graph
    stage = Mesh((N,), ("devices",))
    return graph, stage, plan_shardings(graph, "data_parallel", stage, False)


def priced(tiny_plan, ahead: int, overlap: float, **profile):
    graph, stage, plan = tiny_plan
    prof = dataclasses.replace(load_profile("cpu-2core"), comm_overlap=overlap, **profile)
    model = CostModel(graph, stage, prof, False, optimizer_parallel=True,
                      optimizer_shard=OptimizerShard("level3", threshold_kb=0, prefetch_layers=ahead))
    return model, model.evaluate(plan)


@pytest.mark.parametrize("overlap", [1.0, 0.5])
def test_priced_exposed_gathers_fall_with_prefetch_but_not_below_the_first_weight(tiny_plan, overlap):
    model, off = priced(tiny_plan, 0, overlap)
    _, on = priced(tiny_plan, 1, overlap)
    graph, stage, _ = tiny_plan
    # by hand: one all-gather of each weight's bytes over dp4; the word table (96 x 32) is used first
    total = sum(model.collective_seconds("all_gather", int(np.prod(graph.spec(v).shape)) * 4, stage, (0,))
                for v in graph.params)
    first = model.collective_seconds("all_gather", CONFIG.vocab_size * CONFIG.hidden_size * 4, stage, (0,))
    assert off.gather_comm_s == pytest.approx(total, rel=1e-12) and off.gather_exposed_s == off.gather_comm_s
    assert on.gather_comm_s == off.gather_comm_s
    assert on.compute_s > total        # tiny's step computes longer than it gathers: all but the first hides
    assert on.gather_exposed_s == pytest.approx(total - overlap * (total - first), rel=1e-12)
    assert first <= on.gather_exposed_s < off.gather_exposed_s
    assert on.comm_s == pytest.approx(off.comm_s - (off.gather_exposed_s - on.gather_exposed_s), rel=1e-12)
    assert on.compute_s == off.compute_s and on.memory_bytes == off.memory_bytes


def test_priced_gathers_hide_only_behind_compute_and_not_without_overlap(tiny_plan):
    _, none = priced(tiny_plan, 1, 0.0)            # the shipped CPU profile: nothing overlaps
    assert none.gather_exposed_s == none.gather_comm_s > 0
    slow = dict(intra_node_latency_s=1.0, inter_node_latency_s=1.0)     # gathers far longer than the compute
    _, on = priced(tiny_plan, 1, 1.0, **slow)
    _, off = priced(tiny_plan, 0, 1.0, **slow)
    assert on.gather_comm_s > on.compute_s
    assert on.gather_exposed_s == pytest.approx(off.gather_exposed_s - on.compute_s, rel=1e-9)
    assert on.gather_exposed_s > 0

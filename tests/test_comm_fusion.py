"""Gradient fusion and overlap (comm_fusion): bucket plans, the context key, the in-process
non-blocking all-reduce, and fused == unfused PanGu-α tiny bit for bit with fewer collectives."""
import numpy as np
import pytest

from autopar import nn
from autopar.comm import DeadlockError, run_in_process
from autopar.comm import redistribution as rd
from autopar.comm.checks import CollectiveMismatchError
from autopar.comm.fusion import MB, CommFusion, Fusible, FusionRule, plan_buckets
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.fusion import BucketStart, BucketWait, Progress, finish_bucket, start_bucket
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
AUTO = {"allreduce": {"mode": "auto"}}


# ---- bucket plans ------------------------------------------------------------------------

def items(sizes_mb, params=None, groups=None):
    params = params if params is not None else range(len(sizes_mb))
    groups = groups if groups is not None else ["g"] * len(sizes_mb)
    return [Fusible(p, int(s * MB), g) for s, p, g in zip(sizes_mb, params, groups)]


def test_size_mode_fills_buckets_in_the_order_gradients_are_made():
    # the docstring's worked example: g5 .4, g4 .4, g3 .5, g2 2, g1 .1 under 1 MB
    got = plan_buckets(items([0.4, 0.4, 0.5, 2, 0.1], params=[5, 4, 3, 2, 1]), FusionRule("size", 1), 6)
    assert got == [[0, 1], [2], [3], [4]]


def test_auto_mode_is_64_mb_buckets():
    assert plan_buckets(items([1] * 64 + [1]), FusionRule("auto"), 65) == [list(range(64)), [64]]
    assert plan_buckets(items([40, 30, 20]), FusionRule("auto"), 3) == [[0], [1, 2]]


def test_index_mode_splits_by_parameter_index_whatever_the_order():
    # made last parameter first (a backward pass): params 5..0; splits at 2 and 4
    got = plan_buckets(items([1] * 6, params=[5, 4, 3, 2, 1, 0]), FusionRule("index", (2, 4)), 6)
    assert got == [[0, 1], [2, 3], [4, 5]]          # {5, 4}, {3, 2}, {1, 0}, ready in that order


def test_buckets_never_mix_groups_and_none_is_one_each():
    got = plan_buckets(items([1, 1, 1, 1], groups=["dp", "mp", "dp", "mp"]), FusionRule("auto"), 4)
    assert got == [[0, 2], [1, 3]]
    assert plan_buckets(items([1, 1, 1]), None, 3) == [[0], [1], [2]]


def test_index_past_the_last_parameter_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"comm_fusion\['allreduce'\].*below the number of trained parameters \(6\)"):
        plan_buckets(items([1] * 6), FusionRule("index", (2, 6)), 6)


# ---- the context key -----------------------------------------------------------------------

def test_context_holds_a_validated_value_and_gives_back_mindspore_dicts():
    ctx = ParallelContext(comm_fusion={"allreduce": {"mode": "size", "config": 32}})
    assert ctx.comm_fusion == CommFusion(allreduce=FusionRule("size", 32))
    assert ctx.comm_fusion.rule("allreduce").bucket_bytes == 32 * MB
    assert ctx.as_dict()["comm_fusion"] == {"allreduce": {"mode": "size", "config": 32}}
    assert ParallelContext().comm_fusion.rule("allreduce") is None                    # default: nothing fused
    off = ParallelContext(comm_fusion={"openstate": False, "allreduce": {"mode": "auto"}})
    assert off.comm_fusion.rule("allreduce") is None
    assert hash(ctx) != hash(ParallelContext())                                      # the compile cache keys on it


@pytest.mark.parametrize("value, message", [
    ("auto", r"comm_fusion: expected a dict"),
    ({"allreduc": {"mode": "auto"}},
     r"key: expected one of \('openstate', 'allreduce', 'reducescatter', 'allgather'\), got 'allreduc'"),
    ({"allgather": {"mode": "index", "config": [3]}}, r"\['allgather'\].*'mode': expected one of \('auto', 'size'\)"),
    ({"openstate": 1}, r"'openstate': expected True or False"),
    ({"allreduce": "auto"}, r"\['allreduce'\]: allreduce: expected a dict with 'mode'"),
    ({"allreduce": {"mode": "fast"}}, r"'mode': expected one of \('auto', 'size', 'index'\), got 'fast'"),
    ({"allreduce": {"mode": "size", "config": 0}}, r"'config': expected a bucket size in MB > 0"),
    ({"allreduce": {"mode": "size"}}, r"'config': expected a bucket size in MB > 0 .*got None"),
    ({"allreduce": {"mode": "auto", "config": 32}}, r"use mode 'size' to choose the bucket size"),
    ({"allreduce": {"mode": "index", "config": [35, 20]}}, r"increasing parameter indices >= 1"),
    ({"allreduce": {"mode": "index", "config": [0, 20]}}, r"increasing parameter indices >= 1"),
    ({"allreduce": {"mode": "size", "config": 32, "extra": 1}}, r"expected a dict with 'mode'"),
])
def test_context_refuses_a_bad_comm_fusion_naming_the_key(value, message):
    with pytest.raises(ValueError, match=r"ParallelContext\.comm_fusion.*" + message):
        ParallelContext(comm_fusion=value)


def test_a_reduce_scatter_bucket_equals_each_gradient_reduce_scattered_along_its_own_axis():
    shapes, dims = [(6, 4), (2, 9, 3), (5, 3, 6)], (0, 1, 2)     # every axis a bucket may split along

    def body(comm):
        rng = np.random.default_rng(comm.rank)
        grads = [rng.standard_normal(s) for s in shapes]
        mine = [g.shape[:d] + (g.shape[d] // comm.size,) + g.shape[d + 1:] for g, d in zip(grads, dims)]
        got = finish_bucket(start_bucket(comm, grads, rd.REDUCE_SCATTER, dims), mine)
        return got, [comm.reduce_scatter(g, axis=d) for g, d in zip(grads, dims)]
    for got, want in run_in_process(3, body):
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.array_equal(a, b)


# ---- the in-process non-blocking all-reduce ----------------------------------------------

def test_iallreduce_equals_allreduce_waited_in_any_order_among_blocking_calls():
    def body(comm):
        x = np.arange(12.0).reshape(3, 4) * (comm.rank + 1) + 0.1
        first, second = comm.iallreduce(x), comm.iallreduce(-x, op="max")
        blocking = comm.allreduce(x)                       # a blocking call while both are in flight
        return second.wait(), first.wait(), blocking, comm.allreduce(-x, op="max"), comm.stats.snapshot()
    for late_max, summed, blocking, want_max, stats in run_in_process(3, body):
        assert np.array_equal(summed, blocking) and np.array_equal(late_max, want_max)
        assert stats["count"] == {"allreduce": 4}         # counted like the blocking calls


def test_iallreduce_of_different_shapes_is_a_mismatch_on_every_rank():
    def body(comm):
        return comm.iallreduce(np.zeros(2 + comm.rank)).wait()
    with pytest.raises(CollectiveMismatchError, match="shape"):
        run_in_process(2, body)


def test_a_rank_that_never_starts_the_iallreduce_is_a_deadlock_naming_it():
    def body(comm):
        if comm.rank == 0:
            comm.iallreduce(np.ones(3)).wait()
    with pytest.raises(DeadlockError, match=r"rank 0: waits in allreduce #1 on group \(0, 1\)"):
        run_in_process(2, body, timeout=10)


# ---- fused programs ------------------------------------------------------------------------

def run_grads(dp, mp, fusion, **config):
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp, **config)
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=dp * mp, full_batch=True,
                          comm_fusion=fusion)

    def body(comm):
        net = PanguAlphaWithLoss(cfg)
        prog = ShardedGradProgram(net, (IDS,), net.trainable_params(), "semi_auto_parallel", comm,
                                  full_batch=True, ctx=ctx)
        comm.stats.reset()
        loss, grads = prog((IDS,))
        kinds = [type(n.prim) for n in prog.local_graph.nodes]
        return loss, grads, comm.stats.snapshot()["count"], prog.fusion, kinds
    return run_in_process(dp * mp, body)


@pytest.mark.parametrize("dp, mp", [(2, 1), (2, 2)])
def test_fused_gradients_equal_unfused_bit_for_bit_with_one_allreduce_per_bucket(dp, mp):
    plain = run_grads(dp, mp, {})
    for fusion in (AUTO, {"allreduce": {"mode": "size", "config": 0.01}},
                   {"allreduce": {"mode": "index", "config": [5, 20]}}):
        fused = run_grads(dp, mp, fusion)
        for (loss, grads, *_), (got_loss, got_grads, count, done, _) in zip(plain, fused):
            assert got_loss == loss
            assert all(np.array_equal(a, b) for a, b in zip(got_grads, grads)), fusion
            reductions = sum(len(b) for b in done.buckets)
            # every gradient reduction the pass took is now one of its buckets' all-reduces
            assert count["allreduce"] == plain[0][2]["allreduce"] - reductions + len(done.buckets)
            assert reductions >= 50
    if (dp, mp) == (2, 1):
        # dp2: the loss, the 50 gradients made by the backward pass, the tied table's two parts
        assert plain[0][2]["allreduce"] == 53 and run_grads(2, 1, AUTO)[0][2]["allreduce"] == 3


def test_fusion_with_recompute_equals_unfused():
    """Recompute's clones go in after fusion's pass (Program applies it): same gradients."""
    plain = run_grads(2, 1, {}, recompute_granularity="full")
    fused = run_grads(2, 1, AUTO, recompute_granularity="full")
    for (loss, grads, *_), (got_loss, got_grads, count, *_) in zip(plain, fused):
        assert got_loss == loss and all(np.array_equal(a, b) for a, b in zip(got_grads, grads))
        assert count["allreduce"] == 3


def test_buckets_start_during_the_backward_pass_and_are_tested_until_their_wait():
    kinds = run_grads(2, 1, {"allreduce": {"mode": "size", "config": 0.01}})[0][4]
    start = kinds.index(BucketStart)
    assert kinds[-1] is BucketWait                              # the gradients' waits end the program
    work = [k for k in kinds[start + 1:] if k not in (BucketStart, BucketWait, Progress)]
    assert len(work) > 100                                         # backward instructions overlap the first bucket
    # MPI moves a non-blocking collective only inside MPI calls: a test after each of them
    ours = (Progress, BucketStart, BucketWait)
    assert all(kinds[k + 1] is Progress for k in range(start + 1, len(kinds)) if kinds[k] not in ours)


def test_a_buckets_gradients_stay_alive_and_unwritten_until_its_wait():
    """A bucket's collective may read its gradients in place until the wait (MPI's shared
    window does, on its helper thread): no instruction before the wait frees them or is
    handed their memory to overwrite."""
    cfg = CONFIG.replace(data_parallel=2)
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True, comm_fusion=AUTO)

    def body(comm):
        net = PanguAlphaWithLoss(cfg)
        prog = ShardedGradProgram(net, (IDS,), net.trainable_params(), "semi_auto_parallel", comm,
                                  full_batch=True, ctx=ctx)
        return prog.program
    program = run_in_process(2, body)[0]
    code = program.instructions
    freed = {v: k for k, ins in enumerate(code) for v in ins.frees}
    starts = [k for k, ins in enumerate(code) if isinstance(ins.node.prim, BucketStart)]
    assert len(starts) == 2                      # dp2, 64 MB buckets (the step's third all-reduce: the loss)
    for k in starts:
        grads = code[k].ins
        wait = next(j for j, ins in enumerate(code) if isinstance(ins.node.prim, BucketWait)
                    and ins.ins[1:] == grads)
        assert all(freed.get(v, len(code)) >= wait for v in grads)
        donated = {code[j].ins[i] for j, i in program.donated.items() if k < j < wait}
        assert not donated & set(grads)


def test_a_buckets_gradients_come_back_uncopied_side_by_side_in_its_buffer():
    _, grads, _, fusion, _ = run_grads(2, 1, AUTO)[0]
    big = max(fusion.buckets, key=len)                      # output positions; gradient k is output k + 1
    spans = sorted((g.__array_interface__["data"][0], g.nbytes) for g in (grads[j - 1] for j in big))
    assert len(spans) == 50
    assert all(start + n == following for (start, n), (following, _) in zip(spans, spans[1:]))


def train_three_steps(dp, mp, fusion):
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp, dropout_rate=0.1)

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg)
            opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
            train = nn.TrainOneStepCell(net, opt, clip_norm=0.5)
            losses = [float(train(IDS)) for _ in range(3)]
            count = comm.stats.snapshot()["count"]      # before the weights are gathered
            return losses, {p.name: p.asnumpy() for p in net.trainable_params()}, count
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=dp * mp, full_batch=True,
                          comm_fusion=fusion):
        return run_in_process(dp * mp, body)


@pytest.mark.parametrize("dp, mp", [(2, 1), (2, 2)])
def test_three_training_steps_fused_equal_unfused_bit_for_bit(dp, mp):
    plain, fused = train_three_steps(dp, mp, {}), train_three_steps(dp, mp, AUTO)
    for (losses, weights, count), (got_losses, got_weights, got_count) in zip(plain, fused):
        assert got_losses == losses
        for name, w in weights.items():
            assert np.array_equal(got_weights[name], w), name
        assert got_count["allreduce"] < count["allreduce"] // 2
        if (dp, mp) == (2, 1):   # per step: the program's (53 -> 3) and the gradient norm's
            assert (count["allreduce"], got_count["allreduce"]) == (3 * 54, 3 * 4)


def test_pipeline_deferred_reductions_fused_equal_unfused_bit_for_bit():
    """pp2 x dp2: the once-per-step all-reduces of a stage's weights (StageGradients.finish)
    in one bucket per stage, the same gradients bit for bit."""
    from autopar.runtime.compiled import grad_program
    cfg = CONFIG.replace(num_layers=4, data_parallel=2)

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg)
            nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=2)
            cell = nn.PipelineCell(net, 2)
            prog = grad_program(cell, (IDS,), {}, net.trainable_params())
            out = []
            for rules in ({}, {"allreduce": FusionRule("auto")}):
                prog.grads.rules = rules          # what StageGradients(comm_fusion=...) sets
                comm.stats.reset()
                loss, grads = prog((IDS,), {}, 0)
                out.append((loss, grads, comm.stats.snapshot()["count"]["allreduce"]))
            return out, len(prog.grads.deferred)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, pipeline_stages=2, full_batch=True):
        res = run_in_process(4, body)
    for ((loss, grads, count), (got_loss, got_grads, got_count)), deferred in res:
        assert got_loss == loss
        assert all(np.array_equal(a, b) for a, b in zip(got_grads, grads))
        assert deferred > 30 and got_count == count - deferred + 1     # one bucket per stage


def test_the_context_comm_fusion_reaches_the_pipeline_stages():
    """comm_fusion set in the context gives a pipeline program's StageGradients its rules."""
    from autopar.runtime.compiled import grad_program
    cfg = CONFIG.replace(num_layers=4)

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg)
            nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=2)
            return grad_program(nn.PipelineCell(net, 2), (IDS,), {}, net.trainable_params()).grads.rules
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True,
                          comm_fusion={"allreduce": {"mode": "auto"}}):
        assert run_in_process(2, body) == [{"allreduce": FusionRule("auto")}] * 2
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True):
        assert run_in_process(2, body) == [{}] * 2


def train_optimizer_parallel(dp, mp, fusion):
    """Three AdamW steps under optimizer parallel (every weight sliced); per rank: losses,
    weights, and the last step's collective counts."""
    cfg = CONFIG.replace(data_parallel=dp, model_parallel=mp)

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(cfg)
            opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
            train = nn.TrainOneStepCell(net, opt, clip_norm=0.5)
            losses = []
            for _ in range(3):
                comm.stats.reset()
                losses.append(float(train(IDS)))
            count = comm.stats.snapshot()["count"]      # before the weights are gathered
            return losses, {p.name: p.asnumpy() for p in net.trainable_params()}, count
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=dp * mp, full_batch=True,
                          enable_parallel_optimizer=True, parallel_optimizer_threshold=0, comm_fusion=fusion):
        return run_in_process(dp * mp, body)


@pytest.mark.parametrize("dp, mp", [(2, 1), (2, 2)])
def test_optimizer_parallel_reduce_scatters_and_all_gathers_fused_equal_unfused(dp, mp):
    plain = train_optimizer_parallel(dp, mp, {})
    fused = train_optimizer_parallel(dp, mp, {"reducescatter": {"mode": "auto"}, "allgather": {"mode": "auto"},
                                              "allreduce": {"mode": "auto"}})
    for (losses, weights, count), (got_losses, got_weights, got_count) in zip(plain, fused):
        assert got_losses == losses
        for name, w in weights.items():
            assert np.array_equal(got_weights[name], w), name
        if (dp, mp) == (2, 1):
            # every weight sliced: its gradient reduce-scattered (50: the tied table's and the
            # position table's are cut, computed whole) and its new slices all-gathered (53,
            # + 2 of activations); fused, one bucket each, the rest as they were
            assert count == {"allreduce": 4, "reduce_scatter": 50, "allgather": 55}
            assert got_count == {"allreduce": 4, "reduce_scatter": 1, "allgather": 3}

"""MindSpore 2.x's parallel API: Layout strategies, Cell.shard / autopar.shard with
parameter_plan, MatMul out_strategy (reduce-scatter), dataset_strategy tuples. Each changes
the plan as documented and the sharded result equals serial on 4 in-process ranks."""
import dataclasses

import numpy as np
import pytest

import autopar
from autopar import Layout, nn, ops
from autopar.comm import redistribution as rd
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.graph import FORWARD
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.profile import load_profile
from autopar.strategy.search import DEFAULT_PROFILE
from autopar.strategy.sharding_plan import plan_shardings

N = 4
STAGE = Mesh((N,), ("devices",))
RNG = np.random.default_rng(0)
X = RNG.standard_normal((8, 12))
W1 = RNG.standard_normal((12, 16))
W2 = RNG.standard_normal((16, 8))


class Block(nn.Cell):
    """x (B, 12) -> (B, 16) -> (B, 8); the loss is the mean square of the output."""

    def __init__(self, mm1=None, mm2=None):
        super().__init__()
        self.w1 = nn.Parameter(W1, name="w1")
        self.w2 = nn.Parameter(W2, name="w2")
        self.mm1 = mm1 or ops.MatMul()
        self.mm2 = mm2 or ops.MatMul()

    def construct(self, x):
        return self.mm2(ops.Tanh()(self.mm1(x, self.w1)), self.w2)


class Net(nn.Cell):
    def __init__(self, block, total=False):
        super().__init__()
        self.block = block
        self.total = total    # a sum over the batch: a rank fed the wrong rows shows

    def construct(self, x):
        y = self.block(x)
        return (y * y).sum() if self.total else (y * y).mean()


def serial_result(total=False):
    net = Net(Block(), total)
    loss, grads = autopar.value_and_grad(net)(X)
    return loss, grads


def sharded(make_net, x=X, full_batch=True, **ctx):
    """Per rank: (loss, full gradients by name, forward redistribution steps, plan)."""
    def body(comm):
        with bound_world(comm):
            net = make_net()
            local = x if full_batch else np.split(x, N)[comm.rank]
            params = net.trainable_params()
            prog = ShardedGradProgram(net, (local,), params, "semi_auto_parallel", comm, full_batch=full_batch)
            loss, grads = prog((local,))
            full = prog.gathered(grads)
            steps = [str(s.kind) for n in prog.local_graph.nodes if n.prim.kind == "Redistribute"
                     and n.phase == FORWARD for s in n.prim.attrs["redist"].steps]
            return loss, {p.name: g for p, g in zip(params, full)}, steps, prog
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, **ctx):
        return run_in_process(N, body)


def assert_equals_serial(results):
    loss, grads = serial_result()
    for r_loss, r_grads, _, _ in results:
        np.testing.assert_allclose(r_loss, loss, rtol=1e-12)
        for name, g in grads.items():
            np.testing.assert_allclose(r_grads[name], g, rtol=1e-10, atol=1e-12, err_msg=name)


def forward_plan(net, x=X):
    graph = trace(net, (TensorSpec(x.shape, x.dtype),)).graph
    return graph, plan_shardings(graph, "semi_auto_parallel", STAGE, full_batch=True)


def sharding_of(graph, plan, scope_suffix):
    hits = [n for n in graph.nodes if n.name.endswith(scope_suffix)]
    assert len(hits) == 1, [n.name for n in graph.nodes]
    return plan.shardings[hits[0].id]


def renamed(sh, names):
    """The same sharding with its mesh axes renamed (aliases vs the tuple's letters)."""
    return dataclasses.replace(sh, mesh=sh.mesh.reshaped(sh.mesh.shape, names))


# ---- Layout ---------------------------------------------------------------------------------

def test_layout_to_dict_counts_axes_from_the_right_as_mindspore():
    layout = Layout((2, 2, 2), ("dp", "sp", "mp"))
    assert layout("dp", "mp").to_dict()["tensor_map"] == (2, 0)        # MindSpore's documented example
    assert layout(("dp", "mp"), "None").to_dict()["tensor_map"] == ((2, 0), -1)
    assert layout(("dp", "mp"), "None").splits() == (4, 1)


@pytest.mark.parametrize("tuples, layouts", [
    (((2, 1), (1, 2)), lambda L: (L("dp", "None"), L("None", "mp"))),
    (((1, 2), (2, 2)), lambda L: (L("None", "dp"), L("dp", "mp"))),
    (((2, 2), (2, 1)), lambda L: (L("dp", "mp"), L("mp", "None"))),
])
def test_layout_strategy_is_the_sharding_of_the_tuple_it_means(tuples, layouts):
    L = Layout((2, 2), ("dp", "mp"))
    g1, p1 = forward_plan(Net(Block(ops.MatMul().shard(tuples))))
    g2, p2 = forward_plan(Net(Block(ops.MatMul().shard(layouts(L)))))
    by_tuple, by_layout = sharding_of(g1, p1, "block/MatMul"), sharding_of(g2, p2, "block/MatMul")
    assert by_layout.mesh.names == ("dp", "mp")
    assert renamed(by_layout, by_tuple.mesh.names) == by_tuple


def test_layout_orders_a_dims_axes_and_the_ranks_follow():
    # dim 0 split over (mp, dp): blocks numbered 2 * mp + dp, which no tuple can say
    L = Layout((2, 2), ("dp", "mp"))
    g, p = forward_plan(Net(Block(ops.MatMul().shard((L(("mp", "dp"), "None"), L("None", "None"))))))
    lay = sharding_of(g, p, "block/MatMul").input_layout(0)
    assert [lay.block_index(r)[0] for r in range(4)] == [0, 2, 1, 3]
    res = sharded(lambda: Net(Block(ops.MatMul().shard((L(("mp", "dp"), "None"), L("None", "None"))))))
    assert_equals_serial(res)


def test_layout_strategy_runs_equal_to_serial():
    L = Layout((2, 2), ("dp", "mp"))
    res = sharded(lambda: Net(Block(ops.MatMul().shard((L("dp", "None"), L("None", "mp"))),
                                    ops.MatMul().shard((L("dp", "mp"), L("mp", "None"))))))
    assert_equals_serial(res)


@pytest.mark.parametrize("make, words", [
    (lambda L: L("dp", "xx"), ["dim 1 alias", "'xx'", "('dp', 'mp')"]),
    (lambda L: L(("dp", "mp"), "dp"), ["dim 1 alias", "'dp'", "already used"]),
    (lambda L: Layout((2, 2), ("dp", "None")), ["alias_name[1]", "'None'"]),
    (lambda L: Layout((2,), ("interleaved_parallel",)), ["alias_name", "'interleaved_parallel'", "device axis"]),
])
def test_bad_layouts_name_the_argument(make, words):
    with pytest.raises(ValueError) as err:
        make(Layout((2, 2), ("dp", "mp")))
    for w in words:
        assert w in str(err.value)


def test_layout_errors_at_plan_time_name_the_op_scope():
    L8 = Layout((2, 4), ("dp", "mp"))          # 8 devices on a 4-device stage
    with pytest.raises(ValueError, match=r"block \(MatMul\): in_strategy device_matrix: .*4 devices"):
        forward_plan(Net(Block(ops.MatMul().shard((L8("dp", "None"), L8("None", "mp"))))))
    L = Layout((2, 2), ("dp", "mp"))
    with pytest.raises(ValueError, match=r"block.*MatMul.*in_strategy\[0\].*2 split counts"):
        forward_plan(Net(Block(ops.MatMul().shard((L("dp", "None", "mp"), L("None", "mp"))))))
    with pytest.raises(ValueError, match=r"block \(MatMul\): in_strategy\[1\] dim 0: expected \('mp',\)"):
        forward_plan(Net(Block(ops.MatMul().shard((L("None", "mp"), L("dp", "None"))))))


# ---- out_strategy ---------------------------------------------------------------------------

def row_split_block(out_strategy=None):
    """mm1 contracts over a 4-way split (a partial sum); out_strategy says where it goes."""
    return Block(ops.MatMul().shard(((1, 4), (4, 1)), out_strategy))


def test_out_strategy_turns_the_all_reduce_into_a_reduce_scatter():
    whole = sharded(lambda: Net(row_split_block()))
    scattered = sharded(lambda: Net(row_split_block(((4, 1),))))
    assert_equals_serial(whole)
    assert_equals_serial(scattered)
    assert whole[0][2].count(rd.ALLREDUCE) == 1 and rd.REDUCE_SCATTER not in whole[0][2]
    assert scattered[0][2].count(rd.REDUCE_SCATTER) == 1 and rd.ALLREDUCE not in scattered[0][2]


def test_out_strategy_sets_the_home_layout_and_readers_follow():
    g, p = forward_plan(Net(row_split_block(((4, 1),))))
    mm1 = sharding_of(g, p, "block/MatMul")
    node = next(n for n in g.nodes if n.name.endswith("block/MatMul"))
    assert mm1.output_layout().partial == (0,)                 # the kernel's partial sum
    assert p.layouts[node.outputs[0]].splits() == (4, 1)       # its home: split, nothing owed
    assert p.layouts[node.outputs[0]].partial == ()
    assert sharding_of(g, p, "block/Tanh").splits() == ((4, 1),)   # the reader propagates from it
    g2, p2 = forward_plan(Net(row_split_block(((1, 1),))))     # explicit all-reduce: whole
    node2 = next(n for n in g2.nodes if n.name.endswith("block/MatMul"))
    assert p2.layouts[node2.outputs[0]].splits() == (1, 1) and p2.layouts[node2.outputs[0]].partial == ()


def test_out_strategy_is_priced_by_the_cost_model():
    profile = load_profile(DEFAULT_PROFILE)
    costs = {}
    for name, out in (("all_reduce", None), ("reduce_scatter", ((4, 1),))):
        g, p = forward_plan(Net(row_split_block(out)))
        model = CostModel(g, STAGE, profile, full_batch=True)
        node = next(n for n in g.nodes if n.name.endswith("block/Tanh"))
        edge = [c for n, _, c in model.op_costs(p) if n.id == node.id][0]
        mm1 = next(n for n in g.nodes if n.name.endswith("block/MatMul"))
        nbytes = g.spec(mm1.outputs[0]).nbytes
        # forward: the partial sum -> the reader's layout; backward: dy back (nothing / all-gather)
        expected = model.collective_seconds(name, nbytes, STAGE, (0,))
        if name == "reduce_scatter":
            expected += model.collective_seconds("all_gather", nbytes, STAGE, (0,))
        costs[name] = edge
        assert edge == pytest.approx(expected)
    assert costs["reduce_scatter"] != costs["all_reduce"]


@pytest.mark.parametrize("out, words", [
    (((2, 1),), ["out_strategy[0][0]", "expected 1 (all-reduce", "or 4 (reduce-scatter", "got 2"]),
    (((1, 1), (1, 1)), ["out_strategy", "one tuple of 2"]),
])
def test_bad_out_strategy_names_scope_and_argument(out, words):
    with pytest.raises(ValueError) as err:
        forward_plan(Net(row_split_block(out)))
    assert "block (MatMul)" in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_out_strategy_on_an_op_without_one_is_an_error():
    class AddNet(nn.Cell):
        def construct(self, x):
            return ops.Add().shard(((4, 1), (4, 1)), ((4, 1),))(x, x).mean()
    with pytest.raises(ValueError, match=r"AddNet \(Add\): out_strategy: expected None.*MatMul and BatchMatMul"):
        forward_plan(AddNet())


def test_layout_out_strategy_on_the_ops_device_matrix():
    L = Layout((2, 2), ("dp", "mp"))
    mm = ops.MatMul().shard((L("dp", "mp"), L("mp", "None")), (L(("dp", "mp"), "None"),))
    g, p = forward_plan(Net(Block(mm)))
    node = next(n for n in g.nodes if n.name.endswith("block/MatMul"))
    assert p.layouts[node.outputs[0]].dims == ((0, 1), ())
    res = sharded(lambda: Net(Block(ops.MatMul().shard((L("dp", "mp"), L("mp", "None")),
                                                       (L(("dp", "mp"), "None"),)))))
    assert_equals_serial(res)
    assert rd.REDUCE_SCATTER in res[0][2] and rd.ALLREDUCE not in res[0][2]


# ---- Cell.shard, parameter_plan, autopar.shard -------------------------------------------------

def boundary_layouts(graph, plan, role):
    """Layout each ShardBoundary of ``role`` reads its input in, in graph order."""
    return [plan.shardings[n.id].input_layout(0) for n in graph.nodes
            if n.prim.kind == "ShardBoundary" and n.prim.attrs["role"] == role]


def test_cell_shard_lays_out_inputs_parameters_and_outputs():
    block = Block().shard(in_strategy=((4, 1),), out_strategy=((1, 4),), parameter_plan={"w1": (1, 4)})
    g, p = forward_plan(Net(block))
    assert [lay.splits() for lay in boundary_layouts(g, p, "input")] == [(4, 1)]
    assert [lay.splits() for lay in boundary_layouts(g, p, "output")] == [(1, 4)]
    w1 = g.params[g.param_names().index("block.w1")]
    assert p.layouts[w1].splits() == (1, 4)                      # parameter_plan: the weight's home
    assert sharding_of(g, p, "block/MatMul").splits()[0] == (4, 1)   # the op inside follows the input
    res = sharded(lambda: Net(Block().shard(in_strategy=((4, 1),), out_strategy=((1, 4),),
                                            parameter_plan={"w1": (1, 4)})))
    assert_equals_serial(res)
    shard = res[0][3].param_shards[[s.name for s in res[0][3].param_shards].index("block.w1")]
    assert shard.layout.splits() == (1, 4)                        # rank holds a quarter of w1's columns


def test_cell_shard_with_layouts_and_the_function_form():
    L = Layout((2, 2), ("dp", "mp"))
    block = autopar.shard(Block(), in_strategy=(L("dp", "None"),), parameter_plan={"self.w2": L("mp", "None")})
    assert isinstance(block, Block)
    g, p = forward_plan(Net(block))
    (lay,) = boundary_layouts(g, p, "input")
    assert lay.mesh.names == ("dp", "mp") and lay.dims == ((0,), ())
    w2 = g.params[g.param_names().index("block.w2")]
    assert p.layouts[w2].dims == ((1,), ()) and p.layouts[w2].mesh.names == ("dp", "mp")
    # the second MatMul follows both: rows over dp from its input, the contraction over mp from w2
    assert sharding_of(g, p, "block/MatMul-1").splits() == ((2, 2), (2, 1))
    res = sharded(lambda: Net(autopar.shard(Block(), in_strategy=(L("dp", "None"),),
                                            parameter_plan={"self.w2": L("mp", "None")})))
    assert_equals_serial(res)


def test_function_shard_inside_construct():
    class FnNet(nn.Cell):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.square = autopar.shard(lambda y: y * y, in_strategy=((1, 4),), out_strategy=((4, 1),))

        def construct(self, x):
            return self.square(self.block(x)).mean()
    g, p = forward_plan(FnNet())
    assert [lay.splits() for lay in boundary_layouts(g, p, "input")] == [(1, 4)]
    assert [lay.splits() for lay in boundary_layouts(g, p, "output")] == [(4, 1)]
    assert sharding_of(g, p, "FnNet/Mul").splits() == ((1, 4), (1, 4))
    res = sharded(FnNet)
    assert_equals_serial(res)


@pytest.mark.parametrize("call, error, words", [
    (lambda: Block().shard(((4, 1),), parameter_plan={"w9": (1, 4)}), ValueError,
     ["Block.shard", "parameter_plan['w9']", "w1, w2"]),
    (lambda: Block().shard([(4, 1)]), TypeError, ["Block.shard", "in_strategy", "a tuple"]),
    (lambda: Block().shard(((4, 1.5),)), TypeError, ["Block.shard", "in_strategy[0][1]", "an int"]),
    (lambda: autopar.shard(lambda y: y, ((4, 1),), parameter_plan={"w": (1,)}), ValueError,
     ["shard(<lambda>)", "parameter_plan", "Cell"]),
])
def test_bad_shard_arguments_name_the_place_and_argument(call, error, words):
    with pytest.raises(error) as err:
        call()
    for w in words:
        assert w in str(err.value)


def test_wrong_rank_and_count_in_cell_shard_name_the_cell_scope():
    with pytest.raises(ValueError, match=r"block \(ShardBoundary\): in_strategy\[0\]: expected 2 split counts"):
        forward_plan(Net(Block().shard(((4, 1, 1),))))
    with pytest.raises(ValueError, match=r"block \(Block\): in_strategy: expected 1 strategies, one per tensor"):
        forward_plan(Net(Block().shard(((4, 1), (4, 1)))))


# ---- dataset_strategy -----------------------------------------------------------------------

def fed_run(dataset_strategy, feed):
    """value_and_grad through the public API on 4 ranks, each fed ``feed(rank)``."""
    def body(comm):
        with bound_world(comm):
            net = Net(Block(ops.MatMul().shard(((1, 1), (1, 4)))), total=True)
            loss, grads = autopar.value_and_grad(net)(feed(comm.rank))
            return loss, grads
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=dataset_strategy):
        return run_in_process(N, body)


@pytest.mark.parametrize("dataset_strategy, feed", [
    (((1, 1),), lambda rank: X),                          # every rank fed the whole batch
    (((4, 1),), lambda rank: np.split(X, N)[rank]),       # every rank fed its quarter of the rows
    ("data_parallel", lambda rank: np.split(X, N)[rank]),
])
def test_dataset_strategy_tuple_says_what_each_rank_is_fed(dataset_strategy, feed):
    loss, grads = serial_result(total=True)
    for r_loss, r_grads in fed_run(dataset_strategy, feed):
        np.testing.assert_allclose(r_loss, loss, rtol=1e-12)
        for name, g in grads.items():
            np.testing.assert_allclose(r_grads[name], g, rtol=1e-10, err_msg=name)


def test_all_ones_dataset_strategy_is_not_split_any_more():
    # before: ((1, 1),) was validated, then the batch was split anyway: a rank fed the
    # whole batch trained on a 4x larger one (a different loss); now it is the whole batch
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=((1, 1),)) as ctx:
        assert ctx.loads_full_batch
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N, dataset_strategy=((4, 1),)) as ctx:
        assert not ctx.loads_full_batch


@pytest.mark.parametrize("value", [((1, 4),), ((4, 1), (1, 1)), ((4, 1), (2, 1))])
def test_dataset_strategy_general_tuples_are_fed_not_refused(value):
    # once refused (only all-1s or one dim-0 count were fed); now each input is fed its block
    # (tests/test_dataset_strategy.py shows loss and gradients equal serial)
    with parallel_context(device_num=N, dataset_strategy=value) as ctx:
        assert ctx.dataset_strategy == value and not ctx.loads_full_batch


@pytest.mark.parametrize("value", [((8, 1),), ((4, 1), (3, 1))])
def test_dataset_strategy_autopar_cannot_feed_is_rejected(value):
    with pytest.raises(ValueError, match=r"ParallelContext: dataset_strategy: expected per input, split counts whose "
                                         r"product divides the 4 devices of a stage"):
        with parallel_context(device_num=N, dataset_strategy=value):
            pass


def test_batch_matmul_out_strategy_reduce_scatters_into_the_rows():
    a, b = RNG.standard_normal((2, 8, 12)), RNG.standard_normal((2, 12, 4))

    class BNet(nn.Cell):
        def __init__(self, out=None):
            super().__init__()
            self.a, self.b = nn.Parameter(a, name="a"), nn.Parameter(b, name="b")
            self.bmm = ops.BatchMatMul().shard(((1, 1, 4), (1, 4, 1)), out)

        def construct(self, x):
            y = self.bmm(self.a, self.b) * x
            return (y * y).sum()
    x = RNG.standard_normal((2, 8, 4))
    want_loss, want = autopar.value_and_grad(BNet())(x)
    for out, kind, other in ((None, rd.ALLREDUCE, rd.REDUCE_SCATTER), (((1, 4, 1),), rd.REDUCE_SCATTER, rd.ALLREDUCE)):
        res = sharded(lambda: BNet(out), x=x)
        assert res[0][2].count(kind) == 1 and other not in res[0][2]
        for r_loss, r_grads, _, _ in res:
            np.testing.assert_allclose(r_loss, want_loss, rtol=1e-12)
            for name, g in want.items():
                np.testing.assert_allclose(r_grads[name], g, rtol=1e-10, atol=1e-12, err_msg=name)


def test_parameter_plan_of_a_parameter_read_before_the_cell_is_an_error():
    class Outer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.block = Block().shard(((1, 1),), parameter_plan={"w1": (1, 4)})

        def construct(self, x):
            x = x + ops.ReduceSum()(self.block.w1, ())      # w1 read here first, laid out whole
            return (self.block(x) ** 2).sum()
    with pytest.raises(ValueError, match=r"block \(shard\): parameter_plan\['block.w1'\].*Outer/ReduceSum"):
        forward_plan(Outer())


@pytest.mark.parametrize("mode", ["dynamic_programming", "sharding_propagation"])
def test_the_auto_parallel_search_keeps_layouts_and_out_strategy_as_constraints(mode):
    """Under auto_parallel a user's Layout (its axis order, which no tuple says) and its
    out_strategy constrain the op exactly as under semi_auto_parallel: the searched plan gives
    the op that sharding and its output that home layout."""
    from autopar.strategy.search import search_plan
    layout = Layout((2, 2), ("dp", "mp"))
    for block in (row_split_block(((4, 1),)),
                  Block(ops.MatMul().shard((layout(("mp", "dp"), "None"), layout("None", "None"))))):
        graph, rules = forward_plan(Net(block))
        searched = search_plan(graph, STAGE, mode, True)
        mine = sharding_of(graph, rules, "block/MatMul")
        got = sharding_of(graph, searched, "block/MatMul")
        assert got == mine
        node = next(n for n in graph.nodes if n.name.endswith("block/MatMul"))
        assert searched.layouts[node.outputs[0]] == mine.home_layout()


def test_a_plan_with_out_strategy_saves_and_loads_exactly(tmp_path):
    """The strategy file keeps an out_strategy's home layout: saved, loaded back equal, and a
    run replaying it reduce-scatters as the original does."""
    from autopar.strategy.strategy_file import load_strategy, save_strategy
    graph, plan = forward_plan(Net(row_split_block(((4, 1),))))
    path = tmp_path / "out.json"
    save_strategy(str(path), graph, plan)
    back = load_strategy(str(path), graph, STAGE)
    assert back.shardings == plan.shardings and back.layouts == plan.layouts
    assert sharding_of(graph, back, "block/MatMul").out_dims is not None
    replayed = sharded(lambda: Net(row_split_block(((4, 1),))), strategy_ckpt_load_file=str(path))
    assert_equals_serial(replayed)
    assert replayed[0][2].count(rd.REDUCE_SCATTER) == 1


def test_grad_accumulation_cell_equals_the_whole_batch_step_serially_and_on_dp2():
    """nn.GradAccumulationCell(net, 4): four micro-batches' gradients add up to the whole
    batch's (a mean loss over equal micro-batches), serially and on 2 in-process ranks."""
    loss, grads = serial_result()
    acc_loss, acc_grads = autopar.value_and_grad(nn.GradAccumulationCell(Net(Block()), 4))(X)
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(acc_grads[name], g, rtol=1e-10, atol=1e-12, err_msg=name)

    def body(comm):
        with bound_world(comm):
            net = Net(Block())
            cell = nn.GradAccumulationCell(net, 2)
            local = np.split(X, 2)[comm.rank]
            return autopar.value_and_grad(cell, net.trainable_params())(local)
    with parallel_context(parallel_mode="data_parallel", device_num=2):
        for got_loss, got_grads in run_in_process(2, body):
            np.testing.assert_allclose(got_loss, loss, rtol=1e-12)
            for name, g in grads.items():
                np.testing.assert_allclose(got_grads[name], g, rtol=1e-10, atol=1e-12, err_msg=name)

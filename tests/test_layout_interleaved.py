"""MindSpore's ``"interleaved_parallel"`` Layout alias: the op runs as k copies inside each
device, the tensors lie on the devices as without the alias. On 4 in-process ranks the
loss and gradients equal the plain layout's and serial's; the local graph holds k copies of
the op (forward and backward); the plan's layouts are the plain plan's; errors name the
alias and the op."""
import dataclasses
import json

import numpy as np
import pytest

import autopar
from autopar import Layout, nn, ops
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.errors import OpArgError
from autopar.ir.graph import BACKWARD, FORWARD
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.trace import trace
from autopar.strategy.sharding_plan import plan_shardings
from autopar.strategy.strategy_file import load_strategy, save_strategy

N = 4
STAGE = Mesh((N,), ("devices",))
RNG = np.random.default_rng(3)
X = RNG.standard_normal((8, 12))
W1 = RNG.standard_normal((12, 16))
W2 = RNG.standard_normal((16, 8))
IL = "interleaved_parallel"
INTERLEAVED = Layout((2, 2, 2), ("dp", "mp", IL))    # 4 devices, 2 copies
PLAIN = Layout((2, 2), ("dp", "mp"))


def strategies(L, il):
    """mm1 column-parallel, Tanh, mm2 row-parallel (its partial sum all-reduced), each with
    the batch dim cut into copies when ``il``: ``("dp", IL)`` instead of ``"dp"``."""
    b = ("dp", IL) if il else "dp"
    return ((L(b, "None"), L("None", "mp")),
            (L(b, "mp"),),
            (L(b, "mp"), L("mp", "None")))


class Block(nn.Cell):
    """x (B, 12) -> MatMul (B, 16) -> Tanh -> MatMul (B, 8); loss: sum of squares."""

    def __init__(self, s1=None, s2=None, s3=None):
        super().__init__()
        self.w1 = nn.Parameter(W1, name="w1")
        self.w2 = nn.Parameter(W2, name="w2")
        self.mm1 = ops.MatMul().shard(s1) if s1 else ops.MatMul()
        self.act = ops.Tanh().shard(s2) if s2 else ops.Tanh()
        self.mm2 = ops.MatMul().shard(s3) if s3 else ops.MatMul()

    def construct(self, x):
        y = self.mm2(self.act(self.mm1(x, self.w1)), self.w2)
        return (y * y).sum()


def run(make_net):
    """Per rank: (loss, full gradients by name, the local graph)."""
    def body(comm):
        with bound_world(comm):
            net = make_net()
            params = net.trainable_params()
            prog = ShardedGradProgram(net, (X,), params, "semi_auto_parallel", comm, full_batch=True)
            loss, grads = prog((X,))
            return loss, {p.name: g for p, g in zip(params, prog.gathered(grads))}, prog.local_graph
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N):
        return run_in_process(N, body)


def plan_of(net):
    graph = trace(net, (TensorSpec(X.shape, X.dtype),)).graph
    return graph, plan_shardings(graph, "semi_auto_parallel", STAGE, full_batch=True)


def test_interleaved_equals_plain_layout_and_serial():
    serial_loss, serial_grads = autopar.value_and_grad(Block())(X)
    plain = run(lambda: Block(*strategies(PLAIN, False)))
    inter = run(lambda: Block(*strategies(INTERLEAVED, True)))
    for (loss, grads, _), (p_loss, p_grads, _) in zip(inter, plain):
        np.testing.assert_allclose(loss, serial_loss, rtol=1e-12)
        np.testing.assert_allclose(loss, p_loss, rtol=1e-12)
        for name, g in serial_grads.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-10, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(grads[name], p_grads[name], rtol=1e-10, atol=1e-12, err_msg=name)


def _count(graph, kind, phase):
    return sum(1 for n in graph.nodes if n.prim.kind == kind and n.phase == phase
               and (phase == FORWARD or n.forward_of is not None))


def test_the_local_graph_runs_k_copies_of_each_interleaved_op():
    k = INTERLEAVED.interleave
    _, _, plain = run(lambda: Block(*strategies(PLAIN, False)))[0]
    _, _, inter = run(lambda: Block(*strategies(INTERLEAVED, True)))[0]
    for kind in ("MatMul", "Tanh"):
        per_op = 2 if kind == "MatMul" else 1
        assert _count(plain, kind, FORWARD) == per_op and _count(plain, kind, BACKWARD) == per_op
        assert _count(inter, kind, FORWARD) == k * per_op, kind
        assert _count(inter, kind, BACKWARD) == k * per_op, kind
    # each copy computes on a piece: a MatMul copy reads (B/dp/k, 12) rows of x
    mm1 = [n for n in inter.nodes if n.prim.kind == "MatMul" and n.phase == FORWARD][:k]
    assert all(inter.spec(n.inputs[0]).shape == (8 // 2 // k, 12) for n in mm1)
    assert all(inter.spec(n.inputs[1]).shape == (12, 16 // 2) for n in mm1)   # the weight whole in each copy


def test_interleaving_one_op_runs_only_that_op_as_copies():
    """Only the op whose strategy has the alias runs as copies; its neighbours keep one."""
    s = strategies(PLAIN, False)
    inter = run(lambda: Block((INTERLEAVED(("dp", IL), "None"), INTERLEAVED("None", "mp")), s[1], s[2]))
    serial_loss, _ = autopar.value_and_grad(Block())(X)
    np.testing.assert_allclose(inter[0][0], serial_loss, rtol=1e-12)
    graph = inter[0][2]
    assert _count(graph, "MatMul", FORWARD) == 2 + 1 and _count(graph, "Tanh", FORWARD) == 1


class Gated(nn.Cell):
    """x (B, 12) -> MatMul (B, 16) -> Mul by Tanh of itself: an elementwise op of two inputs,
    both cut into copies along the batch (``(("dp", IL), "None")``), the MatMul plain."""

    def __init__(self, L, il):
        super().__init__()
        b = ("dp", IL) if il else "dp"
        self.w1 = nn.Parameter(W1, name="w1")
        self.mm = ops.MatMul().shard((PLAIN("dp", "None"), PLAIN("None", "None")))
        self.mul = ops.Mul().shard((L(b, "None"), L(b, "None")))

    def construct(self, x):
        y = self.mm(x, self.w1)
        return (self.mul(y, ops.Tanh()(y)) ** 2).sum()


def test_an_interleaved_elementwise_op_equals_plain_and_serial():
    serial_loss, serial_grads = autopar.value_and_grad(Gated(PLAIN, False))(X)
    plain = run(lambda: Gated(PLAIN, False))
    inter = run(lambda: Gated(INTERLEAVED, True))
    for (loss, grads, graph), (p_loss, p_grads, _) in zip(inter, plain):
        np.testing.assert_allclose(loss, serial_loss, rtol=1e-12)
        np.testing.assert_allclose(loss, p_loss, rtol=1e-12)
        np.testing.assert_allclose(grads["w1"], serial_grads["w1"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads["w1"], p_grads["w1"], rtol=1e-10, atol=1e-12)
        assert _count(graph, "Mul", FORWARD) == 2 and _count(graph, "Mul", BACKWARD) == 2
        assert all(graph.spec(n.inputs[0]).shape == (2, 16) for n in graph.nodes
                   if n.prim.kind == "Mul" and n.phase == FORWARD)


def test_the_plan_lays_out_tensors_as_the_plain_plan():
    g1, plain = plan_of(Block(*strategies(PLAIN, False)))
    g2, inter = plan_of(Block(*strategies(INTERLEAVED, True)))
    assert inter.layouts == plain.layouts
    for nid, sh in inter.shardings.items():
        assert dataclasses.replace(sh, interleave=None) == plain.shardings[nid]
    mm = [inter.shardings[n.id] for n in g2.nodes if n.prim.kind == "MatMul"]
    assert [sh.interleave for sh in mm] == [(sh.indexing.output[0], 2) for sh in mm]   # the batch letter
    assert all(sh.interleave is None for sh in plain.shardings.values())


def test_a_strategy_file_keeps_the_copies(tmp_path):
    """Saved and loaded, the plan still runs each interleaved op as its copies; a damaged
    entry names it."""
    graph, inter = plan_of(Block(*strategies(INTERLEAVED, True)))
    path = tmp_path / "s.json"
    save_strategy(path, graph, inter)
    loaded = load_strategy(path, graph, STAGE)
    assert loaded.shardings == inter.shardings
    assert any(sh.interleave == (sh.indexing.output[0], 2) for sh in loaded.shardings.values())
    doc = json.loads(path.read_text())
    name = next(k for k, e in doc["ops"].items() if "interleave" in e)
    doc["ops"][name]["interleave"] = ["z", 2]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"interleave: expected \[letter, copies\] with a letter of the op's output"):
        load_strategy(path, graph, STAGE)


@pytest.mark.parametrize("mode", ["dynamic_programming", "sharding_propagation"])
def test_the_search_keeps_the_interleave_and_plans_as_without_it(mode):
    """Under auto_parallel an interleaved Layout constrains its op as the plain one does
    (same searched layouts and shardings) and its copies stay in the searched plan."""
    from autopar.strategy.search import search_plan
    g1, _ = plan_of(Block(*strategies(PLAIN, False)))
    g2, _ = plan_of(Block(*strategies(INTERLEAVED, True)))
    plain, inter = search_plan(g1, STAGE, mode, True), search_plan(g2, STAGE, mode, True)
    assert inter.layouts == plain.layouts
    assert {k: dataclasses.replace(sh, interleave=None) for k, sh in inter.shardings.items()} == plain.shardings
    assert [inter.shardings[n.id].interleave is not None for n in g2.nodes if n.prim.kind in ("MatMul", "Tanh")] \
        == [True, True, True]


def test_to_dict_and_splits_as_mindspore():
    layout = Layout((2, 2, 2), ("dp", "sp", IL))
    x = layout(("dp", IL), "sp")
    assert x.to_dict() == {"device_matrix": (2, 2, 2), "tensor_map": ((2, 0), 1), "interleaved_parallel": True,
                           "alias_name": ("dp", "sp", IL)}
    assert x.splits() == (2, 2)                       # device splits only
    assert x.interleaved == 0 and layout.interleave == 2
    assert PLAIN("dp", "mp").to_dict()["interleaved_parallel"] is False
    assert INTERLEAVED.mesh(STAGE).shape == (2, 2) and INTERLEAVED.mesh(STAGE).names == ("dp", "mp")


def test_strategy_records_the_interleave_and_tuples_have_none():
    mm = ops.MatMul().shard((INTERLEAVED(("dp", IL), "None"), INTERLEAVED("None", "mp")))
    assert mm.strategy.interleaved == (0, None) and mm.strategy.copies == 2
    assert mm.strategy.inputs == ((2, 1), (1, 2))
    assert ops.MatMul().shard(((2, 1), (1, 2))).strategy.interleaved is None


@pytest.mark.parametrize("make, words", [
    (lambda: INTERLEAVED((IL, "dp"), "None"), ["dim 0 alias", "last (minor)", "('dp', 'interleaved_parallel')"]),
    (lambda: INTERLEAVED(("dp", IL), IL), ["dim 1 alias", "'interleaved_parallel' on one dim", "dim 0 has it"]),
    (lambda: Layout((2,), (IL,)), ["alias_name", "device axis"]),
    (lambda: ops.MatMul().shard((PLAIN("dp", "None"), PLAIN("None", "mp"))).shard(
        (INTERLEAVED("dp", "None"), INTERLEAVED("None", "mp")), (INTERLEAVED(("dp", IL), "mp"),)),
     ["out_strategy[0] dim 0", "interleaved_parallel"]),
])
def test_bad_interleaved_layouts_name_the_alias(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize("s1, words", [
    # x's contracted dim (k of ik,kj) cut into copies: each copy would be a partial sum
    ((INTERLEAVED("dp", IL), INTERLEAVED(IL, "mp")), ["Block (MatMul)", "in_strategy[0] dim 1 'interleaved_parallel'",
                                                      "contracted"]),
    # two inputs cutting two different indices (i and j)
    ((INTERLEAVED(("dp", IL), "None"), INTERLEAVED("None", ("mp", IL))), ["Block (MatMul)", "one index",
                                                                         "input 0 dim 0, input 1 dim 1"]),
    # 3 copies of the 4 rows each device holds
    ((Layout((2, 2, 3), ("dp", "mp", IL))(("dp", IL), "None"), Layout((2, 2, 3), ("dp", "mp", IL))("None", "mp")),
     ["Block (MatMul)", "3 copies dividing dim 0 of input 0", "size 8 split 2 ways", "4 rows per device"]),
])
def test_plan_time_errors_name_the_op_and_the_alias(s1, words):
    with pytest.raises(ValueError) as err:
        plan_of(Block(s1))
    for w in words:
        assert w in str(err.value), str(err.value)


class Reshaped(nn.Cell):
    """x (8, 12) -> Reshape (8, 3, 4), interleaved on the batch: a Reshape's local op has a
    fixed shape, so it cannot run on pieces."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.ones((8, 12)), name="w")
        self.reshape = ops.Reshape().shard((INTERLEAVED(("dp", IL), "None"),))

    def construct(self, x):
        return (self.reshape(x * self.w, (8, 3, 4)) ** 2).sum()


def test_an_op_that_cannot_run_as_copies_is_refused_before_running():
    def body(comm):
        with bound_world(comm):
            net = Reshaped()
            ShardedGradProgram(net, (X,), net.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=N):
        with pytest.raises(ValueError) as err:
            run_in_process(N, body)
    for w in ("Reshape", "in_strategy 'interleaved_parallel'", "cannot run as copies", "(2, 3, 4)"):
        assert w in str(err.value), str(err.value)


def test_cell_shard_refuses_an_interleaved_layout_naming_the_fix():
    """Copies are an op's way to run: at a cell's boundary they would be accepted and then
    ignored by the ops inside, so Cell.shard refuses them."""
    with pytest.raises(OpArgError, match=r"Block.shard: in_strategy\[0\]: expected a layout without "
                                         r"'interleaved_parallel' at a cell's boundary.*op.shard"):
        Block().shard((INTERLEAVED(("dp", IL), "None"),))
    Block().shard((INTERLEAVED("dp", "None"),))      # the same matrix without copies on that tensor is fine

"""Strategy search: every mode against brute force on random small graphs, golden plans on
known shapes, user strategies as constraints, the memory cap, and bad input."""
import numpy as np
import pytest

from autopar import nn, ops
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.profile import load_profile
from autopar.strategy.search import SEARCH_MODES, brute_force, build, search, solve
from autopar.strategy.search.problem import plan_of

PROFILE = load_profile("cpu-2core")


class RandomNet(nn.Cell):
    """A random DAG of up to ``n_ops`` ops on (b, h) values, ending in a mean (the loss)."""

    def __init__(self, rng, n_ops: int, h: int):
        super().__init__()
        self.steps = []
        kinds = ["matmul", "matmul", "add", "gelu", "scale", "softmax", "tanh"]
        for k in range(n_ops - 1):
            kind = kinds[rng.integers(len(kinds))]
            a = int(rng.integers(k + 1))          # an earlier value (0 is the input)
            b = int(rng.integers(k + 1))
            if kind == "matmul":
                w = nn.Parameter(np.zeros((h, h), np.float32), name=f"w{k}")
                setattr(self, f"w{k}", w)
                op = ops.MatMul()
            elif kind == "scale":
                w = nn.Parameter(np.zeros((h,), np.float32), name=f"s{k}")
                setattr(self, f"s{k}", w)
                op = ops.Mul()
            else:
                w = None
                op = {"add": ops.Add(), "gelu": ops.GeLU(), "softmax": ops.Softmax(), "tanh": ops.Tanh()}[kind]
            setattr(self, f"op{k}", op)
            self.steps.append((kind, a, b, op, w))
        self.mean = ops.ReduceMean()

    def construct(self, x):
        vals = [x]
        for kind, a, b, op, w in self.steps:
            if w is not None:
                vals.append(op(vals[a], w))
            elif kind == "add":
                vals.append(op(vals[a], vals[b]))
            else:
                vals.append(op(vals[a]))
        return self.mean(vals[-1])


def graph_of(net, *shapes, dtype=np.float32):
    return trace(net, tuple(TensorSpec(s, np.dtype(dtype)) for s in shapes), {}).graph


def random_case(seed: int):
    """A graph small enough to enumerate: resampled until the assignments fit brute force."""
    rng = np.random.default_rng(seed)
    while True:
        devices = int(rng.choice([4, 8]))
        n_ops = int(rng.integers(3, 9 if devices == 4 else 6))
        b, h = int(rng.choice([8, 16, 48])), int(rng.choice([4, 8, 12]))
        g = graph_of(RandomNet(rng, n_ops, h), (b, h))
        model = CostModel(g, Mesh((devices,), ("devices",)), PROFILE)
        problem = build(model)
        if np.prod([len(c) for c in problem.cands.values()], dtype=float) <= 2e5:
            return model, problem


def objective(problem, plan) -> float:
    """The search's pairwise objective of a plan."""
    return problem.cost({n: problem.cands[n].index(plan.shardings[n]) for n in problem.nodes})


def merges_gradient_parts(model, plan) -> bool:
    """Whether some value has two or more gradient parts in one layout, which the runtime
    adds before one reduction (the pairwise objective reduces each part on its own edge;
    the same when they need none)."""
    from autopar.ir.graph import gradient_inputs
    for readers in model.consumers.values():
        parts = [plan.shardings[n].grad_layout(i) for n, i in readers
                 if gradient_inputs(model.nodes[n], model.needs_grad)[i]]
        if len(parts) > 1 and all(p == parts[0] for p in parts):
            return True
    return False


def runtime_saves_collectives(model, plan) -> bool:
    """Whether the runtime runs fewer collectives than the pairwise objective prices one
    edge at a time: alike gradient parts merge, a VJP takes a partial dy as it is (the
    reduction moves to its inputs, :func:`~autopar.strategy.gradient_flow.passable_partial`;
    exact to test without following it, as the last op to pass one sees parts untouched),
    or readers share one redistribution of a value into one layout."""
    from autopar.ir.graph import gradient_inputs
    from autopar.strategy.canonical import canonical
    from autopar.strategy.gradient_flow import passable_partial
    if merges_gradient_parts(model, plan):
        return True
    sh = plan.shardings
    for v, readers in model.consumers.items():
        src = model.producer_layout(v, sh)
        wanted = [canonical(sh[n].input_layout(i)) for n, i in readers]
        if src is not None and any(w != canonical(src) and wanted.count(w) > 1 for w in wanted):
            return True
        node = model.graph.node_of(v)
        parts = [sh[n].grad_layout(i) for n, i in readers if gradient_inputs(model.nodes[n], model.needs_grad)[i]]
        if node is None or not parts or any(p != parts[0] for p in parts):
            continue
        needs = gradient_inputs(node, model.needs_grad)
        grads = sum(model.graph.spec(u).size for u, need in zip(node.inputs, needs) if need)
        if passable_partial(parts[0], sh[node.id], model.graph.spec(v).size, grads):
            return True
    return False


@pytest.mark.parametrize("seed", range(24))
def test_every_mode_is_at_least_the_brute_force_optimum_and_dp_equals_it(seed):
    """Under the search's objective. evaluate() prices what the runtime runs: the same, less
    the collectives it saves (:func:`runtime_saves_collectives`), plus the once-per-step
    norm all-reduce (the same for every plan)."""
    model, problem = random_case(seed)
    choice = brute_force(problem)
    best, plan = problem.cost(choice), problem.plan(choice)
    exact = model.evaluate(plan).step_seconds - model.step_collectives_seconds(model.stage)
    if runtime_saves_collectives(model, plan):
        assert exact <= best * (1 + 1e-9)
    else:
        assert exact == pytest.approx(best, rel=1e-9)
    for mode in SEARCH_MODES:
        got = objective(problem, search(model.graph, model.stage, mode, profile=PROFILE).plan)
        if mode == "dynamic_programming":
            assert got == pytest.approx(best, rel=1e-9), mode
        else:
            assert got >= best * (1 - 1e-9), mode


def test_eliminations_are_named_and_recover_the_optimum_on_a_branchy_graph():
    model, problem = random_case(3)
    choice, kinds = solve(problem)
    assert problem.cost(choice) == pytest.approx(problem.cost(brute_force(problem)), rel=1e-12)
    assert sum(kinds.values()) - kinds["edge"] == len(problem.nodes)
    assert set(kinds) <= {"edge", "merge", "contract", "op", "triangle", "star", "final"}


class TwoMatMuls(nn.Cell):
    def __init__(self, h, shard=None):
        super().__init__()
        self.w1 = nn.Parameter(np.zeros((h, h), np.float32), name="w1")
        self.w2 = nn.Parameter(np.zeros((h, h), np.float32), name="w2")
        self.mm1, self.mm2, self.mean = ops.MatMul(), ops.MatMul(), ops.ReduceMean()
        if shard is not None:
            self.mm2.shard(shard)

    def construct(self, x):
        return self.mean(self.mm2(self.mm1(x, self.w1), self.w2))


@pytest.mark.parametrize("mode", ["dynamic_programming", "recursive_programming"])
def test_large_batch_chained_matmuls_on_16_devices_are_pure_data_parallel(mode):
    g = graph_of(TwoMatMuls(256), (8192, 256))
    stage = Mesh((16,), ("devices",))
    res = search(g, stage, mode, profile=PROFILE)
    mms = [n for n in g.nodes if n.prim.kind == "MatMul"]
    assert [str(res.plan.shardings[n.id]) for n in mms] == ["((16,1),(1,1))"] * 2
    # propagation is greedy (one pass, no backtracking): never better, possibly worse
    greedy = search(g, stage, "sharding_propagation", profile=PROFILE)
    assert greedy.cost.step_seconds >= res.cost.step_seconds * (1 - 1e-9)


def test_user_strategies_are_constraints():
    g = graph_of(TwoMatMuls(64, shard=((1, 4), (4, 1))), (256, 64))
    stage = Mesh((4,), ("devices",))
    mm2 = [n for n in g.nodes if n.prim.kind == "MatMul"][1]
    free = search(graph_of(TwoMatMuls(64), (256, 64)), stage, profile=PROFILE)
    for mode in SEARCH_MODES:
        res = search(g, stage, mode, profile=PROFILE)
        assert str(res.plan.shardings[mm2.id]) == "((1,4),(4,1))"
        assert res.cost.step_seconds >= free.cost.step_seconds * (1 - 1e-9)


def _pangu_graph(cfg, batch):
    from autopar.models.pangu_alpha import PanguAlphaWithLoss
    return graph_of(PanguAlphaWithLoss(cfg), (batch, cfg.seq_length + 1), dtype=np.int32)


def test_transformer_layer_with_large_hidden_and_small_batch_communicates_no_more_than_megatron():
    from autopar.models.pangu_alpha import PanguAlphaConfig
    from autopar.strategy.sharding_plan import plan_shardings
    cfg = PanguAlphaConfig.preset("tiny", hidden_size=1024, ffn_hidden_size=4096, num_heads=16, num_layers=1,
                                  seq_length=32, vocab_size=512, param_dtype="float32", compute_dtype="float32")
    stage = Mesh((8,), ("devices",))
    g = _pangu_graph(cfg, 2)
    found = search(g, stage, profile=PROFILE).cost
    megatron = CostModel(g, stage, PROFILE).evaluate(
        plan_shardings(_pangu_graph(cfg.replace(model_parallel=8), 2), "semi_auto_parallel", stage, True))
    assert found.comm_s <= megatron.comm_s
    assert found.step_seconds <= megatron.step_seconds


def test_an_embedding_heavy_model_splits_the_vocabulary_when_that_is_cheaper():
    from autopar.models.pangu_alpha import PanguAlphaConfig
    cfg = PanguAlphaConfig.preset("tiny", vocab_size=32768, hidden_size=64, ffn_hidden_size=256, num_layers=1,
                                  seq_length=16, param_dtype="float32", compute_dtype="float32")
    stage = Mesh((8,), ("devices",))
    g = _pangu_graph(cfg, 8)
    res = search(g, stage, profile=PROFILE)
    table = g.params[g.param_names().index("word_embedding.embedding_table")]
    assert res.plan.layouts[table].splits()[0] > 1        # split along the vocabulary
    model = CostModel(g, stage, PROFILE)
    whole = build(model)
    keep = {n: [k for k, sh in enumerate(whole.cands[n]) if not any(
        sh.input_layout(i).splits()[0] > 1 for i, v in enumerate(model.graph.nodes[n].inputs) if v == table)]
        for n in whole.nodes}
    replicated_table = whole.restricted(keep)
    assert res.cost.step_seconds < model.evaluate(replicated_table.plan(solve(replicated_table)[0])).step_seconds


def test_a_memory_cap_trades_time_for_memory_and_an_impossible_one_says_by_how_much():
    g = graph_of(TwoMatMuls(256), (512, 256))
    stage = Mesh((4,), ("devices",))
    fast = search(g, stage, profile=PROFILE)          # dp2 x mp2
    # the peak counts activation gradients in flight, and a partial sum's is whole on every
    # rank: the leanest plan found is 88% of the fastest's, 1.2x slower
    cap = fast.cost.memory_bytes * 0.9
    lean = search(g, stage, profile=PROFILE, memory_cap=cap)
    assert lean.cost.memory_bytes <= cap
    assert lean.cost.step_seconds > fast.cost.step_seconds and lean.lam > 0
    with pytest.raises(ValueError, match=r"no plan fits 1000 B .*\(over by 1.44 MiB.*Largest: parameter w1"):
        search(g, stage, profile=PROFILE, memory_cap=1000)


def test_bad_search_input_is_a_clear_error():
    g = graph_of(TwoMatMuls(8), (8, 8))
    with pytest.raises(ValueError, match="search_mode: expected one of"):
        search(g, Mesh((2,), ("devices",)), "greedy")
    with pytest.raises(ValueError, match="memory_cap"):
        search(g, Mesh((2,), ("devices",)), memory_cap=-1)
    with pytest.raises(ValueError, match="no profile named"):
        search(g, Mesh((2,), ("devices",)), profile="tpu-v9")
    with pytest.raises(ValueError, match=r"7 devices.*divides no dim"):
        search(g, Mesh((7,), ("devices",)), profile=PROFILE)


def test_plan_of_gives_parameters_their_first_consumers_layout():
    g = graph_of(TwoMatMuls(16), (32, 16))
    model = CostModel(g, Mesh((4,), ("devices",)), PROFILE)
    problem = build(model)
    plan = problem.plan(solve(problem)[0])
    for v, (n, i) in model.home.items():
        assert plan.layouts[v] == plan.shardings[n].input_layout(i)
    assert plan_of(model, plan.shardings).layouts == plan.layouts


def test_candidates_include_non_power_of_two_splits_and_the_search_uses_them():
    g = graph_of(TwoMatMuls(24), (96, 24))
    stage = Mesh((6,), ("devices",))
    model = CostModel(g, stage, PROFILE)
    problem = build(model)
    mm = [n for n in g.nodes if n.prim.kind == "MatMul"][0]
    splits = {str(sh) for sh in problem.cands[mm.id]}
    assert {"((6,1),(1,1))", "((3,1),(1,2))", "((1,3),(3,2))"} <= splits
    res = search(g, stage, profile=PROFILE)          # 6 ranks, large batch: a 6-way data split
    assert str(res.plan.shardings[mm.id]) == "((6,1),(1,1))"

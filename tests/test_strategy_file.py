"""Strategy files: a saved plan loads back identical, trains an unannotated network exactly
as the annotated one, and a damaged or mismatched file is a ValueError naming the entry."""
import copy
import json
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.ops.primitive import Primitive
from autopar.runtime.sharded_program import ShardedGradProgram
from autopar.runtime.trace import trace
from autopar.strategy.sharding_plan import ShardingPlan, plan_shardings
from autopar.strategy.strategy_file import load_strategy, save_strategy
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
RNG = np.random.default_rng(0)
IDS = {n: RNG.integers(0, CONFIG.vocab_size, (n, CONFIG.seq_length + 1)).astype(np.int32) for n in (4, 8)}


def strip_annotations(net):
    """The same network with every ``.shard()`` forgotten."""
    for _, cell in net.named_cells():
        for value in vars(cell).values():
            if isinstance(value, Primitive):
                value.strategy = None
    return net


def pangu(dp=1, mp=1, vocab_emb_dp=True, annotated=True, **changes):
    net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=dp, model_parallel=mp, vocab_emb_dp=vocab_emb_dp,
                                            **changes))
    return net if annotated else strip_annotations(net)


def traced(net, batch):
    return trace(net, (IDS[batch],), {}).graph


def assert_same_plan(got: ShardingPlan, want: ShardingPlan):
    assert got.stage == want.stage
    assert got.shardings.keys() == want.shardings.keys()
    for n, s in want.shardings.items():
        assert got.shardings[n] == s, n
    assert got.layouts == want.layouts


# ---- round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("dp, mp, vocab_emb_dp, full_batch", [
    (2, 2, True, False), (1, 4, False, True), (2, 4, False, False), (8, 1, True, False),
])
def test_round_trip_gives_the_identical_plan(tmp_path, dp, mp, vocab_emb_dp, full_batch):
    graph = traced(pangu(dp, mp, vocab_emb_dp), 8)
    stage = Mesh((dp * mp,), ("devices",))
    plan = plan_shardings(graph, "semi_auto_parallel", stage, full_batch)
    path = tmp_path / "strategy.json"
    save_strategy(path, graph, plan)
    loaded = load_strategy(path, graph, stage)
    assert_same_plan(loaded, plan)
    # the file reads as MindSpore's: one in_strategy per op, (device_matrix, tensor_map) per parameter
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["device_num"]) == ("autopar-strategy", 1, dp * mp)
    for node in graph.nodes:
        entry = doc["ops"][node.name]
        assert (entry["scope"], entry["kind"]) == (node.scope, node.prim.kind)
        assert tuple(map(tuple, entry["strategy"])) == plan.shardings[node.id].splits()
    for v, p in zip(graph.params, graph.param_objs):
        matrix, tensor_map = plan.layouts[v].to_mindspore()
        ms = doc["parameters"][p.name]["layout"]["mindspore"]
        assert ms["device_matrix"] == list(matrix)
        assert [tuple(e) if isinstance(e, list) else e for e in ms["tensor_map"]] == list(tensor_map)
    if mp > 1:  # Megatron's column-parallel dense1: its (out, in) weight split mp ways on out
        assert doc["ops"]["blocks.0.attention.dense1/MatMul"]["strategy"] == [[dp, 1], [mp, 1]]
    # saving the loaded plan writes the same bytes
    again = tmp_path / "again.json"
    save_strategy(again, graph, loaded)
    assert again.read_bytes() == path.read_bytes()


def test_a_loaded_plan_overrides_the_networks_annotations(tmp_path):
    stage = Mesh((4,), ("devices",))
    annotated = traced(pangu(2, 2), 4)
    bare = traced(pangu(2, 2, annotated=False), 4)
    assert not any(n.prim.strategy for n in bare.nodes)
    plan = plan_shardings(annotated, "semi_auto_parallel", stage, True)
    save_strategy(tmp_path / "s.json", annotated, plan)
    assert_same_plan(load_strategy(tmp_path / "s.json", bare, stage), plan)
    # without the file the bare network plans otherwise (everything replicated)
    own = plan_shardings(bare, "semi_auto_parallel", stage, True)
    assert own.shardings != plan.shardings


def test_predicted_figures_are_written_under_predicted(tmp_path):
    graph = traced(pangu(2, 2), 4)
    stage = Mesh((4,), ("devices",))
    plan = plan_shardings(graph, "semi_auto_parallel", stage)
    predicted = {"step_seconds": np.float64(0.125), "memory_bytes_per_rank": 3 * 2 ** 20,
                 "breakdown": {"compute_s": 0.1, "comm_s": np.float32(0.5)}}
    save_strategy(tmp_path / "s.json", graph, plan, predicted)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["predicted"] == {"step_seconds": 0.125, "memory_bytes_per_rank": 3 * 2 ** 20,
                                "breakdown": {"compute_s": 0.1, "comm_s": 0.5}}
    assert_same_plan(load_strategy(tmp_path / "s.json", graph, stage), plan)


def test_every_rank_writing_at_once_leaves_one_whole_file(tmp_path):
    graph = traced(pangu(2, 2), 4)
    stage = Mesh((4,), ("devices",))
    plan = plan_shardings(graph, "semi_auto_parallel", stage)
    path = tmp_path / "s.json"
    threads = [threading.Thread(target=save_strategy, args=(path, graph, plan)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert os.listdir(tmp_path) == ["s.json"]
    good = path.read_bytes()
    # a save that fails leaves the previous file intact and no temporary file
    with pytest.raises(ValueError, match="predicted: expected finite numbers"):
        save_strategy(path, graph, plan, {"step_seconds": float("nan")})
    assert os.listdir(tmp_path) == ["s.json"] and path.read_bytes() == good
    assert_same_plan(load_strategy(path, graph, stage), plan)


def test_wrong_argument_types_are_type_errors(tmp_path):
    graph = traced(pangu(), 4)
    plan = plan_shardings(graph, "stand_alone", Mesh((1,)))
    with pytest.raises(TypeError, match="path"):
        save_strategy(3, graph, plan)
    with pytest.raises(TypeError, match="predicted"):
        save_strategy(tmp_path / "s.json", graph, plan, predicted=[1.0])
    with pytest.raises(TypeError, match="stage"):
        load_strategy(tmp_path / "s.json", graph, 4)


class RuleLess(ops.GeLU):
    """GeLU without a sharding rule: the planner runs it replicated."""

    def indexing(self, specs, out):
        return None


class RuleLessNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(nn.Normal(0.5), (8, 6), "float64", name="w")
        self.mm = ops.MatMul().shard(((2, 1), (1, 2)))
        self.act = RuleLess()

    def construct(self, x):
        return self.act(self.mm(x, self.w))


def test_an_op_without_a_rule_round_trips_replicated_and_cannot_be_split(tmp_path):
    graph = trace(RuleLessNet(), (np.ones((4, 8)),), {}).graph
    plan = plan_shardings(graph, "semi_auto_parallel", STAGE)
    path = tmp_path / "s.json"
    save_strategy(path, graph, plan)
    assert_same_plan(load_strategy(path, graph, STAGE), plan)
    doc = json.loads(path.read_text())
    name = "RuleLessNet/RuleLess"
    assert doc["ops"][name]["axes"] == {} and doc["ops"][name]["strategy"] == [[1, 1]]
    doc["ops"][name]["axes"] = {"a": [0]}  # its first input letter
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"ops\\['{name}'\\].axes\\['a'\\]: expected no mesh axes"):
        load_strategy(path, graph, STAGE)


# ---- training from a loaded plan ------------------------------------------------------------

def sharded_loss_and_grads(annotated: bool, **files):
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True, **files)

    def body(comm):
        net = pangu(2, 2, annotated=annotated)
        prog = ShardedGradProgram(net, (IDS[4],), net.trainable_params(), "semi_auto_parallel", comm,
                                  full_batch=True, ctx=ctx)
        loss, grads = prog((IDS[4],))
        return loss, prog.gathered(grads), prog.plan
    return run_in_process(4, body)


def train_steps(net, steps=3):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    train = nn.TrainOneStepCell(net, opt, clip_norm=0.5)
    return [float(train(IDS[4])) for _ in range(steps)]


def trained_losses(annotated: bool, **files):
    def body(comm):
        with bound_world(comm):
            return train_steps(pangu(2, 2, annotated=annotated))
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True, **files):
        return run_in_process(4, body)


def test_an_unannotated_network_loading_the_file_computes_what_the_annotated_one_did(tmp_path):
    serial_loss, serial_grads = autopar.value_and_grad(pangu())(IDS[4])
    path = str(tmp_path / "dp2_mp2.json")
    saved = sharded_loss_and_grads(True, strategy_ckpt_save_file=path)
    loaded = sharded_loss_and_grads(False, strategy_ckpt_load_file=path)
    for (loss_a, grads_a, plan_a), (loss_b, grads_b, plan_b) in zip(saved, loaded):
        assert_same_plan(plan_b, plan_a)
        np.testing.assert_array_equal(loss_b, loss_a)
        for ga, gb, name in zip(grads_a, grads_b, serial_grads):
            np.testing.assert_array_equal(gb, ga, err_msg=name)
            np.testing.assert_allclose(ga, serial_grads[name], rtol=1e-5, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(loss_a, serial_loss, rtol=1e-5)
    assert any(s.mesh.shape != (4,) for s in saved[0][2].shardings.values())  # really model-parallel


def test_training_losses_with_a_saved_plan_equal_the_run_that_saved_it(tmp_path):
    path = str(tmp_path / "train.json")
    serial = train_steps(pangu())
    saved = trained_losses(True, strategy_ckpt_save_file=path)
    loaded = trained_losses(False, strategy_ckpt_load_file=path)
    assert loaded == saved
    np.testing.assert_allclose(saved[0], serial, rtol=1e-5)


# ---- malformed files ------------------------------------------------------------------------

STAGE = Mesh((4,), ("devices",))


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(graph, plan, saved file content) of PanGu-α tiny under dp=2 x mp=2."""
    graph = traced(pangu(2, 2), 4)
    plan = plan_shardings(graph, "semi_auto_parallel", STAGE)
    path = tmp_path_factory.mktemp("valid") / "s.json"
    save_strategy(path, graph, plan)
    return graph, plan, json.loads(path.read_text())


def op_with(graph, kind):
    return next(n for n in graph.nodes if n.prim.kind == kind)


def fixed_letter(graph, kind):
    node = op_with(graph, kind)
    indexing = node.prim.indexing([graph.spec(v) for v in node.inputs], graph.spec(node.outputs[0]))
    return node.name, min(indexing.fixed)


MATMUL = "blocks.0.attention.dense1/MatMul"
GELU = "blocks.0.output/GeLU"
WEIGHT = "blocks.0.attention.dense1.weight"


def set_op(name, key, value):
    def edit(doc, graph):
        doc["ops"][name][key] = value
    return edit


def drop_op(doc, graph):
    del doc["ops"][MATMUL]


def rename_op(doc, graph):
    doc["ops"]["blocks.9.attention.dense1/MatMul"] = doc["ops"].pop(MATMUL)


def split_fixed(doc, graph):
    name, ch = fixed_letter(graph, "Softmax")
    doc["ops"][name]["axes"] = {ch: [0]}


def other_output_layout(doc, graph):
    layout = doc["ops"][GELU]["output_layout"]
    layout["dims"] = [[1], [], [0]]
    del layout["mindspore"]  # optional; when present it must agree with dims


def two_stages(doc, count=2, **changes):
    """``doc`` made a version-2 file of ``count`` copies of its plan (``changes`` to each)."""
    body = {k: v for k, v in doc.items() if k not in ("format", "version")} | changes
    doc.clear()
    doc.update(format="autopar-strategy", version=2, device_num=4 * count, pipeline_stages=count,
               stages=[body] * count)


def param_layout(key, value):
    def edit(doc, graph):
        doc["parameters"][WEIGHT]["layout"][key] = value
    return edit


CASES = {
    "not JSON": (lambda doc, graph: "{ops: [", "JSON"),
    "empty": (lambda doc, graph: "", "JSON"),
    "deeply nested": (lambda doc, graph: "[" * 100_000 + "]" * 100_000, "JSON"),
    "NaN": (lambda doc, graph: json.dumps(doc).replace('"version": 1', '"version": NaN'), "JSON"),
    "a list": (lambda doc, graph: [doc], "a JSON object"),
    "other format": (lambda doc, graph: doc.update(format="mindspore"), "format"),
    "version 3": (lambda doc, graph: doc.update(version=3), "version: expected 1 or 2, got 3"),
    "version 2 without stages": (lambda doc, graph: doc.update(version=2), "got no 'pipeline_stages'"),
    "version 2 of two stages": (lambda doc, graph: two_stages(doc), "pipeline_stages: expected 1 (this compile "
                                "has no pipeline), got 2; set pipeline_stages=2"),
    "version 2 stage entry": (lambda doc, graph: two_stages(doc, 1, ops=None), "stages[0]: ops: expected a JSON"),
    "version true": (lambda doc, graph: doc.update(version=True), "version"),
    "no version": (lambda doc, graph: doc.pop("version"), "no 'version'"),
    "unknown key": (lambda doc, graph: doc.update(strategies={}), "only keys"),
    "8 devices": (lambda doc, graph: doc.update(device_num=8), "device_num: expected 4"),
    "stage names": (lambda doc, graph: doc["stage"].update(names=["dp"]), "stage"),
    "op missing": (drop_op, f"1 op(s) missing ['{MATMUL}']"),
    "op not in graph": (rename_op, "blocks.9.attention.dense1/MatMul"),
    "kind": (set_op(MATMUL, "kind", "BatchMatMul"), f"ops['{MATMUL}'].kind: expected 'MatMul'"),
    "scope": (set_op(MATMUL, "scope", "blocks.0"), "scope"),
    "uneven split": (set_op(GELU, "strategy", [[3, 1, 1]]), "divides dim 0"),
    "too many devices": (set_op(GELU, "strategy", [[2, 2, 2]]), "dividing the 4 devices"),
    "strategy vs axes": (set_op(GELU, "strategy", [[1, 1, 1]]), "what device_matrix and axes split"),
    "strategy rank": (set_op(GELU, "strategy", [[2, 1]]), "3 entries, one per dim"),
    "strategy inputs": (set_op(GELU, "strategy", [[2, 1, 2], [1]]), "1 split tuples"),
    "strategy text": (set_op(GELU, "strategy", "((2,1,2),)"), "a JSON list"),
    "strategy float": (set_op(GELU, "strategy", [[2.0, 1, 2]]), "an int >= 1"),
    "strategy zero": (set_op(GELU, "strategy", [[0, 1, 2]]), "an int >= 1"),
    "matrix size": (set_op(GELU, "device_matrix", {"shape": [2, 4], "names": ["a", "b"]}), "4 devices"),
    "matrix names": (set_op(GELU, "device_matrix", {"shape": [2, 2], "names": ["a", "a"]}), "distinct"),
    "matrix ranks": (set_op(GELU, "device_matrix", {"shape": [2, 2], "names": ["a", "b"], "ranks": [0, 1, 2, 5]}),
                     "ranks"),
    "axes letter": (set_op(GELU, "axes", {"z": [0]}), "an index letter"),
    "axes range": (set_op(GELU, "axes", {"a": [0], "c": [2]}), "mesh axes in [0, 2)"),
    "axes shared": (set_op(GELU, "axes", {"a": [0], "c": [0]}), "no other index uses"),
    "fixed split": (split_fixed, "cannot split this index"),
    "output layout": (lambda doc, graph: doc["ops"][GELU]["output_layout"].update(partial=[1]),
                      "output_layout: Layout: each mesh axis may split one dim or be partial"),
    "output layout vs sharding": (other_output_layout, "output_layout: expected [S(a), R, S(c)] on Mesh(a=2, c=2)"),
    "param missing": (lambda doc, graph: doc["parameters"].pop(WEIGHT), f"parameters['{WEIGHT}']"),
    "param unknown": (lambda doc, graph: doc["parameters"].update(extra=None), "parameters['extra']"),
    "param shape": (lambda doc, graph: doc["parameters"][WEIGHT].update(shape=[32, 64]), "shape"),
    "param dims": (param_layout("dims", [[5], []]), "mesh axis 5"),
    "input uneven": (lambda doc, graph: doc["inputs"][0].update(layout={
        "device_matrix": {"shape": [4], "names": ["data"]}, "dims": [[], [0]], "partial": []}), "divisible"),
    "tensor_map": (param_layout("mindspore", {"device_matrix": [2, 2], "tensor_map": [-1, -1]}), "mindspore"),
    "inputs": (lambda doc, graph: doc["inputs"].append(None), "inputs: expected 1 graph inputs"),
    "constants": (lambda doc, graph: doc["constants"].pop(), "constants"),
    "predicted": (lambda doc, graph: doc.update(predicted=[1.0]), "predicted"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_file_is_a_value_error_naming_the_entry(valid, tmp_path, case):
    graph, _, doc = valid
    doc = copy.deepcopy(doc)
    edit, fragment = CASES[case]
    result = edit(doc, graph)
    text = result if isinstance(result, str) else json.dumps(result if isinstance(result, list) else doc)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_strategy(path, graph, STAGE)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_a_missing_file_is_a_value_error(valid, tmp_path):
    with pytest.raises(ValueError, match="readable"):
        load_strategy(tmp_path / "nowhere.json", valid[0], STAGE)


def test_a_file_for_another_model_asks_to_re_save(valid, tmp_path):
    graph, plan, _ = valid
    save_strategy(tmp_path / "s.json", graph, plan)
    other = traced(pangu(2, 2, num_layers=2), 4)
    with pytest.raises(ValueError, match="re-save it with strategy_ckpt_save_file"):
        load_strategy(tmp_path / "s.json", other, STAGE)


# ---- random corruption ----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 9), st.floats(-2, 9, allow_nan=False), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6)


def paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from paths(child, prefix + (key,))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A one-layer model under dp=2 x mp=2: its saved content and every path into it."""
    graph = traced(pangu(2, 2, num_layers=1), 4)
    path = tmp_path_factory.mktemp("small") / "s.json"
    save_strategy(path, graph, plan_shardings(graph, "semi_auto_parallel", STAGE))
    doc = json.loads(path.read_text())
    return graph, doc, list(paths(doc))[1:], tmp_path_factory.mktemp("corrupt") / "bad.json"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruptions_only_raise_value_errors(small, data):
    graph, doc, all_paths, path = small
    doc = copy.deepcopy(doc)
    rng = data.draw(st.randoms(use_true_random=True))  # uniform over paths: most lie inside ops
    for _ in range(data.draw(st.integers(1, 3))):
        where = rng.choice(all_paths)
        parent = doc
        try:
            for key in where[:-1]:
                parent = parent[key]
            parent[where[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier corruption removed this path
        action = data.draw(st.sampled_from(["replace", "delete", "nudge"]))
        if action == "delete":
            del parent[where[-1]]
        elif action == "nudge" and isinstance(parent[where[-1]], int):
            parent[where[-1]] += data.draw(st.sampled_from([-2, -1, 1, 2]))
        else:
            parent[where[-1]] = data.draw(JSON_VALUES)
    text = json.dumps(doc)
    if data.draw(st.booleans()):  # and sometimes damage the text itself
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + data.draw(st.sampled_from(["", "}", "]", ",", '"', "x", "\u00e9"])) + text[cut + 1:]
    path.write_text(text, encoding="utf-8")
    try:
        plan = load_strategy(path, graph, STAGE)
    except ValueError:
        return
    assert isinstance(plan, ShardingPlan) and len(plan.shardings) == len(graph.nodes)

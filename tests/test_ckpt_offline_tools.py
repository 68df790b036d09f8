"""MindSpore's offline checkpoint tools on autopar's files (issue 16): build_searched_strategy
gives the layouts the plan used, merge_sliced_parameter rebuilds known arrays and refuses
disagreeing replicas, transform_checkpoints turns a dp2 x mp2 checkpoint into an mp4 or a
serial one (every tensor bit for bit, the same loss on load, the files an mp4 save writes)
and never replaces a good checkpoint with a partial one.

Sharded runs use in-process ranks (threads) on the tiny PanGu-α.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.layout import Layout
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.nn.parameter import Parameter
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt
from autopar.train.checkpoint import ParameterLayout

CONFIG = PanguAlphaConfig.preset("tiny")      # hidden 32, vocab 96, float32
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(2)]
SPLIT = "blocks.0.attention.dense1.weight"    # (32, 32), split over mp
MP4 = CONFIG.replace(model_parallel=4)


def trainer(cfg=CONFIG):
    net = PanguAlphaWithLoss(cfg)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(net, opt, clip_norm=1.0)


def sharded(n, body, strategy_file):
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, full_batch=True,
                          strategy_ckpt_save_file=strategy_file):
        return run_in_process(n, body)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def pieces(path) -> dict:
    """{tensor: (layout, [(file, key, region)])}: where a checkpoint keeps each block."""
    _, manifest = ckpt.read_manifest(path)
    return {n: (e["layout"], sorted((p["file"], p["key"], str(p["region"])) for p in e["pieces"]))
            for n, e in manifest["tensors"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dp2 x mp2 checkpoint after one step with its strategy file, and a serial one."""
    root = tmp_path_factory.mktemp("offline")
    src, strategy = str(root / "dp2mp2"), str(root / "dp2mp2.json")

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(data_parallel=2, model_parallel=2))
            train(BATCHES[0])
            ckpt.save_checkpoint(train, src)
    sharded(4, body, strategy)
    train = trainer()
    train(BATCHES[0])
    serial = ckpt.save_checkpoint(train, root / "serial")
    return root, src, strategy, serial


# ---- build_searched_strategy ----------------------------------------------------------------

def test_build_searched_strategy_gives_the_layouts_the_plan_used(runs):
    _, src, strategy, _ = runs
    layouts = ckpt.build_searched_strategy(strategy)
    _, manifest = ckpt.read_manifest(src)
    params = {n: e for n, e in manifest["tensors"].items() if e["kind"] == "parameter"}
    assert set(layouts) == set(params)
    for name, e in params.items():      # the layout each rank held when it saved
        entry = layouts[name]
        assert {"device_matrix": list(entry.device_matrix), "tensor_map": list(entry.tensor_map),
                "ranks": list(entry.ranks)} == e["layout"], name
        region = e["pieces"][0]["region"]
        assert entry.slice_shape == tuple(b - a for a, b in region), name
        assert entry.shape == tuple(e["shape"])
    w = layouts[SPLIT]                  # (out, in) weight, rows split over mp of (dp=2, mp=2)
    assert (w.device_matrix, w.tensor_map, w.dims, w.slice_shape) == ((2, 2), (0, -1), ((1,), ()), (16, 32))
    assert [tuple((s.start, s.stop) for s in w.region(r)) for r in w.ranks] == \
        [((0, 16), (0, 32)), ((16, 32), (0, 32))] * 2
    assert layouts["blocks.0.layernorm1.gamma"].slice_shape == (32,)        # replicated
    with pytest.raises(TypeError, match="build_searched_strategy: strategy_filename: expected a str"):
        ckpt.build_searched_strategy(3)


def test_a_file_that_is_not_a_strategy_names_itself(runs, tmp_path):
    _, _, strategy, _ = runs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mindspore", "version": 1}))
    with pytest.raises(ValueError, match=rf"strategy file '{bad}': format: expected 'autopar-strategy'"):
        ckpt.build_searched_strategy(bad)
    doc = json.loads(Path(strategy).read_text())
    doc["parameters"][SPLIT]["layout"]["partial"] = [0]
    doc["parameters"][SPLIT]["layout"]["dims"] = [[1], []]
    del doc["parameters"][SPLIT]["layout"]["mindspore"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"parameters\['{SPLIT}'\].layout.partial: expected \[\]"):
        ckpt.build_searched_strategy(bad)


# ---- merge_sliced_parameter -----------------------------------------------------------------

def arange_layout():
    """A (8, 4) weight, dim 1 split over mp of Mesh(dp=2, mp=2): the module docstring's example."""
    layout = Layout(Mesh((2, 2), ("dp", "mp")), ((), (1,)))
    return np.arange(32, dtype=np.float32).reshape(8, 4), ParameterLayout("w", (8, 4), layout)


def test_merge_sliced_parameter_rebuilds_a_known_array():
    whole, entry = arange_layout()
    slices = [entry.layout.shard(whole, r) for r in range(4)]
    assert (entry.device_matrix, entry.tensor_map, entry.slice_shape) == ((2, 2), (-1, 0), (8, 2))
    merged = ckpt.merge_sliced_parameter(slices, entry)
    assert isinstance(merged, Parameter) and merged.name == "w"
    assert merged.asnumpy().tobytes() == whole.tobytes()
    named = [Parameter(s, name="w") for s in slices]      # MindSpore's form: Parameters and the whole dict
    assert ckpt.merge_sliced_parameter(named, {"w": entry}).asnumpy().tobytes() == whole.tobytes()
    # no strategy: concatenated along dim 0, as MindSpore's example (4 slices of (3,) -> (12,))
    parts = [np.arange(3.0) + 3 * k for k in range(4)]
    np.testing.assert_array_equal(ckpt.merge_sliced_parameter(parts).asnumpy(), np.arange(12.0))


def test_merge_of_a_checkpoints_slices_by_its_strategy_file(runs):
    _, src, strategy, _ = runs
    values = ckpt.load_checkpoint(src)
    layouts = ckpt.build_searched_strategy(strategy)
    for name in (SPLIT, "blocks.0.attention.projection.weight", "blocks.0.layernorm1.gamma"):
        entry = layouts[name]
        slices = [Parameter(values[name][entry.region(r)], name=name) for r in entry.ranks]
        assert ckpt.merge_sliced_parameter(slices, layouts).asnumpy().tobytes() == values[name].tobytes()


def test_disagreeing_replicas_are_refused_and_nothing_is_changed():
    whole, entry = arange_layout()
    slices = [entry.layout.shard(whole, r) for r in range(4)]
    slices[2] = slices[2] + 1            # rank 2 holds a replica of rank 0's block
    before = [s.copy() for s in slices]
    with pytest.raises(ValueError) as err:
        ckpt.merge_sliced_parameter(slices, entry)
    assert str(err.value) == (
        "merge_sliced_parameter('w'): replicas of block [[0, 8], [0, 2]]: expected equal slices on every rank "
        "holding it, got ranks [0] hold one value and ranks [2] another; merge slices saved by one run at one "
        "step; nothing was merged")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(slices, before))


@pytest.mark.parametrize("change, message", [
    (lambda s: s[:3], "merge_sliced_parameter('w'): sliced_parameters: expected 4 slices, one per rank "
                      "[0, 1, 2, 3] of Mesh(dp=2, mp=2), in rank order, got 3 slices"),
    (lambda s: s[:1] + [s[1][:, :1]] + s[2:], "merge_sliced_parameter('w'): slice 1 (rank 1) shape: "
                                              "expected (8, 2) (global (8, 4) split (1, 2)), got (8, 1)"),
    (lambda s: s[:3] + [s[3].astype(np.float64)], "merge_sliced_parameter('w'): slice dtypes: expected one dtype, "
                                                  "got ['float32', 'float64']"),
])
def test_wrong_slices_name_the_parameter_the_expected_and_the_actual(change, message):
    whole, entry = arange_layout()
    with pytest.raises(ValueError, match=re.escape(message)):
        ckpt.merge_sliced_parameter(change([entry.layout.shard(whole, r) for r in range(4)]), entry)


def test_a_parameter_missing_from_the_strategy_is_a_key_error():
    whole, entry = arange_layout()
    slices = [Parameter(entry.layout.shard(whole, r), name="v") for r in range(4)]
    with pytest.raises(KeyError, match="strategy: expected an entry for parameter 'v', got 1 entries without it"):
        ckpt.merge_sliced_parameter(slices, {"w": entry})
    with pytest.raises(ValueError, match="expected the layout of 'v' .*, got the layout of 'w'"):
        ckpt.merge_sliced_parameter(slices, entry)


# ---- transform_checkpoints ------------------------------------------------------------------

def test_transform_dp2mp2_to_mp4_copies_every_tensor_and_gives_the_same_loss(runs):
    """Transformed to the mp4 plan: every tensor bit for bit, the files an mp4 save writes,
    and loading it onto mp4 gives the loss (and the step) of loading the original."""
    root, src, strategy, _ = runs
    mp4_strategy, resaved = str(root / "mp4.json"), str(root / "mp4_resaved")

    def body(comm):
        with bound_world(comm):
            train = trainer(MP4)
            train.build(BATCHES[1])        # writes the mp4 strategy file
            comm.barrier()
            if comm.rank == 0:
                ckpt.transform_checkpoints(src, root, "mp4", strategy, mp4_strategy)
            comm.barrier()
            ckpt.load_distributed_checkpoint(train, root / "mp4")
            ckpt.save_checkpoint(train, resaved)    # what an mp4 run writes for these values
            from_transformed = float(train(BATCHES[1]))
            ckpt.load_distributed_checkpoint(train, src)
            return from_transformed, float(train(BATCHES[1]))
    losses = sharded(4, body, mp4_strategy)
    assert_bitwise_equal(ckpt.load_checkpoint(root / "mp4"), ckpt.load_checkpoint(src))
    assert pieces(root / "mp4") == pieces(resaved)
    assert len(pieces(root / "mp4")[SPLIT][1]) == 4
    for transformed, original in losses:
        assert transformed == original
    serial = trainer()
    ckpt.load_distributed_checkpoint(serial, src)
    np.testing.assert_allclose(losses[0][0], float(serial(BATCHES[1])), rtol=1e-5)


def test_transform_between_serial_and_sharded(runs):
    """dp2 x mp2 -> serial: one piece per tensor in rank0's file, bit for bit, the same loss
    as loading the original serially; serial -> the dp2 x mp2 plan: the pieces its save wrote."""
    root, src, strategy, serial = runs
    out = ckpt.transform_checkpoints(src, root, "to_serial")
    assert out == str(root / "to_serial")
    assert sorted(os.listdir(out)) == ["manifest.json", "rank0.safetensors"]
    assert_bitwise_equal(ckpt.load_checkpoint(out), ckpt.load_checkpoint(src))
    assert all(layout is None and len(p) == 1 for layout, p in pieces(out).values())
    a, b = trainer(), trainer()
    ckpt.load_distributed_checkpoint(a, out)
    ckpt.load_distributed_checkpoint(b, src)
    assert float(a(BATCHES[1])) == float(b(BATCHES[1]))

    sharded_out = ckpt.transform_checkpoints(serial, root, "serial_on_dp2mp2", None, strategy)
    assert pieces(sharded_out) == pieces(src)
    assert_bitwise_equal(ckpt.load_checkpoint(sharded_out), ckpt.load_checkpoint(serial))
    _, m = ckpt.read_manifest(sharded_out)
    _, original = ckpt.read_manifest(serial)
    assert (m["step"], m["optimizer"], m["config"], m["world_size"]) == \
        (original["step"], original["optimizer"], original["config"], 4)


def test_transform_onto_a_pipeline_writes_what_its_save_writes(runs):
    """dp2 x mp2 -> pp2 x dp2 (blocks on stage 0 = ranks 0, 1; the query layer on stage 1 =
    ranks 2, 3; the tied word table saved from stage 0): the pieces a pipeline save writes, and
    the loss of loading the original."""
    root, src, _, _ = runs
    pp2_strategy, resaved = str(root / "pp2.json"), str(root / "pp2_resaved")
    batch = np.concatenate([BATCHES[1]] * 2)          # 2 micro-batches of 4

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=2))
            nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=2)
            opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
            train = nn.TrainOneStepCell(nn.PipelineCell(net, 2), opt, clip_norm=1.0)
            train.build(batch)
            comm.barrier()
            if comm.rank == 0:
                ckpt.transform_checkpoints(src, root, "pp2", None, pp2_strategy)
            comm.barrier()
            ckpt.load_distributed_checkpoint(train, root / "pp2")
            ckpt.save_checkpoint(train, resaved)
            from_transformed = float(train(batch))
            ckpt.load_distributed_checkpoint(train, src)
            return from_transformed, float(train(batch))
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, pipeline_stages=2, full_batch=True,
                          strategy_ckpt_save_file=pp2_strategy):
        losses = run_in_process(4, body)
    layouts = ckpt.build_searched_strategy(pp2_strategy)
    assert (layouts["word_embedding.embedding_table"].stage, layouts["word_embedding.embedding_table"].ranks) == \
        (0, (0, 1))
    assert (layouts["query_layer.attention.dense1.weight"].stage,
            layouts["query_layer.attention.dense1.weight"].ranks) == (1, (2, 3))
    assert pieces(root / "pp2") == pieces(resaved)
    assert_bitwise_equal(ckpt.load_checkpoint(root / "pp2"), ckpt.load_checkpoint(src))
    assert all(transformed == original for transformed, original in losses)


def copy_checkpoint(src, dst):
    Path(dst).mkdir()
    for f in os.listdir(src):
        Path(dst, f).write_bytes(Path(src, f).read_bytes())
    return str(dst)


def test_a_failed_transform_keeps_the_checkpoint_already_at_the_destination(runs, tmp_path):
    """A corrupt source piece met while writing: the error names it, the good checkpoint at
    the destination is untouched and nothing is left behind."""
    _, src, strategy, serial = runs
    good = ckpt.transform_checkpoints(serial, tmp_path, "out")
    before = {f: Path(good, f).read_bytes() for f in os.listdir(good)}
    broken = copy_checkpoint(src, tmp_path / "broken")
    _, manifest = ckpt.read_manifest(broken)
    piece = manifest["tensors"][SPLIT]["pieces"][1]          # in rank1.safetensors
    data = bytearray(Path(broken, piece["file"]).read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + json.loads(data[8:8 + header])[SPLIT]["data_offsets"][0] + 2] ^= 0x10
    Path(broken, piece["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{broken}/rank1.safetensors: tensor '{SPLIT}': sha256"):
        ckpt.transform_checkpoints(broken, tmp_path, "out", None, strategy)
    assert {f: Path(good, f).read_bytes() for f in os.listdir(good)} == before
    assert sorted(os.listdir(tmp_path)) == ["broken", "out"]       # no temporary, no lock, no backup


def test_a_transform_in_place_rewrites_the_source(runs, tmp_path):
    _, src, strategy, _ = runs
    here = copy_checkpoint(src, tmp_path / "ck")
    assert ckpt.transform_checkpoints(here, tmp_path, "ck", strategy) == here
    assert_bitwise_equal(ckpt.load_checkpoint(here), ckpt.load_checkpoint(src))
    assert all(layout is None for layout, _ in pieces(here).values())
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def edited_strategy(strategy, path, edit):
    doc = json.loads(Path(strategy).read_text())
    edit(doc["parameters"])
    Path(path).write_text(json.dumps(doc))
    return str(path)


def test_strategy_files_that_do_not_fit_the_checkpoint_are_refused(runs, tmp_path):
    root, src, strategy, serial = runs
    with pytest.raises(ValueError, match=rf"transform_checkpoints: src_strategy_file parameter '{SPLIT}': expected "
                       r"the layout the checkpoint records \(whole, unsplit\), got .*tensor_map': \[0, -1\]"):
        ckpt.transform_checkpoints(serial, tmp_path, "x", strategy)
    fewer = edited_strategy(strategy, tmp_path / "fewer.json", lambda p: p.pop(SPLIT))
    with pytest.raises(ValueError, match=rf"dst_strategy_file=.*fewer.json'\): parameters: expected the checkpoint's "
                       rf"parameters exactly, got missing \['{SPLIT}'\], unexpected \[\]; pass the strategy file"):
        ckpt.transform_checkpoints(src, tmp_path, "x", None, fewer)
    wider = edited_strategy(strategy, tmp_path / "wider.json", lambda p: p[SPLIT].update(shape=[64, 32]))
    with pytest.raises(ValueError, match=rf"parameter '{SPLIT}' shape: expected \(32, 32\) \(the checkpoint's\), "
                       r"got \(64, 32\)"):
        ckpt.transform_checkpoints(src, tmp_path, "x", None, wider)
    with pytest.raises(ValueError, match="ckpt_prefix: expected a plain file name"):
        ckpt.transform_checkpoints(src, tmp_path, "../up")
    Path(tmp_path, "file").write_text("")
    with pytest.raises(NotADirectoryError, match="dst_checkpoints_dir: expected a directory"):
        ckpt.transform_checkpoints(src, tmp_path / "file", "x")
    Path(tmp_path, "taken").mkdir()
    with pytest.raises(ValueError, match="exists without a manifest.json"):
        ckpt.transform_checkpoints(src, tmp_path, "taken")
    assert sorted(os.listdir(tmp_path)) == ["fewer.json", "file", "taken", "wider.json"]

"""MindSpore .ckpt files: a file built to checkpoint.proto's layout by an encoder written
here (not autopar's writer) reads back exactly; writer -> reader round trips every dtype;
corrupt files give errors naming the file, the tag and the numbers; PanGu-α weights go
autopar -> .ckpt (MindSpore names and layouts) -> autopar checkpoint and give the same loss
bit for bit, serially and under a dp1 x mp2 plan."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt
from autopar.train.checkpoint import mindspore_ckpt as ms

CONFIG = PanguAlphaConfig.preset("tiny")
BATCH = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


# ---- an independent protobuf encoder, written from checkpoint.proto ---------------------------

def varint(n):
    n &= 2**64 - 1
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        out += bytes([low | (0x80 if n else 0)])
        if not n:
            return out


def field(number, wire, payload):
    """One field: key, then a varint (wire 0) or a length and bytes (wire 2)."""
    key = varint(number * 8 + wire)
    return key + (varint(payload) if wire == 0 else varint(len(payload)) + payload)


def value(tag, dims, tensor_type, content, packed=False, extra=b""):
    """Checkpoint.value (field 1) holding Value{tag = 1, tensor = 2{dims = 1, type = 2, content = 3}}."""
    if packed:
        dim_fields = field(1, 2, b"".join(varint(d) for d in dims))
    else:
        dim_fields = b"".join(field(1, 0, d) for d in dims)
    tensor = dim_fields + field(2, 2, tensor_type.encode()) + field(3, 2, content)
    return field(1, 2, field(1, 2, tag.encode()) + field(2, 2, tensor) + extra)


def test_a_file_built_to_the_layout_reads_back_exactly(tmp_path):
    w = np.arange(6, dtype="<f4").reshape(2, 3) / 8
    half = np.array([[1.5, -2.0]], dtype="<f2")
    data = (value("w", [2, 3], "Float32", w.tobytes())
            + value("half", [1, 2], "Float16", half.tobytes(), packed=True)
            + value("step", [0], "Int32", struct.pack("<i", 7), extra=field(9, 0, 5))   # unknown field: skipped
            + value("big", [4], "Int64", struct.pack("<2q", 1, 2))                        # one tensor in two slices
            + value("big", [4], "Int64", struct.pack("<2q", 3, -4))
            + value("flags", [3], "Bool", bytes([1, 0, 1]))
            + value("u", [2], "Uint8", bytes([200, 3]))                                   # MindSpore 1.x spelling
            + value("bf", [2], "BFloat16", np.array([1.0, -0.5], ml_dtypes.bfloat16).tobytes())
            + value("note", [0], "str", b"hello"))                                       # append_dict text
    (tmp_path / "a.ckpt").write_bytes(data)
    got = ms.load_mindspore_ckpt(tmp_path / "a.ckpt")
    assert list(got) == ["w", "half", "step", "big", "flags", "u", "bf", "note"]
    assert got["note"].shape == () and got["note"].item() == b"hello"
    np.testing.assert_array_equal(got["w"], w)
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["half"], half)
    assert got["half"].dtype == np.float16
    assert got["step"].shape == () and got["step"] == 7 and got["step"].dtype == np.int32
    np.testing.assert_array_equal(got["big"], [1, 2, 3, -4])
    np.testing.assert_array_equal(got["flags"], [True, False, True])
    assert got["u"].dtype == np.uint8 and got["u"].tolist() == [200, 3]
    assert got["bf"].dtype == ml_dtypes.bfloat16 and got["bf"].astype(np.float32).tolist() == [1.0, -0.5]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "bfloat16", "float64", "int64", "uint8", "bool"])
def test_writer_reader_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    arrays = {"a.weight": (rng.standard_normal((3, 5)) * 100).astype(dtype),
              "scalar": np.array(3, dtype=dtype), "one": np.ones((1,), dtype)}
    path = ms.save_mindspore_ckpt(tmp_path / "r.ckpt", arrays)
    got = ms.load_mindspore_ckpt(path)
    assert list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        assert got[k].tobytes() == a.tobytes(), k          # bit for bit (NaN-safe)


def test_the_writer_writes_the_layout_mindspore_writes(tmp_path):
    """Byte for byte what the independent encoder gives: unpacked dims, [0] for a scalar."""
    w = np.arange(4, dtype=np.float32).reshape(2, 2)
    path = ms.save_mindspore_ckpt(tmp_path / "w.ckpt", {"w": w, "s": np.array(2.5, np.float16)})
    want = value("w", [2, 2], "Float32", w.tobytes()) + value("s", [0], "Float16", np.float16(2.5).tobytes())
    assert (tmp_path / "w.ckpt").read_bytes() == want
    assert not (tmp_path / "w.ckpt.part").exists() and path == str(tmp_path / "w.ckpt")


def test_large_tensors_are_split_into_slices_of_one_tag(tmp_path, monkeypatch):
    monkeypatch.setattr(ms, "SLICE_BYTES", 16)
    a = np.arange(10, dtype=np.float32)                  # 40 bytes -> 3 Values
    bf = np.arange(7).astype(ml_dtypes.bfloat16)          # 14 bytes -> 1 Value, never split inside an element
    arrays = {"a": a, "b": np.ones(2, np.int32), "bf": bf, "empty": np.ones((0, 5), np.float32)}
    ms.save_mindspore_ckpt(tmp_path / "s.ckpt", arrays)
    raw = (tmp_path / "s.ckpt").read_bytes()
    assert raw.count(field(1, 2, b"a")) == 3
    # np.array_split's pieces, as MindSpore's _exec_save cuts them: 4, 3, 3 elements
    assert raw.startswith(b"".join(value("a", [10], "Float32", a[i:j].tobytes()) for i, j in ((0, 4), (4, 7), (7, 10))))
    got = ms.load_mindspore_ckpt(tmp_path / "s.ckpt")
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k


# ---- corrupt files ------------------------------------------------------------------------------

def test_a_truncated_file_names_the_file_and_the_last_good_tag(tmp_path):
    data = value("first", [2], "Float32", b"\0" * 8) + value("second", [3], "Float32", b"\0" * 12)
    path = tmp_path / "t.ckpt"
    for cut in (len(data) - 1, len(data) - 13, len(value("first", [2], "Float32", b"\0" * 8)) + 3):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"t\.ckpt: contents: .*ends inside a field after tag 'first'.*truncated"):
            ms.load_mindspore_ckpt(path)


@pytest.mark.parametrize("case, message", [
    (value("w", [2, 3], "Float32", b"\0" * 20), r"tag 'w': tensor_content: expected 24 bytes \(Float32 x dims \[2, 3\]\), "
                                                 r"got 20 bytes"),
    (value("w", [2], "Complex64", b"\0" * 16), r"tag 'w': tensor_type: expected one of .*'Float32'.*got 'Complex64'"),
    (value("w", [2], "Int32", b"\0" * 8) + value("v", [1], "Int32", b"\0" * 4) + value("w", [2], "Int32", b"\0" * 8),
     r"tag 'w': tag: expected each tag once"),
    (field(1, 2, field(1, 2, b"m") + field(3, 2, b"")), r"tag 'm': value: expected a TensorProto.*MapTensorProto"),
    (field(1, 2, field(1, 2, b"w") + field(2, 2, field(2, 2, b"Float32"))), r"tag 'w': TensorProto: .*no tensor_content"),
    (b"\x0f\x00\x00", r"contents: expected a MindSpore checkpoint \(protobuf\), got wire type 7"),
    (b"", r"contents: expected a MindSpore checkpoint, got an empty file"),
])
def test_corrupt_files_are_named_errors(tmp_path, case, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(case)
    with pytest.raises(ValueError, match=r"bad\.ckpt.*" + message):
        ms.load_mindspore_ckpt(path)


def test_the_writer_refuses_what_mindspore_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"tag 'c': dtype: expected one of .*got complex64"):
        ms.save_mindspore_ckpt(tmp_path / "c.ckpt", {"ok": np.ones(2), "c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match=r"tag 'e': shape: expected not \(0,\)"):
        ms.save_mindspore_ckpt(tmp_path / "c.ckpt", {"e": np.ones(0)})
    assert not list(tmp_path.iterdir())                  # nothing left behind, not even the .part file


# ---- PanGu-α names ------------------------------------------------------------------------------

def test_the_name_table_covers_the_model_exactly():
    params = PanguAlphaWithLoss(CONFIG).parameters_dict()
    rows = ms.pangu_names(CONFIG)
    assert {r.autopar: r.shape for r in rows} == {n: tuple(p.shape) for n, p in params.items()}
    by_ms = {r.mindspore: r for r in rows}
    h, f = CONFIG.hidden_size, CONFIG.ffn_hidden_size
    assert by_ms["backbone.blocks.0.attention.dense1.weight"].mindspore_shape == (h, h)
    assert not by_ms["backbone.blocks.0.attention.dense1.weight"].transposed       # nn.Dense: (out, in)
    assert by_ms["backbone.blocks.1.output.mapping.weight"].mindspore_shape == (h, f)      # Mapping: (in, out)
    assert by_ms["backbone.top_query_layer.output.projection.weight"].mindspore_shape == (f, h)
    assert by_ms["backbone.top_query_embedding.embedding_table"].autopar == \
        "query_layer.top_query_embedding.embedding_table"
    assert by_ms["backbone.layernorm.gamma"].autopar == "final_layernorm.gamma"


def loss_of(net) -> np.ndarray:
    return np.asarray(net(BATCH))


def fresh():
    net = PanguAlphaWithLoss(CONFIG)
    net.init_parameters_data(seed=11)
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny PanGu-α, its loss, and its weights exported to a .ckpt with MindSpore's names."""
    root = tmp_path_factory.mktemp("ms")
    net = PanguAlphaWithLoss(CONFIG)
    net.init_parameters_data(seed=3)
    loss = loss_of(net)
    path = ms.export_mindspore_ckpt(net, root / "pangu.ckpt")
    values = {n: p.asnumpy() for n, p in net.parameters_dict().items()}
    return root, loss, path, values


def test_export_writes_mindspore_names_and_layouts(exported):
    _, _, path, values = exported
    arrays = ms.load_mindspore_ckpt(path)
    assert set(arrays) == {r.mindspore for r in ms.pangu_names(CONFIG)}
    np.testing.assert_array_equal(arrays["backbone.blocks.0.attention.dense1.weight"],
                                  values["blocks.0.attention.dense1.weight"])
    np.testing.assert_array_equal(arrays["backbone.blocks.0.output.mapping.weight"],
                                  values["blocks.0.output.mapping.weight"].T)
    np.testing.assert_array_equal(arrays["backbone.word_embedding.embedding_table"],
                                  values["word_embedding.embedding_table"])


def test_a_converted_ckpt_gives_the_same_loss_as_the_safetensors_copy(exported, tmp_path):
    _, loss, path, values = exported
    net = fresh()
    assert loss_of(net) != loss                                        # the test can fail
    report = ms.convert_mindspore_ckpt(path, tmp_path / "converted", CONFIG)
    assert report["dropped"] == [] and len(report["tensors"]) == len(values)
    ckpt.load_distributed_checkpoint(net, report["path"])
    assert loss_of(net).tobytes() == loss.tobytes()                    # bit for bit
    assert ckpt.read_config(report["path"], PanguAlphaConfig) == CONFIG
    source = PanguAlphaWithLoss(CONFIG)                                # the safetensors copy of the same weights
    ckpt.load_param_into_net(source, values)
    copy = fresh()
    ckpt.load_distributed_checkpoint(copy, ckpt.save_checkpoint(source, tmp_path / "safetensors"))
    assert loss_of(copy).tobytes() == loss_of(net).tobytes()


def test_a_converted_ckpt_loads_under_dp1_mp2_with_the_serial_loss(exported, tmp_path):
    _, loss, path, _ = exported
    target = ms.convert_mindspore_ckpt(path, tmp_path / "converted", CONFIG)["path"]

    def trainer(cfg):
        net = PanguAlphaWithLoss(cfg)
        net.init_parameters_data(seed=11)
        return nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))

    serial = trainer(CONFIG)
    ckpt.load_distributed_checkpoint(serial, target)
    want = float(serial(BATCH))
    assert want == float(loss)                                          # the exported model's loss

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(model_parallel=2))
            ckpt.load_distributed_checkpoint(train, target, inputs=(BATCH,))
            shard = train.optimizer.params[4]                           # a weight split over mp
            return float(train(BATCH)), tuple(shard.data.shape), tuple(shard.param.shape)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        res = run_in_process(2, body)
    for loss, local, whole in res:
        assert local != whole                                           # really sharded
        np.testing.assert_allclose(loss, want, rtol=1e-6)


# ---- other MindSpore versions' names, training state, mistakes ----------------------------------

def test_model_zoo_training_names_and_training_state(exported):
    """The model zoo's training save: the word table at the top level, the position table
    under backbone.embedding.embedding, the query table as backbone.top_query_embedding_table,
    the pipeline model's query layer as the last block, plus Adam moments and counters."""
    _, _, path, _ = exported
    arrays = ms.load_mindspore_ckpt(path)
    renamed = {"embedding_table": "backbone.word_embedding.embedding_table",
               "backbone.embedding.embedding.position_embedding.embedding_table":
                   "backbone.position_embedding.embedding_table",
               "backbone.top_query_embedding_table": "backbone.top_query_embedding.embedding_table"}
    legacy = {old: arrays[new] for old, new in renamed.items()}
    last = f"backbone.blocks.{CONFIG.num_layers - 1}."
    legacy |= {k.replace("backbone.top_query_layer.", last): a for k, a in arrays.items()
               if k not in renamed.values()}
    state = {"adam_m.backbone.layernorm.gamma": np.ones(CONFIG.hidden_size, np.float32),
             "global_step": np.array(5, np.int32), "scale_sense": np.array(1024.0, np.float32),
             "backbone.blocks.0.key_past": np.zeros((1, 2), np.float16), "note": np.array(b"run 7")}
    got = ms.pangu_from_mindspore(legacy | state, CONFIG)
    want = ms.pangu_from_mindspore(arrays, CONFIG)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert ms.split_training_state(legacy | state)[1] == list(state)


def test_mistakes_name_the_tensors(exported):
    _, _, path, _ = exported
    arrays = ms.load_mindspore_ckpt(path)
    with pytest.raises(ValueError, match=r"tensor 'backbone.word_embedding.embedding_table': expected one entry, "
                                         r"got two: 'backbone.word_embedding.embedding_table' and 'embedding_table'"):
        ms.pangu_from_mindspore(arrays | {"embedding_table": arrays["backbone.word_embedding.embedding_table"]},
                                CONFIG)
    fewer = {k: a for k, a in arrays.items() if k != "backbone.layernorm.beta"} | {"head.weight": np.ones(2)}
    with pytest.raises(ValueError, match=r"missing \['backbone.layernorm.beta'\], unexpected \['head.weight'\]"):
        ms.pangu_from_mindspore(fewer, CONFIG)
    partial = ms.pangu_from_mindspore(fewer, CONFIG, strict=False)
    assert "final_layernorm.beta" not in partial and len(partial) == len(arrays) - 1
    deeper = CONFIG.replace(num_layers=CONFIG.num_layers + 1)          # the wrong config: one block more
    with pytest.raises(ValueError, match=rf"missing \['backbone.blocks.{CONFIG.num_layers - 1}.layernorm1.gamma'"):
        ms.pangu_from_mindspore(arrays, deeper)
    shallower = CONFIG.replace(num_layers=CONFIG.num_layers - 1)       # one block fewer: not read as a query layer
    with pytest.raises(ValueError, match=rf"missing \[\], unexpected \['backbone.blocks.{CONFIG.num_layers - 2}."):
        ms.pangu_from_mindspore(arrays, shallower)
    name = "backbone.blocks.0.attention.dense1.weight"
    sliced = arrays | {name: arrays[name][: CONFIG.hidden_size // 2]}  # one rank's slice of mp=2
    with pytest.raises(ValueError, match=rf"tensor '{name}' shape: expected \(32, 32\).*got \(16, 32\).*"
                                         "one rank's slice.*transform_checkpoints"):
        ms.pangu_from_mindspore(sliced, CONFIG)
    with pytest.raises(ValueError, match=r"pangu_to_mindspore: tensor names: .*unexpected \['moment1.x'\]"):
        ms.pangu_to_mindspore({"moment1.x": np.ones(1)}, CONFIG)


def test_float16_export_from_a_checkpoint_directory(exported, tmp_path):
    """The released weights are float16: export an autopar checkpoint (its config read from
    the manifest) as float16; converting back gives float32 parameters equal to the rounded values."""
    _, _, _, values = exported
    source = PanguAlphaWithLoss(CONFIG)
    ckpt.load_param_into_net(source, values)
    directory = ckpt.save_checkpoint(source, tmp_path / "ck")
    path = ms.export_mindspore_ckpt(directory, tmp_path / "half.ckpt", dtype="float16")
    arrays = ms.load_mindspore_ckpt(path)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float16)}
    back = ms.pangu_from_mindspore(arrays, CONFIG)
    for name, want in values.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], want.astype(np.float16).astype(np.float32), err_msg=name)


def test_command_line_round_trip(exported, tmp_path, capsys):
    _, loss, path, _ = exported
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"fields": {f: getattr(CONFIG, f) for f in
                                             ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size",
                                              "seq_length", "num_heads", "dropout_rate")}}))
    assert ms.main(["--to-autopar", str(path), str(tmp_path / "d"), "--config", str(config)]) == 0
    assert ckpt.read_config(tmp_path / "d", PanguAlphaConfig) == CONFIG
    net = fresh()
    ckpt.load_distributed_checkpoint(net, tmp_path / "d")
    assert loss_of(net).tobytes() == loss.tobytes()
    assert ms.main(["--to-mindspore", str(tmp_path / "d"), str(tmp_path / "again.ckpt")]) == 0
    assert (tmp_path / "again.ckpt").read_bytes() == path_bytes(path)
    ms.main(["--list", str(path)])
    assert "backbone.blocks.0.output.mapping.weight\tfloat32\t[32, 128]" in capsys.readouterr().out
    config.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ValueError, match=r"config.json: contents: expected a JSON object of PanguAlphaConfig "
                                         r"fields with \['num_layers'"):
        ms.main(["--to-autopar", str(path), str(tmp_path / "e"), "--config", str(config)])


def path_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_export_of_a_trainer_checkpoint_leaves_the_optimizer_states_behind(tmp_path):
    net = PanguAlphaWithLoss(CONFIG)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))
    train(BATCH)
    directory = ckpt.save_checkpoint(train, tmp_path / "ck")
    assert any(n.startswith("moment1.") for n in ckpt.read_manifest(directory)[1]["tensors"])
    arrays = ms.load_mindspore_ckpt(ms.export_mindspore_ckpt(directory, tmp_path / "p.ckpt"))
    assert set(arrays) == {r.mindspore for r in ms.pangu_names(CONFIG)}
    np.testing.assert_array_equal(arrays["backbone.top_query_layer.attention.projection.weight"],
                                  net.parameters_dict()["query_layer.attention.projection.weight"].asnumpy().T)

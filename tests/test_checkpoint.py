"""Checkpoints: round trips, resharding at load (dp2 x mp2 -> serial, mp4), exact resume,
crash safety at every filesystem step of a save, corruption and crafted-manifest rejection."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.shards import gather
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt
from autopar.train.checkpoint import safe_save

CONFIG = PanguAlphaConfig.preset("tiny")      # float32 parameters and compute
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(4)]
RTOL = 1e-5                                   # float32, across plans


def trainer(cfg=CONFIG):
    net = PanguAlphaWithLoss(cfg)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(net, opt, clip_norm=1.0)


def run_steps(train, first, last):
    return [float(train(BATCHES[k])) for k in range(first, last)]


def states_of(opt, world=None):
    """{f"{state}.{name}": full array}, gathered from shards when the optimizer holds them."""
    out = {}
    for t, states in zip(opt.params, opt.states):
        for s, a in states.items():
            out[f"{s}.{t.name}"] = gather(a, t.layout, t.param.shape, world) if hasattr(t, "layout") else a.copy()
    return out


@pytest.fixture(scope="module")
def serial_run():
    """Four uninterrupted serial steps: losses, and everything after step 2."""
    train = trainer()
    losses = run_steps(train, 0, 2)
    at2 = {p.name: p.asnumpy() for p in train.params} | states_of(train.optimizer)
    losses += run_steps(train, 2, 4)
    return losses, at2


# ---- serial ---------------------------------------------------------------------------------

def test_serial_round_trip_and_exact_resume(tmp_path, serial_run):
    losses, at2 = serial_run
    train = trainer()
    assert run_steps(train, 0, 2) == losses[:2]
    path = ckpt.save_checkpoint(train, tmp_path / "ck", extra={"next_batch": 2, "seed": 7})

    loaded = ckpt.load_checkpoint(path)
    assert set(loaded) == set(at2)            # parameters, moment1.*, moment2.*
    for name, want in at2.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    _, manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 2 and manifest["optimizer"]["type"] == "AdamWeightDecay"
    assert all(len(e["pieces"]) == 1 for e in manifest["tensors"].values())
    assert sorted(os.listdir(path)) == ["manifest.json", "rank0.safetensors"]

    resumed = trainer()
    extra = ckpt.load_distributed_checkpoint(resumed, path)
    assert extra == {"next_batch": 2, "seed": 7} and resumed.optimizer.step_count == 2
    assert run_steps(resumed, 2, 4) == losses[2:]   # same arithmetic, bit for bit

    net = PanguAlphaWithLoss(CONFIG)                # parameters only
    assert ckpt.load_param_into_net(net, path) == []
    for p in net.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), at2[p.name], err_msg=p.name)

    merged = load_file(ckpt.merge(path, tmp_path / "all.safetensors"))
    assert set(merged) == set(loaded)
    for name in merged:
        np.testing.assert_array_equal(merged[name], loaded[name])


def test_load_param_into_net_names():
    net = nn.Dense(4, 3)
    values = {"weight": np.ones((3, 4), np.float32), "bias": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        ckpt.load_param_into_net(net, {"weight": values["weight"]})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        ckpt.load_param_into_net(net, values | {"extra": np.ones(2)})
    assert ckpt.load_param_into_net(net, {"weight": values["weight"]}, strict=False) == ["bias"]
    ckpt.load_param_into_net(net, values | {"moment1.weight": np.ones((3, 4))})   # states are skipped
    np.testing.assert_array_equal(net.weight.asnumpy(), values["weight"])


# ---- sharded: save dp2 x mp2, load serially and onto mp4 ------------------------------------

@pytest.fixture(scope="module")
def dp2mp2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sharded") / "ck")

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(data_parallel=2, model_parallel=2))
            losses = run_steps(train, 0, 2)
            ckpt.save_checkpoint(train, path, extra={"next_batch": 2})
            values = {p.name: p.asnumpy() for p in train.params} | states_of(train.optimizer, comm)
            splits = {t.name: t.layout.splits() for t in train.optimizer.params}
            return losses, values, splits
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True):
        res = run_in_process(4, body)
    return path, res[0]


def test_sharded_save_writes_each_block_once(dp2mp2, serial_run):
    path, (losses, values, splits) = dp2mp2
    np.testing.assert_allclose(losses, serial_run[0][:2], rtol=RTOL)
    _, manifest = ckpt.read_manifest(path)
    tensors = manifest["tensors"]
    assert set(tensors) == set(values)
    for name, e in tensors.items():
        param = name.split(".", 1)[1] if name.startswith("moment") else name
        # one piece per distinct block: replicas (the dp axis) are not written again
        assert len(e["pieces"]) == math.prod(splits[param]), name
        assert sum(math.prod(b - a for a, b in p["region"]) for p in e["pieces"]) == math.prod(e["shape"])
    assert len(tensors["blocks.0.attention.dense1.weight"]["pieces"]) == 2          # split over mp
    assert len(tensors["moment2.blocks.0.attention.dense1.weight"]["pieces"]) == 2
    assert len(tensors["blocks.0.layernorm1.gamma"]["pieces"]) == 1                  # replicated
    # ranks 2 and 3 (dp coordinate 1) hold only replicas of what ranks 0 and 1 wrote
    files = {p["file"] for e in tensors.values() for p in e["pieces"]}
    assert files == {"rank0.safetensors", "rank1.safetensors"}
    assert sorted(os.listdir(path)) == ["manifest.json", "rank0.safetensors", "rank1.safetensors"]


def test_sharded_checkpoint_loads_serially_and_resumes(dp2mp2, serial_run):
    path, (_, values, _) = dp2mp2
    loaded = ckpt.load_checkpoint(path)
    for name, want in values.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    resumed = trainer()
    assert ckpt.load_distributed_checkpoint(resumed, path) == {"next_batch": 2}
    np.testing.assert_allclose(run_steps(resumed, 2, 4), serial_run[0][2:], rtol=RTOL)


@pytest.mark.parametrize("verify", [True, False])
def test_sharded_checkpoint_reshards_onto_mp4(dp2mp2, serial_run, verify):
    path, (_, values, _) = dp2mp2

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(model_parallel=4))
            extra = ckpt.load_distributed_checkpoint(train, path, inputs=(BATCHES[2],), verify=verify)
            # this rank holds exactly its region of every parameter and state
            for t, states in zip(train.optimizer.params, train.optimizer.states):
                np.testing.assert_array_equal(t.data, values[t.name][t.region], err_msg=t.name)
                for s, a in states.items():
                    np.testing.assert_array_equal(a, values[f"{s}.{t.name}"][t.region])
            assert train.optimizer.step_count == 2
            return extra, run_steps(train, 2, 4), {t.name: t.layout.splits() for t in train.optimizer.params}
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True):
        res = run_in_process(4, body)
    saved_splits = dp2mp2[1][2]
    assert res[0][2]["blocks.0.attention.dense1.weight"] != saved_splits["blocks.0.attention.dense1.weight"]
    for extra, losses, _ in res:
        assert extra == {"next_batch": 2}
        np.testing.assert_allclose(losses, serial_run[0][2:], rtol=RTOL)


def test_sharded_trainer_without_inputs_is_told_to_build_first(dp2mp2):
    path = dp2mp2[0]

    def body(comm):
        with bound_world(comm), pytest.raises(ValueError, match="inputs="):
                ckpt.load_distributed_checkpoint(trainer(CONFIG.replace(model_parallel=2)), path)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        run_in_process(2, body)


# ---- crash safety ---------------------------------------------------------------------------

def dense(value):
    net = nn.Dense(4, 3)
    net.weight.set_data(np.full((3, 4), value, np.float32))
    net.bias.set_data(np.full(3, value, np.float32))
    return net


class Crash(Exception):
    pass


FS_STEPS = ("write_bytes", "_rename", "remove_tree", "_make_dir", "_fsync_dir")


def crash_at(monkeypatch, k, after):
    """Make the k-th filesystem step of the next save raise (before or after doing it)."""
    count = [0]   # filesystem steps so far
    for name in FS_STEPS:
        real = getattr(safe_save, name)

        def step(*args, _real=real):
            count[0] += 1
            if count[0] == k and not after:
                raise Crash
            _real(*args)
            if count[0] == k and after:
                raise Crash
        monkeypatch.setattr(safe_save, name, step)


@pytest.mark.parametrize("after", [False, True])
def test_a_crash_at_any_step_of_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch, after):
    seen = []
    for k in range(1, 50):
        path = str(tmp_path / f"k{k}" / "ck")
        os.makedirs(os.path.dirname(path))
        ckpt.save_checkpoint(dense(1.0), path)
        ckpt.save_checkpoint(dense(2.0), path)     # an old checkpoint is replaced, leaving a backup
        with monkeypatch.context() as m:
            crash_at(m, k, after)
            try:
                ckpt.save_checkpoint(dense(3.0), path)
                crashed = False
            except Crash:
                crashed = True
        # whatever happened, a complete checkpoint loads: the previous one or the new one
        value = float(ckpt.load_checkpoint(path)["weight"][0, 0])
        assert value in (2.0, 3.0), (k, value)
        seen.append(value)
        # a failed save removes its temporary directory and its lock
        leftovers = set(os.listdir(os.path.dirname(path)))
        assert leftovers <= {"ck", "ck.old"}, (k, leftovers)
        # and the next save recovers from the leftovers
        ckpt.save_checkpoint(dense(4.0), path)
        assert float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 4.0
        assert sorted(os.listdir(os.path.dirname(path))) == ["ck"]
        if not crashed:
            break
    assert not crashed and seen[-1] == 3.0 and len(seen) > 5
    assert seen[0] == 2.0 and seen == sorted(seen)   # old until the swap, new after


def test_a_rank_failing_mid_save_leaves_the_previous_sharded_checkpoint(tmp_path, monkeypatch):
    """Rank 1 fails writing its file: every rank raises (rank 0 naming rank 1 and its
    error, not waiting for it), the previous checkpoint stays, nothing new is left."""
    path = str(tmp_path / "ck")
    real = safe_save.write_bytes

    def body(comm, value):
        with bound_world(comm):
            train = trainer(CONFIG.replace(model_parallel=2))
            train(BATCHES[0])
            for p in train.params:
                p.set_data(np.full(p.shape, value, p.dtype))
            try:
                ckpt.save_checkpoint(train, path)
            except Exception as err:
                return err

    def write_bytes(file, data):
        if file.endswith("rank1.safetensors"):
            raise Crash("disk full")
        real(file, data)

    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        assert run_in_process(2, body, 1.0) == [None, None]
        monkeypatch.setattr(safe_save, "write_bytes", write_bytes)
        errors = run_in_process(2, body, 2.0)
    assert type(errors[1]) is Crash and str(errors[1]) == "disk full"
    assert type(errors[0]) is RuntimeError
    assert str(errors[0]) == f"save_checkpoint({path!r}): rank 1 failed: Crash: disk full"
    loaded = ckpt.load_checkpoint(path)
    assert all(np.all(loaded[p] == 1.0) for p in loaded if not p.startswith("moment"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# ---- corruption and crafted manifests -------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    path = str(tmp_path / "ck")
    ckpt.save_checkpoint(dense(1.5), path, extra={"epoch": 1})
    return path


def data_offset(file, key):
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0]


def test_a_flipped_byte_names_the_file_and_tensor(small):
    file = os.path.join(small, "rank0.safetensors")
    data = bytearray(Path(file).read_bytes())
    data[data_offset(file, "weight") + 5] ^= 0x10
    Path(file).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rank0\.safetensors: tensor 'weight': sha256"):
        ckpt.load_checkpoint(small)
    with pytest.raises(ValueError, match=r"rank0\.safetensors: tensor 'weight': sha256"):
        ckpt.load_distributed_checkpoint(dense(0.0), small)


def test_a_truncated_file_is_a_clear_error(small):
    file = os.path.join(small, "rank0.safetensors")
    data = Path(file).read_bytes()
    Path(file).write_bytes(data[:-7])
    with pytest.raises(ValueError, match=r"rank0\.safetensors: tensor '\w+'.*truncated or corrupt"):
        ckpt.load_checkpoint(small)


def edit_manifest(path, change):
    file = os.path.join(path, "manifest.json")
    manifest = json.loads(Path(file).read_text())
    change(manifest, manifest["tensors"]["weight"])
    Path(file).write_text(json.dumps(manifest))


def set_piece(key, value):
    return lambda m, w: w["pieces"][0].__setitem__(key, value)


CRAFTED = {
    "parent file": (set_piece("file", "../rank0.safetensors"), "piece file: expected a file name inside"),
    "absolute file": (set_piece("file", "/etc/passwd"), "piece file: expected a file name inside"),
    "bad dtype": (lambda m, w: w.__setitem__("dtype", "object"), "dtype: expected one of"),
    "region out of bounds": (set_piece("region", [[0, 3], [2, 6]]), r"region dim 1: expected 0 <= start"),
    "negative offset": (set_piece("region", [[-1, 2], [0, 4]]), r"region dim 0"),
    "wrong rank region": (set_piece("region", [[0, 3]]), r"region: expected \[\[start, stop\]\]"),
    "overlapping pieces": (lambda m, w: w["pieces"].append(dict(w["pieces"][0])), "overlap"),
    "uncovered": (set_piece("region", [[0, 2], [0, 4]]), "covering all 12 elements"),
    "shape not stored": (lambda m, w: (w.__setitem__("shape", [4, 3]), set_piece("region", [[0, 4], [0, 3]])(m, w)),
                         r"stored shape: expected \(4, 3\)"),
    "dtype not stored": (lambda m, w: w.__setitem__("dtype", "float64"), "stored dtype: expected float64"),
    "missing key": (set_piece("key", "nope"), "key: expected 'nope' in the file"),
    "bad checksum": (set_piece("sha256", "0" * 64), "sha256"),
    "huge shape": (lambda m, w: (w.__setitem__("shape", [2 ** 40, 4]), set_piece("region", [[0, 2 ** 40], [0, 4]])(m, w)),
                   r"stored shape: expected \(1099511627776, 4\)"),
    "unknown version": (lambda m, w: m.__setitem__("version", 99), "version: expected 1"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_manifests_are_rejected(small, case):
    change, message = CRAFTED[case]
    edit_manifest(small, change)
    with pytest.raises(ValueError, match=message) as info:
        ckpt.load_checkpoint(small)
    assert "manifest.json" in str(info.value) or "rank0.safetensors" in str(info.value)
    assert "'weight'" in str(info.value) or case == "unknown version"


def test_a_link_out_of_the_directory_is_rejected(small, tmp_path):
    outside = tmp_path / "outside.safetensors"
    os.rename(os.path.join(small, "rank0.safetensors"), outside)
    os.symlink(outside, os.path.join(small, "rank0.safetensors"))
    with pytest.raises(ValueError, match="a link out of it"):
        ckpt.load_checkpoint(small)


def test_missing_and_incomplete_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "nothing")
    os.makedirs(tmp_path / "half")
    with pytest.raises(ValueError, match="without one"):
        ckpt.load_checkpoint(tmp_path / "half")
    with pytest.raises(ValueError, match="exists without a manifest.json"):
        ckpt.save_checkpoint(dense(1.0), tmp_path / "half")
    with pytest.raises(TypeError, match="JSON-able"):
        ckpt.save_checkpoint(dense(1.0), tmp_path / "x", extra={"rng": np.zeros(2)})


def valid_manifest():
    piece = {"file": "rank0.safetensors", "key": "t", "sha256": "0" * 64}
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 0, "extra": {},
            "tensors": {"t": {"shape": [3, 4], "dtype": "float32",
                              "pieces": [piece | {"region": [[0, 3], [0, 2]]}, piece | {"region": [[0, 3], [2, 4]]}]}}}


def paths(x, prefix=()):
    """Every place inside a JSON value, as key/index tuples."""
    yield prefix
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


PLACES = [p for p in paths(valid_manifest()) if p]
JUNK = (st.none() | st.booleans() | st.floats() | st.text(max_size=3) | st.integers(-2, 7) | st.just([])
        | st.just({}) | st.just([[0, 3]]) | st.just("../rank0.safetensors") | st.just("/etc/passwd"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(PLACES), st.just("delete") | JUNK), min_size=1, max_size=3))
def test_the_manifest_validator_raises_only_value_errors(tmp_path, edits):
    """A valid manifest with up to three places deleted or replaced by junk: the validator
    accepts it or raises ValueError, never another exception."""
    manifest = valid_manifest()
    for place, value in edits:
        parent = manifest
        try:
            for k in place[:-1]:
                parent = parent[k]
            if value == "delete":
                del parent[place[-1]]
            else:
                parent[place[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue   # an earlier edit removed this place
    try:
        ckpt.validate_manifest(manifest, str(tmp_path))
    except ValueError:
        pass


def test_model_checkpoint_keeps_the_last_k(tmp_path):
    def make():
        net = nn.Dense(4, 3)
        loss = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits())
        return nn.TrainOneStepCell(loss, AdamWeightDecay(net.trainable_params(), learning_rate=0.1))
    x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.array([0, 2], np.int32)
    train, keeper = make(), ckpt.ModelCheckpoint(tmp_path / "run", every=2, keep=2)
    losses = []
    for _ in range(7):
        losses.append(float(train(x, y)))
        keeper(train, extra={"next": train.optimizer.step_count})
    assert [s for s, _ in keeper.saved()] == [4, 6] and sorted(os.listdir(tmp_path / "run")) == ["ckpt_4", "ckpt_6"]
    resumed = make()
    assert ckpt.load_distributed_checkpoint(resumed, keeper.latest()) == {"next": 6}
    assert float(resumed(x, y)) == losses[6]

"""Checkpoints never lose data (issue 11 item 2): loads check every global shape before
touching the model, saving is exclusive, refuses non-finite values, survives a full disk at
any write, leaves no temporaries, and carries the model's config.

Sharded cases run on in-process ranks (tests/mpi/test_checkpoint_safety_mpi.py repeats the
shape and non-finite cases under real mpiexec); the concurrent savers are real processes.
"""
import dataclasses
import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_harness import held

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.nn.parameter import Parameter
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt
from autopar.train.checkpoint import safe_save

CONFIG = PanguAlphaConfig.preset("tiny")      # hidden 32, seq_length 16, float32
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(3)]
SPLIT = "blocks.0.attention.dense1.weight"    # split over mp


def trainer(cfg=CONFIG):
    net = PanguAlphaWithLoss(cfg)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    return nn.TrainOneStepCell(net, opt, clip_norm=1.0)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def sharded(n, body, *args):
    """Run body on n in-process ranks under semi_auto_parallel; returns the ranks' results."""
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, full_batch=True):
        return run_in_process(n, body, *args)


def returning_error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as err:
        return err
    return None


# ---- sharded loads check every global shape before touching anything ----------------------

@pytest.fixture(scope="module")
def dp2mp2(tmp_path_factory):
    """A dp2 x mp2 checkpoint of the tiny model after one step."""
    path = str(tmp_path_factory.mktemp("dp2mp2") / "ck")

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(data_parallel=2, model_parallel=2))
            train(BATCHES[0])
            ckpt.save_checkpoint(train, path)
    sharded(4, body)
    return path


@pytest.mark.parametrize("change, name, want, got", [
    ({"hidden_size": 64}, "word_embedding.embedding_table", "(96, 64) float32", "(96, 32) float32"),
    ({"seq_length": 8}, "position_embedding.embedding_table", "(8, 32) float32", "(16, 32) float32"),
])
def test_a_sharded_load_into_another_shape_fails_before_touching_the_model(dp2mp2, change, name, want, got):
    """The reproduced cases (hidden 64 loaded NaN; seq_length 8 cropped silently) on 2 ranks:
    the serial error, on every rank, and each rank's shards and states as they were."""
    cfg = CONFIG.replace(model_parallel=2, **change)

    def body(comm):
        with bound_world(comm):
            train = trainer(cfg)
            train(BATCHES[0][:, :cfg.seq_length + 1])    # shards bound, states allocated
            before = held(train)
            err = returning_error(ckpt.load_distributed_checkpoint, train, dp2mp2)
            assert_same(held(train), before)
            return err
    errors = sharded(2, body)
    serial = returning_error(ckpt.load_distributed_checkpoint, trainer(CONFIG.replace(**change)), dp2mp2)
    message = (f"load checkpoint {dp2mp2!r}: tensor {name!r}: expected {want} (the model's), "
               f"got {got} in the checkpoint")
    assert str(serial).startswith(message + " (and "), serial
    for err in errors:
        assert type(err) is ValueError and str(err) == str(serial)
    err = returning_error(ckpt.load_param_into_net, PanguAlphaWithLoss(CONFIG.replace(**change)), dp2mp2)
    assert type(err) is ValueError and str(err).startswith(message)   # fewer tensors: no optimizer states


def test_a_load_that_fails_midway_assigns_nothing_on_any_rank(dp2mp2, tmp_path):
    """A piece that only rank 1 reads is corrupt: rank 1 fails its checksum after reading
    everything before it, rank 0 reads all it needs; both raise and neither assigns."""
    path = str(tmp_path / "ck")
    Path(path).mkdir()
    for f in os.listdir(dp2mp2):
        Path(path, f).write_bytes(Path(dp2mp2, f).read_bytes())
    _, manifest = ckpt.read_manifest(path)
    pieces = manifest["tensors"][SPLIT]["pieces"]
    second = next(p for p in pieces if p["file"] == "rank1.safetensors")   # mp coordinate 1
    flip_a_byte(os.path.join(path, "rank1.safetensors"), second["key"])

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(model_parallel=2))
            train(BATCHES[1])
            before = held(train)
            err = returning_error(ckpt.load_distributed_checkpoint, train, path)
            assert_same(held(train), before)
            return err
    errors = sharded(2, body)
    assert type(errors[1]) is ValueError and f"rank1.safetensors: tensor {SPLIT!r}: sha256" in str(errors[1])
    assert type(errors[0]) is ValueError
    assert str(errors[0]) == f"load_distributed_checkpoint({path!r}): rank 1 failed: ValueError: {errors[1]}"


def flip_a_byte(file: str, key: str) -> None:
    data = bytearray(Path(file).read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + json.loads(data[8:8 + n])[key]["data_offsets"][0]
    data[start + 3] ^= 0x40
    Path(file).write_bytes(bytes(data))


def test_load_param_into_net_checks_every_shape_before_setting_any():
    net = nn.Dense(4, 3)
    before = {p.name: p.asnumpy() for p in net.get_parameters()}
    with pytest.raises(ValueError, match=r"^load_param_into_net: tensor 'weight': expected \(3, 4\) \(the model's\), "
                                         r"got \(4, 3\) in the given dict"):
        ckpt.load_param_into_net(net, {"bias": np.ones(3, np.float32), "weight": np.ones((4, 3), np.float32)})
    assert_same({p.name: p.asnumpy() for p in net.get_parameters()}, before)


# ---- non-finite values are refused unless asked -------------------------------------------

def dense(value, nan_at=None):
    net = nn.Dense(4, 3)
    net.weight.set_data(np.full((3, 4), value, np.float32))
    net.bias.set_data(np.full(3, value, np.float32))
    if nan_at is not None:
        getattr(net, nan_at).data[0] = np.nan
    return net


def test_non_finite_weights_are_not_saved_over_a_good_checkpoint(tmp_path):
    path = str(tmp_path / "ck")
    ckpt.save_checkpoint(dense(1.0), path)
    bad = dense(2.0, nan_at="bias")
    bad.weight.data[1, 2] = -np.inf
    with pytest.raises(ValueError, match=rf"^save_checkpoint\('{path}'\): values: expected finite parameters and "
                                         r"optimizer states, got NaN or inf in \['bias', 'weight'\]; .*"
                                         r"allow_non_finite=True"):
        ckpt.save_checkpoint(bad, path)
    assert_same(ckpt.load_checkpoint(path), {"weight": np.full((3, 4), 1.0, np.float32),
                                             "bias": np.full(3, 1.0, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    ckpt.save_checkpoint(bad, path, allow_non_finite=True)    # asked for: saved bit for bit
    loaded = ckpt.load_checkpoint(path)
    assert np.isnan(loaded["bias"][0]) and loaded["weight"][1, 2] == -np.inf
    assert_same(loaded, {"weight": bad.weight.asnumpy(), "bias": bad.bias.asnumpy()})


def test_a_non_finite_optimizer_state_is_refused_too(tmp_path):
    train = trainer()
    train(BATCHES[0])
    train.optimizer.states[3]["moment2"][0] = np.inf
    name = f"moment2.{train.optimizer.params[3].name}"
    with pytest.raises(ValueError, match=rf"NaN or inf in \['{name}'\]"):
        ckpt.save_checkpoint(train, tmp_path / "ck")
    assert os.listdir(tmp_path) == []


def test_every_rank_refuses_a_nan_that_only_one_rank_holds(tmp_path):
    """Rank 1's shard of a split weight holds a NaN: both ranks raise the same error (none
    waits for the other), the previous checkpoint stays; allowed, it is saved."""
    path = str(tmp_path / "ck")

    def body(comm, allow):
        with bound_world(comm):
            train = trainer(CONFIG.replace(model_parallel=2))
            train(BATCHES[0])
            ckpt.save_checkpoint(train, path)
            previous = ckpt.load_checkpoint(path)
            shard = next(t for t in train.optimizer.params if t.name == SPLIT)
            if comm.rank == 1:
                shard.data.flat[5] = np.nan
            err = returning_error(ckpt.save_checkpoint, train, path, allow_non_finite=allow)
            return err, previous, ckpt.load_checkpoint(path)
    refused = sharded(2, body, False)
    for err, previous, now in refused:
        assert type(err) is ValueError and f"got NaN or inf in [{SPLIT!r}]" in str(err)
        assert_same(now, previous)
    allowed = sharded(2, body, True)
    assert allowed[0][0] is None and allowed[1][0] is None
    assert np.isnan(allowed[0][2][SPLIT]).sum() == 1


# ---- saving is exclusive ---------------------------------------------------------------------

N_TENSORS, SHAPE = 48, (64, 64)   # 768 KiB a save: long enough for two savers to overlap


class Many(nn.Cell):
    def __init__(self, v):
        super().__init__()
        for i in range(N_TENSORS):
            setattr(self, f"w{i:02d}", Parameter(values(v, i), name=f"w{i:02d}"))


def values(v: int, i: int) -> np.ndarray:
    """Tensor i of saver v: distinct per saver, tensor and element, exact in float32."""
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + np.float32(10_000 * v + 100 * i)


def saver(path, v, barrier, results):
    net = Many(v)
    barrier.wait()
    try:
        ckpt.save_checkpoint(net, path, extra={"v": v})
        results.put((v, os.getpid(), None))
    except Exception as err:
        results.put((v, os.getpid(), f"{type(err).__name__}: {err}"))


def saved_value(path) -> int:
    """Which save the checkpoint at path is, after checking it is that save bit for bit."""
    loaded = ckpt.load_checkpoint(path)   # every checksum verified
    v = ckpt.read_manifest(path)[1]["extra"]["v"]
    assert sorted(loaded) == [f"w{i:02d}" for i in range(N_TENSORS)]
    for i in range(N_TENSORS):
        np.testing.assert_array_equal(loaded[f"w{i:02d}"], values(v, i))
    return v


def test_two_processes_saving_to_one_path_never_corrupt_it(tmp_path):
    """What every rank does when autopar.init() is forgotten: 20 trials of two savers
    released together over a good checkpoint. The checkpoint is always exactly one saver's,
    the other (when they overlapped) was told who holds the path, nothing else is left."""
    mp = multiprocessing.get_context("fork")
    host, contested = socket.gethostname(), 0
    for trial in range(20):
        path = str(tmp_path / f"t{trial}" / "ck")
        ckpt.save_checkpoint(Many(0), path, extra={"v": 0})
        barrier, results = mp.Barrier(2), mp.Queue()
        procs = [mp.Process(target=saver, args=(path, v, barrier, results)) for v in (1, 2)]
        for p in procs:
            p.start()
        outcome = sorted(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        won = [(v, pid) for v, pid, err in outcome if err is None]
        lost = [(v, err) for v, _, err in outcome if err is not None]
        assert won, outcome
        v = saved_value(path)
        if lost:
            contested += 1
            assert len(won) == 1 and v == won[0][0], outcome
            assert lost[0][1].startswith(f"FileExistsError: save_checkpoint({path!r}): lock: expected no other "
                                         f"process saving to this path, got {path}.lock held by pid {won[0][1]} "
                                         f"on host {host} (saving step 0 since "), lost
        else:
            assert v in (1, 2)
        assert sorted(os.listdir(os.path.dirname(path))) == ["ck"], trial
    assert contested >= 10, f"the savers overlapped in only {contested} of 20 trials"


def holder(path, ready, release):
    lock = safe_save.acquire_lock(path, 5)
    os.makedirs(safe_save.temp_dir(path, 5))
    Path(safe_save.temp_dir(path, 5), "rank0.safetensors").write_bytes(b"half written")
    ready.set()
    release.wait(30)
    safe_save.release_lock(path, lock)


def test_a_second_saver_touches_nothing_of_the_first(tmp_path):
    """While another process holds the path (writing step 5), a save fails at once and
    removes neither the holder's temporary directory nor the previous checkpoint."""
    path = str(tmp_path / "ck")
    ckpt.save_checkpoint(dense(1.0), path)
    mp = multiprocessing.get_context("fork")
    ready, release = mp.Event(), mp.Event()
    proc = mp.Process(target=holder, args=(path, ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(FileExistsError, match=rf"held by pid {proc.pid} on host .* \(saving step 5 since .*"
                                                  r"call autopar.init\(\)"):
            ckpt.save_checkpoint(dense(2.0), path)
        assert Path(safe_save.temp_dir(path, 5), "rank0.safetensors").read_bytes() == b"half written"
        assert float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 1.0
    finally:
        release.set()
        proc.join(30)
    ckpt.save_checkpoint(dense(3.0), path)   # the holder is gone: its leftovers go too
    assert sorted(os.listdir(tmp_path)) == ["ck"] and float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 3.0


def test_a_dead_savers_lock_and_temporaries_of_any_step_are_cleared(tmp_path):
    """A killed saver leaves its lock file (pid of a dead process) and a temporary
    directory of another step: the next save takes over and leaves only the checkpoint."""
    path = str(tmp_path / "ck")
    ckpt.save_checkpoint(dense(1.0), path)
    Path(path + ".lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname(), "step": 3,
                                                "since": "earlier"}))
    os.makedirs(path + ".tmp-3")
    Path(path + ".tmp-3", "rank0.safetensors").write_bytes(b"half")
    os.makedirs(str(tmp_path / "ck2.tmp-3"))   # another checkpoint's: not ours to remove
    ckpt.save_checkpoint(dense(2.0), path)
    assert sorted(os.listdir(tmp_path)) == ["ck", "ck2.tmp-3"]
    assert float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 2.0


# ---- a full disk ---------------------------------------------------------------------------

def test_a_full_disk_at_any_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC from the k-th write() call of a save, for every k (512-byte writes): the error
    names the path, the space needed and available and the file; the previous checkpoint
    loads unchanged; nothing else is left; the next save succeeds."""
    monkeypatch.setattr(safe_save, "WRITE_CHUNK", 512)
    real, calls, fail_at = safe_save._write_chunk, [0], [0]   # fail_at 0: no failure

    def write_chunk(fd, data):
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(safe_save, "_write_chunk", write_chunk)
    path = str(tmp_path / "ck")
    ckpt.save_checkpoint(dense(1.0), path)
    previous = ckpt.load_checkpoint(path)
    needed = f"{(ckpt.MANIFEST_BASE_BYTES + 2 * ckpt.BLOCK_OVERHEAD_BYTES + 15 * 4) / 2 ** 20:.2f}"
    files = set()
    for k in range(1, 100):
        calls[0], fail_at[0] = 0, k
        err = returning_error(ckpt.save_checkpoint, dense(2.0), path)
        if err is None:
            break
        assert type(err) is ckpt.NoSpaceError and err.errno == errno.ENOSPC
        assert str(err).startswith(f"[Errno 28] save_checkpoint({path!r}): free space: expected about {needed} MiB "
                                   "for the new checkpoint, got "), err
        assert "MiB available (No space left on device writing " in str(err)
        files.add(str(err).split(" writing ")[1].split(")")[0])
        assert_same(ckpt.load_checkpoint(path), previous)
        assert sorted(os.listdir(tmp_path)) == ["ck"], k
    assert k > 3 and files == {path + ".tmp-0/rank0.safetensors", path + ".tmp-0/manifest.json.part"}, (k, files)
    assert float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 2.0 and sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_save_that_clearly_does_not_fit_fails_before_writing(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    ckpt.save_checkpoint(dense(1.0), path)
    monkeypatch.setattr(safe_save, "free_bytes", lambda p: 3 * 2 ** 20)
    big = nn.Dense(1024, 1024)    # 4 MiB of float32 weights
    with pytest.raises(ckpt.NoSpaceError, match=rf"^\[Errno 28\] save_checkpoint\('{path}'\): free space: expected "
                                                r"about 4\.\d\d MiB for the new checkpoint, got 3\.00 MiB available; "
                                                r"free space on that filesystem or save elsewhere; the previous "
                                                r"checkpoint is kept$"):
        ckpt.save_checkpoint(big, path)
    assert sorted(os.listdir(tmp_path)) == ["ck"] and float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 1.0


def test_a_full_disk_on_one_rank_is_reported_on_every_rank(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    real = safe_save.write_bytes

    def write_bytes(file, data):
        if file.endswith("rank1.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, data)
    monkeypatch.setattr(safe_save, "write_bytes", write_bytes)

    def body(comm):
        with bound_world(comm):
            train = trainer(CONFIG.replace(model_parallel=2))
            train(BATCHES[0])
            return returning_error(ckpt.save_checkpoint, train, path)
    errors = sharded(2, body)
    assert all(type(e) is ckpt.NoSpaceError for e in errors)
    assert "MiB available (No space left on device writing " in str(errors[1])
    assert str(errors[1]).endswith(f"rank1.safetensors); free space on that filesystem or save elsewhere; "
                                   "the previous checkpoint is kept")
    assert str(errors[0]).startswith(f"save_checkpoint({path!r}): rank 1 failed: NoSpaceError: [Errno 28] "
                                     f"save_checkpoint({path!r}): free space")
    assert os.listdir(tmp_path) == []


# ---- the model's config travels inside the checkpoint --------------------------------------

def test_the_model_config_round_trips(tmp_path):
    cfg = CONFIG.replace(hidden_size=48, num_heads=4, eod_reset=True, model_parallel=1)
    path = ckpt.save_checkpoint(trainer(cfg), tmp_path / "ck", extra={"next_batch": 3})
    assert ckpt.read_config(path, PanguAlphaConfig) == cfg
    assert ckpt.read_config(path) == {"class": "PanguAlphaConfig", "fields": dataclasses.asdict(cfg)}
    assert ckpt.load_distributed_checkpoint(trainer(cfg), path) == {"next_batch": 3}   # extra as before
    writer = ckpt.read_manifest(path)[1]["writer"]
    assert writer["network"] == "PanguAlphaWithLoss" and writer["autopar"] == "0.1.0"


@dataclasses.dataclass(frozen=True)
class OtherConfig:
    width: int = 3
    sizes: tuple = (1, 2)


class WithConfig(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.inner = nn.Dense(2, 2)


def test_a_config_on_an_inner_cell_is_found_and_rebuilt_with_its_tuples(tmp_path):
    net = nn.SequentialCell([nn.Dense(2, 2), WithConfig(OtherConfig(5, (3, 4)))])
    path = ckpt.save_checkpoint(net, tmp_path / "ck")
    assert ckpt.read_config(path) == {"class": "OtherConfig", "fields": {"width": 5, "sizes": [3, 4]}}
    assert ckpt.read_config(path, OtherConfig) == OtherConfig(5, (3, 4))
    with pytest.raises(ValueError, match=r"model config: expected a PanguAlphaConfig, got a OtherConfig"):
        ckpt.read_config(path, PanguAlphaConfig)


def test_a_checkpoint_without_a_config_says_what_wrote_it(tmp_path):
    path = ckpt.save_checkpoint(dense(1.0), tmp_path / "ck")
    program = ckpt.read_manifest(path)[1]["writer"]["program"]
    assert program == "pytest"   # run as pytest or python -m pytest
    with pytest.raises(ValueError) as info:
        ckpt.read_config(path, PanguAlphaConfig, fix="pass --config FILE")
    assert str(info.value) == (f"checkpoint {path!r}: model config: expected one saved with the weights, got none "
                               f"(it was written by autopar 0.1.0 (pytest) from a Dense, which has no `config` "
                               f"dataclass attribute); pass --config FILE")
    manifest_file = Path(path, "manifest.json")       # as an older autopar wrote them
    manifest = json.loads(manifest_file.read_text())
    del manifest["config"], manifest["writer"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"got none \(it was written by an autopar older than 0.1.0's model configs "
                                         r"in checkpoints\); build the model's config by hand$"):
        ckpt.read_config(path)
    assert float(ckpt.load_checkpoint(path)["weight"][0, 0]) == 1.0   # still loads


# ---- under an MPI launcher, saving needs autopar.init() ------------------------------------

FORGOT_INIT = """
import sys
import numpy as np
from autopar import nn
from autopar.train import checkpoint as ckpt
try:
    ckpt.save_checkpoint(nn.Dense(2, 2), sys.argv[1])
except RuntimeError as err:
    print(err)
"""


def test_a_save_under_mpiexec_without_init_is_refused(tmp_path):
    """What the launcher's environment says (2 processes) with no init(): every rank would
    save alone as rank 0 to the same files; the save says to call autopar.init()."""
    env = dict(os.environ, PMI_SIZE="2", PMI_RANK="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", FORGOT_INIT, str(tmp_path / "ck")], env=env, text=True,
                         capture_output=True, timeout=60)
    assert out.stdout.startswith("save_checkpoint: autopar.init(): expected a call first"), out
    assert "call autopar.init() at the top of the script" in out.stdout
    assert os.listdir(tmp_path) == []

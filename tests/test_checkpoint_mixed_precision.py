"""Checkpoints of mixed-precision runs: bfloat16 tensors saved and loaded bit for bit (stored
as safetensors' "BF16"), and the loss scale's state saved and restored, so that a float16 run
resumed from a checkpoint equals the uninterrupted run bit for bit while its dynamic scale
changes (overflows, a window of good steps) on both sides of the save."""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.train import AdamWeightDecay
from autopar.train import checkpoint as ckpt

# ---- bfloat16 tensors -------------------------------------------------------------------------

BF16 = PanguAlphaConfig.preset("tiny", param_dtype="bfloat16", compute_dtype="bfloat16")


def bfloat16_trainer(steps: int):
    """A bfloat16-parameter PanGu-α trainer whose AdamWeightDecay took ``steps`` updates on
    random gradients (bfloat16 parameters and states, none of them left at their init)."""
    net = PanguAlphaWithLoss(BF16)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    rng = np.random.default_rng(5)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(autopar.bfloat16) for p in opt.params])
    return nn.TrainOneStepCell(net, opt, clip_norm=1.0)


def held_bits(train) -> dict[str, bytes]:
    out = {p.name: p.asnumpy().tobytes() for p in train.params}
    for p, states in zip(train.optimizer.params, train.optimizer.states):
        out |= {f"{s}.{p.name}": a.tobytes() for s, a in states.items()}
    return out


def safetensors_header(file: str) -> dict:
    """The JSON header of a safetensors file: 8 bytes of little-endian length, then JSON."""
    with open(file, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def test_bfloat16_parameters_and_states_round_trip_bit_for_bit(tmp_path):
    assert autopar.bfloat16 == np.dtype(ml_dtypes.bfloat16) and "bfloat16" in autopar.__all__
    train = bfloat16_trainer(2)
    assert {p.asnumpy().dtype for p in train.params} == {autopar.bfloat16}
    want = held_bits(train)
    path = ckpt.save_checkpoint(train, tmp_path / "ck")

    _, manifest = ckpt.read_manifest(path)
    assert {e["dtype"] for e in manifest["tensors"].values()} == {"bfloat16"}
    file = os.path.join(path, "rank0.safetensors")
    header = safetensors_header(file)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    raw = load_file(file)   # safetensors' own numpy loader (ml_dtypes, imported by autopar, registers bfloat16)
    assert {k: v.tobytes() for k, v in raw.items()} == want and {v.dtype for v in raw.values()} == {autopar.bfloat16}

    loaded = ckpt.load_checkpoint(path)
    assert {k: v.tobytes() for k, v in loaded.items()} == want

    resumed = bfloat16_trainer(0)
    ckpt.load_distributed_checkpoint(resumed, path)
    assert held_bits(resumed) == want and resumed.optimizer.step_count == 2
    assert {a.dtype for s in resumed.optimizer.states for a in s.values()} == {autopar.bfloat16}


def test_a_bfloat16_nan_is_refused_like_a_float32_one(tmp_path):
    """bfloat16 is numpy kind 'V': a finiteness check asking ``kind == 'f'`` would pass a NaN."""
    train = bfloat16_trainer(1)
    good = ckpt.save_checkpoint(train, tmp_path / "ck")
    name = train.params[3].name
    train.params[3].data.reshape(-1)[0] = np.nan
    with pytest.raises(ValueError, match=rf"values: expected finite parameters.*NaN or inf in \['{name}'\]"):
        ckpt.save_checkpoint(train, good)
    assert np.isfinite(ckpt.load_checkpoint(good)[name].astype(np.float32)).all()


def test_a_bfloat16_checkpoint_loads_into_a_float32_model_only_when_told_the_dtype_differs(tmp_path):
    path = ckpt.save_checkpoint(PanguAlphaWithLoss(BF16), tmp_path / "ck")
    with pytest.raises(ValueError, match=r"tensor '.*': expected \(\d+(, \d+)*\) float32 \(the model's\), "
                                         r"got \(\d+(, \d+)*\) bfloat16 in the checkpoint"):
        ckpt.load_param_into_net(PanguAlphaWithLoss(BF16.replace(param_dtype="float32")), path)


# ---- the loss scale ---------------------------------------------------------------------------

FP16 = PanguAlphaConfig.preset("tiny", compute_dtype="float16", dropout_rate=0.1)
BATCHES = [np.random.default_rng(40 + k).integers(0, FP16.vocab_size, (4, FP16.seq_length + 1)).astype(np.int32)
           for k in range(8)]


def scaled_trainer(cell=None, config=FP16):
    """float16 PanGu-α, AdamWeightDecay lr 1e-2, dynamic scale from 2^19 with a window of 2:
    on these batches the scale overflows, falls, grows after the window and overflows again."""
    net = PanguAlphaWithLoss(config)
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    cell = nn.DynamicLossScaleUpdateCell(2.0 ** 19, 2, scale_window=2) if cell is None else cell
    return nn.TrainOneStepWithLossScaleCell(net, opt, cell, clip_norm=1.0)


def run(train, first: int, last: int) -> list[tuple[bytes, bool, float]]:
    """(loss bits, overflow, scale used) of each step on BATCHES[first:last]."""
    return [(loss.tobytes(), overflow, scale) for loss, overflow, scale in map(train, BATCHES[first:last])]


def weights(train) -> dict[str, bytes]:
    return {p.name: p.asnumpy().tobytes() for p in train.params}


@pytest.fixture(scope="module")
def uninterrupted():
    train = scaled_trainer()
    steps = run(train, 0, 8)
    return steps, weights(train), train.scale_sense.state(), train.optimizer.step_count


@pytest.mark.parametrize("n", [2, 4])
def test_a_resumed_float16_run_equals_the_uninterrupted_one_with_its_scale(tmp_path, uninterrupted, n):
    """N steps, save, resume in a fresh trainer (its cell built at 2^19 as at the start),
    8 - N more: every loss, overflow flag and scale, the final weights and the scale's
    counters equal the 8 uninterrupted steps bit for bit. The scale changed before the save
    and changes after it; the same weights, states and step count with the fresh cell's
    2^19 go another way (asserted last), so the restored scale state is what matters."""
    steps, final, state, updates = uninterrupted
    scales = [s for _, _, s in steps]
    assert len(set(scales[:n])) > 1 and len(set(scales[n:])) > 1, scales    # it changes on both sides
    assert any(o for _, o, _ in steps[:n]) and any(o for _, o, _ in steps[n:]), steps

    train = scaled_trainer()
    assert run(train, 0, n) == steps[:n]
    saved = train.scale_sense.state()
    path = ckpt.save_checkpoint(train, tmp_path / "ck")
    _, manifest = ckpt.read_manifest(path)
    assert manifest["loss_scale"] == {"cell": "DynamicLossScaleUpdateCell", "state": saved}
    assert saved != scaled_trainer().scale_sense.state()

    resumed = scaled_trainer()
    ckpt.load_distributed_checkpoint(resumed, path)
    assert resumed.scale_sense.state() == saved and resumed.loss_scale == scales[n]
    assert run(resumed, n, 8) == steps[n:]
    assert weights(resumed) == final and resumed.scale_sense.state() == state
    assert resumed.optimizer.step_count == updates

    unrestored = scaled_trainer()   # the same checkpoint without the scale's state
    ckpt.load_distributed_checkpoint(unrestored, path)
    unrestored.scale_sense.set_state(scaled_trainer().scale_sense.state())
    assert run(unrestored, n, 8) != steps[n:]


def test_a_model_parallel_float16_run_resumes_bit_for_bit_with_its_scale(tmp_path):
    """mp2 on two in-process ranks: the scale's state is written once (rank 0's manifest) and
    restored on every rank; the resumed ranks equal the uninterrupted mp2 run bit for bit."""
    path = str(tmp_path / "ck")

    def body(comm, split: bool):
        with bound_world(comm):
            train = scaled_trainer(config=FP16.replace(model_parallel=2))
            steps = run(train, 0, 2)
            if split:
                ckpt.save_checkpoint(train, path)
                train = scaled_trainer(config=FP16.replace(model_parallel=2))
                ckpt.load_distributed_checkpoint(train, path, inputs=(BATCHES[2],))
                assert train.scale_sense.state() == {"loss_scale": 2.0 ** 17, "cur_iter": 3, "last_overflow_iter": 2}
            steps += run(train, 2, 8)
            return steps, weights(train), train.scale_sense.state()
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, full_batch=True):
        want = run_in_process(2, body, False)
        got = run_in_process(2, body, True)
    assert got == want and got[0][0] == want[1][0]
    assert len({s for _, _, s in want[0][0][2:]}) > 1 and any(o for _, o, _ in want[0][0][2:])


def test_a_fixed_scale_is_saved_and_restored(tmp_path):
    train = scaled_trainer(nn.FixedLossScaleUpdateCell(2.0 ** 10))
    run(train, 0, 1)
    path = ckpt.save_checkpoint(train, tmp_path / "ck")
    resumed = scaled_trainer(nn.FixedLossScaleUpdateCell(2.0 ** 12))
    ckpt.load_distributed_checkpoint(resumed, path)
    assert resumed.loss_scale == 2.0 ** 10


def test_a_scale_of_another_kind_is_refused_unless_not_strict(tmp_path):
    train = scaled_trainer()
    run(train, 0, 2)
    path = ckpt.save_checkpoint(train, tmp_path / "ck")
    fixed = scaled_trainer(nn.FixedLossScaleUpdateCell(8.0))
    before = weights(fixed)
    with pytest.raises(ValueError, match=r"loss_scale: expected the state of a FixedLossScaleUpdateCell \(this "
                                         r"trainer's\), got a DynamicLossScaleUpdateCell's state .*; build the "
                                         r"trainer with a DynamicLossScaleUpdateCell.*or pass strict=False"):
        ckpt.load_distributed_checkpoint(fixed, path)
    assert weights(fixed) == before and fixed.optimizer.step_count == 0      # nothing loaded
    ckpt.load_distributed_checkpoint(fixed, path, strict=False)
    assert fixed.loss_scale == 8.0 and weights(fixed) == weights(train)


def test_trainers_without_a_saved_or_own_scale_keep_theirs(tmp_path):
    """A float32 fine-tune of a float16 run ignores the saved scale; a scaled trainer loading
    a checkpoint of a run without one keeps its own."""
    scaled = scaled_trainer()
    run(scaled, 0, 2)
    path = ckpt.save_checkpoint(scaled, tmp_path / "scaled")
    plain_net = PanguAlphaWithLoss(FP16)
    plain = nn.TrainOneStepCell(plain_net, AdamWeightDecay(plain_net.trainable_params(), 1e-2))
    ckpt.load_distributed_checkpoint(plain, path)
    assert weights(plain) == weights(scaled)

    unscaled = ckpt.save_checkpoint(plain, tmp_path / "plain")
    assert ckpt.read_manifest(unscaled)[1]["loss_scale"] is None
    fresh = scaled_trainer()
    ckpt.load_distributed_checkpoint(fresh, unscaled)
    assert fresh.scale_sense.state() == scaled_trainer().scale_sense.state()


@pytest.mark.parametrize("state, field", [
    ({"loss_scale": 0.5, "cur_iter": 3, "last_overflow_iter": 1}, r"loss_scale: expected a finite number >= 1"),
    ({"loss_scale": None, "cur_iter": 3, "last_overflow_iter": 1}, r"loss_scale: expected a finite number"),
    ({"loss_scale": 4.0, "cur_iter": 0, "last_overflow_iter": 0}, r"cur_iter: expected an int >= 1, got 0"),
    ({"loss_scale": 4.0, "cur_iter": 3, "last_overflow_iter": 3}, r"last_overflow_iter: expected an int in \[0, 2\]"),
    ({"loss_scale": 4.0, "cur_iter": 2.5, "last_overflow_iter": 0}, r"cur_iter: expected an int >= 1, got 2.5"),
    ({"loss_scale": 4.0}, r"DynamicLossScaleUpdateCell state: expected an object with \['cur_iter', "),
    ("4.0", r"loss_scale: expected null or \{\"cell\": name, \"state\": \{...\}\}"),
])
def test_a_corrupt_saved_scale_is_refused_before_anything_loads(tmp_path, state, field):
    train = scaled_trainer()
    run(train, 0, 2)
    path = ckpt.save_checkpoint(train, tmp_path / "ck")
    file = os.path.join(path, "manifest.json")
    with open(file) as f:
        manifest = json.load(f)
    manifest["loss_scale"] = state if isinstance(state, str) else {"cell": "DynamicLossScaleUpdateCell",
                                                                   "state": state}
    with open(file, "w") as f:
        json.dump(manifest, f)
    fresh = scaled_trainer()
    before = weights(fresh), fresh.scale_sense.state()
    with pytest.raises(ValueError, match=field):
        ckpt.load_distributed_checkpoint(fresh, path)
    assert (weights(fresh), fresh.scale_sense.state()) == before

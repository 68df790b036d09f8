"""Token files, windows, the deterministic loader, and EOD-reset masks against a brute force and the model."""
import json

import numpy as np
import pytest

from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig
from autopar.train.dataset import Batch, LMDataset, LMLoader, TokenFile, eod_reset_masks

EOD = 8


def write_tokens(tmp_path, tokens, dtype=np.uint16, name="tokens.bin"):
    path = tmp_path / name
    np.asarray(tokens).astype(dtype).tofile(path)
    return path


def arange_dataset(num_samples, seq_length):
    """Window i holds i*(S+1) .. (i+1)*(S+1)-1, so a row tells which sample it is; S unused tokens follow."""
    ds = LMDataset(np.arange(num_samples * (seq_length + 1) + seq_length, dtype=np.int64), seq_length)
    assert len(ds) == num_samples
    return ds


# ---- TokenFile and LMDataset ----

def test_token_file_reads_what_was_written(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 40000, 1000)
    f = TokenFile(write_tokens(tmp_path, tokens))
    assert len(f) == 1000
    np.testing.assert_array_equal(f[:], tokens)
    assert isinstance(f.array, np.memmap) and f.array.dtype == np.uint16 and not f.array.flags.writeable
    g = TokenFile(write_tokens(tmp_path, tokens, np.int32, "t32.bin"), dtype=np.int32)
    assert len(g) == 1000 and g[999] == tokens[999]


def test_windows_are_the_consecutive_slices_of_the_tokens(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 65535, 5 * 9 + 4)        # 5 windows of 9, 4 left over
    ds = LMDataset(TokenFile(write_tokens(tmp_path, tokens)), seq_length=8)
    assert len(ds) == 5
    for i in range(5):
        assert ds[i].dtype == np.int32 and ds[i].shape == (9,)
        np.testing.assert_array_equal(ds[i], tokens[9 * i:9 * i + 9])
    np.testing.assert_array_equal(ds.samples([4, 0, 2]), np.stack([tokens[36:45], tokens[0:9], tokens[18:27]]))
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        ds[5]


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        TokenFile(path)


def test_bad_size_names_file_expected_and_actual(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")                               # 5 bytes: not uint16
    with pytest.raises(ValueError, match=r"odd\.bin.*multiple of 2 bytes.*got 5 bytes"):
        TokenFile(path)
    path.write_bytes(b"\x01\x00\x02\x00\x03\x00")                           # 6 bytes: 3 uint16, not int32
    assert len(TokenFile(path)) == 3
    with pytest.raises(ValueError, match=r"multiple of 4 bytes.*got 6 bytes"):
        TokenFile(path, dtype=np.int32)


def test_seq_length_longer_than_the_tokens():
    with pytest.raises(ValueError, match=r"seq_length \+ 1 <= the number of tokens \(10\).*seq_length=10"):
        LMDataset(np.arange(10), seq_length=10)
    assert len(LMDataset(np.arange(10), seq_length=9)) == 1


# ---- LMLoader: order, slicing, resumption ----

def test_rows_are_the_samples_of_the_order():
    ds = arange_dataset(12, 4)
    loader = LMLoader(ds, global_batch=4, seed=3)
    for step in range(6):
        b = loader.batch(step)
        assert b.input_ids.dtype == np.int32 and b.input_ids.shape == (4, 5)
        assert b.epoch == step // 3
        want = loader.epoch_order(step // 3)[(step % 3) * 4:(step % 3 + 1) * 4]
        np.testing.assert_array_equal(b.sample_ids, want)
        np.testing.assert_array_equal(b.input_ids, ds.samples(want))
        np.testing.assert_array_equal(b.input_ids[:, 0], want * 5)          # arange tokens: row = sample
        assert b.position_ids is None and b.attention_mask is None and b.inputs() == (b.input_ids,)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_dp_slices_join_into_the_global_batch(dp_size):
    ds = arange_dataset(20, 6)
    full = LMLoader(ds, global_batch=8, seed=5, full_batch=True)
    for step in (0, 1, 2, 5):                                              # 2 steps per epoch
        whole = full.batch(step).input_ids                                 # (8, 7)
        parts = [LMLoader(ds, 8, seed=5, dp_rank=r, dp_size=dp_size).batch(step).input_ids for r in range(dp_size)]
        assert all(p.shape == (8 // dp_size, 7) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        # full_batch: every rank gets all rows, whatever its rank
        for r in range(dp_size):
            np.testing.assert_array_equal(
                LMLoader(ds, 8, seed=5, dp_rank=r, dp_size=dp_size, full_batch=True).batch(step).input_ids, whole)


def test_global_batch_not_divisible_by_dp_size():
    ds = arange_dataset(20, 4)
    with pytest.raises(ValueError, match=r"global_batch: expected a multiple of dp_size=4, got 6"):
        LMLoader(ds, global_batch=6, dp_size=4, dp_rank=1)
    assert LMLoader(ds, global_batch=6, dp_size=4, dp_rank=1, full_batch=True).batch(0).input_ids.shape == (6, 5)
    with pytest.raises(ValueError, match=r"dp_rank: expected an int in \[0, dp_size=2\), got 2"):
        LMLoader(ds, global_batch=4, dp_size=2, dp_rank=2)
    with pytest.raises(ValueError, match=r"global_batch: expected <= the number of samples \(20\), got 21"):
        LMLoader(ds, global_batch=21)


def test_seed_fixes_the_order_and_each_epoch_covers_every_sample_once():
    ds = arange_dataset(30, 3)
    a, b, c = (LMLoader(ds, global_batch=5, seed=s) for s in (7, 7, 8))
    steps = range(12)                                                      # 6 steps per epoch: two epochs
    ids_a = [a.batch(k).sample_ids for k in steps]
    ids_b = [b.batch(k).sample_ids for k in steps]
    ids_c = [c.batch(k).sample_ids for k in steps]
    np.testing.assert_array_equal(np.concatenate(ids_a), np.concatenate(ids_b))
    assert not np.array_equal(np.concatenate(ids_a), np.concatenate(ids_c))
    for ids in (ids_a, ids_c):
        epoch0, epoch1 = np.concatenate(ids[:6]), np.concatenate(ids[6:])
        np.testing.assert_array_equal(np.sort(epoch0), np.arange(30))
        np.testing.assert_array_equal(np.sort(epoch1), np.arange(30))
        assert not np.array_equal(epoch0, epoch1)                          # a new permutation each epoch
    np.testing.assert_array_equal(np.concatenate(ids_a[:6]), np.random.default_rng((7, 0)).permutation(30))
    plain = LMLoader(ds, global_batch=5, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([plain.batch(k).sample_ids for k in range(12)]),
                                  np.tile(np.arange(30), 2))


def test_drop_last_drops_the_tail_or_keeps_a_short_batch():
    ds = arange_dataset(11, 2)
    dropped = LMLoader(ds, global_batch=4, seed=1)
    assert dropped.steps_per_epoch == 2
    used = np.concatenate([dropped.batch(k).sample_ids for k in range(2)])
    assert len(np.unique(used)) == 8
    np.testing.assert_array_equal(used, dropped.epoch_order(0)[:8])
    kept = LMLoader(ds, global_batch=4, seed=1, drop_last=False)
    assert kept.steps_per_epoch == 3
    assert [len(kept.batch(k).sample_ids) for k in range(4)] == [4, 4, 3, 4]
    np.testing.assert_array_equal(np.sort(np.concatenate([kept.batch(k).sample_ids for k in range(3)])),
                                  np.arange(11))
    with pytest.raises(ValueError, match=r"last batch \(11 % 4 = 3 samples\) divisible by dp_size=2"):
        LMLoader(ds, global_batch=4, dp_size=2, drop_last=False)


def test_batch_k_is_the_kth_item_of_iteration_across_epochs():
    ds = arange_dataset(10, 4)
    loader = LMLoader(ds, global_batch=4, seed=11, dp_rank=1, dp_size=2, eod_reset=True, eod_id=13)
    assert loader.steps_per_epoch == 2
    seen = [next(loader) for _ in range(7)]                                # epochs 0, 1, 2, 3
    assert loader.step == 7 and loader.epoch == 3
    for k, got in enumerate(seen):
        want = loader.batch(k)
        assert got.step == k and got.epoch == k // 2
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.position_ids, want.position_ids)
        np.testing.assert_array_equal(got.attention_mask, want.attention_mask)
    # resuming at step 3 (mid-epoch 1) sees exactly the rest of the run
    resumed = loader.from_step(3)
    assert loader.step == 7                                                # the original is untouched
    for k in range(3, 7):
        np.testing.assert_array_equal(next(resumed).input_ids, seen[k].input_ids)
    # epochs differ: rows at step 0 and step 2 are not the same samples
    assert not np.array_equal(seen[0].sample_ids, seen[2].sample_ids)


def test_state_dict_round_trips_through_json_and_resumes():
    ds = arange_dataset(14, 3)
    run = LMLoader(ds, global_batch=4, seed=21)
    for _ in range(5):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    assert state == {"seed": 21, "step": 5, "epoch": 1, "step_in_epoch": 2, "global_batch": 4,
                     "num_samples": 14, "shuffle": 1, "drop_last": 1}
    # a fresh loader built with another seed and another dp split resumes the saved run
    fresh = LMLoader(ds, global_batch=4, seed=0, dp_rank=1, dp_size=2)
    fresh.load_state_dict(state)
    assert fresh.seed == 21 and fresh.step == 5
    for k in range(5, 9):
        np.testing.assert_array_equal(next(fresh).input_ids, run.batch(k).input_ids[2:4])
    with pytest.raises(ValueError, match=r"global_batch: expected 2 \(this loader's\), got 4"):
        LMLoader(ds, global_batch=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "seed"})


# ---- EOD reset ----

def brute_force_masks(tokens, eod_id):
    """Walk each row: a token after an EOD starts a new document at position 0."""
    b, s = tokens.shape
    pos = np.zeros((b, s), np.int64)
    mask = np.zeros((b, s, s), bool)
    for r in range(b):
        doc_of = []
        doc, p = 0, 0
        for i in range(s):
            doc_of.append(doc)
            pos[r, i] = p
            p += 1
            if tokens[r, i] == eod_id:
                doc, p = doc + 1, 0
        for i in range(s):
            for j in range(i + 1):
                mask[r, i, j] = doc_of[i] == doc_of[j]
    return pos, mask


def test_eod_reset_masks_small_example():
    pos, mask = eod_reset_masks(np.array([[5, 8, 7, 8, 8, 3]]), 8)
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(mask[0].astype(int), [[1, 0, 0, 0, 0, 0],
                                                        [1, 1, 0, 0, 0, 0],
                                                        [0, 0, 1, 0, 0, 0],
                                                        [0, 0, 1, 1, 0, 0],
                                                        [0, 0, 0, 0, 1, 0],
                                                        [0, 0, 0, 0, 0, 1]])


def test_eod_reset_masks_equal_brute_force():
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 20, (6, 24))
    tokens[tokens == EOD] = 9
    tokens[0, 0] = EOD                                                    # a document of one token first
    tokens[1, -1] = EOD                                                   # EOD as the last input token
    tokens[2, [0, 5, 6, 17, 23]] = EOD                                    # several, two in a row
    tokens[3, :] = EOD                                                    # every token its own document
    tokens[4, [3, 11]] = EOD
    # row 5: no EOD at all -> plain causal
    pos, mask = eod_reset_masks(tokens, EOD)
    want_pos, want_mask = brute_force_masks(tokens, EOD)
    assert pos.dtype == np.int32 and pos.shape == (6, 24) and mask.shape == (6, 24, 24)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(pos[3], 0)
    np.testing.assert_array_equal(mask[3], np.eye(24, dtype=bool))
    np.testing.assert_array_equal(pos[5], np.arange(24))
    np.testing.assert_array_equal(mask[5], np.tril(np.ones((24, 24), bool)))


def test_loader_masks_are_those_of_the_input_tokens():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 12, 6 * 9)                                   # EOD id 8 appears by chance
    loader = LMLoader(LMDataset(tokens, 8), global_batch=3, seed=1, eod_reset=True)
    b = loader.batch(1)
    assert (b.input_ids[:, :-1] == EOD).any()
    want_pos, want_mask = brute_force_masks(b.input_ids[:, :-1], EOD)
    np.testing.assert_array_equal(b.position_ids, want_pos)
    np.testing.assert_array_equal(b.attention_mask, want_mask)
    assert len(b.inputs()) == 3


def test_masks_agree_with_the_model():
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", eod_reset=True)
    net = PanguAlpha(config)
    rng = np.random.default_rng(3)
    s = config.seq_length
    tokens = rng.integers(10, config.vocab_size, (3, s)).astype(np.int32)
    tokens[0, [0, 6, 7, s - 1]] = config.eod_id
    tokens[1, [4, 9]] = config.eod_id
    pos, mask = eod_reset_masks(tokens, config.eod_id)
    in_graph = np.asarray(net(tokens))
    given = np.asarray(net(tokens, pos, mask))
    np.testing.assert_allclose(given, in_graph, rtol=1e-12, atol=1e-12)
    # the masks matter: plain causal inputs give other logits on the rows with EODs
    causal_pos = np.tile(np.arange(s, dtype=np.int32), (3, 1))
    causal = np.broadcast_to(np.tril(np.ones((s, s), bool)), (3, s, s))
    plain = np.asarray(net(tokens, causal_pos, causal))
    assert not np.allclose(plain[0], in_graph[0])
    np.testing.assert_allclose(plain[2], in_graph[2], rtol=1e-12, atol=1e-12)  # row 2 has no EOD


def test_batch_is_a_frozen_value():
    b = LMLoader(arange_dataset(4, 2), 2).batch(0)
    assert isinstance(b, Batch)
    with pytest.raises(Exception):
        b.step = 3

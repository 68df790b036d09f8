"""Generation: sampling rules, greedy decoding against a step-by-step reference, errors."""
import numpy as np
import pytest

from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig
from autopar.models.pangu_alpha.generate import generate, sample


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([0.1, 3.0, 2.0, -1.0, 2.5])
    assert sample(logits, rng, temperature=0) == 1
    assert sample(logits, rng, top_k=1) == 1
    picks = {sample(logits, rng, top_k=2) for _ in range(200)}
    assert picks == {1, 4}                                  # only the two largest
    # top_p: p(1) ~ 0.47, p(4) ~ 0.29: 0.6 keeps exactly those two
    picks = {sample(logits, rng, top_p=0.6) for _ in range(200)}
    assert picks == {1, 4}


def test_greedy_generation_equals_recomputing_argmax():
    config = PanguAlphaConfig.preset("tiny")
    model = PanguAlpha(config)
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44]]
    got = generate(model, prompts, 5, temperature=0)
    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        for _ in range(5):
            logits = model(np.array([seq], np.int32))      # unpadded, its own program
            seq.append(int(np.argmax(logits[0, -1])))
        assert new == seq[len(prompt):]


def test_prompt_longer_than_the_context_is_an_error():
    config = PanguAlphaConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"prompt 0: expected 1 to 15 tokens \(seq_length=16\), got 16"):
        generate(PanguAlpha(config), [list(range(16))], 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 2}, r"generate: top_p: expected a number in \(0, 1\] \(1: no nucleus cut\), got 2"),
    ({"top_p": 0.0}, r"generate: top_p: expected a number in \(0, 1\] \(1: no nucleus cut\), got 0.0"),
    ({"top_k": 97}, r"generate: top_k: expected an int in \[0, 96\], got 97"),
    ({"temperature": float("nan")}, r"generate: temperature: expected a finite number >= 0 \(0: greedy\), got nan"),
    ({"min_new_tokens": -1}, r"generate: min_new_tokens: expected an int >= 0, got -1"),
    ({"max_new_tokens": -1}, r"generate: max_new_tokens: expected an int >= 0, got -1"),
])
@pytest.mark.parametrize("decode", ["generate", "generate_cached"])
def test_sampling_arguments_out_of_range_are_errors(decode, kwargs, message):
    from autopar.models.pangu_alpha import generate as module
    model = PanguAlpha(PanguAlphaConfig.preset("tiny"))
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        getattr(module, decode)(model, [[11, 12]], **kwargs)


def test_cached_decoding_gives_the_tokens_of_recomputation():
    from autopar.models.pangu_alpha.generate import generate_cached
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")
    model = PanguAlpha(config)
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44, 45]]
    want = generate(model, prompts, 7, temperature=0)
    got = generate_cached(model, prompts, 7, temperature=0)
    assert got == want and all(len(g) == 7 for g in got)
    # sampled decoding with the same seed draws the same tokens too
    assert generate_cached(model, prompts, 5, top_k=4, seed=3) == generate(model, prompts, 5, top_k=4, seed=3)


def test_min_new_tokens_rules_out_an_early_eod():
    from autopar.models.pangu_alpha.generate import generate_cached
    config = PanguAlphaConfig.preset("tiny")
    model = PanguAlpha(config)
    logits = model(np.array([[11, 12, 13]], np.int32))[0, -1]
    eod = int(np.argmax(logits))          # make the greedy next token the "EOD"
    out = generate_cached(model, [[11, 12, 13]], 6, temperature=0, eod_id=eod, min_new_tokens=3)[0]
    assert eod not in out[:3] and len(out) >= 3
    assert generate_cached(model, [[11, 12, 13]], 6, temperature=0, eod_id=eod)[0] == [eod]


def test_order_aware_decoding_with_the_identity_order_is_ordinary_greedy_generation():
    from autopar.models.pangu_alpha.generate import decode_in_order
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", init_std=0.5)
    model = PanguAlpha(config)
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44, 45]]
    want = generate(model, prompts, 6, temperature=0)             # recomputed, padded to seq_length
    identity = [list(range(len(p) + 6)) for p in prompts]
    assert decode_in_order(model, prompts, identity, temperature=0) == want
    assert len({t for row in want for t in row}) > 3                # a model whose greedy tokens vary


def test_cached_decoding_in_a_random_order_equals_recomputing_with_position_and_query_ids():
    """Each generated token is the argmax of a full forward pass over the tokens fed so far,
    each at its position, each asking (query layer) for the position fed after it."""
    from autopar.models.pangu_alpha.generate import decode_in_order
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", init_std=0.5)
    model = PanguAlpha(config)
    known, order = [21, 7, 33, 50], [0, 9, 10, 11, 5, 2, 8, 1, 3]   # tokens at 0, 9, 10, 11; then 5, 2, 8, 1, 3
    got = decode_in_order(model, [known], [order], temperature=0)[0]
    fed = list(known)
    for t in range(len(known) - 1, len(order) - 1):
        ids = np.array([fed], np.int32)                                        # (1, t+1) in feeding order
        pos = np.array([order[:t + 1]], np.int32)                              # where each fed token sits
        query = np.array([[p - 1 for p in order[1:t + 2]]], np.int32)         # the position asked for next
        fed.append(int(np.argmax(model(ids, pos, None, query)[0, -1])))
    assert got == fed[len(known):] and len(got) == 5


def test_bad_orders_are_rejected():
    from autopar.models.pangu_alpha.generate import decode_in_order, fill_middle
    model = PanguAlpha(PanguAlphaConfig.preset("tiny"))
    with pytest.raises(ValueError, match="row 0: expected 1 or more known tokens, the first at position 0"):
        decode_in_order(model, [[5, 6]], [[1, 0, 2]])
    with pytest.raises(ValueError, match=r"row 0: expected distinct positions in \[0, 16\).*repeated"):
        decode_in_order(model, [[5, 6]], [[0, 2, 2]])
    with pytest.raises(ValueError, match=r"out of range \[16\]"):
        decode_in_order(model, [[5, 6]], [[0, 1, 16]])
    with pytest.raises(ValueError, match=r"fill_middle: order: expected a permutation of the gap offsets 0..2"):
        fill_middle(model, [5], [6], 3, [0, 1, 1])
    with pytest.raises(ValueError, match="fill_middle: prefix: expected at least one token"):
        fill_middle(model, [], [6], 2)


def test_model_parallel_cached_decoding_equals_serial_recomputation():
    """mp2 on in-process ranks: the decoder runs sharded (the plan's Megatron split), each rank
    keeps its half of the heads in the key/value caches, and the greedy tokens are those of
    recomputing serially; per fed token one all-reduce per row-parallel layer and one
    all-gather of the vocabulary-split logits, nothing else."""
    from autopar.comm import run_in_process
    from autopar.context import bound_world, parallel_context
    from autopar.models.pangu_alpha.generate import PanguAlphaDecoder, generate_cached
    from autopar.runtime.sharded_forward import forward_program
    config = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", init_std=0.5)
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44, 45]]
    want = generate(PanguAlpha(config), prompts, 7, temperature=0)
    sampled = generate(PanguAlpha(config), prompts, 5, top_k=4, seed=3)

    def body(comm):
        with bound_world(comm):
            model = PanguAlpha(config.replace(model_parallel=2))
            comm.stats.reset()
            greedy = generate_cached(model, prompts, 7, temperature=0)
            stats = comm.stats.snapshot()
            top_k = generate_cached(model, prompts, 5, top_k=4, seed=3)
            decoder = PanguAlphaDecoder(model)
            b, s, d = len(prompts), config.seq_length, config.head_dim
            ints = np.zeros((b, 1), np.int32)
            args = (ints, ints, ints, np.zeros((b, 1, 1, s)), np.zeros((b, 1, s, 1), bool)) + \
                tuple(np.zeros((b, config.num_heads, s, d)) for _ in range(2 * config.num_layers))
            cache = forward_program(decoder, args, {}, decoder.carry()).local_zeros(decoder.CACHE_ARG)
            return greedy, top_k, stats, cache.shape

    with parallel_context(parallel_mode="semi_auto_parallel", full_batch=True):
        res = run_in_process(2, body)
    fed = len(prompts[1]) + 7 - 1                          # lockstep steps: the longest row's tokens fed
    for greedy, top_k, stats, cache_shape in res:
        assert greedy == want and top_k == sampled
        assert cache_shape == (2, config.num_heads // 2, config.seq_length, config.head_dim)
        assert stats["count"] == {"allreduce": 2 * config.num_layers * fed, "allgather": fed}
    assert len({t for row in want for t in row}) > 3


def test_cached_decoding_of_a_sequence_parallel_model_names_the_fix():
    """One token a step has no sequence to split: a sequence-parallel mp model is refused at
    once, pointing at the same model without it (whose cached decoding works)."""
    from autopar.models.pangu_alpha.generate import generate_cached
    config = PanguAlphaConfig.preset("tiny", model_parallel=2, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"PanguAlphaDecoder: model.config.sequence_parallel: expected False for "
                                         r"incremental decoding .*config.replace\(sequence_parallel=False\)"):
        generate_cached(PanguAlpha(config), [[11, 12, 13]], 2, temperature=0)
    plain = PanguAlpha(config.replace(sequence_parallel=False))
    assert generate_cached(plain, [[11, 12, 13]], 2, temperature=0) == generate(plain, [[11, 12, 13]], 2,
                                                                                temperature=0)

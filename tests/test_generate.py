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

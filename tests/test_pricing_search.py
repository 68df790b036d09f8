"""The stage search tries every micro-batch count the runtime can run, not only p, 2p, 4p
(issue 13: published runs use up to 9p, and for some shapes only one count was tried)."""
from autopar import models  # noqa: F401  (registers the families)
from autopar.strategy.pipeline.registry import model_family
from autopar.strategy.pipeline.stage_search import StageCoster, micro_batch_counts, search_stages
from autopar.strategy.profile import load_profile


def test_micro_batch_counts_are_every_divisor_that_splits_over_dp_and_fills_the_pipeline():
    # GPT-3's batch 1536 on 8 stages x dp 4: m divides 1536, 1536 / m splits over 4 ranks, m >= 8
    assert micro_batch_counts(1536, 8, 4) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 384]
    assert micro_batch_counts(48, 1, 1) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert micro_batch_counts(16, 32, 1) == []          # fewer sequences than stages: no count fills them


def test_the_search_prices_every_count_for_each_degree_choice():
    fam = model_family("pangu_alpha", "tiny", num_layers=5)
    coster = StageCoster(fam, 8, load_profile("cpu-2core"))
    _, tried = search_stages(coster, 48)
    counts = sorted({p.micro_batches for p in tried if (p.pp, p.dp, p.mp) == (2, 2, 2)})
    assert counts == [2, 3, 4, 6, 8, 12, 24]            # 3 and 6 (1.5p, 3p) were never tried before
    assert all(len([p for p in tried if (p.pp, p.dp, p.mp, p.micro_batches) == (2, 2, 2, m)]) == 4
               for m in counts)                          # x recompute x optimizer parallel

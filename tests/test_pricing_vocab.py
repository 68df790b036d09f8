"""A vocabulary-split word table (``vocab_emb_dp=False``) costs the residual stream nothing.

With the table split over model parallel and the batch over data parallel, the lookup's
output is a partial sum over mp; the Megatron count of what that adds to a step is ONE
all-reduce of the (B/dp, S, H) embedding output over the mp ranks in forward. Every
LayerNorm and residual Add downstream reads the stream where it lives, as with a replicated
table. Issue 13 found each of them priced with an all-gather of the whole stream (116 s of
a 124 s step): the Gather's device matrix put the vocabulary axis major, so its output's
batch blocks sat on other ranks than every other op's, and the runtime's lowering inserted
those all-gathers too (4 ranks, tiny model: 12 all-gathers in forward against 2). The fix
is in the device matrix a user strategy gets (``autopar/ops/sharding.py``: ``from_strategy``
puts an op's ``major`` letters first; the Gather's are its index (batch) letters, as
MindSpore's GatherInfo orders a batch-and-axis split).
"""
import numpy as np
import pytest

from autopar import models  # noqa: F401  (registers the families)
from autopar.ir.mesh import Mesh
from autopar.strategy import formulas
from autopar.strategy.costmodel import CostModel
from autopar.strategy.pipeline.registry import model_family
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings

PROFILE = load_profile("a100-8")
DP, MP, BATCH = 2, 2, 4


def comm_per_op(vocab_emb_dp: bool) -> tuple[dict, object]:
    """op name -> its predicted communication (s) on dp x mp = 2 x 2, and the graph."""
    fam = model_family("pangu_alpha", "tiny", vocab_emb_dp=vocab_emb_dp)
    graph = fam.graph(BATCH, DP, MP, one_layer=True)
    stage = Mesh((DP * MP,), ("devices",))
    model = CostModel(graph, stage, PROFILE, True)
    plan = plan_shardings(graph, "semi_auto_parallel", stage, True)
    return {n.name: c.comm_s + c.grad_s + edge for n, c, edge in model.op_costs(plan)}, graph


def test_vocab_split_table_adds_one_embedding_all_reduce_and_nothing_on_the_residual_stream():
    split, graph = comm_per_op(False)
    whole, _ = comm_per_op(True)
    stream = [k for k in split if ("layernorm" in k or k.split("/")[-1].startswith("Add")) and
              k.split("/")[0] != "PanguAlpha"]
    assert len(stream) >= 6                      # LN1, LN2, two residual Adds per layer, final LN
    for name in stream:
        assert split[name] == pytest.approx(whole[name], abs=1e-12), name
    cfg_h, cfg_s = 32, 16                        # the tiny preset's hidden and sequence
    out_bytes = BATCH // DP * cfg_s * cfg_h * np.dtype(np.float32).itemsize
    hand = formulas.collective_seconds("all_reduce", out_bytes, MP, PROFILE, inter_node=False)
    # the embedding sum (word + position) reads the partial lookup: one all-reduce over mp
    assert split["PanguAlpha/Add-1"] - whole["PanguAlpha/Add-1"] == pytest.approx(hand, rel=1e-9)

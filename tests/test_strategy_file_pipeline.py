"""Strategy files under pipelines: one version-2 file lists every stage's plan. A pp2 x mp2
run saves it; a network without ``.shard()`` annotations loading it plans every stage
exactly as saved and trains to identical losses (and serial's). Version-1 files still load
(as a one-stage pipeline); a file for other stage or device counts is a clear error."""
import json
from pathlib import Path

import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.ops.primitive import Primitive
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64")  # 2 blocks + query
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
IDS[IDS == CONFIG.pad_id] = CONFIG.pad_id + 1     # no padding: the micro-batch mean is the batch loss


def pangu(mp: int, stages: int, annotated: bool = True):
    net = PanguAlphaWithLoss(CONFIG.replace(model_parallel=mp))
    if stages > 1:
        nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=stages)
    if not annotated:   # every op's .shard() forgotten; the pipeline stages stay
        for _, cell in net.named_cells():
            for value in vars(cell).values():
                if isinstance(value, Primitive):
                    value.strategy = None
    return net


def train(n: int, stages: int, micro: int, mp: int, annotated: bool = True, **files):
    """Three AdamWeightDecay steps on ``n`` ranks; per rank: losses, and its stage's plan as
    {op name: (split tuples, output layout)} and {parameter name: layout}."""
    def body(comm):
        with bound_world(comm):
            net = pangu(mp, stages, annotated)
            cell = nn.PipelineCell(net, micro) if micro else net
            opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
            trainer = nn.TrainOneStepCell(cell, opt, clip_norm=0.5)
            losses = [float(trainer(IDS)) for _ in range(3)]
            prog = trainer.build(IDS)
            if micro:
                plan, graph = prog.plan.plans[prog.stage], prog.plan.stages[prog.stage].graph
            else:
                plan, graph = prog.plan, prog.graph
            ops = {graph.nodes[i].name: (s.splits(), str(s.output_layout())) for i, s in plan.shardings.items()}
            layouts = {s.name: str(s.layout) for s in prog.shards if getattr(s, "layout", None) is not None}
            return losses, ops, layouts
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, pipeline_stages=stages,
                          full_batch=True, **files):
        return run_in_process(n, body)


@pytest.fixture(scope="module")
def serial_losses():
    net = pangu(1, 1)
    trainer = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2,
                                                       weight_decay=0.01), clip_norm=0.5)
    return [float(trainer(IDS)) for _ in range(3)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, serial_losses):
    path = str(tmp_path_factory.mktemp("pp") / "pp2_mp2.json")
    return path, train(4, 2, 2, 2, strategy_ckpt_save_file=path)


def test_one_file_lists_every_stage(saved, serial_losses):
    path, res = saved
    doc = json.loads(Path(path).read_text())
    assert (doc["format"], doc["version"], doc["device_num"], doc["pipeline_stages"]) == ("autopar-strategy", 2, 4, 2)
    assert [s["stage"]["ranks"] for s in doc["stages"]] == [[0, 1], [2, 3]]
    first, last = (set(s["ops"]) for s in doc["stages"])
    assert any(n.startswith("blocks.1.") for n in first) and not any(n.startswith("blocks.") for n in last)
    assert any(n.startswith("query_layer.") for n in last) and not any(n.startswith("query_layer.") for n in first)
    assert "word_embedding.embedding_table" in doc["stages"][0]["parameters"]    # the tied table: both stages
    assert "word_embedding.embedding_table" in doc["stages"][1]["parameters"]
    assert all(s["predicted"]["step_seconds"] > 0 for s in doc["stages"])
    for rank, (losses, ops, _) in enumerate(res):   # each rank's stage plan is what the file holds
        stage = doc["stages"][rank // 2]
        assert set(ops) == set(stage["ops"])
        assert all(list(map(list, ops[n][0])) == e["strategy"] for n, e in stage["ops"].items())
        np.testing.assert_allclose(losses, serial_losses, rtol=1e-9)
    assert any(e["strategy"] != [[1] * len(s) for s in e["strategy"]] for e in doc["stages"][1]["ops"].values())


def test_an_unannotated_pipeline_loading_the_file_trains_identically(saved):
    path, res = saved
    plain = train(4, 2, 2, 2, annotated=False)
    loaded = train(4, 2, 2, 2, annotated=False, strategy_ckpt_load_file=path)
    for want, got, other in zip(res, loaded, plain):
        assert got == want                       # the same plan on every stage: the same arithmetic
        assert other[1] != want[1]               # (without the file: another plan)


def test_a_version_1_file_loads_as_a_one_stage_pipeline(tmp_path, serial_losses):
    path = str(tmp_path / "mp2.json")
    plain = train(2, 1, 0, 2, strategy_ckpt_save_file=path)            # no pipeline: version 1
    assert json.loads(Path(path).read_text())["version"] == 1
    loaded = train(2, 1, 1, 2, annotated=False, strategy_ckpt_load_file=path)
    for (want_losses, want_ops, want_layouts), (losses, ops, layouts) in zip(plain, loaded):
        assert ops == want_ops and layouts == want_layouts
        np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
        np.testing.assert_allclose(losses, serial_losses, rtol=1e-9)


def test_a_file_for_other_stages_or_devices_is_a_clear_error(saved):
    path = saved[0]
    with pytest.raises(ValueError, match=r"pipeline_stages: expected 3 \(the context's pipeline_stages\), got 2"):
        train(3, 3, 4, 1, annotated=False, strategy_ckpt_load_file=path)
    with pytest.raises(ValueError, match=r"device_num: expected 8 \(the ranks of this pipeline\), got 4"):
        train(8, 2, 2, 1, annotated=False, strategy_ckpt_load_file=path)
    with pytest.raises(ValueError, match=r"pipeline_stages: expected 1 \(this compile has no pipeline\), got 2"):
        train(4, 1, 0, 2, annotated=False, strategy_ckpt_load_file=path)

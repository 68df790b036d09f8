"""Memory of a pipeline step, measured over the whole step on each rank: every forward and
backward half, and every micro-batch's saved values while it is in flight. On the first of
two stages with m=4 micro-batches, 1F1B's activation peak is lower than GPipe's and both
follow the schedule tables: (bytes one micro-batch keeps in flight) x (micro-batches in
flight at once), within 15%."""
import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.pipeline.shards import StageShard
from autopar.strategy.pipeline.schedule import make_schedule
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=4, dropout_rate=0.1)   # 3 blocks + the query layer
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)
MICRO = 4


def measured(schedule: str, measure: bool = True):
    """pp2, two steps (the second measured). Per rank: its stage, the memory report, the
    bytes each micro-batch kept in flight, the measured in-flight count, the losses, and the
    bytes of its stage's parameter shards and of the constants its halves read."""
    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG)
            nn.set_pipeline_stages(list(net.backbone.blocks) + [net.backbone.query_layer], stages=2)
            train = nn.TrainOneStepCell(nn.PipelineCell(net, MICRO, schedule),
                                        AdamWeightDecay(net.trainable_params(), 1e-3))
            train.measure_memory(measure)
            losses = [float(train(IDS)) for _ in range(2)]
            if not measure:
                return losses
            prog = train.build(IDS)
            shards = sum(s.data.nbytes for s in prog.param_shards if isinstance(s, StageShard))
            consts = {id(a): a.nbytes for p in prog.program.programs for a in p.graph.consts.values()}
            return {"stage": prog.stage, "report": train.memory_report(), "losses": losses,
                    "per_micro": dict(prog.last_memory.saved_bytes), "in_flight": prog.in_flight,
                    "shards": shards, "consts": sum(consts.values())}
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=2, pipeline_stages=2, full_batch=True):
        return run_in_process(2, body)


@pytest.fixture(scope="module")
def runs():
    return {s: measured(s) for s in ("gpipe", "1f1b")}


def test_first_stage_activation_peak_follows_the_in_flight_counts(runs):
    gpipe, one_f = runs["gpipe"][0], runs["1f1b"][0]
    assert gpipe["stage"] == one_f["stage"] == 0
    # every micro-batch keeps the same bytes in flight, under either schedule
    per = set(gpipe["per_micro"].values())
    assert len(per) == 1 and set(one_f["per_micro"].values()) == per and len(gpipe["per_micro"]) == MICRO
    per_micro = per.pop()
    for schedule, run in runs.items():
        first = run[0]
        in_flight = make_schedule(schedule, 2, MICRO).in_flight(0)
        assert first["in_flight"] == in_flight == (MICRO if schedule == "gpipe" else 2)
        peak = first["report"]["activations_peak"]
        assert abs(peak / (per_micro * in_flight) - 1) <= 0.15, (schedule, peak, per_micro, in_flight)
    assert one_f["report"]["activations_peak"] < 0.6 * gpipe["report"]["activations_peak"]


def test_report_counts_the_stage_alone(runs):
    """Parameters, gradients and Adam's two states are this stage's shards; inputs the fed
    batch and the constants; the peak adds up."""
    for run in runs["1f1b"]:
        report = run["report"]
        assert report["parameters"] == report["gradients"] == run["shards"]
        assert report["optimizer_states"] == 2 * run["shards"]
        assert report["inputs"] == IDS.nbytes + run["consts"]
        assert report["total_peak"] >= (report["parameters"] + report["inputs"] + report["optimizer_states"]
                                        + report["activations_peak"])
    assert runs["1f1b"][0]["shards"] != runs["1f1b"][1]["shards"]      # two stages, two sets of weights


def test_measuring_changes_nothing(runs):
    plain = measured("1f1b", measure=False)
    for got, want in zip(runs["1f1b"], plain):
        assert got["losses"] == want

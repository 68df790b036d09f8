"""``parallel_mode="auto_parallel"`` end to end: the searched plan of PanGu-α tiny runs on
in-process ranks and gives the serial loss, gradients and trained weights, under every
search mode; a strategy file saved by a searched run reproduces it exactly."""
import json

import numpy as np
import pytest

import autopar
from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.strategy.profile import PROFILE_DIR, load_profile
from autopar.strategy.search import SEARCH_MODES
from autopar.train import AdamWeightDecay

CONFIG = PanguAlphaConfig.preset("tiny", hidden_size=64, ffn_hidden_size=256, num_layers=2, vocab_size=128,
                                  dropout_rate=0.1, param_dtype="float64", compute_dtype="float64")
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, CONFIG.seq_length + 1)).astype(np.int32)


@pytest.fixture(scope="module")
def slow_compute_profile(tmp_path_factory):
    """A machine whose GEMMs are slow next to its links, so splitting work pays and the
    searched plans are really sharded (the measured 2-core profile replicates a model this
    small: a collective's latency outweighs its compute)."""
    base = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    base.update(name="slow-gemm", gemm_flops={"float32": 1e6, "float64": 1e6})
    base["sources"]["gemm_flops.float32"] = base["sources"]["gemm_flops.float64"] = "assumed, for this test"
    path = tmp_path_factory.mktemp("profile") / "slow.json"
    path.write_text(json.dumps(base))
    load_profile(str(path))
    return str(path)


def train(net, steps=3):
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    step = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
    losses = [float(step(IDS)) for _ in range(steps)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


def run_auto(mode, profile, n=4, steps=3, **ctx):
    """Per rank: (losses, trained weights, the plan) under auto_parallel on ``n`` ranks."""
    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG)
            opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
            step = nn.TrainOneStepCell(net, opt, clip_norm=1.0)
            local = np.split(IDS, n)[comm.rank]
            losses = [float(step(local)) for _ in range(steps)]
            prog = step.build(local)
            return losses, {p.name: p.asnumpy() for p in net.trainable_params()}, prog.plan
    with parallel_context(parallel_mode="auto_parallel", device_num=n, search_mode=mode, cost_profile=profile,
                          **ctx):
        return run_in_process(n, body)


@pytest.fixture(scope="module")
def serial():
    net = PanguAlphaWithLoss(CONFIG)
    return train(net)


@pytest.mark.parametrize("mode", SEARCH_MODES)
def test_searched_plans_train_like_serial(serial, slow_compute_profile, mode):
    losses, weights = serial
    res = run_auto(mode, slow_compute_profile)
    plan = res[0][2]
    split = [s for s in plan.shardings.values() if max((k for sp in s.splits() for k in sp), default=1) > 1]
    assert len(split) > len(plan.shardings) // 2, "the search should shard most ops on this profile"
    for got_losses, got_weights, _ in res:
        np.testing.assert_allclose(got_losses, losses, rtol=1e-10)
        for name, w in weights.items():
            np.testing.assert_allclose(got_weights[name], w, rtol=1e-8, atol=1e-12, err_msg=name)


def test_a_searched_plan_saved_to_a_strategy_file_replays_exactly(slow_compute_profile, tmp_path):
    path = str(tmp_path / "searched.json")
    saved = run_auto("dynamic_programming", slow_compute_profile, strategy_ckpt_save_file=path)
    # another search mode would plan differently; the file makes it replay the saved plan
    loaded = run_auto("sharding_propagation", slow_compute_profile, strategy_ckpt_load_file=path)
    for (la, wa, pa), (lb, wb, pb) in zip(saved, loaded):
        assert la == lb
        assert pa.shardings == pb.shardings and pa.layouts == pb.layouts
        for name in wa:
            np.testing.assert_array_equal(wb[name], wa[name])
    doc = json.loads(open(path).read())
    assert doc["predicted"]["step_seconds"] > 0


def test_one_rank_under_auto_parallel_is_the_serial_program(serial):
    with parallel_context(parallel_mode="auto_parallel"):
        losses, _ = train(PanguAlphaWithLoss(CONFIG))
    assert losses == serial[0]

"""MindSpore's ``strategy_ckpt_config``: its files are the two strategy keys, and
``only_trainable_params`` (MindSpore's default True) lists trainable parameters only -- a
frozen weight left out of the file is placed, at load, as the ops reading it read it, so
the loaded plan is the saved one and a run from it trains the same."""
import json

import numpy as np
from test_strategy_file import IDS, assert_same_plan, pangu, traced

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.mesh import Mesh
from autopar.strategy.sharding_plan import plan_shardings
from autopar.strategy.strategy_file import load_strategy, save_strategy
from autopar.train import AdamWeightDecay

FROZEN = "position_embedding.embedding_table"


def frozen_pangu(dp, mp, **kw):
    net = pangu(dp, mp, **kw)
    net.parameters_dict()[FROZEN].requires_grad = False
    return net


def test_a_file_of_trainable_parameters_loads_back_the_same_plan(tmp_path):
    net = frozen_pangu(2, 2)
    graph, stage = traced(net, 8), Mesh((4,), ("devices",))
    plan = plan_shardings(graph, "semi_auto_parallel", stage, False)
    path = tmp_path / "s.json"
    save_strategy(path, graph, plan, only_trainable=True)
    params = json.loads(path.read_text())["parameters"]
    assert FROZEN not in params and len(params) == len(graph.params) - 1
    assert_same_plan(load_strategy(path, graph, stage), plan)
    save_strategy(path, graph, plan, only_trainable=False)
    assert FROZEN in json.loads(path.read_text())["parameters"]


def two_steps(path, key, only):
    """Two AdamW steps on dp2 x mp2 with the strategy file ``path`` written (``key``:
    "save_file") or read ("load_file") through strategy_ckpt_config."""
    def body(comm):
        with bound_world(comm):
            net = frozen_pangu(2, 2)
            train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2))
            return [float(train(IDS[4])) for _ in range(2)]
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True,
                          strategy_ckpt_config={key: str(path), "only_trainable_params": only}):
        return run_in_process(4, body)[0]


def test_strategy_ckpt_config_saves_and_loads_through_its_files(tmp_path):
    path = tmp_path / "run.json"
    saved = two_steps(path, "save_file", True)
    assert FROZEN not in json.loads(path.read_text())["parameters"]
    np.testing.assert_allclose(two_steps(path, "load_file", True), saved, rtol=1e-12)
    two_steps(path, "save_file", False)
    assert FROZEN in json.loads(path.read_text())["parameters"]

"""The compile setting is a named frozen value, and saving a strategy file is a step of its
own after planning: planning writes nothing, the sharded program saves what it planned."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autopar.comm import SelfCommunicator, run_in_process
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.setting import CompileSetting, parallel_setting
from autopar.runtime.sharded_program import save_plan
from autopar.runtime.trace import trace
from autopar.strategy.plan_source import make_plan
from autopar.strategy.strategy_file import load_strategy

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1, model_parallel=2)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


@pytest.mark.parametrize("dataset_strategy, full", [("full_batch", True), ("data_parallel", False)])
def test_parallel_setting_is_named_and_still_unpacks(dataset_strategy, full):
    def body(comm):
        with bound_world(comm), parallel_context(parallel_mode="semi_auto_parallel", device_num=2,
                                                 dataset_strategy=dataset_strategy):
            setting = parallel_setting()
            mode, world, full_batch, ctx = setting          # how pipeline/program.py reads it
            return (setting.mode, setting.world is comm, setting.full_batch, setting.ctx.dataset_strategy,
                    (mode, world, full_batch, ctx) == tuple(setting), isinstance(setting, CompileSetting))
    assert run_in_process(2, body) == [("semi_auto_parallel", True, full, dataset_strategy, True, True)] * 2


def test_stand_alone_and_one_rank_have_no_setting():
    with bound_world(SelfCommunicator()):
        assert parallel_setting() is None
        with parallel_context(parallel_mode="semi_auto_parallel"):
            assert parallel_setting() is None          # one rank: serial


def test_planning_writes_no_file_and_saving_writes_the_plan(tmp_path):
    path = str(tmp_path / "plan.json")
    graph = trace(PanguAlphaWithLoss(CONFIG), (IDS,), {}).graph
    stage = Mesh((2,), ("devices",), (0, 1))
    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=2, strategy_ckpt_save_file=path)
    plan = make_plan(graph, "semi_auto_parallel", stage, True, ctx)
    assert not (tmp_path / "plan.json").exists()       # planning is planning only
    save_plan(path, graph, plan, True, ctx)
    back = load_strategy(path, graph, stage)
    assert back.layouts == plan.layouts and back.shardings == plan.shardings
    predicted = json.loads((tmp_path / "plan.json").read_text())["predicted"]
    assert predicted["step_seconds"] > 0 and predicted["memory_bytes_per_rank"] > 0

"""The compile setting is a named frozen value, and saving a strategy file is a step of its
own after planning: planning writes nothing, the sharded program saves what it planned."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from autopar.comm import SelfCommunicator, run_in_process
from autopar.context import ParallelContext, bound_world, parallel_context
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.setting import CompileSetting, parallel_setting
from autopar.runtime.trace import trace
from autopar.strategy.plan_source import make_plan, save_plan
from autopar.strategy.strategy_file import load_strategy

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1, model_parallel=2)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


@pytest.mark.parametrize("dataset_strategy, full", [("full_batch", True), ("data_parallel", False)])
def test_parallel_setting_is_a_named_frozen_value(dataset_strategy, full):
    def body(comm):
        with bound_world(comm), parallel_context(parallel_mode="semi_auto_parallel", device_num=2,
                                                 dataset_strategy=dataset_strategy):
            setting = parallel_setting()
            try:
                setting.mode = "stand_alone"
                frozen = False
            except dataclasses.FrozenInstanceError:
                frozen = True
            return (setting.mode, setting.world is comm, setting.full_batch, setting.ctx.dataset_strategy,
                    frozen, isinstance(setting, CompileSetting))
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
    plan = make_plan(graph, "semi_auto_parallel", stage, True, ctx.plan_options)
    assert not (tmp_path / "plan.json").exists()       # planning is planning only
    save_plan(path, graph, plan, True, ctx.plan_options)
    back = load_strategy(path, graph, stage)
    assert back.layouts == plan.layouts and back.shardings == plan.shardings
    predicted = json.loads((tmp_path / "plan.json").read_text())["predicted"]
    assert predicted["step_seconds"] > 0 and predicted["memory_bytes_per_rank"] > 0


def test_planning_reads_the_context_as_plan_options(tmp_path):
    """strategy/ never reads the context: the fields it plans by come down as one frozen value,
    and a search setting changed in the context changes the plan's options."""
    ctx = ParallelContext(parallel_mode="auto_parallel", device_num=2, search_mode="recursive_programming",
                          enable_parallel_optimizer=True, strategy_ckpt_load_file=str(tmp_path / "in.json"))
    opts = ctx.plan_options
    assert (opts.strategy_file, opts.search_mode, opts.optimizer_parallel) == (
        str(tmp_path / "in.json"), "recursive_programming", True)
    assert opts.without_files().strategy_file == "" and opts.without_files().search_mode == "recursive_programming"
    assert ctx.replace(search_mode="dynamic_programming").plan_options != opts
    assert ctx.slice_threshold == ctx.parallel_optimizer_threshold
    assert ctx.replace(enable_parallel_optimizer=False).slice_threshold is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.search_mode = "sharding_propagation"

"""benchmarks/gpu_step.py --profile: its prediction of one TrainOneStepCell step is the cost
model's serial-plan figures, computed on the CPU (no GPU needed to predict)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.profile import load_profile
from autopar.strategy.sharding_plan import plan_shardings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_step  # noqa: E402

BATCH = 2


def tiny(dtype: str) -> PanguAlphaConfig:
    return PanguAlphaConfig.preset("tiny", param_dtype="float32", compute_dtype=dtype, dropout_rate=0.1)


def direct(config: PanguAlphaConfig, profile: str):
    """The cost model called directly on the one-device stand-alone plan (what the serial
    GradProgram compiles), the network in training mode as TrainOneStepCell puts it."""
    net = PanguAlphaWithLoss(config)
    net.set_train(True)
    graph = trace(net, (TensorSpec((BATCH, config.seq_length + 1), np.dtype(np.int32)),), {}).graph
    mesh = Mesh((1,), ("devices",), (0,))
    return CostModel(graph, mesh, load_profile(profile), True).evaluate(plan_shardings(graph, "stand_alone", mesh, True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("profile", ["cpu-2core", "h100-8"])
def test_the_prediction_is_the_cost_models_serial_plan(dtype, profile):
    plan = gpu_step.predict_step(tiny(dtype), BATCH, profile)
    cost = direct(tiny(dtype), profile)
    assert (plan.pp, plan.micro_batches, plan.recompute, plan.optimizer_parallel) == (1, 1, False, False)
    assert plan.step_seconds == pytest.approx(cost.step_seconds, rel=1e-12)
    assert plan.peak_memory_bytes == cost.memory_bytes


def test_a_profile_path_prices_like_its_name(tmp_path):
    path = tmp_path / "copy.json"
    path.write_text((Path(__file__).resolve().parents[1] / "autopar/strategy/profiles/h100-8.json").read_text())
    by_name = gpu_step.predict_step(tiny("bfloat16"), BATCH, "h100-8")
    by_path = gpu_step.predict_step(tiny("bfloat16"), BATCH, str(path))
    assert by_path.step_seconds == by_name.step_seconds and by_path.peak_memory_bytes == by_name.peak_memory_bytes


def test_dropout_is_priced_as_the_training_step_runs_it():
    """TrainOneStepCell trains with dropout on: a prediction of the network left in eval mode
    would price no dropout at all and come out faster."""
    config = tiny("float32")
    net = PanguAlphaWithLoss(config)                      # eval mode: no dropout traced
    graph = trace(net, (TensorSpec((BATCH, config.seq_length + 1), np.dtype(np.int32)),), {}).graph
    mesh = Mesh((1,), ("devices",), (0,))
    eval_cost = CostModel(graph, mesh, load_profile("cpu-2core"), True).evaluate(
        plan_shardings(graph, "stand_alone", mesh, True))
    assert gpu_step.predict_step(config, BATCH, "cpu-2core").step_seconds > eval_cost.step_seconds


def test_a_row_compares_prediction_and_measurement():
    plan = gpu_step.predict_step(tiny("bfloat16"), BATCH, "h100-8")
    measured = gpu_step.Measured(step_s=plan.step_seconds * 2, spread=0.0, pool_bytes=3 * plan.peak_memory_bytes,
                                 peak_bytes=2 * plan.peak_memory_bytes, meter_bytes=4 * plan.peak_memory_bytes)
    fields = gpu_step.prediction_row("tiny", "bfloat16", plan, measured).split()
    assert fields[:2] == ["tiny", "bfloat16"]
    assert [fields[4], fields[7], fields[9]] == ["0.500", "0.500", "0.250"]     # pred/meas, pred/peak, pred/meter


def test_a_bad_profile_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_step.main(["--profile", "tpu-v9"])
    assert exit_info.value.code == 2
    assert "--profile: expected a shipped profile name or a profile .json path, got 'tpu-v9'" in capsys.readouterr().err

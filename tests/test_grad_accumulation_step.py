"""MindSpore's ``grad_accumulation_step`` context key: k micro-batches' gradients add up
before one update, as ``nn.GradAccumulationCell(net, k)`` does -- the whole batch's step,
on dp2 x mp2 and under auto_parallel; refused where MindSpore refuses it."""
import numpy as np
import pytest
from test_auto_plan import CONFIG, IDS, PanguAlphaWithLoss, _assert_same, _bound, _train

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import ParallelContext, parallel_context
from autopar.train import AdamWeightDecay


def semi_auto(make, n=4, **ctx):
    """Two steps under semi_auto_parallel on n ranks fed their rows: (losses, weights, program) per rank."""
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=n, **ctx):
        return run_in_process(n, lambda comm: _bound(comm, lambda c: _train_body(make, c, n)))


def _train_body(make, comm, n):
    net = make()
    step = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), learning_rate=1e-2))
    local = np.split(IDS, n)[comm.rank]
    losses = [float(step(local)) for _ in range(2)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}, step.build(local)


def test_grad_accumulation_step_is_the_whole_batch_step_under_semi_auto(pangu_serial):
    res = semi_auto(lambda: PanguAlphaWithLoss(CONFIG.replace(data_parallel=2, model_parallel=2)),
                    grad_accumulation_step=2)
    prog = res[0][2]
    assert prog.micro == 2                                 # two micro-batches, one update
    _assert_same(res, pangu_serial)


def test_grad_accumulation_step_fixes_the_joint_plans_micro_batches(pangu_serial):
    res = _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS], n=4, grad_accumulation_step=2)
    assert res[0][2].choice.micro_batches == 2
    _assert_same(res, pangu_serial)


def test_grad_accumulation_step_is_refused_outside_semi_and_auto_parallel():
    with pytest.raises(ValueError, match=r"grad_accumulation_step: expected 1 outside semi_auto_parallel"):
        ParallelContext(parallel_mode="data_parallel", grad_accumulation_step=2)
    with pytest.raises(ValueError, match=r"grad_accumulation_step: expected an int >= 1"):
        ParallelContext(parallel_mode="semi_auto_parallel", grad_accumulation_step=0)


def test_grad_accumulation_step_with_a_pipeline_cell_is_refused():
    with pytest.raises(ValueError, match=r"grad_accumulation_step: expected 1 with a PipelineCell"):
        semi_auto(lambda: nn.GradAccumulationCell(PanguAlphaWithLoss(CONFIG.replace(data_parallel=2)), 2), n=2,
                  grad_accumulation_step=2)


@pytest.fixture(scope="module")
def pangu_serial():
    return _train(lambda: PanguAlphaWithLoss(CONFIG), [IDS])

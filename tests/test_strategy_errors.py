"""Bad strategies are plan-time errors naming the op scope, the input, the dim, the sizes
and a fix. Planning needs no communication: a 4-device stage is planned in one process."""
import numpy as np
import pytest

from autopar import nn, ops
from autopar.ir.mesh import Mesh
from autopar.runtime.trace import trace
from autopar.strategy.sharding_plan import plan_shardings

STAGE = Mesh((4,))


class Dense(nn.Cell):
    def __init__(self, strategy, h=6, f=8):
        super().__init__()
        self.w = nn.Parameter(nn.Normal(0.1), (h, f), name="w")
        self.matmul = ops.MatMul().shard(strategy)

    def construct(self, x):
        return self.matmul(x, self.w)


class Net(nn.Cell):
    def __init__(self, strategy):
        super().__init__()
        self.blocks = nn.CellList([Dense(strategy)])

    def construct(self, x):
        return self.blocks[0](x)


def plan(strategy, x_shape=(8, 6)):
    graph = trace(Net(strategy), (np.zeros(x_shape, np.float32),), {}).graph
    return plan_shardings(graph, "semi_auto_parallel", STAGE, full_batch=True)


def test_a_valid_strategy_plans():
    p = plan(((2, 1), (1, 2)))
    (sharding,) = p.shardings.values()
    assert sharding.splits() == ((2, 1), (1, 2)) and str(sharding.output_layout()) == "[S(x), S(y)]"


@pytest.mark.parametrize("strategy, message", [
    (((4, 1), (1, 1)), None),                                            # fine: rows 8 / 4
    (((1, 4), (4, 1)), r"^blocks\.0 \(MatMul\): in_strategy\[0\]\[1\]: expected a split that divides dim 1 of "
                       r"input 0 \(size 6\), got 4; use a divisor of 6"),
    (((2, 2), (2, 2)), r"^blocks\.0 \(MatMul\): in_strategy: expected a product of splits dividing the 4 devices "
                       r"of the stage, got 8"),
    (((2, 2), (1, 2)), r"^blocks\.0 \(MatMul\): in_strategy\[1\]\[0\]: expected 2, as input 0 splits the same "
                       r"index .*got 1; split matching dims the same number of ways"),
    (((3, 1), (1, 1)), r"in_strategy\[0\]\[0\]: expected a split that divides dim 0 of input 0 \(size 8\), got 3"),
])
def test_strategy_errors_name_scope_dim_and_sizes(strategy, message):
    if message is None:
        plan(strategy)
        return
    with pytest.raises(ValueError, match=message):
        plan(strategy)


def test_wrong_tuple_length_is_caught_at_trace_time():
    with pytest.raises(ValueError, match=r"^blocks\.0 \(MatMul\): in_strategy\[0\]: expected 2 split counts for "
                                         r"input 0 of shape \(8, 6\), got \(2,\)"):
        plan(((2,), (1, 1)))


@pytest.mark.parametrize("bad, kind, message", [
    (((0, 1), (1, 1)), ValueError, r"MatMul\.shard: in_strategy\[0\]\[0\]: expected a split count >= 1, got 0"),
    (((-2, 1), (1, 1)), ValueError, r"in_strategy\[0\]\[0\]: expected a split count >= 1, got -2"),
    (((2.0, 1), (1, 1)), TypeError, r"in_strategy\[0\]\[0\]: expected an int split count, got 2\.0 \(float\)"),
])
def test_malformed_entries_are_rejected_by_shard(bad, kind, message):
    with pytest.raises(kind, match=message):
        ops.MatMul().shard(bad)


def test_splitting_a_dim_the_op_forbids():
    class Soft(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(nn.Normal(0.1), (8, 6), name="w")
            self.softmax = ops.Softmax(axis=-1).shard(((1, 2),))

        def construct(self):
            return self.softmax(self.w)
    graph = trace(Soft(), (), {}).graph
    with pytest.raises(ValueError, match=r"^Soft \(Softmax\): in_strategy\[0\]\[1\]: expected 1: this op cannot "
                                         r"split that dim, got 2; leave it 1 and split another dim"):
        plan_shardings(graph, "semi_auto_parallel", STAGE, full_batch=True)

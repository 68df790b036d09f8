"""User mistakes raise ValueError/TypeError naming the op scope, the argument and the values."""
import numpy as np
import pytest

from autopar import nn, ops


class Attention(nn.Cell):
    def __init__(self, in_features=8):
        super().__init__()
        self.dense1 = nn.Dense(in_features, 8)
        self.scores = ops.MatMul()

    def construct(self, x):
        return self.scores(self.dense1(x), x)


class Net(nn.Cell):
    def __init__(self, **kw):
        super().__init__()
        self.blocks = nn.CellList([Attention(**kw)])

    def construct(self, x):
        return self.blocks[0](x)


def test_mismatched_matmul_dims_name_scope_and_shapes():
    with pytest.raises(ValueError, match=r"^blocks\.0 \(MatMul\): input shapes: expected contraction dims equal "
                                         r"\(input 0 gives 8\), got \(4, 8\) and \(4, 8\) \(input 1 gives 4\)"):
        Net()(np.zeros((4, 8), np.float32))


def test_wrong_input_shape_names_the_layer():
    with pytest.raises(ValueError, match=r"^blocks\.0\.dense1 \(Dense\): input shape: expected last dim 8 "
                                         r"\(in_channels\), got \(4, 6\)"):
        Net()(np.zeros((4, 6), np.float32))


def test_wrong_input_rank_for_matmul():
    class Bad(nn.Cell):
        def __init__(self):
            super().__init__()
            self.mm = ops.MatMul()

        def construct(self, x, y):
            return self.mm(x, y)
    with pytest.raises(ValueError, match=r"MatMul\): input 0 rank: expected 2 .*got shape \(2, 3, 4\)"):
        Bad()(np.zeros((2, 3, 4)), np.zeros((4, 2)))


def test_non_integer_strategy_is_a_type_error_naming_op_and_value():
    with pytest.raises(TypeError, match=r"MatMul\.shard: in_strategy\[0\]\[1\]: expected an int split count, "
                                        r"got 1\.5 \(float\)"):
        ops.MatMul().shard(((2, 1.5), (1, 1)))
    with pytest.raises(ValueError, match=r"in_strategy\[1\]\[0\]: expected a split count >= 1, got 0"):
        ops.MatMul().shard(((2, 1), (0, 1)))
    with pytest.raises(TypeError, match=r"in_strategy: expected a tuple"):
        ops.MatMul().shard(4)


def test_strategy_of_wrong_length_names_scope_at_trace_time():
    net = Net()
    net.blocks[0].scores.shard(((2, 1),))
    with pytest.raises(ValueError, match=r"^blocks\.0 \(MatMul\): in_strategy: expected 2 tuple\(s\), one per "
                                         r"input, got 1"):
        net(np.zeros((4, 8), np.float32))

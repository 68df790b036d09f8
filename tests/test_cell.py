"""Cells and parameters: names, lazy data, deterministic and sliceable initialization."""

import numpy as np
import pytest

from autopar import nn
from autopar.ir.random import region_indices


class Inner(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense1 = nn.Dense(4, 3)
        self.norm = nn.LayerNorm(3)

    def construct(self, x):
        return self.norm(self.dense1(x))


class Outer(nn.Cell):
    def __init__(self):
        super().__init__()
        self.blocks = nn.CellList([Inner(), Inner()])
        self.scale = nn.Parameter(nn.One(), (3,), name="scale")

    def construct(self, x):
        return (self.blocks[0](x) + self.blocks[1](x)) * self.scale


def test_parameter_names_are_scope_paths():
    net = Outer()
    names = list(net.parameters_dict())
    assert names == ["scale", "blocks.0.dense1.weight", "blocks.0.dense1.bias", "blocks.0.norm.gamma",
                     "blocks.0.norm.beta", "blocks.1.dense1.weight", "blocks.1.dense1.bias",
                     "blocks.1.norm.gamma", "blocks.1.norm.beta"]
    # wrappers with auto_prefix=False keep the backbone's names
    wrapped = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits())
    assert list(wrapped.parameters_dict()) == names


def test_building_allocates_no_parameter_data():
    net = Outer()
    assert not any(p.has_data for p in net.get_parameters())
    big = nn.Dense(100_000, 100_000)  # 40 GB if it were allocated
    assert not big.weight.has_data and big.weight.size == 10 ** 10


def test_asnumpy_materializes_deterministically_from_name_and_seed():
    a, b = nn.Dense(4, 3), nn.Dense(4, 3)
    wa, wb = a.weight.asnumpy(), b.weight.asnumpy()
    np.testing.assert_array_equal(wa, wb)             # same name, same seed -> same values
    assert a.weight.has_data
    c = nn.Dense(4, 3).init_parameters_data(seed=1)
    assert not np.array_equal(c.weight.asnumpy(), wa)  # another seed -> other values
    assert abs(float(nn.Dense(200, 300).weight.asnumpy().std()) - 0.01) < 5e-4  # Normal(0.01) default


def test_init_of_a_region_equals_slice_of_full_tensor():
    p = nn.Parameter(nn.TruncatedNormal(0.02), (6, 10), name="t")
    full = p.init_data()
    region = (slice(2, 4), slice(5, 10))
    np.testing.assert_array_equal(p.init_data(region), full[2:4, 5:10])
    assert np.abs(full).max() <= 0.04 + 1e-12
    idx = region_indices((6, 10), region)
    np.testing.assert_array_equal(idx, np.arange(60).reshape(6, 10)[2:4, 5:10])


def test_set_data_checks_shape_and_casts():
    p = nn.Parameter(nn.Zero(), (2, 3), name="w")
    p.set_data(np.ones((2, 3), dtype=np.float64))
    assert p.asnumpy().dtype == np.float32 and p.asnumpy().sum() == 6
    with pytest.raises(ValueError, match=r"'w'.*expected shape \(2, 3\), got \(3, 2\)"):
        p.set_data(np.ones((3, 2)))


def test_pipeline_stage_and_recompute_reach_the_graph():
    from autopar.runtime.trace import trace
    net = Outer()
    net.blocks[1].pipeline_stage = 1
    net.blocks[0].pipeline_stage = 0
    net.blocks[1].recompute()
    g = trace(net, (np.zeros((2, 4), np.float32),), {}).graph
    by_scope = {n.scope: n for n in g.nodes}
    assert by_scope["blocks.1.dense1"].stage == 1 and by_scope["blocks.1.dense1"].recompute
    assert by_scope["blocks.0.norm"].stage == 0 and not by_scope["blocks.0.norm"].recompute
    with pytest.raises(ValueError, match="pipeline_stage: expected an int >= 0, got -1"):
        net.blocks[0].pipeline_stage = -1


def test_shared_parameter_keeps_first_owner_name():
    class Tied(nn.Cell):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Cell()
            self.head.table = self.embed.embedding_table

        def construct(self, ids):
            return self.embed(ids)
    t = Tied()
    assert list(t.parameters_dict()) == ["embed.embedding_table"]

import numpy as np
import pytest

from autopar import ops
from gradcheck import check_op

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


def pos(*shape):
    return rng.uniform(0.5, 2.0, shape)


UNARY = [ops.Neg(), ops.Exp(), ops.Tanh(), ops.Sigmoid(), ops.SiLU(), ops.GeLU(approximate=True),
         ops.GeLU(approximate=False), ops.FastGeLU(), ops.Square()]


@pytest.mark.parametrize("prim", UNARY, ids=repr)
def test_unary_vjp(prim):
    check_op(prim, [r(3, 4)])


@pytest.mark.parametrize("prim", [ops.Log(), ops.Sqrt(), ops.Rsqrt()], ids=repr)
def test_unary_positive_domain_vjp(prim):
    check_op(prim, [pos(3, 4)])


def test_relu_vjp_away_from_kink():
    x = r(3, 4)
    x[np.abs(x) < 0.1] = 0.5
    check_op(ops.ReLU(), [x])


BINARY_SHAPES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 4)), ((2, 1, 4), (3, 1)), ((3, 4), ())]


@pytest.mark.parametrize("shapes", BINARY_SHAPES)
@pytest.mark.parametrize("prim", [ops.Add(), ops.Sub(), ops.Mul(), ops.Maximum()], ids=repr)
def test_binary_broadcast_vjp(prim, shapes):
    check_op(prim, [r(*shapes[0]), r(*shapes[1])])


@pytest.mark.parametrize("shapes", BINARY_SHAPES)
def test_realdiv_and_pow_vjp(shapes):
    check_op(ops.RealDiv(), [r(*shapes[0]), pos(*shapes[1])])
    check_op(ops.Pow(), [pos(*shapes[0]), r(*shapes[1])])


def test_addn_vjp():
    check_op(ops.AddN(), [r(2, 3), r(2, 3), r(2, 3)])


def test_select_vjp_and_masked_fill():
    c = rng.random((3, 4)) > 0.5
    y = check_op(ops.Select(), [c, r(3, 4), r(1, 4)])
    assert y.shape == (3, 4)
    filled = ops.Select()(c, np.ones((3, 4)), np.full((), -1e4))
    np.testing.assert_array_equal(filled, np.where(c, 1.0, -1e4))


def test_cast_vjp_returns_input_dtype():
    x = r(2, 3)
    y = ops.Cast()(x, np.float32)
    assert y.dtype == np.float32
    (g,) = ops.Cast().with_attrs(dtype=np.float32).vjp(np.ones((2, 3), np.float32), [None], None,
                                                          [ops.TensorSpec((2, 3), np.dtype(np.float64))], (True,))
    assert g.dtype == np.float64


def test_erf_gelu_matches_reference_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    # exact GeLU values x * Phi(x), from math.erf
    import math
    want = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(ops.GeLU(approximate=False)(x), want, atol=1e-7)


def test_comparisons_are_bool_and_broadcast():
    a = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(ops.Equal()(a, 4), a == 4)
    np.testing.assert_array_equal(ops.Less()(a, np.array([1, 2, 3])), a < np.array([1, 2, 3]))
    assert ops.NotEqual()(a, 0).dtype == np.bool_


def test_bad_broadcast_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"Add.*\(2, 3\) and \(4,\)"):
        ops.Add()(np.zeros((2, 3)), np.zeros(4))

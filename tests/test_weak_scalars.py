"""Python numbers beside a tensor take its dtype (NEP 50) whatever numpy's own promotion of
them says: a bfloat16 model's ``q * scale`` must stay bfloat16, or every op after it (scores,
softmax, dropout, the context matmul) runs and is kept in a wider dtype."""
import numpy as np
import pytest

from autopar import nn
from autopar.dtype import weak_scalar_dtype
from autopar.ops import call
from autopar.runtime.trace import trace

# NEP 50's table (numpy >= 2): the tensor's dtype within its kind, else float64 / int64
NEP50 = [("bfloat16", 0.5, "bfloat16"), ("float16", 3, "float16"), ("float32", True, "float32"),
         ("int32", 1, "int32"), ("uint8", 3, "uint8"), ("int32", 1.5, "float64"), ("bool", True, "bool"),
         ("bool", 1, "int64"), ("bool", 1.0, "float64"), ("complex64", 2.0, "complex64")]


@pytest.mark.parametrize("ref, value, want", NEP50)
def test_weak_scalar_dtype_is_nep_50(ref, value, want):
    assert weak_scalar_dtype(ref, value) == np.dtype(want)


class Scale(nn.Cell):
    def construct(self, x):
        return x * 0.125 + 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_traced_scalar_keeps_the_tensors_dtype_under_legacy_promotion(monkeypatch, dtype):
    """With numpy's value-based promotion (numpy 1.x, or an ml_dtypes without a rule for
    Python floats) ``np.result_type(bfloat16, 0.125)`` is not bfloat16; the trace must not ask it."""
    real = np.result_type

    def legacy(*args):       # a Python float promotes as float64 would
        return real(*[np.float64 if isinstance(a, float) else a for a in args])
    monkeypatch.setattr(call.np, "result_type", legacy)
    graph = trace(Scale(), (np.ones((2, 3), dtype),), {}).graph
    assert {graph.values[v].spec.dtype for n in graph.nodes for v in n.inputs + n.outputs} == {np.dtype(dtype)}
    assert Scale()(np.ones((2, 3), dtype)).dtype == np.dtype(dtype)

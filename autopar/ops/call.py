"""Calling an op: recorded by the current tracer while a cell is traced, run now on
arrays otherwise (``ops.Add()(x, y)`` on arrays is ``x + y`` with the arrays' module:
numpy, or CuPy for GPU arrays)."""
from __future__ import annotations

import numpy as np

from ..backend import array_module, is_array
from ..dtype import weak_scalar_dtype
from ..errors import OpArgError, OpTypeError, at_scope
from ..ir.spec import spec_of
from ..ir.tracing import current_tracer


def apply(prim, args: tuple):
    """Call a primitive: record it when tracing, run it on numpy arrays otherwise."""
    try:
        tensors, static = prim.bind(args)
    except (OpArgError, OpTypeError) as err:
        raise at_scope(err, f"{prim.kind}") from None
    if static:
        prim = prim.with_attrs(**static)
    tensors = _weak_scalars(tensors)
    tracer = current_tracer()
    if tracer is not None:
        return tracer.add(prim, tensors)
    return _eager(prim, tensors)


def _weak_scalars(args: tuple) -> tuple:
    """Python numbers take the dtype of the tensors beside them (numpy's NEP 50 rule, by
    :func:`autopar.dtype.weak_scalar_dtype` on any numpy): ``x * 0.5`` stays float32 for a
    float32 ``x``, bfloat16 for a bfloat16 one."""
    if not any(isinstance(a, (bool, int, float)) for a in args):
        return args
    ref = next((a.dtype for a in args if hasattr(a, "dtype") and not isinstance(a, (bool, int, float))), None)
    if ref is None:
        return args
    xp = array_module(*args)      # the scalar becomes an array where the tensors live
    return tuple(xp.asarray(a, dtype=weak_scalar_dtype(ref, a)) if isinstance(a, (bool, int, float)) else a
                 for a in args)


def _as_array(a):
    """An array as it is (numpy or device); anything else through numpy (a Parameter
    gives its host value, ``__array__``)."""
    return a if is_array(a) else np.asarray(a)


def _eager(prim, args: tuple):
    arrays = [_as_array(a) for a in args]
    specs = tuple(spec_of(a) for a in arrays)
    try:
        prim.check_n_inputs(specs)
        out = prim.infer(*specs)
    except (OpArgError, OpTypeError) as err:
        raise at_scope(err, prim.kind) from None
    if prim.needs_rng:
        raise TypeError(f"{prim.kind}: needs a random key and runs only inside a Cell")
    y = prim.forward(*arrays)
    assert y.shape == out.shape, (prim, y.shape, out.shape)
    return y

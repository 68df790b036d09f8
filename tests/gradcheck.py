"""Finite-difference checks for op VJPs (float64), shared by the op test files.

``check_op(prim, inputs)`` asserts, for a primitive called on numpy arrays:

* ``infer`` agrees with what ``forward`` returns (shape and dtype);
* ``vjp`` — called with only the saved values the op declares (``save_inputs``,
  ``save_output``), so a wrong declaration fails here — equals central finite differences
  of ``<forward(x), w>`` for a random cotangent ``w``, for every float input.
"""
from __future__ import annotations

import numpy as np

from autopar.ir.spec import spec_of


def _bind(prim, static):
    return prim.with_attrs(**static) if static else prim


def check_op(prim, inputs, static=None, diff=None, eps=1e-6, rtol=1e-6, atol=1e-7, key=None, seed=0):
    """Check one op on one set of inputs. ``static``: the op's static call arguments as a dict.
    ``diff``: which inputs to differentiate (default: every float input not in nondiff_inputs).
    ``key``: random key for ops with ``needs_rng``. ``atol`` covers the rounding of the
    difference quotient (about 1e-16 * |<y, w>| / eps). Returns the forward output."""
    prim = _bind(prim, static or {})
    xs = [np.asarray(x) for x in inputs]
    specs = tuple(spec_of(x) for x in xs)
    kw = {"key": key} if prim.needs_rng else {}
    out_spec = prim.infer(*specs)
    y = prim.forward(*xs, **kw)
    assert y.shape == out_spec.shape, f"{prim}: forward shape {y.shape} != inferred {out_spec.shape}"
    assert y.dtype == out_spec.dtype, f"{prim}: forward dtype {y.dtype} != inferred {out_spec.dtype}"
    if diff is None:
        diff = [i for i, x in enumerate(xs) if x.dtype.kind == "f" and i not in prim.nondiff_inputs]
    if not diff:
        return y
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(y.shape)
    needs = tuple(i in diff for i in range(len(xs)))
    saved_idx = prim.saved_input_indices(len(xs))
    saved = [x if i in saved_idx else None for i, x in enumerate(xs)]
    grads = prim.vjp(w.astype(y.dtype), saved, y if prim.save_output else None, specs, needs, **kw)
    assert len(grads) == len(xs), f"{prim}: vjp returned {len(grads)} grads for {len(xs)} inputs"
    for i in diff:
        g = grads[i]
        assert g is not None, f"{prim}: no gradient for input {i}"
        assert g.shape == xs[i].shape, f"{prim}: grad {i} shape {g.shape} != input shape {xs[i].shape}"
        num = np.zeros_like(xs[i], dtype=np.float64)
        flat = xs[i].reshape(-1)
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + eps
            plus = float(np.sum(prim.forward(*xs, **kw) * w))
            flat[j] = orig - eps
            minus = float(np.sum(prim.forward(*xs, **kw) * w))
            flat[j] = orig
            num.reshape(-1)[j] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=rtol, atol=atol,
                                   err_msg=f"{prim}: gradient of input {i} vs finite differences")
    return y

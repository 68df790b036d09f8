"""LayerNorm (PanGu-α, statistics in at least float32) and RMSNorm (Yuan 2.0)."""
from __future__ import annotations

import math

from ..backend import array_module, hostkernels, kernels
from ..dtype import accumulate_dtype
from ..errors import OpArgError
from .primitive import Primitive, check_float, normalize_axis
from .registry import register
from .rowwise import compute_dtype
from .sharding import Indexing, same_letters


def _standardize(x2, eps: float, ct, center: bool):
    """Rows of (R, C) ``x2`` -> (xhat, rstd): xhat = (x - mean) * rstd, or x * rstd when not
    ``center`` (RMS); rstd = 1 / sqrt(var + eps) per row. xhat is a new (R, C) array."""
    xp = array_module(x2)
    c = x2.shape[1]
    if center:
        xh = xp.subtract(x2, x2.mean(axis=1, dtype=ct)[:, None], dtype=ct)
        rstd = 1.0 / xp.sqrt(xp.einsum("ij,ij->i", xh, xh) / c + eps)
        xh *= rstd[:, None]
    else:
        rstd = 1.0 / xp.sqrt(xp.einsum("ij,ij->i", x2, x2, dtype=ct) / c + eps)
        xh = xp.multiply(x2, rstd[:, None], dtype=ct)
    return xh, rstd


def _standardize_vjp(g, xh, rstd, center: bool):
    """dx for rows of xhat given g = dy * gamma (both (R, C), ours to overwrite):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), without the mean(g) term for RMS."""
    c = g.shape[1]
    proj = array_module(g, xh).einsum("ij,ij->i", g, xh) / c
    if center:
        g -= g.mean(axis=1, keepdims=True)
    xh *= proj[:, None]
    g -= xh
    g *= rstd[:, None]
    return g


def _param_grad(dy, xh, n_param: int):
    """Sum over the leading dims of dy (* xh): (P, n_param) -> (n_param,), half dtypes
    summed in float32."""
    dy2 = dy.reshape(-1, n_param)
    if xh is None:
        return dy2.sum(axis=0, dtype=accumulate_dtype(dy2.dtype))
    return array_module(dy2, xh).einsum("pq,pq->q", dy2, xh.reshape(-1, n_param))


@register
class LayerNorm(Primitive):
    """``y = (x - mean) / sqrt(var + eps) * gamma + beta``, statistics over
    ``x.shape[begin_norm_axis:]``, ``gamma, beta: x.shape[begin_params_axis:]``.

    MindSpore returns (y, mean, rstd); this returns y only, and the vjp recomputes mean and
    rstd from x (one extra pass) instead of keeping two more tensors alive."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 3
    save_inputs = (0, 1)


    def indexing(self, specs, out):
        bna, bpa = self._axes(specs[0].ndim)
        letters, fixed = same_letters(specs[0].ndim, range(min(bna, bpa), specs[0].ndim))
        return Indexing((letters, letters[bpa:], letters[bpa:]), letters, fixed)

    def __init__(self, begin_norm_axis: int = -1, begin_params_axis: int = -1, epsilon: float = 1e-5):
        super().__init__(begin_norm_axis=begin_norm_axis, begin_params_axis=begin_params_axis,
                         epsilon=epsilon)

    def _axes(self, ndim: int) -> tuple[int, int]:
        return (normalize_axis(self.attrs["begin_norm_axis"], ndim, "begin_norm_axis"),
                normalize_axis(self.attrs["begin_params_axis"], ndim, "begin_params_axis"))

    def infer(self, x, gamma, beta):
        for s, arg in ((x, "input x"), (gamma, "gamma"), (beta, "beta")):
            check_float(s, arg)
        if x.ndim < 1:
            raise OpArgError("input x shape", "at least 1 dim", str(x.shape))
        _, bpa = self._axes(x.ndim)
        want = x.shape[bpa:]
        for s, arg in ((gamma, "gamma"), (beta, "beta")):
            if s.shape != want:
                raise OpArgError(f"{arg} shape", f"{want} (x.shape[begin_params_axis:] of x {x.shape})",
                                 str(s.shape), "make gamma and beta match the normalized dims of x")
        return x

    def _xhat(self, x):
        """(xhat (R, C), rstd (R,)) with R * C = x.size, C = prod(x.shape[bna:])."""
        bna, _ = self._axes(x.ndim)
        c = math.prod(x.shape[bna:])
        return _standardize(x.reshape(-1, c), self.attrs["epsilon"], compute_dtype(x.dtype), True)

    def _fused(self, x, params, activations=()) -> bool:
        """Whether the fused GPU kernels compute: CuPy arrays, the activations of one dtype and
        the parameters of one (float32 under half activations, as mixed precision keeps
        them), statistics and parameters over the last axis alone (PanGu-α's LayerNorms)."""
        return (kernels.layer_norm_fusable(x, params, activations) and x.size > 0
                and self._axes(x.ndim) == (x.ndim - 1, x.ndim - 1))

    def _host_fused(self, x, *arrays) -> bool:
        """Whether the fused CPU kernels compute: float32 C-contiguous numpy arrays,
        statistics and parameters over the last axis alone."""
        return x.ndim > 0 and self._axes(x.ndim) == (x.ndim - 1, x.ndim - 1) and hostkernels.serves(x, *arrays)

    def forward(self, x, gamma, beta):
        if self._fused(x, (gamma, beta)):
            return kernels.layer_norm(x, gamma, beta, self.attrs["epsilon"])
        if self._host_fused(x, gamma, beta):
            x2 = x.reshape(-1, x.shape[-1])              # (..., C) -> (R, C)
            return hostkernels.layer_norm(x2, gamma, beta, self.attrs["epsilon"]).reshape(x.shape)
        xh, _ = self._xhat(x)
        y = xh.reshape(x.shape)          # gamma, beta: x.shape[bpa:] broadcast from the right
        y *= gamma
        y += beta
        return y.astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        x, gamma = xs[0], xs[1]
        n_param = gamma.size
        if self._fused(x, (gamma,), (dy,)):
            dbeta = None
            if needs[2]:      # (R, C) -> (C,): the rows summed as one GEMV, in the wide dtype
                dbeta = kernels.column_sum(dy.reshape(-1, n_param), accumulate_dtype(dy.dtype))
                dbeta = dbeta.reshape(gamma.shape).astype(specs[2].dtype)
            dx, dgamma = kernels.layer_norm_grad(dy, x, gamma, self.attrs["epsilon"], needs[0], needs[1])
            return (None if dx is None else dx.astype(x.dtype, copy=False),
                    None if dgamma is None else dgamma.astype(gamma.dtype), dbeta)
        if self._host_fused(x, dy, gamma):
            rows = (-1, x.shape[-1])                      # (..., C) -> (R, C)
            dx, dgamma, dbeta = hostkernels.layer_norm_grad(dy.reshape(rows), x.reshape(rows), gamma,
                                                            self.attrs["epsilon"], *needs[:3])
            return (None if dx is None else dx.reshape(x.shape), dgamma,
                    None if dbeta is None else dbeta.astype(specs[2].dtype, copy=False))
        dbeta = _param_grad(dy, None, n_param).reshape(gamma.shape).astype(specs[2].dtype) if needs[2] else None
        xh, rstd = self._xhat(x)          # (R, C), (R,)
        dgamma = _param_grad(dy, xh, n_param).reshape(gamma.shape).astype(gamma.dtype) if needs[1] else None
        dx = None
        if needs[0]:
            g = array_module(dy, gamma).multiply(dy, gamma, dtype=xh.dtype).reshape(xh.shape)
            dx = _standardize_vjp(g, xh, rstd, True).reshape(x.shape).astype(x.dtype, copy=False)
        return dx, dgamma, dbeta

    def flops(self, specs, out):
        return 8 * out.size


@register
class RMSNorm(Primitive):
    """``y = x / sqrt(mean(x^2) + eps) * gamma`` over the last axis (Yuan 2.0), gamma: (H,)."""

    fresh_output = fresh_grads = True  # new arrays, never views of the inputs

    n_inputs = 2
    save_inputs = (0, 1)


    def indexing(self, specs, out):
        letters, fixed = same_letters(specs[0].ndim, (specs[0].ndim - 1,))
        return Indexing((letters, letters[-1:]), letters, fixed)

    def __init__(self, epsilon: float = 1e-6):
        super().__init__(epsilon=epsilon)

    def infer(self, x, gamma):
        check_float(x, "input x")
        check_float(gamma, "gamma")
        if x.ndim < 1 or gamma.shape != x.shape[-1:]:
            raise OpArgError("gamma shape", f"{x.shape[-1:]} (the last dim of x {x.shape})",
                             str(gamma.shape), "gamma has one entry per hidden unit")
        return x

    def _xhat(self, x):
        return _standardize(x.reshape(-1, x.shape[-1]), self.attrs["epsilon"], compute_dtype(x.dtype), False)

    def forward(self, x, gamma):
        xh, _ = self._xhat(x)             # (N, H)
        xh *= gamma
        return xh.reshape(x.shape).astype(x.dtype, copy=False)

    def vjp(self, dy, xs, y, specs, needs):
        x, gamma = xs
        xh, rstd = self._xhat(x)
        dgamma = _param_grad(dy, xh, gamma.size).astype(gamma.dtype) if needs[1] else None
        dx = None
        if needs[0]:
            g = array_module(dy, gamma).multiply(dy, gamma, dtype=xh.dtype).reshape(xh.shape)
            dx = _standardize_vjp(g, xh, rstd, False).reshape(x.shape).astype(x.dtype, copy=False)
        return dx, dgamma

    def flops(self, specs, out):
        return 5 * out.size

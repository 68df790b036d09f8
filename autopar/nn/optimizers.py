"""Optimizers (MindSpore's names): SGD, Adam, AdamWeightDecay, updating ``p.data`` in place.

``opt.step(grads)`` applies one update; ``grads[i]`` is the gradient of ``params[i]``.
The learning rate of an update is ``learning_rate(k)`` with ``k`` the number of updates
already applied (0 on the first, MindSpore's ``global_step``), or the float itself.

Per-parameter state (``moment1``, ``moment2``, ``momentum``) is allocated on the first
step, in the parameter's dtype, so building an optimizer allocates nothing.
``state_dict()`` names each state array ``f"{state}.{param.name}"`` (``"moment1.blocks.0.
dense.weight"``) and holds the update count under ``"step"``: numpy arrays only, ready for
safetensors.

Speed: the arithmetic is in ``_update(p, g, state, lr, weight_decay)``, which works on
arrays (a whole parameter, or any slice of it, as optimizer parallel passes) with in-place
``out=`` ufuncs and at most two scratch buffers, never a temporary the size of ``p``.
``step`` feeds it blocks of ``BLOCK_BYTES`` so every pass over a block stays in cache:
AdamWeightDecay on 10^8 float32 elements takes 0.3-0.4 s on one core, against about
0.6 s for whole-array passes and 3 s for the textbook expression.

Devices: the update computes with the array module of the parameter's data (numpy, or
CuPy when a GPU program placed the parameter on the device: one pass per formula over the
whole array there, no blocks), and the states live beside the parameter. Gradients are
moved to the parameter's side if they are not there; ``state_dict`` returns host arrays.
AdamWeightDecay on CuPy arrays of float32/float64 runs one fused kernel per parameter
(``backend.kernels.adam_weight_decay``: the same operations in the same order, no FMA).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..backend import array_module, cache_blocked, hostkernels, kernels, on_host, to_host
from ..errors import format_error
from .parameter import Parameter

BLOCK_BYTES = 512 * 1024  # bytes of one parameter handed to _update at a time (fits in L2)


def _check_float(where: str, arg: str, value, lo: float, hi: float | None = None,
                 hi_open: bool = True, lo_open: bool = False) -> float:
    """``value`` as a float in [lo, hi) (``(lo`` with ``lo_open``, ``hi]`` with ``hi_open=False``)."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > lo if lo_open else value >= lo)
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        expected = (f"a finite float {'>' if lo_open else '>='} {lo:g}" if hi is None
                    else f"a float in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        raise ValueError(format_error(where, arg, expected, repr(value)))
    return float(value)


def _param_list(where: str, params) -> list:
    """``params`` as a non-empty list (a Cell or a bound method is a common slip)."""
    if callable(params) or isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(format_error(where, "params", "an iterable of Parameters", type(params).__name__,
                                     "pass net.trainable_params()"))
    out = list(params)
    if not out:
        raise ValueError(format_error(where, "params", "at least one Parameter", "an empty list",
                                      "pass net.trainable_params() of a network that has parameters"))
    return out


class Optimizer:
    """Base: parameters, learning rate (float or schedule), weight decay, step count, state.

    Subclasses set ``state_names`` and write ``_update``. ``decay_filter(param) -> bool``
    picks the parameters that get ``weight_decay`` (default: all of them).
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, params, learning_rate, weight_decay: float = 0.0,
                 decay_filter: Callable[[Parameter], bool] | None = None):
        where = type(self).__name__
        self.params: list[Parameter] = _param_list(where, params)
        names: set[str] = set()
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(format_error(where, f"params[{i}]", "a Parameter", type(p).__name__,
                                             "pass net.trainable_params()"))
            if not p.name or p.name in names:
                raise ValueError(format_error(where, f"params[{i}].name", "a unique non-empty name",
                                              repr(p.name), "state_dict keys are built from names"))
            names.add(p.name)
        if callable(learning_rate):
            self.learning_rate = learning_rate
        else:
            self.learning_rate = _check_float(where, "learning_rate", learning_rate, 0.0)
        self.weight_decay = _check_float(where, "weight_decay", weight_decay, 0.0)
        if decay_filter is not None and not callable(decay_filter):
            raise TypeError(format_error(where, "decay_filter", "None or a function Parameter -> bool",
                                         type(decay_filter).__name__))
        self.decay_flags: tuple[bool, ...] = tuple(
            True if decay_filter is None else bool(decay_filter(p)) for p in self.params)
        self.step_count = 0
        self.states: list[dict[str, np.ndarray]] = [{} for _ in self.params]  # filled on step 1
        self._scratch: dict[tuple[np.dtype, int], np.ndarray] = {}

    # ---- the learning rate ---------------------------------------------------------------
    def bind_shards(self, shards) -> None:
        """Update these shards instead of the full parameters (same names, same order): a
        sharded program hands each rank its shards -- under optimizer parallel, the slices
        of them this rank updates (``SliceShard``), so states are allocated for the slice
        only. States follow on the next step."""
        names = [p.name for p in self.params]
        if [s.name for s in shards] != names:
            raise ValueError(format_error(type(self).__name__, "shards", f"one per parameter, in order {names}",
                                          str([s.name for s in shards])))
        if any(self.states):
            raise ValueError(format_error(type(self).__name__, "shards", "bound before the first step",
                                          f"{self.step_count} steps taken"))
        self.params = list(shards)

    def get_lr(self) -> float:
        """The learning rate the next ``step`` will use."""
        if not callable(self.learning_rate):
            return self.learning_rate
        lr = self.learning_rate(self.step_count)
        return _check_float(type(self).__name__, f"learning_rate({self.step_count})", lr, 0.0)

    # ---- one update ----------------------------------------------------------------------
    def step(self, grads) -> None:
        """Apply one update in place to every ``p.data``; ``grads`` aligned with ``params``."""
        self._check_grads(grads)
        lr = self.get_lr()
        self.step_count += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            data = p.data
            wd = self.weight_decay if self.decay_flags[i] else 0.0
            self._update_blocked(data, _beside(data, g), self._states_beside(i, data), lr, wd)

    def _states_beside(self, i: int, data) -> dict:
        """The states of parameter ``i``, zeros on its first update, on the parameter's side
        (host or device): states loaded from a checkpoint are host arrays until then."""
        xp = array_module(data)
        if not self.states[i]:
            self.states[i] = {s: xp.zeros(data.shape, data.dtype) for s in self.state_names}
        elif array_module(*self.states[i].values()) is not xp:
            self.states[i] = {s: _beside(data, a) for s, a in self.states[i].items()}
        return self.states[i]

    def _check_grads(self, grads) -> None:
        where = f"{type(self).__name__}.step"
        if len(grads) != len(self.params):
            raise ValueError(format_error(where, "grads", f"{len(self.params)} arrays (one per parameter)",
                                          f"{len(grads)}", "pass grads in the order of params"))
        for p, g in zip(self.params, grads):
            shape = tuple(np.shape(g))
            if shape != tuple(p.shape):
                raise ValueError(format_error(where, f"gradient of {p.name!r}", f"shape {tuple(p.shape)}",
                                              f"{shape}", "pass grads in the order of params"))

    def _update_blocked(self, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
                        lr: float, weight_decay: float) -> None:
        """``_update`` over blocks of ``BLOCK_BYTES`` of ``p`` (all of ``p`` if not contiguous)."""
        if not p.flags.c_contiguous:
            self._update(p, g, state, lr, weight_decay)
            return
        flat_p, flat_g = p.reshape(-1), g.ravel()  # views (flat_g copies if g is strided)
        flat_state = {k: v.reshape(-1) for k, v in state.items()}
        block = max(1, BLOCK_BYTES // p.dtype.itemsize if cache_blocked(p) else p.size)
        for a in range(0, flat_p.size, block):
            b = a + block
            self._update(flat_p[a:b], flat_g[a:b], {k: v[a:b] for k, v in flat_state.items()},
                         lr, weight_decay)

    def _scratch_like(self, x: np.ndarray, slot: int = 0) -> np.ndarray:
        """Uninitialized buffer shaped like ``x``; reused across calls (one per dtype and slot)."""
        key = (type(x), x.dtype, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.size < x.size:
            buf = self._scratch[key] = array_module(x).empty(x.size, x.dtype)
        return buf[:x.size].reshape(x.shape)

    def _update(self, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
                lr: float, weight_decay: float) -> None:
        """Update ``p`` (an array or slice) in place from ``g``; ``state`` holds same-shaped slices.

        ``self.step_count`` is already the 1-based number of the update being applied.
        """
        raise NotImplementedError

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"step": int64 scalar, f"{state}.{param.name}": array, ...}`` (host copies)."""
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        for p, state in zip(self.params, self.states):
            for s, arr in state.items():
                out[f"{s}.{p.name}"] = to_host(arr, copy=True)
        return out

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        """Restore from ``state_dict()`` output; every key must be present and nothing else."""
        where = f"{type(self).__name__}.load_state_dict"
        if "step" not in d:
            raise ValueError(format_error(where, "'step'", "a key 'step'", f"keys {sorted(d)[:5]}..."))
        step = int(np.asarray(d["step"]))
        if step < 0:
            raise ValueError(format_error(where, "'step'", "an int >= 0", str(step)))
        expected = {f"{s}.{p.name}" for p in self.params for s in self.state_names} if step else set()
        missing, extra = sorted(expected - set(d)), sorted(set(d) - expected - {"step"})
        if missing or extra:
            raise ValueError(format_error(where, "keys", f"{len(expected)} state arrays and 'step'",
                                          f"missing {missing[:3]}, unexpected {extra[:3]}",
                                          "load a state_dict of the same optimizer over the same params"))
        states: list[dict[str, np.ndarray]] = [{} for _ in self.params]
        for i, p in enumerate(self.params):
            for s in (self.state_names if step else ()):
                arr = to_host(d[f"{s}.{p.name}"])
                if arr.shape != tuple(p.shape):
                    raise ValueError(format_error(where, f"'{s}.{p.name}' shape", str(tuple(p.shape)),
                                                  str(arr.shape)))
                states[i][s] = np.array(arr, dtype=p.dtype)  # a fresh contiguous copy
        self.states, self.step_count = states, step


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (MindSpore / PyTorch semantics).

        d = g + weight_decay * p
        v = d                                       on the first update
        v = momentum * v + (1 - dampening) * d      afterwards
        p -= lr * (d + momentum * v)   with nesterov,   p -= lr * v   without
    (no momentum: ``p -= lr * d``). Nesterov needs ``momentum > 0`` and ``dampening == 0``.
    """

    def __init__(self, params, learning_rate, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, learning_rate, weight_decay)
        self.momentum = _check_float("SGD", "momentum", momentum, 0.0)
        self.dampening = _check_float("SGD", "dampening", dampening, 0.0, 1.0, hi_open=False)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ValueError(format_error("SGD", "nesterov", "momentum > 0 and dampening == 0",
                                          f"momentum={momentum}, dampening={dampening}"))
        self.state_names = ("momentum",) if self.momentum else ()

    def _update(self, p, g, state, lr, weight_decay):
        xp = array_module(p)
        s = self._scratch_like(p)
        d = g
        if weight_decay:
            xp.multiply(p, weight_decay, out=s)
            s += g
            d = s                                   # d = g + wd * p
        if not self.momentum:
            xp.multiply(d, lr, out=s)
            p -= s
            return
        v = state["momentum"]
        if self.step_count == 1:
            v[...] = d
        else:
            v *= self.momentum
            if self.dampening:
                xp.multiply(d, 1.0 - self.dampening, out=s)  # d is dead after this (no nesterov)
                v += s
            else:
                v += d
        if self.nesterov:                           # p -= lr * d + lr * momentum * v
            xp.multiply(d, lr, out=s)
            p -= s
            xp.multiply(v, lr * self.momentum, out=s)
        else:
            xp.multiply(v, lr, out=s)
        p -= s


class _AdamBase(Optimizer):
    state_names = ("moment1", "moment2")

    def __init__(self, params, learning_rate, beta1, beta2, eps, weight_decay, decay_filter=None):
        super().__init__(params, learning_rate, weight_decay, decay_filter)
        where = type(self).__name__
        self.beta1 = _check_float(where, "beta1", beta1, 0.0, 1.0)
        self.beta2 = _check_float(where, "beta2", beta2, 0.0, 1.0)
        self.eps = _check_float(where, "eps", eps, 0.0, lo_open=True)

    def _moments(self, g: np.ndarray, m: np.ndarray, v: np.ndarray, s: np.ndarray) -> None:
        """m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2   (``s`` is scratch)."""
        xp = array_module(g)
        xp.multiply(g, 1.0 - self.beta1, out=s)
        m *= self.beta1
        m += s
        xp.multiply(g, g, out=s)
        s *= 1.0 - self.beta2
        v *= self.beta2
        v += s


class Adam(_AdamBase):
    """Adam with bias correction (Kingma & Ba, in the form of MindSpore's ``nn.Adam``).

        g' = g + weight_decay * p                   (L2 decay, into the gradient)
        m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)      t = 1, 2, ...

    ``eps`` is added to ``sqrt(v)`` before bias correction (MindSpore's ``ApplyAdam``; the
    paper's "efficient" form), so the first update is ``lr * sign(g)`` for small ``eps``.
    """

    def __init__(self, params, learning_rate, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay)

    def _update(self, p, g, state, lr, weight_decay):
        xp = array_module(p)
        s = self._scratch_like(p)
        if weight_decay:
            gd = self._scratch_like(p, slot=1)
            xp.multiply(p, weight_decay, out=gd)
            gd += g
            g = gd                                  # g' = g + wd * p
        m, v = state["moment1"], state["moment2"]
        self._moments(g, m, v, s)
        t = self.step_count
        lr_t = lr * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        xp.sqrt(v, out=s)
        s += self.eps
        xp.divide(m, s, out=s)
        s *= lr_t
        p -= s


def default_decay_filter(p: Parameter) -> bool:
    """Decay matrices only: parameters with ``ndim >= 2``; biases and norm gains/shifts are 1-D."""
    return p.ndim >= 2


class AdamWeightDecay(_AdamBase):
    """MindSpore's ``nn.AdamWeightDecay`` exactly, as PanGu-α trained with it.

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        update = m / (sqrt(v) + eps)
        update += weight_decay * p          for parameters where decay_filter(p) is True
        p -= lr * update

    There is NO bias correction (unlike PyTorch's AdamW): that is MindSpore's and PanGu-α's
    behaviour, so early updates are small (``(1 - b1) / sqrt(1 - b2)`` times Adam's on step 1).
    ``decay_filter(param) -> bool``; the default, :func:`default_decay_filter`, decays
    parameters with ``ndim >= 2`` and excludes 1-D ones (biases, LayerNorm gamma and beta).
    ``eps`` defaults to MindSpore's 1e-6; PanGu-α's runs used 1e-8.
    """

    def __init__(self, params, learning_rate, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-6, weight_decay: float = 0.0,
                 decay_filter: Callable[[Parameter], bool] | None = None):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay,
                         decay_filter or default_decay_filter)

    def _update(self, p, g, state, lr, weight_decay):
        m, v = state["moment1"], state["moment2"]
        if kernels.fusable(p, g, m, v, dtypes=kernels.EXACT_DTYPES):   # on a GPU: one fused pass
            kernels.adam_weight_decay(p, g, m, v, lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                      weight_decay=weight_decay)
            return
        if hostkernels.serves(p, g, m, v) and p.size == g.size == m.size == v.size:   # on CPU cores: one pass
            hostkernels.adam_weight_decay(p, g, m, v, lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                          weight_decay=weight_decay)
            return
        xp = array_module(p)
        s = self._scratch_like(p)
        self._moments(g, m, v, s)
        xp.sqrt(v, out=s)
        s += self.eps
        xp.divide(m, s, out=s)                      # update = m / (sqrt(v) + eps)
        if weight_decay:
            decay = self._scratch_like(p, slot=1)
            xp.multiply(p, weight_decay, out=decay)
            s += decay                              # update += wd * p
        s *= lr
        p -= s


def _beside(data, a):
    """``a`` (a gradient, a loaded state) as an array on the side ``data`` lives on: a numpy
    array for host data, a device array of ``data``'s module otherwise."""
    return to_host(a) if on_host(data) else array_module(data).asarray(a)

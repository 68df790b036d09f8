"""Loss scaling for float16 training (MindSpore's names and semantics).

A float16 gradient smaller than 6e-8 is zero; most of a language model's are. The loss is
multiplied by a scale before the backward pass (the gradient program's ``sens``: the seed
of d loss), so every gradient flows scaled through the float16 ops, then the float32
gradients of the master weights are divided by the scale before clipping and the update.
A scale too large overflows to inf or NaN somewhere: that step is skipped and the scale
lowered.

=====================================  =====================================================
``FixedLossScaleUpdateCell(value)``    the scale stays ``value``; an overflowed step is skipped
``DynamicLossScaleUpdateCell(...)``    overflow: scale / factor (never below 1), window
                                       restarts; ``scale_window`` steps without overflow:
                                       scale * factor. PanGu-α: 2^32, 2, 1000
``TrainOneStepWithLossScaleCell``      forward, scaled backward, unscale, overflow check,
                                       update (or skip); returns (loss, overflow, scale)
=====================================  =====================================================

The update cells are plain host-side state (a float and two counters), not graph Cells: the
scale enters the compiled program only as its ``sens``. A new scale value compiles a new
program for that value (cached per value on the network; the dynamic scale takes a handful
of values: about 15 halvings from 2^32 at the start, then a change per overflow or window).

Checkpoints. ``state()`` is that host-side state as JSON numbers (the scale; for the dynamic
cell also its two counters), which a checkpoint of a TrainOneStepWithLossScaleCell saves
(MindSpore saves them as parameters of the train cell); ``set_state(checked_state(...))``
puts it back, so a resumed run goes on with the scale and window where they were.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import check_int, format_error
from ..runtime.arguments import normalize
from .cell import Cell
from .wrappers import TrainOneStepCell


def _finite(where: str, arg: str, value, lo: float, lo_open: bool, expected: str) -> float:
    """``value`` as a finite float above ``lo`` (or equal to it unless ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(format_error(where, arg, expected, repr(value)))
    if not (math.isfinite(value) and (value > lo if lo_open else value >= lo)):
        raise ValueError(format_error(where, arg, expected, repr(value)))
    return float(value)


class LossScaleUpdateCell:
    """What :class:`TrainOneStepWithLossScaleCell` asks of a loss scale: the value to scale
    the next step with, and the news of whether a step overflowed."""

    def get_loss_scale(self) -> float:
        raise NotImplementedError

    def update(self, overflow: bool) -> bool:
        """Take one step's overflow flag; returns it (MindSpore's ``construct``)."""
        raise NotImplementedError

    def state(self) -> dict[str, float | int]:
        """What a checkpoint saves to resume this scale where it is (JSON numbers)."""
        raise NotImplementedError

    def checked_state(self, state, where: str) -> dict[str, float | int]:
        """``state`` read from a checkpoint (data from disk) as this cell's state, every field
        checked: a ValueError naming ``where`` and the field otherwise. Changes nothing."""
        raise NotImplementedError

    def set_state(self, state: dict[str, float | int]) -> None:
        """Take a state returned by :meth:`checked_state`."""
        raise NotImplementedError


class FixedLossScaleUpdateCell(LossScaleUpdateCell):
    """A constant scale. Overflowed steps are still skipped; the scale never changes (a
    scale too large for the gradients skips every step: lower it)."""

    def __init__(self, loss_scale_value: float):
        self.loss_scale = _finite(type(self).__name__, "loss_scale_value", loss_scale_value, 0.0, True,
                                  "a finite float > 0 (a power of 2 unscales exactly)")

    def get_loss_scale(self) -> float:
        return self.loss_scale

    def update(self, overflow: bool) -> bool:
        return overflow

    def state(self) -> dict[str, float | int]:
        return {"loss_scale": self.loss_scale}

    def checked_state(self, state, where: str) -> dict[str, float | int]:
        _check_keys(where, self, state)
        return {"loss_scale": _saved_scale(where, state["loss_scale"], 0.0, False)}

    def set_state(self, state: dict[str, float | int]) -> None:
        self.loss_scale = state["loss_scale"]

    def __repr__(self) -> str:
        return f"FixedLossScaleUpdateCell({self.loss_scale:g})"


class DynamicLossScaleUpdateCell(LossScaleUpdateCell):
    """MindSpore's dynamic loss scale. On an overflowed step the scale is divided by
    ``scale_factor`` (not below 1); when ``scale_window`` steps have passed since the last
    overflow or increase, a step without overflow multiplies it by ``scale_factor``.

    The counters are MindSpore's: ``cur_iter`` (1 on the first step) and
    ``last_overflow_iter`` (the step of the last overflow or increase, 0 at first), so the
    first increase comes on step ``scale_window`` and each later one ``scale_window`` steps
    after the last change of either kind."""

    def __init__(self, loss_scale_value: float = 2.0 ** 32, scale_factor: float = 2, scale_window: int = 1000):
        where = type(self).__name__
        self.loss_scale = _finite(where, "loss_scale_value", loss_scale_value, 1.0, False,
                                  "a finite float >= 1 (PanGu-alpha starts at 2**32)")
        self.scale_factor = _finite(where, "scale_factor", scale_factor, 1.0, True,
                                    "a finite float > 1 (e.g. 2; FixedLossScaleUpdateCell keeps a scale constant)")
        self.scale_window = check_int(where, "scale_window", scale_window, 1, expected="an int >= 1 (e.g. 1000)",
                                      type_error=TypeError)
        self.cur_iter = 1
        self.last_overflow_iter = 0

    def get_loss_scale(self) -> float:
        return self.loss_scale

    def state(self) -> dict[str, float | int]:
        return {"loss_scale": self.loss_scale, "cur_iter": self.cur_iter,
                "last_overflow_iter": self.last_overflow_iter}

    def checked_state(self, state, where: str) -> dict[str, float | int]:
        _check_keys(where, self, state)
        cur_iter = check_int(where, "cur_iter", state["cur_iter"], 1)
        return {"loss_scale": _saved_scale(where, state["loss_scale"], 1.0, True), "cur_iter": cur_iter,
                "last_overflow_iter": check_int(where, "last_overflow_iter", state["last_overflow_iter"], 0,
                                                cur_iter - 1)}

    def set_state(self, state: dict[str, float | int]) -> None:
        self.loss_scale, self.cur_iter = state["loss_scale"], state["cur_iter"]
        self.last_overflow_iter = state["last_overflow_iter"]

    def update(self, overflow: bool) -> bool:
        should_inc = self.cur_iter - self.last_overflow_iter >= self.scale_window
        if overflow:
            self.loss_scale = max(self.loss_scale / self.scale_factor, 1.0)
        elif should_inc:
            self.loss_scale *= self.scale_factor
        if overflow or should_inc:
            self.last_overflow_iter = self.cur_iter
        self.cur_iter += 1
        return overflow

    def __repr__(self) -> str:
        return (f"DynamicLossScaleUpdateCell({self.loss_scale:g}, factor {self.scale_factor:g}, "
                f"window {self.scale_window})")


def _check_keys(where: str, cell: LossScaleUpdateCell, state) -> None:
    """A saved state has exactly the fields ``cell.state()`` has."""
    expected = sorted(cell.state())
    if not isinstance(state, dict) or sorted(state) != expected:
        raise ValueError(format_error(where, f"{type(cell).__name__} state", f"an object with {expected}",
                                      repr(state)[:80], "the checkpoint may be corrupt or crafted"))


def _saved_scale(where: str, value, lowest: float, inclusive: bool) -> float:
    """A loss scale read from a checkpoint: a finite number above ``lowest`` (or equal to it
    when ``inclusive``: the dynamic scale's floor of 1); a ValueError otherwise, as for any
    bad data on disk."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value >= lowest if inclusive else value > lowest):
        bound = f"{'>=' if inclusive else '>'} {lowest:g}"
        raise ValueError(format_error(where, "loss_scale", f"a finite number {bound}", repr(value),
                                      "the checkpoint may be corrupt or crafted"))
    return float(value)


def as_update_cell(scale_sense) -> LossScaleUpdateCell:
    """An update cell as given, or a number (MindSpore's scale Tensor) as a fixed scale."""
    if isinstance(scale_sense, LossScaleUpdateCell):
        return scale_sense
    if isinstance(scale_sense, np.ndarray) and scale_sense.size == 1:
        scale_sense = scale_sense.item()
    if isinstance(scale_sense, numbers.Real) and not isinstance(scale_sense, bool):
        return FixedLossScaleUpdateCell(scale_sense)
    raise TypeError(format_error("TrainOneStepWithLossScaleCell", "scale_sense",
                                 "a DynamicLossScaleUpdateCell, a FixedLossScaleUpdateCell or a number",
                                 type(scale_sense).__name__,
                                 "pass DynamicLossScaleUpdateCell(2**32, 2, 1000) as PanGu-alpha does"))


class TrainOneStepWithLossScaleCell(TrainOneStepCell):
    """One training step with a loss scale: ``train(*inputs)`` -> ``(loss, overflow, scale)``.

    The backward pass is seeded with the scale (d loss = scale), the gradients are divided
    by it, then the overflow check: a NaN or inf in any gradient of any rank makes the
    global norm non-finite on every rank (one collective, as TrainOneStepCell's check),
    and so does a non-finite loss. On overflow the update is skipped (parameters, optimizer
    states and ``step_count`` bit-for-bit unchanged) and ``scale_sense`` is told; otherwise
    the gradients are clipped (``clip_norm``) and the optimizer steps. ``loss`` is the
    unscaled loss, ``scale`` the scale this step used (``loss_scale`` is the next one).

    Overflow of the gradients is the loss scale's business: it never stops training. A
    non-finite *loss* (the forward pass, which no scale touches) is divergence, counted
    as TrainOneStepCell counts it (``consecutive_skips``; a TrainingDivergedError after
    ``max_consecutive_skips`` in a row). ``skipped_steps`` counts every skipped update,
    ``overflow_steps`` those of gradient overflow alone.
    """

    def __init__(self, network: Cell, optimizer, scale_sense, clip_norm: float | None = None,
                 on_non_finite: str = "skip", max_consecutive_skips: int = 10):
        update_cell = as_update_cell(scale_sense)
        super().__init__(network, optimizer, update_cell.get_loss_scale(), clip_norm, on_non_finite,
                         max_consecutive_skips)
        self.scale_sense = update_cell
        self.overflow_steps = 0

    @property
    def loss_scale(self) -> float:
        """The scale the next step will use."""
        return self.scale_sense.get_loss_scale()

    def __call__(self, *args, **kwargs):
        args, kwargs = normalize(args, kwargs, type(self.network).__name__)
        scale = self.sens = self.scale_sense.get_loss_scale()   # the gradient program's seed
        prog = self.build(*args, **kwargs)
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow is expected, and handled below
            loss, grads = prog(args, kwargs, self.optimizer.step_count)
            for g in grads:
                np.divide(g, scale, out=g)
            norm = float(prog.global_norm(grads))    # collective: every rank sees any rank's inf
        loss_finite = math.isfinite(float(loss))
        overflow = not (loss_finite and math.isfinite(norm))
        self.scale_sense.update(overflow)
        self.last_grad_norm, self.last_overflow = norm, overflow
        self.last_step_skipped = overflow or norm == 0.0
        if not loss_finite:
            self._skip(float(loss), norm)
        elif overflow:
            self.skipped_steps += 1
            self.overflow_steps += 1
        elif norm == 0.0:
            self.empty_steps += 1
        else:
            self._update(prog, grads, norm)
        return np.asarray(loss), overflow, scale

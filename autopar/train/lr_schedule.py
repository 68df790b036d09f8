"""Learning-rate schedules: frozen values, called as ``schedule(step) -> float``.

``step`` counts the updates already applied (0 for the first update), as MindSpore's
``global_step`` does. Calling a schedule is pure: the same step always gives the same rate.

    WarmUpLR(lr, W)                 lr * min(step, W) / W
    CosineDecayLR(lo, hi, D)        lo + (hi - lo) * (1 + cos(pi * min(step, D) / D)) / 2
    PolynomialDecayLR(lr, end, D, power)
                                    (lr - end) * (1 - min(step, D) / D) ** power + end
    WarmUpCosineDecayLR(lr, end, W, D)
                                    WarmUpLR(lr, W)(step)            for step < W
                                    CosineDecayLR(end, lr, D)(step)  for step >= W

The last is PanGu-α's ``LearningRate`` (``use_cosine=True``): the cosine is measured from
step 0, not from the end of warm-up, so at ``step == W`` the rate is already slightly
below ``lr`` (by a factor ``(1 + cos(pi * W / D)) / 2``), and it stays at ``end`` from
step ``D`` on. PanGu-α used W = 2000.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import check_int, format_error


def _check_rate(where: str, arg: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(format_error(where, arg, "a finite float >= 0", repr(value)))


def _check_step(where: str, step) -> None:
    check_int(where, "step", step, 0, expected="an int >= 0 (updates already applied)")


def _cosine(min_lr: float, max_lr: float, decay_steps: int, step: int) -> float:
    progress = min(step, decay_steps) / decay_steps
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmUpLR:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, constant after."""
    learning_rate: float
    warmup_steps: int

    def __post_init__(self):
        _check_rate("WarmUpLR", "learning_rate", self.learning_rate)
        check_int("WarmUpLR", "warmup_steps", self.warmup_steps, 1)

    def __call__(self, step: int) -> float:
        _check_step("WarmUpLR", step)
        return float(self.learning_rate) * min(step, self.warmup_steps) / self.warmup_steps


@dataclass(frozen=True)
class CosineDecayLR:
    """Half a cosine from ``max_lr`` at step 0 to ``min_lr`` at ``decay_steps``, constant after."""
    min_lr: float
    max_lr: float
    decay_steps: int

    def __post_init__(self):
        _check_rate("CosineDecayLR", "min_lr", self.min_lr)
        _check_rate("CosineDecayLR", "max_lr", self.max_lr)
        check_int("CosineDecayLR", "decay_steps", self.decay_steps, 1)
        if self.min_lr > self.max_lr:
            raise ValueError(format_error("CosineDecayLR", "min_lr", f"<= max_lr = {self.max_lr}",
                                          repr(self.min_lr), "swap min_lr and max_lr"))

    def __call__(self, step: int) -> float:
        _check_step("CosineDecayLR", step)
        return _cosine(self.min_lr, self.max_lr, self.decay_steps, step)


@dataclass(frozen=True)
class PolynomialDecayLR:
    """``(learning_rate - end_learning_rate) * (1 - p) ** power + end_learning_rate``.

    ``p = min(step, decay_steps) / decay_steps``; with ``update_decay_steps`` the decay
    restarts from ``learning_rate`` every ``decay_steps`` (MindSpore's option): ``p = step / D'``
    with ``D' = decay_steps * max(1, ceil(step / decay_steps))``.
    """
    learning_rate: float
    end_learning_rate: float
    decay_steps: int
    power: float = 1.0
    update_decay_steps: bool = False

    def __post_init__(self):
        _check_rate("PolynomialDecayLR", "learning_rate", self.learning_rate)
        _check_rate("PolynomialDecayLR", "end_learning_rate", self.end_learning_rate)
        check_int("PolynomialDecayLR", "decay_steps", self.decay_steps, 1)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not self.power > 0:
            raise ValueError(format_error("PolynomialDecayLR", "power", "a float > 0", repr(self.power)))

    def __call__(self, step: int) -> float:
        _check_step("PolynomialDecayLR", step)
        if self.update_decay_steps:
            period = self.decay_steps * max(1, math.ceil(step / self.decay_steps))
            progress = step / period
        else:
            progress = min(step, self.decay_steps) / self.decay_steps
        span = self.learning_rate - self.end_learning_rate
        return span * (1.0 - progress) ** self.power + self.end_learning_rate


@dataclass(frozen=True)
class WarmUpCosineDecayLR:
    """PanGu-α's schedule: linear warm-up, then cosine decay (measured from step 0).

    ``learning_rate * step / warmup_steps`` while ``step < warmup_steps``, then
    ``CosineDecayLR(end_learning_rate, learning_rate, decay_steps)(step)``; ``warmup_steps = 0``
    means no warm-up. Needs ``warmup_steps <= decay_steps``.
    """
    learning_rate: float
    end_learning_rate: float
    warmup_steps: int
    decay_steps: int

    def __post_init__(self):
        where = "WarmUpCosineDecayLR"
        _check_rate(where, "learning_rate", self.learning_rate)
        _check_rate(where, "end_learning_rate", self.end_learning_rate)
        check_int(where, "warmup_steps", self.warmup_steps, 0)
        check_int(where, "decay_steps", self.decay_steps, 1)
        if self.end_learning_rate > self.learning_rate:
            raise ValueError(format_error(where, "end_learning_rate", f"<= learning_rate = {self.learning_rate}",
                                          repr(self.end_learning_rate)))
        if self.warmup_steps > self.decay_steps:
            raise ValueError(format_error(where, "warmup_steps", f"<= decay_steps = {self.decay_steps}",
                                          repr(self.warmup_steps),
                                          "decay_steps counts from step 0, warm-up included"))

    def __call__(self, step: int) -> float:
        _check_step("WarmUpCosineDecayLR", step)
        if step < self.warmup_steps:
            return float(self.learning_rate) * step / self.warmup_steps
        return _cosine(self.end_learning_rate, self.learning_rate, self.decay_steps, step)

"""Sparsity and temperature schedules: plain Python functions of the training step."""

from __future__ import annotations

import math


def _check_fraction(name, value, upper_inclusive=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a number in {interval}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _check_steps(begin_step, end_step):
    for name, value in (("begin_step", begin_step), ("end_step", end_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected a non-negative integer. "
                f"Received: {name}={value!r}"
            )
    if begin_step >= end_step:
        raise ValueError(
            "Received an invalid value for `begin_step` and `end_step`: begin_step must be "
            f"smaller than end_step. Received: begin_step={begin_step}, end_step={end_step}"
        )


class SparsitySchedule:
    """Target sparsity as a function of the training step."""

    begin_step: int = 0
    end_step: int = 0

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    @property
    def final_sparsity(self) -> float:
        return self(self.end_step)


class ConstantSparsity(SparsitySchedule):
    """The same target from `begin_step` on (no pruning force before it).

    >>> ConstantSparsity(0.9, begin_step=100)(50), ConstantSparsity(0.9, begin_step=100)(100)
    (0.0, 0.9)
    """

    def __init__(self, target_sparsity: float, begin_step: int = 0):
        self.target_sparsity = _check_fraction("target_sparsity", target_sparsity)
        _check_steps(begin_step, begin_step + 1)
        self.begin_step = self.end_step = begin_step

    def __call__(self, step):
        return self.target_sparsity if step >= self.begin_step else 0.0

    def __repr__(self):
        return f"ConstantSparsity({self.target_sparsity}, begin_step={self.begin_step})"


class PolynomialDecay(SparsitySchedule):
    """The gradual ramp of Zhu & Gupta (2017), as TFMOT's `PolynomialDecay`.

    `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power` for
    `t0 <= t <= t1`; `s_i` before `t0` (no force before it: 0 unless set) and
    `s_f` after `t1`. With `power=3` (default) pruning is fast at first, when
    many redundant weights exist, and slow near the target.

    >>> s = PolynomialDecay(0.9, begin_step=0, end_step=100)
    >>> round(s(0), 3), round(s(50), 4), s(100), s(500)
    (0.0, 0.7875, 0.9, 0.9)
    """

    def __init__(
        self,
        target_sparsity: float,
        begin_step: int = 0,
        end_step: int = 1000,
        initial_sparsity: float = 0.0,
        power: float = 3.0,
    ):
        self.target_sparsity = _check_fraction("target_sparsity", target_sparsity)
        self.initial_sparsity = _check_fraction("initial_sparsity", initial_sparsity)
        _check_steps(begin_step, end_step)
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
            raise ValueError(
                f"Received an invalid value for `power`, expected a positive number. "
                f"Received: power={power!r}"
            )
        self.begin_step, self.end_step, self.power = begin_step, end_step, float(power)

    def __call__(self, step):
        if step < self.begin_step:
            return self.initial_sparsity
        progress = min(1.0, (step - self.begin_step) / (self.end_step - self.begin_step))
        remaining = (1.0 - progress) ** self.power
        return self.target_sparsity + (self.initial_sparsity - self.target_sparsity) * remaining

    def __repr__(self):
        return (
            f"PolynomialDecay({self.target_sparsity}, begin_step={self.begin_step}, "
            f"end_step={self.end_step}, initial_sparsity={self.initial_sparsity}, "
            f"power={self.power})"
        )


class ExponentialTemperature:
    """Relative temperature rising geometrically from `initial` to `final`.

    Values are relative to each layer's weight spread: a layer's absolute
    temperature is `value / std(kernel)`, so the mask's transition band is
    `~4 / value` standard deviations wide in every layer.

    >>> t = ExponentialTemperature(4.0, 100.0, begin_step=0, end_step=100)
    >>> t(0), round(t(50), 3), t(100), t(200)
    (4.0, 20.0, 100.0, 100.0)
    """

    def __init__(self, initial: float, final: float, begin_step: int = 0, end_step: int = 1000):
        for name, value in (("initial", initial), ("final", final)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected a positive finite number. "
                    f"Received: {name}={value!r}"
                )
        _check_steps(begin_step, end_step)
        self.initial, self.final = float(initial), float(final)
        self.begin_step, self.end_step = begin_step, end_step

    def __call__(self, step):
        progress = min(1.0, max(0.0, (step - self.begin_step) / (self.end_step - self.begin_step)))
        return self.initial * (self.final / self.initial) ** progress

    def __repr__(self):
        return (
            f"ExponentialTemperature({self.initial}, {self.final}, "
            f"begin_step={self.begin_step}, end_step={self.end_step})"
        )

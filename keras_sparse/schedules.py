"""Sparsity and temperature schedules: functions of the training step, in steps, epochs or a
fraction of the run.

A schedule is called with a step: a Python number (it returns a float) or a
scalar tensor (it returns a tensor, so the driver can evaluate it inside the
compiled train step). Its bounds can be given in the unit one thinks in:

```python
PolynomialDecay(0.9, begin_step=0, end_step=3000)        # steps
PolynomialDecay(0.9, end_epoch=30)                       # epochs
PolynomialDecay(0.9, end_fraction=0.9)                   # nine tenths of the run
```

Epochs and fractions are turned into steps when training starts
(`SparsityScheduler` knows the number of epochs and of steps per epoch from
`fit`); `schedule.resolve(steps_per_epoch, epochs)` does it by hand.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
from keras import ops

_UNITS = ("step", "epoch", "fraction")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_fraction(name, value, upper_inclusive=False):
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a number in {interval}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _check_bound(name, value, unit):
    if unit == "step":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
        ok = ok and value >= 0
        expected = "a non-negative integer"
    else:
        ok = _is_number(value) and math.isfinite(value) and value >= 0
        ok = ok and (unit != "fraction" or value <= 1)
        expected = "a number in [0, 1]" if unit == "fraction" else "a non-negative number"
    if not ok:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected {expected}. "
            f"Received: {name}={value!r}"
        )
    return int(value) if unit == "step" else float(value)


@dataclasses.dataclass(frozen=True)
class Span:
    """Where a schedule starts and ends, in one unit: steps, epochs, or a fraction of the run."""

    begin: float
    end: float
    unit: str = "step"

    @classmethod
    def from_arguments(cls, default_end, single=False, **bounds):
        """The one span that `begin_step`/`end_step`, `begin_epoch`/`end_epoch` or
        `begin_fraction`/`end_fraction` describe (at most one pair)."""
        given = {unit: (bounds.get(f"begin_{unit}"), bounds.get(f"end_{unit}")) for unit in _UNITS}
        used = [unit for unit, pair in given.items() if any(v is not None for v in pair)]
        if len(used) > 1:
            names = [f"{edge}_{unit}" for unit in used for edge in ("begin", "end")]
            passed = [n for n in names if bounds.get(n) is not None]
            raise ValueError(
                "Give the schedule's bounds in one unit (steps, epochs or a fraction of the "
                f"run). Received: {', '.join(f'{n}={bounds[n]!r}' for n in passed)}"
            )
        unit = used[0] if used else "step"
        begin, end = given[unit]
        begin = _check_bound(f"begin_{unit}", 0 if begin is None else begin, unit)
        if single:
            return cls(begin, begin, unit)
        end = _check_bound(f"end_{unit}", default_end[unit] if end is None else end, unit)
        if begin >= end:
            raise ValueError(
                f"Received an invalid value for `begin_{unit}` and `end_{unit}`: begin_{unit} "
                f"must be smaller than end_{unit}. Received: begin_{unit}={begin}, "
                f"end_{unit}={end}"
            )
        return cls(begin, end, unit)

    def in_steps(self, steps_per_epoch=None, epochs=None):
        """This span in steps; epochs and fractions need the run's length."""
        if self.unit == "step":
            return self
        if steps_per_epoch is None or (self.unit == "fraction" and epochs is None):
            raise ValueError(
                f"This schedule is given in {self.unit}s; turning it into steps needs the "
                "number of steps per epoch"
                + (" and of epochs" if self.unit == "fraction" else "")
                + " (pass `steps_per_epoch` to `fit` when the data has no length)."
            )
        scale = steps_per_epoch * (epochs if self.unit == "fraction" else 1)
        begin = int(round(self.begin * scale))
        end = max(int(round(self.end * scale)), begin + (self.end > self.begin))
        return Span(begin, end, "step")

    def describe(self):
        if self.begin == self.end:
            return f"begin_{self.unit}={self.begin:g}"
        return f"begin_{self.unit}={self.begin:g}, end_{self.unit}={self.end:g}"


def _math(step):
    """NumPy for Python numbers, `keras.ops` for tensors."""
    return np if _is_number(step) else ops


def _as_float(step, value):
    return float(value) if _is_number(step) else value


class _Scheduled:
    """What every schedule shares: a span, and its resolution into steps."""

    span: Span

    @property
    def begin_step(self):
        self._require_steps()
        return int(self.span.begin)

    @property
    def end_step(self):
        self._require_steps()
        return int(self.span.end)

    @property
    def resolved(self):
        """Whether the bounds are in steps (else `resolve()` first)."""
        return self.span.unit == "step"

    def _require_steps(self):
        if not self.resolved:
            raise ValueError(
                f"{self!r} is given in {self.span.unit}s: call `resolve(steps_per_epoch, "
                "epochs)` (SparsityScheduler does it when training starts) before using it "
                "in steps."
            )

    def resolve(self, steps_per_epoch=None, epochs=None):
        """A copy of this schedule with its bounds in steps."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.span = self.span.in_steps(steps_per_epoch, epochs)
        return copy

    def _progress(self, step, xp):
        begin, end = self.span.begin, self.span.end
        return xp.clip((step - begin) / (end - begin), 0.0, 1.0)


class SparsitySchedule(_Scheduled):
    """Target sparsity as a function of the training step.

    Subclasses implement `__call__(step)` for a Python number (returning a
    float) and for a scalar tensor (returning a tensor, with `keras.ops`),
    and set `span`.
    """

    span = Span(0, 0, "step")

    def __call__(self, step):
        raise NotImplementedError

    @property
    def final_sparsity(self) -> float:
        self._require_steps()
        return self(self.end_step)


class ConstantSparsity(SparsitySchedule):
    """The same target from `begin_step` (or `begin_epoch`, `begin_fraction`) on.

    There is no ramp: `SparsityScheduler` drives the masks towards the target from
    `begin_step` until `fit()` ends, and freezes them there, exactly at the target.

    >>> ConstantSparsity(0.9, begin_step=100)(50), ConstantSparsity(0.9, begin_step=100)(100)
    (0.0, 0.9)
    """

    def __init__(self, target_sparsity, begin_step=None, *, begin_epoch=None, begin_fraction=None):
        self.target_sparsity = _check_fraction("target_sparsity", target_sparsity)
        self.span = Span.from_arguments(
            None,
            single=True,
            begin_step=begin_step,
            begin_epoch=begin_epoch,
            begin_fraction=begin_fraction,
        )

    def __call__(self, step):
        self._require_steps()
        xp = _math(step)
        value = xp.where(step >= self.span.begin, self.target_sparsity, 0.0)
        return _as_float(step, value)

    def __repr__(self):
        return f"ConstantSparsity({self.target_sparsity}, {self.span.describe()})"


class PolynomialDecay(SparsitySchedule):
    """The gradual ramp of Zhu & Gupta (2017), as TFMOT's `PolynomialDecay`.

    `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power` for
    `t0 <= t <= t1`; `s_i` before `t0` (no force before it: 0 unless set) and
    `s_f` after `t1`. With `power=3` (default) pruning is fast at first, when
    many redundant weights exist, and slow near the target.

    The bounds are `begin_step`/`end_step` (default 0 and 1000), or
    `begin_epoch`/`end_epoch`, or `begin_fraction`/`end_fraction` of the run.

    >>> s = PolynomialDecay(0.9, begin_step=0, end_step=100)
    >>> round(s(0), 3), round(s(50), 4), s(100), s(500)
    (0.0, 0.7875, 0.9, 0.9)
    """

    def __init__(
        self,
        target_sparsity,
        begin_step=None,
        end_step=None,
        initial_sparsity=0.0,
        power=3.0,
        *,
        begin_epoch=None,
        end_epoch=None,
        begin_fraction=None,
        end_fraction=None,
    ):
        self.target_sparsity = _check_fraction("target_sparsity", target_sparsity)
        self.initial_sparsity = _check_fraction("initial_sparsity", initial_sparsity)
        self.span = Span.from_arguments(
            {"step": 1000, "epoch": None, "fraction": 1.0},
            begin_step=begin_step,
            end_step=end_step,
            begin_epoch=begin_epoch,
            end_epoch=end_epoch,
            begin_fraction=begin_fraction,
            end_fraction=end_fraction,
        )
        if not (_is_number(power) and math.isfinite(power) and power > 0):
            raise ValueError(
                f"Received an invalid value for `power`, expected a positive number. "
                f"Received: power={power!r}"
            )
        self.power = float(power)

    def __call__(self, step):
        self._require_steps()
        xp = _math(step)
        remaining = (1.0 - self._progress(step, xp)) ** self.power
        value = self.target_sparsity + (self.initial_sparsity - self.target_sparsity) * remaining
        value = xp.where(step < self.span.begin, self.initial_sparsity, value)
        return _as_float(step, value)

    def __repr__(self):
        return (
            f"PolynomialDecay({self.target_sparsity}, {self.span.describe()}, "
            f"initial_sparsity={self.initial_sparsity}, power={self.power})"
        )


class ExponentialTemperature(_Scheduled):
    """Relative temperature rising geometrically from `initial` to `final`.

    Values are relative to each layer's weight spread: a layer's absolute
    temperature is `value / std(kernel)`, so the mask's transition band is
    `~4 / value` standard deviations wide in every layer. Bounds as for
    `PolynomialDecay`.

    >>> t = ExponentialTemperature(4.0, 100.0, begin_step=0, end_step=100)
    >>> t(0), round(t(50), 3), t(100), t(200)
    (4.0, 20.0, 100.0, 100.0)
    """

    def __init__(
        self,
        initial,
        final,
        begin_step=None,
        end_step=None,
        *,
        begin_epoch=None,
        end_epoch=None,
        begin_fraction=None,
        end_fraction=None,
    ):
        for name, value in (("initial", initial), ("final", final)):
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected a positive finite number. "
                    f"Received: {name}={value!r}"
                )
        self.initial, self.final = float(initial), float(final)
        self.span = Span.from_arguments(
            {"step": 1000, "epoch": None, "fraction": 1.0},
            begin_step=begin_step,
            end_step=end_step,
            begin_epoch=begin_epoch,
            end_epoch=end_epoch,
            begin_fraction=begin_fraction,
            end_fraction=end_fraction,
        )

    def __call__(self, step):
        self._require_steps()
        xp = _math(step)
        value = self.initial * (self.final / self.initial) ** self._progress(step, xp)
        return _as_float(step, value)

    def __repr__(self):
        return f"ExponentialTemperature({self.initial}, {self.final}, {self.span.describe()})"

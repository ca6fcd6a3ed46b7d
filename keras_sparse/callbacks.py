"""`SparsityScheduler`: the callback that steers learned thresholds to a target sparsity."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_sparse.granularity import n_m_keep_numpy, neuron_scores_numpy
from keras_sparse.layer import SparseLinear
from keras_sparse.schedules import ExponentialTemperature, SparsitySchedule

_SCOPES = ("global", "per_layer")


def walk_layers(model):
    """Every layer of `model`, nested models included (the models themselves too)."""
    found, stack = [], list(getattr(model, "layers", []) or [])
    while stack:
        layer = stack.pop(0)
        found.append(layer)
        stack[:0] = list(getattr(layer, "layers", []) or [])
    return found


def sparse_layers(model):
    """Every `SparseLinear` in `model`, nested models included, in build order."""
    return [layer for layer in [model, *walk_layers(model)] if isinstance(layer, SparseLinear)]


class SparsityScheduler(keras.callbacks.Callback):
    """Drives every `SparseLinear` of a model to a scheduled target sparsity.

    How it works (the reasoning is in the README, "How the driver works"):

    * **A penalty on the soft mask.** Each layer adds
      `sparsity_penalty * mean(soft_mask)` to the loss in training, which
      raises its thresholds. The penalty is the only force towards sparsity;
      *where* weights go is learned by the thresholds against the task loss.
    * **A bounded feedback on its strength.** Before each step, the scheduler
      compares the measured (hard) sparsity with the schedule's target and
      moves `log(penalty)` by `gain * log(measured_density / target_density)`
      (10x slower downwards, as pruning is hard to undo), clipped to
      `[min_penalty, max_penalty]`. With `scope="global"` one strength is shared
      by every weight of the model (each layer gets its share in proportion to
      its size), so the thresholds decide how much each layer keeps; with
      `scope="per_layer"` every layer follows the target on its own.
    * **A floor.** A layer whose density fell to `min_density` gets no penalty,
      so no layer is pruned to nothing.
    * **Temperature annealing.** Each layer's temperature is
      `relative_temperature(step) / std(kernel at start)`: equally sharp in
      every layer whatever its weight scale, rising to make the soft mask
      close to the hard one the model is evaluated with.
    * **Freeze.** At `schedule.end_step` (when `freeze_at_end=True`) every layer
      is `hard_prune()`d: the mask is fixed and the rest of training
      fine-tunes the surviving weights, so `model.evaluate` measures exactly
      the model that `keras_sparse.strip()` hands over.

    Put it first in `callbacks=[...]`: the statistics it writes into `logs`
    (`sparsity`, `target_sparsity`, `density/<layer>`,
    `threshold_mean/<layer>`) are then seen by `History`, `CSVLogger`,
    `TensorBoard` and the progress bar.

    Args:
        schedule: A `keras_sparse.SparsitySchedule` (`PolynomialDecay`,
            `ConstantSparsity`) or a float (constant target from step 0).
        scope: `"global"` (default) or `"per_layer"`.
        temperature: A schedule of the relative temperature (a callable of
            the step), for every layer. Defaults, over the schedule's steps,
            to `ExponentialTemperature(5, 200)` for layers with a threshold
            per neuron and `ExponentialTemperature(2, 5)` for layers with a
            threshold per weight (a sharp mask stops a per-weight threshold
            from learning: it gets gradient from its own weight only) and for
            `granularity="neuron"` layers (whose threshold likewise sees one
            number, the neuron's RMS).
        min_density: Per-layer floor on the density. Defaults to `0.01`.
        freeze_at_end: Hard-prune every layer at `schedule.end_step`.
            Defaults to `True`.
        gain: Feedback gain: how many e-folds `log(penalty)` moves over the
            whole ramp (`end_step - begin_step`, at least 200 steps) per unit
            of log-density error, so the feedback keeps pace with short and
            long schedules alike. Defaults to `200`.
        relax: Fraction of `gain` used to lower the penalty after an
            overshoot. Defaults to `0.1`.
        initial_penalty, min_penalty, max_penalty: Starting value and bounds
            of the penalty strength.
        update_every: Steps between two measurements and updates. Defaults to 1.
        layers: The layers to drive; defaults to every `SparseLinear` of the
            model.

    Example:

    ```python
    model.fit(x, y, epochs=40, callbacks=[
        keras_sparse.SparsityScheduler(
            keras_sparse.PolynomialDecay(0.95, begin_step=0, end_step=1800))])
    ```
    """

    def __init__(
        self,
        schedule,
        scope="global",
        temperature=None,
        min_density=0.01,
        freeze_at_end=True,
        gain=200.0,
        relax=0.1,
        initial_penalty=1e-3,
        min_penalty=1e-6,
        max_penalty=1e3,
        update_every=1,
        layers=None,
    ):
        super().__init__()
        if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
            from keras_sparse.schedules import ConstantSparsity

            schedule = ConstantSparsity(schedule)
        if not isinstance(schedule, SparsitySchedule):
            raise TypeError(
                "Received an invalid value for `schedule`, expected a SparsitySchedule "
                f"(PolynomialDecay, ConstantSparsity) or a float. Received: schedule={schedule!r}"
            )
        if scope not in _SCOPES:
            raise ValueError(
                f"Received an invalid value for `scope`, expected one of {_SCOPES}. "
                f"Received: scope={scope!r}"
            )
        if not (isinstance(min_density, (int, float)) and 0.0 <= min_density < 1.0):
            raise ValueError(
                "Received an invalid value for `min_density`, expected a number in [0, 1). "
                f"Received: min_density={min_density!r}"
            )
        if not (0 < min_penalty <= initial_penalty <= max_penalty):
            raise ValueError(
                "Expected 0 < min_penalty <= initial_penalty <= max_penalty. Received: "
                f"min_penalty={min_penalty}, initial_penalty={initial_penalty}, "
                f"max_penalty={max_penalty}"
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(
                "Received an invalid value for `update_every`, expected a positive integer. "
                f"Received: update_every={update_every!r}"
            )
        end = max(schedule.end_step, schedule.begin_step + 1)
        # A per-neuron threshold always has some of its weights inside the
        # mask's transition band, so it keeps learning as the mask sharpens.
        # A per-weight threshold gets gradient only from its own weight, which
        # a sharp mask cuts off (pitfall 4 of the notes): it stays softer.
        # So does a neuron-granularity threshold, which sees one RMS only (on
        # LeNet-300-100 at 90%, the sharp schedule left fc2 one neuron).
        self._default_temperatures = {
            True: ExponentialTemperature(5.0, 200.0, schedule.begin_step, end),
            False: ExponentialTemperature(2.0, 5.0, schedule.begin_step, end),
        }
        self.schedule = schedule
        self.scope = scope
        self.temperature_schedule = temperature
        self.min_density = float(min_density)
        self.freeze_at_end = bool(freeze_at_end)
        self.gain = float(gain)
        self.relax = float(relax)
        self.min_penalty, self.max_penalty = float(min_penalty), float(max_penalty)
        self.update_every = update_every
        self._requested_layers = layers
        self._log_penalty = None
        self.step = 0  # training steps seen, across successive `fit` calls
        self.frozen = False
        self._layers = None
        self._weight_scale = None
        self._initial_penalty = float(initial_penalty)

    # ------------------------------------------------------------ lifecycle

    def on_train_begin(self, logs=None):
        if self._layers is None:
            layers = self._requested_layers or sparse_layers(self.model)
            if not layers:
                raise ValueError(
                    "SparsityScheduler found no SparseLinear layer in the model "
                    f"'{self.model.name}'. Convert Dense layers with keras_sparse.sparsify()."
                )
            self._layers = list(layers)
            # The scale each layer's temperature is relative to, fixed at the
            # start so that pruning (which removes small weights) does not
            # change what a temperature means.
            self._weight_scale = [_kernel_std(layer) for layer in self._layers]
            count = len(self._layers) if self.scope == "per_layer" else 1
            self._log_penalty = np.full(count, math.log(self._initial_penalty))
        self._update()

    def on_train_batch_begin(self, batch, logs=None):
        if self.step % self.update_every == 0:
            self._update()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if logs is not None and self._last_stats is not None:
            logs["sparsity"] = self._last_stats["sparsity"]

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        self.model  # noqa: B018 -- JAX: sync the variables before reading them
        densities = [layer.density() for layer in self._layers]
        total = sum(layer.kernel.shape[0] * layer.kernel.shape[1] for layer in self._layers)
        active = sum(layer.num_active() for layer in self._layers)
        logs["sparsity"] = 1.0 - active / total
        logs["target_sparsity"] = self.schedule(self.step)
        logs["relative_temperature"] = self._relative_temperature(self._layers[0], self.step)
        for layer, density in zip(self._layers, densities):
            logs[f"density/{layer.name}"] = density
            logs[f"threshold_mean/{layer.name}"] = float(
                np.mean(ops.convert_to_numpy(layer.threshold))
            )

    def on_train_end(self, logs=None):
        self.model  # noqa: B018 -- JAX: sync the variables before reading them
        if self.frozen:
            # Re-apply the frozen masks to the raw kernels (an optimizer's
            # momentum may have moved values whose gradient was zero).
            for layer in self._layers:
                layer.hard_prune()

    # -------------------------------------------------------------- control

    _last_stats = None

    def _update(self):
        step = self.step
        if self.frozen:
            return
        self.model  # noqa: B018 -- on JAX, reading `model` syncs the variables from the train state
        if self.freeze_at_end and step >= self.schedule.end_step > 0:
            self._freeze(self.schedule(step))
            return
        sizes = np.array([np.prod(layer.kernel.shape) for layer in self._layers], dtype=float)
        active = np.array([layer.num_active() for layer in self._layers], dtype=float)
        densities = active / sizes
        target = self.schedule(step)
        if self.scope == "global":
            measured = np.array([active.sum() / sizes.sum()])
            shares = sizes / sizes.sum()
        else:
            measured = densities
            shares = np.ones(len(self._layers))
        if target > 0:
            # Error in log-density: one point of sparsity matters more at 98%
            # (2% -> 1% halves the model) than at 50%.
            errors = np.clip(np.log(np.maximum(measured, 1e-9) / (1.0 - target)), -1.0, 1.0)
            # Pruning is hard to undo, so an overshoot only slowly relaxes the
            # penalty (no wind-down to nothing while the schedule catches up).
            rate = self.gain / max(self.schedule.end_step - self.schedule.begin_step, 200)
            rates = np.where(errors > 0, rate, rate * self.relax)
            self._log_penalty = np.clip(
                self._log_penalty + rates * errors * self.update_every,
                math.log(self.min_penalty),
                math.log(self.max_penalty),
            )
            # No force at all while at or past the target: the task loss may
            # then lower thresholds again. With Adam, thresholds move at about
            # the learning rate whatever the penalty's size, so a small
            # leftover penalty would still prune (per-weight thresholds most).
            penalties = np.exp(self._log_penalty) * shares * (errors > 0)
        else:
            penalties = np.zeros(len(self._layers))
        penalties[densities <= self.min_density] = 0.0  # the floor
        for layer, penalty, scale in zip(self._layers, penalties, self._weight_scale):
            layer.sparsity_penalty.assign(float(penalty))
            layer.temperature = self._relative_temperature(layer, step) / scale
        self._last_stats = {"sparsity": 1.0 - active.sum() / sizes.sum()}

    def _relative_temperature(self, layer, step):
        sees_many_weights = layer.is_structured and layer.granularity != "neuron"
        schedule = self.temperature_schedule or self._default_temperatures[sees_many_weights]
        return float(schedule(step))

    def _freeze(self, target):
        """Fix every mask at exactly the target sparsity, then `hard_prune()`.

        The feedback leaves the sparsity within a few tenths of a point of the
        target; the rest of the gap is closed by ranking on the learned margin
        `(|w| - threshold) / weight_scale`: the weights nearest to being pruned
        go first (or come back first after an overshoot). Within a neuron this
        ranking is the magnitude order, so the result is still a threshold per
        neuron (structured) or per weight. What is ranked follows each layer's
        granularity: with `"neuron"`, whole neurons on `(rms(w) - threshold) /
        weight_scale` (the target is then met to the nearest neuron); with
        `"n:m"`, only the weights of the N:M pattern (the others stay pruned,
        so a layer never keeps more than n of m).
        """
        groups = [[i] for i in range(len(self._layers))]
        if self.scope == "global":
            groups = [list(range(len(self._layers)))]
        for group in groups:
            candidates = [_candidates(self._layers[i], self._weight_scale[i]) for i in group]
            total = sum(int(np.prod(self._layers[i].kernel.shape)) for i in group)
            n_keep = int(round((1.0 - target) * total))
            # Each layer's floor first, then the best remaining margins overall.
            chosen = []
            for i, (margins, size, _) in zip(group, candidates):
                floor = int(math.ceil(self.min_density * np.prod(self._layers[i].kernel.shape)))
                order = np.argsort(-margins, kind="stable")
                c = np.zeros(margins.shape, bool)
                c[order[: _count_at_least(np.full(len(order), size), floor)]] = True
                chosen.append(c)
            rest = n_keep - sum(int(c.sum()) * size for c, (_, size, _) in zip(chosen, candidates))
            if rest > 0:
                pool = np.concatenate(
                    [np.where(c, -np.inf, m) for c, (m, _, _) in zip(chosen, candidates)]
                )
                sizes = np.concatenate(
                    [np.full(c.size, size) for c, (_, size, _) in zip(chosen, candidates)]
                )
                best = np.argsort(-pool, kind="stable")
                best = best[: _count_closest(sizes[best], rest)]
                flat = np.concatenate(chosen)
                flat[best] = True
                offsets = np.cumsum([0] + [c.size for c in chosen])
                chosen = [flat[a:b] for a, b in zip(offsets, offsets[1:])]
            for i, c, (margins, _, to_kernel) in zip(group, chosen, candidates):
                _prune_exactly(self._layers[i], to_kernel(c & np.isfinite(margins)))
        for layer in self._layers:
            layer.sparsity_penalty.assign(0.0)
        self.frozen = True


def _candidates(layer, scale):
    """`(margins, size, to_kernel)`: what `_freeze` ranks in `layer`.

    `margins` is flat, `-inf` for what is already pruned (or outside the
    N:M pattern); each candidate stands for `size` weights; `to_kernel`
    turns a boolean choice over the candidates into a kernel-shaped keep set.
    """
    kernel = ops.convert_to_numpy(layer.kernel)
    threshold = ops.convert_to_numpy(layer.threshold)
    prune_mask = ops.convert_to_numpy(layer.prune_mask)
    alive = prune_mask > 0
    if layer.granularity == "neuron":
        scores = neuron_scores_numpy(kernel, prune_mask)
        margins = np.where(alive.any(axis=0), (scores - threshold) / scale, -np.inf)
        return margins, kernel.shape[0], lambda c: np.broadcast_to(c, kernel.shape)
    if layer.granularity == "n:m":
        alive &= n_m_keep_numpy(np.abs(kernel) * prune_mask, *layer.n_m)
    margins = np.where(alive, (np.abs(kernel) - threshold) / scale, -np.inf)
    return margins.ravel(), 1, lambda c: c.reshape(kernel.shape)


def _count_at_least(sizes, budget):
    """How many of the first `sizes` it takes to hold `budget` weights (all if never)."""
    if budget <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(sizes), budget)) + 1


def _count_closest(sizes, budget):
    """How many of the first `sizes` hold closest to `budget` weights (fewer on a tie)."""
    totals = np.concatenate([[0], np.cumsum(sizes)])
    return int(np.argmin(np.abs(totals - budget)))


def _prune_exactly(layer, keep):
    """`hard_prune()` the layer so that exactly the weights in `keep` survive."""
    if layer.granularity != "weight":
        # Whole neurons, or weights inside the N:M pattern: `prune_mask`
        # records the choice and no threshold is left to prune more.
        prune_mask = ops.convert_to_numpy(layer.prune_mask)
        layer.prune_mask.assign(np.logical_and(prune_mask, keep))
        layer.reset_threshold(0.0)
        layer.hard_prune()
        return
    magnitude = np.abs(ops.convert_to_numpy(layer.kernel))
    above = np.nextafter(magnitude, np.inf)  # a threshold that prunes the weight
    if layer.is_structured:
        kept = np.where(keep, magnitude, np.inf)
        threshold = np.min(kept, axis=0)
        threshold = np.where(np.isfinite(threshold), threshold, above.max(axis=0))
        # Ties with the column's cut are resolved by the keep set itself.
        layer.reset_threshold(threshold.astype("float32"))
        layer.prune_mask.assign(np.logical_and(ops.convert_to_numpy(layer.prune_mask), keep))
    else:
        layer.reset_threshold(np.where(keep, 0.0, above).astype("float32"))
    layer.hard_prune()


def _kernel_std(layer):
    kernel = ops.convert_to_numpy(layer.kernel)
    alive = kernel[ops.convert_to_numpy(layer.prune_mask) > 0]
    std = float(np.std(alive)) if alive.size else 0.0
    return std if std > 0 and math.isfinite(std) else 1.0

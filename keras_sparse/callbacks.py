"""`SparsityScheduler`: the callback that steers learned thresholds to a target sparsity.

The feedback runs on the device, inside the compiled train step: each mask
measures its hard density in its training forward pass, and the first mask
of each group (the model, or each layer with `scope="per_layer"`) updates
the penalty strength from those measurements and writes every member's
penalty. The callback itself only attaches the driver when training starts,
freezes the masks at the end of the ramp, and logs scalars at each epoch's
end: no kernel-sized value leaves the device during `fit`, and a step makes
no host round trip. That work outside the steps (start, statistics, freeze)
runs as a few compiled programs (`keras_sparse.programs`), not op by op.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_sparse.host import to_numpy
from keras_sparse.layers import SparseKernelMixin
from keras_sparse.mask import STATE_FIELDS, check_bool
from keras_sparse.programs import Program
from keras_sparse.schedules import ConstantSparsity, ExponentialTemperature, SparsitySchedule
from keras_sparse.transforms import sync_frozen_masks
from keras_sparse.walk import display_names, sparse_layers

_SCOPES = ("global", "per_layer")
# The freeze normally trims what the feedback left over; cutting more than a third of
# what the masks kept means they did not follow the schedule, and the freeze acted as
# one-shot pruning: say so.
_ONE_SHOT_CUT = 1.5


def default_min_density(final_sparsity):
    """`SparsityScheduler`'s default floor: a tenth of the final density, at most 1%."""
    return min(0.01, 0.1 * (1.0 - float(final_sparsity)))


# The longest default interval between two feedback updates, and the most one update may
# move `log(penalty)` by default (in e-folds).
MAX_DEFAULT_UPDATE_EVERY = 10
DEFAULT_UPDATE_STEP = 0.25


def default_update_every(ramp_steps, gain):
    """`SparsityScheduler`'s default `update_every`: a quarter e-fold per update, in [1, 10].

    One update moves `log(penalty)` by at most `gain / ramp * update_every`
    (the error is clipped to 1). Coarser updates overshoot: on short ramps and
    at 99% they cost accuracy (the pruning guide's ablations), so a ramp is
    followed every step up to 1,600 steps and every 10th step from 8,000.
    """
    every = int(DEFAULT_UPDATE_STEP * ramp_steps // gain)
    return int(np.clip(every, 1, MAX_DEFAULT_UPDATE_EVERY))


_STEP, _LOG_PENALTY, _DENSITY, _SCALE, _FROZEN = range(len(STATE_FIELDS))


def _host_reads():
    """Where the scheduler reads scalars on the host (epoch ends, the freeze): allowed even
    under `jax.transfer_guard_device_to_host("disallow")`, which the steps stay under."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.transfer_guard_device_to_host("allow")
    return contextlib.nullcontext()


def _stored_position(states):
    """`(step, frozen)` of a schedule from its masks' stored states.

    Frozen if any mask is, its step read from a frozen one: a mask the
    training step never called (left out of the schedule) keeps the state of
    a fresh start beside the frozen ones.
    """
    frozen = [bool(state[_FROZEN] > 0) for state in states]
    lead = states[frozen.index(True)] if any(frozen) else states[0]
    return int(lead[_STEP]), any(frozen)


class SparsityScheduler(keras.callbacks.Callback):
    """Drives every sparse layer of a model to a scheduled target sparsity.

    How it works (the pruning guide in the docs gives the reasoning):

    * **A penalty on the soft mask.** Each mask adds
      `sparsity_penalty * mean(soft_mask)` to the loss in training, which
      raises its thresholds. The penalty is the only force towards sparsity;
      *where* weights go is learned by the thresholds against the task loss.
    * **A bounded feedback on its strength**, inside the train step. Each
      step compares the measured (hard) density with the schedule's target
      and moves `log(penalty)` by `gain * log(measured_density /
      target_density)` per ramp length (10x slower downwards, as pruning is
      hard to undo), clipped to `[min_penalty, max_penalty]`. With
      `scope="global"` one strength is shared by every weight of the model
      (each mask gets its share in proportion to its size), so the
      thresholds decide how much each layer keeps; with `scope="per_layer"`
      every mask follows the target on its own.
    * **A floor.** A mask whose density fell to `min_density` gets no
      penalty, so no layer is pruned to nothing.
    * **A scale-free temperature.** Each mask's temperature is
      `relative_temperature(step) / weight_scale`, the scale being its
      weights' standard deviation when driving started: equally sharp in
      every layer. By default (global scope) it stays soft until the
      freeze, which makes the mask exact; without the freeze, or per layer,
      it rises, so that the soft mask trained approaches the hard one
      evaluated.
    * **Freeze.** At `schedule.end_step` (when `freeze_at_end=True`; for a
      schedule without a ramp, `ConstantSparsity` or a float, when `fit()` ends) the
      masks are fixed at exactly the target (ranking weights on their
      learned margin) and hard-pruned, the surviving weights keeping the
      values training used (`kernel * soft_mask`; whole units, with
      `granularity="neuron"` or `"head"`, keep their raw weights); the rest of
      training fine-tunes the
      survivors with the fixed mask alone (no sigmoid, no penalty; the
      thresholds, which a frozen mask does not read, stay at zero), so
      `model.evaluate` measures exactly the model `keras_sparse.strip()`
      hands over.

    The state (step, penalty strength, scale, frozen) lives in each mask's
    `sparsity_state` variable, saved with the model: a reloaded model, or a
    second `fit`, resumes where training stopped (pass `resume=False` to
    start the schedule again).

    Put it first in `callbacks=[...]`: the statistics it writes into the
    epoch's `logs` (`sparsity`, `target_sparsity`, `relative_temperature`,
    `sparsity_loss`, `density/<layer>`, `threshold_mean/<layer>`) are then
    seen by `History`, `CSVLogger`, `TensorBoard` and the progress bar.
    Several schedulers in one fit (each with `layers=` of its own) number
    their own figures, in the order of the list: `sparsity/0`,
    `target_sparsity/1`, ...
    `BackupAndRestore` may come after it (the schedule resumes from the
    backup). A callback that puts back weights from before the freeze,
    such as `EarlyStopping(restore_best_weights=True)` whose best epoch came
    before it, undoes the pruning: the masks then follow the weights put
    back, with a warning. Give EarlyStopping `start_from_epoch=` the epoch
    in which the freeze happens (counted from 0: `int(0.9 * epochs)` for
    `end_fraction=0.9`).

    Args:
        schedule: A `keras_sparse.SparsitySchedule` (`PolynomialDecay`,
            `ConstantSparsity`), in steps, epochs or a fraction of the run,
            or a float (a `ConstantSparsity` from step 0).
        scope: `"global"` (default) or `"per_layer"`.
        temperature: A schedule of the relative temperature (such as
            `ExponentialTemperature`), for every mask. Defaults, over the
            schedule's steps, to a constant 5 for masks of the weight
            granularity with a threshold per output unit (a soft mask until
            the freeze, which makes it exact: on the MNIST benchmarks it
            pruned more accurately than a mask sharpened to 200, the pruning
            guide's ablations), `ExponentialTemperature(5, 200)` for those
            masks with `freeze_at_end=False` or `scope="per_layer"`, and for
            `granularity="n:m"` (the mask then sharpens towards the hard one
            evaluated), and
            `ExponentialTemperature(2, 5)` for masks with a threshold per
            weight (a sharp mask stops a per-weight threshold from learning:
            it gets gradient from its own weight only) and for
            `granularity="neuron"` (whose threshold likewise sees one number,
            the unit's RMS).
        min_density: Per-mask floor on the density. Defaults to a tenth of
            the final target's density, at most 1%:
            `min(0.01, 0.1 * (1 - final_sparsity))`, so 1% up to a 90%
            target and 0.1% at 99%. A floor near the target's mean density
            binds the largest layer and pushes the cut onto the small ones
            (a 1% floor at a 99% target leaves an MLP's output layer a few
            weights).
        freeze_at_end: Freeze and hard-prune every mask at
            `schedule.end_step` (a schedule without a ramp: when `fit()`
            ends). Defaults to `True`.
        gain: Feedback gain: how many e-folds `log(penalty)` moves over the
            whole ramp (`end_step - begin_step`, at least 200 steps) per unit
            of log-density error. Defaults to `200`.
        relax: Fraction of `gain` used to lower the penalty after an
            overshoot. Defaults to `0.1`.
        initial_penalty: Starting value of the penalty strength. Defaults
            to `1e-3`.
        min_penalty: Lower bound of the penalty strength. Defaults to
            `1e-6`.
        max_penalty: Upper bound of the penalty strength. Defaults to `1e3`.
        update_every: Steps between two updates of the feedback (the
            hard density measured, the temperature, the penalty strength);
            the steps between only count. Defaults to `ramp / (4 * gain)`
            between 1 and 10, so that one update moves `log(penalty)` by at
            most a quarter e-fold: every step on a ramp of up to 1,600 steps
            (with the default gain), every 10th from 8,000. An update costs
            a pass over each kernel and some scalar operations, which an
            eager PyTorch step pays in Python; coarser updates overshoot the
            target and cost accuracy.
        layers: The sparse layers to drive; defaults to every sparse layer
            of the model.
        resume: Continue from the state saved in the masks (default); with
            `False`, start the schedule again from step 0.

    Example:

    ```python
    model.fit(x, y, epochs=40, callbacks=[
        keras_sparse.SparsityScheduler(keras_sparse.PolynomialDecay(0.95, end_fraction=0.9))])
    ```
    """

    def __init__(
        self,
        schedule,
        scope="global",
        temperature=None,
        min_density=None,
        freeze_at_end=True,
        gain=200.0,
        relax=0.1,
        initial_penalty=1e-3,
        min_penalty=1e-6,
        max_penalty=1e3,
        update_every=None,
        layers=None,
        resume=True,
    ):
        super().__init__()
        if isinstance(schedule, (int, float, np.floating)) and not isinstance(schedule, bool):
            schedule = ConstantSparsity(float(schedule))
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
        self._default_floor = min_density is None
        if min_density is None:
            # The final target without the schedule's steps (epochs and fractions are
            # resolved at train begin, where the floor is set again from the schedule).
            min_density = default_min_density(getattr(schedule, "target_sparsity", 0.0))
        if not (
            isinstance(min_density, (int, float, np.number))
            and not isinstance(min_density, bool)
            and 0.0 <= min_density < 1.0
        ):
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
        if update_every is not None and (
            isinstance(update_every, bool)
            or not isinstance(update_every, (int, np.integer))
            or update_every < 1
        ):
            raise ValueError(
                "Received an invalid value for `update_every`, expected a positive integer "
                "or None. "
                f"Received: update_every={update_every!r}"
            )
        for name, value, low in (("gain", gain, 0.0), ("relax", relax, None)):
            if not (
                isinstance(value, (int, float, np.number))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > 0 if low is not None else value >= 0)
            ):
                expected = "a positive number" if low is not None else "a number >= 0"
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected {expected}. "
                    f"Received: {name}={value!r}"
                )
        check_bool("freeze_at_end", freeze_at_end)
        check_bool("resume", resume)
        if temperature is not None and not callable(temperature):
            raise TypeError(
                "Received an invalid value for `temperature`, expected None or a schedule of "
                "the relative temperature by step (such as ExponentialTemperature(5, 200)). "
                f"Received: temperature={temperature!r}"
            )
        if layers is not None:
            given = list(layers) if isinstance(layers, (list, tuple)) else None
            if not given or not all(isinstance(x, SparseKernelMixin) for x in given):
                raise TypeError(
                    "Received an invalid value for `layers`, expected a non-empty list of "
                    "sparse layers (such as `[model.get_layer('fc1')]`, or "
                    f"`keras_sparse.sparse_layers(model)`). Received: layers={layers!r}"
                )
        self.schedule = schedule
        self.scope = scope
        self.temperature_schedule = temperature
        self.min_density = float(min_density)
        self.freeze_at_end = bool(freeze_at_end)
        self.gain = float(gain)
        self.relax = float(relax)
        self.min_penalty, self.max_penalty = float(min_penalty), float(max_penalty)
        self.initial_penalty = float(initial_penalty)
        self._default_update_every = update_every is None
        # Set from the schedule's ramp at train begin when not given.
        self.update_every = MAX_DEFAULT_UPDATE_EVERY if update_every is None else int(update_every)
        self.resume = bool(resume)
        self._requested_layers = layers
        self.step = 0  # training steps driven, across `fit` calls and reloads
        self.frozen = False
        self._masks = None
        self._programs = {}

    # ------------------------------------------------------------ lifecycle

    def on_train_begin(self, logs=None):
        self._steps = self._resolved_schedule()
        if self._default_floor:
            self.min_density = default_min_density(self._steps.final_sparsity)
        if self._default_update_every:
            self.update_every = default_update_every(self._ramp_steps(), self.gain)
        layers = self._requested_layers or sparse_layers(self.model)
        if not layers:
            raise ValueError(
                "SparsityScheduler found no sparse layer in the model "
                f"'{self.model.name}'. Convert its layers with keras_sparse.sparsify()."
            )
        self._masks, self._names = [], []
        for layer, name in zip(layers, display_names(self.model, layers)):
            layer._require_built("SparsityScheduler")
            masks = layer.masks
            for kernel_name, mask in masks.items():
                self._masks.append(mask)
                self._names.append(name if len(masks) == 1 else f"{name}/{kernel_name}")
        self._programs = {}
        self.model  # noqa: B018 -- on JAX, reading `model` syncs the variables from the train state
        with _host_reads():
            self._start()
        self._epoch_start, self._batches_begun = self.step, 0
        self._eager_steps = _steps_run_as_python(self.model)
        # Read now: on JAX, reading `self.model` in a batch hook syncs every variable.
        self._steps_per_call = self.model.steps_per_execution
        self._drive_masks()
        for mask in self._masks:
            mask._called_in_training = False  # set by the mask's training forward pass
        self._use_checked, self._stepped, self._load_checked = False, False, False
        self._retrace()
        self._check_after_every_callback()

    def _drive_masks(self):
        # `_model`: on JAX, reading `model` syncs every variable.
        this_fit = getattr(self._model, "history", None)
        for mask, name in zip(self._masks, self._names):
            other = mask.driver
            if other is not None and other is not self and mask._driven_in is this_fit:
                raise ValueError(
                    f"SparsityScheduler: the mask of '{name}' is driven by another "
                    "SparsityScheduler of this fit: give each scheduler layers of its own "
                    "(`layers=[...]`)."
                )
            mask._driven_in = this_fit
            mask.driver = None if self.frozen else self
            mask._driven_at_step = None  # a new fit may count its steps from 0 again

    def on_epoch_begin(self, epoch, logs=None):
        if not self._load_checked:
            self._load_checked = True
            self._resume_if_loaded()
        self._epoch_start = self.step
        self._batches_begun = 0

    # No `on_train_batch_end`: a callback with one makes Keras wait for each
    # step's logs before dispatching the next step (no asynchronous dispatch).
    # The step count is kept from the batches begun instead.
    def on_train_batch_begin(self, batch, logs=None):
        if self._stepped and not self._use_checked:
            self._leave_out_masks_not_trained()
        self._stepped = True
        self.step = self._epoch_start + int(batch)
        self._batches_begun = int(batch) + self._steps_per_call
        if self._ramp_ended():
            self.model  # noqa: B018 -- JAX: sync the variables before reading them
            self._freeze_at_ramp_end()

    def _resume_if_loaded(self):
        """Start again from the masks' state if a callback after this one loaded it.

        `BackupAndRestore` loads its backup in its own `on_train_begin`, after
        this one's when it comes later in `callbacks=[...]`: the step read
        there is then not the backup's, and an eager step (PyTorch, or
        `run_eagerly=True`) counted on from it, writing over the loaded one.
        """
        self.model  # noqa: B018 -- JAX: sync the variables before reading them
        with _host_reads():
            if _stored_position(self._stored_states()) == (self.step, self.frozen):
                return
            self._start(resume=True)
        self._programs = {}
        self._drive_masks()
        self._retrace()

    def _ramp_ended(self, fit_ended=False):
        """Whether the masks freeze now: at the ramp's end step, or, for a schedule without
        a ramp (`ConstantSparsity`, a float), when `fit()` ends, the feedback having held the
        target from `begin_step` until then."""
        if self.frozen or not self.freeze_at_end:
            return False
        begin, end = self._steps.begin_step, self._steps.end_step
        if end > begin:
            return self.step >= end
        return fit_ended and self.step > 0 and self.step >= begin

    def _freeze_at_ramp_end(self):
        with _host_reads():
            self._freeze(self._steps(self.step))

    def _leave_out_masks_not_trained(self):
        """After the first training step: leave out the masks it did not call, and say so.

        A mask outside the training forward pass (a layer the model holds but
        does not call, keras-hub's untied output projection in a backbone)
        learns nothing and counts no steps: as the first mask, which the
        driver reads its step from and which updates the global penalty, it
        stopped the schedule, and elsewhere the freeze cut it by magnitude.
        """
        self._use_checked = True
        if self.frozen:
            return
        called = [mask._called_in_training for mask in self._masks]
        unused = [name for name, used in zip(self._names, called) if not used]
        if not unused:
            return
        if len(unused) == len(self._masks):
            raise ValueError(
                f"SparsityScheduler: the first training step of model '{self.model.name}' "
                f"called none of the masks {unused} in training mode, so nothing can be "
                "pruned. A subclassed model's `call` must take `training` and pass it to "
                "its layers (`self.dense(x, training=training)`: JAX's fit runs `call` "
                "without Keras's training context). Or pass the layers this fit trains: "
                "SparsityScheduler(..., layers=[...])."
            )
        for mask, used in zip(self._masks, called):
            if not used:
                mask.driver = None
        self._masks = [mask for mask, used in zip(self._masks, called) if used]
        self._names = [name for name, used in zip(self._names, called) if used]
        self._programs = {}
        self.model  # noqa: B018 -- JAX: sync the variables before reading them
        with _host_reads():
            self.step = int(to_numpy(self._masks[0].sparsity_state)[_STEP])
        self._retrace()
        warnings.warn(
            f"SparsityScheduler: the training step does not call the masks of {unused}. "
            "They are left out of the schedule and keep every weight; its sparsity "
            "counts the other masks.",
            stacklevel=2,
        )

    def _count_steps(self):
        """The steps taken, at an epoch's or the training's end."""
        if self.frozen or not self._masks:
            # The masks stopped counting at the freeze.
            self.step = self._epoch_start + self._batches_begun
            steps = self.params.get("steps") if self.params else None
            if steps:  # the last chunk of `steps_per_execution` may be short
                self.step = min(self.step, self._epoch_start + int(steps))
        elif self._eager_steps:
            self.step = self._epoch_start + self._batches_begun
            with _host_reads():
                for mask in self._masks:
                    state = np.array(to_numpy(mask.sparsity_state))
                    state[_STEP] = self.step
                    mask.sparsity_state.assign(state)
        else:
            with _host_reads():
                self.step = int(to_numpy(self._masks[0].sparsity_state)[_STEP])

    def on_epoch_end(self, epoch, logs=None):
        self.model  # noqa: B018 -- JAX: sync the variables before reading them
        if not self._use_checked:
            self._leave_out_masks_not_trained()
        self._count_steps()
        if logs is not None:
            with _host_reads():
                self._check_finite(logs)  # before any freeze from a non-finite model
        last = self.params and epoch + 1 >= (self.params.get("epochs") or 0)
        if last and self._masks and self._ramp_ended(fit_ended=True):
            # A ramp that ends with the fit: the batch that would freeze it never begins.
            # Frozen here, the last epoch's logs hold the model fit returns (its
            # validation ran before, on the soft mask).
            self._freeze_at_ramp_end()
        if logs is None:
            return
        with _host_reads():
            statistics = self.statistics()
        logs.update(
            {
                (key + self._log_suffix if "/" not in key else key): value
                for key, value in statistics.items()
            }
        )

    def on_train_end(self, logs=None):
        self.model  # noqa: B018 -- JAX: sync the variables before reading them
        self._count_steps()
        if self._sync_restored():
            # A callback before this one put back weights from before the freeze: they
            # are left as they are, neither frozen again nor hard-pruned.
            for mask in self._masks:
                mask.driver = None
            self._retrace()
            return
        if self._masks and self._ramp_ended(fit_ended=True):
            # Stopped by another callback at the ramp's end, or a fit without epochs' end,
            # or a schedule without a ramp, whose freeze is the fit's end.
            self._freeze_at_ramp_end()
        for mask in self._masks or ():
            mask.driver = None
        if self.frozen:
            # Re-apply the frozen masks to the raw kernels (an optimizer's
            # momentum may have moved values whose gradient was zero).
            self._hard_prune_all()
        elif self._masks:
            self._warn_unfinished()
        self._retrace()

    def _check_after_every_callback(self):
        """Check the masks again once every callback's `on_train_end` has run.

        A callback after this one in `callbacks=[...]` may put back weights saved
        before the freeze (`EarlyStopping(restore_best_weights=True)`), and a
        callback cannot see the others. Keras's `fit` appends its `History` to
        the callbacks it is given, so the check is chained to History's
        `on_train_end`, for this fit only (one check covers every scheduler).
        """
        self._log_suffix = ""
        history = getattr(self.model, "history", None)
        if not isinstance(history, keras.callbacks.History):
            return
        if "on_train_end" in vars(history):  # another scheduler's check, in this fit
            schedulers = history.on_train_end.schedulers
            schedulers.append(self)
            # Their figures would overwrite each other in the logs: numbered apart.
            for number, scheduler in enumerate(schedulers):
                scheduler._log_suffix = f"/{number}"
            return

        def on_train_end(logs=None):
            del history.on_train_end
            history.on_train_end(logs)
            for scheduler in on_train_end.schedulers:
                scheduler._check_after_fit()

        on_train_end.schedulers = [self]
        history.on_train_end = on_train_end

    def _freeze_epoch(self):
        """The epoch (from 0) in which the ramp's end freezes the masks; `None` for a
        schedule that freezes when `fit` ends."""
        steps = self.params.get("steps") if self.params else None
        begin, end = self._steps.begin_step, self._steps.end_step
        if not steps or not self.freeze_at_end or end <= begin:
            return None
        # A ramp that ends with the fit freezes at the end of its last epoch.
        last = (self.params.get("epochs") or 1) - 1
        return min(int(end // steps), last)

    def _check_after_fit(self):
        """After every callback: follow weights put back (`_sync_restored`); zero again the
        pruned weights of frozen ones (a snapshot taken after the freeze holds what the
        optimizer moved there before `on_train_end` zeroed it); say when weights from an
        earlier step were put back, which the end-of-fit figures do not describe."""
        if not self._masks or self._sync_restored():
            return
        if self.frozen:
            self._hard_prune_all()
            return
        with _host_reads():
            stored, _ = _stored_position(self._stored_states())
            if stored == self.step:
                return
            sparsity = self.statistics()["sparsity"]
        warnings.warn(
            f"SparsityScheduler: after it, a callback put back weights from step {stored} of "
            f"the schedule (sparsity {sparsity:.4f}), such as EarlyStopping's best weights; "
            f"training had stopped at step {self.step}. A second fit with the scheduler "
            "resumes from them.",
            stacklevel=2,
        )
        self.step = stored

    def _sync_restored(self):
        """Follow the masks' stored state where weights from before the freeze were
        put back, and say so (`sync_frozen_masks`); whether they were."""
        if not self._masks:
            return False
        with _host_reads():
            sync_frozen_masks(
                self.model, "SparsityScheduler, at the end of fit", self._freeze_epoch()
            )
            if not self.frozen or any(mask.frozen for mask in self._masks):
                return False
            self.step, self.frozen = _stored_position(self._stored_states())
        return True

    # ------------------------------------------------------------ helpers

    def _resolved_schedule(self):
        params = self.params or {}
        try:
            schedule = self.schedule.resolve(params.get("steps"), params.get("epochs"))
        except ValueError as error:
            raise ValueError(f"SparsityScheduler cannot place its schedule: {error}") from None
        try:
            # Traced, as the train step will: a schedule written in NumPy fails here.
            Program(schedule, [])(ops.convert_to_tensor(0.0))
        except Exception as error:
            raise TypeError(
                f"The schedule {self.schedule!r} must accept a tensor step (write it with "
                "keras.ops), as the driver evaluates it inside the train step. "
                f"Calling it on a tensor raised: {error!r}"
            ) from error
        return schedule

    def _ramp_steps(self):
        """The feedback's time scale: the schedule's ramp, at least 200 steps."""
        return max(self._steps.end_step - self._steps.begin_step, 200)

    def _groups(self):
        if self.scope == "global":
            return [self._masks]
        return [[mask] for mask in self._masks]

    def _start(self, resume=None):
        """Resume from (or reset) the masks' state; set what a fresh start needs."""
        states = self._stored_states()
        if not (self.resume if resume is None else resume):
            states = [np.zeros(len(STATE_FIELDS), "float32") for _ in self._masks]
            for mask in self._masks:
                mask.frozen = False
        self.step, self.frozen = _stored_position(states)
        for mask, state in zip(self._masks, states):
            mask.frozen = bool(state[_FROZEN] > 0)
        if self.frozen:
            self._warn_if_frozen_below_target()
        spreads, active = self._measure(
            "start",
            lambda: (
                ops.stack([_alive_std(mask) for mask in self._masks]),
                ops.stack([mask.count_active() for mask in self._masks]),
            ),
        )
        for mask, state, spread, count in zip(self._masks, states, spreads, active):
            state = np.array(state, "float32")
            if state[_SCALE] <= 0:
                state[_SCALE] = spread if spread > 0 and math.isfinite(spread) else 1.0
            if state[_STEP] == 0 and not self.frozen:
                state[_LOG_PENALTY] = math.log(self.initial_penalty)
                # The group's first step reads the other members' densities from here.
                state[_DENSITY] = count / mask.size
            mask.sparsity_state.assign(state)
            if not self.frozen:
                relative = self._relative_schedule(mask)(self.step)
                mask._temperature.assign(relative / float(state[_SCALE]))

    def _stored_states(self):
        """Each mask's `sparsity_state`, on the host (NumPy)."""
        return [to_numpy(mask.sparsity_state) for mask in self._masks]

    def _program(self, name, function):
        """The compiled `Program` of `function` over every mask's variables, made once per fit.

        `name` must tell apart what the function computes; the masks' own
        Python state is in their `trace_key()`.
        """
        key = (name, self.frozen)
        if key not in self._programs:
            variables = [v for mask in self._masks for v in [mask.kernel, *mask.variables]]
            # Shared with every scheduler driving masks of the same structure.
            shared = (name, self.scope, self.min_density, *(m.trace_key() for m in self._masks))
            self._programs[key] = Program(function, variables, key=shared)
        return self._programs[key]

    def _measure(self, name, function, *args):
        """`function(*args)`'s tensors, compiled as one program, read to the host (NumPy)."""
        values = self._program(name, function)(*args)
        return keras.tree.map_structure(to_numpy, values)

    def _hard_prune_all(self):
        self._program("hard_prune", lambda: [m.assign_hard_pruned() for m in self._masks])()
        for mask in self._masks:
            mask.mark_hard_pruned()

    def _warn_if_frozen_below_target(self):
        """A resumed schedule whose masks are frozen below its target cannot prune further."""
        kept = sum(mask.num_active() for mask in self._masks)
        sparsity = 1.0 - kept / sum(mask.size for mask in self._masks)
        target = self._steps.final_sparsity
        if target > sparsity + 1e-3:
            warnings.warn(
                f"SparsityScheduler: the masks are frozen (a finished schedule, or a quantized "
                f"layer) at sparsity {sparsity:.4f}, below this schedule's target {target:.4f}, "
                "and a frozen mask does not change: this fit fine-tunes the survivors only. "
                "Pass resume=False to start a new schedule from the masks as they are.",
                stacklevel=3,
            )

    def _retrace(self):
        # The driver, and the freeze, change what a training step computes.
        if getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)

    def _relative_schedule(self, mask):
        if self.temperature_schedule is not None:
            return self.temperature_schedule
        begin, end = self._steps.begin_step, max(self._steps.end_step, self._steps.begin_step + 1)
        options = mask.options
        per_unit = options.structured and options.granularity == "weight"
        if per_unit and self.freeze_at_end and self.scope == "global":
            # The freeze makes the mask exact, so it need not sharpen before:
            # a soft mask until then pruned more accurately (pruning guide).
            # Not per layer: a layer held to the target leans on the weights
            # the soft mask half keeps, which the freeze then cuts.
            return ExponentialTemperature(5.0, 5.0, begin, end)
        if options.structured and options.granularity != "neuron":
            # A per-unit threshold always has some of its weights inside the
            # mask's transition band, so it keeps learning as the mask sharpens.
            return ExponentialTemperature(5.0, 200.0, begin, end)
        # A per-weight threshold gets gradient only from its own weight, which
        # a sharp mask cuts off; a neuron threshold sees one RMS only.
        return ExponentialTemperature(2.0, 5.0, begin, end)

    # ------------------------------------------- the feedback, in the graph

    def drive(self, mask, kernel):
        """One driven training step of `mask`, inside the train step.

        Called by the mask's forward pass. On a step where the driver
        updates (every `update_every` steps) it measures the mask's hard
        density, sets its temperature and, for the first mask of a group,
        updates the group's penalty strength and writes every member's
        penalty; other steps only count the step.
        """
        group = self._group_of(mask)
        members = group if group[0] is mask else []
        if self._eager_steps:
            pending = mask.__dict__.pop("_pending_penalty", None)
            if pending is not None:  # see the end of this method
                mask.sparsity_penalty.assign(pending)
            # The step runs as Python: the host knows the step number, so a
            # step without an update costs nothing (the step count is
            # written to the masks at the epoch's end).
            if self.step % self.update_every:
                return
            # Once per step, even if a custom train step runs the model twice:
            # a second update would write the temperature and the penalty
            # that the first forward pass's backward still needs.
            if mask.__dict__.get("_driven_at_step") == self.step:
                return
            mask._driven_at_step = self.step
            # The step as a Python number: the schedules then compute the
            # target and the temperature in Python, not as scalar ops.
            values = self._update(mask, kernel, float(self.step), group)
        elif self.update_every == 1:
            values = self._update(mask, kernel, mask.state("step"), group)
        else:
            # A compiled step holds one program for every step: the update
            # runs on the due steps only (both branches return new values;
            # variables are written outside the branch).
            step = mask.state("step")
            values = ops.cond(
                ops.equal(ops.mod(step, float(self.update_every)), 0.0),
                lambda: self._update(mask, kernel, step, group),
                lambda: self._count_only(mask, members),
            )
        temperature, state, penalties = values
        mask._temperature.assign(temperature)
        mask.sparsity_state.assign(state)
        for member, penalty in zip(members, penalties):
            if self._eager_steps and member is not mask:
                # Each member writes its own, at its next forward pass: one that ran
                # before this mask in this step (a model whose call order is not its
                # layer order: keras-hub's CLIP) holds its penalty for the backward,
                # and eager PyTorch refuses a tensor written in place after use.
                member.__dict__["_pending_penalty"] = penalty
            else:
                member.sparsity_penalty.assign(penalty)

    def _count_only(self, mask, members):
        """`_update`'s values on a step that is not due: the same, one step further."""
        state = mask.sparsity_state.value
        step = ops.concatenate([state[:1] + 1.0, state[1:]])
        return mask._temperature.value, step, tuple(m.sparsity_penalty.value for m in members)

    def _update(self, mask, kernel, step, group):
        """`(temperature, state, penalties of the group's members)` after one update.

        Only the group's first mask computes penalties (an empty tuple for the others).
        """
        state = mask.sparsity_state
        scale = state[_SCALE]
        density = ops.cast(mask.count_active(kernel), "float32") / float(mask.size)
        temperature = self._relative_schedule(mask)(step) / scale
        log_penalty, penalties = state[_LOG_PENALTY], ()
        if group[0] is mask:
            log_penalty, penalties = self._control(group, density, step, log_penalty)
        new_state = ops.stack([step + 1.0, log_penalty, density, scale, 0.0 * step])
        return temperature, new_state, penalties

    def _group_of(self, mask):
        if self.scope == "global":
            return self._masks
        return [mask]

    def _control(self, group, leader_density, step, log_penalty):
        """`(log_penalty, penalties)`: the feedback's new strength and each member's penalty."""
        sizes = np.array([m.size for m in group], dtype="float64")
        densities = [leader_density] + [m.state("hard_density") for m in group[1:]]
        densities = ops.stack(densities)
        # A tensor of weights: a NumPy array here would pull `densities` to the host.
        weights = ops.convert_to_tensor((sizes / sizes.sum()).astype("float32"))
        measured = ops.sum(densities * weights)
        target = self._steps(step)
        # Error in log-density: one point of sparsity matters more at 98%
        # (2% -> 1% halves the model) than at 50%.
        error = ops.clip(ops.log(ops.maximum(measured, 1e-9) / (1.0 - target)), -1.0, 1.0)
        ramp = self._ramp_steps()
        # Pruning is hard to undo, so an overshoot only slowly relaxes the
        # penalty (no wind-down to nothing while the schedule catches up).
        rate = ops.where(error > 0, self.gain / ramp, self.gain / ramp * self.relax)
        updating = ops.logical_and(target > 0, ops.isfinite(error))
        moved = ops.clip(
            log_penalty + rate * error * float(self.update_every),
            math.log(self.min_penalty),
            math.log(self.max_penalty),
        )
        log_penalty = ops.where(updating, moved, log_penalty)
        # No force at all while at or past the target: the task loss may then
        # lower thresholds again. With Adam, thresholds move at about the
        # learning rate whatever the penalty's size, so a small leftover
        # penalty would still prune.
        pushing = ops.logical_and(target > 0, error > 0)
        strength = ops.where(pushing, ops.exp(log_penalty), 0.0)
        # A mask at its floor gets no penalty.
        above_floor = ops.cast(densities > self.min_density, "float32")
        penalties = strength * self._penalty_shares(group) * above_floor
        return log_penalty, tuple(penalties[i] for i in range(len(group)))

    def _penalty_shares(self, group):
        """Each member's share of the penalty's strength, a tensor.

        Global scope: in proportion to the mask's size, so that every weight of
        the model is priced alike (`sparsity_penalty * mean(mask)` then sums to
        `strength * sum(mask) / total`); per layer, each mask's whole strength.
        """
        if self.scope != "global":
            return ops.ones((len(group),), "float32")
        sizes = np.array([m.size for m in group], dtype="float64")
        return ops.convert_to_tensor((sizes / sizes.sum()).astype("float32"))

    # --------------------------------------------------------------- freeze

    def _freeze(self, target):
        """Fix every mask at exactly the target sparsity, then `hard_prune()`, on the device.

        The feedback leaves the sparsity within a few tenths of a point of the
        target; the rest of the gap is closed by ranking on the learned margin
        `(|w| - threshold) / weight_scale`: the weights nearest to being
        pruned go first (or come back first after an overshoot). Within an
        output unit this ranking is the magnitude order, so the result is
        still one threshold per unit (structured) or per weight. What is
        ranked follows each mask's granularity: with `"neuron"`, whole units
        on `(rms(w) - threshold) / weight_scale` (the target is then met to
        the nearest unit); with `"n:m"`, only the weights of the N:M pattern
        (the others stay pruned, so a mask never keeps more than n of m).
        Each mask first keeps its floor (`min_density`) of best margins.
        """
        self._check_finite_weights()
        kept_before = 1.0 - self.statistics()["sparsity"]
        self._program("freeze", self._fix_at_budgets)(self._budgets(target), float(self.step))
        for mask in self._masks:
            mask.mark_hard_pruned()
            mask.frozen = True
            mask.driver = None
        self.frozen = True
        self._retrace()
        self._warn_if_one_shot(kept_before)

    def _warn_if_one_shot(self, kept_before):
        """Warn when the freeze cut much of what the learned masks kept (see `_ONE_SHOT_CUT`)."""
        kept_after = 1.0 - self.statistics()["sparsity"]
        if kept_before <= _ONE_SHOT_CUT * kept_after:
            return
        strength = math.exp(float(to_numpy(self._masks[0].sparsity_state)[_LOG_PENALTY]))
        per_weight = [
            name
            for name, mask in zip(self._names, self._masks)
            if not mask.options.structured and mask.options.granularity == "weight"
        ]
        advice = (
            f" Thresholds per weight (structured=False: {', '.join(per_weight[:3])}"
            f"{', ...' if len(per_weight) > 3 else ''}) stop learning once their mask is "
            "sharp: a lower relative temperature (the scheduler's `temperature`) keeps them "
            "learning."
            if per_weight
            else ""
        )
        begin, end = self._steps.begin_step, self._steps.end_step
        if end > begin:
            ramp = end - begin
            followed = f"over its ramp of {ramp} steps"
            remedy = (
                "give the ramp more steps (the schedule's end_step, end_epoch or "
                "end_fraction, or more epochs)"
            )
        else:
            ramp = self.step - begin
            followed = f"in the {ramp} steps they were driven towards its constant target"
            remedy = "train for more epochs, or ramp the target with PolynomialDecay"
        short = (
            f", shorter than the {self._ramp_steps()} steps over which the feedback moves the "
            "penalty"
            if ramp < self._ramp_steps()
            else ""
        )
        warnings.warn(
            f"SparsityScheduler: when the schedule ended (step {self.step}) the learned masks "
            f"kept {kept_before:.2%} of the weights, and the freeze cut them to "
            f"{kept_after:.2%} in one step, ranking the weights by margin as one-shot pruning "
            f"would; accuracy may suffer. The masks did not follow the schedule {followed}"
            f"{short} (penalty strength {strength:.3g}, max_penalty={self.max_penalty:g}): "
            f"{remedy}, or aim lower." + advice,
            stacklevel=2,
        )

    def _budgets(self, target):
        """For each group, the weights the freeze keeps: `round((1 - target) * size)`."""
        budgets = [int(round((1.0 - target) * sum(m.size for m in g))) for g in self._groups()]
        return np.array(budgets, "int32")

    def _fix_at_budgets(self, budgets, step):
        """The freeze's work on the variables, given each group's budget (in one program)."""
        for group, budget in zip(self._groups(), ops.unstack(ops.convert_to_tensor(budgets))):
            candidates = [_candidates(mask) for mask in group]
            chosen, held_by_floor = [], 0
            for mask, (margins, unit, _) in zip(group, candidates):
                floor_units = math.ceil(math.ceil(self.min_density * mask.size) / unit)
                chosen.append(_rank(margins) < floor_units)
                held_by_floor += min(floor_units, int(margins.shape[0])) * unit
            rest = budget - held_by_floor
            pool = ops.concatenate(
                [ops.where(c, -np.inf, m) for c, (m, _, _) in zip(chosen, candidates)]
            )
            units = np.concatenate(
                [np.full(int(c.shape[0]), unit) for c, (_, unit, _) in zip(chosen, candidates)]
            ).astype("int32")
            order = ops.argsort(-pool)
            held = ops.cumsum(ops.take(ops.convert_to_tensor(units), order))
            held = ops.concatenate([ops.zeros((1,), "int32"), held])
            # As many of the best as hold closest to the budget (fewer on a tie);
            # none beyond the floor when the floor already holds the budget.
            count = ops.where(rest > 0, ops.argmin(ops.abs(held - rest)), 0)
            picked = _rank(pool) < count
            offsets = np.cumsum([0] + [int(c.shape[0]) for c in chosen])
            chosen = [
                ops.logical_or(c, picked[a:b]) for c, a, b in zip(chosen, offsets[:-1], offsets[1:])
            ]
            for mask, c, (margins, _, to_kernel) in zip(group, chosen, candidates):
                keep = to_kernel(ops.logical_and(c, ops.isfinite(margins)))
                if mask.options.granularity != "neuron":
                    # The surviving weights keep the values training used (the kernel
                    # times its soft mask), so the freeze changes the model only by the
                    # weights it removes. Whole units (neurons, filters, heads) keep
                    # their raw weights: scaling each by its unit's soft mask cost
                    # accuracy. The pruning guide measures both.
                    mask.kernel.assign(mask.trained_kernel(mask.kernel_value()))
                mask.prune_mask.assign(ops.logical_and(mask.prune_mask, keep))
                mask.threshold.assign(ops.zeros(mask.threshold.shape))
                mask.assign_hard_pruned()
        for mask in self._masks:
            mask.sparsity_penalty.assign(0.0)
            state = mask.sparsity_state
            steps = ops.full((1,), step)
            state.assign(ops.concatenate([steps, state[_LOG_PENALTY:_FROZEN], ops.ones((1,))]))

    # ------------------------------------------------------------- reports

    def statistics(self):
        """The scalars the scheduler logs at each epoch's end, measured now on the device."""
        masks = self._masks
        active, penalty_terms, threshold_means, relative_temperature = self._measure(
            "statistics",
            lambda: (
                ops.stack([mask.count_active() for mask in masks]),
                ops.stack([_penalty_term(mask) for mask in masks]),
                ops.stack([ops.mean(mask.threshold) for mask in masks]),
                masks[0]._temperature * masks[0].state("weight_scale"),
            ),
        )
        active = [int(count) for count in active]
        stats = {
            "sparsity": 1.0 - sum(active) / sum(mask.size for mask in masks),
            "target_sparsity": float(self._steps(self.step)),
            "relative_temperature": float(relative_temperature),
            "sparsity_loss": sum(float(term) for term in penalty_terms),
        }
        for name, mask, count, mean in zip(self._names, masks, active, threshold_means):
            stats[f"density/{name}"] = count / mask.size
            stats[f"threshold_mean/{name}"] = float(mean)
        return stats

    def _check_finite(self, logs):
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._check_finite_weights(f"the loss is {float(loss)}")
            raise FloatingPointError(
                f"SparsityScheduler: the training loss is {float(loss)} at step {self.step}; "
                "no mask was frozen from it. Lower the learning rate, or check the data "
                "for NaN or inf."
            )
        self._check_finite_weights()

    def _check_finite_weights(self, why=None):
        counts = self._measure(
            "finite",
            lambda: ops.stack(
                [
                    ops.sum(ops.cast(ops.logical_not(ops.isfinite(m.kernel)), "int32"))
                    for m in self._masks
                ]
            ),
        )
        for name, bad in zip(self._names, counts):
            if bad:
                raise FloatingPointError(
                    f"SparsityScheduler: {int(bad)} weights of '{name}' are NaN or infinite at "
                    f"step {self.step}" + (f" ({why})" if why else "") + "; no mask was "
                    "frozen from them. Lower the learning rate, or check the data for NaN or "
                    "inf."
                )

    def _warn_unfinished(self):
        end = self._steps.end_step
        if self.step >= end:
            return
        stats = self.statistics()
        warnings.warn(
            f"SparsityScheduler: training stopped at step {self.step}, before the schedule's "
            f"end (step {end}, {self.schedule!r}): sparsity reached {stats['sparsity']:.4f} of "
            f"{self._steps.final_sparsity:.4f}"
            + (", and the masks are not frozen" if self.freeze_at_end else "")
            + ". Train for more epochs, or end the schedule earlier "
            "(end_step, end_epoch, or end_fraction=0.9 of the run).",
            stacklevel=2,
        )


def _steps_run_as_python(model):
    """Whether each train step runs as Python (eager), not as one compiled program."""
    if model.steps_per_execution > 1:
        return False  # several steps per call: the host sees their first only
    if model.run_eagerly:
        return True
    return keras.backend.backend() == "torch" and not model.jit_compile


def _penalty_term(mask):
    """The penalty this mask adds to the loss, `sparsity_penalty * mean(soft mask)`, now."""
    return mask.sparsity_penalty * ops.mean(mask.soft(mask.kernel_value()))


def _alive_std(mask):
    """Standard deviation of the weights that are not pruned (0 if there are none)."""
    kernel = mask.kernel_value()
    alive = ops.cast(mask.prune_mask, "float32")
    count = ops.maximum(ops.sum(alive), 1.0)
    mean = ops.sum(kernel * alive) / count
    return ops.sqrt(ops.sum(ops.square((kernel - mean) * alive)) / count)


def _rank(values):
    """Each entry's rank in descending order (0 for the largest), as an int tensor."""
    return ops.argsort(ops.argsort(-values))


def _candidates(mask):
    """`(margins, unit, to_kernel)`: what `_freeze` ranks in `mask`, on the device.

    `margins` is flat, `-inf` for what is already pruned (or outside the N:M
    pattern); each candidate stands for `unit` weights; `to_kernel` turns a
    boolean choice over the candidates into a kernel-shaped keep set.
    """
    from keras_sparse.granularity import n_m_keep, neuron_scores

    kernel = mask.kernel_value()
    threshold = mask._broadcast(ops.convert_to_tensor(mask.threshold))
    scale = mask.state("weight_scale")
    alive = ops.convert_to_tensor(mask.prune_mask)
    alive_float = ops.cast(alive, "float32")
    if mask.options.granularity == "neuron":
        scores = neuron_scores(kernel, alive_float, mask.reduce_axes)
        units_alive = ops.any(alive, axis=mask.reduce_axes, keepdims=True)
        margins = ops.where(units_alive, (scores - threshold) / scale, -np.inf)
        unit = mask.size // math.prod(mask.unit_shape)

        def to_kernel(chosen):
            return ops.broadcast_to(ops.reshape(chosen, mask.broadcast_shape), mask.shape)

        return ops.reshape(margins, (-1,)), unit, to_kernel
    magnitude = ops.abs(kernel)
    if mask.options.granularity == "n:m":
        pattern = n_m_keep(magnitude * alive_float, *mask.options.n_m, mask.n_m_axis)
        alive = ops.logical_and(alive, pattern)
    margins = ops.where(alive, (magnitude - threshold) / scale, -np.inf)
    return ops.reshape(margins, (-1,)), 1, lambda chosen: ops.reshape(chosen, mask.shape)

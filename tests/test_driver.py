"""The sparsity driver in the paths users take: on the device, resumed, in epochs, on bad data."""

import os
import traceback
import warnings

import keras
import numpy as np
import pytest
from backend_utils import to_numpy
from conftest import BACKEND

import keras_sparse as ks

STEPS_PER_EPOCH = 8  # 128 samples, batch 16


def data(seed=0, n=128):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = (x[:, :3].sum(axis=1) > 0).astype("int32")
    return x, y


def model():
    return keras.Sequential(
        [
            keras.Input((12,)),
            ks.SparseLinear(16, activation="relu", name="hidden"),
            ks.SparseLinear(8, activation="relu", structured=False, name="hidden_2"),
            ks.SparseLinear(2, name="logits"),
        ],
        name="mlp",
    )


def compiled(m):
    m.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return m


def total_active(m):
    return sum(mask.num_active() for mask in ks.kernel_masks(m))


def total_size(m):
    return sum(mask.size for mask in ks.kernel_masks(m))


def stripped_kept_and_size(m):
    """Nonzero and all values of the stripped model's kernels, counted in NumPy."""
    kernels = [to_numpy(layer.kernel) for layer in ks.strip(m).layers]
    return sum(np.count_nonzero(k) for k in kernels), sum(k.size for k in kernels)


def fit(m, callbacks, epochs, initial_epoch=0, **kwargs):
    """`m.fit` on `data()` in batches of 16, in order; `callbacks` a scheduler or a list."""
    x, y = data()
    return m.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=callbacks if isinstance(callbacks, list) else [callbacks],
        **kwargs,
    )


# ------------------------------------------------------ on the device only


class _StepWindow(keras.callbacks.Callback):
    """Opens a window around each train step (and the other callbacks' batch hooks)."""

    def __init__(self, enter, leave):
        super().__init__()
        self.enter, self.leave = enter, leave

    def on_train_batch_begin(self, batch, logs=None):
        if self.enter:
            self.enter()

    def on_train_batch_end(self, batch, logs=None):
        if self.leave:
            self.leave()


@pytest.mark.skipif(BACKEND != "jax", reason="jax.transfer_guard is JAX's")
def test_jax_steps_move_nothing_from_the_device_to_the_host():
    import jax

    guard = jax.transfer_guard_device_to_host("disallow")
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=2 * STEPS_PER_EPOCH))
    x, y = data()
    # Every batch hook of the scheduler and every train step run under the guard,
    # the freeze included; the scheduler reads scalars at epoch ends only.
    window = [
        _StepWindow(guard.__enter__, None),
        scheduler,
        _StepWindow(None, lambda: guard.__exit__(None, None, None)),
    ]
    m.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=window)
    assert scheduler.frozen
    assert total_active(m) == round(0.3 * total_size(m))


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's trainer keeps the variables in its state")
def test_jax_steps_leave_the_train_state_on_the_device():
    # A callback that reads `self.model` in a batch hook makes JAX's trainer copy
    # its whole state back into the variables at every step.
    m = compiled(model())
    syncs, inside = [], {"on": False}
    original = m.jax_state_sync
    m.jax_state_sync = lambda: (inside["on"] and syncs.append(1), original())[1]
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=10 * STEPS_PER_EPOCH))
    window = [
        _StepWindow(lambda: inside.update(on=True), None),
        scheduler,
        _StepWindow(None, lambda: inside.update(on=False)),
    ]
    x, y = data()
    m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=window)
    assert syncs == [], f"{len(syncs)} state syncs in {2 * STEPS_PER_EPOCH} steps"


@pytest.mark.skipif(BACKEND != "torch", reason="counts PyTorch's host reads")
def test_torch_steps_read_nothing_back_to_the_host(monkeypatch):
    import torch

    reads = []
    counting = {"on": False}
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            # Reads made by keras-sparse's own code (Keras's trainer may read its logs).
            if counting["on"] and any(
                f"{os.sep}keras_sparse{os.sep}" in frame.filename
                for frame in traceback.extract_stack()[:-1]
            ):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=10 * STEPS_PER_EPOCH))
    x, y = data()
    window = [
        _StepWindow(lambda: counting.update(on=True), None),
        scheduler,
        _StepWindow(None, lambda: counting.update(on=False)),
    ]
    m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=window)
    assert reads == [], f"host reads during steps: {sorted(set(reads))}"
    assert m.layers[0].masks["kernel"].state("step") == 2 * STEPS_PER_EPOCH


def test_the_scheduler_keeps_keras_asynchronous_dispatch():
    # Keras dispatches steps ahead of their logs unless a callback has a
    # batch-end hook (it then waits for each step's logs).
    scheduler = ks.SparsityScheduler(0.5)
    assert type(scheduler).on_train_batch_end is keras.callbacks.Callback.on_train_batch_end
    alone = keras.callbacks.CallbackList([], model=compiled(model()))
    driven = keras.callbacks.CallbackList([scheduler], model=compiled(model()))
    assert driven._async_train == alone._async_train


class _EveryStep(keras.callbacks.Callback):
    """Records the first mask's temperature and the model's penalties after each step."""

    def __init__(self):
        super().__init__()
        self.temperatures, self.penalties = [], []

    def on_train_batch_end(self, batch, logs=None):
        masks = ks.kernel_masks(self.model)
        self.temperatures.append(masks[0].temperature)
        self.penalties.append([float(to_numpy(m.sparsity_penalty)) for m in masks])


def _driven_run(run_eagerly, every=3, epochs=2):
    keras.utils.set_random_seed(7)
    m = model()
    m.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
    )
    # A rising temperature: it shows which steps updated.
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.8, begin_step=0, end_step=100),
        temperature=ks.ExponentialTemperature(5.0, 200.0, begin_step=0, end_step=100),
        update_every=every,
    )
    recorder = _EveryStep()
    x, y = data()
    m.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[scheduler, recorder],
    )
    return m, scheduler, recorder


@pytest.mark.slow
def test_update_every_updates_on_due_steps_only_and_eager_and_compiled_steps_drive_alike():
    # Eager steps decide on the host which steps update; compiled ones in the graph.
    every, epochs = 3, 2
    steps = epochs * STEPS_PER_EPOCH
    runs = {eager: _driven_run(eager, every, epochs) for eager in (False, True)}
    for m, scheduler, recorder in runs.values():
        # The temperature rises on due steps (0, 3, 6, ...) and holds in between.
        temperatures = np.array(recorder.temperatures)
        changed = np.flatnonzero(np.diff(temperatures) != 0) + 1
        np.testing.assert_array_equal(changed, np.arange(every, steps, every))
        penalties = np.array(recorder.penalties)
        moved = np.flatnonzero(np.any(np.diff(penalties, axis=0) != 0, axis=1)) + 1
        assert set(moved) <= set(range(every, steps, every)), moved
        assert len(moved) > 0
        # The masks count every step, driven or not.
        for mask in ks.kernel_masks(m):
            assert int(to_numpy(mask.state("step"))) == steps
        assert scheduler.step == steps
    (_, _, compiled_run), (_, _, eager_run) = runs[False], runs[True]
    np.testing.assert_allclose(eager_run.temperatures, compiled_run.temperatures, rtol=1e-6)
    np.testing.assert_allclose(eager_run.penalties, compiled_run.penalties, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------- resuming


def test_a_reloaded_model_resumes_the_schedule_and_ends_frozen_at_the_target(tmp_path):
    schedule = ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH)
    m = compiled(model())
    fit(m, ks.SparsityScheduler(schedule), epochs=2)
    assert int(to_numpy(m.layers[0].masks["kernel"].state("step"))) == 2 * STEPS_PER_EPOCH
    path = os.path.join(tmp_path, "midway.keras")
    m.save(path)
    reloaded = keras.saving.load_model(path)
    scheduler = ks.SparsityScheduler(schedule)
    fit(reloaded, scheduler, epochs=6, initial_epoch=2)
    assert scheduler.step == 6 * STEPS_PER_EPOCH
    assert scheduler.frozen
    assert total_active(reloaded) == round(0.2 * total_size(reloaded))


def test_two_fit_calls_continue_one_schedule():
    schedule = ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH)
    m = compiled(model())
    scheduler = ks.SparsityScheduler(schedule)
    fit(m, scheduler, epochs=2)
    assert not scheduler.frozen
    fit(m, ks.SparsityScheduler(schedule), epochs=3)  # a new callback, the same masks
    assert total_active(m) == round(0.2 * total_size(m))
    assert all(mask.frozen for mask in ks.kernel_masks(m))


def test_resume_false_starts_the_schedule_again():
    m = compiled(model())
    fit(m, ks.SparsityScheduler(ks.PolynomialDecay(0.5, end_step=STEPS_PER_EPOCH)), epochs=2)
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.8, end_step=STEPS_PER_EPOCH), resume=False
    )
    fit(m, scheduler, epochs=2)
    assert scheduler.step == 2 * STEPS_PER_EPOCH
    assert total_active(m) == round(0.2 * total_size(m))


def _resumed_schedule_targets(schedule_end, steps):
    """PolynomialDecay(0.8, end_step=schedule_end)'s target after each of `steps`, in NumPy."""
    progress = np.minimum(np.asarray(steps, "float64"), schedule_end) / schedule_end
    return 0.8 * (1.0 - (1.0 - progress) ** 3)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 3:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_backup_and_restore_after_the_scheduler_resumes_its_schedule(tmp_path, run_eagerly):
    # BackupAndRestore loads its backup in its on_train_begin, after the scheduler's when it
    # comes later in the list: eager steps then counted the schedule again from step 0 (a
    # new-user trial, PyTorch and run_eagerly=True).
    end = 5 * STEPS_PER_EPOCH
    schedule = ks.PolynomialDecay(0.8, end_step=end)
    backup = str(tmp_path / "backup")
    x, y = data()

    def run(m, *callbacks):
        m.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=run_eagerly,
        )
        callbacks = [ks.SparsityScheduler(schedule), keras.callbacks.BackupAndRestore(backup)]
        return m.fit(
            x,
            y,
            batch_size=16,
            epochs=6,
            shuffle=False,
            verbose=0,
            callbacks=callbacks + list(extra),
        )

    extra = [_Interrupt()]
    with pytest.raises(RuntimeError, match="interrupted"):
        run(model())
    extra = []
    resumed = model()
    history = run(resumed)
    assert len(history.history["loss"]) == 3  # epochs 4 to 6
    steps = STEPS_PER_EPOCH * np.arange(4, 7)
    np.testing.assert_allclose(
        history.history["target_sparsity"], _resumed_schedule_targets(end, steps), rtol=1e-5
    )
    assert all(mask.frozen for mask in ks.kernel_masks(resumed))
    for mask in ks.kernel_masks(resumed):  # frozen at the ramp's end, where masks stop counting
        assert int(to_numpy(mask.state("step"))) == end
    assert total_active(resumed) == round(0.2 * total_size(resumed))


# ---------------------------------------- weights put back from before the freeze


def numpy_kept(m):
    """The weights each mask's stored thresholds keep, `|kernel| >= threshold` where the
    prune mask keeps, counted in NumPy."""
    kept = 0
    for mask in ks.kernel_masks(m):
        kernel, threshold = to_numpy(mask.kernel), to_numpy(mask.threshold)
        keep = (np.abs(kernel) >= threshold) & (to_numpy(mask.prune_mask) > 0)
        kept += int(keep.sum())
    return kept


def assert_serves_the_restored_weights(m, scheduler):
    """The masks follow the restored (unfrozen) state; a second fit finishes the schedule."""
    assert all(int(to_numpy(mask.state("frozen"))) == 0 for mask in ks.kernel_masks(m))
    assert not any(mask.frozen for mask in ks.kernel_masks(m))
    assert not scheduler.frozen
    kept = numpy_kept(m)
    assert kept < total_size(m)  # the restored epoch had pruned some weights...
    assert kept > round(0.2 * total_size(m))  # ...fewer than the target
    assert ks.sparsity_report(m).total.active == kept
    x, _ = data()
    h = x  # the model's layers, served by NumPy from the restored weights
    for layer in m.layers:
        (mask,) = layer.masks.values()
        kernel, threshold = to_numpy(mask.kernel), to_numpy(mask.threshold)
        h = h @ np.where(np.abs(kernel) >= threshold, kernel, 0.0) + to_numpy(layer.bias)
        if layer.name != "logits":
            h = np.maximum(h, 0.0)
    np.testing.assert_allclose(m.predict(x, verbose=0), h, rtol=1e-4, atol=1e-5)
    fit(m, scheduler, epochs=6)
    assert scheduler.frozen
    assert total_active(m) == round(0.2 * total_size(m))


def test_early_stopping_that_restores_weights_from_before_the_freeze_is_said_and_followed():
    # EarlyStopping(restore_best_weights=True) after the scheduler put back dense weights
    # from before the freeze: the masks, still marked frozen, served every weight while
    # the scheduler said frozen at the target, silently (a new-user trial).
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH))
    # The penalty is zero once frozen, so its largest value is an epoch before the freeze.
    stopping = keras.callbacks.EarlyStopping(
        monitor="sparsity_loss", mode="max", patience=99, restore_best_weights=True
    )
    with pytest.warns(UserWarning, match=r"were frozen, but .* from before the freeze"):
        fit(m, [scheduler, stopping], epochs=6)
    assert stopping.best_epoch < 4
    assert_serves_the_restored_weights(m, scheduler)


def test_early_stopping_from_the_freezes_epoch_restores_a_pruned_model_without_warning():
    # The docs' advice: start_from_epoch = the epoch in which the freeze happens. The
    # epoch restored (the largest loss after the freeze: its first) is not the last, so its
    # kernels hold what the optimizer moved at pruned weights before the end of fit.
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_fraction=0.5))
    epochs = 8
    stopping = keras.callbacks.EarlyStopping(
        monitor="loss",
        mode="max",
        patience=99,
        restore_best_weights=True,
        start_from_epoch=int(0.5 * epochs),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(m, [scheduler, stopping], epochs=epochs)
    assert not [w for w in caught if "before the freeze" in str(w.message)]
    assert stopping.best_epoch < epochs - 1
    assert all(mask.frozen for mask in ks.kernel_masks(m))
    assert total_active(m) == round(0.2 * total_size(m)) == numpy_kept(m)
    for mask in ks.kernel_masks(m):  # zero where pruned, as strip and size_report read them
        pruned = to_numpy(mask.prune_mask) == 0
        assert not to_numpy(mask.kernel)[pruned].any()


class _PutBack(keras.callbacks.Callback):
    """Puts back, when training ends, the weights of the end of epoch `kept` (from 0);
    stops training at the end of epoch `stop`, if given."""

    def __init__(self, kept, stop=None):
        super().__init__()
        self.kept, self.stop = kept, stop

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.kept:
            self.weights = self.model.get_weights()
        if epoch == self.stop:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.model.set_weights(self.weights)


def test_weights_of_an_earlier_step_put_back_after_an_unfinished_schedule_are_said():
    # The scheduler's end-of-fit warning gave the step and sparsity where training stopped,
    # which the model no longer held.
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=8 * STEPS_PER_EPOCH))
    with pytest.warns(UserWarning, match=rf"weights from step {2 * STEPS_PER_EPOCH} of"):
        fit(m, [scheduler, _PutBack(kept=1, stop=3)], epochs=8)
    assert scheduler.step == 2 * STEPS_PER_EPOCH


def test_several_schedulers_in_one_fit_log_their_figures_apart():
    # Each wrote `sparsity`, `target_sparsity`, ... into the same keys: the last one's stayed.
    m = compiled(model())
    first = ks.SparsityScheduler(
        ks.PolynomialDecay(0.9, end_step=4 * STEPS_PER_EPOCH), layers=m.layers[:2]
    )
    second = ks.SparsityScheduler(
        ks.PolynomialDecay(0.5, end_step=4 * STEPS_PER_EPOCH), layers=m.layers[2:]
    )
    history = fit(m, [first, second], epochs=5)
    logs = history.history
    assert "sparsity" not in logs and "target_sparsity" not in logs
    assert logs["target_sparsity/0"][-1] == pytest.approx(0.9)
    assert logs["target_sparsity/1"][-1] == pytest.approx(0.5)
    masks = ks.kernel_masks(m)
    for number, group in enumerate([masks[:2], masks[2:]]):
        kept = sum(mask.num_active() for mask in group)
        size = sum(mask.size for mask in group)
        assert logs[f"sparsity/{number}"][-1] == pytest.approx(1 - kept / size)
    # Alone in a later fit, a scheduler logs its figures under their plain names again.
    assert "sparsity" in fit(m, first, epochs=6, initial_epoch=5).history


def test_two_schedulers_driving_one_mask_are_refused():
    m = compiled(model())
    schedule = ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH)
    first = ks.SparsityScheduler(schedule, layers=m.layers[:2])
    second = ks.SparsityScheduler(schedule, layers=m.layers[1:])
    with pytest.raises(ValueError, match=r"mask of 'hidden_2' is driven by another"):
        fit(m, [first, second], epochs=1)
    # A later fit, with the scheduler of its own, is not refused.
    fit(m, ks.SparsityScheduler(schedule), epochs=1)


def test_weights_put_back_by_a_callback_before_the_scheduler_are_said_and_followed():
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH))
    with pytest.warns(UserWarning, match=r"were frozen, but .* from before the freeze"):
        fit(m, [_PutBack(kept=3), scheduler], epochs=6)  # 3: the last epoch before the freeze
    assert_serves_the_restored_weights(m, scheduler)


def test_weights_put_back_after_two_schedulers_are_said_and_both_follow():
    m = compiled(model())
    schedule = ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH)
    first = ks.SparsityScheduler(schedule, layers=[m.layers[0]])
    second = ks.SparsityScheduler(schedule, layers=m.layers[1:])
    stopping = keras.callbacks.EarlyStopping(
        monitor="sparsity_loss/0", mode="max", patience=99, restore_best_weights=True
    )
    with pytest.warns(UserWarning, match=r"start_from_epoch=4`, the epoch of the freeze"):
        fit(m, [first, second, stopping], epochs=6)
    assert not first.frozen and not second.frozen
    assert not any(mask.frozen for mask in ks.kernel_masks(m))
    assert ks.sparsity_report(m).total.active == numpy_kept(m)


def test_a_ramp_ending_with_the_fit_names_its_last_epoch_for_early_stopping():
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_fraction=1.0))
    with pytest.warns(UserWarning, match=r"start_from_epoch=5`, the epoch of the freeze"):
        fit(m, [_PutBack(kept=3), scheduler], epochs=6)  # an epoch before the freeze


def test_saving_weights_put_back_from_before_the_freeze_says_so_and_saves_them(tmp_path):
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH))
    fit(m, scheduler, epochs=2)
    early = m.get_weights()
    fit(m, scheduler, epochs=6, initial_epoch=2)
    m.set_weights(early)
    expected = numpy_kept(m)
    path = str(tmp_path / "early.keras")
    with pytest.warns(UserWarning, match=r"Layer 'hidden': its masks were frozen"):
        m.save(path)
    reloaded = keras.saving.load_model(path)
    assert not any(mask.frozen for mask in ks.kernel_masks(reloaded))
    assert total_active(reloaded) == expected < total_size(m)


def test_strip_after_set_weights_from_before_the_freeze_says_so_and_strips_those_weights():
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH))
    fit(m, scheduler, epochs=2)
    early = m.get_weights()
    fit(m, scheduler, epochs=6, initial_epoch=2)
    assert scheduler.frozen
    m.set_weights(early)
    expected = numpy_kept(m)
    with pytest.warns(UserWarning, match=r"strip\(\): the masks of 3 layer\(s\)"):
        stripped = ks.strip(m)
    kernels = [to_numpy(layer.kernel) for layer in stripped.layers]
    assert sum(np.count_nonzero(k) for k in kernels) == expected
    assert expected < total_size(m)


# ---------------------------------------------------- epochs and fractions


@pytest.mark.parametrize(
    "schedule, freeze_step",
    [
        (ks.PolynomialDecay(0.6, end_epoch=2), 2 * STEPS_PER_EPOCH),
        (ks.PolynomialDecay(0.6, end_fraction=0.5), 2 * STEPS_PER_EPOCH),
        (ks.PolynomialDecay(0.6, begin_epoch=0.5, end_epoch=1.5), int(1.5 * STEPS_PER_EPOCH)),
    ],
    ids=["epochs", "fraction", "fractional_epochs"],
)
def test_schedules_in_epochs_or_fractions_become_steps_of_this_fit(schedule, freeze_step):
    m = compiled(model())
    scheduler = ks.SparsityScheduler(schedule)
    fit(m, scheduler, epochs=4)
    assert scheduler._steps.end_step == freeze_step
    assert scheduler.frozen
    assert total_active(m) == round(0.4 * total_size(m))


@pytest.mark.parametrize(
    "schedule",
    [
        ks.PolynomialDecay(0.6, end_fraction=1.0),
        ks.PolynomialDecay(0.6, end_epoch=3),
        ks.PolynomialDecay(0.6, end_step=3 * STEPS_PER_EPOCH),
    ],
    ids=["fraction", "epochs", "steps"],
)
def test_a_ramp_ending_at_the_last_step_freezes_at_the_target(schedule):
    # The freeze came at the start of the batch after the ramp's end, which a
    # ramp ending with the fit never begins: it stayed soft, far from its target.
    m = compiled(model())
    scheduler = ks.SparsityScheduler(schedule)
    history = fit(m, scheduler, epochs=3)
    assert scheduler.frozen
    kept, size = stripped_kept_and_size(m)
    assert kept == round(0.4 * size)
    assert history.history["sparsity"][-1] == pytest.approx(1 - kept / size)


def test_a_fit_stopped_by_another_callback_at_the_ramps_end_ends_frozen():
    class StopAfterTwoEpochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 1

    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.6, end_step=2 * STEPS_PER_EPOCH))
    x, y = data()
    m.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[scheduler, StopAfterTwoEpochs()])
    assert scheduler.step == 2 * STEPS_PER_EPOCH and scheduler.frozen
    kept, size = stripped_kept_and_size(m)
    assert kept == round(0.4 * size)


class CalledInAnotherOrder(keras.Model):
    """`first` is the first mask in layer order (the group's leader, which writes every
    member's penalty) but the second the forward pass calls."""

    def __init__(self):
        super().__init__()
        self.first = ks.SparseLinear(2, name="first")
        self.second = ks.SparseLinear(8, activation="relu", name="second")

    def call(self, x, training=None):
        return self.first(self.second(x, training=training), training=training)


def test_masks_called_out_of_their_layer_order_are_driven():
    # In eager PyTorch the leader wrote the penalty of `second`, which the forward pass
    # had already used, in place: the backward refused it ("modified by an inplace
    # operation"), as keras-hub's CLIP did on the first step.
    m = compiled(CalledInAnotherOrder())
    m(data()[0][:2])
    assert [mask.layer.name for mask in ks.kernel_masks(m)] == ["first", "second"]
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.6, end_step=2 * STEPS_PER_EPOCH))
    fit(m, scheduler, epochs=3)
    assert scheduler.frozen
    assert total_active(m) == round(0.4 * total_size(m))


def test_a_schedule_in_epochs_outside_fit_says_what_it_needs():
    with pytest.raises(ValueError, match="in epochs"):
        ks.PolynomialDecay(0.5, end_epoch=3)(10)


def test_bounds_in_two_units_are_refused():
    with pytest.raises(ValueError, match="one unit.*end_step=10, end_epoch=2"):
        ks.PolynomialDecay(0.5, end_step=10, end_epoch=2)


def test_an_unfinished_schedule_warns_with_what_was_reached_and_what_to_change():
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=100 * STEPS_PER_EPOCH))
    with pytest.warns(
        UserWarning, match=r"stopped at step 16, before the schedule's end"
    ) as caught:
        fit(m, scheduler, epochs=2)
    message = next(str(w.message) for w in caught if "SparsityScheduler" in str(w.message))
    assert "not frozen" in message and "end_fraction" in message
    reached = float(message.split("sparsity reached ")[1].split(" ")[0])
    assert reached == pytest.approx(1 - total_active(m) / total_size(m), abs=1e-4)


# ------------------------------------------------------------- bad values


def test_non_finite_inputs_stop_training_before_any_mask_is_frozen():
    m = compiled(model())
    x, y = data()
    x[5, 3] = np.nan
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=3 * STEPS_PER_EPOCH))
    with pytest.raises(FloatingPointError, match=r"loss is nan.*no mask was frozen"):
        m.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[scheduler])
    assert not scheduler.frozen
    assert not any(mask.frozen for mask in ks.kernel_masks(m))


def test_non_finite_weights_are_named_with_their_layer():
    m = compiled(model())
    kernel = m.layers[0].kernel
    kernel.assign(np.where(np.eye(*kernel.shape) > 0, np.inf, to_numpy(kernel)).astype("float32"))
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=2))
    with pytest.raises(FloatingPointError, match=r"weights of 'hidden' are NaN or infinite"):
        fit(m, scheduler, epochs=1)
    assert not scheduler.frozen


# ------------------------------------------------------------------ logs


def test_epoch_logs_hold_measured_statistics_and_the_penalty_on_its_own():
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=4 * STEPS_PER_EPOCH))
    history = fit(m, scheduler, epochs=2)
    logs = history.history
    assert logs["sparsity"][-1] == pytest.approx(1 - total_active(m) / total_size(m))
    for layer in m.layers:
        assert logs[f"density/{layer.name}"][-1] == pytest.approx(layer.density())
    # The penalty's share of `loss`, measured at the epoch's end: positive while pruning.
    penalty = sum(
        float(to_numpy(mask.sparsity_penalty)) * float(np.mean(to_numpy(mask.soft(mask.kernel))))
        for mask in ks.kernel_masks(m)
    )
    assert logs["sparsity_loss"][-1] == pytest.approx(penalty, rel=1e-4)
    assert logs["sparsity_loss"][-1] > 0


def test_a_scheduled_fit_through_the_freeze_raises_no_warning():
    # A warning a user sees must mean something: the driver's own statistics once set
    # off Keras's PyTorch `count_nonzero` (a transposed 0-d tensor) at every fit, and
    # its reads of variables NumPy 2's `copy` deprecation on JAX and TensorFlow at every
    # fit (found by a new-user trial; the test run hides DeprecationWarnings, so this
    # records them all). Keras's own fit on PyTorch sets that deprecation off itself
    # (its `convert_to_numpy` of a torch tensor), so there only UserWarnings are checked.
    # The ramp is long enough for the masks to follow it (a shorter one warns that the
    # freeze pruned in one shot: the penalty moves the thresholds only, by at most about
    # Adam's step each).
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=12 * STEPS_PER_EPOCH))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(m, scheduler, epochs=13)
        ks.sparsity_report(m)
    assert scheduler.frozen
    checked = (UserWarning,) if BACKEND == "torch" else (UserWarning, DeprecationWarning)
    shown = [w for w in caught if issubclass(w.category, checked)]
    assert not shown, [f"{w.filename}:{w.lineno}: {w.message}" for w in shown]


def test_thresholds_stay_at_zero_after_the_freeze_whatever_the_optimizer_gathered():
    # The freeze zeroes the thresholds, and a frozen mask gives them a zero gradient;
    # Adam's moments from before the freeze would still move them, and the logs
    # (`threshold_mean/...`) would show thresholds that no longer mean anything.
    # The freeze comes at the start of the fifth epoch: the logs of the fifth and sixth
    # are taken during fine-tuning (the end of `fit` zeroes the thresholds again).
    m = compiled(model())
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.7, end_step=4 * STEPS_PER_EPOCH))
    history = fit(m, scheduler, epochs=6)
    assert scheduler.frozen
    for layer in ks.sparse_layers(m):
        means = history.history[f"threshold_mean/{layer.name}"]
        assert means[3] > 0.0, layer.name  # before the freeze
        assert means[4:] == [0.0, 0.0], layer.name


def test_a_layer_called_twice_per_step_is_driven_and_penalised_once():
    # A shared layer (tied embeddings, a layer applied twice) runs its mask twice in one
    # forward pass. A second update counted the step twice (the schedule ran ahead on
    # that mask), and in eager PyTorch it wrote the penalty that the first call's
    # backward still needed, which crashed the backward pass.
    inputs = keras.Input((12,))
    shared = ks.SparseLinear(12, activation="relu", name="shared")
    hidden = shared(shared(inputs))
    m = compiled(keras.Model(inputs, ks.SparseLinear(2, name="logits")(hidden)))
    penalties = []
    m(data()[0][:4], training=True)
    penalties.append(len(m.losses))
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.6, end_step=3 * STEPS_PER_EPOCH), update_every=1
    )
    fit(m, scheduler, epochs=2)
    # One penalty per mask, and every mask counted each step once.
    assert penalties == [2]
    for mask in ks.kernel_masks(m):
        assert int(to_numpy(mask.state("step"))) == 2 * STEPS_PER_EPOCH, mask
    fit(m, scheduler, epochs=4, initial_epoch=2)
    assert scheduler.frozen
    assert total_active(m) == round(0.4 * total_size(m))


class WithALayerItDoesNotCall(keras.Model):
    """A subclassed model holding a sparse layer (made first) that its `call` does not use."""

    def __init__(self):
        super().__init__(name="holder")
        self.unused = ks.SparseLinear(4, name="unused")
        self.hidden = ks.SparseLinear(16, activation="relu", name="hidden")
        self.logits = ks.SparseLinear(2, name="logits")

    def build(self, input_shape):
        self.unused.build(input_shape)
        self.hidden.build(input_shape)
        self.logits.build((None, 16))

    def call(self, x, training=None):
        return self.logits(self.hidden(x, training=training), training=training)


class WithoutTraining(WithALayerItDoesNotCall):
    """Its `call` takes no `training`: Keras then runs its layers in inference mode in fit."""

    def call(self, x):
        return self.logits(self.hidden(x))


def test_a_mask_the_training_step_does_not_call_is_left_out_and_said():
    # The first mask was not called: the driver read its step from it (0 for ever on a
    # compiled step: nothing was pruned) and left the global penalty to it; eager
    # PyTorch, which counts steps in Python, had the freeze cut it by magnitude.
    m = WithALayerItDoesNotCall()
    m.build((None, 12))
    compiled(m)
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.6, end_step=3 * STEPS_PER_EPOCH))
    with pytest.warns(UserWarning, match=r"does not call the masks of \['unused'\]"):
        fit(m, scheduler, epochs=4)
    assert scheduler.frozen
    trained = [m.hidden.masks["kernel"], m.logits.masks["kernel"]]
    kept = sum(int(to_numpy(mask.prune_mask).sum()) for mask in trained)
    assert kept == round(0.4 * sum(mask.size for mask in trained))
    assert to_numpy(m.unused.masks["kernel"].prune_mask).all()
    assert set(scheduler.statistics()) >= {"density/hidden", "density/logits"}
    assert "density/unused" not in scheduler.statistics()


def test_a_second_fit_beside_a_mask_never_called_resumes_frozen_without_warning():
    # The scheduler read its step and frozen state from the first mask, the one never
    # called, which keeps a fresh state: a second fit drove the frozen masks again from
    # step 0, and the masks' re-sync then warned of weights put back.
    m = WithALayerItDoesNotCall()
    m.build((None, 12))
    compiled(m)
    schedule = ks.PolynomialDecay(0.6, end_step=3 * STEPS_PER_EPOCH)
    with pytest.warns(UserWarning, match=r"does not call the masks of \['unused'\]"):
        fit(m, ks.SparsityScheduler(schedule), epochs=4)
    trained = [m.hidden.masks["kernel"], m.logits.masks["kernel"]]
    kept = [to_numpy(mask.prune_mask).copy() for mask in trained]
    again = ks.SparsityScheduler(schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(m, again, epochs=5, initial_epoch=4)
        ks.sparsity_report(m)
    assert not [w for w in caught if "before the freeze" in str(w.message)]
    assert again.frozen
    for mask, before in zip(trained, kept):
        assert mask.frozen
        np.testing.assert_array_equal(to_numpy(mask.prune_mask), before)


def test_a_subclassed_model_that_does_not_pass_training_on_is_refused_with_the_way_out():
    # Its layers run in inference mode in fit (no mask trains): nothing was pruned, and
    # the end-of-training warning blamed too few epochs.
    m = WithoutTraining()
    m.build((None, 12))
    compiled(m)
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.6, end_step=3 * STEPS_PER_EPOCH))
    with pytest.raises(ValueError, match=r"must take `training` and pass it to its layers"):
        fit(m, scheduler, epochs=1)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's tracer-leak check")
def test_a_mask_keeps_no_traced_value_after_the_step():
    # A mask remembers the forward pass that last called it (to drive once per pass):
    # a strong reference to JAX's stateless scope kept the values being traced alive.
    import jax

    m = compiled(model())
    with jax.checking_leaks():
        fit(m, ks.SparsityScheduler(ks.PolynomialDecay(0.5, end_step=100)), epochs=1)


@pytest.mark.skipif(BACKEND != "torch", reason="an eager PyTorch train step")
def test_a_custom_train_step_calling_the_model_twice_drives_each_mask_once_a_step():
    # Two forward passes in one step (two views of a batch): the second updated the
    # temperature and the penalty in place while the first's backward still needed them.
    class TwoViews(keras.Model):
        def train_step(self, data):
            x, y = data
            self.zero_grad()
            loss = self.compute_loss(x, y, self(x, training=True))
            loss = loss + self.compute_loss(x, y, self(0.9 * x, training=True))
            loss.backward()
            variables = self.trainable_weights
            self.optimizer.apply([v.value.grad for v in variables], variables)
            return {"loss": loss}

    plain = model()
    m = compiled(TwoViews(plain.inputs, plain.outputs))
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.6, end_step=24), update_every=1)
    fit(m, scheduler, epochs=4)
    assert scheduler.frozen
    assert total_active(m) == round(0.4 * total_size(m))


def test_numpy_scalars_are_numbers_and_strings_are_not_bools():
    ks.PolynomialDecay(np.float32(0.9), begin_step=np.int64(0), end_step=np.int64(100))
    ks.SparsityScheduler(np.float64(0.5), min_density=np.float32(0.02))
    with pytest.raises(TypeError, match=r"structured='no'"):
        ks.SparseLinear(4, structured="no")
    with pytest.raises(TypeError, match=r"freeze_at_end=1"):
        ks.SparsityScheduler(0.5, freeze_at_end=1)


def test_the_driver_leaves_a_model_without_it_untouched():
    m = compiled(model())
    fit(m, ks.SparsityScheduler(ks.PolynomialDecay(0.5, end_step=STEPS_PER_EPOCH)), epochs=1)
    assert all(mask.driver is None for mask in ks.kernel_masks(m))
    before = [to_numpy(mask.sparsity_state) for mask in ks.kernel_masks(m)]
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not finished" warning without a scheduler
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    after = [to_numpy(mask.sparsity_state) for mask in ks.kernel_masks(m)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_a_new_target_on_frozen_masks_warns_and_resume_false_reaches_it():
    # A finished schedule froze the masks at 50%; a second scheduler aiming at 80% would
    # log its target every epoch and prune nothing (a new-user trial): it says so.
    m = compiled(model())
    fit(m, ks.SparsityScheduler(ks.PolynomialDecay(0.5, end_step=4 * STEPS_PER_EPOCH)), epochs=5)
    higher = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH))
    with pytest.warns(UserWarning, match=r"frozen .* at sparsity 0\.5000, below .* 0\.8000"):
        fit(m, higher, epochs=1)
    assert higher.statistics()["sparsity"] == pytest.approx(0.5, abs=1e-3)
    again = ks.SparsityScheduler(
        ks.PolynomialDecay(0.8, end_step=4 * STEPS_PER_EPOCH), resume=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(m, again, epochs=5)
    assert not [w for w in caught if "are frozen" in str(w.message)]
    assert again.statistics()["sparsity"] == pytest.approx(0.8, abs=1e-3)

"""Schedules, the SparsityScheduler callback, and reaching a target on a small task."""

import csv

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

import keras_sparse as ks

# ------------------------------------------------------------------ schedules


def zhu_gupta(step, s_i, s_f, t0, t1):
    """The formula of Zhu & Gupta (2017), written out independently."""
    if step < t0:
        return s_i
    if step > t1:
        return s_f
    return s_f + (s_i - s_f) * (1 - (step - t0) / (t1 - t0)) ** 3


@pytest.mark.parametrize("step", [0, 10, 37, 55, 100, 110, 1000])
def test_polynomial_decay_follows_the_cubic_ramp(step):
    schedule = ks.PolynomialDecay(0.9, begin_step=10, end_step=110, initial_sparsity=0.2)
    assert schedule(step) == pytest.approx(zhu_gupta(step, 0.2, 0.9, 10, 110))


def test_polynomial_decay_values_by_hand():
    schedule = ks.PolynomialDecay(0.8, begin_step=0, end_step=100)
    assert schedule(0) == 0.0
    assert schedule(50) == pytest.approx(0.8 - 0.8 * 0.125)
    assert schedule(100) == pytest.approx(0.8)
    assert schedule.final_sparsity == pytest.approx(0.8)


def test_constant_sparsity_starts_at_begin_step():
    schedule = ks.ConstantSparsity(0.75, begin_step=20)
    assert [schedule(s) for s in (0, 19, 20, 500)] == [0.0, 0.0, 0.75, 0.75]


def test_exponential_temperature_is_geometric():
    temperature = ks.ExponentialTemperature(2.0, 200.0, begin_step=0, end_step=100)
    assert temperature(0) == pytest.approx(2.0)
    assert temperature(50) == pytest.approx(20.0)
    assert temperature(100) == pytest.approx(200.0)
    assert temperature(1000) == pytest.approx(200.0)


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, float("nan")])
def test_targets_outside_zero_one_are_refused(target):
    with pytest.raises(ValueError, match=r"target_sparsity="):
        ks.PolynomialDecay(target, 0, 10)
    with pytest.raises(ValueError, match=r"target_sparsity="):
        ks.ConstantSparsity(target)


@pytest.mark.parametrize("begin, end", [(10, 10), (20, 5)])
def test_begin_must_come_before_end(begin, end):
    with pytest.raises(ValueError, match=rf"begin_step={begin}, end_step={end}"):
        ks.PolynomialDecay(0.5, begin_step=begin, end_step=end)
    with pytest.raises(ValueError, match="begin_step"):
        ks.ExponentialTemperature(1.0, 2.0, begin_step=begin, end_step=end)


def test_scheduler_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r"schedule='fast'"):
        ks.SparsityScheduler("fast")
    with pytest.raises(ValueError, match=r"scope='model'"):
        ks.SparsityScheduler(0.5, scope="model")
    with pytest.raises(ValueError, match=r"min_density=1.0"):
        ks.SparsityScheduler(0.5, min_density=1.0)
    with pytest.raises(ValueError, match=r"update_every=0"):
        ks.SparsityScheduler(0.5, update_every=0)


def test_scheduler_refuses_a_model_without_sparse_layers():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="no sparse layer"):
        model.fit(
            np.ones((4, 4)), np.ones((4, 2)), callbacks=[ks.SparsityScheduler(0.5)], verbose=0
        )


# -------------------------------------------------------- driving a real fit


def teacher_task(n=512, features=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    teacher = rng.normal(size=(features, 1)) * (rng.random((features, 1)) < 0.3)
    y = (x @ teacher + 0.01 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def small_model(structured=True):
    return keras.Sequential(
        [
            keras.Input((20,)),
            ks.SparseLinear(32, activation="relu", structured=structured, name="hidden"),
            ks.SparseLinear(1, structured=structured, name="head"),
        ]
    )


def fit_with_scheduler(scheduler, epochs=12, callbacks=(), structured=True):
    x, y = teacher_task()
    model = small_model(structured)
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    history = model.fit(
        x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[scheduler, *callbacks]
    )
    return model, history, (x, y)


def achieved_sparsity(model):
    layers = ks.sparse_layers(model)
    active = sum(int(np.count_nonzero(to_numpy(layer.effective_weight()))) for layer in layers)
    total = sum(int(np.prod(layer.kernel.shape)) for layer in layers)
    return 1.0 - active / total


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_scheduler_reaches_the_target_sparsity(scope):
    # 16 steps per epoch; the ramp ends at step 120, then the mask is frozen.
    schedule = ks.PolynomialDecay(0.8, begin_step=0, end_step=120)
    model, history, (x, y) = fit_with_scheduler(ks.SparsityScheduler(schedule, scope=scope))
    # Exact up to rounding once the mask is frozen at the end of the ramp.
    assert achieved_sparsity(model) == pytest.approx(0.8, abs=0.005)
    if scope == "per_layer":
        for layer in ks.sparse_layers(model):
            assert layer.sparsity() == pytest.approx(0.8, abs=0.05)
    # The pruned model still explains most of the target's variance.
    assert history.history["loss"][-1] < 0.25 * float(np.var(y))


def test_scheduler_drives_per_weight_thresholds_too():
    schedule = ks.PolynomialDecay(0.8, begin_step=0, end_step=120)
    model, history, (x, y) = fit_with_scheduler(ks.SparsityScheduler(schedule), structured=False)
    assert achieved_sparsity(model) == pytest.approx(0.8, abs=0.005)
    # Reached by the learned thresholds before the freeze, not by the final snap alone.
    assert history.history["sparsity"][6] > 0.6
    assert history.history["loss"][-1] < 0.25 * float(np.var(y))


def test_frozen_model_evaluates_exactly_as_its_effective_weights():
    model, _, (x, _) = fit_with_scheduler(
        ks.SparsityScheduler(ks.PolynomialDecay(0.7, begin_step=0, end_step=100))
    )
    hidden, head = ks.sparse_layers(model)
    w1, b1 = to_numpy(hidden.effective_weight()), to_numpy(hidden.bias)
    w2, b2 = to_numpy(head.effective_weight()), to_numpy(head.bias)
    expected = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), expected, atol=1e-4)


def test_no_layer_falls_below_the_floor():
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.97, begin_step=0, end_step=120), min_density=0.1, scope="per_layer"
    )
    model, _, _ = fit_with_scheduler(scheduler)
    for layer in ks.sparse_layers(model):
        # One update of overshoot at most past the floor.
        assert layer.density() >= 0.1 - 0.05


def test_scheduler_writes_statistics_into_logs(tmp_path):
    path = tmp_path / "log.csv"
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.5, begin_step=0, end_step=40))
    model, history, _ = fit_with_scheduler(
        scheduler, epochs=3, callbacks=[keras.callbacks.CSVLogger(str(path))]
    )
    keys = {
        "sparsity",
        "target_sparsity",
        "relative_temperature",
        "density/hidden",
        "density/head",
        "threshold_mean/hidden",
        "threshold_mean/head",
    }
    assert keys <= set(history.history)
    hidden = ks.sparse_layers(model)[0]
    assert history.history["density/hidden"][-1] == pytest.approx(hidden.density())
    with open(path) as f:
        header = next(csv.reader(f))
    assert keys <= set(header)


def test_scheduler_anneals_the_temperature_relative_to_weight_scale():
    temperature = ks.ExponentialTemperature(4.0, 40.0, begin_step=0, end_step=32)
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.5, begin_step=0, end_step=32),
        temperature=temperature,
        freeze_at_end=False,
    )
    x, y = teacher_task()
    model = small_model()
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    hidden = ks.sparse_layers(model)[0]
    std = float(np.std(to_numpy(hidden.kernel)))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[scheduler])
    # The last update ran before step 15 (of 16): relative temperature t(15).
    assert hidden.temperature == pytest.approx(temperature(15) / std, rel=1e-4)

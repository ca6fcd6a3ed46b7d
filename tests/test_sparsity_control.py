"""Schedules, the SparsityScheduler callback, and reaching a target on a small task."""

import csv
import math

import keras
import numpy as np
import pytest
import reference
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


def nonzero_weights(layer):
    """The weights the layer's stored kernel still holds, counted in NumPy."""
    return int(np.count_nonzero(to_numpy(layer.kernel)))


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_scheduler_reaches_the_target_sparsity(scope):
    # 16 steps per epoch; the ramp ends at step 120, then the mask is frozen.
    schedule = ks.PolynomialDecay(0.8, begin_step=0, end_step=120)
    model, history, (x, y) = fit_with_scheduler(ks.SparsityScheduler(schedule, scope=scope))
    # The freeze keeps exactly round((1 - 0.8) * size) weights of each group: 134 of the
    # model's 672, or 128 of the hidden layer's 640 and 6 of the head's 32.
    hidden, head = ks.sparse_layers(model)
    if scope == "global":
        assert nonzero_weights(hidden) + nonzero_weights(head) == round(0.2 * 672) == 134
    else:
        assert (nonzero_weights(hidden), nonzero_weights(head)) == (128, 6)
    for layer in (hidden, head):
        assert layer.num_active() == nonzero_weights(layer)
    # The pruned model still explains most of the target's variance.
    assert history.history["loss"][-1] < 0.25 * float(np.var(y))


def test_scheduler_drives_per_weight_thresholds_too():
    schedule = ks.PolynomialDecay(0.8, begin_step=0, end_step=120)
    model, history, (x, y) = fit_with_scheduler(ks.SparsityScheduler(schedule), structured=False)
    assert sum(nonzero_weights(layer) for layer in ks.sparse_layers(model)) == 134
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
    # A target far below the floor, plain SGD (no momentum to carry a threshold on once
    # its penalty stops), per-weight thresholds and a bounded penalty, so that a step
    # prunes a few weights: each layer reaches its floor in the ramp's first half and
    # stays there until the freeze, while the penalty would take it further.
    x, y = teacher_task(n=128)
    model = small_model(structured=False)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.97, begin_step=0, end_step=64),
        min_density=0.3,
        scope="per_layer",
        max_penalty=100.0,
        update_every=1,  # the floor is met within a few steps of a short ramp
    )
    history = model.fit(x, y, batch_size=16, epochs=9, verbose=0, callbacks=[scheduler])
    for name in ("hidden", "head"):
        before_freeze = history.history[f"density/{name}"][:8]  # epochs end at steps 8..64
        assert min(before_freeze[:4]) <= 0.3 + 0.05, name  # the floor is reached by step 32
        assert min(before_freeze) >= 0.3 - 0.05, name  # one update of overshoot at most
    # The freeze then keeps each layer's floor exactly: ceil(0.3 * size) weights.
    hidden, head = ks.sparse_layers(model)
    assert (nonzero_weights(hidden), nonzero_weights(head)) == (192, 10)


def two_layer_model(rng, narrow_threshold=(0.0, 0.5)):
    """Two sparse layers of 48 and 24 weights, one threshold per unit and one per weight,
    with random kernels and thresholds."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            ks.SparseLinear(8, name="wide"),
            ks.SparseLinear(3, structured=False, name="narrow"),
        ]
    )
    wide, narrow = ks.sparse_layers(model)
    for layer, low_high in ((wide, (0.0, 0.5)), (narrow, narrow_threshold)):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
        layer.threshold.assign(rng.uniform(*low_high, size=layer.threshold.shape).astype("float32"))
    return model


def fit_without_learning(model, scheduler, steps):
    """`steps` driven steps that move no weight (learning rate 0)."""
    model.compile(keras.optimizers.SGD(0.0), "mse")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4 * steps, 6)).astype("float32")
    y = rng.normal(size=(4 * steps, 3)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[scheduler])


@pytest.mark.parametrize(
    "scope, target, min_density, counts",
    [
        # The narrow layer's thresholds sit above its weights: globally, only its floor
        # of ceil(0.1 * 24) = 3 weights survives, and the wide layer takes the rest of 18.
        ("global", 0.75, 0.1, (15, 3)),
        ("per_layer", 0.75, 0.1, (12, 6)),
        # A floor above the target: ceil(0.25 * size) weights each.
        ("per_layer", 0.9, 0.25, (12, 6)),
    ],
)
def test_the_freeze_keeps_exactly_the_target_ranked_by_margin(
    rng, scope, target, min_density, counts
):
    model = two_layer_model(rng, narrow_threshold=(3.0, 4.0))
    layers = ks.sparse_layers(model)
    kernels = [to_numpy(layer.kernel) for layer in layers]
    margins = [
        (np.abs(k) - to_numpy(layer.threshold)) / np.std(k) for k, layer in zip(kernels, layers)
    ]
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(target, begin_step=0, end_step=1), scope=scope, min_density=min_density
    )
    fit_without_learning(model, scheduler, steps=2)  # frozen before the second step
    assert scheduler.frozen
    keeps = reference.frozen_keep(margins, target, min_density, per_layer=scope == "per_layer")
    assert tuple(int(k.sum()) for k in keeps) == counts
    for layer, kernel, keep in zip(layers, kernels, keeps):
        np.testing.assert_array_equal(to_numpy(layer.prune_mask), keep)
        np.testing.assert_array_equal(to_numpy(layer.kernel), np.where(keep, kernel, 0.0))
        np.testing.assert_array_equal(to_numpy(layer.threshold), 0.0)
        assert layer.num_active() == int(keep.sum())


def test_a_mask_at_its_floor_gets_no_penalty(rng):
    # The wide layer's thresholds keep 2 of its 48 weights, under the floor of 10%; the
    # narrow one keeps all 24. One driven step on a target of 97% (density 3%): both are
    # above the target, but only the narrow layer is pushed.
    model = two_layer_model(rng)
    wide, narrow = ks.sparse_layers(model)
    magnitude = np.abs(to_numpy(wide.kernel))
    wide.reset_threshold(np.sort(magnitude, axis=None)[-2])
    narrow.reset_threshold(0.0)
    assert (wide.num_active(), narrow.num_active()) == (2, 24)
    scheduler = ks.SparsityScheduler(
        ks.ConstantSparsity(0.97, begin_step=0),
        scope="per_layer",
        min_density=0.1,
        update_every=1,
    )
    fit_without_learning(model, scheduler, steps=1)
    # log(penalty) starts at log(1e-3) and moves by gain / ramp (200 / 200) times the
    # log-density error, clipped to 1: log(1 / 0.03) > 1.
    assert float(to_numpy(wide.sparsity_penalty)) == 0.0
    np.testing.assert_allclose(to_numpy(narrow.sparsity_penalty), 1e-3 * math.e, rtol=1e-5)


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
    # Updates run every 10 steps (the default): the last of 16 steps was at step 10.
    assert hidden.temperature == pytest.approx(temperature(10) / std, rel=1e-4)

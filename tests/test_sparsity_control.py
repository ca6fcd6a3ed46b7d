"""Schedules, the SparsityScheduler callback, and reaching a target on a small task."""

import csv
import math
import warnings

import keras
import numpy as np
import pytest
import reference
from backend_utils import gradients, to_numpy

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
    with pytest.raises(ValueError, match=r"update_every=2.5"):
        ks.SparsityScheduler(0.5, update_every=2.5)
    with pytest.raises(ValueError, match=r"gain=0.0"):
        ks.SparsityScheduler(0.5, gain=0.0)
    with pytest.raises(ValueError, match=r"relax=-0.1"):
        ks.SparsityScheduler(0.5, relax=-0.1)
    with pytest.raises(ValueError, match=r"min_penalty=0.0, initial_penalty"):
        ks.SparsityScheduler(0.5, min_penalty=0.0)
    with pytest.raises(ValueError, match=r"initial_penalty=1e-07"):
        ks.SparsityScheduler(0.5, initial_penalty=1e-7)
    with pytest.raises(ValueError, match=r"max_penalty=0.0001"):
        ks.SparsityScheduler(0.5, max_penalty=1e-4)
    with pytest.raises(TypeError, match=r"`freeze_at_end`, expected a bool. .*freeze_at_end=1"):
        ks.SparsityScheduler(0.5, freeze_at_end=1)
    with pytest.raises(TypeError, match=r"`resume`, expected a bool. .*resume='yes'"):
        ks.SparsityScheduler(0.5, resume="yes")
    # The bounds themselves are allowed: no floor, and a penalty that starts at a bound.
    ks.SparsityScheduler(0.5, min_density=0.0)
    ks.SparsityScheduler(0.5, min_penalty=1e-3, initial_penalty=1e-3, max_penalty=1e-3)


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


class _FrozenAtEpochEnd(keras.callbacks.Callback):
    """Records, at each epoch's end, whether `scheduler` (earlier in the list) had frozen."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler, self.frozen = scheduler, []

    def on_epoch_end(self, epoch, logs=None):
        self.frozen.append(self.scheduler.frozen)


@pytest.mark.parametrize(
    "schedule", [0.6, ks.ConstantSparsity(0.6), ks.ConstantSparsity(0.6, begin_step=16)]
)
def test_a_constant_target_is_held_then_frozen_exactly_when_fit_ends(schedule):
    # A schedule without a ramp has no end step to freeze at: the feedback drives the
    # masks towards the target from its first step, and the freeze comes with the fit's
    # end (3 epochs of 16 steps), keeping exactly round(0.4 * 672) = 269 weights.
    scheduler = ks.SparsityScheduler(schedule)
    probe = _FrozenAtEpochEnd(scheduler)
    model, history, (x, y) = fit_with_scheduler(scheduler, epochs=3, callbacks=[probe])
    assert probe.frozen == [False, False, True]
    assert sum(nonzero_weights(layer) for layer in ks.sparse_layers(model)) == 269
    assert history.history["sparsity"][-1] == pytest.approx(1 - 269 / 672)


def test_a_constant_target_that_never_began_warns_and_freezes_nothing():
    scheduler = ks.SparsityScheduler(ks.ConstantSparsity(0.6, begin_step=1000))
    with pytest.warns(UserWarning, match=r"before the schedule's end \(step 1000"):
        model, _, _ = fit_with_scheduler(scheduler, epochs=1)
    assert not scheduler.frozen
    assert sum(nonzero_weights(layer) for layer in ks.sparse_layers(model)) == 672


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
    # prunes a few weights: each layer reaches its floor by the ramp's fifth eighth and
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
        assert min(before_freeze[:5]) <= 0.3 + 0.05, name  # the floor is reached by step 40
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


def fit_without_learning(model, scheduler, steps, callbacks=()):
    """`steps` driven steps that move no weight (learning rate 0)."""
    model.compile(keras.optimizers.SGD(0.0), "mse")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4 * steps, 6)).astype("float32")
    y = rng.normal(size=(4 * steps, 3)).astype("float32")
    return model.fit(
        x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[scheduler, *callbacks]
    )


@pytest.mark.parametrize(
    "scope, target, min_density, counts",
    [
        # The narrow layer's thresholds sit above its weights: globally, only its floor
        # of ceil(0.1 * 24) = 3 weights survives, and the wide layer takes the rest of 18.
        ("global", 0.75, 0.1, (15, 3)),
        ("per_layer", 0.75, 0.1, (12, 6)),
        # A floor above the target: ceil(0.25 * size) weights each.
        ("per_layer", 0.9, 0.25, (12, 6)),
        # One weight above the wide layer's floor: round(0.04 * 48) = 2, of which 1 floor.
        ("per_layer", 0.96, 0.01, (2, 1)),
    ],
)
def test_the_freeze_keeps_exactly_the_target_ranked_by_margin(
    rng, scope, target, min_density, counts
):
    model = two_layer_model(rng, narrow_threshold=(3.0, 4.0))
    layers = ks.sparse_layers(model)
    kernels = [to_numpy(layer.kernel) for layer in layers]
    thresholds = [to_numpy(layer.threshold) for layer in layers]
    margins = [(np.abs(k) - t) / np.std(k) for k, t in zip(kernels, thresholds)]
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(target, begin_step=0, end_step=1), scope=scope, min_density=min_density
    )
    fit_without_learning(model, scheduler, steps=2)  # frozen before the second step
    assert scheduler.frozen
    keeps = reference.frozen_keep(margins, target, min_density, per_layer=scope == "per_layer")
    assert tuple(int(k.sum()) for k in keeps) == counts
    for layer, kernel, threshold, keep in zip(layers, kernels, thresholds, keeps):
        np.testing.assert_array_equal(to_numpy(layer.prune_mask), keep)
        # The survivors keep the weights training used: the kernel times its soft mask
        # (at the freeze's temperature, which the frozen mask no longer changes).
        trained = kernel * reference.soft_mask(kernel, threshold, layer.temperature)
        np.testing.assert_allclose(
            to_numpy(layer.kernel), np.where(keep, trained, 0.0), rtol=1e-5, atol=1e-7
        )
        np.testing.assert_array_equal(to_numpy(layer.threshold), 0.0)
        assert layer.num_active() == int(keep.sum())
    # Frozen: no penalty, the masks fixed for the rest of training.
    for mask in ks.kernel_masks(model):
        assert mask.frozen and mask.driver is None
        assert float(to_numpy(mask.sparsity_penalty)) == 0.0


@pytest.mark.parametrize(
    "scope, target, min_density",
    [("per_layer", 0.5, 0.01), ("global", 0.6, 0.01), ("global", 0.9, 0.3)],
)
def test_the_neuron_freeze_keeps_the_units_of_best_margin(rng, scope, target, min_density):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            ks.SparseLinear(8, granularity="neuron", name="wide"),
            ks.SparseLinear(3, granularity="neuron", name="narrow"),
        ]
    )
    layers = ks.sparse_layers(model)
    margins, kernels = [], []
    for index, layer in enumerate(layers):
        kernel = rng.normal(size=layer.kernel.shape).astype("float32")
        threshold = rng.uniform(0.0, 0.5, size=layer.threshold.shape).astype("float32")
        alive = np.ones(kernel.shape, bool)
        if index == 0:
            # A unit already pruned for good stays out, though its zero threshold would
            # rank it above every alive unit of this layer (whose thresholds exceed them).
            alive[:, 1] = False
            kernel[:, 1] = 0.0
            threshold = rng.uniform(1.5, 2.5, size=threshold.shape).astype("float32")
            threshold[1] = 0.0
        layer.kernel.assign(kernel)
        layer.threshold.assign(threshold)
        layer.masks["kernel"].prune_mask.assign(alive)
        rms = np.sqrt(np.mean((kernel.astype("float64") * alive) ** 2, axis=0))
        margin = (rms - threshold) / np.std(kernel[alive])
        margins.append(np.where(alive.any(axis=0), margin, -np.inf))
        kernels.append(kernel)
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(target, begin_step=0, end_step=1),
        scope=scope,
        min_density=min_density,
    )
    fit_without_learning(model, scheduler, steps=2)  # frozen before the second step
    assert scheduler.frozen
    expected = reference.frozen_units(margins, (6, 8), target, min_density, scope == "per_layer")
    for layer, keep, margin, kernel in zip(layers, expected, margins, kernels):
        prune_mask = to_numpy(layer.prune_mask)
        keep = keep & np.isfinite(margin)
        np.testing.assert_array_equal(prune_mask, np.broadcast_to(keep, prune_mask.shape))
        # Whole units keep their raw weights (the weight granularity keeps its soft-masked
        # values: test_the_freeze_keeps_exactly_the_target_ranked_by_margin).
        np.testing.assert_array_equal(to_numpy(layer.kernel), np.where(keep, kernel, 0.0))


def test_a_straight_through_freeze_keeps_the_surviving_weights_as_they_are(rng):
    # Straight-through training uses the hard mask forward, so the survivors are what
    # training used: the freeze only removes weights.
    model = keras.Sequential([keras.Input((6,)), ks.SparseLinear(3, straight_through=True)])
    (layer,) = ks.sparse_layers(model)
    kernel = rng.normal(size=layer.kernel.shape).astype("float32")
    layer.kernel.assign(kernel)
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.5, begin_step=0, end_step=1))
    fit_without_learning(model, scheduler, steps=2)
    assert scheduler.frozen
    keep = to_numpy(layer.prune_mask)
    assert int(keep.sum()) == 9
    np.testing.assert_array_equal(to_numpy(layer.kernel), np.where(keep, kernel, 0.0))


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
        freeze_at_end=False,  # the penalties after one step, not the freeze at the fit's end
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
    # On a 32-step ramp the feedback updates every step (the default): the last of 16 steps
    # was step 15.
    assert hidden.temperature == pytest.approx(temperature(15) / std, rel=1e-4)


# ---------------------------------------------- the feedback law, step by step


def keep_largest(layer, count):
    """One threshold for the whole kernel that keeps exactly its `count` largest weights."""
    magnitude = np.sort(np.abs(to_numpy(layer.kernel)), axis=None)[::-1]
    if count == magnitude.size:
        threshold = 0.0
    else:
        threshold = (magnitude[count - 1] + magnitude[count]) / 2
    layer.reset_threshold(float(threshold))
    assert layer.num_active() == count


def mask_state(layer, field):
    return float(to_numpy(layer.masks["kernel"].state(field)))


@pytest.mark.parametrize(
    "target, keep, options",
    [
        # wide: far sparser than the target (its error is clipped to -1); narrow: denser
        (0.5, (4, 24), {}),
        # wide: exactly at the target, so no force; narrow: pushed, every second step
        (0.5, (24, 24), {"update_every": 2}),
        # narrow: at its floor, so no penalty, though denser than the target
        (0.9, (48, 6), {"min_density": 0.25}),
        # penalties starting at the default bounds stay within them
        (0.5, (48, 12), {"initial_penalty": 1e3}),
        (0.5, (12, 12), {"initial_penalty": 1e-6}),
        # no target yet: nothing moves
        (0.0, (20, 12), {}),
    ],
    ids=["apart", "at_target", "at_floor", "at_max", "at_min", "no_target"],
)
def test_one_step_per_layer_follows_the_feedback_law(rng, target, keep, options):
    model = two_layer_model(rng)
    layers = ks.sparse_layers(model)
    for layer, count in zip(layers, keep):
        keep_largest(layer, count)
    # The target before `begin_step` is `initial_sparsity`; the ramp is 300 steps.
    schedule = ks.PolynomialDecay(0.95, initial_sparsity=target, begin_step=100, end_step=400)
    scheduler = ks.SparsityScheduler(schedule, scope="per_layer", **{"update_every": 1, **options})
    with pytest.warns(UserWarning, match="before the schedule's end"):
        fit_without_learning(model, scheduler, steps=1)
    start = math.log(options.get("initial_penalty", 1e-3))
    law = {k: v for k, v in options.items() if k != "initial_penalty"}
    for layer, count in zip(layers, keep):
        size = int(np.prod(layer.kernel.shape))
        log_penalty, (penalty,) = reference.feedback_step(
            start, [count / size], [size], target, "per_layer", ramp=300, **law
        )
        assert mask_state(layer, "log_penalty") == pytest.approx(log_penalty, rel=1e-6), layer.name
        assert float(to_numpy(layer.sparsity_penalty)) == pytest.approx(penalty, rel=1e-5)
        assert mask_state(layer, "hard_density") == pytest.approx(count / size)


def test_the_first_global_step_measures_every_member(rng):
    # Step 0 already has a target: the first mask's update reads the second mask's
    # density, measured when training starts.
    model = two_layer_model(rng)
    layers = ks.sparse_layers(model)
    keep = (40, 20)
    for layer, count in zip(layers, keep):
        keep_largest(layer, count)
    scheduler = ks.SparsityScheduler(
        ks.ConstantSparsity(0.5, begin_step=0), freeze_at_end=False, update_every=1
    )
    fit_without_learning(model, scheduler, steps=1)
    densities = [count / size for count, size in zip(keep, (48, 24))]
    log_penalty, _ = reference.feedback_step(math.log(1e-3), densities, (48, 24), 0.5)
    assert mask_state(layers[0], "log_penalty") == pytest.approx(log_penalty, rel=1e-6)


@pytest.mark.parametrize("keep", [(40, 20), (20, 10)], ids=["denser", "sparser"])
def test_a_global_step_shares_the_penalty_by_size_and_logs_what_it_measured(rng, keep):
    model = two_layer_model(rng)
    layers = ks.sparse_layers(model)
    for layer, count in zip(layers, keep):
        keep_largest(layer, count)
    # Step 0 has no target (nothing moves, every mask measures); step 1 follows the law on
    # the density of the whole model, 48 + 24 weights.
    scheduler = ks.SparsityScheduler(
        ks.ConstantSparsity(0.5, begin_step=1), freeze_at_end=False, update_every=1
    )
    history = fit_without_learning(model, scheduler, steps=2)
    sizes = [48, 24]
    densities = [count / size for count, size in zip(keep, sizes)]
    log_penalty, expected = reference.feedback_step(math.log(1e-3), densities, sizes, 0.5)
    assert mask_state(layers[0], "log_penalty") == pytest.approx(log_penalty, rel=1e-6)
    for layer, penalty in zip(layers, expected):
        assert float(to_numpy(layer.sparsity_penalty)) == pytest.approx(penalty, rel=1e-5)
    # The epoch's logs, measured from the masks' variables in NumPy.
    logs = {key: values[-1] for key, values in history.history.items()}
    assert logs["sparsity"] == pytest.approx(1 - sum(keep) / 72)
    assert logs["target_sparsity"] == pytest.approx(0.5)
    # Relative temperature of the first mask (one threshold per unit): 5 at the ramp's
    # start, step 1 here.
    assert logs["relative_temperature"] == pytest.approx(5.0, rel=1e-5)
    penalty_term = 0.0
    for layer, structured in zip(layers, (True, False)):
        kernel, threshold = to_numpy(layer.kernel), to_numpy(layer.threshold)
        soft = reference.mask_of(kernel, threshold, layer.temperature, (1,), structured)
        penalty_term += float(to_numpy(layer.sparsity_penalty)) * soft.mean()
        assert logs[f"threshold_mean/{layer.name}"] == pytest.approx(threshold.mean(), rel=1e-6)
        assert logs[f"density/{layer.name}"] == pytest.approx(layer.density())
    assert logs["sparsity_loss"] == pytest.approx(penalty_term, rel=1e-5, abs=1e-12)


class _Temperatures(keras.callbacks.Callback):
    """Every mask's temperature after each step."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append([mask.temperature for mask in ks.kernel_masks(self.model)])


def test_default_temperatures_rise_over_the_ramp_relative_to_the_alive_weights_spread(rng):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            ks.SparseLinear(8, name="wide"),
            ks.SparseLinear(4, structured=False, name="narrow"),
            ks.SparseLinear(5, granularity="neuron", name="units"),
            ks.SparseLinear(3, name="flat"),
        ]
    )
    wide, narrow, units, flat = ks.sparse_layers(model)
    for layer, scale in ((wide, 0.3), (narrow, 0.5), (units, 1.0)):
        layer.kernel.assign(scale * rng.normal(size=layer.kernel.shape).astype("float32"))
    flat.kernel.assign(np.full(flat.kernel.shape, 0.25, "float32"))  # no spread at all
    wide.reset_threshold(0.2)
    wide.hard_prune()  # the weight scale is the spread of what is left
    alive = to_numpy(wide.prune_mask)
    assert 0 < alive.mean() < 1
    scales = [
        np.std(to_numpy(wide.kernel)[alive]),
        np.std(to_numpy(narrow.kernel)),
        np.std(to_numpy(units.kernel)),
        1.0,
    ]
    recorder = _Temperatures()
    scheduler = ks.SparsityScheduler(
        ks.ConstantSparsity(0.5, begin_step=1), freeze_at_end=False, update_every=1
    )
    fit_without_learning(model, scheduler, steps=3, callbacks=[recorder])
    # The ramp runs from step 1 to step 2 (a constant target: one step long). One
    # threshold per unit: 5 -> 200; per weight, or per neuron: 2 -> 5.
    per_unit, per_weight = [5.0, 5.0, 200.0], [2.0, 2.0, 5.0]
    relative = np.array([per_unit, per_weight, per_weight, per_unit]).T
    np.testing.assert_allclose(recorder.seen, relative / np.array(scales), rtol=1e-5)
    for mask, scale in zip(ks.kernel_masks(model), scales):
        assert float(to_numpy(mask.state("weight_scale"))) == pytest.approx(scale, rel=1e-5)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_with_the_freeze_per_unit_thresholds_stay_soft_globally_and_the_others_rise(scope):
    # The default with `freeze_at_end=True`: a threshold per unit (weight granularity)
    # keeps the relative temperature 5 over the ramp in the global scope and rises
    # 5 -> 200 per layer, N:M rises 5 -> 200, a threshold per weight 2 -> 5
    # (exponentially, from the ramp's begin at step 0 to its end at 4).
    model = keras.Sequential(
        [
            keras.Input((6,)),
            ks.SparseLinear(8, name="per_unit"),
            ks.SparseLinear(4, granularity="n:m", n_m=(2, 4), name="n_m"),
            ks.SparseLinear(3, structured=False, name="per_weight"),
        ]
    )
    scales = [np.std(to_numpy(layer.kernel)) for layer in ks.sparse_layers(model)]
    recorder = _Temperatures()
    schedule = ks.PolynomialDecay(0.5, begin_step=0, end_step=4)
    scheduler = ks.SparsityScheduler(schedule, scope=scope)
    with pytest.warns(UserWarning, match="before the schedule's end"):
        fit_without_learning(model, scheduler, steps=3, callbacks=[recorder])
    progress = np.arange(3) / 4
    rising = 5.0 * 40.0**progress
    per_unit = np.full(3, 5.0) if scope == "global" else rising
    relative = np.stack([per_unit, rising, 2.0 * 2.5**progress], axis=1)
    np.testing.assert_allclose(recorder.seen, relative / np.array(scales), rtol=1e-5)


def test_a_second_fit_resumes_the_step_the_penalty_and_the_weight_scale(rng):
    model = two_layer_model(rng)
    layers = ks.sparse_layers(model)
    for layer, count in zip(layers, (40, 20)):
        layer.kernel.assign(0.5 * to_numpy(layer.kernel))
        keep_largest(layer, count)
    schedule = ks.PolynomialDecay(0.95, initial_sparsity=0.5, begin_step=100, end_step=400)

    def two_steps(resume=True):
        # resume=True is the default.
        options = {} if resume else {"resume": False}
        scheduler = ks.SparsityScheduler(
            schedule, scope="per_layer", **{"update_every": 1, **options}
        )
        with pytest.warns(UserWarning, match="before the schedule's end"):
            fit_without_learning(model, scheduler, steps=2)
        return scheduler

    def expected_log_penalty(densities, size):
        log_penalty = math.log(1e-3)
        for density in densities:
            log_penalty, _ = reference.feedback_step(
                log_penalty, [density], [size], 0.5, "per_layer", ramp=300
            )
        return log_penalty

    two_steps()
    first = [(np.std(to_numpy(layer.kernel)), layer.density()) for layer in layers]
    # The weights shrink (as training may do) under the same thresholds: the density
    # changes, the scale the temperatures are relative to does not.
    for layer in layers:
        layer.kernel.assign(0.5 * to_numpy(layer.kernel))
    second = [layer.density() for layer in layers]
    assert second != [density for _, density in first]
    assert two_steps().step == 4
    for layer, (scale, density), now in zip(layers, first, second):
        size = int(np.prod(layer.kernel.shape))
        assert mask_state(layer, "step") == 4
        assert mask_state(layer, "weight_scale") == pytest.approx(scale, rel=1e-5)
        want = expected_log_penalty([density, density, now, now], size)
        assert mask_state(layer, "log_penalty") == pytest.approx(want, rel=1e-6)
    # resume=False: the schedule, the penalty and the scale start again.
    assert two_steps(resume=False).step == 2
    for layer, now in zip(layers, second):
        size = int(np.prod(layer.kernel.shape))
        assert mask_state(layer, "step") == 2
        scale = np.std(to_numpy(layer.kernel))
        assert mask_state(layer, "weight_scale") == pytest.approx(scale, rel=1e-5)
        want = expected_log_penalty([now, now], size)
        assert mask_state(layer, "log_penalty") == pytest.approx(want, rel=1e-6)


def test_the_layers_argument_drives_those_layers_only(rng):
    model = two_layer_model(rng)
    wide, narrow = ks.sparse_layers(model)
    scheduler = ks.SparsityScheduler(
        ks.ConstantSparsity(0.9, begin_step=0), layers=[wide], freeze_at_end=False
    )
    history = fit_without_learning(model, scheduler, steps=1)
    assert float(to_numpy(wide.sparsity_penalty)) > 0
    assert float(to_numpy(narrow.sparsity_penalty)) == 0.0
    np.testing.assert_array_equal(to_numpy(narrow.masks["kernel"].sparsity_state), np.zeros(5))
    assert "density/wide" in history.history and "density/narrow" not in history.history
    # Training over, the masks are left without a driver.
    assert wide.masks["kernel"].driver is None


def test_each_kernel_of_a_layer_with_two_is_logged_under_its_own_name():
    model = keras.Sequential(
        [keras.Input((5, 6)), ks.SparseSeparableConv1D(3, 2, name="sep"), keras.layers.Flatten()]
    )
    model.compile(keras.optimizers.SGD(0.0), "mse")
    scheduler = ks.SparsityScheduler(ks.ConstantSparsity(0.5, begin_step=0))
    x, y = np.ones((4, 5, 6), "float32"), np.zeros((4, 12), "float32")
    history = model.fit(x, y, batch_size=4, verbose=0, callbacks=[scheduler])
    assert {"density/sep/depthwise_kernel", "density/sep/pointwise_kernel"} <= set(history.history)


@pytest.mark.parametrize(
    "schedule", [ks.PolynomialDecay(0.5, end_epoch=1), ks.PolynomialDecay(0.5, end_fraction=0.5)]
)
def test_schedules_in_epochs_or_fractions_end_at_the_step_they_name(rng, schedule):
    # Two epochs of two steps: epoch 1, or half the run, ends at step 2, where the masks
    # freeze (and stop counting).
    model = two_layer_model(rng)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = np.ones((8, 6), "float32"), np.zeros((8, 3), "float32")
    scheduler = ks.SparsityScheduler(schedule)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[scheduler])
    assert scheduler.frozen and scheduler.step == 4
    assert [mask_state(layer, "step") for layer in ks.sparse_layers(model)] == [2.0, 2.0]


def test_a_schedule_that_ends_with_training_does_not_warn(rng):
    model = two_layer_model(rng)
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.5, begin_step=0, end_step=2), freeze_at_end=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_without_learning(model, scheduler, steps=2)
    assert not [w for w in caught if "SparsityScheduler" in str(w.message)]
    assert not scheduler.frozen


def test_a_non_finite_loss_or_weight_stops_training_and_says_so(rng):
    # Nothing trains (a NaN loss would make NaN gradients, and NaN weights): the scheduler
    # alone sees the loss and the weights.
    def untrained(x, infinite_weights=0):
        model = two_layer_model(rng)
        wide = ks.sparse_layers(model)[0]
        kernel = to_numpy(wide.kernel)
        kernel.flat[:infinite_weights] = np.inf
        wide.kernel.assign(kernel)
        model.trainable = False
        model.compile("sgd", "mse")
        scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.5, begin_step=0, end_step=10))
        model.fit(x, np.zeros((4, 3), "float32"), batch_size=4, verbose=0, callbacks=[scheduler])

    x = np.ones((4, 6), "float32")
    x[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 1; no mask"):
        untrained(x)
    with pytest.raises(FloatingPointError, match=r"6 weights of 'wide' are NaN or infinite"):
        untrained(np.ones((4, 6), "float32"), infinite_weights=6)


def test_the_global_freeze_compares_margins_in_units_of_each_masks_spread(rng):
    # The wide layer's weights are four times as spread: its margins, in units of its own
    # spread, compete with the narrow layer's on equal terms.
    model = two_layer_model(rng)
    wide, narrow = ks.sparse_layers(model)
    wide.kernel.assign(4.0 * to_numpy(wide.kernel))
    layers = (wide, narrow)
    margins = [
        (np.abs(to_numpy(layer.kernel)) - to_numpy(layer.threshold))
        / np.std(to_numpy(layer.kernel))
        for layer in layers
    ]
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.5, begin_step=0, end_step=1))
    fit_without_learning(model, scheduler, steps=2)
    keeps = reference.frozen_keep(margins, 0.5, 0.01)
    for layer, keep in zip(layers, keeps):
        np.testing.assert_array_equal(to_numpy(layer.prune_mask), keep)


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_steps_are_counted_when_updates_skip_steps_or_steps_run_in_chunks(rng, steps_per_execution):
    # Eager steps (one per call, PyTorch) update on due steps only and write the count at
    # the epoch's end; chunks of steps run as one program, which counts on the device.
    if steps_per_execution > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras runs one step per call on PyTorch")
    model = two_layer_model(rng)
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=steps_per_execution)
    x, y = np.ones((16, 6), "float32"), np.zeros((16, 3), "float32")
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(0.5, begin_step=0, end_step=4), update_every=2, freeze_at_end=False
    )
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[scheduler])
    assert scheduler.step == 4
    assert [mask_state(layer, "step") for layer in ks.sparse_layers(model)] == [4.0, 4.0]


def test_frozen_masks_stop_counting_at_the_last_step_of_a_short_chunk(rng):
    # Three steps in chunks of two: the second chunk holds one step.
    if keras.backend.backend() == "torch":
        pytest.skip("Keras runs one step per call on PyTorch")
    model = two_layer_model(rng)
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=2)
    x, y = np.ones((12, 6), "float32"), np.zeros((12, 3), "float32")
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.5, begin_step=0, end_step=1))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[scheduler])
    assert scheduler.frozen and scheduler.step == 3


def test_the_default_floor_is_a_tenth_of_the_final_density_at_most_one_percent(rng):
    # Up to a 90% target the floor is 1%; above, a tenth of the final density.
    assert ks.SparsityScheduler(0.5).min_density == pytest.approx(0.01)
    assert ks.SparsityScheduler(0.9).min_density == pytest.approx(0.01)
    assert ks.SparsityScheduler(ks.PolynomialDecay(0.99, 0, 10)).min_density == pytest.approx(1e-3)
    assert ks.SparsityScheduler(0.99, min_density=0.05).min_density == 0.05
    # A mask at 0.5% density, denser than a 99.8% target, is still pushed: a 1% floor would
    # stop it there.
    model = keras.Sequential([keras.Input((20,)), ks.SparseLinear(10, name="fc")])
    (layer,) = ks.sparse_layers(model)
    layer.kernel.assign(rng.normal(size=(20, 10)).astype("float32"))
    keep_largest(layer, 1)
    scheduler = ks.SparsityScheduler(
        ks.ConstantSparsity(0.998, begin_step=0), freeze_at_end=False, update_every=1
    )
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = np.ones((4, 20), "float32"), np.ones((4, 10), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[scheduler])
    assert scheduler.min_density == pytest.approx(2e-4)
    _, (expected,) = reference.feedback_step(math.log(1e-3), [1 / 200], [200], 0.998)
    assert expected > 0
    assert float(to_numpy(layer.sparsity_penalty)) == pytest.approx(expected, rel=1e-4)
    # Schedules in epochs learn their final target at train begin.
    later = ks.SparsityScheduler(ks.PolynomialDecay(0.995, end_epoch=1), freeze_at_end=False)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[later])
    assert later.min_density == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "end_step, gain, expected",
    [(100, 200.0, 1), (1599, 200.0, 1), (1890, 200.0, 2), (9000, 200.0, 10), (9000, 400.0, 5)],
)
def test_the_default_update_interval_keeps_one_update_within_a_quarter_e_fold(
    end_step, gain, expected
):
    # One update moves log(penalty) by at most gain / ramp * update_every: the default
    # interval is the largest that keeps this at most 1/4, between 1 and 10.
    model = keras.Sequential([keras.Input((4,)), ks.SparseLinear(2)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = np.ones((2, 4), "float32"), np.ones((2, 2), "float32")
    schedule = ks.PolynomialDecay(0.9, begin_step=0, end_step=end_step)
    scheduler = ks.SparsityScheduler(schedule, gain=gain, freeze_at_end=False)
    given = ks.SparsityScheduler(schedule, update_every=3, freeze_at_end=False)
    for driver in (scheduler, given):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the schedule does not finish in one step
            model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[driver])
    assert scheduler.update_every == expected
    assert given.update_every == 3


def test_a_frozen_mask_trains_the_kept_weights_alone_whatever_the_pruned_ones_hold(rng):
    # After the freeze the optimizer's momentum can still move pruned weights (their
    # gradient is zero, their moments are not): the training call must ignore them.
    layer = ks.SparseLinear(5, name="frozen")
    layer.build((None, 4))
    kernel = rng.normal(size=(4, 5)).astype("float32")
    keep = rng.uniform(size=(4, 5)) < 0.5
    layer.kernel.assign(kernel)  # the pruned entries hold nonzero values
    mask = layer.masks["kernel"]
    mask.prune_mask.assign(keep)
    mask.frozen = True
    x = rng.normal(size=(3, 4)).astype("float32")
    upstream = rng.normal(size=(3, 5)).astype("float32")
    bias = to_numpy(layer.bias)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), x @ np.where(keep, kernel, 0.0) + bias, atol=1e-5
    )
    d_kernel, d_bias, d_threshold = gradients(layer, x, upstream)
    np.testing.assert_allclose(d_kernel, np.where(keep, x.T @ upstream, 0.0), atol=1e-5)
    np.testing.assert_allclose(d_bias, upstream.sum(axis=0), atol=1e-5)
    np.testing.assert_array_equal(d_threshold, 0.0)


def test_a_freeze_that_cuts_much_of_what_the_masks_kept_warns(rng):
    # With a learning rate of 0 the thresholds never move: the masks keep what their
    # initial thresholds keep, and the freeze alone cuts it to 10%.
    model = two_layer_model(rng)
    layers = ks.sparse_layers(model)
    kept = sum(layer.num_active() for layer in layers) / 72
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.9, begin_step=0, end_step=1))
    with pytest.warns(UserWarning, match="one-shot pruning") as caught:
        fit_without_learning(model, scheduler, steps=2)
    (message,) = [str(w.message) for w in caught if "one-shot" in str(w.message)]
    assert f"kept {kept:.2%} of the weights" in message
    assert "cut them to 9.72%" in message  # round(0.1 * 72) = 7 weights
    # What to change, named by its arguments; the advice on thresholds per weight names
    # the layer that has them ("narrow"), not the one with a threshold per unit.
    assert "over its ramp of 1 steps, shorter than the 200 steps" in message
    assert "(the schedule's end_step, end_epoch or end_fraction, or more epochs)" in message
    assert "Thresholds per weight (structured=False: narrow) stop learning" in message


def test_a_freeze_that_trims_what_the_masks_kept_does_not_warn(rng):
    # Thresholds that already keep 8 of the 72 weights: the freeze trims one (to 7).
    model = two_layer_model(rng)
    magnitudes = np.concatenate(
        [np.abs(to_numpy(x.kernel)).ravel() for x in ks.sparse_layers(model)]
    )
    for layer in ks.sparse_layers(model):
        layer.reset_threshold(float(np.sort(magnitudes)[-8]))
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.9, begin_step=0, end_step=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_without_learning(model, scheduler, steps=2)
    assert scheduler.frozen
    assert not [w for w in caught if "one-shot" in str(w.message)]

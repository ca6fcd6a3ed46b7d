"""`granularity="neuron"` and `granularity="n:m"` against NumPy references."""

import keras
import numpy as np
import pytest
import reference
from backend_utils import gradients, to_numpy
from layer_checks import run_layer_checks

import keras_sparse as ks
from keras_sparse import SparseLinear, is_n_m_sparse


def make_layer(rng, in_features=8, units=5, temperature=5.0, **kwargs):
    layer = SparseLinear(units, temperature=temperature, **kwargs)
    layer.build((None, in_features))
    layer.kernel.assign(rng.normal(size=(in_features, units)).astype("float32"))
    layer.bias.assign(rng.normal(size=(units,)).astype("float32"))
    return layer


def rms(kernel):
    return np.sqrt(np.mean(kernel**2, axis=0))


def top_n_per_group(kernel, n, m):
    """The N:M keep set written out loop by loop: top n of each group, ties to the lower row."""
    in_features, units = kernel.shape
    keep = np.zeros(kernel.shape, bool)
    for j in range(units):
        for start in range(0, in_features, m):
            rows = list(range(start, min(start + m, in_features)))
            ranked = sorted(rows, key=lambda r: (-abs(kernel[r, j]), r))
            keep[ranked[:n], j] = True
    return keep


def n_m_boundary(kernel, n, m):
    """Midpoint of the n-th and (n+1)-th magnitude of each weight's group (zero padded)."""
    in_features, units = kernel.shape
    boundary = np.zeros(kernel.shape)
    for j in range(units):
        for start in range(0, in_features, m):
            group = np.abs(kernel[start : start + m, j])
            ordered = np.sort(np.pad(group, (0, m - len(group))))[::-1]
            boundary[start : start + m, j] = 0.5 * (ordered[n - 1] + ordered[n])
    return boundary


@pytest.fixture
def x(rng):
    return rng.normal(size=(3, 8)).astype("float32")


# ------------------------------------------------------------------ neuron


def test_neuron_soft_mask_is_a_sigmoid_of_each_neurons_rms(rng, x):
    layer = make_layer(rng, granularity="neuron")
    kernel = to_numpy(layer.kernel)
    threshold = rng.uniform(0.5, 1.2, size=5).astype("float32")
    layer.reset_threshold(threshold)
    mask = reference.sigmoid((rms(kernel) - threshold) * 5.0)
    expected = x @ (kernel * mask) + to_numpy(layer.bias)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-5)


def test_neuron_mode_prunes_whole_neurons_and_keeps_the_others_intact(rng, x):
    layer = make_layer(rng, granularity="neuron")
    kernel = to_numpy(layer.kernel).copy()
    scores = rms(kernel)
    # Thresholds between the scores: neurons 1 and 3 fall below theirs.
    threshold = scores * np.array([0.5, 1.5, 0.9, 1.1, 0.0], "float32")
    layer.reset_threshold(threshold)
    kept = scores >= threshold
    assert layer.alive_neurons() == 3
    assert layer.num_active() == 3 * 8
    assert layer.density() == pytest.approx(3 / 5)
    np.testing.assert_allclose(
        to_numpy(layer(x)), x @ (kernel * kept) + to_numpy(layer.bias), rtol=1e-5, atol=1e-5
    )
    layer.hard_prune()
    pruned = to_numpy(layer.kernel)
    assert np.all(pruned[:, ~kept] == 0)
    np.testing.assert_array_equal(pruned[:, kept], kernel[:, kept])
    assert (layer.alive_neurons(), layer.num_active()) == (3, 24)
    np.testing.assert_array_equal(to_numpy(layer.effective_weight()), pruned)


def test_neuron_gradient_is_finite_for_an_all_zero_neuron(rng, x):
    layer = make_layer(rng, granularity="neuron")
    kernel = to_numpy(layer.kernel)
    kernel[:, 2] = 0.0
    layer.kernel.assign(kernel)
    model = keras.Sequential([keras.Input((8,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, np.zeros((3, 5), "float32"), epochs=1, verbose=0)
    assert all(np.all(np.isfinite(to_numpy(w))) for w in layer.weights)


def test_neuron_gradients_with_the_penalty_match_finite_differences(rng, x):
    # The loss `fit` sees, `sum(y * upstream) + penalty * mean(mask)`, for whole neurons:
    # its gradients against float64 central differences. The penalty reaches the
    # thresholds only: the kernel's gradient holds the penalty's mask at the current kernel.
    layer = make_layer(rng, granularity="neuron", temperature=2.0)
    kernel = to_numpy(layer.kernel).astype("float64")
    bias = to_numpy(layer.bias).astype("float64")
    # Thresholds near the scores, where the sigmoid's slope (and so the penalty) matters.
    threshold = (rms(kernel) * rng.uniform(0.7, 1.3, size=5)).astype("float32")
    layer.reset_threshold(threshold)
    threshold = threshold.astype("float64")
    penalty = 0.7
    layer.sparsity_penalty.assign(penalty)
    upstream = rng.normal(size=(3, 5))
    d_kernel, _, d_threshold = gradients(
        layer, x, upstream.astype("float32"), training=True, with_losses=True
    )
    x64 = x.astype("float64")

    def loss(k, t, k_penalised=None):
        k_penalised = k if k_penalised is None else k_penalised
        mask = reference.sigmoid((rms(k) - t) * 2.0)
        penalised = reference.sigmoid((rms(k_penalised) - t) * 2.0)
        return np.sum((x64 @ (k * mask) + bias) * upstream) + penalty * np.mean(penalised)

    want_kernel = reference.central_differences(lambda k: loss(k, threshold, kernel), kernel)
    want_threshold = reference.central_differences(lambda t: loss(kernel, t), threshold)
    np.testing.assert_allclose(d_kernel, want_kernel, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(d_threshold, want_threshold, rtol=1e-3, atol=1e-4)


def test_alive_neurons_counts_neurons_with_an_active_weight_in_weight_mode(rng):
    layer = make_layer(rng, units=3)
    layer.reset_threshold([0.0, 1e3, 0.0])
    assert layer.alive_neurons() == 2


# --------------------------------------------------------------------- n:m


@pytest.mark.parametrize(
    "shape, n_m",
    [((8, 3), (2, 4)), ((7, 5), (2, 4)), ((5, 2), (2, 4)), ((12, 3), (1, 4)), ((10, 4), (3, 8))],
)
def test_hard_prune_leaves_an_exact_n_m_pattern(rng, shape, n_m):
    layer = make_layer(rng, *shape, granularity="n:m", n_m=n_m)
    kernel = to_numpy(layer.kernel).copy()
    expected = top_n_per_group(kernel, *n_m)
    assert layer.num_active() == expected.sum()
    layer.hard_prune()
    pruned = to_numpy(layer.kernel)
    np.testing.assert_array_equal(pruned != 0, expected)
    np.testing.assert_array_equal(pruned[expected], kernel[expected])
    assert is_n_m_sparse(pruned, *n_m)


def test_the_tail_group_keeps_at_most_n_of_its_weights(rng):
    # 7 inputs, 2:4: groups of rows 0-3 and 4-6; the tail keeps 2 of its 3.
    layer = make_layer(rng, 7, 1, granularity="n:m")
    layer.kernel.assign(np.array([[4], [1], [3], [2], [0.5], [5], [6]], "float32"))
    layer.hard_prune()
    np.testing.assert_array_equal(to_numpy(layer.kernel)[:, 0], [4, 0, 3, 0, 0, 5, 6])
    # A tail of n weights or fewer keeps them all.
    layer = make_layer(rng, 5, 1, granularity="n:m")
    layer.kernel.assign(np.array([[1], [2], [3], [4], [0.5]], "float32"))
    layer.hard_prune()
    np.testing.assert_array_equal(to_numpy(layer.kernel)[:, 0], [0, 0, 3, 4, 0.5])


def test_n_m_ties_go_to_the_lower_input_index(rng):
    layer = make_layer(rng, 4, 1, granularity="n:m")
    layer.kernel.assign(np.array([[1], [-2], [2], [2]], "float32"))
    layer.hard_prune()
    np.testing.assert_array_equal(to_numpy(layer.kernel)[:, 0], [0, -2, 2, 0])


def test_n_m_threshold_prunes_further_within_the_pattern(rng, x):
    layer = make_layer(rng, granularity="n:m")
    kernel = to_numpy(layer.kernel)
    layer.reset_threshold(0.8)
    keep = top_n_per_group(kernel, 2, 4) & (np.abs(kernel) >= 0.8)
    assert layer.num_active() == keep.sum()
    np.testing.assert_allclose(
        to_numpy(layer(x)), x @ (kernel * keep) + to_numpy(layer.bias), rtol=1e-5, atol=1e-5
    )


def test_n_m_soft_mask_splits_each_group_at_its_boundary(rng, x):
    layer = make_layer(rng, 7, 5, granularity="n:m")
    kernel = to_numpy(layer.kernel)
    threshold = np.array([0.0, 0.0, 0.9, 1.5, 0.3], "float32")
    layer.reset_threshold(threshold)
    cut = np.maximum(n_m_boundary(kernel, 2, 4), threshold)
    mask = reference.sigmoid((np.abs(kernel) - cut) * 5.0)
    expected = x[:, :7] @ (kernel * mask) + to_numpy(layer.bias)
    np.testing.assert_allclose(
        to_numpy(layer(x[:, :7], training=True)), expected, rtol=1e-5, atol=1e-5
    )


def along_channels(function, kernel, *args):
    """`function`, written for `(rows, columns)` with groups down the rows, applied to a
    convolution kernel `(k, channels, filters)`: groups along the input channels."""
    moved = np.moveaxis(kernel, 1, 0)
    out = function(moved.reshape(moved.shape[0], -1), *args)
    return np.moveaxis(np.reshape(out, moved.shape), 0, 1)


def n_m_conv(rng):
    layer = ks.SparseConv1D(3, 2, granularity="n:m", temperature=5.0)
    layer.build((None, 6, 8))
    kernel = rng.normal(size=(2, 8, 3)).astype("float32")
    layer.kernel.assign(kernel)
    layer.bias.assign(np.zeros(3, "float32"))
    return layer, kernel


def test_n_m_groups_of_a_convolution_run_along_its_input_channels(rng):
    layer, kernel = n_m_conv(rng)
    keep = along_channels(top_n_per_group, kernel, 2, 4)
    assert layer.num_active() == keep.sum() == 24
    np.testing.assert_array_equal(to_numpy(layer.effective_weight()), np.where(keep, kernel, 0))
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    cut = along_channels(n_m_boundary, kernel, 2, 4)
    soft = reference.sigmoid((np.abs(kernel) - cut) * 5.0)
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), reference.conv(x, kernel * soft), rtol=1e-5, atol=1e-5
    )
    # After hard_prune(), the pruned weights count as zeros in their groups' boundary.
    layer.reset_threshold(0.5)
    layer.hard_prune()
    pruned = to_numpy(layer.kernel)
    alive = to_numpy(layer.prune_mask)
    np.testing.assert_array_equal(alive, keep & (np.abs(kernel) >= 0.5))
    cut = along_channels(n_m_boundary, pruned, 2, 4)
    soft = reference.sigmoid((np.abs(pruned) - cut) * 5.0) * alive
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), reference.conv(x, pruned * soft), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("pruned_before", [False, True], ids=["fresh", "pruned_and_moved"])
def test_the_freeze_keeps_a_convolutions_n_m_pattern_along_its_channels(rng, pruned_before):
    layer, kernel = n_m_conv(rng)
    # 2 of every 4 channels is exactly half: the pattern itself.
    expected = along_channels(top_n_per_group, kernel, 2, 4)
    if pruned_before:
        layer.reset_threshold(0.5)
        layer.hard_prune()
        expected = to_numpy(layer.prune_mask)
        # An optimizer's momentum may move pruned weights again: they stay pruned, and
        # count as zeros in their groups.
        layer.kernel.assign(np.where(expected, to_numpy(layer.kernel), 10.0).astype("float32"))
    model = keras.Sequential([keras.Input((6, 8)), layer])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = rng.normal(size=(8, 6, 8)).astype("float32")
    y = np.zeros((8, 5, 3), "float32")
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.5, begin_step=0, end_step=1))
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[scheduler])
    assert scheduler.frozen
    frozen = to_numpy(layer.kernel)
    assert is_n_m_sparse(frozen, 2, 4, axis=-2)
    np.testing.assert_array_equal(frozen != 0, expected)


def test_is_n_m_sparse_checks_groups_along_the_chosen_axis():
    kernel = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1]], "float32")
    assert is_n_m_sparse(kernel, 2, 4)
    assert not is_n_m_sparse(kernel, 1, 4)
    # A tail shorter than m is checked as if padded with zeros.
    assert is_n_m_sparse(np.array([[1], [0], [1]]), 1, 2) is True
    assert is_n_m_sparse(np.array([[1], [0], [1], [0], [1], [1]]), 1, 4) is False
    assert is_n_m_sparse(np.array([[1, 1, 0, 0, 1]]), 2, 4, axis=1)
    assert not is_n_m_sparse(np.array([[1, 1, 1, 0]]), 2, 4, axis=1)


# --------------------------------------------------------- config and files


@pytest.mark.parametrize(
    "kwargs", [{"granularity": "neuron"}, {"granularity": "n:m", "n_m": (1, 4)}]
)
def test_new_modes_pass_the_generic_layer_checks(kwargs):
    run_layer_checks(SparseLinear, {"units": 3, **kwargs}, (2, 6), 3, 4)


@pytest.mark.parametrize(
    "kwargs",
    [{"granularity": "neuron"}, {"granularity": "n:m"}, {"granularity": "n:m", "n_m": [1, 8]}],
)
def test_config_round_trip_keeps_the_mode(kwargs):
    config = SparseLinear(4, **kwargs).get_config()
    clone = SparseLinear.from_config(config)
    assert clone.granularity == kwargs["granularity"]
    assert clone.n_m == (tuple(kwargs.get("n_m", (2, 4))) if "n:m" in kwargs.values() else None)
    assert clone.get_config() == config


@pytest.mark.parametrize("granularity", ["neuron", "n:m"])
def test_a_pruned_model_in_a_keras_file_keeps_its_mask(tmp_path, rng, granularity):
    model = keras.Sequential([keras.Input((6,)), SparseLinear(4, granularity=granularity)])
    layer = model.layers[0]
    layer.reset_threshold(np.array([0.0, 1e3, 0.0, 0.0], "float32"))
    x = rng.normal(size=(2, 6)).astype("float32")
    expected = to_numpy(model(x))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras").layers[0]
    assert (loaded.granularity, loaded.n_m) == (layer.granularity, layer.n_m)
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
    assert loaded.num_active() == layer.num_active()


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "n_m", [(4, 4), (5, 4), (0, 4), (-1, 4), (2,), (2, 4, 8), (2.0, 4), (True, 4), "2:4"]
)
def test_bad_n_m_is_refused_with_its_value(n_m):
    with pytest.raises(ValueError, match=r"`n_m`.*0 < n < m.*Received: n_m="):
        SparseLinear(4, granularity="n:m", n_m=n_m)


def test_the_error_shows_the_pair_received():
    with pytest.raises(ValueError, match=r"Received: n_m=\(4, 4\)"):
        SparseLinear(4, granularity="n:m", n_m=(4, 4))
    with pytest.raises(ValueError, match=r"n_m"):
        is_n_m_sparse(np.ones((4, 2)), 2, 2)


def test_bad_granularity_and_conflicting_arguments_are_refused():
    with pytest.raises(ValueError, match=r"`granularity`.*granularity='block'"):
        SparseLinear(4, granularity="block")
    with pytest.raises(ValueError, match=r"`structured`.*structured=False"):
        SparseLinear(4, granularity="neuron", structured=False)
    with pytest.raises(ValueError, match=r"`n_m`.*granularity='weight'"):
        SparseLinear(4, n_m=(2, 4))


# ----------------------------------------------------------- the scheduler


def teacher_task(n=256, features=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = np.tanh(x[:, :4]) @ rng.normal(size=(4, 1))
    return x, y.astype("float32")


def test_scheduler_prunes_whole_neurons_to_the_nearest_neuron():
    x, y = teacher_task()
    model = keras.Sequential(
        [
            keras.Input((16,)),
            SparseLinear(20, activation="relu", granularity="neuron", name="hidden"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.75, begin_step=0, end_step=40))
    model.fit(x, y, batch_size=32, epochs=6, verbose=0, callbacks=[scheduler])
    hidden = model.get_layer("hidden")
    assert hidden.alive_neurons() == 5
    kernel = to_numpy(hidden.kernel)
    dead = ~np.any(kernel != 0, axis=0)
    assert dead.sum() == 15  # every other neuron is whole
    assert np.all(kernel[:, ~dead] != 0)
    result = ks.shrink(model)
    assert result.model.get_layer("hidden").units == 5
    np.testing.assert_allclose(to_numpy(result.model(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-5)


def test_scheduler_freeze_keeps_the_n_m_pattern():
    x, y = teacher_task()
    model = keras.Sequential(
        [
            keras.Input((16,)),
            SparseLinear(8, activation="relu", granularity="n:m", name="hidden"),
            SparseLinear(1, name="head"),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.6, begin_step=0, end_step=24))
    model.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[scheduler])
    hidden, head = ks.sparse_layers(model)
    assert is_n_m_sparse(to_numpy(hidden.kernel), 2, 4)
    total = 16 * 8 + 8
    assert hidden.num_active() + head.num_active() == round(0.4 * total)

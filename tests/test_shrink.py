"""`shrink`: dead neurons are sliced out, outputs stay, unsafe removals are refused, with why."""

import warnings

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

from keras_sparse import SparseLinear, shrink, sparse_layers


def _randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights and not isinstance(layer, SparseLinear):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, size=w.shape).astype("float32")
                    if "variance" in w.path
                    else rng.normal(size=w.shape).astype("float32")
                    for w in layer.weights
                ]
            )
        elif isinstance(layer, SparseLinear):
            layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
            if layer.use_bias:
                layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return model


def _kill(layer, neurons):
    """Zero the kernel columns `neurons` of a Dense or SparseLinear layer."""
    kernel = to_numpy(layer.kernel).copy()
    kernel[:, neurons] = 0.0
    layer.kernel.assign(kernel)


def _prune_neurons(layer, neurons):
    """Prune whole neurons of a neuron-granularity SparseLinear through its threshold."""
    threshold = np.zeros(layer.units, "float32")
    threshold[neurons] = 1e3
    layer.reset_threshold(threshold)
    layer.hard_prune()


def _rows(result):
    return {row.name: row for row in result.layers}


@pytest.fixture
def x(rng):
    return rng.normal(size=(16, 8)).astype("float32")


def _assert_same_outputs(model, result, x):
    expected = to_numpy(model(x, training=False))
    actual = to_numpy(result.model(x, training=False))
    np.testing.assert_allclose(actual, expected, atol=1e-5)


# ------------------------------------------------------------------- shrinks


def test_sequential_neuron_pruned_model_shrinks_with_equal_outputs(x):
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((8,)),
                SparseLinear(6, activation="relu", granularity="neuron", name="fc1"),
                keras.layers.Dropout(0.5),
                SparseLinear(5, activation="tanh", granularity="neuron", name="fc2"),
                keras.layers.Dense(3, name="out"),
            ]
        )
    )
    fc1, fc2 = sparse_layers(model)
    _prune_neurons(fc1, [0, 3, 4])
    _prune_neurons(fc2, [1])
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    rows = _rows(result)
    assert (rows["fc1"].units_before, rows["fc1"].units_after) == (6, 3)
    assert (rows["fc2"].inputs_after, rows["fc2"].units_after) == (3, 4)
    assert (rows["out"].inputs_after, rows["out"].units_after) == (4, 3)
    assert all(row.dead_kept == 0 and row.reason is None for row in result.layers)
    # Plain Keras layers only, with the weights of the surviving neurons.
    assert not sparse_layers(result.model)
    kept = [1, 2, 5]
    np.testing.assert_array_equal(
        to_numpy(result.model.get_layer("fc1").kernel), to_numpy(fc1.kernel)[:, kept]
    )
    assert result.params_after < result.params_before
    assert result.flops_before == 2 * (8 * 6 + 6 * 5 + 5 * 3)
    assert result.flops_after == 2 * (8 * 3 + 3 * 4 + 4 * 3)
    assert "fc1" in str(result) and "6 -> 3" in str(result)


def test_constants_fold_through_batch_norm_and_activation_into_a_new_bias(x):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, name="fc1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("sigmoid", name="act")(h)
    outputs = keras.layers.Dense(2, use_bias=False, name="out")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("fc1"), [1, 4])
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    new = result.model
    assert new.get_layer("fc1").units == 4
    assert new.get_layer("bn").moving_mean.shape == (4,)
    # sigmoid(...) of a dead neuron is not zero: `out` needs a bias to hold it.
    assert new.get_layer("out").use_bias


def test_a_stripped_dense_model_shrinks_too(x):
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(7, activation="relu", name="a"),
                keras.layers.Dense(5, activation="elu", name="b"),
                keras.layers.Dense(2, name="c"),
            ]
        )
    )
    _kill(model.get_layer("a"), [0, 6])
    _kill(model.get_layer("b"), [2])
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    assert [layer.units for layer in result.model.layers] == [5, 4, 2]


def test_a_neuron_left_dead_by_the_previous_layer_is_removed_too(x):
    # b's neuron 0 reads only a's neuron 3: once 3 is gone, it is constant.
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(4, activation="relu", name="a"),
                keras.layers.Dense(3, activation="relu", name="b"),
                keras.layers.Dense(2, name="c"),
            ]
        )
    )
    _kill(model.get_layer("a"), [3])
    kernel = to_numpy(model.get_layer("b").kernel).copy()
    kernel[:3, 0] = 0.0
    model.get_layer("b").kernel.assign(kernel)
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    assert [layer.units for layer in result.model.layers] == [3, 2, 2]


def test_input_model_is_not_modified(x):
    model = _randomize(
        keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    )
    _kill(model.layers[0], [1])
    before = [to_numpy(w).copy() for w in model.weights]
    shrink(model)
    for b, w in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(b, to_numpy(w))


# ------------------------------------------------------------------ refusals


def _branch_model():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, activation="relu", name="trunk")(inputs)
    a = keras.layers.Dense(2, name="head_a")(h)
    b = keras.layers.Dense(2, name="head_b")(h)
    return keras.Model(inputs, [a, b])


def test_a_branch_into_two_dense_layers_loses_its_dead_neurons_in_both(x):
    model = _randomize(_branch_model())
    _kill(model.get_layer("trunk"), [2])
    result = shrink(model)
    rows = _rows(result)
    assert (rows["trunk"].units_after, rows["trunk"].dead_kept) == (5, 0)
    assert rows["head_a"].inputs_after == rows["head_b"].inputs_after == 5
    for actual, expected in zip(result.model(x), model(x), strict=True):
        np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), atol=1e-5)


def test_a_branch_into_an_unknown_layer_keeps_its_dead_neurons_and_says_why(x):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, activation="relu", name="trunk")(inputs)
    a = keras.layers.Dense(2, name="head_a")(h)
    b = keras.layers.LayerNormalization(name="norm")(h)
    model = _randomize(keras.Model(inputs, [a, b]))
    _kill(model.get_layer("trunk"), [2])
    result = shrink(model)
    row = _rows(result)["trunk"]
    assert (row.units_after, row.dead_kept) == (6, 1)
    assert "'norm' (LayerNormalization)" in row.reason
    for actual, expected in zip(result.model(x), model(x), strict=True):
        np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), atol=1e-5)


def test_an_unknown_layer_in_between_keeps_the_neurons(x):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(6, name="fc1")(inputs)
    h = keras.layers.Softmax(name="softmax")(h)
    outputs = keras.layers.Dense(2, name="out")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("fc1"), [0])
    result = shrink(model)
    row = _rows(result)["fc1"]
    assert row.units_after == 6 and row.dead_kept == 1
    assert "'softmax' (Softmax)" in row.reason
    _assert_same_outputs(model, result, x)


def test_a_softmax_activation_keeps_the_neurons():
    model = _randomize(
        keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(4, activation="softmax"), keras.layers.Dense(2)]
        )
    )
    _kill(model.layers[0], [0])
    row = shrink(model).layers[0]
    assert row.dead_kept == 1 and "not elementwise" in row.reason


def test_the_output_layer_keeps_its_neurons(x):
    model = _randomize(
        keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(3, name="out")]
        )
    )
    _kill(model.get_layer("out"), [1])
    result = shrink(model)
    row = _rows(result)["out"]
    assert row.units_after == 3 and row.dead_kept == 1 and "output of the model" in row.reason
    _assert_same_outputs(model, result, x)


def test_a_layer_with_every_neuron_dead_keeps_one(x):
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(3, activation="relu", name="a"),
                keras.layers.Dense(2),
            ]
        )
    )
    _kill(model.get_layer("a"), [0, 1, 2])
    result = shrink(model)
    row = _rows(result)["a"]
    assert (row.units_after, row.dead_kept) == (1, 1)
    assert "every unit of 'a' (Dense) is dead" in row.reason
    _assert_same_outputs(model, result, x)


def test_subclassed_models_and_non_models_are_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    with pytest.raises(ValueError, match="subclassed"):
        shrink(Net())
    with pytest.raises(TypeError, match="expects a Keras model"):
        shrink(keras.layers.Dense(2))


@pytest.mark.parametrize("granularity, warns", [("weight", True), ("neuron", False)])
def test_a_model_pruning_single_weights_that_shrinks_by_nothing_says_what_shrink_needs(
    granularity, warns
):
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((8,)),
                SparseLinear(6, activation="relu", granularity=granularity, name="hidden"),
                keras.layers.Dense(2, name="out"),
            ]
        )
    )
    # Each unit's threshold at its weights' median magnitude: half of every unit's
    # weights go, and no unit dies whole (a unit's RMS is above its median magnitude).
    for layer in sparse_layers(model):
        layer.reset_threshold(np.median(np.abs(to_numpy(layer.kernel)), axis=0))
        layer.hard_prune()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = shrink(model)
    said = [str(w.message) for w in caught if "removed nothing" in str(w.message)]
    assert result.params_after == result.params_before
    assert len(said) == int(warns)
    if warns:
        assert "granularity='weight'" in said[0] and "granularity='neuron'" in said[0]

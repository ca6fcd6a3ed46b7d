"""`shrink` through convolutional graphs: dead filters out, outputs equal, refusals with why.

Each model is a stock Keras model whose chosen filters are zeroed, as `hard_prune()` leaves
them; the reference for the shrunk model is the original model's own output.
"""

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

import keras_sparse as ks
from keras_sparse import shrink


def _randomize(model, seed=1):
    """Random weights everywhere (batch-norm variances positive), so nothing is zero by luck."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, size=w.shape).astype("float32")
                if "variance" in w.path
                else rng.normal(scale=0.5, size=w.shape).astype("float32")
                for w in layer.weights
            ]
        )
    return model


def _kill(layer, units):
    """Zero whole output units (last kernel axis) of a Dense or convolution layer."""
    kernel = to_numpy(layer.kernel).copy()
    kernel[..., units] = 0.0
    layer.kernel.assign(kernel)


def _images(rng, shape=(4, 12, 12, 3)):
    return rng.normal(size=shape).astype("float32")


def _assert_same_outputs(model, result, x):
    expected = to_numpy(model(x, training=False))
    actual = to_numpy(result.model(x, training=False))
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


def _rows(result):
    return {row.name: row for row in result.layers}


def _cnn():
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(8, 3, name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.MaxPooling2D(padding="same", name="pool")(h)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    outputs = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, outputs)


def test_dead_filters_leave_conv_batch_norm_and_the_flattened_dense(rng):
    model = _randomize(_cnn())
    _kill(model.get_layer("conv1"), [1, 5])
    _kill(model.get_layer("conv2"), [0, 2, 3])
    x = _images(rng)
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    rows = _rows(result)
    assert (rows["conv1"].units_after, rows["conv2"].inputs_after) == (6, 6)
    assert (rows["conv2"].units_after, rows["out"].inputs_after) == (3, 3 * 3 * 3)
    assert result.model.get_layer("bn1").moving_mean.shape == (6,)
    assert result.params_after < result.params_before
    assert result.flops_after < result.flops_before
    assert all(row.dead_kept == 0 for row in result.layers)


def test_sparse_conv_neurons_pruned_by_their_thresholds_shrink(rng):
    # The user's path: neuron granularity, thresholds, hard_prune(), then shrink.
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            ks.SparseConv2D(8, 3, activation="relu", granularity="neuron", name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            ks.SparseLinear(4, name="out"),
        ]
    )
    conv = model.get_layer("conv")
    threshold = np.zeros(8, "float32")
    threshold[[0, 3, 4]] = 1e3
    conv.reset_threshold(threshold)
    conv.hard_prune()
    x = _images(rng)
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    assert _rows(result)["conv"].units_after == 5
    assert all(isinstance(layer, keras.layers.Layer) for layer in result.model.layers)
    modules = [type(layer).__module__ for layer in result.model.layers]
    assert not any(module.startswith("keras_sparse") for module in modules)


def _residual(kill_a, kill_b):
    inputs = keras.Input((10, 10, 2))
    a = keras.layers.Conv2D(5, 3, name="conv_a")(inputs)
    b = keras.layers.Conv2D(5, 3, name="conv_b")(inputs)
    h = keras.layers.Add(name="add")([a, b])
    h = keras.layers.Activation("tanh", name="act")(h)
    outputs = keras.layers.Conv2D(2, 3, name="conv_out")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("conv_a"), kill_a)
    _kill(model.get_layer("conv_b"), kill_b)
    return model


def test_an_add_removes_the_channels_where_every_branch_is_dead(rng):
    model = _residual(kill_a=[1, 3], kill_b=[1, 4])
    x = _images(rng, (3, 10, 10, 2))
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    rows = _rows(result)
    assert rows["conv_a"].units_after == rows["conv_b"].units_after == 4
    assert rows["conv_out"].inputs_after == 4
    # Channel 3 of conv_a and 4 of conv_b meet live channels of the other branch.
    assert rows["conv_a"].dead_kept == 1 and "'add' (Add)" in rows["conv_a"].reason
    assert "not dead" in rows["conv_b"].reason


def test_a_residual_written_with_plus_is_followed_too(rng):
    inputs = keras.Input((8,))
    a = keras.layers.Dense(6, name="a")(inputs)
    b = keras.layers.Dense(6, name="b")(inputs)
    outputs = keras.layers.Dense(2, name="out")(a + b)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("a"), [0, 2])
    _kill(model.get_layer("b"), [0, 2])
    x = rng.normal(size=(5, 8)).astype("float32")
    result = shrink(model)
    _assert_same_outputs(model, result, x)
    assert _rows(result)["out"].inputs_after == 4


def test_a_same_padded_conv_keeps_a_nonzero_constant_and_says_why(rng):
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, activation="sigmoid", name="conv1")(inputs)
    outputs = keras.layers.Conv2D(2, 3, padding="same", name="conv2")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("conv1"), [2])
    result = shrink(model)
    _assert_same_outputs(model, result, _images(rng, (2, 8, 8, 2)))
    row = _rows(result)["conv1"]
    assert (row.units_after, row.dead_kept) == (4, 1)
    assert "'conv2' (Conv2D) pads its input with zeros" in row.reason


def test_a_same_padded_conv_takes_a_constant_that_is_zero(rng):
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    outputs = keras.layers.Conv2D(2, 3, padding="same", name="conv2")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("conv1"), [2])
    bias = to_numpy(model.get_layer("conv1").bias).copy()
    bias[2] = -1.0  # relu(-1) = 0: the dead filter outputs exact zeros
    model.get_layer("conv1").bias.assign(bias)
    result = shrink(model)
    _assert_same_outputs(model, result, _images(rng, (2, 8, 8, 2)))
    assert _rows(result)["conv1"].units_after == 3


def test_a_same_padded_one_by_one_conv_pads_nothing_and_takes_any_constant(rng):
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, activation="sigmoid", name="conv1")(inputs)
    outputs = keras.layers.Conv2D(2, 1, strides=2, padding="same", name="conv2")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("conv1"), [2])
    result = shrink(model)
    _assert_same_outputs(model, result, _images(rng, (2, 8, 8, 2)))
    assert _rows(result)["conv1"].units_after == 3


def test_a_depthwise_channel_goes_with_its_input_channel(rng):
    inputs = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(6, 1, name="expand")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(6.0, name="relu6")(h)
    h = keras.layers.DepthwiseConv2D(3, name="depthwise")(h)
    outputs = keras.layers.Conv2D(4, 1, name="project")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("expand"), [0, 4])
    result = shrink(model)
    _assert_same_outputs(model, result, _images(rng, (2, 9, 9, 3)))
    rows = _rows(result)
    assert rows["expand"].units_after == 4
    assert (rows["depthwise"].inputs_after, rows["depthwise"].units_after) == (4, 4)
    assert rows["project"].inputs_after == 4


def test_a_concatenation_keeps_each_input_in_its_place(rng):
    inputs = keras.Input((8,))
    a = keras.layers.Dense(3, activation="relu", name="a")(inputs)
    b = keras.layers.Dense(4, activation="relu", name="b")(inputs)
    h = keras.layers.Concatenate(name="cat")([a, b])
    outputs = keras.layers.Dense(2, name="out")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("a"), [1])
    _kill(model.get_layer("b"), [0, 3])
    result = shrink(model)
    _assert_same_outputs(model, result, rng.normal(size=(5, 8)).astype("float32"))
    assert _rows(result)["out"].inputs_after == 4


def test_feed_forward_neurons_of_a_transformer_block_shrink(rng):
    # The residual stream meets LayerNormalization and attention: it stays whole.
    inputs = keras.Input((5, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="attention")(inputs, inputs)
    h = keras.layers.LayerNormalization(name="norm")(inputs + h)
    f = keras.layers.Dense(16, activation="gelu", name="ffn_in")(h)
    f = keras.layers.Dense(8, name="ffn_out")(f)
    outputs = keras.layers.LayerNormalization(name="norm2")(h + f)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("ffn_in"), [0, 5, 6, 15])
    _kill(model.get_layer("ffn_out"), [1])
    result = shrink(model)
    _assert_same_outputs(model, result, rng.normal(size=(2, 5, 8)).astype("float32"))
    rows = _rows(result)
    assert (rows["ffn_in"].units_after, rows["ffn_out"].inputs_after) == (12, 12)
    assert rows["ffn_out"].dead_kept == 1 and "not dead" in rows["ffn_out"].reason


def test_a_model_of_dead_convolutions_only_still_has_one_filter_per_layer(rng):
    model = _randomize(
        keras.Sequential(
            [
                keras.Input((6, 6, 1)),
                keras.layers.Conv2D(3, 3, name="conv"),
                keras.layers.GlobalMaxPooling2D(),
                keras.layers.Dense(2),
            ]
        )
    )
    _kill(model.get_layer("conv"), [0, 1, 2])
    result = shrink(model)
    _assert_same_outputs(model, result, _images(rng, (2, 6, 6, 1)))
    row = _rows(result)["conv"]
    assert (row.units_after, row.dead_kept) == (1, 1) and "every unit" in row.reason


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_average_pooling_passes_constants_on_every_backend(rng, padding):
    inputs = keras.Input((7, 7, 2))
    h = keras.layers.Conv2D(4, 2, activation="tanh", name="conv")(inputs)
    h = keras.layers.AveragePooling2D(3, strides=2, padding=padding)(h)
    outputs = keras.layers.Conv2D(2, 2, name="conv2")(h)
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("conv"), [3])
    result = shrink(model)
    _assert_same_outputs(model, result, _images(rng, (2, 7, 7, 2)))
    assert _rows(result)["conv"].units_after == 3


def test_a_channels_first_conv_keeps_its_dead_filters_and_says_why(rng):
    inputs = keras.Input((3, 8, 8))
    h = keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("conv"), [1])
    result = shrink(model)
    row = _rows(result)["conv"]
    assert (row.units_after, row.dead_kept) == (4, 1) and "channels_first" in row.reason


def test_dead_units_inside_a_nested_model_are_reported_not_silently_kept(rng):
    inner = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="inner_fc"), keras.layers.Dense(2)],
        name="inner",
    )
    inputs = keras.Input((6,))
    model = _randomize(keras.Model(inputs, inner(keras.layers.Dense(6, name="fc")(inputs))))
    _kill(inner.get_layer("inner_fc"), [0, 3])
    with pytest.warns(UserWarning, match=r"inside nested models.*'inner_fc' \(2\)"):
        result = shrink(model)
    _assert_same_outputs(model, result, rng.normal(size=(3, 6)).astype("float32"))


def test_an_add_that_broadcasts_keeps_its_channels_and_says_why(rng):
    inputs = keras.Input((6,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(1, name="b")(inputs)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.Add(name="add")([a, b]))
    model = _randomize(keras.Model(inputs, outputs))
    _kill(model.get_layer("a"), [1])
    result = shrink(model)
    row = _rows(result)["a"]
    assert row.dead_kept == 1 and "broadcasts" in row.reason
    _assert_same_outputs(model, result, rng.normal(size=(3, 6)).astype("float32"))


def test_an_operation_that_keeps_dead_units_is_named_as_an_operation(rng):
    # `h + 3` (MobileNetV3's hard sigmoid) is an operation the functional model records
    # as `Add`: the reason must not read as the Add layer, which shrink passes through.
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4, name="fc")(inputs)
    model = _randomize(keras.Model(inputs, keras.layers.Dense(2, name="out")(h + 3.0)))
    _kill(model.get_layer("fc"), [1])
    result = shrink(model)
    row = _rows(result)["fc"]
    assert row.dead_kept == 1 and "(the operation Add, not a layer)" in row.reason
    _assert_same_outputs(model, result, rng.normal(size=(3, 6)).astype("float32"))


@pytest.mark.parametrize(
    "layer",
    [
        keras.layers.SeparableConv2D(4, 3, name="conv"),
        keras.layers.Conv2DTranspose(4, 3, name="conv"),
    ],
    ids=["separable", "transpose"],
)
def test_layers_shrink_does_not_cut_report_their_dead_units(layer, rng):
    inputs = keras.Input((6, 6, 2))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(layer(inputs)))
    model = _randomize(keras.Model(inputs, outputs))
    conv = model.get_layer("conv")
    attribute = "pointwise_kernel" if hasattr(conv, "pointwise_kernel") else "kernel"
    kernel = to_numpy(getattr(conv, attribute)).copy()
    if attribute == "pointwise_kernel":  # (1, 1, channels, filters)
        kernel[..., 2] = 0.0
    else:  # a transposed conv's kernel is (*taps, filters, input channels)
        kernel[..., 1, :] = 0.0
    getattr(conv, attribute).assign(kernel)
    row = _rows(shrink(model))["conv"]
    assert (row.units_before, row.units_after, row.dead_kept) == (4, 4, 1)
    assert f"a {type(conv).__name__} layer" in row.reason

"""`run_layer_checks`: the generic contract every Keras layer should meet.

In the spirit of Keras's own `run_layer_test`, but using only the public
`keras` API (no `keras.src`), so it keeps working across Keras releases.
"""

import os
import tempfile

import keras
import numpy as np
from backend_utils import to_numpy


def _batch(input_shape, seed=0):
    shape = tuple(2 if d is None else d for d in input_shape)
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _expected_output_shape(layer, input_shape):
    return tuple(input_shape[:-1]) + (layer.units,)


def _model(layer, input_shape):
    inputs = keras.Input(shape=tuple(input_shape[1:]), batch_size=input_shape[0])
    return keras.Model(inputs, layer(inputs))


def check_config_round_trip(layer_cls, init_kwargs):
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config


def check_serialize_deserialize(layer_cls, init_kwargs):
    layer = layer_cls(**init_kwargs)
    serialized = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is layer_cls
    assert clone.get_config() == layer.get_config()
    assert keras.saving.serialize_keras_object(clone) == serialized


def check_weight_counts(layer_cls, init_kwargs, input_shape, n_trainable, n_non_trainable):
    layer = layer_cls(**init_kwargs)
    assert not layer.built
    layer.build(input_shape)
    assert layer.built
    assert len(layer.trainable_weights) == n_trainable
    assert len(layer.non_trainable_weights) == n_non_trainable
    assert len(layer.weights) == n_trainable + n_non_trainable


def check_symbolic_call(layer_cls, init_kwargs, input_shape):
    layer = layer_cls(**init_kwargs)
    inputs = keras.Input(shape=tuple(input_shape[1:]), batch_size=input_shape[0])
    outputs = layer(inputs)
    assert tuple(outputs.shape) == _expected_output_shape(layer, input_shape)
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(outputs.shape)


def check_eager_call(layer_cls, init_kwargs, input_shape):
    layer = layer_cls(**init_kwargs)
    x = _batch(input_shape)
    for training in (False, True):
        out = to_numpy(layer(x, training=training))
        assert out.shape == _expected_output_shape(layer, x.shape)
        assert out.dtype == np.float32
        assert np.all(np.isfinite(out))


def check_one_fit_step(layer_cls, init_kwargs, input_shape):
    layer = layer_cls(**init_kwargs)
    model = _model(layer, input_shape)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    x = _batch(input_shape)
    y = _batch(_expected_output_shape(layer, x.shape), seed=1)
    before = [to_numpy(w) for w in layer.trainable_weights]
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [to_numpy(w) for w in layer.trainable_weights]
    # at least the kernel and the bias receive a gradient and move
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def check_keras_file_round_trip(layer_cls, init_kwargs, input_shape):
    layer = layer_cls(**init_kwargs)
    model = _model(layer, input_shape)
    x = _batch(input_shape)
    expected = to_numpy(model.predict(x, verbose=0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    assert type(reloaded.layers[-1]) is layer_cls
    np.testing.assert_array_equal(to_numpy(reloaded.predict(x, verbose=0)), expected)


def check_mixed_precision(layer_cls, init_kwargs, input_shape):
    layer = layer_cls(**init_kwargs, dtype="mixed_float16")
    x = _batch(input_shape)
    out = layer(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert np.all(np.isfinite(to_numpy(out)))
    # Every floating weight stays float32; `prune_mask` is boolean.
    assert {w.dtype for w in layer.weights} <= {"float32", "bool"}


def run_layer_checks(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_trainable_weights,
    expected_non_trainable_weights,
):
    """Run every generic check on `layer_cls(**init_kwargs)` for `input_shape`.

    `input_shape` includes the batch size, e.g. `(2, 3)`.
    """
    input_shape = tuple(input_shape)
    check_config_round_trip(layer_cls, init_kwargs)
    check_serialize_deserialize(layer_cls, init_kwargs)
    check_weight_counts(
        layer_cls,
        init_kwargs,
        input_shape,
        expected_trainable_weights,
        expected_non_trainable_weights,
    )
    check_symbolic_call(layer_cls, init_kwargs, input_shape)
    check_eager_call(layer_cls, init_kwargs, input_shape)
    check_one_fit_step(layer_cls, init_kwargs, input_shape)
    check_keras_file_round_trip(layer_cls, init_kwargs, input_shape)
    check_mixed_precision(layer_cls, init_kwargs, input_shape)

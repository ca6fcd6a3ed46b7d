"""Bad input gets an error naming the argument and the value; nothing changes."""

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

from keras_sparse import SparseLinear, sparsify, strip


@pytest.mark.parametrize("units", [0, -3, 2.5, "8", True, None])
def test_units_must_be_a_positive_integer(units):
    with pytest.raises(ValueError, match=r"`units`.*units="):
        SparseLinear(units)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_positive_and_finite(temperature):
    with pytest.raises(ValueError, match=r"`temperature`.*temperature="):
        SparseLinear(4, temperature=temperature)
    layer = SparseLinear.new(3, 2, temperature=2.0)
    with pytest.raises(ValueError, match=r"temperature="):
        layer.temperature = temperature
    assert layer.temperature == 2.0


def test_temperature_must_be_a_number():
    with pytest.raises(TypeError, match=r"temperature='hot'"):
        SparseLinear(4, temperature="hot")


def test_inference_mask_must_be_known():
    with pytest.raises(ValueError, match=r"inference_mask='fuzzy'"):
        SparseLinear(4, inference_mask="fuzzy")


def test_unknown_last_input_dimension_is_refused():
    with pytest.raises(ValueError, match=r"last dimension.*input_shape=\(None, None\)"):
        SparseLinear(4).build((None, None))


def test_input_with_another_last_dimension_is_refused(rng):
    layer = SparseLinear.new(5, 3)
    with pytest.raises(ValueError, match=r"axis -1.*5.*"):
        layer(rng.normal(size=(2, 6)).astype("float32"))


def test_rank_one_input_is_refused():
    layer = SparseLinear(3)
    with pytest.raises(ValueError, match="ndim"):
        layer(np.ones((5,), "float32"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, [0.1, -0.2, 0.3]])
def test_reset_threshold_refuses_bad_values_and_changes_nothing(value):
    layer = SparseLinear.new(4, 3)
    layer.reset_threshold(0.2)
    before = [to_numpy(w).copy() for w in layer.weights]
    with pytest.raises(ValueError, match=r"`value`.*value="):
        layer.reset_threshold(value)
    for old, new in zip(before, layer.weights):
        np.testing.assert_array_equal(old, to_numpy(new))


def test_reset_threshold_refuses_a_shape_that_does_not_broadcast():
    layer = SparseLinear.new(4, 3)
    with pytest.raises(ValueError, match=r"does not broadcast"):
        layer.reset_threshold([0.1, 0.2])


@pytest.mark.parametrize(
    "method", ["density", "sparsity", "num_active", "hard_prune", "effective_weight"]
)
def test_weight_methods_on_an_unbuilt_layer_are_refused(method):
    layer = SparseLinear(3, name="unbuilt")
    with pytest.raises(ValueError, match=rf"`{method}\(\)`.*'unbuilt' is not built"):
        getattr(layer, method)()


def test_reset_threshold_on_an_unbuilt_layer_is_refused():
    with pytest.raises(ValueError, match="not built"):
        SparseLinear(3).reset_threshold(0.1)


@pytest.mark.parametrize("in_features", [0, -1, 1.5])
def test_factories_refuse_bad_sizes(in_features):
    with pytest.raises(ValueError, match=r"in_features="):
        SparseLinear.new(in_features, 3)
    with pytest.raises(ValueError, match=r"units="):
        SparseLinear.unstructured(3, 0)


def test_with_bias_needs_a_bool():
    with pytest.raises(TypeError, match=r"bias='yes'"):
        SparseLinear.with_bias(3, 2, "yes")


@pytest.mark.parametrize(
    "name, value", [("structured", "no"), ("straight_through", 1), ("structured", None)]
)
def test_bool_options_must_be_bools(name, value):
    with pytest.raises(TypeError, match=rf"`{name}`, expected a bool\. Received: {name}={value!r}"):
        SparseLinear(4, **{name: value})


def test_a_bool_is_not_a_temperature():
    with pytest.raises(TypeError, match=r"temperature=True"):
        SparseLinear(4, temperature=True)


def test_head_granularity_points_to_the_attention_layer():
    with pytest.raises(ValueError, match=r"SparseMultiHeadAttention.*granularity='head'"):
        SparseLinear(4, granularity="head")


def test_an_unknown_granularity_lists_head_beside_the_others():
    # 'head' is a granularity of sparsify and of the attention layers: a typo's error names it.
    with pytest.raises(ValueError, match=r"'n:m'\), or 'head' for attention.*granularity='heads'"):
        sparsify(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), granularity="heads")


@pytest.mark.parametrize("strip", ["yes", "no", 1])
def test_export_model_refuses_a_strip_that_is_not_a_bool_and_writes_nothing(tmp_path, strip):
    from keras_sparse import export_model

    model = sparsify(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    path = tmp_path / "model.onnx"
    with pytest.raises(TypeError, match=f"expected a bool. Received: strip={strip!r}"):
        export_model(model, path, "onnx", strip=strip)
    assert not path.exists()


def test_export_model_names_a_model_that_is_not_a_keras_model(tmp_path):
    from keras_sparse import export_model

    with pytest.raises(TypeError, match=r"`export_model\(\)` expects a Keras model"):
        export_model("model.keras", tmp_path / "model.onnx", "onnx")


@pytest.mark.parametrize(
    "given, name",
    [
        ({"layers": ["fc1"]}, "layers"),
        ({"layers": []}, "layers"),
        ({"temperature": 5}, "temperature"),
    ],
)
def test_the_scheduler_checks_its_layers_and_temperature_when_made(given, name):
    from keras_sparse import SparsityScheduler

    with pytest.raises(TypeError, match=f"invalid value for `{name}`.*Received: {name}="):
        SparsityScheduler(0.5, **given)


class _Unregistered(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4)

    def call(self, x, training=None):
        return self.hidden(x, training=training)


def test_strip_of_a_subclassed_model_it_cannot_rebuild_says_what_it_needs():
    # sparsify(inplace=True) converts such a model; strip then failed with Keras's raw
    # "Could not locate class" (a new-user trial).
    model = _Unregistered()
    model(np.zeros((1, 3), "float32"))
    sparsify(model, inplace=True)
    with pytest.raises(ValueError, match=r"strip\(\) rebuilds model .*register_keras_serializable"):
        strip(model)

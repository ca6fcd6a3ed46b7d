"""`sparsify`, `strip` and `sparsity_report`: model-level conversions."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

from keras_sparse import (
    DEFAULT_RELATIVE_TEMPERATURE,
    PolynomialDecay,
    SparseLinear,
    SparsityScheduler,
    sparse_layers,
    sparsify,
    sparsity_report,
    strip,
)


def _dense_model():
    inputs = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="logits")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    for layer in model.layers[1:]:
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    return model


def _forward(x, kernels, biases):
    h = np.maximum(x @ kernels[0] + biases[0], 0.0)
    return h @ kernels[1] + biases[1]


def _pruned_sparse_model():
    """A sparsified model with thresholds at 0.5, plus the NumPy kernels it serves."""
    model = sparsify(_dense_model())
    served = []
    for layer in sparse_layers(model):
        kernel = to_numpy(layer.kernel)
        layer.reset_threshold(0.5)
        served.append(np.where(np.abs(kernel) >= 0.5, kernel, 0.0))
    return model, served


@pytest.fixture
def x(rng):
    return rng.normal(size=(4, 6)).astype("float32")


# ----------------------------------------------------------------- sparsify


def test_sparsify_replaces_every_dense_layer_by_name():
    model = sparsify(_dense_model())
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer",
        "SparseLinear",
        "SparseLinear",
    ]
    assert [layer.name for layer in model.layers[1:]] == ["hidden", "logits"]


def test_sparsify_copies_kernel_and_bias():
    dense = _dense_model()
    model = sparsify(dense)
    for old, new in zip(dense.layers[1:], model.layers[1:], strict=True):
        np.testing.assert_array_equal(to_numpy(new.kernel), to_numpy(old.kernel))
        np.testing.assert_array_equal(to_numpy(new.bias), to_numpy(old.bias))


def test_sparsify_keeps_inference_outputs(x):
    dense = _dense_model()
    kernels = [to_numpy(layer.kernel) for layer in dense.layers[1:]]
    biases = [to_numpy(layer.bias) for layer in dense.layers[1:]]
    outputs = sparsify(dense).predict(x, verbose=0)
    np.testing.assert_allclose(outputs, _forward(x, kernels, biases), rtol=1e-5, atol=1e-6)


def test_sparsify_copies_the_layer_configuration():
    inputs = keras.Input((4,))
    layer = keras.layers.Dense(
        2,
        activation="tanh",
        use_bias=False,
        kernel_initializer="ones",
        kernel_regularizer=keras.regularizers.L2(0.25),
        kernel_constraint="non_neg",
        name="frozen",
    )
    layer.trainable = False
    (new,) = sparse_layers(sparsify(keras.Model(inputs, layer(inputs))))
    assert new.activation is keras.activations.tanh
    assert new.use_bias is False and new.bias is None
    assert isinstance(new.kernel_initializer, keras.initializers.Ones)
    assert new.kernel_regularizer.l2 == pytest.approx(0.25)
    assert isinstance(new.kernel_constraint, keras.constraints.NonNeg)
    assert new.trainable is False


def test_sparsify_returns_a_sequential_for_a_sequential(x):
    dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="only")])
    model = sparsify(dense)
    assert isinstance(model, keras.Sequential)
    assert isinstance(model.layers[0], SparseLinear)
    np.testing.assert_allclose(model.predict(x, verbose=0), dense.predict(x, verbose=0), atol=1e-6)


def test_sparsify_reaches_dense_layers_of_nested_models():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="inner_dense")])
    inputs = keras.Input((6,))
    model = sparsify(keras.Model(inputs, inner(inputs)))
    assert [layer.name for layer in sparse_layers(model)] == ["inner_dense"]


def test_sparsify_select_regex_searches_layer_names():
    model = sparsify(_dense_model(), select="^log")
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["Dense", "SparseLinear"]


def test_sparsify_select_callable_is_a_predicate():
    model = sparsify(_dense_model(), select=lambda layer: layer.units == 5)
    assert [layer.name for layer in sparse_layers(model)] == ["hidden"]


@pytest.mark.parametrize(
    "select, converted",
    [
        (keras.layers.Dense, ["hidden", "logits"]),
        ([keras.layers.Dense], ["hidden", "logits"]),
        (["^hid", "^log"], ["hidden", "logits"]),
        ([keras.layers.Conv2D, "^logits$"], ["logits"]),
        ((keras.layers.Conv2D, "^hidden$"), ["hidden"]),
    ],
    ids=["class", "class_list", "regex_list", "class_or_regex", "tuple"],
)
def test_sparsify_select_takes_classes_and_lists_of_classes_and_regexes(select, converted):
    model = sparsify(_dense_model(), select=select)
    assert [layer.name for layer in sparse_layers(model)] == converted


@pytest.mark.parametrize("select", [[], [1], ["^hid", 2.5], 3])
def test_sparsify_refuses_a_select_of_another_kind(select):
    with pytest.raises(TypeError, match=r"`select`.*Received: select="):
        sparsify(_dense_model(), select=select)


@pytest.mark.parametrize("select", ["[hidden", ["^logits$", "(hidden"]])
def test_sparsify_names_a_select_that_is_not_a_regular_expression(select):
    with pytest.raises(ValueError, match=r"is not a regular expression .*Received: select="):
        sparsify(_dense_model(), select=select)


def test_sparsify_in_place_converts_the_model_itself_and_drops_its_compiled_steps(x):
    dense = _dense_model()
    dense.compile("sgd", "mse")
    dense.fit(x, np.zeros((4, 3), "float32"), verbose=0)
    assert dense.train_function is not None
    result = sparsify(dense, inplace=True)
    assert result is dense
    assert [type(layer).__name__ for layer in dense.layers[1:]] == ["SparseLinear"] * 2
    assert dense.train_function is None and dense.predict_function is None


@pytest.mark.parametrize("inplace", ["no", 0, None])
def test_sparsify_refuses_an_inplace_that_is_not_a_bool_and_leaves_the_model(inplace):
    dense = _dense_model()
    with pytest.raises(TypeError, match=f"expected a bool. Received: inplace={inplace!r}"):
        sparsify(dense, inplace=inplace)
    assert [type(layer).__name__ for layer in dense.layers[1:]] == ["Dense"] * 2


def test_sparsify_and_strip_return_models_that_are_not_compiled(x):
    dense = _dense_model()
    dense.compile("adam", "mse")
    sparse = sparsify(dense)
    assert not sparse.compiled and getattr(sparse, "optimizer", None) is None
    sparse.compile("adam", "mse")
    stripped = strip(sparse)
    assert not stripped.compiled and getattr(stripped, "optimizer", None) is None


def test_sparsify_and_strip_name_themselves_when_given_something_else():
    with pytest.raises(TypeError, match=r"`sparsify\(\)` expects a Keras model.*model='x'"):
        sparsify("x")
    with pytest.raises(TypeError, match=r"`strip\(\)` expects a Keras model.*model='x'"):
        strip("x")


def test_sparsify_converts_n_m_and_neuron_masks():
    for granularity in ("n:m", "neuron"):
        model = sparsify(_dense_model(), granularity=granularity)
        assert [layer.granularity for layer in sparse_layers(model)] == [granularity] * 2
    assert [layer.n_m for layer in sparse_layers(sparsify(_dense_model(), granularity="n:m"))] == [
        (2, 4)
    ] * 2


def test_layers_a_parent_rebuilds_stay_sparse_with_their_options_on_reload():
    # MultiHeadAttention builds its projections in code: sparsify records the conversion
    # (with its options) in the parent's config, and a reload converts them again.
    inputs = keras.Input((5, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
    model = keras.Model(inputs, attention(inputs, inputs))
    sparse = sparsify(model, structured=False)
    config = keras.saving.serialize_keras_object(sparse)
    reloaded = keras.saving.deserialize_keras_object(config)
    layers = sparse_layers(reloaded)
    assert len(layers) == 4  # query, key, value, output
    assert all(not layer.is_structured for layer in layers)


@keras.saving.register_keras_serializable("tests")
class EncoderWithHead(keras.Model):
    """A functional model whose config holds its sizes, built in code around a functional
    encoder it makes itself (as keras-hub's SegFormerBackbone does around its encoder's
    layers): the encoder's own config is never read back."""

    def __init__(self, units=5, **kwargs):
        encoder_inputs = keras.Input((4,))
        encoder = keras.Model(
            encoder_inputs, keras.layers.Dense(units, name="encoded")(encoder_inputs)
        )
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(2, name="head")(encoder(inputs))
        super().__init__(inputs, outputs, **kwargs)
        self.units = units

    def get_config(self):
        return {"units": self.units, "name": self.name}


def test_layers_of_a_functional_model_made_in_code_stay_sparse_on_reload(rng, tmp_path):
    # The encoder's graph captures its layers, but the file rebuilds the encoder from
    # EncoderWithHead's code, with stock layers: the load failed ("expected 2
    # variables, but received 7") unless the conversion is replayed from the outer model.
    model = EncoderWithHead(name="with_head")
    sparse = sparsify(model)
    for layer in sparse_layers(sparse):
        layer.threshold.assign(np.full(layer.threshold.shape, 0.3, "float32"))
        layer.hard_prune()  # the masks now differ from the stock layers' all-kept
    path = tmp_path / "with_head.keras"
    sparse.save(path)
    reloaded = keras.saving.load_model(path)
    assert sorted(layer.name for layer in sparse_layers(reloaded)) == ["encoded", "head"]
    x = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(to_numpy(reloaded(x)), to_numpy(sparse(x)), atol=1e-6)


def _left_dense_model():
    """A PReLU (a 4 x 5 alpha, no sparse version) before a Dense of 20 x 3."""
    inputs = keras.Input((4, 5))
    hidden = keras.layers.PReLU(name="prelu")(inputs)
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs, name="mixed")


def test_sparsify_warns_of_layers_left_dense_with_their_share():
    # Weight matrices of 20 + 60 values: the PReLU's alpha is 20 / 80 of them (the
    # bias is not counted, as `sparsity_report` does not count it).
    with pytest.warns(UserWarning) as caught:
        model = sparsify(_left_dense_model())
    (message,) = [str(w.message) for w in caught if "sparsify()" in str(w.message)]
    share = f"{20 / 80:.1%}"
    assert message == (
        "sparsify() left 1 selected layer(s) with weight matrices dense, "
        f"{share} of the weight-matrix values of 'mixed': 'prelu' (PReLU has no sparse "
        f"version; {share})"
    )
    assert [layer.name for layer in sparse_layers(model)] == ["fc"]
    (dense,) = sparsity_report(model).dense
    report_share = dense.params / (sparsity_report(model).total.total + dense.params)
    assert f"{report_share:.1%}" == share


def test_vectors_and_biases_of_any_rank_are_not_weight_matrices():
    # A class token shaped (1, 1, d) is a vector, and a GRU's bias (2, 3 * units) is a
    # bias: neither is a weight matrix left dense (a ViT's patch layer was reported as
    # left dense for its class token alone). The GRU's kernels are.
    class Token(keras.layers.Layer):
        def build(self, input_shape):
            self.token = self.add_weight(shape=(1, 1, input_shape[-1]), name="class_token")

        def call(self, inputs):
            return inputs + self.token

    inputs = keras.Input((3, 4))
    hidden = keras.layers.GRU(5, name="gru")(Token(name="token")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(hidden), name="recurrent")
    matrices = (4 * 15 + 5 * 15) + 5 * 2  # the GRU's kernels and the Dense's
    with pytest.warns(UserWarning) as caught:
        sparse = sparsify(model, inplace=True)  # custom layers: no copy through the config
    (message,) = [str(w.message) for w in caught if "sparsify()" in str(w.message)]
    share = f"{(4 * 15 + 5 * 15) / matrices:.1%}"
    assert message == (
        f"sparsify() left 1 selected layer(s) with weight matrices dense, {share} of the "
        f"weight-matrix values of 'recurrent': 'gru_cell' (GRUCell has no sparse version; "
        f"{share})"
    )
    assert [(d.class_name, d.params) for d in sparsity_report(sparse).dense] == [
        ("GRUCell", 4 * 15 + 5 * 15)
    ]


def test_kernels_with_an_axis_of_one_are_pruned_too():
    # A Dense on one input feature, (1, 3), and a Dense(1) head, (3, 1): kernels of a
    # class this package prunes, though vectors by shape (a first version of the rule
    # that keeps a class token out of the weight matrices left both dense, silently).
    inputs = keras.Input((1,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    report = sparsity_report(sparsify(model))
    assert [(r.name, r.shape) for r in report.rows] == [("hidden", (1, 3)), ("head", (3, 1))]
    assert report.coverage == 1.0


def test_lora_factors_and_quantization_scales_are_not_weights_left_dense():
    # enable_lora()'s factors update the masked kernel, and an int4 kernel's block scales
    # belong to it: neither is a matrix left dense beside it.
    model = sparsify(_dense_model())
    for layer in sparse_layers(model):
        layer.enable_lora(2)
    report = sparsity_report(model)
    assert report.dense == () and report.coverage == 1.0
    quantized = sparsify(_dense_model())
    config = keras.quantizers.Int4QuantizationConfig(block_size=2)
    quantized.quantize("int4", config=config)
    assert [v.name for v in quantized.get_layer("hidden").weights if "scale" in v.name]
    report = sparsity_report(quantized)
    assert report.dense == () and report.coverage == 1.0


def test_a_converted_layer_holding_a_matrix_its_class_does_not_prune_is_reported():
    # A subclass of a stock layer converts with its stock class's masks; a matrix it
    # adds is left dense, and said to be (keras-hub's untied `reverse_embeddings`, a
    # whole language model's output projection, was silently left dense).
    class EmbeddingWithHead(keras.layers.Embedding):
        def build(self, input_shape=None):
            super().build(input_shape)
            self.head = self.add_weight(shape=(self.output_dim, self.input_dim), name="head")

        def call(self, inputs):
            return keras.ops.matmul(super().call(inputs), self.head)

    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(inputs, EmbeddingWithHead(10, 4, name="tokens")(inputs), name="lm")
    with pytest.warns(UserWarning) as caught:
        sparse = sparsify(model, inplace=True)
    (message,) = [str(w.message) for w in caught if "sparsify()" in str(w.message)]
    assert "'tokens' (converted, but its head has no mask" in message, message
    assert f"{40 / 80:.1%}" in message
    report = sparsity_report(sparse)
    assert [(r.name, r.total) for r in report.rows] == [("tokens", 40)]
    assert [(d.name, d.params) for d in report.dense] == [("tokens", 40)]
    assert report.coverage == pytest.approx(0.5)


def test_a_model_whose_config_rebuilds_it_otherwise_is_refused_with_the_way_out():
    # keras-hub's LlamaBackbone leaves `tie_word_embeddings` out of its config: its copy
    # has a weight more or fewer than the model. The error says how to convert it anyway.
    @keras.saving.register_keras_serializable(package="keras_sparse_tests")
    class ForgetfulLayer(keras.layers.Layer):
        def __init__(self, extra=False, **kwargs):
            super().__init__(**kwargs)
            self.extra = extra

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 2), name="w")
            if self.extra:
                self.e = self.add_weight(shape=(2,), name="e")

        def call(self, inputs):
            return inputs @ self.w

        def get_config(self):
            return {"name": self.name}

    inputs = keras.Input((3,))
    hidden = ForgetfulLayer(extra=True, name="forgetful")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(hidden))
    with pytest.raises(ValueError, match=r"has 3 weights, the model 4: .*`inplace=True`"):
        sparsify(model)
    assert not sparse_layers(model)
    with pytest.warns(UserWarning, match="'forgetful'"):
        sparsify(model, inplace=True)
    assert [layer.name for layer in sparse_layers(model)] == ["fc"]


def test_sparsify_says_why_a_quantized_layer_is_left_dense():
    dense = _dense_model()
    dense.quantize("int8", filters="^hidden$")
    with pytest.warns(UserWarning, match=r"'hidden' \(quantized \(int8\);"):
        model = sparsify(dense)
    assert [layer.name for layer in sparse_layers(model)] == ["logits"]


def test_sparsify_without_a_match_lists_the_convertible_layers():
    with pytest.raises(ValueError, match=r"its convertible layers: \['hidden', 'logits'\]"):
        sparsify(_dense_model(), select="conv")


def test_sparsify_leaves_unselected_layers_weights_intact():
    dense = _dense_model()
    model = sparsify(dense, select="logits")
    np.testing.assert_array_equal(
        to_numpy(model.get_layer("hidden").kernel), to_numpy(dense.get_layer("hidden").kernel)
    )


def test_sparsify_without_a_match_says_so():
    with pytest.raises(ValueError, match=r"No convertible layer matched select='conv'"):
        sparsify(_dense_model(), select="conv")


def test_sparsify_refuses_what_is_not_a_keras_model():
    with pytest.raises(TypeError, match="Keras model"):
        sparsify("model.keras")


def test_sparsify_refuses_a_model_that_is_not_built():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    with pytest.raises(ValueError, match="'net' is not built"):
        sparsify(Net())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_a_model_built_under_mixed_precision_is_masked_in_float32(policy):
    # The stock kernels autocast to the compute dtype inside `call`; once sparse they are
    # read in float32, as a sparse layer's own: the mask of a weight that rounds below its
    # threshold in half precision keeps it, as `num_active` counts, and the penalty is the
    # float32 formula. Read in half precision, TensorFlow refused the float32 threshold.
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(2, use_bias=False, name="fc")(inputs)
    model = sparsify(keras.Model(inputs, outputs), temperature=10.0 / 3.0)
    layer = model.get_layer("fc")
    # 0.3011 rounds to 0.30078125 in bfloat16 and to 0.30102539 in float16, both below
    # its threshold 0.30106.
    kernel = np.array([[0.3011, 1.0], [0.5, -2.0]], "float32")
    threshold = np.array([0.30106, 0.1], "float32")
    layer.kernel.assign(kernel)
    layer.reset_threshold(threshold)
    x = np.eye(2, dtype="float32")
    assert layer.num_active() == 4
    served = to_numpy(keras.ops.cast(model(x), "float32"))
    hard = np.abs(kernel) >= threshold
    np.testing.assert_allclose(served, kernel * hard, rtol=1e-2)
    assert np.count_nonzero(served) == layer.num_active()
    layer.sparsity_penalty.assign(1.0 / 3.0)
    layer(x, training=True)
    soft = 1.0 / (1.0 + np.exp(-(np.abs(kernel.astype("float64")) - threshold) * 10.0 / 3.0))
    assert float(to_numpy(sum(layer.losses))) == pytest.approx(soft.mean() / 3.0, rel=1e-5)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, x, epochs=1, verbose=0)  # TensorFlow's train step ran the mask too


def test_a_model_built_under_a_half_precision_policy_trains_to_its_target_and_strips():
    # Its stock kernels are bfloat16 (no float32 copy): the mask is computed from their
    # float32 value, as a sparse layer's own float32 kernel. TensorFlow refused the mix.
    keras.config.set_dtype_policy("bfloat16")
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    model = sparsify(keras.Model(inputs, keras.layers.Dense(4, name="logits")(hidden)))
    assert model.get_layer("hidden").kernel.dtype == "bfloat16"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 4)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    schedule = PolynomialDecay(0.5, begin_step=0, end_step=12)
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[SparsityScheduler(schedule)])
    kernels = {layer.name: to_numpy(layer.effective_weight()) for layer in sparse_layers(model)}
    assert sum(np.count_nonzero(k) for k in kernels.values()) == (8 * 16 + 16 * 4) // 2
    served = to_numpy(keras.ops.cast(model(x), "float32"))
    stripped = strip(model)
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(to_numpy(stripped.get_layer(name).kernel), kernel)
    again = to_numpy(keras.ops.cast(stripped(x), "float32"))
    np.testing.assert_array_equal(again, served)


def test_sparsify_passes_layer_kwargs_to_every_layer():
    model = sparsify(_dense_model(), structured=False, straight_through=True)
    for layer in sparse_layers(model):
        assert tuple(layer.threshold.shape) == tuple(layer.kernel.shape)
        assert layer.straight_through is True


def test_sparsify_refuses_arguments_that_are_not_pruning_arguments():
    with pytest.raises(TypeError, match=r"Unknown pruning arguments \['units'\].*units=7"):
        sparsify(_dense_model(), units=7)


def test_sparsify_sets_the_default_temperature_from_the_copied_kernel():
    dense = _dense_model()
    model = sparsify(dense)
    for old, new in zip(dense.layers[1:], sparse_layers(model), strict=True):
        expected = DEFAULT_RELATIVE_TEMPERATURE / np.std(to_numpy(old.kernel))
        assert new.temperature == pytest.approx(expected, rel=1e-5)


def test_sparsify_does_not_touch_the_original():
    dense = _dense_model()
    kernel = to_numpy(dense.get_layer("hidden").kernel)
    model = sparsify(dense)
    sparse_layers(model)[0].reset_threshold(10.0)
    assert [type(layer).__name__ for layer in dense.layers[1:]] == ["Dense", "Dense"]
    np.testing.assert_array_equal(to_numpy(dense.get_layer("hidden").kernel), kernel)


# -------------------------------------------------------------------- strip


def test_strip_turns_every_sparse_layer_into_dense():
    model, _ = _pruned_sparse_model()
    stripped = strip(model)
    assert [type(layer) for layer in stripped.layers[1:]] == [keras.layers.Dense] * 2
    assert [layer.name for layer in stripped.layers[1:]] == ["hidden", "logits"]


def test_strip_kernel_is_the_pruned_kernel(x):
    model, served = _pruned_sparse_model()
    stripped = strip(model)
    for layer, kernel in zip(stripped.layers[1:], served, strict=True):
        np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)


def test_strip_writes_pruned_weights_as_positive_zeros():
    model, _ = _pruned_sparse_model()
    for layer in strip(model).layers[1:]:
        kernel = to_numpy(layer.kernel)
        assert (kernel == 0).any()
        assert not np.signbit(kernel[kernel == 0]).any()


def test_strip_serves_the_same_outputs(x):
    model, served = _pruned_sparse_model()
    biases = [to_numpy(layer.bias) for layer in sparse_layers(model)]
    expected = _forward(x, served, biases)
    np.testing.assert_allclose(strip(model).predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_strip_keeps_activation_and_regularizers():
    inputs = keras.Input((4,))
    layer = SparseLinear(
        2, activation="sigmoid", kernel_regularizer="l1", bias_constraint="non_neg"
    )
    stripped = strip(keras.Model(inputs, layer(inputs)))
    dense = stripped.layers[1]
    assert dense.activation is keras.activations.sigmoid
    assert isinstance(dense.kernel_regularizer, keras.regularizers.L1)
    assert isinstance(dense.bias_constraint, keras.constraints.NonNeg)


def test_strip_does_not_touch_the_original():
    model, _ = _pruned_sparse_model()
    kernel = to_numpy(sparse_layers(model)[0].kernel)
    strip(model)
    layer = sparse_layers(model)[0]
    assert isinstance(layer, SparseLinear)
    np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
    np.testing.assert_array_equal(to_numpy(layer.threshold), np.full(5, 0.5, "float32"))


def test_strip_without_a_sparse_layer_says_so():
    with pytest.raises(ValueError, match="no sparse layer"):
        strip(_dense_model())


@pytest.mark.slow
def test_stripped_model_loads_where_keras_sparse_is_not_importable(tmp_path, x):
    model, _ = _pruned_sparse_model()
    stripped = strip(model)
    stripped.save(tmp_path / "stripped.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", stripped.predict(x, verbose=0))
    script = textwrap.dedent(
        """
        import sys
        sys.modules["keras_sparse"] = None  # as if not installed (CI installs it)
        try:
            import keras_sparse
        except ImportError:
            pass
        else:
            sys.exit("keras_sparse is importable")
        import keras, numpy as np
        model = keras.saving.load_model("stripped.keras")
        y = model.predict(np.load("x.npy"), verbose=0)
        np.testing.assert_allclose(y, np.load("expected.npy"), rtol=1e-6, atol=1e-6)
        print("loaded", type(model.layers[1]).__name__)
        """
    )
    env = {
        key: os.environ[key]
        # PYTHONPATH too, where keras itself may live; the script hides keras_sparse.
        for key in ("PATH", "HOME", "PYTHONPATH", "LD_LIBRARY_PATH", "OPENBLAS_CORETYPE")
        if key in os.environ
    }
    env["KERAS_BACKEND"] = keras.backend.backend()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded Dense" in result.stdout


def test_sparse_model_needs_keras_sparse_to_load(tmp_path):
    # The contrast that makes the test above meaningful: unstripped, the
    # file names keras_sparse's layer.
    model, _ = _pruned_sparse_model()
    model.save(tmp_path / "sparse.keras")
    import zipfile

    with zipfile.ZipFile(tmp_path / "sparse.keras") as archive:
        assert b"keras_sparse" in archive.read("config.json")
    stripped = tmp_path / "stripped.keras"
    strip(model).save(stripped)
    with zipfile.ZipFile(stripped) as archive:
        assert b"keras_sparse" not in archive.read("config.json")


# ---------------------------------------------------------- sparsity_report


def test_sparsity_report_rows_count_active_weights():
    model, served = _pruned_sparse_model()
    report = sparsity_report(model)
    assert [(r.name, r.shape, r.total) for r in report.rows] == [
        ("hidden", (6, 5), 30),
        ("logits", (5, 3), 15),
    ]
    assert [r.active for r in report.rows] == [int(np.count_nonzero(k)) for k in served]
    assert [r.density for r in report.rows] == [np.count_nonzero(k) / k.size for k in served]


def test_sparsity_report_total_row_sums_the_layers():
    model, served = _pruned_sparse_model()
    total = sparsity_report(model).total
    active = sum(int(np.count_nonzero(k)) for k in served)
    assert (total.name, total.active, total.total) == ("total", active, 45)
    assert total.density == pytest.approx(active / 45)


def test_sparsity_report_prints_an_aligned_table():
    model, served = _pruned_sparse_model()
    lines = str(sparsity_report(model)).splitlines()
    lines = lines[: [line.split()[0] for line in lines].index("total") + 1]  # the table
    assert lines[0].split() == ["layer", "kernel", "shape", "active", "total", "density"]
    assert lines[2].split() == [
        "hidden",
        "6",
        "x",
        "5",
        str(np.count_nonzero(served[0])),
        "30",
        f"{np.count_nonzero(served[0]) / 30:.2%}",
    ]
    assert lines[-1].split() == [
        "total",
        str(sum(np.count_nonzero(k) for k in served)),
        "45",
        f"{sum(np.count_nonzero(k) for k in served) / 45:.2%}",
    ]
    # Right-aligned numbers end in the same column on every row.
    assert len({len(line) for line in lines if "%" in line} | {len(lines[0])}) == 1
    # Names and shapes are left-aligned (each line starts with its name); each number
    # ends under the end of its header; the rules are dashes under each column.
    for line, name in zip(lines, ["layer", "", "hidden", "logits", "", "total"]):
        if name:
            assert line.startswith(name)
    active_end = lines[0].index("active") + len("active")
    for line, row in zip([lines[2], lines[3]], served):
        assert line[:active_end].endswith(" " + str(np.count_nonzero(row)))
    shape_start = lines[0].index("kernel shape")
    assert lines[2][shape_start:].startswith("6 x 5") and lines[3][shape_start:].startswith("5 x 3")
    widths = [len(cell) for cell in lines[1].split("  ")]
    assert lines[1] == "  ".join("-" * w for w in widths) == lines[4]
    assert len(lines[1]) == len(lines[0]) and len(widths) == 5


def test_sparsity_report_markdown_has_a_row_per_layer_and_total():
    model, _ = _pruned_sparse_model()
    lines = sparsity_report(model).to_markdown().splitlines()
    assert lines[0] == "| layer | kernel shape | active | total | density |"
    assert lines[1] == "|:--|:--|--:|--:|--:|"
    rows = [line.split("|")[1].strip() for line in lines[2:] if line.startswith("|")]
    assert rows == ["hidden", "logits", "**total**"]
    table = [line for line in lines if line.startswith("|")]
    # Five cells a row, the total's shape cell empty; a blank line before the coverage.
    assert all(line.endswith(" |") and line.count("|") == 6 for line in table if line != lines[1])
    assert lines[4].split("|")[2].strip() == ""
    assert lines[len(table)] == "" and lines[len(table) + 1].startswith("masks cover 45 of 45")


def test_sparsity_report_needs_a_sparse_layer():
    with pytest.raises(ValueError, match="no sparse layer"):
        sparsity_report(_dense_model())


def test_sparsity_report_lists_what_is_left_dense_and_the_coverage():
    with pytest.warns(UserWarning, match="left 1 selected layer"):
        model = sparsify(_left_dense_model())
    (fc,) = sparse_layers(model)
    fc.reset_threshold(0.3)
    active = int(np.count_nonzero(np.abs(to_numpy(fc.kernel)) >= 0.3))
    report = sparsity_report(model)
    assert [(r.name, r.shape, r.active, r.total) for r in report.rows] == [
        ("fc", (20, 3), active, 60)
    ]
    assert [(d.name, d.class_name, d.params) for d in report.dense] == [("prelu", "PReLU", 20)]
    assert report.dense_params == 20
    assert report.coverage == pytest.approx(60 / 80)
    assert report.model_density == pytest.approx((active + 20) / 80)
    coverage = (
        f"masks cover 60 of 80 weight-matrix values (75.00%); the model keeps "
        f"{(active + 20) / 80:.2%} of them"
    )
    for text in (str(report), report.to_markdown()):
        assert text.splitlines()[-2:] == [coverage, "left dense: prelu (PReLU, 25.00%)"]


@pytest.mark.parametrize("count, more", [(10, ""), (11, " and 1 more"), (12, " and 2 more")])
def test_sparsity_report_names_ten_dense_layers_and_counts_the_others(count, more):
    from keras_sparse.transforms import DenseLayer, LayerSparsity, SparsityReport

    dense = tuple(DenseLayer(f"d{i}", "Dense", 10) for i in range(count))
    row = LayerSparsity("sparse", (10, 10), 50, 100)
    report = SparsityReport((row,), LayerSparsity("total", None, 50, 100), dense)
    whole = 100 + 10 * count
    listed = ", ".join(f"d{i} (Dense, {10 / whole:.2%})" for i in range(10))
    assert str(report).splitlines()[-1] == f"left dense: {listed}{more}"


def test_sparsity_report_of_a_layer_counts_its_own_matrices_and_repeated_names():
    class Block(keras.layers.Layer):
        """A custom layer with a weight matrix of its own and two sparse sublayers."""

        def __init__(self):
            super().__init__(name="block")
            self.mix = self.add_weight(shape=(4, 4), name="mix")
            self.first = keras.Sequential([SparseLinear(4, name="proj")], name="first")
            self.second = keras.Sequential([SparseLinear(4, name="proj")], name="second")

        def call(self, inputs):
            return self.second(self.first(inputs @ self.mix))

    block = Block()
    block(np.ones((1, 4), "float32"))
    report = sparsity_report(block)
    # Two layers named "proj": each is named by its path.
    assert [(r.name, r.total) for r in report.rows] == [
        ("first/proj", 16),
        ("second/proj", 16),
    ]
    assert [(d.name, d.class_name, d.params) for d in report.dense] == [("block", "Block", 16)]


def test_sparsity_report_rows_name_each_kernel_of_a_layer_with_two():
    from keras_sparse import SparseSeparableConv1D

    inputs = keras.Input((10, 3))
    model = keras.Model(inputs, SparseSeparableConv1D(4, 3, name="sep")(inputs))
    report = sparsity_report(model)
    assert [(r.name, r.shape, r.total) for r in report.rows] == [
        ("sep/depthwise_kernel", (3, 3, 1), 9),
        ("sep/pointwise_kernel", (1, 3, 4), 12),
    ]
    assert report.total.total == 21


def test_sparsity_report_of_an_unbuilt_layer_says_which_call_needs_it():
    with pytest.raises(ValueError, match=r"`sparsity_report\(\)` needs the layer's weights"):
        sparsity_report(SparseLinear(3, name="late"))


def test_layer_sparsity_as_dict():
    from keras_sparse.transforms import LayerSparsity

    assert LayerSparsity("fc", (4, 2), 6, 8).as_dict() == {
        "name": "fc",
        "shape": (4, 2),
        "active": 6,
        "total": 8,
        "density": 0.75,
    }
    assert LayerSparsity("empty", (0, 2), 0, 0).density == 0.0


def test_layers_left_dense_under_one_name_are_told_apart_by_their_paths():
    def block(name):
        inputs = keras.Input((4, 5))
        return keras.Model(inputs, keras.layers.PReLU(name="prelu")(inputs), name=name)

    inputs = keras.Input((4, 5))
    hidden = block("second")(block("first")(inputs))
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(hidden))
    with pytest.warns(UserWarning, match="left 2 selected layer"):
        model = sparsify(keras.Model(inputs, outputs, name="twice"))
    dense = sparsity_report(model).dense
    assert [(d.class_name, d.params) for d in dense] == [("PReLU", 20), ("PReLU", 20)]


def test_sparsify_refusing_one_layer_converts_none_in_place():
    # N:M needs a reduction axis, which an Embedding's table has not: the refusal names
    # the layer, and comes before the Dense beside it is converted.
    inputs = keras.Input((5,), dtype="int32")
    outputs = keras.layers.Dense(4, name="dense")(keras.layers.Embedding(10, 8, name="emb")(inputs))
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"Layer 'emb' \(Embedding\).*granularity='n:m'"):
        sparsify(model, inplace=True, granularity="n:m", n_m=(2, 4))
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["Embedding", "Dense"]

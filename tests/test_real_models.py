"""The models Keras users have: CNNs, residual graphs with op layers, custom layers, subclassed
models, attention, keras-hub backbones. Each is sparsified, checked unchanged, pruned, saved,
reloaded, stripped and reported."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from backend_utils import to_numpy
from conftest import require
from keras import ops

import keras_sparse as ks
from keras_sparse.walk import walk_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# ------------------------------------------------------------------- models


def residual_cnn():
    """Conv, depthwise, separable, BatchNorm, an `x + y`, `ops.mean`, `x * 2.0`, `x[:, 0:1]`."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = keras.layers.Conv2D(8, 1, name="pw")(y)
    x = x + y
    x = keras.layers.SeparableConv2D(6, 3, name="sep")(x)
    x = ops.mean(x, axis=(1, 2)) * 2.0
    outputs = keras.layers.Dense(3, name="head")(x) + x[:, 0:1]
    return keras.Model(inputs, outputs, name="resnet")


@keras.saving.register_keras_serializable("tests")
class Block(keras.layers.Layer):
    """A custom layer holding two Dense layers as attributes, built on its first call."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="relu", name="inner")
        self.outer = keras.layers.Dense(units, name="outer")

    def call(self, x):
        return self.outer(self.inner(x)) + x

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def custom_layer_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(Block(4, name="block")(inputs)))


@keras.saving.register_keras_serializable("tests")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="relu")
        self.logits = keras.layers.Dense(2)

    def call(self, x):
        return self.logits(self.hidden(x))


def subclassed_model():
    model = Subclassed(name="subclassed")
    model(np.zeros((1, 4), "float32"))
    return model


def nested_model():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="d1")], name="inner")
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2, name="d2")(inner(inputs)), name="outer")


def attention_model():
    inputs = keras.Input((5, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    x = keras.layers.LayerNormalization()(x + inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="ff")(x), name="attention")


def conv1d_embedding_model():
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embedding")(inputs)
    x = keras.layers.Conv1D(8, 3, padding="same", name="conv")(x)
    x = keras.layers.Conv1DTranspose(4, 2, name="up")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(x), name="text")


def bert():
    hub = require("keras_hub")
    return hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=12,
        name="bert",
    )


def bert_classifier():
    hub = require("keras_hub")
    return hub.models.BertTextClassifier(backbone=bert(), num_classes=3, preprocessor=None)


def gemma():
    hub = require("keras_hub")
    return hub.models.GemmaBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        name="gemma",
    )


def llama_untied():
    # A language model whose output projection is a matrix of its own (the embedding's
    # `reverse_embeddings`, `tie_word_embeddings=False`): pruned by a second mask.
    hub = require("keras_hub")
    backbone = hub.models.LlamaBackbone(
        vocabulary_size=50,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        tie_word_embeddings=False,
        name="llama",
    )
    return hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def transformer_encoder_model():
    hub = require("keras_hub")
    inputs = keras.Input((6, 8))
    x = hub.layers.TransformerEncoder(intermediate_dim=16, num_heads=2, name="encoder")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x[:, 0]), name="encoder_model")


def _tokens(rng, with_segments=True):
    inputs = {
        "token_ids": rng.integers(0, 50, (2, 6)).astype("int32"),
        "padding_mask": np.ones((2, 6), "int32"),
    }
    if with_segments:
        inputs["segment_ids"] = np.zeros((2, 6), "int32")
    return inputs


MODELS = {
    "sequential_cnn": (
        lambda: keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(3, name="fc"),
            ],
            name="cnn",
        ),
        lambda rng: rng.normal(size=(2, 8, 8, 1)).astype("float32"),
    ),
    "residual_cnn": (residual_cnn, lambda rng: rng.normal(size=(2, 8, 8, 3)).astype("float32")),
    "custom_layer": (custom_layer_model, lambda rng: rng.normal(size=(2, 4)).astype("float32")),
    "subclassed": (subclassed_model, lambda rng: rng.normal(size=(2, 4)).astype("float32")),
    "nested": (nested_model, lambda rng: rng.normal(size=(2, 4)).astype("float32")),
    "attention": (attention_model, lambda rng: rng.normal(size=(2, 5, 8)).astype("float32")),
    "embedding_conv1d": (
        conv1d_embedding_model,
        lambda rng: rng.integers(0, 20, (2, 6)).astype("int32"),
    ),
    "bert": (bert, _tokens),
    "bert_classifier": (bert_classifier, _tokens),
    "gemma": (gemma, lambda rng: _tokens(rng, with_segments=False)),
    "llama_untied": (llama_untied, lambda rng: _tokens(rng, with_segments=False)),
    "transformer_encoder": (
        transformer_encoder_model,
        lambda rng: rng.normal(size=(2, 6, 8)).astype("float32"),
    ),
}
KINDS = list(MODELS)
# keras-hub's PositionEmbedding holds a weight matrix that has no sparse version.
LEFT_DENSE = {"bert": {"position_embedding"}, "bert_classifier": {"position_embedding"}}


def outputs(model, x):
    y = model(x, training=False)  # eager: no predict function to compile per model
    values = y.values() if isinstance(y, dict) else [y]
    return np.concatenate([to_numpy(v).astype("float64").ravel() for v in values])


def build(kind, rng):
    make, inputs = MODELS[kind]
    return make(), inputs(rng)


def sparsify_quietly(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = ks.sparsify(model, **kwargs)
    return sparse, [str(w.message) for w in caught if "sparsify()" in str(w.message)]


def prune_some(model, rng):
    """Random thresholds that prune part of every kernel (and keep part)."""
    for layer in ks.sparse_layers(model):
        for mask in layer.masks.values():
            magnitude = np.abs(to_numpy(mask.kernel))
            cut = np.quantile(magnitude, rng.uniform(0.3, 0.7))
            mask.threshold.assign(np.full(mask.threshold.shape, cut, "float32"))


def kernel_holders(model):
    """Every layer with a float weight matrix of its own."""
    holders = []
    for layer in walk_layers(model):
        own = {id(v) for child in layer._layers for v in child.weights}
        if any(
            len(v.shape) >= 2 and id(v) not in own and keras.backend.is_float_dtype(v.dtype)
            for v in layer.weights
        ):
            holders.append(layer)
    return holders


# ------------------------------------------------------------------ sparsify


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_sparsify_converts_every_kernel_and_keeps_the_outputs(kind, rng):
    model, x = build(kind, rng)
    before = outputs(model, x)
    holders = kernel_holders(model)
    sparse, warned = sparsify_quietly(model)
    np.testing.assert_allclose(outputs(sparse, x), before, rtol=1e-6, atol=1e-6)
    # The original is untouched, and keeps its class.
    assert not ks.sparse_layers(model)
    assert isinstance(sparse, type(model))
    left = LEFT_DENSE.get(kind, set())
    # (Compared by count: a subclassed model's copy names its layers anew.)
    assert len(ks.sparse_layers(sparse)) == len(holders) - len(left)
    # What is left dense is said, with its share, in the warning and in the report.
    report = ks.sparsity_report(sparse)
    assert {entry.name for entry in report.dense} == left
    for name in left:
        assert any(f"'{name}'" in message and "%" in message for message in warned)
    if not left:
        assert report.coverage == 1.0 and not warned


@pytest.mark.parametrize("kind", KINDS)
def test_a_pruned_model_reloads_from_keras_with_its_masks(kind, rng, tmp_path):
    model, x = build(kind, rng)
    sparse, _ = sparsify_quietly(model)
    prune_some(sparse, rng)
    expected = outputs(sparse, x)
    # In order (a subclassed model's copy names its layers anew, so not by path).
    saved = [(v.name, to_numpy(v)) for layer in ks.sparse_layers(sparse) for v in layer.weights]
    path = os.path.join(tmp_path, "model.keras")
    sparse.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded, type(model))
    np.testing.assert_allclose(outputs(reloaded, x), expected, rtol=1e-6, atol=1e-6)
    loaded = [(v.name, to_numpy(v)) for layer in ks.sparse_layers(reloaded) for v in layer.weights]
    assert [name for name, _ in loaded] == [name for name, _ in saved]
    for (name, value), (_, saved_value) in zip(loaded, saved):
        np.testing.assert_array_equal(value, saved_value, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_strip_gives_stock_layers_serving_the_pruned_model(kind, rng):
    model, x = build(kind, rng)
    sparse, _ = sparsify_quietly(model)
    prune_some(sparse, rng)
    stripped = ks.strip(sparse)
    assert type(stripped) is type(model)
    assert not ks.sparse_layers(stripped)
    assert "keras_sparse" not in json.dumps(keras.saving.serialize_keras_object(stripped))
    np.testing.assert_allclose(outputs(stripped, x), outputs(sparse, x), rtol=1e-5, atol=1e-6)
    # The pruned weights are zeros in the stripped kernels, as many as the masks drop.
    # Each stripped kernel is the pruned kernel, zeros where the mask drops weights.
    twins = dict(zip(map(id, walk_layers(sparse)), walk_layers(stripped)))
    for layer in ks.sparse_layers(sparse):
        twin = twins[id(layer)]
        for name, mask in layer.masks.items():
            kernel = to_numpy(twin.kernel if name == "kernel" else getattr(twin, name))
            np.testing.assert_array_equal(kernel, to_numpy(mask.effective_weight()) + 0.0)
            assert 0 < np.count_nonzero(kernel) < kernel.size


@pytest.mark.parametrize("kind", ["bert", "custom_layer", "subclassed"])
def test_a_weights_checkpoint_restores_a_fresh_sparsified_copy(kind, rng, tmp_path):
    model, x = build(kind, rng)
    sparse, _ = sparsify_quietly(model)
    prune_some(sparse, rng)
    path = os.path.join(tmp_path, "pruned.weights.h5")
    sparse.save_weights(path)
    fresh, _ = sparsify_quietly(build(kind, rng)[0])
    fresh.load_weights(path)
    np.testing.assert_allclose(outputs(fresh, x), outputs(sparse, x), rtol=1e-6, atol=1e-6)


def test_keras_hub_attention_prunes_whole_heads_reloads_and_shrink_says_what_stays(rng, tmp_path):
    model, x = build("bert", rng)
    sparse = ks.sparsify(model, select=keras.layers.MultiHeadAttention, granularity="head")
    masked = ks.sparse_layers(sparse)
    # One output projection per encoder block, one threshold per head.
    assert [tuple(layer.threshold.shape) for layer in masked] == [(2,), (2,)]
    np.testing.assert_allclose(outputs(sparse, x), outputs(model, x), rtol=1e-6, atol=1e-6)
    for layer in masked:  # the second head of each block pruned
        layer.reset_threshold(np.array([0.0, 1e3], "float32"))
        layer.hard_prune()
        kernel = to_numpy(layer.kernel)
        assert np.all(kernel[1] == 0) and np.all(kernel[0] != 0)
    path = os.path.join(tmp_path, "heads.keras")
    sparse.save(path)
    reloaded = keras.saving.load_model(path)
    assert [tuple(layer.threshold.shape) for layer in ks.sparse_layers(reloaded)] == [(2,), (2,)]
    np.testing.assert_allclose(outputs(reloaded, x), outputs(sparse, x), rtol=1e-6, atol=1e-6)
    # The blocks rebuild their attention in code: shrink cannot remove the heads, and says so.
    with pytest.warns(UserWarning, match=r"dead heads of 2 attention layer\(s\)"):
        ks.shrink(sparse)


def test_shrink_of_a_model_whose_kernels_are_all_inside_blocks_counts_no_flops(rng):
    # shrink counts the FLOPs of the layers at the model's top level: with none there
    # (a keras-hub backbone's are inside its blocks) it printed "0 -> 0".
    inputs = keras.Input((4,))
    model = keras.Model(inputs, Block(4, name="block")(inputs))
    result = ks.shrink(sparsify_quietly(model)[0])
    assert result.flops_before is None and result.flops_after is None
    assert "FLOPs not counted" in str(result)


def test_shrink_keeps_a_layer_that_does_not_rebuild_from_its_config(rng):
    # keras-hub's ViTPatchingAndEmbedding takes arguments its config lacks: shrink, which
    # copies the model layer by layer, crashed on it with keras-hub's TypeError. It keeps
    # such a layer as it is now (in shrink's own stripped copy), with the same outputs.
    hub = require("keras_hub")
    model = hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    x = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    sparse = ks.sparsify(model, granularity="head")
    (layer,) = ks.sparse_layers(sparse)
    layer.reset_threshold(np.array([0.0, 1e3], "float32"))
    layer.hard_prune()
    with pytest.warns(UserWarning, match=r"dead heads of 1 attention layer\(s\)"):
        result = ks.shrink(sparse)
    np.testing.assert_allclose(outputs(result.model, x), outputs(sparse, x), rtol=1e-5, atol=1e-5)


def _encoder_decoder_tokens(rng):
    """Inputs of a keras-hub encoder-decoder backbone (T5, BART) of vocabulary 30."""
    return {
        "encoder_token_ids": rng.integers(1, 30, (2, 5)).astype("int32"),
        "encoder_padding_mask": np.ones((2, 5), "int32"),
        "decoder_token_ids": rng.integers(1, 30, (2, 4)).astype("int32"),
        "decoder_padding_mask": np.ones((2, 4), "int32"),
    }


def test_shrink_keeps_a_layer_without_a_config(rng):
    # keras-hub's T5TransformerLayer has no get_config (Keras's raises
    # NotImplementedError): shrink crashed with it. It keeps such a layer as it is.
    hub = require("keras_hub")
    model = hub.models.T5Backbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        key_value_dim=4,
        dropout=0.0,
    )
    x = _encoder_decoder_tokens(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5's attention layers drop Keras masks, and say so
        sparse = ks.sparsify(model)
        prune_some(sparse, rng)
        result = ks.shrink(sparse)
        expected, shrunk = sparse(x, training=False), result.model(x, training=False)
    for key in expected:
        np.testing.assert_allclose(
            to_numpy(shrunk[key]), to_numpy(expected[key]), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_keras_hub_model_pruned_then_quantized_reloads_with_its_masks(tmp_path, inplace):
    # keras-hub rebuilds its layers quantized from its config (per-layer dtype policies);
    # the conversion the file replays refused them ("prune the float model, then quantize
    # it", which the user had done), then raised NotImplementedError. The masks now come
    # back beside the quantized kernels, frozen, with the file's values.
    hub = require("keras_hub")
    model = hub.models.BartBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
        dropout=0.0,
    )
    rng = np.random.default_rng(0)
    x = _encoder_decoder_tokens(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers Keras does not quantize
        sparse = ks.sparsify(model, inplace=inplace)
        for layer in ks.sparse_layers(sparse):  # each kernel to about half its weights
            for mask in layer.masks.values():
                median = np.median(np.abs(to_numpy(mask.kernel)))
                mask.threshold.assign(np.full(mask.threshold.shape, median, "float32"))
            layer.hard_prune()
        sparse.quantize("int8")
    quantized = [layer for layer in ks.sparse_layers(sparse) if layer.quantization_mode]
    assert quantized, "nothing was quantized: the test would not test the reload"
    path = os.path.join(tmp_path, "pruned_int8.keras")
    sparse.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(outputs(reloaded, x), outputs(sparse, x), rtol=1e-6, atol=1e-6)
    before = {layer.path: layer for layer in ks.sparse_layers(sparse)}
    assert sorted(layer.path for layer in ks.sparse_layers(reloaded)) == sorted(before)
    for layer in ks.sparse_layers(reloaded):
        saved = before[layer.path]
        assert layer.quantization_mode == saved.quantization_mode, layer.path
        for name, mask in layer.masks.items():
            kept = to_numpy(saved.masks[name].prune_mask)
            np.testing.assert_array_equal(to_numpy(mask.prune_mask), kept)
            assert 0.3 < kept.mean() < 0.7, (layer.path, name)
            assert mask.frozen and saved.masks[name].frozen, (layer.path, name)
            # in the state too, which a SparsityScheduler started later reads
            assert to_numpy(mask.sparsity_state)[-1] == 1.0, (layer.path, name)


def test_select_takes_classes_regexes_and_predicates():
    model = residual_cnn()

    def converted(**kwargs):
        return sorted(
            layer.name for layer in ks.sparse_layers(sparsify_quietly(model, **kwargs)[0])
        )

    assert converted(select=keras.layers.Conv2D) == ["pw", "stem"]
    assert converted(select=[keras.layers.DepthwiseConv2D, "^head$"]) == ["dw", "head"]
    assert converted(select=lambda layer: layer.name.startswith("s")) == ["sep", "stem"]
    with pytest.raises(TypeError, match="select=3"):
        ks.sparsify(model, select=3)


def test_pruning_arguments_reach_every_converted_layer():
    sparse, _ = sparsify_quietly(residual_cnn(), granularity="neuron")
    assert {layer.granularity for layer in ks.sparse_layers(sparse)} == {"neuron"}
    with pytest.raises(ValueError, match="granularity='n:m'"):
        ks.sparsify(residual_cnn(), granularity="n:m")  # the depthwise conv has no reduction


def test_sparse_layers_are_found_inside_custom_layers():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, Block(4)(inputs))
    sparse, _ = sparsify_quietly(model)
    assert sorted(layer.name for layer in ks.sparse_layers(sparse)) == ["inner", "outer"]
    assert len(ks.kernel_masks(sparse)) == 2


@pytest.mark.slow
def test_keras_applications_mobilenet_v2_is_covered():
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10
    )
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    # `predict`, not an eager call: JAX compiles each eager op of a new shape on its own.
    before = model.predict(x, verbose=0)
    sparse, warned = sparsify_quietly(model)
    assert not warned
    report = ks.sparsity_report(sparse)
    kernels = [
        layer
        for layer in model.layers
        if isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
        )
    ]
    assert report.coverage == 1.0 and len(report.rows) == len(kernels) > 50
    np.testing.assert_allclose(sparse.predict(x, verbose=0), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------- the crashes of before


def op_layer_model():
    inputs = keras.Input((6,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(inputs)
    x = ops.mean(a + b, axis=-1, keepdims=True) * 2.0
    return keras.Model(inputs, keras.layers.Dense(2, name="c")(a[:, 0:2] + x))


def test_models_with_op_layers_sparsify_strip_report_and_shrink(tmp_path, rng):
    x = rng.normal(size=(3, 6)).astype("float32")
    sparse, _ = sparsify_quietly(op_layer_model())
    prune_some(sparse, rng)
    np.testing.assert_allclose(outputs(ks.strip(sparse), x), outputs(sparse, x), rtol=1e-5)
    assert ks.size_report(sparse).stripped.params > 0
    result = ks.shrink(sparse)
    np.testing.assert_allclose(outputs(result.model, x), outputs(sparse, x), rtol=1e-5, atol=1e-6)
    path = os.path.join(tmp_path, "ops.keras")
    sparse.save(path)
    from keras_sparse.__main__ import main

    assert main(["-q", "report", path]) == 0
    assert main(["-q", "strip", path, "-o", os.path.join(tmp_path, "stripped.keras")]) == 0


# ------------------------------------------- files saved by keras-sparse 0.1


def _reference_v0_1(arrays, x):
    """The fixture model's inference forward in NumPy, from its stored weights."""

    def hard(kernel, threshold, prune_mask, granularity):
        keep = prune_mask.astype(bool)
        if granularity == "neuron":
            rms = np.sqrt(np.mean(np.square(kernel * keep), axis=0))
            return keep & (rms >= threshold)[None, :]
        keep &= np.abs(kernel) >= threshold
        if granularity == "n:m":  # top 2 of every 4 inputs, ties to the lower index
            magnitude = np.abs(kernel) * prune_mask
            for start in range(0, kernel.shape[0], 4):
                group = magnitude[start : start + 4]
                order = np.argsort(-group, axis=0, kind="stable")
                top = np.zeros(group.shape, bool)
                np.put_along_axis(top, order[:2], True, axis=0)
                keep[start : start + 4] &= top
        return keep

    y = x.astype("float64")
    for name, granularity, activation in (
        ("structured", "weight", np.maximum),
        ("unstructured", "weight", np.tanh),
        ("neuron", "neuron", np.maximum),
        ("n_m", "n:m", None),
    ):
        kernel = arrays[f"{name}/kernel"]
        mask = hard(kernel, arrays[f"{name}/threshold"], arrays[f"{name}/prune_mask"], granularity)
        y = y @ (kernel * mask)
        if f"{name}/bias" in arrays:
            y = y + arrays[f"{name}/bias"]
        if activation is np.maximum:
            y = np.maximum(y, 0)
        elif activation is not None:
            y = activation(y)
    return y


def test_a_keras_file_saved_by_version_0_1_loads_with_the_same_model():
    arrays = dict(np.load(os.path.join(FIXTURES, "sparse_linear_v0.1.npz")))
    model = keras.saving.load_model(os.path.join(FIXTURES, "sparse_linear_v0.1.keras"))
    assert [type(layer) for layer in model.layers] == [ks.SparseLinear] * 4
    for layer in model.layers:
        for variable in layer.masks["kernel"].variables[:4] + [layer.kernel]:
            np.testing.assert_array_equal(
                to_numpy(variable), arrays[f"{layer.name}/{variable.name}"]
            )
        # The driver's state, which 0.1 did not have, starts fresh.
        np.testing.assert_array_equal(to_numpy(layer.masks["kernel"].sparsity_state), 0)
    x = arrays["x"]
    expected = _reference_v0_1(arrays, x)
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(expected, arrays["y"], rtol=1e-5, atol=1e-5)


def tiny_untied_language_model():
    """Keras's own ReversibleEmbedding, untied: an embedding and an output projection."""
    inputs = keras.Input((5,), dtype="int32")
    tokens = keras.layers.ReversibleEmbedding(20, 8, tie_weights=False, name="tokens")
    hidden = keras.layers.Dense(8, name="mix")(tokens(inputs))
    return keras.Model(inputs, tokens(hidden, reverse=True), name="tiny_lm")


def test_an_untied_output_projection_quantizes_with_its_layer(rng):
    # Keras's quantize() deletes the float kernels it replaces: the masked property of
    # the output projection had no deleter, and Model.quantize() swallowed the error,
    # leaving a layer without embeddings and not quantized.
    sparse = ks.sparsify(tiny_untied_language_model())
    assert list(sparse.get_layer("tokens").masks) == ["embeddings", "reverse_embeddings"]
    x = rng.integers(0, 20, (4, 5)).astype("int32")
    before = to_numpy(sparse(x, training=False))
    sparse.quantize("int8")
    assert sparse.get_layer("tokens").quantization_mode == "int8"
    np.testing.assert_allclose(to_numpy(sparse(x, training=False)), before, atol=0.05)


def test_a_keras_file_saved_before_the_reverse_embeddings_mask_loads_with_the_same_model():
    # Saved on 2026-12-06 (JAX), before an untied ReversibleEmbedding's output
    # projection had a mask of its own: the file holds the projection without one. It
    # loads, the projection's mask starts fresh (keeping every weight, as the layer did)
    # and the model computes what it computed then.
    name = "reversible_embedding_untied_2026-12-06"
    arrays = dict(np.load(os.path.join(FIXTURES, name + ".npz")))
    with pytest.warns(UserWarning, match="no mask for `reverse_embeddings`.*in the next fit"):
        model = keras.saving.load_model(os.path.join(FIXTURES, name + ".keras"))
    tokens = model.get_layer("tokens")
    assert list(tokens.masks) == ["embeddings", "reverse_embeddings"]
    reverse = tokens.masks["reverse_embeddings"]
    np.testing.assert_array_equal(to_numpy(reverse.threshold), 0.0)
    assert to_numpy(reverse.prune_mask).all()
    np.testing.assert_array_equal(to_numpy(reverse.kernel), arrays["reverse_embeddings"])
    np.testing.assert_array_equal(
        to_numpy(tokens.masks["embeddings"].effective_weight()), arrays["embeddings"]
    )
    np.testing.assert_allclose(
        to_numpy(model(arrays["x"], training=False)), arrays["y"], rtol=1e-5, atol=1e-6
    )


def test_a_frozen_file_saved_before_the_reverse_embeddings_mask_loads_frozen():
    # The same model trained to the freeze by that version (a SparsityScheduler to 50%),
    # saved frozen. The fresh mask takes the layer's driver state: it is frozen with the
    # others (training keeps the projection dense, as the file had it), and a later
    # SparsityScheduler, which resumes from the first mask's state, still finds the
    # model frozen whichever mask comes first.
    name = "reversible_embedding_untied_frozen_2026-12-06"
    arrays = dict(np.load(os.path.join(FIXTURES, name + ".npz")))
    with pytest.warns(UserWarning, match="`reverse_embeddings`.*frozen like the layer's other"):
        model = keras.saving.load_model(os.path.join(FIXTURES, name + ".keras"))
    tokens = model.get_layer("tokens")
    embeddings, reverse = tokens.masks["embeddings"], tokens.masks["reverse_embeddings"]
    assert embeddings.frozen and reverse.frozen
    embeddings_state = to_numpy(embeddings.sparsity_state)
    reverse_state = to_numpy(reverse.sparsity_state)
    assert embeddings_state[0] > 0  # the driver's step
    np.testing.assert_array_equal(reverse_state[[0, 1, 4]], embeddings_state[[0, 1, 4]])
    assert reverse_state[2] == 1.0  # its hard density: every weight kept
    assert to_numpy(reverse.prune_mask).all()
    np.testing.assert_array_equal(to_numpy(reverse.kernel), arrays["reverse_embeddings"])
    np.testing.assert_array_equal(to_numpy(embeddings.effective_weight()), arrays["embeddings"])
    np.testing.assert_allclose(
        to_numpy(model(arrays["x"], training=False)), arrays["y"], rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------- across the backends


CROSS_BACKEND = """
import json, os, sys
import numpy as np
import keras
import keras_sparse
sys.path.insert(0, {tests!r})
import test_real_models  # registers the test's custom classes
results = {{}}
for kind, (path, inputs) in {files!r}.items():
    model = keras.saving.load_model(path)
    y = model.predict(np.load(inputs), verbose=0)
    masks = {{m.prune_mask.path: np.asarray(keras.ops.convert_to_numpy(m.prune_mask)).tolist()
              for layer in keras_sparse.sparse_layers(model) for m in layer.masks.values()}}
    results[kind] = {{"y": np.asarray(y).tolist(), "masks": masks}}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_pruned_models_load_on_another_backend(rng, tmp_path):
    files, expected = {}, {}
    for kind in ("residual_cnn", "attention"):
        model, x = build(kind, rng)
        sparse, _ = sparsify_quietly(model)
        prune_some(sparse, rng)
        path = os.path.join(tmp_path, f"{kind}.keras")
        inputs = os.path.join(tmp_path, f"{kind}.npy")
        sparse.save(path)
        np.save(inputs, x)
        files[kind] = (path, inputs)
        masks = {
            m.prune_mask.path: to_numpy(m.prune_mask)
            for layer in ks.sparse_layers(sparse)
            for m in layer.masks.values()
        }
        expected[kind] = (outputs(sparse, x), masks)
    # Each backend's run loads on the next one: the three runs cover every loader. Both
    # models load in one process (a process start costs more than a load).
    order = ("tensorflow", "jax", "torch")
    backend = order[(order.index(keras.backend.backend()) + 1) % len(order)]
    require(backend)
    script = CROSS_BACKEND.format(tests=os.path.join(ROOT, "tests"), files=files)
    process = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(process.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(expected)
    for kind, (y, masks) in expected.items():
        result = results[kind]
        np.testing.assert_allclose(np.ravel(result["y"]), y, rtol=1e-5, atol=1e-5)
        assert sorted(result["masks"]) == sorted(masks)
        for key, value in masks.items():
            np.testing.assert_array_equal(np.asarray(result["masks"][key]), value)


# ------------------------------------------- the driver across layer types


@pytest.mark.slow
def test_the_scheduler_reaches_an_exact_target_over_a_cnn_with_attention(rng):
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    tokens = keras.layers.Reshape((16, 32))(x)
    tokens = keras.layers.Dense(16, name="proj")(tokens)
    attended = keras.layers.MultiHeadAttention(2, 8, name="mha")(tokens, tokens)
    x = keras.layers.GlobalAveragePooling1D()(attended + tokens)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    sparse, _ = sparsify_quietly(model)
    sparse.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(True))
    images = rng.normal(size=(96, 8, 8, 2)).astype("float32")
    labels = (images.mean(axis=(1, 2, 3)) > 0).astype("int32")
    scheduler = ks.SparsityScheduler(ks.PolynomialDecay(0.8, end_fraction=0.7))
    sparse.fit(images, labels, batch_size=16, epochs=4, verbose=0, callbacks=[scheduler])
    masks = ks.kernel_masks(sparse)
    total = sum(m.size for m in masks)
    assert scheduler.frozen
    # Exactly the target, counted over every kernel of every type.
    assert sum(m.num_active() for m in masks) == round(0.2 * total)
    kinds = {type(m.layer).__name__ for m in masks}
    assert {"SparseConv2D", "SparseSeparableConv2D", "SparseEinsumDense", "SparseLinear"} <= kinds
    # The global scope lets layers differ: not every mask at the same density.
    assert len({round(m.density(), 2) for m in masks}) > 1
    # And the model evaluates as it strips.
    stripped = ks.strip(sparse)
    np.testing.assert_allclose(
        to_numpy(stripped.predict(images[:8], verbose=0)),
        to_numpy(sparse.predict(images[:8], verbose=0)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_layout_maps_cover_conv_and_attention_kernels():
    mesh = keras.distribution.DeviceMesh((4, 2), ("batch", "model"), [f"cpu:{i}" for i in range(8)])
    sparse, _ = sparsify_quietly(attention_model())
    layout_map = ks.get_layout_map(mesh, sparse)
    # The query projection's kernel is (in, heads, head_dim): its heads are sharded, and
    # its per-unit threshold (heads, head_dim) follows.
    assert tuple(layout_map["attention/mha/query/kernel"].axes) == (None, "model", None)
    assert tuple(layout_map["attention/mha/query/threshold"].axes) == ("model", None)
    assert tuple(layout_map["attention/mha/query/prune_mask"].axes) == (None, "model", None)
    assert tuple(layout_map["attention/mha/query/temperature"].axes) == ()
    ks.validate_layout_map(layout_map, sparse)
    cnn, _ = sparsify_quietly(residual_cnn())
    layout_map = ks.get_layout_map(mesh, cnn)
    assert tuple(layout_map["resnet/stem/kernel"].axes) == (None, None, None, "model")
    assert tuple(layout_map["resnet/stem/threshold"].axes) == ("model",)
    assert tuple(layout_map["resnet/stem/bias"].axes) == ("model",)
    # Depthwise: (k, k, channels, multiplier), the channels sharded.
    assert tuple(layout_map["resnet/dw/kernel"].axes) == (None, None, "model", None)
    assert tuple(layout_map["resnet/sep/pointwise_threshold"].axes) == ("model",)
    ks.validate_layout_map(layout_map, cnn)
    # A threshold left replicated next to a sharded conv kernel is caught.
    broken = keras.distribution.LayoutMap(mesh)
    broken["^(?:.*/)?stem/kernel$"] = (None, None, None, "model")
    with pytest.raises(ValueError, match=r"stem/threshold: laid out as \(None,\)"):
        ks.validate_layout_map(broken, cnn)

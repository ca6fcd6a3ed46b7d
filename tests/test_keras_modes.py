"""Keras's own modes on pruned layers: `Model.quantize()` and `enable_lora()`."""

import os
import warnings

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

import keras_sparse as ks


def pruned_mlp(rng):
    model = keras.Sequential(
        [
            keras.Input((8,)),
            ks.SparseLinear(6, activation="relu", name="hidden"),
            ks.SparseLinear(3, name="logits"),
        ]
    )
    for layer in model.layers:
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
        layer.reset_threshold(0.6)
    return model


def quantize(model, mode):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.quantize(mode)


def test_int8_quantization_keeps_the_pruned_zeros_and_the_numpy_codes(rng):
    model = pruned_mlp(rng)
    kernels = [to_numpy(layer.effective_weight()) for layer in model.layers]
    quantize(model, "int8")
    for layer, kernel in zip(model.layers, kernels):
        assert layer.quantization_mode == "int8"
        codes = to_numpy(layer._kernel)
        assert codes.dtype == np.int8
        # Abs-max per output unit, as Keras's AbsMaxQuantizer(axis=0).
        scale = 127.0 / np.max(np.abs(kernel), axis=0, keepdims=True)
        np.testing.assert_allclose(codes, np.clip(np.round(kernel * scale), -127, 127), atol=1)
        assert np.all(codes[kernel == 0] == 0) and np.count_nonzero(kernel == 0) > 0
        assert layer.density() == pytest.approx(np.count_nonzero(kernel) / kernel.size)


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_a_quantized_pruned_model_serves_as_keras_serves_the_pruned_dense_model(
    mode, rng, tmp_path
):
    model = pruned_mlp(rng)
    x = rng.normal(size=(5, 8)).astype("float32")
    dense = ks.strip(model)  # stock Dense layers holding the pruned kernels
    quantize(model, mode)
    quantize(dense, mode)
    expected = to_numpy(dense.predict(x, verbose=0))
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )
    path = os.path.join(tmp_path, "quantized.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert [layer.quantization_mode for layer in reloaded.layers] == [mode, mode]
    np.testing.assert_allclose(
        to_numpy(reloaded.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )


def test_layers_keras_does_not_quantize_are_left_with_a_warning(rng):
    model = keras.Sequential(
        [keras.Input((6, 6, 2)), ks.SparseConv2D(3, 3), keras.layers.Flatten(), ks.SparseLinear(2)]
    )
    with pytest.warns(UserWarning, match="SparseConv2D does not have a `quantize"):
        model.quantize("int8")
    assert model.layers[0].quantization_mode is None
    assert model.layers[-1].quantization_mode == "int8"


def test_calibrated_modes_are_refused_with_the_way_out(rng):
    layer = pruned_mlp(rng).layers[0]
    with pytest.raises((ValueError, NotImplementedError), match="GPTQConfig|calibration"):
        layer.quantize("gptq")


def lora_layer(rng, layer):
    layer.enable_lora(2)
    layer.lora_kernel_a.assign(rng.normal(size=layer.lora_kernel_a.shape).astype("float32"))
    layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape).astype("float32"))
    return layer


def lora_reference(layer, x):
    kernel = to_numpy(layer._kernel)
    threshold = to_numpy(layer.threshold)
    delta = to_numpy(layer.lora_kernel_a) @ to_numpy(layer.lora_kernel_b)
    scale = layer.lora_alpha / layer.lora_rank
    return x @ (kernel * (np.abs(kernel) >= threshold) + scale * delta) + to_numpy(layer.bias)


def test_lora_adds_a_dense_update_to_the_sparse_base(rng):
    model = pruned_mlp(rng)
    layer = lora_layer(rng, model.layers[1])
    hidden = to_numpy(model.layers[0](rng.normal(size=(4, 8)).astype("float32")))
    np.testing.assert_allclose(
        to_numpy(layer(hidden)), lora_reference(layer, hidden), rtol=1e-5, atol=1e-5
    )
    # Only the low-rank factors (and the thresholds) train: the base kernel is frozen.
    assert {v.name for v in layer.trainable_variables} == {
        "bias",
        "threshold",
        "lora_kernel_a",
        "lora_kernel_b",
    }


def test_the_report_names_the_layers_that_serve_a_dense_lora_update(rng):
    # It showed the sparse base's density alone, as if the served kernel were as sparse.
    model = pruned_mlp(rng)
    layer = lora_layer(rng, model.layers[1])
    report = ks.sparsity_report(model)
    assert report.lora == (layer.name,)
    assert f"LoRA enabled: {layer.name};" in str(report)
    assert "dense low-rank update" in report.to_markdown()


def test_strip_merges_the_lora_update_and_the_file_keeps_it(rng, tmp_path):
    model = pruned_mlp(rng)
    layer = lora_layer(rng, model.layers[1])
    x = rng.normal(size=(4, 8)).astype("float32")
    expected = to_numpy(model.predict(x, verbose=0))
    with pytest.warns(UserWarning, match=rf"merged the dense LoRA update .*: {layer.name}\."):
        stripped = ks.strip(model)
    merged = stripped.layers[1]
    assert type(merged) is keras.layers.Dense and not merged.lora_enabled
    kernel = to_numpy(layer._kernel)
    delta = to_numpy(layer.lora_kernel_a) @ to_numpy(layer.lora_kernel_b)
    want = kernel * (np.abs(kernel) >= to_numpy(layer.threshold)) + delta
    np.testing.assert_allclose(to_numpy(merged.kernel), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(stripped.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )
    path = os.path.join(tmp_path, "lora.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.layers[1].lora_enabled
    np.testing.assert_allclose(
        to_numpy(reloaded.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "layer",
    [
        lambda: ks.SparseConv2D(3, 2),
        lambda: ks.SparseEinsumDense("abc,cd->abd", (None, 4)),
        lambda: ks.SparseEmbedding(10, 4),
    ],
    ids=["conv2d", "einsum_dense", "embedding"],
)
def test_lora_works_on_the_other_layer_types(layer, rng):
    layer = layer()
    shape = {"SparseConv2D": (1, 5, 5, 2), "SparseEinsumDense": (2, 3, 5)}.get(type(layer).__name__)
    x = (
        rng.integers(0, 10, (2, 3)).astype("int32")
        if shape is None
        else rng.normal(size=shape).astype("float32")
    )
    before = to_numpy(layer(x))
    layer.enable_lora(2)
    # The update starts at zero (B = 0), so outputs are unchanged, then follows B.
    np.testing.assert_allclose(to_numpy(layer(x)), before, rtol=1e-6, atol=1e-6)
    b = layer.lora_embeddings_b if hasattr(layer, "lora_embeddings_b") else layer.lora_kernel_b
    b.assign(np.ones(b.shape, "float32"))
    assert not np.allclose(to_numpy(layer(x)), before)


@pytest.mark.parametrize(
    "make, x",
    [
        (
            lambda: ks.SparseEinsumDense("abc,cd->abd", (None, 6), bias_axes="d"),
            lambda rng: rng.normal(size=(2, 3, 8)).astype("float32"),
        ),
        (
            lambda: ks.SparseEmbedding(12, 6),
            lambda rng: rng.integers(0, 12, (2, 5)).astype("int32"),
        ),
    ],
    ids=["einsum_dense", "embedding"],
)
def test_the_other_quantizable_types_keep_their_zeros_and_serve_as_keras(make, x, rng, tmp_path):
    x = x(rng)
    inputs = keras.Input(x.shape[1:], dtype=x.dtype)
    model = keras.Model(inputs, make()(inputs))
    layer = model.layers[-1]
    for mask in layer.masks.values():
        mask.kernel.assign(rng.normal(size=mask.shape).astype("float32"))
    layer.reset_threshold(0.7)
    pruned = to_numpy(layer.masks[next(iter(layer.masks))].effective_weight()) == 0
    dense = ks.strip(model)
    quantize(model, "int8")
    quantize(dense, "int8")
    codes = to_numpy(layer._embeddings if hasattr(layer, "_embeddings") else layer._kernel)
    assert codes.dtype == np.int8 and np.all(codes[pruned] == 0) and pruned.any()
    expected = to_numpy(dense.predict(x, verbose=0))
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )
    path = os.path.join(tmp_path, "q.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        to_numpy(reloaded.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_report_lists_a_quantized_layer_left_dense(mode):
    # A quantized kernel no mask prunes is still a matrix left dense: the report's coverage
    # counts its values (an int4 kernel's, not its packed bytes), as sparsify's warning does.
    model = keras.Sequential(
        [
            keras.Input((8,)),
            ks.SparseLinear(6, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    quantize(model, mode)
    report = ks.sparsity_report(model)
    assert [(d.name, d.params) for d in report.dense] == [("logits", 6 * 3)]
    assert report.coverage == pytest.approx(8 * 6 / (8 * 6 + 6 * 3))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sparsify_warns_of_a_quantized_layer_by_the_values_the_report_counts(mode):
    # The warning's share is of the values the converted model's report counts: a LoRA
    # factor or a quantized kernel's scales are not weights of their own.
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Embedding(5, 4, name="table"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    model.layers[0].enable_lora(2)
    model.get_layer("logits").quantize(mode)
    model.get_layer("table").quantize(mode)
    with pytest.warns(UserWarning, match="dense") as caught:
        sparse = ks.sparsify(model)
    whole = 8 * 6 + 5 * 4 + 24 * 3
    (message,) = [str(w.message) for w in caught if "sparsify()" in str(w.message)]
    assert f"{(5 * 4 + 24 * 3) / whole:.1%} of the weight-matrix values" in message
    assert f"'logits' (quantized ({mode}); {24 * 3 / whole:.1%})" in message
    report = ks.sparsity_report(sparse)
    assert [(d.name, d.params) for d in report.dense] == [("table", 5 * 4), ("logits", 24 * 3)]
    assert report.coverage == pytest.approx(8 * 6 / whole)

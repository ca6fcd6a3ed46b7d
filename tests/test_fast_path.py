"""The inference fast paths of SparseLinear against the reference formulas.

* Before pruning, inference computes `kernel * hard_mask` (no sigmoid).
* After `hard_prune()` of a layer never trained in this process, inference is
  a plain matmul with the kernel (its pruned entries are zero), with the
  gradient of `kernel * prune_mask`.
* Whatever may move the weights afterwards (training, `reset_threshold()`)
  brings the mask back, so inference stays `x @ (kernel * hard_mask) + bias`.

Expected outputs are computed in NumPy from the raw variables (kernel,
threshold, `prune_mask`), never from the layer's own helpers.
"""

import warnings

import keras
import numpy as np
import pytest
import reference
from backend_utils import to_numpy
from factories import make_layer
from keras import ops

from keras_sparse import SparseLinear

BACKEND = keras.backend.backend()


def numpy_hard_mask(layer):
    """`(|kernel| >= threshold) & prune_mask`, in NumPy, as float32."""
    keep = np.abs(to_numpy(layer.kernel)) >= to_numpy(layer.threshold)
    return (keep & (to_numpy(layer.prune_mask) > 0)).astype("float32")


def expected_output(layer, x):
    """`x @ (kernel * hard_mask) + bias`, the contract of inference, in NumPy."""
    out = x @ (to_numpy(layer.kernel) * numpy_hard_mask(layer))
    return out if layer.bias is None else out + to_numpy(layer.bias)


def gradients(layer, x, upstream, training):
    """As `backend_utils.gradients`, with a zero where a weight gets no gradient."""
    variables = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.sum(layer(x, training=training) * upstream)
        grads = tape.gradient(
            loss, [v.value for v in variables], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
    elif BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable):
            y, _ = layer.stateless_call(trainable, non_trainable, x, training=training)
            return ops.sum(y * upstream)

        grads = jax.grad(loss_fn)([v.value for v in variables])
    else:
        import torch

        for v in variables:
            v.value.grad = None
        loss = ops.sum(layer(x, training=training) * ops.convert_to_tensor(upstream))
        loss.backward()
        grads = [
            v.value.grad if v.value.grad is not None else torch.zeros_like(v.value)
            for v in variables
        ]
    return [to_numpy(g) for g in grads]


def pruned_layer(rng, **kwargs):
    """A fresh layer, half pruned by `hard_prune()`: the plain inference path is on."""
    layer = make_layer(rng, **kwargs)
    kernel = to_numpy(layer.kernel)
    axis = 0 if layer.is_structured else None
    threshold = np.median(np.abs(kernel), axis=axis)
    layer.reset_threshold(threshold)
    layer.hard_prune()
    keep = np.abs(kernel) >= threshold
    np.testing.assert_array_equal(to_numpy(layer.prune_mask), keep)
    np.testing.assert_array_equal(to_numpy(layer.kernel), np.where(keep, kernel, 0.0))
    assert 0 < keep.mean() < 1
    assert layer.masks["kernel"]._plain_inference
    return layer


# ----------------------------------------------------- before hard_prune()


@pytest.mark.parametrize("structured", [True, False])
def test_hard_mask_inference_values_and_gradients(rng, structured):
    layer = make_layer(rng, structured=structured)
    layer.prune_mask.assign((rng.uniform(size=(6, 4)) > 0.3).astype("float32"))
    x = rng.normal(size=(5, 6)).astype("float32")
    upstream = rng.normal(size=(5, 4)).astype("float32")
    kernel, bias, threshold = (to_numpy(w) for w in (layer.kernel, layer.bias, layer.threshold))
    mask = numpy_hard_mask(layer)
    want = reference.forward(x, kernel * to_numpy(layer.prune_mask), bias, threshold, 5.0, True)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer(x)), expected_output(layer, x), rtol=1e-6, atol=1e-6)
    d_kernel, d_bias, d_threshold = gradients(layer, x, upstream, training=False)
    np.testing.assert_allclose(d_kernel, (x.T @ upstream) * mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_bias, upstream.sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d_threshold, np.zeros_like(threshold))


def test_a_fresh_layer_does_not_take_the_plain_path(rng):
    layer = make_layer(rng)
    assert not layer.masks["kernel"]._plain_inference
    x = rng.normal(size=(3, 6)).astype("float32")
    np.testing.assert_allclose(to_numpy(layer(x)), expected_output(layer, x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------ after hard_prune()


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_pruned_inference_is_x_times_effective_weight_plus_bias(rng, structured, use_bias):
    layer = pruned_layer(rng, structured=structured, use_bias=use_bias)
    x = rng.normal(size=(5, 6)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x, training=False)), expected_output(layer, x), rtol=1e-6, atol=1e-6
    )
    x3 = rng.normal(size=(2, 3, 6)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x3)), expected_output(layer, x3), rtol=1e-6, atol=1e-6
    )


def test_pruned_inference_applies_the_activation(rng):
    layer = pruned_layer(rng, activation="relu")
    x = rng.normal(size=(5, 6)).astype("float32")
    want = np.maximum(expected_output(layer, x), 0)
    np.testing.assert_allclose(to_numpy(layer(x)), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("structured", [True, False])
def test_pruned_inference_gradient_stops_at_pruned_weights(rng, structured):
    layer = pruned_layer(rng, structured=structured)
    x = rng.normal(size=(5, 6)).astype("float32")
    upstream = rng.normal(size=(5, 4)).astype("float32")
    d_kernel, d_bias, d_threshold = gradients(layer, x, upstream, training=False)
    prune_mask = to_numpy(layer.prune_mask)
    np.testing.assert_allclose(d_kernel, (x.T @ upstream) * prune_mask, rtol=1e-5, atol=1e-5)
    assert np.all(d_kernel[prune_mask == 0] == 0)
    np.testing.assert_allclose(d_bias, upstream.sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d_threshold, np.zeros_like(to_numpy(layer.threshold)))


def test_the_plain_path_computes_no_mask(rng):
    # White-box: a threshold written behind the layer's back (not through
    # `reset_threshold()`) is not seen by the plain path, which is how we know
    # it computes no mask. Never do this outside a test.
    layer = pruned_layer(rng)
    x = rng.normal(size=(5, 6)).astype("float32")
    before = to_numpy(layer(x))
    layer.threshold.assign(np.full((4,), 100.0, "float32"))
    np.testing.assert_array_equal(to_numpy(layer(x)), before)


@pytest.mark.parametrize("kind", ["predict", "model_call"])
def test_pruned_model_predicts_the_reference(rng, kind):
    layer = pruned_layer(rng)
    model = keras.Sequential([keras.Input(shape=(6,)), layer])
    x = rng.normal(size=(8, 6)).astype("float32")
    out = model.predict(x, verbose=0) if kind == "predict" else to_numpy(model(x))
    np.testing.assert_allclose(out, expected_output(layer, x), rtol=1e-6, atol=1e-6)


def test_soft_inference_mask_never_takes_the_plain_path(rng):
    layer = make_layer(rng, inference_mask="soft")
    layer.hard_prune()
    x = rng.normal(size=(5, 6)).astype("float32")
    kernel, bias, threshold = (to_numpy(w) for w in (layer.kernel, layer.bias, layer.threshold))
    want = reference.forward(x, kernel, bias, threshold, 5.0)  # zero threshold: not plain
    np.testing.assert_allclose(to_numpy(layer(x)), want, rtol=1e-5, atol=1e-5)


def test_hard_prune_is_idempotent(rng):
    layer = pruned_layer(rng)
    weights = [to_numpy(w).copy() for w in layer.weights]
    layer.hard_prune()
    for old, new in zip(weights, layer.weights):
        np.testing.assert_array_equal(old, to_numpy(new))
    assert layer.masks["kernel"]._plain_inference


# ------------------------------------------------ what ends the plain path


def test_reset_threshold_ends_the_plain_path(rng):
    layer = pruned_layer(rng)
    layer.reset_threshold(0.5)
    assert not layer.masks["kernel"]._plain_inference
    x = rng.normal(size=(5, 6)).astype("float32")
    np.testing.assert_allclose(to_numpy(layer(x)), expected_output(layer, x), rtol=1e-6, atol=1e-6)
    assert 0 < layer.density() < 1


def test_a_training_call_ends_the_plain_path(rng):
    layer = pruned_layer(rng)
    x = rng.normal(size=(5, 6)).astype("float32")
    layer(x, training=True)
    assert not layer.masks["kernel"]._plain_inference
    layer.hard_prune()  # trained in this process: the mask stays
    assert not layer.masks["kernel"]._plain_inference
    layer.threshold.assign(np.full((4,), 0.3, "float32"))
    np.testing.assert_allclose(to_numpy(layer(x)), expected_output(layer, x), rtol=1e-6, atol=1e-6)


def test_momentum_after_hard_prune_cannot_reach_inference(rng):
    # A compiled train step traced before `hard_prune()` keeps running after
    # it, and Adam's momentum moves the zeroed kernel entries; inference must
    # still be `x @ (kernel * hard_mask) + bias`.
    layer = SparseLinear(3, structured=False, temperature=5.0)
    model = keras.Sequential([keras.Input(shape=(6,)), layer])
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    layer.reset_threshold(float(np.median(np.abs(to_numpy(layer.kernel)))))
    layer.hard_prune()
    alive = to_numpy(layer.prune_mask)
    assert not layer.masks["kernel"]._plain_inference
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    kernel, threshold = to_numpy(layer.kernel), to_numpy(layer.threshold)
    assert np.any(kernel[~alive] != 0)  # momentum did move the pruned entries
    # NumPy, from the raw state: the mask recorded at hard_prune, and the threshold.
    expected = x @ (kernel * alive * (np.abs(kernel) >= threshold)) + to_numpy(layer.bias)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)


def test_training_after_a_plain_inference_warns(rng):
    layer = pruned_layer(rng)
    model = keras.Sequential([keras.Input(shape=(6,)), layer])
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    model.predict(x, verbose=0)  # may now hold the plain path
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match="hard_prune"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not layer.masks["kernel"]._plain_inference
    layer.hard_prune()  # the weights equal effective_weight() again
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected_output(layer, x), rtol=1e-5, atol=1e-5
    )


def test_training_after_hard_prune_alone_does_not_warn(rng):
    # No inference ran on the plain path: no compiled function can hold it.
    layer = pruned_layer(rng)
    x = rng.normal(size=(5, 6)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x, training=True)
    assert not [w for w in caught if "hard_prune" in str(w.message)]
    assert not layer.masks["kernel"]._plain_inference


# ----------------------------------------------------------- precision, jit


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_pruned_inference_under_mixed_precision(rng, policy):
    keras.config.set_dtype_policy(policy)
    layer = pruned_layer(rng)
    x = rng.normal(size=(5, 6)).astype("float32")
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype
    assert all(w.dtype == "float32" for w in layer.weights if w is not layer.prune_mask)
    # Half precision rounds each product to 11 (float16) or 8 (bfloat16) significant bits.
    tolerance = {"mixed_float16": 1e-2, "mixed_bfloat16": 4e-2}[policy]
    np.testing.assert_allclose(
        to_numpy(ops.cast(out, "float32")),
        expected_output(layer, x),
        rtol=tolerance,
        atol=tolerance,
    )
    trained = to_numpy(ops.cast(layer(x, training=True), "float32"))
    assert np.all(np.isfinite(trained))


def test_mixed_precision_reads_the_mask_variables_in_float32():
    # Under mixed_bfloat16 only the masked kernel is cast for the matmul: the threshold,
    # temperature and penalty are read as float32, so the layer serves what num_active()
    # counts and its penalty is the float32 formula.
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = SparseLinear(2, use_bias=False, temperature=10.0 / 3.0)
    layer.build((None, 2))
    kernel = np.array([[0.30078125, 1.0], [0.5, -2.0]], "float32")  # exact in bfloat16
    threshold = np.array([0.3009, 0.1], "float32")  # 0.3009 is 0.30078125 in bfloat16
    layer.kernel.assign(kernel)
    layer.reset_threshold(threshold)
    assert layer.num_active() == 3
    x = np.eye(2, dtype="float32")
    out = to_numpy(ops.cast(layer(x), "float32"))
    np.testing.assert_array_equal(out, np.array([[0.0, 1.0], [0.5, -2.0]], "float32"))
    layer.sparsity_penalty.assign(1.0 / 3.0)
    layer(x, training=True)
    soft = reference.soft_mask(kernel.astype("float64"), threshold, np.float32(10.0 / 3.0))
    expected = np.float32(1.0 / 3.0) * soft.mean()
    assert float(to_numpy(sum(layer.losses))) == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.transfer_guard is JAX's")
@pytest.mark.parametrize("state", ["fresh", "pruned"])
def test_compiled_calls_move_nothing_between_host_and_device(rng, state):
    import jax

    layer = make_layer(rng) if state == "fresh" else pruned_layer(rng)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    x = jax.device_put(rng.normal(size=(5, 6)).astype("float32"))

    def loss(trainable, training):
        out, _, losses = layer.stateless_call(
            trainable, non_trainable, x, training=training, return_losses=True
        )
        return ops.sum(out) + sum(losses)

    infer = jax.jit(lambda t: loss(t, False))
    train = jax.jit(jax.grad(lambda t: loss(t, True)))
    for fn in (infer, train):  # inference first: training ends the plain path
        fn(trainable)  # trace and compile outside the guard
        with jax.transfer_guard("disallow"):
            jax.block_until_ready(fn(trainable))

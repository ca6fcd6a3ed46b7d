"""SparseLinear inside Keras models: Sequential, functional, subclassed; fit, precision."""

import keras
import numpy as np
import pytest
import reference
from backend_utils import to_numpy
from layer_checks import run_layer_checks

from keras_sparse import SparseLinear

BACKEND = keras.backend.backend()
# Keras's torch backend has no XLA compilation: `jit_compile=True` is refused
# there, so on torch the compiled-fit tests use Keras's own default ("auto").
JIT_COMPILE = True if BACKEND in ("tensorflow", "jax") else "auto"


def relu(z):
    return np.maximum(z, 0.0)


def randomize(layer, rng, threshold_low=0.2, threshold_high=0.9):
    """Give `layer` random kernel, bias and thresholds (thresholds in a range that prunes)."""
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
    layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    threshold = rng.uniform(threshold_low, threshold_high, size=layer.threshold.shape)
    layer.threshold.assign(threshold.astype("float32"))


def arrays(layer):
    return to_numpy(layer.kernel), to_numpy(layer.bias), to_numpy(layer.threshold)


def numpy_effective_weight(layer):
    """`kernel * (|kernel| >= threshold) * prune_mask`, computed in NumPy."""
    kernel, _, threshold = arrays(layer)
    keep = (np.abs(kernel) >= threshold) & (to_numpy(layer.prune_mask) > 0)
    return kernel * keep


# ------------------------------------------------------------ generic contract


@pytest.mark.parametrize(
    "init_kwargs, n_trainable",
    [
        ({"units": 3}, 3),
        ({"units": 3, "structured": False}, 3),
        ({"units": 3, "use_bias": False, "activation": "relu"}, 2),
    ],
    ids=["structured", "unstructured", "no_bias"],
)
def test_sparse_linear_meets_the_generic_layer_contract(init_kwargs, n_trainable):
    # non-trainable: prune_mask, temperature, sparsity_penalty
    run_layer_checks(SparseLinear, init_kwargs, (2, 4), n_trainable, 4)


# ---------------------------------------------------------- three model styles


class TwoSparseLayers(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = SparseLinear(5, activation="relu", temperature=3.0)
        self.head = SparseLinear(2, structured=False, temperature=3.0)

    def call(self, inputs, training=None):
        return self.head(self.hidden(inputs, training=training), training=training)


def two_layer_model(kind):
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input(shape=(4,)),
                SparseLinear(5, activation="relu", temperature=3.0),
                SparseLinear(2, structured=False, temperature=3.0),
            ]
        )
    if kind == "functional":
        inputs = keras.Input(shape=(4,))
        hidden = SparseLinear(5, activation="relu", temperature=3.0)(inputs)
        return keras.Model(inputs, SparseLinear(2, structured=False, temperature=3.0)(hidden))
    model = TwoSparseLayers()
    model(np.zeros((1, 4), "float32"))  # build
    return model


def sparse_layers(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, SparseLinear)]


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_predict_is_the_hard_mask_reference_in_every_model_style(rng, kind):
    model = two_layer_model(kind)
    hidden, head = sparse_layers(model)
    randomize(hidden, rng)
    randomize(head, rng)
    x = rng.normal(size=(6, 4)).astype("float32")
    h = relu(reference.forward(x, *arrays(hidden), 3.0, hard=True))
    expected = reference.forward(h, *arrays(head), 3.0, hard=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)
    # the hard mask really prunes something here, so the soft forward would differ
    assert hidden.density() < 1.0 and head.density() < 1.0


# ---------------------------------------------------------------------- fit


def test_compiled_fit_learns_a_tiny_linear_task(rng):
    x = rng.normal(size=(32, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 2)).astype("float32")
    model = keras.Sequential([keras.Input(shape=(4,)), SparseLinear(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=JIT_COMPILE)
    if BACKEND in ("tensorflow", "jax"):
        assert model.jit_compile is True  # XLA really is in use, not silently turned off
    losses = model.fit(x, y, batch_size=16, epochs=5, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]


def test_temperature_change_reaches_an_already_compiled_fit(rng):
    layer = SparseLinear(3, temperature=2.0)
    model = keras.Sequential([keras.Input(shape=(4,)), layer])
    randomize(layer, rng, 0.3, 0.6)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    kernel, bias, threshold = arrays(layer)

    def reference_loss(temperature):
        return np.mean((reference.forward(x, kernel, bias, threshold, temperature) - y) ** 2)

    # learning rate 0: the weights never move, only the temperature does
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    fit_kwargs = dict(batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    loss_old = model.fit(x, y, **fit_kwargs).history["loss"][0]
    train_function = model.train_function
    layer.temperature = 8.0
    loss_new = model.fit(x, y, **fit_kwargs).history["loss"][0]

    assert model.train_function is train_function  # the traced step was reused
    assert loss_old == pytest.approx(reference_loss(2.0), rel=1e-5)
    assert loss_new == pytest.approx(reference_loss(8.0), rel=1e-5)
    assert abs(reference_loss(8.0) - reference_loss(2.0)) > 1e-2
    assert loss_new != pytest.approx(loss_old, rel=1e-3)


def test_hard_prune_is_irreversible_under_further_training(rng):
    layer = SparseLinear(3, structured=False)
    model = keras.Sequential([keras.Input(shape=(6,)), layer])
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    # Adam first, so that every kernel entry carries momentum into the pruning
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)

    layer.reset_threshold(float(np.median(np.abs(to_numpy(layer.kernel)))))
    layer.hard_prune()
    pruned = to_numpy(layer.prune_mask) == 0
    density_after_prune = layer.density()
    assert 0.3 < density_after_prune < 0.7
    assert np.array_equal(pruned, to_numpy(layer.kernel) == 0)

    model.optimizer.learning_rate.assign(0.5)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)

    effective = numpy_effective_weight(layer)
    assert np.all(effective[pruned] == 0)
    assert np.all(to_numpy(layer.effective_weight())[pruned] == 0)
    assert layer.density() <= density_after_prune
    expected = x @ effective + to_numpy(layer.bias)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ precision


# Half precision rounds each product to 11 (float16) or 8 (bfloat16) significant bits.
HALF_TOLERANCE = {"float16": 1e-2, "bfloat16": 4e-2}


@pytest.mark.parametrize(
    "policy, compute_dtype", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_mixed_precision_fit_keeps_float32_variables(rng, policy, compute_dtype):
    keras.config.set_dtype_policy(policy)
    model = keras.Sequential(
        [
            keras.Input(shape=(4,)),
            SparseLinear(5, activation="relu", temperature=3.0),
            SparseLinear(2, temperature=3.0),
        ]
    )
    hidden, head = model.layers
    # Thresholds that prune, and a prune_mask with zeros: the fit trains through a mask
    # that removes weights, in half precision.
    for layer in (hidden, head):
        randomize(layer, rng, threshold_low=0.3, threshold_high=0.8)
    head.prune_mask.assign(np.array([[True, False]] * 5))
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    losses = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert all(v.dtype == "float32" for v in model.weights if not v.path.endswith("prune_mask"))

    out = model(x, training=False)
    assert keras.backend.standardize_dtype(out.dtype) == compute_dtype
    effective = [numpy_effective_weight(layer) for layer in (hidden, head)]
    for kernel in effective:
        assert 0 < np.count_nonzero(kernel) < kernel.size
    assert np.all(effective[1][:, 1] == 0)
    h = relu(x @ effective[0] + to_numpy(hidden.bias))
    expected = h @ effective[1] + to_numpy(head.bias)
    tolerance = HALF_TOLERANCE[compute_dtype]
    np.testing.assert_allclose(
        to_numpy(out).astype("float32"), expected, rtol=tolerance, atol=tolerance
    )


def test_float16_policy_keeps_float32_kernel_and_mask(rng):
    layer = SparseLinear(3, temperature=3.0, dtype="float16")
    layer.build((None, 4))
    randomize(layer, rng)
    assert layer.compute_dtype == "float16"
    mask = layer.masks["kernel"]
    assert {w.dtype for w in [layer.kernel, *mask.variables] if w is not layer.prune_mask} == {
        "float32"
    }
    assert layer.bias.dtype == "float16"  # as in a stock Dense under this policy
    x = rng.normal(size=(5, 4)).astype("float32")
    out = layer(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    expected = reference.forward(x, *arrays(layer), 3.0)
    np.testing.assert_allclose(to_numpy(out).astype("float32"), expected, rtol=1e-2, atol=1e-2)

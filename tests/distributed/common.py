"""What the distributed scenarios share: a tiny model, its data, and the comparisons.

Each scenario script sets its environment (KERAS_BACKEND, XLA_FLAGS, ...)
before importing this module, which imports Keras.
"""

import json
import os
import sys

import keras
import numpy as np

from keras_sparse import SparseLinear

FEATURES, OUTPUTS = 16, 6
SAMPLES, BATCH_SIZE, EPOCHS = 64, 16, 2  # 8 optimizer steps
STEPS = SAMPLES // BATCH_SIZE * EPOCHS

# Float32 reductions are split differently across devices (a sharded matmul,
# an all-reduce of gradients), so sharded and single-device training agree to
# round-off, not bit for bit. After 8 SGD steps the observed gap is ~1e-7;
# the tolerance leaves two orders of magnitude of headroom.
RTOL, ATOL = 1e-5, 1e-5


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, OUTPUTS)).astype("float32") * (rng.random((FEATURES, 1)) < 0.5)
    y = (x @ w + 0.1 * rng.normal(size=(SAMPLES, OUTPUTS))).astype("float32")
    return x, y


def make_model():
    """Structured and unstructured SparseLinear, and a Dense in between.

    The names are explicit, so that a model made under a distribution has the
    same variable paths as the blueprint its layout map was written from.
    The last layer has 6 units, which a 4-way model axis does not divide:
    `get_layout_map` leaves it replicated.
    """
    constant = keras.initializers.Constant(0.02)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            SparseLinear(16, activation="relu", name="hidden", threshold_initializer=constant),
            keras.layers.Dense(16, activation="relu", name="dense"),
            SparseLinear(
                8,
                activation="relu",
                structured=False,
                name="hidden_2",
                threshold_initializer=constant,
            ),
            SparseLinear(OUTPUTS, structured=False, name="logits", threshold_initializer=constant),
        ],
        name="mlp",
    )


def compile_model(model):
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")


def scheduler():
    """The sparsity callback, or None where the package does not have it yet."""
    try:
        from keras_sparse.callbacks import SparsityScheduler
        from keras_sparse.schedules import PolynomialDecay
    except ImportError:
        return None
    # Freezes (hard-prunes every layer) at step 6 of 8, so `hard_prune` also
    # runs inside `fit`, on the distributed variables.
    return SparsityScheduler(
        PolynomialDecay(0.5, begin_step=0, end_step=6), initial_penalty=0.1, gain=0.5
    )


def callbacks():
    callback = scheduler()
    return [] if callback is None else [callback]


def fit(model, x, y):
    return model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks(),
    )


def weights_by_path(model):
    return {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights}


def weights_by_name(model):
    """`{"<layer>/<weight>": value}`: a loaded model's paths lose the model's name."""
    return {
        f"{layer.name}/{v.name}": np.asarray(keras.ops.convert_to_numpy(v))
        for layer in model.layers
        for v in layer.weights
    }


def sparse_layers(model):
    return [layer for layer in model.layers if isinstance(layer, SparseLinear)]


def max_gap(a, b):
    """Largest |a - b| over every weight, and the path where it is."""
    gaps = {
        path: float(np.max(np.abs(a[path].astype("float64") - b[path]), initial=0.0)) for path in a
    }
    path = max(gaps, key=gaps.get)
    return gaps[path], path


def assert_same_weights(actual, expected, what, rtol=RTOL, atol=ATOL):
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for path in expected:
        np.testing.assert_allclose(
            actual[path], expected[path], rtol=rtol, atol=atol, err_msg=f"{what}: {path}"
        )


def report(**results):
    """The scenario's one line of JSON on stdout, for the pytest side to read."""
    print("RESULT " + json.dumps(results), flush=True)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def scratch_dir():
    return os.environ.get("KERAS_SPARSE_SCRATCH") or os.getcwd()

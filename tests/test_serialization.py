"""SparseLinear configs, `.keras` files (also across backends) and SavedModel export."""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from backend_utils import to_numpy

from keras_sparse import SparseLinear

BACKEND = keras.backend.backend()
REPO_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")


def non_default_kwargs():
    """A non-default value for every constructor argument (but `use_bias`, tested apart)."""
    return dict(
        units=3,
        activation="relu",
        use_bias=True,
        structured=False,
        temperature=3.0,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
        bias_initializer=keras.initializers.Constant(0.25),
        threshold_initializer=keras.initializers.Constant(0.1),
        kernel_regularizer=keras.regularizers.L2(0.01),
        bias_regularizer=keras.regularizers.L1(0.02),
        threshold_regularizer=keras.regularizers.L1L2(l1=0.03, l2=0.04),
        activity_regularizer=keras.regularizers.L2(0.05),
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        bias_constraint=keras.constraints.NonNeg(),
        threshold_constraint=None,  # the default is "non_neg"
        straight_through=True,
        inference_mask="soft",
        name="custom_sparse",
    )


# ------------------------------------------------------------------- configs


def test_get_config_covers_every_constructor_argument():
    parameters = inspect.signature(SparseLinear.__init__).parameters
    arguments = {name for name in parameters if name not in ("self", "kwargs")}
    assert arguments <= set(SparseLinear(3).get_config())


def test_from_config_restores_non_default_values_of_every_argument():
    config = SparseLinear(**non_default_kwargs()).get_config()
    clone = SparseLinear.from_config(config)
    assert clone.get_config() == config

    assert clone.name == "custom_sparse"
    assert clone.units == 3
    assert clone.activation is keras.activations.relu
    assert clone.structured is False
    assert clone.temperature == 3.0
    assert clone.straight_through is True
    assert clone.inference_mask == "soft"
    assert isinstance(clone.kernel_initializer, keras.initializers.RandomNormal)
    assert clone.kernel_initializer.stddev == 0.5 and clone.kernel_initializer.seed == 1
    assert isinstance(clone.kernel_regularizer, keras.regularizers.L2)
    assert float(clone.kernel_regularizer.l2) == pytest.approx(0.01)
    assert isinstance(clone.bias_regularizer, keras.regularizers.L1)
    assert float(clone.bias_regularizer.l1) == pytest.approx(0.02)
    assert isinstance(clone.threshold_regularizer, keras.regularizers.L1L2)
    assert float(clone.threshold_regularizer.l1) == pytest.approx(0.03)
    assert float(clone.threshold_regularizer.l2) == pytest.approx(0.04)
    assert isinstance(clone.activity_regularizer, keras.regularizers.L2)
    assert float(clone.activity_regularizer.l2) == pytest.approx(0.05)
    assert isinstance(clone.kernel_constraint, keras.constraints.MaxNorm)
    assert clone.kernel_constraint.max_value == 2.0
    assert isinstance(clone.bias_constraint, keras.constraints.NonNeg)
    assert clone.threshold_constraint is None

    # the restored initializers are the ones used when building
    clone.build((None, 4))
    assert clone.threshold.shape == (4, 3)
    np.testing.assert_array_equal(to_numpy(clone.bias), np.full(3, 0.25, "float32"))
    np.testing.assert_array_equal(to_numpy(clone.threshold), np.full((4, 3), 0.1, "float32"))
    assert clone.temperature == 3.0


def test_from_config_restores_a_layer_without_bias():
    clone = SparseLinear.from_config(SparseLinear(3, use_bias=False).get_config())
    assert clone.use_bias is False
    clone.build((None, 4))
    assert clone.bias is None
    assert [w.path.split("/")[-1] for w in clone.trainable_weights] == ["kernel", "threshold"]


def test_default_temperature_stays_relative_after_a_config_round_trip():
    clone = SparseLinear.from_config(SparseLinear(3).get_config())
    assert clone.get_config()["temperature"] is None
    clone.build((None, 4))
    std = float(np.std(to_numpy(clone.kernel)))
    assert clone.temperature == pytest.approx(10.0 / std, rel=1e-4)


# ------------------------------------------------------------- .keras files


def pruned_model(kind, rng):
    """A two-layer model whose state is far from its initial one.

    The first layer is hard-pruned, then both get fresh non-zero thresholds
    and non-default temperatures, so a file that dropped any of `prune_mask`,
    `threshold` or `temperature` would give different outputs.
    """
    first = SparseLinear(5, activation="relu", temperature=2.0)
    second = SparseLinear(2, structured=False)
    if kind == "sequential":
        model = keras.Sequential([keras.Input(shape=(4,)), first, second])
    else:
        inputs = keras.Input(shape=(4,))
        model = keras.Model(inputs, second(first(inputs)))
    for layer in (first, second):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    first.reset_threshold(0.6)
    first.hard_prune()
    first.reset_threshold(rng.uniform(0.1, 0.4, size=first.threshold.shape))
    second.reset_threshold(rng.uniform(0.2, 0.8, size=second.threshold.shape))
    first.temperature = 4.0
    second.temperature = 7.0
    assert 0 < first.density() < 1 and 0 < second.density() < 1
    return model


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_keras_file_round_trip_gives_identical_outputs(rng, tmp_path, kind):
    model = pruned_model(kind, rng)
    x = rng.normal(size=(6, 4)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)

    originals = [layer for layer in model.layers if isinstance(layer, SparseLinear)]
    loadeds = [layer for layer in reloaded.layers if isinstance(layer, SparseLinear)]
    assert len(loadeds) == len(originals) == 2
    for original, loaded in zip(originals, loadeds, strict=True):
        for a, b in zip(original.weights, loaded.weights, strict=True):
            assert a.name == b.name
            np.testing.assert_array_equal(to_numpy(b), to_numpy(a))
        assert loaded.temperature == original.temperature
        assert loaded.density() == original.density()
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_array_equal(
        to_numpy(reloaded(x, training=True)), to_numpy(model(x, training=True))
    )


LOAD_AND_PREDICT = """
import sys
import keras
import numpy as np
import keras_sparse  # registers SparseLinear

model = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.savez(
    sys.argv[3],
    inference=keras.ops.convert_to_numpy(model.predict(x, verbose=0)),
    training=keras.ops.convert_to_numpy(model(x, training=True)),
)
"""


def test_weights_saved_with_a_float32_prune_mask_still_load(rng):
    # Files written before `prune_mask` became boolean store it as float32 0/1.
    layer = SparseLinear.new(4, 3)
    kernel = rng.normal(size=(4, 3)).astype("float32")
    float_mask = (rng.random((4, 3)) > 0.5).astype("float32")
    arrays = {"kernel": kernel, "prune_mask": float_mask}
    store = {
        str(i): arrays.get(w.name, to_numpy(w)).astype("float32")
        for i, w in enumerate(layer.weights)
    }
    layer.load_own_variables(store)
    assert layer.prune_mask.dtype == "bool"
    np.testing.assert_array_equal(to_numpy(layer.prune_mask), float_mask > 0)
    np.testing.assert_array_equal(to_numpy(layer.effective_weight()), kernel * float_mask)


@pytest.mark.slow
def test_keras_file_loads_with_identical_outputs_on_the_other_backends(rng, tmp_path):
    model = pruned_model("functional", rng)
    x = rng.normal(size=(6, 4)).astype("float32")
    model_path = tmp_path / "model.keras"
    x_path = tmp_path / "x.npy"
    model.save(model_path)
    np.save(x_path, x)
    expected_inference = model.predict(x, verbose=0)
    expected_training = to_numpy(model(x, training=True))

    # Each backend's run loads on the next installed one: the three runs cover every
    # backend's saver and loader (the file format is the same whichever wrote it).
    installed = [b for b in BACKENDS if b == BACKEND or importlib.util.find_spec(b) is not None]
    if len(installed) < 2:  # e.g. a GPU machine with JAX and PyTorch but no TensorFlow
        pytest.skip("no other backend is installed to load the file with")
    others = [installed[(installed.index(BACKEND) + 1) % len(installed)]]
    processes = {}
    for other in others:
        env = dict(os.environ)
        env["KERAS_BACKEND"] = other
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        out_path = tmp_path / f"{other}.npz"
        command = [sys.executable, "-c", LOAD_AND_PREDICT, str(model_path), str(x_path), out_path]
        processes[other] = (
            subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            ),
            out_path,
        )
    for other, (process, out_path) in processes.items():
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, f"{other} failed:\n{stderr.decode()[-3000:]}"
        outputs = np.load(out_path)
        np.testing.assert_allclose(outputs["inference"], expected_inference, rtol=0, atol=1e-6)
        np.testing.assert_allclose(outputs["training"], expected_training, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- SavedModel


@pytest.mark.skipif(
    BACKEND == "torch",
    reason=(
        "Keras's tf_saved_model export from torch goes through torch.export and "
        "torch_xla; with this Keras/torch pair it fails even for a plain Dense layer"
    ),
)
def test_tf_saved_model_export_serves_the_hard_masked_model(rng, tmp_path):
    # Works on TensorFlow natively and on JAX through jax2tf.
    tf = pytest.importorskip("tensorflow")
    model = pruned_model("functional", rng)
    x = rng.normal(size=(6, 4)).astype("float32")
    path = str(tmp_path / "saved_model")
    model.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(served, model.predict(x, verbose=0), rtol=0, atol=1e-6)

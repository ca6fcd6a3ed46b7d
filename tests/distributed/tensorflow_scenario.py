"""TensorFlow: `tf.distribute.MirroredStrategy` over 2 logical CPU devices vs one device.

Run as a script (tests/test_distribution.py does, in a subprocess): the
logical devices must be configured before TensorFlow initializes. Prints one
`RESULT {json}` line; any failed check raises.
"""

import os
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tensorflow as tf  # noqa: E402

# Two logical CPU devices out of the one physical CPU, before anything runs.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    assert_same_weights,
    compile_model,
    fit,
    make_data,
    make_model,
    max_gap,
    report,
    scheduler,
    scratch_dir,
    sparse_layers,
    weights_by_name,
    weights_by_path,
)


def replicas_in_step(strategy, model, when):
    """Every mirrored weight holds the same value on both devices."""
    for variable in model.weights:
        copies = strategy.experimental_local_results(variable.value)
        assert len(copies) == 2, (when, variable.path, copies)
        first = copies[0].numpy()
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy.numpy(), first, err_msg=f"{when}: {variable.path}")


def main():
    timings = {}
    start = time.perf_counter()
    logical = tf.config.list_logical_devices("CPU")
    assert len(logical) == 2, logical
    x, y = make_data()

    # --- single device: the reference -------------------------------------
    keras.utils.set_random_seed(0)
    reference = make_model()
    initial = reference.get_weights()
    compile_model(reference)
    fit(reference, x, y)
    expected = weights_by_path(reference)
    expected_active = {layer.name: layer.num_active() for layer in sparse_layers(reference)}
    timings["single_device_s"] = time.perf_counter() - start

    # --- MirroredStrategy over the 2 logical CPUs -------------------------
    t0 = time.perf_counter()
    strategy = tf.distribute.MirroredStrategy([device.name for device in logical])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = make_model()
        model.set_weights(initial)
        compile_model(model)
    fit(model, x, y)  # Keras uses the strategy the model was created under
    for variable in model.weights:
        assert isinstance(variable.value, tf.distribute.DistributedValues), variable.path
    replicas_in_step(strategy, model, "after fit")
    actual = weights_by_path(model)
    gap = max_gap(actual, expected)
    assert_same_weights(actual, expected, "MirroredStrategy vs single device")
    timings["mirrored_s"] = time.perf_counter() - t0

    # --- density(), hard_prune() and saving on mirrored variables ----------
    t0 = time.perf_counter()
    for layer in sparse_layers(model):
        assert layer.num_active() == expected_active[layer.name], layer.name
    for m in (model, reference):
        for layer in sparse_layers(m):
            layer.reset_threshold(0.05)
            layer.hard_prune()
    replicas_in_step(strategy, model, "after hard_prune")
    for layer in sparse_layers(model):
        assert layer.num_active() == reference.get_layer(layer.name).num_active(), layer.name
        assert layer.density() < 1.0, layer.name
    assert_same_weights(weights_by_path(model), weights_by_path(reference), "after hard_prune")

    path = os.path.join(tempfile.mkdtemp(dir=scratch_dir()), "mirrored.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert_same_weights(weights_by_name(restored), weights_by_name(model), "loaded", 0, 0)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    timings["prune_and_save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start

    report(
        backend="tensorflow",
        replicas=strategy.num_replicas_in_sync,
        callback=scheduler() is not None,
        mirrored_max_gap=gap,
        active={name: int(n) for name, n in expected_active.items()},
        timings=timings,
    )


if __name__ == "__main__":
    main()

"""JAX: DataParallel and ModelParallel on 8 virtual CPU devices vs one device.

Run as a script (tests/test_distribution.py does, in a subprocess): the
virtual devices must be requested before JAX is imported. Prints one
`RESULT {json}` line; any failed check raises.
"""

import os
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    assert_same_weights,
    compile_model,
    fit,
    log,
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
from keras.distribution import DataParallel, DeviceMesh, LayoutMap, ModelParallel  # noqa: E402

import keras_sparse  # noqa: E402


def spec_of(variable):
    """The variable's PartitionSpec as a tuple of the variable's rank."""
    spec = tuple(variable.value.sharding.spec)
    return spec + (None,) * (len(variable.shape) - len(spec))


def check_shardings(model, layout_map, when):
    """Every weight is laid out as the LayoutMap says (replicated if it says nothing)."""
    for variable in model.weights:
        layout = layout_map[variable.path]
        expected = (None,) * len(variable.shape) if layout is None else tuple(layout.axes)
        assert spec_of(variable) == expected, (when, variable.path, spec_of(variable), expected)


def main():
    timings = {}
    start = time.perf_counter()
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 8, devices
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

    # --- DataParallel over 8 devices --------------------------------------
    t0 = time.perf_counter()
    data_parallel = DataParallel(devices=devices)
    with data_parallel.scope():
        model = make_model()
        model.set_weights(initial)
        compile_model(model)
        fit(model, x, y)
    for variable in model.weights:
        sharding = variable.value.sharding
        assert sharding.is_fully_replicated and len(sharding.device_set) == 8, (
            variable.path,
            sharding,
        )
    actual = weights_by_path(model)
    dp_gap = max_gap(actual, expected)
    assert_same_weights(actual, expected, "DataParallel vs single device")
    for layer in sparse_layers(model):
        assert layer.num_active() == expected_active[layer.name], layer.name
    timings["data_parallel_s"] = time.perf_counter() - t0

    # --- ModelParallel on a 2x4 (batch, model) mesh ----------------------
    t0 = time.perf_counter()
    mesh = DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = LayoutMap(mesh)
    # The user's own entries for the Dense layer...
    layout_map["^(?:.*/)?dense/kernel$"] = (None, "model")
    layout_map["^(?:.*/)?dense/bias$"] = ("model",)
    # ... and the helper's for every SparseLinear, read from a blueprint
    # (the reference model: make_model() names its layers explicitly).
    keras_sparse.get_layout_map(layout_map, reference)
    model_parallel = ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with model_parallel.scope():
        model = make_model()
        check_shardings(model, layout_map, "at creation")
        keras_sparse.validate_layout_map(layout_map, model)
        model.set_weights(initial)
        compile_model(model)
        fit(model, x, y)
    check_shardings(model, layout_map, "after fit")
    hidden = model.get_layer("hidden")
    # Really split: each device holds a quarter of the outputs.
    assert hidden.kernel.value.addressable_shards[0].data.shape == (16, 4)
    assert hidden.threshold.value.addressable_shards[0].data.shape == (4,)
    hidden_2 = model.get_layer("hidden_2")
    assert hidden_2.threshold.value.addressable_shards[0].data.shape == (16, 2)
    assert spec_of(hidden_2.threshold) == (None, "model")
    assert spec_of(model.get_layer("logits").kernel) == (None, None)  # 6 units, 4-way axis
    # The optimizer's momentum follows its variable's layout.
    slots = {slot.path.split("/")[-1]: slot for slot in model.optimizer.variables}
    for variable in model.trainable_variables:
        slot = slots[variable.path.replace("/", "_") + "_momentum"]
        assert spec_of(slot) == spec_of(variable), (slot.path, spec_of(slot))
    actual = weights_by_path(model)
    mp_gap = max_gap(actual, expected)
    assert_same_weights(actual, expected, "ModelParallel vs single device")
    timings["model_parallel_s"] = time.perf_counter() - t0

    # --- density(), hard_prune() and saving on sharded variables ----------
    t0 = time.perf_counter()
    for layer in sparse_layers(model):
        assert layer.num_active() == expected_active[layer.name], layer.name
        assert abs(layer.density() - reference.get_layer(layer.name).density()) < 1e-12
    for m in (model, reference):
        for layer in sparse_layers(m):
            layer.reset_threshold(0.05)
            layer.hard_prune()
    check_shardings(model, layout_map, "after hard_prune")
    for layer in sparse_layers(model):
        ref_layer = reference.get_layer(layer.name)
        assert layer.num_active() == ref_layer.num_active(), layer.name
        assert layer.density() < 1.0, layer.name
        kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
        mask = np.asarray(keras.ops.convert_to_numpy(layer.prune_mask))
        assert np.all(kernel[mask == 0] == 0), layer.name
    assert_same_weights(weights_by_path(model), weights_by_path(reference), "after hard_prune")

    path = os.path.join(tempfile.mkdtemp(dir=scratch_dir()), "model_parallel.keras")
    model.save(path)
    saved = weights_by_name(model)
    predictions = np.asarray(model.predict(x, verbose=0))
    restored = keras.saving.load_model(path)  # on one device
    assert_same_weights(weights_by_name(restored), saved, "loaded", rtol=0, atol=0)
    np.testing.assert_allclose(
        np.asarray(restored.predict(x, verbose=0)), predictions, rtol=1e-5, atol=1e-6
    )
    with model_parallel.scope():  # and sharded again
        resharded = keras.saving.load_model(path)
    check_shardings(resharded, layout_map, "after load_model")
    assert_same_weights(weights_by_name(resharded), saved, "loaded, sharded", rtol=0, atol=0)
    timings["prune_and_save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start

    report(
        backend="jax",
        devices=len(devices),
        callback=scheduler() is not None,
        data_parallel_max_gap=dp_gap,
        model_parallel_max_gap=mp_gap,
        active={name: int(n) for name, n in expected_active.items()},
        timings=timings,
    )
    log("layout map:", {key: layout_map[key].axes for key in layout_map})


if __name__ == "__main__":
    main()

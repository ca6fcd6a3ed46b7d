"""Shipping a pruned model: export routes, atomic writes and size figures.

One small model is trained, pruned and exported once per (format, strip)
for the whole module; each test checks one property of one artifact against
a NumPy forward pass of the pruned network.
"""

import gzip
import os
import sys

import keras
import numpy as np
import pytest
from backend_utils import to_numpy
from conftest import require, skip_route

from keras_sparse import SparseConv2D, SparseLinear, sparse_layers, sparsify
from keras_sparse.export import (
    EXPORT_FORMATS,
    export_model,
    export_problem,
    size_report,
)

BACKEND = keras.backend.backend()
ARTIFACT = {"tf_saved_model": "saved_model", "onnx": "model.onnx", "litert": "model.tflite"}
STRIP = pytest.mark.parametrize("strip", [False, True], ids=["sparse", "stripped"])


def _forward(x, kernels, biases):
    """NumPy reference of the served network: relu hidden layer, linear output."""
    h = np.maximum(x @ kernels[0] + biases[0], 0.0)
    return h @ kernels[1] + biases[1]


class Shipped:
    """A trained, hard-pruned model, its NumPy reference, and lazily made exports."""

    def __init__(self, directory):
        self.directory = directory
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        inputs = keras.Input((6,), name="features")
        hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
        outputs = keras.layers.Dense(3, name="logits")(hidden)
        model = sparsify(keras.Model(inputs, outputs))
        model.compile(optimizer="sgd", loss="mse")
        x_train = rng.normal(size=(16, 6)).astype("float32")
        model.fit(x_train, rng.normal(size=(16, 3)).astype("float32"), batch_size=8, verbose=0)
        self.kernels, self.biases = [], []
        for layer in sparse_layers(model):
            kernel = to_numpy(layer.kernel)
            threshold = float(np.median(np.abs(kernel)))
            layer.reset_threshold(threshold)
            self.kernels.append(np.where(np.abs(kernel) >= threshold, kernel, 0.0))
            self.biases.append(to_numpy(layer.bias))
            layer.hard_prune()
        self.model = model
        self.x = rng.normal(size=(4, 6)).astype("float32")
        self.expected = _forward(self.x, self.kernels, self.biases)
        self._artifacts = {}

    def artifact(self, format, strip):
        problem = export_problem(format)
        if problem:
            skip_route(problem)
        key = (format, strip)
        if key not in self._artifacts:
            name = ("stripped_" if strip else "sparse_") + ARTIFACT[format]
            path = os.path.join(self.directory, name)
            export_model(self.model, path, format, strip=strip)
            self._artifacts[key] = path
        return self._artifacts[key]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return Shipped(str(tmp_path_factory.mktemp("exports")))


def test_fixture_is_pruned_and_its_reference_matches_keras(shipped):
    # Guards the other tests: half of each kernel is zero, and Keras's own
    # inference agrees with the NumPy reference they compare against.
    for kernel in shipped.kernels:
        assert 0 < np.count_nonzero(kernel) < kernel.size
    np.testing.assert_allclose(
        shipped.model.predict(shipped.x, verbose=0), shipped.expected, rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------ SavedModel


def _saved_model_ops(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    found = set()
    for graph in proto.meta_graphs:
        found.update(node.op for node in graph.graph_def.node)
        for function in graph.graph_def.library.function:
            found.update(node.op for node in function.node_def)
    return found


@STRIP
def test_saved_model_reloads_with_the_same_outputs(shipped, strip):
    tf = require("tensorflow")
    reloaded = tf.saved_model.load(shipped.artifact("tf_saved_model", strip))
    outputs = reloaded.serve(shipped.x).numpy()
    np.testing.assert_allclose(outputs, shipped.expected, rtol=1e-5, atol=1e-6)


@STRIP
def test_saved_model_variables_hold_the_pruned_kernels(shipped, strip):
    tf = require("tensorflow")
    reloaded = tf.saved_model.load(shipped.artifact("tf_saved_model", strip))
    values = [v.numpy() for v in reloaded.variables]
    for kernel in shipped.kernels:
        assert any(v.shape == kernel.shape and np.array_equal(v, kernel) for v in values)


@STRIP
def test_saved_model_graph_has_no_soft_mask(shipped, strip):
    if BACKEND == "jax":
        pytest.skip("jax2tf stores one opaque XlaCallModule; the outputs test covers it")
    ops = _saved_model_ops(shipped.artifact("tf_saved_model", strip))
    assert "MatMul" in ops
    assert "Sigmoid" not in ops


@pytest.mark.requires_tensorflow
def test_saved_model_op_scan_sees_a_soft_mask(tmp_path):
    # Positive control for the test above: inference_mask="soft" shows up.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, SparseLinear(2, inference_mask="soft")(inputs))
    model.export(str(tmp_path / "soft"), verbose=False)
    assert "Sigmoid" in _saved_model_ops(str(tmp_path / "soft"))


# ------------------------------------------------------------------ ONNX


def _onnx_model(path):
    onnx = require("onnx")
    return onnx.load(path)


@STRIP
@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_with_the_same_outputs(shipped, strip):
    ort = require("onnxruntime")
    session = ort.InferenceSession(shipped.artifact("onnx", strip))
    (outputs,) = session.run(None, {session.get_inputs()[0].name: shipped.x})
    np.testing.assert_allclose(outputs, shipped.expected, rtol=1e-5, atol=1e-5)


@STRIP
def test_onnx_initializers_hold_the_pruned_kernels(shipped, strip):
    path = shipped.artifact("onnx", strip)
    from onnx import numpy_helper

    arrays = [numpy_helper.to_array(t) for t in _onnx_model(path).graph.initializer]
    for kernel in shipped.kernels:
        # The kernel, zeros included, possibly stored transposed (Gemm).
        assert any(np.array_equal(a, kernel) or np.array_equal(a, kernel.T) for a in arrays), (
            f"no initializer equals the pruned {kernel.shape} kernel"
        )


@STRIP
def test_onnx_graph_has_no_soft_mask(shipped, strip):
    nodes = {node.op_type for node in _onnx_model(shipped.artifact("onnx", strip)).graph.node}
    assert nodes & {"MatMul", "Gemm"}
    assert "Sigmoid" not in nodes


def test_stripped_onnx_graph_is_plain_matmuls(shipped):
    nodes = {node.op_type for node in _onnx_model(shipped.artifact("onnx", True)).graph.node}
    assert not nodes & {"Abs", "GreaterOrEqual", "Greater", "Less", "Where"}


# ---------------------------------------------------------------- LiteRT


def _tflite_interpreter(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        tf = require("tensorflow")
        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=path)


@STRIP
def test_litert_runs_with_the_same_outputs(shipped, strip):
    interpreter = _tflite_interpreter(shipped.artifact("litert", strip))
    (feed,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(feed["index"], shipped.x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(feed["index"], shipped.x)
    interpreter.invoke()
    outputs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(outputs, shipped.expected, rtol=1e-5, atol=1e-5)


@STRIP
def test_litert_constants_hold_the_pruned_kernels(shipped, strip):
    interpreter = _tflite_interpreter(shipped.artifact("litert", strip))
    interpreter.allocate_tensors()
    arrays = []
    for detail in interpreter.get_tensor_details():
        try:
            arrays.append(interpreter.get_tensor(detail["index"]))
        except ValueError:  # a tensor with no data (activations)
            continue
    for kernel in shipped.kernels:
        # FULLY_CONNECTED stores its weights as (units, in_features).
        assert any(np.array_equal(a, kernel.T) or np.array_equal(a, kernel) for a in arrays)


# ------------------------------------------------------ routes and errors


@pytest.mark.parametrize(
    "format, backend, words",
    [
        ("tf_saved_model", "torch", "torch_xla"),
        ("litert", "jax", "TensorFlow and PyTorch"),
        ("pickle", "tensorflow", "Unknown export format"),
    ],
)
def test_export_problem_explains_a_missing_route(format, backend, words):
    assert words in export_problem(format, backend)


def test_onnx_exists_on_every_backend():
    for backend in ("tensorflow", "jax", "torch"):
        problem = export_problem("onnx", backend)
        assert problem is None or "pip install" in problem


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "user"])
def test_a_missing_converter_fails_in_ci_and_skips_elsewhere(monkeypatch, ci):
    # The converter of this backend's ONNX route, as if it were not installed.
    converter = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "onnxscript"}[BACKEND]
    monkeypatch.setitem(sys.modules, converter, None)
    problem = export_problem("onnx")
    assert f"pip install {converter}" in problem
    if ci:
        monkeypatch.setenv("KERAS_SPARSE_REQUIRE_ALL", "1")
    else:
        monkeypatch.delenv("KERAS_SPARSE_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match=converter):
        skip_route(problem)


def test_export_of_unknown_format_raises_and_writes_nothing(shipped, tmp_path):
    with pytest.raises(ValueError, match="Unknown export format 'pickle'"):
        export_model(shipped.model, tmp_path / "model.pkl", "pickle")
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_no_partial_output(shipped, tmp_path, monkeypatch):
    available = [f for f in EXPORT_FORMATS if export_problem(f) is None]
    if not available:
        skip_route(f"no export route is available here: {export_problem(EXPORT_FORMATS[0])}")
    format = available[0]

    def export_then_crash(self, filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half an artifact")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", export_then_crash)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_model(shipped.model, tmp_path / "model.out", format)
    assert os.listdir(tmp_path) == []


def test_export_replaces_an_existing_file_whole(shipped, tmp_path):
    if export_problem("onnx"):
        skip_route(export_problem("onnx"))
    target = tmp_path / "model.onnx"
    target.write_bytes(b"stale")
    export_model(shipped.model, target, "onnx", strip=True)
    assert target.read_bytes() != b"stale"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


@pytest.mark.slow
def test_onnx_with_its_weights_in_a_data_file_keeps_that_file(tmp_path):
    # JAX's ONNX route writes large weights to `<name>.onnx.data` beside the model. The
    # export once moved the model out of its scratch folder and deleted the folder with
    # the data file in it: onnxruntime then refused the model.
    if export_problem("onnx"):
        skip_route(export_problem("onnx"))
    ort = require("onnxruntime")
    size = 1024
    rng = np.random.default_rng(0)
    inputs = keras.Input((size,), name="features")
    outputs = keras.layers.Dense(4, name="logits")(keras.layers.Dense(size, name="wide")(inputs))
    model = sparsify(keras.Model(inputs, outputs))
    for layer in sparse_layers(model):
        layer.reset_threshold(float(np.median(np.abs(to_numpy(layer.kernel)))))
        layer.hard_prune()
    x = rng.normal(size=(2, size)).astype("float32")
    expected = to_numpy(model(x, training=False))
    path = tmp_path / "model.onnx"
    export_model(model, path, "onnx", strip=True)
    assert set(os.listdir(tmp_path)) <= {"model.onnx", "model.onnx.data"}
    session = ort.InferenceSession(str(path))
    (served,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
    # A smaller model exported to the same path leaves no stale data file behind.
    small_inputs = keras.Input((3,))
    small = sparsify(keras.Model(small_inputs, keras.layers.Dense(2)(small_inputs)))
    export_model(small, path, "onnx", strip=True)
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_a_model_taking_a_dict_exports_stripped(tmp_path):
    # The stripped copy has never been called, and export calls it once on zeros: the
    # zeros came as a list in the order of `model.inputs`, which a model taking a dict
    # refuses where that order is not the keys' (keras-hub's BartBackbone).
    if export_problem("onnx"):
        skip_route(export_problem("onnx"))
    ort = require("onnxruntime")
    rng = np.random.default_rng(0)
    inputs = {"values": keras.Input((6,), name="values"), "scale": keras.Input((1,), name="scale")}
    hidden = keras.layers.Dense(8, name="hidden")(inputs["values"])
    outputs = keras.layers.Multiply()(
        [keras.layers.Dense(2, name="logits")(hidden), inputs["scale"]]
    )
    model = sparsify(keras.Model(inputs, outputs))
    for layer in sparse_layers(model):
        layer.reset_threshold(float(np.median(np.abs(to_numpy(layer.kernel)))))
        layer.hard_prune()
    x = {
        "values": rng.normal(size=(2, 6)).astype("float32"),
        "scale": rng.normal(size=(2, 1)).astype("float32"),
    }
    expected = to_numpy(model(x, training=False))
    path = tmp_path / "model.onnx"
    export_model(model, path, "onnx", strip=True)
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    feeds = {name: x[next(key for key in x if key in name)] for name in names}
    (served,) = session.run(None, feeds)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


@STRIP
def test_a_sequential_never_called_exports(tmp_path, strip):
    # A Sequential loaded from .keras (the command line's only input) has never been
    # called, and its `input` raises until it is: export's call on zeros must not ask it.
    if export_problem("onnx"):
        skip_route(export_problem("onnx"))
    ort = require("onnxruntime")
    rng = np.random.default_rng(0)
    model = sparsify(
        keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)]
        )
    )
    kernels, biases = [], []
    for layer in sparse_layers(model):
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
        kernel = to_numpy(layer.kernel)
        layer.reset_threshold(float(np.median(np.abs(kernel))))
        layer.hard_prune()
        kernels.append(np.where(np.abs(kernel) >= np.median(np.abs(kernel)), kernel, 0.0))
        biases.append(to_numpy(layer.bias))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    path = tmp_path / "model.onnx"
    export_model(loaded, path, "onnx", strip=strip)
    x = rng.normal(size=(4, 6)).astype("float32")
    session = ort.InferenceSession(str(path))
    (served,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(served, _forward(x, kernels, biases), rtol=1e-5, atol=1e-5)


def test_export_with_strip_needs_a_sparse_layer(tmp_path):
    inputs = keras.Input((3,))
    dense = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no sparse layer"):
        export_model(dense, tmp_path / "m.onnx", "onnx", strip=True)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ size_report


def _one_layer(kernel, bias, threshold):
    inputs = keras.Input((kernel.shape[0],))
    layer = SparseLinear(kernel.shape[1], name="only")
    model = keras.Model(inputs, layer(inputs))
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    layer.reset_threshold(threshold)
    return model


KERNEL = np.array(
    [[0.9, -0.1, 0.5], [0.05, -0.7, 0.2], [-0.3, 0.0, 0.8], [0.6, 0.15, -0.25]], "float32"
)
BIAS = np.array([1.0, 0.0, -2.0], "float32")


def test_size_report_counts_the_served_parameters():
    report = size_report(_one_layer(KERNEL, BIAS, 0.3))
    # |w| >= 0.3 keeps 0.9, 0.5, -0.7, -0.3, 0.8, 0.6: 6 weights; bias has 2 nonzeros.
    assert report.params == 12 + 3
    assert report.nonzero == 6 + 2


def test_size_report_counts_the_sparse_layers_state_as_given():
    report = size_report(_one_layer(KERNEL, BIAS, 0.3))
    # kernel 12 + bias 3 + threshold 3 + prune_mask 12 + temperature 1 + penalty 1
    # + the driver's state 5, all float32 but the boolean prune_mask (one byte each).
    assert report.sparse.params == 37
    assert report.sparse.weight_bytes == 25 * 4 + 12 * 1


def test_size_report_int8_kernel_is_one_byte_per_weight():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(16, 8)).astype("float32")
    report = size_report(_one_layer(kernel, np.zeros(8, "float32"), 0.0))
    assert report.stripped.kernel_bytes == 16 * 8 * 4
    assert report.int8.kernel_bytes == 16 * 8
    # int8 kernel + a float32 scale per unit + the float32 bias.
    assert report.int8.weight_bytes == 16 * 8 + 8 * 4 + 8 * 4


def test_size_report_compresses_zeros_away():
    kernel = np.random.default_rng(0).normal(size=(64, 64)).astype("float32")
    bias = np.zeros(64, "float32")
    bias[0] = 1.0
    dense = size_report(_one_layer(kernel, bias, 0.0))
    pruned = size_report(_one_layer(kernel, bias, 1e9))
    assert pruned.stripped.nonzero == 1  # only the bias survives
    assert pruned.stripped.compressed_bytes * 10 < dense.stripped.compressed_bytes


def test_size_report_compressed_size_is_gzip_of_the_weights():
    report = size_report(_one_layer(KERNEL, BIAS, 0.3))
    pruned = np.where(np.abs(KERNEL) >= 0.3, KERNEL, 0.0).astype("float32")
    raw = pruned.tobytes() + BIAS.tobytes()
    assert report.stripped.compressed_bytes == len(gzip.compress(raw, compresslevel=9, mtime=0))


def test_size_report_keras_size_is_the_saved_file(tmp_path):
    model = _one_layer(KERNEL, BIAS, 0.3)
    model.save(tmp_path / "model.keras")
    # The .keras zip embeds a timestamp; its length, not its value, is fixed.
    assert size_report(model).sparse.keras_bytes == os.path.getsize(tmp_path / "model.keras")


def test_size_report_leaves_the_model_alone():
    model = _one_layer(KERNEL, BIAS, 0.3)
    size_report(model)
    (layer,) = sparse_layers(model)
    assert layer.quantization_mode is None
    np.testing.assert_array_equal(to_numpy(layer.kernel), KERNEL)


def test_size_report_prints_a_table():
    text = str(size_report(_one_layer(KERNEL, BIAS, 0.3)))
    lines = text.splitlines()
    assert lines[0].split() == [
        "model",
        "params",
        "nonzero",
        "weights",
        "kernels",
        ".keras",
        "gzip",
    ]
    assert lines[3].split()[:3] == ["stripped", "15", "8"]


def _conv_dense_model():
    inputs = keras.Input((6, 6, 2))
    x = SparseConv2D(3, 3, name="conv")(inputs)  # 3 * 3 * 2 * 3 = 54 weights
    # 2 * 2 * 3 = 12 depthwise and 3 * 3 = 9 pointwise weights
    x = keras.layers.SeparableConv2D(3, 2, name="separable")(x)
    x = keras.layers.Flatten()(x)
    outputs = SparseLinear(4, name="head")(x)  # 3 * 3 * 3 * 4 = 108 weights
    return keras.Model(inputs, outputs)


def test_size_report_names_the_layers_int8_leaves_in_float32():
    report = size_report(_conv_dense_model())
    # Keras quantizes Dense to int8, not the convolutions.
    assert report.not_quantized == ("conv", "separable")
    assert report.not_quantized_share == pytest.approx((54 + 21) / (54 + 21 + 108))
    assert str(report).splitlines()[-1] == (
        "int8: left float32, as Keras has no int8 form for them: 2 layers holding 41.0% of "
        "the kernel weights (conv, separable)"
    )
    assert report.to_markdown().endswith("(conv, separable)")
    # Every weight matrix counts as a kernel, the separable ones included.
    assert report.stripped.kernel_bytes == (54 + 21 + 108) * 4
    assert report.int8.kernel_bytes == (54 + 21) * 4 + 108


def test_size_report_of_a_dense_model_has_no_float32_note():
    report = size_report(_one_layer(KERNEL, BIAS, 0.3))
    assert report.not_quantized == ()
    assert str(report).splitlines()[-1] == "(sizes in bytes)"

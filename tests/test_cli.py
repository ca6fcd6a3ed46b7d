"""`python -m keras_sparse report|strip|export`: outputs, exit codes, no leftovers."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from backend_utils import to_numpy
from conftest import require, skip_route

from keras_sparse import sparse_layers, sparsify
from keras_sparse.__main__ import main
from keras_sparse.export import export_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sparse_model():
    inputs = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    model = sparsify(keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden)))
    for layer in sparse_layers(model):
        layer.reset_threshold(0.4)
        layer.hard_prune()
    return model


@pytest.fixture
def sparse_file(tmp_path):
    path = tmp_path / "sparse.keras"
    _sparse_model().save(path)
    return path


def _bad_input(kind, tmp_path):
    """A model path that every command must refuse, and the words of the refusal."""
    if kind == "missing":
        return tmp_path / "absent.keras", "absent.keras: no such file"
    if kind == "not a model":
        path = tmp_path / "notes.keras"
        path.write_text("not a zip")
        return path, "not a Keras model file"
    inputs = keras.Input((6,))
    path = tmp_path / "dense.keras"
    keras.Model(inputs, keras.layers.Dense(3)(inputs)).save(path)
    return path, "has no sparse layer"


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _any_export_format():
    for format in ("onnx", "tf_saved_model", "litert"):
        if export_problem(format) is None:
            return format
    skip_route(export_problem("onnx"))


# ------------------------------------------------------------------- report


def test_report_prints_sparsity_and_size_tables(sparse_file, capsys):
    model = keras.saving.load_model(sparse_file)
    active = [int(np.count_nonzero(to_numpy(layer.kernel))) for layer in sparse_layers(model)]
    code, out, err = _run(["report", sparse_file], capsys)
    assert code == 0
    rows = {}
    for line in out.splitlines():
        cells = line.replace("stripped + int8", "int8").split()
        if cells:
            rows.setdefault(cells[0], cells)
    assert rows["hidden"][4:6] == [str(active[0]), "30"]
    assert rows["logits"][4:6] == [str(active[1]), "15"]
    assert rows["total"][1:3] == [str(sum(active)), "45"]
    assert rows["stripped"][1:3] == [str(30 + 5 + 15 + 3), str(sum(active))]  # biases are 0
    assert rows["int8"][1] == str(30 + 15 + 2 * (5 + 3))  # int8 kernels, scales, biases
    assert "Loading" in err  # progress goes to stderr


def test_report_markdown(sparse_file, capsys):
    code, out, _ = _run(["report", sparse_file, "--markdown"], capsys)
    assert code == 0
    assert "| layer | kernel shape | active | total | density |" in out
    assert "| model | params | nonzero |" in out


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_silences_progress(sparse_file, capsys, where):
    argv = ["-q", "report", sparse_file] if where == "before" else ["report", sparse_file, "-q"]
    code, out, err = _run(argv, capsys)
    assert code == 0 and out
    assert err == ""


# -------------------------------------------------------------------- strip


def test_strip_writes_a_plain_dense_model(sparse_file, tmp_path, capsys):
    output = tmp_path / "stripped.keras"
    code, _, err = _run(["strip", sparse_file, "-o", output], capsys)
    assert code == 0
    assert f"Wrote {output}" in err
    expected = [to_numpy(layer.kernel) for layer in sparse_layers(_loaded(sparse_file))]
    assert all((kernel == 0).any() for kernel in expected)  # hard-pruned: zeros in place
    stripped = keras.saving.load_model(output)
    assert [type(layer) for layer in stripped.layers[1:]] == [keras.layers.Dense] * 2
    for layer, kernel in zip(stripped.layers[1:], expected, strict=True):
        np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
    assert sorted(os.listdir(tmp_path)) == ["sparse.keras", "stripped.keras"]


def _loaded(path):
    return keras.saving.load_model(path)


def test_strip_output_must_be_a_keras_file(sparse_file, tmp_path, capsys):
    code, _, err = _run(["strip", sparse_file, "-o", tmp_path / "out.h5"], capsys)
    assert code == 2
    assert "must be a .keras file" in err
    assert os.listdir(tmp_path) == ["sparse.keras"]


# ------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_writes_an_artifact_serving_the_same_outputs(sparse_file, tmp_path, capsys):
    # With --strip: the export of the sparse model itself is test_export.py's.
    if export_problem("onnx"):
        skip_route(export_problem("onnx"))
    ort = require("onnxruntime")
    output = tmp_path / "model.onnx"
    argv = ["export", sparse_file, "-o", output, "--format", "onnx", "--strip"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    session = ort.InferenceSession(str(output))
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(y, _loaded(sparse_file).predict(x, verbose=0), atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "sparse.keras"]


def test_export_route_missing_on_this_backend_is_refused(sparse_file, tmp_path, capsys):
    missing = [f for f in ("tf_saved_model", "onnx", "litert") if export_problem(f)]
    if not missing:
        pytest.skip(f"every route exists on the {keras.backend.backend()} backend")
    format = missing[0]
    output = tmp_path / ("model.tflite" if format == "litert" else "model.out")
    code, _, err = _run(["export", sparse_file, "-o", output, "--format", format], capsys)
    assert code == 2
    assert export_problem(format) in err
    assert os.listdir(tmp_path) == ["sparse.keras"]


def test_export_refusal_comes_before_loading(sparse_file, tmp_path, capsys, monkeypatch):
    import keras_sparse.export

    monkeypatch.setattr(keras_sparse.export, "export_problem", lambda format: "no route here")
    code, _, err = _run(
        ["export", sparse_file, "-o", tmp_path / "m.onnx", "--format", "onnx"], capsys
    )
    assert code == 2
    assert "keras-sparse: error: no route here" in err
    assert "Loading" not in err
    assert os.listdir(tmp_path) == ["sparse.keras"]


def test_litert_output_must_be_a_tflite_file(sparse_file, tmp_path, capsys):
    argv = ["export", sparse_file, "-o", tmp_path / "model.bin", "--format", "litert"]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "must be a .tflite file" in err
    assert os.listdir(tmp_path) == ["sparse.keras"]


def test_unknown_format_is_a_usage_error(sparse_file, tmp_path, capsys):
    argv = ["export", sparse_file, "-o", tmp_path / "m", "--format", "pickle"]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "invalid choice: 'pickle'" in err


def test_failed_export_exits_2_and_leaves_nothing(sparse_file, tmp_path, capsys, monkeypatch):
    format = _any_export_format()

    def export_then_crash(self, filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half an artifact")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", export_then_crash)
    output = tmp_path / ("model.tflite" if format == "litert" else "model.out")
    code, _, err = _run(["export", sparse_file, "-o", output, "--format", format], capsys)
    assert code == 2
    assert "converter crashed" in err
    assert os.listdir(tmp_path) == ["sparse.keras"]


@pytest.mark.parametrize("command", ["strip", "export"])
def test_an_existing_folder_where_a_file_goes_exits_2_before_loading(
    command, sparse_file, tmp_path, capsys
):
    folder = tmp_path / ("out.keras" if command == "strip" else "out.onnx")
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    argv = [command, sparse_file, "-o", folder] + (
        ["--format", "onnx"] if command == "export" else []
    )
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "it is a directory" in err and "Loading" not in err
    assert os.listdir(folder) == ["keep.txt"]


# ------------------------------------------------------- bad model inputs


@pytest.mark.parametrize("kind", ["missing", "not a model", "no sparse layer"])
@pytest.mark.parametrize("command", ["report", "strip", "export"])
def test_bad_model_input_exits_2_with_a_message_and_writes_nothing(command, kind, tmp_path, capsys):
    path, words = _bad_input(kind, tmp_path)
    before = sorted(os.listdir(tmp_path))
    argv = [command, path]
    if command == "strip":
        argv += ["-o", tmp_path / "out.keras"]
    if command == "export":
        format = _any_export_format()
        output = "out.tflite" if format == "litert" else "out.onnx"
        argv += ["-o", tmp_path / output, "--format", format]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert err.splitlines()[-1].startswith("keras-sparse: error: ")
    assert words in err
    assert out == ""
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_command_is_a_usage_error(capsys):
    code, _, err = _run([], capsys)
    assert code == 2
    assert "usage: keras-sparse" in err


# ----------------------------------------------------------- as a program


@pytest.mark.slow
def test_python_dash_m_runs_the_cli(sparse_file, tmp_path):
    # The commands themselves are tested in this process above; this runs the program.
    pythonpath = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BACKEND"] = keras.backend.backend()
    output = tmp_path / "stripped.keras"
    result = subprocess.run(
        [sys.executable, "-m", "keras_sparse", "-q", "strip", str(sparse_file), "-o", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stripped = keras.saving.load_model(output)
    assert [type(layer) for layer in stripped.layers[1:]] == [keras.layers.Dense] * 2

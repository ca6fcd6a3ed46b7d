"""Scaling out: `get_layout_map`, and training under each backend's own engine.

The layout-map tests run in-process on every backend (a `DeviceMesh` of
device names needs no devices). The training scenarios each run in a
subprocess (tests/distributed/*_scenario.py), because the devices must be
set up before the backend starts: 8 virtual CPU devices for JAX, 2 logical
CPUs for TensorFlow, 2 gloo processes for PyTorch. Each runs only in its
backend's test run, so every CI run executes its own scenario once.
"""

import json
import os
import re
import socket
import subprocess
import sys

import keras
import pytest

import keras_sparse
from keras_sparse import SparseLinear, get_layout_map, validate_layout_map

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = os.path.join(ROOT, "tests", "distributed")


def mesh(shape=(2, 4)):
    count = shape[0] * shape[1]
    return keras.distribution.DeviceMesh(
        shape, ("batch", "model"), [f"cpu:{i}" for i in range(count)]
    )


def model(build=True):
    layers = [
        SparseLinear(16, name="hidden"),
        keras.layers.Dense(16, name="dense"),
        SparseLinear(8, structured=False, name="hidden_2"),
        SparseLinear(6, structured=False, name="logits"),
    ]
    inputs = [keras.Input((12,))] if build else []
    return keras.Sequential(inputs + layers, name="mlp")


def axes(layout_map, path):
    layout = layout_map[path]
    return None if layout is None else tuple(layout.axes)


# ------------------------------------------------------------ get_layout_map


def test_every_weight_is_laid_out_like_the_kernel():
    layout_map = get_layout_map(mesh(), model())
    # Structured: the threshold is laid out like the bias.
    assert axes(layout_map, "mlp/hidden/kernel") == (None, "model")
    assert axes(layout_map, "mlp/hidden/bias") == ("model",)
    assert axes(layout_map, "mlp/hidden/threshold") == ("model",)
    assert axes(layout_map, "mlp/hidden/prune_mask") == (None, "model")
    assert axes(layout_map, "mlp/hidden/temperature") == ()
    assert axes(layout_map, "mlp/hidden/sparsity_penalty") == ()
    # Unstructured: the threshold is laid out like the kernel.
    assert axes(layout_map, "mlp/hidden_2/threshold") == (None, "model")
    assert axes(layout_map, "mlp/hidden_2/prune_mask") == (None, "model")
    # 6 units do not split 4 ways: that layer stays whole, every weight alike.
    assert axes(layout_map, "mlp/logits/kernel") == (None, None)
    assert axes(layout_map, "mlp/logits/threshold") == (None, None)
    assert axes(layout_map, "mlp/logits/bias") == (None,)
    # Dense layers are the user's: nothing is written for them.
    assert axes(layout_map, "mlp/dense/kernel") is None
    validate_layout_map(layout_map, model())


def test_entries_match_wherever_the_layer_sits_and_nothing_else():
    layout_map = get_layout_map(mesh(), model())
    for path in ("hidden/kernel", "outer/mlp/hidden/kernel", "mlp_1/hidden/kernel"):
        assert axes(layout_map, path) == (None, "model"), path
    for path in ("mlp/xhidden/kernel", "mlp/hidden/kernel/output", "mlp/hidden_3/kernel"):
        assert axes(layout_map, path) is None, path


def test_an_unbuilt_model_is_enough():
    unbuilt = model(build=False)
    assert not unbuilt.get_layer("hidden").built
    built = get_layout_map(mesh(), model())
    from_unbuilt = get_layout_map(mesh(), unbuilt)
    # Without the input size only the output dimension can be checked, and
    # it is the one sharded by default: the same entries.
    assert {k: from_unbuilt[k].axes for k in from_unbuilt} == {k: built[k].axes for k in built}


def test_layer_name_patterns_need_the_threshold_kind():
    with pytest.raises(ValueError, match="structured"):
        get_layout_map(mesh(), "hidden.*")
    layout_map = get_layout_map(mesh(), "hidden.*", structured=True)
    assert axes(layout_map, "m/hidden_7/threshold") == ("model",)
    get_layout_map(layout_map, "logits", structured=False)  # adds to the same map
    assert axes(layout_map, "m/logits/threshold") == (None, "model")
    assert axes(layout_map, "m/logits/bias") == ("model",)


def test_kernel_axes_choose_the_layout_and_the_rest_follows():
    row = get_layout_map(mesh(), model(), kernel_axes=("model", None))
    assert axes(row, "mlp/hidden/kernel") == ("model", None)
    assert axes(row, "mlp/hidden/bias") == (None,)
    assert axes(row, "mlp/hidden/threshold") == (None,)
    assert axes(row, "mlp/hidden_2/threshold") == ("model", None)
    fsdp = get_layout_map(mesh(), model(), kernel_axes=("batch", "model"))
    assert axes(fsdp, "mlp/hidden_2/threshold") == ("batch", "model")
    assert axes(fsdp, "mlp/hidden_2/prune_mask") == ("batch", "model")
    assert axes(fsdp, "mlp/hidden/threshold") == ("model",)


def test_an_existing_layout_map_is_extended_in_place():
    layout_map = keras.distribution.LayoutMap(mesh())
    layout_map["^(?:.*/)?dense/kernel$"] = (None, "model")
    assert get_layout_map(layout_map, model()) is layout_map
    assert axes(layout_map, "mlp/dense/kernel") == (None, "model")
    assert axes(layout_map, "mlp/hidden/threshold") == ("model",)
    # Twice is harmless: the same entries are already there.
    get_layout_map(layout_map, model())


def test_a_kernel_regex_that_would_also_catch_sparse_weights_is_refused():
    # The trap: a Dense-minded `.*kernel` matches SparseLinear kernels
    # too, and Keras would refuse a path matched by two keys.
    layout_map = keras.distribution.LayoutMap(mesh())
    layout_map[".*kernel"] = (None, "model")
    with pytest.raises(ValueError, match=r"also matches the `SparseLinear` weight"):
        get_layout_map(layout_map, model())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model_parallel_dim_name": "tensor"}, "model_parallel_dim_name"),
        ({"data_parallel_dim_name": "data"}, "data_parallel_dim_name"),
        ({"kernel_axes": ("model",)}, "kernel_axes"),
        ({"kernel_axes": ("model", "model")}, "only one"),
        ({"kernel_axes": (None, "seq")}, "kernel_axes"),
    ],
)
def test_invalid_axes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_layout_map(mesh(), model(), **kwargs)


def test_invalid_targets_are_refused():
    with pytest.raises(TypeError, match="DeviceMesh"):
        get_layout_map("mesh", model())
    with pytest.raises(TypeError, match="layers"):
        get_layout_map(mesh(), 3)
    with pytest.raises(ValueError, match="No `SparseLinear`"):
        get_layout_map(mesh(), keras.Sequential([keras.layers.Dense(2)]))
    clash = keras.Sequential(
        [
            keras.Input((4,)),
            keras.Sequential([SparseLinear(4, name="twin")], name="a"),
            keras.Sequential([SparseLinear(4, structured=False, name="twin")], name="b"),
        ]
    )
    with pytest.raises(ValueError, match="distinct names"):
        get_layout_map(mesh(), clash)


# ------------------------------------------------------- validate_layout_map


def test_validate_catches_a_threshold_left_replicated():
    layout_map = keras.distribution.LayoutMap(mesh())
    layout_map[".*kernel"] = (None, "model")
    layout_map[".*bias"] = ("model",)
    with pytest.raises(ValueError, match=r"mlp/hidden_2/threshold: laid out as \(None, None\)"):
        validate_layout_map(layout_map, model())


def test_validate_catches_a_2d_layout_on_a_1d_threshold():
    layout_map = keras.distribution.LayoutMap(mesh())
    layout_map[".*/(kernel|threshold|prune_mask)"] = (None, "model")
    layout_map[".*bias"] = ("model",)
    with pytest.raises(ValueError, match=r"mlp/hidden/threshold: layout .* has rank 2"):
        validate_layout_map(layout_map, model())


# ----------------------------------------------------- training, per backend


def run_script(args, tmp_path, extra_env=None, timeout=180):
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["KERAS_SPARSE_SCRATCH"] = str(tmp_path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    process = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    return process


def run_scenario(name, tmp_path, extra_env=None):
    process = run_script([os.path.join(SCENARIOS, f"{name}_scenario.py")], tmp_path, extra_env)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, process.stdout[-3000:]
    return json.loads(lines[0][len("RESULT ") :])


def only_on(backend):
    return pytest.mark.skipif(
        BACKEND != backend,
        reason=f"the {backend} distributed scenario runs in the {backend} backend's test run",
    )


def has_scheduler():
    return hasattr(keras_sparse, "SparsityScheduler")


@only_on("jax")
@pytest.mark.slow
def test_jax_data_and_model_parallel_match_one_device(tmp_path):
    """8 virtual CPU devices: DataParallel, then ModelParallel on a 2x4 mesh.

    The scenario asserts: every variable (and optimizer slot) is sharded as
    the layout map says, at creation and after `fit`, `hard_prune()` and
    `load_model`; weights after `fit` (with `SparsityScheduler`) equal
    single-device training within rtol=atol=1e-5; `density()`/`num_active()`
    equal; `hard_prune()` keeps the shardings; a saved model loads, on one
    device and sharded, bit for bit.
    """
    # The test environments' unoptimized XLA code generation (it saves compile time) keeps
    # the sharded and single-device programs within the tolerance.
    flags = os.environ.get("XLA_FLAGS", "")
    result = run_scenario(
        "jax",
        tmp_path,
        {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip()},
    )
    assert result["devices"] == 8
    assert result["callback"] == has_scheduler()
    assert result["data_parallel_max_gap"][0] < 1e-5
    assert result["model_parallel_max_gap"][0] < 1e-5


@only_on("tensorflow")
@pytest.mark.slow
def test_tensorflow_mirrored_strategy_matches_one_device(tmp_path):
    """MirroredStrategy over 2 logical CPUs: weights in step on both replicas,
    equal to single-device `fit` within rtol=atol=1e-5; `hard_prune()` and
    saving work on mirrored variables."""
    result = run_scenario("tensorflow", tmp_path)
    assert result["replicas"] == 2
    assert result["callback"] == has_scheduler()
    assert result["mirrored_max_gap"][0] < 1e-5


@only_on("torch")
@pytest.mark.slow
def test_torch_ddp_keeps_thresholds_in_step(tmp_path):
    """2 gloo processes, DDP around the Keras model: every weight, thresholds
    included, is bitwise equal across ranks (also after `hard_prune()`) and
    equal to one-process training within rtol=atol=1e-5."""
    result = run_scenario("torch", tmp_path)
    assert result["world_size"] == 2
    assert result["ddp_max_gap"][0] < 1e-5


# ------------------------------------------------ the docs' recipes, as written


def scaling_out_section():
    """The distributed-training guide, docs/distributed.md (its recipes are run here)."""
    with open(os.path.join(ROOT, "docs", "distributed.md"), encoding="utf-8") as f:
        return f.read()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_scaling_out_recipe_runs_as_written(tmp_path):
    """The section's script for this backend, run unchanged (but for the
    PyTorch rendezvous port, made free for parallel CI runs)."""
    blocks = re.findall(r"```python\n(.*?)```", scaling_out_section(), re.S)
    mine = [b for b in blocks if f'os.environ["KERAS_BACKEND"] = "{BACKEND}"' in b]
    assert len(mine) == 1, f"expected one {BACKEND} recipe, found {len(mine)}"
    script = mine[0].replace("127.0.0.1:29500", f"127.0.0.1:{free_port()}")
    (tmp_path / "recipe.py").write_text(script)
    process = run_script(["recipe.py"], tmp_path)
    assert "{" in process.stdout  # the densities it prints
    assert (tmp_path / "sparse_mlp.keras").exists()


@only_on("jax")
@pytest.mark.slow
def test_the_model_parallel_example_runs(tmp_path, capsys, monkeypatch):
    # In this process, on its one device (`--devices 0`, a 1x1 mesh): the recipe test above
    # and the JAX scenario train on 8 virtual devices already.
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import model_parallel

    path = str(tmp_path / "m.keras")
    model_parallel.main(["--devices", "0", "--mesh", "1x1", "--epochs", "2", "--save", path])
    assert "Test accuracy" in capsys.readouterr().out
    assert os.path.exists(path)

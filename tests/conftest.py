import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import importlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_tensorflow: needs the TensorFlow backend")
    config.addinivalue_line(
        "markers", "slow: takes seconds to tens of seconds (a subprocess, a real model)"
    )


def pytest_collection_modifyitems(config, items):
    skip_tf = pytest.mark.skip(reason="this route exists only on the TensorFlow backend")
    for item in items:
        if "requires_tensorflow" in item.keywords and BACKEND != "tensorflow":
            item.add_marker(skip_tf)
    # The slow tests first: the parallel workers (pytest-xdist) take tests in this order, so
    # none is left running a long one alone at the end.
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session(free_memory=False)  # gc.collect() per test costs ~0.5 s
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def require(module):
    """`module`, imported; or a skip saying what to install, except in CI
    (`KERAS_SPARSE_REQUIRE_ALL=1`), where a missing tool is a failure."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("KERAS_SPARSE_REQUIRE_ALL"):
            raise
        pytest.skip(f"{module} is not installed: pip install 'keras-sparse[test]'")


def skip_route(problem):
    """Skip a test whose export route does not exist here, with why; but a route that
    only lacks an installed tool fails in CI (`KERAS_SPARSE_REQUIRE_ALL=1`)."""
    # litert-torch is left out of the `export` extra (it pins old common packages).
    missing_tool = "pip install" in problem and "litert-torch" not in problem
    if os.environ.get("KERAS_SPARSE_REQUIRE_ALL") and missing_tool:
        pytest.fail(f"CI installs every export tool of the `export` extra, yet: {problem}")
    pytest.skip(problem)

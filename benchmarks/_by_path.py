"""Load a module from its file, for the peers' environments.

The peers' tox environments do not install keras_sparse (importing the package
would pull in Keras 3 beside tf-keras), so their scripts load the benchmark
they mirror, and `keras_sparse/datasets.py` on its own, by path.
"""

import importlib.util


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

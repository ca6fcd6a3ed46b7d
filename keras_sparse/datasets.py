"""Real data that needs no download: scikit-learn's digits, and MNIST from files you have."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

MNIST_ENV_VAR = "KERAS_SPARSE_MNIST_DIR"
_IMAGES, _LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"

HOW_TO_GET_MNIST = (
    "To get the files, download t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
    "(the MNIST test split, from a mirror of Yann LeCun's MNIST page) into a folder, "
    "or run `keras.datasets.mnist.load_data()` once on a machine with network access, "
    "which caches ~/.keras/datasets/mnist.npz."
)


def keras_mnist_cache() -> Path:
    """Where Keras caches `keras.datasets.mnist`: `$KERAS_HOME/datasets/mnist.npz`, else
    `~/.keras/datasets/mnist.npz`."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets" / "mnist.npz"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {array.size} values")
    return array.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"No MNIST file '{stem}[.gz]' in {str(directory)!r}: the folder must hold "
        f"{_IMAGES}[.gz] and {_LABELS}[.gz]. {HOW_TO_GET_MNIST}"
    )


def _read_test_split(path: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test images and labels, from the first source that is given or present."""
    if path is None and os.environ.get(MNIST_ENV_VAR):
        path = os.environ[MNIST_ENV_VAR]
        source = f"${MNIST_ENV_VAR}"
    else:
        source = "`path`"
    if path is not None:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"Received an invalid value for {source}: {str(directory)!r} is not a folder. "
                f"Pass the folder holding the MNIST IDX files. {HOW_TO_GET_MNIST}"
            )
        return _read_idx(_find(directory, _IMAGES)), _read_idx(_find(directory, _LABELS))
    cache = keras_mnist_cache()
    if cache.is_file():
        # Keras's test split is the same 10,000 images as the t10k IDX files.
        with np.load(cache) as data:
            return data["x_test"], data["y_test"]
    raise FileNotFoundError(
        "No MNIST data found. Pass the folder holding the MNIST IDX files as `path` "
        f"(load_mnist(path) or `--mnist DIR`), or set ${MNIST_ENV_VAR} to it; "
        f"Keras's own cache {str(cache)!r} is not present either. {HOW_TO_GET_MNIST}"
    )


def load_mnist(path: str | os.PathLike | None = None, train_size: int = 8000, seed: int = 0):
    """The MNIST test split (10,000 images), split train/test. Never downloads.

    The images come from the first of:

    1. `path`, a folder holding `t10k-images-idx3-ubyte[.gz]` and
       `t10k-labels-idx1-ubyte[.gz]`;
    2. the folder named by `$KERAS_SPARSE_MNIST_DIR`;
    3. Keras's cache of `keras.datasets.mnist`, `~/.keras/datasets/mnist.npz`
       (or under `$KERAS_HOME`), if present: its `x_test`/`y_test`, the same 10,000 images.

    Otherwise a `FileNotFoundError` says how to get the files.

    The split is fixed: `numpy.random.default_rng(seed).permutation(10000)`,
    the first `train_size` for training. Pixels are scaled to [0, 1] and
    flattened to 784 features.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 and int32.
    """
    images, labels = _read_test_split(path)
    if len(images) != len(labels):
        raise ValueError(f"MNIST: {len(images)} images but {len(labels)} labels")
    x = images.reshape(len(images), -1).astype("float32") / 255.0
    y = labels.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:train_size], order[train_size:]
    return (x[train], y[train]), (x[test], y[test])


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], split train/test."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])

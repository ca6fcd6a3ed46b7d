"""Real data that needs no download: scikit-learn's digits and MNIST IDX files on disk."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np


def default_mnist_dir() -> Path:
    """`$KERAS_SPARSE_MNIST_DIR`, else `../shared/data/mnist-10k` from the working directory
    (where this project's checkouts keep the 10,000-image MNIST test split)."""
    env = os.environ.get("KERAS_SPARSE_MNIST_DIR")
    return Path(env) if env else Path.cwd().parent / "shared" / "data" / "mnist-10k"


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
        f"No MNIST file '{stem}[.gz]' in {directory}. Pass the folder holding the IDX files "
        "(for example ../shared/data/mnist-10k)."
    )


def load_mnist(directory: str | os.PathLike | None = None, train_size: int = 8000, seed: int = 0):
    """The MNIST test split (10,000 images) read from IDX files, split train/test.

    The split is fixed: `numpy.random.default_rng(seed).permutation(10000)`,
    the first `train_size` for training. Pixels are scaled to [0, 1] and
    flattened to 784 features.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, float32 and int32.
    """
    directory = Path(directory) if directory is not None else default_mnist_dir()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Received an invalid value for `directory`: {str(directory)!r} is not a folder."
        )
    images = _read_idx(_find(directory, "t10k-images-idx3-ubyte"))
    labels = _read_idx(_find(directory, "t10k-labels-idx1-ubyte"))
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

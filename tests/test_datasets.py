"""load_mnist: a folder of IDX files, $KERAS_SPARSE_MNIST_DIR, Keras's cached mnist.npz, or a
clear error; never a download. Tiny files made here stand in for the real data."""

import gzip
import os

import numpy as np
import pytest

from keras_sparse.datasets import MNIST_ENV_VAR, load_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20  # images in the tiny stand-in split


def idx_bytes(array):
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_split(seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(N,), dtype=np.uint8)
    return images, labels


def write_idx_folder(folder, images, labels, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        if compress:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(idx_bytes(array))
        else:
            (folder / stem).write_bytes(idx_bytes(array))
    return folder


def write_keras_cache(keras_home, images, labels):
    (keras_home / "datasets").mkdir(parents=True, exist_ok=True)
    # Keras's file also holds a train split; load_mnist must use the test split only.
    np.savez(
        keras_home / "datasets" / "mnist.npz",
        x_train=np.zeros((3, 28, 28), np.uint8),
        y_train=np.zeros((3,), np.uint8),
        x_test=images,
        y_test=labels,
    )


def expected(images, labels, train_size, seed=0):
    x = images.reshape(len(images), -1).astype("float32") / 255.0
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:train_size], order[train_size:]
    return (x[train], labels[train]), (x[test], labels[test])


def assert_split_equal(actual, wanted):
    for (xa, ya), (xw, yw) in zip(actual, wanted):
        assert xa.dtype == np.float32 and ya.dtype == np.int32
        np.testing.assert_array_equal(xa, xw)
        np.testing.assert_array_equal(ya, yw)


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """No env var, and a HOME/KERAS_HOME without Keras's cache."""
    monkeypatch.delenv(MNIST_ENV_VAR, raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_a_folder_of_idx_files_is_read_and_split(no_sources, compress):
    images, labels = tiny_split(0)
    folder = write_idx_folder(no_sources / "mnist", images, labels, compress)
    split = load_mnist(folder, train_size=15)
    assert split[0][0].shape == (15, 784) and split[1][0].shape == (5, 784)
    assert_split_equal(split, expected(images, labels, 15))


def test_the_env_var_names_the_folder(no_sources, monkeypatch):
    images, labels = tiny_split(1)
    folder = write_idx_folder(no_sources / "mnist", images, labels)
    monkeypatch.setenv(MNIST_ENV_VAR, str(folder))
    assert_split_equal(load_mnist(train_size=12), expected(images, labels, 12))


def test_the_path_argument_wins_over_the_env_var(no_sources, monkeypatch):
    images, labels = tiny_split(2)
    folder = write_idx_folder(no_sources / "given", images, labels)
    monkeypatch.setenv(MNIST_ENV_VAR, str(no_sources / "does-not-exist"))
    assert_split_equal(load_mnist(folder, train_size=10), expected(images, labels, 10))


def test_keras_cached_npz_is_used_when_nothing_is_given(no_sources):
    images, labels = tiny_split(3)
    write_keras_cache(no_sources / "home" / ".keras", images, labels)
    assert_split_equal(load_mnist(train_size=10), expected(images, labels, 10))


def test_keras_home_moves_the_cache(no_sources, monkeypatch):
    images, labels = tiny_split(4)
    write_keras_cache(no_sources / "elsewhere", images, labels)
    monkeypatch.setenv("KERAS_HOME", str(no_sources / "elsewhere"))
    assert_split_equal(load_mnist(train_size=10), expected(images, labels, 10))


def test_the_npz_and_the_idx_folder_give_the_same_split(no_sources):
    images, labels = tiny_split(5)
    folder = write_idx_folder(no_sources / "mnist", images, labels)
    write_keras_cache(no_sources / "home" / ".keras", images, labels)
    assert_split_equal(load_mnist(train_size=10), load_mnist(folder, train_size=10))


def test_nothing_found_names_the_argument_the_env_var_and_how_to_get_the_files(no_sources):
    with pytest.raises(FileNotFoundError) as error:
        load_mnist()
    message = str(error.value)
    assert "`path`" in message
    assert MNIST_ENV_VAR in message
    assert "mnist.npz" in message
    assert "t10k-images-idx3-ubyte.gz" in message


def test_a_path_that_is_not_a_folder_is_named(no_sources):
    with pytest.raises(FileNotFoundError, match="not-here"):
        load_mnist(no_sources / "not-here")


def test_a_bad_env_var_is_named(no_sources, monkeypatch):
    monkeypatch.setenv(MNIST_ENV_VAR, str(no_sources / "not-here"))
    with pytest.raises(FileNotFoundError, match=MNIST_ENV_VAR):
        load_mnist()


def test_a_folder_without_the_files_says_which_file_is_missing(no_sources):
    (no_sources / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(no_sources / "empty")


def test_the_example_without_a_folder_exits_with_the_message(no_sources, capsys, monkeypatch):
    # The example's own `main`, in this process: argparse's error exits with status 2 and the
    # message, before any training.
    monkeypatch.chdir(no_sources)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    import train_digits

    with pytest.raises(SystemExit) as exit_info:
        train_digits.main(["--mnist"])
    assert exit_info.value.code == 2
    assert MNIST_ENV_VAR in capsys.readouterr().err

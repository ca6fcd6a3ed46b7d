"""Train a sparse MLP on real handwritten digits and print its accuracy and density.

    python examples/train_digits.py                       # scikit-learn's bundled digits
    python examples/train_digits.py --mnist DIR           # the folder holding the MNIST IDX files
    python examples/train_digits.py --mnist               # $KERAS_SPARSE_MNIST_DIR or Keras's cache
    python examples/train_digits.py --target 0.95 --epochs 40

No download: the digits ship with scikit-learn; MNIST is read from a folder you give, from
$KERAS_SPARSE_MNIST_DIR, or from Keras's own ~/.keras/datasets/mnist.npz if you have it.
"""

from __future__ import annotations

import argparse
import math

import keras

import keras_sparse as ks
from keras_sparse.datasets import load_digits, load_mnist


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist",
        nargs="?",
        const="",
        metavar="DIR",
        help="train on MNIST: the folder holding the IDX files (default: $KERAS_SPARSE_MNIST_DIR, "
        "else Keras's cached mnist.npz)",
    )
    parser.add_argument("--target", type=float, default=0.9, help="target sparsity (0.9)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.mnist is None:
        (x_train, y_train), (x_test, y_test) = load_digits()
    else:
        try:
            (x_train, y_train), (x_test, y_test) = load_mnist(args.mnist or None)
        except FileNotFoundError as error:
            parser.error(str(error))
    keras.utils.set_random_seed(args.seed)
    features = x_train.shape[1]
    model = keras.Sequential(
        [
            keras.Input((features,)),
            ks.SparseLinear(256, activation="relu", name="hidden1"),
            ks.SparseLinear(128, activation="relu", name="hidden2"),
            ks.SparseLinear(10, name="logits"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    # Ramp the target over the first 90% of training; the mask is then frozen
    # and the surviving weights are fine-tuned for the last tenth.
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(args.target, begin_step=0, end_step=int(0.9 * steps))
    )
    print(
        f"Backend: {keras.backend.backend()}; {len(x_train)} training images, {features} features"
    )
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        callbacks=[scheduler],
        verbose=2,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print()
    for layer in ks.sparse_layers(model):
        print(
            f"{layer.name:8s} density {layer.density() * 100:5.1f}%  ({layer.num_active()} weights)"
        )
    active = sum(layer.num_active() for layer in ks.sparse_layers(model))
    total = sum(layer.kernel.shape[0] * layer.kernel.shape[1] for layer in ks.sparse_layers(model))
    print(f"Test accuracy: {accuracy * 100:.2f}%")
    print(f"Density: {active / total * 100:.1f}% ({active} of {total} weights kept)")


if __name__ == "__main__":
    main()

"""Compressed size and accuracy of LeNet-300-100 on MNIST-10k: dense, pruned, pruned + int8.

    python benchmarks/compression.py --backend jax --target 0.95

Trains the dense model and the SparseLinear model (SparsityScheduler, same
recipe as benchmarks/mnist_lenet.py), then reports, from
`keras_sparse.size_report`, the gzip size of the weights of the dense model, of
the stripped pruned model, and of the stripped model after
`model.quantize("int8")`, with the test accuracy of each. Ratios are against
the dense model's compressed weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _ablation import add_data_argument, recorded_config

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--target", type=float, default=0.95)
    add_data_argument(parser)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import keras
    import numpy as np
    from mnist_lenet import compile_model, lenet

    import keras_sparse as ks
    from keras_sparse.datasets import load_mnist

    (x_train, y_train), (x_test, y_test) = load_mnist(args.data)
    steps = args.epochs * int(np.ceil(len(x_train) / 128))

    def accuracy(model):
        compile_model(model)
        return float(model.evaluate(x_test, y_test, verbose=0)[1])

    keras.utils.set_random_seed(args.seed)
    dense = lenet(keras.layers.Dense)
    compile_model(dense)
    dense.fit(x_train, y_train, batch_size=128, epochs=args.epochs, verbose=0)

    keras.utils.set_random_seed(args.seed)
    sparse = lenet(ks.SparseLinear)
    compile_model(sparse)
    schedule = ks.PolynomialDecay(args.target, begin_step=0, end_step=int(0.75 * steps))
    sparse.fit(
        x_train,
        y_train,
        batch_size=128,
        epochs=args.epochs,
        verbose=0,
        callbacks=[ks.SparsityScheduler(schedule)],
    )
    stripped = ks.strip(sparse)
    quantized = ks.strip(sparse)
    quantized.quantize("int8")

    dense_size = ks.size_report(dense).stripped
    sparse_sizes = ks.size_report(sparse)
    rows = [
        ("dense", dense_size, accuracy(dense)),
        ("pruned, stripped", sparse_sizes.stripped, accuracy(stripped)),
        ("pruned, stripped + int8", sparse_sizes.int8, accuracy(quantized)),
    ]
    print(f"LeNet-300-100, MNIST-10k, target sparsity {args.target:.0%}, backend {args.backend}\n")
    print("| model | nonzero weights | .keras bytes | gzip of weights | vs dense | accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    out = []
    for label, size, acc in rows:
        ratio = dense_size.compressed_bytes / size.compressed_bytes
        print(
            f"| {label} | {size.nonzero:,} | {size.keras_bytes:,} | {size.compressed_bytes:,} "
            f"| {ratio:.1f}x smaller | {acc * 100:.2f}% |"
        )
        out.append(
            {
                "model": label,
                "nonzero": size.nonzero,
                "keras_bytes": size.keras_bytes,
                "compressed_bytes": size.compressed_bytes,
                "ratio_vs_dense": ratio,
                "accuracy": acc,
            }
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"compression_{args.backend}.json"
    path.write_text(json.dumps({"config": recorded_config(args), "rows": out}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

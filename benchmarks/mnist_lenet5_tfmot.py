"""The peer: TFMOT's gradual magnitude pruning on the LeNet-5 of benchmarks/mnist_lenet5.py.

Runs in an environment with TensorFlow, tf-keras and tensorflow-model-optimization 0.8.1
(the tox env `tfmot` has them):

    TF_USE_LEGACY_KERAS=1 python benchmarks/mnist_lenet5_tfmot.py --mnist DIR

Same model, data split, epochs (default 12), batch size, optimiser and targets as
benchmarks/mnist_lenet5.py; `prune_low_magnitude` on the whole model with
`PolynomialDecay(0 -> target)` over the first 75% of the steps (frequency 50), accuracy
after `strip_pruning`. TFMOT prunes each kernel to the target on its own (per layer);
sparsity is counted over all five kernels. Writes results/lenet5_mnist_tfmot.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from _by_path import load_module

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent


bench = load_module("mnist_lenet5", HERE / "mnist_lenet5.py")
datasets = load_module("datasets", HERE.parent / "keras_sparse" / "datasets.py")


def run_one(target, seed, args, data):
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    model = bench.lenet5(keras.layers.Conv2D, keras.layers.Dense, keras)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=target,
        begin_step=0,
        end_step=int(0.75 * steps),
        frequency=50,
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    bench.compile_model(pruned, keras)
    start = time.perf_counter()
    pruned.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    wall = time.perf_counter() - start
    final = tfmot.sparsity.keras.strip_pruning(pruned)
    final.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    kernels = [layer.kernel.numpy() for layer in final.layers if hasattr(layer, "kernel")]
    total = sum(k.size for k in kernels)
    assert total == bench.LENET5_WEIGHTS
    nonzero = sum(int(np.count_nonzero(k)) for k in kernels)
    return {
        "method": "tfmot_gmp",
        "backend": f"tf-keras {tf.__version__}, tfmot {tfmot.__version__}",
        "target": target,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": 1.0 - nonzero / total,
        "layer_density": [round(np.count_nonzero(k) / k.size, 4) for k in kernels],
        "wall_s": wall,
    }


def main(argv=None):
    args = bench.parse_args(argv)
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(args.mnist)
    data = (x_train.reshape(-1, 28, 28, 1), y_train), (x_test.reshape(-1, 28, 28, 1), y_test)
    rows = []
    for target in [float(t) for t in args.targets.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = run_one(target, seed, args, data)
            rows.append(row)
            print(
                f"[tfmot] target={target:.2f} seed={seed} acc={row['accuracy']:.4f} "
                f"sparsity={row['sparsity']:.4f} wall={row['wall_s']:.1f}s",
                flush=True,
            )
    out = Path(args.out) if args.out else bench.RESULTS / "lenet5_mnist_tfmot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        k: v for k, v in vars(args).items() if k not in ("out", "backend", "methods", "mnist")
    }
    out.write_text(
        json.dumps({"config": config, "runs": rows, "median": bench.median_rows(rows)}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

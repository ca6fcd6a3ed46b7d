"""The peer: TFMOT's gradual magnitude pruning on the vision transformer of benchmarks/mnist_vit.py.

Runs in an environment with TensorFlow, tf-keras and tensorflow-model-optimization 0.8.1
(the tox env `tfmot-vit` has them):

    TF_USE_LEGACY_KERAS=1 python benchmarks/mnist_vit_tfmot.py --mnist DIR
    tox -e tfmot-vit -- --mnist DIR

Same model (built by the same function, in tf-keras), data split, epochs, batch size,
optimiser and targets as benchmarks/mnist_vit.py; `prune_low_magnitude` on every layer
that has a kernel (the Dense layers and the `MultiHeadAttention` layers, whose
query/key/value/output kernels are in TFMOT's prune registry) with `PolynomialDecay(0 ->
target)` over the first 75% of the steps (frequency 50), `UpdatePruningStep`, accuracy
after `strip_pruning`. The learned position embedding is a custom layer that TFMOT
cannot wrap (it is not in the registry); it is not a kernel, so it is left unwrapped, as
keras-sparse leaves it dense. TFMOT prunes each kernel to the target on its own (per
layer); sparsity is counted over all kernels. Writes results/vit_mnist_tfmot.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _by_path import load_module

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent


bench = load_module("mnist_vit", HERE / "mnist_vit.py")
datasets = load_module("datasets", HERE.parent / "keras_sparse" / "datasets.py")


def prunable(layer, keras):
    return isinstance(layer, (keras.layers.Dense, keras.layers.MultiHeadAttention))


def run_one(target, seed, args, data):
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    model = bench.vit(keras)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=target,
        begin_step=0,
        end_step=int(0.75 * steps),
        frequency=50,
    )

    def wrap(layer):
        if prunable(layer, keras):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    pruned = keras.models.clone_model(model, clone_function=wrap)
    wrapped = [layer.name for layer in pruned.layers if type(layer).__name__ == "PruneLowMagnitude"]
    unwrapped = [
        layer.name
        for layer in pruned.layers
        if layer.weights and type(layer).__name__ != "PruneLowMagnitude"
    ]
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
    sparsity, density = bench.count_sparsity(bench.kernels_of(final))
    return {
        "method": "tfmot_gmp",
        "backend": f"tf-keras {tf.__version__}, tfmot {tfmot.__version__}",
        "target": target,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": sparsity,
        "layer_density": density,
        "wall_s": wall,
        "wrapped": wrapped,
        "unwrapped_with_weights": unwrapped,
    }


def main(argv=None):
    args = bench.parse_args(argv, bench.build_parser(__doc__.splitlines()[0]))
    data = bench.load_data(datasets.load_mnist, args.mnist)
    out = Path(args.out) if args.out else bench.RESULTS / "vit_mnist_tfmot.json"
    rows, earlier = bench.earlier_runs(args, out)
    for target in [float(t) for t in args.targets.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = run_one(target, seed, args, data)
            rows.append(row)
            print(
                f"[tfmot] target={target:.2f} seed={seed} acc={row['accuracy']:.4f} "
                f"sparsity={row['sparsity']:.4f} wall={row['wall_s']:.1f}s",
                flush=True,
            )
            drop = ("out", "backend", "methods", "mnist", "append")
            bench.write_results(rows, args, out, drop, earlier=earlier)


if __name__ == "__main__":
    main()

"""LeNet-5 on MNIST-10k: keras-sparse's learned masks against the dense baseline.

LeNet-5: Conv2D 6 5x5 relu "same" -> MaxPool -> Conv2D 16 5x5 relu -> MaxPool ->
Flatten -> Dense 120 relu -> Dense 84 relu -> Dense 10, on the project's fixed
8,000/2,000 split of the MNIST test images (28x28x1). The recipe is that of
benchmarks/mnist_lenet.py: Adam 1e-3, batch 128, the same epochs for every method
(default 12 here, to fit a small CPU budget); `sparse` builds the model from
`SparseConv2D`/`SparseLinear` and drives it with `SparsityScheduler(PolynomialDecay(
target, begin_step=0, end_step=3/4 of the steps))` (global scope: the target is
over all five kernels together), frozen at the end of the ramp and fine-tuned for
the last quarter. Accuracy is the final one, measured on `keras_sparse.strip(model)`;
sparsity is counted on the stripped model's kernels.

    python benchmarks/mnist_lenet5.py --backend jax --mnist DIR

`--mnist` defaults to $KERAS_SPARSE_MNIST_DIR. For ablations, `--validation 1600` scores on the
last 1,600 training images, held out, and `--scope`, `--end-fraction`, `--temperature`,
`--straight-through`, `--per-weight`, `--min-density` and `--update-every` vary the recipe:

    python benchmarks/mnist_lenet5.py --methods sparse --targets 0.98 --validation 1600 \
        --scope per_layer --out results/lenet5_ablation.json
 Its TFMOT peer, on the same model,
data and budget, is benchmarks/mnist_lenet5_tfmot.py. Writes
results/lenet5_mnist_<backend>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _ablation import (
    adam,
    add_ablation_arguments,
    add_batch_order_argument,
    add_initial_weights_arguments,
    add_recipe_shape_arguments,
    apply_penalty_price,
    apply_penalty_target,
    apply_per_weight_temperature,
    check_initial_weights_methods,
    held_out,
    load_initial_weights,
    recorded_config,
    resolve_end_fraction,
    save_initial_weights,
    sparse_layer,
    start_thresholds,
    temperature_schedule,
    training_inputs,
)

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("tensorflow", "jax", "torch")

# Kernel weights of LeNet-5 (conv1, conv2, fc1, fc2, out): sparsity is counted against them.
LENET5_WEIGHTS = 5 * 5 * 1 * 6 + 5 * 5 * 6 * 16 + 400 * 120 + 120 * 84 + 84 * 10


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=BACKENDS)
    parser.add_argument(
        "--mnist",
        "--data",
        dest="mnist",
        metavar="DIR",
        default=os.environ.get("KERAS_SPARSE_MNIST_DIR"),
        help="folder with the MNIST IDX files (default: $KERAS_SPARSE_MNIST_DIR)",
    )
    parser.add_argument("--methods", default="dense,sparse")
    parser.add_argument("--targets", default="0.9,0.95,0.98")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--out", default=None, help="JSON output (default results/lenet5_mnist_<backend>.json)"
    )
    add_batch_order_argument(parser)
    return parser


def add_recipe_arguments(parser):
    """The knobs of keras-sparse's recipe that an ablation varies, and where it is scored."""
    add_ablation_arguments(parser)
    parser.add_argument("--scope", default="global", choices=("global", "per_layer"))
    parser.add_argument("--update-every", type=int, default=None, help="the driver's update_every")
    parser.add_argument(
        "--min-density",
        type=float,
        default=None,
        help="the driver's floor (default: SparsityScheduler's)",
    )
    add_recipe_shape_arguments(parser)
    add_initial_weights_arguments(parser)
    return parser


def recipe(args):
    """The recipe options as given, for the JSON rows."""
    return {
        "scope": args.scope,
        "end_fraction": args.end_fraction,
        "temperature": args.temperature,
        "straight_through": args.straight_through,
        "per_weight": args.per_weight,
        "min_density": args.min_density,
        "update_every": args.update_every,
        "power": args.power,
        "begin_fraction": args.begin_fraction,
        "gain": args.gain,
        "threshold_start": args.threshold_start,
        "threshold_lr": args.threshold_lr,
        "penalty_on": args.penalty_on,
        "price_by_scale": args.price_by_scale,
        "per_weight_layers": args.per_weight_layers,
        "per_weight_temperature": args.per_weight_temperature,
        "init_from": args.init_from,
        "validation": args.validation,
        "fold": args.fold,
    }


def parse_args(argv=None, parser=None):
    parser = parser or add_recipe_arguments(build_parser())
    args = parser.parse_args(argv)
    if not args.mnist:
        parser.error("no MNIST folder: pass --mnist DIR or set $KERAS_SPARSE_MNIST_DIR")
    if not Path(args.mnist).is_dir():
        parser.error(f"--mnist {args.mnist!r} is not a folder")
    check_initial_weights_methods(parser, args, "sparse")
    return args


def load_data(directory):
    """The fixed 8,000/2,000 split as (N, 28, 28, 1) images."""
    from keras_sparse.datasets import load_mnist

    (x_train, y_train), (x_test, y_test) = load_mnist(directory)
    return (x_train.reshape(-1, 28, 28, 1), y_train), (x_test.reshape(-1, 28, 28, 1), y_test)


def lenet5(conv, dense, keras):
    """LeNet-5 from the given conv and dense layer classes (stock or sparse)."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            conv(6, 5, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2),
            conv(16, 5, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            dense(120, activation="relu", name="fc1"),
            dense(84, activation="relu", name="fc2"),
            dense(10, name="out"),
        ]
    )


def model_params(keras):
    """The dense LeNet-5's parameter count (kernels and biases)."""
    return lenet5(keras.layers.Conv2D, keras.layers.Dense, keras).count_params()


def compile_model(model, keras, args=None):
    model.compile(
        optimizer=adam(args, model),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def run_one(method, target, seed, args, data):
    import keras
    import numpy as np

    import keras_sparse as ks

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    order = args.batch_order
    fit = dict(epochs=args.epochs, verbose=0)
    fit.update(training_inputs(x_train, y_train, args.batch_size, order, seed))
    start = time.perf_counter()
    if method == "dense":
        model = lenet5(keras.layers.Conv2D, keras.layers.Dense, keras)
        if args.init_from:
            load_initial_weights(model, args.init_from, seed)
        compile_model(model, keras)
        model.fit(**fit)
        final = model
        evaluated = None
    elif method == "sparse":
        apply_penalty_target(args)
        apply_penalty_price(args)
        apply_per_weight_temperature(args)
        model = lenet5(
            sparse_layer(ks.SparseConv2D, args), sparse_layer(ks.SparseLinear, args), keras
        )
        if args.init_from:
            load_initial_weights(model, args.init_from, seed)
        start_thresholds(model, args)
        compile_model(model, keras, args)
        end = int(args.end_fraction * steps)
        begin = int(args.begin_fraction * steps)
        schedule = ks.PolynomialDecay(target, begin_step=begin, end_step=end, power=args.power)
        temperature = temperature_schedule(args, end)
        given = {
            "min_density": args.min_density,
            "update_every": args.update_every,
            "gain": args.gain,
        }
        given = {key: value for key, value in given.items() if value is not None}
        driver = ks.SparsityScheduler(schedule, scope=args.scope, temperature=temperature, **given)
        model.fit(callbacks=[driver], **fit)
        evaluated = float(model.evaluate(x_test, y_test, verbose=0)[1])
        final = ks.strip(model)
        compile_model(final, keras)
    elif method == "neuron":
        # Whole channels and neurons: `target` of each of conv1, conv2, fc1 and fc2 (the
        # classes stay), then `shrink` removes them.
        apply_penalty_target(args)
        apply_penalty_price(args)
        apply_per_weight_temperature(args)
        model = lenet5(
            functools.partial(ks.SparseConv2D, granularity="neuron"),
            lambda units, name, **kw: (
                keras.layers.Dense(units, name=name, **kw)
                if name == "out"
                else ks.SparseLinear(units, name=name, granularity="neuron", **kw)
            ),
            keras,
        )
        compile_model(model, keras)
        end = int(args.end_fraction * steps)
        schedule = ks.PolynomialDecay(target, begin_step=0, end_step=end)
        driver = ks.SparsityScheduler(schedule, scope="per_layer")
        model.fit(callbacks=[driver], **fit)
        evaluated = float(model.evaluate(x_test, y_test, verbose=0)[1])
        final = ks.shrink(model).model
        compile_model(final, keras)
    else:
        raise ValueError(f"unknown method {method!r}")
    wall = time.perf_counter() - start
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    if method == "neuron":
        units = [int(layer.kernel.shape[-1]) for layer in final.layers if hasattr(layer, "kernel")]
        return {
            "method": method,
            "backend": keras.backend.backend(),
            "target": target,
            "seed": seed,
            "accuracy": accuracy,
            "evaluated_accuracy": evaluated,
            "units": units,  # conv1, conv2, fc1, fc2, out after the shrink
            "weights_kept": int(final.count_params()) / int(model_params(keras)),
            "wall_s": wall,
            **recipe(args),
        }
    kernels = [
        keras.ops.convert_to_numpy(layer.kernel)
        for layer in final.layers
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
    ]
    assert sum(k.size for k in kernels) == LENET5_WEIGHTS
    nonzero = sum(int(np.count_nonzero(k)) for k in kernels)
    row = {
        "method": method,
        "backend": keras.backend.backend(),
        "target": target,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": 1.0 - nonzero / LENET5_WEIGHTS,
        "layer_density": [round(np.count_nonzero(k) / k.size, 4) for k in kernels],
        "wall_s": wall,
        **recipe(args),
    }
    if evaluated is not None:
        row["evaluated_accuracy"] = evaluated
    return row


def sparse_lenet5(seed):
    """The sparse LeNet-5 as `run_one` builds it for `seed`, before any training."""
    import keras

    import keras_sparse as ks

    keras.utils.set_random_seed(seed)
    return lenet5(ks.SparseConv2D, ks.SparseLinear, keras)


def median_rows(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["backend"], row["target"]), []).append(row)
    summary = []
    for (method, backend, target), group in groups.items():
        entry = {"method": method, "backend": backend, "target": target}
        entry["seeds"] = [r["seed"] for r in group]
        for key in ("accuracy", "sparsity", "weights_kept", "wall_s", "evaluated_accuracy"):
            if key in group[0]:
                entry[key] = statistics.median(r[key] for r in group)
        for key in ("layer_density", "units"):
            if key in group[0]:
                entry[key] = group[0][key]
        summary.append(entry)
    return summary


def main(argv=None):
    args = resolve_end_fraction(parse_args(argv))
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    data = held_out(load_data(args.mnist), args.validation, args.fold)
    targets = [float(t) for t in args.targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.save_init:
        save_initial_weights(args.save_init, seeds, sparse_lenet5)
        print(f"wrote {args.save_init}")
        return
    rows = []
    for method in args.methods.split(","):
        for target in [0.0] if method == "dense" else targets:
            for seed in seeds:
                row = run_one(method, target, seed, args, data)
                rows.append(row)
                reached = (
                    f"units={row['units']}" if "units" in row else f"sparsity={row['sparsity']:.4f}"
                )
                print(
                    f"[{args.backend}] {method:6s} target={target:.2f} seed={seed} "
                    f"acc={row['accuracy']:.4f} {reached} wall={row['wall_s']:.1f}s",
                    flush=True,
                )
    out = Path(args.out) if args.out else RESULTS / f"lenet5_mnist_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = recorded_config(args, "out", "backend", "mnist")
    out.write_text(
        json.dumps({"config": config, "runs": rows, "median": median_rows(rows)}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

"""LeNet-300-100 on MNIST-10k: SparseLinear against dense and one-shot magnitude pruning.

Every method trains with the same epochs, batch size and optimiser (Adam 1e-3,
batch 128, 40 epochs); accuracy is the final one (not the best epoch), measured
on the stripped model (plain Dense layers holding the pruned weights).

`sparse_linear_neuron` prunes whole neurons: fc1 and fc2 are
`SparseLinear(granularity="neuron")` (the output layer is a plain Dense, whose
neurons are the classes), driven by the same scheduler to `--neuron-targets`
(sparsity of the fc1 and fc2 masks); accuracy is measured on
`keras_sparse.shrink(model).model`, with the neurons kept per layer and the
weights kept after the shrink (fc2 also loses the inputs of fc1's dead
neurons, so more goes than the mask says). Its PyTorch peer, `ln_structured`
at the same per-layer neuron counts, is benchmarks/mnist_torch_ln_structured.py:

    python benchmarks/mnist_lenet.py --backend jax --methods sparse_linear_neuron \
        --out benchmarks/results/neuron_mnist_jax.json
    python benchmarks/mnist_torch_ln_structured.py --match benchmarks/results/neuron_mnist_jax.json

    python benchmarks/mnist_lenet.py --backend jax
    python benchmarks/mnist_lenet.py --backend all      # one process per backend

The TensorFlow Model Optimization Toolkit peer runs in its own environment
(`tox -e tfmot`, benchmarks/mnist_tfmot.py); `benchmarks/plot_mnist.py` merges the
JSON files into a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _ablation import (
    adam,
    add_ablation_arguments,
    add_batch_order_argument,
    add_data_argument,
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=(*BACKENDS, "all"))
    add_data_argument(parser)
    parser.add_argument("--methods", default="dense,sparse_linear,one_shot")
    parser.add_argument("--targets", default="0.9,0.95,0.98")
    parser.add_argument("--neuron-targets", default="0.5,0.75,0.9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--out", default=None, help="JSON output (default results/mnist_<backend>.json)"
    )
    parser.add_argument(
        "--min-density",
        type=float,
        default=None,
        help="the driver's floor (default: SparsityScheduler's)",
    )
    parser.add_argument(
        "--update-every",
        type=int,
        default=None,
        help="the driver's update_every (default: SparsityScheduler's)",
    )
    parser.add_argument(
        "--layer-densities",
        default=None,
        metavar="D1,D2,D3",
        help="sparse_linear: hold each layer to this density with a scheduler of its own, "
        "instead of the global split the penalty learns (the targets are then ignored)",
    )
    add_recipe_shape_arguments(parser)
    add_ablation_arguments(parser)
    add_initial_weights_arguments(parser)
    add_batch_order_argument(parser)
    args = parser.parse_args(argv)
    check_initial_weights_methods(parser, args, "sparse_linear")
    return args


def lenet(layer_factory):
    import keras

    return keras.Sequential(
        [
            keras.Input((784,)),
            layer_factory(300, activation="relu", name="fc1"),
            layer_factory(100, activation="relu", name="fc2"),
            layer_factory(10, name="out"),
        ]
    )


def sparse_lenet(seed):
    """The `sparse_linear` model as `run_one` builds it for `seed`, before any training."""
    import keras

    import keras_sparse as ks

    keras.utils.set_random_seed(seed)
    return lenet(ks.SparseLinear)


# Kernel weights of LeNet-300-100: every method's sparsity is counted against them.
LENET_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


def neuron_layer(units, name, **kwargs):
    import keras

    import keras_sparse as ks

    if name == "out":  # the classes stay
        return keras.layers.Dense(units, name=name, **kwargs)
    return ks.SparseLinear(units, granularity="neuron", name=name, **kwargs)


def compile_model(model, args=None):
    import keras

    model.compile(
        optimizer=adam(args, model),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def driver(schedule, args, end_step, layers=None):
    import keras_sparse as ks

    given = {
        "min_density": args.min_density,
        "update_every": args.update_every,
        "gain": args.gain,
        "layers": layers,
    }
    given["temperature"] = temperature_schedule(args, end_step)
    return ks.SparsityScheduler(schedule, **{k: v for k, v in given.items() if v is not None})


def run_one(method, target, seed, args, data):
    import keras
    import numpy as np

    import keras_sparse as ks

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    steps_per_epoch = int(np.ceil(len(x_train) / args.batch_size))
    total_steps = args.epochs * steps_per_epoch
    fit = dict(
        verbose=0, **training_inputs(x_train, y_train, args.batch_size, args.batch_order, seed)
    )
    start = time.perf_counter()
    if method == "dense":
        model = lenet(keras.layers.Dense)
        if args.init_from:
            load_initial_weights(model, args.init_from, seed)
        compile_model(model)
        model.fit(epochs=args.epochs, **fit)
        final = model
    elif method == "sparse_linear":
        apply_penalty_target(args)
        apply_penalty_price(args)
        apply_per_weight_temperature(args)
        model = lenet(sparse_layer(ks.SparseLinear, args))
        if args.init_from:
            load_initial_weights(model, args.init_from, seed)
        start_thresholds(model, args)
        compile_model(model, args)
        end_step = int(args.end_fraction * total_steps)

        def ramp(to):
            begin = int(args.begin_fraction * total_steps)
            return ks.PolynomialDecay(to, begin_step=begin, end_step=end_step, power=args.power)

        if args.layer_densities:
            # Each layer held to its own density by a scheduler of its own: the split
            # between the layers given, not learned (the target is then theirs).
            densities = [float(d) for d in args.layer_densities.split(",")]
            layers = ks.sparse_layers(model)
            schedulers = [
                driver(ramp(1.0 - density), args, end_step, layers=[layer])
                for density, layer in zip(densities, layers, strict=True)
            ]
        else:
            schedulers = [driver(ramp(target), args, end_step)]
        model.fit(epochs=args.epochs, callbacks=schedulers, **fit)
        evaluated = model.evaluate(x_test, y_test, verbose=0)[1]
        final = ks.strip(model)
        compile_model(final)
    elif method == "sparse_linear_neuron":
        apply_penalty_target(args)
        apply_penalty_price(args)
        apply_per_weight_temperature(args)
        model = lenet(neuron_layer)
        compile_model(model)
        end_step = int(args.end_fraction * total_steps)
        schedule = ks.PolynomialDecay(target, begin_step=0, end_step=end_step)
        scheduler = driver(schedule, args, end_step)
        model.fit(epochs=args.epochs, callbacks=[scheduler], **fit)
        evaluated = model.evaluate(x_test, y_test, verbose=0)[1]
        final = ks.shrink(model).model
        compile_model(final)
    elif method == "one_shot":
        # Train dense for 3/4 of the epochs, prune each layer to the target by
        # magnitude at once, fine-tune the survivors for the last 1/4.
        model = lenet(ks.SparseLinear)
        compile_model(model)
        dense_epochs = int(0.75 * args.epochs)
        model.fit(epochs=dense_epochs, **fit)
        for layer in ks.sparse_layers(model):
            kernel = np.abs(keras.ops.convert_to_numpy(layer.kernel))
            layer.reset_threshold(float(np.quantile(kernel, target)))
            layer.hard_prune()
        model.fit(epochs=args.epochs - dense_epochs, **fit)
        evaluated = model.evaluate(x_test, y_test, verbose=0)[1]
        final = ks.strip(model)
        compile_model(final)
    else:
        raise ValueError(f"unknown method {method!r}")
    wall = time.perf_counter() - start
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    kernels = [
        keras.ops.convert_to_numpy(layer.kernel)
        for layer in final.layers
        if isinstance(layer, keras.layers.Dense)
    ]
    nonzero = sum(int(np.count_nonzero(k)) for k in kernels)
    row = {
        "method": method,
        "backend": keras.backend.backend(),
        "target": target,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": 1.0 - nonzero / LENET_WEIGHTS,
        "layer_density": [round(np.count_nonzero(k) / k.size, 4) for k in kernels],
        "neurons": [int(k.shape[1]) for k in kernels],
        "weights_kept": sum(k.size for k in kernels) / LENET_WEIGHTS,
        "wall_s": wall,
    }
    if method != "dense":
        row["evaluated_accuracy"] = float(evaluated)
    return row


def median_rows(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["backend"], row["target"]), []).append(row)
    summary = []
    for (method, backend, target), group in groups.items():
        entry = {
            "method": method,
            "backend": backend,
            "target": target,
            "seeds": [r["seed"] for r in group],
        }
        for key in ("accuracy", "sparsity", "wall_s", "evaluated_accuracy"):
            if key in group[0]:
                entry[key] = statistics.median(r[key] for r in group)
        entry["layer_density"] = group[0]["layer_density"]
        entry["neurons"] = [
            statistics.median(r["neurons"][i] for r in group)
            for i in range(len(group[0]["neurons"]))
        ]
        entry["weights_kept"] = statistics.median(r["weights_kept"] for r in group)
        summary.append(entry)
    return summary


def main(argv=None):
    args = resolve_end_fraction(parse_args(argv))
    if args.backend == "all":
        for backend in BACKENDS:
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:])]
            cmd[cmd.index("all")] = backend
            subprocess.run(cmd, check=True)
        return
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_sparse.datasets import load_mnist

    data = held_out(load_mnist(args.data), args.validation, args.fold)
    targets = [float(t) for t in args.targets.split(",")]
    neuron_targets = [float(t) for t in args.neuron_targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.save_init:
        save_initial_weights(args.save_init, seeds, sparse_lenet)
        print(f"wrote {args.save_init}")
        return
    rows = []
    for method in args.methods.split(","):
        method_targets = {"dense": [0.0], "sparse_linear_neuron": neuron_targets}
        for target in method_targets.get(method, targets):
            for seed in seeds:
                row = run_one(method, target, seed, args, data)
                rows.append(row)
                print(
                    f"[{args.backend}] {method:14s} target={target:.2f} seed={seed} "
                    f"acc={row['accuracy']:.4f} sparsity={row['sparsity']:.4f} "
                    f"neurons={row['neurons']} "
                    f"wall={row['wall_s']:.1f}s",
                    flush=True,
                )
    out = Path(args.out) if args.out else RESULTS / f"mnist_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = recorded_config(args, "out", "backend")
    out.write_text(
        json.dumps({"config": config, "runs": rows, "median": median_rows(rows)}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

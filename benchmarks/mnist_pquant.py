"""The peer: PQuantML's dst, cs and pdp pruning on the MNIST LeNet-300-100 and LeNet-5.

Runs in an environment with pquant-ml 0.1.0 and Keras 3 on TensorFlow (the tox env
`pquant`):

    python benchmarks/mnist_pquant.py --model lenet300 --mnist DIR
    python benchmarks/mnist_pquant.py --model lenet5 --mnist DIR
    tox -e pquant -- benchmarks/mnist_pquant.py --model lenet300 --mnist DIR

Same model, data split, epochs (LeNet-300-100: 40, as benchmarks/mnist_lenet.py; LeNet-5:
12, as benchmarks/mnist_lenet5.py), batch size, optimiser and targets as our benchmark of
that model, quantization off. The stock model (as a functional model: PQuantML's
`add_compression_layers` starts from `model.layers[0].output`, which a Keras 3 Sequential
does not list as its input) is converted by `add_compression_layers`. dst and cs are steered
by a penalty coefficient, not a target: each coefficient of `--dst-alphas` / `--cs-decays`
is a full training, and for each target the run whose reached sparsity is nearest is taken
(chosen on sparsity, never on accuracy); pdp takes the target itself; `dense` is
the same layers and training with pruning off. After
`apply_final_compression` the kernels are copied into the stock model, and accuracy and
sparsity are measured on it. Writes results/<model>_mnist_pquant.json (`--append` adds
runs to it).
"""

from __future__ import annotations

import os
from pathlib import Path

from _ablation import add_validation_arguments, held_out
from _by_path import load_module

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent

lenet5_bench = load_module("mnist_lenet5", HERE / "mnist_lenet5.py")
vit_peer = load_module("mnist_vit_pquant", HERE / "mnist_vit_pquant.py")
vit_bench = vit_peer.bench
datasets = load_module("datasets", HERE.parent / "keras_sparse" / "datasets.py")

# Per model: the kernel weights sparsity is counted against, and the defaults of our
# benchmark of that model.
MODELS = {
    "lenet300": {
        "weights": 784 * 300 + 300 * 100 + 100 * 10,
        "epochs": 40,
        "targets": "0.9,0.95,0.98,0.99",
    },
    "lenet5": {"weights": lenet5_bench.LENET5_WEIGHTS, "epochs": 12, "targets": "0.9,0.95,0.98"},
}
PRUNED_TYPES = ("Conv2D", "Dense", "PQConv2d", "PQDense")


def parse_args(argv=None):
    parser = lenet5_bench.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    parser.set_defaults(methods="dst,cs,pdp", epochs=None, targets=None)
    parser.add_argument("--dst-alphas", default="1e-6,1e-5,1e-4")
    parser.add_argument("--cs-decays", default="1e-9,1e-7,1e-5")
    add_validation_arguments(parser)
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the runs already in the output file (more seeds, a wider sweep)",
    )
    args = lenet5_bench.parse_args(argv, parser)
    defaults = MODELS[args.model]
    args.epochs = args.epochs or defaults["epochs"]
    args.targets = args.targets or defaults["targets"]
    return args


def stock_model(model, keras):
    """The stock model as a functional model (the one `add_compression_layers` can read)."""
    if model == "lenet5":
        sequential = lenet5_bench.lenet5(keras.layers.Conv2D, keras.layers.Dense, keras)
        inputs = keras.Input((28, 28, 1))
    else:
        sequential = keras.Sequential(
            [
                keras.layers.Dense(300, activation="relu", name="fc1"),
                keras.layers.Dense(100, activation="relu", name="fc2"),
                keras.layers.Dense(10, name="out"),
            ]
        )
        inputs = keras.Input((784,))
    x = inputs
    for layer in sequential.layers:
        x = layer(x)
    return keras.Model(inputs, x, name=model)


def kernels(model):
    import numpy as np

    return [
        np.asarray(layer.kernel) for layer in model.layers if type(layer).__name__ in PRUNED_TYPES
    ]


def run_one(method, value, seed, args, data):
    import keras
    import numpy as np
    import pquant

    _, (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    config = vit_peer.pquant_config(method, args.epochs, value)
    model = pquant.add_compression_layers(stock_model(args.model, keras), config)
    wall, evaluated = vit_peer.train(model, config, args, data, seed)
    # PQuantML has no strip to stock layers: its compressed kernels, in order, go to a fresh
    # stock model (the weight layers are in the same order; activations and pools hold none).
    final = stock_model(args.model, keras)
    sources = [layer for layer in model.layers if type(layer).__name__ in PRUNED_TYPES[2:]]
    targets = [layer for layer in final.layers if layer.weights]
    assert len(sources) == len(targets), (sources, targets)
    for source, target in zip(sources, targets):
        target.kernel.assign(np.asarray(source._kernel))
        target.bias.assign(np.asarray(source._bias))
    probe = x_test[:256]
    gap = np.abs(model.predict(probe, verbose=0) - final.predict(probe, verbose=0))
    lenet5_bench.compile_model(final, keras)
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    stripped = kernels(final)
    total = sum(k.size for k in stripped)
    assert total == MODELS[args.model]["weights"]
    nonzero = sum(int(np.count_nonzero(k)) for k in stripped)
    return {
        "method": f"pquant_{method}",
        "backend": f"pquant-ml {vit_peer.pquant_version()}, keras {keras.__version__} tensorflow",
        "target": None if method in ("dst", "cs") else value,
        "coefficient": value if method in ("dst", "cs") else None,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": 1.0 - nonzero / total,
        "layer_density": [round(float(np.count_nonzero(k) / k.size), 4) for k in stripped],
        "wall_s": wall,
        "evaluated_accuracy": evaluated,
        "max_output_gap_vs_stock": float(np.max(gap)),
    }


def main(argv=None):
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test) = held_out(
        datasets.load_mnist(args.mnist), args.validation, args.fold
    )
    if args.model == "lenet5":
        x_train, x_test = x_train.reshape(-1, 28, 28, 1), x_test.reshape(-1, 28, 28, 1)
    data = (x_train, y_train), (x_test, y_test)
    targets = [float(t) for t in args.targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    values = {
        "dst": [float(a) for a in args.dst_alphas.split(",")],
        "cs": [float(d) for d in args.cs_decays.split(",")],
        "pdp": targets,
        "dense": [0.0],
    }
    out = Path(args.out) if args.out else lenet5_bench.RESULTS / f"{args.model}_mnist_pquant.json"
    rows, earlier = vit_bench.earlier_runs(args, out)
    for method in args.methods.split(","):
        for value in values[method]:
            for seed in seeds:
                row = run_one(method, value, seed, args, data)
                rows.append(row)
                print(
                    f"[pquant {args.model}] {method:3s} value={value:g} seed={seed} "
                    f"acc={row['accuracy']:.4f} sparsity={row['sparsity']:.4f} "
                    f"wall={row['wall_s']:.1f}s",
                    flush=True,
                )
                chosen = vit_peer.select(rows, targets)
                exact = [r for r in rows if r["method"] in ("pquant_pdp", "pquant_dense")]
                drop = ("out", "backend", "mnist", "append")
                summary = exact + chosen
                vit_bench.write_results(rows, args, out, drop, summary=summary, earlier=earlier)


if __name__ == "__main__":
    main()

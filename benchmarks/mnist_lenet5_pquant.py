"""The peer: PQuantML's dst, cs and pdp pruning on the LeNet-5 of benchmarks/mnist_lenet5.py.

Runs in an environment with pquant-ml 0.1.0 and Keras 3 on TensorFlow (the tox env
`pquant`):

    python benchmarks/mnist_lenet5_pquant.py --mnist DIR
    tox -e pquant -- benchmarks/mnist_lenet5_pquant.py --mnist DIR

Same model, data split, epochs (default 12), batch size, optimiser and targets as
benchmarks/mnist_lenet5.py, quantization off. The stock LeNet-5 (as a functional model:
PQuantML's `add_compression_layers` starts from `model.layers[0].output`, which a Keras 3
Sequential does not list as its input) is converted by `add_compression_layers`; training,
the coefficient sweeps of dst and cs, the choice on reached sparsity, and pdp's exact
target are as in benchmarks/mnist_vit_pquant.py. After `apply_final_compression` the
kernels are copied into a stock LeNet-5, and accuracy and sparsity are measured on it.
Writes results/lenet5_mnist_pquant.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _by_path import load_module

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent


bench = load_module("mnist_lenet5", HERE / "mnist_lenet5.py")
peer = load_module("mnist_vit_pquant", HERE / "mnist_vit_pquant.py")
datasets = load_module("datasets", HERE.parent / "keras_sparse" / "datasets.py")


def parse_args(argv=None):
    parser = bench.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(methods="dst,cs,pdp")
    parser.add_argument("--dst-alphas", default="1e-6,1e-5,1e-4")
    parser.add_argument("--cs-decays", default="1e-9,1e-7,1e-5")
    return bench.parse_args(argv, parser)


def stock_lenet5(keras):
    sequential = bench.lenet5(keras.layers.Conv2D, keras.layers.Dense, keras)
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for layer in sequential.layers:
        x = layer(x)
    return keras.Model(inputs, x, name="lenet5")


def kernels(model):
    import numpy as np

    return [
        np.asarray(layer.kernel)
        for layer in model.layers
        if type(layer).__name__ in ("Conv2D", "Dense", "PQConv2d", "PQDense")
    ]


def run_one(method, value, seed, args, data):
    import keras
    import numpy as np
    import pquant
    from pquant.core.keras.train import PQuantCallback

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    config = peer.pquant_config(method, args.epochs, value)
    model = pquant.add_compression_layers(stock_lenet5(keras), config)
    bench.compile_model(model, keras)
    callback = PQuantCallback(config, log_ebops=False, log_keep_ratio=False)
    assert callback.total_epochs == args.epochs
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=callback.total_epochs,
        verbose=0,
        callbacks=[callback],
    )
    wall = time.perf_counter() - start
    evaluated = float(model.evaluate(x_test, y_test, verbose=0)[1])
    # PQuantML has no strip to stock layers: its compressed kernels, in order, go to a stock
    # LeNet-5 (the weight layers are in the same order; activations and pools hold none).
    final = bench.lenet5(keras.layers.Conv2D, keras.layers.Dense, keras)
    sources = [layer for layer in model.layers if type(layer).__name__ in ("PQConv2d", "PQDense")]
    targets = [layer for layer in final.layers if layer.weights]
    assert len(sources) == len(targets) == 5
    for source, target in zip(sources, targets):
        target.kernel.assign(np.asarray(source._kernel))
        target.bias.assign(np.asarray(source._bias))
    probe = x_test[:256]
    gap = np.abs(model.predict(probe, verbose=0) - final.predict(probe, verbose=0))
    bench.compile_model(final, keras)
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    stripped = kernels(final)
    total = sum(k.size for k in stripped)
    assert total == bench.LENET5_WEIGHTS
    nonzero = sum(int(np.count_nonzero(k)) for k in stripped)
    return {
        "method": f"pquant_{method}",
        "backend": f"pquant-ml {peer.pquant_version()}, keras {keras.__version__} tensorflow",
        "target": value if method == "pdp" else None,
        "coefficient": None if method == "pdp" else value,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": 1.0 - nonzero / total,
        "layer_density": [round(float(np.count_nonzero(k) / k.size), 4) for k in stripped],
        "wall_s": wall,
        "evaluated_accuracy": evaluated,
        "max_output_gap_vs_stock": float(np.max(gap)),
    }


def main(argv=None):
    import json

    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(args.mnist)
    data = (x_train.reshape(-1, 28, 28, 1), y_train), (x_test.reshape(-1, 28, 28, 1), y_test)
    targets = [float(t) for t in args.targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    values = {
        "dst": [float(a) for a in args.dst_alphas.split(",")],
        "cs": [float(d) for d in args.cs_decays.split(",")],
        "pdp": targets,
    }
    out = Path(args.out) if args.out else bench.RESULTS / "lenet5_mnist_pquant.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "backend", "mnist")}
    rows = []
    for method in args.methods.split(","):
        for value in values[method]:
            for seed in seeds:
                row = run_one(method, value, seed, args, data)
                rows.append(row)
                print(
                    f"[pquant] {method:3s} value={value:g} seed={seed} acc={row['accuracy']:.4f} "
                    f"sparsity={row['sparsity']:.4f} wall={row['wall_s']:.1f}s",
                    flush=True,
                )
                chosen = peer.select(rows, targets)
                summary = [r for r in rows if r["method"] == "pquant_pdp"] + chosen
                result = {
                    "config": config,
                    "runs": rows,
                    "selected": summary,
                    "median": bench.median_rows(summary),
                }
                out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

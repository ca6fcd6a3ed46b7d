"""The peer: Torch-Pruning's magnitude channel pruning on the LeNet-5 of benchmarks/mnist_lenet5.py.

Runs in an environment with torch and torch-pruning (the tox env `torch-pruning`):

    python benchmarks/mnist_lenet5_torch_pruning.py --mnist DIR \
        --match benchmarks/results/lenet5_neuron_jax.json
    tox -e torch-pruning -- benchmarks/mnist_lenet5_torch_pruning.py --mnist DIR

The same data (the fixed 8,000/2,000 split of MNIST-10k), network (LeNet-5 as
benchmarks/mnist_lenet5.py builds it, in PyTorch, with Keras's initialisation: Glorot-uniform
kernels, zero biases), optimiser (Adam 1e-3), batch size (128) and epochs (12). The recipe is
Torch-Pruning's prune-then-fine-tune: train dense for 3/4 of the epochs, remove channels and
neurons at once with `tp.pruner.MagnitudePruner` (L2 magnitude of each coupled group, found by
its dependency graph), fine-tune the smaller network for the rest with a fresh Adam.

Same architecture: for every `neuron` run (target, seed) of the `--match` file
(`python benchmarks/mnist_lenet5.py --methods neuron`), the peer removes channels and
neurons of conv1, conv2, fc1 and fc2 down to the same counts that keras-sparse's shrunk model
has, so both end with the same layer widths. Accuracy is the final one, on the test split.
Writes results/lenet5_neuron_torch_pruning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _by_path import load_module

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
datasets = load_module("datasets", HERE.parent / "keras_sparse" / "datasets.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", default=str(RESULTS / "lenet5_neuron_jax.json"))
    parser.add_argument(
        "--mnist",
        "--data",
        dest="mnist",
        metavar="DIR",
        default=os.environ.get("KERAS_SPARSE_MNIST_DIR"),
        help="folder with the MNIST IDX files (default: $KERAS_SPARSE_MNIST_DIR)",
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "lenet5_neuron_torch_pruning.json"))
    args = parser.parse_args(argv)
    if not args.mnist:
        parser.error("no MNIST folder: pass --mnist DIR or set $KERAS_SPARSE_MNIST_DIR")
    return args


def lenet5():
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return model


def weight_layers(model):
    from torch import nn

    return [layer for layer in model if isinstance(layer, (nn.Conv2d, nn.Linear))]


def train(model, x, y, epochs, batch_size, generator):
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def run_one(units, seed, args, data):
    import torch
    import torch_pruning as tp

    (x_train, y_train), (x_test, y_test) = [
        (torch.from_numpy(x.reshape(-1, 1, 28, 28)), torch.from_numpy(y).long()) for x, y in data
    ]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = lenet5()
    layers = weight_layers(model)
    dense_epochs = int(0.75 * args.epochs)
    start = time.perf_counter()
    train(model, x_train, y_train, dense_epochs, args.batch_size, generator)
    widths = [layer.weight.shape[0] for layer in layers]
    # Torch-Pruning rounds `ratio * width` up: a hair below each exact ratio keeps `kept`.
    ratios = {
        layer: (width - kept) / width - 1e-6
        for layer, kept, width in zip(layers[:4], units, widths)
    }
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_inputs=x_train[:1],
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio_dict=ratios,
        ignored_layers=[layers[4]],  # the classes stay
    )
    pruner.step()
    kept = [layer.weight.shape[0] for layer in weight_layers(model)]
    if kept[:4] != list(units[:4]):
        raise RuntimeError(f"Torch-Pruning kept {kept}, not the matched {units}")
    train(model, x_train, y_train, args.epochs - dense_epochs, args.batch_size, generator)
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return {"accuracy": accuracy, "units": kept, "wall_s": wall}


def main(argv=None):
    import torch

    args = parse_args(argv)
    matched = json.loads(Path(args.match).read_text())
    ours = [r for r in matched["runs"] if r["method"] == "neuron"]
    if not ours:
        raise SystemExit(f"{args.match} has no neuron run to match")
    data = datasets.load_mnist(args.mnist)
    rows = []
    for run in ours:
        result = run_one(run["units"], run["seed"], args, data)
        row = {
            "target": run["target"],
            "seed": run["seed"],
            "keras_sparse_units": run["units"],
            "torch_pruning_units": result["units"],
            "torch_pruning_accuracy": result["accuracy"],
            "keras_sparse_accuracy": run["accuracy"],
            "keras_sparse_backend": run["backend"],
            "wall_s": result["wall_s"],
        }
        rows.append(row)
        print(
            f"target={run['target']:.2f} seed={run['seed']} units={run['units']} "
            f"torch-pruning units={result['units']} acc={result['accuracy']:.4f} "
            f"keras-sparse acc={run['accuracy']:.4f}",
            flush=True,
        )
    table = [
        "| channels/neurons removed (per layer) | units kept conv1-conv2-fc1-fc2 (median) "
        "| keras-sparse neuron + shrink | Torch-Pruning magnitude + fine-tune |",
        "|--:|:--|--:|--:|",
    ]
    for target in sorted({r["target"] for r in rows}):
        group = [r for r in rows if r["target"] == target]
        units = [statistics.median(r["keras_sparse_units"][i] for r in group) for i in range(4)]
        table.append(
            f"| {target:.0%} | {'-'.join(f'{n:g}' for n in units)} "
            f"| {statistics.median(r['keras_sparse_accuracy'] for r in group):.2%} "
            f"| {statistics.median(r['torch_pruning_accuracy'] for r in group):.2%} |"
        )
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "mnist")}
    config["torch"] = torch.__version__
    config["torch_pruning"] = __import__("torch_pruning").__version__
    out.write_text(json.dumps({"config": config, "runs": rows, "table": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

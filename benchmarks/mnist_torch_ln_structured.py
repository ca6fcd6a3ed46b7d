"""PyTorch peer of `sparse_linear_neuron`: `torch.nn.utils.prune.ln_structured` on LeNet-300-100.

The same data (keras_sparse.datasets.load_mnist: MNIST-10k, 8,000/2,000
split), network (784-300-100-10, ReLU), optimiser (Adam 1e-3), batch size
(128) and epochs (40) as benchmarks/mnist_lenet.py. Plain PyTorch, the
recipe of PyTorch's pruning tutorial: train dense for 3/4 of the epochs,
prune fc1 and fc2 by the L2 norm of each output neuron's weights
(`ln_structured(n=2, dim=0)`), fine-tune the rest of the epochs with the mask
held. The output layer is not pruned (its neurons are the classes).

Same parameter budget: for every `sparse_linear_neuron` run (target, seed) of
the `--match` file, the peer prunes fc1 and fc2 to the same neuron counts,
so both end with the same architecture once dead neurons are removed.
Accuracy is the final one, on the test split.

    python benchmarks/mnist_torch_ln_structured.py --match benchmarks/results/neuron_mnist_jax.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _ablation import add_data_argument, recorded_config

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", default=str(RESULTS / "neuron_mnist_jax.json"))
    add_data_argument(parser)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "neuron_mnist_torch_ln_structured.json"))
    return parser.parse_args(argv)


def train(model, x, y, epochs, batch_size, optimizer, generator):
    import torch

    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def run_one(neurons, seed, args, data):
    import torch
    from torch.nn.utils import prune

    (x_train, y_train), (x_test, y_test) = [
        (torch.from_numpy(x), torch.from_numpy(y).long()) for x, y in data
    ]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    fc1, fc2, out = torch.nn.Linear(784, 300), torch.nn.Linear(300, 100), torch.nn.Linear(100, 10)
    model = torch.nn.Sequential(fc1, torch.nn.ReLU(), fc2, torch.nn.ReLU(), out)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dense_epochs = int(0.75 * args.epochs)
    start = time.perf_counter()
    train(model, x_train, y_train, dense_epochs, args.batch_size, optimizer, generator)
    for layer, kept in ((fc1, neurons[0]), (fc2, neurons[1])):
        prune.ln_structured(layer, "weight", amount=layer.out_features - kept, n=2, dim=0)
    # The parameters are new tensors (weight_orig): a fresh Adam state, as after pruning.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(
        model, x_train, y_train, args.epochs - dense_epochs, args.batch_size, optimizer, generator
    )
    wall = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    alive = [int((layer.weight.abs().sum(1) > 0).sum()) for layer in (fc1, fc2)]
    assert alive == list(neurons[:2]), (alive, neurons)
    return {"accuracy": accuracy, "wall_s": wall}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")  # keras_sparse imports keras
    from keras_sparse.datasets import load_mnist

    matched = json.loads(Path(args.match).read_text())
    ours = [r for r in matched["runs"] if r["method"] == "sparse_linear_neuron"]
    if not ours:
        raise SystemExit(f"{args.match} has no sparse_linear_neuron run to match")
    data = load_mnist(args.data)
    rows = []
    for run in ours:
        result = run_one(run["neurons"], run["seed"], args, data)
        row = {
            "target": run["target"],
            "seed": run["seed"],
            "neurons": run["neurons"],
            "weights_kept": run["weights_kept"],
            "ln_structured_accuracy": result["accuracy"],
            "sparse_linear_neuron_accuracy": run["accuracy"],
            "sparse_linear_neuron_backend": run["backend"],
            "wall_s": result["wall_s"],
        }
        rows.append(row)
        print(
            f"target={run['target']:.2f} seed={run['seed']} neurons={run['neurons']} "
            f"ln_structured={result['accuracy']:.4f} sparse_linear_neuron={run['accuracy']:.4f}",
            flush=True,
        )
    table = [
        "| target (mask) | neurons kept fc1-fc2-out (median) | weights kept | SparseLinear neuron "
        "+ shrink | torch ln_structured + fine-tune |",
        "|--:|:--|--:|--:|--:|",
    ]
    for target in sorted({r["target"] for r in rows}):
        group = [r for r in rows if r["target"] == target]
        neurons = [statistics.median(r["neurons"][i] for r in group) for i in range(3)]
        table.append(
            f"| {target:.2f} | {'-'.join(f'{n:g}' for n in neurons)} "
            f"| {statistics.median(r['weights_kept'] for r in group):.2%} "
            f"| {statistics.median(r['sparse_linear_neuron_accuracy'] for r in group):.2%} "
            f"| {statistics.median(r['ln_structured_accuracy'] for r in group):.2%} |"
        )
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = recorded_config(args, "out")
    out.write_text(json.dumps({"config": config, "runs": rows, "table": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

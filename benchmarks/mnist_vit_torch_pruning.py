"""The peer: Torch-Pruning's magnitude head and neuron pruning on the ViT of mnist_vit.py.

Runs in an environment with torch and torch-pruning (the tox env `torch-pruning`):

    python benchmarks/mnist_vit_torch_pruning.py --mnist DIR \
        --match benchmarks/results/vit_structure_jax.json
    tox -e torch-pruning -- benchmarks/mnist_vit_torch_pruning.py --mnist DIR

The same data (the fixed 8,000/2,000 split of MNIST-10k, cut into 16 patches of 7x7),
network (the small vision transformer of benchmarks/mnist_vit.py in PyTorch: the same
widths, pre-norm blocks, exact GELU and LayerNormalization epsilon; the attention's query,
key and value projections fused into one `qkv` Linear as timm writes it, which computes the
same function; Glorot-uniform kernels and zero biases, each Linear's fans taken from its
2-D weight), optimiser (Adam 1e-3), batch size (128) and epochs (8). The recipe is
Torch-Pruning's prune-then-fine-tune: train dense for 3/4 of the epochs, remove whole heads
(`prune_num_heads=True`, the L2 magnitude of each head's query, key, value and output
slices, found by its dependency graph) and whole feed-forward neurons of each block's first
Linear at once with `tp.pruner.MagnitudePruner`, then fine-tune the smaller network for the
rest with a fresh Adam. The residual width (patch embedding, attention output, second
feed-forward Linear) and the classes stay, as in keras-sparse's run.

Same architecture: for every `structure` run (target, seed) of the `--match` file
(`python benchmarks/mnist_vit.py --methods structure`), the peer keeps the same number of
heads and feed-forward neurons in each block as keras-sparse's shrunk model. Accuracy is
the final one, on the test split. Writes results/vit_structure_torch_pruning.json.
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
vit_benchmark = load_module("mnist_vit", HERE / "mnist_vit.py")
lenet5_peer = load_module("mnist_lenet5_torch_pruning", HERE / "mnist_lenet5_torch_pruning.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", default=str(RESULTS / "vit_structure_jax.json"))
    parser.add_argument(
        "--mnist",
        "--data",
        dest="mnist",
        metavar="DIR",
        default=os.environ.get("KERAS_SPARSE_MNIST_DIR"),
        help="folder with the MNIST IDX files (default: $KERAS_SPARSE_MNIST_DIR)",
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "vit_structure_torch_pruning.json"))
    parser.add_argument(
        "--dense-seeds",
        default="0,1,2",
        help="seeds of a dense PyTorch ViT trained for all the epochs, a baseline ('' for none)",
    )
    args = parser.parse_args(argv)
    if not args.mnist:
        parser.error("no MNIST folder: pass --mnist DIR or set $KERAS_SPARSE_MNIST_DIR")
    return args


def vit():
    """The small vision transformer of benchmarks/mnist_vit.py, in PyTorch."""
    import torch
    from torch import nn

    width, heads, key_dim = vit_benchmark.WIDTH, vit_benchmark.HEADS, vit_benchmark.KEY_DIM

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = heads, key_dim
            self.qkv = nn.Linear(width, 3 * heads * key_dim)
            self.proj = nn.Linear(heads * key_dim, width)

        def forward(self, x):
            batch, tokens, _ = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            x = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
            return self.proj(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(width, eps=1e-6)
            self.attention = Attention()
            self.ln2 = nn.LayerNorm(width, eps=1e-6)
            self.fc1 = nn.Linear(width, vit_benchmark.MLP)
            self.fc2 = nn.Linear(vit_benchmark.MLP, width)

        def forward(self, x):
            x = x + self.attention(self.ln1(x))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Linear(vit_benchmark.PATCH_PIXELS, width)
            self.position = nn.Parameter(torch.randn(vit_benchmark.PATCHES, width) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(vit_benchmark.BLOCKS))
            self.final_ln = nn.LayerNorm(width, eps=1e-6)
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            x = self.patch_embed(x) + self.position
            for block in self.blocks:
                x = block(x)
            return self.head(self.final_ln(x).mean(dim=1))

    model = ViT()
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return model


def kept_widths(model):
    """(heads per block, feed-forward neurons per block)."""
    return (
        [block.attention.num_heads for block in model.blocks],
        [block.fc1.out_features for block in model.blocks],
    )


def as_tensors(data):
    """The NumPy split as PyTorch tensors (labels as int64), converted once for every run."""
    import torch

    return [(torch.from_numpy(x), torch.from_numpy(y).long()) for x, y in data]


def accuracy_on(model, x_test, y_test):
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


def run_one(heads, ffn_units, seed, args, data):
    import torch
    import torch_pruning as tp

    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = vit()
    dense_epochs = int(0.75 * args.epochs)
    start = time.perf_counter()
    lenet5_peer.train(model, x_train, y_train, dense_epochs, args.batch_size, generator)
    all_heads, all_units = kept_widths(model)
    # Torch-Pruning rounds `ratio * width` up: a hair below each exact ratio keeps `kept`.
    head_ratios, unit_ratios = {}, {}
    for block, kept_heads, kept_units, h, u in zip(
        model.blocks, heads, ffn_units, all_heads, all_units
    ):
        head_ratios[block.attention.qkv] = (h - kept_heads) / h - 1e-6
        unit_ratios[block.fc1] = (u - kept_units) / u - 1e-6
        # Torch-Pruning removes heads only in a group it prunes: the attention's group gets
        # the same ratio, its head dimensions kept whole (`prune_head_dims=False`).
        unit_ratios[block.attention.qkv] = head_ratios[block.attention.qkv]
    residual = [model.patch_embed, model.head]
    residual += [m for block in model.blocks for m in (block.attention.proj, block.fc2)]
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_inputs=x_train[:1],
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict=unit_ratios,
        num_heads={block.attention.qkv: block.attention.num_heads for block in model.blocks},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio_dict=head_ratios,
        ignored_layers=residual,
        unwrapped_parameters=[(model.position, 1)],
    )
    pruner.step()
    for block in model.blocks:
        block.attention.num_heads = pruner.num_heads[block.attention.qkv]
    kept = kept_widths(model)
    for block in model.blocks:
        # Whole heads went: every kept head keeps its query, key, value and output slices.
        attention = block.attention
        width = attention.num_heads * attention.head_dim
        if (attention.qkv.out_features, attention.proj.in_features) != (3 * width, width):
            raise RuntimeError(f"Torch-Pruning cut inside heads: {attention}")
    if kept != (list(heads), list(ffn_units)):
        raise RuntimeError(f"Torch-Pruning kept {kept}, not the matched {(heads, ffn_units)}")
    lenet5_peer.train(
        model, x_train, y_train, args.epochs - dense_epochs, args.batch_size, generator
    )
    wall = time.perf_counter() - start
    accuracy = accuracy_on(model, x_test, y_test)
    return {"accuracy": accuracy, "heads": kept[0], "ffn_units": kept[1], "wall_s": wall}


def dense_accuracy(seed, args, data):
    """The PyTorch ViT trained dense for every epoch: the peer's own baseline."""
    import torch

    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = vit()
    lenet5_peer.train(model, x_train, y_train, args.epochs, args.batch_size, generator)
    return accuracy_on(model, x_test, y_test)


def main(argv=None):
    import torch

    args = parse_args(argv)
    matched = json.loads(Path(args.match).read_text())
    ours = [r for r in matched["runs"] if r["method"] == "structure"]
    if not ours:
        raise SystemExit(f"{args.match} has no structure run to match")
    data = as_tensors(vit_benchmark.load_data(datasets.load_mnist, args.mnist))
    rows = []
    for run in ours:
        result = run_one(run["heads"], run["ffn_units"], run["seed"], args, data)
        rows.append(
            {
                "target": run["target"],
                "seed": run["seed"],
                "heads": result["heads"],
                "ffn_units": result["ffn_units"],
                "torch_pruning_accuracy": result["accuracy"],
                "keras_sparse_accuracy": run["accuracy"],
                "keras_sparse_backend": run["backend"],
                "wall_s": result["wall_s"],
            }
        )
        print(
            f"target={run['target']:.2f} seed={run['seed']} heads={result['heads']} "
            f"ffn={result['ffn_units']} torch-pruning acc={result['accuracy']:.4f} "
            f"keras-sparse acc={run['accuracy']:.4f}",
            flush=True,
        )
    dense = []
    for seed in [int(s) for s in args.dense_seeds.split(",") if s]:
        dense.append({"seed": seed, "accuracy": dense_accuracy(seed, args, data)})
        print(f"dense seed={seed} acc={dense[-1]['accuracy']:.4f}", flush=True)
    table = [
        "| heads and neurons removed (per layer) | heads / neurons kept per block (median) "
        "| keras-sparse head + neuron + shrink | Torch-Pruning magnitude + fine-tune |",
        "|--:|:--|--:|--:|",
    ]
    for target in sorted({r["target"] for r in rows}):
        group = [r for r in rows if r["target"] == target]
        heads = statistics.median(h for r in group for h in r["heads"])
        units = statistics.median(u for r in group for u in r["ffn_units"])
        table.append(
            f"| {target:.0%} | {heads:g} of {vit_benchmark.HEADS} / {units:g} of "
            f"{vit_benchmark.MLP} "
            f"| {statistics.median(r['keras_sparse_accuracy'] for r in group):.2%} "
            f"| {statistics.median(r['torch_pruning_accuracy'] for r in group):.2%} |"
        )
    if dense:
        table.append(
            f"| dense | {vit_benchmark.HEADS} / {vit_benchmark.MLP} | "
            f"| {statistics.median(d['accuracy'] for d in dense):.2%} |"
        )
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "mnist")}
    config["torch"] = torch.__version__
    config["torch_pruning"] = __import__("torch_pruning").__version__
    result = {"config": config, "runs": rows, "dense": dense, "table": table}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Merge the MNIST-10k benchmark JSON files into a Markdown table and a PNG plot.

python benchmarks/plot_mnist.py        # reads results/mnist_*.json
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {
    "dense": "Dense (no pruning)",
    "sparse_linear": "SparseLinear + SparsityScheduler",
    "tfmot_gmp": "TFMOT prune_low_magnitude (PolynomialDecay)",
    "one_shot": "One-shot magnitude + fine-tune",
}


def load_rows():
    rows = []
    for path in sorted(RESULTS.glob("mnist_*.json")):
        rows += json.loads(path.read_text())["median"]
    return rows


def markdown(rows):
    lines = [
        "| method | backend | target | accuracy after strip (median) | achieved sparsity "
        "| density per layer, seed 0 (fc1/fc2/out) | wall time (s), shared machine |",
        "|---|---|---|---|---|---|---|",
    ]
    order = list(LABELS)
    for row in sorted(rows, key=lambda r: (r["target"], order.index(r["method"]), r["backend"])):
        lines.append(
            f"| {LABELS[row['method']]} | {row['backend']} | {row['target']:.0%} "
            f"| {row['accuracy'] * 100:.2f}% | {row['sparsity'] * 100:.2f}% "
            f"| {' / '.join(f'{d * 100:.1f}%' for d in row['layer_density'])} "
            f"| {row['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for row in rows:
        series.setdefault((row["method"], row["backend"]), []).append(row)
    for (method, backend), points in sorted(series.items()):
        points.sort(key=lambda r: r["sparsity"])
        x = [p["sparsity"] * 100 for p in points]
        y = [p["accuracy"] * 100 for p in points]
        label = f"{LABELS[method]} [{backend.split(',')[0]}]"
        if method == "dense":
            ax.axhline(y[0], ls=":", color="gray", label=label)
        else:
            ax.plot(x, y, marker="o", label=label)
    # Zoom on the methods that hold accuracy; say where the others went.
    bottom = 93.0
    ax.set_ylim(bottom=bottom)
    for row in rows:
        if row["accuracy"] * 100 < bottom:
            ax.annotate(
                f"{LABELS[row['method']].split(' ')[0]}: {row['accuracy'] * 100:.1f}% (off scale)",
                (row["sparsity"] * 100, bottom),
                xytext=(-120, 12),
                textcoords="offset points",
                fontsize=7,
                arrowprops={"arrowstyle": "->"},
            )
    ax.set_xlabel("sparsity (% of weights removed)")
    ax.set_ylabel("test accuracy after strip (%)")
    ax.set_title("LeNet-300-100 on MNIST-10k (8,000/2,000), median of 3 seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    rows = load_rows()
    table = markdown(rows)
    (RESULTS / "mnist.md").write_text(table + "\n")
    plot(rows, RESULTS / "mnist.png")
    print(table)
    print(f"wrote {RESULTS / 'mnist.md'} and {RESULTS / 'mnist.png'}")


if __name__ == "__main__":
    main()

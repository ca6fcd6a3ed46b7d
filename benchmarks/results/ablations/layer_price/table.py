"""The tenth study's table (docs/pruning_guide.md, "Pricing the output layer's weights"):
each change against today's recipe on the same five held-out folds and seeds, run by run.

    python benchmarks/results/ablations/layer_price/table.py

Today's LeNet-300-100 runs at 90.45% are the ninth study's (`../layer_split/`); those at 98%
and today's LeNet-5 runs were made beside the changes, with the same version (this folder's
`*_today_*` files).
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
TODAY = {
    "lenet300_9045": HERE.parent / "layer_split" / "lenet300_9045_today_{backend}_f{fold}.json",
    "lenet300_98": HERE / "lenet300_98_today_{backend}_f{fold}.json",
    "lenet5_9822": HERE / "lenet5_9822_today_{backend}_f{fold}.json",
}
CELLS = [
    ("lenet300_9045", "jax"),
    ("lenet300_9045", "tensorflow"),
    ("lenet300_98", "jax"),
    ("lenet5_9822", "jax"),
]
CHANGES = {
    "pwout": "a threshold per weight in the output layer",
    "pwoutt5": "the same at relative temperature 5, not 2 -> 5",
    "scale1": "price by scale",
}


def runs(pattern, **fields):
    """`{(fold, seed): run}` over the five folds of `pattern`."""
    found = {}
    for fold in range(5):
        path = Path(str(pattern).format(fold=fold, **fields))
        for run in json.loads(path.read_text())["runs"]:
            found[fold, run["seed"]] = run
    return found


def densities(found):
    """The mean layer densities, in percent, of the runs in `found`."""
    columns = zip(*(run["layer_density"] for run in found.values()))
    return " / ".join(f"{100 * statistics.mean(column):.1f}" for column in columns)


def main():
    for model, backend in CELLS:
        today = runs(TODAY[model], backend=backend)
        mean = statistics.mean(100 * run["accuracy"] for run in today.values())
        print(f"{model} {backend}: today {mean:.2f}, densities {densities(today)}")
        for change, what in CHANGES.items():
            pattern = HERE / f"{model}_{change}_{backend}_f0.json"
            if not pattern.exists():  # not run in this cell
                continue
            changed = runs(HERE / f"{model}_{change}_{backend}_f{{fold}}.json")
            assert changed.keys() == today.keys(), (model, backend, change)
            differences = [
                100 * (changed[key]["accuracy"] - today[key]["accuracy"]) for key in today
            ]
            error = statistics.stdev(differences) / len(differences) ** 0.5
            ahead = sum(d > 0 for d in differences)
            behind = sum(d < 0 for d in differences)
            print(
                f"  {what} ({change}): "
                f"{statistics.mean(100 * r['accuracy'] for r in changed.values()):.2f}, "
                f"{statistics.mean(differences):+.2f} (SE {error:.2f}), {ahead} / {behind}, "
                f"densities {densities(changed)}"
            )
            exact = all(
                abs(r["accuracy"] - r["evaluated_accuracy"]) < 1e-6 for r in changed.values()
            )
            assert exact, (model, backend, change)


if __name__ == "__main__":
    main()

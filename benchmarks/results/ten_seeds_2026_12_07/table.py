"""The ten-seed table of docs/benchmarks.md ("Ten seeds at the README's misses"), from this
folder's files and, for PQuantML cs at seeds 3-9 of LeNet-300-100 and LeNet-5, the files of
2026-12-06 beside it: `python benchmarks/results/ten_seeds_2026_12_07/table.py`."""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
BAND = {"lenet300": (0.90, 0.93), "lenet5": (0.983, 0.986), "vit": (0.73, 0.751)}
CS = {
    "lenet300": "lenet300_pquant_cs_1e-6",
    "lenet5": "lenet5_pquant_cs_1e-4",
    "vit": "vit_pquant_cs_1e-5",
}
CS_SEEDS_3_9 = {
    "lenet300": HERE.parent / "lenet300_pquant_cs_1e-6_seeds3_9.json",
    "lenet5": HERE.parent / "lenet5_pquant_cs_1e-4_seeds3_9.json",
}
OURS = {
    "lenet300": "lenet300_at_pquant_cs_sparsity_91_{b}_thresholds_only_seed{s}.json",
    "lenet5": "lenet5_at_pquant_cs_sparsity_98_{b}_thresholds_only_seed{s}.json",
    "vit": "vit_mnist_{b}_at_pquant_cs_74_thresholds_only_seed{s}.json",
}


def runs(path):
    return json.loads(Path(path).read_text())["runs"]


def in_band(model, path):
    low, high = BAND[model]
    return [r for r in runs(path) if low < r["sparsity"] < high]


def main():
    for model in ("lenet300", "lenet5", "vit"):
        cs = {s: in_band(model, HERE / f"rerun_{CS[model]}_seed{s}.json")[0] for s in range(3)}
        if model in CS_SEEDS_3_9:
            cs.update({r["seed"]: r for r in in_band(model, CS_SEEDS_3_9[model])})
        else:
            cs.update(
                {s: in_band(model, HERE / f"{CS[model]}_seed{s}.json")[0] for s in range(3, 10)}
            )
        accuracy = [100 * cs[s]["accuracy"] for s in range(10)]
        print(
            f"{model}: PQuantML cs",
            " ".join(f"{a:.2f}" for a in accuracy),
            f"| mean {statistics.mean(accuracy):.2f}, median {statistics.median(accuracy):.2f}",
        )
        for backend in ("jax", "tensorflow", "torch"):
            ours = []
            for s in range(10):
                name = (
                    f"rerun_{model}_at_pquant_cs_{backend}_seed{s}.json"
                    if s < 3
                    else OURS[model].format(b=backend, s=s)
                )
                (run,) = runs(HERE / name)
                assert abs(run["sparsity"] - cs[s]["sparsity"]) < 1e-3, name
                ours.append(100 * run["accuracy"])
            gaps = [o - c for o, c in zip(ours, accuracy)]
            error = statistics.stdev(gaps) / len(gaps) ** 0.5
            print(
                f"  {backend:10s}",
                " ".join(f"{a:.2f}" for a in ours),
                f"| mean {statistics.mean(ours):.2f}, median {statistics.median(ours):.2f}",
                f"| against cs {statistics.mean(gaps):+.2f} (SE {error:.2f}),",
                f"ahead {sum(g > 0 for g in gaps)}, behind {sum(g < 0 for g in gaps)}",
            )


if __name__ == "__main__":
    main()

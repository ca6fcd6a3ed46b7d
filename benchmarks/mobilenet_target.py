"""MobileNetV2 (alpha 0.35, 32x32): does the scheduler reach a target over all its kernels?

A check of coverage and of the target, not of accuracy: `keras.applications.MobileNetV2(
weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)` is converted with
`keras_sparse.sparsify()`, then trained briefly (default: 3 epochs on 512 images of
scikit-learn's digits, 8x8 upsampled to 32x32x3, batch 64) with
`SparsityScheduler(PolynomialDecay(0.9, begin_step=0, end_step=2/3 of the steps))`,
which freezes the masks at the end of the ramp and fine-tunes the rest.

Reported per backend: the share of the model's kernel parameters under masks
(`sparsity_report(model).coverage`, goal at least 99%), the sparsity over all pruned
kernels after the freeze (goal: exactly the target), the same counted on the stripped
model's kernels, whether `sparsify()` warned about layers it left dense, and the wall time.
Any exception is recorded in the JSON (with its traceback) instead of a result.

    python benchmarks/mobilenet_target.py --backend jax
    python benchmarks/mobilenet_target.py --backend all     # one process per backend

Writes results/mobilenet_target_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("jax", "tensorflow", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=(*BACKENDS, "all"))
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="JSON output (default results/mobilenet_target_<backend>.json)"
    )
    return parser.parse_args(argv)


def digits_32(n, seed):
    """`n` images of scikit-learn's digits, 8x8 -> 32x32 (nearest), grey -> 3 channels."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))[:n]
    x = (data.images[order] / 16.0).astype("float32")
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)[..., None]
    return np.repeat(x, 3, axis=-1), data.target[order].astype("int32")


def kernel_params(model):
    """Values in the model's weights of rank 2 or more (every conv, depthwise and Dense kernel;
    batch-norm statistics and biases are rank 1), counted on the stock model."""
    import math

    return sum(math.prod(v.shape) for v in model.weights if len(v.shape) >= 2)


def stripped_sparsity(stripped):
    """Zeros over all kernels of the stripped model (stock layers only)."""
    import keras
    import numpy as np

    from keras_sparse.walk import walk

    zeros = total = 0
    for layer, _ in walk(stripped):
        if isinstance(layer, keras.Model):
            continue
        for name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
            value = getattr(layer, name, None)
            if isinstance(value, keras.Variable):
                array = keras.ops.convert_to_numpy(value)
                zeros += int(array.size - np.count_nonzero(array))
                total += int(array.size)
    return 1.0 - (total - zeros) / total if total else 0.0, total


def run(args):
    import keras
    import numpy as np

    import keras_sparse as ks

    keras.utils.set_random_seed(args.seed)
    row = {"backend": keras.backend.backend(), "target": args.target, "seed": args.seed}
    start = time.perf_counter()
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10
    )
    row["model_params"] = int(model.count_params())
    row["kernel_params"] = int(kernel_params(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = ks.sparsify(model)
    row["sparsify_warnings"] = [str(w.message) for w in caught if "sparsify" in str(w.message)]
    before = ks.sparsity_report(sparse)
    row["pruned_kernels"] = len(before.rows)
    row["masked_params"] = int(before.total.total)
    row["coverage"] = float(before.coverage)
    row["coverage_of_kernel_params"] = before.total.total / row["kernel_params"]
    x, y = digits_32(args.images, args.seed)
    steps = args.epochs * int(np.ceil(len(x) / args.batch_size))
    end_step = int(round(2 * steps / 3))
    row.update(steps=steps, end_step=end_step)
    sparse.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    scheduler = ks.SparsityScheduler(
        ks.PolynomialDecay(args.target, begin_step=0, end_step=end_step)
    )
    history = sparse.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=[scheduler], verbose=0
    )
    row["wall_s"] = time.perf_counter() - start
    row["history_sparsity"] = [float(s) for s in history.history.get("sparsity", [])]
    row["frozen"] = bool(scheduler.frozen)
    after = ks.sparsity_report(sparse)
    row["sparsity"] = float(after.total.sparsity)
    row["active"] = int(after.total.active)
    row["reached_target_exactly"] = int(after.total.active) == int(
        round((1.0 - args.target) * after.total.total)
    )
    densities = [r.density for r in after.rows]
    row["layer_density_min_max"] = [min(densities), max(densities)]
    stripped = ks.strip(sparse)
    row["stripped_kernel_sparsity"], row["stripped_kernel_params"] = stripped_sparsity(stripped)
    row["train_accuracy_last_epoch"] = float(history.history["accuracy"][-1])
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "all":
        failed = []
        for backend in BACKENDS:
            cmd = [sys.executable, __file__, *(argv or sys.argv[1:])]
            cmd[cmd.index("all")] = backend
            if subprocess.run(cmd).returncode:
                failed.append(backend)
        sys.exit(1 if failed else 0)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.perf_counter()
    try:
        row = run(args)
        status = 0
    except Exception as error:
        row = {
            "backend": args.backend,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "wall_s": time.perf_counter() - start,
        }
        traceback.print_exc()
        status = 1
    out = Path(args.out) if args.out else RESULTS / f"mobilenet_target_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "backend")}
    out.write_text(json.dumps({"config": config, "result": row}, indent=1))
    summary = {
        k: row.get(k)
        for k in (
            "coverage",
            "coverage_of_kernel_params",
            "sparsity",
            "reached_target_exactly",
            "wall_s",
            "error",
        )
    }
    print(f"[{args.backend}] {summary}")
    print(f"wrote {out}")
    sys.exit(status)


if __name__ == "__main__":
    main()

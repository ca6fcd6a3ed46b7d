"""A change's effect on speed and memory: `SparseLinear` at two git revisions, side by side.

Times a training step of the working tree's `SparseLinear` and of the one at
`--base` (both modes), against `Dense`, in the same interleaved rounds of one
process (see `speed.py`), and optionally their peak training memory. On a
noisy machine this is the way to tell whether a change helped: the two
versions see the same noise.

    python benchmarks/compare_revisions.py --backend tensorflow --base HEAD~1 --memory

With `--fit WIDTH`, it times whole `model.fit` steps instead (Adam, the
batch size of `--batch`, synthetic MNIST-shaped data) of a 784-WIDTH-WIDTH-10
MLP built from `Dense`, the base's `SparseLinear` and the working tree's, with
no sparsity driver; `--steps` steps per timed epoch:

    python benchmarks/compare_revisions.py --backend torch --fit 4096 --steps 8 --rounds 5

`--driver N` (PyTorch) adds each version's `SparsityScheduler` (updating every N
steps, on a ramp that neither ends nor freezes while timed); `--frozen` times those
fits after the freeze instead: every mask frozen, so
that training multiplies each kernel by its fixed `prune_mask` (a random
half of the weights kept, the same for both versions), after one epoch of
training with the soft mask.

The base revision's `keras_sparse/` is extracted with `git show` into a
temporary directory and imported as `keras_sparse_base`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def extract(revision, into):
    """`keras_sparse/` at `revision`, renamed `keras_sparse_base`, under `into`."""
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", revision, "keras_sparse/"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    package = os.path.join(into, "keras_sparse_base")
    os.makedirs(package)
    for name in names:
        if not name.endswith(".py"):
            continue
        source = subprocess.run(
            ["git", "show", f"{revision}:{name}"], cwd=ROOT, check=True, capture_output=True
        ).stdout.decode()
        with open(os.path.join(package, os.path.basename(name)), "w") as f:
            f.write(source.replace("keras_sparse", "keras_sparse_base"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--target", type=float, default=0.15, help="seconds per sample")
    parser.add_argument("--memory", action="store_true", help="also peak training memory")
    parser.add_argument(
        "--eager", action="store_true", help="PyTorch: eager steps instead of torch.compile"
    )
    parser.add_argument("--fit", type=int, default=None, metavar="WIDTH", help="time model.fit")
    parser.add_argument("--steps", type=int, default=20, help="--fit: steps per timed epoch")
    parser.add_argument("--frozen", action="store_true", help="--fit: after the freeze")
    parser.add_argument(
        "--driver",
        type=int,
        default=None,
        metavar="UPDATE_EVERY",
        help="--fit: with each version's SparsityScheduler, updating every UPDATE_EVERY steps",
    )
    args = parser.parse_args(argv)
    if (args.frozen or args.driver is not None) and args.fit is None:
        parser.error("--frozen and --driver time model.fit: they need --fit WIDTH")
    if args.frozen and args.driver is not None:
        parser.error("--frozen and --driver: the driver stops at the freeze, give one of them")
    if args.driver is not None and args.backend != "torch":
        parser.error(
            f"--driver times eager PyTorch's driver updates; with --backend {args.backend} "
            "each timed fit would retrace the train step (SparsityScheduler does at a fit's "
            "start and end): use fit_speed.py, which times the second epoch of each fit"
        )

    os.environ["KERAS_BACKEND"] = args.backend
    sys.path[:0] = [HERE, ROOT]
    import speed

    speed.limit_threads(1)
    speed.apply_threads(args.backend, 1)
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        extract(args.base, tmp)
        sys.path.insert(0, tmp)
        packages = {
            "base": importlib.import_module("keras_sparse_base"),
            "current": importlib.import_module("keras_sparse"),
        }
        versions = {version: package.SparseLinear for version, package in packages.items()}
        if args.fit is not None:
            compare_fit(args, packages, speed)
            return
        size, batch = args.size, args.batch
        layers = {}
        for version, cls in versions.items():
            # The same seed, so the same kernel and thresholds for both versions.
            built = speed.make_layers(size, floor=False, sparse_linear=cls)
            layers.setdefault("dense", built["dense"])
            for mode in speed.MODES:
                layers[f"{version} {mode}"] = built[mode]
        adapter = speed.adapter_for(
            args.backend,
            argparse.Namespace(torch_compile_sizes=[] if args.eager else [size], batches=[batch]),
        )
        x, y = speed.data(size, batch)
        runs = {name: adapter.train(layer, x, y) for name, layer in layers.items()}
        variant = {"tensorflow": "jit", "jax": "jit"}.get(args.backend)
        variant = variant or ("eager" if args.eager else "compile")
        times, ratios = speed.interleaved(
            {name: r[variant] for name, r in runs.items()}, args.rounds, args.target
        )
        print(f"{args.backend} {variant}, size {size}, batch {batch}, base = {args.base}")
        print(f"  dense                  {times['dense'] * 1e3:.2f} ms a step")
        print("training step / Dense (median, per-round range):")
        for name in layers:
            if name != "dense":
                low, high = ratios[f"{name}_range"]
                print(f"  {name:22s} {ratios[name]:.3f}x  ({low:.2f}-{high:.2f})")
        if args.memory:
            print("peak training memory / Dense (weights + batch + step extra):")
            total = {}
            for name, layer in layers.items():
                extra = adapter.train_memory(layer, x, y, runs[name][variant])
                weights = sum(
                    int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in layer.weights
                )
                total[name] = weights + 2 * size * batch * 4 + extra
            for name in layers:
                if name != "dense":
                    print(f"  {name:22s} {total[name] / total['dense']:.2f}x")


def compare_fit(args, packages, speed):
    """`model.fit` steps of the MLP of `--fit` with each version's layers, in interleaved rounds."""
    import fit_speed
    import keras

    x, y = fit_speed.data(argparse.Namespace(batch_size=args.batch, steps=args.steps))
    classes = {"dense": keras.layers.Dense}
    classes.update({version: package.SparseLinear for version, package in packages.items()})
    runs = {}
    for name, layer in classes.items():
        keras.utils.set_random_seed(0)
        model = fit_speed.compiled(fit_speed.mlp(layer, (args.fit, args.fit)))
        callbacks = []
        if args.frozen and name != "dense":
            # One epoch before the freeze, so that the optimizer's moments of the
            # pruned weights hold what training left there: PyTorch's square root
            # of an exact zero is slow on a CPU (docs/benchmarks.md, "Boolean masks
            # in eager PyTorch").
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            freeze(model)
            model.make_train_function(force=True)  # a compiled step holds the soft mask
        if args.driver is not None and name != "dense":
            # A ramp that neither ends nor freezes while timed.
            package = packages[name]
            schedule = package.PolynomialDecay(0.9, begin_step=0, end_step=10**7)
            callbacks = [package.SparsityScheduler(schedule, update_every=args.driver)]

        def epoch(model=model, callbacks=callbacks):
            with warnings.catch_warnings():
                # The unfinished ramp warns at each fit's end.
                warnings.filterwarnings("ignore", "SparsityScheduler: training stopped")
                model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=callbacks)

        runs[name] = epoch
    times, ratios = speed.interleaved(runs, args.rounds, args.target)
    print(
        f"{args.backend} model.fit, 784-{args.fit}-{args.fit}-10, batch {args.batch}, "
        f"{args.steps} steps an epoch, base = {args.base}"
        + (", every mask frozen" if args.frozen else "")
        + (f", SparsityScheduler updating every {args.driver} steps" if args.driver else "")
    )
    print(f"  dense                  {times['dense'] / args.steps * 1e3:.1f} ms a step")
    print("fit step / Dense (median, per-round range):")
    for name in packages:
        low, high = ratios[f"{name}_range"]
        print(f"  {name:22s} {ratios[name]:.3f}x  ({low:.2f}-{high:.2f})")


def freeze(model):
    """Freeze every mask of `model` at a random half of its weights (seeded: versions alike)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for layer in model.layers:
        for mask in getattr(layer, "masks", {}).values():
            mask.prune_mask.assign(rng.random(mask.shape) < 0.5)
            mask.frozen = True


if __name__ == "__main__":
    main()

"""Whole `model.fit` time of pruned training against the dense model, side by side.

Four variants of one MLP train on the same synthetic MNIST-shaped data (the
time of a step does not depend on the values), Adam, batch 256 by default:

* `dense`: stock `keras.layers.Dense`;
* `sparse`: `SparseLinear` layers, no driver (the soft mask and its penalty);
* `driver`: the same with `SparsityScheduler` (a ramp long enough that it
  neither finishes nor freezes while timed);
* `frozen`: after the scheduler's freeze (fine-tuning with the fixed mask).

Models: `lenet` (LeNet-300-100, 784-300-100-10) and `wide` (784-4096-4096-10,
about 20M parameters). Each variant is built, compiled and warmed up (one
epoch, so that compiling is outside the timings); then rounds interleave the
variants, each a fit of two epochs of which the second is timed (the
start of a fit, where the driver retraces the train step, stays out), and
the table shows the median epoch time and its ratio to `dense`.

`--threads 1` (default) pins the process to one CPU core (affinity, which
also holds jaxlib to one core) and sets the backend's threads to one; the
table's cpu/wall is near 1.0 when the pin holds and the core is not shared.

    python benchmarks/fit_speed.py --backend all
    python benchmarks/fit_speed.py --backend jax --model wide --rounds 3

The TFMOT peer (`prune_low_magnitude` with `UpdatePruningStep`, against
tf-keras `Dense`) runs in its own environment: `--backend tfmot`, from the
`tfmot-speed` tox env (`tox -e tfmot-speed -- --model lenet`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("tensorflow", "jax", "torch")
MODELS = {"lenet": (300, 100), "wide": (4096, 4096)}
VARIANTS = ("dense", "sparse", "driver", "frozen")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=(*BACKENDS, "tfmot", "all"))
    parser.add_argument("--model", default="lenet,wide", help=f"some of {','.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--update-every", type=int, default=None, help="the driver's; default its default"
    )
    parser.add_argument("--threads", type=int, default=1, choices=(0, 1))
    parser.add_argument("--core", type=int, default=1, help="the core of --threads 1")
    parser.add_argument("--out", default=None, help="default results/fit_speed_<backend>.json")
    args = parser.parse_args(argv)
    unknown = set(args.model.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--model {args.model!r}: unknown {sorted(unknown)}; expected {list(MODELS)}")
    return args


def one_core(backend, core):
    os.sched_setaffinity(0, {core})
    if backend == "jax":
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    elif backend in ("tensorflow", "tfmot"):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    else:
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def data(args):
    import numpy as np

    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    return rng.random((n, 784), dtype="float32"), rng.integers(0, 10, n).astype("int32")


def mlp(dense, hidden):
    """784 inputs, `dense` layers of the `hidden` widths (relu), 10 logits."""
    import keras

    return keras.Sequential(
        [keras.Input((784,))] + [dense(width, activation="relu") for width in hidden] + [dense(10)]
    )


def compiled(model):
    """`model` compiled as every variant is: Adam, cross-entropy on logits."""
    import keras

    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def keras_variants(args, hidden):
    """`{variant: (model, callbacks for each timed fit)}`, each warmed up."""
    import keras

    import keras_sparse as ks

    x, y = data(args)
    fit = dict(batch_size=args.batch_size, verbose=0)

    far = 10**9  # a ramp that never ends while timed

    def driver():
        every = {} if args.update_every is None else {"update_every": args.update_every}
        schedule = ks.PolynomialDecay(0.9, begin_step=0, end_step=far)
        return [ks.SparsityScheduler(schedule, **every)]

    variants = {
        "dense": (compiled(mlp(keras.layers.Dense, hidden)), lambda: []),
        "sparse": (compiled(mlp(ks.SparseLinear, hidden)), lambda: []),
        "driver": (compiled(mlp(ks.SparseLinear, hidden)), driver),
        "frozen": (compiled(mlp(ks.SparseLinear, hidden)), lambda: []),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfinished ramp warns at each fit's end
        for name, (model, callbacks) in variants.items():
            extra = callbacks()
            if name == "frozen":
                short = ks.PolynomialDecay(0.9, begin_step=0, end_step=args.steps // 2)
                extra = [ks.SparsityScheduler(short)]
            model.fit(x, y, epochs=1, callbacks=extra, **fit)
        frozen = variants["frozen"][0]
        assert all(mask.frozen for mask in ks.kernel_masks(frozen)), "the freeze did not happen"
    return variants, (x, y), fit


def tfmot_variants(args, hidden):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    keras = tf.keras
    x, y = data(args)
    fit = dict(batch_size=args.batch_size, verbose=0)

    def mlp():
        return keras.Sequential(
            [keras.Input((784,))]
            + [keras.layers.Dense(width, activation="relu") for width in hidden]
            + [keras.layers.Dense(10)]
        )

    def compiled(model):
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.9, begin_step=0, end_step=10**9)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(mlp(), pruning_schedule=schedule)
    variants = {
        "dense": (compiled(mlp()), lambda: []),
        "tfmot": (compiled(pruned), lambda: [tfmot.sparsity.keras.UpdatePruningStep()]),
    }
    for model, callbacks in variants.values():
        model.fit(x, y, epochs=1, callbacks=callbacks(), **fit)
    return variants, (x, y), fit


class _Timer:
    """Wall and CPU seconds of each epoch of a fit."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        wall, cpu = self._start
        self.epochs.append((time.perf_counter() - wall, time.process_time() - cpu))


def EpochTimer():  # noqa: N802 - reads as the callback class it builds
    """A Keras callback (of the running Keras: tf-keras for TFMOT) that times epochs."""
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        import tensorflow as tf

        base = tf.keras.callbacks.Callback
    else:
        import keras

        base = keras.callbacks.Callback
    return type("EpochTimer", (_Timer, base), {})()


def run_backend(args):
    backend = args.backend
    rows = []
    for name in args.model.split(","):
        hidden = MODELS[name]
        build = tfmot_variants if backend == "tfmot" else keras_variants
        variants, (x, y), fit = build(args, hidden)
        times = {variant: [] for variant in variants}
        loads = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.rounds):
                for variant, (model, callbacks) in variants.items():
                    # Two epochs, the second timed: a fit's start (the driver retraces
                    # the train step there) stays out of the steady-state figure.
                    timer = EpochTimer()
                    model.fit(x, y, epochs=2, callbacks=[*callbacks(), timer], **fit)
                    wall, cpu = timer.epochs[-1]
                    times[variant].append(wall)
                    loads.append(cpu / wall)
        dense = statistics.median(times["dense"])
        for variant, values in times.items():
            rows.append(
                {
                    "backend": backend,
                    "model": name,
                    "variant": variant,
                    "epoch_s": statistics.median(values),
                    "step_ms": 1e3 * statistics.median(values) / args.steps,
                    "ratio_to_dense": statistics.median(values) / dense,
                    "cpu_per_wall": statistics.median(loads),
                }
            )
        print(markdown(rows[-len(times) :]), flush=True)
    return rows


def markdown(rows):
    lines = [
        "| backend | model | variant | ms per step | / dense | cpu/wall |",
        "|:--|:--|:--|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['variant']} | {r['step_ms']:.2f} "
            f"| {r['ratio_to_dense']:.3f} | {r['cpu_per_wall']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or RESULTS / f"fit_speed_{args.backend}.json")
    if args.backend == "all":
        rows = []
        for backend in BACKENDS:
            part = out.with_name(f".{out.stem}_{backend}.json")
            cmd = [sys.executable, __file__, *argv, "--backend", backend, "--out", str(part)]
            subprocess.run(cmd, check=True)
            rows += json.loads(part.read_text())["rows"]
            part.unlink()
    else:
        if args.backend == "tfmot":
            os.environ["TF_USE_LEGACY_KERAS"] = "1"
        else:
            os.environ["KERAS_BACKEND"] = args.backend
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if args.threads == 1:
            one_core(args.backend, args.core)
        rows = run_backend(args)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "backend")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

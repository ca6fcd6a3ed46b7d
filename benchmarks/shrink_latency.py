"""Inference latency of a neuron-pruned model after `shrink()`, against the same model unshrunk.

An MLP 784-1024-1024-10 of `SparseLinear(granularity="neuron")` hidden layers
keeps a fraction of its hidden neurons (the ones with the largest weight RMS,
as the neuron mask ranks them) and is `hard_prune()`d. Two models serve it:
`strip(model)` ("dense": Dense layers of the full size, zero columns
included) and `shrink(model).model` ("shrunk": the dead neurons sliced out).
Both run compiled (JAX: `jax.jit`; TensorFlow: `tf.function`; PyTorch: eager
under `torch.inference_mode()`, as `model.predict` runs), on the same inputs,
interleaved: every repeat times each model once per batch size, and the
table shows medians over repeats and the shrunk/dense ratio of medians.

Goal (issue 4): at batch 256, shrunk time <= (kept fraction + 0.1) x dense time.

`--threads 1` (default) runs every backend on one CPU thread, which keeps the
timings steady on a shared machine; `--threads 0` leaves each backend its own
default (all cores).

    python benchmarks/shrink_latency.py --backend all       # one process per backend
    python benchmarks/shrink_latency.py --backend jax --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("tensorflow", "jax", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=(*BACKENDS, "all"))
    parser.add_argument("--kept", default="0.5,0.25,0.1", help="fractions of hidden neurons kept")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, choices=(0, 1))
    parser.add_argument("--budget-ms", type=float, default=150.0, help="time per measurement")
    parser.add_argument("--out", default=str(RESULTS / "shrink_latency.json"))
    return parser.parse_args(argv)


def build_pruned(kept, hidden, seed=0):
    import keras
    import numpy as np

    import keras_sparse as ks

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            ks.SparseLinear(hidden, activation="relu", granularity="neuron", name="fc1"),
            ks.SparseLinear(hidden, activation="relu", granularity="neuron", name="fc2"),
            keras.layers.Dense(10, name="out"),
        ]
    )
    rng = np.random.default_rng(seed)
    for layer in ks.sparse_layers(model):
        # Spread the neurons' scales, as training does, then keep the top RMS.
        kernel = keras.ops.convert_to_numpy(layer.kernel) * rng.uniform(0.2, 1.0, hidden)
        layer.kernel.assign(kernel.astype("float32"))
        layer.bias.assign(rng.normal(0, 0.1, hidden).astype("float32"))
        rms = np.sqrt(np.mean(kernel**2, axis=0))
        cut = np.sort(rms)[::-1][int(round(kept * hidden)) - 1]
        layer.reset_threshold(np.where(rms >= cut, 0.0, 1e3).astype("float32"))
        layer.hard_prune()
    return model


def compiled(model):
    """`f(x) -> numpy output` running `model` as the backend serves it."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        fn = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=False)[0])
        return lambda x: np.asarray(fn(trainable, non_trainable, x).block_until_ready())
    if backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return lambda x: fn(x).numpy()
    import torch

    def run(x):
        with torch.inference_mode():
            return model(x, training=False).cpu().numpy()

    return run


def single_thread(backend):
    """One CPU thread for the backend's kernels (before it runs anything)."""
    if backend == "jax":
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    else:
        import torch

        torch.set_num_threads(1)


def per_call_seconds(fn, x, budget_s):
    """Mean seconds per call over as many calls as fit in `budget_s` (at least 3)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 3 and elapsed >= budget_s:
            return elapsed / calls


def run_backend(args):
    import keras
    import numpy as np

    import keras_sparse as ks

    kept_fractions = [float(k) for k in args.kept.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    inputs = {
        b: keras.ops.convert_to_tensor(rng.random((b, 784), dtype="float32")) for b in batches
    }
    variants = {}
    params = {}
    for kept in kept_fractions:
        pruned = build_pruned(kept, args.hidden)
        result = ks.shrink(pruned)
        dense = ks.strip(pruned)
        variants[("dense", kept)] = compiled(dense)
        variants[("shrunk", kept)] = compiled(result.model)
        x = inputs[batches[-1]]
        gap = np.max(np.abs(variants[("dense", kept)](x) - variants[("shrunk", kept)](x)))
        assert gap < 1e-4, f"the shrunk model differs from the dense one by {gap}"
        params[kept] = (result.params_before, result.params_after)
    for fn in variants.values():  # compile and warm up
        for x in inputs.values():
            fn(x)
            fn(x)
    times = {(key, b): [] for key in variants for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            for key, fn in variants.items():
                times[(key, b)].append(per_call_seconds(fn, inputs[b], args.budget_ms / 1000))
    rows = []
    for kept in kept_fractions:
        for b in batches:
            dense_s = statistics.median(times[(("dense", kept), b)])
            shrunk_s = statistics.median(times[(("shrunk", kept), b)])
            rows.append(
                {
                    "backend": keras.backend.backend(),
                    "kept": kept,
                    "batch": b,
                    "dense_ms": 1e3 * dense_s,
                    "shrunk_ms": 1e3 * shrunk_s,
                    "ratio": shrunk_s / dense_s,
                    "goal": kept + 0.1,
                    "params_dense": params[kept][0],
                    "params_shrunk": params[kept][1],
                }
            )
    return rows


def markdown(rows):
    lines = [
        "| backend | neurons kept | params (shrunk / dense) | batch | dense ms | shrunk ms "
        "| shrunk / dense | goal at batch 256 |",
        "|:--|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for r in rows:
        goal = ""
        if r["batch"] == 256:
            goal = f"<= {r['goal']:.2f}: {'met' if r['ratio'] <= r['goal'] else 'missed'}"
        lines.append(
            f"| {r['backend']} | {r['kept']:.0%} | {r['params_shrunk'] / r['params_dense']:.3f} "
            f"| {r['batch']} | {r['dense_ms']:.3f} | {r['shrunk_ms']:.3f} | {r['ratio']:.3f} "
            f"| {goal} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if args.backend == "all":
        rows = []
        for backend in BACKENDS:
            part = out.with_name(f".{out.stem}_{backend}.json")
            cmd = [sys.executable, __file__, *argv, "--backend", backend, "--out", str(part)]
            subprocess.run(cmd, check=True)
            rows += json.loads(part.read_text())["rows"]
            part.unlink()
    else:
        os.environ["KERAS_BACKEND"] = args.backend
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if args.threads == 1:
            single_thread(args.backend)
        rows = run_backend(args)
        print(markdown(rows), flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "backend")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    if args.backend == "all":
        print(f"wrote {out}")  # each backend printed its table


if __name__ == "__main__":
    main()

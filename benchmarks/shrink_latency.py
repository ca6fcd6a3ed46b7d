"""Inference latency of a structurally pruned model after `shrink()`, against it unshrunk.

Four models, each built with its units pruned as `hard_prune()` leaves them
(the units with the largest weight RMS kept, as the neuron mask ranks them):

* `mlp`: 784-1024-1024-10, `SparseLinear(granularity="neuron")` hidden layers;
* `mobilenet`: `keras.applications.MobileNetV2(weights=None, alpha=0.5)` on
  64x64x3, every non-depthwise convolution (and no classifier) pruned by filter;
* `resnet`: a ResNet-style CNN (a stem, three stages of two basic blocks of
  3x3 convolutions, batch norm and identity adds, widths 32-64-128), the
  first convolution of each block pruned by filter (the others feed adds);
* `vit`: a transformer encoder on 64 tokens of width 256 (4 blocks of
  `SparseMultiHeadAttention(8 heads, granularity="head")` and a 1024-wide
  `SparseLinear(granularity="neuron")` feed-forward layer), heads and
  feed-forward neurons pruned.

Two models serve each: `strip(model)` ("dense": the full size, zeros
included) and `shrink(model).model` ("shrunk"). Both run compiled (JAX:
`jax.jit`; TensorFlow: `tf.function`; PyTorch: eager under
`torch.inference_mode()`, as `model.predict` runs; `onnxruntime`: each
model exported to ONNX with `model.export(format="onnx")` on the backend
`--export-backend` names, run by an ONNX Runtime CPU session), on the same inputs,
interleaved: every repeat times each model once per batch size, and the
table shows medians over repeats and the shrunk/dense ratio of medians.

Goal: shrunk time <= (kept fraction + 0.1) x dense time at the largest batch.

`--threads 1` (default) pins the process to one CPU core (affinity: jaxlib
ignores its thread flags) and sets each backend's thread count to one; the
table reports cpu/wall of the timed loops, which is near 1.0 when the pin
holds. `--threads 0` leaves each backend its own default (all cores).

    python benchmarks/shrink_latency.py --backend all       # one process per backend
    python benchmarks/shrink_latency.py --backend jax --model mobilenet,resnet,vit --batches 1,32
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
BACKENDS = ("tensorflow", "jax", "torch")  # `--backend all`; ONNX Runtime is run on its own
MODELS = ("mlp", "mobilenet", "resnet", "vit")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=(*BACKENDS, "onnxruntime", "all"))
    parser.add_argument("--model", default="mlp", help=f"some of {','.join(MODELS)}")
    parser.add_argument("--kept", default="0.5,0.25,0.1", help="fractions of units kept")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, choices=(0, 1))
    parser.add_argument("--budget-ms", type=float, default=150.0, help="time per measurement")
    parser.add_argument("--core", type=int, default=1, help="the core of --threads 1")
    parser.add_argument(
        "--export-backend",
        default="tensorflow",
        choices=BACKENDS,
        help="the backend that exports the ONNX files of --backend onnxruntime",
    )
    parser.add_argument("--out", default=str(RESULTS / "shrink_latency.json"))
    args = parser.parse_args(argv)
    unknown = set(args.model.split(",")) - set(MODELS)
    if unknown:
        parser.error(
            f"--model {args.model!r}: unknown {sorted(unknown)}; expected some of {MODELS}"
        )
    return args


def keep_top_units(layer, kept, rng):
    """Prune all but the `kept` fraction of `layer`'s units with the largest RMS, as the
    neuron mask ranks them, after spreading the units' scales as training does."""
    import keras
    import numpy as np

    kernel = keras.ops.convert_to_numpy(layer.kernel)
    axis = 0 if kernel.ndim == 3 and hasattr(layer, "_sparse_unit_axes") else kernel.ndim - 1
    units = kernel.shape[axis]
    shape = [1] * kernel.ndim
    shape[axis] = units
    kernel = kernel * rng.uniform(0.2, 1.0, units).reshape(shape)
    layer.kernel.assign(kernel.astype("float32"))
    rms = np.sqrt(np.mean(np.moveaxis(kernel, axis, 0).reshape(units, -1) ** 2, axis=1))
    cut = np.sort(rms)[::-1][max(1, int(round(kept * units))) - 1]
    layer.reset_threshold(np.where(rms >= cut, 0.0, 1e3).astype("float32"))
    layer.hard_prune()


def mlp(hidden):
    import keras

    import keras_sparse as ks

    model = keras.Sequential(
        [
            keras.Input((784,)),
            ks.SparseLinear(hidden, activation="relu", granularity="neuron", name="fc1"),
            ks.SparseLinear(hidden, activation="relu", granularity="neuron", name="fc2"),
            keras.layers.Dense(10, name="out"),
        ]
    )
    return model, ks.sparse_layers(model), (784,)


def mobilenet():
    import keras

    import keras_sparse as ks

    base = keras.applications.MobileNetV2(
        weights=None, input_shape=(64, 64, 3), alpha=0.5, classes=10
    )
    model = ks.sparsify(base, select=keras.layers.Conv2D, granularity="neuron")
    return model, ks.sparse_layers(model), (64, 64, 3)


def resnet():
    import keras

    import keras_sparse as ks

    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    pruned = []
    for stage, width in enumerate((32, 64, 128)):
        for block in range(2):
            stride = 2 if stage and not block else 1
            conv = ks.SparseConv2D(
                width, 3, strides=stride, padding="same", use_bias=False, granularity="neuron"
            )
            pruned.append(conv)
            y = keras.layers.ReLU()(keras.layers.BatchNormalization()(conv(h)))
            y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(y)
            y = keras.layers.BatchNormalization()(y)
            if stride != 1 or h.shape[-1] != width:
                h = keras.layers.Conv2D(width, 1, strides=stride, use_bias=False)(h)
                h = keras.layers.BatchNormalization()(h)
            h = keras.layers.ReLU()(keras.layers.Add()([h, y]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h)), pruned, (32, 32, 3)


def vit(tokens=64, width=256, heads=8, hidden=1024, blocks=4):
    import keras

    import keras_sparse as ks

    inputs = keras.Input((tokens, width))
    h, pruned = inputs, []
    for _ in range(blocks):
        attention = ks.SparseMultiHeadAttention(heads, width // heads, granularity="head")
        h = keras.layers.LayerNormalization()(h + attention(h, h))
        ffn = ks.SparseLinear(hidden, activation="gelu", granularity="neuron")
        f = keras.layers.Dense(width)(ffn(h))
        h = keras.layers.LayerNormalization()(h + f)
        pruned += [attention, ffn]
    return keras.Model(inputs, h), pruned, (tokens, width)


def build_pruned(name, kept, hidden, seed=0):
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    model, pruned, input_shape = {
        "mlp": lambda: mlp(hidden),
        "mobilenet": mobilenet,
        "resnet": resnet,
        "vit": vit,
    }[name]()
    rng = np.random.default_rng(seed)
    for layer in pruned:
        if hasattr(layer, "alive_heads"):
            layer = layer._output_dense
        keep_top_units(layer, kept, rng)
    return model, input_shape


def onnx_session(model, path, threads):
    """`f(x) -> numpy output` running `model` exported to ONNX, in ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    model(np.zeros((1, *model.input_shape[1:]), "float32"))  # Keras exports called models only
    model.export(str(path), format="onnx", verbose=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads == 1:
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def compiled(model, runtime, scratch, threads):
    """`f(x) -> numpy output` running `model` as `runtime` serves it."""
    import keras
    import numpy as np

    if runtime == "onnxruntime":
        path = scratch / f"{model.name}_{len(os.listdir(scratch))}.onnx"
        return onnx_session(model, path, threads)
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


def single_thread(backend, core):
    """One CPU core for the process, one thread for the backend's kernels (before it runs
    anything). The affinity is what holds jaxlib to one core."""
    os.sched_setaffinity(0, {core})
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
    """(mean seconds per call, cpu/wall) over as many calls as fit in `budget_s` (>= 3)."""
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        fn(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 3 and elapsed >= budget_s:
            return elapsed / calls, (time.process_time() - cpu_start) / elapsed


def run_backend(args):
    import tempfile

    import numpy as np

    import keras_sparse as ks

    scratch = Path(tempfile.mkdtemp(prefix="shrink_latency_"))
    serve = lambda model: compiled(model, args.backend, scratch, args.threads)  # noqa: E731

    kept_fractions = [float(k) for k in args.kept.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    variants, params, inputs = {}, {}, {}
    for name in args.model.split(","):
        for kept in kept_fractions:
            pruned, input_shape = build_pruned(name, kept, args.hidden)
            result = ks.shrink(pruned)
            dense = ks.strip(pruned)
            for b in batches:
                inputs.setdefault((name, b), rng.random((b, *input_shape), dtype="float32"))
            variants[(name, kept, "dense")] = serve(dense)
            variants[(name, kept, "shrunk")] = serve(result.model)
            x = inputs[(name, batches[-1])]
            gap = np.max(
                np.abs(variants[(name, kept, "dense")](x) - variants[(name, kept, "shrunk")](x))
            )
            assert gap < 1e-3, f"{name}: the shrunk model differs from the dense one by {gap}"
            params[(name, kept)] = (result.params_before, result.params_after)
            print(f"{name} kept {kept}:", result.params_before, "->", result.params_after, "params")
    for (name, _, _), fn in variants.items():  # compile and warm up
        for b in batches:
            fn(inputs[(name, b)])
            fn(inputs[(name, b)])
    times = {(key, b): [] for key in variants for b in batches}
    loads = []
    for _ in range(args.repeats):
        for b in batches:
            for key, fn in variants.items():
                seconds, load = per_call_seconds(fn, inputs[(key[0], b)], args.budget_ms / 1000)
                times[(key, b)].append(seconds)
                loads.append(load)
    rows = []
    for name, kept in params:
        for b in batches:
            dense_s = statistics.median(times[((name, kept, "dense"), b)])
            shrunk_s = statistics.median(times[((name, kept, "shrunk"), b)])
            rows.append(
                {
                    "backend": args.backend,
                    "model": name,
                    "kept": kept,
                    "batch": b,
                    "dense_ms": 1e3 * dense_s,
                    "shrunk_ms": 1e3 * shrunk_s,
                    "ratio": shrunk_s / dense_s,
                    "goal": kept + 0.1,
                    "params_dense": params[(name, kept)][0],
                    "params_shrunk": params[(name, kept)][1],
                    "cpu_per_wall": statistics.median(loads),
                }
            )
    return rows


def markdown(rows):
    lines = [
        "| backend | model | units kept | params (shrunk / dense) | batch | dense ms | shrunk ms "
        "| shrunk / dense | goal at the largest batch | cpu/wall |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|:--|--:|",
    ]
    largest = max(r["batch"] for r in rows)
    for r in rows:
        goal = ""
        if r["batch"] == largest:
            goal = f"<= {r['goal']:.2f}: {'met' if r['ratio'] <= r['goal'] else 'missed'}"
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['kept']:.0%} "
            f"| {r['params_shrunk'] / r['params_dense']:.3f} "
            f"| {r['batch']} | {r['dense_ms']:.3f} | {r['shrunk_ms']:.3f} | {r['ratio']:.3f} "
            f"| {goal} | {r['cpu_per_wall']:.2f} |"
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
        # ONNX Runtime serves models exported on --export-backend.
        backend = args.export_backend if args.backend == "onnxruntime" else args.backend
        os.environ["KERAS_BACKEND"] = backend
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if args.threads == 1:
            single_thread(backend, args.core)
        rows = run_backend(args)
        print(markdown(rows), flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "backend")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    if args.backend == "all":
        print(f"wrote {out}")  # each backend printed its table


if __name__ == "__main__":
    main()

"""Speed and memory of `SparseLinear` against the `keras.layers.Dense` it replaces.

Every number is a ratio `layer / Dense` measured side by side in one process:
the layers (same shapes, same kernel) are timed in interleaved rounds (Dense,
floor, structured, unstructured, then the reverse order, ...), the ratio of
each round is kept and the table shows the median over rounds. Absolute times
are shown for Dense only, as a scale. `floor` is `x @ (kernel * mask) + bias`
with a constant mask: one elementwise op on the kernel, the least that any
kernel-sized mask costs on the machine.

Measured, for each backend, layer size (`in = out = size`) and batch size:

* training step: forward in training mode (mask, `sparsity_penalty` loss),
  backward, SGD update of every trainable weight; compiled where the backend
  compiles (JAX `jit`, TensorFlow `tf.function(jit_compile=True)`), and on
  PyTorch both eager and `torch.compile` (what Keras's `jit_compile=True`
  uses; at the largest batch only, it is slow to compile);
* inference (`training=False`): before pruning (hard mask) and after
  `hard_prune()` of a layer never trained in the process (plain matmul);
* peak memory of a training step: the layer's weights and the batch, which
  stay in memory, plus the peak the step allocates on top of them, measured
  with JAX: XLA's buffer assignment of the compiled step (temporaries and
  outputs not aliased to the donated weights); TensorFlow: the peak of TF's
  allocator during a step minus what was allocated before it; PyTorch: the
  peak of the tensor allocations that `torch.profiler` (`profile_memory=True`)
  records during an eager step, or `torch.cuda.max_memory_allocated` on a GPU.

Usage:

    python benchmarks/speed.py --backend all --quick --threads 1
    python benchmarks/speed.py --backend jax,torch --sizes 1024 --batches 1,256

Each backend runs in its own process (`KERAS_BACKEND` is fixed at import);
with several backends, one subprocess per backend, and their JSON is merged.
The results go to `benchmarks/results/speed.json` and the Markdown table to
stdout and `benchmarks/results/speed.md`. On a machine shared with other work,
`--threads 1` gives stable ratios (a multi-threaded op waits for its slowest
thread at every barrier): it pins each backend's process to one core
(`--core`; affinity, as jaxlib ignores its thread flags) and the table gives
each process's cpu/wall, near 1.0 when the pin held and the core was free.
`--quick` takes a few minutes: sizes 256 and 1024, batches 1 and 256, 7 rounds.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BACKENDS = ("tensorflow", "jax", "torch")
MODES = ("structured", "unstructured")
LR = 1e-3
# The speed goals (CPU, batch 256, size 1024, compiled).
GOALS = {
    "train": {"structured": 1.10, "unstructured": 1.20},
    "infer_after": 1.03,
    "memory": 1.5,
}


# ---------------------------------------------------------------- timing


def imported_from(package):
    """Where `package` was imported from: this checkout, or an installed copy (with its version).

    Not the path itself: it lies outside the repository and differs between machines.
    """
    folder = os.path.dirname(os.path.abspath(package.__file__))
    if os.path.commonpath([folder, ROOT]) == ROOT:
        return os.path.relpath(folder, ROOT)
    return f"installed, {getattr(package, '__version__', 'unknown version')}"


def interleaved(runs, rounds, target_s):
    """Median time per call of each `runs[name]()` and median ratios to `runs["dense"]`.

    The number of calls per sample is calibrated so that one Dense sample
    takes about `target_s`; every round times each candidate once, in an
    order that alternates between rounds, and keeps `candidate / dense`.
    """
    names = list(runs)
    for run in runs.values():  # warm-up (compilation, caches)
        run()
        run()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < target_s / 4 or calls < 2:
        runs["dense"]()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    number = max(1, int(target_s / max(per_call, 1e-7)))
    samples = {name: [] for name in names}
    ratios = {name: [] for name in names if name != "dense"}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        times = {}
        for name in order:
            run = runs[name]
            t0 = time.perf_counter()
            for _ in range(number):
                run()
            times[name] = (time.perf_counter() - t0) / number
            samples[name].append(times[name])
        for name in ratios:
            ratios[name].append(times[name] / times["dense"])
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    # The spread of the per-round ratios says how far one median can be
    # trusted on a noisy machine: it goes into the JSON and the goals' lines.
    medians.update({f"{name}_range": [min(r), max(r)] for name, r in ratios.items()})
    return {name: statistics.median(s) for name, s in samples.items()}, medians


# ------------------------------------------------------------ the layers


def floor_layer(size):
    """The cheapest masked layer there is, `x @ (kernel * mask) + bias` with a constant
    mask: one elementwise op on the kernel, forward and backward. Timed as a reference
    for what any kernel-sized mask costs on the machine."""
    import keras
    from keras import ops

    class MaskedDense(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], size), name="kernel")
            self.bias = self.add_weight(shape=(size,), initializer="zeros", name="bias")
            self.mask = self.add_weight(
                shape=(input_shape[-1], size), initializer="ones", trainable=False, name="mask"
            )

        def call(self, inputs, training=None):
            return ops.matmul(inputs, self.kernel * self.mask) + self.bias

    return MaskedDense()


def formula_layer(size, threshold):
    """The seed's formula and nothing else, `x @ (kernel * sigmoid((|kernel| - t) * T)) + b`
    with one trainable threshold per neuron: no `prune_mask`, no penalty, no hard mask.
    Timed (training only) as what the formula itself costs on the machine."""
    import keras
    from keras import ops

    class SeedFormula(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], size), name="kernel")
            self.bias = self.add_weight(shape=(size,), initializer="zeros", name="bias")
            self.threshold = self.add_weight(
                shape=(size,), initializer=keras.initializers.Constant(threshold), name="t"
            )
            self.temperature = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(10.0 * size**0.5),
                trainable=False,
                name="temperature",
            )

        def call(self, inputs, training=None):
            mask = ops.sigmoid((ops.abs(self.kernel) - self.threshold) * self.temperature)
            return ops.matmul(inputs, self.kernel * mask) + self.bias

    return SeedFormula()


def make_layers(size, seed=0, floor=True, formula=False, sparse_linear=None):
    """Dense, the floor (and the bare formula), and the two SparseLinear modes, all
    with the same kernel. `sparse_linear`: the class to use (another version's, say)."""
    import keras
    import numpy as np

    if sparse_linear is None:
        from keras_sparse import SparseLinear as sparse_linear

    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 1.0 / np.sqrt(size), size=(size, size)).astype("float32")
    dense = keras.layers.Dense(size)
    dense.build((None, size))
    dense.kernel.assign(kernel)
    layers = {"dense": dense}
    if floor:
        layers["floor"] = floor_layer(size)
        layers["floor"].build((None, size))
        layers["floor"].kernel.assign(kernel)
    if formula:
        layers["formula"] = formula_layer(size, np.median(np.abs(kernel), axis=0))
        layers["formula"].build((None, size))
        layers["formula"].kernel.assign(kernel)
    for mode in MODES:
        layer = sparse_linear(size, structured=mode == "structured")
        layer.build((None, size))
        layer.kernel.assign(kernel)
        # Thresholds at the median |w|: half the weights are below them, so
        # the masks (and later hard_prune) do real work.
        if mode == "structured":
            layer.reset_threshold(np.median(np.abs(kernel), axis=0))
        else:
            layer.reset_threshold(float(np.median(np.abs(kernel))))
        layers[mode] = layer
    return layers


def data(size, batch, seed=1):
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(seed + batch)
    x = rng.normal(size=(batch, size)).astype("float32")
    y = rng.normal(size=(batch, size)).astype("float32")
    return ops.convert_to_tensor(x), ops.convert_to_tensor(y)


# ------------------------------------------------------- backend adapters


class JaxAdapter:
    name = "jax"

    def __init__(self):
        import jax

        self.jax = jax
        self.device = jax.devices()[0].platform
        self.memory_method = "XLA buffer assignment of the jitted step (temps + outputs)"

    def versions(self):
        import jax
        import jaxlib

        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}

    def _step(self, layer):
        jax = self.jax
        import jax.numpy as jnp

        def loss_fn(trainable, non_trainable, x, y):
            out, _, losses = layer.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            loss = jnp.mean(jnp.square(out - y))
            for extra in losses:
                loss = loss + extra
            return loss

        def step(trainable, non_trainable, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(trainable, non_trainable, x, y)
            return [v - LR * g for v, g in zip(trainable, grads)], loss

        # Donated like the Keras JAX trainer does: the update is in place.
        return jax.jit(step, donate_argnums=0)

    def _state(self, layer):
        import jax.numpy as jnp

        trainable = [jnp.array(v.value, copy=True) for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        return trainable, non_trainable

    def train(self, layer, x, y):
        step = self._step(layer)
        trainable, non_trainable = self._state(layer)
        state = [trainable]

        def run():
            state[0], loss = step(state[0], non_trainable, x, y)
            loss.block_until_ready()

        return {"jit": run}

    def train_memory(self, layer, x, y, run):
        del run  # measured on the compiled step's buffer assignment instead
        trainable, non_trainable = self._state(layer)
        compiled = self._step(layer).lower(trainable, non_trainable, x, y).compile()
        stats = compiled.memory_analysis()
        if stats is None:
            return None
        return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes

    def infer(self, layer, x):
        jax = self.jax
        _, non_trainable = self._state(layer)
        trainable = [v.value for v in layer.trainable_variables]

        @jax.jit
        def predict(trainable, non_trainable, x):
            return layer.stateless_call(trainable, non_trainable, x, training=False)[0]

        def run():
            predict(trainable, non_trainable, x).block_until_ready()

        return {"jit": run}


class TensorFlowAdapter:
    name = "tensorflow"

    def __init__(self):
        import tensorflow as tf

        self.tf = tf
        gpus = tf.config.list_physical_devices("GPU")
        self.device = "gpu" if gpus else "cpu"
        self._mem_device = "GPU:0" if gpus else "CPU:0"
        self.memory_method = f"TF allocator peak during a step ({self._mem_device})"

    def versions(self):
        return {"tensorflow": self.tf.__version__}

    def _step(self, layer):
        """The compiled training step of `layer` (also read by hlo_passes.py)."""
        tf = self.tf
        variables = layer.trainable_variables

        @tf.function(jit_compile=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                out = layer(x, training=True)
                loss = tf.reduce_mean(tf.square(out - y))
                for extra in layer.losses:
                    loss = loss + extra
            grads = tape.gradient(loss, [v.value for v in variables])
            for v, g in zip(variables, grads):
                v.assign_sub(LR * g)
            return loss

        return step

    def train(self, layer, x, y):
        step = self._step(layer)

        def run():
            step(x, y).numpy()

        return {"jit": run}

    def train_memory(self, layer, x, y, run):
        tf = self.tf
        run()
        try:
            tf.config.experimental.reset_memory_stats(self._mem_device)
            before = tf.config.experimental.get_memory_info(self._mem_device)["current"]
            run()
            peak = tf.config.experimental.get_memory_info(self._mem_device)["peak"]
        except (ValueError, RuntimeError):
            return None
        return peak - before

    def infer(self, layer, x):
        tf = self.tf

        @tf.function(jit_compile=True)
        def predict(x):
            return layer(x, training=False)

        def run():
            predict(x).numpy()

        return {"jit": run}


class TorchAdapter:
    name = "torch"

    def __init__(self, compile_sizes, compile_train_batches):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.compile_sizes = compile_sizes
        self.compile_train_batches = compile_train_batches
        # One compiled function per layer object: more than dynamo's default
        # of 8 recompilations per code object.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        if self.device == "cuda":
            self.memory_method = "torch.cuda.max_memory_allocated during a step"
        else:
            self.memory_method = "peak of torch.profiler memory events during a step"

    def versions(self):
        return {"torch": self.torch.__version__}

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _compiles(self, layer):
        return int(layer.kernel.shape[0]) in self.compile_sizes

    def train(self, layer, x, y):
        torch = self.torch
        params = [v.value for v in layer.trainable_variables]

        def loss_fn(x, y):
            out = layer(x, training=True)
            loss = torch.mean(torch.square(out - y))
            for extra in layer.losses:
                loss = loss + extra
            return loss

        def runner(fn):
            def run():
                # Keras keeps the last step's `add_loss` tensors in the layer
                # until the next call; under torch.compile the guard on that
                # tensor fails at every step and forces a recompilation (as in
                # Keras's own `jit_compile=True` train step, see the notes).
                # Dropping them here measures the compiled step itself.
                layer._losses.clear()
                fn(x, y).backward()
                with torch.no_grad():
                    for p in params:
                        p.sub_(p.grad, alpha=LR)
                        p.grad = None
                self._sync()

            return run

        runs = {"eager": runner(loss_fn)}
        if self._compiles(layer) and int(x.shape[0]) in self.compile_train_batches:
            runs["compile"] = runner(torch.compile(loss_fn))
        return runs

    def train_memory(self, layer, x, y, run):
        torch = self.torch
        run()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            return torch.cuda.max_memory_allocated() - before
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            if event.device_type() != torch.autograd.DeviceType.CPU:
                continue
            current += event.nbytes()
            peak = max(peak, current)
        return peak

    def infer(self, layer, x):
        torch = self.torch

        def predict(x):
            return layer(x, training=False)

        def runner(fn):
            def run():
                with torch.no_grad():
                    fn(x)
                self._sync()

            return run

        runs = {"eager": runner(predict)}
        if self._compiles(layer):
            runs["compile"] = runner(torch.compile(predict))
        return runs


def adapter_for(backend, args):
    if backend == "jax":
        return JaxAdapter()
    if backend == "tensorflow":
        return TensorFlowAdapter()
    # torch.compile is slow to compile, and a layer that calls add_loss (as
    # SparseLinear does) recompiles on every step under Keras (see the README
    # table notes): training is compiled at the largest batch only.
    return TorchAdapter(args.torch_compile_sizes, compile_train_batches=[max(args.batches)])


# ------------------------------------------------------------ one backend


def limit_threads(threads):
    """Run every backend on `threads` intra-op threads (before it is imported).

    On a machine shared with other work, a multi-threaded op waits for its
    slowest thread at every barrier; one thread gives stable ratios."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()


def apply_threads(backend, threads):
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def run_backend(args):
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.threads == 1:
        # jaxlib ignores its thread flags here: only the affinity holds a
        # process to one core. cpu/wall, recorded below, checks the pin held.
        os.sched_setaffinity(0, {args.core})
    if args.threads:
        limit_threads(args.threads)
        apply_threads(args.backend, args.threads)
    start = time.perf_counter(), time.process_time()
    if importlib.util.find_spec("keras_sparse") is None:
        sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    import keras_sparse

    keras.utils.set_random_seed(0)
    adapter = adapter_for(args.backend, args)
    out = {
        "backend": args.backend,
        "device": adapter.device,
        "versions": {"keras": keras.__version__, **adapter.versions()},
        "keras_sparse": imported_from(keras_sparse),
        "memory_method": adapter.memory_method,
        "train": [],
        "infer": [],
        "memory": [],
    }

    def log(msg):
        print(f"[{args.backend}] {msg}", file=sys.stderr, flush=True)

    for size in args.sizes:
        for batch in args.batches:
            layers = make_layers(size, formula=True)
            x, y = data(size, batch)
            # Training step.
            runs = {name: adapter.train(layer, x, y) for name, layer in layers.items()}
            for variant in runs["dense"]:
                times, ratios = interleaved(
                    {name: r[variant] for name, r in runs.items()}, args.rounds, args.target
                )
                row = {"size": size, "batch": batch, "variant": variant, "dense_s": times["dense"]}
                row.update(ratios)
                out["train"].append(row)
                log(f"train {variant} size={size} batch={batch}: {fmt_row(row)}")
            # Peak memory of a training step: the weights and the batch, which
            # are in memory throughout, plus what the step allocates on top.
            for variant in runs["dense"] if batch in args.memory_batches else ():
                row = {"size": size, "batch": batch, "variant": variant}
                for name, layer in layers.items():
                    extra = adapter.train_memory(layer, x, y, runs[name][variant])
                    static = sum(
                        int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in layer.weights
                    )
                    static += 2 * size * batch * 4  # x and y
                    # Adam keeps two float32 slots per trainable weight: with it,
                    # training holds these too (added, not measured: its update
                    # is elementwise and the compiled steps fuse it).
                    slots = 2 * sum(int(np.prod(w.shape)) * 4 for w in layer.trainable_weights)
                    row[f"{name}_extra_bytes"] = extra
                    row[f"{name}_bytes"] = None if extra is None else static + extra
                    row[f"{name}_adam_bytes"] = None if extra is None else static + extra + slots
                for name in ("floor", "formula", *MODES):
                    for key in ("bytes", "extra_bytes", "adam_bytes"):
                        value, dense = row[f"{name}_{key}"], row[f"dense_{key}"]
                        ok = value is not None and dense
                        label = {"bytes": name, "extra_bytes": f"{name}_extra"}
                        row[label.get(key, f"{name}_adam")] = value / dense if ok else None
                out["memory"].append(row)
                log(f"memory {variant} size={size} batch={batch}: {fmt_row(row)}")
            # Inference, before and after hard_prune() (of layers never
            # trained in this process: see SparseLinear.hard_prune).
            layers = make_layers(size)
            for stage in ("before", "after"):
                if stage == "after":
                    del layers["floor"]
                    for mode in MODES:
                        layers[mode].hard_prune()
                runs = {name: adapter.infer(layer, x) for name, layer in layers.items()}
                for variant in runs["dense"]:
                    times, ratios = interleaved(
                        {name: r[variant] for name, r in runs.items()}, args.rounds, args.target
                    )
                    row = {
                        "size": size,
                        "batch": batch,
                        "variant": variant,
                        "stage": stage,
                        "dense_s": times["dense"],
                    }
                    row.update(ratios)
                    out["infer"].append(row)
                    log(f"infer {stage} {variant} size={size} batch={batch}: {fmt_row(row)}")
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    out["cpu_per_wall"] = cpu / wall
    out["core"] = args.core if args.threads == 1 else None
    return out


def fmt_row(row):
    names = ("floor", "formula", *MODES)
    parts = [f"{name}={row[name]:.3f}x" for name in names if row.get(name) is not None]
    if "dense_s" in row:
        parts.append(f"dense={row['dense_s'] * 1e3:.3f}ms")
    return " ".join(parts)


# ---------------------------------------------------------------- report


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(results):
    meta = results["meta"]
    load = meta.get("load_average")
    lines = [
        f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} "
        f"cores, {meta['machine']['platform']}), Python {meta['machine']['python']}"
        f"{', quick run' if meta['quick'] else ''}"
        + (f", load average {load[0]:.1f} at start" if load else "")
        + f", intra-op threads: {meta.get('threads', 'backend default')}"
        + "".join(
            f"; {b} pinned to core {r['core']}, cpu/wall {r['cpu_per_wall']:.2f}"
            for b, r in results["backends"].items()
            if r.get("core") is not None
        )
        + f"; {meta['rounds']} interleaved rounds, median of the per-round ratios "
        "`layer / Dense` (1.00x = as fast as Dense). Devices: "
        + ", ".join(f"{b}: {r['device']}" for b, r in results["backends"].items())
        + ". `floor` is `x @ (kernel * mask) + bias` with a constant mask: the cost of one "
        "elementwise op on the kernel, the least any kernel-sized mask can cost here. "
        "`seed formula` is the seed's formula alone, "
        "`x @ (kernel * sigmoid((|kernel| - t) * T)) + bias` with a per-neuron `t`, without "
        "`prune_mask`, penalty or hard mask: what the formula itself costs here.",
        "",
        "**Training step** (forward in training mode with the `sparsity_penalty` loss, "
        "backward, SGD update):",
        "",
        "| backend | mode | size | batch | Dense | floor | seed formula | structured | "
        "unstructured |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, res in results["backends"].items():
        for row in res["train"]:
            lines.append(
                f"| {backend} | {row['variant']} | {row['size']} | {row['batch']} | "
                f"{row['dense_s'] * 1e3:.3f} ms | {ratio(row.get('floor'))} | "
                f"{ratio(row.get('formula'))} | "
                f"{ratio(row['structured'])} | {ratio(row['unstructured'])} |"
            )
    lines += [
        "",
        "**Inference** (`training=False`): before pruning (hard mask) and after "
        "`hard_prune()` (plain matmul):",
        "",
        "| backend | mode | size | batch | Dense | floor | structured before | "
        "structured after | unstructured before | unstructured after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, res in results["backends"].items():
        rows = {}
        for row in res["infer"]:
            rows.setdefault((row["variant"], row["size"], row["batch"]), {})[row["stage"]] = row
        for (variant, size, batch), stages in rows.items():
            before, after = stages.get("before", {}), stages.get("after", {})
            dense_s = before.get("dense_s", after.get("dense_s"))
            lines.append(
                f"| {backend} | {variant} | {size} | {batch} | {dense_s * 1e3:.3f} ms | "
                f"{ratio(before.get('floor'))} | "
                f"{ratio(before.get('structured'))} | {ratio(after.get('structured'))} | "
                f"{ratio(before.get('unstructured'))} | {ratio(after.get('unstructured'))} |"
            )
    lines += [
        "",
        "**Peak memory of a training step**: the layer's weights and the batch (x, y), which "
        "stay in memory, plus the peak of what the SGD step allocates (in brackets: that extra "
        "alone, against Dense's extra). The Adam columns add Adam's two slots per trainable "
        "weight to both sides, as training with Adam holds them (computed, not measured):",
        "",
        "| backend | mode | size | batch | Dense | floor | seed formula | structured | "
        "unstructured | Dense, Adam | structured, Adam | unstructured, Adam | "
        "step extra measured with |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for backend, res in results["backends"].items():
        for row in res["memory"]:
            dense = row["dense_bytes"]
            dense_mb = "n/a" if dense is None else f"{dense / 2**20:.1f} MiB"
            cells = [
                f"{ratio(row.get(name))} ({ratio(row.get(name + '_extra'))})"
                for name in ("floor", "formula", *MODES)
            ]
            adam = row.get("dense_adam_bytes")
            cells.append("n/a" if adam is None else f"{adam / 2**20:.1f} MiB")
            cells += [ratio(row.get(f"{name}_adam")) for name in MODES]
            lines.append(
                f"| {backend} | {row.get('variant', 'n/a')} | {row['size']} | {row['batch']} | "
                f"{dense_mb} | " + " | ".join(cells) + f" | {res['memory_method']} |"
            )
    lines += [
        "",
        "**Speed goals** (size 1024, batch 256, compiled: `jit`, or `torch.compile` on "
        "PyTorch; inference after `hard_prune()`: every batch size):",
        "",
    ]
    lines += goal_lines(results)
    return "\n".join(lines) + "\n"


def goal_lines(results):
    lines = []
    compiled = {"jax": "jit", "tensorflow": "jit", "torch": "compile"}
    for backend, res in results["backends"].items():
        checks = []
        for row in res["train"]:
            if (row["size"], row["batch"], row["variant"]) == (1024, 256, compiled[backend]):
                for mode in MODES:
                    spread = row.get(f"{mode}_range")
                    checks.append((f"train {mode}", row[mode], GOALS["train"][mode], spread))
        for row in res["infer"]:
            if (row["size"], row["stage"], row["variant"]) == (1024, "after", compiled[backend]):
                for mode in MODES:
                    name = (
                        f"inference after hard_prune {row['variant']} {mode} batch {row['batch']}"
                    )
                    spread = row.get(f"{mode}_range")
                    checks.append((name, row[mode], GOALS["infer_after"], spread))
        for row in res["memory"]:
            variant = row.get("variant", compiled[backend])
            if (row["size"], row["batch"], variant) == (1024, 256, compiled[backend]):
                for mode in MODES:
                    checks.append((f"memory {mode}", row[mode], GOALS["memory"], None))
        if not checks:
            continue
        met = [c for c in checks if c[1] is not None and c[1] <= c[2]]
        missed = [c for c in checks if c not in met]
        text = f"- {backend}: {len(met)}/{len(checks)} met"
        if missed:
            text += "; missed: " + ", ".join(_check_text(c, ">") for c in missed)
        if met:
            text += "; met: " + ", ".join(_check_text(c, "<=") for c in met)
        lines.append(text)
    return lines


def _check_text(check, relation):
    name, value, goal, spread = check
    rounds = f" (rounds {spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
    return f"{name} {ratio(value)}{rounds} {relation} {goal:.2f}x"


# -------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", default="all", help="tensorflow, jax, torch, a comma-separated list, or all"
    )
    parser.add_argument("--quick", action="store_true", help="sizes 256,1024; batches 1,256")
    parser.add_argument("--sizes", type=_ints, default=None)
    parser.add_argument("--batches", type=_ints, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument(
        "--target", type=float, default=None, help="seconds per timing sample (Dense)"
    )
    parser.add_argument(
        "--torch-compile-sizes",
        type=_ints,
        default=None,
        help="sizes also timed under torch.compile (slow to compile); default: 1024",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads per backend (default: the backend's own choice)",
    )
    parser.add_argument(
        "--core", type=int, default=1, help="the core that --threads 1 pins each backend to"
    )
    parser.add_argument("--json", default=os.path.join(RESULTS, "speed.json"))
    parser.add_argument("--markdown", default=os.path.join(RESULTS, "speed.md"))
    parser.add_argument(
        "--render", action="store_true", help="only re-render the Markdown from --json"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = BACKENDS if args.backend == "all" else tuple(args.backend.split(","))
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        parser.error(f"--backend: unknown backend(s) {unknown}; choose from {BACKENDS} or all")
    args.backends = names
    if args.worker and len(names) != 1:
        parser.error("--worker runs one backend")
    if args.sizes is None:
        args.sizes = [256, 1024] if args.quick else [256, 1024, 4096]
    if args.batches is None:
        args.batches = [1, 256] if args.quick else [1, 32, 256]
    if args.rounds is None:
        args.rounds = 7 if args.quick else 15
    if args.target is None:
        args.target = 0.02 if args.quick else 0.05
    if args.torch_compile_sizes is None:
        args.torch_compile_sizes = [1024]
    # Memory does not depend on noise: one batch size is enough in a quick run.
    args.memory_batches = [max(args.batches)] if args.quick else args.batches
    return args


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.json) as f:
            table = markdown(json.load(f))
        print(table)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        return
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "quick": args.quick,
        "rounds": args.rounds,
        "sizes": args.sizes,
        "batches": args.batches,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": args.threads or "backend default",
    }
    if args.worker:
        result = run_backend(args)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        return
    results = {"meta": meta, "backends": {}}
    passthrough = _passthrough(argv if argv is not None else sys.argv[1:])
    for backend in args.backends:
        with tempfile.NamedTemporaryFile("r", suffix=".json") as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough]
            cmd += ["--backend", backend, "--worker", "--json", tmp.name]
            env = {**os.environ, "KERAS_BACKEND": backend}
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                print(f"[{backend}] failed with exit code {proc.returncode}", file=sys.stderr)
                continue
            results["backends"][backend] = json.load(tmp)
    table = markdown(results)
    print(table)
    for path, text in ((args.json, json.dumps(results, indent=1)), (args.markdown, table)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + ("" if text.endswith("\n") else "\n"))


def _passthrough(argv):
    """The command line without --backend/--json/--markdown (set per worker)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--backend", "--json", "--markdown"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    main()

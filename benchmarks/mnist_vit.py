"""A small vision transformer on MNIST-10k: keras-sparse's learned masks against the dense baseline.

The model: each 28x28 image cut into 16 patches of 7x7 (a reshape), a Dense patch
embedding of width 64 plus a learned position embedding, 2 encoder blocks (pre-norm:
LayerNormalization -> `keras.layers.MultiHeadAttention` with 4 heads of key_dim 16 ->
residual add; LayerNormalization -> Dense 128 gelu -> Dense 64 -> residual add), a final
LayerNormalization, a mean over the patches and Dense 10. All of it stock Keras; `sparse`
builds that stock model and converts it with `keras_sparse.sparsify(model)`: every kernel,
the attention's query/key/value/output `EinsumDense` projections included, and drives it
with `SparsityScheduler(PolynomialDecay(target, begin_step=0, end_step=3/4 of the
steps))` (global scope: the target is over all the kernels together). The recipe is that
of benchmarks/mnist_lenet5.py: the project's fixed 8,000/2,000 split, Adam 1e-3, batch
128, the same epochs for every method (default 8 here: a shared 2-core CPU budget).
Accuracy is the final one, measured on `keras_sparse.strip(model)`; sparsity is counted
on the stripped model's kernels (the position embedding, biases and normalisation
weights are not kernels and are left out of both numerator and denominator).

    python benchmarks/mnist_vit.py --backend jax --mnist DIR

`--methods structure` prunes whole heads (`sparsify(..., granularity="head")`) and whole
feed-forward neurons of each block's first Dense (`granularity="neuron"`), the target being
the fraction of each layer's heads or neurons removed (`scope="per_layer"`), then hands over
`keras_sparse.shrink(model)`: attention with fewer heads, narrower feed-forward layers. Its
peer on the same architecture is benchmarks/mnist_vit_torch_pruning.py.

`--mnist` defaults to $KERAS_SPARSE_MNIST_DIR. Its peers, on the same model, data and
budget, are benchmarks/mnist_vit_tfmot.py (TFMOT) and benchmarks/mnist_vit_pquant.py
(PQuantML). Writes results/vit_mnist_<backend>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from _ablation import (
    add_ablation_arguments,
    add_batch_order_argument,
    held_out,
    recorded_config,
    resolve_end_fraction,
    temperature_schedule,
    training_inputs,
)

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("tensorflow", "jax", "torch")

PATCHES = 16
PATCH_PIXELS = 7 * 7
WIDTH = 64
HEADS = 4
KEY_DIM = 16
MLP = 128
BLOCKS = 2

# Kernel weights: patch embedding; per block the four attention projections and the two
# feed-forward Dense layers; the classifier. Sparsity is counted against them.
VIT_WEIGHTS = (
    PATCH_PIXELS * WIDTH
    + BLOCKS * (4 * WIDTH * HEADS * KEY_DIM + WIDTH * MLP + MLP * WIDTH)
    + WIDTH * 10
)


def _lenet5_module():
    # Loaded by path so the peers' environments (tf-keras, no Keras 3) can share the helpers.
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("mnist_lenet5", here / "mnist_lenet5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lenet5 = _lenet5_module()
median_rows = _lenet5.median_rows


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax", choices=BACKENDS)
    parser.add_argument(
        "--mnist",
        "--data",
        dest="mnist",
        metavar="DIR",
        default=os.environ.get("KERAS_SPARSE_MNIST_DIR"),
        help="folder with the MNIST IDX files (default: $KERAS_SPARSE_MNIST_DIR)",
    )
    parser.add_argument("--methods", default="dense,sparse")
    parser.add_argument("--targets", default="0.5,0.75,0.9")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--out", default=None, help="JSON output (default results/vit_mnist_<backend>.json)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the runs already in the output file (more seeds, a wider sweep)",
    )
    add_batch_order_argument(parser)
    return parser


def earlier_runs(args, out):
    """With --append, the runs already in `out` and the configs that wrote them."""
    if not (args.append and out.exists()):
        return [], []
    previous = json.loads(out.read_text())
    return previous["runs"], previous.get("earlier_configs", []) + [previous["config"]]


def parse_args(argv=None, parser=None):
    parser = parser or add_ablation_arguments(build_parser())
    args = parser.parse_args(argv)
    if not args.mnist:
        parser.error("no MNIST folder: pass --mnist DIR or set $KERAS_SPARSE_MNIST_DIR")
    if not Path(args.mnist).is_dir():
        parser.error(f"--mnist {args.mnist!r} is not a folder")
    return args


def load_data(load_mnist, directory):
    """The fixed 8,000/2,000 split as (N, 16, 49): 16 patches of 7x7 pixels, row-major."""
    (x_train, y_train), (x_test, y_test) = load_mnist(directory)

    def patches(x):
        x = x.reshape(-1, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4)
        return x.reshape(-1, PATCHES, PATCH_PIXELS)

    return (patches(x_train), y_train), (patches(x_test), y_test)


_POSITION_LAYERS = {}


def position_layer(keras):
    """The learned position embedding, as a layer class of the given Keras (3 or tf-keras)."""
    if keras.__name__ in _POSITION_LAYERS:
        return _POSITION_LAYERS[keras.__name__]

    # Registered so that a model holding it copies and saves through its config.
    @keras.utils.register_keras_serializable(package="keras_sparse_benchmarks")
    class AddPositionEmbedding(keras.layers.Layer):
        def build(self, input_shape):
            self.position = self.add_weight(
                name="position",
                shape=(input_shape[-2], input_shape[-1]),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
            )
            super().build(input_shape)

        def call(self, x):
            return x + self.position

    _POSITION_LAYERS[keras.__name__] = AddPositionEmbedding
    return AddPositionEmbedding


def vit(keras):
    """The stock small vision transformer in the given Keras (Keras 3 or tf-keras)."""
    inputs = keras.Input((PATCHES, PATCH_PIXELS))
    x = keras.layers.Dense(WIDTH, name="patch_embed")(inputs)
    x = position_layer(keras)(name="position")(x)
    for i in range(BLOCKS):
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        y = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name=f"block{i}_attention")(y, y)
        x = keras.layers.Add(name=f"block{i}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        y = keras.layers.Dense(MLP, activation="gelu", name=f"block{i}_mlp1")(y)
        y = keras.layers.Dense(WIDTH, name=f"block{i}_mlp2")(y)
        x = keras.layers.Add(name=f"block{i}_add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(10, name="out")(x)
    return keras.Model(inputs, outputs, name="vit")


def kernels_of(model):
    """Every kernel of a stock model (Dense and the attention's EinsumDense), by name."""
    import numpy as np

    found = {}
    for weight in model.weights:
        # Keras 3 names a weight by its path; tf-keras by a name with a ":0" suffix.
        name = getattr(weight, "path", None) or weight.name.split(":")[0]
        if name.split("/")[-1] == "kernel":
            found[name] = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
    return found


def count_sparsity(kernels):
    """(sparsity over all kernels, density per kernel) of a dict name -> NumPy kernel."""
    import numpy as np

    total = sum(k.size for k in kernels.values())
    assert total == VIT_WEIGHTS, (total, VIT_WEIGHTS)
    nonzero = sum(int(np.count_nonzero(k)) for k in kernels.values())
    density = {name: round(float(np.count_nonzero(k) / k.size), 4) for name, k in kernels.items()}
    return 1.0 - nonzero / total, density


def compile_model(model, keras):
    _lenet5.compile_model(model, keras)


def run_one(method, target, seed, args, data):
    import keras
    import numpy as np

    import keras_sparse as ks

    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    fit = dict(epochs=args.epochs, verbose=0)
    fit.update(training_inputs(x_train, y_train, args.batch_size, args.batch_order, seed))
    start = time.perf_counter()
    extra = {}
    if method == "dense":
        model = vit(keras)
        compile_model(model, keras)
        model.fit(**fit)
        final = model
    elif method == "sparse":
        model = ks.sparsify(vit(keras))
        report = ks.sparsity_report(model)
        extra["coverage"] = report.coverage
        extra["left_dense"] = [str(getattr(d, "name", d)) for d in report.dense]
        compile_model(model, keras)
        end = int(args.end_fraction * steps)
        schedule = ks.PolynomialDecay(target, begin_step=0, end_step=end)
        driver = ks.SparsityScheduler(schedule, temperature=temperature_schedule(args, end))
        model.fit(callbacks=[driver], **fit)
        extra["evaluated_accuracy"] = float(model.evaluate(x_test, y_test, verbose=0)[1])
        final = ks.strip(model)
        compile_model(final, keras)
    elif method == "structure":
        # Whole heads of each attention and whole neurons of each block's first
        # feed-forward layer, `target` of each layer; `shrink` then removes them.
        model = ks.sparsify(vit(keras), select=keras.layers.MultiHeadAttention, granularity="head")
        model = ks.sparsify(model, select=r"^block\d+_mlp1$", granularity="neuron", inplace=True)
        compile_model(model, keras)
        schedule = ks.PolynomialDecay(target, begin_step=0, end_step=int(0.75 * steps))
        driver = ks.SparsityScheduler(schedule, scope="per_layer")
        model.fit(callbacks=[driver], **fit)
        extra["evaluated_accuracy"] = float(model.evaluate(x_test, y_test, verbose=0)[1])
        final = ks.shrink(model).model
        compile_model(final, keras)
    else:
        raise ValueError(f"unknown method {method!r}")
    wall = time.perf_counter() - start
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    if method == "structure":
        return {
            "method": method,
            "backend": keras.backend.backend(),
            "target": target,
            "seed": seed,
            "accuracy": accuracy,
            "heads": [final.get_layer(f"block{i}_attention").num_heads for i in range(BLOCKS)],
            "ffn_units": [final.get_layer(f"block{i}_mlp1").units for i in range(BLOCKS)],
            "weights_kept": final.count_params() / vit(keras).count_params(),
            "wall_s": wall,
            **extra,
        }
    sparsity, density = count_sparsity(kernels_of(final))
    row = {
        "method": method,
        "backend": keras.backend.backend(),
        "target": target,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": sparsity,
        "layer_density": density,
        "wall_s": wall,
    }
    row.update(extra)
    return row


def write_results(rows, args, out, drop=("out", "backend", "mnist"), summary=None, earlier=()):
    """The runs and their medians per method and target (of `summary`'s runs if given).

    `earlier`: the configs of the invocations whose runs `rows` continues.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    config = recorded_config(args, *drop)
    result = {"config": config, "runs": rows}
    if earlier:
        result["earlier_configs"] = list(earlier)
    if summary is not None:
        result["selected"] = summary
    result["median"] = median_rows(rows if summary is None else summary)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def main(argv=None):
    args = resolve_end_fraction(parse_args(argv))
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras_sparse.datasets import load_mnist

    data = held_out(load_data(load_mnist, args.mnist), args.validation, args.fold)
    targets = [float(t) for t in args.targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else RESULTS / f"vit_mnist_{args.backend}.json"
    rows, earlier = earlier_runs(args, out)
    for method in args.methods.split(","):
        for target in [0.0] if method == "dense" else targets:
            for seed in seeds:
                row = run_one(method, target, seed, args, data)
                rows.append(row)
                kept = (
                    f"heads={row['heads']} ffn={row['ffn_units']}"
                    if method == "structure"
                    else f"sparsity={row['sparsity']:.4f}"
                )
                print(
                    f"[{args.backend}] {method:6s} target={target:.2f} seed={seed} "
                    f"acc={row['accuracy']:.4f} {kept} wall={row['wall_s']:.1f}s",
                    flush=True,
                )
                # Written after every run, so a run cut short keeps what it measured.
                write_results(rows, args, out, ("out", "backend", "mnist", "append"), None, earlier)


if __name__ == "__main__":
    sys.exit(main())

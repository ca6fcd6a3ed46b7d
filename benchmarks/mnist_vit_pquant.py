"""The peer: PQuantML's dst, cs and pdp pruning on the transformer of benchmarks/mnist_vit.py.

Runs in an environment with pquant-ml 0.1.0 and Keras 3 on TensorFlow (the tox env
`pquant` has them):

    python benchmarks/mnist_vit_pquant.py --mnist DIR
    tox -e pquant -- benchmarks/mnist_vit_pquant.py --mnist DIR

Same architecture, data split, epochs, batch size and optimiser as benchmarks/mnist_vit.py,
quantization off. PQuantML's `add_compression_layers` walks `model.layers` as a chain,
feeding each layer the previous one's output, so it cannot convert a model with residual
adds or a two-input `MultiHeadAttention` (see `--try-add-compression-layers`); the model is
therefore built from PQuantML's own layers: `PQDense` for every Dense and
`PQMultiheadAttention` (embed_dim 64, 4 heads: the same query/key/value/output shapes as
Keras's 4 heads of key_dim 16) for the attention. `PQMultiheadAttention` creates its
query, key and value projections with pruning switched off; `--prune-qkv` (the default)
switches it on with their public `set_enable_pruning(True)`, so that all kernels are
pruned, as for keras-sparse and TFMOT. Training is Keras `fit` with PQuantML's
`PQuantCallback` (its own epoch hooks; the penalties enter through `add_loss`):

* `dst` and `cs`: 3/4 of the epochs of pruning, then fine-tuning with the masks frozen
  (one round, no rewind). Their sparsity is set by a penalty coefficient (`alpha` for dst,
  `threshold_decay` for cs), swept with `--dst-alphas` / `--cs-decays`; each target's run is
  the coefficient whose reached sparsity is nearest to it (chosen on sparsity, never on
  accuracy; `selected` in the JSON).
* `pdp`: its exact target, one pretraining epoch (its global magnitude budget is set after
  it), the ramp (`epsilon` = 1 / pruning epochs) to the target, then fine-tuning.
* `dense` (`--methods dense`): the same PQuantML layers, callback and epochs with pruning
  off: the baseline PQuantML's pruned runs start from.

After training, `apply_final_compression` writes the masked kernels; the weights are then
copied into the stock Keras model of benchmarks/mnist_vit.py (PQuantML has no strip to stock
layers), its outputs checked against the PQuantML model's, and accuracy and sparsity are
measured on that stock model. Writes results/vit_mnist_pquant.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _ablation import training_inputs
from _by_path import load_module

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent


bench = load_module("mnist_vit", HERE / "mnist_vit.py")
datasets = load_module("datasets", HERE.parent / "keras_sparse" / "datasets.py")


def parse_args(argv=None):
    parser = bench.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(methods="dst,cs,pdp")
    parser.add_argument("--dst-alphas", default="1e-6,1e-5,1e-4")
    parser.add_argument("--cs-decays", default="1e-9,1e-7,1e-5")
    parser.add_argument(
        "--no-prune-qkv",
        dest="prune_qkv",
        action="store_false",
        help="leave the attention's query/key/value projections dense, as PQuantML ships them",
    )
    parser.add_argument(
        "--try-add-compression-layers",
        action="store_true",
        help="only try PQuantML's add_compression_layers on the stock model and report",
    )
    return bench.parse_args(argv, parser)


def pquant_config(method, epochs, value):
    """PQuantML's default config of `method`, quantization off, on this benchmark's budget."""
    import pquant

    configs = {"dst": pquant.dst_config, "cs": pquant.cs_config, "pdp": pquant.pdp_config}
    # "dense": the same PQuantML layers and training loop with pruning off, the baseline
    # its pruned runs start from.
    config = configs.get(method, pquant.cs_config)().get_dict()
    config["quantization_parameters"]["enable_quantization"] = False
    if method == "dense":
        config["pruning_parameters"]["enable_pruning"] = False
    pruning = round(0.75 * epochs)
    training = config["training_parameters"]
    training.update(rounds=1, rewind="never", save_weights_epoch=-1)
    if method == "pdp":
        # pdp sets its per-layer budget after a pretraining epoch, then ramps to the target.
        training.update(
            pretraining_epochs=1, epochs=pruning - 1, fine_tuning_epochs=epochs - pruning
        )
        config["pruning_parameters"].update(sparsity=value, epsilon=1.0 / (pruning - 1))
    else:
        training.update(pretraining_epochs=0, epochs=pruning, fine_tuning_epochs=epochs - pruning)
    if method in ("dst", "cs"):
        key = "alpha" if method == "dst" else "threshold_decay"
        config["pruning_parameters"][key] = value
    return pquant.PQConfig.load_from_config(config)


def pq_vit(config, prune_qkv):
    """benchmarks/mnist_vit.py's transformer, from PQuantML's layers."""
    import keras
    from pquant.core.keras.layers import PQDense, PQMultiheadAttention

    inputs = keras.Input((bench.PATCHES, bench.PATCH_PIXELS))
    x = PQDense(config, bench.WIDTH, name="patch_embed")(inputs)
    x = bench.position_layer(keras)(name="position")(x)
    for i in range(bench.BLOCKS):
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln1")(x)
        attention = PQMultiheadAttention(
            config, bench.WIDTH, bench.HEADS, name=f"block{i}_attention"
        )
        if prune_qkv:
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                projection.set_enable_pruning(True)
        y = attention(y)[0]
        x = keras.layers.Add(name=f"block{i}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_ln2")(x)
        y = PQDense(config, bench.MLP, name=f"block{i}_mlp1")(y)
        # PQDense has no activation argument.
        y = keras.layers.Activation("gelu", name=f"block{i}_gelu")(y)
        y = PQDense(config, bench.WIDTH, name=f"block{i}_mlp2")(y)
        x = keras.layers.Add(name=f"block{i}_add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = PQDense(config, 10, name="out")(x)
    return keras.Model(inputs, outputs, name="vit_pquant")


def to_stock(pq_model):
    """The stock Keras model of benchmarks/mnist_vit.py holding `pq_model`'s final weights."""
    import keras
    import numpy as np

    stock = bench.vit(keras)
    heads, key_dim, width = bench.HEADS, bench.KEY_DIM, bench.WIDTH

    def dense(layer):
        bias = np.asarray(layer._bias) if layer._bias is not None else None
        return np.asarray(layer._kernel), bias

    for layer in stock.layers:
        if not layer.weights:
            continue
        source = pq_model.get_layer(layer.name)
        if isinstance(layer, keras.layers.MultiHeadAttention):
            for name in ("query", "key", "value"):
                kernel, bias = dense(getattr(source, f"{name[0]}_proj"))
                target = getattr(layer, f"_{name}_dense")
                target.kernel.assign(kernel.reshape(width, heads, key_dim))
                target.bias.assign(bias.reshape(heads, key_dim))
            kernel, bias = dense(source.out_proj)
            layer._output_dense.kernel.assign(kernel.reshape(heads, key_dim, width))
            layer._output_dense.bias.assign(bias)
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = dense(source)
            layer.kernel.assign(kernel)
            layer.bias.assign(bias)
        else:
            layer.set_weights(source.get_weights())
    return stock


def try_add_compression_layers(config):
    """What PQuantML's own model conversion does with the stock transformer."""
    import keras
    import pquant

    try:
        converted = pquant.add_compression_layers(bench.vit(keras), config)
    except Exception as error:  # noqa: BLE001 -- the point is to record whatever it raises
        return f"{type(error).__name__}: {error}"
    return f"converted: {[type(layer).__name__ for layer in converted.layers]}"


def train(model, config, args, data, seed):
    """Compile and fit `model` with PQuantML's callback on the benchmark's budget.

    Returns the training wall time and the test accuracy of the compressed model
    (PQuantCallback applies the final compression at the end of training)."""
    import keras
    from pquant.core.keras.train import PQuantCallback

    (x_train, y_train), (x_test, y_test) = data
    bench.compile_model(model, keras)
    callback = PQuantCallback(config, log_ebops=False, log_keep_ratio=False)
    assert callback.total_epochs == args.epochs
    start = time.perf_counter()
    model.fit(
        epochs=callback.total_epochs,
        verbose=0,
        callbacks=[callback],
        **training_inputs(x_train, y_train, args.batch_size, args.batch_order, seed),
    )
    wall = time.perf_counter() - start
    return wall, float(model.evaluate(x_test, y_test, verbose=0)[1])


def run_one(method, value, seed, args, data):
    import keras
    import numpy as np
    import pquant

    _, (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    config = pquant_config(method, args.epochs, value)
    model = pq_vit(config, args.prune_qkv and method != "dense")
    wall, evaluated = train(model, config, args, data, seed)
    final = to_stock(model)
    probe = x_test[:256]
    gap = np.abs(model.predict(probe, verbose=0) - final.predict(probe, verbose=0))
    gap = float(np.max(gap))
    bench.compile_model(final, keras)
    accuracy = float(final.evaluate(x_test, y_test, verbose=0)[1])
    sparsity, density = bench.count_sparsity(bench.kernels_of(final))
    return {
        "method": f"pquant_{method}",
        "backend": f"pquant-ml {pquant_version()}, keras {keras.__version__} tensorflow",
        "target": None if method in ("dst", "cs") else value,
        "coefficient": value if method in ("dst", "cs") else None,
        "seed": seed,
        "accuracy": accuracy,
        "sparsity": sparsity,
        "layer_density": density,
        "wall_s": wall,
        "evaluated_accuracy": evaluated,
        "max_output_gap_vs_stock": gap,
        "prune_qkv": args.prune_qkv,
        "remaining_weights_pquant": float(pquant.get_layer_keep_ratio(model)),
    }


def pquant_version():
    from importlib.metadata import version

    return version("pquant-ml")


def select(rows, targets):
    """For each target and method of dst/cs, the run whose sparsity is nearest to it."""
    chosen = []
    for method in ("pquant_dst", "pquant_cs"):
        for seed in sorted({r["seed"] for r in rows}):
            runs = [r for r in rows if r["method"] == method and r["seed"] == seed]
            for target in targets if runs else []:
                best = min(runs, key=lambda r: abs(r["sparsity"] - target))
                chosen.append({**best, "target": target})
    return chosen


def main(argv=None):
    args = parse_args(argv)
    if args.try_add_compression_layers:
        print(try_add_compression_layers(pquant_config("dst", args.epochs, 1e-5)))
        return
    data = bench.load_data(datasets.load_mnist, args.mnist)
    targets = [float(t) for t in args.targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    values = {
        "dst": [float(a) for a in args.dst_alphas.split(",")],
        "cs": [float(d) for d in args.cs_decays.split(",")],
        "pdp": targets,
        "dense": [0.0],
    }
    out = Path(args.out) if args.out else bench.RESULTS / "vit_mnist_pquant.json"
    rows, earlier = bench.earlier_runs(args, out)
    for method in args.methods.split(","):
        for value in values[method]:
            for seed in seeds:
                row = run_one(method, value, seed, args, data)
                rows.append(row)
                print(
                    f"[pquant] {method:3s} value={value:g} seed={seed} acc={row['accuracy']:.4f} "
                    f"sparsity={row['sparsity']:.4f} gap={row['max_output_gap_vs_stock']:.2e} "
                    f"wall={row['wall_s']:.1f}s",
                    flush=True,
                )
                chosen = select(rows, targets)
                exact = [r for r in rows if r["method"] in ("pquant_pdp", "pquant_dense")]
                drop = ("out", "backend", "mnist", "append")
                summary = exact + chosen
                bench.write_results(rows, args, out, drop, summary=summary, earlier=earlier)


if __name__ == "__main__":
    main()

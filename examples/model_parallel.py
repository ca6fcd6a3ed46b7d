"""Train a sparse MLP with `keras.distribution.ModelParallel` (JAX), here on virtual CPU devices.

    python examples/model_parallel.py                  # 8 virtual CPU devices, 2x4 mesh
    python examples/model_parallel.py --mesh 1x8 --epochs 10
    python examples/model_parallel.py --devices 0      # the machine's real accelerators

The weights are split over the mesh's "model" axis and each batch over its
"batch" axis; `keras_sparse.get_layout_map` writes the layouts of every
`SparseLinear` weight (kernel, bias, threshold, prune_mask, ...). Needs the
JAX backend (`keras.distribution` shards variables only there) and uses
scikit-learn's bundled digits (no download).
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices",
        type=int,
        default=8,
        help="virtual CPU devices to create (8); 0 uses the real devices as they are",
    )
    parser.add_argument("--mesh", default="2x4", help="BATCHxMODEL mesh shape (2x4)")
    parser.add_argument("--target", type=float, default=0.9, help="target sparsity (0.9)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="PATH", help="save the trained model (a .keras file)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Both must happen before JAX is imported (Keras imports it).
    os.environ["KERAS_BACKEND"] = "jax"
    if args.devices:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        )
    if "jax" in sys.modules and args.devices:
        print("warning: JAX was imported already; --devices may have no effect")

    import keras

    import keras_sparse as ks
    from keras_sparse.datasets import load_digits

    batch, model_ways = (int(n) for n in args.mesh.lower().split("x"))
    devices = keras.distribution.list_devices()
    if len(devices) != batch * model_ways:
        raise SystemExit(
            f"--mesh {args.mesh} needs {batch * model_ways} devices, found {len(devices)}"
        )
    (x_train, y_train), (x_test, y_test) = load_digits()
    # Every batch, the last one included, must split evenly over the batch
    # axis (JAX refuses uneven shards): keep whole batches only.
    whole = len(x_train) // args.batch_size * args.batch_size
    x_train, y_train = x_train[:whole], y_train[:whole]
    whole = len(x_test) // args.batch_size * args.batch_size
    x_test, y_test = x_test[:whole], y_test[:whole]
    features = x_train.shape[1]
    keras.utils.set_random_seed(args.seed)

    # 1. The model, unbuilt (no Input): its layers have names and kinds but no
    #    weights yet, so the layout map can be written from it...
    model = keras.Sequential(
        [
            ks.SparseLinear(256, activation="relu", name="hidden1"),
            ks.SparseLinear(128, activation="relu", name="hidden2"),
            ks.SparseLinear(10, name="logits"),  # 10 classes: not split 4 ways, replicated
        ],
        name="sparse_mlp",
    )
    mesh = keras.distribution.DeviceMesh(
        shape=(batch, model_ways), axis_names=("batch", "model"), devices=devices
    )
    layout_map = ks.get_layout_map(mesh, model)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

    # 2. ... and its weights are created inside the distribution's scope,
    #    where each one gets its layout.
    with distribution.scope():
        model.build((None, features))
        ks.validate_layout_map(layout_map, model)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
        scheduler = ks.SparsityScheduler(
            ks.PolynomialDecay(args.target, begin_step=0, end_step=int(0.75 * steps))
        )
        print(f"{len(devices)} devices, mesh {dict(zip(mesh.axis_names, mesh.shape))}")
        for variable in model.get_layer("hidden1").weights:
            spec = getattr(variable.value.sharding, "spec", "(one device)")
            print(f"  {variable.path:<36} {str(variable.shape):<10} {spec}")
        model.fit(
            x_train,
            y_train,
            batch_size=args.batch_size,
            epochs=args.epochs,
            callbacks=[scheduler],
            verbose=2,
        )
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)

    print(f"Test accuracy: {accuracy:.4f}")
    for layer in ks.sparse_layers(model):
        print(f"  {layer.name:<8} density {layer.density():.3f}")
    if args.save:
        model.save(args.save)  # gathers the shards; loads on any backend and device count
        print(f"Saved to {args.save}")


if __name__ == "__main__":
    main()

"""What the accuracy benchmarks share: the MNIST folder's flag and how a results file
records it; for ablations, where a run is scored, where its ramp ends, the driver's
temperature (mnist_lenet.py, mnist_lenet5.py, mnist_vit.py), and the initial weights of one
backend carried to another (mnist_lenet.py, mnist_lenet5.py)."""

import os
import sys

# The ramp's end the benchmark scripts default to; see resolve_end_fraction.
SCRIPT_END_FRACTION = 0.75


def add_data_argument(parser):
    """`--mnist DIR` (also `--data DIR`) as `args.data`: the folder with the MNIST IDX files;
    `None` lets `load_mnist` read $KERAS_SPARSE_MNIST_DIR."""
    parser.add_argument(
        "--mnist",
        "--data",
        dest="data",
        metavar="DIR",
        help="folder with the MNIST IDX files (default: $KERAS_SPARSE_MNIST_DIR)",
    )
    return parser


def recorded_config(args, *dropped):
    """`vars(args)` without `dropped`, as a results file records it.

    The MNIST folder and the initial weights' file are recorded by their names
    alone: they lie outside the repository, and their places differ from machine
    to machine.
    """
    config = {k: v for k, v in vars(args).items() if k not in dropped}
    for key in ("data", "init_from", "save_init"):
        if config.get(key):
            config[key] = os.path.basename(os.path.normpath(config[key]))
    return config


def add_validation_arguments(parser):
    """`--validation` and `--fold`: where a run is scored, on `parser`."""
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="score on the last N of the 8,000 training images, held out of training, "
        "instead of the 2,000 test images (for ablations: never tune on the test split)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=0,
        help="with --validation N: hold out the (K+1)-th block of N images from the end "
        "instead of the last N (cross-validation over the training images)",
    )
    return parser


def add_ablation_arguments(parser):
    """`--validation`, `--fold`, `--end-fraction` and `--temperature` on `parser`."""
    add_validation_arguments(parser)
    parser.add_argument(
        "--end-fraction",
        type=float,
        default=None,
        help="the ramp's end (and the freeze) as a fraction of the steps (default "
        f"{SCRIPT_END_FRACTION}, which the structure and earlier tables used; the README's "
        "recipe, PolynomialDecay(end_fraction=0.9), needs --end-fraction 0.9)",
    )
    parser.add_argument(
        "--temperature",
        default=None,
        help="INITIAL,FINAL of an ExponentialTemperature over the ramp (default: the driver's)",
    )
    return parser


def resolve_end_fraction(args):
    """Fill in `--end-fraction`'s default and say so on stderr when it was not given.

    The default differs from the README's recipe (0.9) so that the commands the docs
    record keep reproducing their files; the notice makes a run that meant the recipe
    but left the flag out visible in its log.
    """
    if getattr(args, "end_fraction", 0.0) is None:
        args.end_fraction = SCRIPT_END_FRACTION
        print(
            f"note: the ramp ends at {SCRIPT_END_FRACTION} of the steps, this script's "
            "default; the README's recipe is --end-fraction 0.9",
            file=sys.stderr,
        )
    return args


def add_recipe_shape_arguments(parser):
    """`--per-weight`, `--straight-through`, `--n-m`, `--power`, `--begin-fraction` and
    `--gain`: the mask's granularity and estimator, the ramp's shape and start, and the
    feedback's gain, as an ablation varies them."""
    parser.add_argument(
        "--per-weight", action="store_true", help="a threshold per weight (structured=False)"
    )
    parser.add_argument(
        "--straight-through",
        action="store_true",
        help="the hard mask forward, the soft mask's gradient backward (straight_through=True)",
    )
    parser.add_argument(
        "--n-m",
        default=None,
        metavar="N,M",
        help="N:M patterns (granularity='n:m', n_m=(N, M)): at most N of every M weights "
        "along the inputs, the learned thresholds pruning further",
    )
    parser.add_argument(
        "--power", type=float, default=3.0, help="PolynomialDecay's power (its default 3)"
    )
    parser.add_argument(
        "--begin-fraction",
        type=float,
        default=0.0,
        help="the ramp's start as a fraction of the steps (dense training before it)",
    )
    parser.add_argument(
        "--gain", type=float, default=None, help="the driver's gain (default: SparsityScheduler's)"
    )
    parser.add_argument(
        "--threshold-start",
        type=float,
        default=None,
        help="start each threshold at this many standard deviations of its layer's initial "
        "kernel, with no constraint (below zero the soft mask starts near 1 for every weight; "
        "default: zero, and thresholds kept non-negative)",
    )
    parser.add_argument(
        "--penalty-on",
        choices=("thresholds", "weights"),
        default=None,
        help="what the sparsity penalty's gradient reaches, for every granularity: the "
        "thresholds only, or the weights near them too (default: the library's, the "
        "thresholds only for weights and whole units since 2026-12-07, the weights too for "
        "N:M patterns; a value the library does not use for a granularity is an ablation's "
        "patch)",
    )
    parser.add_argument(
        "--threshold-lr",
        type=float,
        default=None,
        help="each threshold's learning rate as this many standard deviations of its "
        "layer's initial kernel per unit of Adam's step (scale-free thresholds; default: "
        "the model's learning rate, the same absolute step in every layer)",
    )
    parser.add_argument(
        "--per-weight-layers",
        default="",
        metavar="NAMES",
        help="a threshold per weight (structured=False) in these layers only, comma-separated "
        "(such as out: the classifier)",
    )
    parser.add_argument(
        "--price-by-scale",
        type=float,
        default=None,
        metavar="P",
        help="price each layer's weights, in the global penalty, in proportion to its "
        "weight scale (the kernel's standard deviation when driving started) to the power P "
        "(default: every weight alike, P=0)",
    )
    parser.add_argument(
        "--per-weight-temperature",
        default=None,
        metavar="INITIAL,FINAL",
        help="the relative temperature of the masks with a threshold per weight, over the "
        "ramp (default: the driver's, 2,5), the others keeping theirs",
    )
    return parser


def adam(args, model, learning_rate=1e-3):
    """Adam at `learning_rate`, with each threshold's rate set by `--threshold-lr` where it
    is given (TensorFlow and JAX: PyTorch's Adam updates its variables elsewhere)."""
    import keras

    threshold_lr = getattr(args, "threshold_lr", None)
    if threshold_lr is None:
        return keras.optimizers.Adam(learning_rate)
    if keras.backend.backend() == "torch":
        raise SystemExit("--threshold-lr: TensorFlow and JAX only")
    import numpy as np

    import keras_sparse as ks

    scales = {}
    for layer in ks.sparse_layers(model):
        std = float(np.std(keras.ops.convert_to_numpy(layer.kernel)))
        for mask in layer._kernel_masks.values():
            # JAX passes the Keras variable to `update_step`, TensorFlow its tf.Variable.
            variables = [mask.threshold]
            if keras.backend.backend() == "tensorflow":
                variables.append(mask.threshold.value)
            for variable in variables:
                scales[id(variable)] = threshold_lr * std / learning_rate

    class ThresholdScaledAdam(keras.optimizers.Adam):
        def update_step(self, gradient, variable, learning_rate):
            scale = scales.get(id(variable))
            if scale is not None:
                learning_rate = learning_rate * scale
            super().update_step(gradient, variable, learning_rate)

    return ThresholdScaledAdam(learning_rate)


def mask_options(args):
    """The sparse layers' options that `add_recipe_shape_arguments` sets."""
    options = {"straight_through": args.straight_through, "structured": not args.per_weight}
    if args.threshold_start is not None:
        options["threshold_constraint"] = None
    if getattr(args, "n_m", None):
        try:
            n, m = (int(part) for part in args.n_m.split(","))
        except ValueError:
            raise ValueError(f"--n-m takes two integers N,M; got {args.n_m!r}") from None
        options.update(granularity="n:m", n_m=(n, m))
    return options


def sparse_layer(cls, args):
    """`cls` (`SparseLinear`, `SparseConv2D`) with `mask_options(args)`, and a threshold per
    weight in the layers `--per-weight-layers` names."""
    options = mask_options(args)
    per_weight = {name for name in getattr(args, "per_weight_layers", "").split(",") if name}

    def build(*positional, name=None, **kwargs):
        layer_options = dict(options)
        if name in per_weight:
            layer_options["structured"] = False
        return cls(*positional, name=name, **layer_options, **kwargs)

    return build


def apply_penalty_target(args):
    """With `--penalty-on`, make every sparse layer's penalty gradient reach what the flag
    says, for this process, whatever the library does for the layer's granularity.

    An ablation's patch, not a library option. `weights`: the library's behaviour before
    2026-12-07 (the mask's hand-fused gradients replaced by autodiff of the formula,
    `mean(mask)` differentiated through the kernel as well). `thresholds`: the library's
    for weights and whole units; for N:M patterns the penalty's mask is then taken as if
    the kernel were constant, as for the others.
    """
    target = getattr(args, "penalty_on", None)
    if target is None:
        return
    from keras import ops

    from keras_sparse import mask as mask_module

    if target == "thresholds":
        # The library's held mask, for N:M patterns too.
        mask_module.KernelMask._penalised_mask = mask_module.KernelMask._mask_held_at
        return

    def penalty_on_weights(kernel, threshold, prune_mask, temperature):
        alive = ops.cast(prune_mask, kernel.dtype)
        soft = ops.sigmoid((ops.abs(kernel) - threshold) * temperature) * alive
        return kernel * soft, ops.mean(soft)

    def fused_training(self):
        if self.options.straight_through:
            raise ValueError(
                "--penalty-on weights is built without --straight-through; got "
                f"straight_through={self.options.straight_through}"
            )
        # Whole units and N:M patterns train through autodiff, where `_penalised_mask` decides.
        return penalty_on_weights if self.options.granularity == "weight" else None

    def penalised_mask(self, kernel, mask):
        return mask

    mask_module.KernelMask._fused_training = fused_training
    mask_module.KernelMask._penalised_mask = penalised_mask


def apply_penalty_price(args):
    """With `--price-by-scale P`, make the global penalty's share of each mask its size
    times its weight scale to the power P (renormalised), for this process.

    An ablation's patch, not a library option: the library prices every weight alike.
    """
    power = getattr(args, "price_by_scale", None)
    if power is None:
        return
    from keras import ops

    from keras_sparse.callbacks import SparsityScheduler

    library_shares = SparsityScheduler._penalty_shares

    def penalty_shares(self, group):
        shares = library_shares(self, group)
        if self.scope != "global":
            return shares
        scales = ops.stack([m.state("weight_scale") for m in group])
        priced = shares * ops.power(scales, power)
        return priced / ops.sum(priced)

    SparsityScheduler._penalty_shares = penalty_shares


def apply_per_weight_temperature(args):
    """With `--per-weight-temperature A,B`, anneal the relative temperature of every mask
    with a threshold per weight from A to B over the ramp, for this process.

    An ablation's patch, not a library option (the library's is 2 -> 5 for them).
    """
    given = getattr(args, "per_weight_temperature", None)
    if given is None:
        return
    initial, final = (float(part) for part in given.split(","))
    from keras_sparse.callbacks import SparsityScheduler
    from keras_sparse.schedules import ExponentialTemperature

    library_schedule = SparsityScheduler._relative_schedule

    def relative_schedule(self, mask):
        options = mask.options
        if options.structured or options.granularity != "weight":
            return library_schedule(self, mask)
        begin, end = self._steps.begin_step, max(self._steps.end_step, self._steps.begin_step + 1)
        return ExponentialTemperature(initial, final, begin, end)

    SparsityScheduler._relative_schedule = relative_schedule


def start_thresholds(model, args):
    """Each sparse layer's thresholds at `--threshold-start` standard deviations of its
    kernel (after any `--init-from`), where the flag is given."""
    if args.threshold_start is None:
        return
    import keras
    import numpy as np

    import keras_sparse as ks

    for layer in ks.sparse_layers(model):
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        value = args.threshold_start * float(np.std(kernel))
        for mask in layer._kernel_masks.values():
            mask.threshold.assign(np.full(mask.threshold.shape, value, "float32"))


def held_out(data, validation, fold=0):
    """`((x, y) train, (x, y) test)` with `validation` training images as the test split
    (the last ones for fold 0, the block before them for fold 1, ...), or `data` as it is
    when `validation` is 0."""
    if not validation:
        return data
    import numpy as np

    (x_train, y_train), _ = data
    end = len(x_train) - fold * validation
    start = end - validation
    if fold < 0 or start < 0:
        raise ValueError(
            f"--fold {fold} with --validation {validation} is outside the "
            f"{len(x_train)} training images"
        )
    rest = np.r_[0:start, end : len(x_train)]
    return (x_train[rest], y_train[rest]), (x_train[start:end], y_train[start:end])


def temperature_schedule(args, end_step):
    """`--temperature` as an `ExponentialTemperature` from step 0 to `end_step`, or `None`."""
    if not args.temperature:
        return None
    import keras_sparse as ks

    initial, final = (float(t) for t in args.temperature.split(","))
    return ks.ExponentialTemperature(initial, final, begin_step=0, end_step=end_step)


def add_initial_weights_arguments(parser):
    """`--save-init` and `--init-from`: start one backend from another's initial weights."""
    parser.add_argument(
        "--save-init",
        default=None,
        help="write the initial kernels and biases of each seed's model on this backend to "
        "this .npz, then exit (to start another backend from the same weights)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="start each seed's sparse model from the kernels and biases of a --save-init file",
    )
    return parser


def check_initial_weights_methods(parser, args, sparse_method):
    """`--init-from` loads into the `sparse_method` and `dense` runs only: an error if others
    would run. A script without the flag (mnist_pquant.py reuses mnist_lenet5.py's parsing)
    passes."""
    others = [m for m in args.methods.split(",") if m not in (sparse_method, "dense")]
    if getattr(args, "init_from", None) and others:
        parser.error(
            f"--init-from applies to --methods {sparse_method} and dense only; "
            f"received --methods {args.methods}"
        )


def save_initial_weights(path, seeds, build):
    """Each seed's initial kernels and biases (`build(seed)`'s sparse layers), as
    `<seed>/<layer>/<name>`."""
    import keras
    import numpy as np

    import keras_sparse as ks

    arrays = {}
    for seed in seeds:
        for layer in ks.sparse_layers(build(seed)):
            for name in ("kernel", "bias"):
                value = keras.ops.convert_to_numpy(getattr(layer, name))
                arrays[f"{seed}/{layer.name}/{name}"] = value
    np.savez(path, **arrays)


def load_initial_weights(model, path, seed):
    """The kernels and biases `save_initial_weights` wrote for `seed`, into `model`'s sparse
    layers, or into its layers with a kernel for a dense model."""
    import numpy as np

    import keras_sparse as ks

    arrays = np.load(path)
    layers = ks.sparse_layers(model) or [x for x in model.layers if hasattr(x, "kernel")]
    for layer in layers:
        for name in ("kernel", "bias"):
            key = f"{seed}/{layer.name}/{name}"
            if key not in arrays:
                raise SystemExit(f"--init-from {path}: no {key!r} (saved for other seeds?)")
            getattr(layer, name).assign(arrays[key])


BATCH_ORDERS = ("keras", "each-epoch", "once")


def add_batch_order_argument(parser):
    """`--batch-order`: who shuffles the training images, and how often."""
    parser.add_argument(
        "--batch-order",
        choices=BATCH_ORDERS,
        default="keras",
        help="keras: fit(shuffle=True), as each backend's Keras does it (on TensorFlow, after "
        "keras.utils.set_random_seed, one order repeated every epoch); each-epoch: a new "
        "NumPy permutation every epoch, the same on every backend; once: one NumPy "
        "permutation for every epoch",
    )
    return parser


def training_inputs(x, y, batch_size, order, seed):
    """`model.fit`'s data arguments for `--batch-order order`.

    "each-epoch" and "once" draw their permutations from NumPy with `seed`, so every
    backend sees the same batches in the same order.
    """
    if order == "keras":
        return {"x": x, "y": y, "batch_size": batch_size, "shuffle": True}
    import numpy as np

    # A generator of its own, so that no other draw moves the batch order; the tag keeps it
    # apart from any stream seeded by `seed` alone.
    rng = np.random.default_rng([seed, 20261207])
    if order == "once":
        permutation = rng.permutation(len(x))
        return {
            "x": x[permutation],
            "y": y[permutation],
            "batch_size": batch_size,
            "shuffle": False,
        }
    if order != "each-epoch":
        raise ValueError(f"--batch-order must be one of {BATCH_ORDERS}; received {order!r}")
    # fit must not shuffle the batches again (with Python's `random`, as its epochs run).
    return {"x": _reshuffled_batches(x, y, batch_size, rng), "shuffle": False}


def _reshuffled_batches(x, y, batch_size, rng):
    """A `keras.utils.PyDataset` of `(x, y)` in batches, in a new permutation every epoch
    (defined here: keras is imported once the benchmark has chosen the backend)."""
    import keras

    class ReshuffledBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.order = rng.permutation(len(x))

        def __len__(self):
            return -(-len(x) // batch_size)

        def __getitem__(self, index):
            batch = self.order[index * batch_size : (index + 1) * batch_size]
            return x[batch], y[batch]

        def on_epoch_end(self):
            self.order = rng.permutation(len(x))

    return ReshuffledBatches()

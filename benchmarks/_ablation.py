"""What the accuracy benchmarks share for ablations: where a run is scored, where its
ramp ends, and the driver's temperature (mnist_lenet.py, mnist_lenet5.py, mnist_vit.py)."""


def add_ablation_arguments(parser):
    """`--validation`, `--end-fraction` and `--temperature` on `parser`."""
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="score on the last N of the 8,000 training images, held out of training, "
        "instead of the 2,000 test images (for ablations: never tune on the test split)",
    )
    parser.add_argument(
        "--end-fraction",
        type=float,
        default=0.75,
        help="the ramp's end (and the freeze) as a fraction of the steps",
    )
    parser.add_argument(
        "--temperature",
        default=None,
        help="INITIAL,FINAL of an ExponentialTemperature over the ramp (default: the driver's)",
    )
    return parser


def held_out(data, validation):
    """`((x, y) train, (x, y) test)` with the last `validation` training images as the test
    split, or `data` as it is when `validation` is 0."""
    if not validation:
        return data
    (x_train, y_train), _ = data
    n = validation
    return (x_train[:-n], y_train[:-n]), (x_train[-n:], y_train[-n:])


def temperature_schedule(args, end_step):
    """`--temperature` as an `ExponentialTemperature` from step 0 to `end_step`, or `None`."""
    if not args.temperature:
        return None
    import keras_sparse as ks

    initial, final = (float(t) for t in args.temperature.split(","))
    return ks.ExponentialTemperature(initial, final, begin_step=0, end_step=end_step)

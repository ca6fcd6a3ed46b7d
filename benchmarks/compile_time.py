"""What the first `fit` of a model costs before it trains: compiling its train step.

Builds `keras.applications.EfficientNetV2B0` (weights=None, 32x32 inputs, 10 classes),
then times two `fit` calls of one epoch (16 random images, batch 8) in one process:

* `dense`: the model as it is;
* `sparse`: `keras_sparse.sparsify(model)`, no driver;
* `driver`: the same with `SparsityScheduler` (a ramp of 100 steps, so it neither ends
  nor freezes while timed).

On JAX each `fit` with the scheduler builds its train step again (the driver changes
what a step computes, and is taken out at the end of `fit`): the second call compiles
as the first did, unless JAX's compilation cache (`JAX_COMPILATION_CACHE_DIR`) holds the
program. Run each mode in its own process, pinned to one core:

    taskset -c 0 python benchmarks/compile_time.py --mode driver
    JAX_COMPILATION_CACHE_DIR=DIR taskset -c 0 python benchmarks/compile_time.py --mode driver
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("dense", "sparse", "driver"), default="driver")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np

    import keras_sparse as ks

    model = keras.applications.EfficientNetV2B0(
        weights=None, input_shape=(32, 32, 3), classes=10, include_preprocessing=False
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 16)
    callbacks = []
    if args.mode != "dense":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what is left dense: not the point here
            model = ks.sparsify(model)
    if args.mode == "driver":
        callbacks = [ks.SparsityScheduler(ks.PolynomialDecay(0.6, end_step=100))]
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
        times.append(time.perf_counter() - start)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    print(
        f"{keras.backend.backend()}, {args.mode}: first fit {times[0]:.1f} s, second fit "
        f"{times[1]:.1f} s" + (" (JAX compilation cache on)" if cache else "")
    )


if __name__ == "__main__":
    main()

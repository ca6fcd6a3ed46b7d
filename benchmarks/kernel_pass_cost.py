"""What one pass over a kernel costs on this machine: the floor under any mask's overhead.

A mask adds elementwise work over the kernel to every training step; where a core
streams memory slowly, each kernel-sized pass costs milliseconds whatever it computes.
This times, on JAX (compiled with `jax.jit`), pinned to one core:

* `scale`: `kernel * 1.5`, one read and one write of the kernel (the cost of a pass);
* `soft mask`: `kernel * sigmoid((|kernel| - t) * T)` with a threshold per output unit;
* `soft mask, value and gradient`: the same and its gradient w.r.t. the kernel, fused by XLA;
* `matmul`: `x @ kernel` and the two matmuls of its backward, what `Dense` itself costs.

    python benchmarks/kernel_pass_cost.py --size 4096 --batch 256 --core 0

The ratio of the passes a step adds to the step's matmuls bounds how close a mask can get to
`Dense` on this machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the kernel is size x size")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--core", type=int, default=0)
    return parser.parse_args(argv)


def timed(function, argument, rounds):
    """Median wall and cpu seconds of `function(argument)`, compiled and warmed up first."""
    function(argument).block_until_ready()
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        function(argument).block_until_ready()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    middle = rounds // 2
    return sorted(walls)[middle], sorted(cpus)[middle]


def main(argv=None):
    args = parse_args(argv)
    # One core: affinity holds jaxlib to it (its thread flags alone do not).
    os.sched_setaffinity(0, {args.core})
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    import jax
    import jax.numpy as jnp

    key_kernel, key_x = jax.random.split(jax.random.PRNGKey(0))
    kernel = jax.random.normal(key_kernel, (args.size, args.size)) * 0.02
    x = jax.random.normal(key_x, (args.batch, args.size))
    threshold = jnp.full((1, args.size), 0.02)

    def soft_masked(k):
        return k * jax.nn.sigmoid((jnp.abs(k) - threshold) * 250.0)

    def matmul_step(k):
        # Forward and both backward matmuls of a Dense layer (the input's gradient too).
        y = x @ k
        return (x.T @ y).sum() + (y @ k.T).sum()

    cases = {
        "scale": jax.jit(lambda k: k * 1.5),
        "soft mask": jax.jit(soft_masked),
        "soft mask, value and gradient": jax.jit(jax.grad(lambda k: soft_masked(k).sum())),
        "matmul": jax.jit(matmul_step),
    }
    megabytes = args.size * args.size * 4 / 1e6
    print(
        f"kernel {args.size}x{args.size} float32 ({megabytes:.0f} MB), batch {args.batch}, "
        f"JAX {jax.__version__} on core {args.core}, {args.rounds} rounds, medians"
    )
    print("| work | ms | cpu/wall |")
    print("|:--|--:|--:|")
    for name, function in cases.items():
        wall, cpu = timed(function, kernel, args.rounds)
        print(f"| {name} | {wall * 1e3:.1f} | {cpu / wall:.2f} |")


if __name__ == "__main__":
    main()

"""Eager PyTorch on a CPU: a boolean mask read as bool against the same bytes read as uint8.

`keras_sparse` keeps `prune_mask` as a bool variable (a quarter of a float32
kernel's bytes). Eager PyTorch converts a bool tensor to float32, and
multiplies a float32 tensor by one, on a slower path than a uint8 tensor of
the same bytes (`tensor.view(torch.uint8)`); `keras_sparse.mask` reads the
bytes as uint8 there (`_float_mask`). This times both, pinned to one core,
in interleaved rounds, and prints the medians and their ratio:

    python benchmarks/torch_bool_mask.py --sizes 784x300,1024x1024 --core 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def timed(function, calls):
    function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="784x300,1024x1024", help="kernel shapes, RxC,...")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.core})
    import torch

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, one thread on core {args.core}, median of {args.rounds}")
    print(f"{'shape':>11s} {'operation':28s} {'bool':>9s} {'uint8':>9s} {'bool/uint8':>10s}")
    for text in args.sizes.split(","):
        shape = tuple(int(d) for d in text.split("x"))
        kernel = torch.randn(shape, generator=generator)
        mask = torch.rand(shape, generator=generator) < 0.5
        soft = torch.rand(shape, generator=generator)
        operations = {
            "cast to float32": lambda m: m.to(torch.float32),
            "soft.mul_(mask)": lambda m, soft=soft: soft.mul_(m),
            "cast, then kernel * mask": lambda m, kernel=kernel: kernel * m.to(torch.float32),
        }
        for name, operation in operations.items():
            times = {"bool": [], "uint8": []}
            for _ in range(args.rounds):
                for dtype, tensor in (("bool", mask), ("uint8", mask.view(torch.uint8))):
                    call = lambda t=tensor, o=operation: o(t)  # noqa: E731
                    times[dtype].append(timed(call, args.calls))
            bool_time = statistics.median(times["bool"]) * 1e6
            uint8_time = statistics.median(times["uint8"]) * 1e6
            print(
                f"{text:>11s} {name:28s} {bool_time:7.1f}us {uint8_time:7.1f}us "
                f"{bool_time / uint8_time:9.2f}x"
            )


if __name__ == "__main__":
    main()

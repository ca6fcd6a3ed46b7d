"""How many passes over the kernel a compiled training step makes: counted in XLA's program.

Time on a shared machine is noisy; the optimized program is not. This compiles the training
step of `benchmarks/speed.py` (forward in training mode, backward, SGD update of every
trainable weight) for `Dense`, the floor (a constant mask), the seed's formula (autodiff) and
both `SparseLinear` modes, with XLA (JAX `jit`; TensorFlow `tf.function(jit_compile=True)`),
and counts, in the entry computation of the optimized HLO, the instructions that touch a
kernel-sized array (as many elements as the kernel) other than the matmuls:

* `writes`: instructions that write one (an elementwise pass; `Dense` has one, its update);
* `reductions`: instructions that read one and write something smaller (a mean, a sum over
  an axis): XLA on a CPU does not fuse a reduction with the elementwise work that produces
  its input, so each one reads a stored array;
* `MB moved`: the bytes of kernel-sized arrays those instructions read and write, a proxy
  for the memory traffic the mask adds.

    python benchmarks/hlo_passes.py --backend jax --size 1024 --batch 256
    python benchmarks/hlo_passes.py --backend tensorflow --size 1024 --batch 256 --show

`--show` prints each counted instruction (its name, shape and operands); `--fit` compiles
Keras's own `train_step` of a one-layer model with Adam (what `model.fit` runs) instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "pred": 1, "s32": 4, "u8": 1, "s8": 1}
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
NOT_PASSES = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "dot"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow"), default="jax")
    parser.add_argument("--size", type=int, default=1024, help="the kernel is size x size")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--show", action="store_true", help="print each counted instruction")
    parser.add_argument(
        "--fit", action="store_true", help="Keras's own train_step with Adam instead of SGD"
    )
    return parser.parse_args(argv)


def arrays(text):
    """(dtype, element count) of every array shape written in `text`."""
    found = []
    for dtype, dims in ARRAY.findall(text):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        found.append((dtype, count))
    return found


def computations(hlo):
    """{name: body} of every computation in an HLO module's text, and the entry's name."""
    bodies, entry, name, lines = {}, None, None, []
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$", line)
        if header:
            name, lines = header.group(2), []
            entry = name if header.group(1) else entry
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return bodies, entry


def kernel_passes(hlo, kernel_elements):
    """The entry computation's instructions that write or reduce a kernel-sized array."""
    bodies, entry = computations(hlo)
    shapes, counted = {}, []
    for line in bodies[entry].splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        outputs = arrays(shape)
        shapes[name] = outputs
        called = re.search(r"calls=(%[\w.\-]+)", rest)
        if opcode in NOT_PASSES or (called and " dot(" in bodies.get(called.group(1), "")):
            continue  # matmuls and bookkeeping
        operand_names = re.findall(r"%[\w.\-]+", rest.split("),")[0])
        inputs = [array for operand in operand_names for array in shapes.get(operand, [])]
        read = [a for a in inputs if a[1] == kernel_elements]
        written = [a for a in outputs if a[1] == kernel_elements]
        if not read and not written:
            continue
        moved = sum(DTYPE_BYTES.get(dtype, 4) * count for dtype, count in read + written)
        kind = "write" if written else "reduction"
        counted.append(
            {"name": name, "kind": kind, "shape": shape, "moved": moved, "operands": operand_names}
        )
    return counted


def jax_programs(layers, x, y):
    from benchmarks import speed

    adapter = speed.JaxAdapter()
    for name, layer in layers.items():
        trainable, non_trainable = adapter._state(layer)
        step = adapter._step(layer).lower(trainable, non_trainable, x, y).compile()
        yield name, step.as_text()


def tensorflow_programs(layers, x, y):
    from benchmarks import speed

    adapter = speed.TensorFlowAdapter()
    for name, layer in layers.items():
        step = adapter._step(layer)
        yield name, step.experimental_get_compiler_ir(x, y)(stage="optimized_hlo")


def keras_fit_programs(layers, x, y, backend):
    """Keras's own `train_step` of a one-layer model compiled with Adam: what `fit` runs."""
    import keras

    for name, layer in layers.items():
        model = keras.Sequential([keras.Input((x.shape[-1],)), layer])
        model.compile(optimizer="adam", loss="mse")
        model.optimizer.build(model.trainable_variables)
        if backend == "jax":
            import jax

            state = model._get_jax_state(True, True, True, True)
            step = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
            yield name, step.as_text()
        else:
            import tensorflow as tf

            step = tf.function(model.train_step, jit_compile=True)
            yield name, step.experimental_get_compiler_ir((x, y))(stage="optimized_hlo")


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    from benchmarks import speed

    layers = speed.make_layers(args.size, formula=True)
    x, y = speed.data(args.size, args.batch)
    if args.fit:
        programs = keras_fit_programs(layers, x, y, args.backend)
        step = "Keras's train_step with Adam"
    else:
        programs = (jax_programs if args.backend == "jax" else tensorflow_programs)(layers, x, y)
        step = "the training step of speed.py (SGD)"
    print(
        f"{args.backend}, kernel {args.size}x{args.size}, batch {args.batch}, {step}: "
        "passes over kernel-sized arrays (matmuls excluded)\n"
    )
    print("| layer | writes | reductions | MB moved |")
    print("|:--|--:|--:|--:|")
    shown = []
    for name, hlo in programs:
        counted = kernel_passes(hlo, args.size * args.size)
        writes = sum(c["kind"] == "write" for c in counted)
        reductions = len(counted) - writes
        moved = sum(c["moved"] for c in counted) / 1e6
        print(f"| {name} | {writes} | {reductions} | {moved:.1f} |")
        shown.append((name, counted))
    if args.show:
        for name, counted in shown:
            print(f"\n{name}:")
            for c in counted:
                print(f"  {c['kind']:9s} {c['name']} {c['shape']} <- {', '.join(c['operands'])}")


if __name__ == "__main__":
    main()

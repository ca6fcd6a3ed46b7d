"""The `keras-sparse` command line (`python -m keras_sparse ...`).

```
keras-sparse report MODEL.keras [--markdown]
keras-sparse strip  MODEL.keras -o OUT.keras
keras-sparse export MODEL.keras -o OUT --format {tf_saved_model,onnx,litert} [--strip]
```

Every command takes a `.keras` file holding sparse layers (`SparseLinear`,
`SparseConv2D`, ...). `report`
prints the sparsity report and the size report; `strip` saves the model with
each `SparseLinear` turned into a plain `Dense` (loadable without
keras-sparse); `export` writes an inference artifact with Keras's
`model.export` (which formats work on which backend: see
`keras_sparse.export`). The Keras backend is chosen as usual, by
`KERAS_BACKEND` or Keras's config file: `KERAS_BACKEND=tensorflow
keras-sparse export ...`.

Progress goes to stderr (`-q` silences it), reports to stdout. Exit status:
0 on success; 2 on any failure (a bad command line, a missing file, a file
that is not a Keras model, a model without sparse layers, an export route the
backend lacks, an output path that cannot take the result, a save or export
that fails), with a message. Outputs are written under a temporary name and
renamed when complete, so a failed command leaves no output behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

PROG = "keras-sparse"
FORMATS = ("tf_saved_model", "onnx", "litert")


class CommandError(Exception):
    """A user-facing failure: `message` is printed, `code` is the exit status."""

    def __init__(self, message, code=2):  # every failure exits 2
        super().__init__(message)
        self.code = code


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, strip and export Keras models pruned with keras-sparse.",
        epilog="The Keras backend is the one KERAS_BACKEND (or Keras's config) names.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    # `-q` is accepted after the command too; SUPPRESS keeps a subcommand's
    # default from overriding a `-q` given before it.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report",
        parents=[quiet],
        help="print the sparsity and size reports of a model",
        description=(
            "Print per-layer sparsity and what the model costs to ship "
            "(as given, stripped, stripped + int8)."
        ),
    )
    report.add_argument("model", metavar="MODEL", help="a .keras file")
    report.add_argument("--markdown", action="store_true", help="print Markdown tables")

    strip = commands.add_parser(
        "strip",
        parents=[quiet],
        help="replace every sparse layer by its stock Keras class holding the pruned kernel",
        description=(
            "Save a copy of the model in which every sparse layer (SparseLinear, "
            "SparseConv2D, ...) is its stock Keras class (Dense, Conv2D, ...) whose "
            "kernel has the pruned weights as zeros; it loads without keras-sparse."
        ),
    )
    strip.add_argument("model", metavar="MODEL", help="a .keras file")
    strip.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="a .keras file (replaced if it exists)"
    )

    export = commands.add_parser(
        "export",
        parents=[quiet],
        help="export an inference artifact (SavedModel, ONNX, LiteRT)",
        description="Export the model with Keras's model.export().",
    )
    export.add_argument("model", metavar="MODEL", help="a .keras file")
    export.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="a directory (tf_saved_model), a file (onnx) or a .tflite file (litert)",
    )
    export.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="tf_saved_model: TensorFlow, JAX; onnx: all backends; litert: TensorFlow "
        "(PyTorch with litert-torch)",
    )
    export.add_argument(
        "--strip", action="store_true", help="export the stripped model (stock Keras layers)"
    )
    return parser


def _check_output(args):
    """Refuse a bad output path before any work is done."""
    output = args.output
    if args.command == "strip" and not output.endswith(".keras"):
        raise CommandError(f"the output of `strip` must be a .keras file; got {output!r}")
    if args.command == "export" and args.format == "litert" and not output.endswith(".tflite"):
        raise CommandError(f"the output of a LiteRT export must be a .tflite file; got {output!r}")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CommandError(f"cannot write {output!r}: directory {parent!r} does not exist")
    if os.path.abspath(output) == os.path.abspath(args.model) and args.command == "export":
        raise CommandError("the export output must differ from the input model")
    writes_a_file = args.command == "strip" or args.format != "tf_saved_model"
    if writes_a_file and os.path.isdir(output):
        raise CommandError(
            f"cannot write {output!r}: it is a directory, and this command writes a file"
        )


def _load(path, say):
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory, not a .keras model file")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise CommandError(f"{path}: not a Keras model file (a .keras file is a zip archive)")
    import keras

    import keras_sparse  # noqa: F401  (registers the sparse layers for deserialization)

    say(f"Loading {path} ...")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # any parse failure means "not a model we can read"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(
            f"{path}: not a Keras model file that can be loaded ({reason})"
        ) from None
    if not isinstance(model, keras.Model):
        raise CommandError(f"{path}: holds a {type(model).__name__}, not a Keras model")
    if not keras_sparse.sparse_layers(model):
        raise CommandError(
            f"{path}: model '{model.name}' has no sparse layer "
            "(make one with keras_sparse.sparsify(model))"
        )
    return model


def _report(args, say):
    from keras_sparse.export import size_report
    from keras_sparse.transforms import sparsity_report

    model = _load(args.model, say)
    sparsity = sparsity_report(model)
    say("Measuring sizes (saving the model as given, stripped, and stripped + int8) ...")
    sizes = size_report(model)
    if args.markdown:
        print(f"## Sparsity of {os.path.basename(args.model)}\n")
        print(sparsity.to_markdown())
        print("\n## Size (bytes)\n")
        print(sizes.to_markdown())
    else:
        print(f"Sparsity of {args.model}\n")
        print(sparsity)
        print(f"\nSize: {sizes.params} parameters served, {sizes.nonzero} nonzero\n")
        print(sizes)


def _strip(args, say):
    from keras_sparse.export import save_model
    from keras_sparse.transforms import strip

    model = _load(args.model, say)
    say("Stripping ...")
    stripped = strip(model)
    say(f"Saving {args.output} ...")
    try:
        save_model(stripped, args.output)
    except Exception as exc:
        raise CommandError(f"saving {args.output} failed: {exc}") from exc
    say(f"Wrote {args.output}")


def _export(args, say):
    from keras_sparse.export import export_model, export_problem

    problem = export_problem(args.format)
    if problem:
        raise CommandError(problem)
    model = _load(args.model, say)
    what = "stripped model" if args.strip else "model"
    say(f"Exporting the {what} as {args.format} (this can take a while) ...")
    try:
        export_model(model, args.output, args.format, strip=args.strip)
    except Exception as exc:
        raise CommandError(f"export to {args.output} failed: {type(exc).__name__}: {exc}") from exc
    say(f"Wrote {args.output}")


_COMMANDS = {"report": _report, "strip": _strip, "export": _export}


def main(argv=None):
    """Run the command line on `argv` (default `sys.argv[1:]`); returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage error
        return int(exit_.code or 0)

    def say(message):
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.command != "report":
            _check_output(args)
        _COMMANDS[args.command](args, say)
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())

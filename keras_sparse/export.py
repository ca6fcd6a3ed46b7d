"""Shipping a pruned model: export routes and size figures.

Export goes through Keras's own `model.export(path, format=...)`; this
module adds what is specific to a sparse model: which route works on which
backend, an atomic `export_model()` (optionally stripping first), and
`size_report()`.

Which route works where (Keras 3.15, checked by `tests/test_export.py`):

| format | TensorFlow | JAX | PyTorch |
|:--|:--|:--|:--|
| `"tf_saved_model"` | yes | yes (through `jax2tf`; needs `tensorflow`) | no |
| `"onnx"` | yes (`tf2onnx`) | yes (`jax2onnx`) | yes (`torch.onnx`) |
| `"litert"` | yes (`tf.lite`) | no | with `litert-torch` only |

* `tf_saved_model` on PyTorch: Keras converts through `torch_xla`
  (`torch.export` -> StableHLO -> `tf.function`), which has no release
  matching current PyTorch (torch-xla's latest is 2.9); with Keras 3.15
  and PyTorch 2.13 the `torch.export` step also fails before reaching it
  (the input signature's nesting does not match `dynamic_shapes`).
* `litert` on JAX: Keras refuses it ("LiteRT export requires TensorFlow or
  PyTorch backend"). Strip the model, save it as `.keras`, and export it
  under the TensorFlow backend.
* `litert` on PyTorch goes through the `litert-torch` package (checked with
  litert-torch 0.10), which is not in the `export` extra: it pins
  `typing-extensions` 4.12, older than what JAX's and tox's dependencies
  need. The artifact's batch dimension is 1 unless `input_signature` says
  otherwise (Keras's PyTorch route replaces `None` by 1).
* ONNX needs `onnx` and, per backend, `tf2onnx`, `jax2onnx` or
  `onnxscript`: `pip install keras-sparse[export]`.

What an export contains: inference (`training=False`) runs the hard mask
`|kernel| >= threshold`, never the soft (sigmoid) mask, so every exported
graph serves the pruned kernel. Exporting the model as trained keeps the
`SparseLinear` state (kernel, threshold, prune mask) and the mask ops
(`Abs`, `GreaterOrEqual`, `Cast`, `Mul`) in the graph, except where the
converter folds them into one pruned constant (TensorFlow's ONNX and
LiteRT converters do); after `hard_prune()` (or the `SparsityScheduler`'s
freeze) the stored kernel itself has the pruned weights as zeros.
Exporting `strip(model)` (`export_model(..., strip=True)`) leaves one plain
`MatMul` per layer whose kernel has the pruned weights as zeros: the
smaller, simpler artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import math
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np

from keras_sparse.host import to_numpy
from keras_sparse.mask import check_bool
from keras_sparse.transforms import _check_model, _strip, sync_frozen_masks
from keras_sparse.walk import walk, weight_matrices

EXPORT_FORMATS = ("tf_saved_model", "onnx", "litert")

_TORCH_SAVED_MODEL = (
    "Keras exports a SavedModel from the PyTorch backend through `torch_xla`, "
    "which has no release matching current PyTorch (and with Keras 3.15 the "
    "`torch.export` step fails first). Strip the model, save it as .keras "
    "and export it with KERAS_BACKEND=tensorflow or jax."
)
_JAX_LITERT = (
    "Keras supports LiteRT export only on the TensorFlow and PyTorch backends. "
    "Strip the model, save it as .keras and export it with KERAS_BACKEND=tensorflow."
)

# (format, backend) -> why not, for the routes Keras does not offer here.
_UNSUPPORTED = {
    ("tf_saved_model", "torch"): _TORCH_SAVED_MODEL,
    ("litert", "jax"): _JAX_LITERT,
}

# (format, backend) -> (importable module, pip package) that the route needs.
_REQUIREMENTS = {
    ("tf_saved_model", "tensorflow"): [("tensorflow", "tensorflow")],
    ("tf_saved_model", "jax"): [("tensorflow", "tensorflow")],
    ("onnx", "tensorflow"): [("onnx", "onnx"), ("tf2onnx", "tf2onnx")],
    ("onnx", "jax"): [("onnx", "onnx"), ("jax2onnx", "jax2onnx")],
    ("onnx", "torch"): [("onnx", "onnx"), ("onnxscript", "onnxscript")],
    ("litert", "tensorflow"): [("tensorflow", "tensorflow")],
    ("litert", "torch"): [("litert_torch", "litert-torch")],
}


def export_problem(format, backend=None):
    """Why `model.export(path, format=format)` cannot work here, or `None` if it can.

    Args:
        format: One of `EXPORT_FORMATS`.
        backend: A Keras backend name; defaults to the current one.

    Returns:
        `None` when the route exists on `backend` and the packages it needs
        are importable, else a message saying why not and what to do.
    """
    backend = backend or keras.backend.backend()
    if format not in EXPORT_FORMATS:
        return f"Unknown export format {format!r}; expected one of {EXPORT_FORMATS}."
    key = (format, backend)
    if key in _UNSUPPORTED:
        return f"format={format!r} is not available on the {backend} backend: {_UNSUPPORTED[key]}"
    if key not in _REQUIREMENTS:
        return f"format={format!r} is not available on the {backend} backend."
    needed = _REQUIREMENTS[key]
    missing = [pip for module, pip in needed if importlib.util.find_spec(module) is None]
    if missing:
        return (
            f"format={format!r} on the {backend} backend needs "
            f"{' and '.join(missing)}: pip install {' '.join(missing)}"
        )
    return None


def _sample_inputs(model):
    """Zeros shaped like the model's inputs, in their structure (a keras-hub model takes a
    dict), unknown dimensions set to 1."""
    return keras.tree.map_structure(
        lambda x: np.zeros(
            [1 if d is None else int(d) for d in x.shape], dtype=x.dtype or "float32"
        ),
        # A Sequential's `input` raises until its first call; its one input is known.
        model.inputs[0] if isinstance(model, keras.Sequential) else model.input,
    )


def export_model(model, filepath, format="tf_saved_model", *, strip=False, verbose=False, **kwargs):
    """`model.export(filepath, format=...)`, atomically, optionally stripping first.

    The artifact is written next to `filepath` under a temporary name and
    renamed into place only once complete, so a failed export leaves
    nothing behind and never a half-written `filepath`. An existing
    `filepath` is replaced. Files the exporter writes beside the artifact
    (the `<name>.onnx.data` of an ONNX model with large weights) are moved
    beside `filepath` with it.

    Args:
        model: A built Keras model (typically with `SparseLinear` layers).
        filepath: Where to write: a directory for `"tf_saved_model"`, a
            file for `"onnx"`, a `.tflite` file for `"litert"`.
        format: One of `EXPORT_FORMATS` (see this module's docstring for
            which backend offers which).
        strip: If `True`, export `keras_sparse.strip(model)` (plain Dense
            layers holding the pruned kernels) instead of `model`.
        verbose: Passed to `model.export`.
        **kwargs: Passed to `model.export` (e.g. `input_signature`).

    Returns:
        `filepath`, as a string.

    Raises:
        ValueError: the route is not available on this backend (see
            `export_problem`), or `strip=True` and the model has no
            `SparseLinear`.
    """
    # The model is checked before the tools: its error is the user's to fix.
    _check_model(model, "export_model")
    check_bool("strip", strip)
    if strip:
        target = _strip(model, require_sparse=True, caller="export_model()")
    else:
        target = model
        sync_frozen_masks(model, "export_model()")
    problem = export_problem(format)
    if problem:
        raise ValueError(problem)
    filepath = os.fspath(filepath)
    if model.inputs and not getattr(target, "_called", True):
        # Keras's ONNX and LiteRT routes refuse a model that was never
        # called (a freshly loaded one on PyTorch): one call on zeros.
        target(_sample_inputs(target), training=False)
    directory = os.path.dirname(os.path.abspath(filepath))
    base, ext = os.path.splitext(os.path.basename(filepath))
    if format == "tf_saved_model":
        ext = ""
        base = os.path.basename(filepath)
    scratch = tempfile.mkdtemp(prefix=f".{base}.", dir=directory)
    try:
        partial = os.path.join(scratch, (base or "model") + ext)
        target.export(partial, format=format, verbose=verbose, **kwargs)
        # Files written beside the artifact belong to it (an ONNX model's
        # weights go to `<name>.onnx.data` when large, found by that name):
        # they move first, so that the artifact appears last, complete.
        written = sorted(os.listdir(scratch))
        for name in written:
            if name != os.path.basename(partial):
                _replace(os.path.join(scratch, name), os.path.join(directory, name))
        _replace(partial, filepath)
        # An earlier export's data file that this one did not write is stale.
        stale = os.path.basename(filepath) + ".data"
        if format == "onnx" and stale not in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, stale))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return filepath


def _replace(source, destination):
    """Move `source` (a file or directory) onto `destination`, replacing it."""
    if os.path.isdir(destination) and not os.path.islink(destination):
        if not os.path.isdir(source):
            raise IsADirectoryError(f"Refusing to replace directory {destination!r} by a file.")
        old = destination + ".old-" + os.path.basename(os.path.dirname(source))
        os.replace(destination, old)
        try:
            os.replace(source, destination)
        except BaseException:
            os.replace(old, destination)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, destination)


def save_model(model, filepath):
    """`model.save(filepath)` to a `.keras` file, atomically (see `export_model`)."""
    filepath = os.fspath(filepath)
    if not filepath.endswith(".keras"):
        raise ValueError(f"The output must be a .keras file. Received: filepath={filepath!r}")
    directory = os.path.dirname(os.path.abspath(filepath))
    scratch = tempfile.mkdtemp(prefix=".keras_sparse.", dir=directory)
    try:
        partial = os.path.join(scratch, "model.keras")
        model.save(partial)
        os.replace(partial, filepath)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return filepath


# -------------------------------------------------------------- size_report


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Size figures of one form of a model (one row of a `SizeReport`).

    Attributes:
        label: Which form: `"as given"`, `"stripped"` or `"stripped + int8"`.
        params: Number of values in all the model's variables (for the
            model as given, this includes each `SparseLinear`'s threshold,
            prune mask, temperature and penalty).
        nonzero: How many of those values are nonzero.
        weight_bytes: Raw bytes of those values (`sum(v.nbytes)`).
        kernel_bytes: Raw bytes of the weight matrices: the variables named
            `kernel`, `depthwise_kernel`, `pointwise_kernel` or `embeddings`
            (an int8 kernel holds one byte per weight).
        keras_bytes: Size of the `.keras` file `model.save()` writes.
        compressed_bytes: Size of the raw weight bytes, concatenated and
            gzip-compressed at level 9: about what a compressed download of
            the weights costs; zeros compress away.
    """

    label: str
    params: int
    nonzero: int
    weight_bytes: int
    kernel_bytes: int
    keras_bytes: int
    compressed_bytes: int


_SIZE_HEADERS = ("model", "params", "nonzero", "weights", "kernels", ".keras", "gzip")
# The weight matrices a mask can cover, by their variables' names in the stock layers.
_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings")


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """What a model costs to ship, before and after `strip` and int8 quantization.

    Attributes:
        sparse: The model as given (`SparseLinear` layers with their
            thresholds and masks).
        stripped: `strip(model)`: plain Dense layers, float32 kernels with
            the pruned weights as zeros.
        int8: `strip(model)` after `model.quantize("int8")` (int8 kernels
            with one float32 scale per output unit, for the layers Keras
            quantizes: `Dense`, `EinsumDense`, `Embedding`).
        not_quantized: Names of the layers whose weight matrices stay
            float32 in the int8 row, because Keras has no int8 form for
            them (convolutions, for one); `str(report)` lists them.
        not_quantized_share: Their share of the model's kernel weights.

    `params` and `nonzero` are the stripped model's: what the served
    network holds. `str(report)` is an aligned table in bytes;
    `to_markdown()` the same in Markdown.
    """

    sparse: ModelSize
    stripped: ModelSize
    int8: ModelSize
    not_quantized: tuple = ()
    not_quantized_share: float = 0.0

    @property
    def params(self):
        """Parameters of the served (stripped) network."""
        return self.stripped.params

    @property
    def nonzero(self):
        """Nonzero parameters of the served (stripped) network."""
        return self.stripped.nonzero

    @property
    def variants(self):
        return (self.sparse, self.stripped, self.int8)

    def _cells(self):
        return [
            (
                v.label,
                str(v.params),
                str(v.nonzero),
                str(v.weight_bytes),
                str(v.kernel_bytes),
                str(v.keras_bytes),
                str(v.compressed_bytes),
            )
            for v in self.variants
        ]

    def __str__(self):
        body = self._cells()
        widths = [max(len(r[i]) for r in [_SIZE_HEADERS, *body]) for i in range(len(_SIZE_HEADERS))]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [line(_SIZE_HEADERS), rule, *map(line, body), "(sizes in bytes)"]
        return "\n".join(lines + self._notes())

    def to_markdown(self):
        lines = [
            "| " + " | ".join(_SIZE_HEADERS) + " |",
            "|:--|" + "--:|" * (len(_SIZE_HEADERS) - 1),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self._cells()]
        notes = self._notes()
        return "\n".join(lines + ([""] + notes if notes else []))

    def _notes(self):
        if not self.not_quantized:
            return []
        names = ", ".join(self.not_quantized[:_LISTED])
        more = len(self.not_quantized) - _LISTED
        if more > 0:
            names += f" and {more} more"
        count = len(self.not_quantized)
        return [
            "int8: left float32, as Keras has no int8 form for them: "
            f"{count} {'layer' if count == 1 else 'layers'} holding "
            f"{self.not_quantized_share:.1%} of the kernel weights ({names})"
        ]


# How many of the layers left float32 the report names.
_LISTED = 5


def _measure(model, label, scratch):
    arrays = [to_numpy(v) for v in model.weights]
    kernel_bytes = sum(
        a.nbytes
        for v, a in zip(model.weights, arrays, strict=True)
        if _leaf_name(v) in _KERNEL_NAMES
    )
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    path = os.path.join(scratch, f"{label.replace(' ', '_').replace('+', 'and')}.keras")
    model.save(path)
    return ModelSize(
        label=label,
        params=sum(int(math.prod(a.shape)) for a in arrays),
        nonzero=int(sum(np.count_nonzero(a) for a in arrays)),
        weight_bytes=len(raw),
        kernel_bytes=int(kernel_bytes),
        keras_bytes=os.path.getsize(path),
        compressed_bytes=len(gzip.compress(raw, compresslevel=9, mtime=0)),
    )


def _leaf_name(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.split("/")[-1].split(":")[0]


def size_report(model):
    """Parameter counts and file sizes of `model`, stripped, and stripped + int8.

    Saves three `.keras` files in a temporary directory (removed after).
    `model` is not modified.

    Args:
        model: A built Sequential or functional model. Without any
            `SparseLinear` the "stripped" row is a plain copy (useful for a
            dense baseline).

    Returns:
        A `SizeReport` (`.params`, `.nonzero`, `.sparse`, `.stripped`,
        `.int8`, each a `ModelSize`; `.not_quantized`, the layers Keras
        could not quantize, left float32 in the int8 row; `print(report)`
        shows a table, and names those layers under it).
    """
    stripped = _strip(model, require_sparse=False, caller="size_report()")
    with tempfile.TemporaryDirectory(prefix="keras_sparse_size_") as scratch:
        sparse_size = _measure(model, "as given", scratch)
        stripped_size = _measure(stripped, "stripped", scratch)
        with warnings.catch_warnings():
            # "Layer InputLayer does not have a `quantize` method": expected.
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            stripped.quantize("int8")
        int8_size = _measure(stripped, "stripped + int8", scratch)
    left, share = _not_quantized(stripped)
    return SizeReport(
        sparse=sparse_size,
        stripped=stripped_size,
        int8=int8_size,
        not_quantized=left,
        not_quantized_share=share,
    )


def _not_quantized(model):
    """`(names, share)`: the layers of `model` whose weight matrices `quantize` left
    float32, and their share of all its weight-matrix values."""
    names, left, total = [], 0, 0
    for layer, _ in walk(model):
        size = sum(int(math.prod(v.shape)) for v in weight_matrices(layer))
        total += size
        if size and getattr(layer.dtype_policy, "quantization_mode", None) is None:
            names.append(layer.name)
            left += size
    return tuple(names), (left / total if total else 0.0)


__all__ = [
    "EXPORT_FORMATS",
    "ModelSize",
    "SizeReport",
    "export_model",
    "export_problem",
    "save_model",
    "size_report",
]

"""One walker over a model's layers, from Keras's own layer tracking.

Keras tracks every sublayer a layer holds (in attributes, lists, dicts, or
as a functional model's graph) in `layer._layers`; `Model.quantize()` walks
the same tracking. Walking it reaches layers inside nested models, layers
held as attributes of custom layers, `MultiHeadAttention`'s projections and
keras-hub's blocks. Every model-level function of this package walks with
`walk()`.
"""

from __future__ import annotations

import math

import keras


def _children(layer):
    children = getattr(layer, "_layers", None)
    if children is None:
        children = getattr(layer, "layers", None) or []
    return [child for child in children if isinstance(child, keras.layers.Layer)]


def walk(root):
    """`(layer, parent)` for every layer under `root` (not `root` itself), depth first in order.

    A layer reached twice (shared) is given once, with the first parent
    that holds it.
    """
    found, seen = [], {id(root)}
    stack = [(child, root) for child in _children(root)]
    while stack:
        layer, parent = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append((layer, parent))
        stack[:0] = [(child, layer) for child in _children(layer)]
    return found


def walk_layers(root):
    """Every layer under `root`, `root` included when it is a layer, depth first in order."""
    head = [root] if isinstance(root, keras.layers.Layer) else []
    return head + [layer for layer, _ in walk(root)]


def sparse_layers(model):
    """Every pruning layer (`SparseLinear`, `SparseConv2D`, ...) in `model`, at any depth."""
    from keras_sparse.layers import SparseKernelMixin

    return [layer for layer in walk_layers(model) if isinstance(layer, SparseKernelMixin)]


def kernel_masks(model):
    """Every `KernelMask` of `model`, in layer order (two for a separable convolution)."""
    masks = []
    for layer in sparse_layers(model):
        layer._require_built("kernel_masks")
        masks.extend(layer.masks.values())
    return masks


def weight_matrices(layer):
    """The weight matrices of `layer` itself (not of its sublayers).

    A bias is not one, whatever its rank (a GRU's is `(2, 3 * units)`). In a
    layer of a class this package prunes (`Dense`, the convolutions, ...)
    every other weight of rank 2 or more is: a `Dense(1)` kernel, `(n, 1)`,
    is pruned like any. In any other layer a matrix has two axes longer than
    1: a `(1, 1, d)` class token is a vector.
    """
    from keras_sparse.layers import SPARSE_CLASSES, SparseKernelMixin

    own = {id(v) for child in _children(layer) for v in child.weights}
    kernels = isinstance(layer, (SparseKernelMixin, *SPARSE_CLASSES))
    return [
        v
        for v in layer.weights
        if id(v) not in own
        and len(v.shape) >= 2
        and (kernels or sum(d > 1 for d in v.shape) >= 2)
        and not v.name.split("/")[-1].endswith("bias")
    ]


def unpruned_matrices(layer):
    """`layer`'s weight matrices that no mask prunes: all of a stock layer's, and those a
    sparse layer holds beside its masked kernels (keras-hub's untied `reverse_embeddings`)."""
    matrices = [v for v in weight_matrices(layer) if not _of_a_keras_mode(v)]
    masks = getattr(layer, "_kernel_masks", None)
    if not masks:
        return matrices
    pruned = {id(v) for mask in masks.values() for v in (mask.kernel, *mask.variables)}
    return [v for v in matrices if id(v) not in pruned]


def dense_values(layer):
    """How many values `layer`'s matrices that no mask prunes hold, as the layer reads them."""
    return sum(_values_read(layer, v) for v in unpruned_matrices(layer))


def matrix_values(layer):
    """How many values `layer`'s weight matrices hold, as `sparsity_report` counts them: its
    masked kernels and the matrices it leaves dense, without Keras's modes of a kernel."""
    masks = getattr(layer, "_kernel_masks", None) or {}
    return dense_values(layer) + sum(mask.size for mask in masks.values())


def _values_read(layer, variable):
    """`variable`'s size as `layer` reads it: a quantized int4 kernel is stored packed, two
    values a byte, and the layer's property of the same name unpacks it."""
    if getattr(layer, "quantization_mode", None) == "int4":
        shape = getattr(getattr(layer, variable.name.split("/")[-1], None), "shape", None)
        if shape is not None:
            return math.prod(shape)
    return math.prod(variable.shape)


def _of_a_keras_mode(variable):
    """Whether `variable` belongs to one of Keras's modes of a kernel rather than being a
    weight of its own: `enable_lora()`'s low-rank factors (an update to the kernel) and a
    quantized kernel's scales and zero points."""
    name = variable.name.split("/")[-1]
    return name.startswith("lora_") or name.endswith(("_scale", "_zero"))


def display_names(model, layers):
    """A unique, readable name for each layer: its name, or its path inside `model`."""
    names = [layer.name for layer in layers]
    if len(set(names)) == len(names):
        return names
    prefix = model.name + "/"
    paths = []
    for layer in layers:
        path = getattr(layer, "path", None) or layer.name
        paths.append(path[len(prefix) :] if path.startswith(prefix) else path)
    return paths

"""Layout maps for sparse layers under `keras.distribution` (model parallelism).

A sparse layer carries more weights than its stock layer, and their shapes
depend on the layer: an unstructured threshold has the kernel's shape, a
per-unit threshold has the shape of the kernel's output axes, and
`prune_mask` always has the kernel's. A `LayoutMap` written for the stock
layers therefore either leaves the extra weights replicated or, with a
broad regex, hands a kernel's layout to a smaller threshold.
`get_layout_map()` writes every entry for you, consistent with each other;
`validate_layout_map()` checks a hand-written map against a model.

Only the JAX backend shards variables through `keras.distribution`;
TensorFlow (`tf.distribute`) and PyTorch (DDP) replicate the layer unchanged
and need no layout map (see the distributed-training guide).
"""

from __future__ import annotations

import re

import keras

from keras_sparse.layers import SparseKernelMixin
from keras_sparse.walk import walk_layers

__all__ = ["get_layout_map", "validate_layout_map"]

_TRANSPOSED = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


class _Kernel:
    """What a layout needs to know of one pruned kernel: rank, output axes, names, shape."""

    def __init__(self, name, rank, output_axes, prefix, shape):
        self.name, self.rank, self.prefix = name, rank, prefix
        self.output_axes = tuple(sorted(a % rank for a in output_axes))
        self.shape = tuple(shape) if shape is not None else (None,) * rank

    def axes(self, kernel_axes, structured, bias_rank):
        """`{weight name: axes}` of this kernel and its mask, from the kernel's axes."""
        units = tuple(kernel_axes[a] for a in self.output_axes)
        entries = {
            self.name: tuple(kernel_axes),
            self.prefix + "threshold": units if structured else tuple(kernel_axes),
            self.prefix + "prune_mask": tuple(kernel_axes),
            self.prefix + "temperature": (),
            self.prefix + "sparsity_penalty": (),
            self.prefix + "sparsity_state": (None,),
        }
        if bias_rank is not None:
            # The bias of a Dense, a conv, an EinsumDense with `bias_axes` on the
            # kernel's output axes: laid out as those axes; any other, replicated.
            entries["bias"] = units if len(units) == bias_rank else (None,) * bias_rank
        return entries


def _known_shape(layer, name, rank):
    """The kernel's shape where the layer knows it, `None` for dimensions it does not."""
    if layer.built:
        return tuple(int(d) for d in getattr(layer, "_" + name).shape)
    kernel_size = tuple(getattr(layer, "kernel_size", ()) or ())
    if isinstance(layer, keras.layers.Embedding):
        table = (layer.input_dim, layer.output_dim)
        # keras-hub's output projection is the table's transpose.
        return table[::-1] if name == "reverse_embeddings" else table
    if isinstance(layer, keras.layers.Dense):
        return (None, layer.units)
    if name == "pointwise_kernel":
        return (1,) * len(kernel_size) + (None, layer.filters)
    if isinstance(layer, _DEPTHWISE) or name == "depthwise_kernel":
        return kernel_size + (None, layer.depth_multiplier)
    if isinstance(layer, _TRANSPOSED):
        return kernel_size + (layer.filters, None)
    if hasattr(layer, "filters"):
        return kernel_size + (None, layer.filters)
    return (None,) * rank


def _kernels(layer):
    """The `_Kernel`s of a sparse layer, built or not."""
    kernels = []
    for name, spec in layer._held_kernels().items():
        output_axes = spec.output_axes
        if callable(output_axes):
            output_axes, _ = output_axes(layer)
            rank = len(layer.equation.split("->")[0].split(",")[1].strip())
        elif layer.built:
            rank = len(getattr(layer, "_" + name).shape)
        elif isinstance(layer, (keras.layers.Dense, keras.layers.Embedding)):
            rank = 2
        else:
            rank = layer.rank + 2
        kernels.append(
            _Kernel(name, rank, output_axes, spec.prefix, _known_shape(layer, name, rank))
        )
    return kernels


def _bias_rank(layer):
    """The rank of the layer's bias, or `None` when it has none."""
    if layer.built:
        bias = getattr(layer, "bias", None)
        return None if bias is None else len(bias.shape)
    if isinstance(layer, keras.layers.EinsumDense):
        return len(layer.bias_axes) if layer.bias_axes else None
    return 1 if getattr(layer, "use_bias", False) else None


def _mesh_axis_sizes(device_mesh):
    return dict(zip(device_mesh.axis_names, device_mesh.shape, strict=True))


def _sparse_layers(obj):
    """Every sparse layer in `obj` (itself, or nested at any depth)."""
    if isinstance(obj, SparseKernelMixin):
        return [obj]
    if isinstance(obj, keras.layers.Layer):
        return [layer for layer in walk_layers(obj) if isinstance(layer, SparseKernelMixin)]
    return None


def _fit_to_shape(axes, shape, sizes):
    """Replicate any dimension that its mesh axis does not divide evenly.

    JAX refuses uneven shards (e.g. a 10-unit output on a 4-way model axis),
    so where the size is known such a dimension is left whole instead.
    """
    return tuple(
        axis if axis is None or dim is None or int(dim) % sizes[axis] == 0 else None
        for axis, dim in zip(axes, shape, strict=True)
    )


def _check_axes(kernel_axes, device_mesh, model_dim, data_dim):
    for name, value in (
        ("model_parallel_dim_name", model_dim),
        ("data_parallel_dim_name", data_dim),
    ):
        if value not in device_mesh.axis_names:
            raise ValueError(
                f"Received an invalid value for `{name}`: {value!r} is not an axis of the "
                f"device mesh. Expected one of {tuple(device_mesh.axis_names)}."
            )
    if kernel_axes is None:
        return None
    kernel_axes = tuple(kernel_axes)
    if len(kernel_axes) < 2 or any(
        axis is not None and axis not in device_mesh.axis_names for axis in kernel_axes
    ):
        raise ValueError(
            "Received an invalid value for `kernel_axes`, expected one mesh axis name or "
            f"None per kernel dimension, from {tuple(device_mesh.axis_names)}. Received: "
            f"kernel_axes={kernel_axes!r}"
        )
    named = [axis for axis in kernel_axes if axis is not None]
    if len(named) != len(set(named)):
        raise ValueError(
            "Received an invalid value for `kernel_axes`: a mesh axis can shard only one "
            f"dimension. Received: kernel_axes={kernel_axes!r}"
        )
    return kernel_axes


def _default_axes(kernel, model_dim):
    """Shard the kernel's first output axis (units, filters, heads, rows); replicate the rest."""
    axes = [None] * kernel.rank
    axes[kernel.output_axes[0]] = model_dim
    return tuple(axes)


def _layer_variables(layer):
    """`{weight name: variable}` of a built sparse layer."""
    found = {}
    for variable in layer.weights:
        found.setdefault(variable.path.split("/")[-1], variable)
    return found


def _targets(layers, structured):
    """`(name regex, layer or None, structured)` for each target."""
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        items = [layers]
    targets = []
    for item in items:
        if isinstance(item, str):
            if structured is None:
                raise ValueError(
                    "Pass `structured=True` or `structured=False` with layer-name "
                    "patterns: the threshold's shape, hence its layout, depends on it. "
                    f"Received: layers={item!r}, structured=None"
                )
            targets.append((f"(?:{item})", None, bool(structured)))
            continue
        found = _sparse_layers(item)
        if found is None:
            raise TypeError(
                "Received an invalid value for `layers`, expected a Keras model or layer, "
                f"a layer-name regex, or a list of those. Received: {item!r}"
            )
        if not found:
            raise ValueError(
                f"No `SparseLinear` or other sparse layer found in "
                f"{getattr(item, 'name', item)!r}: there is nothing to lay out."
            )
        targets.extend((re.escape(layer.name), layer, layer.structured) for layer in found)
    return targets


def get_layout_map(
    device_mesh,
    layers,
    model_parallel_dim_name="model",
    data_parallel_dim_name="batch",
    structured=None,
    kernel_axes=None,
):
    """Get a `keras.distribution.LayoutMap` for the weights of sparse layers.

    The entries follow each kernel: by default a kernel is sharded on its
    first output axis (a Dense kernel's units, `(None, "model")`, as
    `keras.distribution` lays out a `Dense` kernel; a conv kernel's filters;
    an attention projection's heads; an embedding's rows), and then

    | weight | layout |
    |:--|:--|
    | kernel, `prune_mask` | the kernel's axes |
    | `bias` | the kernel's axis at the output position |
    | `threshold`, `structured=True` | the kernel's axes at the output positions |
    | `threshold`, `structured=False` | the kernel's axes |
    | `temperature`, `sparsity_penalty`, `sparsity_state` | replicated |

    so the mask `sigmoid((|kernel| - threshold) * temperature)` is computed
    shard by shard with no communication. With `kernel_axes` the kernel can
    be laid out otherwise (`("model", None)` for a row-parallel Dense,
    `("batch", "model")` for FSDP-style sharding as keras-hub's Gemma does);
    the other weights follow it by the same rules. Layers with two pruned
    kernels (separable convolutions) get entries for both, their mask
    weights prefixed `depthwise_` and `pointwise_`.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4),
        axis_names=("batch", "model"),
        devices=keras.distribution.list_devices(),
    )
    model = make_model()  # without keras.Input: named layers, no weights yet
    layout_map = keras_sparse.get_layout_map(mesh, model)
    # or by layer name (Dense-like 2-D kernels), before any model exists:
    #   layout_map = keras_sparse.get_layout_map(mesh, "hidden_.*", structured=True)

    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        model.build((None, in_features))  # the weights are created, sharded, here
        model.compile(...)
        model.fit(...)
    ```

    Args:
        device_mesh: A `keras.distribution.DeviceMesh`, or a `LayoutMap` to add
            the entries to (it is returned, updated in place).
        layers: What to lay out: a Keras model or layer (every sparse layer in
            it, at any depth, is found by name; it need not be built, so a
            blueprint of the model to be created under the distribution
            works), a regex for the names of `SparseLinear` layers, or a list
            of those. The variables are matched wherever the layer is nested
            (`.../<layer name>/<weight>`), so the model's own name may differ.
        model_parallel_dim_name: The mesh axis the weights are sharded on.
        data_parallel_dim_name: The mesh axis the batch is split on; checked
            to be on the mesh (it may appear in `kernel_axes`).
        structured: For regex entries of `layers` only (required there):
            whether those layers have per-neuron thresholds. A layer object
            knows its own.
        kernel_axes: The kernels' layout, one mesh axis name or `None` per
            kernel dimension. Defaults to sharding the first output axis.
            Every targeted kernel must then have that many dimensions.

    Where a layer tells a dimension's size and the mesh axis does not divide
    it (e.g. 10 output classes on a 4-way model axis), that dimension is
    replicated, in every weight alike, since JAX refuses uneven shards.

    Returns:
        The `keras.distribution.LayoutMap`, with one entry per weight and
        layer (or pattern).

    Raises:
        TypeError: `device_mesh` or `layers` is not one of the above.
        ValueError: an axis name is not on the mesh; `kernel_axes` does not
            fit a kernel's rank; a pattern comes without `structured`; two
            layers share a name but not a layout; or an entry already in the
            given `LayoutMap` also matches a sparse layer's weight (Keras
            would refuse the path matched by two keys later, and a key written
            for a kernel may not suit the threshold).
    """
    if isinstance(device_mesh, keras.distribution.LayoutMap):
        layout_map = device_mesh
        device_mesh = layout_map.device_mesh
    elif isinstance(device_mesh, keras.distribution.DeviceMesh):
        layout_map = keras.distribution.LayoutMap(device_mesh)
    else:
        raise TypeError(
            "Received an invalid value for `device_mesh`, expected a "
            "`keras.distribution.DeviceMesh` or `keras.distribution.LayoutMap`. "
            f"Received: device_mesh={device_mesh!r} of type {type(device_mesh)}"
        )
    kernel_axes = _check_axes(
        kernel_axes, device_mesh, model_parallel_dim_name, data_parallel_dim_name
    )
    sizes = _mesh_axis_sizes(device_mesh)

    # One set of entries per distinct layer name (or pattern).
    entries = {}
    for name_regex, layer, is_structured in _targets(layers, structured):
        if layer is None:
            kernels, bias_rank = [_Kernel("kernel", 2, (1,), "", None)], 1
        else:
            kernels, bias_rank = _kernels(layer), _bias_rank(layer)
        per_weight = {}
        for index, kernel in enumerate(kernels):
            axes = kernel_axes or _default_axes(kernel, model_parallel_dim_name)
            if len(axes) != kernel.rank:
                raise ValueError(
                    f"Received an invalid value for `kernel_axes`: {axes!r} has {len(axes)} "
                    f"entries, but layer '{layer.name if layer else name_regex}' has a "
                    f"{kernel.rank}-D {kernel.name}. Lay out layers of other ranks with "
                    "another call."
                )
            axes = _fit_to_shape(axes, kernel.shape, sizes)
            # The bias follows the kernel that makes the layer's output (the last).
            last = index == len(kernels) - 1
            per_weight.update(kernel.axes(axes, is_structured, bias_rank if last else None))
        probes = {}
        if layer is not None and layer.built:
            probes = {w: v.path for w, v in _layer_variables(layer).items()}
        elif layer is not None:
            probes = {w: f"{layer.name}/{w}" for w in per_weight}
        if name_regex in entries:
            if entries[name_regex][0] != per_weight:
                raise ValueError(
                    f"Two sparse layers are named {layer.name!r} but need different "
                    "layouts (one structured and one not, or different sizes). Give them "
                    "distinct names."
                )
            continue
        entries[name_regex] = (per_weight, probes)

    for name_regex, (per_weight, probes) in entries.items():
        for weight, axes in per_weight.items():
            # Anchored at both ends, so that the key means the same whether
            # Keras matches it with `re.fullmatch` or (older) `re.search`;
            # `(?:.*/)?` lets the layer sit in any model or nested model.
            key = f"^(?:.*/)?{name_regex}/{weight}$"
            # Not `key in layout_map`: a LayoutMap answers every key (None
            # when nothing matches), so test the keys themselves.
            if key in list(layout_map):
                if tuple(layout_map[key].axes) != tuple(axes):
                    raise ValueError(
                        f"The LayoutMap already has {key!r} -> {layout_map[key].axes}, "
                        f"but this layer needs {axes}."
                    )
                continue
            if weight in probes:
                _refuse_overlap(layout_map, probes[weight], axes)
            layout_map[key] = keras.distribution.TensorLayout(axes)
    return layout_map


def _refuse_overlap(layout_map, path, axes):
    """A key that also matches the path would make Keras's lookup ambiguous."""
    for key in layout_map:
        if re.fullmatch(key, path):
            raise ValueError(
                f"The LayoutMap entry {key!r} (-> {layout_map[key].axes}) also matches the "
                f"`SparseLinear` weight {path!r}, which needs {tuple(axes)}. Keras refuses "
                "a path that two keys match (and one written for the kernel may not suit "
                "the threshold). Narrow that entry, e.g. anchor it to your Dense layers' "
                "names, and let `get_layout_map` own the sparse layers' weights."
            )


def validate_layout_map(layout_map, model):
    """Check that a `LayoutMap` lays out every sparse layer in `model` consistently.

    For each built sparse layer, the layout that `layout_map` gives each
    weight (by the weight's `path`, as `ModelParallel` looks it up) must have
    the weight's rank, the threshold and `prune_mask` must be laid out like
    the kernel (or, for a per-unit threshold, like the kernel's output axes),
    the bias like the kernel's output axis, and the scalars and driver state
    replicated. Use it on a hand-written map, e.g. after `model = make_model()`
    in a `ModelParallel` scope, to catch a regex that matched the kernel but
    not the threshold.

    Args:
        layout_map: A `keras.distribution.LayoutMap`.
        model: A built Keras model or layer containing sparse layers.

    Raises:
        ValueError: listing every inconsistent or rank-mismatched weight.
    """
    layers = _sparse_layers(model) or []
    problems = []
    for layer in layers:
        if not layer.built:
            problems.append(f"{layer.name}: not built, so its variable paths are unknown")
            continue
        variables = _layer_variables(layer)
        found = {}
        for weight, variable in variables.items():
            rank = len(variable.shape)
            try:
                layout = layout_map[variable.path]
            except ValueError as error:  # several keys match
                problems.append(f"{variable.path}: {error}")
                continue
            axes = (None,) * rank if layout is None else tuple(layout.axes)
            if len(axes) != rank:
                problems.append(
                    f"{variable.path}: layout {axes} has rank {len(axes)}, but the weight "
                    f"has shape {tuple(variable.shape)}"
                )
                continue
            found[weight] = axes
        kernels = _kernels(layer)
        for kernel in kernels:
            if kernel.name not in found:
                continue
            bias_rank = _bias_rank(layer) if kernel is kernels[-1] else None
            expected = kernel.axes(found[kernel.name], layer.structured, bias_rank)
            for weight, axes in expected.items():
                if weight in found and found[weight] != axes:
                    problems.append(
                        f"{variables[weight].path}: laid out as {found[weight]}, but with the "
                        f"kernel laid out as {found[kernel.name]} it should be {axes}"
                    )
    if problems:
        raise ValueError(
            "The LayoutMap does not lay out the sparse layers' weights consistently "
            "(`keras_sparse.get_layout_map` writes consistent entries):\n  " + "\n  ".join(problems)
        )

"""Layout maps for `SparseLinear` under `keras.distribution` (model parallelism).

`SparseLinear` carries more weights than `Dense`, and their shapes depend on
the layer: the unstructured threshold has the kernel's shape, the per-neuron
(structured) threshold has the bias's, and `prune_mask` always has the
kernel's. A `LayoutMap` written for `Dense` therefore either leaves the extra
weights replicated or, with a broad regex, hands a 2-D layout to a 1-D
threshold. `get_layout_map()` writes every entry for you, consistent with
each other; `validate_layout_map()` checks a hand-written map against a model.

Only the JAX backend shards variables through `keras.distribution`;
TensorFlow (`tf.distribute`) and PyTorch (DDP) replicate the layer unchanged
and need no layout map (see the README section "Scaling out").
"""

from __future__ import annotations

import re

import keras

from keras_sparse.layer import SparseLinear

__all__ = ["get_layout_map", "validate_layout_map"]

# The weights `SparseLinear.build()` creates, by name.
_WEIGHTS = ("kernel", "bias", "threshold", "prune_mask", "temperature", "sparsity_penalty")


def _layer_axes(kernel_axes, structured):
    """Axes of every weight of one layer, derived from the kernel's axes."""
    kernel_axes = tuple(kernel_axes)
    out_axes = (kernel_axes[1],)
    return {
        "kernel": kernel_axes,
        "bias": out_axes,
        "threshold": out_axes if structured else kernel_axes,
        "prune_mask": kernel_axes,
        "temperature": (),
        "sparsity_penalty": (),
    }


def _mesh_axis_sizes(device_mesh):
    return dict(zip(device_mesh.axis_names, device_mesh.shape, strict=True))


def _sparse_layers(obj):
    """Every `SparseLinear` in `obj` (itself, or nested at any depth)."""
    if isinstance(obj, SparseLinear):
        return [obj]
    if isinstance(obj, keras.layers.Layer):
        # `_flatten_layers` walks nested models and layers held in attributes.
        return [
            layer
            for layer in obj._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, SparseLinear)
        ]
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
        return (None, model_dim)
    kernel_axes = tuple(kernel_axes)
    if len(kernel_axes) != 2 or any(
        axis is not None and axis not in device_mesh.axis_names for axis in kernel_axes
    ):
        raise ValueError(
            "Received an invalid value for `kernel_axes`, expected two mesh axis names "
            f"or None, from {tuple(device_mesh.axis_names)}. Received: "
            f"kernel_axes={kernel_axes!r}"
        )
    named = [axis for axis in kernel_axes if axis is not None]
    if len(named) != len(set(named)):
        raise ValueError(
            "Received an invalid value for `kernel_axes`: a mesh axis can shard only one "
            f"dimension. Received: kernel_axes={kernel_axes!r}"
        )
    return kernel_axes


def _layer_variables(layer):
    """`{weight name: variable}` of a built `SparseLinear`."""
    return {
        "kernel": layer.kernel,
        "bias": layer.bias,
        "threshold": layer.threshold,
        "prune_mask": layer.prune_mask,
        "temperature": layer._temperature,
        "sparsity_penalty": layer.sparsity_penalty,
    }


def _targets(layers, structured):
    """`(name regex, SparseLinear or None, structured)` for each target."""
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
                f"No `SparseLinear` layer found in {getattr(item, 'name', item)!r}: there "
                "is nothing to lay out."
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
    """Get a `keras.distribution.LayoutMap` for the `SparseLinear` weights.

    The entries follow the kernel: by default the kernel is sharded on its
    output dimension, `(None, "model")`, as `keras.distribution` lays out a
    `Dense` kernel, and then

    | weight                          | layout             |
    |---------------------------------|--------------------|
    | `kernel`, `prune_mask`          | `(None, "model")`  |
    | `bias`                          | `("model",)`       |
    | `threshold`, `structured=True`  | `("model",)`, as the bias   |
    | `threshold`, `structured=False` | `(None, "model")`, as the kernel |
    | `temperature`, `sparsity_penalty` | `()`, replicated |

    so the mask `sigmoid((|kernel| - threshold) * temperature)` is computed
    shard by shard with no communication. With `kernel_axes` the kernel can
    be laid out otherwise (`("model", None)` for a row-parallel layer,
    `("batch", "model")` for FSDP-style sharding as keras-hub's Gemma does);
    the other weights follow it by the same rules.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4),
        axis_names=("batch", "model"),
        devices=keras.distribution.list_devices(),
    )
    model = make_model()  # without keras.Input: named layers, no weights yet
    layout_map = keras_sparse.get_layout_map(mesh, model)
    # or by layer name, before any model exists:
    #   layout_map = keras_sparse.get_layout_map(mesh, "hidden_.*", structured=True)
    #   keras_sparse.get_layout_map(layout_map, "logits", structured=False)  # adds to it

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
        layers: What to lay out: a Keras model or layer (every `SparseLinear`
            in it, at any depth, is found by name; it need not be built, so a
            blueprint of the model to be created under the distribution
            works), a regex for layer names, or a list of those. The variables
            are matched wherever the layer is nested
            (`.../<layer name>/<weight>`), so the model's own name may differ.
        model_parallel_dim_name: The mesh axis the weights are sharded on.
        data_parallel_dim_name: The mesh axis the batch is split on; checked
            to be on the mesh (it may appear in `kernel_axes`).
        structured: For regex entries of `layers` only (required there):
            whether those layers have per-neuron thresholds. A layer object
            knows its own.
        kernel_axes: The kernel's layout, two mesh axis names or `None`.
            Defaults to `(None, model_parallel_dim_name)`.

    Where a layer object tells a dimension's size and the mesh axis does
    not divide it (e.g. 10 output classes on a 4-way model axis), that
    dimension is replicated, in every weight alike, since JAX refuses
    uneven shards.

    Returns:
        The `keras.distribution.LayoutMap`, with one entry per weight and
        layer (or pattern).

    Raises:
        TypeError: `device_mesh` or `layers` is not one of the above.
        ValueError: an axis name is not on the mesh; a pattern comes without
            `structured`; two layers share a name but not a layout; or an
            entry already in the given `LayoutMap` also matches a
            `SparseLinear` weight (Keras would refuse the path matched by two
            keys later, and a key written for a kernel may not suit the
            threshold).
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
        axes = kernel_axes
        probes = {}
        if layer is not None:
            axes = _fit_to_shape(axes, (layer.in_features, layer.units), sizes)
            if layer.built:
                probes = {w: v.path for w, v in _layer_variables(layer).items() if v is not None}
            else:
                probes = {w: f"{layer.name}/{w}" for w in _WEIGHTS}
        per_weight = _layer_axes(axes, is_structured)
        if name_regex in entries:
            if entries[name_regex][0] != per_weight:
                raise ValueError(
                    f"Two `SparseLinear` layers are named {layer.name!r} but need different "
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
                "names, and let `get_layout_map` own the SparseLinear weights."
            )


def validate_layout_map(layout_map, model):
    """Check that a `LayoutMap` lays out every `SparseLinear` in `model` consistently.

    For each built `SparseLinear`, the layout that `layout_map` gives each
    weight (by the weight's `path`, as `ModelParallel` looks it up) must have
    the weight's rank, the threshold and `prune_mask` must be laid out like
    the kernel (or, for a per-neuron threshold, like the bias), the bias like
    the kernel's output dimension, and the scalars replicated. Use it on a
    hand-written map, e.g. after `model = make_model()` in a
    `ModelParallel` scope, to catch a regex that matched the kernel but not
    the threshold.

    Args:
        layout_map: A `keras.distribution.LayoutMap`.
        model: A built Keras model or layer containing `SparseLinear` layers.

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
            if variable is None:
                continue
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
        if "kernel" not in found:
            continue
        expected = _layer_axes(found["kernel"], layer.structured)
        for weight, axes in found.items():
            if axes != expected[weight]:
                problems.append(
                    f"{variables[weight].path}: laid out as {axes}, but with the kernel "
                    f"laid out as {found['kernel']} it should be {expected[weight]}"
                )
    if problems:
        raise ValueError(
            "The LayoutMap does not lay out the SparseLinear weights consistently "
            "(`keras_sparse.get_layout_map` writes consistent entries):\n  " + "\n  ".join(problems)
        )

"""`shrink`: slice dead output neurons out of a model, so that it gets smaller and faster.

A neuron is dead when every weight of its kernel column is zero (what
`SparseLinear(granularity="neuron")` leaves after `hard_prune()`). Its
output does not depend on the input: it is the constant
`activation(bias)`. `shrink(model)` removes such a neuron from its layer
and the matching input row from the next `Dense` layer, whose bias absorbs
the constant's contribution (`constant @ removed_rows`), so that the
smaller model computes the same function with fewer parameters and FLOPs.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_sparse.transforms import _strip


def _to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _check_model(model, caller):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{caller}()` expects a Keras model (`keras.Sequential` or a "
            f"functional `keras.Model`). Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    from keras.src.models.functional import Functional

    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            f"`{caller}()` supports `keras.Sequential` and functional "
            "`keras.Model` instances, whose graph it can follow; "
            f"received a subclassed model of type {type(model).__name__}."
        )


def _dense_arguments(layer):
    """The constructor arguments of a `Dense` layer, serialized (so nothing is shared)."""
    return {
        "units": layer.units,
        "activation": keras.activations.serialize(layer.activation),
        "use_bias": layer.use_bias,
        "kernel_initializer": keras.initializers.serialize(layer.kernel_initializer),
        "bias_initializer": keras.initializers.serialize(layer.bias_initializer),
        "kernel_regularizer": keras.regularizers.serialize(layer.kernel_regularizer),
        "bias_regularizer": keras.regularizers.serialize(layer.bias_regularizer),
        "activity_regularizer": keras.regularizers.serialize(layer.activity_regularizer),
        "kernel_constraint": keras.constraints.serialize(layer.kernel_constraint),
        "bias_constraint": keras.constraints.serialize(layer.bias_constraint),
        "name": layer.name,
        "dtype": layer.dtype_policy,
        "trainable": layer.trainable,
    }


def _clone(model, replace):
    """`clone_model` with `replace(layer) -> new layer or None` and weights copied.

    Layers for which `replace` returns None are cloned from their config and
    get the original's weights; replaced layers are returned as `(old, new)`
    pairs for the caller to fill.
    """
    replaced, cloned = [], []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            cloned.append((layer, new))
        else:
            replaced.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in cloned:
        if getattr(old, "weights", None) and getattr(new, "weights", None):
            new.set_weights(old.get_weights())
    return new_model, replaced


# Layers that act on each feature separately at inference, so a constant
# feature stays a constant and a removed feature removes nothing else.
_STATELESS_PER_FEATURE = (
    keras.layers.Dropout,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Identity,
)
# Built-in activations that map each entry on its own (not softmax, glu, ...).
_ELEMENTWISE_ACTIVATIONS = frozenset(
    """celu elu exponential gelu hard_shrink hard_sigmoid hard_silu hard_swish hard_tanh
    leaky_relu linear log_sigmoid mish relu relu6 selu sigmoid silu soft_shrink softplus
    softsign sparse_plus squareplus swish tanh tanh_shrink""".split()
)


def _activation_is_elementwise(activation):
    if activation is None:
        return True
    try:
        name = keras.activations.serialize(activation)
    except Exception:
        return False
    return isinstance(name, str) and name in _ELEMENTWISE_ACTIVATIONS


def _plain_dense(layer):
    return (
        type(layer) is keras.layers.Dense
        and layer.built
        and not getattr(layer, "lora_enabled", False)
        and not getattr(layer, "quantization_mode", None)
    )


def _per_feature(layer):
    """Whether `layer` maps each feature of its (last-axis) input on its own."""
    if isinstance(layer, _STATELESS_PER_FEATURE):
        return True
    if type(layer) is keras.layers.Activation:
        return _activation_is_elementwise(layer.activation)
    if type(layer) is keras.layers.BatchNormalization:
        spec = layer.input_spec
        rank = spec.ndim if spec is not None else None
        return layer.axis == -1 or (rank is not None and layer.axis == rank - 1)
    return False


def _describe(layer):
    return f"'{layer.name}' ({type(layer).__name__})"


# -------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class LayerShrink:
    """What `shrink()` did to one `Dense` layer.

    Attributes:
        name: The layer's name.
        units_before, units_after: Output neurons before and after.
        inputs_before, inputs_after: Input features before and after (rows
            removed because the previous layer lost neurons).
        dead_kept: Dead neurons (all-zero kernel columns) left in place.
        reason: Why `dead_kept` neurons stay (`None` when none do).
    """

    name: str
    units_before: int
    units_after: int
    inputs_before: int
    inputs_after: int
    dead_kept: int = 0
    reason: str | None = None

    @property
    def removed(self):
        """Output neurons removed."""
        return self.units_before - self.units_after


_HEADERS = ("layer", "units", "inputs", "removed", "dead kept", "why kept")


@dataclasses.dataclass(frozen=True)
class ShrinkResult:
    """The smaller model and what happened to each `Dense` layer.

    Attributes:
        model: The new model, made of plain Keras layers.
        layers: One `LayerShrink` per `Dense` layer of the model (top level),
            in the model's layer order.
        params_before, params_after: `count_params()` of the stripped model
            and of the new one.
        flops_before, flops_after: `2 * inputs * units` summed over those
            layers: the multiply-adds of one input vector, times two.

    `str(result)` is a text table of `layers`.
    """

    model: keras.Model
    layers: tuple
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    def __str__(self):
        rows = [
            (
                r.name,
                f"{r.units_before} -> {r.units_after}",
                f"{r.inputs_before} -> {r.inputs_after}",
                str(r.removed),
                str(r.dead_kept),
                r.reason or "",
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [_HEADERS, *rows]) for i in range(len(_HEADERS))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [_HEADERS, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"params {self.params_before} -> {self.params_after}, "
            f"FLOPs per example {self.flops_before} -> {self.flops_after}"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------- the graph


def _consumers(model, layer, order):
    """The layers reading `layer`'s output, and whether it is a model output."""
    if isinstance(model, keras.Sequential):
        index = order.index(layer)
        if index == len(order) - 1:
            return [], True
        return [order[index + 1]], False
    node = layer._inbound_nodes[0]
    outputs = {id(t) for t in model.outputs}
    is_output = any(id(t) in outputs for t in node.output_tensors)
    return [n.operation for n in layer._outbound_nodes], is_output


def _path_to_next_dense(model, layer, order):
    """`(next Dense, per-feature layers in between)`, or `(None, reason)`."""
    if not _activation_is_elementwise(layer.activation):
        return None, (
            f"the activation of {_describe(layer)} is not elementwise: its other "
            "outputs depend on the dead neurons"
        )
    chain, current = [], layer
    while True:
        if not isinstance(model, keras.Sequential) and len(current._inbound_nodes) != 1:
            return None, f"{_describe(current)} is called more than once (shared)"
        consumers, is_output = _consumers(model, current, order)
        if is_output:
            return None, f"{_describe(current)} is an output of the model"
        if len(consumers) != 1:
            names = ", ".join(_describe(c) for c in consumers)
            return (
                None,
                f"the output of {_describe(current)} feeds {len(consumers)} layers ({names})",
            )
        (consumer,) = consumers
        if _plain_dense(consumer):
            if not isinstance(model, keras.Sequential) and len(consumer._inbound_nodes) != 1:
                return None, f"{_describe(consumer)} is called more than once (shared)"
            return consumer, chain
        if not _per_feature(consumer):
            return None, (
                f"{_describe(consumer)} follows and is not known to act feature by "
                "feature, so its inputs cannot be removed"
            )
        chain.append(consumer)
        current = consumer


def _constants(layer, bias_shift, chain):
    """Each neuron's output when its kernel column is zero, through `chain` (float64)."""
    bias = _to_numpy(layer.bias) if layer.use_bias else np.zeros(layer.units, "float32")
    bias = bias.astype("float64") + bias_shift
    values = keras.ops.convert_to_tensor(bias[None, :].astype("float32"))
    if layer.activation is not None:
        values = layer.activation(values)
    for step in chain:
        values = step(values, training=False)
    return _to_numpy(values)[0].astype("float64")


# ------------------------------------------------------------------- shrink


def shrink(model):
    """A smaller copy of `model`, without its dead output neurons.

    Dead neurons are the all-zero kernel columns of the model's `Dense` and
    `SparseLinear` layers (after `hard_prune()`, a neuron that
    `SparseLinear(granularity="neuron")` pruned). Each one is removed from
    its layer together with the matching input row of the next `Dense`
    layer, whose bias absorbs the neuron's constant output
    (`activation(bias)`, passed through what lies in between), so the new
    model's outputs equal the old one's up to float rounding.

    The model is first `strip()`ped: the result holds only built-in Keras
    layers (`SparseLinear` becomes `Dense` with its pruned weights). Between a
    layer and the next `Dense` there may be layers that act on each feature
    on its own: `Dropout` (and the other noise layers, inactive at
    inference), `Activation` with an elementwise function, `ReLU`,
    `LeakyReLU`, `ELU`, `Identity`, and `BatchNormalization` on the last
    axis (its statistics and scales are sliced too). Dead neurons stay, and
    `result.layers` says why, when removing them is unsafe:

    * the layer's output is an output of the model (its shape would change);
    * its output feeds several layers (a branch), or reaches the next `Dense`
      through any other layer (`Concatenate`, `Add`, `Softmax`, a custom
      layer, ...), or the layer is shared;
    * the next layer is not a plain `Dense` (LoRA-enabled or quantized).

    A layer whose neurons are all dead keeps one, so that it still exists.
    A `Dense` layer without a bias that absorbs a constant gets one. Layers
    inside nested models are stripped but not shrunk.

    Args:
        model: A `keras.Sequential` or functional `keras.Model` (built). It is
            not modified.

    Returns:
        A `ShrinkResult`: `.model` (the new model), `.layers` (one
        `LayerShrink` per top-level `Dense` layer: units and inputs before and
        after, dead neurons kept and why), `.params_before/after` and
        `.flops_before/after`; `print(result)` shows a table.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: the model is subclassed, or not built.

    Example:

    ```python
    model = keras.Sequential([keras.Input((784,)),
        SparseLinear(300, activation="relu", granularity="neuron"),
        SparseLinear(100, activation="relu", granularity="neuron"),
        keras.layers.Dense(10)])
    # ... train with a SparsityScheduler, which hard-prunes at the end ...
    result = keras_sparse.shrink(model)
    print(result)            # fc1: 300 -> 61 units, fc2: inputs 300 -> 61, ...
    small = result.model     # plain Dense layers, same outputs
    ```
    """
    _check_model(model, "shrink")
    if not model.built:
        raise ValueError(
            f"`shrink()` needs a built model; model '{model.name}' is not built. "
            "Call it on data or build it with `keras.Input` first."
        )
    stripped = _strip(model, require_sparse=False)
    order = list(stripped.layers)
    plans = {}  # id(layer) -> dict(keep_cols, keep_rows, bias_shift)
    notes = {}

    def plan(layer):
        if id(layer) not in plans:
            in_features, units = (int(d) for d in layer.kernel.shape)
            plans[id(layer)] = {
                "keep_cols": np.ones(units, bool),
                "keep_rows": np.ones(in_features, bool),
                "bias_shift": np.zeros(units, "float64"),
            }
        return plans[id(layer)]

    slices = {}  # id(per-feature layer with weights) -> keep mask of its features
    dense_layers = [layer for layer in order if _plain_dense(layer)]
    # `model.layers` is in topological order: a layer's input rows are final
    # (its producer came first) by the time its own columns are looked at.
    for layer in dense_layers:
        p = plan(layer)
        kernel = _to_numpy(layer.kernel)[p["keep_rows"]]
        dead = ~np.any(kernel != 0, axis=0)
        if not dead.any():
            continue
        consumer, chain = _path_to_next_dense(stripped, layer, order)
        if consumer is None:
            notes[id(layer)] = (int(dead.sum()), chain)
            continue
        weighted = [step for step in chain if step.weights]
        odd = [s for s in weighted if any(tuple(w.shape) != (layer.units,) for w in s.weights)]
        if odd:
            notes[id(layer)] = (int(dead.sum()), f"{_describe(odd[0])} has weights not per feature")
            continue
        remove = dead.copy()
        if remove.all():
            remove[0] = False
            notes[id(layer)] = (1, "every neuron is dead: one stays so that the layer remains")
        constants = _constants(layer, p["bias_shift"], chain)
        next_kernel = _to_numpy(consumer.kernel).astype("float64")
        p["keep_cols"] &= ~remove
        consumer_plan = plan(consumer)
        consumer_plan["keep_rows"] &= ~remove
        consumer_plan["bias_shift"] += constants[remove] @ next_kernel[remove]
        for step in weighted:
            slices[id(step)] = ~remove

    def replace(layer):
        if id(layer) in plans:
            p = plans[id(layer)]
            arguments = _dense_arguments(layer)
            arguments["units"] = int(p["keep_cols"].sum())
            arguments["use_bias"] = layer.use_bias or bool(np.any(p["bias_shift"] != 0))
            return keras.layers.Dense(**arguments)
        if id(layer) in slices:
            return layer.__class__.from_config(layer.get_config())
        return None

    new_model, replaced = _clone(stripped, replace)
    for old, new in replaced:
        if id(old) in plans:
            p = plans[id(old)]
            kernel = _to_numpy(old.kernel)[p["keep_rows"]][:, p["keep_cols"]]
            bias = _to_numpy(old.bias) if old.use_bias else np.zeros(old.units, "float32")
            bias = (bias.astype("float64") + p["bias_shift"])[p["keep_cols"]]
            weights = [kernel] + ([bias.astype("float32")] if new.use_bias else [])
        else:
            weights = [_to_numpy(w)[slices[id(old)]] for w in old.weights]
        if not new.built:
            new.build((None, int(weights[0].shape[0])))
        new.set_weights(weights)

    new_dense = {layer.name: layer for layer in new_model.layers if _plain_dense(layer)}
    rows, flops_before, flops_after = [], 0, 0
    for layer in dense_layers:
        in_before, units_before = (int(d) for d in layer.kernel.shape)
        in_after, units_after = (int(d) for d in new_dense[layer.name].kernel.shape)
        dead_kept, reason = notes.get(id(layer), (0, None))
        rows.append(
            LayerShrink(
                layer.name, units_before, units_after, in_before, in_after, dead_kept, reason
            )
        )
        flops_before += 2 * in_before * units_before
        flops_after += 2 * in_after * units_after
    return ShrinkResult(
        model=new_model,
        layers=tuple(rows),
        params_before=int(stripped.count_params()),
        params_after=int(new_model.count_params()),
        flops_before=flops_before,
        flops_after=flops_after,
    )

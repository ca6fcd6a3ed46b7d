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
import warnings

import keras
import numpy as np
from keras.src.ops.numpy import Add as _SymbolicAdd  # `x + y` on Keras tensors

from keras_sparse.host import to_numpy
from keras_sparse.transforms import _strip
from keras_sparse.walk import sparse_layers, walk


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


def _clone(model, replace):
    """`clone_model` with `replace(layer) -> new layer or None` and weights copied.

    Layers for which `replace` returns None are cloned from their config and
    get the original's weights; replaced layers are returned as `(old, new)`
    pairs for the caller to fill. A layer whose config does not rebuild it
    (keras-hub's `ViTPatchingAndEmbedding` takes arguments its config lacks;
    `T5TransformerLayer` has no config at all) is taken as it is: `model` is
    `shrink`'s own stripped copy, so no user model shares it.
    """
    replaced, cloned = [], []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            try:
                new = layer.__class__.from_config(layer.get_config())
            except (TypeError, ValueError, NotImplementedError):
                return layer
            cloned.append((layer, new))
        else:
            replaced.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in cloned:
        if getattr(old, "weights", None) and getattr(new, "weights", None):
            new.set_weights([to_numpy(v) for v in old.weights])
    return new_model, replaced


# Layers that pass each channel through on its own at inference (dropout and
# noise are inactive there): a removed channel removes nothing else, and a
# constant channel stays the same constant.
_CHANNEL_IDENTITY = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
)
# Layers that map each channel through its own function: a constant channel
# becomes another constant, found by calling the layer on it.
_CHANNEL_FUNCTION = (
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
)
_ZERO_PADDING = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D)
_KERNELS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
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


def _describe(op):
    if isinstance(op, keras.layers.Layer):
        return f"'{op.name}' ({type(op).__name__})"
    # An operation a functional model records for `x + 3` or `ops.mean(x)`: its class
    # name alone (`Add`) would read as the layer of that name.
    return f"'{op.name}' (the operation {type(op).__name__}, not a layer)"


def _channels_last(op):
    return getattr(op, "data_format", "channels_last") == "channels_last"


def _plain(op):
    return not getattr(op, "lora_enabled", False) and not getattr(op, "quantization_mode", None)


def _role(op, rank):
    """What `shrink` knows `op` does to the channels (last axis) of its input."""
    kind = type(op)
    if kind in _KERNELS and _plain(op) and _channels_last(op) and getattr(op, "groups", 1) == 1:
        return "kernel"
    if kind in _DEPTHWISE and _plain(op) and _channels_last(op):
        return "depthwise"
    if kind is keras.layers.BatchNormalization and op.axis in (-1, rank - 1):
        return "function"
    if kind is keras.layers.Activation:
        return "function" if _activation_is_elementwise(op.activation) else None
    if kind in _CHANNEL_FUNCTION:
        return "function"
    if kind in _CHANNEL_IDENTITY and _channels_last(op):
        return "identity"
    if kind in _ZERO_PADDING and _channels_last(op):
        return "zero_padding"
    if kind in (keras.layers.Add, _SymbolicAdd):
        return "add"
    if kind is keras.layers.Concatenate and op.axis in (-1, rank - 1):
        return "concatenate"
    if kind is keras.layers.Flatten and _channels_last(op):
        return "flatten"
    return None


def _pads_with_zeros(op):
    """Whether `op` sees zeros beyond its input's borders (then a constant is not one there).

    "same" and "causal" padding add `(kernel_size - 1) * dilation` entries: none for a
    kernel of size 1, which therefore sees no padding.
    """
    if _padding(op) == "valid":
        return False
    sizes = np.atleast_1d(getattr(op, "kernel_size", 1))
    rates = np.broadcast_to(np.atleast_1d(getattr(op, "dilation_rate", 1)), sizes.shape)
    return bool(np.any((sizes - 1) * rates > 0))


def _padding(op):
    return getattr(op, "padding", "valid")


# ----------------------------------------------------------------- the graph


@dataclasses.dataclass
class _Channels:
    """The channels (last axis) of one tensor of the graph.

    `first` is the index of channel 0 among all channels of the graph (the
    union-find's slots); `known[c]` says channel c holds the constant
    `value[c]` whatever the model's input.
    """

    first: int
    value: np.ndarray
    known: np.ndarray

    @property
    def slots(self):
        return np.arange(self.first, self.first + len(self.value))


class _ChannelGraph:
    """Channels of a functional graph, grouped where they must be removed together.

    Channels joined by a layer that passes them through (batch norm, an
    activation, pooling, a depthwise convolution, `Add`, `Concatenate`,
    `Flatten`) form one group. A group can be removed when nothing reads it
    except kernels that either ignore it (all-zero input rows) or absorb its
    constant value into their bias exactly; anything else blocks it, with
    the first reason found.
    """

    def __init__(self, graph):
        self.parent = []
        self.reasons = {}  # slot -> why its group must stay
        self.weak_reasons = {}
        self.tensors = {}  # id(KerasTensor) -> _Channels
        self.nodes = [
            node
            for depth in sorted(graph._nodes_by_depth, reverse=True)
            for node in graph._nodes_by_depth[depth]
        ]
        in_graph = {id(node) for node in self.nodes}
        for node in self.nodes:
            op = node.operation
            calls = sum(1 for n in op._inbound_nodes if id(n) in in_graph)
            self._visit(node, shared=calls > 1)
        for tensor in graph.outputs:
            self.block(self.tensors[id(tensor)].slots, "it is an output of the model")

    # union-find over channel slots
    def new(self, tensor, value, known):
        value = np.asarray(value, "float64")
        known = np.broadcast_to(np.asarray(known, bool), value.shape).copy()
        channels = _Channels(len(self.parent), value, known)
        self.parent.extend(range(channels.first, channels.first + len(channels.value)))
        self.tensors[id(tensor)] = channels
        return channels

    def root(self, slot):
        parent = self.parent
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def join(self, a_slots, b_slots):
        for a, b in zip(a_slots, b_slots, strict=True):
            ra, rb = self.root(int(a)), self.root(int(b))
            if ra != rb:
                self.parent[rb] = ra

    def block(self, slots, reason, weak=False):
        """Keep the groups of `slots`. A `weak` reason (where a live channel comes
        from) is reported only when the group meets no other."""
        reasons = self.weak_reasons if weak else self.reasons
        for slot in slots:
            reasons.setdefault(int(slot), reason)

    def group_reasons(self):
        reasons = {}
        for slot, reason in [*self.reasons.items(), *self.weak_reasons.items()]:
            reasons.setdefault(self.root(slot), reason)
        return reasons

    # one layer call
    def _visit(self, node, shared):
        op = node.operation
        outputs = node.output_tensors
        if node.is_input:
            channels = self.new(outputs[0], np.zeros(outputs[0].shape[-1] or 0), False)
            self.block(channels.slots, "it is an input of the model", weak=True)
            return
        inputs = [self.tensors[id(t)] for t in node.input_tensors]
        rank = len(node.input_tensors[0].shape)
        role = None if shared or len(outputs) != 1 else _role(op, rank)
        if role in ("kernel", "depthwise", "function", "identity", "zero_padding", "flatten"):
            if len(inputs) != 1:
                role = None
        if role in ("add", "concatenate") and len(inputs) < 2:
            role = None
        if role is None:
            why = (
                f"{_describe(op)} is called more than once (shared)"
                if shared
                else f"{_describe(op)} reads it and is not known to act channel by channel"
            )
            for channels in inputs:
                self.block(channels.slots, why)
            for tensor in outputs:
                width = tensor.shape[-1] if tensor.shape else 1
                channels = self.new(tensor, np.zeros(width or 0), False)
                self.block(channels.slots, f"{_describe(op)} produces it", weak=True)
            return
        getattr(self, f"_{role}")(op, inputs, outputs[0])

    def _kernel(self, op, inputs, output):
        (x,) = inputs
        kernel = to_numpy(op.kernel)
        # Input channels the kernel does not read: all-zero rows.
        ignored = ~np.any(np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1) != 0, axis=1)
        constant_ok = x.known & ((x.value == 0) | (not _pads_with_zeros(op)))
        self.block(
            x.slots[~ignored & x.known & ~constant_ok],
            f"{_describe(op)} pads its input with zeros (padding={_padding(op)!r}), so a "
            "nonzero constant channel is not constant at its borders and its bias cannot take it",
        )
        self.block(x.slots[~ignored & ~x.known], f"{_describe(op)} reads it", weak=True)
        # A unit is constant when every input channel it reads is: dead units
        # (no input read) and units left so by the layers before.
        sums = kernel.astype("float64").sum(axis=tuple(range(kernel.ndim - 2)))
        reads = np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1, kernel.shape[-2]) != 0
        reads = reads.any(axis=1)  # (units, inputs)
        constant = ~np.any(reads & ~constant_ok[None, :], axis=1)
        units = kernel.shape[-1]
        bias = to_numpy(op.bias).astype("float64") if op.use_bias else np.zeros(units)
        pre = bias + np.where(constant_ok, x.value, 0.0) @ sums
        out = self.new(output, _call(op.activation, pre, 2), constant)
        if not _activation_is_elementwise(op.activation):
            self.block(
                out.slots,
                f"the activation of {_describe(op)} is not elementwise: its other outputs "
                "depend on the dead units",
            )

    def _depthwise(self, op, inputs, output):
        (x,) = inputs
        kernel = to_numpy(op.kernel)  # (*taps, channels, multiplier)
        taps = tuple(range(kernel.ndim - 2))
        sums = kernel.astype("float64").sum(axis=taps)  # (channels, multiplier)
        dead = ~np.any(kernel != 0, axis=taps)
        multiplier = kernel.shape[-1]
        bias = to_numpy(op.bias).astype("float64") if op.use_bias else np.zeros(sums.size)
        bias = bias.reshape(sums.shape)
        constant_ok = x.known & ((x.value == 0) | (not _pads_with_zeros(op)))
        self.block(
            x.slots[x.known & ~constant_ok & ~dead.all(axis=1)],
            f"{_describe(op)} pads its input with zeros (padding={_padding(op)!r}), so a "
            "nonzero constant channel is not constant at its borders",
        )
        pre = np.where(dead, bias, x.value[:, None] * sums + bias)
        known = dead | constant_ok[:, None]
        out = self.new(output, _call(op.activation, pre.reshape(-1), 2), known.reshape(-1))
        self.join(np.repeat(x.slots, multiplier), out.slots)
        if not _activation_is_elementwise(op.activation):
            self.block(out.slots, f"the activation of {_describe(op)} is not elementwise")

    def _function(self, op, inputs, output):
        (x,) = inputs
        out = self.new(output, _call(op, x.value, len(output.shape)), x.known)
        self.join(x.slots, out.slots)

    def _identity(self, op, inputs, output):
        (x,) = inputs
        out = self.new(output, x.value, x.known)
        self.join(x.slots, out.slots)

    def _zero_padding(self, op, inputs, output):
        (x,) = inputs
        stays = x.known & (x.value == 0)
        self.block(
            x.slots[x.known & ~stays],
            f"{_describe(op)} pads with zeros, so a nonzero constant channel is not "
            "constant at the borders",
        )
        out = self.new(output, x.value, stays)
        self.join(x.slots, out.slots)

    def _add(self, op, inputs, output):
        widths = {len(x.value) for x in inputs}
        if len(widths) != 1:  # broadcasting: channels do not line up
            for x in inputs:
                self.block(x.slots, f"{_describe(op)} broadcasts its inputs")
            self.block(self.new(output, np.zeros(output.shape[-1]), False).slots, "broadcast")
            return
        known = np.logical_and.reduce([x.known for x in inputs])
        mixed = np.logical_or.reduce([x.known for x in inputs]) & ~known
        out = self.new(output, sum(x.value for x in inputs), known)
        for x in inputs:
            self.join(x.slots, out.slots)
        self.block(
            out.slots[mixed],
            f"{_describe(op)} adds it to a channel of another branch that is not dead",
        )

    def _concatenate(self, op, inputs, output):
        out = self.new(
            output,
            np.concatenate([x.value for x in inputs]),
            np.concatenate([x.known for x in inputs]),
        )
        self.join(np.concatenate([x.slots for x in inputs]), out.slots)

    def _flatten(self, op, inputs, output):
        (x,) = inputs
        # channels_last: entry `p * channels + c` of the output is channel c at position p.
        positions = output.shape[-1] // len(x.value)
        out = self.new(output, np.tile(x.value, positions), np.tile(x.known, positions))
        self.join(np.tile(x.slots, positions), out.slots)


def _call(function, values, rank):
    """`function` applied to a tensor holding `values` along its last axis (float64 out)."""
    if function is None:
        return np.asarray(values, "float64")
    shaped = np.asarray(values, "float32").reshape((1,) * (rank - 1) + (-1,))
    tensor = keras.ops.convert_to_tensor(shaped)
    if isinstance(function, keras.layers.Layer):
        result = function(tensor, training=False)
    else:
        result = function(tensor)
    return to_numpy(result).reshape(-1).astype("float64")


# -------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class LayerShrink:
    """What `shrink()` did to one layer with a kernel (`Dense`, a convolution, attention).

    Attributes:
        name: The layer's name.
        units_before, units_after: Output units before and after (a Dense
            layer's neurons, a convolution's filters or output channels, a
            `MultiHeadAttention`'s heads).
        inputs_before, inputs_after: Input features (channels) before and
            after: rows removed because the layers before lost units.
        dead_kept: Dead output units (all-zero kernel slices) left in place.
        reason: Why `dead_kept` units stay (`None` when none do).
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
        """Output units removed."""
        return self.units_before - self.units_after


_HEADERS = ("layer", "units", "inputs", "removed", "dead kept", "why kept")


@dataclasses.dataclass(frozen=True)
class ShrinkResult:
    """The smaller model and what happened to each layer with a kernel.

    Attributes:
        model: The new model, made of plain Keras layers.
        layers: One `LayerShrink` per top-level `Dense`, convolution,
            depthwise convolution and `MultiHeadAttention` of the model, in
            the model's layer order.
        params_before, params_after: `count_params()` of the stripped model
            and of the new one.
        flops_before, flops_after: The multiply-adds of those layers for one
            example, times two; `None` when the model has none at its top
            level (a keras-hub backbone's are inside its blocks).

    `str(result)` is a text table of `layers`.
    """

    model: keras.Model
    layers: tuple
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None

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
        flops = (
            f"FLOPs per example {self.flops_before} -> {self.flops_after}"
            if self.flops_before is not None
            else "FLOPs not counted (shrink counts those of the kernel layers it follows at "
            "the model's top level, and it follows none here: they are nested, shared, or "
            "of a kind it does not resize)"
        )
        lines.append(f"params {self.params_before} -> {self.params_after}, {flops}")
        return "\n".join(lines)


# ------------------------------------------------------------------- shrink


def _flops(layer):
    """Twice the multiply-adds of one example through `layer` (its kernel at each position)."""
    positions = 1
    for d in layer.output.shape[1:-1]:
        positions *= int(d or 1)
    return 2 * positions * int(np.prod(layer.kernel.shape))


_REPORTED = (
    *_KERNELS,
    *_DEPTHWISE,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.EinsumDense,
)


def _units(layer):
    """`(units x weights matrix, input features)` of a layer with a kernel: each row holds
    one output unit's weights (a neuron, a filter, an output channel)."""
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        kernel = to_numpy(layer.pointwise_kernel)
        inputs = int(layer.depthwise_kernel.shape[-2])
        return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1), inputs
    kernel = to_numpy(layer.kernel)
    if isinstance(layer, _DEPTHWISE):  # (*taps, channels, multiplier): unit c * m + j
        units = np.moveaxis(kernel.reshape(*kernel.shape[:-2], -1), -1, 0)
        return units.reshape(units.shape[0], -1), int(kernel.shape[-2])
    if isinstance(
        layer,
        (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose),
    ):  # (*taps, filters, input channels)
        return np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1), int(kernel.shape[-1])
    if isinstance(layer, keras.layers.EinsumDense):
        from keras_sparse.layers import _einsum_axes

        output_axes, _ = _einsum_axes(layer)
        rest = [a for a in range(kernel.ndim) if a not in output_axes]
        moved = np.transpose(kernel, (*output_axes, *rest))
        units = int(np.prod([kernel.shape[a] for a in output_axes]))
        return moved.reshape(units, -1), int(np.prod([kernel.shape[a] for a in rest]))
    return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1), int(kernel.shape[-2])


def _dead_units(layer):
    """How many output units of a layer with a kernel have an all-zero kernel slice."""
    units, _ = _units(layer)
    return int(np.sum(~np.any(units != 0, axis=1)))


def _why_not_followed(layer, node):
    if node is None:
        return f"{_describe(layer)} is called more than once (shared)"
    if not _channels_last(layer):
        return f"{_describe(layer)} is channels_first: shrink follows channels_last layers only"
    if getattr(layer, "groups", 1) != 1:
        return f"{_describe(layer)} is a grouped convolution (groups={layer.groups})"
    if not _plain(layer):
        return f"{_describe(layer)} is LoRA-enabled or quantized"
    return f"shrink does not remove the units of a {type(layer).__name__} layer"


def _dead_heads(layer):
    """Per head of an attention layer, whether its slice of the output kernel is all zero."""
    kernel = to_numpy(layer._output_dense.kernel)  # (heads, head_dim, out)
    return ~np.any(kernel.reshape(kernel.shape[0], -1) != 0, axis=1)


def _warn_about_nested_dead_units(model, shrunk_attention):
    """Dead units inside nested models and custom layers, and dead heads of attention layers
    shrink does not rebuild (`shrunk_attention`: the ids of those it does), stay: say so."""
    top = {id(layer) for layer in model.layers}
    layers = [layer for layer, _ in walk(model) if layer.built]
    nested = [
        (layer, _dead_units(layer))
        for layer in layers
        if id(layer) not in top and isinstance(layer, _REPORTED)
    ]
    nested = [(layer, dead) for layer, dead in nested if dead]
    if nested:
        names = ", ".join(f"'{layer.name}' ({dead})" for layer, dead in nested[:10])
        more = f" and {len(nested) - 10} more" if len(nested) > 10 else ""
        warnings.warn(
            f"shrink() left the dead units of {len(nested)} layer(s) inside nested models or "
            f"custom layers in place (it follows the top-level graph only): {names}{more}",
            stacklevel=3,
        )
    attention = [
        (layer, int(_dead_heads(layer).sum()))
        for layer in layers
        if isinstance(layer, keras.layers.MultiHeadAttention) and id(layer) not in shrunk_attention
    ]
    attention = [(layer, dead) for layer, dead in attention if dead]
    if attention:
        names = ", ".join(
            f"'{layer.name}' ({type(layer).__name__}, {dead} of {layer.num_heads} heads)"
            for layer, dead in attention
        )
        warnings.warn(
            f"shrink() left the dead heads of {len(attention)} attention layer(s) in place: "
            "it rebuilds top-level keras.layers.MultiHeadAttention layers only, not subclasses "
            f"or those inside other layers (keras-hub blocks): {names}",
            stacklevel=3,
        )


_PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense")


def _copy_kept_heads(old, new, keep_heads):
    """`old`'s weights into `new`, a MultiHeadAttention with only the heads `keep_heads`."""
    for name in _PROJECTIONS:  # kernels (input_dim, heads, head_dim), biases (heads, head_dim)
        source, target = getattr(old, name), getattr(new, name)
        target.kernel.assign(to_numpy(source.kernel)[:, keep_heads])
        if source.bias is not None:
            target.bias.assign(to_numpy(source.bias)[keep_heads])
    source, target = old._output_dense, new._output_dense  # kernel (heads, head_dim, out)
    target.kernel.assign(to_numpy(source.kernel)[keep_heads])
    if source.bias is not None:
        target.bias.assign(to_numpy(source.bias))


def _attention_flops(layer):
    """Twice the multiply-adds of one example through attention: the four projections at
    each position, the scores and the weighted sum (sequence lengths from its input)."""
    node = layer._inbound_nodes[0]
    query, value = (
        node.input_tensors[0],
        node.input_tensors[1 if len(node.input_tensors) > 1 else 0],
    )
    length_q = int(np.prod([d or 1 for d in query.shape[1:-1]]))
    length_v = int(np.prod([d or 1 for d in value.shape[1:-1]]))
    size = lambda dense: int(np.prod(dense.kernel.shape))  # noqa: E731
    projections = length_q * (size(layer._query_dense) + size(layer._output_dense)) + length_v * (
        size(layer._key_dense) + size(layer._value_dense)
    )
    heads, key_dim = layer._query_dense.kernel.shape[1:]
    value_dim = layer._value_dense.kernel.shape[-1]
    return 2 * (projections + int(heads) * length_q * length_v * int(key_dim + value_dim))


def shrink(model):
    """A smaller copy of `model`, without its dead output units.

    Dead units are the all-zero kernel slices of the model's `Dense`,
    `Conv1D/2D/3D` and depthwise convolution layers (or their sparse twins,
    after `hard_prune()`): a neuron or a filter that
    `granularity="neuron"` pruned. Such a unit outputs a constant,
    `activation(bias)`, whatever the input. `shrink` follows the model's
    graph from each one to the kernels that read it and removes the channel
    all along the way: the filter itself, its slice of each
    `BatchNormalization` and depthwise kernel in between, and the input rows
    of the kernels that read it, whose biases absorb the constant, so the
    new model's outputs equal the old one's up to float rounding.

    The model is first `strip()`ped: the result holds only built-in Keras
    layers. Between a unit and the kernels reading it there may be layers
    that treat each channel on its own: `BatchNormalization` (last axis),
    `Activation` with an elementwise function, `ReLU` and friends,
    `Dropout` and the noise layers (inactive at inference), pooling
    (local and global), up-sampling, cropping, zero padding, depthwise
    convolutions (whose channel goes with its input channel), `Flatten`
    (into a `Dense`), and `Add` or `Concatenate` on the last axis. Channels
    joined by an `Add` are removed only where every branch agrees. Dead
    units stay, and `result.layers` says why, when removing them would
    change the model's outputs or shape:

    * the channel is an output or an input of the model;
    * it reaches any other layer (`Softmax`, `LayerNormalization`,
      `Reshape`, attention, a nested model, a shared layer, ...), or an
      `Add` joins it to a channel of another branch that is not dead;
    * its constant is not zero and reaches a convolution (or `ZeroPadding`)
      that pads with zeros: at the borders the padding, not the constant,
      is what the kernel sees, so no bias can stand for it;
    * the layer's activation is not elementwise (softmax).

    A `MultiHeadAttention` loses its dead heads: those whose slice of the
    output projection is all zero (what `SparseMultiHeadAttention(
    granularity="head")` prunes) add nothing, so the layer is rebuilt with
    fewer heads, their query, key, value and output slices removed.

    A layer whose units are all dead keeps one, so that it still exists. A
    layer without a bias that absorbs a constant gets one. Layers inside
    nested models are stripped but not shrunk. Only `channels_last` layers
    are followed.

    Args:
        model: A `keras.Sequential` or functional `keras.Model` (built). It is
            not modified.

    Returns:
        A `ShrinkResult`: `.model` (the new model), `.layers` (one
        `LayerShrink` per top-level kernel layer shrink follows, and one per
        other layer holding dead units, such as a shared or nested one: units
        and inputs before and after, dead units kept and why),
        `.params_before/after` and `.flops_before/after`; `print(result)`
        shows a table.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: the model is subclassed, or not built.

    Example:

    ```python
    model = keras.Sequential([keras.Input((28, 28, 1)),
        SparseConv2D(32, 3, activation="relu", granularity="neuron"),
        keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        SparseLinear(100, activation="relu", granularity="neuron"),
        keras.layers.Dense(10)])
    # ... train with a SparsityScheduler, which hard-prunes at the end ...
    result = keras_sparse.shrink(model)
    print(result)            # filters and neurons before and after, and why any stay
    small = result.model     # plain Keras layers, same outputs
    ```
    """
    _check_model(model, "shrink")
    if not model.built:
        raise ValueError(
            f"`shrink()` needs a built model; model '{model.name}' is not built. "
            "Call it on data or build it with `keras.Input` first."
        )
    stripped = _strip(model, require_sparse=False, caller="shrink()")
    graph = stripped._functional if isinstance(stripped, keras.Sequential) else stripped
    if graph is None:
        raise ValueError(
            f"`shrink()` needs a model with a graph; Sequential '{model.name}' has none. "
            "Start it with `keras.Input(shape)`."
        )
    channels = _ChannelGraph(graph)
    blocked = channels.group_reasons()

    def removable(tensor):
        return np.array([channels.root(int(s)) not in blocked for s in tensor.slots], bool)

    def layer_node(layer):
        nodes = [n for n in channels.nodes if n.operation is layer]
        return nodes[0] if len(nodes) == 1 else None

    kernel_layers = []
    for layer in stripped.layers:
        node = layer_node(layer)
        if (
            node is None
            or node.is_input
            or _role(layer, len(node.input_tensors[0].shape))
            not in (
                "kernel",
                "depthwise",
            )
        ):
            continue
        if len(node.input_tensors) == 1:
            kernel_layers.append((layer, node))

    # A layer whose units would all go keeps its first one.
    for layer, node in kernel_layers:
        out = channels.tensors[id(node.output_tensors[0])]
        if removable(out).all():
            blocked[channels.root(int(out.slots[0]))] = (
                f"every unit of {_describe(layer)} is dead: one stays so that the layer remains"
            )

    keep = {key: ~removable(tensor) for key, tensor in channels.tensors.items()}

    def keeps(node):
        x, y = node.input_tensors[0], node.output_tensors[0]
        return keep[id(x)], keep[id(y)]

    plans = {}
    for layer, node in kernel_layers:
        keep_in, keep_out = keeps(node)
        if keep_in.all() and keep_out.all():
            continue
        kernel = to_numpy(layer.kernel).astype("float64")
        x = channels.tensors[id(node.input_tensors[0])]
        shift = None
        if type(layer) in _KERNELS:
            dropped = ~keep_in
            value = np.where(x.known & dropped, x.value, 0.0)
            rows = kernel.sum(axis=tuple(range(kernel.ndim - 2)))  # (inputs, units)
            shift = value @ rows
        plans[id(layer)] = (keep_in, keep_out, shift)
    for layer in stripped.layers:
        node = layer_node(layer)
        if (
            id(layer) not in plans
            and node is not None
            and type(layer) is keras.layers.BatchNormalization
            and not keep[id(node.output_tensors[0])].all()
        ):
            plans[id(layer)] = (keep[id(node.output_tensors[0])], None, None)

    heads = {}  # id(attention layer) -> keep mask of its heads, and why a dead one stays
    for layer in stripped.layers:
        if type(layer) is keras.layers.MultiHeadAttention and layer.built:
            dead = _dead_heads(layer)
            reason = None
            if dead.all():
                dead[0] = False
                reason = f"every head of {_describe(layer)} is dead: one stays"
            heads[id(layer)] = (~dead, reason)

    def replace(layer):
        if id(layer) in heads:
            keep_heads, _ = heads[id(layer)]
            if keep_heads.all():
                return None
            return layer.__class__.from_config(
                {**layer.get_config(), "num_heads": int(keep_heads.sum())}
            )
        if id(layer) not in plans:
            return None
        keep_in, keep_out, shift = plans[id(layer)]
        config = layer.get_config()
        if type(layer) in _KERNELS:
            config["units" if "units" in config else "filters"] = int(keep_out.sum())
            config["use_bias"] = layer.use_bias or bool(np.any(shift[keep_out] != 0))
        return layer.__class__.from_config(config)

    new_model, replaced = _clone(stripped, replace)
    for old, new in replaced:
        if id(old) in heads:
            _copy_kept_heads(old, new, heads[id(old)][0])
            continue
        keep_in, keep_out, shift = plans[id(old)]
        if type(old) in _KERNELS:
            kernel = to_numpy(old.kernel)[..., keep_in, :][..., keep_out]
            bias = to_numpy(old.bias).astype("float64") if old.use_bias else 0.0
            bias = (bias + shift)[keep_out]
            weights = [kernel] + ([bias.astype("float32")] if new.use_bias else [])
        elif type(old) in _DEPTHWISE:
            kernel = to_numpy(old.kernel)[..., keep_in, :]
            weights = [kernel]
            if old.use_bias:
                bias = to_numpy(old.bias).reshape(-1, kernel.shape[-1])
                weights.append(bias[keep_in].reshape(-1))
        else:
            weights = [to_numpy(w)[keep_in] for w in old.weights]
        new.set_weights(weights)

    new_layers = {layer.name: layer for layer in new_model.layers}
    rows, flops_before, flops_after = [], 0, 0
    for layer, node in kernel_layers:
        keep_in, keep_out = keeps(node)
        out = channels.tensors[id(node.output_tensors[0])]
        kernel = to_numpy(layer.kernel)
        kept_dead = out.slots[out.known & keep_out]
        reason = blocked.get(channels.root(int(kept_dead[0]))) if len(kept_dead) else None
        if type(layer) in _DEPTHWISE:
            inputs_before, units_before = kernel.shape[-2], kernel.shape[-2] * kernel.shape[-1]
        else:
            inputs_before, units_before = kernel.shape[-2], kernel.shape[-1]
        new = new_layers[layer.name]
        rows.append(
            LayerShrink(
                layer.name,
                int(units_before),
                int(units_before - (~keep_out).sum()),
                int(inputs_before),
                int(inputs_before - (~keep_in).sum()),
                int(len(kept_dead)),
                reason,
            )
        )
        flops_before += _flops(layer)
        flops_after += _flops(new)
    for layer in stripped.layers:
        if id(layer) in heads:
            keep_heads, reason = heads[id(layer)]
            width = int(layer._output_dense.kernel.shape[-1])
            kept = int(keep_heads.sum())
            rows.append(
                LayerShrink(
                    layer.name,
                    len(keep_heads),
                    kept,
                    width,
                    width,
                    int(reason is not None),
                    reason,
                )
            )
            flops_before += _attention_flops(layer)
            flops_after += _attention_flops(new_layers[layer.name])
    handled = {id(layer) for layer, _ in kernel_layers} | set(heads)
    for layer in stripped.layers:
        if id(layer) in handled or not isinstance(layer, _REPORTED) or not layer.built:
            continue
        dead = _dead_units(layer)
        if dead:
            units, inputs = _units(layer)
            rows.append(
                LayerShrink(
                    layer.name,
                    len(units),
                    len(units),
                    inputs,
                    inputs,
                    dead,
                    _why_not_followed(layer, layer_node(layer)),
                )
            )
    order = {layer.name: i for i, layer in enumerate(stripped.layers)}
    rows.sort(key=lambda row: order[row.name])
    _warn_about_nested_dead_units(stripped, set(heads))
    result = ShrinkResult(
        model=new_model,
        layers=tuple(rows),
        params_before=int(stripped.count_params()),
        params_after=int(new_model.count_params()),
        flops_before=flops_before if kernel_layers or heads else None,
        flops_after=flops_after if kernel_layers or heads else None,
    )
    _warn_if_single_weights_left_nothing(model, result)
    return result


def _warn_if_single_weights_left_nothing(model, result):
    """A model whose masks all prune single weights rarely has a whole dead unit: when
    nothing went, say what shrink needs, and what serves such zeros instead."""
    masked = sparse_layers(model)
    if result.params_after < result.params_before or not masked:
        return
    if any(layer.mask_options.granularity == "neuron" for layer in masked):
        return
    kinds = sorted({repr(layer.mask_options.granularity) for layer in masked})
    warnings.warn(
        "shrink() removed nothing: it removes whole units (neurons, filters, heads) whose "
        f"weights are all zero, and every sparse layer of model '{model.name}' prunes single "
        f"weights (granularity={' or '.join(kinds)}), which leaves units alive. Sparsify "
        "with granularity='neuron' (or 'head' for attention) to prune units shrink can "
        "remove; strip() serves single-weight zeros.",
        stacklevel=3,
    )

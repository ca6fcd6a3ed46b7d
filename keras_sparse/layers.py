"""Pruning versions of Keras's kernel-bearing layers: the stock layer reading its kernel masked.

Every stock layer that holds a kernel reads it through one attribute in
`call()` (`self.kernel`, `self.embeddings`, ...): the hook that Keras's own
`enable_lora()` uses. `SparseKernelMixin` turns that attribute into a
property that, inside `call()`, returns the kernel times its `KernelMask`
(`keras_sparse.mask`), so the stock arithmetic runs unchanged on the masked
kernel. A `Sparse<StockName>` class is then the mixin, the stock class, and
one table entry saying which axes of its kernel index output units:

| class | kernel | output units | N:M groups along |
|:--|:--|:--|:--|
| `SparseLinear` (`Dense`) | `(in, units)` | units | inputs |
| `SparseEinsumDense` | from the equation | axes in the output | last reduced axis |
| `SparseConv1D/2D/3D` | `(*k, in, filters)` | filters | input channels |
| `SparseConv1D/2D/3DTranspose` | `(*k, filters, in)` | filters | input channels |
| `SparseDepthwiseConv1D/2D` | `(*k, in, multiplier)` | (in, multiplier) | (none) |
| `SparseSeparableConv1D/2D` | depthwise, pointwise | each as above | pointwise inputs |
| `SparseEmbedding` | `(vocabulary, dim)` | rows | (none) |

`SparseMultiHeadAttention` is `MultiHeadAttention` with its four projections
built as `SparseEinsumDense`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
import warnings

import keras
import numpy as np

from keras_sparse.host import to_numpy
from keras_sparse.mask import (
    DEFAULT_RELATIVE_TEMPERATURE,
    STATE_FIELDS,
    KernelMask,
    MaskOptions,
    check_bool,
)

__all__ = [
    "DEFAULT_RELATIVE_TEMPERATURE",
    "SparseKernelMixin",
    "SparseLinear",
    "SparseDense",
    "SparseEinsumDense",
    "SparseConv1D",
    "SparseConv2D",
    "SparseConv3D",
    "SparseConv1DTranspose",
    "SparseConv2DTranspose",
    "SparseConv3DTranspose",
    "SparseDepthwiseConv1D",
    "SparseDepthwiseConv2D",
    "SparseSeparableConv1D",
    "SparseSeparableConv2D",
    "SparseEmbedding",
    "SparseMultiHeadAttention",
    "SPARSE_CLASSES",
]


class MaskedKernel(typing.NamedTuple):
    """Which kernel of a layer is pruned, and how its axes read.

    Attributes:
        output_axes: The kernel's axes that index output units, or a
            function `layer -> (output_axes, n_m_axis)` for kernels whose
            layout depends on the layer (EinsumDense's equation).
        n_m_axis: The reduction axis along which N:M groups run; `None`
            when there is none (granularity `"n:m"` is then refused).
        initializer: The layer attribute holding the kernel's initializer.
        prefix: Put before the mask's variable names, for layers with two
            pruned kernels.
        present: A function `layer -> bool` for a kernel that only some
            layers of the class hold (keras-hub's `reverse_embeddings`,
            absent when the weights are tied); `None`: every layer holds it.
    """

    output_axes: object
    n_m_axis: int | None
    initializer: str
    prefix: str = ""
    present: object = None


def _einsum_axes(layer):
    """EinsumDense: the kernel axes named in the output are output units; the last other one
    is the reduction axis N:M runs along. A parent may name the unit axes itself
    (`_sparse_unit_axes`: the heads axis of an attention output projection)."""
    units = getattr(layer, "_sparse_unit_axes", None)
    if units is not None:
        return tuple(units), None
    inputs_and_kernel, output = layer.equation.split("->")
    kernel = inputs_and_kernel.split(",")[1].strip()
    output_axes = tuple(i for i, letter in enumerate(kernel) if letter in output)
    reduced = [i for i in range(len(kernel)) if i not in output_axes]
    return output_axes, (reduced[-1] if reduced else None)


def _stock_class(cls):
    """The Keras layer class a sparse class extends (the first base after the mixin)."""
    mro = cls.__mro__
    return mro[mro.index(SparseKernelMixin) + 1]


def _with_training(signature):
    """`signature` with a keyword `training=None` added if it has none."""
    if "training" in signature.parameters:
        return signature
    parameters = list(signature.parameters.values())
    training = inspect.Parameter("training", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next(
        (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
        len(parameters),
    )
    return signature.replace(parameters=parameters[:at] + [training] + parameters[at:])


def lora_factors(layer, name):
    """The `(a, b)` variables of `enable_lora()`'s update to kernel `name`, or `None`.

    Keras adapts a layer's main kernel (`kernel`, an Embedding's
    `embeddings`); any other kernel (keras-hub's `reverse_embeddings`) has
    no low-rank update.
    """
    if not getattr(layer, "lora_enabled", False):
        return None
    names = {"kernel": ("lora_kernel_a", "lora_kernel_b")}
    names["embeddings"] = ("lora_embeddings_a", "lora_embeddings_b")
    if name not in names:
        return None
    return tuple(getattr(layer, factor) for factor in names[name])


def _masked_property(name, stock_property):
    """The `name` attribute of a sparse layer: masked inside `call()`, the raw variable outside."""
    slot = "_" + name

    def get(self):
        raw = self.__dict__.get(slot)
        training = self.__dict__.get("_mask_training")
        masks = self.__dict__.get("_kernel_masks")
        if raw is None or training is None or not masks or self.quantization_mode:
            # Outside `call()` (and for a quantized layer, whose stock call
            # reads its own variables), exactly what the stock layer gives.
            if isinstance(stock_property, property):
                return stock_property.fget(self)
            return raw
        kernel = masks[name].masked_kernel(training)
        factors = lora_factors(self, name)
        if factors:
            # A sparse base and a dense low-rank update, as `enable_lora()` adds it.
            a, b = factors
            kernel = kernel + (self.lora_alpha / self.lora_rank) * keras.ops.matmul(a, b)
        if self.compute_dtype != "float32":
            kernel = keras.ops.cast(kernel, self.compute_dtype)
        return kernel

    def set(self, value):
        setattr(self, slot, value)

    def delete(self):
        # Keras's `quantize()` deletes a kernel it replaces (keras-hub's
        # ReversibleEmbedding its `reverse_embeddings`).
        delattr(self, slot)

    return property(get, set, delete, doc=f"The `{name}`: masked inside `call()`, raw outside.")


class SparseKernelMixin:
    """Reads a stock layer's kernel(s) through a learnable pruning mask.

    Put it first in the bases of a subclass of a stock Keras layer and say,
    in `masked_kernels`, which attributes are kernels and how their axes
    read (see `MaskedKernel`). The stock `build()` creates the kernel, the
    mixin then adds each kernel's `KernelMask`; the stock `call()` reads
    the kernel through a property that masks it. The pruning arguments
    (`structured`, `temperature`, `threshold_*`, `straight_through`,
    `inference_mask`, `granularity`, `n_m`) are keyword arguments of every
    sparse layer, described in `SparseLinear`.
    """

    masked_kernels: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.masked_kernels:
            return
        stock = _stock_class(cls)
        for name in cls.masked_kernels:
            if name not in cls.__dict__:
                setattr(
                    cls, name, _masked_property(name, inspect.getattr_static(stock, name, None))
                )
        cls._stock_call_takes_training = "training" in inspect.signature(stock.call).parameters
        if "call" not in cls.__dict__:
            stock_call = stock.call
            takes_training = cls._stock_call_takes_training

            def call(self, *args, training=None, **kwargs):
                previous = self.__dict__.get("_mask_training")
                # Read by the kernel properties while the stock `call()` runs.
                object.__setattr__(self, "_mask_training", bool(training))
                try:
                    if takes_training:
                        kwargs["training"] = training
                    return stock_call(self, *args, **kwargs)
                finally:
                    object.__setattr__(self, "_mask_training", previous)

            # Keras reads `call`'s signature to pass `training` and to bind inputs.
            call.__signature__ = _with_training(inspect.signature(stock_call))
            call.__doc__ = stock_call.__doc__
            cls.call = call
        if "build" not in cls.__dict__:
            stock_build = stock.build

            # Every stock kernel layer builds from one `input_shape` (Keras
            # records the argument by this name for `get_build_config`).
            def build(self, input_shape=None):
                stock_build(self, input_shape)
                self._build_masks()

            cls.build = build

    def __init__(
        self,
        *args,
        structured=True,
        temperature=None,
        threshold_initializer="zeros",
        threshold_regularizer=None,
        threshold_constraint="non_neg",
        straight_through=False,
        inference_mask="hard",
        granularity="weight",
        n_m=None,
        **kwargs,
    ):
        options = MaskOptions.check(
            n_m_supported=self._n_m_supported(),
            structured=structured,
            temperature=temperature,
            threshold_initializer=threshold_initializer,
            threshold_regularizer=threshold_regularizer,
            threshold_constraint=threshold_constraint,
            straight_through=straight_through,
            inference_mask=inference_mask,
            granularity=granularity,
            n_m=n_m,
        )
        # Set first: a stock `__init__` may build the layer (Embedding with `weights=`).
        object.__setattr__(self, "mask_options", options)
        object.__setattr__(self, "_kernel_masks", {})
        super().__init__(*args, **kwargs)

    @classmethod
    def _n_m_supported(cls):
        return all(
            callable(spec.output_axes) or spec.n_m_axis is not None
            for spec in cls.masked_kernels.values()
        )

    # ------------------------------------------------------------- build

    def add_weight(self, *args, name=None, dtype=None, autocast=True, **kwargs):
        # The pruned kernels are float32 whatever the dtype policy, and are
        # read without autocasting: the mask is computed in float32 and only
        # the masked kernel is cast to the compute dtype. Other weights follow
        # the policy, as in the stock layer.
        if name in self.masked_kernels and (dtype is None or keras.backend.is_float_dtype(dtype)):
            dtype, autocast = "float32", False
        return super().add_weight(*args, name=name, dtype=dtype, autocast=autocast, **kwargs)

    def _build_masks(self):
        # A stock build that enables LoRA (`lora_rank=`) locks the state early.
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            self._create_masks()
        finally:
            if was_locked:
                self._tracker.lock()
        if self.quantization_mode:  # built quantized (from a config, a load's conversion)
            self._fix_masks_of_quantized_kernels()

    def _fix_masks_of_quantized_kernels(self):
        """Freeze every mask for good, in its state too (which a later SparsityScheduler
        reads): a quantized kernel holds the pruned weights' zeros, and is not trained."""
        frozen = STATE_FIELDS.index("frozen")
        for mask in self._kernel_masks.values():
            state = np.array(to_numpy(mask.sparsity_state), "float32")
            state[frozen] = 1.0
            mask.sparsity_state.assign(state)
            mask.frozen = True

    def _held_kernels(self):
        """`masked_kernels`, less those this layer does not hold (see `MaskedKernel.present`)."""
        return {
            name: spec
            for name, spec in self.masked_kernels.items()
            if spec.present is None or spec.present(self)
        }

    def _create_masks(self):
        masks = {}
        for name, spec in self._held_kernels().items():
            output_axes, n_m_axis = spec.output_axes, spec.n_m_axis
            if callable(output_axes):
                output_axes, n_m_axis = output_axes(self)
            if self.mask_options.granularity == "n:m" and n_m_axis is None:
                raise ValueError(
                    f"Layer '{self.name}' cannot take granularity='n:m': its {name} has no "
                    "reduction axis for N:M groups to run along."
                )
            mask = KernelMask(self, name, output_axes, n_m_axis, self.mask_options, spec.prefix)
            mask.build(initializer=getattr(self, spec.initializer, None))
            masks[name] = mask
        object.__setattr__(self, "_kernel_masks", masks)

    # ------------------------------------------------------- saving

    def _saved_variables(self):
        """Every variable, in the order files hold them: the stock layer's (in its own
        serialization order when it has one, as a quantized layer's), then each mask's."""
        masks = list(self._kernel_masks.values())
        mask_variables = [v for mask in masks for v in mask.variables]
        taken = {id(v) for v in mask_variables}
        own = [
            v
            for v in self._trainable_variables + self._non_trainable_variables
            if id(v) not in taken
        ]
        spec = getattr(self, "variable_serialization_spec", None) or {}
        names = spec.get(self.quantization_mode, [])
        ordered = []
        for name in names:
            variable = getattr(self, "_" + name, None) if name in self.masked_kernels else None
            variable = variable if variable is not None else getattr(self, name, None)
            if variable is not None and any(variable is v for v in own):
                ordered.append(variable)
        ordered += [v for v in own if not any(v is o for o in ordered)]
        return ordered + mask_variables

    def save_own_variables(self, store):
        # Every variable, the masks' too (the stock layers' own method would
        # save their kernel and bias only, and merge a LoRA update).
        unfrozen = [
            mask for mask in self._kernel_masks.values() if mask.frozen and mask.sync_frozen()
        ]
        if unfrozen:
            warnings.warn(
                f"Layer '{self.name}': its masks were frozen, but its weights now hold a state "
                "from before the freeze (put back with `set_weights` or `assign`): it is saved, "
                "and now serves, those weights with their own masks, unfrozen. Fit again with "
                "the SparsityScheduler to prune them.",
                stacklevel=2,
            )
        for i, variable in enumerate(self._saved_variables()):
            store[f"{i}"] = variable

    def load_own_variables(self, store):
        variables = self._saved_variables()
        masks = list(self._kernel_masks.values())
        # Masks of kernels that only some layers hold (keras-hub's untied
        # `reverse_embeddings`, pruned since 2026-12-07): a file saved before
        # holds the kernel without its mask, which then starts fresh (keeping
        # every weight, as the layer did).
        later = {
            name: mask
            for name, mask in self._kernel_masks.items()
            if self.masked_kernels[name].present is not None
        }
        later_variables = [v for mask in later.values() for v in mask.variables]
        fresh = {}
        if later and len(store.keys()) == len(variables) - len(later_variables):
            variables = [v for v in variables if not any(v is w for w in later_variables)]
            masks = [m for m in masks if all(m is not f for f in later.values())]
            fresh = later
        if len(store.keys()) == len(variables) - len(masks):
            # Saved before masks had a driver state (keras-sparse 0.1): every
            # other variable is there, in the same order.
            states = {id(mask.sparsity_state) for mask in masks}
            variables = [v for v in variables if id(v) not in states]
        elif len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' expected {len(variables)} variables, but received "
                f"{len(store.keys())} variables during loading. Expected: "
                f"{[v.name for v in variables]}"
            )
        for i, variable in enumerate(variables):
            variable.assign(store[f"{i}"])
        for mask in masks:
            mask._plain_inference = False
            mask.frozen = bool(to_numpy(mask.state("frozen")) > 0)
        if fresh:
            self._start_fresh_masks_beside(masks, fresh)
        if self.quantization_mode:
            self._fix_masks_of_quantized_kernels()

    def _start_fresh_masks_beside(self, loaded, fresh):
        """Masks the file did not hold start keeping every weight, in step with the
        layer's loaded masks (their driver's step and strength; frozen if they are, so
        that further training leaves the kernel dense as the file had it), and say so."""
        like = np.array(to_numpy(loaded[0].sparsity_state)) if loaded else None
        for mask in fresh.values():
            if like is not None:
                state = like.copy()
                state[STATE_FIELDS.index("hard_density")] = 1.0
                state[STATE_FIELDS.index("weight_scale")] = 0.0  # measured at the next start
                mask.sparsity_state.assign(state)
                mask.frozen = bool(state[STATE_FIELDS.index("frozen")] > 0)
        if like is not None and like[STATE_FIELDS.index("frozen")] > 0:
            then = (
                "frozen like the layer's other masks, so training keeps it dense; to prune "
                "it, train `keras_sparse.sparsify(keras_sparse.strip(model))` again"
            )
        else:
            then = "a SparsityScheduler prunes it with the rest in the next fit"
        names = ", ".join(f"`{name}`" for name in fresh)
        warnings.warn(
            f"Layer '{self.name}': the file holds no mask for {names} (saved by a "
            f"keras-sparse that left it dense). It starts keeping every weight, {then}.",
            stacklevel=2,
        )

    # -------------------------------------------------- Keras's own modes

    def quantized_call(self, *args, **kwargs):
        # Keras passes `training` to a layer whose call takes it, as the masks'
        # does; the stock quantized calls take what the stock call takes
        # (keras.layers.ReversibleEmbedding's int8 call has no `training`).
        if not self._stock_call_takes_training:
            kwargs.pop("training", None)
        return super().quantized_call(*args, **kwargs)

    def quantize(self, mode=None, type_check=True, config=None, **kwargs):
        """Quantize the pruned layer as Keras quantizes its stock layer (`Model.quantize`).

        The hard mask is applied to the kernel first (`hard_prune()`), so the
        quantized kernel holds exact zeros where weights were pruned (abs-max
        quantization maps 0 to 0); the mask is then fixed. Takes the modes the
        stock layer takes (`"int8"`, `"int4"`, `"float8"` for Dense and
        EinsumDense; `"int8"`, `"int4"` for Embedding); a stock layer without
        quantization (convolutions) raises `NotImplementedError`, which
        `Model.quantize()` turns into a warning.
        """
        stock = _stock_class(type(self))
        if inspect.getattr_static(stock, "quantize") is keras.layers.Layer.quantize:
            raise NotImplementedError(
                f"Layer {type(self).__name__} does not have a `quantize()` method: Keras "
                f"does not quantize {stock.__name__} layers."
            )
        if mode in ("gptq", "awq"):
            raise NotImplementedError(
                f"Layer {type(self).__name__}: mode={mode!r} needs calibration data; "
                "strip the pruned model and quantize the stock model."
            )
        self._require_built("quantize")
        self.hard_prune()
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            stock.quantize(self, mode, type_check=False, config=config, **kwargs)
        finally:
            if was_locked:
                self._tracker.lock()
        self._fix_masks_of_quantized_kernels()

    # ----------------------------------------------------------- config

    def get_config(self):
        config = {**super().get_config(), **self.mask_options.get_config()}
        if self.activity_regularizer is not None:  # the stock configs leave it out
            config["activity_regularizer"] = keras.regularizers.serialize(self.activity_regularizer)
        return config

    # ---------------------------------------------------- mask attributes

    @property
    def masks(self):
        """`{kernel name: KernelMask}` of this layer (empty before build)."""
        return dict(self._kernel_masks)

    def _require_built(self, method):
        if not self.built:
            raise ValueError(
                f"`{method.rstrip('()')}()` needs the layer's weights, but layer "
                f"'{self.name}' is not built yet. Call it on an input or call "
                "`layer.build(input_shape)` first."
            )

    def _only_mask(self, what):
        self._require_built(what)
        masks = list(self._kernel_masks.values())
        if len(masks) != 1:
            raise ValueError(
                f"Layer '{self.name}' prunes {len(masks)} kernels "
                f"({', '.join(self._kernel_masks)}), so `{what}` is ambiguous: use "
                f"`layer.masks[name].{what}` instead."
            )
        return masks[0]

    structured = property(lambda self: self.mask_options.structured)
    is_structured = structured
    initial_temperature = property(lambda self: self.mask_options.temperature)
    threshold_initializer = property(lambda self: self.mask_options.threshold_initializer)
    threshold_regularizer = property(lambda self: self.mask_options.threshold_regularizer)
    threshold_constraint = property(lambda self: self.mask_options.threshold_constraint)
    straight_through = property(lambda self: self.mask_options.straight_through)
    inference_mask = property(lambda self: self.mask_options.inference_mask)
    granularity = property(lambda self: self.mask_options.granularity)
    n_m = property(lambda self: self.mask_options.n_m)

    threshold = property(lambda self: self._only_mask("threshold").threshold)
    prune_mask = property(lambda self: self._only_mask("prune_mask").prune_mask)
    sparsity_penalty = property(lambda self: self._only_mask("sparsity_penalty").sparsity_penalty)
    _temperature = property(lambda self: self._only_mask("temperature")._temperature)

    @property
    def temperature(self):
        """The mask's sharpness (a float); before build, the `temperature` argument."""
        if not self.built:
            return self.mask_options.temperature
        return self._only_mask("temperature").temperature

    @temperature.setter
    def temperature(self, value):
        from keras_sparse.mask import check_temperature

        value = check_temperature(value)
        if not self.built:
            options = dataclasses.replace(self.mask_options, temperature=value)
            object.__setattr__(self, "mask_options", options)
            return
        for mask in self._kernel_masks.values():
            mask.temperature = value

    # ------------------------------------------- statistics and actions

    def num_active(self):
        """Number of weights with `|w| >= threshold` that were not pruned."""
        self._require_built("num_active")
        return sum(mask.num_active() for mask in self._kernel_masks.values())

    def kernel_size_total(self):
        return sum(mask.size for mask in self._kernel_masks.values())

    def density(self):
        """Fraction of the pruned kernels' weights that are active (hard threshold)."""
        self._require_built("density")
        return self.num_active() / self.kernel_size_total()

    def sparsity(self):
        """Fraction of weights that are pruned: `1 - density()`."""
        self._require_built("sparsity")
        return 1.0 - self.density()

    def alive_neurons(self):
        """Number of output units with at least one active weight.

        With `granularity="neuron"`, the units kept; after `hard_prune()`,
        the others are all-zero slices of the kernel, which
        `keras_sparse.shrink()` removes.
        """
        self._require_built("alive_neurons")
        return sum(mask.alive_units() for mask in self._kernel_masks.values())

    def effective_weight(self, kernel=None):
        """`kernel * hard_mask`, the kernel's shape; the layer is unchanged.

        Args:
            kernel: For a layer that prunes several kernels (separable
                convolutions), which one (`"depthwise_kernel"` or
                `"pointwise_kernel"`).
        """
        if kernel is None:
            return self._only_mask("effective_weight").effective_weight()
        self._require_built("effective_weight")
        if kernel not in self._kernel_masks:
            raise ValueError(
                f"Received an invalid value for `kernel`, expected one of "
                f"{tuple(self._kernel_masks)}. Received: kernel={kernel!r}"
            )
        return self._kernel_masks[kernel].effective_weight()

    def hard_prune(self):
        """Zero the weights below the threshold and reset the threshold to 0.

        Irreversible: the pruned weights are recorded in `prune_mask`, so
        `density()` still counts them as pruned and further training cannot
        bring them back.

        Afterwards the kernel equals `effective_weight()`, and inference is the
        stock computation on it (no mask computed), unless the layer was
        trained in this process: a train step compiled before `hard_prune()`
        can keep running without Python, while an optimizer's momentum moves
        the zeroed weights (their gradient is zero, not their velocity) and
        the threshold keeps learning, so inference keeps computing the hard
        mask, which stays exact. Training the layer or `reset_threshold()`
        ends the plain path. `hard_prune()` is idempotent: call it on a pruned
        model loaded for serving to get the plain path.
        """
        self._require_built("hard_prune")
        for mask in self._kernel_masks.values():
            mask.hard_prune()

    def reset_threshold(self, value):
        """Set every threshold to `value` (a non-negative float, or an array
        broadcastable to the threshold's shape)."""
        self._require_built("reset_threshold")
        masks = list(self._kernel_masks.values())
        values = [mask.threshold_values(value) for mask in masks]  # all checked before any change
        for mask, array in zip(masks, values):
            mask.threshold.assign(array)
            mask._plain_inference = False


# ---------------------------------------------------------------- the layers


def _register(cls):
    return keras.saving.register_keras_serializable(package="keras_sparse")(cls)


_CONV_KERNEL = {"kernel": MaskedKernel((-1,), -2, "kernel_initializer")}
_CONV_TRANSPOSE_KERNEL = {"kernel": MaskedKernel((-2,), -1, "kernel_initializer")}
_DEPTHWISE_KERNEL = {"kernel": MaskedKernel((-2, -1), None, "depthwise_initializer")}
_SEPARABLE_KERNELS = {
    "depthwise_kernel": MaskedKernel((-2, -1), None, "depthwise_initializer", "depthwise_"),
    "pointwise_kernel": MaskedKernel((-1,), -2, "pointwise_initializer", "pointwise_"),
}


@_register
class SparseLinear(SparseKernelMixin, keras.layers.Dense):
    """Densely-connected layer with a differentiable magnitude-pruning mask.

    The kernel is multiplied by a soft mask whose threshold is learned:

    ```
    mask = sigmoid((|kernel| - threshold) * temperature)
    output = activation(inputs @ (kernel * mask) + bias)
    ```

    In training mode this is the formula above (the sigmoid lets gradients
    reach the threshold). In inference mode (`training=False`, which is what
    `model.evaluate` and `model.predict` use) the mask is hard by default,
    `|kernel| >= threshold`, so what is evaluated is exactly the model that
    `hard_prune()` or `keras_sparse.strip()` hands over. Pass
    `inference_mask="soft"` to keep the soft mask at inference.

    `granularity` says what one pruning decision covers. `"weight"`
    (default) is the formula above. `"neuron"` keeps or prunes each output
    neuron whole, on the root mean square of its weights,
    `rms_j = ||kernel[:, j]||_2 / sqrt(in_features)` (on the scale of one
    weight, so thresholds and temperatures mean what they mean per weight):

    ```
    mask[:, j] = sigmoid((rms_j - threshold[j]) * temperature)
    ```

    and `keras_sparse.shrink()` slices the pruned neurons out. `"n:m"` keeps
    at most `n` weights in every group of `m` consecutive inputs of each
    neuron: the hard mask is the top `n` magnitudes of the group (ties to
    the lower input index) that also pass the threshold, and the soft mask
    `sigmoid((|kernel| - max(boundary, threshold)) * temperature)`, where
    `boundary` is the midpoint between the n-th and (n+1)-th largest
    magnitude of the weight's group (`keras_sparse.is_n_m_sparse()` checks
    the result).

    `SparseLinear` is a `keras.layers.Dense` (`SparseDense` is the same
    class, under the stock layer's name), and every other `Sparse<StockName>`
    layer takes the same pruning arguments.

    Args:
        units: Positive integer, dimensionality of the output space.
        activation: Activation function. Defaults to `None` (linear).
        use_bias: Whether the layer uses a bias vector. Defaults to `True`.
        structured: If `True` (default), one threshold per output neuron,
            shape `(units,)`; if `False`, one threshold per weight, shape
            `(in_features, units)`.
        temperature: Positive float, the sharpness of the soft mask in
            1/weight units. Defaults to `None`: at build time it is set to
            `DEFAULT_RELATIVE_TEMPERATURE / std(kernel)` (10 / std), so the
            mask is equally sharp whatever the layer's weight scale. Settable
            later through the `temperature` property (a non-trainable
            variable, so a change reaches an already compiled train step).
        kernel_initializer: Initializer for the kernel. Defaults to
            `"glorot_uniform"`.
        bias_initializer: Initializer for the bias. Defaults to `"zeros"`.
        threshold_initializer: Initializer for the threshold. Defaults to
            `"zeros"`: the layer starts dense.
        kernel_regularizer: Regularizer for the kernel. Defaults to `None`.
        bias_regularizer: Regularizer for the bias. Defaults to `None`.
        threshold_regularizer: Regularizer for the threshold. Defaults to
            `None`.
        activity_regularizer: Regularizer for the output. Default `None`.
        kernel_constraint: Constraint for the kernel. Defaults to `None`.
        bias_constraint: Constraint for the bias. Defaults to `None`.
        threshold_constraint: Constraint for the threshold. Defaults to
            `"non_neg"`: a negative threshold prunes nothing and only shrinks
            small weights, so it is clipped at zero.
        straight_through: If `True`, the training forward pass uses the hard
            mask while gradients flow through the soft one (a straight-through
            estimator). Defaults to `False` (the soft mask).
        inference_mask: `"hard"` (default) or `"soft"`: the mask used when
            `training=False`.
        granularity: `"weight"` (default), `"neuron"` or `"n:m"`: what one
            pruning decision covers (see above). `"neuron"` and `"n:m"`
            have one threshold per output neuron (`structured=True`).
        n_m: For `granularity="n:m"`, the pair `(n, m)` with `0 < n < m`;
            defaults to `(2, 4)`. Groups run along the input dimension; when
            `m` does not divide `in_features`, the last, shorter group keeps
            at most `n` weights (the kernel padded with zero rows to a
            multiple of `m` is exactly N:M).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        N-D tensor with shape `(batch_size, ..., in_features)`, N >= 2.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> layer = keras_sparse.SparseLinear.new(784, 256)
    >>> y = layer(np.ones((32, 784), "float32"))
    >>> y.shape
    (32, 256)
    >>> print(f"Density: {layer.density() * 100:.1f}%")
    Density: 100.0%
    """

    masked_kernels = {"kernel": MaskedKernel((-1,), 0, "kernel_initializer")}

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        structured=True,
        temperature=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        threshold_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        threshold_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        threshold_constraint="non_neg",
        straight_through=False,
        inference_mask="hard",
        granularity="weight",
        n_m=None,
        **kwargs,
    ):
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units <= 0:
            raise ValueError(
                "Received an invalid value for `units`, expected a positive "
                f"integer. Received: units={units!r}"
            )
        super().__init__(
            int(units),
            activation=activation,
            use_bias=check_bool("use_bias", use_bias),
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            structured=structured,
            temperature=temperature,
            threshold_initializer=threshold_initializer,
            threshold_regularizer=threshold_regularizer,
            threshold_constraint=threshold_constraint,
            straight_through=straight_through,
            inference_mask=inference_mask,
            granularity=granularity,
            n_m=n_m,
            **kwargs,
        )

    def build(self, input_shape):
        in_features = input_shape[-1]
        if in_features is None:
            raise ValueError(
                "The last dimension of the inputs to `SparseLinear` should be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        keras.layers.Dense.build(self, input_shape)
        self._build_masks()

    def get_config(self):
        return {
            **super().get_config(),
            "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
        }

    # ------------------------------------------------- built constructors

    @classmethod
    def new(cls, in_features, out_features, **kwargs):
        """A layer built for `in_features` inputs: one threshold per neuron, with a bias."""
        return cls._built(in_features, out_features, **kwargs)

    @classmethod
    def unstructured(cls, in_features, out_features, **kwargs):
        """A built layer with one threshold per weight."""
        return cls._built(in_features, out_features, structured=False, **kwargs)

    @classmethod
    def with_bias(cls, in_features, out_features, bias, **kwargs):
        """A built structured layer, with or without a bias (`bias`: bool)."""
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(
                f"Received an invalid value for `bias`, expected a bool. Received: bias={bias!r}"
            )
        return cls._built(in_features, out_features, use_bias=bool(bias), **kwargs)

    @classmethod
    def _built(cls, in_features, out_features, **kwargs):
        if (
            isinstance(in_features, bool)
            or not isinstance(in_features, (int, np.integer))
            or in_features <= 0
        ):
            raise ValueError(
                "Received an invalid value for `in_features`, expected a "
                f"positive integer. Received: in_features={in_features!r}"
            )
        layer = cls(out_features, **kwargs)
        layer.build((None, int(in_features)))
        return layer

    @property
    def in_features(self):
        """Size of each input sample, or `None` before the layer is built."""
        return int(self._kernel.shape[0]) if self.built else None

    @property
    def out_features(self):
        """Size of each output sample (`units`)."""
        return self.units


SparseDense = SparseLinear


@_register
class SparseEinsumDense(SparseKernelMixin, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with a learnable pruning mask on its kernel.

    The kernel axes that appear in the equation's output index output units
    (one threshold per unit with `structured=True`, shape = those axes);
    the others are reduced. N:M groups run along the last reduced axis.
    Pruning arguments as in `SparseLinear`.

    Example:

    >>> layer = keras_sparse.SparseEinsumDense("abc,cde->abde", (None, 4, 8))
    >>> layer(np.ones((2, 5, 16), "float32")).shape
    (2, 5, 4, 8)
    """

    masked_kernels = {"kernel": MaskedKernel(_einsum_axes, None, "kernel_initializer")}


@_register
class SparseConv1D(SparseKernelMixin, keras.layers.Conv1D):
    """`keras.layers.Conv1D` with a learnable pruning mask on its kernel.

    One threshold per filter with `structured=True`; `granularity="neuron"`
    keeps or prunes whole filters (output channels); `"n:m"` groups run
    along input channels. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _CONV_KERNEL


@_register
class SparseConv2D(SparseKernelMixin, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a learnable pruning mask on its kernel.

    One threshold per filter with `structured=True`; `granularity="neuron"`
    keeps or prunes whole filters (output channels); `"n:m"` groups run
    along input channels. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _CONV_KERNEL


@_register
class SparseConv3D(SparseKernelMixin, keras.layers.Conv3D):
    """`keras.layers.Conv3D` with a learnable pruning mask on its kernel.

    One threshold per filter with `structured=True`; `granularity="neuron"`
    keeps or prunes whole filters (output channels); `"n:m"` groups run
    along input channels. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _CONV_KERNEL


@_register
class SparseConv1DTranspose(SparseKernelMixin, keras.layers.Conv1DTranspose):
    """`keras.layers.Conv1DTranspose` with a learnable pruning mask on its kernel.

    The kernel is `(*kernel_size, filters, input_channels)`: one threshold
    per filter with `structured=True`; `"n:m"` groups run along input
    channels. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _CONV_TRANSPOSE_KERNEL


@_register
class SparseConv2DTranspose(SparseKernelMixin, keras.layers.Conv2DTranspose):
    """`keras.layers.Conv2DTranspose` with a learnable pruning mask on its kernel.

    The kernel is `(*kernel_size, filters, input_channels)`: one threshold
    per filter with `structured=True`; `"n:m"` groups run along input
    channels. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _CONV_TRANSPOSE_KERNEL


@_register
class SparseConv3DTranspose(SparseKernelMixin, keras.layers.Conv3DTranspose):
    """`keras.layers.Conv3DTranspose` with a learnable pruning mask on its kernel.

    The kernel is `(*kernel_size, filters, input_channels)`: one threshold
    per filter with `structured=True`; `"n:m"` groups run along input
    channels. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _CONV_TRANSPOSE_KERNEL


@_register
class SparseDepthwiseConv1D(SparseKernelMixin, keras.layers.DepthwiseConv1D):
    """`keras.layers.DepthwiseConv1D` with a learnable pruning mask on its kernel.

    The kernel is `(*kernel_size, input_channels, depth_multiplier)`: each
    (channel, multiplier) pair is one output channel, with one threshold
    with `structured=True`. Its only reduction is over the window, so
    `granularity="n:m"` is refused. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _DEPTHWISE_KERNEL


@_register
class SparseDepthwiseConv2D(SparseKernelMixin, keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` with a learnable pruning mask on its kernel.

    The kernel is `(*kernel_size, input_channels, depth_multiplier)`: each
    (channel, multiplier) pair is one output channel, with one threshold
    with `structured=True`. Its only reduction is over the window, so
    `granularity="n:m"` is refused. Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _DEPTHWISE_KERNEL


@_register
class SparseSeparableConv1D(SparseKernelMixin, keras.layers.SeparableConv1D):
    """`keras.layers.SeparableConv1D` with learnable pruning masks on both kernels.

    The depthwise kernel is pruned as `SparseDepthwiseConv*`'s, the
    pointwise kernel as a `SparseConv*` kernel; each has its own threshold,
    temperature and penalty (variables prefixed `depthwise_`, `pointwise_`).
    `granularity="n:m"` is refused (the depthwise kernel has no reduction
    axis to group along). Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _SEPARABLE_KERNELS


@_register
class SparseSeparableConv2D(SparseKernelMixin, keras.layers.SeparableConv2D):
    """`keras.layers.SeparableConv2D` with learnable pruning masks on both kernels.

    The depthwise kernel is pruned as `SparseDepthwiseConv*`'s, the
    pointwise kernel as a `SparseConv*` kernel; each has its own threshold,
    temperature and penalty (variables prefixed `depthwise_`, `pointwise_`).
    `granularity="n:m"` is refused (the depthwise kernel has no reduction
    axis to group along). Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = _SEPARABLE_KERNELS


@_register
class SparseEmbedding(SparseKernelMixin, keras.layers.Embedding):
    """`keras.layers.Embedding` with a learnable pruning mask on its table.

    Each row (one token's vector) is an output unit: one threshold per row
    with `structured=True`, and `granularity="neuron"` keeps or prunes whole
    rows. There is no reduction axis, so `granularity="n:m"` is refused.
    Pruning arguments as in `SparseLinear`.
    """

    masked_kernels = {"embeddings": MaskedKernel((0,), None, "embeddings_initializer")}


# Stock class -> its sparse class: the coverage table `sparsify` converts by.
SPARSE_CLASSES = {
    keras.layers.Dense: SparseLinear,
    keras.layers.EinsumDense: SparseEinsumDense,
    keras.layers.Conv1D: SparseConv1D,
    keras.layers.Conv2D: SparseConv2D,
    keras.layers.Conv3D: SparseConv3D,
    keras.layers.Conv1DTranspose: SparseConv1DTranspose,
    keras.layers.Conv2DTranspose: SparseConv2DTranspose,
    keras.layers.Conv3DTranspose: SparseConv3DTranspose,
    keras.layers.DepthwiseConv1D: SparseDepthwiseConv1D,
    keras.layers.DepthwiseConv2D: SparseDepthwiseConv2D,
    keras.layers.SeparableConv1D: SparseSeparableConv1D,
    keras.layers.SeparableConv2D: SparseSeparableConv2D,
    keras.layers.Embedding: SparseEmbedding,
}


@_register
class SparseMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose query, key, value and output projections prune.

    Takes `MultiHeadAttention`'s arguments and, as keyword arguments, the
    pruning arguments of `SparseLinear`, applied to each projection (a
    `SparseEinsumDense`, reached as `layer.query_dense` and so on). With
    `structured=True` a projection has one threshold per output unit:
    `(num_heads, key_dim)` for the query, key and value, `(output_dim,)` for
    the output.

    `granularity="head"` prunes whole heads instead: the output projection
    gets one threshold per head, compared with the RMS of the head's slice of
    its kernel (`(key_dim, output_dim)` weights), and the query, key and value
    projections stay dense. A pruned head adds nothing to the output, so
    `keras_sparse.shrink()` removes it from all four projections and rebuilds
    the layer with fewer heads.

    Example:

    >>> mha = keras_sparse.SparseMultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = np.ones((1, 5, 16), "float32")
    >>> mha(x, x).shape
    (1, 5, 16)
    """

    def __init__(self, num_heads, key_dim, *args, **kwargs):
        from keras_sparse.mask import OPTION_NAMES

        sparse = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        self._prune_heads = sparse.get("granularity") == "head"
        if self._prune_heads:
            sparse["granularity"] = "neuron"
        self._sparse_options = MaskOptions.check(**sparse)
        super().__init__(num_heads, key_dim, *args, **kwargs)

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        from keras_sparse.convert import HEADS_AXES, convert_layer

        if self._prune_heads:
            options = self._sparse_options.get_config()
            convert_layer(self._output_dense, options, unit_axes=HEADS_AXES)
            return
        for name in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
            convert_layer(getattr(self, name), self._sparse_options.get_config())

    def alive_heads(self):
        """The heads the output projection's hard mask keeps (`granularity="head"`)."""
        if not self._prune_heads:
            raise ValueError(
                f"Layer '{self.name}' prunes weights, not heads: alive_heads() needs "
                f"granularity='head'. Received: granularity={self._sparse_options.granularity!r}"
            )
        kernel = to_numpy(self._output_dense.effective_weight())
        return int(np.count_nonzero(np.any(kernel.reshape(kernel.shape[0], -1) != 0, axis=1)))

    def get_config(self):
        config = {**super().get_config(), **self._sparse_options.get_config()}
        if self._prune_heads:
            config["granularity"] = "head"
        return config

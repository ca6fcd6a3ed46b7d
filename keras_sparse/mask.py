"""`KernelMask`: the learnable pruning mask of one kernel, whatever layer holds it.

A kernel of any rank is split into *output axes* (the units a pruning
decision can cover: a Dense neuron, a conv filter, an EinsumDense output
unit, an Embedding row) and *reduction axes* (the others). Everything else
is the same for every layer type, so it lives here once:

* the state: a trainable `threshold` (one per output unit, or one per
  weight), a boolean `prune_mask` of what `hard_prune()` removed for good,
  the `temperature`, and the `sparsity_penalty` a driver sets;
* the formulas, in `keras.ops`: the soft mask
  `sigmoid((|kernel| - threshold) * temperature)` at the layer's
  granularity, the hard mask `|kernel| >= threshold`, the straight-through
  mix, and the hand-fused gradient that TensorFlow and JAX train through
  (eager PyTorch has its own, `_torch_soft_masked_kernel`);
* the statistics and actions: `density`, `num_active`, `effective_weight`,
  `hard_prune`, `reset_threshold`.

A layer owns one `KernelMask` per pruned kernel; the variables are the
layer's own (created with `layer.add_weight`), so they are saved, laid out
and trained like any of its weights.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers
from keras.src.backend.common import global_state  # Keras's per-forward-pass scopes

from keras_sparse.granularity import (
    DEFAULT_N_M,
    GRANULARITIES,
    check_n_m,
    n_m_boundary,
    n_m_keep,
    neuron_scores,
)
from keras_sparse.host import to_numpy
from keras_sparse.programs import Program

# The mask's transition band is about 4 / temperature wide in weight units.
# Tying the default temperature to the kernel's spread at build time makes the
# same default equally sharp in a 784x300 layer and a 64x10 one:
# `temperature = DEFAULT_RELATIVE_TEMPERATURE / std(kernel)`.
DEFAULT_RELATIVE_TEMPERATURE = 10.0

INFERENCE_MASKS = ("hard", "soft")

# What `KernelMask.sparsity_state` holds, in order: the training steps a driver
# has taken; its log-penalty strength; the hard density measured at the last
# driven step; the weight scale its temperatures are relative to (0: not set
# yet); and whether its mask is frozen (1: training keeps the mask fixed).
STATE_FIELDS = ("step", "log_penalty", "hard_density", "weight_scale", "frozen")

# Replicas (tf.distribute) compute the same value for these variables.
_REPLICATED = "only_first_replica"


# ------------------------------------------------------------------ options


def check_temperature(value):
    """`value` as a positive finite float, or an error that names it."""
    try:
        if isinstance(value, bool):
            raise TypeError  # a bool is not a temperature
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            "Received an invalid value for `temperature`, expected a positive "
            f"finite number. Received: temperature={value!r}"
        ) from None
    if not math.isfinite(as_float) or as_float <= 0:
        raise ValueError(
            "Received an invalid value for `temperature`, expected a positive "
            f"finite number. Received: temperature={value!r}"
        )
    return as_float


def check_bool(name, value):
    """`value` as a bool, or a TypeError naming the argument `name`."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a bool. Received: {name}={value!r}"
        )
    return bool(value)


@dataclasses.dataclass(frozen=True)
class MaskOptions:
    """The pruning arguments every sparse layer takes (see `SparseLinear` for their meaning)."""

    structured: bool = True
    temperature: float | None = None
    threshold_initializer: object = "zeros"
    threshold_regularizer: object = None
    threshold_constraint: object = "non_neg"
    straight_through: bool = False
    inference_mask: str = "hard"
    granularity: str = "weight"
    n_m: tuple | None = None

    @classmethod
    def check(cls, n_m_supported=True, **arguments):
        """Validated options, or a clear error naming the argument and its value."""
        options = cls(**arguments)
        structured = check_bool("structured", options.structured)
        straight_through = check_bool("straight_through", options.straight_through)
        temperature = options.temperature
        if temperature is not None:
            temperature = check_temperature(temperature)
        if options.inference_mask not in INFERENCE_MASKS:
            raise ValueError(
                "Received an invalid value for `inference_mask`, expected one "
                f"of {INFERENCE_MASKS}. Received: inference_mask={options.inference_mask!r}"
            )
        granularity = options.granularity
        if granularity == "head":
            raise ValueError(
                "Received an invalid value for `granularity`: 'head' prunes whole attention "
                "heads and applies to attention layers only: "
                "`SparseMultiHeadAttention(..., granularity='head')`, or "
                "`sparsify(model, select=keras.layers.MultiHeadAttention, granularity='head')`;"
                f" this layer takes one of {GRANULARITIES}. Received: granularity='head'"
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                "Received an invalid value for `granularity`, expected one of "
                f"{GRANULARITIES}, or 'head' for attention layers "
                "(`sparsify(model, select=keras.layers.MultiHeadAttention, granularity='head')`)."
                f" Received: granularity={granularity!r}"
            )
        if granularity != "weight" and not structured:
            raise ValueError(
                f"Received an invalid value for `structured`: granularity={granularity!r} "
                "has one threshold per output unit, so `structured` must be True. "
                f"Received: structured={options.structured!r}"
            )
        n_m = options.n_m
        if granularity == "n:m":
            if not n_m_supported:
                raise ValueError(
                    "Received an invalid value for `granularity`: this layer's kernel has "
                    "no reduction axis along which N:M groups could run. Use 'weight' or "
                    f"'neuron'. Received: granularity={granularity!r}"
                )
            n_m = check_n_m(DEFAULT_N_M if n_m is None else n_m)
        elif n_m is not None:
            raise ValueError(
                "Received an invalid value for `n_m`: it applies to granularity='n:m' "
                f"only. Received: n_m={n_m!r}, granularity={granularity!r}"
            )
        return dataclasses.replace(
            options,
            structured=structured,
            straight_through=straight_through,
            temperature=temperature,
            threshold_initializer=initializers.get(options.threshold_initializer),
            threshold_regularizer=regularizers.get(options.threshold_regularizer),
            threshold_constraint=constraints.get(options.threshold_constraint),
            n_m=n_m,
        )

    def get_config(self):
        return {
            "structured": self.structured,
            "temperature": self.temperature,
            "threshold_initializer": initializers.serialize(self.threshold_initializer),
            "threshold_regularizer": regularizers.serialize(self.threshold_regularizer),
            "threshold_constraint": constraints.serialize(self.threshold_constraint),
            "straight_through": self.straight_through,
            "inference_mask": self.inference_mask,
            "granularity": self.granularity,
            "n_m": self.n_m,
        }


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(MaskOptions))


# ---------------------------------------------------------------- gradients


def _float_mask(mask, dtype="float32"):
    """A boolean tensor as 0.0 / 1.0 of `dtype`.

    Eager PyTorch converts a bool tensor, or multiplies a float tensor by
    one, several times slower than the same bytes read as uint8 on a CPU
    (docs/benchmarks.md, "Boolean masks in eager PyTorch"; not measured on a
    GPU, where the uint8 read costs no more): eager PyTorch reads the bytes
    as uint8. Traced code (`torch.compile`, export) casts as usual.
    """
    if _eager_torch():
        import torch

        mask = ops.convert_to_tensor(mask)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    return ops.cast(mask, dtype)


@ops.custom_gradient
def _unmasked(kernel, prune_mask):
    """`kernel` as it is, with the gradient of `kernel * prune_mask`.

    The inference path of a hard-pruned mask: the value needs no mask (the
    pruned entries are zero), and the gradient still stops at pruned weights,
    so fine-tuning through `training=False` cannot bring them back.
    """

    def grad(*args, upstream=None):
        if upstream is None:  # JAX and TensorFlow pass it positionally
            (upstream,) = args
        return upstream * _float_mask(prune_mask, upstream.dtype), None

    return kernel, grad


def _summed_axes(threshold_shape, kernel_shape):
    """The kernel's axes a per-unit threshold spans (size 1 there): its gradient sums them."""
    return tuple(
        axis for axis, (t, k) in enumerate(zip(threshold_shape, kernel_shape)) if t == 1 and k != 1
    )


@ops.custom_gradient
def _soft_masked_kernel(kernel, threshold, prune_mask, temperature):
    """`(kernel * mask, mean(mask))` for the soft mask, with a hand-fused gradient.

    `mask = sigmoid((|kernel| - threshold) * temperature) * prune_mask`, where
    `threshold` has the kernel's rank (size 1 on the reduction axes when there
    is one threshold per output unit). The backward pass keeps the mask
    alone, and computes both inputs' gradients from one shared factor,
    `u = temperature * mask * (1 - mask)` (with `prune_mask` in {0, 1}, the
    sigmoid's derivative where a weight is alive, zero where it is pruned):

        d/dthreshold (per weight) = -(g_w * kernel + g_mean / size) * u
        d/dkernel                 = g_w * (mask + |kernel| * u)

    The mean's gradient `g_mean` (the sparsity penalty's) reaches the
    thresholds only: `mean(mask)` is taken as if the kernel were constant, so
    the penalty raises the thresholds without pulling the weights near them
    towards zero (as continuous sparsification keeps its penalty on separate
    scores; measured in docs/pruning_guide.md, "The penalty reaches the
    thresholds only").

    Used on TensorFlow and JAX, where it measured faster than autodiff, with
    less memory for a per-weight threshold (`benchmarks/compare_revisions.py`).
    Keras's PyTorch custom gradients take one output only: eager PyTorch
    takes `_torch_soft_masked_kernel`, the same maths in place.
    """
    soft = ops.sigmoid((ops.abs(kernel) - threshold) * temperature)
    mask = soft * ops.cast(prune_mask, soft.dtype)
    size = float(np.prod(kernel.shape))
    summed_axes = _summed_axes(threshold.shape, kernel.shape)

    def grad(*upstreams, upstream=None):
        if upstream is None:  # TensorFlow: one argument per output; JAX: one tuple
            upstream = upstreams if len(upstreams) == 2 else upstreams[0]
        grad_kernel_out, grad_mean = upstream
        factor = mask * (1.0 - mask) * temperature
        grad_threshold = -(grad_kernel_out * kernel + grad_mean / size) * factor
        # The task loss's part alone. Written two ways, each the one that held XLA's
        # peak memory at the previous version's on JAX (benchmarks/compare_revisions.py
        # --memory): with a per-unit threshold, apart from the threshold's gradient; with a
        # threshold per weight, from it (a kernel-sized output already).
        if summed_axes:  # one threshold per output unit
            grad_kernel = grad_kernel_out * (mask + ops.abs(kernel) * factor)
            grad_threshold = ops.sum(grad_threshold, axis=summed_axes, keepdims=True)
        else:
            task_part = grad_threshold + grad_mean / size * factor
            grad_kernel = grad_kernel_out * mask - ops.sign(kernel) * task_part
        return grad_kernel, grad_threshold, None, None

    return (kernel * mask, ops.mean(mask)), grad


_TORCH_SOFT_MASKED_KERNEL = None

# Eager PyTorch on a CPU runs the mask's ops on slices of a large kernel, of
# about this many elements, so that the chain of passes over a
# slice stays in the caches instead of going to memory at every op. A kernel
# that fits is not sliced: there slicing only adds ops (measured with
# `benchmarks/compare_revisions.py --fit`).
_CPU_SLICE_ELEMENTS = 1 << 20


def _torch_row_slices(kernel):
    """Slices of `kernel`'s first axis to run the mask's ops on; `[None]`: the whole kernel.

    On a GPU each op over the whole kernel is one launch, and slicing would
    only add launches.
    """
    rows, row_size = kernel.shape[0], math.prod(kernel.shape[1:])
    step = max(1, _CPU_SLICE_ELEMENTS // max(1, row_size))
    if kernel.device.type != "cpu" or step >= rows:
        return [None]
    return [slice(start, start + step) for start in range(0, rows, step)]


def _torch_soft_masked_kernel(kernel, threshold, prune_mask, temperature):
    """`_soft_masked_kernel` for eager PyTorch, as a `torch.autograd.Function`.

    Eager PyTorch runs each op of a formula as its own pass over the kernel,
    and autodiff of `soft()` adds a pass for every op's backward and for
    every broadcast; this computes the same values and gradients in place,
    from the one saved mask (with `prune_mask` in {0, 1},
    `mask * (1 - soft) == mask * (1 - mask)`), slice by slice on a CPU
    (`_torch_row_slices`). Not under `torch.compile`, which fuses the
    autodiff of `soft()` itself.
    """
    global _TORCH_SOFT_MASKED_KERNEL
    if _TORCH_SOFT_MASKED_KERNEL is None:
        import torch

        sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input

        def part(tensor, rows):
            """`tensor`'s slice `rows` (`None`: all of it; a size-1 first axis broadcasts).

            No tensor (`None`, an `out=` left to the op) stays `None`.
            """
            if tensor is None or rows is None or tensor.shape[0] == 1:
                return tensor
            return tensor[rows]

        class SoftMaskedKernel(torch.autograd.Function):
            @staticmethod
            def forward(ctx, kernel, threshold, prune_mask, temperature):
                slices = _torch_row_slices(kernel)
                # Slices write into the two outputs; the whole kernel's ops allocate them.
                mask = masked = None
                prune_mask = prune_mask.view(torch.uint8)  # see `_float_mask`
                if slices != [None]:
                    mask, masked = torch.empty_like(kernel), torch.empty_like(kernel)
                for rows in slices:
                    weights = part(kernel, rows)
                    soft = torch.abs(weights, out=part(mask, rows))
                    soft.sub_(part(threshold, rows)).mul_(temperature).sigmoid_()
                    soft.mul_(part(prune_mask, rows))
                    product = torch.mul(weights, soft, out=part(masked, rows))
                if mask is None:
                    mask, masked = soft, product
                ctx.save_for_backward(kernel, mask, temperature)
                ctx.slices = slices
                ctx.threshold_dtype = threshold.dtype
                ctx.threshold_shape = threshold.shape
                return masked, mask.mean()

            @staticmethod
            def backward(ctx, grad_kernel_out, grad_mean):
                kernel, mask, temperature = ctx.saved_tensors
                shape, slices = ctx.threshold_shape, ctx.slices
                summed = _summed_axes(shape, kernel.shape)
                # One threshold for all the rows (size 1 on the first axis): slices add into it.
                accumulate = len(slices) > 1 and shape[0] == 1
                if len(slices) > 1:
                    new = torch.zeros if accumulate else torch.empty
                    grad_threshold = new(shape, dtype=ctx.threshold_dtype, device=kernel.device)
                grad_kernel = None
                if slices != [None]:
                    grad_kernel = torch.empty_like(kernel)
                per_weight_mean = grad_mean / mask.numel()
                for rows in slices:
                    weights, soft = part(kernel, rows), part(mask, rows)
                    # `minus` is `-d/dthreshold` per weight:
                    # `(g_w * kernel + g_mean / size) * mask * (1 - mask) * temperature`.
                    minus = torch.addcmul(
                        per_weight_mean,
                        part(grad_kernel_out, rows),
                        weights,
                        out=part(grad_kernel, rows),
                    )
                    sigmoid_backward(minus, soft, grad_input=minus).mul_(temperature)
                    reduced = minus.sum(summed, keepdim=True) if summed else minus
                    if accumulate:
                        grad_threshold.sub_(reduced)
                    elif rows is None:
                        grad_threshold = -reduced
                    else:
                        torch.neg(reduced, out=part(grad_threshold, rows))
                    # d/dkernel = g_w * (mask + |kernel| * mask * (1 - mask) * temperature),
                    # the task loss's alone (the penalty's reaches the thresholds only,
                    # see `_soft_masked_kernel`), in `minus`'s buffer once it is read.
                    torch.abs(weights, out=minus)
                    sigmoid_backward(minus, soft, grad_input=minus).mul_(temperature)
                    minus.add_(soft).mul_(part(grad_kernel_out, rows))
                if grad_kernel is None:
                    grad_kernel = minus
                return grad_kernel, grad_threshold, None, None

        _TORCH_SOFT_MASKED_KERNEL = SoftMaskedKernel
    return _TORCH_SOFT_MASKED_KERNEL.apply(kernel, threshold, prune_mask, temperature)


_TORCH_FROZEN_KERNEL = None


def _torch_frozen_kernel(kernel, threshold, prune_mask):
    """`kernel * prune_mask` for eager PyTorch after the freeze, and a zero threshold gradient.

    The other backends keep the threshold in the graph with a zero loss term
    (see `KernelMask.masked_kernel`); in eager PyTorch that term, the cast of
    `prune_mask` and the product's autodiff are each a call of their own
    whose Python cost weighs as much as the product at LeNet-300-100's size
    (`benchmarks/compare_revisions.py --fit --frozen`). Here they are one
    Function, whose backward gives the threshold its zero gradient (Keras
    warns about a trainable variable without one, as
    `DistributedDataParallel` may refuse it).
    """
    global _TORCH_FROZEN_KERNEL
    if _TORCH_FROZEN_KERNEL is None:
        import torch

        class FrozenKernel(torch.autograd.Function):
            @staticmethod
            def forward(ctx, kernel, threshold, prune_mask):
                # The boolean mask is kept for the backward (a quarter of a
                # float copy's bytes) and read as uint8: see `_float_mask`.
                ctx.save_for_backward(prune_mask)
                ctx.threshold = (threshold.shape, threshold.dtype, threshold.device)
                return kernel * prune_mask.view(torch.uint8).to(kernel.dtype)

            @staticmethod
            def backward(ctx, grad):
                (prune_mask,) = ctx.saved_tensors
                shape, dtype, device = ctx.threshold
                grad_kernel = None
                if ctx.needs_input_grad[0]:
                    grad_kernel = grad * prune_mask.view(torch.uint8).to(grad.dtype)
                return grad_kernel, torch.zeros(shape, dtype=dtype, device=device), None

        _TORCH_FROZEN_KERNEL = FrozenKernel
    return _TORCH_FROZEN_KERNEL.apply(kernel, threshold, prune_mask)


def _eager_torch():
    """Whether this call runs eagerly on PyTorch (not traced by `torch.compile` or for export)."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


class _ThresholdConstraint(constraints.Constraint):
    """A threshold's constraint: the layer's `threshold_constraint`, and zero once frozen.

    The freeze zeroes the thresholds (`hard_prune()`), and a frozen mask
    gives them a zero gradient; an optimizer with momentum would still move
    them off zero with what it gathered before the freeze. A frozen mask
    does not read its threshold, but the logs (`threshold_mean/...`) do, and
    so would a mask unfrozen later. The optimizer applies this after each
    update; `frozen` is Python state, read when the train step is traced
    (the freeze retraces it).
    """

    def __init__(self, mask, constraint):
        self.mask = mask
        self.constraint = constraint

    def __call__(self, threshold):
        if self.mask.frozen:
            return ops.zeros_like(ops.convert_to_tensor(threshold))
        return threshold if self.constraint is None else self.constraint(threshold)


# -------------------------------------------------------------- the component


def compute_fans(shape):
    """`(fan_in, fan_out)` of a kernel shape, as Keras's initializers count them."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def _initializer_std(initializer, shape):
    """The standard deviation a kernel initializer draws with, without drawing."""
    if isinstance(initializer, initializers.VarianceScaling):
        fan_in, fan_out = compute_fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(initializer.mode, (fan_in + fan_out) / 2)
        return math.sqrt(initializer.scale / max(1.0, fan))
    sample = initializer(shape=tuple(shape), dtype="float32")
    return float(np.std(to_numpy(sample)))


def _recording_gradients():
    """Whether the backend may differentiate the current call.

    Only PyTorch says no (`torch.no_grad()`, as in `model.predict`); there
    the plain inference path skips `_unmasked`, whose Python cost shows in an
    eager batch-1 call (`benchmarks/speed.py` measures it).
    """
    if keras.backend.backend() != "torch":
        return True
    import torch

    return torch.is_grad_enabled()


class KernelMask:
    """The pruning mask of one kernel of `layer`: its variables and every formula.

    Args:
        layer: The layer holding the kernel (the mask's variables are
            created on it).
        kernel_name: The attribute through which the layer reads the kernel
            (`"kernel"`, `"embeddings"`, `"depthwise_kernel"`, ...); the raw
            variable is stored at `"_" + kernel_name`.
        output_axes: The kernel's axes that index output units.
        n_m_axis: The reduction axis along which N:M groups run (`None`: the
            kernel has none and granularity `"n:m"` is refused).
        options: The layer's `MaskOptions`.
        prefix: Put before each variable's name, for layers with several
            kernels (`"depthwise_threshold"`, ...).
    """

    def __init__(self, layer, kernel_name, output_axes, n_m_axis, options, prefix=""):
        self.layer = layer
        self.kernel_name = kernel_name
        self._output_axes = tuple(output_axes)
        self._n_m_axis = n_m_axis
        self.options = options
        self.prefix = prefix
        self.built = False
        # Inference may skip the mask: set by `hard_prune()`, cleared by
        # training and `reset_threshold()` (see `hard_prune`).
        self._plain_inference = False
        # A call took the plain path since `hard_prune()`: compiled inference
        # functions (a model's cached predict step) may hold it.
        self._plain_traced = False
        # Called in training mode, eagerly or while a train step was traced.
        self._seen_training = False
        # The sparsity driver that steers this mask inside the train step
        # (`SparsityScheduler` while it trains), and whether the mask is
        # frozen: then training multiplies by `prune_mask` alone.
        self.driver = None
        self.frozen = False
        self._driven_in = None  # the fit (its History) whose scheduler drives the mask
        # The forward pass (Keras's call context) that last called the layer
        # in training: a shared layer is called again within one.
        self._training_forward = None

    def __repr__(self):
        return f"<KernelMask {self.layer.name}.{self.kernel_name} {self.shape}>"

    # -------------------------------------------------------------- state

    @property
    def kernel(self):
        """The raw kernel variable (unmasked)."""
        return getattr(self.layer, "_" + self.kernel_name)

    def build(self, initializer=None):
        """Create the mask's variables on the layer, for the layer's kernel as it is now."""
        # The kernel's logical shape, as the layer reads it outside `call()`
        # (a quantized int4 kernel is stored packed, two values a byte).
        shape = tuple(int(d) for d in getattr(self.layer, self.kernel_name).shape)
        rank = len(shape)
        self.shape = shape
        self.size = math.prod(shape)
        self.output_axes = tuple(sorted(a % rank for a in self._output_axes))
        self.reduce_axes = tuple(a for a in range(rank) if a not in self.output_axes)
        self.n_m_axis = None if self._n_m_axis is None else self._n_m_axis % rank
        self.unit_shape = tuple(shape[a] for a in self.output_axes)
        self.broadcast_shape = tuple(shape[a] if a in self.output_axes else 1 for a in range(rank))
        options = self.options
        layer, prefix = self.layer, self.prefix
        self.threshold = layer.add_weight(
            name=prefix + "threshold",
            shape=self.unit_shape if options.structured else shape,
            initializer=options.threshold_initializer,
            regularizer=options.threshold_regularizer,
            constraint=_ThresholdConstraint(self, options.threshold_constraint),
            dtype="float32",
            autocast=False,
        )
        # Weights removed by `hard_prune()`: True = alive, False = pruned for
        # good. It multiplies the mask in every mode, so no later training can
        # bring a pruned weight back (its gradient is zero). Boolean: a
        # quarter of a float32 kernel's bytes, resident and read every step.
        self.prune_mask = layer.add_weight(
            name=prefix + "prune_mask",
            shape=shape,
            initializer="ones",
            trainable=False,
            dtype="bool",
            autocast=False,
        )
        temperature = options.temperature
        if temperature is None:
            temperature = self.scale_free_temperature(DEFAULT_RELATIVE_TEMPERATURE, initializer)
        self._temperature = layer.add_weight(
            name=prefix + "temperature",
            shape=(),
            initializer=initializers.Constant(temperature),
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation=_REPLICATED,
        )
        # Strength of the penalty `sparsity_penalty * mean(soft mask)` added
        # to the loss in training. Zero (no force) unless a driver such as
        # `keras_sparse.SparsityScheduler` sets it.
        self.sparsity_penalty = layer.add_weight(
            name=prefix + "sparsity_penalty",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation=_REPLICATED,
        )
        # A sparsity driver's state, updated inside the compiled train step
        # and saved with the model, so that training resumes where it
        # stopped: see `STATE_FIELDS`.
        self.sparsity_state = layer.add_weight(
            name=prefix + "sparsity_state",
            shape=(len(STATE_FIELDS),),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation=_REPLICATED,
        )
        self.built = True

    @property
    def variables(self):
        """The mask's variables, in the order they are created and saved."""
        return [
            self.threshold,
            self.prune_mask,
            self._temperature,
            self.sparsity_penalty,
            self.sparsity_state,
        ]

    def kernel_value(self):
        """The kernel's value in float32, where the mask is computed.

        A stock layer built under a half-precision policy (`"bfloat16"`) holds
        its kernel in that dtype; a sparse layer's own are float32
        (`SparseKernelMixin.add_weight`).
        """
        value = self.kernel.value
        if keras.backend.standardize_dtype(value.dtype) != "float32":
            value = ops.cast(value, "float32")
        return value

    def state(self, field):
        """One field of `sparsity_state` (a scalar tensor)."""
        return self.sparsity_state[STATE_FIELDS.index(field)]

    def scale_free_temperature(self, relative_temperature, initializer=None):
        """`relative_temperature / std(kernel)`: one sharpness for every weight scale."""
        try:
            std = float(to_numpy(ops.std(self.kernel_value())))
        except Exception:
            # Built inside a traced function (e.g. `fit` on a model without
            # `keras.Input`): the kernel has no value yet. Use the spread its
            # initializer promises instead.
            std = _initializer_std(initializer, self.kernel.shape) if initializer else 0.0
        if not math.isfinite(std) or std <= 0:
            return float(relative_temperature)
        return float(relative_temperature) / std

    def trace_key(self):
        """What the formulas' traced code depends on besides the variables' values.

        Masks of equal keys trace equal programs (`keras_sparse.programs`).
        """
        options = self.options
        granularity = (options.structured, options.granularity, options.n_m)
        return (self.shape, self.output_axes, self.n_m_axis, *granularity, self.frozen)

    @property
    def temperature(self):
        return float(to_numpy(self._temperature.value))

    @temperature.setter
    def temperature(self, value):
        self._temperature.assign(check_temperature(value))

    # ---------------------------------------------------------- formulas
    #
    # Every branch below is taken on Python state (`training`, the options,
    # `_plain_inference`), never on a weight's value: a call makes no
    # host-device round trip and a compiled step holds one path only.

    def _broadcast(self, threshold):
        """A per-unit threshold reshaped to broadcast against the kernel."""
        threshold = ops.convert_to_tensor(threshold)
        if self.options.structured:
            return ops.reshape(threshold, self.broadcast_shape)
        return threshold

    def _prune_mask_float(self):
        return _float_mask(self.prune_mask.value)

    def soft(self, kernel):
        """The soft mask, `sigmoid((|kernel| - threshold) * temperature)`, at the granularity."""
        granularity = self.options.granularity
        prune_mask = self._prune_mask_float()
        threshold = self._broadcast(self.threshold)
        if granularity == "neuron":
            magnitude = neuron_scores(kernel, prune_mask, self.reduce_axes, differentiable=True)
        else:
            magnitude = ops.abs(kernel)
            if granularity == "n:m":
                boundary = n_m_boundary(magnitude * prune_mask, *self.options.n_m, self.n_m_axis)
                threshold = ops.maximum(threshold, boundary)
        return ops.sigmoid((magnitude - threshold) * self._temperature.value) * prune_mask

    def trained_kernel(self, kernel):
        """`kernel` times the mask training multiplies it by: the soft mask, or
        the hard one for the straight-through mix (its forward value)."""
        mask = self.hard(kernel) if self.options.straight_through else self.soft(kernel)
        return kernel * mask

    def keep(self, kernel):
        """Boolean, kernel-shaped: what the hard mask keeps (`prune_mask` included).

        A frozen mask keeps exactly `prune_mask`, whatever its threshold does.
        """
        if self.frozen:
            return ops.convert_to_tensor(self.prune_mask)
        granularity = self.options.granularity
        threshold = self._broadcast(self.threshold)
        if granularity == "neuron":
            scores = neuron_scores(kernel, self._prune_mask_float(), self.reduce_axes)
            keep = ops.broadcast_to(ops.greater_equal(scores, threshold), self.shape)
        else:
            magnitude = ops.abs(kernel)
            keep = ops.greater_equal(magnitude, threshold)
            if granularity == "n:m":
                alive = magnitude * self._prune_mask_float()
                pattern = n_m_keep(alive, *self.options.n_m, self.n_m_axis)
                keep = ops.logical_and(keep, pattern)
        return ops.logical_and(keep, self.prune_mask.value)

    def hard(self, kernel):
        """`|kernel| >= threshold` (at the granularity) as float32, pruned weights at zero."""
        return _float_mask(self.keep(kernel))

    def _fused_training(self):
        """The hand-fused training mask of this backend, or `None` for autodiff of `soft()`.

        `_soft_masked_kernel` on TensorFlow and JAX, eager PyTorch's
        `_torch_soft_masked_kernel`; for the weight granularity without the
        straight-through mix.
        """
        if self.options.granularity != "weight" or self.options.straight_through:
            return None
        if keras.backend.backend() in ("tensorflow", "jax"):
            return _soft_masked_kernel
        if _eager_torch():
            return _torch_soft_masked_kernel
        return None

    def _start_training(self):
        self._seen_training = True
        self._called_in_training = True  # `SparsityScheduler` leaves out masks not called
        if self._plain_inference and self._plain_traced:
            warnings.warn(
                f"Layer '{self.layer.name}' is trained after `hard_prune()`: inference "
                "functions compiled since then (such as a model's cached predict or "
                "evaluate step) use the kernel without its mask. Call `hard_prune()` "
                "again after training so that they stay exact.",
                stacklevel=4,
            )
        self._plain_inference = False

    def masked_kernel(self, training):
        """The kernel as the layer's call should use it (float32), in training or inference.

        Training: `kernel * soft_mask` (or the straight-through mix), and the
        penalty `sparsity_penalty * mean(mask)` added to the layer's losses.
        Inference: `kernel * hard_mask` (or the soft mask with
        `inference_mask="soft"`), or the kernel itself after `hard_prune()`.
        """
        kernel = self.kernel_value()
        if training:
            self._start_training()
            if self.frozen:
                # The driver fixed the mask: no sigmoid, no penalty. The
                # threshold still gets a (zero) gradient, from the zero term
                # (or, in eager PyTorch, from the Function's backward): Keras
                # warns about a trainable variable without one.
                if _eager_torch():
                    return _torch_frozen_kernel(kernel, self.threshold.value, self.prune_mask.value)
                self.layer.add_loss(0.0 * ops.sum(self.threshold.value))
                return kernel * self._prune_mask_float()
            # A layer called twice in one forward pass (a shared layer, tied
            # embeddings) is driven, and penalised, once: a second update
            # would count the step twice, and in eager PyTorch it would write
            # the penalty the first call's backward still needs.
            first_call = self._first_training_call()
            if self.driver is not None and first_call:
                self.driver.drive(self, kernel)
            fused = self._fused_training()
            if fused is not None:
                values = (
                    kernel,
                    self._broadcast(self.threshold),
                    self.prune_mask.value,
                    self._temperature.value,
                )
                if keras.backend.backend() == "tensorflow":
                    # Tensors, not variables: a TensorFlow custom gradient must not read them.
                    values = tuple(ops.copy(value) for value in values)
                masked, density = fused(*values)
            else:
                mask = self.soft(kernel)
                if self.options.straight_through:
                    # Hard mask forward, sigmoid gradient backward.
                    mask = mask + ops.stop_gradient(self.hard(kernel) - mask)
                # The mean first: PyTorch's eager backward then holds one
                # kernel-sized gradient fewer at its peak (measured with
                # benchmarks/compare_revisions.py).
                density = ops.mean(self._penalised_mask(kernel, mask))
                masked = kernel * mask
            if first_call:
                self.layer.add_loss(self.sparsity_penalty * density)
            return masked
        if self.options.inference_mask == "soft":
            return kernel * self.soft(kernel)
        if not self._plain_inference:
            return kernel * self.hard(kernel)
        self._plain_traced = True
        if not _recording_gradients():
            return kernel
        return _unmasked(kernel, self.prune_mask.value)

    def _penalised_mask(self, kernel, mask):
        """The mask whose mean the penalty takes, on the autodiff path.

        For the weight and neuron granularities, `mask` as if the kernel were
        constant: the penalty moves the thresholds only, as in
        `_soft_masked_kernel`'s fused gradient. N:M patterns keep it on the
        weights too: moving it to the thresholds gained nothing there (the
        pruning guide's seventh study).
        """
        if self.options.granularity == "n:m":
            return mask
        return self._mask_held_at(kernel, mask)

    def _mask_held_at(self, kernel, mask):
        """`mask`'s value, differentiable in the thresholds only (the kernel held constant)."""
        held = self.soft(ops.stop_gradient(kernel))
        if self.options.straight_through:
            # `mask`'s value is already the hard mask: no second comparison.
            held = held + ops.stop_gradient(mask - held)
        return held

    def _first_training_call(self):
        """Whether this is the layer's first call in training in the current forward pass.

        A forward pass is Keras's stateless scope where there is one (JAX's
        train step runs the model's `call` in a `stateless_call`), otherwise
        the call context that Keras opens at the outermost layer call and
        shares with the layers it calls; outside both, each call counts.
        """
        context = global_state.get_global_attribute("stateless_scope")
        if context is None:
            context = global_state.get_global_attribute("current_call_ctx")
        if context is None:
            return True
        # A weak reference: the context holds the model (the scope, on JAX,
        # the values being traced), which must not outlive its forward pass.
        first = self._training_forward is None or self._training_forward() is not context
        self._training_forward = weakref.ref(context)
        return first

    # ------------------------------------------- statistics and actions

    def _program(self, name, function):
        """`function` over this mask's variables, compiled once per mask structure on JAX."""
        return Program(function, [self.kernel, *self.variables], key=(name, *self.trace_key()))

    def num_active(self):
        """Number of weights the hard mask keeps."""
        count = self._program("num_active", self.count_active)()
        return int(to_numpy(count))

    def count_active(self, kernel=None):
        """`num_active()` as an int32 tensor, computed where it is called (a program, a step).

        `kernel`: the kernel's value as the caller holds it (default: the variable's).
        A sum, not `ops.count_nonzero`: Keras's PyTorch version of that warns
        (it transposes a 0-d tensor).
        """
        kernel = self.kernel_value() if kernel is None else kernel
        keep = self.keep(kernel)
        if _eager_torch():  # the bytes as uint8: see `_float_mask`
            import torch

            return keep.view(torch.uint8).sum(dtype=torch.int32)
        return ops.sum(ops.cast(keep, "int32"))

    def alive_units(self):
        """Number of output units with at least one active weight."""
        return int(to_numpy(self._program("alive_units", self._count_units)()))

    def _count_units(self):
        keep = self.keep(self.kernel_value())
        if self.reduce_axes:
            keep = ops.any(keep, axis=self.reduce_axes)
        return ops.sum(ops.cast(keep, "int32"))

    def density(self):
        return self.num_active() / self.size

    def effective_weight(self):
        """`kernel * hard_mask`, the kernel's shape; the layer is unchanged."""
        kernel = self.kernel_value()
        return kernel * self.hard(kernel)

    def hard_prune(self):
        """Zero the weights below the threshold, record them in `prune_mask`, reset the threshold.

        Runs on the device and keeps each variable's sharding: nothing is
        gathered to the host.
        """
        self._program("hard_prune", self.assign_hard_pruned)()
        self.mark_hard_pruned()

    def assign_hard_pruned(self):
        """`hard_prune()`'s writes to the variables alone (a `Program` may run them)."""
        keep = self.keep(self.kernel_value())
        self.kernel.assign(ops.where(keep, self.kernel.value, 0.0))
        self.prune_mask.assign(keep)
        self.threshold.assign(ops.zeros(self.threshold.shape))

    def mark_hard_pruned(self):
        """`hard_prune()`'s Python state: inference may now skip the mask (see there)."""
        self._plain_inference = not self._seen_training

    def sync_frozen(self):
        """Set `frozen` from the stored state; whether it changed.

        Loading (`load_own_variables`) keeps the two in step, but `set_weights`
        and `assign` write the state alone: `EarlyStopping(restore_best_weights=True)`
        puts back weights saved before the freeze, and the mask, still marked
        frozen, would then serve their `prune_mask` (every weight) instead of
        their thresholds.
        """
        # A quantized kernel holds its zeros: its mask stays frozen, whatever is assigned.
        stored = bool(to_numpy(self.state("frozen")) > 0) or bool(
            getattr(self.layer, "quantization_mode", None)
        )
        if stored == self.frozen:
            return False
        self.frozen = stored
        self._plain_inference = False
        return True

    def threshold_values(self, value):
        """`value` checked and broadcast to the threshold's shape (float32), or a clear error."""
        try:
            array = np.asarray(value, dtype="float32")
        except (TypeError, ValueError):
            raise TypeError(
                "Received an invalid value for `value`, expected a non-negative "
                f"finite number or array. Received: value={value!r}"
            ) from None
        if not np.all(np.isfinite(array)) or np.any(array < 0):
            raise ValueError(
                "Received an invalid value for `value`, expected non-negative "
                f"finite threshold(s). Received: value={value!r}"
            )
        try:
            return np.array(np.broadcast_to(array, self.threshold.shape))
        except ValueError:
            raise ValueError(
                "Received an invalid value for `value`: its shape "
                f"{array.shape} does not broadcast to the threshold's shape "
                f"{tuple(self.threshold.shape)}. Received: value={value!r}"
            ) from None

    def reset_threshold(self, value):
        """Set every threshold to `value` (a non-negative number, or an array that broadcasts)."""
        self.threshold.assign(self.threshold_values(value))
        self._plain_inference = False  # the hard mask changed: see `hard_prune()`

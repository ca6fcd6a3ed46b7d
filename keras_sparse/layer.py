"""`SparseLinear`: a Dense layer whose kernel carries a learnable pruning mask."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
from keras import activations, constraints, initializers, ops, regularizers

from keras_sparse.granularity import (
    DEFAULT_N_M,
    GRANULARITIES,
    check_n_m,
    n_m_boundary,
    n_m_keep,
    n_m_keep_numpy,
    neuron_scores,
    neuron_scores_numpy,
)

# The mask's transition band is about 4 / temperature wide in weight units.
# Tying the default temperature to the kernel's spread at build time makes the
# same default equally sharp in a 784x300 layer (std ~0.04) and a 64x10 one
# (std ~0.2): `temperature = DEFAULT_RELATIVE_TEMPERATURE / std(kernel)`.
DEFAULT_RELATIVE_TEMPERATURE = 10.0

_INFERENCE_MASKS = ("hard", "soft")


def _check_temperature(value):
    try:
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


@ops.custom_gradient
def _unmasked(kernel, prune_mask):
    """`kernel` as it is, with the gradient of `kernel * prune_mask`.

    The inference path of a hard-pruned layer: the value needs no mask (the
    pruned entries are zero), and the gradient still stops at pruned weights,
    so fine-tuning through `training=False` cannot bring them back.
    """

    def grad(*args, upstream=None):
        if upstream is None:  # JAX and TensorFlow pass it positionally
            (upstream,) = args
        return upstream * prune_mask, None

    return kernel, grad


@ops.custom_gradient
def _soft_masked_kernel(kernel, threshold, prune_mask, temperature):
    """`(kernel * mask, mean(mask))` for the seed's mask, with a hand-fused gradient.

    `mask = sigmoid((|kernel| - threshold) * temperature) * prune_mask`. The
    backward pass recomputes the sigmoid instead of keeping it, and computes
    both inputs' gradients from one shared factor,
    `u = prune_mask * temperature * s * (1 - s)`:

        d/dthreshold (per weight) = -(g_w * kernel + g_mean / size) * u
        d/dkernel                 = g_w * mask - sign(kernel) * d/dthreshold

    Used on TensorFlow only. There, side by side with autodiff in one
    process (size 1024, batch 256, XLA), a training step went from 1.41x to
    1.29x `Dense` (structured) and its peak memory from 2.08x to 1.82x; on
    JAX it measured the same as autodiff (XLA fuses both alike), and Keras's
    PyTorch custom gradients take one output only.
    """
    soft = ops.sigmoid((ops.abs(kernel) - threshold) * temperature)
    mask = soft * ops.cast(prune_mask, soft.dtype)
    size = float(np.prod(kernel.shape))

    def grad(*upstreams, upstream=None):
        if upstream is None:  # TensorFlow: one argument per output; JAX: one tuple
            upstream = upstreams if len(upstreams) == 2 else upstreams[0]
        grad_kernel_out, grad_mean = upstream
        factor = mask * (1.0 - soft) * temperature
        grad_threshold = -(grad_kernel_out * kernel + grad_mean / size) * factor
        grad_kernel = grad_kernel_out * mask - ops.sign(kernel) * grad_threshold
        if len(threshold.shape) < len(kernel.shape):  # one threshold per neuron
            grad_threshold = ops.sum(grad_threshold, axis=0)
        return grad_kernel, grad_threshold, None, None

    return (kernel * mask, ops.mean(mask)), grad


def _initializer_std(initializer, shape):
    """The standard deviation a kernel initializer draws with, without drawing."""
    if isinstance(initializer, initializers.VarianceScaling):
        fan_in, fan_out = shape[0], shape[1]
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(initializer.mode, (fan_in + fan_out) / 2)
        return math.sqrt(initializer.scale / max(1.0, fan))
    # Any other initializer: draw a sample with NumPy-backed values.
    sample = initializer(shape=tuple(shape), dtype="float32")
    return float(np.std(ops.convert_to_numpy(sample)))


def _recording_gradients():
    """Whether the backend may differentiate the current call.

    Only PyTorch says no (`torch.no_grad()`, as in `model.predict`); there
    the plain inference path skips `_unmasked`, whose Python cost is 5-10%
    of an eager batch-1 call (measured with benchmarks/speed.py).
    """
    if keras.backend.backend() != "torch":
        return True
    import torch

    return torch.is_grad_enabled()


@keras.saving.register_keras_serializable(package="keras_sparse")
class SparseLinear(keras.layers.Layer):
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
        kernel_regularizer, bias_regularizer, threshold_regularizer:
            Regularizers for each weight. Default `None`.
        activity_regularizer: Regularizer for the output. Default `None`.
        kernel_constraint, bias_constraint: Constraints. Default `None`.
        threshold_constraint: Constraint for the threshold. Defaults to
            `"non_neg"`: a negative threshold prunes nothing and only shrinks
            small weights, so it is clipped at zero.
        straight_through: If `True`, the training forward pass uses the hard
            mask while gradients flow through the soft one (a straight-through
            estimator). Defaults to `False` (the seed's soft mask).
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
        if temperature is not None:
            temperature = _check_temperature(temperature)
        if inference_mask not in _INFERENCE_MASKS:
            raise ValueError(
                "Received an invalid value for `inference_mask`, expected one "
                f"of {_INFERENCE_MASKS}. Received: inference_mask={inference_mask!r}"
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                "Received an invalid value for `granularity`, expected one of "
                f"{GRANULARITIES}. Received: granularity={granularity!r}"
            )
        if granularity != "weight" and not structured:
            raise ValueError(
                f"Received an invalid value for `structured`: granularity={granularity!r} "
                "has one threshold per output neuron, so `structured` must be True. "
                f"Received: structured={structured!r}"
            )
        if granularity == "n:m":
            n_m = check_n_m(DEFAULT_N_M if n_m is None else n_m)
        elif n_m is not None:
            raise ValueError(
                "Received an invalid value for `n_m`: it applies to granularity='n:m' "
                f"only. Received: n_m={n_m!r}, granularity={granularity!r}"
            )
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.units = int(units)
        self.activation = activations.get(activation)
        self.use_bias = bool(use_bias)
        self.structured = bool(structured)
        self.initial_temperature = temperature
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.threshold_initializer = initializers.get(threshold_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.threshold_regularizer = regularizers.get(threshold_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.threshold_constraint = constraints.get(threshold_constraint)
        self.straight_through = bool(straight_through)
        self.inference_mask = inference_mask
        self.granularity = granularity
        self.n_m = n_m
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        in_features = input_shape[-1]
        if in_features is None:
            raise ValueError(
                "The last dimension of the inputs to `SparseLinear` should be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        in_features = int(in_features)
        kernel_shape = (in_features, self.units)
        threshold_shape = (self.units,) if self.structured else kernel_shape
        # Every weight is float32 whatever the dtype policy, and is read
        # without autocasting: the mask is computed in float32 and only the
        # masked kernel is cast to the compute dtype.
        self.kernel = self.add_weight(
            name="kernel",
            shape=kernel_shape,
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            dtype="float32",
            autocast=False,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                dtype="float32",
                autocast=False,
            )
        else:
            self.bias = None
        self.threshold = self.add_weight(
            name="threshold",
            shape=threshold_shape,
            initializer=self.threshold_initializer,
            regularizer=self.threshold_regularizer,
            constraint=self.threshold_constraint,
            dtype="float32",
            autocast=False,
        )
        # Weights removed by `hard_prune()`: True = alive, False = pruned for
        # good. It multiplies the mask in every mode, so no later training can
        # bring a pruned weight back (its gradient is zero). Boolean, a
        # quarter of a float32 kernel's bytes: it is resident and read at
        # every step (benchmarks/speed.py measures both).
        self.prune_mask = self.add_weight(
            name="prune_mask",
            shape=kernel_shape,
            initializer="ones",
            trainable=False,
            dtype="bool",
            autocast=False,
        )
        temperature = self.initial_temperature
        if temperature is None:
            temperature = self._scale_free_temperature(DEFAULT_RELATIVE_TEMPERATURE)
        self._temperature = self.add_weight(
            name="temperature",
            shape=(),
            initializer=initializers.Constant(temperature),
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        # Strength of the sparsity penalty `penalty * mean(soft mask)` that this
        # layer adds to the loss in training. Zero (no force) unless a driver
        # such as `keras_sparse.SparsityScheduler` sets it between steps.
        self.sparsity_penalty = self.add_weight(
            name="sparsity_penalty",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: in_features})
        self.built = True

    def _scale_free_temperature(self, relative_temperature):
        """`relative_temperature / std(kernel)`: one sharpness for every scale."""
        try:
            std = float(ops.convert_to_numpy(ops.std(self.kernel)))
        except Exception:
            # Built inside a traced function (e.g. `fit` on a model without
            # `keras.Input`): the kernel has no value yet. Use the spread its
            # initializer promises instead.
            std = _initializer_std(self.kernel_initializer, self.kernel.shape)
        if not math.isfinite(std) or std <= 0:
            return float(relative_temperature)
        return float(relative_temperature) / std

    # ---------------------------------------------------------------- forward
    #
    # The mask costs O(in * out) per call against O(batch * in * out) for the
    # matmul (`benchmarks/speed.py` measures both against `Dense`). Every
    # branch below is taken on Python state (`training`, `inference_mask`,
    # `_plain_inference`), never on a weight's value: a call makes no
    # host-device round trip and a compiled step holds one path only.
    #
    # * Training: `kernel * soft_mask`, differentiated by the backend; on
    #   TensorFlow, `_soft_masked_kernel`'s hand-fused gradient instead, the
    #   one backend where it measured faster (see there).
    # * Inference: `kernel * hard_mask`, no sigmoid. (`ops.where` would be one
    #   op fewer, but PyTorch's CPU `where` is 6x slower than a multiply when
    #   the condition is random, as a mask's is.)
    # * Inference after `hard_prune()`: the kernel as it is, when that is
    #   known to be exact (see `hard_prune`).
    #
    # The plain path trusts that the kernel still equals `effective_weight()`.
    # Training can break that without running any Python (a compiled train
    # step, Adam's momentum on the zeroed weights, a learning threshold), so
    # the plain path is only turned on for a layer never trained in this
    # process, and turned off by its first training call.

    # Inference may skip the mask: set by `hard_prune()`, cleared by training
    # and `reset_threshold()`.
    _plain_inference = False
    # A call took the plain path since `hard_prune()`: compiled inference
    # functions (a model's cached predict step) may hold it.
    _plain_traced = False
    # Called in training mode, eagerly or while a train step was traced.
    _seen_training = False

    def _soft_mask(self):
        """The seed's mask, `sigmoid((|kernel| - threshold) * temperature)`, at the granularity."""
        magnitude, threshold = ops.abs(self.kernel), self.threshold
        if self.granularity == "neuron":
            magnitude = neuron_scores(self.kernel, self.prune_mask, differentiable=True)
        elif self.granularity == "n:m":
            boundary = n_m_boundary(magnitude * self.prune_mask, *self.n_m)
            threshold = ops.maximum(threshold, boundary)
        logits = (magnitude - threshold) * self._temperature
        return ops.sigmoid(logits) * self.prune_mask

    def _keep(self):
        """What the hard mask keeps, before `prune_mask`; broadcasts to the kernel."""
        if self.granularity == "neuron":
            return ops.greater_equal(neuron_scores(self.kernel, self.prune_mask), self.threshold)
        keep = ops.greater_equal(ops.abs(self.kernel), self.threshold)
        if self.granularity == "n:m":
            pattern = n_m_keep(ops.abs(self.kernel) * self.prune_mask, *self.n_m)
            keep = ops.logical_and(keep, pattern)
        return keep

    def _hard_mask(self):
        """`|kernel| >= threshold` (at the layer's granularity), pruned weights kept at zero."""
        return ops.cast(ops.logical_and(self._keep(), self.prune_mask), "float32")

    def _mask(self, training):
        if training or self.inference_mask == "soft":
            soft = self._soft_mask()
            if training and self.straight_through:
                # Hard mask forward, sigmoid gradient backward.
                return soft + ops.stop_gradient(self._hard_mask() - soft)
            return soft
        return self._hard_mask()

    def _hard_masked_kernel(self):
        """`kernel * hard_mask`, values and gradient, with the least work the state allows."""
        if not self._plain_inference:
            return self.kernel * self._hard_mask()
        self._plain_traced = True
        if not _recording_gradients():
            return self.kernel
        kernel = ops.convert_to_tensor(self.kernel)
        return _unmasked(kernel, ops.convert_to_tensor(self.prune_mask))

    def _fused_training(self):
        """Whether training takes `_soft_masked_kernel` (see there)."""
        return (
            keras.backend.backend() == "tensorflow"
            and self.granularity == "weight"
            and not self.straight_through
        )

    def _in_compute_dtype(self, weight):
        # The weights are float32 under every policy; only mixed precision casts.
        if self.compute_dtype == "float32":
            return weight
        return ops.cast(weight, self.compute_dtype)

    def _start_training(self):
        self._seen_training = True
        if self._plain_inference and self._plain_traced:
            warnings.warn(
                f"SparseLinear '{self.name}' is trained after `hard_prune()`: inference "
                "functions compiled since then (such as a model's cached predict or "
                "evaluate step) use the kernel without its mask. Call `hard_prune()` "
                "again after training so that they stay exact.",
                stacklevel=3,
            )
        self._plain_inference = False

    def call(self, inputs, training=None):
        if training:
            self._start_training()
            if self._fused_training():
                # Tensors, not variables: a custom gradient must not read variables.
                kernel, density = _soft_masked_kernel(
                    ops.copy(self.kernel),
                    ops.copy(self.threshold),
                    ops.copy(self.prune_mask),
                    ops.copy(self._temperature),
                )
            else:
                mask = self._mask(True)
                # The mean first: PyTorch's eager backward then holds one
                # kernel-sized gradient fewer at its peak (measured: 2.82x ->
                # 2.45x Dense with benchmarks/compare_revisions.py).
                density = ops.mean(mask)
                kernel = self.kernel * mask
            self.add_loss(self.sparsity_penalty * density)
        elif self.inference_mask == "soft":
            kernel = self.kernel * self._soft_mask()
        else:
            kernel = self._hard_masked_kernel()
        outputs = ops.matmul(inputs, self._in_compute_dtype(kernel))
        if self.bias is not None:
            outputs = ops.add(outputs, self._in_compute_dtype(self.bias))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.units,)

    # ------------------------------------------------------ seed-style API

    @classmethod
    def new(cls, in_features, out_features, **kwargs):
        """A built structured layer with bias, as the seed's `SparseLinear::new`."""
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
        return int(self.kernel.shape[0]) if self.built else None

    @property
    def out_features(self):
        """Size of each output sample (`units`)."""
        return self.units

    @property
    def is_structured(self):
        """Whether there is one threshold per output neuron."""
        return self.structured

    @property
    def temperature(self):
        """The mask's sharpness (a float); `None` before build if left to default."""
        if not self.built:
            return self.initial_temperature
        return float(ops.convert_to_numpy(self._temperature))

    @temperature.setter
    def temperature(self, value):
        value = _check_temperature(value)
        if not self.built:
            self.initial_temperature = value
        else:
            self._temperature.assign(value)

    def _require_built(self, method):
        if not self.built:
            raise ValueError(
                f"`{method}()` needs the layer's weights, but layer "
                f"'{self.name}' is not built yet. Call it on an input or call "
                "`layer.build(input_shape)` first."
            )

    def _hard_mask_numpy(self):
        kernel = ops.convert_to_numpy(self.kernel)
        threshold = ops.convert_to_numpy(self.threshold)
        prune_mask = ops.convert_to_numpy(self.prune_mask)
        keep = prune_mask > 0
        if self.granularity == "neuron":
            return (neuron_scores_numpy(kernel, prune_mask) >= threshold) & keep
        if self.granularity == "n:m":
            keep &= n_m_keep_numpy(np.abs(kernel) * prune_mask, *self.n_m)
        return (np.abs(kernel) >= threshold) & keep

    def num_active(self):
        """Number of weights with `|w| >= threshold` that were not pruned."""
        self._require_built("num_active")
        return int(self._hard_mask_numpy().sum())

    def alive_neurons(self):
        """Number of output neurons with at least one active weight.

        With `granularity="neuron"`, the neurons kept; after `hard_prune()`,
        the others are all-zero kernel columns, which `keras_sparse.shrink()`
        removes.
        """
        self._require_built("alive_neurons")
        return int(self._hard_mask_numpy().any(axis=0).sum())

    def density(self):
        """Fraction of weights that are active (hard threshold)."""
        self._require_built("density")
        return float(self._hard_mask_numpy().mean())

    def sparsity(self):
        """Fraction of weights that are pruned: `1 - density()`."""
        self._require_built("sparsity")
        return 1.0 - self.density()

    def effective_weight(self):
        """`kernel * hard_mask`, shape `(in_features, units)`; the layer is unchanged."""
        self._require_built("effective_weight")
        return self.kernel * self._hard_mask()

    def hard_prune(self):
        """Zero the weights below the threshold and reset the threshold to 0.

        Irreversible: the pruned weights are recorded in `prune_mask`, so
        `density()` still counts them as pruned and further training cannot
        bring them back.

        Afterwards the kernel equals `effective_weight()`, and inference is a
        plain matmul with it (no mask computed), unless the layer was trained
        in this process: a train step compiled before `hard_prune()` can keep
        running without Python, while an optimizer's momentum moves the zeroed
        weights (their gradient is zero, not their velocity) and the threshold
        keeps learning, so inference keeps computing the hard mask, which
        stays exact. Training the layer or `reset_threshold()` ends the plain
        path. `hard_prune()` is idempotent: call it on a pruned model loaded
        for serving to get the plain path.
        """
        self._require_built("hard_prune")
        keep = self._hard_mask_numpy()
        kernel = ops.convert_to_numpy(self.kernel)
        self.kernel.assign(np.where(keep, kernel, 0.0).astype("float32"))
        self.prune_mask.assign(keep)
        self.threshold.assign(np.zeros(self.threshold.shape, "float32"))
        self._plain_inference = not self._seen_training

    def reset_threshold(self, value):
        """Set every threshold to `value` (a non-negative float, or an array
        broadcastable to the threshold's shape)."""
        self._require_built("reset_threshold")
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
            array = np.broadcast_to(array, self.threshold.shape)
        except ValueError:
            raise ValueError(
                "Received an invalid value for `value`: its shape "
                f"{array.shape} does not broadcast to the threshold's shape "
                f"{tuple(self.threshold.shape)}. Received: value={value!r}"
            ) from None
        self.threshold.assign(np.array(array))
        self._plain_inference = False  # the hard mask changed: see `hard_prune()`

    # ------------------------------------------------------------ config

    def get_config(self):
        base_config = super().get_config()
        config = {
            "units": self.units,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "structured": self.structured,
            "temperature": self.initial_temperature,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "threshold_initializer": initializers.serialize(self.threshold_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "threshold_regularizer": regularizers.serialize(self.threshold_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "threshold_constraint": constraints.serialize(self.threshold_constraint),
            "straight_through": self.straight_through,
            "inference_mask": self.inference_mask,
            "granularity": self.granularity,
            "n_m": self.n_m,
        }
        return {**base_config, **config}

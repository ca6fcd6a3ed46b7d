"""SparseLinear against the seed's formulas (NumPy references) and its API."""

import math

import keras
import numpy as np
import pytest
import reference
from backend_utils import gradients, to_numpy
from factories import layer_arrays, make_layer

from keras_sparse import DEFAULT_RELATIVE_TEMPERATURE, SparseLinear


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_training_forward_is_the_seed_formula(rng, structured, use_bias):
    layer = make_layer(rng, structured=structured, use_bias=use_bias)
    x = rng.normal(size=(5, 6)).astype("float32")
    kernel, bias, threshold = layer_arrays(layer)
    expected = reference.forward(x, kernel, bias, threshold, 5.0)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structured", [True, False])
def test_inference_forward_uses_the_hard_mask_by_default(rng, structured):
    layer = make_layer(rng, structured=structured)
    x = rng.normal(size=(5, 6)).astype("float32")
    kernel, bias, threshold = layer_arrays(layer)
    expected = reference.forward(x, kernel, bias, threshold, 5.0, hard=True)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_soft_inference_mask_keeps_the_seed_forward(rng):
    layer = make_layer(rng)
    soft = SparseLinear(4, temperature=5.0, inference_mask="soft")
    soft.build((None, 6))
    soft.set_weights(layer.get_weights())
    x = rng.normal(size=(5, 6)).astype("float32")
    kernel, bias, threshold = layer_arrays(layer)
    expected = reference.forward(x, kernel, bias, threshold, 5.0)
    np.testing.assert_allclose(to_numpy(soft(x, training=False)), expected, rtol=1e-5, atol=1e-5)


def test_inputs_of_rank_three_are_handled_like_dense(rng):
    layer = make_layer(rng)
    x = rng.normal(size=(2, 3, 6)).astype("float32")
    kernel, bias, threshold = layer_arrays(layer)
    expected = reference.forward(x, kernel, bias, threshold, 5.0)
    out = to_numpy(layer(x, training=True))
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_activation_is_applied_after_the_bias(rng):
    layer = SparseLinear(4, activation="relu", temperature=5.0)
    layer.build((None, 6))
    layer.set_weights(make_layer(rng).get_weights())
    x = rng.normal(size=(5, 6)).astype("float32")
    kernel, bias, threshold = layer_arrays(layer)
    expected = np.maximum(reference.forward(x, kernel, bias, threshold, 5.0), 0)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structured", [True, False])
def test_gradients_match_the_analytic_formula(rng, structured):
    layer = make_layer(rng, structured=structured)
    x = rng.normal(size=(5, 6)).astype("float32")
    upstream = rng.normal(size=(5, 4)).astype("float32")
    kernel, _, threshold = layer_arrays(layer)
    d_kernel, d_bias, d_threshold = gradients(layer, x, upstream)
    want_kernel, want_threshold = reference.gradients(x, kernel, threshold, 5.0, upstream)
    np.testing.assert_allclose(d_kernel, want_kernel, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_bias, upstream.sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_threshold, want_threshold, rtol=1e-4, atol=1e-4)


def test_threshold_gradient_matches_finite_differences(rng):
    layer = make_layer(rng, temperature=2.0)
    x = rng.normal(size=(5, 6)).astype("float64")
    upstream = rng.normal(size=(5, 4))
    kernel, bias, threshold = (a.astype("float64") for a in layer_arrays(layer))
    _, _, d_threshold = gradients(layer, x.astype("float32"), upstream.astype("float32"))

    def loss(t):
        return np.sum(reference.forward(x, kernel, bias, t, 2.0) * upstream)

    eps = 1e-6
    numeric = np.array(
        [(loss(threshold + eps * e) - loss(threshold - eps * e)) / (2 * eps) for e in np.eye(4)]
    )
    np.testing.assert_allclose(d_threshold, numeric, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("slices", ["whole_kernel", "row_by_row"])
@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["training", "soft_inference"])
def test_penalty_and_pruned_weights_gradients_match_finite_differences(
    rng, structured, training, slices, monkeypatch
):
    # The loss `fit` sees, `sum(y * upstream) + penalty * mean(mask)`, with some
    # weights already pruned: its gradients against float64 central differences, the
    # kernel's with the penalty's mask held constant.
    # In training, every backend takes its fused gradient (TensorFlow and JAX one,
    # eager PyTorch its own); the soft inference mask (no penalty there) is autodiff on
    # every backend.
    # Eager PyTorch on a CPU runs its fused mask on slices of the kernel's rows.
    if slices == "row_by_row":
        from keras_sparse import mask as mask_module

        monkeypatch.setattr(mask_module, "_CPU_SLICE_ELEMENTS", 1)
    layer = make_layer(
        rng, structured=structured, temperature=2.0, inference_mask="hard" if training else "soft"
    )
    penalty = 0.7
    layer.sparsity_penalty.assign(penalty)
    alive = rng.random((6, 4)) > 0.3
    layer.prune_mask.assign(alive)
    x = rng.normal(size=(5, 6))
    upstream = rng.normal(size=(5, 4))
    kernel, bias, threshold = (a.astype("float64") for a in layer_arrays(layer))
    d_kernel, _, d_threshold = gradients(
        layer, x.astype("float32"), upstream.astype("float32"), training, with_losses=training
    )

    def loss(k, t, k_penalised=None):
        mask = reference.soft_mask(k, t, 2.0) * alive
        k_penalised = k if k_penalised is None else k_penalised
        penalised = reference.soft_mask(k_penalised, t, 2.0) * alive
        return np.sum((x @ (k * mask) + bias) * upstream) + training * penalty * np.mean(penalised)

    # The penalty reaches the thresholds only: the kernel's gradient holds the
    # penalty's mask at the current kernel.
    want_kernel = reference.central_differences(lambda k: loss(k, threshold, kernel), kernel)
    want_threshold = reference.central_differences(lambda t: loss(kernel, t), threshold)
    np.testing.assert_allclose(d_kernel, want_kernel, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(d_threshold, want_threshold, rtol=1e-3, atol=1e-3)
    assert np.all(d_kernel[~alive] == 0)
    x = x.astype("float32")
    want = x @ (kernel * reference.soft_mask(kernel, threshold, 2.0) * alive) + bias
    np.testing.assert_allclose(to_numpy(layer(x, training=training)), want, rtol=1e-5, atol=1e-5)


def test_training_takes_the_backends_own_path(rng, monkeypatch):
    # TensorFlow and JAX train through `_soft_masked_kernel`'s hand-fused gradient, eager
    # PyTorch through its own: the tests above then check each backend's own path.
    from keras_sparse import mask as mask_module

    calls = []
    for name in ("_soft_masked_kernel", "_torch_soft_masked_kernel"):
        fused = getattr(mask_module, name)

        def counted(*args, name=name, fused=fused):
            calls.append(name)
            return fused(*args)

        monkeypatch.setattr(mask_module, name, counted)
    layer = make_layer(rng)
    layer(rng.normal(size=(2, 6)).astype("float32"), training=True)
    expected = {
        "tensorflow": ["_soft_masked_kernel"],
        "jax": ["_soft_masked_kernel"],
        "torch": ["_torch_soft_masked_kernel"],
    }.get(keras.backend.backend(), [])
    assert calls == expected


def test_straight_through_forward_is_hard_and_gradient_is_soft(rng):
    layer = SparseLinear(4, temperature=5.0, straight_through=True)
    layer.build((None, 6))
    layer.set_weights(make_layer(rng).get_weights())
    alive = rng.random((6, 4)) > 0.3  # some weights already pruned
    layer.prune_mask.assign(alive)
    x = rng.normal(size=(5, 6)).astype("float32")
    upstream = rng.normal(size=(5, 4)).astype("float32")
    kernel, bias, threshold = layer_arrays(layer)
    hard = reference.forward(x, kernel * alive, bias, threshold, 5.0, hard=True)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), hard, rtol=1e-5, atol=1e-5)
    # With the penalty: it reaches the thresholds only, through the soft mask's gradient.
    penalty = 0.7
    layer.sparsity_penalty.assign(penalty)
    d_kernel, _, d_threshold = gradients(layer, x, upstream, with_losses=True)
    mask = reference.soft_mask(kernel, threshold, 5.0) * alive
    hard_mask = (np.abs(kernel) >= threshold) * alive
    d_effective = x.T @ upstream
    slope = alive * mask * (1 - mask) * 5.0
    want = -(d_effective * kernel * slope).sum(axis=0) - penalty * slope.sum(axis=0) / slope.size
    np.testing.assert_allclose(d_threshold, want, rtol=1e-4, atol=1e-4)
    want_kernel = d_effective * (hard_mask + np.abs(kernel) * alive * mask * (1 - mask) * 5.0)
    np.testing.assert_allclose(d_kernel, want_kernel, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- weights, shapes


@pytest.mark.parametrize(
    "structured, threshold_shape",
    [(True, (4,)), (False, (6, 4))],
    ids=["structured", "unstructured"],
)
def test_weights_have_keras_layout_and_float32(structured, threshold_shape):
    layer = SparseLinear(4, structured=structured)
    assert layer.in_features is None
    layer.build((None, 6))
    assert layer.kernel.shape == (6, 4)
    assert layer.bias.shape == (4,)
    assert layer.threshold.shape == threshold_shape
    paths = [w.path for w in layer.trainable_weights]
    assert [p.split("/")[-1] for p in paths] == ["kernel", "bias", "threshold"]
    assert all(w.dtype == "float32" for w in layer.weights if w is not layer.prune_mask)
    assert layer.prune_mask.dtype == "bool" and not layer.prune_mask.trainable
    assert layer.in_features == 6 and layer.out_features == 4
    assert layer.is_structured is structured
    n_threshold = int(np.prod(threshold_shape))
    # kernel + bias + threshold trainable; prune_mask, temperature, penalty and
    # the driver's five-number state not
    assert layer.count_params() == 24 + 4 + n_threshold + 24 + 1 + 1 + 5


MASK_VARIABLES = ("threshold", "prune_mask", "temperature", "sparsity_penalty", "sparsity_state")


def test_mask_variables_keep_their_names_dtypes_and_roles():
    # Names are the variables' paths (checkpoints, TensorBoard, `layer.weights`); the mask
    # state is float32 (bool for `prune_mask`) under any dtype policy, and only the
    # threshold trains.
    layer = SparseLinear(4, dtype="bfloat16")
    layer.build((None, 6))
    mask = layer.masks["kernel"]
    assert [v.path.split("/")[-1] for v in mask.variables] == list(MASK_VARIABLES)
    assert [w.path.split("/")[-1] for w in layer.trainable_weights] == [
        "kernel",
        "bias",
        "threshold",
    ]
    assert [v.dtype for v in mask.variables] == ["float32", "bool", "float32", "float32", "float32"]
    assert [v.trainable for v in mask.variables] == [True, False, False, False, False]
    assert [tuple(v.shape) for v in mask.variables] == [(4,), (6, 4), (), (), (5,)]
    # Replicas compute the same scalars: tf.distribute keeps the first replica's.
    for variable in mask.variables[2:]:
        assert variable.aggregation == "only_first_replica"
    # A fresh mask pushes nothing: penalty and driver state are zeros, prune_mask all True.
    assert float(to_numpy(layer.sparsity_penalty)) == 0.0
    np.testing.assert_array_equal(to_numpy(mask.sparsity_state), np.zeros(5))
    assert to_numpy(layer.prune_mask).all()


def test_a_layer_with_two_pruned_kernels_prefixes_its_mask_variables():
    from keras_sparse import SparseSeparableConv1D

    layer = SparseSeparableConv1D(4, 3, depth_multiplier=2)
    layer.build((None, 10, 5))
    for kernel_name, prefix in (
        ("depthwise_kernel", "depthwise_"),
        ("pointwise_kernel", "pointwise_"),
    ):
        names = [v.path.split("/")[-1] for v in layer.masks[kernel_name].variables]
        assert names == [prefix + name for name in MASK_VARIABLES]
    # One threshold per depthwise output (channel x multiplier), one per filter.
    assert layer.masks["depthwise_kernel"].threshold.shape == (5, 2)
    assert layer.masks["pointwise_kernel"].threshold.shape == (4,)


def test_threshold_regularizer_and_constraint_apply_and_survive_the_config(rng):
    layer = SparseLinear(3, threshold_regularizer=keras.regularizers.L2(0.5))
    layer.build((None, 4))
    layer.threshold.assign(np.array([0.2, 0.0, 0.6], "float32"))
    layer(rng.normal(size=(2, 4)).astype("float32"))
    # The penalty on the thresholds: 0.5 * sum(t ** 2), among the layer's losses.
    assert float(to_numpy(sum(layer.losses))) == pytest.approx(0.5 * (0.04 + 0.36), rel=1e-6)
    # The default constraint keeps thresholds non-negative after an optimizer step.
    gradient = keras.ops.convert_to_tensor(np.array([1.0, 1.0, -1.0], "float32"))
    keras.optimizers.SGD(1.0).apply([gradient], [layer.threshold])
    np.testing.assert_allclose(to_numpy(layer.threshold), [0.0, 0.0, 1.6], rtol=1e-6)
    config = layer.get_config()
    assert config["threshold_regularizer"]["config"]["l2"] == pytest.approx(0.5)
    assert config["threshold_constraint"]["class_name"] == "NonNeg"
    copy = SparseLinear.from_config(config)
    assert isinstance(copy.mask_options.threshold_regularizer, keras.regularizers.L2)
    assert isinstance(copy.mask_options.threshold_constraint, keras.constraints.NonNeg)


def test_options_are_stored_as_python_values():
    # NumPy scalars are accepted and stored as Python values: the config is plain JSON.
    import json

    layer = SparseLinear(
        3,
        structured=np.bool_(True),
        straight_through=np.bool_(False),
        temperature=np.float32(2.5),
    )
    config = layer.get_config()
    assert type(config["structured"]) is bool and config["structured"] is True
    assert type(config["straight_through"]) is bool and config["straight_through"] is False
    assert type(config["temperature"]) is float and config["temperature"] == 2.5
    json.dumps(config)


def test_factories_return_built_layers():
    layer = SparseLinear.new(784, 256)
    assert layer.built and layer.in_features == 784 and layer.out_features == 256
    assert layer.is_structured and layer.bias is not None
    unstructured = SparseLinear.unstructured(20, 3)
    assert not unstructured.is_structured and unstructured.threshold.shape == (20, 3)
    no_bias = SparseLinear.with_bias(20, 3, False)
    assert no_bias.bias is None and len(no_bias.trainable_weights) == 2
    assert SparseLinear.with_bias(20, 3, True).bias is not None


def test_default_temperature_is_relative_to_the_kernel_spread():
    layer = SparseLinear.new(784, 300)
    std = float(np.std(to_numpy(layer.kernel)))
    assert math.isclose(layer.temperature, DEFAULT_RELATIVE_TEMPERATURE / std, rel_tol=1e-4)
    small = SparseLinear.new(64, 10)
    assert small.temperature < layer.temperature  # wider weights, softer absolute slope


@pytest.mark.parametrize(
    "shape, fans",
    [
        ((), (1, 1)),
        ((5,), (5, 5)),
        ((3, 4), (3, 4)),
        ((3, 4, 8), (12, 24)),
        ((3, 3, 4, 8), (36, 72)),
    ],
)
def test_compute_fans_counts_as_keras_initializers_do(shape, fans):
    from keras_sparse.mask import compute_fans

    # A conv kernel (*window, in, out): each input and output is repeated over the window.
    assert compute_fans(shape) == fans


@pytest.mark.parametrize(
    "initializer, shape, std",
    [
        (keras.initializers.GlorotUniform(), (20, 30), math.sqrt(2.0 / 50.0)),
        (keras.initializers.GlorotUniform(), (1, 1), 1.0),  # fan of one: variance `scale`
        (keras.initializers.HeNormal(), (20, 30), math.sqrt(2.0 / 20.0)),
        (keras.initializers.VarianceScaling(3.0, "fan_out"), (20, 30), math.sqrt(3.0 / 30.0)),
        (keras.initializers.LecunNormal(), (3, 3, 4, 8), math.sqrt(1.0 / 36.0)),
    ],
)
def test_the_spread_an_initializer_promises_is_read_without_drawing(initializer, shape, std):
    # Used for the default temperature of a kernel built inside a traced function.
    from keras_sparse.mask import _initializer_std

    assert _initializer_std(initializer, shape) == pytest.approx(std, rel=1e-12)


def test_the_spread_of_another_initializer_is_measured_on_a_draw():
    from keras_sparse.mask import _initializer_std

    spread = _initializer_std(keras.initializers.RandomNormal(stddev=0.5), (200, 300))
    assert spread == pytest.approx(0.5, rel=0.02)


def test_temperature_property_sets_the_variable():
    layer = SparseLinear(3, temperature=2.0)
    assert layer.temperature == 2.0
    layer.build((None, 5))
    layer.temperature = 7.5
    assert layer.temperature == 7.5
    assert not layer._temperature.trainable


# --------------------------------------------------------------- pruning API


def test_density_counts_weights_at_or_above_the_threshold():
    layer = SparseLinear.new(2, 3, temperature=1.0)
    layer.kernel.assign(np.array([[0.1, -0.5, 0.3], [-0.2, 0.05, 0.6]], "float32"))
    layer.reset_threshold(np.array([0.2, 0.5, 0.4], "float32"))
    # active: |0.1|<0.2 no, |-0.2|>=0.2 yes, |-0.5|>=0.5 yes, 0.05 no, 0.3 no, 0.6 yes
    assert layer.num_active() == 3
    assert layer.density() == pytest.approx(0.5)
    assert layer.sparsity() == pytest.approx(0.5)
    expected = np.array([[0.0, -0.5, 0.0], [-0.2, 0.0, 0.6]], "float32")
    np.testing.assert_array_equal(to_numpy(layer.effective_weight()), expected)
    # effective_weight() does not change the layer
    assert to_numpy(layer.kernel)[0, 0] == pytest.approx(0.1)


def test_hard_prune_zeroes_pruned_weights_and_resets_the_threshold():
    layer = SparseLinear.unstructured(2, 2, temperature=1.0)
    layer.kernel.assign(np.array([[0.1, -0.5], [-0.2, 0.7]], "float32"))
    layer.reset_threshold(np.array([[0.3, 0.1], [0.1, 0.8]], "float32"))
    layer.hard_prune()
    np.testing.assert_array_equal(
        to_numpy(layer.kernel), np.array([[0.0, -0.5], [-0.2, 0.0]], "float32")
    )
    np.testing.assert_array_equal(to_numpy(layer.threshold), np.zeros((2, 2)))
    assert layer.num_active() == 2  # still counted as pruned with a zero threshold
    assert layer.density() == pytest.approx(0.5)


# Every path a pruned weight could come back through: the training mask (each backend's
# fused gradient), the straight-through mix, the soft inference mask and the hard one.
PATHS = {
    "training": ({}, True),
    "straight_through": ({"straight_through": True}, True),
    "soft_inference": ({"inference_mask": "soft"}, False),
    "hard_inference": ({}, False),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_pruned_weights_stay_pruned_when_the_threshold_drops(path):
    options, training = PATHS[path]
    layer = SparseLinear.new(3, 2, temperature=4.0, use_bias=False, **options)
    original = np.array([[0.1, 0.9], [0.8, 0.05], [0.3, 0.4]], "float32")
    layer.kernel.assign(original)
    layer.reset_threshold(0.35)
    layer.hard_prune()
    pruned = np.abs(original) < 0.35
    np.testing.assert_array_equal(to_numpy(layer.prune_mask), ~pruned)
    # An optimizer's momentum moves the zeroed entries back, past every kept weight (their
    # gradient is zero, not their velocity), and the threshold drops below all of them:
    # every mask formula alone would keep them; `prune_mask` must not.
    moved = np.where(pruned, np.float32(-1.5), original)
    layer.kernel.assign(moved)
    layer.reset_threshold(0.02)
    soft = reference.soft_mask(moved, 0.02, 4.0)
    hard = (np.abs(moved) >= 0.02).astype("float32")
    mask = soft if path in ("training", "soft_inference") else hard
    expected = np.where(pruned, 0.0, moved * mask)
    x = np.eye(3, dtype="float32")
    np.testing.assert_allclose(to_numpy(layer(x, training=training)), expected, rtol=1e-6)
    d_kernel, _ = gradients(layer, x, np.ones((3, 2), "float32"), training=training)
    assert np.all(d_kernel[pruned] == 0)
    assert np.all(d_kernel[~pruned] != 0)


def test_reset_threshold_accepts_scalars_and_arrays():
    layer = SparseLinear.new(4, 3)
    layer.reset_threshold(0.25)
    np.testing.assert_array_equal(to_numpy(layer.threshold), np.full(3, 0.25, "float32"))
    layer.reset_threshold([0.0, 0.1, 0.2])
    np.testing.assert_allclose(to_numpy(layer.threshold), [0.0, 0.1, 0.2])


def test_a_masks_own_density_and_reset_threshold(rng):
    layer = make_layer(rng)  # a 6 x 4 kernel
    mask = layer.masks["kernel"]
    kernel = to_numpy(layer.kernel)
    mask.reset_threshold(0.5)
    np.testing.assert_array_equal(to_numpy(layer.threshold), np.full(4, 0.5, "float32"))
    assert mask.density() == pytest.approx(np.mean(np.abs(kernel) >= 0.5))
    layer.hard_prune()  # inference may now skip the mask ...
    mask.reset_threshold(1.0)  # ... until the threshold changes
    x = np.eye(6, dtype="float32")
    pruned = to_numpy(layer.kernel)
    expected = x @ (pruned * (np.abs(pruned) >= 1.0)) + to_numpy(layer.bias)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-6, atol=1e-6)


def test_trainable_false_freezes_every_weight():
    layer = SparseLinear.new(4, 3)
    layer.trainable = False
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 7

"""Every sparse layer type against a NumPy reference of its masked forward pass and gradients.

The layers are the stock Keras layers reading their kernels through a mask;
the references below compute the mask and the layer's arithmetic in NumPy
(convolutions by sliding windows, einsum by `np.einsum`), and the gradients
by central finite differences in float64.
"""

import dataclasses
import os

import keras
import numpy as np
import pytest
import reference
from backend_utils import gradients, to_numpy

import keras_sparse as ks

TEMPERATURE = 3.0


@dataclasses.dataclass
class Case:
    cls: type
    kwargs: dict
    input_shape: tuple
    forward: object  # (x, {kernel name: effective kernel}, bias) -> y
    output_axes: dict  # kernel name -> output axes
    n_m_axis: dict = dataclasses.field(default_factory=dict)  # kernel name -> axis
    integer_inputs: bool = False


def _bias(y, bias):
    return y if bias is None else y + bias


CASES = {
    "conv1d": Case(
        ks.SparseConv1D,
        {"filters": 3, "kernel_size": 2},
        (2, 6, 4),
        lambda x, k, b: _bias(reference.conv(x, k["kernel"]), b),
        {"kernel": (2,)},
        {"kernel": 1},
    ),
    "conv2d_same_strided": Case(
        ks.SparseConv2D,
        {"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same"},
        (2, 6, 6, 4),
        lambda x, k, b: _bias(reference.conv(x, k["kernel"], 2, "same"), b),
        {"kernel": (3,)},
        {"kernel": 2},
    ),
    "conv3d": Case(
        ks.SparseConv3D,
        {"filters": 2, "kernel_size": 2},
        (1, 3, 4, 3, 4),
        lambda x, k, b: _bias(reference.conv(x, k["kernel"]), b),
        {"kernel": (4,)},
        {"kernel": 3},
    ),
    "conv1d_transpose": Case(
        ks.SparseConv1DTranspose,
        {"filters": 3, "kernel_size": 2},
        (2, 5, 4),
        lambda x, k, b: _bias(reference.conv_transpose(x, k["kernel"]), b),
        {"kernel": (1,)},
        {"kernel": 2},
    ),
    "conv2d_transpose": Case(
        ks.SparseConv2DTranspose,
        {"filters": 3, "kernel_size": 2},
        (2, 4, 3, 4),
        lambda x, k, b: _bias(reference.conv_transpose(x, k["kernel"]), b),
        {"kernel": (2,)},
        {"kernel": 3},
    ),
    "conv3d_transpose": Case(
        ks.SparseConv3DTranspose,
        {"filters": 2, "kernel_size": 2},
        (1, 3, 2, 3, 4),
        lambda x, k, b: _bias(reference.conv_transpose(x, k["kernel"]), b),
        {"kernel": (3,)},
        {"kernel": 4},
    ),
    "depthwise1d": Case(
        ks.SparseDepthwiseConv1D,
        {"kernel_size": 3, "depth_multiplier": 2},
        (2, 6, 3),
        lambda x, k, b: _bias(reference.depthwise_conv(x, k["kernel"]), b),
        {"kernel": (1, 2)},
    ),
    "depthwise2d": Case(
        ks.SparseDepthwiseConv2D,
        {"kernel_size": 2, "depth_multiplier": 2},
        (2, 4, 4, 3),
        lambda x, k, b: _bias(reference.depthwise_conv(x, k["kernel"]), b),
        {"kernel": (2, 3)},
    ),
    "separable1d": Case(
        ks.SparseSeparableConv1D,
        {"filters": 3, "kernel_size": 2, "depth_multiplier": 2},
        (2, 5, 3),
        lambda x, k, b: _bias(
            reference.conv(
                reference.depthwise_conv(x, k["depthwise_kernel"]), k["pointwise_kernel"]
            ),
            b,
        ),
        {"depthwise_kernel": (1, 2), "pointwise_kernel": (2,)},
        {"pointwise_kernel": 1},
    ),
    "separable2d": Case(
        ks.SparseSeparableConv2D,
        {"filters": 4, "kernel_size": 2},
        (2, 4, 4, 3),
        lambda x, k, b: _bias(
            reference.conv(
                reference.depthwise_conv(x, k["depthwise_kernel"]), k["pointwise_kernel"]
            ),
            b,
        ),
        {"depthwise_kernel": (2, 3), "pointwise_kernel": (3,)},
        {"pointwise_kernel": 2},
    ),
    "einsum_dense_like": Case(
        ks.SparseEinsumDense,
        {"equation": "ab,bc->ac", "output_shape": 5, "bias_axes": "c"},
        (3, 8),
        lambda x, k, b: _bias(np.einsum("ab,bc->ac", x, k["kernel"]), b),
        {"kernel": (1,)},
        {"kernel": 0},
    ),
    "einsum_attention_query": Case(
        ks.SparseEinsumDense,
        {"equation": "abc,cde->abde", "output_shape": (None, 2, 3), "bias_axes": "de"},
        (2, 3, 8),
        lambda x, k, b: _bias(np.einsum("abc,cde->abde", x, k["kernel"]), b),
        {"kernel": (1, 2)},
        {"kernel": 0},
    ),
    "einsum_attention_output": Case(
        ks.SparseEinsumDense,
        {"equation": "abcd,cde->abe", "output_shape": (None, 4), "bias_axes": "e"},
        (2, 3, 2, 4),
        lambda x, k, b: _bias(np.einsum("abcd,cde->abe", x, k["kernel"]), b),
        {"kernel": (2,)},
        {"kernel": 1},
    ),
    "embedding": Case(
        ks.SparseEmbedding,
        {"input_dim": 7, "output_dim": 4},
        (2, 5),
        lambda x, k, b: k["embeddings"][x],
        {"embeddings": (0,)},
        integer_inputs=True,
    ),
}


def inputs_for(case, rng):
    if case.integer_inputs:
        return rng.integers(0, case.kwargs["input_dim"], size=case.input_shape).astype("int32")
    return rng.normal(size=case.input_shape).astype("float32")


def make(case, rng, structured=True, **kwargs):
    """A built sparse layer with normal kernels and bias, thresholds in [0.2, 0.9)."""
    layer = case.cls(**case.kwargs, structured=structured, temperature=TEMPERATURE, **kwargs)
    layer.build(case.input_shape)
    for mask in layer.masks.values():
        mask.kernel.assign(rng.normal(size=mask.shape).astype("float32"))
        shape = mask.threshold.shape
        mask.threshold.assign(rng.uniform(0.2, 0.9, size=shape).astype("float32"))
    if getattr(layer, "bias", None) is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer


def arrays(layer):
    kernels = {name: to_numpy(mask.kernel) for name, mask in layer.masks.items()}
    thresholds = {name: to_numpy(mask.threshold) for name, mask in layer.masks.items()}
    bias = to_numpy(layer.bias) if getattr(layer, "bias", None) is not None else None
    return kernels, thresholds, bias


def expected(case, x, kernels, thresholds, bias, structured=True, hard=False):
    effective = {
        name: kernel
        * reference.mask_of(
            kernel, thresholds[name], TEMPERATURE, case.output_axes[name], structured, hard
        )
        for name, kernel in kernels.items()
    }
    return case.forward(x.astype("float64") if not case.integer_inputs else x, effective, bias)


ids = list(CASES)


@pytest.mark.parametrize("name", ids)
@pytest.mark.parametrize("structured", [True, False], ids=["per_unit", "per_weight"])
def test_training_forward_is_the_masked_stock_arithmetic(name, structured, rng):
    case = CASES[name]
    layer = make(case, rng, structured=structured)
    x = inputs_for(case, rng)
    want = expected(case, x, *arrays(layer), structured=structured)
    got = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ids)
def test_inference_forward_uses_the_hard_mask(name, rng):
    case = CASES[name]
    layer = make(case, rng)
    x = inputs_for(case, rng)
    want = expected(case, x, *arrays(layer), hard=True)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), want, rtol=1e-4, atol=1e-5)
    # Some weights are pruned and some kept, so the test could tell a wrong mask.
    assert 0 < layer.density() < 1


def _loss(case, x, upstream, kernels, thresholds, bias):
    return float(np.sum(expected(case, x, kernels, thresholds, bias) * upstream))


def _finite_differences(case, x, upstream, kernels, thresholds, bias, eps=1e-5):
    kernels = {k: v.astype("float64") for k, v in kernels.items()}
    thresholds = {k: v.astype("float64") for k, v in thresholds.items()}
    grads = {}
    for group, values in (("kernel", kernels), ("threshold", thresholds)):
        for name, array in values.items():
            grad = np.zeros_like(array)
            for index in np.ndindex(*array.shape):
                original = array[index]
                array[index] = original + eps
                up = _loss(case, x, upstream, kernels, thresholds, bias)
                array[index] = original - eps
                down = _loss(case, x, upstream, kernels, thresholds, bias)
                array[index] = original
                grad[index] = (up - down) / (2 * eps)
            grads[(group, name)] = grad
    return grads


@pytest.mark.parametrize("name", ids)
def test_kernel_and_threshold_gradients_match_finite_differences(name, rng, monkeypatch):
    # Eager PyTorch on a CPU runs the fused mask on slices of the kernel's first axis:
    # one row at a time here, so that every layout's slices and their per-unit sums count.
    from keras_sparse import mask as mask_module

    monkeypatch.setattr(mask_module, "_CPU_SLICE_ELEMENTS", 1)
    case = CASES[name]
    layer = make(case, rng)
    x = inputs_for(case, rng)
    y = to_numpy(layer(x, training=True))
    upstream = rng.normal(size=y.shape).astype("float32")
    want = _finite_differences(case, x, upstream, *arrays(layer))
    got = dict(zip([v.path for v in layer.trainable_variables], gradients(layer, x, upstream)))
    for mask_name, mask in layer.masks.items():
        np.testing.assert_allclose(
            got[mask.kernel.path], want[("kernel", mask_name)], rtol=2e-3, atol=2e-4
        )
        np.testing.assert_allclose(
            got[mask.threshold.path], want[("threshold", mask_name)], rtol=2e-3, atol=2e-4
        )


@pytest.mark.parametrize("name", ids)
def test_neuron_granularity_prunes_whole_output_units(name, rng):
    case = CASES[name]
    layer = make(case, rng, granularity="neuron")
    for mask_name, mask in layer.masks.items():
        kernel = to_numpy(mask.kernel)
        axes = case.output_axes[mask_name]
        reduce_axes = tuple(a for a in range(kernel.ndim) if a not in axes)
        rms = np.sqrt(np.mean(np.square(kernel), axis=reduce_axes, keepdims=True))
        # Half the units just below their RMS (kept), half just above (pruned).
        flat = rms.reshape(-1)
        threshold = np.where(np.arange(flat.size) % 2 == 0, flat * 0.99, flat * 1.01)
        mask.threshold.assign(threshold.reshape(mask.threshold.shape).astype("float32"))
    layer.hard_prune()
    for mask_name, mask in layer.masks.items():
        kernel = to_numpy(mask.kernel)
        axes = case.output_axes[mask_name]
        reduce_axes = tuple(a for a in range(kernel.ndim) if a not in axes)
        alive = np.any(kernel != 0, axis=reduce_axes).reshape(-1)
        np.testing.assert_array_equal(alive, np.arange(alive.size) % 2 == 0)


N_M_CASES = [name for name in ids if CASES[name].n_m_axis and len(CASES[name].output_axes) == 1]


@pytest.mark.parametrize("name", N_M_CASES)
def test_n_m_groups_run_along_the_reduction_axis(name, rng):
    case = CASES[name]
    layer = make(case, rng, granularity="n:m", n_m=(1, 2))
    layer.reset_threshold(0.0)
    layer.hard_prune()
    for mask_name, mask in layer.masks.items():
        kernel = to_numpy(mask.kernel)
        axis = case.n_m_axis[mask_name]
        assert ks.is_n_m_sparse(kernel, 1, 2, axis=axis)
        # and not along another axis: the pattern is the reduction axis's own
        others = [a for a in range(kernel.ndim) if a != axis and kernel.shape[a] > 1]
        assert not all(ks.is_n_m_sparse(kernel, 1, 2, axis=a) for a in others)
        assert mask.num_active() == pytest.approx(
            kernel.size / 2, abs=kernel.size / kernel.shape[axis]
        )


@pytest.mark.parametrize("name", ["depthwise2d", "embedding", "separable2d"])
def test_layers_without_a_reduction_axis_refuse_n_m(name):
    case = CASES[name]
    with pytest.raises(ValueError, match="granularity='n:m'"):
        case.cls(**case.kwargs, granularity="n:m")


@pytest.mark.parametrize("name", ids)
def test_hard_prune_zeroes_exactly_what_the_hard_mask_drops(name, rng):
    case = CASES[name]
    layer = make(case, rng)
    kernels, thresholds, _ = arrays(layer)
    kept = {
        n: reference.mask_of(k, thresholds[n], TEMPERATURE, case.output_axes[n], hard=True)
        for n, k in kernels.items()
    }
    layer.hard_prune()
    assert layer.num_active() == sum(int(m.sum()) for m in kept.values())
    for n, mask in layer.masks.items():
        np.testing.assert_array_equal(to_numpy(mask.kernel), kernels[n] * kept[n])
        np.testing.assert_array_equal(to_numpy(mask.threshold), 0)


@pytest.mark.parametrize("name", ids)
def test_each_type_meets_the_generic_layer_contract(name, rng, tmp_path):
    case = CASES[name]
    layer = case.cls(**case.kwargs)
    config = layer.get_config()
    assert case.cls.from_config(config).get_config() == config
    inputs = keras.Input(
        case.input_shape[1:],
        batch_size=case.input_shape[0],
        dtype="int32" if case.integer_inputs else "float32",
    )
    model = keras.Model(inputs, layer(inputs))
    x = inputs_for(case, rng)
    y = to_numpy(model(x))
    # One compiled fit step moves the weights.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [to_numpy(w) for w in layer.trainable_weights]
    model.fit(x, rng.normal(size=y.shape).astype("float32"), epochs=1, verbose=0)
    after = [to_numpy(w) for w in layer.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    # .keras round trip: the same class, the same inference outputs.
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded.layers[-1]) is case.cls
    np.testing.assert_array_equal(
        to_numpy(reloaded.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0))
    )


@pytest.mark.parametrize("name", ids)
def test_mixed_precision_computes_in_float16_with_float32_masks(name, rng):
    case = CASES[name]
    layer = case.cls(**case.kwargs, dtype="mixed_float16", temperature=TEMPERATURE)
    layer.build(case.input_shape)
    for mask in layer.masks.values():
        mask.kernel.assign(rng.normal(size=mask.shape).astype("float32"))
        mask.threshold.assign(np.full(mask.threshold.shape, 0.5, "float32"))
    x = inputs_for(case, rng)
    out = layer(x, training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    for mask in layer.masks.values():
        assert {v.dtype for v in mask.variables} == {"float32", "bool"}
        assert mask.kernel.dtype == "float32"
    # The hard mask prunes, and float16 outputs still follow the float32 reference.
    assert 0 < layer.density() < 1
    want = expected(case, x, *arrays(layer), hard=True)
    np.testing.assert_allclose(to_numpy(out).astype("float32"), want, rtol=2e-2, atol=2e-2)


def test_a_separable_layer_prunes_both_kernels_with_their_own_masks(rng):
    layer = make(CASES["separable2d"], rng)
    assert set(layer.masks) == {"depthwise_kernel", "pointwise_kernel"}
    names = {v.name for v in layer.weights}
    assert {"depthwise_threshold", "pointwise_threshold", "depthwise_prune_mask"} <= names
    with pytest.raises(ValueError, match="prunes 2 kernels"):
        layer.effective_weight()
    assert tuple(layer.effective_weight("pointwise_kernel").shape) == (1, 1, 3, 4)

"""Layers with random weights, built the same way by every test file that needs one."""

from backend_utils import to_numpy

from keras_sparse import SparseLinear


def make_layer(
    rng, in_features=6, units=4, structured=True, use_bias=True, temperature=5.0, **kwargs
):
    """A built `SparseLinear` with normal kernel and bias and thresholds in [0.2, 0.9)."""
    layer = SparseLinear(
        units, structured=structured, use_bias=use_bias, temperature=temperature, **kwargs
    )
    layer.build((None, in_features))
    layer.kernel.assign(rng.normal(size=(in_features, units)).astype("float32"))
    if use_bias:
        layer.bias.assign(rng.normal(size=(units,)).astype("float32"))
    threshold_shape = (units,) if structured else (in_features, units)
    layer.threshold.assign(rng.uniform(0.2, 0.9, size=threshold_shape).astype("float32"))
    return layer


def layer_arrays(layer):
    """`(kernel, bias or None, threshold)` as NumPy."""
    bias = to_numpy(layer.bias) if layer.use_bias else None
    return to_numpy(layer.kernel), bias, to_numpy(layer.threshold)

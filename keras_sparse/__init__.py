"""keras-sparse: learnable, differentiable pruning for Keras 3 on every backend."""

from keras_sparse.callbacks import SparsityScheduler
from keras_sparse.distribution import get_layout_map, validate_layout_map
from keras_sparse.export import export_model, size_report
from keras_sparse.granularity import is_n_m_sparse
from keras_sparse.layers import (
    SparseConv1D,
    SparseConv1DTranspose,
    SparseConv2D,
    SparseConv2DTranspose,
    SparseConv3D,
    SparseConv3DTranspose,
    SparseDense,
    SparseDepthwiseConv1D,
    SparseDepthwiseConv2D,
    SparseEinsumDense,
    SparseEmbedding,
    SparseLinear,
    SparseMultiHeadAttention,
    SparseSeparableConv1D,
    SparseSeparableConv2D,
)
from keras_sparse.mask import DEFAULT_RELATIVE_TEMPERATURE, KernelMask
from keras_sparse.schedules import (
    ConstantSparsity,
    ExponentialTemperature,
    PolynomialDecay,
    SparsitySchedule,
)
from keras_sparse.shrink import LayerShrink, ShrinkResult, shrink
from keras_sparse.transforms import sparsify, sparsity_report, strip
from keras_sparse.walk import kernel_masks, sparse_layers

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_RELATIVE_TEMPERATURE",
    "ConstantSparsity",
    "ExponentialTemperature",
    "KernelMask",
    "LayerShrink",
    "PolynomialDecay",
    "ShrinkResult",
    "SparseConv1D",
    "SparseConv1DTranspose",
    "SparseConv2D",
    "SparseConv2DTranspose",
    "SparseConv3D",
    "SparseConv3DTranspose",
    "SparseDense",
    "SparseDepthwiseConv1D",
    "SparseDepthwiseConv2D",
    "SparseEinsumDense",
    "SparseEmbedding",
    "SparseLinear",
    "SparseMultiHeadAttention",
    "SparseSeparableConv1D",
    "SparseSeparableConv2D",
    "SparsitySchedule",
    "SparsityScheduler",
    "export_model",
    "get_layout_map",
    "is_n_m_sparse",
    "kernel_masks",
    "shrink",
    "size_report",
    "sparse_layers",
    "sparsify",
    "sparsity_report",
    "strip",
    "validate_layout_map",
]

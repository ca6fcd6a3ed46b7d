"""keras-sparse: learnable, differentiable pruning for Keras 3 on every backend."""

from keras_sparse.callbacks import SparsityScheduler, sparse_layers
from keras_sparse.distribution import get_layout_map, validate_layout_map
from keras_sparse.export import size_report
from keras_sparse.granularity import is_n_m_sparse
from keras_sparse.layer import DEFAULT_RELATIVE_TEMPERATURE, SparseLinear
from keras_sparse.schedules import (
    ConstantSparsity,
    ExponentialTemperature,
    PolynomialDecay,
    SparsitySchedule,
)
from keras_sparse.shrink import LayerShrink, ShrinkResult, shrink
from keras_sparse.transforms import sparsify, sparsity_report, strip

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RELATIVE_TEMPERATURE",
    "ConstantSparsity",
    "ExponentialTemperature",
    "PolynomialDecay",
    "SparseLinear",
    "SparsitySchedule",
    "SparsityScheduler",
    "sparse_layers",
    "get_layout_map",
    "validate_layout_map",
    "sparsify",
    "sparsity_report",
    "strip",
    "size_report",
    "is_n_m_sparse",
    "shrink",
    "ShrinkResult",
    "LayerShrink",
]

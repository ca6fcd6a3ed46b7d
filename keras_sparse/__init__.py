"""keras-sparse: learnable, differentiable pruning for Keras 3 on every backend."""

from keras_sparse.layer import DEFAULT_RELATIVE_TEMPERATURE, SparseLinear

__version__ = "0.1.0"

__all__ = ["DEFAULT_RELATIVE_TEMPERATURE", "SparseLinear"]

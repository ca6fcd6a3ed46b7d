"""Values read back on the host, as NumPy arrays."""

import keras
import numpy as np


def to_numpy(value):
    """`value` (a tensor, a Keras variable or an array) as a NumPy array.

    A variable is read as a tensor first: NumPy 2 warns (a DeprecationWarning of
    its `copy` keyword) when it converts a Keras variable on JAX, or a
    `tf.Variable`, itself.
    """
    if isinstance(value, keras.Variable):
        value = value.value
    read_value = getattr(value, "read_value", None)  # a tf.Variable
    if callable(read_value):
        value = read_value()
    return np.asarray(keras.ops.convert_to_numpy(value))

"""The one place where tests touch backend-specific autodiff."""

import keras
import numpy as np
from keras import ops


def gradients(layer, x, upstream, training=True, with_losses=False):
    """Gradients of `sum(layer(x) * upstream)` (plus the layer's `add_loss` terms if
    `with_losses`) w.r.t. `layer.trainable_variables`, as NumPy; zeros for a variable
    the loss does not depend on (the threshold under the hard mask)."""
    backend = keras.backend.backend()
    variables = layer.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.sum(layer(x, training=training) * upstream)
            if with_losses:
                loss = loss + sum(layer.losses)
        grads = tape.gradient(
            loss, [v.value for v in variables], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(trainable):
            y, _, losses = layer.stateless_call(
                trainable, non_trainable, x, training=training, return_losses=True
            )
            return ops.sum(y * upstream) + (sum(losses) if with_losses else 0.0)

        grads = jax.grad(loss_fn)([v.value for v in variables])
    elif backend == "torch":
        import torch

        for v in variables:
            v.value.grad = None
        loss = ops.sum(layer(x, training=training) * ops.convert_to_tensor(upstream))
        if with_losses:
            loss = loss + sum(layer.losses)
        loss.backward()
        grads = [
            v.value.grad if v.value.grad is not None else torch.zeros_like(v.value)
            for v in variables
        ]
    else:  # pragma: no cover
        raise NotImplementedError(backend)
    return [ops.convert_to_numpy(g) for g in grads]


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))
